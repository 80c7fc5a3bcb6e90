//! The end of every batch: checkpoints and the batch audit row, written in the batch's
//! transaction only if this worker still owns every partition of the batch at the epoch it
//! claimed it with (the fencing guard). The guard locks the partition rows `FOR SHARE`, so a
//! concurrent claim (which updates them) waits for this commit, or this commit sees the new
//! epoch and writes nothing. Only the host process can record a batch: the call carries its
//! secret commit token.

use sqlx::PgConnection;

pub use crate::store::Caller;

use crate::ids::{Epoch, PartitionId};

/// Everything the commit records about one batch.
#[derive(Debug)]
pub struct BatchCommit<'a> {
    pub caller: Caller<'a>,
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

/// The host's bookkeeping is done by `projection_host_api.commit_batch` (see the migrations):
/// the batch's session belongs to the projection's role, which has no privilege on the host's
/// tables. The call is not prepared under a name (`persistent(false)`), so that nothing the
/// plugin prepared on its session can stand in for it and see the commit token.
const RECORD_BATCH: &str = "SELECT held, current_build FROM projection_host_api.commit_batch(
    $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// Writes checkpoints and the audit row if the fence holds. Runs inside the batch transaction.
pub async fn record_batch(
    conn: &mut PgConnection,
    batch: &BatchCommit<'_>,
) -> Result<CommitOutcome, sqlx::Error> {
    let partitions: Vec<i32> = batch.partitions.iter().map(|(p, _)| p.as_i32()).collect();
    let epochs: Vec<i64> = batch.partitions.iter().map(|(_, e)| e.0).collect();
    let (held, current_build): (bool, bool) = sqlx::query_as(RECORD_BATCH)
        .persistent(false)
        .bind(batch.caller.replica_set)
        .bind(batch.caller.worker.as_str())
        .bind(batch.caller.token.secret())
        .bind(batch.caller.projection)
        .bind(&partitions)
        .bind(&epochs)
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
