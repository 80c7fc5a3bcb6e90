//! The reference workload W1 (bench/README.md): the demo, and the catch-up benchmark against
//! the set-based SQL ceiling.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use sqlx::{ConnectOptions, Connection, PgConnection};

use crate::cli::{BenchW1Args, DemoArgs};
use crate::devdb::DevDatabase;

const SCHEMA: &str = include_str!("../../bench/w1/w1-schema.sql");
const SEED: &str = include_str!("../../bench/w1/w1-seed.sql");
const CHECK: &str = include_str!("../../bench/w1/w1-check.sql");
const READ_MODEL: &str = include_str!("../../bench/w1/w1-readmodel.sql");

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
async fn connect(url: &str) -> anyhow::Result<PgConnection> {
    let options: sqlx::postgres::PgConnectOptions =
        url.parse().context("parsing the database URL")?;
    Ok(PgConnection::connect_with(&options.disable_statement_logging()).await?)
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
async fn sql_ceiling(url: &str) -> anyhow::Result<Duration> {
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
fn run_host(
    url: &str,
    plugin: &Path,
    batch_size: u32,
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
        .arg("--batch-size")
        .arg(batch_size.to_string())
        .arg("--max-batch-size")
        .arg(batch_size.to_string())
        .arg("--log-level")
        .arg(log_level)
        .env_remove("PLUGINS")
        .env_remove("PLUGINS_DIR")
        .stdin(std::process::Stdio::null());
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

fn ensure_plugin(plugin: &Path) -> anyhow::Result<PathBuf> {
    if plugin.is_file() {
        return Ok(plugin.to_path_buf());
    }
    bail!(
        "the bank-balances plugin {} does not exist; build it with \
         `cargo build --release --target wasm32-wasip2 -p bank-balances` (or pass --plugin)",
        plugin.display()
    )
}

/// A server to work on: DATABASE_URL, or a throwaway local one.
fn server(url: Option<String>) -> anyhow::Result<(String, Option<DevDatabase>)> {
    match url.filter(|u| !u.trim().is_empty()) {
        Some(url) => Ok((url, None)),
        None => {
            let dev = DevDatabase::start()?;
            Ok((dev.url.clone(), Some(dev)))
        }
    }
}

pub async fn demo(args: DemoArgs) -> anyhow::Result<()> {
    let plugin = ensure_plugin(&args.plugin)?;
    let (server_url, dev) = server(args.database_url)?;
    let db = ScratchDatabase::create(&server_url, "projection_demo").await?;
    eprintln!(
        "Seeding {} W1 events over {} accounts into database '{}' ...",
        args.events, args.accounts, db.name
    );
    let started = Instant::now();
    seed_w1(&db.url, args.events, args.accounts).await?;
    eprintln!(
        "Seeded in {:.1}s. Running the host with bank-balances until it has caught up:",
        started.elapsed().as_secs_f64()
    );
    let level = std::env::var("LOG_LEVEL").unwrap_or_else(|_| "info".into());
    let (elapsed, rss) =
        tokio::task::block_in_place(|| run_host(&db.url, &plugin, 100, &level, false))?;
    let check = check_w1(&db.url, "bank_balances").await?;

    let mut conn = connect(&db.url).await?;
    let (total, richest, richest_balance): (i64, String, i64) = sqlx::query_as(
        "SELECT (SELECT sum(balance) FROM bank_balances.account_balances)::int8,
                account_id, balance FROM bank_balances.account_balances ORDER BY balance DESC, account_id LIMIT 1",
    )
    .fetch_one(&mut conn)
    .await?;
    println!();
    println!("Read model bank_balances.account_balances:");
    println!("  accounts            {}", check.accounts);
    println!(
        "  events counted      {} of {} in the store",
        check.events_counted, check.events_in_store
    );
    println!("  sum of balances     {total}");
    println!("  richest account     {richest} ({richest_balance})");
    println!(
        "  host run            {:.2}s, {:.0} events/s, peak RSS {} MB",
        elapsed.as_secs_f64(),
        args.events as f64 / elapsed.as_secs_f64(),
        rss >> 20
    );
    if check.exact() {
        println!(
            "  exactness check     OK: 0 mismatching accounts, every event applied exactly once"
        );
    } else {
        println!(
            "  exactness check     FAILED: {} mismatching accounts",
            check.mismatches
        );
    }
    drop(conn);
    match dev {
        Some(dev) => {
            drop(dev);
            eprintln!("Stopped and removed the throwaway PostgreSQL.");
        }
        None => eprintln!("The demo database is kept: psql '{}' -c 'TABLE bank_balances.account_balances LIMIT 5'", crate::db::redact_url(&db.url)),
    }
    if !check.exact() {
        bail!("the read model is not exact");
    }
    Ok(())
}

pub async fn w1(args: BenchW1Args) -> anyhow::Result<()> {
    let plugin = ensure_plugin(&args.plugin)?;
    if args.events == 0 || args.accounts == 0 || args.batch_size == 0 {
        bail!("--events, --accounts and --batch-size must be at least 1");
    }
    let (server_url, dev) = server(args.database_url)?;
    let mut runs = Vec::new();
    for run in 1..=args.runs.max(1) {
        let db =
            ScratchDatabase::create(&server_url, &format!("projection_bench_w1_{run}")).await?;
        eprintln!(
            "run {run}: seeding {} events over {} accounts ...",
            args.events, args.accounts
        );
        seed_w1(&db.url, args.events, args.accounts).await?;
        let ceiling = sql_ceiling(&db.url).await?;
        eprintln!(
            "run {run}: SQL ceiling {:.2}s; running the host ...",
            ceiling.as_secs_f64()
        );
        let (elapsed, rss) = tokio::task::block_in_place(|| {
            run_host(&db.url, &plugin, args.batch_size, "warn", true)
        })?;
        let check = check_w1(&db.url, "bank_balances").await?;
        db.drop_now().await?;
        let line = Line {
            events: args.events,
            batch: args.batch_size,
            seconds: elapsed.as_secs_f64(),
            ceiling_seconds: ceiling.as_secs_f64(),
            mismatches: check.mismatches + (check.events_in_store - check.events_counted).abs(),
            peak_rss_mb: rss as f64 / (1 << 20) as f64,
        };
        eprintln!("run {run}: {}", line.render());
        runs.push(line);
    }
    drop(dev);
    let median = Line::median(&runs);
    println!("{}", median.render());
    if runs.iter().any(|r| r.mismatches != 0) {
        bail!("the read model was not exact in at least one run");
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct Line {
    events: u64,
    batch: u32,
    seconds: f64,
    ceiling_seconds: f64,
    mismatches: i64,
    peak_rss_mb: f64,
}

impl Line {
    fn rate(&self) -> f64 {
        self.events as f64 / self.seconds
    }

    fn ceiling_rate(&self) -> f64 {
        self.events as f64 / self.ceiling_seconds
    }

    fn render(&self) -> String {
        format!(
            "w1 events={} workers=1 batch={} seconds={:.2} events_per_sec={:.0} sql_ceiling_events_per_sec={:.0} ratio={:.3} mismatches={} peak_rss_mb={:.0}",
            self.events,
            self.batch,
            self.seconds,
            self.rate(),
            self.ceiling_rate(),
            self.rate() / self.ceiling_rate(),
            self.mismatches,
            self.peak_rss_mb
        )
    }

    /// Medians of every figure over the runs (each figure on its own).
    fn median(runs: &[Line]) -> Line {
        let med = |mut v: Vec<f64>| {
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        Line {
            events: runs[0].events,
            batch: runs[0].batch,
            seconds: med(runs.iter().map(|r| r.seconds).collect()),
            ceiling_seconds: med(runs.iter().map(|r| r.ceiling_seconds).collect()),
            mismatches: runs.iter().map(|r| r.mismatches).max().unwrap_or(0),
            peak_rss_mb: med(runs.iter().map(|r| r.peak_rss_mb).collect()),
        }
    }
}
