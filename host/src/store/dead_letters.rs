//! `projection_host.dead_letters`: events parked by the dead-letter policy, with the later
//! events of their aggregate, in PostgreSQL so that every host of the replica set and every
//! operator sees the same. Rows are added and removed by the host's batch functions inside a
//! batch's transaction (`park`, `remove`); operators retry or skip them.

use std::collections::{HashMap, HashSet};

use sqlx::{PgConnection, PgPool};

use super::Caller;
use crate::ids::PartitionId;

/// One parked event, as stored (the admin API answers with `http::api::DeadLetter`).
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DeadLetter {
    pub id: i64,
    pub projection: String,
    pub partition: i32,
    pub position: i64,
    pub aggregate_id: String,
    pub event_type: String,
    pub error: String,
    pub parked_at: chrono::DateTime<chrono::Utc>,
    pub retry_requested: bool,
    pub attempts: i32,
}

/// An event to park.
pub struct ToPark<'a> {
    pub partition: PartitionId,
    pub position: i64,
    pub aggregate_id: &'a str,
    pub event_type: &'a str,
    pub error: &'a str,
}

/// Parks events, inside the batch transaction (so parking and the checkpoint commit together),
/// through the host's batch functions. A follower of an aggregate whose retry was requested
/// joins that retry.
pub async fn park(
    conn: &mut PgConnection,
    caller: Caller<'_>,
    events: &[ToPark<'_>],
) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let partitions: Vec<i32> = events.iter().map(|e| e.partition.as_i32()).collect();
    let positions: Vec<i64> = events.iter().map(|e| e.position).collect();
    let aggregates: Vec<&str> = events.iter().map(|e| e.aggregate_id).collect();
    let types: Vec<&str> = events.iter().map(|e| e.event_type).collect();
    let errors: Vec<&str> = events.iter().map(|e| e.error).collect();
    sqlx::query("SELECT projection_host_api.park_dead_letters($1, $2, $3, $4, $5, $6, $7, $8, $9)")
        .persistent(false)
        .bind(caller.replica_set)
        .bind(caller.worker.as_str())
        .bind(caller.token.secret())
        .bind(caller.projection)
        .bind(&partitions)
        .bind(&positions)
        .bind(&aggregates)
        .bind(&types)
        .bind(&errors)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Aggregates with parked events in the given partitions.
pub async fn parked_aggregates(
    pool: &PgPool,
    replica_set: &str,
    projection: &str,
    partitions: &[i32],
) -> Result<HashSet<String>, sqlx::Error> {
    let rows: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT aggregate_id FROM projection_host.dead_letters
          WHERE replica_set = $1 AND projection = $2 AND partition = ANY($3)",
    )
    .bind(replica_set)
    .bind(projection)
    .bind(partitions)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

pub async fn list(
    pool: &PgPool,
    replica_set: &str,
    projection: Option<&str>,
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, projection, partition, position, aggregate_id, event_type, error, parked_at, retry_requested, attempts
           FROM projection_host.dead_letters
          WHERE replica_set = $1 AND ($2::text IS NULL OR projection = $2)
          ORDER BY projection, position",
    )
    .bind(replica_set)
    .bind(projection)
    .fetch_all(pool)
    .await
}

/// Parked events per partition (partitions without any are left out).
pub async fn count_by_partition(
    pool: &PgPool,
    replica_set: &str,
    projection: &str,
) -> Result<HashMap<i32, i64>, sqlx::Error> {
    let rows: Vec<(i32, i64)> = sqlx::query_as(
        "SELECT partition, count(*) FROM projection_host.dead_letters
          WHERE replica_set = $1 AND projection = $2 GROUP BY partition",
    )
    .bind(replica_set)
    .bind(projection)
    .fetch_all(pool)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Asks the owner of the aggregate's partition to apply all its parked events again, in order.
pub async fn request_retry(
    pool: &PgPool,
    replica_set: &str,
    projection: &str,
    aggregate_id: &str,
) -> Result<u64, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let n = sqlx::query(
        "UPDATE projection_host.dead_letters SET retry_requested = true
          WHERE replica_set = $1 AND projection = $2 AND aggregate_id = $3",
    )
    .bind(replica_set)
    .bind(projection)
    .bind(aggregate_id)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    notify(&mut tx, replica_set).await?;
    tx.commit().await?;
    Ok(n)
}

