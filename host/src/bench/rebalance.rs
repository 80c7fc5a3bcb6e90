//! `bench rebalance`: the pauses partitions see when a host joins, leaves gracefully, or is
//! killed, while a writer appends. Measured from the batch audit (commit times per partition).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::args::BenchRebalanceArgs;
use super::{ensure_plugin, percentile, server, wait_until, HostChild, ScratchDatabase};

type Owners = BTreeMap<i32, (Option<String>, i64)>;

pub async fn rebalance(args: BenchRebalanceArgs) -> anyhow::Result<()> {
    let plugin = ensure_plugin(&args.plugin)?;
    let (server_url, dev) = server(args.database_url.clone())?;
    let db = ScratchDatabase::create(&server_url, "projection_bench_rebalance").await?;
    let result = run(&db.url, &plugin, &args).await;
    db.drop_now().await?;
    drop(dev);
    for line in result? {
        println!("{line}");
    }
    Ok(())
}

async fn run(url: &str, plugin: &Path, args: &BenchRebalanceArgs) -> anyhow::Result<Vec<String>> {
    let accounts = 500u64;
    super::seed_w1(url, 10_000, accounts).await?;
    let pool = super::connect_pool(url).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(super::swap::write(
        pool.clone(),
        stop.clone(),
        10_000,
        accounts,
    ));
    let stale = format!("{}ms", args.stale_timeout_ms);
    let heartbeat = format!("{}ms", args.heartbeat_ms);
    let host = |id: &str| {
        HostChild::start(
            url,
            plugin,
            &[
                "--replica-set",
                "rebalance",
                "--worker-id",
                id,
                "--heartbeat-interval",
                &heartbeat,
                "--stale-worker-timeout",
                &stale,
            ],
        )
    };
    let mut lines = Vec::new();

    let _a = host("a")?;
    balanced(&pool, &["a"]).await?;
    settle().await;

    // Join.
    let before = owners(&pool).await?;
    let t0 = db_now(&pool).await?;
    let mut b = host("b")?;
    balanced(&pool, &["a", "b"]).await?;
    settle().await;
    lines.push(format!(
        "rebalance join  {}",
        measure(
            &pool,
            &before,
            &owners(&pool).await?,
            t0,
            Measure::FromRelease
        )
        .await?
    ));

    // Graceful leave.
    let before = owners(&pool).await?;
    let t0 = db_now(&pool).await?;
    b.signal(libc::SIGTERM);
    b.wait();
    balanced(&pool, &["a"]).await?;
    settle().await;
    lines.push(format!(
        "rebalance leave {}",
        measure(
            &pool,
            &before,
            &owners(&pool).await?,
            t0,
            Measure::FromRelease
        )
        .await?
    ));

    // kill -9.
    let mut c = host("c")?;
    balanced(&pool, &["a", "c"]).await?;
    settle().await;
    let before = owners(&pool).await?;
    let t0 = db_now(&pool).await?;
    c.signal(libc::SIGKILL);
    c.wait();
    balanced(&pool, &["a"]).await?;
    settle().await;
    lines.push(format!(
        "rebalance kill  stale_timeout_ms={} {}",
        args.stale_timeout_ms,
        measure(
            &pool,
            &before,
            &owners(&pool).await?,
            t0,
            Measure::FromEvent
        )
        .await?
    ));

    stop.store(true, Ordering::SeqCst);
    writer.await??;
    let check = super::check_w1(url, "bank_balances").await;
    if let Ok(check) = check {
        lines.push(format!(
            "rebalance exactness mismatches={} events_counted={} events_in_store={}",
            check.mismatches, check.events_counted, check.events_in_store
        ));
    }
    Ok(lines)
}

/// Lets a couple of seconds of steady commits pass.
async fn settle() {
    tokio::time::sleep(Duration::from_secs(2)).await;
}

async fn db_now(pool: &PgPool) -> anyhow::Result<DateTime<Utc>> {
    Ok(sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(pool)
        .await?)
}

async fn owners(pool: &PgPool) -> anyhow::Result<Owners> {
    let rows = crate::store::partitions::list(pool, "rebalance").await?;
    Ok(rows
        .into_iter()
        .map(|r| (r.partition, (r.owner, r.epoch)))
        .collect())
}

