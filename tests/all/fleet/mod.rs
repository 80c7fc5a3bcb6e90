//! Several hosts against one database: scaling out, crashes, pauses, graceful leaves, the
//! recreate strategy, stable identities, and fencing.

mod fencing;
mod identity;
mod pause_and_fence;
mod recreate;
mod resize;
mod scale_out;
mod shutdown_handoff;
pub mod support;
mod takeover;
