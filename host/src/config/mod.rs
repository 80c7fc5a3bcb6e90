//! `run`'s flags and environment -> a checked configuration. Every refusal names the setting
//! (flag and environment variable) and says what would be accepted.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

mod args;

#[cfg(feature = "bench")]
pub use args::OnFailureArg;
use args::{CoordinationArgs, PluginArgs, SourceArgs};
pub use args::{DatabaseArgs, RunArgs};

use crate::coordination::CoordinationConfig;
use crate::db::{DbConfig, QualifiedName};
use crate::pipeline::policy::{ProjectionSettings, Settings};
use crate::runtime::RuntimeConfig;
use crate::sink::SqlIsolation;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{env} (--{flag}) is required: {hint}")]
    Missing {
        env: &'static str,
        flag: &'static str,
        hint: &'static str,
    },
    #[error("invalid {env} (--{flag}): {reason}")]
    Invalid {
        env: &'static str,
        flag: &'static str,
        reason: String,
    },
}

fn invalid(env: &'static str, flag: &'static str, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        env,
        flag,
        reason: reason.into(),
    }
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub database: DbConfig,
    pub events_table: QualifiedName,
    pub batch_size: u32,
    pub max_batch_size: u32,
    pub poll_interval: Duration,
    pub notify_channels: Vec<String>,
    pub plugin_files: Vec<PathBuf>,
    pub plugin_dirs: Vec<PathBuf>,
    pub plugin_scan_interval: Duration,
    pub runtime: RuntimeConfig,
    /// Failure policy and limits, per projection.
    pub settings: Settings,
    pub isolation: SqlIsolation,
    pub coordination: CoordinationConfig,
    pub pod_name: Option<String>,
    pub pod_namespace: Option<String>,
    pub http: Option<HttpConfig>,
    pub once: bool,
    pub shutdown_timeout: Duration,
    /// `None`: the start waits for PostgreSQL as long as it takes.
    pub db_wait_timeout: Option<Duration>,
}

#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub health_addr: SocketAddr,
    pub metrics_addr: SocketAddr,
    pub admin_token: Option<String>,
}

/// `DATABASE_URL`, or empty when libpq's `PG*` variables say where to connect.
pub fn database_url(args: &DatabaseArgs) -> Result<String, ConfigError> {
    let url = args.database_url.clone().filter(|u| !u.trim().is_empty());
    match url {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => Ok(url),
        Some(_) => Err(invalid(
            "DATABASE_URL",
            "database-url",
            "must start with postgres:// or postgresql://",
        )),
        None if std::env::var_os("PGHOST").is_some() || std::env::var_os("PGHOSTADDR").is_some() => {
            Ok(String::new())
        }
        None => Err(ConfigError::Missing {
            env: "DATABASE_URL",
            flag: "database-url",
            hint: "a PostgreSQL URL such as postgres://user:password@host:5432/db?sslmode=verify-full (or libpq's PGHOST, PGUSER, PGPASSWORD, PGDATABASE, PGSSLMODE variables)",
        }),
    }
}

impl RunConfig {
    pub fn from_args(args: RunArgs) -> Result<RunConfig, ConfigError> {
        let url = database_url(&args.database)?;
        if args.database.max_connections < 2 {
            return Err(invalid(
                "DB_MAX_CONNECTIONS",
                "max-connections",
                "must be at least 2 (batches and coordination run side by side)",
            ));
        }

        let events_table = check_source(&args.source)?;
        let s = &args.source;
        let p = &args.plugins;
        let (plugin_files, plugin_dirs, settings) = check_plugins(p)?;
        let c = &args.coordination;
        check_coordination(c)?;
        check_http_and_shutdown(&args)?;

        let database = DbConfig {
            url,
            max_connections: args.database.max_connections,
            // A paused host must not hold locks for long; a live one never idles inside a
            // transaction for longer than a plugin call.
            idle_in_transaction_timeout: c
                .stale_worker_timeout
                .max(p.plugin_call_timeout + Duration::from_secs(5)),
            application_name: "projection-host".into(),
            search_path: None,
        };
        Ok(RunConfig {
            database,
            events_table: events_table.clone(),
            batch_size: s.batch_size,
            max_batch_size: s.max_batch_size,
            poll_interval: s.poll_interval,
            notify_channels: s.notify_channels.clone(),
            plugin_files,
            plugin_dirs,
            plugin_scan_interval: p.plugin_scan_interval,
            runtime: RuntimeConfig {
                memory_limit: p.plugin_memory_limit,
                call_timeout: p.plugin_call_timeout,
                cache_dir: (!p.plugin_cache_dir.as_os_str().is_empty())
                    .then(|| p.plugin_cache_dir.clone()),
            },
            settings,
            isolation: p.sql_isolation.into(),
            coordination: CoordinationConfig {
                replica_set: c.replica_set.clone(),
                partitions: c.partitions,
                heartbeat_interval: c.heartbeat_interval,
                stale_timeout: c.stale_worker_timeout,
                coordination_timeout: c.coordination_timeout,
                strategy: c.strategy.into(),
                revoke_timeout: p.plugin_call_timeout + Duration::from_secs(10),
                events_table: events_table.clone(),
                promote_lag: p.promote_lag,
                retired_grace: p.retired_data_grace,
            },
            pod_name: c.pod_name.clone(),
            pod_namespace: c.pod_namespace.clone(),
            http: (!args.http.no_http).then_some(HttpConfig {
                health_addr: args.http.health_addr,
                metrics_addr: args.http.metrics_addr,
                admin_token: args
                    .http
                    .admin_token
                    .clone()
                    .filter(|t| !t.trim().is_empty()),
            }),
            once: args.once,
            shutdown_timeout: args.shutdown_timeout,
            db_wait_timeout: Some(args.db_wait_timeout).filter(|t| !t.is_zero()),
        })
    }
}

