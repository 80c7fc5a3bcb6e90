//! `projection_host.checkpoints`: per (replica set, read model, partition), the position up to
//! which every event of the partition is applied. Written only inside a batch's transaction by
//! `projection_host_api.record_batch` (see `sink::commit`), behind the fences; a partition
//! without a row has applied nothing (position 0). Every query that names the table is here.

use std::collections::{BTreeMap, HashMap};

use sqlx::{PgConnection, PgPool, Postgres, Transaction};

/// The stored checkpoints of a read model's partitions (a partition without a row is absent).
pub async fn load(
    pool: &PgPool,
    replica_set: &str,
    projection: &str,
    partitions: &[i32],
) -> Result<HashMap<i32, i64>, sqlx::Error> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, position FROM projection_host.checkpoints
          WHERE replica_set = $1 AND projection = $2 AND partition = ANY($3)",
    )
    .bind(replica_set)
    .bind(projection)
    .bind(partitions)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// One stored checkpoint, with the generation of the build that last wrote it.
#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct Stored {
    pub projection: String,
    pub partition: i32,
    pub position: i64,
    pub build_generation: i64,
}

/// Every checkpoint of the set, locked for the rest of the transaction (a resize, after it
/// locked the partition rows, so no batch commit is in flight).
pub async fn all_for_update(
    conn: &mut PgConnection,
    replica_set: &str,
) -> Result<Vec<Stored>, sqlx::Error> {
    sqlx::query_as(
        "SELECT projection, partition, position, build_generation FROM projection_host.checkpoints
          WHERE replica_set = $1 ORDER BY projection, partition FOR UPDATE",
    )
    .bind(replica_set)
    .fetch_all(conn)
    .await
}

/// Whether the set has a checkpoint of `projection` past position 0.
pub async fn has_progress(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM projection_host.checkpoints
                         WHERE replica_set = $1 AND projection = $2 AND position > 0)",
    )
    .bind(replica_set)
    .bind(projection)
    .fetch_one(conn)
    .await
}

/// Replaces every checkpoint of `projection` in the set with `rows` (a resize, an import).
pub async fn replace(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
    rows: &[Stored],
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "DELETE FROM projection_host.checkpoints WHERE replica_set = $1 AND projection = $2",
    )
    .bind(replica_set)
    .bind(projection)
    .execute(&mut *conn)
    .await?;
    let partitions: Vec<i32> = rows.iter().map(|r| r.partition).collect();
    let positions: Vec<i64> = rows.iter().map(|r| r.position).collect();
    let generations: Vec<i64> = rows.iter().map(|r| r.build_generation).collect();
    sqlx::query(
        "INSERT INTO projection_host.checkpoints (replica_set, projection, partition, position, build_generation)
         SELECT $1, $2, n.partition, n.position, n.build_generation
           FROM unnest($3::int[], $4::int8[], $5::int8[]) AS n(partition, position, build_generation)",
    )
    .bind(replica_set)
    .bind(projection)
    .bind(&partitions)
    .bind(&positions)
    .bind(&generations)
    .execute(conn)
    .await?;
    Ok(())
}

/// Every checkpoint of the replica set, by partition and then read model (its track).
pub async fn by_partition(
    pool: &PgPool,
    replica_set: &str,
) -> Result<BTreeMap<i32, BTreeMap<String, i64>>, sqlx::Error> {
    let rows: Vec<(String, i32, i64)> = sqlx::query_as(
        "SELECT projection, partition, position FROM projection_host.checkpoints WHERE replica_set = $1",
    )
    .bind(replica_set)
    .fetch_all(pool)
    .await?;
    let mut by_partition: BTreeMap<i32, BTreeMap<String, i64>> = BTreeMap::new();
    for (projection, partition, position) in rows {
        by_partition
            .entry(partition)
            .or_default()
            .insert(projection, position);
    }
    Ok(by_partition)
}

/// The lowest checkpoint in the database, of any replica set and read model.
pub async fn lowest_of_all(conn: &mut PgConnection) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT min(position) FROM projection_host.checkpoints")
        .fetch_one(conn)
        .await
}

/// The lowest checkpoint of a read model over the set's partitions (a partition without one
/// counts as 0).
pub async fn lowest_of_track(
    tx: &mut Transaction<'static, Postgres>,
    replica_set: &str,
    track: &str,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT CASE WHEN count(c.position) < max(r.partitions) THEN 0 ELSE coalesce(min(c.position), 0) END
           FROM projection_host.replica_sets r
           LEFT JOIN projection_host.checkpoints c ON c.replica_set = r.name AND c.projection = $2
          WHERE r.name = $1",
    )
    .bind(replica_set)
    .bind(track)
    .fetch_optional(&mut **tx)
    .await
    .map(|v: Option<Option<i64>>| v.flatten().unwrap_or(0))
}

