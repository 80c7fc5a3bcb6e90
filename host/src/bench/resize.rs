//! `bench resize`: `partitions resize` under a live writer on a 2-host fleet: how long the
//! resize takes, how long each new partition waits for its first commit, and exactness.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::args::BenchResizeArgs;
use super::{ensure_plugin, percentile, server, wait_until, HostChild, ScratchDatabase};

const SET: &str = "resize";
const ACCOUNTS: u64 = 500;
const SEEDED: u64 = 20_000;

pub async fn resize(args: BenchResizeArgs) -> anyhow::Result<()> {
    let plugin = ensure_plugin(&args.plugin)?;
    let (server_url, dev) = server(args.database_url.clone())?;
    let mut maxima = Vec::new();
    for run_number in 1..=args.runs {
        let db = ScratchDatabase::create(&server_url, "projection_bench_resize").await?;
        let result = run(&db.url, &plugin, &args).await;
        db.drop_now().await?;
        let (line, max_pause) = result?;
        println!("resize run {run_number}: {line}");
        maxima.push(max_pause);
    }
    drop(dev);
    maxima.sort_by(|a, b| a.total_cmp(b));
    println!(
        "resize {} -> {} at {} events/s: median over {} run(s) of the longest pause per partition: {:.0} ms",
        args.from,
        args.to,
        args.rate,
        args.runs,
        percentile(&maxima, 50.0)
    );
    Ok(())
}

/// One run: returns its report line and the longest pause (ms).
async fn run(url: &str, plugin: &Path, args: &BenchResizeArgs) -> anyhow::Result<(String, f64)> {
    super::seed_w1(url, SEEDED, ACCOUNTS).await?;
    let pool = super::connect_pool(url).await?;
    let from = args.from.to_string();
    let heartbeat = format!("{}ms", args.heartbeat_ms);
    let host = |id: &str| {
        HostChild::start(
            url,
            plugin,
            &[
                "--replica-set",
                SET,
                "--worker-id",
                id,
                "--partitions",
                &from,
                "--heartbeat-interval",
                &heartbeat,
            ],
        )
    };
    let _a = host("a")?;
    let _b = host("b")?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(paced_write(pool.clone(), stop.clone(), SEEDED, args.rate));
    owned_and_past(&pool, args.from, SEEDED as i64).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let started = Instant::now();
    let resized = crate::coordination::resize::resize(&pool, SET, args.to).await?;
    let resize_ms = started.elapsed().as_secs_f64() * 1000.0;
    let t1: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&pool)
        .await?;
    let head_at_resize: i64 = sqlx::query_scalar("SELECT max(global_position) FROM events")
        .fetch_one(&pool)
        .await?;
    owned_and_past(&pool, args.to, head_at_resize).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await??;
    let head: i64 = sqlx::query_scalar("SELECT max(global_position) FROM events")
        .fetch_one(&pool)
        .await?;
    owned_and_past(&pool, args.to, head - 1).await?;

    // Per new partition: from the resize's commit to its first commit under the new layout.
    let mut pauses: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM min(b.committed_at) - $1) * 1000)::float8
           FROM projection_host.batches b, unnest(b.partitions) AS p
          WHERE b.replica_set = $2 AND b.committed_at > $1
          GROUP BY p",
    )
    .bind(t1)
    .bind(SET)
    .fetch_all(&pool)
    .await?;
    pauses.sort_by(|a, b| a.total_cmp(b));
    let check = super::check_w1(url, "bank_balances").await?;
    let applied: i64 = sqlx::query_scalar(
        "SELECT coalesce(sum(events), 0)::int8 FROM projection_host.batches WHERE replica_set = $1",
    )
    .bind(SET)
    .fetch_one(&pool)
    .await?;
    let max_pause = pauses.last().copied().unwrap_or(f64::NAN);
    let carried = resized.read_models.iter().any(|m| m.carried);
    Ok((
        format!(
            "{} -> {} partitions, writer {} events/s: resize transaction {resize_ms:.0} ms; partitions resumed {} of {}; pause median {:.0} ms, max {max_pause:.0} ms; carried checkpoints {}; mismatches={} applied={applied} events_in_store={}",
            resized.from,
            resized.to,
            args.rate,
            pauses.len(),
            args.to,
            percentile(&pauses, 50.0),
            if carried { "yes" } else { "no" },
            check.mismatches,
            check.events_in_store
        ),
        max_pause,
    ))
}

/// Waits until the set has `count` partitions, all owned, each with a checkpoint past
/// `position`.
async fn owned_and_past(pool: &PgPool, count: u32, position: i64) -> anyhow::Result<()> {
    wait_until(
        &format!("{count} partitions owned and past position {position}"),
        Duration::from_secs(180),
        || async {
            // The hosts may not have created their tables yet.
            let (owned, past) = crate::store::partitions::owned_and_past(pool, SET, position)
                .await
                .unwrap_or((0, 0));
            Ok(owned == count as i64 && past == count as i64)
        },
    )
    .await
}

/// Appends W1 events at `rate` per second (a tick every 10 ms).
async fn paced_write(
    pool: PgPool,
    stop: Arc<AtomicBool>,
    mut g: u64,
    rate: u64,
) -> anyhow::Result<()> {
    let sql = include_str!("../../../bench/w1/w1-append.sql");
    let per_tick = (rate / 100).max(1);
    let mut ticks = tokio::time::interval(Duration::from_millis(10));
    while !stop.load(Ordering::SeqCst) {
        ticks.tick().await;
        let statement = sql
            .replace(":from", &g.to_string())
            .replace(":to", &(g + per_tick - 1).to_string())
            .replace(":k", &ACCOUNTS.to_string());
        sqlx::raw_sql(&statement).execute(&pool).await?;
        g += per_tick;
    }
    Ok(())
}
