//! The end of every batch: checkpoints and the batch audit row, written in the batch's
//! transaction only if this worker still owns every partition of the batch at the epoch it
//! claimed it with (the fencing guard). The guard locks the partition rows `FOR SHARE`, so a
//! concurrent claim (which updates them) waits for this commit, or this commit sees the new
//! epoch and writes nothing.

use sqlx::PgConnection;

use crate::ids::{Epoch, PartitionId, WorkerId};

/// Everything the commit records about one batch.
#[derive(Debug)]
pub struct BatchCommit<'a> {
    pub replica_set: &'a str,
    pub projection: &'a str,
    pub worker: &'a WorkerId,
    pub partitions: &'a [(PartitionId, Epoch)],
    /// The batch covered (from_position, to_position] for every partition in `partitions`.
    pub from_position: i64,
    pub to_position: i64,
    pub events: usize,
    pub plugin_version: &'a str,
    pub plugin_sha256: &'a str,
    /// The generation that activated this build (orders builds of one read model).
    pub build_generation: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CommitOutcome {
    /// Checkpoints written; commit the transaction.
    Recorded,
    /// Some partition is no longer ours at the claimed epoch: roll back everything.
    Fenced,
    /// The plugin build that handled the batch is no longer the registered one for its read
    /// model (a swap happened): roll back; the new build handles these events.
    Superseded,
}

const RECORD_BATCH: &str = "
WITH claimed AS (
    SELECT o.partition, o.epoch
      FROM unnest($3::int[], $4::bigint[]) AS o(partition, epoch)
), fence AS (
    SELECT p.partition
      FROM projection_host.partitions p
      JOIN claimed c ON c.partition = p.partition AND c.epoch = p.epoch
     WHERE p.replica_set = $1 AND p.owner = $2
       FOR SHARE OF p
), track AS (
    -- The read model is still run (a promoted rebuild retires the old one's whole track) ...
    SELECT 1 FROM projection_host.plugins
     WHERE replica_set = $1 AND track = $5 AND state IN ('active', 'building')
       FOR SHARE
), current AS (
    -- ... by this build or a newer one that has not yet written these partitions. Read models
    -- without a registry entry (library use) are not version-fenced.
    SELECT NOT EXISTS (SELECT 1 FROM projection_host.plugins WHERE replica_set = $1 AND track = $5)
        OR (EXISTS (SELECT 1 FROM track)
            AND EXISTS (SELECT 1 FROM projection_host.plugins WHERE replica_set = $1 AND track = $5 AND sha256 = $10)
            AND NOT EXISTS (SELECT 1 FROM projection_host.checkpoints
                             WHERE replica_set = $1 AND projection = $5 AND partition = ANY($3) AND build_generation > $11)) AS ok
), guard AS (
    SELECT count(*) = cardinality($3::int[]) AND (SELECT ok FROM current) AS held,
           (SELECT ok FROM current) AS current_build
      FROM fence
), checkpoint AS (
    INSERT INTO projection_host.checkpoints AS c (replica_set, projection, partition, position, updated_at, build_generation)
    SELECT $1, $5, claimed.partition, $7, now(), $11 FROM claimed, guard WHERE guard.held
    ON CONFLICT (replica_set, projection, partition)
    DO UPDATE SET position = GREATEST(c.position, EXCLUDED.position), updated_at = EXCLUDED.updated_at,
                  build_generation = GREATEST(c.build_generation, EXCLUDED.build_generation)
    RETURNING 1
), audit AS (
    INSERT INTO projection_host.batches
        (replica_set, projection, worker_id, partitions, epochs, from_position, to_position,
         events, plugin_version, plugin_sha256)
    SELECT $1, $5, $2, $3, $4, $6, $7, $8, $9, $10 FROM guard WHERE guard.held
    RETURNING 1
)
SELECT held, current_build, (SELECT count(*) FROM checkpoint) AS written FROM guard";

/// Writes checkpoints and the audit row if the fence holds. Runs inside the batch transaction.
pub async fn record_batch(
    conn: &mut PgConnection,
    batch: &BatchCommit<'_>,
) -> Result<CommitOutcome, sqlx::Error> {
    let partitions: Vec<i32> = batch.partitions.iter().map(|(p, _)| p.as_i32()).collect();
    let epochs: Vec<i64> = batch.partitions.iter().map(|(_, e)| e.0).collect();
    let (held, current_build, _written): (bool, bool, i64) = sqlx::query_as(RECORD_BATCH)
        .bind(batch.replica_set)
        .bind(batch.worker.as_str())
        .bind(&partitions)
        .bind(&epochs)
        .bind(batch.projection)
        .bind(batch.from_position)
        .bind(batch.to_position)
        .bind(i32::try_from(batch.events).unwrap_or(i32::MAX))
        .bind(batch.plugin_version)
        .bind(batch.plugin_sha256)
        .bind(batch.build_generation)
        .fetch_one(&mut *conn)
        .await?;
    Ok(if held {
        CommitOutcome::Recorded
    } else if !current_build {
        CommitOutcome::Superseded
    } else {
        CommitOutcome::Fenced
    })
}
