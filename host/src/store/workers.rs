//! `workers`: one row per host process in a replica set, kept alive by its heartbeat; the
//! leader removes rows whose heartbeat is older than the stale-worker timeout.

use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use crate::ids::WorkerId;

/// What a process registers as.
pub struct Registration<'a> {
    pub replica_set: &'a str,
    pub worker: &'a WorkerId,
    pub incarnation: uuid::Uuid,
    pub hostname: &'a str,
    pub pod_namespace: Option<&'a str>,
    /// sha256 of the process's commit token.
    pub commit_token: &'a [u8],
}

/// What this host understands about a replica set (`workers.protocol`): 2 = it follows a
/// resize (joins again with the new count, claims with its count, honours carried
/// checkpoints).
pub const PROTOCOL: i32 = 2;

/// Live hosts of the set (heartbeat within `stale`) of an older protocol, with their version.
pub async fn older_protocol(
    conn: &mut PgConnection,
    replica_set: &str,
    stale: std::time::Duration,
) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT worker_id || ' (' || host_version || ')' FROM projection_host.workers
          WHERE replica_set = $1 AND protocol < $2
            AND heartbeat_at > now() - $3 * interval '1 millisecond' ORDER BY worker_id",
    )
    .bind(replica_set)
    .bind(PROTOCOL)
    .bind(stale.as_millis() as f64)
    .fetch_all(conn)
    .await
}

/// Inserts or takes over the worker's row. Returns the incarnation that held the row before
/// (`None` when there was no row).
pub async fn register(pool: &PgPool, r: &Registration<'_>) -> sqlx::Result<Option<uuid::Uuid>> {
    let previous: Option<Option<uuid::Uuid>> = sqlx::query_scalar(
        "WITH old AS (
             SELECT incarnation FROM projection_host.workers WHERE replica_set = $1 AND worker_id = $2
         ), up AS (
             INSERT INTO projection_host.workers
                 (replica_set, worker_id, incarnation, hostname, pod_namespace, host_version, started_at, heartbeat_at, commit_token, protocol)
             VALUES ($1, $2, $3, $4, $5, $6, now(), now(), $7, $8)
             ON CONFLICT (replica_set, worker_id) DO UPDATE
                SET incarnation = EXCLUDED.incarnation, hostname = EXCLUDED.hostname,
                    commit_token = EXCLUDED.commit_token,
                    pod_namespace = EXCLUDED.pod_namespace, host_version = EXCLUDED.host_version,
                    protocol = EXCLUDED.protocol,
                    started_at = CASE WHEN projection_host.workers.incarnation = EXCLUDED.incarnation
                                      THEN projection_host.workers.started_at ELSE now() END,
                    heartbeat_at = now()
             RETURNING 1
         )
         SELECT (SELECT incarnation FROM old) FROM up",
    )
    .bind(r.replica_set)
    .bind(r.worker.as_str())
    .bind(r.incarnation)
    .bind(r.hostname)
    .bind(r.pod_namespace)
    .bind(env!("CARGO_PKG_VERSION"))
    .bind(r.commit_token)
    .bind(PROTOCOL)
    .fetch_optional(pool)
    .await?;
    Ok(previous.flatten())
}

/// Refreshes the heartbeat of this incarnation's row. Returns the incarnation the row holds
/// now: ours when alive, another one when replaced, `None` when the row was removed.
pub async fn heartbeat(
    pool: &PgPool,
    replica_set: &str,
    worker: &WorkerId,
    incarnation: uuid::Uuid,
) -> sqlx::Result<Option<uuid::Uuid>> {
    sqlx::query_scalar(
        "WITH hb AS (
             UPDATE projection_host.workers SET heartbeat_at = now()
              WHERE replica_set = $1 AND worker_id = $2 AND incarnation = $3
             RETURNING incarnation)
         SELECT coalesce((SELECT incarnation FROM hb),
                         (SELECT incarnation FROM projection_host.workers WHERE replica_set = $1 AND worker_id = $2))",
    )
    .bind(replica_set)
    .bind(worker.as_str())
    .bind(incarnation)
    .fetch_one(pool)
    .await
}

