//! Effects -> one transaction: the per-batch buffer of keyed writes, its bulk flush, and the
//! commit of read-model writes together with the (fenced) checkpoints.

pub mod buffer;
pub mod commit;
pub mod flush;
pub mod role;
pub mod schema;
pub mod session;
pub mod sql;
pub mod values;

pub use buffer::EffectBuffer;
pub use commit::{BatchCommit, CommitOutcome};
pub use schema::{SchemaCache, TableSchema};
pub use values::SqlValue;

/// How plugin SQL is confined.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SqlIsolation {
    /// In sessions of the projection's own login role (`role`).
    Role,
    /// As the host's own user: trusted plugins only (`none`).
    Unconfined,
}

/// An error a plugin can act on (returned through WIT), as opposed to a host failure (a trap).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct EffectError {
    pub kind: EffectErrorKind,
    pub message: String,
    /// Set when PostgreSQL reported the error: the transaction is then aborted. `transient`
    /// tells a lost connection (retry the batch) from an error in the statement itself.
    pub database: Option<DatabaseFailure>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DatabaseFailure {
    pub transient: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EffectErrorKind {
    InvalidArgument,
    PermissionDenied,
    Conflict,
    LimitExceeded,
    Database,
}

impl EffectError {
    pub fn invalid(message: impl Into<String>) -> Self {
        EffectError {
            kind: EffectErrorKind::InvalidArgument,
            message: message.into(),
            database: None,
        }
    }

    pub fn limit(message: impl Into<String>) -> Self {
        EffectError {
            kind: EffectErrorKind::LimitExceeded,
            message: message.into(),
            database: None,
        }
    }

    /// Classifies a PostgreSQL error raised by a statement of the plugin's batch (its own SQL
    /// or the host's SQL on its behalf) by SQLSTATE class.
    pub fn from_sql(error: &sqlx::Error) -> Self {
        use crate::base::sqlstate::{INSUFFICIENT_PRIVILEGE, QUERY_CANCELED};
        let code = crate::base::sqlstate::of(error).unwrap_or_default();
        let kind = if code == INSUFFICIENT_PRIVILEGE {
            EffectErrorKind::PermissionDenied
        } else if code == QUERY_CANCELED {
            EffectErrorKind::LimitExceeded
        } else if code.starts_with("23") {
            EffectErrorKind::Conflict
        } else if code.starts_with("42") || code.starts_with("22") {
            EffectErrorKind::InvalidArgument
        } else {
            EffectErrorKind::Database
        };
        // The server's text can carry plugin data (RAISE EXCEPTION, a value in a message).
        let message = crate::base::text::plugin_message(&match error {
            sqlx::Error::Database(db) if code == QUERY_CANCELED => format!(
                "{} (SQLSTATE {code}): the statement ran past its statement timeout (limit plugin_call_timeout)",
                db.message()
            ),
            sqlx::Error::Database(db) => format!("{} (SQLSTATE {code})", db.message()),
            other => other.to_string(),
        });
        EffectError {
            kind,
            message,
            database: Some(DatabaseFailure {
                // In a plugin's batch a cancelled statement is its statement timeout, and a
                // missing or mismatched prepared statement is the plugin's own DEALLOCATE or
                // PREPARE on its session: retrying the same batch would fail the same way, so
                // these are plugin failures (the session is reset after the batch).
                transient: crate::db::is_transient(error)
                    && !matches!(
                        code.as_str(),
                        QUERY_CANCELED
                            | crate::base::sqlstate::INVALID_SQL_STATEMENT_NAME
                            | crate::base::sqlstate::PROTOCOL_VIOLATION
                    ),
            }),
        }
    }
}