/// `EVENTS_TABLE`, batch sizes, polling and NOTIFY channels.
fn check_source(s: &SourceArgs) -> Result<QualifiedName, ConfigError> {
    let events_table: QualifiedName = s
        .events_table
        .parse()
        .map_err(|e: String| invalid("EVENTS_TABLE", "events-table", e))?;
    if s.batch_size == 0 {
        return Err(invalid("BATCH_SIZE", "batch-size", "must be at least 1"));
    }
    if s.max_batch_size < s.batch_size {
        return Err(invalid(
            "MAX_BATCH_SIZE",
            "max-batch-size",
            format!(
                "must be at least BATCH_SIZE ({}), got {}",
                s.batch_size, s.max_batch_size
            ),
        ));
    }
    if s.poll_interval < Duration::from_millis(10) {
        return Err(invalid(
            "POLL_INTERVAL",
            "poll-interval",
            "must be at least 10ms",
        ));
    }
    for channel in &s.notify_channels {
        let ok = !channel.is_empty()
            && channel.len() <= 63
            && channel
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(invalid(
                "NOTIFY_CHANNELS",
                "notify-channels",
                format!("'{channel}' is not a channel name (letters, digits, '_')"),
            ));
        }
    }
    Ok(events_table)
}

/// The plugin files, the sandbox limits and the per-projection settings.
fn check_plugins(p: &PluginArgs) -> Result<(Vec<PathBuf>, Vec<PathBuf>, Settings), ConfigError> {
    if p.plugin_memory_limit < (1 << 20) {
        return Err(invalid(
            "PLUGIN_MEMORY_LIMIT",
            "plugin-memory-limit",
            "must be at least 1MiB",
        ));
    }
    if p.plugin_call_timeout < Duration::from_millis(10) {
        return Err(invalid(
            "PLUGIN_CALL_TIMEOUT",
            "plugin-call-timeout",
            "must be at least 10ms",
        ));
    }
    let (plugin_files, plugin_dirs) = collect_plugins(&p.plugins, p.plugins_dir.as_ref())?;
    for (env, flag, value) in [
        ("MAX_WRITE_BYTES", "max-write-bytes", p.max_write_bytes),
        ("MAX_QUERY_BYTES", "max-query-bytes", p.max_query_bytes),
    ] {
        if value < 64 * 1024 {
            return Err(invalid(env, flag, "must be at least 64KiB"));
        }
    }
    if p.max_batch_bytes < 1024 {
        return Err(invalid(
            "MAX_BATCH_BYTES",
            "max-batch-bytes",
            "must be at least 1KiB",
        ));
    }
    let mut settings = Settings {
        defaults: ProjectionSettings {
            on_failure: p.on_failure.into(),
            max_retries: p.max_retries,
            memory_limit: p.plugin_memory_limit,
            call_timeout: p.plugin_call_timeout,
            max_batch_bytes: p.max_batch_bytes,
            max_write_bytes: p.max_write_bytes,
            max_query_bytes: p.max_query_bytes,
        },
        overrides: Default::default(),
    };
    for spec in p
        .projection_settings
        .iter()
        .filter(|s| !s.trim().is_empty())
    {
        settings
            .add_override(spec.trim())
            .map_err(|e| invalid("PROJECTION_SETTINGS", "projection", e))?;
    }
    Ok((plugin_files, plugin_dirs, settings))
}

