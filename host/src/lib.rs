//! projection-host: runs event-sourced projections compiled to WebAssembly components against a
//! PostgreSQL event store in the pupsourcing layout.
//!
//! The modules follow the data flow: `source` (events -> batches, gap-safe) -> `runtime` (the
//! plugin, sandboxed) -> `sink` (effects + fenced checkpoints in one transaction), driven by
//! `pipeline` over the partitions `coordination` assigns, observed through `http` and
//! `metrics`. `layers.rs` orders them (dependencies point down) and `docs/architecture.md`
//! draws the map.
//!
//! The binary is `cli::main`. The few public modules are what the integration tests in
//! `tests/all` use; everything else is private, so that the compiler reports dead code.

mod adoption;
mod app;
mod base;
#[cfg(feature = "bench")]
pub mod bench;
pub mod cli;
mod client;
mod config;
mod coordination;
pub mod db;
pub mod devdb;
mod http;
pub mod ids;
#[cfg(test)]
mod layers;
mod lifecycle;
mod metrics;
mod operator;
mod pipeline;
mod runtime;
pub mod sink;
mod source;
mod status;
mod store;