async fn balanced(pool: &PgPool, workers: &[&str]) -> anyhow::Result<()> {
    let want: Vec<String> = workers.iter().map(|w| w.to_string()).collect();
    wait_until(
        &format!("partitions balanced over {workers:?}"),
        Duration::from_secs(120),
        || async {
            let mut shares: BTreeMap<String, usize> = BTreeMap::new();
            // The host may not have created its tables yet.
            for (owner, _) in owners(pool).await.unwrap_or_default().into_values() {
                if let Some(o) = owner {
                    *shares.entry(o).or_default() += 1;
                }
            }
            let fair = 32 / want.len();
            Ok(shares.values().sum::<usize>() == 32
                && shares.keys().cloned().collect::<Vec<_>>() == want
                && shares.values().all(|n| *n == fair || *n == fair + 1))
        },
    )
    .await
}

#[derive(Clone, Copy)]
enum Measure {
    /// Pause of a moved partition: from its release to the new owner's first commit.
    FromRelease,
    /// Takeover of a dead owner's partition: from the kill to the new owner's first commit.
    FromEvent,
}

async fn measure(
    pool: &PgPool,
    before: &Owners,
    after: &Owners,
    t0: DateTime<Utc>,
    how: Measure,
) -> anyhow::Result<String> {
    let moved: Vec<i32> = after
        .iter()
        .filter(|(p, o)| before.get(p).map(|b| &b.0) != Some(&o.0))
        .map(|(p, _)| *p)
        .collect();
    let unmoved: Vec<i32> = after
        .iter()
        .filter(|(p, o)| before.get(p) == Some(*o))
        .map(|(p, _)| *p)
        .collect();
    // Longest gap between consecutive commits of the partitions that stayed, around the change.
    let unmoved_gap: Option<f64> = sqlx::query_scalar(
        "WITH c AS (
             SELECT p, committed_at, lag(committed_at) OVER (PARTITION BY p ORDER BY committed_at) AS prev
               FROM projection_host.batches, unnest(partitions) AS p
              WHERE p = ANY($1) AND committed_at BETWEEN $2 - interval '1 second' AND clock_timestamp())
         SELECT (extract(epoch FROM max(committed_at - prev)) * 1000)::float8 FROM c WHERE prev IS NOT NULL",
    )
    .bind(&unmoved)
    .bind(t0)
    .fetch_one(pool)
    .await?;
    // Typical gap before the change, for scale.
    let normal_gap: Option<f64> = sqlx::query_scalar(
        "WITH c AS (
             SELECT p, committed_at, lag(committed_at) OVER (PARTITION BY p ORDER BY committed_at) AS prev
               FROM projection_host.batches, unnest(partitions) AS p
              WHERE committed_at BETWEEN $1 - interval '2 seconds' AND $1)
         SELECT (percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM committed_at - prev)) * 1000)::float8
           FROM c WHERE prev IS NOT NULL",
    )
    .bind(t0)
    .fetch_one(pool)
    .await?;
    let mut pauses: Vec<f64> = Vec::new();
    for p in &moved {
        let new_owner = after[p].0.clone().unwrap_or_default();
        let start = match how {
            Measure::FromRelease => {
                crate::store::partitions::released_at(pool, "rebalance", *p).await?
            }
            Measure::FromEvent => Some(t0),
        };
        // A release may predate the claim round of this phase; never count from before t0.
        let start = start.map_or(t0, |s| s.max(t0));
        let first: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT min(committed_at) FROM projection_host.batches WHERE worker_id = $1 AND $2 = ANY(partitions) AND committed_at > $3",
        )
        .bind(&new_owner)
        .bind(p)
        .bind(start)
        .fetch_one(pool)
        .await?;
        if let Some(first) = first {
            pauses.push((first - start).num_microseconds().unwrap_or(0) as f64 / 1000.0);
        }
    }
    pauses.sort_by(|a, b| a.total_cmp(b));
    let label = match how {
        Measure::FromRelease => "moved_pause_ms",
        Measure::FromEvent => "takeover_ms",
    };
    Ok(format!(
        "moved={} unmoved={} unmoved_max_gap_ms={:.0} normal_gap_p50_ms={:.0} {label}_median={:.0} {label}_max={:.0}",
        moved.len(),
        unmoved.len(),
        unmoved_gap.unwrap_or(0.0),
        normal_gap.unwrap_or(f64::NAN),
        percentile(&pauses, 50.0),
        pauses.last().copied().unwrap_or(f64::NAN)
    ))
}
