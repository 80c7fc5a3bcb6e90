//! `replica_sets` and their `generations`: a set's partition count and strategy, the leader's
//! lease, the current generation and its phase; and the audit row of every generation (who
//! started it and why).

use std::time::Duration;

use sqlx::{PgConnection, PgPool};

use crate::base::stored_enum::stored_enum;
use crate::ids::WorkerId;

stored_enum! {
    /// How partitions move when membership changes (`replica_sets.strategy`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum Strategy("replica_sets.strategy") {
        /// Only partitions that must move pause; the rest keep running.
        Cooperative => "cooperative",
        /// Every worker stops, then all restart with the new assignment (behind a stop
        /// barrier).
        Recreate => "recreate",
    }
}

/// A set's row as `create_or_lock` found it.
pub struct Stored {
    pub partitions: u32,
    /// The count before the last resize.
    pub previous_partitions: Option<u32>,
    pub strategy: Strategy,
}

/// Creates the set if it does not exist, then locks its row for the rest of the transaction
/// and returns its stored partition counts and strategy.
pub async fn create_or_lock(
    conn: &mut PgConnection,
    name: &str,
    partitions: u32,
    strategy: Strategy,
) -> sqlx::Result<Stored> {
    sqlx::query(
        "INSERT INTO projection_host.replica_sets (name, partitions, strategy) VALUES ($1, $2, $3)
         ON CONFLICT (name) DO NOTHING",
    )
    .bind(name)
    .bind(partitions as i32)
    .bind(strategy.as_str())
    .execute(&mut *conn)
    .await?;
    let (stored, previous, stored_strategy): (i32, Option<i32>, String) = sqlx::query_as(
        "SELECT partitions, previous_partitions, strategy FROM projection_host.replica_sets
          WHERE name = $1 FOR UPDATE",
    )
    .bind(name)
    .fetch_one(conn)
    .await?;
    let strategy =
        Strategy::try_from(stored_strategy).map_err(|e| sqlx::Error::Decode(e.into()))?;
    Ok(Stored {
        partitions: stored as u32,
        previous_partitions: previous.map(|p| p as u32),
        strategy,
    })
}

/// Locks an existing set's row for the rest of the transaction (a resize, an import, a
/// projection's removal: they rewrite checkpoints and must not interleave); returns its partition
/// count (`None`: no such set).
pub async fn lock(conn: &mut PgConnection, name: &str) -> sqlx::Result<Option<u32>> {
    let stored: Option<i32> = sqlx::query_scalar(
        "SELECT partitions FROM projection_host.replica_sets WHERE name = $1 FOR UPDATE",
    )
    .bind(name)
    .fetch_optional(conn)
    .await?;
    Ok(stored.map(|p| p as u32))
}

/// Records a resize from `from` to `to` partitions (inside the resize's transaction).
pub async fn set_partitions(
    conn: &mut PgConnection,
    name: &str,
    from: u32,
    to: u32,
) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE projection_host.replica_sets SET partitions = $2, previous_partitions = $3, phase = 'running'
          WHERE name = $1",
    )
    .bind(name)
    .bind(to as i32)
    .bind(from as i32)
    .execute(conn)
    .await?;
    Ok(())
}

pub async fn set_strategy(
    conn: &mut PgConnection,
    name: &str,
    strategy: Strategy,
) -> sqlx::Result<()> {
    sqlx::query("UPDATE projection_host.replica_sets SET strategy = $2 WHERE name = $1")
        .bind(name)
        .bind(strategy.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

stored_enum! {
    /// `replica_sets.phase`: a recreate-strategy generation starts `stopping` (every owner of
    /// the previous one releases first) and becomes `running` once the barrier is lifted.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
    #[serde(rename_all = "lowercase")]
    pub enum Phase("replica_sets.phase") {
        Running => "running",
        Stopping => "stopping",
    }
}

/// The set's current generation as one worker sees it.
#[derive(sqlx::FromRow)]
pub struct Seen {
    pub generation: i64,
    /// The set's partition count now (a resize changes it under running hosts).
    pub partitions: i32,
    #[sqlx(try_from = "String")]
    pub phase: Phase,
    /// This worker holds the leader's lease.
    pub leader: bool,
    /// How long the current leader's lease still runs (only from `try_lead`).
    pub leader_until_ms: Option<i64>,
}

/// Takes or renews the leader's lease for `worker` when it is free, ours, or expired.
pub async fn try_lead(
    pool: &PgPool,
    name: &str,
    worker: &WorkerId,
    lease: Duration,
) -> sqlx::Result<Seen> {
    sqlx::query_as(
        "WITH lead AS (
             UPDATE projection_host.replica_sets
                SET leader = $2, leader_until = now() + $3 * interval '1 millisecond'
              WHERE name = $1 AND (leader IS NULL OR leader = $2 OR leader_until < now())
             RETURNING partitions)
         -- The lease's UPDATE waits for a resize in progress and then sees its count; the
         -- outer SELECT's snapshot may predate it.
         SELECT r.generation, coalesce((SELECT partitions FROM lead), r.partitions) AS partitions,
                r.phase, EXISTS (SELECT 1 FROM lead) AS leader,
                (extract(epoch FROM r.leader_until - now()) * 1000)::int8 AS leader_until_ms
           FROM projection_host.replica_sets r WHERE r.name = $1",
    )
    .bind(name)
    .bind(worker.as_str())
    .bind(lease.as_millis() as f64)
    .fetch_one(pool)
    .await
}

pub async fn seen_by(pool: &PgPool, name: &str, worker: &WorkerId) -> sqlx::Result<Seen> {
    sqlx::query_as(
        "SELECT generation, partitions, phase, leader IS NOT DISTINCT FROM $2 AS leader, NULL::int8 AS leader_until_ms
           FROM projection_host.replica_sets WHERE name = $1",
    )
    .bind(name)
    .bind(worker.as_str())
    .fetch_one(pool)
    .await
}

/// Gives the leader's lease up, if `worker` holds it.
pub async fn resign(conn: &mut PgConnection, name: &str, worker: &WorkerId) -> sqlx::Result<()> {
    sqlx::query("UPDATE projection_host.replica_sets SET leader = NULL, leader_until = NULL WHERE name = $1 AND leader = $2")
        .bind(name)
        .bind(worker.as_str())
        .execute(conn)
        .await?;
    Ok(())
}

/// Who starts a generation.
pub enum StartedBy<'a> {
    /// The leader re-planning the assignment: only while its lease holds (a leader paused
    /// past its lease writes nothing), and behind the stop barrier under the recreate strategy.
    Leader {
        leader: &'a WorkerId,
        /// The live workers the plan is for.
        workers: &'a [WorkerId],
        /// Partitions whose assignment changes.
        moved: usize,
    },
    /// A change of the set's plugins (install, rebuild, promotion): always, no barrier.
    Registry,
    /// An operator's change of the set itself (a resize): always, no barrier.
    Operator,
}

