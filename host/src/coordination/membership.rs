//! Membership: creating or checking the replica set, registration, heartbeats, leaving, and
//! the removal of stale workers (the rows themselves are `store::replica_sets` and
//! `store::workers`).

use std::time::Duration;

use sqlx::PgPool;

use super::CoordinationError;
use crate::base::notify;
use crate::ids::WorkerId;
pub use crate::store::replica_sets::Strategy;
use crate::store::{self, replica_sets, workers};

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
    let mut tx = pool.begin().await?;
    let replica_sets::Stored {
        partitions: stored,
        previous_partitions,
        strategy: stored_strategy,
    } = replica_sets::create_or_lock(
        &mut tx,
        name,
        partitions.unwrap_or(DEFAULT_PARTITIONS),
        strategy,
    )
    .await?;
    match partitions {
        Some(wanted) if wanted != stored && previous_partitions == Some(wanted) => {
            // A rollout after a resize: the set's count wins; the configuration catches up.
            tracing::warn!(
                replica_set = name,
                partitions = stored,
                configured = wanted,
                "replica set {name} was resized from {wanted} to {stored} partitions; running with \
                 {stored}. Set PARTITIONS={stored} (or drop --partitions) in this host's configuration"
            );
        }
        Some(wanted) if wanted != stored => {
            return Err(CoordinationError::PartitionCountMismatch {
                replica_set: name.to_string(),
                stored,
                configured: wanted,
            });
        }
        _ => {}
    }
    if stored_strategy != strategy {
        tracing::warn!(replica_set = name, from = %stored_strategy, to = %strategy, "changing the replica set's rebalancing strategy");
        replica_sets::set_strategy(&mut tx, name, strategy).await?;
    }
    store::partitions::create(&mut tx, name, stored).await?;
    tx.commit().await?;
    Ok(stored)
}

impl Member {
    /// Registers (or re-registers) this process; returns whether it took the worker id over
    /// from an earlier process.
    pub async fn register(&self, pool: &PgPool) -> Result<bool, CoordinationError> {
        let previous = workers::register(
            pool,
            &workers::Registration {
                replica_set: &self.replica_set,
                worker: &self.worker,
                incarnation: self.incarnation,
                hostname: &self.hostname,
                pod_namespace: self.pod_namespace.as_deref(),
                commit_token: &self.commit_token,
            },
        )
        .await?;
        let took_over = matches!(previous, Some(old) if old != self.incarnation);
        notify(pool, &self.replica_set).await?;
        Ok(took_over)
    }

    pub async fn heartbeat(&self, pool: &PgPool) -> Result<Heartbeat, CoordinationError> {
        let current =
            workers::heartbeat(pool, &self.replica_set, &self.worker, self.incarnation).await?;
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
        let mine =
            workers::is_current(&mut tx, &self.replica_set, &self.worker, self.incarnation).await?;
        if !mine {
            // Someone else registered under our id; their partitions are not ours to release.
            return Ok(0);
        }
        let released =
            store::partitions::release_all(&mut tx, &self.replica_set, &self.worker).await?;
        workers::delete(&mut tx, &self.replica_set, &self.worker, self.incarnation).await?;
        replica_sets::resign(&mut tx, &self.replica_set, &self.worker).await?;
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
    let removed = workers::delete_stale(pool, replica_set, stale).await?;
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
