//! `partitions`: one row per partition of a replica set: whom the leader assigned it to, who
//! holds it now, and the epoch that fences every commit of a previous owner.

use sqlx::{PgConnection, PgPool};

use crate::ids::WorkerId;

/// One partition's row.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Row {
    pub partition: i32,
    pub owner: Option<String>,
    pub assigned_to: Option<String>,
    pub epoch: i64,
}

/// The rows of a new replica set's partitions `0..count` (existing rows are kept).
pub async fn create(conn: &mut PgConnection, replica_set: &str, count: u32) -> sqlx::Result<()> {
    sqlx::query(
        "INSERT INTO projection_host.partitions (replica_set, partition)
         SELECT $1, g FROM generate_series(0, $2 - 1) AS g
         ON CONFLICT DO NOTHING",
    )
    .bind(replica_set)
    .bind(count as i32)
    .execute(conn)
    .await?;
    Ok(())
}

/// Every partition of the set, in partition order.
pub async fn list(pool: &PgPool, replica_set: &str) -> sqlx::Result<Vec<Row>> {
    sqlx::query_as(
        "SELECT partition, owner, assigned_to, epoch FROM projection_host.partitions
          WHERE replica_set = $1 ORDER BY partition",
    )
    .bind(replica_set)
    .fetch_all(pool)
    .await
}

/// Records a new assignment made in `generation`: `owners[i]` for `partitions[i]` (rows whose
/// assignment does not change keep their `assigned_generation`).
pub async fn assign(
    conn: &mut PgConnection,
    replica_set: &str,
    generation: i64,
    partitions: &[i32],
    owners: &[Option<String>],
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE projection_host.partitions p SET assigned_to = n.worker, assigned_generation = $2
           FROM unnest($3::int[], $4::text[]) AS n(partition, worker)
          WHERE p.replica_set = $1 AND p.partition = n.partition
            AND p.assigned_to IS DISTINCT FROM n.worker",
    )
    .bind(replica_set)
    .bind(generation)
    .bind(partitions)
    .bind(owners)
    .execute(conn)
    .await?;
    Ok(())
}

/// Takes ownership of those of `partitions` assigned to `worker` that are free (or whose owner
/// is gone), with the epoch incremented, while the set's generation is running and has the
/// `count` partitions the worker routes events by. Returns what was claimed, at which epoch.
///
/// A resize locks every row and clears `assigned_to`, so a claim that raced it finds nothing
/// to claim; a claim after it by a host that has not yet seen it fails the count.
pub async fn claim(
    conn: &mut PgConnection,
    replica_set: &str,
    worker: &WorkerId,
    partitions: &[i32],
    count: u32,
) -> sqlx::Result<Vec<(i32, i64)>> {
    sqlx::query_as(
        "UPDATE projection_host.partitions p
            SET owner = $2, epoch = p.epoch + 1, claimed_at = now()
          WHERE p.replica_set = $1 AND p.partition = ANY($3) AND p.assigned_to = $2
            AND (p.owner IS NULL OR p.owner = $2
                 OR NOT EXISTS (SELECT 1 FROM projection_host.workers w
                                 WHERE w.replica_set = $1 AND w.worker_id = p.owner))
            AND EXISTS (SELECT 1 FROM projection_host.replica_sets
                         WHERE name = $1 AND phase = 'running' AND partitions = $4)
         RETURNING p.partition, p.epoch",
    )
    .bind(replica_set)
    .bind(worker.as_str())
    .bind(partitions)
    .bind(count as i32)
    .fetch_all(conn)
    .await
}

/// Locks every partition row of the set (a resize: an in-flight batch commit holds its rows
/// FOR SHARE, so this waits for it, and fences every later one).
pub async fn lock_all(conn: &mut PgConnection, replica_set: &str) -> sqlx::Result<()> {
    sqlx::query(
        "SELECT partition FROM projection_host.partitions WHERE replica_set = $1
          ORDER BY partition FOR UPDATE",
    )
    .bind(replica_set)
    .execute(conn)
    .await?;
    Ok(())
}

