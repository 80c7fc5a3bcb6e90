//! One batch, start to commit: read (or take the prefetched page), hand the events of the
//! leased partitions not yet applied to the plugin in a transaction on the projection's own
//! session, park what the dead-letter policy parks, record the checkpoints behind the fences
//! and commit. Also the narrowing steps of a failed batch and an operator's retry of parked
//! events, which end the same way.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use super::failure::{BatchError, FailedBatch};
use super::reader::{cut_to_bytes, next_limit};
use super::ProjectionWorker;
use crate::ids::{Epoch, PartitionId};
use crate::pipeline::containment::{Handed, Step};
use crate::runtime::PluginFailure;
use crate::sink::commit::{record_batch, BatchCommit, CommitOutcome};
use crate::sink::session::{BatchTx, TxSettings};
use crate::source::{Page, StoredEvent};
use crate::store::dead_letters::{self, ToPark};

impl ProjectionWorker {
    /// Starts a transaction on the projection's own session.
    pub(super) async fn begin(&mut self) -> Result<BatchTx, BatchError> {
        let settings = TxSettings {
            schema: self.config.namespace.clone(),
            statement_timeout: self.config.settings.call_timeout,
            // A batch never idles in its transaction for longer than a plugin call.
            idle_timeout: self.config.settings.call_timeout + Duration::from_secs(30),
        };
        let session = self.build.session.as_mut().ok_or_else(|| {
            BatchError::Instantiate("the projection's session is not set up".into())
        })?;
        Ok(session.begin(&settings).await?)
    }

    /// One batch over the active partitions. Returns the events applied and the position covered.
    pub(super) async fn process(
        &mut self,
        active: &[(PartitionId, Epoch)],
        from: i64,
        safe_head: i64,
    ) -> Result<(usize, i64), BatchError> {
        let started = Instant::now();
        let Page {
            mut events,
            covered_to,
            more,
        } = self.reading.read(from, safe_head).await?;
        self.stages.read += started.elapsed();
        // Cap the bytes handed to one call (limit max_batch_bytes): the batch then covers only
        // up to its last event.
        let cut = cut_to_bytes(&mut events, self.config.settings.max_batch_bytes);
        let covered_to = match events.last() {
            Some(last) if cut => last.global_position,
            _ => covered_to,
        };
        let more = more || cut;
        if more {
            // Catching up: read the next page while this batch runs.
            let limit = self.next_limit(true);
            self.reading
                .start_prefetch(covered_to, self.head.current().safe, limit);
        }
        let handed = self
            .apply(active, from, covered_to, events, started)
            .await?;
        self.reading.limit = self.next_limit(more);
        Ok((handed, covered_to))
    }

    /// Re-runs a part of a failed batch from the retained events.
    pub(super) async fn run_step(
        &mut self,
        scope: &[(PartitionId, Epoch)],
        step: &Step,
    ) -> Result<(usize, i64), BatchError> {
        let started = Instant::now();
        let from = self.checkpoints.lowest(scope);
        if step.up_to <= from {
            // Already applied (another step, or another worker before a re-claim).
            return Ok((0, from));
        }
        let events = self
            .reading
            .step_events(scope, from, step.up_to, self.config.partitions)
            .await?;
        self.stages.read += started.elapsed();
        let handed = self.apply(scope, from, step.up_to, events, started).await?;
        Ok((handed, step.up_to))
    }

