//! `run`'s flags and environment variables, as clap parses them. Every flag that the seed's
//! ConfigMap sets can also come from the same environment variable. The enums here are the
//! command line's spelling of domain types (which know nothing of clap); `RunConfig::from_args`
//! checks the values and maps them.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};

use crate::base::units::{parse_bytes, parse_duration};
use crate::coordination::Strategy;
use crate::pipeline::policy::OnFailure;
use crate::sink::SqlIsolation;

#[derive(Debug, Args, Clone)]
pub struct DatabaseArgs {
    /// PostgreSQL URL of the event store (and of the read models).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Upper bound of the host's connection pool.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 10)]
    pub max_connections: u32,
}

#[derive(Debug, Args, Clone)]
pub struct SourceArgs {
    /// The events table in the pupsourcing layout (optionally schema-qualified).
    #[arg(long, env = "EVENTS_TABLE", default_value = "events")]
    pub events_table: String,
    /// Events per batch while live. Batches grow up to --max-batch-size while catching up.
    #[arg(long, env = "BATCH_SIZE", default_value_t = 100)]
    pub batch_size: u32,
    /// Largest batch while catching up.
    #[arg(long, env = "MAX_BATCH_SIZE", default_value_t = 10000)]
    pub max_batch_size: u32,
    /// Longest wait between two looks at the events table when no notification arrives.
    #[arg(long, env = "POLL_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub poll_interval: Duration,
    /// NOTIFY channels that announce new events (comma-separated). `pupsourcing_events` is the
    /// channel pupsourcing/core's store uses; `projection_host_events` is our optional trigger's.
    #[arg(
        long,
        env = "NOTIFY_CHANNELS",
        default_value = "pupsourcing_events,projection_host_events",
        value_delimiter = ','
    )]
    pub notify_channels: Vec<String>,
}

#[derive(Debug, Args, Clone)]
pub struct PluginArgs {
    /// A projection component (.wasm). Repeatable.
    #[arg(long = "plugin", env = "PLUGINS", value_delimiter = ',')]
    pub plugins: Vec<PathBuf>,
    /// A directory whose *.wasm files are projection components.
    #[arg(long = "plugins", env = "PLUGINS_DIR")]
    pub plugins_dir: Option<PathBuf>,
    /// Linear-memory cap per plugin instance, e.g. 256MiB.
    #[arg(long, env = "PLUGIN_MEMORY_LIMIT", default_value = "256MiB", value_parser = parse_bytes)]
    pub plugin_memory_limit: u64,
    /// CPU deadline for one plugin call (setup or one batch).
    #[arg(long, env = "PLUGIN_CALL_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub plugin_call_timeout: Duration,
    /// Largest sum of payload and metadata bytes handed to one plugin call.
    #[arg(long, env = "MAX_BATCH_BYTES", default_value = "16MiB", value_parser = parse_bytes)]
    pub max_batch_bytes: u64,
    /// Host memory a plugin's buffered keyed writes may hold in one batch.
    #[arg(long, env = "MAX_WRITE_BYTES", default_value = "64MiB", value_parser = parse_bytes)]
    pub max_write_bytes: u64,
    /// Host memory one result of a plugin's `query` (or one row it reads with `get`) may hold.
    #[arg(long, env = "MAX_QUERY_BYTES", default_value = "16MiB", value_parser = parse_bytes)]
    pub max_query_bytes: u64,
    /// What to do once a plugin failed on one event --max-retries times: halt that partition
    /// (stop) or park the event with the later events of its aggregate (dead-letter).
    #[arg(long, env = "ON_FAILURE", value_enum, default_value_t = OnFailureArg::Stop)]
    pub on_failure: OnFailureArg,
    /// Retries of a single failing event before --on-failure applies.
    #[arg(long, env = "MAX_RETRIES", default_value_t = 5)]
    pub max_retries: u32,
    /// Per-projection settings, e.g. `orders:on_failure=dead-letter,memory=64MiB,timeout=2s`
    /// (keys: on_failure, max_retries, memory, timeout, max_batch_bytes). Repeatable; in the
    /// variable, separate projections with ';'.
    #[arg(
        long = "projection",
        env = "PROJECTION_SETTINGS",
        value_delimiter = ';'
    )]
    pub projection_settings: Vec<String>,
    /// Where compiled plugins are kept so that restarts and swaps do not compile again (must be
    /// private to the host). Empty: no cache.
    #[arg(long, env = "PLUGIN_CACHE_DIR", default_value_os_t = std::env::temp_dir().join("projection-host-cache"))]
    pub plugin_cache_dir: PathBuf,
    /// How often mounted plugin files are checked for new versions.
    #[arg(long, env = "PLUGIN_SCAN_INTERVAL", default_value = "10s", value_parser = parse_duration)]
    pub plugin_scan_interval: Duration,
    /// A rebuild (blue/green) is promoted once every partition is at most this many positions
    /// behind the head.
    #[arg(long, env = "PROMOTE_LAG", default_value_t = 1000)]
    pub promote_lag: i64,
    /// How long the read model of a version replaced by a rebuild is kept (for rollback and
    /// comparison) before it is dropped.
    #[arg(long, env = "RETIRED_DATA_GRACE", default_value = "24h", value_parser = parse_duration)]
    pub retired_data_grace: Duration,
    /// How plugin SQL is confined: `role` runs it in sessions of a login role of its own that
    /// owns the projection's schema and nothing else (the host needs CREATEROLE); `none` runs
    /// it as the host's own user, for trusted plugins only.
    #[arg(long, env = "SQL_ISOLATION", value_enum, default_value_t = SqlIsolationArg::Role)]
    pub sql_isolation: SqlIsolationArg,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SqlIsolationArg {
    Role,
    /// No confinement by the database (`schema`, the earlier name, is accepted).
    #[value(name = "none", alias = "schema")]
    Unconfined,
}