/// The rows of a set resized to `count` partitions: rows past it go, missing ones come, and
/// every row is unowned and unassigned (the leader plans the next generation) with an epoch
/// above every epoch the set ever used, so that no commit of an earlier claim passes the fence
/// of any partition, even one removed and added again by later resizes.
pub async fn reshape(conn: &mut PgConnection, replica_set: &str, count: u32) -> sqlx::Result<()> {
    let highest: i64 = sqlx::query_scalar(
        "SELECT coalesce(max(epoch), 0) FROM projection_host.partitions WHERE replica_set = $1",
    )
    .bind(replica_set)
    .fetch_one(&mut *conn)
    .await?;
    sqlx::query(
        "DELETE FROM projection_host.partitions WHERE replica_set = $1 AND partition >= $2",
    )
    .bind(replica_set)
    .bind(count as i32)
    .execute(&mut *conn)
    .await?;
    create(conn, replica_set, count).await?;
    sqlx::query(
        "UPDATE projection_host.partitions
            SET owner = NULL, assigned_to = NULL, epoch = $2 + 1, released_at = now()
          WHERE replica_set = $1",
    )
    .bind(replica_set)
    .bind(highest)
    .execute(conn)
    .await?;
    Ok(())
}

/// Gives one partition up, if `worker` still owns it (at `epoch`, when given).
pub async fn release(
    pool: &PgPool,
    replica_set: &str,
    partition: i32,
    worker: &WorkerId,
    epoch: Option<i64>,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE projection_host.partitions SET owner = NULL, released_at = now()
          WHERE replica_set = $1 AND partition = $2 AND owner = $3 AND ($4::int8 IS NULL OR epoch = $4)",
    )
    .bind(replica_set)
    .bind(partition)
    .bind(worker.as_str())
    .bind(epoch)
    .execute(pool)
    .await?;
    Ok(())
}

/// Gives up every partition `worker` owns; returns how many.
pub async fn release_all(
    conn: &mut PgConnection,
    replica_set: &str,
    worker: &WorkerId,
) -> sqlx::Result<u64> {
    Ok(sqlx::query(
        "UPDATE projection_host.partitions SET owner = NULL, released_at = now()
          WHERE replica_set = $1 AND owner = $2",
    )
    .bind(replica_set)
    .bind(worker.as_str())
    .execute(conn)
    .await?
    .rows_affected())
}

/// When the partition was last released (the benchmarks measure handover pauses from it).
#[cfg(feature = "bench")]
pub async fn released_at(
    pool: &PgPool,
    replica_set: &str,
    partition: i32,
) -> sqlx::Result<Option<chrono::DateTime<chrono::Utc>>> {
    sqlx::query_scalar(
        "SELECT released_at FROM projection_host.partitions WHERE replica_set = $1 AND partition = $2",
    )
    .bind(replica_set)
    .bind(partition)
    .fetch_one(pool)
    .await
}

/// Over every replica set: how many distinct workers own partitions, and how many partitions
/// are owned (the benchmarks wait for a fleet to settle on them).
#[cfg(feature = "bench")]
pub async fn ownership_spread(pool: &PgPool) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT count(DISTINCT owner), count(owner) FROM projection_host.partitions WHERE owner IS NOT NULL",
    )
    .fetch_one(pool)
    .await
}

/// How many of the set's partitions are owned, and how many of its checkpoints are past
/// `position` (the resize benchmark waits on both).
#[cfg(feature = "bench")]
pub async fn owned_and_past(
    pool: &PgPool,
    replica_set: &str,
    position: i64,
) -> sqlx::Result<(i64, i64)> {
    sqlx::query_as(
        "SELECT (SELECT count(owner) FROM projection_host.partitions WHERE replica_set = $1),
                (SELECT count(*) FROM projection_host.checkpoints WHERE replica_set = $1 AND position > $2)",
    )
    .bind(replica_set)
    .bind(position)
    .fetch_one(pool)
    .await
}