/// Starts a new generation and records why. Returns its number, or `None` when the leader no
/// longer holds its lease (or the set does not exist). The caller notifies the hosts when it
/// commits.
pub async fn new_generation(
    conn: &mut PgConnection,
    name: &str,
    by: &StartedBy<'_>,
    reason: &str,
) -> sqlx::Result<Option<i64>> {
    let generation: Option<i64> = match by {
        StartedBy::Leader { leader, .. } => {
            sqlx::query_scalar(
                "UPDATE projection_host.replica_sets
                    SET generation = generation + 1,
                        phase = CASE WHEN strategy = 'recreate' THEN 'stopping' ELSE phase END
                  WHERE name = $1 AND leader = $2 AND leader_until > now()
                 RETURNING generation",
            )
            .bind(name)
            .bind(leader.as_str())
            .fetch_optional(&mut *conn)
            .await?
        }
        StartedBy::Registry | StartedBy::Operator => {
            sqlx::query_scalar(
                "UPDATE projection_host.replica_sets SET generation = generation + 1 WHERE name = $1 RETURNING generation",
            )
            .bind(name)
            .fetch_optional(&mut *conn)
            .await?
        }
    };
    let Some(generation) = generation else {
        return Ok(None);
    };
    // `workers` NULL: the set's registered workers.
    let (leader, workers, moved) = match by {
        StartedBy::Leader {
            leader,
            workers,
            moved,
        } => (
            leader.as_str(),
            Some(workers.iter().map(|w| w.0.clone()).collect::<Vec<_>>()),
            *moved as i32,
        ),
        StartedBy::Registry => ("-", None, 0),
        StartedBy::Operator => ("operator", None, 0),
    };
    sqlx::query(
        "INSERT INTO projection_host.generations (replica_set, generation, leader, reason, workers, moved)
         VALUES ($1, $2, $3, $4,
                 coalesce($5, (SELECT coalesce(array_agg(worker_id), '{}') FROM projection_host.workers WHERE replica_set = $1)),
                 $6)",
    )
    .bind(name)
    .bind(generation)
    .bind(leader)
    .bind(reason)
    .bind(workers)
    .bind(moved)
    .execute(conn)
    .await?;
    Ok(Some(generation))
}

/// Recreate strategy: moves a `stopping` generation to `running` once no live worker (`live`)
/// still owns a partition. Returns whether it did.
pub async fn lift_stop_barrier(
    pool: &PgPool,
    name: &str,
    leader: &WorkerId,
    live: &[WorkerId],
) -> sqlx::Result<bool> {
    let live: Vec<&str> = live.iter().map(|w| w.as_str()).collect();
    let lifted = sqlx::query(
        "UPDATE projection_host.replica_sets r SET phase = 'running'
          WHERE r.name = $1 AND r.phase = 'stopping' AND r.leader = $2
            AND NOT EXISTS (SELECT 1 FROM projection_host.partitions p
                             WHERE p.replica_set = $1 AND p.owner = ANY($3))",
    )
    .bind(name)
    .bind(leader.as_str())
    .bind(&live)
    .execute(pool)
    .await?
    .rows_affected();
    Ok(lifted > 0)
}

/// A set as `status` shows it.
#[derive(Debug, sqlx::FromRow)]
pub struct Overview {
    pub partitions: i32,
    pub generation: i64,
    #[sqlx(try_from = "String")]
    pub strategy: Strategy,
    #[sqlx(try_from = "String")]
    pub phase: Phase,
    pub leader: Option<String>,
}

pub async fn overview(pool: &PgPool, name: &str) -> sqlx::Result<Option<Overview>> {
    sqlx::query_as(
        "SELECT partitions, generation, strategy, phase, leader FROM projection_host.replica_sets WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await
}

pub async fn exists(conn: &mut PgConnection, name: &str) -> sqlx::Result<bool> {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM projection_host.replica_sets WHERE name = $1)")
        .bind(name)
        .fetch_one(conn)
        .await
}

/// Every set's name, sorted.
pub async fn names(conn: &mut PgConnection) -> sqlx::Result<Vec<String>> {
    sqlx::query_scalar("SELECT name FROM projection_host.replica_sets ORDER BY name")
        .fetch_all(conn)
        .await
}

/// Removes the set; its workers, partitions and generations go with it (foreign keys).
pub async fn delete(conn: &mut PgConnection, name: &str) -> sqlx::Result<()> {
    sqlx::query("DELETE FROM projection_host.replica_sets WHERE name = $1")
        .bind(name)
        .execute(conn)
        .await?;
    Ok(())
}
