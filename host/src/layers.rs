//! The host's layers, lowest first. A module may use modules of lower layers only, so that
//! dependencies point down (shared utilities at the bottom, the command line on top) and no
//! two modules depend on each other. `docs/architecture.md` draws the same map; the tests below
//! read every `crate::` path in `src/` and fail on an edge that points sideways or up, and on a
//! host table named outside its module in `store/`.

/// Host tables whose SQL lives in one module, and that module under `src/`: a file, or a folder
/// (ending in `/`). Modules of `store/` may also join each other's tables. (Replica sets,
/// workers and partitions are still read from several modules; they are moving to `store/`.)
pub const TABLE_OWNERS: &[(&str, &str)] = &[
    ("checkpoints", "store/checkpoints.rs"),
    ("carried_checkpoints", "store/carried.rs"),
    ("adopted_tables", "store/adopted.rs"),
    ("dead_letters", "store/dead_letters.rs"),
    ("halts", "store/halts.rs"),
    ("projection_controls", "store/controls.rs"),
    ("replica_sets", "store/replica_sets.rs"),
    // A generation's audit row is written with the bump of `replica_sets.generation`.
    ("generations", "store/replica_sets.rs"),
    ("workers", "store/workers.rs"),
    ("partitions", "store/partitions.rs"),
    ("projection_roles", "sink/role.rs"),
    ("plugins", "lifecycle/"),
    ("read_models", "lifecycle/"),
    // The batch audit: written by the commit's SQL function, read only by the benchmarks.
    ("batches", "bench/"),
    ("holes", "source/safe_head.rs"),
    ("locks", "db/mod.rs"),
];

/// Top-level modules by layer, lowest first.
pub const LAYERS: &[&[&str]] = &[
    // Utilities that know nothing of the domain: backoff, units, SQLSTATE names, NOTIFY.
    &["base"],
    // Identities, the metric registry, database plumbing, the throwaway dev server.
    &["ids", "metrics", "db", "devdb"],
    // The host's own tables, one module per table.
    &["store"],
    // Events in (gap-safe reading) and effects out (buffered writes, fenced commits).
    &["source", "sink"],
    // The sandboxed plugin.
    &["runtime"],
    // Which build runs for each projection, and its promotion.
    &["lifecycle"],
    // Membership and partition assignment.
    &["coordination"],
    // One projection's batch loop over the partitions it holds.
    &["pipeline"],
    // `run`'s flags -> a checked configuration.
    &["config"],
    // Commands on the database directly (`migrate`, `status`).
    &["status"],
    // Probes, metrics endpoint, admin API.
    &["http"],
    // Commands on a running fleet (through the admin API) or on replica sets.
    &["client", "operator", "adoption"],
    // Benchmarks and the demo.
    &["bench"],
    // A running host: wires everything together.
    &["app"],
    // The command line.
    &["cli"],
];

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};

    use super::{LAYERS, TABLE_OWNERS};

    fn layer_of(module: &str) -> Option<usize> {
        LAYERS.iter().position(|layer| layer.contains(&module))
    }

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

    /// The top-level modules a source text names through `crate::`, including every member of
    /// a group such as `crate::{db, sink::{role, commit}}`.
    fn crate_paths(source: &str) -> BTreeSet<String> {
        let mut found = BTreeSet::new();
        let mut rest = source;
        while let Some(at) = rest.find("crate::") {
            let after = &rest[at + "crate::".len()..];
            // `projection_host::crate::` cannot occur; a preceding identifier character means
            // another word (e.g. `my_crate::`).
            let preceded_by_ident = rest[..at]
                .chars()
                .last()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
            if !preceded_by_ident {
                if let Some(group) = after.strip_prefix('{') {
                    // The group's top-level members: names at brace depth 0 that start the
                    // group or follow a comma.
                    let mut depth = 0usize;
                    let mut expect_name = true;
                    let mut name = String::new();
                    for c in group.chars() {
                        match c {
                            '{' => depth += 1,
                            '}' if depth == 0 => {
                                if !name.is_empty() {
                                    found.insert(std::mem::take(&mut name));
                                }
                                break;
                            }
                            '}' => depth -= 1,
                            ',' if depth == 0 => {
                                if !name.is_empty() {
                                    found.insert(std::mem::take(&mut name));
                                }
                                expect_name = true;
                            }
                            c if expect_name && depth == 0 && (c.is_alphanumeric() || c == '_') => {
                                name.push(c)
                            }
                            _ if !name.is_empty() => {
                                found.insert(std::mem::take(&mut name));
                                expect_name = false;
                            }
                            _ => {}
                        }
                    }
                } else {
                    let name: String = after
                        .chars()
                        .take_while(|c| c.is_alphanumeric() || *c == '_')
                        .collect();
                    found.insert(name);
                }
            }
            rest = after;
        }
        found
    }

    #[test]
    fn crate_paths_finds_plain_paths_and_every_member_of_a_group() {
        let found = crate_paths(
            "use crate::db::quote_ident;\nuse crate::{sink::{role, commit}, ids};\nuse crate::{metrics, cli::Cli};\nlet x = crate::base::text::f(my_crate::y);",
        );
        let expected: BTreeSet<String> = ["db", "sink", "ids", "metrics", "cli", "base"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn every_module_uses_only_modules_of_lower_layers() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut upward = Vec::new();
        let mut unplaced = BTreeSet::new();
        for file in &files {
            let relative = file.strip_prefix(&src).expect("under src");
            let first = relative
                .components()
                .next()
                .and_then(|c| c.as_os_str().to_str())
                .expect("a file name");
            let module = first.trim_end_matches(".rs");
            if matches!(module, "lib" | "main" | "layers") {
                continue;
            }
            let Some(own) = layer_of(module) else {
                unplaced.insert(module.to_string());
                continue;
            };
            let source = std::fs::read_to_string(file).expect("source is readable");
            for used in crate_paths(&source) {
                if used == module {
                    continue;
                }
                match layer_of(&used) {
                    Some(layer) if layer < own => {}
                    Some(_) => upward.push(format!("{} uses crate::{used}", relative.display())),
                    None => {
                        unplaced.insert(used);
                    }
                }
            }
        }
        assert!(
            unplaced.is_empty(),
            "modules without a layer in layers.rs: {unplaced:?}"
        );
        assert!(
            upward.is_empty(),
            "dependencies that point sideways or up (see layers.rs):\n{}",
            upward.join("\n")
        );
    }

    #[test]
    fn tables_are_named_only_by_their_module() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let mut files = Vec::new();
        rust_files(&src, &mut files);
        let mut strays = Vec::new();
        for file in &files {
            let relative = file.strip_prefix(&src).expect("under src");
            if relative == Path::new("layers.rs") {
                continue;
            }
            let source = std::fs::read_to_string(file).expect("source is readable");
            for (table, owner) in TABLE_OWNERS {
                let named = format!("projection_host.{table}");
                let names_it = source.match_indices(&named).any(|(at, _)| {
                    // `projection_host.checkpoints_x` would be another table.
                    !source[at + named.len()..]
                        .starts_with(|c: char| c.is_alphanumeric() || c == '_')
                });
                let in_store = relative.starts_with("store");
                let owns = if owner.ends_with('/') {
                    relative.starts_with(owner.trim_end_matches('/'))
                } else {
                    relative == Path::new(owner)
                };
                if names_it && !owns && !in_store {
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
