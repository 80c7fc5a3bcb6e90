use std::time::Duration;

use super::sha;
use crate::support::{Host, TestDb};

/// A restart reuses the compiled component (keyed by the bytes' sha256 and the engine's
/// compatibility hash); a damaged artifact is ignored and compiled again.
#[tokio::test]
async fn restarts_reuse_compiled_plugins() {
    let db = TestDb::new("cache").await;
    db.append_w1(0, 99, 10).await;
    let dir = std::env::temp_dir().join(format!("ph-cache-{:08x}", rand::random::<u32>()));
    let cache = dir.display().to_string();
    let run = |label: &str| {
        Host::run(
            label,
            &db.url,
            &[
                "--once",
                "--plugin",
                test_artifacts::BANK_BALANCES,
                "--plugin-cache-dir",
                &cache,
            ],
        )
    };

    let mut first = run("first");
    assert!(
        first.wait(Duration::from_secs(60)).await.success(),
        "{}",
        first.log()
    );
    assert_eq!(compiles(&first.log()), 1, "{}", first.log());
    // A compile is announced, and its duration reported, at info (what operators see).
    for (needle, with) in [
        ("compiling a plugin", "bytes="),
        ("compiled a plugin", "ms="),
    ] {
        assert!(
            first
                .log()
                .lines()
                .any(|l| l.contains(" INFO ") && l.contains(needle) && l.contains(with)),
            "no info line '{needle}' with {with}: {}",
            first.log()
        );
    }
    let artifacts: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(artifacts.len(), 1, "{artifacts:?}");
    assert!(
        artifacts[0].starts_with(&sha(test_artifacts::BANK_BALANCES))
            && artifacts[0].ends_with(".cwasm"),
        "{artifacts:?}"
    );

    let mut second = run("second");
    assert!(
        second.wait(Duration::from_secs(60)).await.success(),
        "{}",
        second.log()
    );
    assert!(
        second.log().contains("reused a compiled plugin"),
        "{}",
        second.log()
    );
    assert_eq!(compiles(&second.log()), 0, "{}", second.log());

    std::fs::write(dir.join(&artifacts[0]), b"damaged").unwrap();
    let mut third = run("third");
    assert!(
        third.wait(Duration::from_secs(60)).await.success(),
        "{}",
        third.log()
    );
    assert!(
        third.log().contains("ignoring an unusable compiled plugin"),
        "{}",
        third.log()
    );
    assert_eq!(compiles(&third.log()), 1, "{}", third.log());
    assert!(db.check_w1().await.exact());
    std::fs::remove_dir_all(&dir).ok();
    db.drop_db().await;
}

/// Compilations in a host's log (a reuse logs "reused a compiled plugin" instead).
fn compiles(log: &str) -> usize {
    log.matches("compiled a plugin").count()
}