/// Whether the worker's row belongs to this incarnation.
pub async fn is_current(
    conn: &mut PgConnection,
    replica_set: &str,
    worker: &WorkerId,
    incarnation: uuid::Uuid,
) -> sqlx::Result<bool> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM projection_host.workers WHERE replica_set = $1 AND worker_id = $2 AND incarnation = $3)",
    )
    .bind(replica_set)
    .bind(worker.as_str())
    .bind(incarnation)
    .fetch_one(conn)
    .await
}

/// Removes this incarnation's row (a clean leave).
pub async fn delete(
    conn: &mut PgConnection,
    replica_set: &str,
    worker: &WorkerId,
    incarnation: uuid::Uuid,
) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM projection_host.workers WHERE replica_set = $1 AND worker_id = $2 AND incarnation = $3")
        .bind(replica_set)
        .bind(worker.as_str())
        .bind(incarnation)
        .execute(conn)
        .await?;
    Ok(())
}

/// Removes the rows whose heartbeat is older than `stale` (database clock); returns their
/// worker ids and incarnations.
pub async fn delete_stale(
    pool: &PgPool,
    replica_set: &str,
    stale: Duration,
) -> sqlx::Result<Vec<(String, uuid::Uuid)>> {
    sqlx::query_as(
        "DELETE FROM projection_host.workers
          WHERE replica_set = $1 AND heartbeat_at < now() - $2 * interval '1 millisecond'
         RETURNING worker_id, incarnation",
    )
    .bind(replica_set)
    .bind(stale.as_millis() as f64)
    .fetch_all(pool)
    .await
}

/// The set's registered workers, by id.
pub async fn ids(pool: &PgPool, replica_set: &str) -> sqlx::Result<Vec<WorkerId>> {
    let ids: Vec<String> = sqlx::query_scalar(
        "SELECT worker_id FROM projection_host.workers WHERE replica_set = $1 ORDER BY worker_id",
    )
    .bind(replica_set)
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().map(WorkerId).collect())
}

/// How long until the oldest heartbeat becomes older than `stale` (negative when it already
/// is; `None` without workers).
pub async fn until_next_stale(
    pool: &PgPool,
    replica_set: &str,
    stale: Duration,
) -> sqlx::Result<Option<Duration>> {
    let ms: Option<f64> = sqlx::query_scalar(
        "SELECT (extract(epoch FROM min(heartbeat_at) + $2 * interval '1 millisecond' - now()) * 1000)::float8
           FROM projection_host.workers WHERE replica_set = $1",
    )
    .bind(replica_set)
    .bind(stale.as_millis() as f64)
    .fetch_one(pool)
    .await?;
    Ok(ms.map(|ms| Duration::from_millis(ms.max(0.0) as u64)))
}

/// Hosts of a replica set whose heartbeat is recent: an operator command that rewrites what the
/// set writes waits for them to be gone. Rows of hosts killed long ago (no leader removed them)
/// are not counted.
pub async fn live_hosts(conn: &mut PgConnection, replica_set: &str) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar(
        "SELECT worker_id FROM projection_host.workers
          WHERE replica_set = $1 AND heartbeat_at > now() - interval '60 seconds' ORDER BY worker_id",
    )
    .bind(replica_set)
    .fetch_all(conn)
    .await
}

/// A worker as `status` shows it.
#[derive(Debug, serde::Serialize, sqlx::FromRow)]
pub struct Row {
    pub worker_id: String,
    pub hostname: String,
    pub host_version: String,
    pub heartbeat_age_ms: i64,
    pub started_at: chrono::DateTime<chrono::Utc>,
    /// Partitions it owns.
    pub partitions: i64,
}

pub async fn list(pool: &PgPool, replica_set: &str) -> sqlx::Result<Vec<Row>> {
    sqlx::query_as(
        "SELECT w.worker_id, w.hostname, w.host_version,
                (extract(epoch FROM now() - w.heartbeat_at) * 1000)::int8 AS heartbeat_age_ms, w.started_at,
                (SELECT count(*) FROM projection_host.partitions p WHERE p.replica_set = w.replica_set AND p.owner = w.worker_id) AS partitions
           FROM projection_host.workers w WHERE w.replica_set = $1 ORDER BY w.worker_id",
    )
    .bind(replica_set)
    .fetch_all(pool)
    .await
}