    /// Hands the events of `active` partitions not yet applied to the plugin (parking what the
    /// dead-letter policy parks), and commits them with checkpoints at `covered_to`.
    pub(super) async fn apply(
        &mut self,
        active: &[(PartitionId, Epoch)],
        from: i64,
        covered_to: i64,
        events: Vec<StoredEvent>,
        started: Instant,
    ) -> Result<usize, BatchError> {
        let partitions = self.config.partitions;
        let active_set: HashSet<PartitionId> = active.iter().map(|(p, _)| *p).collect();
        let mut parked_failing: Vec<i64> = Vec::new();
        // Aggregates parked by this batch: known to later events of the batch at once, and to
        // later batches only once it committed.
        let mut newly_parked: HashSet<String> = HashSet::new();
        let mut mine = Vec::with_capacity(events.len());
        let mut index: Vec<Handed> = Vec::with_capacity(events.len());
        let mut park: Vec<(PartitionId, StoredEvent, String)> = Vec::new();
        for e in events {
            let p = PartitionId::of(&e.aggregate_id, partitions);
            if !active_set.contains(&p) || e.global_position <= self.checkpoints.get(p) {
                continue;
            }
            if self.carried.applied(&e.aggregate_id, e.global_position) {
                // Applied under an earlier partitioning (before a resize or an import).
                continue;
            }
            if let Some(error) = self.failures.park_next.get(&e.global_position) {
                let position = e.global_position;
                parked_failing.push(position);
                newly_parked.insert(e.aggregate_id.clone());
                park.push((
                    p,
                    e,
                    format!(
                        "failed {} times: {error}",
                        self.config.settings.max_retries + 1
                    ),
                ));
                tracing::debug!(
                    projection = self.name(),
                    position,
                    "parking the failing event"
                );
            } else if self.failures.parked.contains(&e.aggregate_id)
                || newly_parked.contains(&e.aggregate_id)
            {
                park.push((
                    p,
                    e,
                    "follows a parked event of the same aggregate".to_string(),
                ));
            } else {
                index.push((e.global_position, p));
                mine.push(e);
            }
        }

        let mut tx = self.begin().await?;
        let plugin_started = Instant::now();
        let handed = mine.len();
        if !mine.is_empty() {
            tx = match self.handle(tx, mine).await {
                Err(BatchError::Plugin { failure, .. }) => {
                    return Err(BatchError::Plugin {
                        failure,
                        batch: FailedBatch {
                            from,
                            up_to: covered_to,
                            partitions: active.iter().map(|(p, _)| *p).collect(),
                            handed: index,
                        },
                    })
                }
                other => other?,
            };
        }
        let plugin_seconds = plugin_started.elapsed().as_secs_f64();
        self.stages.handle += plugin_started.elapsed();
        let commit_started = Instant::now();
        let parked_now: Vec<ToPark<'_>> = park
            .iter()
            .map(|(p, e, error)| ToPark {
                partition: *p,
                position: e.global_position,
                aggregate_id: &e.aggregate_id,
                event_type: &e.event_type,
                error,
            })
            .collect();
        tx.seal(self.config.settings.call_timeout).await?;
        dead_letters::park(tx.conn(), self.caller(), &parked_now).await?;
        self.commit(tx, active, from, covered_to, handed).await?;
        self.failures.parked.extend(newly_parked);
        self.stages.commit += commit_started.elapsed();
        self.checkpoints.advance(active, covered_to);
        if !park.is_empty() {
            for position in parked_failing {
                let partition = park
                    .iter()
                    .find(|(_, e, _)| e.global_position == position)
                    .map_or(0, |(p, _, _)| p.0);
                tracing::error!(
                    projection = self.name(),
                    generation = self.metrics.generation.get(),
                    partition,
                    position,
                    "parked the failing event in the dead-letter list; later events of its aggregate will be parked too (list them with `projection-host dead-letters list`)"
                );
                self.failures.park_next.remove(&position);
            }
            self.publish_dead_letters().await?;
        }
        self.metrics.batch_committed(
            self.name(),
            handed,
            started.elapsed().as_secs_f64(),
            plugin_seconds,
        );
        Ok(handed)
    }

