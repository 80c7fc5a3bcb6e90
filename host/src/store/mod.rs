//! The host's own tables, one module per table: the only SQL that names the table. Queries
//! that join tables live with the table whose rows they are about. (Tables moved here so far:
//! checkpoints, dead letters, halts, projection controls; `layers.rs` lists them, and a test
//! fails when a module outside `store/` names one of them.)

pub mod checkpoints;
pub mod controls;
pub mod dead_letters;
pub mod halts;
pub mod projections;

use crate::ids::{CommitToken, WorkerId};

/// Who records: this host process, proven by its secret commit token (whose hash is stored
/// with the worker), for one read model.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    pub replica_set: &'a str,
    pub worker: &'a WorkerId,
    pub token: &'a CommitToken,
    /// The read model's checkpoint key (its track).
    pub projection: &'a str,
}