/// Whether a projection committed batches into `schema` in this replica set (any of its
/// builds whose read model lives there).
pub async fn committed_into_schema(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
    schema: &str,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM projection_host.checkpoints c
                          JOIN projection_host.plugins p ON p.replica_set = c.replica_set AND p.track = c.projection
                         WHERE c.replica_set = $1 AND p.projection = $2 AND p.namespace = $3)",
    )
    .bind(replica_set)
    .bind(projection)
    .bind(schema)
    .fetch_one(conn)
    .await
}

/// Partitions of `tracks` (over `partitions` of the set) that are below `target` and not
/// halted.
pub async fn partitions_below(
    pool: &PgPool,
    replica_set: &str,
    target: i64,
    tracks: &[String],
    partitions: u32,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM unnest($3::text[]) AS t(track)
           CROSS JOIN generate_series(0, $4 - 1) AS g(partition)
          WHERE NOT EXISTS (SELECT 1 FROM projection_host.halts h
                             WHERE h.replica_set = $1 AND h.projection = t.track AND h.partition = g.partition)
            AND coalesce((SELECT c.position FROM projection_host.checkpoints c
                           WHERE c.replica_set = $1 AND c.projection = t.track AND c.partition = g.partition), 0) < $2",
    )
    .bind(replica_set)
    .bind(target)
    .bind(tracks)
    .bind(partitions as i32)
    .fetch_one(pool)
    .await
}

/// Rebuilds (projection, sha256) whose every partition is at most `max_lag` behind `head`.
pub async fn rebuilds_caught_up(
    pool: &PgPool,
    replica_set: &str,
    partitions: u32,
    max_lag: i64,
    head: i64,
) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT p.projection, p.sha256 FROM projection_host.plugins p
          WHERE p.replica_set = $1 AND p.state = 'building'
            AND (SELECT count(*) FROM projection_host.checkpoints c
                  WHERE c.replica_set = $1 AND c.projection = p.track AND c.position >= $2 - $3) = $4",
    )
    .bind(replica_set)
    .bind(head)
    .bind(max_lag)
    .bind(partitions as i64)
    .fetch_all(pool)
    .await
}

/// A read model's progress, for `projection-host status`.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct Progress {
    pub projection: String,
    pub lowest_checkpoint: i64,
    pub highest_checkpoint: i64,
    pub lag_positions: i64,
    pub last_commit: Option<chrono::DateTime<chrono::Utc>>,
}

/// Every read model's progress in the replica set, against `head`.
pub async fn progress(
    pool: &PgPool,
    replica_set: &str,
    head: i64,
    partitions: i64,
) -> Result<Vec<Progress>, sqlx::Error> {
    sqlx::query_as(
        // A partition without a checkpoint row has applied nothing yet: it counts as 0.
        "SELECT projection, lowest AS lowest_checkpoint, highest_checkpoint, $2 - lowest AS lag_positions, last_commit
           FROM (SELECT projection,
                        CASE WHEN count(*) < $3 THEN 0 ELSE min(position) END AS lowest,
                        max(position) AS highest_checkpoint, max(updated_at) AS last_commit
                   FROM projection_host.checkpoints WHERE replica_set = $1 GROUP BY projection) AS c
          ORDER BY projection",
    )
    .bind(replica_set)
    .bind(head)
    .bind(partitions)
    .fetch_all(pool)
    .await
}

/// What an operator runs to correct a read model's checkpoints by hand.
pub fn correction_hint(replica_set: &str, projection: &str) -> String {
    format!(
        "UPDATE projection_host.checkpoints SET position = ... WHERE replica_set = '{replica_set}' AND projection = '{projection}'"
    )
}

/// The number of checkpoint rows of a read model (in any replica set, but `except`'s
/// partition) and the lowest of them: for benchmarks waiting for a catch-up.
#[cfg(feature = "bench")]
pub async fn count_and_lowest(
    pool: &PgPool,
    projection: &str,
    except: Option<i32>,
) -> Result<(i64, Option<i64>), sqlx::Error> {
    sqlx::query_as(
        "SELECT count(*), min(position) FROM projection_host.checkpoints
          WHERE projection = $1 AND partition IS DISTINCT FROM $2",
    )
    .bind(projection)
    .bind(except)
    .fetch_one(pool)
    .await
}

/// A read model's checkpoints by partition (in any replica set): for benchmarks checking
/// exactness.
#[cfg(feature = "bench")]
pub async fn of_projection(
    pool: &PgPool,
    projection: &str,
) -> Result<HashMap<i32, i64>, sqlx::Error> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, position FROM projection_host.checkpoints WHERE projection = $1",
    )
    .bind(projection)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}
