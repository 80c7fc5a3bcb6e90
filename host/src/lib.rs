//! projection-host: runs event-sourced projections compiled to WebAssembly components against a
//! PostgreSQL event store in the pupsourcing layout.
//!
//! The modules follow the data flow: `source` (events -> batches, gap-safe) -> `runtime` (the
//! plugin, sandboxed) -> `sink` (effects + fenced checkpoints in one transaction), driven by
//! `pipeline` over the partitions `coordination` assigns, observed through `http` and
//! `metrics`.

pub mod app;
pub mod base;
pub mod bench;
pub mod cli;
pub mod client;
pub mod config;
pub mod coordination;
pub mod db;
pub mod devdb;
pub mod http;
pub mod ids;
pub mod lifecycle;
pub mod metrics;
pub mod operator;
pub mod pipeline;
pub mod runtime;
pub mod sink;
pub mod source;
pub mod status;
