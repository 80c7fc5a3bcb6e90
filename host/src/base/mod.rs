//! Shared utilities that depend on nothing of the domain.

pub mod retry;
pub mod status_line;
pub mod text;
