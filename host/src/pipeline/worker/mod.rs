//! `ProjectionWorker`: one projection's loop over this worker's partitions.
//!
//! Each step: lease the usable partitions -> decide what to do ([`step::next_step`], pure) ->
//! a batch reads subscribed events after the lowest of their checkpoints, up to the safe head,
//! keeps the events of leased partitions not yet applied, runs `handle-batch` inside a
//! transaction (under the projection's role), flushes the writes, parks what the dead-letter
//! policy parks, records checkpoints (fenced) and commits ([`batch`]). Whatever fails, the
//! transaction rolls back and the same range is read again, so an event is applied exactly once.
//!
//! When the plugin fails, the failure is contained by partition ([`failure`], over the pure
//! `Containment`): the batch is re-run in parts so that every healthy partition commits at once,
//! the failing event is found without waiting, its partition is held aside while the event is
//! retried `max_retries` times, and then the projection's failure policy applies: halt that
//! partition (stop) or park the event and its aggregate's later events (dead-letter).
//!
//! The state is split by owner: [`build::BuildSlot`] (the plugin and its instance, the next
//! build), [`reader::BatchReader`] (reads, prefetch, the retained failed batch),
//! [`checkpoints::Checkpoints`], [`failure::Failures`] and [`report::ReportThrottle`].

mod batch;
mod build;
mod checkpoints;
mod failure;
mod partitions;
mod reader;
mod report;
mod step;

use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use self::build::{apply_limits, BuildSlot};
use self::checkpoints::Checkpoints;
use self::failure::{BatchError, Failures};
use self::reader::BatchReader;
use self::report::ReportThrottle;
use self::step::{next_step, replay_scope, Observation, WorkerStep};
use super::policy::ProjectionSettings;
use super::progress::Progress;
use super::status::{ProjectionState, ProjectionStatus, StatusBoard};
use crate::base::retry::{backoff, sleep_until};
use crate::coordination::controls::Shared as Controls;
use crate::coordination::{Lease, Ownership};
use crate::db::quote_ident;
use crate::ids::{CommitToken, Epoch, PartitionId, WorkerId};
use crate::lifecycle::{PluginCache, Registry};
use crate::metrics::HostMetrics;
use crate::runtime::{Plugin, PluginInstance, Runtime};
use crate::sink::commit::Caller;
use crate::sink::SqlIsolation;
use crate::source::wakeup::Wakeup;
use crate::source::{EventReader, Head, SafeHead};

/// How often a waiting pipeline (paused, or every partition halted) republishes its lag.
const LAG_REFRESH: Duration = Duration::from_secs(1);

/// What every projection pipeline of a host shares.
#[derive(Clone)]
pub struct PipelineContext {
    pub runtime: Arc<Runtime>,
    pub pool: PgPool,
    pub ownership: Arc<Ownership>,
    pub head: SafeHead,
    pub metrics: HostMetrics,
    pub board: StatusBoard,
    /// Wakes the coordinator (after a fenced commit).
    pub coordinator: Wakeup,
    /// Operator controls: pauses, halts, dead-letter retries.
    pub controls: tokio::sync::watch::Receiver<Controls>,
    /// The plugin versions the fleet runs.
    pub registry: tokio::sync::watch::Receiver<Arc<Registry>>,
    pub cache: Arc<PluginCache>,
    /// How to reach the database; projection sessions log in with these options and the
    /// projection's own role.
    pub session_options: PgConnectOptions,
    /// Proves to the host's batch functions that a call comes from this process.
    pub token: CommitToken,
}

#[derive(Debug, Clone)]
pub struct PipelineConfig {
    pub replica_set: String,
    pub worker: WorkerId,
    pub partitions: u32,
    /// Events per batch while live.
    pub batch_size: u32,
    /// Largest batch while catching up.
    pub max_batch_size: u32,
    pub poll_interval: Duration,
    pub events_table: crate::db::QualifiedName,
    /// `--once`: report caught-up once every partition reached this position.
    pub once_target: Option<i64>,
    pub settings: ProjectionSettings,
    pub isolation: SqlIsolation,
    /// The read model this worker writes: its checkpoint key ...
    pub track: String,
    /// ... and its schema.
    pub namespace: String,
    /// The generation that activated the build this pipeline starts with.
    pub build_generation: i64,
}

/// Where batch time went, summed over the run (logged when the projection stops).
#[derive(Debug, Default)]
struct StageTimes {
    read: Duration,
    handle: Duration,
    commit: Duration,
}

