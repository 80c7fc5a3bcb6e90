//! Integration and fleet tests: real PostgreSQL, real components, the real `projection-host`
//! binary. One test binary, one scenario per file.
//!
//! The server comes from TEST_DATABASE_URL (or DATABASE_URL), defaulting to the local
//! `postgres://postgres@127.0.0.1:5432/postgres`; every test creates and drops its own database.

mod support;

mod adoption;
mod confinement;
mod deployment;
mod faults;
mod fleet;
pub use fleet::support as fleet_support;
mod foundation;
mod gaps;
mod lifecycle;
mod operations;
