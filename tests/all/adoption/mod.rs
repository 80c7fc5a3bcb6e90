//! `import`: a Go-lineage deployment (its checkpoints in the Go tables, a W1 read model standing
//! at them, built by SQL as the Go workers would have left it) is adopted without a replay.

mod go_import;