pub struct ProjectionWorker {
    runtime: Arc<Runtime>,
    pool: PgPool,
    ownership: Arc<Ownership>,
    head: SafeHead,
    controls: tokio::sync::watch::Receiver<Controls>,
    registry: tokio::sync::watch::Receiver<Arc<Registry>>,
    cache: Arc<PluginCache>,
    config: PipelineConfig,
    /// Quoted `config.namespace`.
    schema: String,
    session_options: PgConnectOptions,
    token: CommitToken,
    metrics: HostMetrics,
    board: StatusBoard,
    coordinator: Wakeup,
    /// The plugin build this worker runs.
    build: BuildSlot,
    reading: BatchReader,
    checkpoints: Checkpoints,
    /// Checkpoints of an earlier partitioning (a resize, an import): events they say were
    /// applied are skipped.
    carried: crate::store::carried::CarriedSet,
    failures: Failures,
    /// The partition states last published to the metrics, and when.
    published: ReportThrottle,
    stages: StageTimes,
}

/// The lease and operator controls a step starts from.
struct Round {
    lease: Lease,
    controls: Controls,
}

/// A step that could not start: the partitions it was for, and why.
type NotStarted = (Vec<PartitionId>, BatchError);

impl ProjectionWorker {
    pub fn new(
        plugin: Arc<Plugin>,
        mut instance: PluginInstance,
        context: PipelineContext,
        config: PipelineConfig,
    ) -> Self {
        let PipelineContext {
            runtime,
            pool,
            ownership,
            head,
            metrics,
            board,
            coordinator,
            controls,
            registry,
            cache,
            session_options,
            token,
        } = context;
        let schema = quote_ident(&config.namespace);
        apply_limits(&mut instance, &config.settings);
        metrics.register_projection(&config.track, &plugin.version, &plugin.sha256);
        board.insert(ProjectionStatus {
            name: config.track.clone(),
            plugin_version: plugin.version.clone(),
            plugin_sha256: plugin.sha256.clone(),
            state: ProjectionState::Starting,
            events_processed: 0,
            lowest_checkpoint: 0,
            lag_events: 0.0,
            behind: 0,
            last_error: None,
            last_error_at: None,
            last_commit_at: None,
            caught_up: false,
        });
        ProjectionWorker {
            failures: Failures::new(config.settings.max_retries),
            reading: BatchReader::new(
                EventReader::new(&config.events_table, &plugin.subscription),
                pool.clone(),
                config.batch_size,
            ),
            build: BuildSlot::new(plugin, instance, config.build_generation),
            runtime,
            pool,
            ownership,
            head,
            controls,
            registry,
            cache,
            config,
            schema,
            session_options,
            token,
            checkpoints: Checkpoints::default(),
            carried: Default::default(),
            metrics,
            board,
            coordinator,
            stages: StageTimes::default(),
            published: ReportThrottle::default(),
        }
    }

    /// The read model's name: the projection, or `projection@sha` while a rebuild builds.
    fn name(&self) -> &str {
        &self.config.track
    }

