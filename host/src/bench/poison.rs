//! `bench poison`: one panicking event in a batch of 10,000 events over 32 partitions. Reports
//! how long the other partitions pause (from the append to the commit that covers each of them)
//! and how long until the failing event is halted or parked, and checks that every other event
//! was applied exactly once.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sqlx::PgPool;

use super::args::BenchPoisonArgs;
use super::{ensure_plugin, percentile, server, wait_until, HostChild, ScratchDatabase};
use crate::ids::PartitionId;
use crate::pipeline::policy::OnFailure;
use crate::store::checkpoints;

const PROJECTION: &str = "faulty";

/// `count` events of the faulty guest's context over `aggregates` aggregates, starting at
/// sequence `first`; the one at `trap` (a sequence number) panics the plugin.
const APPEND: &str =
    "INSERT INTO events (bounded_context, aggregate_type, aggregate_id, aggregate_version,
                    event_id, event_type, event_version, payload, metadata, created_at)
SELECT 'Faults', 'Item', 'item-' || (g % $3::int8), (g / $3::int8) + 1,
       md5('poison-event-' || g)::uuid,
       CASE WHEN g = $4::int8 THEN 'Trap' ELSE 'Fine' END, 1,
       convert_to('{}', 'UTF8'), '{}'::jsonb, now()
FROM generate_series($1::int8, $1::int8 + $2::int8 - 1) AS g
ORDER BY g";

/// One run's figures.
struct Run {
    longest_pause_ms: f64,
    median_pause_ms: f64,
    contained_ms: f64,
    mismatches: usize,
}

pub async fn poison(args: BenchPoisonArgs) -> anyhow::Result<()> {
    let plugin = ensure_plugin(&args.plugin)?;
    let (server_url, dev) = server(args.database_url.clone())?;
    let mut runs = Vec::new();
    for run in 1..=args.runs.max(1) {
        let db = ScratchDatabase::create(&server_url, "projection_bench_poison").await?;
        let result = measure(&db.url, &plugin, &args).await;
        db.drop_now().await?;
        let figures = result?;
        eprintln!(
            "run {run}: other partitions' longest pause {:.0} ms (median {:.0} ms), failing event {} after {:.0} ms, mismatches {}",
            figures.longest_pause_ms,
            figures.median_pause_ms,
            contained_word(OnFailure::from(args.on_failure)),
            figures.contained_ms,
            figures.mismatches
        );
        runs.push(figures);
    }
    drop(dev);
    let median = |f: fn(&Run) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        percentile(&v, 50.0)
    };
    println!(
        "poison events={} partitions=32 on_failure={} runs={} longest_pause_ms={:.0} median_pause_ms={:.0} {}_ms={:.0} mismatches={}",
        args.events,
        contained_word(OnFailure::from(args.on_failure)).replace(' ', "_"),
        runs.len(),
        median(|r| r.longest_pause_ms),
        median(|r| r.median_pause_ms),
        contained_word(OnFailure::from(args.on_failure)).replace(' ', "_"),
        median(|r| r.contained_ms),
        runs.iter().map(|r| r.mismatches).sum::<usize>()
    );
    Ok(())
}

fn contained_word(policy: OnFailure) -> &'static str {
    match policy {
        OnFailure::Stop => "halted",
        OnFailure::DeadLetter => "dead_lettered",
    }
}

