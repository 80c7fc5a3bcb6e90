//! The host's own tables, one module per table: the only SQL that names the table. Queries
//! that join tables live with the table whose rows they are about. (Tables moved here so far:
//! `checkpoints`; `tables_are_named_only_by_their_module` keeps it that way.)

pub mod checkpoints;

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    /// Tables that have their module here, and the module's file under `src/`.
    const OWNED: &[(&str, &str)] = &[("checkpoints", "store/checkpoints.rs")];

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).expect("src is readable") {
            let path = entry.expect("directory entry").path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn tables_are_named_only_by_their_module() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut strays = Vec::new();
        for file in &files {
            let relative = file.strip_prefix(&src).expect("under src");
            let source = std::fs::read_to_string(file).expect("source is readable");
            for (table, owner) in OWNED {
                let named = format!("projection_host.{table}");
                let elsewhere = source.match_indices(&named).any(|(at, _)| {
                    // `projection_host.checkpoints_x` is another table.
                    !source[at + named.len()..]
                        .starts_with(|c: char| c.is_alphanumeric() || c == '_')
                });
                if elsewhere
                    && relative != Path::new(owner)
                    && relative != Path::new("store/mod.rs")
                {
                    strays.push(format!(
                        "{} names {named} (its SQL belongs in {owner})",
                        relative.display()
                    ));
                }
            }
        }
        assert!(strays.is_empty(), "{}", strays.join("\n"));
    }
}
