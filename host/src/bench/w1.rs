//! `bench w1` and `demo`.

use std::time::Instant;

use anyhow::bail;

use super::args::{BenchW1Args, DemoArgs};
use super::{
    check_w1, connect, ensure_plugin, run_host, seed_w1, server, sql_ceiling, ScratchDatabase,
};

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
        tokio::task::block_in_place(|| run_host(&db.url, &plugin, Some(100), &level, false))?;
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
    let batch = (!args.host_defaults).then_some(args.batch_size);
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
        let (elapsed, rss) =
            tokio::task::block_in_place(|| run_host(&db.url, &plugin, batch, "warn", true))?;
        let check = check_w1(&db.url, "bank_balances").await?;
        db.drop_now().await?;
        let line = Line {
            events: args.events,
            batch,
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
    /// `None`: the host's defaults.
    batch: Option<u32>,
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
            self.batch
                .map_or_else(|| "host-defaults".to_string(), |b| b.to_string()),
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
