//! `projection_host.projection_controls`: operators' pauses of projections (with a reason), and
//! the one query every coordination round runs to see what operators changed, across the
//! controls, halts and dead letters.

use sqlx::{PgConnection, PgPool};

/// What operators set, as (kind, projection) rows: `paused`, `halted` and `retry` (parked
/// events whose retry was requested) per projection, and one `revision` row whose value
/// changes with every operator action.
pub async fn load(pool: &PgPool, replica_set: &str) -> Result<Vec<(String, String)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT 'paused', projection FROM projection_host.projection_controls WHERE replica_set = $1 AND paused
         UNION SELECT 'halted', projection FROM projection_host.halts WHERE replica_set = $1
         UNION SELECT 'retry', projection FROM projection_host.dead_letters WHERE replica_set = $1 AND retry_requested
         UNION SELECT 'revision', concat_ws('/',
                  (SELECT max(updated_at)::text FROM projection_host.projection_controls WHERE replica_set = $1),
                  (SELECT count(*)::text || ':' || coalesce(max(id), 0)::text FROM projection_host.dead_letters WHERE replica_set = $1),
                  (SELECT count(*)::text FROM projection_host.halts WHERE replica_set = $1))",
    )
    .bind(replica_set)
    .fetch_all(pool)
    .await
}

/// Records a pause or a resume of a projection.
pub async fn set_paused(
    conn: &mut PgConnection,
    replica_set: &str,
    projection: &str,
    paused: bool,
    reason: Option<&str>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO projection_host.projection_controls (replica_set, projection, paused, reason, updated_at)
         VALUES ($1, $2, $3, $4, now())
         ON CONFLICT (replica_set, projection) DO UPDATE SET paused = $3, reason = $4, updated_at = now()",
    )
    .bind(replica_set)
    .bind(projection)
    .bind(paused)
    .bind(reason)
    .execute(conn)
    .await?;
    Ok(())
}

/// A paused projection, for `projection-host status`.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct Paused {
    pub projection: String,
    pub reason: Option<String>,
    pub since: chrono::DateTime<chrono::Utc>,
}

/// The paused projections of the replica set.
pub async fn paused(pool: &PgPool, replica_set: &str) -> Result<Vec<Paused>, sqlx::Error> {
    sqlx::query_as(
        "SELECT projection, reason, updated_at AS since FROM projection_host.projection_controls
          WHERE replica_set = $1 AND paused ORDER BY projection",
    )
    .bind(replica_set)
    .fetch_all(pool)
    .await
}
