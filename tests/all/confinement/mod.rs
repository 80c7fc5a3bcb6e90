//! Plugins are confined by PostgreSQL itself: a hostile plugin (`tests/guests/hostile`) attacks
//! from its event payloads, and every test asserts that the attack failed, that nothing outside
//! the projection's schema changed, and that nothing from outside was copied into it.

mod byte_bombs;
mod corpus;
mod start;
mod statement_timeout;
mod support;
