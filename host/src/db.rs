//! Database plumbing: the pool, the host's migrations, SQL identifiers and error classes.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};

/// The host's own tables (`migrations/`), applied with `projection-host migrate` and at start.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// The schema that holds the host's tables.
pub const HOST_SCHEMA: &str = "projection_host";

/// Serialises concurrent `migrate` runs of several hosts starting at once.
const MIGRATION_LOCK: i64 = 0x7072_6f6a_686f_7374; // "projhost"

#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("DATABASE_URL is not a valid PostgreSQL URL: {0}")]
    InvalidUrl(#[source] sqlx::Error),
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

/// Connection settings shared by every pool the host opens.
#[derive(Debug, Clone)]
pub struct DbConfig {
    pub url: String,
    pub max_connections: u32,
    /// Ends a transaction left idle by a paused or cut-off host, so that it cannot hold row
    /// locks (and thereby block a takeover) forever.
    pub idle_in_transaction_timeout: Duration,
    /// Identifies this process's sessions in `pg_stat_activity`.
    pub application_name: String,
}

impl DbConfig {
    fn connect_options(&self) -> Result<PgConnectOptions, DbError> {
        let timeout_ms = self.idle_in_transaction_timeout.as_millis().to_string();
        Ok(PgConnectOptions::from_str(&self.url)
            .map_err(DbError::InvalidUrl)?
            .application_name(&self.application_name)
            .options([("idle_in_transaction_session_timeout", timeout_ms.as_str())])
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(2)))
    }

    /// Where the URL points, without credentials, for messages.
    pub fn target(&self) -> String {
        redact_url(&self.url)
    }

    pub async fn connect_pool(&self) -> Result<PgPool, DbError> {
        let options = self.connect_options()?;
        PgPoolOptions::new()
            .max_connections(self.max_connections)
            .min_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .test_before_acquire(false)
            .connect_with(options)
            .await
            .map_err(|source| DbError::Connect {
                target: self.target(),
                source,
            })
    }
}

/// Creates the host schema and applies pending migrations; safe to run concurrently and
/// repeatedly.
pub async fn migrate(pool: &PgPool) -> Result<(), DbError> {
    let mut conn = pool.acquire().await?;
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await?;
    let result = async {
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {HOST_SCHEMA}"))
            .execute(&mut *conn)
            .await?;
        // Keep sqlx's bookkeeping table in our schema, not in the user's `public`.
        sqlx::query(&format!("SET search_path TO {HOST_SCHEMA}"))
            .execute(&mut *conn)
            .await?;
        MIGRATOR
            .run_direct(&mut *conn)
            .await
            .map_err(|e| DbError::Migrate(e.to_string()))?;
        Ok::<_, DbError>(())
    }
    .await;
    // Never hand a connection with a changed search path back to the pool.
    let _ = sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(MIGRATION_LOCK)
        .execute(&mut *conn)
        .await;
    let _ = conn.detach().close().await;
    result
}

/// Opens a single connection outside any pool (listeners, the safe-head tracker).
pub async fn connect_one(config: &DbConfig) -> Result<sqlx::PgConnection, DbError> {
    let options = config.connect_options()?;
    sqlx::PgConnection::connect_with(&options)
        .await
        .map_err(|source| DbError::Connect {
            target: config.target(),
            source,
        })
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
    code.starts_with("08") // connection exception
        || matches!(
            code,
            "40001" // serialization_failure
            | "40P01" // deadlock_detected
            | "55P03" // lock_not_available
            | "57P01" // admin_shutdown
            | "57P02" // crash_shutdown
            | "57P03" // cannot_connect_now
            | "53300" // too_many_connections
            | "25P03" // idle_in_transaction_session_timeout
            | "57014" // query_canceled (statement timeout)
        )
}

/// The SQLSTATE of a database error, if any.
pub fn sqlstate(error: &sqlx::Error) -> Option<String> {
    match error {
        sqlx::Error::Database(db) => db.code().map(|c| c.into_owned()),
        _ => None,
    }
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
