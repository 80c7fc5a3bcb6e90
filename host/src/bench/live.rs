//! `bench live`: appends W1 events at a fixed rate to a running host and reports the latency
//! from each append's commit to the commit of the batch that applied it.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::args::BenchLiveArgs;
use super::{connect, ensure_plugin, percentile, server, wait_until, HostChild, ScratchDatabase};

const APPEND_ONE: &str =
    "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version,
                    event_id, event_type, event_version, payload, metadata, created_at)
SELECT 'Bank', 'Account', 'acct-' || ($1::int8 % $2::int8), ($1::int8 / $2::int8) + 1,
       md5('w1-event-' || $1::int8)::uuid,
       CASE WHEN $1::int8 % 10 < 7 THEN 'Deposited' ELSE 'Withdrawn' END, 1,
       convert_to('{\"amount\":' || (1 + ($1::int8 * 7919) % 1000) || '}', 'UTF8'),
       '{}'::jsonb, now()
RETURNING global_position, clock_timestamp()";

pub async fn live(args: BenchLiveArgs) -> anyhow::Result<()> {
    let plugin = ensure_plugin(&args.plugin)?;
    let (server_url, dev) = server(args.database_url.clone())?;
    let db = ScratchDatabase::create(&server_url, "projection_bench_live").await?;
    let result = run(&db.url, &plugin, &args).await;
    db.drop_now().await?;
    drop(dev);
    let line = result?;
    println!("{line}");
    Ok(())
}

async fn run(url: &str, plugin: &Path, args: &BenchLiveArgs) -> anyhow::Result<String> {
    let accounts = 1_000u64;
    super::seed_w1(url, 1_000, accounts).await?;
    let pool = super::connect_pool(url).await?;
    crate::db::migrate(&pool).await?;
    if !args.no_trigger {
        let events = "events".parse().map_err(anyhow::Error::msg)?;
        crate::status::install_notify_trigger(&pool, &events).await?;
    }
    let _host = HostChild::start(url, plugin, &["--replica-set", "live"])?;
    let caught_up = |target: i64| {
        let pool = pool.clone();
        move || {
            let pool = pool.clone();
            async move {
                let (rows, low) =
                    crate::store::checkpoints::count_and_lowest(&pool, "bank_balances", None)
                        .await
                        .unwrap_or((0, None));
                Ok(rows == 32 && low.unwrap_or(0) >= target)
            }
        }
    };
    wait_until(
        "the host to catch up with the seed",
        Duration::from_secs(120),
        caught_up(1_000),
    )
    .await?;

    eprintln!("appending {} events/s for {}s ...", args.rate, args.seconds);
    let mut conn = connect(url).await?;
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let started = Instant::now();
    let mut positions = Vec::new();
    let mut appended_at = Vec::new();
    let mut g = 1_000i64;
    while started.elapsed() < Duration::from_secs(u64::from(args.seconds)) {
        ticker.tick().await;
        let (position, at): (i64, chrono::DateTime<chrono::Utc>) = sqlx::query_as(APPEND_ONE)
            .bind(g)
            .bind(accounts as i64)
            .fetch_one(&mut conn)
            .await
            .context("appending")?;
        positions.push(position);
        appended_at.push(at);
        g += 1;
    }
    let elapsed = started.elapsed();
    let last = *positions.last().context("no event was appended")?;
    wait_until(
        "the host to apply every appended event",
        Duration::from_secs(120),
        caught_up(last),
    )
    .await?;

    let mut latencies: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM b.committed_at - a.at) * 1000)::float8
           FROM unnest($1::int8[], $2::timestamptz[]) AS a(position, at)
           JOIN LATERAL (SELECT committed_at FROM projection_host.batches
                          WHERE projection = 'bank_balances' AND from_position < a.position AND to_position >= a.position
                          ORDER BY committed_at LIMIT 1) b ON true",
    )
    .bind(&positions)
    .bind(&appended_at)
    .fetch_all(&pool)
    .await?;
    anyhow::ensure!(
        latencies.len() == positions.len(),
        "some appended events were not found in a committed batch"
    );
    latencies.sort_by(|a, b| a.total_cmp(b));
    let check = super::check_w1(url, "bank_balances").await?;
    Ok(format!(
        "live rate={} seconds={} events={} achieved_rate={:.0} notify={} p50_ms={:.1} p99_ms={:.1} max_ms={:.1} mismatches={}",
        args.rate,
        args.seconds,
        positions.len(),
        positions.len() as f64 / elapsed.as_secs_f64(),
        if args.no_trigger { "none" } else { "trigger" },
        percentile(&latencies, 50.0),
        percentile(&latencies, 99.0),
        latencies.last().copied().unwrap_or(f64::NAN),
        check.mismatches
    ))
}
