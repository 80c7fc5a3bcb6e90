//! What a worker loads about the partitions it holds: their checkpoints (again after each new
//! claim), halts and parked aggregates (again after an operator acted), and the dead-letter
//! gauges.

use std::collections::HashMap;

use sqlx::PgPool;

use super::failure::BatchError;
use super::{PipelineConfig, ProjectionWorker};
use crate::coordination::Lease;
use crate::store::dead_letters;
use crate::store::{carried, checkpoints};

impl ProjectionWorker {
    /// Loads the checkpoints (and parked aggregates) of partitions claimed since the last batch:
    /// a new epoch means a new claim, and another worker may have advanced them meanwhile.
    pub(super) async fn refresh_checkpoints(&mut self, lease: &Lease) -> Result<(), BatchError> {
        let stale = self.checkpoints.stale(&lease.partitions);
        if stale.is_empty() {
            return Ok(());
        }
        let stale_ids: Vec<i32> = stale.iter().map(|p| p.as_i32()).collect();
        let found = checkpoints::load(
            &self.pool,
            &self.config.replica_set,
            &self.config.track,
            &stale_ids,
        )
        .await?;
        refuse_checkpoints_past_the_head(&self.pool, &self.config, self.head.current().raw, &found)
            .await?;
        // Read with the checkpoints they complete (a resize writes both at once).
        self.carried =
            carried::load(&self.pool, &self.config.replica_set, &self.config.track).await?;
        for (p, e) in &lease.partitions {
            if stale.contains(p) {
                self.checkpoints
                    .loaded(*p, *e, found.get(&p.as_i32()).copied().unwrap_or(0));
            }
        }
        self.failures.parked.extend(
            dead_letters::parked_aggregates(
                &self.pool,
                &self.config.replica_set,
                &self.config.track,
                &stale_ids,
            )
            .await?,
        );
        self.publish_dead_letters().await?;
        Ok(())
    }

    /// Re-reads halts and parked aggregates after an operator acted.
    pub(super) async fn reload_failures(&mut self) -> Result<(), sqlx::Error> {
        self.failures.halted =
            crate::store::halts::halts(&self.pool, &self.config.replica_set, &self.config.track)
                .await?;
        let held: Vec<i32> = self.checkpoints.partitions().map(|p| p.as_i32()).collect();
        self.failures.parked = dead_letters::parked_aggregates(
            &self.pool,
            &self.config.replica_set,
            &self.config.track,
            &held,
        )
        .await?;
        self.publish_dead_letters().await
    }

    /// The dead-letter gauges: the projection's total, and per partition held.
    pub(super) async fn publish_dead_letters(&mut self) -> Result<(), sqlx::Error> {
        let by_partition = dead_letters::count_by_partition(
            &self.pool,
            &self.config.replica_set,
            &self.config.track,
        )
        .await?;
        self.metrics
            .set_dead_letters(self.name(), by_partition.values().sum());
        for (p, _) in self.ownership.held() {
            let count = by_partition.get(&p.as_i32()).copied().unwrap_or(0);
            self.metrics
                .set_partition_dead_letters(self.name(), p.0, count);
        }
        Ok(())
    }
}

/// A checkpoint can never be above the highest event: one that is (written by hand, or left
/// from another events table) would make the partition skip every event up to it. The
/// projection is refused, naming what is wrong, until an operator fixes the checkpoint.
async fn refuse_checkpoints_past_the_head(
    pool: &PgPool,
    config: &PipelineConfig,
    seen_head: i64,
    found: &HashMap<i32, i64>,
) -> Result<(), BatchError> {
    if found.values().all(|p| *p <= seen_head) {
        return Ok(());
    }
    // This host's view of the head may lag another's: ask the table itself.
    let head = crate::source::stream_head(pool, &config.events_table).await?;
    let mut past: Vec<(i32, i64)> = found
        .iter()
        .filter(|(_, p)| **p > head)
        .map(|(k, v)| (*k, *v))
        .collect();
    if past.is_empty() {
        return Ok(());
    }
    past.sort();
    let list: Vec<String> = past
        .iter()
        .map(|(p, v)| format!("partition {p} at {v}"))
        .collect();
    Err(BatchError::Refused(format!(
        "projection {} has checkpoints above the highest event position {head} ({}): they would skip events. \
         Not running it; correct them ({})",
        config.track,
        list.join(", "),
        checkpoints::correction_hint(&config.replica_set, &config.track)
    )))
}
