//! `projection_host.halts`: partitions halted at a failing event by the stop policy, until an
//! operator resumes the projection.

use std::collections::HashMap;

use sqlx::{PgConnection, PgPool};

use crate::ids::{Epoch, PartitionId, WorkerId};

/// Halted partitions of a projection, with the position they halted at.
pub async fn halts(
    pool: &PgPool,
    replica_set: &str,
    projection: &str,
) -> Result<HashMap<PartitionId, i64>, sqlx::Error> {
    let rows: Vec<(i32, i64)> =
        sqlx::query_as("SELECT partition, position FROM projection_host.halts WHERE replica_set = $1 AND projection = $2")
            .bind(replica_set)
            .bind(projection)
            .fetch_all(pool)
            .await?;
    Ok(rows
        .into_iter()
        .map(|(p, pos)| (PartitionId(p as u32), pos))
        .collect())
}

/// Records a halt, if `worker` still owns the partition at `epoch` (a worker that lost it, to a
/// peer or to a resize that renumbered the partitions, must not halt whatever partition now has
/// that number). Returns whether it did.
pub async fn halt(
    pool: &PgPool,
    owner: (&WorkerId, Epoch),
    replica_set: &str,
    projection: &str,
    partition: PartitionId,
    position: i64,
    error: &str,
) -> Result<bool, sqlx::Error> {
    let recorded = sqlx::query(
        "INSERT INTO projection_host.halts (replica_set, projection, partition, position, error)
         SELECT $1, $2, $3, $4, $5
          WHERE EXISTS (SELECT 1 FROM projection_host.partitions p
                         WHERE p.replica_set = $1 AND p.partition = $3 AND p.owner = $6 AND p.epoch = $7)
         ON CONFLICT (replica_set, projection, partition) DO UPDATE SET position = $4, error = $5, halted_at = now()",
    )
    .bind(replica_set)
    .bind(projection)
    .bind(partition.as_i32())
    .bind(position)
    .bind(error)
    .bind(owner.0.as_str())
    .bind(owner.1 .0)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(recorded > 0)
}

/// Lifts a projection's halts (an operator resumed it), inside the resume's transaction.
pub async fn clear(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM projection_host.halts WHERE replica_set = $1 AND projection = $2")
        .bind(replica_set)
        .bind(projection)
        .execute(conn)
        .await?;
    Ok(())
}

/// Lifts every halt of the set (a resize renumbers the partitions; a halted partition's
/// checkpoint stays before its failing event, so the new partition that holds the event reads
/// it again and halts there again).
pub async fn clear_all(conn: &mut PgConnection, replica_set: &str) -> Result<u64, sqlx::Error> {
    Ok(
        sqlx::query("DELETE FROM projection_host.halts WHERE replica_set = $1")
            .bind(replica_set)
            .execute(conn)
            .await?
            .rows_affected(),
    )
}

/// A halted partition, for `projection-host status` and the admin API.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Row {
    pub projection: String,
    pub partition: i32,
    pub position: i64,
    pub error: String,
    pub halted_at: chrono::DateTime<chrono::Utc>,
}

/// Every halt of the replica set.
pub async fn list(pool: &PgPool, replica_set: &str) -> Result<Vec<Row>, sqlx::Error> {
    sqlx::query_as(
        "SELECT projection, partition, position, error, halted_at FROM projection_host.halts
          WHERE replica_set = $1 ORDER BY projection, partition",
    )
    .bind(replica_set)
    .fetch_all(pool)
    .await
}

/// The halts of these read models (tracks): projection, partition, position, error.
pub async fn of_tracks(
    pool: &PgPool,
    replica_set: &str,
    tracks: &[String],
) -> Result<Vec<(String, i32, i64, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT projection, partition, position, error FROM projection_host.halts
          WHERE replica_set = $1 AND projection = ANY($2) ORDER BY projection, partition",
    )
    .bind(replica_set)
    .bind(tracks)
    .fetch_all(pool)
    .await
}

/// When the partition of a projection halted at `position` (in any replica set): for the
/// poison benchmark.
#[cfg(feature = "bench")]
pub async fn halted_at(
    pool: &PgPool,
    projection: &str,
    position: i64,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT halted_at FROM projection_host.halts WHERE projection = $1 AND position = $2",
    )
    .bind(projection)
    .bind(position)
    .fetch_optional(pool)
    .await
}
