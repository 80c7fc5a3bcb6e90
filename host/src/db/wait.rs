//! The start waits for its database: on Kubernetes the host and PostgreSQL often start together,
//! and a host that exits at once only buys minutes of CrashLoopBackOff. Waiting cannot cure
//! every failure, though: a wrong password or an unknown CA is reported once, and the host exits.

use std::time::{Duration, Instant};

use super::{DbConfig, DbError};
use crate::base::sqlstate;

/// How long to wait, and where to show what the start is waiting for (`/ready`).
#[derive(Debug, Clone, Default)]
pub struct StartWait {
    /// `None`: wait as long as it takes.
    pub timeout: Option<Duration>,
    pub status: crate::base::status_line::StatusLine,
}

/// Connects once PostgreSQL accepts connections; retries what can pass (refused, timed out,
/// starting up, DNS not yet resolvable, too many connections) with backoff, logging each
/// attempt's cause once.
pub async fn wait_for_database(
    config: &DbConfig,
    wait: &StartWait,
) -> Result<sqlx::PgConnection, DbError> {
    let target = config.target();
    let started = Instant::now();
    let mut attempt = 0u32;
    loop {
        attempt += 1;
        wait.status
            .set(format!("connecting to PostgreSQL at {target}"));
        let error = match super::connect_one(config).await {
            Ok(conn) => {
                if attempt > 1 {
                    tracing::info!(%target, attempt, waited = ?started.elapsed(), "PostgreSQL is reachable");
                }
                return Ok(conn);
            }
            Err(DbError::Connect { source, .. }) => source,
            Err(other) => return Err(other),
        };
        if let Some(why) = incurable(&error, config) {
            return Err(DbError::Settings(format!(
                "cannot connect to PostgreSQL at {target}: {why}"
            )));
        }
        let delay = crate::base::retry::backoff(
            attempt,
            Duration::from_millis(250),
            Duration::from_secs(10),
        );
        let cause = root_cause(&error);
        if let Some(limit) = wait.timeout {
            if started.elapsed() + delay > limit {
                return Err(DbError::Settings(format!(
                    "PostgreSQL at {target} did not accept a connection within DB_WAIT_TIMEOUT ({}): {cause}",
                    humantime::format_duration(limit)
                )));
            }
        }
        tracing::warn!(
            %target,
            attempt,
            retry_in = ?delay,
            "waiting for PostgreSQL: {cause}"
        );
        wait.status.set(format!(
            "waiting for PostgreSQL at {target} (attempt {attempt}): {cause}"
        ));
        tokio::time::sleep(delay).await;
    }
}

/// Why waiting cannot help, in words an operator can act on; `None`: worth another attempt.
fn incurable(error: &sqlx::Error, config: &DbConfig) -> Option<String> {
    match error {
        // rustls reports a failed handshake (an unknown CA, a certificate for another name) as
        // invalid data on the socket: a verdict, not a network hiccup.
        sqlx::Error::Io(e) if e.kind() == std::io::ErrorKind::InvalidData => {
            Some(tls_advice(&e.to_string(), config))
        }
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut => None,
        sqlx::Error::Database(db) => {
            let code = db.code().map(|c| c.into_owned()).unwrap_or_default();
            match code.as_str() {
                sqlstate::CANNOT_CONNECT_NOW
                | sqlstate::TOO_MANY_CONNECTIONS
                | sqlstate::ADMIN_SHUTDOWN
                | sqlstate::CRASH_SHUTDOWN => None,
                c if c.starts_with("08") => None,
                sqlstate::INVALID_PASSWORD | sqlstate::INVALID_AUTHORIZATION => Some(format!(
                    "{} (check the user and password in DATABASE_URL or PGUSER/PGPASSWORD, and pg_hba.conf)",
                    db.message()
                )),
                sqlstate::INVALID_CATALOG_NAME => Some(format!(
                    "{} (check the database name in DATABASE_URL or PGDATABASE)",
                    db.message()
                )),
                _ => Some(format!("{} (SQLSTATE {code})", db.message())),
            }
        }
        sqlx::Error::Tls(e) => Some(tls_advice(&e.to_string(), config)),
        other => Some(other.to_string()),
    }
}

/// A TLS failure, with the setting to change.
fn tls_advice(message: &str, config: &DbConfig) -> String {
    let sslmode = config.ssl_mode();
    let root = config
        .root_cert()
        .map_or("no sslrootcert, so the public web roots".to_string(), |r| {
            format!("sslrootcert {r}")
        });
    let hint = if message.contains("does not support TLS") {
        "the server does not offer TLS: enable ssl on the server, or lower sslmode".to_string()
    } else if message.contains("UnknownIssuer") {
        format!("the server's certificate is not signed by a CA in {root}: point sslrootcert at the CA that signed it")
    } else if message.contains("not valid for name") || message.contains("NotValidForName") {
        "the server's certificate does not name the host the URL connects to: connect by a name the certificate lists, or use sslmode=verify-ca".to_string()
    } else if message.contains("Expired") {
        "the server's certificate has expired".to_string()
    } else {
        format!("check sslmode ({sslmode}) and {root}")
    };
    format!("TLS failed (sslmode={sslmode}, {root}): {message}; {hint}")
}

/// The innermost message of an error (sqlx wraps the OS error in its own words).
fn root_cause(error: &sqlx::Error) -> String {
    let mut source: &dyn std::error::Error = error;
    while let Some(inner) = source.source() {
        source = inner;
    }
    source.to_string()
}
