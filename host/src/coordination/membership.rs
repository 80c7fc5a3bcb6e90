//! Replica-set and worker rows: creation, registration, heartbeats, removal.

use std::time::Duration;

use sqlx::PgPool;

use super::CoordinationError;
use crate::base::notify;
use crate::ids::WorkerId;

/// Partitions of a new replica set when `--partitions` is not given.
pub const DEFAULT_PARTITIONS: u32 = 32;

/// This process in its replica set.
#[derive(Debug, Clone)]
pub struct Member {
    pub replica_set: String,
    pub worker: WorkerId,
    /// A fresh id per process: tells a restart under the same worker id from the old process.
    pub incarnation: uuid::Uuid,
    pub hostname: String,
    pub pod_namespace: Option<String>,
    /// sha256 of the process's commit token (`ids::CommitToken`).
    pub commit_token: Vec<u8>,
}

impl Member {
    /// The `application_name` of this process's database sessions, so that the leader can end
    /// a stale worker's sessions (and with them any locks it still holds).
    pub fn application_name(incarnation: &uuid::Uuid) -> String {
        format!(
            "projection-host {}",
            &incarnation.simple().to_string()[..12]
        )
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Heartbeat {
    Alive,
    /// Our row is gone: the leader removed us as stale. Register again.
    Removed,
    /// Another process registered under our worker id.
    Replaced,
}

/// Creates the replica set (with its partition rows) or checks it against the configuration.
/// Returns the partition count.
pub async fn ensure_replica_set(
    pool: &PgPool,
    name: &str,
    partitions: Option<u32>,
    strategy: Strategy,
) -> Result<u32, CoordinationError> {
    let strategy = strategy.as_str();
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO projection_host.replica_sets (name, partitions, strategy) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(partitions.unwrap_or(DEFAULT_PARTITIONS) as i32)
    .bind(strategy)
    .execute(&mut *tx)
    .await?;
    let (stored, stored_strategy): (i32, String) = sqlx::query_as(
        "SELECT partitions, strategy FROM projection_host.replica_sets WHERE name = $1 FOR UPDATE",
    )
    .bind(name)
    .fetch_one(&mut *tx)
    .await?;
    let stored = stored as u32;
    if let Some(wanted) = partitions {
        if wanted != stored {
            return Err(CoordinationError::PartitionCountMismatch {
                replica_set: name.to_string(),
                stored,
                configured: wanted,
            });
        }
    }
    if stored_strategy != strategy {
        tracing::warn!(replica_set = name, from = %stored_strategy, to = strategy, "changing the replica set's rebalancing strategy");
        sqlx::query("UPDATE projection_host.replica_sets SET strategy = $2 WHERE name = $1")
            .bind(name)
            .bind(strategy)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query(
        "INSERT INTO projection_host.partitions (replica_set, partition)
         SELECT $1, g FROM generate_series(0, $2 - 1) AS g
         ON CONFLICT DO NOTHING",
    )
    .bind(name)
    .bind(stored as i32)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(stored)
}

/// How partitions move when membership changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Strategy {
    /// Only partitions that must move pause; the rest keep running.
    Cooperative,
    /// Every worker stops, then all restart with the new assignment (behind a stop barrier).
    Recreate,
}

impl Strategy {
    /// The name stored in `replica_sets.strategy`.
    pub fn as_str(self) -> &'static str {
        match self {
            Strategy::Cooperative => "cooperative",
            Strategy::Recreate => "recreate",
        }
    }
}

impl Member {
    /// Registers (or re-registers) this process; returns whether it took the worker id over
    /// from an earlier process.
    pub async fn register(&self, pool: &PgPool) -> Result<bool, CoordinationError> {
        let previous: Option<Option<uuid::Uuid>> = sqlx::query_scalar(
            "WITH old AS (
                 SELECT incarnation FROM projection_host.workers WHERE replica_set = $1 AND worker_id = $2
             ), up AS (
                 INSERT INTO projection_host.workers
                     (replica_set, worker_id, incarnation, hostname, pod_namespace, host_version, started_at, heartbeat_at, commit_token)
                 VALUES ($1, $2, $3, $4, $5, $6, now(), now(), $7)
                 ON CONFLICT (replica_set, worker_id) DO UPDATE
                    SET incarnation = EXCLUDED.incarnation, hostname = EXCLUDED.hostname,
                        commit_token = EXCLUDED.commit_token,
                        pod_namespace = EXCLUDED.pod_namespace, host_version = EXCLUDED.host_version,
                        started_at = CASE WHEN projection_host.workers.incarnation = EXCLUDED.incarnation
                                          THEN projection_host.workers.started_at ELSE now() END,
                        heartbeat_at = now()
                 RETURNING 1
             )
             SELECT (SELECT incarnation FROM old) FROM up",
        )
        .bind(&self.replica_set)
        .bind(self.worker.as_str())
        .bind(self.incarnation)
        .bind(&self.hostname)
        .bind(&self.pod_namespace)
        .bind(env!("CARGO_PKG_VERSION"))
        .bind(&self.commit_token)
        .fetch_optional(pool)
        .await?;
        let took_over = matches!(previous, Some(Some(old)) if old != self.incarnation);
        notify(pool, &self.replica_set).await?;
        Ok(took_over)
    }

