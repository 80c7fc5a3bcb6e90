//! The host's own tables, one module per table: the only SQL that names the table. Queries
//! that join tables live with the table whose rows they are about. (Tables moved here so far:
//! `checkpoints`; a test in `layers.rs` fails when another module names one of them.)

pub mod checkpoints;
