//! Implementations of the host interfaces the `projection` world imports, one file each.

mod log;
mod read_model;

pub use read_model::TransientDatabaseError;
