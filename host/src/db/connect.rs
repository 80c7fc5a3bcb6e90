//! Where and how the host connects: `DATABASE_URL` or libpq's `PG*` variables, TLS applied as
//! libpq applies `sslmode`, the pool, and what the first connection reports about TLS.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgPool};

use super::DbError;

/// Connection settings shared by every pool the host opens.
#[derive(Debug, Clone)]
pub struct DbConfig {
    /// A `postgres://` URL; empty: everything comes from libpq's `PG*` variables
    /// (`PGHOST`, `PGPORT`, `PGUSER`, `PGPASSWORD`, `PGDATABASE`, `PGSSLMODE`, ...), which also
    /// fill in whatever the URL leaves out.
    pub url: String,
    pub max_connections: u32,
    /// Ends a transaction left idle by a paused or cut-off host, so that it cannot hold row
    /// locks (and thereby block a takeover) forever.
    pub idle_in_transaction_timeout: Duration,
    /// Identifies this process's sessions in `pg_stat_activity`.
    pub application_name: String,
    /// `search_path` of every session (`None`: the server's default). `run` pins it to
    /// [`super::HOST_SEARCH_PATH`] once the events table is resolved to a qualified name.
    pub search_path: Option<String>,
}

/// The TLS settings as given, before sqlx sees them: libpq gives some of them a meaning that
/// sqlx does not (`require` with a root certificate verifies the chain).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct TlsSettings {
    mode: Option<String>,
    root_cert: Option<String>,
    client_cert: Option<String>,
    client_key: Option<String>,
}

impl TlsSettings {
    /// The URL's parameters, then the environment's (as libpq: the URL wins).
    fn read(url: &str) -> TlsSettings {
        let mut settings = TlsSettings::from_url(url);
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        settings.mode = settings.mode.or_else(|| env("PGSSLMODE"));
        settings.root_cert = settings.root_cert.or_else(|| env("PGSSLROOTCERT"));
        settings.client_cert = settings.client_cert.or_else(|| env("PGSSLCERT"));
        settings.client_key = settings.client_key.or_else(|| env("PGSSLKEY"));
        settings
    }

    fn from_url(url: &str) -> TlsSettings {
        let mut settings = TlsSettings::default();
        if let Ok(parsed) = url::Url::parse(url) {
            for (key, value) in parsed.query_pairs() {
                let value = Some(value.into_owned());
                match key.as_ref() {
                    "sslmode" | "ssl-mode" => settings.mode = value,
                    "sslrootcert" | "ssl-root-cert" => settings.root_cert = value,
                    "sslcert" | "ssl-cert" => settings.client_cert = value,
                    "sslkey" | "ssl-key" => settings.client_key = value,
                    _ => {}
                }
            }
        }
        settings
    }

    /// Files that must be readable; checked before connecting, because sqlx reports a missing
    /// file as an I/O error, which looks like a network failure worth waiting for.
    fn check_files(&self) -> Result<(), DbError> {
        let files = [
            ("sslrootcert", "PGSSLROOTCERT", &self.root_cert),
            ("sslcert", "PGSSLCERT", &self.client_cert),
            ("sslkey", "PGSSLKEY", &self.client_key),
        ];
        for (name, env, path) in files {
            let Some(path) = path.as_deref().filter(|p| *p != "system") else {
                continue;
            };
            if let Err(e) = std::fs::metadata(path) {
                return Err(DbError::Settings(format!(
                    "{name} {path} cannot be read: {e} (mount the file, or fix {name} in DATABASE_URL or {env})"
                )));
            }
        }
        if self.client_cert.is_some() != self.client_key.is_some() {
            return Err(DbError::Settings(
                "a client certificate needs both sslcert and sslkey (PGSSLCERT and PGSSLKEY)"
                    .into(),
            ));
        }
        Ok(())
    }
}

impl DbConfig {
    pub fn connect_options(&self) -> Result<PgConnectOptions, DbError> {
        let tls = TlsSettings::read(&self.url);
        tls.check_files()?;
        let mut options = if self.url.trim().is_empty() {
            PgConnectOptions::new()
        } else {
            // libpq's `sslrootcert=system` (the platform's roots) is what sqlx does without a
            // root certificate; sqlx would read "system" as a file name.
            let url = if tls.root_cert.as_deref() == Some("system") {
                without_query_keys(&self.url, &["sslrootcert", "ssl-root-cert"])
            } else {
                self.url.clone()
            };
            PgConnectOptions::from_str(&url).map_err(DbError::InvalidUrl)?
        };
        if std::env::var("PGSSLROOTCERT").as_deref() == Ok("system")
            && TlsSettings::from_url(&self.url).root_cert.is_none()
        {
            return Err(DbError::Settings(
                "PGSSLROOTCERT=system is not supported in the environment; put sslrootcert=system in DATABASE_URL or unset PGSSLROOTCERT".into(),
            ));
        }
        let mode = effective_mode(options.get_ssl_mode(), &tls);
        options = options.ssl_mode(mode);
        let timeout_ms = self.idle_in_transaction_timeout.as_millis().to_string();
        options = options
            .application_name(&self.application_name)
            .options([("idle_in_transaction_session_timeout", timeout_ms.as_str())])
            .log_statements(tracing::log::LevelFilter::Trace)
            .log_slow_statements(tracing::log::LevelFilter::Debug, Duration::from_secs(2));
        if let Some(path) = &self.search_path {
            options = options.options([("search_path", path.as_str())]);
        }
        Ok(options)
    }

    /// Where the host connects, without credentials, for messages: `host:port/database`.
    pub fn target(&self) -> String {
        match self.connect_options() {
            Ok(o) => {
                let host = match o.get_socket() {
                    Some(socket) => socket.display().to_string(),
                    None => o.get_host().to_string(),
                };
                format!(
                    "{host}:{}/{}",
                    o.get_port(),
                    o.get_database().unwrap_or(o.get_username())
                )
            }
            Err(_) => super::redact_url(&self.url),
        }
    }

