//! `import --rollback`: back to the Go deployment, exactly. The Go workers can only continue
//! from one checkpoint per Go partition, so the host's partitions must be the Go ones (same
//! count, no carried checkpoints left) and nothing may be parked (a parked event is past its
//! partition's checkpoint but not applied; the Go workers would never apply it).

use std::time::Duration;

use anyhow::bail;
use sqlx::PgPool;

use super::go_lineage::{self, GoDeployment};
use super::{all, tables, ImportArgs};
use crate::lifecycle::removal;
use crate::store;

pub async fn rollback(
    pool: &PgPool,
    args: &ImportArgs,
    go: &GoDeployment,
    projection: &str,
) -> anyhow::Result<()> {
    let set = &args.replica_set;
    let mut conn = pool.acquire().await?;
    let live = store::workers::live_hosts(&mut conn, set).await?;
    if !live.is_empty() {
        bail!(
            "hosts of replica set {set} are still running ({}); scale them to 0, then roll back (nothing was changed)",
            live.join(", ")
        );
    }
    let Some(stored) = store::replica_sets::overview(pool, set).await? else {
        bail!("replica set {set} does not exist; there is nothing to roll back");
    };
    let progress = go_lineage::progress(&mut conn, go, false).await?;
    drop(conn);
    let go_count = progress.positions.len() as u32;
    let count = stored.partitions as u32;
    if count != go_count {
        bail!(
            "replica set {set} has {count} partitions and the Go deployment {go_count}: the Go workers can continue exactly only from one checkpoint per Go partition. \
             Run `projection-host partitions resize --replica-set {set} --to {go_count}`, let the hosts run until `projection-host status` shows no carried checkpoints, stop them, and roll back then (nothing was changed)"
        );
    }
    if !store::carried::load(pool, set, projection)
        .await?
        .0
        .is_empty()
    {
        bail!(
            "projection {projection} still has carried checkpoints (some partitions are below what an earlier partitioning applied): start the hosts until `projection-host status` shows none, stop them, and roll back then (nothing was changed)"
        );
    }
    let parked = store::dead_letters::counts(pool, set)
        .await?
        .into_iter()
        .filter(|c| c.projection == projection)
        .map(|c| c.events)
        .sum::<i64>();
    if parked > 0 {
        bail!(
            "projection {projection} has {parked} parked event(s), which the Go workers would never apply: retry or skip them (`projection-host dead-letters`) first (nothing was changed)"
        );
    }
    let found = store::checkpoints::load(pool, set, projection, &all(count)).await?;
    let positions: Vec<i64> = (0..count as i32)
        .map(|p| found.get(&p).copied().unwrap_or(0))
        .collect();
    println!(
        "rollback plan{}",
        if args.dry_run {
            " (dry run: nothing is changed)"
        } else {
            ""
        }
    );
    println!(
        "  Go checkpoints of '{}' ({:?}) become the host's: {:?} (were {:?})",
        go.name, go.system, positions, progress.positions
    );
    println!(
        "  adopted tables go back where they were; projection {projection} is removed from replica set {set}"
    );
    if args.dry_run {
        return Ok(());
    }
    let mut tx = pool.begin().await?;
    go_lineage::write_back(&mut tx, go, &positions).await?;
    let restored = tables::restore(&mut tx, set, projection).await?;
    tx.commit().await?;
    for r in &restored {
        println!("  {} is back as {}", r.table, r.from);
    }
    let removed =
        removal::remove_projection(pool, set, projection, Duration::from_secs(30), &|line| {
            eprintln!("{projection}: {line}")
        })
        .await?;
    println!(
        "rolled back: the Go workers continue from the host's checkpoints; removed from replica set {set}: schemas {}, {} checkpoint(s)",
        if removed.schemas.is_empty() {
            "none".to_string()
        } else {
            removed.schemas.join(", ")
        },
        removed.checkpoints
    );
    Ok(())
}
