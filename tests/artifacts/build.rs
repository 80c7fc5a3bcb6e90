//! Builds every example plugin (`plugins/*`) and test guest (`tests/guests/*`) for
//! wasm32-wasip2 with a nested cargo, in its own target directory (so it never waits on the
//! outer build's lock), and exports one path constant per component.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap());
    let workspace = manifest
        .parent()
        .and_then(Path::parent)
        .expect("tests/artifacts sits two levels below the workspace")
        .to_path_buf();
    for dir in ["wit", "guest-sdk", "plugins", "tests/guests"] {
        println!("cargo:rerun-if-changed={}", workspace.join(dir).display());
    }
    let mut packages = Vec::new();
    for group in ["plugins", "tests/guests"] {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(workspace.join(group))
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .filter(|p| p.join("Cargo.toml").is_file())
            .collect();
        dirs.sort();
        for dir in dirs {
            packages.push(package_name(&dir.join("Cargo.toml")));
        }
    }
    let target_dir = workspace.join("target").join("test-wasm");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&workspace)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-wasip2",
            "--target-dir",
        ])
        .arg(&target_dir);
    for p in &packages {
        cmd.args(["-p", p]);
    }
    // A plain nested build: no flags or wrappers meant for the host build (clippy, coverage).
    for var in [
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "CARGO_TARGET_DIR",
        "CARGO_BUILD_TARGET",
    ] {
        cmd.env_remove(var);
    }
    let status = cmd.status().expect("running cargo for the wasm artifacts");
    assert!(
        status.success(),
        "building the plugins and test guests for wasm32-wasip2 failed; is the target installed? (rustup target add wasm32-wasip2)"
    );
    let out_dir = target_dir.join("wasm32-wasip2").join("release");
    let mut code = String::new();
    for p in &packages {
        let file = out_dir.join(format!("{}.wasm", p.replace('-', "_")));
        assert!(file.is_file(), "expected {}", file.display());
        let constant = p.replace('-', "_").to_uppercase();
        code.push_str(&format!(
            "/// `{p}` built for wasm32-wasip2.\npub const {constant}: &str = {:?};\n",
            file.display().to_string()
        ));
    }
    code.push_str(&format!(
        "/// Every component above.\npub const ALL: &[&str] = &[{}];\n",
        packages
            .iter()
            .map(|p| p.replace('-', "_").to_uppercase())
            .collect::<Vec<_>>()
            .join(", ")
    ));
    std::fs::write(
        PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("artifacts.rs"),
        code,
    )
    .unwrap();
}

fn package_name(manifest: &Path) -> String {
    let text = std::fs::read_to_string(manifest).unwrap();
    text.lines()
        .find_map(|l| {
            l.trim()
                .strip_prefix("name = ")
                .map(|v| v.trim_matches('"').to_string())
        })
        .unwrap_or_else(|| panic!("no package name in {}", manifest.display()))
}
