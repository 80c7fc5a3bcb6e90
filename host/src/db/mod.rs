//! Database plumbing: the pool, the host's migrations, SQL identifiers and error classes.

use std::fmt;
use std::str::FromStr;

use sqlx::migrate::Migrator;
use sqlx::{Connection, PgPool};

use crate::base::sqlstate;

mod connect;
mod wait;

pub use connect::{connect_one, DbConfig, TlsSummary};
pub use wait::{wait_for_database, StartWait};

/// The host's own tables (`migrations/`), applied with `projection-host migrate` and at start.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// The schema that holds the host's tables.
pub const HOST_SCHEMA: &str = "projection_host";

/// The schema of the functions a projection's session may call for the host's bookkeeping.
pub const API_SCHEMA: &str = "projection_host_api";

/// The search path of the host's own sessions: the catalog only. Every relation the host uses is
/// schema-qualified, and nothing a projection can create (in `public`, say) can then shadow or
/// overload a function or operator the host's SQL calls.
pub const HOST_SEARCH_PATH: &str = "pg_catalog";

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
    #[error("{0}")]
    Settings(String),
    #[error("cannot connect to PostgreSQL at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: sqlx::Error,
    },
    #[error("migrating the host's tables failed: {0}")]
    Migrate(String),
    #[error(transparent)]
    Sql(#[from] sqlx::Error),
}

/// Creates the host schema and applies pending migrations; safe to run concurrently and
/// repeatedly. Concurrent runs are serialised by a row lock in the host's own schema (not an
/// advisory lock, which any session could hold to block every host's start).
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    let mut conn = pool.acquire().await?;
    let result = async {
        bootstrap(&mut conn).await?;
        let mut tx = conn.begin().await?;
        host_lock(&mut tx, crate::base::locks::HostLock::Migrate).await?;
        // Keep sqlx's bookkeeping table in our schema, not in the user's `public`.
        sqlx::query(&format!("SET LOCAL search_path TO {HOST_SCHEMA}"))
            .execute(&mut *tx)
            .await?;
        let mut migrator = sqlx::migrate!("../migrations");
        migrator.set_locking(false);
        migrator
            .run_direct(&mut *tx)
            .await
            .map_err(|e| DbError::Migrate(e.to_string()))?;
        tx.commit().await?;
        Ok::<_, DbError>(())
    }
    .await;
    // Never hand a connection that may have seen a failed migration back to the pool.
    let _ = conn.detach().close().await;
    result
}

/// The schema and the lock table, created idempotently even when several hosts race for them
/// (`IF NOT EXISTS` is not atomic against a concurrent creation).
async fn bootstrap(conn: &mut sqlx::PgConnection) -> Result<(), DbError> {
    for statement in [
        format!("CREATE SCHEMA IF NOT EXISTS {HOST_SCHEMA}"),
        format!("CREATE TABLE IF NOT EXISTS {HOST_SCHEMA}.locks (name TEXT PRIMARY KEY)"),
    ] {
        for attempt in 0.. {
            match sqlx::query(&statement).execute(&mut *conn).await {
                Ok(_) => break,
                Err(e) if attempt < 5 && sqlstate::of(&e).is_some_and(|c| is_creation_race(&c)) => {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}

/// A concurrent `CREATE ... IF NOT EXISTS` won: the object exists now. A table's row type can
/// lose the race first (`type "locks" already exists`, duplicate_object).
fn is_creation_race(code: &str) -> bool {
    matches!(
        code,
        sqlstate::UNIQUE_VIOLATION
            | sqlstate::DUPLICATE_SCHEMA
            | sqlstate::DUPLICATE_TABLE
            | sqlstate::DUPLICATE_OBJECT
    )
}

/// Takes the named host lock for the rest of the transaction. The lock is a row in
/// `projection_host.locks`, which only the host's role can touch.
pub async fn host_lock(
    conn: &mut sqlx::PgConnection,
    lock: crate::base::locks::HostLock<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_host.locks (name) VALUES ($1)
         ON CONFLICT (name) DO UPDATE SET name = EXCLUDED.name",
    )
    .bind(lock.key())
    .execute(conn)
    .await?;
    Ok(())
}

/// A possibly schema-qualified SQL name, validated and always rendered quoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QualifiedName {
    pub schema: Option<String>,
    pub name: String,
}

impl FromStr for QualifiedName {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('.').collect();
        let check = |p: &str| -> Result<String, String> {
            let valid = !p.is_empty()
                && p.len() <= 63
                && p.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '$');
            if valid {
                Ok(p.to_string())
            } else {
                Err(format!(
                    "'{s}' is not a table name: use letters, digits and '_' (optionally 'schema.table')"
                ))
            }
        };
        match parts.as_slice() {
            [name] => Ok(QualifiedName {
                schema: None,
                name: check(name)?,
            }),
            [schema, name] => Ok(QualifiedName {
                schema: Some(check(schema)?),
                name: check(name)?,
            }),
            _ => Err(format!(
                "'{s}' is not a table name: expected 'table' or 'schema.table'"
            )),
        }
    }
}

