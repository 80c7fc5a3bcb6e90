//! Effects -> one transaction: the per-batch buffer of keyed writes, its bulk flush, and the
//! commit of read-model writes together with the (fenced) checkpoints.

pub mod buffer;
pub mod commit;
pub mod flush;
pub mod isolation;
pub mod schema;
pub mod sql;
pub mod values;

pub use buffer::EffectBuffer;
pub use commit::{BatchCommit, CommitOutcome};
pub use schema::{SchemaCache, TableSchema};
pub use values::SqlValue;

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

    /// Classifies a PostgreSQL error by SQLSTATE class.
    pub fn from_sql(error: &sqlx::Error) -> Self {
        let code = crate::db::sqlstate(error).unwrap_or_default();
        let kind = if code == "42501" {
            EffectErrorKind::PermissionDenied
        } else if code.starts_with("23") {
            EffectErrorKind::Conflict
        } else if code.starts_with("42") || code.starts_with("22") {
            EffectErrorKind::InvalidArgument
        } else {
            EffectErrorKind::Database
        };
        let message = match error {
            sqlx::Error::Database(db) => format!("{} (SQLSTATE {code})", db.message()),
            other => other.to_string(),
        };
        EffectError {
            kind,
            message,
            database: Some(DatabaseFailure {
                transient: crate::db::is_transient(error),
            }),
        }
    }
}
