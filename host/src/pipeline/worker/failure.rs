//! What a worker does when a batch fails: why it failed, what to tell the operator, and what
//! happens next (narrowing the failure down at once, a held retry of the failing event, the
//! failure policy once it keeps failing, or a backoff for what affects the whole worker).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;

use super::ProjectionWorker;
use crate::base::retry::backoff;
use crate::ids::PartitionId;
use crate::pipeline::containment::{Containment, Failure, Handed, Verdict};
use crate::pipeline::policy::OnFailure;
use crate::pipeline::status::ProjectionState;
use crate::runtime::limits::Breach;
use crate::runtime::PluginFailure;
use crate::sink::role::RoleError;
use crate::store::halts;

/// Why a batch did not commit.
#[derive(Debug, thiserror::Error)]
pub(super) enum BatchError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("{failure}")]
    Plugin {
        failure: PluginFailure,
        /// What the plugin was given (empty for a failed setup).
        batch: FailedBatch,
    },
    #[error("this worker no longer owns every partition of the batch (fenced); the batch was rolled back")]
    Fenced,
    #[error("another plugin build took over this read model (swap); the batch was rolled back and is handled by the new build")]
    Superseded,
    #[error("cannot create a plugin instance: {0}")]
    Instantiate(String),
    #[error("setting up the projection's database role failed: {0}")]
    Role(#[from] RoleError),
    #[error("{0}")]
    Refused(String),
}

/// The batch a plugin failed, for narrowing the failure down.
#[derive(Debug, Clone, Default)]
pub(super) struct FailedBatch {
    /// The range it covered: `(from, up_to]`.
    pub from: i64,
    pub up_to: i64,
    pub partitions: Vec<PartitionId>,
    /// The events handed to the plugin, in position order.
    pub handed: Vec<Handed>,
}

impl FailedBatch {
    /// Where the failure happened, for the log: the event the plugin named, or the range.
    pub fn describe(&self, named: Option<i64>) -> String {
        match (named, &self.handed[..]) {
            (Some(p), _) => format!("event at position {p}"),
            (None, []) => "setup".to_string(),
            (None, [(p, _)]) => format!("event at position {p}"),
            (None, [(first, _), .., (last, _)]) => format!(
                "events at positions {first}..={last} ({} events)",
                self.handed.len()
            ),
        }
    }
}

/// Whose doing a failed batch was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Blame {
    Plugin,
    /// The database, the network, fencing: nothing the plugin can fix.
    Database,
}

impl Blame {
    /// The `reason` label of the failed-batch counter.
    pub fn label(self) -> &'static str {
        match self {
            Blame::Plugin => "plugin",
            Blame::Database => "database",
        }
    }
}

impl BatchError {
    /// Whose doing the failure was (a transient plugin failure is the database's: a
    /// serialization failure, a deadlock).
    pub fn blame(&self) -> Blame {
        match self {
            BatchError::Plugin { failure, .. } if failure.is_transient() => Blame::Database,
            BatchError::Plugin { .. } | BatchError::Instantiate(_) | BatchError::Refused(_) => {
                Blame::Plugin
            }
            _ => Blame::Database,
        }
    }
}

/// What a worker knows about failing events of its partitions.
pub(super) struct Failures {
    /// Narrowing of plugin failures, and partitions held aside while their event is retried.
    pub containment: Containment,
    /// Halted partitions and the position they halted at (stop policy).
    pub halted: HashMap<PartitionId, i64>,
    /// Aggregates with parked events in the partitions held (dead-letter policy).
    pub parked: HashSet<String>,
    /// The dead-letter policy decided to park this event (position, error) in the next batch.
    pub park_next: HashMap<i64, String>,
    /// Failures in a row that affect the whole worker (setup, database): the backoff's attempt.
    pub consecutive: u32,
}

impl Failures {
    pub fn new(max_retries: u32) -> Failures {
        Failures {
            containment: Containment::new(max_retries),
            halted: HashMap::new(),
            parked: HashSet::new(),
            park_next: HashMap::new(),
            consecutive: 0,
        }
    }

