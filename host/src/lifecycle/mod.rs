//! Plugin lifecycle: the registry the fleet agrees on (which bytes run for each projection),
//! the compiled-component cache, and swaps across generations (continue, rebuild, promote,
//! rollback).

pub mod cache;
pub mod duties;
pub mod read_models;
pub mod registry;
pub mod removal;

pub use cache::PluginCache;
pub use registry::{Mode, Registry};