/// The replica set's name, partitions and timings.
fn check_coordination(c: &CoordinationArgs) -> Result<(), ConfigError> {
    let name_ok = !c.replica_set.is_empty()
        && c.replica_set.len() <= 63
        && c.replica_set
            .chars()
            .all(|ch| ch.is_ascii_alphanumeric() || "-_.".contains(ch));
    if !name_ok {
        return Err(invalid(
            "REPLICA_SET",
            "replica-set",
            "use 1 to 63 letters, digits, '-', '_' or '.'",
        ));
    }
    if let Some(n) = c.partitions {
        if !(1..=4096).contains(&n) {
            return Err(invalid(
                "PARTITIONS",
                "partitions",
                format!("must be between 1 and 4096, got {n}"),
            ));
        }
    }
    if c.heartbeat_interval < Duration::from_millis(50) {
        return Err(invalid(
            "HEARTBEAT_INTERVAL",
            "heartbeat-interval",
            "must be at least 50ms",
        ));
    }
    if c.stale_worker_timeout <= c.heartbeat_interval {
        return Err(invalid(
            "STALE_WORKER_TIMEOUT",
            "stale-worker-timeout",
            format!(
                "must be larger than HEARTBEAT_INTERVAL ({}), got {}; a few heartbeats must fit in it (e.g. 30s with 5s)",
                humantime::format_duration(c.heartbeat_interval),
                humantime::format_duration(c.stale_worker_timeout)
            ),
        ));
    }
    if c.coordination_timeout.is_zero() {
        return Err(invalid(
            "COORDINATION_TIMEOUT",
            "coordination-timeout",
            "must be larger than 0",
        ));
    }
    Ok(())
}

/// The admin token and the shutdown timeout.
fn check_http_and_shutdown(args: &RunArgs) -> Result<(), ConfigError> {
    if let Some(token) = &args.http.admin_token {
        if !token.is_empty() && token.len() < 16 {
            return Err(invalid(
                "ADMIN_TOKEN",
                "admin-token",
                "must be at least 16 characters (or empty to disable the admin API)",
            ));
        }
    }
    if args.shutdown_timeout.is_zero() {
        return Err(invalid(
            "SHUTDOWN_TIMEOUT",
            "shutdown-timeout",
            "must be larger than 0",
        ));
    }
    Ok(())
}

/// Checks the plugin files and directories. An empty directory is fine (the host then runs
/// what the registry holds, e.g. uploads); giving neither is a configuration error.
fn collect_plugins(
    files: &[PathBuf],
    dir: Option<&PathBuf>,
) -> Result<(Vec<PathBuf>, Vec<PathBuf>), ConfigError> {
    if files.is_empty() && dir.is_none() {
        return Err(ConfigError::Missing {
            env: "PLUGINS",
            flag: "plugin",
            hint: "give at least one projection component with --plugin FILE.wasm or a directory with --plugins DIR",
        });
    }
    for file in files {
        if !file.is_file() {
            return Err(invalid(
                "PLUGINS",
                "plugin",
                format!("{} is not a file", file.display()),
            ));
        }
    }
    let mut dirs = Vec::new();
    if let Some(dir) = dir {
        if !dir.is_dir() {
            return Err(invalid(
                "PLUGINS_DIR",
                "plugins",
                format!("{} is not a directory", dir.display()),
            ));
        }
        dirs.push(dir.clone());
    }
    let mut files = files.to_vec();
    files.dedup();
    Ok((files, dirs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn parse(extra: &[&str]) -> Result<RunConfig, ConfigError> {
        let plugin = std::env::current_exe().unwrap();
        let mut argv = vec![
            "projection-host".to_string(),
            "--database-url".into(),
            "postgres://u:p@localhost/db".into(),
            "--plugin".into(),
            plugin.display().to_string(),
        ];
        argv.extend(extra.iter().map(|s| s.to_string()));
        /// `run`'s flags, as the command line parses them.
        #[derive(Parser)]
        struct Run {
            #[command(flatten)]
            args: RunArgs,
        }
        RunConfig::from_args(Run::try_parse_from(argv).expect("parses").args)
    }

    #[test]
    fn defaults_match_the_seed() {
        let c = parse(&[]).unwrap();
        assert_eq!(c.coordination.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.coordination.stale_timeout, Duration::from_secs(30));
        assert_eq!(c.coordination.coordination_timeout, Duration::from_secs(60));
        assert_eq!(c.batch_size, 100);
        assert_eq!(c.coordination.replica_set, "default");
    }

    #[test]
    fn a_stale_timeout_not_above_the_heartbeat_is_refused_by_name() {
        let err = parse(&[
            "--heartbeat-interval",
            "10s",
            "--stale-worker-timeout",
            "10s",
        ])
        .unwrap_err()
        .to_string();
        assert!(err.contains("STALE_WORKER_TIMEOUT"), "{err}");
        assert!(err.contains("HEARTBEAT_INTERVAL"), "{err}");
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (args, name) in [
            (vec!["--batch-size", "0"], "BATCH_SIZE"),
            (
                vec!["--batch-size", "500", "--max-batch-size", "100"],
                "MAX_BATCH_SIZE",
            ),
            (vec!["--partitions", "0"], "PARTITIONS"),
            (vec!["--replica-set", "a b"], "REPLICA_SET"),
            (vec!["--events-table", "x;y"], "EVENTS_TABLE"),
        ] {
            let err = parse(&args).unwrap_err().to_string();
            assert!(err.contains(name), "{args:?}: {err}");
        }
    }
}