impl From<SqlIsolationArg> for SqlIsolation {
    fn from(arg: SqlIsolationArg) -> SqlIsolation {
        match arg {
            SqlIsolationArg::Role => SqlIsolation::Role,
            SqlIsolationArg::Unconfined => SqlIsolation::Unconfined,
        }
    }
}

/// `--on-failure` / `ON_FAILURE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OnFailureArg {
    /// The event's partition halts at it until an operator resumes the projection.
    Stop,
    /// The event is parked with every later event of its aggregate; the rest keeps flowing.
    DeadLetter,
}

impl From<OnFailureArg> for OnFailure {
    fn from(arg: OnFailureArg) -> OnFailure {
        match arg {
            OnFailureArg::Stop => OnFailure::Stop,
            OnFailureArg::DeadLetter => OnFailure::DeadLetter,
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct CoordinationArgs {
    /// The group of projections that scale together.
    #[arg(long, env = "REPLICA_SET", default_value = "default")]
    pub replica_set: String,
    /// Logical partitions of a new replica set (32 if omitted). An existing set keeps its
    /// stored count; `projection-host partitions resize` changes it while the fleet runs.
    #[arg(long, env = "PARTITIONS")]
    pub partitions: Option<u32>,
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
    /// A worker whose heartbeat is older than this (database clock) is removed and its
    /// partitions reassigned.
    #[arg(long, env = "STALE_WORKER_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    pub stale_worker_timeout: Duration,
    /// Longest wait for a coordination step (joining, a stop barrier) before it is reported.
    #[arg(long, env = "COORDINATION_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub coordination_timeout: Duration,
    /// How partitions move when membership changes.
    #[arg(long, env = "STRATEGY", value_enum, default_value_t = StrategyArg::Cooperative)]
    pub strategy: StrategyArg,
    /// Stable worker identity (Kubernetes: the pod name from the downward API).
    #[arg(long = "worker-id", env = "POD_NAME")]
    pub pod_name: Option<String>,
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StrategyArg {
    /// Only partitions that must move pause; the rest keep running.
    Cooperative,
    /// Every worker stops, then all restart with the new assignment (behind a stop barrier).
    Recreate,
}

impl From<StrategyArg> for Strategy {
    fn from(arg: StrategyArg) -> Strategy {
        match arg {
            StrategyArg::Cooperative => Strategy::Cooperative,
            StrategyArg::Recreate => Strategy::Recreate,
        }
    }
}

#[derive(Debug, Args, Clone)]
pub struct HttpArgs {
    /// Address of the probes (/health, /ready) and the admin API.
    #[arg(long, env = "HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    pub health_addr: SocketAddr,
    /// Address of the Prometheus endpoint (/metrics).
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:9090")]
    pub metrics_addr: SocketAddr,
    /// Disable both HTTP listeners (benchmarks, one-off runs).
    #[arg(long, env = "DISABLE_HTTP")]
    pub no_http: bool,
    /// Bearer token of the admin API (from a Secret). Without it the admin API is disabled.
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

#[derive(Debug, Args, Clone)]
pub struct RunArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[command(flatten)]
    pub source: SourceArgs,
    #[command(flatten)]
    pub plugins: PluginArgs,
    #[command(flatten)]
    pub coordination: CoordinationArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    /// Stop (exit 0) once every projection has caught up with the head of the stream.
    #[arg(long)]
    pub once: bool,
    /// On SIGTERM/SIGINT, how long in-flight batches may take to finish before they are
    /// abandoned (rolled back). Keep terminationGracePeriodSeconds at least 15 s above it.
    #[arg(long, env = "SHUTDOWN_TIMEOUT", default_value = "45s", value_parser = parse_duration)]
    pub shutdown_timeout: Duration,
    /// How long the start waits for PostgreSQL to accept connections (refused, timed out,
    /// starting up, DNS not yet resolvable); 0 waits as long as it takes. A wrong password, an
    /// unknown database or a TLS verification failure ends the start at once.
    #[arg(long, env = "DB_WAIT_TIMEOUT", default_value = "0s", value_parser = parse_duration)]
    pub db_wait_timeout: Duration,
}
