//! Benchmarks and the demo, all on the reference workload W1 (bench/README.md):
//! `w1` (catch-up against the set-based SQL ceiling), `live` (append-to-read-model latency),
//! `rebalance` (pauses when hosts join, leave or die), `poison` (how a failing event is
//! contained).

mod args;
mod live;
mod poison;
mod rebalance;
mod resize;
mod swap;
mod w1;

pub use args::{BenchCommand, DemoArgs};
pub use w1::demo;

/// Runs one benchmark.
pub async fn run(command: BenchCommand) -> anyhow::Result<()> {
    match command {
        BenchCommand::W1(args) => w1::w1(args).await,
        BenchCommand::Live(args) => live::live(args).await,
        BenchCommand::Rebalance(args) => rebalance::rebalance(args).await,
        BenchCommand::Swap(args) => swap::swap(args).await,
        BenchCommand::Poison(args) => poison::poison(args).await,
        BenchCommand::Resize(args) => resize::resize(args).await,
    }
}

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::{ConnectOptions, Connection, PgConnection};

use crate::devdb::DevDatabase;

const SCHEMA: &str = include_str!("../../../bench/w1/w1-schema.sql");
const SEED: &str = include_str!("../../../bench/w1/w1-seed.sql");
const CHECK: &str = include_str!("../../../bench/w1/w1-check.sql");
const READ_MODEL: &str = include_str!("../../../bench/w1/w1-readmodel.sql");

/// The set-based build of the W1 read model: what a single SQL statement achieves.
const CEILING: &str =
    "INSERT INTO account_balances (account_id, balance, event_count, last_position)
SELECT aggregate_id,
       sum(CASE WHEN event_type = 'Deposited' THEN 1 ELSE -1 END
           * (convert_from(payload, 'UTF8')::jsonb ->> 'amount')::bigint),
       count(*), max(global_position)
  FROM events WHERE bounded_context = 'Bank' AND aggregate_type = 'Account'
 GROUP BY aggregate_id";

/// Result of `w1-check.sql`.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    pub mismatches: i64,
    pub accounts: i64,
    pub events_counted: i64,
    pub events_in_store: i64,
}

impl Check {
    pub fn exact(&self) -> bool {
        self.mismatches == 0 && self.events_counted == self.events_in_store
    }
}

/// A connection without statement logging (seeding takes seconds by design).
pub(crate) async fn connect(url: &str) -> anyhow::Result<PgConnection> {
    let options: sqlx::postgres::PgConnectOptions =
        url.parse().context("parsing the database URL")?;
    Ok(PgConnection::connect_with(
        &options
            .disable_statement_logging()
            .log_slow_statements(tracing::log::LevelFilter::Off, std::time::Duration::ZERO),
    )
    .await?)
}

/// A pool for a bench's own queries, which are large by design and must not be logged as slow.
pub(crate) async fn connect_pool(url: &str) -> anyhow::Result<sqlx::PgPool> {
    let options: sqlx::postgres::PgConnectOptions =
        url.parse().context("parsing the database URL")?;
    Ok(sqlx::PgPool::connect_with(
        options
            .disable_statement_logging()
            .log_slow_statements(tracing::log::LevelFilter::Off, std::time::Duration::ZERO),
    )
    .await?)
}

/// A database created for one run on a given server, dropped on `drop_now`.
pub struct ScratchDatabase {
    server_url: String,
    pub name: String,
    pub url: String,
}

