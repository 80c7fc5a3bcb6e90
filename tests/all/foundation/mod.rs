//! The single-worker host: W1 exactness, crash recovery, sandbox failures, load errors, several
//! projections, and the keyed read-model API against a sequential model.

mod crash_recovery;
mod events_table;
mod keyed_api;
mod load_errors;
mod sandbox;
mod subscription_reads;
mod two_projections;
mod w1_exact;