    /// Applies the parked events an operator asked to retry (in position order, so each
    /// aggregate's order is kept); they leave the list only if the plugin accepts them.
    pub(super) async fn replay(
        &mut self,
        active: &[(PartitionId, Epoch)],
    ) -> Result<(), BatchError> {
        let partitions: Vec<i32> = active.iter().map(|(p, _)| p.as_i32()).collect();
        let requested = dead_letters::retry_requests(
            &self.pool,
            &self.config.replica_set,
            &self.config.track,
            &partitions,
        )
        .await?;
        if requested.is_empty() {
            return Ok(());
        }
        let ids: Vec<i64> = requested.iter().map(|d| d.id).collect();
        let positions: Vec<i64> = requested.iter().map(|d| d.position).collect();
        let events = self.reading.read_positions(&positions).await?;
        let count = events.len();
        let tx = self.begin().await?;
        let result = self.handle(tx, events).await;
        let mut tx = match result {
            Ok(tx) => tx,
            Err(e) => {
                dead_letters::retry_failed(&self.pool, &ids, &e.to_string()).await?;
                tracing::error!(projection = self.name(), events = count, error = %e, "retrying parked events failed; they stay parked");
                self.board
                    .record_error(self.name(), &format!("retrying parked events failed: {e}"));
                self.reload_failures().await?;
                return Ok(());
            }
        };
        tx.seal(self.config.settings.call_timeout).await?;
        dead_letters::remove(tx.conn(), self.caller(), &ids).await?;
        let lowest = self.checkpoints.lowest(active);
        self.commit(tx, active, lowest, lowest, count).await?;
        tracing::info!(
            projection = self.name(),
            events = count,
            "applied parked events on an operator's request"
        );
        self.reload_failures().await?;
        Ok(())
    }

    /// Records checkpoints and the audit row behind the fences (after [`BatchTx::seal`]), and
    /// commits; a fenced or superseded batch rolls back whole.
    pub(super) async fn commit(
        &mut self,
        mut tx: BatchTx,
        active: &[(PartitionId, Epoch)],
        from: i64,
        to: i64,
        events: usize,
    ) -> Result<(), BatchError> {
        let outcome = record_batch(
            tx.conn(),
            &BatchCommit {
                caller: self.caller(),
                partitions: active,
                from_position: from,
                to_position: to,
                events,
                plugin_version: &self.build.plugin.version,
                plugin_sha256: &self.build.plugin.sha256,
                build_generation: self.build.generation,
            },
        )
        .await?;
        match outcome {
            CommitOutcome::Recorded => Ok(tx.commit().await?),
            CommitOutcome::Fenced => {
                tx.rollback().await?;
                let lost: Vec<PartitionId> = active.iter().map(|(p, _)| *p).collect();
                self.ownership.forfeit(&lost);
                self.coordinator.wake();
                Err(BatchError::Fenced)
            }
            CommitOutcome::Superseded => {
                tx.rollback().await?;
                self.coordinator.wake();
                Err(BatchError::Superseded)
            }
        }
    }

    /// Large batches while catching up, small ones when live.
    pub(super) fn next_limit(&self, full: bool) -> u32 {
        next_limit(
            self.reading.limit,
            full,
            self.config.batch_size,
            self.config.max_batch_size,
        )
    }

    pub(super) async fn handle(
        &mut self,
        tx: BatchTx,
        events: Vec<StoredEvent>,
    ) -> Result<BatchTx, BatchError> {
        let first = events.first().map_or(0, |e| e.global_position);
        let last = events.last().map_or(0, |e| e.global_position);
        let count = events.len();
        tracing::debug!(
            projection = self.name(),
            events = count,
            first,
            last,
            "calling the plugin"
        );
        let instance = self.instance().await?;
        let outcome = instance.handle_batch(tx, events).await;
        let mut tx = outcome.tx;
        let mut result = outcome.result;
        if let (Ok(()), Some(t)) = (&result, tx.as_mut()) {
            // Large objects live outside every schema: the plugin's batch may not keep one.
            if let Err(e) = t.refuse_large_objects().await {
                result = Err(PluginFailure::Sql(crate::sink::EffectError {
                    kind: crate::sink::EffectErrorKind::PermissionDenied,
                    message: e.to_string(),
                    database: None,
                }));
            }
        }
        match result {
            Ok(()) => tx.ok_or_else(|| {
                BatchError::Instantiate("the plugin call lost its transaction".into())
            }),
            Err(failure) => {
                if let Some(tx) = tx {
                    // Ends a poisoned session on the server; rolls back a healthy one.
                    let _ = tx.rollback().await;
                }
                if failure.poisons_instance() {
                    // A trapped instance cannot be entered again; the next batch gets a new one.
                    self.build.instance = None;
                }
                // The caller knows the batch and attaches it.
                Err(BatchError::Plugin {
                    failure,
                    batch: FailedBatch::default(),
                })
            }
        }
    }
}