/// Drops one parked event without applying it.
pub async fn skip(
    pool: &PgPool,
    replica_set: &str,
    id: i64,
) -> Result<Option<DeadLetter>, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let row: Option<DeadLetter> = sqlx::query_as(
        "DELETE FROM projection_host.dead_letters WHERE replica_set = $1 AND id = $2
         RETURNING id, projection, partition, position, aggregate_id, event_type, error, parked_at, retry_requested, attempts",
    )
    .bind(replica_set)
    .bind(id)
    .fetch_optional(&mut *tx)
    .await?;
    notify(&mut tx, replica_set).await?;
    tx.commit().await?;
    Ok(row)
}

/// Parked events whose retry was requested, in the given partitions, in position order.
pub async fn retry_requests(
    pool: &PgPool,
    replica_set: &str,
    projection: &str,
    partitions: &[i32],
) -> Result<Vec<DeadLetter>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, projection, partition, position, aggregate_id, event_type, error, parked_at, retry_requested, attempts
           FROM projection_host.dead_letters
          WHERE replica_set = $1 AND projection = $2 AND partition = ANY($3) AND retry_requested
          ORDER BY position",
    )
    .bind(replica_set)
    .bind(projection)
    .bind(partitions)
    .fetch_all(pool)
    .await
}

/// Removes replayed events, inside the replay's transaction.
pub async fn remove(
    conn: &mut PgConnection,
    caller: Caller<'_>,
    ids: &[i64],
) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT projection_host_api.unpark_dead_letters($1, $2, $3, $4, $5)")
        .persistent(false)
        .bind(caller.replica_set)
        .bind(caller.worker.as_str())
        .bind(caller.token.secret())
        .bind(caller.projection)
        .bind(ids)
        .execute(&mut *conn)
        .await?;
    Ok(())
}

/// Renumbers the set's parked events for `count` partitions (inside a resize): the partition of
/// each aggregate under the new count, so that the worker that now holds the aggregate keeps
/// its later events parked behind them and replays them on request.
pub async fn repartition(
    conn: &mut PgConnection,
    replica_set: &str,
    count: u32,
) -> Result<u64, sqlx::Error> {
    let aggregates: Vec<String> = sqlx::query_scalar(
        "SELECT DISTINCT aggregate_id FROM projection_host.dead_letters WHERE replica_set = $1",
    )
    .bind(replica_set)
    .fetch_all(&mut *conn)
    .await?;
    let partitions: Vec<i32> = aggregates
        .iter()
        .map(|a| PartitionId::of(a, count).as_i32())
        .collect();
    Ok(sqlx::query(
        "UPDATE projection_host.dead_letters d SET partition = n.partition
           FROM unnest($2::text[], $3::int[]) AS n(aggregate_id, partition)
          WHERE d.replica_set = $1 AND d.aggregate_id = n.aggregate_id",
    )
    .bind(replica_set)
    .bind(&aggregates)
    .bind(&partitions)
    .execute(conn)
    .await?
    .rows_affected())
}

/// A replay failed: the events stay parked, with the new error.
pub async fn retry_failed(pool: &PgPool, ids: &[i64], error: &str) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_host.dead_letters SET retry_requested = false, attempts = attempts + 1, error = $2 WHERE id = ANY($1)",
    )
    .bind(ids)
    .bind(error)
    .execute(pool)
    .await?;
    Ok(())
}

async fn notify(conn: &mut PgConnection, replica_set: &str) -> Result<(), sqlx::Error> {
    crate::base::notify::coordination(&mut *conn, replica_set).await
}

/// Parked events per projection, for `projection-host status`.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Count {
    pub projection: String,
    pub events: i64,
    pub oldest: chrono::DateTime<chrono::Utc>,
}

/// Parked events per projection of the replica set.
pub async fn counts(pool: &PgPool, replica_set: &str) -> Result<Vec<Count>, sqlx::Error> {
    sqlx::query_as(
        "SELECT projection, count(*) AS events, min(parked_at) AS oldest FROM projection_host.dead_letters
          WHERE replica_set = $1 GROUP BY projection ORDER BY projection",
    )
    .bind(replica_set)
    .fetch_all(pool)
    .await
}

/// When the event at `position` of a projection was parked (in any replica set): for the
/// poison benchmark.
#[cfg(feature = "bench")]
pub async fn parked_at(
    pool: &PgPool,
    projection: &str,
    position: i64,
) -> Result<Option<chrono::DateTime<chrono::Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT parked_at FROM projection_host.dead_letters WHERE projection = $1 AND position = $2",
    )
    .bind(projection)
    .bind(position)
    .fetch_optional(pool)
    .await
}

/// Positions of every parked event in the database: for the poison benchmark's exactness check.
#[cfg(feature = "bench")]
pub async fn all_positions(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    sqlx::query_scalar("SELECT position FROM projection_host.dead_letters")
        .fetch_all(pool)
        .await
}
