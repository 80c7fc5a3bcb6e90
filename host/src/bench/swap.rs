//! `bench swap`: from `plugins push` (continue mode) to the new build committing on every
//! partition of a two-host fleet, and the pause each partition sees, while a writer appends.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::args::BenchSwapArgs;
use super::{ensure_plugin, percentile, server, wait_until, HostChild, ScratchDatabase};
use crate::lifecycle::{registry, Mode};
use crate::runtime::{Runtime, RuntimeConfig};

pub async fn swap(args: BenchSwapArgs) -> anyhow::Result<()> {
    let old = ensure_plugin(&args.plugin)?;
    let new = ensure_plugin(&args.new_plugin)?;
    let (server_url, dev) = server(args.database_url.clone())?;
    let db = ScratchDatabase::create(&server_url, "projection_bench_swap").await?;
    let result = run(&db.url, &old, &new).await;
    db.drop_now().await?;
    drop(dev);
    println!("{}", result?);
    Ok(())
}

async fn run(url: &str, old: &Path, new: &Path) -> anyhow::Result<String> {
    let accounts = 500u64;
    super::seed_w1(url, 10_000, accounts).await?;
    let pool = super::connect_pool(url).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(write(pool.clone(), stop.clone(), 10_000, accounts));
    let host = |id: &str| {
        HostChild::start(
            url,
            old,
            &[
                "--replica-set",
                "swap",
                "--worker-id",
                id,
                "--heartbeat-interval",
                "1s",
            ],
        )
    };
    let _a = host("a")?;
    let _b = host("b")?;
    wait_until(
        "both hosts to share the partitions",
        Duration::from_secs(120),
        || async {
            let (owners, held) = crate::store::partitions::ownership_spread(&pool)
                .await
                .unwrap_or((0, 0));
            Ok(owners == 2 && held == 32)
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    let runtime = Runtime::new(RuntimeConfig {
        memory_limit: 256 << 20,
        call_timeout: Duration::from_secs(10),
        cache_dir: None,
    })?;
    let bytes = std::fs::read(new).with_context(|| format!("reading {}", new.display()))?;
    let (plugin, _) = runtime.load_bytes(new, &bytes).await?;
    let t0: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&pool)
        .await?;
    registry::push(&pool, "swap", &plugin, &bytes, Mode::Continue, true).await?;
    let sha = plugin.sha256.clone();
    wait_until("the new build on every partition", Duration::from_secs(60), || async {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(DISTINCT p) FROM projection_host.batches, unnest(partitions) p WHERE plugin_sha256 = $1",
        )
        .bind(&sha)
        .fetch_one(&pool)
        .await?;
        Ok(n == 32)
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::SeqCst);
    writer.await??;

    let rows: Vec<(f64, f64)> = sqlx::query_as(
        "WITH c AS (SELECT p, plugin_sha256 AS sha, committed_at FROM projection_host.batches, unnest(partitions) p)
         SELECT (extract(epoch FROM (SELECT min(committed_at) FROM c WHERE c.p = x.p AND sha = $1) - $2) * 1000)::float8,
                (extract(epoch FROM (SELECT min(committed_at) FROM c WHERE c.p = x.p AND sha = $1)
                                  - (SELECT max(committed_at) FROM c WHERE c.p = x.p AND sha <> $1)) * 1000)::float8
           FROM generate_series(0, 31) AS x(p)",
    )
    .bind(&sha)
    .bind(t0)
    .fetch_all(&pool)
    .await?;
    let mut reached: Vec<f64> = rows.iter().map(|r| r.0).collect();
    let mut pauses: Vec<f64> = rows.iter().map(|r| r.1).collect();
    reached.sort_by(|a, b| a.total_cmp(b));
    pauses.sort_by(|a, b| a.total_cmp(b));
    let normal: Option<f64> = sqlx::query_scalar(
        "WITH c AS (SELECT p, committed_at, lag(committed_at) OVER (PARTITION BY p ORDER BY committed_at) AS prev
                      FROM projection_host.batches, unnest(partitions) p WHERE committed_at < $1)
         SELECT (percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM committed_at - prev)) * 1000)::float8 FROM c WHERE prev IS NOT NULL",
    )
    .bind(t0)
    .fetch_one(&pool)
    .await?;
    let check = super::check_w1(url, "bank_balances").await?;
    Ok(format!(
        "swap continue hosts=2 push_to_every_partition_ms={:.0} pause_ms_median={:.0} pause_ms_max={:.0} normal_batch_gap_p50_ms={:.0} mismatches={}",
        reached.last().copied().unwrap_or(f64::NAN),
        percentile(&pauses, 50.0),
        pauses.last().copied().unwrap_or(f64::NAN),
        normal.unwrap_or(f64::NAN),
        check.mismatches
    ))
}

/// Keeps appending 20 W1 events every 10 ms.
pub(super) async fn write(
    pool: PgPool,
    stop: Arc<AtomicBool>,
    mut g: u64,
    accounts: u64,
) -> anyhow::Result<()> {
    let sql = include_str!("../../../bench/w1/w1-append.sql");
    while !stop.load(Ordering::SeqCst) {
        let statement = sql
            .replace(":from", &g.to_string())
            .replace(":to", &(g + 19).to_string())
            .replace(":k", &accounts.to_string());
        sqlx::raw_sql(&statement).execute(&pool).await?;
        g += 20;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