    /// Who records this read model's batches.
    fn caller(&self) -> Caller<'_> {
        Caller {
            replica_set: &self.config.replica_set,
            worker: &self.config.worker,
            token: &self.token,
            projection: &self.config.track,
        }
    }

    /// Runs until `stop`: batches already started finish; no new one starts.
    pub async fn run(mut self, stop: CancellationToken) {
        if !self.set_up(&stop).await {
            return self.stopped();
        }
        self.board
            .update(self.name(), |s| s.state = ProjectionState::Running);
        let mut ownership_changed = self.ownership.subscribe();
        let mut progress = Progress::new();
        let mut controls_seen: Option<Controls> = None;
        while !stop.is_cancelled() {
            let round = match self.start_round(&mut controls_seen).await {
                Ok(Some(round)) => round,
                // Retired: this read model is no longer run.
                Ok(None) => break,
                Err((partitions, e)) => {
                    self.retry_after(&stop, &partitions, e).await;
                    continue;
                }
            };
            let (step, head) = match self.decide(&round).await {
                Ok(decided) => decided,
                Err((partitions, e)) => {
                    drop(round);
                    self.retry_after(&stop, &partitions, e).await;
                    continue;
                }
            };
            self.take(
                step,
                round.lease,
                head,
                &stop,
                &mut ownership_changed,
                &mut progress,
            )
            .await;
        }
        let (events, elapsed) = progress.total();
        tracing::info!(
            projection = self.name(),
            events,
            elapsed = ?elapsed,
            read = ?self.stages.read,
            handle = ?self.stages.handle,
            commit = ?self.stages.commit,
            "projection stopped"
        );
        self.stopped();
    }

    /// The first setup of the read model, retried with backoff until it works. Returns false
    /// when stopped first.
    async fn set_up(&mut self, stop: &CancellationToken) -> bool {
        while !stop.is_cancelled() {
            match self.setup().await {
                Ok(()) => {
                    self.build.needs_setup = false;
                    self.failures.consecutive = 0;
                    return true;
                }
                Err(e) => {
                    self.failures.consecutive += 1;
                    let delay = backoff(
                        self.failures.consecutive,
                        Duration::from_millis(200),
                        Duration::from_secs(30),
                    );
                    let error = crate::base::text::plugin_message(&e.to_string());
                    tracing::error!(projection = self.name(), error = %error, retry_in = ?delay, "projection setup failed");
                    self.report_error(&error);
                    tokio::select! {
                        _ = stop.cancelled() => return false,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        false
    }

    /// Follows the registry (a swap, a rename, retirement), re-reads halts and parked
    /// aggregates when an operator acted, takes a lease and loads the checkpoints of partitions
    /// claimed since the last step. `None`: the read model is no longer run.
    async fn start_round(
        &mut self,
        controls_seen: &mut Option<Controls>,
    ) -> Result<Option<Round>, NotStarted> {
        if !self.follow_registry().await.map_err(|e| (Vec::new(), e))? {
            return Ok(None);
        }
        let controls = self.controls.borrow_and_update().clone();
        if controls_seen.as_ref() != Some(&controls) {
            // Halts and parked events may have changed (resume, skip, retry).
            self.reload_failures()
                .await
                .map_err(|e| (Vec::new(), BatchError::Database(e)))?;
            *controls_seen = Some(controls.clone());
        }
        let lease = self.ownership.lease();
        if let Err(e) = self.refresh_checkpoints(&lease).await {
            return Err((partitions_of(&lease.partitions), e));
        }
        Ok(Some(Round { lease, controls }))
    }

    /// Applies parked events an operator asked to retry, then decides the step (see
    /// [`step::next_step`]) against the head as it is now.
    async fn decide(&mut self, round: &Round) -> Result<(WorkerStep, Head), NotStarted> {
        let paused = round.controls.paused.contains(self.name());
        if round.controls.retry.contains(self.name()) {
            let replay = replay_scope(&round.lease.partitions, &self.failures.halted, paused);
            if let Some(active) = replay {
                self.replay(&active)
                    .await
                    .map_err(|e| (partitions_of(&active), e))?;
            }
        }
        let head = self.head.current();
        let step = next_step(
            &Observation {
                leased: &round.lease.partitions,
                halted: &self.failures.halted,
                paused,
                checkpoints: &self.checkpoints,
                head,
                now: Instant::now(),
            },
            &mut self.failures.containment,
        );
        Ok((step, head))
    }

    /// Takes the step. The lease is held while a batch runs and dropped before any wait.
    async fn take(
        &mut self,
        step: WorkerStep,
        lease: Lease,
        head: Head,
        stop: &CancellationToken,
        ownership_changed: &mut tokio::sync::watch::Receiver<u64>,
        progress: &mut Progress,
    ) {
        if !matches!(
            step,
            WorkerStep::Idle | WorkerStep::WaitForOperator { .. } | WorkerStep::Narrow { .. }
        ) && self.failures.containment.is_idle()
        {
            self.reading.forget_retained();
        }
        match step {
            WorkerStep::Idle => {
                drop(lease);
                // Nothing held: no partition series, no checkpoint to report.
                self.report_position(&[], head.raw, true);
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = ownership_changed.changed() => {}
                    _ = self.controls.changed() => {}
                }
            }
            WorkerStep::WaitForOperator { paused } => {
                let held = lease.partitions.clone();
                drop(lease);
                self.wait_for_operator(&held, paused, stop, ownership_changed)
                    .await;
            }
            WorkerStep::Narrow { scope, step } => {
                self.report_position(&lease.partitions, head.raw, false);
                let started = Instant::now();
                let result = self.run_step(&scope, &step).await;
                drop(lease);
                match result {
                    Ok((events, to)) => {
                        self.failures.containment.succeeded(&step);
                        self.committed(progress, events, to, head.raw, started);
                    }
                    Err(e) => {
                        let narrowed = matches!(&e, BatchError::Plugin { failure, .. } if !failure.is_transient());
                        if !narrowed {
                            // Not the plugin's doing (database, fencing, a transient error):
                            // the step runs again.
                            self.failures.containment.requeue(step);
                        }
                        self.forget_checkpoints_after(&e, &scope);
                        self.retry_after(stop, &partitions_of(&scope), e).await;
                    }
                }
            }
            WorkerStep::WaitForRetry { next_retry } => {
                // Every usable partition is held for a retry of its failing event.
                self.report_position(&lease.partitions, head.raw, true);
                drop(lease);
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = ownership_changed.changed() => {}
                    _ = self.controls.changed() => {}
                    _ = sleep_until(next_retry) => {}
                }
            }
            WorkerStep::CaughtUp { from, next_retry } => {
                // What is published now stays until the next batch.
                self.report_position(&lease.partitions, head.raw, true);
                drop(lease);
                let mut head_rx = self.head.clone();
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = ownership_changed.changed() => {}
                    _ = self.controls.changed() => {}
                    _ = self.registry.changed() => {}
                    _ = head_rx.wait_past(from, self.config.poll_interval) => {}
                    _ = sleep_until(next_retry) => {}
                }
            }
            WorkerStep::Batch {
                active,
                from,
                up_to,
            } => {
                self.report_position(&lease.partitions, head.raw, false);
                let started = Instant::now();
                let result = self.process(&active, from, up_to).await;
                drop(lease);
                match result {
                    Ok((events, to)) => self.committed(progress, events, to, head.raw, started),
                    Err(e) => {
                        self.forget_checkpoints_after(&e, &active);
                        self.retry_after(stop, &partitions_of(&active), e).await;
                    }
                }
            }
        }
    }

    /// Paused by an operator, or every held partition is halted (stop policy): wait for an
    /// operator, and keep the lag current meanwhile (it grows with the head).
    async fn wait_for_operator(
        &mut self,
        held: &[(PartitionId, Epoch)],
        paused: bool,
        stop: &CancellationToken,
        ownership_changed: &mut tokio::sync::watch::Receiver<u64>,
    ) {
        if paused {
            self.board
                .update(&self.config.track, |s| s.state = ProjectionState::Paused);
            tracing::info!(
                projection = self.name(),
                "paused by an operator; waiting for resume"
            );
        }
        loop {
            self.report_position(held, self.head.current().raw, true);
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = ownership_changed.changed() => break,
                _ = self.controls.changed() => break,
                _ = tokio::time::sleep(LAG_REFRESH) => {}
            }
        }
        if paused {
            self.board
                .update(&self.config.track, |s| s.state = ProjectionState::Running);
        }
    }

    /// After a database error the commit may have happened on the server although its answer
    /// was lost: the partitions' checkpoints are read again before the next batch, so that
    /// nothing is applied twice.
    fn forget_checkpoints_after(&mut self, error: &BatchError, scope: &[(PartitionId, Epoch)]) {
        if matches!(error, BatchError::Database(_)) {
            self.checkpoints.forget(scope);
        }
    }

    /// Book-keeping after a committed batch or step.
    fn committed(
        &mut self,
        progress: &mut Progress,
        events: usize,
        to: i64,
        raw_head: i64,
        started: Instant,
    ) {
        self.failures.consecutive = 0;
        progress.record(&self.config.track, events, to, raw_head);
        let state = if self.failures.halted.is_empty() && self.failures.containment.is_idle() {
            ProjectionState::Running
        } else {
            ProjectionState::Failing
        };
        self.board.update(&self.config.track, |s| {
            s.state = state;
            s.events_processed += events as u64;
            s.last_commit_at = Some(chrono::Utc::now());
        });
        tracing::trace!(projection = self.name(), events, up_to = to, elapsed = ?started.elapsed(), "batch committed");
        failpoint_pipeline_panic();
    }

    fn stopped(&self) {
        self.board
            .update(self.name(), |s| s.state = ProjectionState::Stopped);
    }
}

/// A test hook: `PROJECTION_HOST_FAILPOINT=pipeline-panic:N` panics the pipeline task after a
/// committed batch, N times in all, to prove that a panicked pipeline is logged and restarted.
fn failpoint_pipeline_panic() {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::OnceLock;
    static BUDGET: OnceLock<AtomicU32> = OnceLock::new();
    let budget = BUDGET.get_or_init(|| {
        let n = std::env::var("PROJECTION_HOST_FAILPOINT")
            .ok()
            .and_then(|v| {
                v.strip_prefix("pipeline-panic:")
                    .and_then(|n| n.parse().ok())
            })
            .unwrap_or(0);
        AtomicU32::new(n)
    });
    if budget
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
    {
        panic!("failpoint pipeline-panic");
    }
}

fn partitions_of(scope: &[(PartitionId, Epoch)]) -> Vec<PartitionId> {
    scope.iter().map(|(p, _)| *p).collect()
}
