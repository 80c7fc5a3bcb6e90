//! SQLSTATE codes the host acts on, by name, and the code of a database error.

pub const UNIQUE_VIOLATION: &str = "23505";
pub const DUPLICATE_SCHEMA: &str = "42P06";
pub const DUPLICATE_TABLE: &str = "42P07";
pub const DUPLICATE_OBJECT: &str = "42710";
pub const INSUFFICIENT_PRIVILEGE: &str = "42501";
pub const INVALID_PASSWORD: &str = "28P01";
pub const INVALID_AUTHORIZATION: &str = "28000";
pub const SERIALIZATION_FAILURE: &str = "40001";
pub const DEADLOCK_DETECTED: &str = "40P01";
pub const LOCK_NOT_AVAILABLE: &str = "55P03";
pub const QUERY_CANCELED: &str = "57014";
pub const ADMIN_SHUTDOWN: &str = "57P01";
pub const CRASH_SHUTDOWN: &str = "57P02";
pub const CANNOT_CONNECT_NOW: &str = "57P03";
pub const TOO_MANY_CONNECTIONS: &str = "53300";
pub const IDLE_IN_TRANSACTION_TIMEOUT: &str = "25P03";
pub const INVALID_SQL_STATEMENT_NAME: &str = "26000";
pub const PROTOCOL_VIOLATION: &str = "08P01";
pub const INVALID_CATALOG_NAME: &str = "3D000";
pub const UNDEFINED_TABLE: &str = "42P01";

/// The SQLSTATE of a database error, if any.
pub fn of(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
}
