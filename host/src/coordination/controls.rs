//! Operator controls (pause/resume) that every host of a replica set follows. Stored in
//! PostgreSQL, announced with NOTIFY, re-read every coordination round.

use std::collections::BTreeSet;
use std::sync::Arc;

use sqlx::PgPool;
use tokio::sync::watch;

/// Projections paused in this replica set.
pub type Paused = Arc<BTreeSet<String>>;

pub async fn load(pool: &PgPool, replica_set: &str) -> Result<Paused, sqlx::Error> {
    let names: Vec<String> =
        sqlx::query_scalar("SELECT projection FROM projection_host.projection_controls WHERE replica_set = $1 AND paused")
            .bind(replica_set)
            .fetch_all(pool)
            .await?;
    Ok(Arc::new(names.into_iter().collect()))
}

/// Pauses or resumes a projection fleet-wide; hosts act at their next batch boundary.
pub async fn set_paused(
    pool: &PgPool,
    replica_set: &str,
    projection: &str,
    paused: bool,
    reason: Option<&str>,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO projection_host.projection_controls (replica_set, projection, paused, reason, updated_at)
         VALUES ($1, $2, $3, $4, now())
         ON CONFLICT (replica_set, projection) DO UPDATE SET paused = $3, reason = $4, updated_at = now()",
    )
    .bind(replica_set)
    .bind(projection)
    .bind(paused)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    sqlx::query("SELECT pg_notify($1, $2)")
        .bind(super::COORDINATION_CHANNEL)
        .bind(replica_set)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

/// Publishes a new paused set if it changed.
pub fn publish(tx: &watch::Sender<Paused>, paused: Paused) {
    tx.send_if_modified(|current| {
        if **current == *paused {
            false
        } else {
            *current = paused;
            true
        }
    });
}
