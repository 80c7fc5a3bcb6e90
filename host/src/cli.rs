//! The command line: subcommands and flags. Every flag that the seed's ConfigMap sets can also
//! come from the same environment variable. No logic lives here; `config` validates.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "projection-host",
    version,
    about = "Runs event-sourced projections compiled to WebAssembly components against a PostgreSQL event store"
)]
pub struct Cli {
    #[command(flatten)]
    pub log: LogArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Create or upgrade the host's own tables (idempotent), optionally installing the NOTIFY
    /// trigger on the events table.
    Migrate(MigrateArgs),
    /// Run projections: join the replica set, take a share of the partitions, and project events
    /// until stopped (or, with --once, until caught up).
    Run(Box<RunArgs>),
    /// Print the replica set's generation, workers, partition owners, checkpoints and lag.
    Status(StatusArgs),
    /// Pause a projection on every host (through the admin API).
    Pause(ControlArgs),
    /// Resume a paused projection, and lift halts of the stop policy (through the admin API).
    Resume(ControlArgs),
    /// Plugin versions of the fleet: list, push, promote, rollback (through the admin API).
    #[command(subcommand)]
    Plugins(PluginCommand),
    /// Events parked by the dead-letter policy: list, retry, skip (through the admin API).
    #[command(subcommand)]
    DeadLetters(DeadLetterCommand),
    /// Replica sets on one database: point readers at another set's read models, remove a set.
    #[command(subcommand)]
    ReplicaSets(ReplicaSetCommand),
    /// Projections of a replica set: remove one with everything the host made for it.
    #[command(subcommand)]
    Projections(ProjectionCommand),
    /// Seed a throwaway database with the W1 workload, project it with bank-balances and print
    /// the result: the quickest way to see the host work.
    Demo(DemoArgs),
    /// Benchmarks on the reference workload W1.
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Debug, Args)]
pub struct LogArgs {
    /// Log filter: a level (error, warn, info, debug, trace) or a tracing directive list.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Args, Clone)]
pub struct DatabaseArgs {
    /// PostgreSQL URL of the event store (and of the read models).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Upper bound of the host's connection pool.
    #[arg(long, env = "DB_MAX_CONNECTIONS", default_value_t = 10)]
    pub max_connections: u32,
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    /// Also install an `AFTER INSERT ... FOR EACH STATEMENT` trigger on the events table that
    /// wakes hosts with NOTIFY. It changes the user's table, so it is opt-in.
    #[arg(long)]
    pub install_notify_trigger: bool,
    /// The events table (optionally schema-qualified).
    #[arg(long, env = "EVENTS_TABLE", default_value = "events")]
    pub events_table: String,
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
    #[arg(long, env = "ON_FAILURE", value_enum, default_value_t = crate::pipeline::policy::OnFailure::Stop)]
    pub on_failure: crate::pipeline::policy::OnFailure,
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

#[derive(Debug, Args, Clone)]
pub struct CoordinationArgs {
    /// The group of projections that scale together.
    #[arg(long, env = "REPLICA_SET", default_value = "default")]
    pub replica_set: String,
    /// Logical partitions of the replica set. Fixed once the replica set exists; omit it to use
    /// the stored value (32 for a new replica set).
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
    #[arg(long, env = "STRATEGY", value_enum, default_value_t = Strategy::Cooperative)]
    pub strategy: Strategy,
    /// Stable worker identity (Kubernetes: the pod name from the downward API).
    #[arg(long = "worker-id", env = "POD_NAME")]
    pub pod_name: Option<String>,
    #[arg(long, env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Strategy {
    /// Only partitions that must move pause; the rest keep running.
    Cooperative,
    /// Every worker stops, then all restart with the new assignment (behind a stop barrier).
    Recreate,
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

#[derive(Debug, Args)]
pub struct StatusArgs {
    #[command(flatten)]
    pub database: DatabaseArgs,
    #[arg(long, env = "REPLICA_SET", default_value = "default")]
    pub replica_set: String,
    #[arg(long, env = "EVENTS_TABLE", default_value = "events")]
    pub events_table: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum ReplicaSetCommand {
    /// Make the schema readers query for each projection of FROM show TO's read model instead
    /// (one transaction). FROM must have no live hosts and TO must have caught up with it.
    SwitchReaders {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The replica set readers query today.
        #[arg(long)]
        from: String,
        /// The replica set whose read models readers should query.
        #[arg(long)]
        to: String,
        /// Only this projection (default: every projection FROM publishes).
        #[arg(long)]
        projection: Option<String>,
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
    /// Remove a replica set with no live hosts: its read models, roles, checkpoints, registry,
    /// dead letters and coordination rows.
    Remove {
        #[command(flatten)]
        database: DatabaseArgs,
        /// The replica set to remove.
        name: String,
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum ProjectionCommand {
    /// Remove a projection: hosts stop running it, then its schemas, role, checkpoints, registry
    /// rows, controls, halts and dead letters are dropped. Remove its file from the plugins
    /// directory first, or hosts register it again (from position 0) at their next start.
    Remove {
        #[command(flatten)]
        database: DatabaseArgs,
        #[arg(long, env = "REPLICA_SET", default_value = "default")]
        replica_set: String,
        /// The projection to remove.
        name: String,
        /// How long to wait for hosts to close the projection's sessions before ending them.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        wait: std::time::Duration,
        /// Confirm.
        #[arg(long)]
        yes: bool,
    },
}

/// Where the admin API is, and its token.
#[derive(Debug, Args, Clone)]
pub struct AdminArgs {
    /// Base URL of any host's health/admin port.
    #[arg(long, env = "ADMIN_URL", default_value = "http://127.0.0.1:8080")]
    pub admin_url: String,
    #[arg(long, env = "ADMIN_TOKEN", hide_env_values = true)]
    pub admin_token: Option<String>,
}

#[derive(Debug, Args)]
pub struct ControlArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// The projection's name.
    pub projection: String,
    /// Why (recorded with the control, shown in status).
    #[arg(long)]
    pub reason: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum PluginCommand {
    /// Registered versions per projection.
    List {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Upload a component: continue mode swaps it in on every host at the next batch; rebuild
    /// mode builds its read model from the start beside the active one.
    Push {
        #[command(flatten)]
        admin: AdminArgs,
        file: PathBuf,
        #[arg(long, value_enum, default_value_t = crate::lifecycle::Mode::Continue)]
        mode: crate::lifecycle::Mode,
        /// Register only; activate later with `promote`.
        #[arg(long)]
        no_activate: bool,
    },
    /// Make a version active (a finished rebuild, or a pending or retired version).
    Promote {
        #[command(flatten)]
        admin: AdminArgs,
        projection: String,
        sha256: String,
    },
    /// Switch back to the previously active version.
    Rollback {
        #[command(flatten)]
        admin: AdminArgs,
        projection: String,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeadLetterCommand {
    /// List parked events.
    List {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        projection: Option<String>,
    },
    /// Apply an aggregate's parked events again, in order.
    Retry {
        #[command(flatten)]
        admin: AdminArgs,
        #[arg(long)]
        projection: String,
        #[arg(long)]
        aggregate: String,
    },
    /// Drop one parked event (by id) without applying it.
    Skip {
        #[command(flatten)]
        admin: AdminArgs,
        id: i64,
    },
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// PostgreSQL to use; without it a throwaway local server is started and removed on exit.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[arg(long, default_value_t = 500_000)]
    pub events: u64,
    #[arg(long, default_value_t = 1_000)]
    pub accounts: u64,
    /// The bank-balances component.
    #[arg(
        long,
        default_value = "target/wasm32-wasip2/release/bank_balances.wasm"
    )]
    pub plugin: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// Catch-up throughput on W1 against the set-based SQL ceiling.
    W1(BenchW1Args),
    /// Latency from an append's commit to the read model's commit, at a fixed append rate.
    Live(BenchLiveArgs),
    /// Pauses of partitions when a host joins, leaves gracefully, or is killed.
    Rebalance(BenchRebalanceArgs),
    /// Time from a continue-mode push to the new build on every partition of a 2-host fleet.
    Swap(BenchSwapArgs),
    /// One panicking event in one batch over 32 partitions: the other partitions' pause, and
    /// the time until the event is halted or parked.
    Poison(BenchPoisonArgs),
}

#[derive(Debug, Args)]
pub struct BenchPoisonArgs {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Events of the batch that holds the panicking event (also the batch size).
    #[arg(long, default_value_t = 10_000)]
    pub events: u64,
    #[arg(long, value_enum, default_value_t = crate::pipeline::policy::OnFailure::Stop)]
    pub on_failure: crate::pipeline::policy::OnFailure,
    /// Repeat the measurement and report medians.
    #[arg(long, default_value_t = 3)]
    pub runs: u32,
    #[arg(
        long,
        default_value = "target/test-wasm/wasm32-wasip2/release/guest_faulty.wasm"
    )]
    pub plugin: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchSwapArgs {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[arg(
        long,
        default_value = "target/wasm32-wasip2/release/bank_balances.wasm"
    )]
    pub plugin: PathBuf,
    /// The build pushed during the run (same projection, another build).
    #[arg(
        long,
        default_value = "target/wasm32-wasip2/release/guest_bank_balances_v2.wasm"
    )]
    pub new_plugin: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchLiveArgs {
    /// PostgreSQL server to create the scratch database on; without it a throwaway local server
    /// is started.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Events appended per second (one transaction each).
    #[arg(long, default_value_t = 1000)]
    pub rate: u32,
    #[arg(long, default_value_t = 10)]
    pub seconds: u32,
    /// Do not install the NOTIFY trigger: the host finds new events by polling only.
    #[arg(long)]
    pub no_trigger: bool,
    #[arg(
        long,
        default_value = "target/wasm32-wasip2/release/bank_balances.wasm"
    )]
    pub plugin: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchRebalanceArgs {
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    #[arg(long, default_value_t = 5000)]
    pub stale_timeout_ms: u64,
    #[arg(
        long,
        default_value = "target/wasm32-wasip2/release/bank_balances.wasm"
    )]
    pub plugin: PathBuf,
}

#[derive(Debug, Args)]
pub struct BenchW1Args {
    /// PostgreSQL server to create the scratch database on; without it a throwaway local server
    /// is started.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    #[arg(long, default_value_t = 10_000)]
    pub accounts: u64,
    #[arg(long, default_value_t = 50_000)]
    pub batch_size: u32,
    /// Repeat the whole measurement and report the median run.
    #[arg(long, default_value_t = 1)]
    pub runs: u32,
    #[arg(
        long,
        default_value = "target/wasm32-wasip2/release/bank_balances.wasm"
    )]
    pub plugin: PathBuf,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("'{s}' is not a duration ({e}); use e.g. 500ms, 5s, 1m30s"))
}

/// Parses sizes such as `256MiB`, `1GiB`, `512MB`, `1048576`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, unit) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("'{s}' is not a size; use e.g. 64MiB, 1GiB"))?;
    let factor: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" | "ki" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" | "mi" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" | "gi" => 1 << 30,
        other => {
            return Err(format!(
                "'{s}': unknown size unit '{other}'; use KiB, MiB or GiB"
            ))
        }
    };
    n.checked_mul(factor)
        .ok_or_else(|| format!("'{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_style_durations_from_the_seed_configmap_parse() {
        assert_eq!(parse_duration("5s").unwrap(), Duration::from_secs(5));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert!(parse_duration("five seconds").is_err());
    }

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_bytes("256MiB").unwrap(), 256 << 20);
        assert_eq!(parse_bytes("1GiB").unwrap(), 1 << 30);
        assert_eq!(parse_bytes("64Mi").unwrap(), 64 << 20);
        assert_eq!(parse_bytes("1000").unwrap(), 1000);
        assert!(parse_bytes("lots").is_err());
        assert!(parse_bytes("5 parsecs").is_err());
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