async fn measure(url: &str, plugin: &Path, args: &BenchPoisonArgs) -> anyhow::Result<Run> {
    let aggregates = 1_000i64;
    // The events table, empty; then a first stretch the host catches up with.
    super::seed_w1(url, 0, 1).await?;
    let pool = super::connect_pool(url).await?;
    crate::db::migrate(&pool).await?;
    let events = "events".parse().map_err(anyhow::Error::msg)?;
    crate::status::install_notify_trigger(&pool, &events).await?;
    append(&pool, 0, 1_000, aggregates, -1).await?;
    let batch = args.events.to_string();
    let policy = match OnFailure::from(args.on_failure) {
        OnFailure::Stop => "stop",
        OnFailure::DeadLetter => "dead-letter",
    };
    let _host = HostChild::start(
        url,
        plugin,
        &[
            "--replica-set",
            "poison",
            "--batch-size",
            &batch,
            "--max-batch-size",
            &batch,
            "--on-failure",
            policy,
        ],
    )?;
    let head = |pool: &PgPool| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT max(global_position) FROM events")
                .fetch_one(&pool)
                .await
        }
    };
    let first_head = head(&pool).await?;
    wait_until(
        "the host to catch up with the first events",
        Duration::from_secs(120),
        || caught_up(&pool, first_head, None),
    )
    .await?;

    // One transaction of `events` events; the middle one panics the plugin.
    let count = i64::try_from(args.events).context("--events is too large")?;
    let trap_sequence = 1_000 + count / 2;
    let appended_at: DateTime<Utc> = sqlx::query_scalar("SELECT clock_timestamp()")
        .fetch_one(&pool)
        .await?;
    append(&pool, 1_000, count, aggregates, trap_sequence).await?;
    let last = head(&pool).await?;
    let (trap_position, trap_aggregate): (i64, String) = sqlx::query_as(
        "SELECT global_position, aggregate_id FROM events WHERE event_type = 'Trap'",
    )
    .fetch_one(&pool)
    .await?;
    let trap_partition = PartitionId::of(&trap_aggregate, 32).as_i32();

    let on_failure = OnFailure::from(args.on_failure);
    let contained = || {
        let pool = pool.clone();
        async move {
            let at: Option<DateTime<Utc>> = match on_failure {
                OnFailure::Stop => {
                    crate::store::halts::halted_at(&pool, "faulty", trap_position).await?
                }
                OnFailure::DeadLetter => {
                    crate::store::dead_letters::parked_at(&pool, "faulty", trap_position).await?
                }
            };
            Ok::<_, anyhow::Error>(at)
        }
    };
    wait_until(
        "the failing event to be contained",
        Duration::from_secs(300),
        || async { Ok(contained().await?.is_some()) },
    )
    .await?;
    let contained_at = contained()
        .await?
        .context("the failing event was not contained")?;
    // Under dead-letter the failing partition goes on past the parked event too; the figures
    // are read once nothing moves any more.
    let still = match OnFailure::from(args.on_failure) {
        OnFailure::Stop => Some(trap_partition),
        OnFailure::DeadLetter => None,
    };
    wait_until(
        "the partitions to apply every event",
        Duration::from_secs(300),
        || caught_up(&pool, last, still),
    )
    .await?;

    // Each healthy partition's pause: from the append to the first commit covering it.
    let mut pauses: Vec<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM min(b.committed_at) - $1) * 1000)::float8
           FROM projection_host.batches b, unnest(b.partitions) AS p
          WHERE b.projection = 'faulty' AND b.to_position >= $2 AND p <> $3
          GROUP BY p",
    )
    .bind(appended_at)
    .bind(last)
    .bind(trap_partition)
    .fetch_all(&pool)
    .await?;
    anyhow::ensure!(
        pauses.len() == 31,
        "expected 31 healthy partitions, found {}",
        pauses.len()
    );
    pauses.sort_by(|a, b| a.total_cmp(b));
    Ok(Run {
        longest_pause_ms: pauses.last().copied().unwrap_or(f64::NAN),
        median_pause_ms: percentile(&pauses, 50.0),
        contained_ms: (contained_at - appended_at).num_microseconds().unwrap_or(0) as f64 / 1e3,
        mismatches: mismatches(&pool, trap_position).await?,
    })
}

async fn append(
    pool: &PgPool,
    first: i64,
    count: i64,
    aggregates: i64,
    trap: i64,
) -> anyhow::Result<()> {
    sqlx::query(APPEND)
        .bind(first)
        .bind(count)
        .bind(aggregates)
        .bind(trap)
        .execute(pool)
        .await
        .context("appending events")?;
    Ok(())
}

/// Every partition (but `except`) has a checkpoint at `target` or beyond.
async fn caught_up(pool: &PgPool, target: i64, except: Option<i32>) -> anyhow::Result<bool> {
    let (rows, low) = checkpoints::count_and_lowest(pool, PROJECTION, except).await?;
    let expected = if except.is_some() { 31 } else { 32 };
    Ok(rows == expected && low.unwrap_or(0) >= target)
}

/// Aggregates whose applied count differs from the events up to their partition's checkpoint
/// (the failing event and, under dead-letter, its aggregate's later events excluded).
async fn mismatches(pool: &PgPool, trap: i64) -> anyhow::Result<usize> {
    let checkpoints = checkpoints::of_projection(pool, PROJECTION).await?;
    let parked = crate::store::dead_letters::all_positions(pool).await?;
    let events: Vec<(String, i64)> =
        sqlx::query_as("SELECT aggregate_id, global_position FROM events")
            .fetch_all(pool)
            .await?;
    let mut expected: HashMap<String, i64> = HashMap::new();
    for (aggregate, position) in events {
        let partition = PartitionId::of(&aggregate, 32).as_i32();
        let applied = position <= checkpoints.get(&partition).copied().unwrap_or(0)
            && position != trap
            && !parked.contains(&position);
        *expected.entry(aggregate).or_default() += i64::from(applied);
    }
    let seen: HashMap<String, i64> = sqlx::query_as("SELECT aggregate_id, n FROM faulty.seen")
        .fetch_all(pool)
        .await?
        .into_iter()
        .collect();
    Ok(expected
        .iter()
        .filter(|(aggregate, n)| seen.get(*aggregate).copied().unwrap_or(0) != **n)
        .count())
}