    pub async fn heartbeat(&self, pool: &PgPool) -> Result<Heartbeat, CoordinationError> {
        let current: Option<uuid::Uuid> = sqlx::query_scalar(
            "WITH hb AS (
                 UPDATE projection_host.workers SET heartbeat_at = now()
                  WHERE replica_set = $1 AND worker_id = $2 AND incarnation = $3
                 RETURNING incarnation)
             SELECT coalesce((SELECT incarnation FROM hb),
                             (SELECT incarnation FROM projection_host.workers WHERE replica_set = $1 AND worker_id = $2))",
        )
        .bind(&self.replica_set)
        .bind(self.worker.as_str())
        .bind(self.incarnation)
        .fetch_one(pool)
        .await?;
        Ok(match current {
            Some(i) if i == self.incarnation => Heartbeat::Alive,
            Some(_) => Heartbeat::Replaced,
            None => Heartbeat::Removed,
        })
    }

    /// Releases every partition this process holds, leaves leadership and removes the worker
    /// row, so peers take over at once.
    pub async fn leave(&self, pool: &PgPool) -> Result<u64, CoordinationError> {
        let mut tx = pool.begin().await?;
        let mine: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM projection_host.workers WHERE replica_set = $1 AND worker_id = $2 AND incarnation = $3)",
        )
        .bind(&self.replica_set)
        .bind(self.worker.as_str())
        .bind(self.incarnation)
        .fetch_one(&mut *tx)
        .await?;
        if !mine {
            // Someone else registered under our id; their partitions are not ours to release.
            return Ok(0);
        }
        let released = sqlx::query(
            "UPDATE projection_host.partitions SET owner = NULL, released_at = now()
              WHERE replica_set = $1 AND owner = $2",
        )
        .bind(&self.replica_set)
        .bind(self.worker.as_str())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        sqlx::query("DELETE FROM projection_host.workers WHERE replica_set = $1 AND worker_id = $2 AND incarnation = $3")
            .bind(&self.replica_set)
            .bind(self.worker.as_str())
            .bind(self.incarnation)
            .execute(&mut *tx)
            .await?;
        sqlx::query("UPDATE projection_host.replica_sets SET leader = NULL, leader_until = NULL WHERE name = $1 AND leader = $2")
            .bind(&self.replica_set)
            .bind(self.worker.as_str())
            .execute(&mut *tx)
            .await?;
        notify::coordination(&mut *tx, &self.replica_set).await?;
        tx.commit().await?;
        Ok(released)
    }
}

/// Removes workers whose heartbeat is older than `stale` (database clock) and ends their
/// database sessions. Returns the removed worker ids.
pub async fn remove_stale(
    pool: &PgPool,
    replica_set: &str,
    stale: Duration,
) -> Result<Vec<String>, CoordinationError> {
    let removed: Vec<(String, uuid::Uuid)> = sqlx::query_as(
        "DELETE FROM projection_host.workers
          WHERE replica_set = $1 AND heartbeat_at < now() - $2 * interval '1 millisecond'
         RETURNING worker_id, incarnation",
    )
    .bind(replica_set)
    .bind(stale.as_millis() as f64)
    .fetch_all(pool)
    .await?;
    if removed.is_empty() {
        return Ok(Vec::new());
    }
    let names: Vec<String> = removed
        .iter()
        .map(|(_, i)| Member::application_name(i))
        .collect();
    // A paused worker may sit in an open transaction holding row locks that would block its
    // successor; ending its sessions releases them. Its late commits are fenced anyway.
    let ended: i64 = sqlx::query_scalar(
        "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid))
           FROM pg_stat_activity WHERE application_name = ANY($1) AND pid <> pg_backend_pid()",
    )
    .bind(&names)
    .fetch_one(pool)
    .await
    .unwrap_or_else(|e| {
        tracing::warn!(error = %e, "could not end the database sessions of stale workers");
        0
    });
    let ids: Vec<String> = removed.into_iter().map(|(w, _)| w).collect();
    tracing::warn!(replica_set, workers = ids.len(), worker_ids = %ids.join(" "), sessions_ended = ended, "removed stale workers (heartbeat older than the stale-worker timeout)");
    Ok(ids)
}

pub async fn notify(pool: &PgPool, replica_set: &str) -> Result<(), sqlx::Error> {
    notify::coordination(pool, replica_set).await
}