    /// The TLS mode in effect, in libpq's words.
    pub fn ssl_mode(&self) -> String {
        self.connect_options()
            .map(|o| mode_name(o.get_ssl_mode()).to_string())
            .unwrap_or_else(|_| "unknown".into())
    }

    /// The root certificate file, if one is configured (for messages).
    pub fn root_cert(&self) -> Option<String> {
        TlsSettings::read(&self.url).root_cert
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

    /// A pool of one connection, opened on first use (for `LISTEN`).
    pub fn lazy_single(&self) -> Result<PgPool, DbError> {
        Ok(PgPoolOptions::new()
            .max_connections(1)
            .acquire_timeout(Duration::from_secs(10))
            .connect_lazy_with(self.connect_options()?))
    }
}

/// libpq: `require` with a root certificate verifies the server's chain, as `verify-ca`.
/// (sqlx would accept any certificate.)
fn effective_mode(parsed: PgSslMode, tls: &TlsSettings) -> PgSslMode {
    match parsed {
        PgSslMode::Require if tls.root_cert.is_some() => PgSslMode::VerifyCa,
        other => other,
    }
}

fn mode_name(mode: PgSslMode) -> &'static str {
    match mode {
        PgSslMode::Disable => "disable",
        PgSslMode::Allow => "allow",
        PgSslMode::Prefer => "prefer",
        PgSslMode::Require => "require",
        PgSslMode::VerifyCa => "verify-ca",
        PgSslMode::VerifyFull => "verify-full",
    }
}

fn without_query_keys(url: &str, keys: &[&str]) -> String {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return url.to_string();
    };
    let kept: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(k, _)| !keys.contains(&k.as_ref()))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if kept.is_empty() {
        parsed.set_query(None);
    } else {
        parsed.query_pairs_mut().clear().extend_pairs(kept);
    }
    parsed.to_string()
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

/// What the server says about a session's transport.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSummary {
    /// `None`: the session is not encrypted.
    pub version: Option<String>,
    /// A Unix socket or a loopback address: plain text does not cross a network.
    pub local: bool,
}

impl TlsSummary {
    pub async fn of(
        conn: &mut sqlx::PgConnection,
        config: &DbConfig,
    ) -> Result<TlsSummary, sqlx::Error> {
        let version: Option<String> = sqlx::query_scalar(
            "SELECT CASE WHEN ssl THEN version END FROM pg_catalog.pg_stat_ssl WHERE pid = pg_catalog.pg_backend_pid()",
        )
        .fetch_optional(&mut *conn)
        .await?
        .flatten();
        let local = match config.connect_options() {
            Ok(o) => {
                o.get_socket().is_some()
                    || matches!(o.get_host(), "localhost" | "127.0.0.1" | "::1")
                    || o.get_host().starts_with('/')
            }
            Err(_) => false,
        };
        Ok(TlsSummary { version, local })
    }

    /// Logs how the host is connected; plain text over a network is a warning.
    pub fn log(&self, config: &DbConfig) {
        let target = config.target();
        let sslmode = config.ssl_mode();
        match (&self.version, self.local) {
            (Some(version), _) => {
                tracing::info!(%target, %sslmode, tls = %version, "connected to PostgreSQL over TLS")
            }
            (None, true) => {
                tracing::info!(%target, %sslmode, "connected to PostgreSQL without TLS (local)")
            }
            (None, false) => tracing::warn!(
                %target,
                %sslmode,
                "connected to PostgreSQL WITHOUT TLS over the network: passwords and events travel in plain text; \
                 set sslmode=verify-full and sslrootcert in DATABASE_URL (or PGSSLMODE/PGSSLROOTCERT)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(url: &str) -> DbConfig {
        DbConfig {
            url: url.into(),
            max_connections: 2,
            idle_in_transaction_timeout: Duration::from_secs(60),
            application_name: "test".into(),
            search_path: None,
        }
    }

    #[test]
    fn require_with_a_root_certificate_verifies_the_chain_as_libpq_does() {
        let dir = std::env::temp_dir();
        let ca = dir.join("projection-host-connect-test-ca.crt");
        std::fs::write(&ca, "not read here").unwrap();
        let url = format!(
            "postgres://u@db.example/es?sslmode=require&sslrootcert={}",
            ca.display()
        );
        assert_eq!(config(&url).ssl_mode(), "verify-ca");
        assert_eq!(
            config("postgres://u@db.example/es?sslmode=require").ssl_mode(),
            "require"
        );
        assert_eq!(
            config("postgres://u@db.example/es?sslmode=verify-full").ssl_mode(),
            "verify-full"
        );
    }

    #[test]
    fn missing_certificate_files_are_a_settings_error_not_a_network_one() {
        let err = config("postgres://u@db/es?sslmode=verify-full&sslrootcert=/nonexistent/ca.crt")
            .connect_options()
            .unwrap_err();
        assert!(matches!(err, DbError::Settings(_)), "{err}");
        assert!(err.to_string().contains("/nonexistent/ca.crt"), "{err}");
    }

    #[test]
    fn targets_carry_no_credentials() {
        let target = config("postgres://app:s3cret@db.internal:6432/es").target();
        assert_eq!(target, "db.internal:6432/es");
    }

    #[test]
    fn sslrootcert_system_means_the_platform_roots() {
        let url = without_query_keys(
            "postgres://u@db/es?sslmode=verify-full&sslrootcert=system",
            &["sslrootcert"],
        );
        assert_eq!(url, "postgres://u@db/es?sslmode=verify-full");
    }
}
