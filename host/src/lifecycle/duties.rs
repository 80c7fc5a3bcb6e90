//! The lifecycle's periodic duties, run by the replica set's leader once per coordination
//! round: promote rebuilds that caught up, drop the data of long-retired versions, drop carried
//! checkpoints every partition has passed.

use std::time::Duration;

use sqlx::PgPool;

use crate::db::QualifiedName;

/// What the duties need to know about the replica set.
pub struct Duties<'a> {
    pub pool: &'a PgPool,
    pub replica_set: &'a str,
    pub events_table: &'a QualifiedName,
    pub partitions: u32,
    /// A rebuild is promoted once every partition is at most this far behind the head.
    pub promote_lag: i64,
    /// How long a retired version's read model is kept.
    pub retired_grace: Duration,
}

/// Runs the duties. Failures are logged; the leader's next round tries again.
pub async fn run(duties: &Duties<'_>) {
    let promoted = match crate::source::stream_head(duties.pool, duties.events_table).await {
        Ok(head) => super::registry::promote_caught_up(
            duties.pool,
            duties.replica_set,
            duties.partitions,
            duties.promote_lag,
            head,
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = promoted {
        tracing::warn!(error = %e, "promoting caught-up rebuilds failed");
    }
    if let Err(e) =
        super::registry::drop_retired_data(duties.pool, duties.replica_set, duties.retired_grace)
            .await
    {
        tracing::warn!(error = %e, "dropping the data of retired plugin versions failed");
    }
    match crate::store::carried::drop_passed(duties.pool, duties.replica_set).await {
        Ok(0) => {}
        Ok(dropped) => {
            tracing::info!(dropped, "every partition passed the checkpoints carried over from an earlier partitioning; dropped them")
        }
        Err(e) => tracing::warn!(error = %e, "dropping passed carried checkpoints failed"),
    }
}
