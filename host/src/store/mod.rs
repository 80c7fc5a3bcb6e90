//! The host's own tables, one module per table: the only SQL that names the table. Queries
//! that join tables live with the table whose rows they are about. The plugin registry's tables
//! live with `lifecycle/`, the gap tracker's with `source::safe_head`, the projection roles with
//! `sink::role`; `layers.rs` lists every owner, and a test fails when another module names a
//! table.

pub mod adopted;
pub mod carried;
pub mod checkpoints;
pub mod controls;
pub mod dead_letters;
pub mod halts;
pub mod partitions;
pub mod projections;
pub mod replica_sets;
pub mod workers;

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
