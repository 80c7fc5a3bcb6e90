//! Deployment as the docs describe it: TLS to PostgreSQL, a start that waits for its database
//! and writes nothing before it has checked the target, `--once` in CI, operator commands.

mod replica_sets;
mod start;
mod tls;