impl ScratchDatabase {
    pub async fn create(server_url: &str, name: &str) -> anyhow::Result<ScratchDatabase> {
        let mut admin = connect(server_url)
            .await
            .with_context(|| format!("connecting to {}", crate::db::redact_url(server_url)))?;
        let quoted = crate::db::quote_ident(name);
        sqlx::query(&format!("DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
            .execute(&mut admin)
            .await?;
        sqlx::query(&format!("CREATE DATABASE {quoted}"))
            .execute(&mut admin)
            .await
            .context("creating a scratch database (the DATABASE_URL user needs CREATEDB)")?;
        let mut url = url::Url::parse(server_url).context("parsing DATABASE_URL")?;
        url.set_path(&format!("/{name}"));
        Ok(ScratchDatabase {
            server_url: server_url.to_string(),
            name: name.to_string(),
            url: url.to_string(),
        })
    }

    pub async fn drop_now(self) -> anyhow::Result<()> {
        let mut admin = connect(&self.server_url).await?;
        sqlx::query(&format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            crate::db::quote_ident(&self.name)
        ))
        .execute(&mut admin)
        .await?;
        Ok(())
    }
}

/// Creates the pupsourcing tables and appends W1 events `0..n` over `k` accounts.
pub async fn seed_w1(url: &str, n: u64, k: u64) -> anyhow::Result<()> {
    let mut conn = connect(url).await?;
    sqlx::raw_sql(SCHEMA)
        .execute(&mut conn)
        .await
        .context("creating the events table")?;
    let seed = SEED
        .replace(":n", &n.to_string())
        .replace(":k", &k.to_string());
    sqlx::raw_sql(&seed)
        .execute(&mut conn)
        .await
        .context("seeding W1 events")?;
    sqlx::raw_sql("VACUUM ANALYZE events")
        .execute(&mut conn)
        .await?;
    Ok(())
}

/// Runs `w1-check.sql` against the read model in `schema`.
pub async fn check_w1(url: &str, schema: &str) -> anyhow::Result<Check> {
    let mut conn = connect(url).await?;
    sqlx::query(&format!(
        "SET search_path TO {}, public",
        crate::db::quote_ident(schema)
    ))
    .execute(&mut conn)
    .await?;
    let (mismatches, accounts, events_counted, events_in_store): (i64, i64, i64, i64) =
        sqlx::query_as(&format!(
            "SELECT mismatches::int8, accounts::int8, events_counted::int8, events_in_store::int8 FROM ({}) AS c",
            CHECK.trim_end().trim_end_matches(';')
        ))
        .fetch_one(&mut conn)
        .await?;
    Ok(Check {
        mismatches,
        accounts,
        events_counted,
        events_in_store,
    })
}

/// Builds the read model with one set-based statement; returns its duration.
pub(crate) async fn sql_ceiling(url: &str) -> anyhow::Result<Duration> {
    let mut conn = connect(url).await?;
    sqlx::raw_sql("CREATE SCHEMA ceiling; SET search_path TO ceiling, public")
        .execute(&mut conn)
        .await?;
    sqlx::raw_sql(READ_MODEL).execute(&mut conn).await?;
    let started = Instant::now();
    sqlx::query(CEILING).execute(&mut conn).await?;
    Ok(started.elapsed())
}

/// One host process, run to catch-up. Returns wall time and peak RSS in bytes.
pub(crate) fn run_host(
    url: &str,
    plugin: &Path,
    batch_size: Option<u32>,
    log_level: &str,
    quiet: bool,
) -> anyhow::Result<(Duration, u64)> {
    let exe = std::env::current_exe().context("locating the projection-host binary")?;
    let mut cmd = std::process::Command::new(exe);
    cmd.args(["run", "--once", "--replica-set", "w1", "--no-http"])
        .arg("--database-url")
        .arg(url)
        .arg("--plugin")
        .arg(plugin)
        .arg("--log-level")
        .arg(log_level)
        // Only what the benchmark sets: none of the caller's tuning leaks in.
        .env_remove("PLUGINS")
        .env_remove("PLUGINS_DIR")
        .env_remove("BATCH_SIZE")
        .env_remove("MAX_BATCH_SIZE")
        .stdin(std::process::Stdio::null());
    // Without a batch size: the host's own defaults.
    if let Some(batch_size) = batch_size {
        cmd.arg("--batch-size")
            .arg(batch_size.to_string())
            .arg("--max-batch-size")
            .arg(batch_size.to_string());
    }
    if quiet {
        cmd.stdout(std::process::Stdio::null());
    }
    let started = Instant::now();
    let child = cmd.spawn().context("starting projection-host run")?;
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    // SAFETY: plain wait4 on our own child; `rusage` is plain data.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let elapsed = started.elapsed();
    if waited != pid {
        bail!("waiting for the host process failed");
    }
    if !libc::WIFEXITED(status) || libc::WEXITSTATUS(status) != 0 {
        bail!("projection-host run --once failed (status {status}); see its log above");
    }
    // ru_maxrss is in KiB on Linux.
    Ok((elapsed, usage.ru_maxrss as u64 * 1024))
}

pub(crate) fn ensure_plugin(plugin: &Path) -> anyhow::Result<PathBuf> {
    if plugin.is_file() {
        return Ok(plugin.to_path_buf());
    }
    // Workspace packages name their component after themselves, with `_` for `-`.
    let package = plugin.file_stem().map_or_else(
        || "bank-balances".into(),
        |s| s.to_string_lossy().replace('_', "-"),
    );
    // Test guests build into their own target directory (tests/artifacts does the same).
    let target_dir = if plugin.starts_with("target/test-wasm") {
        " --target-dir target/test-wasm"
    } else {
        ""
    };
    bail!(
        "the plugin {} does not exist; build it with \
         `cargo build --release --target wasm32-wasip2{target_dir} -p {package}` (or pass its path)",
        plugin.display()
    )
}

/// A server to work on: DATABASE_URL, or a throwaway local one.
pub(crate) fn server(url: Option<String>) -> anyhow::Result<(String, Option<DevDatabase>)> {
    match url.filter(|u| !u.trim().is_empty()) {
        Some(url) => Ok((url, None)),
        None => {
            let dev = DevDatabase::start()?;
            Ok((dev.url.clone(), Some(dev)))
        }
    }
}

/// A `projection-host run` child process, for benchmarks that start, stop and kill hosts.
pub(crate) struct HostChild {
    child: std::process::Child,
}

impl HostChild {
    pub(crate) fn start(url: &str, plugin: &Path, args: &[&str]) -> anyhow::Result<HostChild> {
        let exe = std::env::current_exe().context("locating the projection-host binary")?;
        let child = std::process::Command::new(exe)
            .args([
                "run",
                "--no-http",
                "--log-level",
                "warn",
                "--database-url",
                url,
                "--plugin",
            ])
            .arg(plugin)
            .args(args)
            .env_remove("PLUGINS")
            .env_remove("PLUGINS_DIR")
            .env_remove("POD_NAME")
            .stdin(std::process::Stdio::null())
            .spawn()
            .context("starting projection-host run")?;
        Ok(HostChild { child })
    }

    pub(crate) fn signal(&self, signal: i32) {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, signal) };
    }

    pub(crate) fn wait(&mut self) {
        let _ = self.child.wait();
    }
}

impl Drop for HostChild {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `check` every 20 ms until it returns true, or fails after `timeout`.
pub(crate) async fn wait_until<F, Fut>(
    what: &str,
    timeout: Duration,
    mut check: F,
) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let started = Instant::now();
    while !check().await? {
        if started.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// The p-th percentile (0..=100) of sorted values.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}