    /// Another plugin build took over: it may not fail where the old one did.
    pub fn forget_for_new_build(&mut self) {
        self.containment.clear();
        self.park_next.clear();
    }
}

impl ProjectionWorker {
    /// Reports a failed batch and decides what happens next. A plugin failure is contained:
    /// narrowing steps follow at once, and a known failing event is retried later while its
    /// partition is held aside. Only what affects the whole worker (the database, a failed
    /// setup, a transient error) waits here, with backoff.
    pub(super) async fn retry_after(
        &mut self,
        stop: &CancellationToken,
        partitions: &[PartitionId],
        error: BatchError,
    ) {
        let generation = self.metrics.generation.get();
        let partition_list = PartitionId::list(partitions);
        match error {
            BatchError::Fenced => {
                self.metrics.batch_fenced(self.name());
                tracing::warn!(projection = self.name(), "{error}");
                return;
            }
            BatchError::Superseded => {
                tracing::info!(projection = self.name(), "{error}");
                // A newer build already wrote here: wait until it is ready on this host too.
                let mut registry = self.registry.clone();
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = registry.changed() => {}
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                }
                return;
            }
            _ => {}
        }
        let blame = error.blame();
        self.metrics.batch_failed(self.name(), blame.label());
        self.reading.limit = self.config.batch_size;
        let (message, verdict) = self.judge(&error);
        // Server messages can carry plugin data (a trigger's RAISE): one bounded line.
        let message = crate::base::text::plugin_message(&message);
        self.report_error(&message);
        match verdict {
            Verdict::Narrowed => {
                tracing::error!(
                    projection = self.name(),
                    generation,
                    partitions = partitions.len(),
                    partition_list = %partition_list,
                    "batch rolled back: {message}; re-running it in parts to commit the healthy partitions and find the failing event"
                );
            }
            Verdict::Retry {
                event: (position, partition),
                attempt,
                delay,
            } => {
                tracing::error!(
                    projection = self.name(),
                    generation,
                    partition = partition.0,
                    position,
                    attempt,
                    retry_in = ?delay,
                    "batch rolled back: {message}; the partition waits for the retry, the others go on"
                );
            }
            Verdict::GiveUp {
                event: (position, partition),
                attempts,
            } => {
                tracing::error!(
                    projection = self.name(),
                    generation,
                    partition = partition.0,
                    position,
                    attempts,
                    "batch rolled back: {message}; giving up on the event"
                );
                self.give_up(position, partition, &message).await;
            }
            Verdict::Unlocated => {
                self.failures.consecutive += 1;
                let delay = backoff(
                    self.failures.consecutive,
                    Duration::from_millis(100),
                    Duration::from_secs(30),
                );
                if blame == Blame::Database {
                    tracing::warn!(projection = self.name(), generation, partitions = partitions.len(), partition_list = %partition_list, attempt = self.failures.consecutive, retry_in = ?delay, "batch rolled back: {message}");
                } else {
                    tracing::error!(projection = self.name(), generation, partitions = partitions.len(), partition_list = %partition_list, attempt = self.failures.consecutive, retry_in = ?delay, "batch rolled back: {message}");
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    /// What the failure says (with where it happened) and what follows it. A plugin failure
    /// that is not transient goes to the containment, which keeps the batch's range for the
    /// narrowing steps.
    fn judge(&mut self, error: &BatchError) -> (String, Verdict) {
        match error {
            BatchError::Plugin { failure, batch } => {
                if let PluginFailure::Limit { breach, .. } = failure {
                    self.metrics.limit_tripped(
                        self.name(),
                        match breach {
                            Breach::Deadline(_) => "deadline",
                            Breach::Memory(_) => "memory",
                        },
                    );
                }
                let named = failure
                    .position()
                    .filter(|p| batch.handed.iter().any(|(q, _)| q == p));
                let message = format!("{error} [while handling {}]", batch.describe(named));
                let verdict = if failure.is_transient() {
                    Verdict::Unlocated
                } else {
                    self.reading.retain(batch);
                    self.failures.containment.failed(
                        Failure {
                            partitions: &batch.partitions,
                            up_to: batch.up_to,
                            handed: &batch.handed,
                            position: named,
                        },
                        Instant::now(),
                    )
                };
                (message, verdict)
            }
            other => (other.to_string(), Verdict::Unlocated),
        }
    }

    /// The failure policy, once one event failed `max_retries` + 1 times.
    pub(super) async fn give_up(&mut self, position: i64, partition: PartitionId, message: &str) {
        match self.config.settings.on_failure {
            OnFailure::DeadLetter => {
                // The held partition's next step parks it (with its aggregate's later events)
                // and commits the checkpoint past it.
                self.failures
                    .park_next
                    .insert(position, message.to_string());
                self.failures
                    .containment
                    .retry_now(partition, Instant::now());
            }
            OnFailure::Stop => {
                let Some(epoch) = self.checkpoints.epoch(partition) else {
                    // Not held any more: its new owner meets the event itself.
                    self.failures.containment.release(partition);
                    return;
                };
                match halts::halt(
                    &self.pool,
                    (&self.config.worker, epoch),
                    &self.config.replica_set,
                    &self.config.track,
                    partition,
                    position,
                    message,
                )
                .await
                {
                    Ok(false) => {
                        tracing::warn!(
                            projection = self.name(),
                            partition = partition.0,
                            position,
                            "the failing event's partition is no longer this worker's (a handover or a resize); its new owner meets the event itself"
                        );
                        self.failures.containment.release(partition);
                        self.coordinator.wake();
                    }
                    Ok(true) => {
                        self.failures.halted.insert(partition, position);
                        self.failures.containment.release(partition);
                        let aggregate = self
                            .reading
                            .retained_aggregate(position)
                            .unwrap_or_default();
                        tracing::error!(
                            projection = self.name(),
                            generation = self.metrics.generation.get(),
                            partition = partition.0,
                            position,
                            aggregate = %aggregate,
                            "partition halted at a failing event (ON_FAILURE=stop); other partitions go on; fix the cause and run `projection-host resume {}`",
                            self.name()
                        );
                    }
                    Err(e) => {
                        // The partition stays held: its next retry (after the backoff, which
                        // keeps growing) fails again and gives up again.
                        tracing::warn!(projection = self.name(), error = %e, "could not record the halt; retrying")
                    }
                }
            }
        }
    }

    pub(super) fn report_error(&self, message: &str) {
        self.board.record_error(self.name(), message);
        let message = message.to_string();
        self.board.update(self.name(), |s| {
            s.state = ProjectionState::Failing;
            s.last_error = Some(message);
            s.last_error_at = Some(chrono::Utc::now());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(handed: &[i64]) -> FailedBatch {
        FailedBatch {
            from: 0,
            up_to: handed.last().copied().unwrap_or(0),
            partitions: vec![PartitionId(0)],
            handed: handed.iter().map(|p| (*p, PartitionId(0))).collect(),
        }
    }

    #[test]
    fn a_failure_the_plugin_located_names_its_event() {
        assert_eq!(batch(&[3, 5, 9]).describe(Some(5)), "event at position 5");
    }

    #[test]
    fn an_unlocated_failure_names_the_range_it_was_handed() {
        assert_eq!(
            batch(&[3, 5, 9]).describe(None),
            "events at positions 3..=9 (3 events)"
        );
        assert_eq!(batch(&[7]).describe(None), "event at position 7");
    }

    #[test]
    fn a_failure_with_no_event_handed_is_the_setup() {
        assert_eq!(batch(&[]).describe(None), "setup");
    }

    #[test]
    fn fencing_and_database_errors_count_as_the_databases_and_refusals_as_the_plugins() {
        assert_eq!(BatchError::Fenced.blame(), Blame::Database);
        assert_eq!(
            BatchError::Database(sqlx::Error::PoolTimedOut).blame(),
            Blame::Database
        );
        assert_eq!(BatchError::Refused("no".into()).blame(), Blame::Plugin);
        assert_eq!(
            BatchError::Instantiate("trap".into()).blame(),
            Blame::Plugin
        );
    }
}
