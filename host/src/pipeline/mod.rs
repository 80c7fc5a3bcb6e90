//! The pipeline of one projection on this worker: read -> handle -> commit, batch after batch,
//! over the partitions the coordinator gave it.

pub mod containment;
pub mod policy;
mod progress;
pub mod settled;
pub mod status;
pub mod supervisor;
mod worker;

pub use status::{ProjectionStatus, StatusBoard};
pub use supervisor::{MountedPlugins, Supervisor};
pub use worker::{PipelineConfig, PipelineContext};