impl fmt::Display for QualifiedName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(schema) = &self.schema {
            write!(f, "{}.", quote_ident(schema))?;
        }
        f.write_str(&quote_ident(&self.name))
    }
}

impl QualifiedName {
    /// The same relation with its schema named, as the server resolves `self` with the
    /// session's search path; `None` when no such relation exists.
    pub async fn resolve(
        &self,
        conn: &mut sqlx::PgConnection,
    ) -> Result<Option<(QualifiedName, i64)>, sqlx::Error> {
        let found: Option<(String, String, i64)> = sqlx::query_as(
            "SELECT n.nspname::text, c.relname::text, c.oid::int8
               FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
              WHERE c.oid = pg_catalog.to_regclass($1)",
        )
        .bind(self.to_string())
        .fetch_optional(conn)
        .await?;
        Ok(found.map(|(schema, name, oid)| {
            (
                QualifiedName {
                    schema: Some(schema),
                    name,
                },
                oid,
            )
        }))
    }
}

/// Quotes an identifier for SQL text.
pub fn quote_ident(ident: &str) -> String {
    format!("\"{}\"", ident.replace('"', "\"\""))
}

/// Quotes a string literal for SQL text (used only for DDL, which cannot take parameters).
pub fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

/// Errors after which the same work can simply be retried: the connection or server went away,
/// or PostgreSQL asked for a retry (serialization failure, deadlock, lock timeout).
pub fn is_transient(error: &sqlx::Error) -> bool {
    match error {
        sqlx::Error::Io(_)
        | sqlx::Error::PoolTimedOut
        | sqlx::Error::PoolClosed
        | sqlx::Error::WorkerCrashed
        | sqlx::Error::Protocol(_)
        | sqlx::Error::Tls(_) => true,
        sqlx::Error::Database(db) => db.code().is_some_and(|code| is_transient_sqlstate(&code)),
        _ => false,
    }
}

fn is_transient_sqlstate(code: &str) -> bool {
    use sqlstate::*;
    code.starts_with("08") // connection exception
        || matches!(
            code,
            SERIALIZATION_FAILURE
                | DEADLOCK_DETECTED
                | LOCK_NOT_AVAILABLE
                | ADMIN_SHUTDOWN
                | CRASH_SHUTDOWN
                | CANNOT_CONNECT_NOW
                | TOO_MANY_CONNECTIONS
                | IDLE_IN_TRANSACTION_TIMEOUT
                // A host statement cancelled (by an operator, or a server shutting down). In
                // plugin SQL the same code means the statement timeout, a plugin failure: see
                // `sink::EffectError::from_sql`.
                | QUERY_CANCELED
        )
}

/// Removes the password from a connection URL.
pub fn redact_url(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut parsed) => {
            if parsed.password().is_some() {
                let _ = parsed.set_password(Some("***"));
            }
            parsed.to_string()
        }
        Err(_) => "<unparseable url>".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated_and_quoted() {
        assert_eq!(
            "events".parse::<QualifiedName>().unwrap().to_string(),
            "\"events\""
        );
        assert_eq!(
            "es.events".parse::<QualifiedName>().unwrap().to_string(),
            "\"es\".\"events\""
        );
        assert!("events; drop table x".parse::<QualifiedName>().is_err());
        assert!("a.b.c".parse::<QualifiedName>().is_err());
        assert!("".parse::<QualifiedName>().is_err());
    }

    #[test]
    fn passwords_never_reach_messages() {
        let shown = redact_url("postgres://app:s3cret@db:5432/es");
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("db:5432"));
    }

    #[test]
    fn connection_loss_and_conflicts_are_transient() {
        assert!(is_transient_sqlstate("08006"));
        assert!(is_transient_sqlstate("40001"));
        assert!(
            !is_transient_sqlstate("42P01"),
            "undefined table needs an operator"
        );
        assert!(
            !is_transient_sqlstate("42501"),
            "permission denied needs an operator"
        );
    }
}
