//! Shared utilities that depend on nothing of the domain.

pub mod locks;
pub mod notify;
pub mod retry;
pub mod sqlstate;
pub mod status_line;
pub mod stored_enum;
pub mod text;
pub mod units;
