//! `ProjectionWorker`: one projection's loop over this worker's partitions.
//!
//! Each batch: lease the usable partitions -> read subscribed events after the lowest of their
//! checkpoints, up to the safe head -> keep the events of leased partitions not yet applied ->
//! `handle-batch` inside a transaction (under the projection's role) -> flush the writes, park
//! what the dead-letter policy parks, record checkpoints (fenced) -> commit. Whatever fails, the
//! transaction rolls back and the same range is read again, so an event is applied exactly once.
//!
//! When the plugin fails, the failure is contained by partition ([`Containment`]): the batch is
//! re-run in parts so that every healthy partition commits at once, the failing event is found
//! without waiting, its partition is held aside while the event is retried `max_retries` times,
//! and then the projection's failure policy applies: halt that partition (stop) or park the event
//! and its aggregate's later events (dead-letter).

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::containment::{Containment, Failure, Handed, Step, Verdict};
use super::dead_letters::{self, ToPark};
use super::policy::{OnFailure, ProjectionSettings};
use super::progress::Progress;
use super::status::{ProjectionState, ProjectionStatus, StatusBoard};
use crate::base::retry::{backoff, sleep_until};
use crate::coordination::controls::Shared as Controls;
use crate::coordination::{Lease, Ownership};
use crate::db::quote_ident;
use crate::ids::{CommitToken, Epoch, PartitionId, WorkerId};
use crate::lifecycle::{PluginCache, Registry};
use crate::metrics::{HostMetrics, PartitionReport};
use crate::runtime::limits::Breach;
use crate::runtime::state::HostMemoryLimits;
use crate::runtime::{Plugin, PluginFailure, PluginInstance, Runtime};
use crate::sink::commit::{record_batch, BatchCommit, Caller, CommitOutcome};
use crate::sink::role::{self, RoleError};
use crate::sink::session::{BatchTx, ProjectionSession, TxSettings};
use crate::sink::SqlIsolation;
use crate::source::wakeup::Wakeup;
use crate::source::{EventReader, SafeHead, StoredEvent};

/// A partition's published state: partition, state, halted position.
type PublishedState = (u32, &'static str, Option<i64>);

/// Longest interval between two publications of the per-partition series.
const PARTITION_REPORT_EVERY: Duration = Duration::from_millis(250);

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

/// Why a batch did not commit.
#[derive(Debug, thiserror::Error)]
enum BatchError {
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
struct FailedBatch {
    /// The range it covered: `(from, up_to]`.
    from: i64,
    up_to: i64,
    partitions: Vec<PartitionId>,
    /// The events handed to the plugin, in position order.
    handed: Vec<Handed>,
}

impl FailedBatch {
    /// Where the failure happened, for the log: the event the plugin named, or the range.
    fn describe(&self, named: Option<i64>) -> String {
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

/// The events of the latest failed batch, kept while its failure is narrowed down so that each
/// step re-runs a part of it without reading it again.
struct Retained {
    from: i64,
    up_to: i64,
    /// Read on the first step that needs them.
    events: Option<Vec<(PartitionId, StoredEvent)>>,
}

/// A read started ahead of time: subscribed events in `(after, up_to]`, at most `limit`.
struct Prefetch {
    after: i64,
    up_to: i64,
    limit: u32,
    events: tokio::task::JoinHandle<Result<Vec<StoredEvent>, sqlx::Error>>,
}

/// A build being prepared for a swap.
struct NextBuild {
    sha256: String,
    generation: i64,
    ready: tokio::task::JoinHandle<anyhow::Result<(Arc<Plugin>, PluginInstance)>>,
}

/// Where batch time went, summed over the run (logged when the projection stops).
#[derive(Debug, Default)]
struct StageTimes {
    read: Duration,
    handle: Duration,
    commit: Duration,
}

pub struct ProjectionWorker {
    plugin: Arc<Plugin>,
    runtime: Arc<Runtime>,
    instance: Option<PluginInstance>,
    reader: Arc<EventReader>,
    pool: PgPool,
    ownership: Arc<Ownership>,
    head: SafeHead,
    controls: tokio::sync::watch::Receiver<Controls>,
    registry: tokio::sync::watch::Receiver<Arc<Registry>>,
    cache: Arc<PluginCache>,
    config: PipelineConfig,
    /// Quoted `config.namespace`.
    schema: String,
    /// A new plugin build was swapped in and still has to run its setup.
    needs_setup: bool,
    /// The generation that activated the running build.
    build_generation: i64,
    /// The next build, being compiled in the background while the current one keeps working.
    next: Option<NextBuild>,
    /// The projection's own sessions, known after setup.
    session: Option<ProjectionSession>,
    session_options: PgConnectOptions,
    token: CommitToken,
    /// The schema and plugin name whose role and grants this worker already prepared; a
    /// continue-mode swap of the same read model skips that DDL, which would lengthen the pause.
    prepared: Option<(String, Arc<str>)>,
    checkpoints: HashMap<PartitionId, (Epoch, i64)>,
    /// Aggregates with parked events in the partitions held (dead-letter policy).
    parked: HashSet<String>,
    /// Halted partitions and the position they halted at (stop policy).
    halted: HashMap<PartitionId, i64>,
    metrics: HostMetrics,
    board: StatusBoard,
    coordinator: Wakeup,
    limit: u32,
    failures: u32,
    stages: StageTimes,
    prefetch: Option<Prefetch>,
    /// Narrowing of plugin failures, and partitions held aside while their event is retried.
    containment: Containment,
    /// The partition states last published to the metrics, and when.
    published: Option<(Vec<PublishedState>, Instant)>,
    retained: Option<Retained>,
    /// The dead-letter policy decided to park this event (position, error) in the next batch.
    park_next: HashMap<i64, String>,
}

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
        let build_generation = config.build_generation;
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
            containment: Containment::new(config.settings.max_retries),
            reader: Arc::new(EventReader::new(&config.events_table, &plugin.subscription)),
            limit: config.batch_size,
            plugin,
            runtime,
            instance: Some(instance),
            pool,
            ownership,
            head,
            controls,
            registry,
            cache,
            config,
            schema,
            needs_setup: true,
            build_generation,
            next: None,
            session: None,
            session_options,
            token,
            prepared: None,
            checkpoints: HashMap::new(),
            parked: HashSet::new(),
            halted: HashMap::new(),
            metrics,
            board,
            coordinator,
            failures: 0,
            stages: StageTimes::default(),
            prefetch: None,
            retained: None,
            published: None,
            park_next: HashMap::new(),
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

    /// Starts a transaction on the projection's own session.
    async fn begin(&mut self) -> Result<BatchTx, BatchError> {
        let settings = TxSettings {
            schema: self.config.namespace.clone(),
            statement_timeout: self.config.settings.call_timeout,
            // A batch never idles in its transaction for longer than a plugin call.
            idle_timeout: self.config.settings.call_timeout + Duration::from_secs(30),
        };
        let session = self.session.as_mut().ok_or_else(|| {
            BatchError::Instantiate("the projection's session is not set up".into())
        })?;
        Ok(session.begin(&settings).await?)
    }

    /// Runs until `stop`: batches already started finish; no new one starts.
    pub async fn run(mut self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            match self.setup().await {
                Ok(()) => {
                    self.needs_setup = false;
                    break;
                }
                Err(e) => {
                    self.failures += 1;
                    let delay = backoff(
                        self.failures,
                        Duration::from_millis(200),
                        Duration::from_secs(30),
                    );
                    let error = crate::base::text::plugin_message(&e.to_string());
                    tracing::error!(projection = self.name(), error = %error, retry_in = ?delay, "projection setup failed");
                    self.report_error(&error);
                    tokio::select! {
                        _ = stop.cancelled() => return self.stopped(),
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
        self.failures = 0;
        self.board
            .update(self.name(), |s| s.state = ProjectionState::Running);
        let mut ownership_changed = self.ownership.subscribe();
        let mut progress = Progress::new();
        let mut controls_seen: Option<Controls> = None;
        while !stop.is_cancelled() {
            match self.follow_registry().await {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => {
                    self.retry_after(&stop, &[], e).await;
                    continue;
                }
            }
            let controls = self.controls.borrow_and_update().clone();
            if controls_seen.as_ref() != Some(&controls) {
                // Halts and parked events may have changed (resume, skip, retry).
                if let Err(e) = self.reload_failures().await {
                    self.retry_after(&stop, &[], BatchError::Database(e)).await;
                    continue;
                }
                controls_seen = Some(controls.clone());
            }
            let lease = self.ownership.lease();
            if lease.is_empty() {
                drop(lease);
                // Nothing held: no partition series, no checkpoint to report.
                self.report_position(&[], self.head.current().raw, true);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ownership_changed.changed() => {}
                    _ = self.controls.changed() => {}
                }
                continue;
            }
            if let Err(e) = self.refresh_checkpoints(&lease).await {
                let partitions = partitions_of(&lease.partitions);
                drop(lease);
                self.retry_after(&stop, &partitions, e).await;
                continue;
            }
            let active: Vec<(PartitionId, Epoch)> = lease
                .partitions
                .iter()
                .filter(|(p, _)| !self.halted.contains_key(p))
                .copied()
                .collect();
            let paused = controls.paused.contains(self.name());
            if paused || active.is_empty() {
                // Paused by an operator, or every held partition is halted (stop policy): wait
                // for an operator, and keep the lag current meanwhile (it grows with the head).
                let held = lease.partitions.clone();
                drop(lease);
                if paused {
                    self.board
                        .update(&self.config.track, |s| s.state = ProjectionState::Paused);
                    tracing::info!(
                        projection = self.name(),
                        "paused by an operator; waiting for resume"
                    );
                }
                loop {
                    self.report_position(&held, self.head.current().raw, true);
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
                continue;
            }
            if controls.retry.contains(self.name()) {
                if let Err(e) = self.replay(&active).await {
                    drop(lease);
                    self.retry_after(&stop, &partitions_of(&active), e).await;
                    continue;
                }
            }
            let head = self.head.current();
            self.report_position(&lease.partitions, head.raw, false);
            if let Some(step) = self.containment.next_step(Instant::now()) {
                // A part of a failed batch: the partitions it names that are still usable.
                let scope: Vec<(PartitionId, Epoch)> = active
                    .iter()
                    .filter(|(p, _)| step.partitions.contains(p))
                    .copied()
                    .collect();
                for gone in step
                    .partitions
                    .iter()
                    .filter(|p| !scope.iter().any(|(q, _)| q == *p))
                {
                    self.containment.release(*gone);
                }
                if scope.is_empty() {
                    continue;
                }
                let started = Instant::now();
                let result = self.run_step(&scope, &step).await;
                drop(lease);
                match result {
                    Ok((events, to)) => {
                        self.containment.succeeded(&step);
                        self.committed(&mut progress, events, to, head.raw, started);
                    }
                    Err(e) => {
                        let narrowed = matches!(&e, BatchError::Plugin { failure, .. } if !failure.is_transient());
                        if !narrowed {
                            // Not the plugin's doing (database, fencing, a transient error):
                            // the step runs again.
                            self.containment.requeue(step);
                        }
                        self.forget_checkpoints_after(&e, &scope);
                        self.retry_after(&stop, &partitions_of(&scope), e).await;
                    }
                }
                continue;
            }
            if self.containment.is_idle() {
                self.retained = None;
            }
            let held: Vec<PartitionId> = self.containment.held().collect();
            let active: Vec<(PartitionId, Epoch)> = active
                .into_iter()
                .filter(|(p, _)| !held.contains(p))
                .collect();
            let next_retry = self.containment.next_retry();
            if active.is_empty() {
                // Every usable partition is held for a retry of its failing event.
                self.report_position(&lease.partitions, head.raw, true);
                drop(lease);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ownership_changed.changed() => {}
                    _ = self.controls.changed() => {}
                    _ = sleep_until(next_retry) => {}
                }
                continue;
            }
            let from = self.lowest_checkpoint(&active);
            let up_to = head.readable_from(from);
            if from >= up_to {
                // Caught up: what is published now stays until the next batch.
                self.report_position(&lease.partitions, head.raw, true);
                drop(lease);
                let mut head_rx = self.head.clone();
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ownership_changed.changed() => {}
                    _ = self.controls.changed() => {}
                    _ = self.registry.changed() => {}
                    _ = head_rx.wait_past(from, self.config.poll_interval) => {}
                    _ = sleep_until(next_retry) => {}
                }
                continue;
            }
            let started = Instant::now();
            match self.process(&active, from, up_to).await {
                Ok((events, to)) => {
                    drop(lease);
                    self.committed(&mut progress, events, to, head.raw, started);
                }
                Err(e) => {
                    drop(lease);
                    self.forget_checkpoints_after(&e, &active);
                    self.retry_after(&stop, &partitions_of(&active), e).await;
                }
            }
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

    /// After a database error the commit may have happened on the server although its answer
    /// was lost: the partitions' checkpoints are read again before the next batch, so that
    /// nothing is applied twice.
    fn forget_checkpoints_after(&mut self, error: &BatchError, scope: &[(PartitionId, Epoch)]) {
        if matches!(error, BatchError::Database(_)) {
            for (p, _) in scope {
                self.checkpoints.remove(p);
            }
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
        self.failures = 0;
        progress.record(&self.config.track, events, to, raw_head);
        let state = if self.halted.is_empty() && self.containment.is_idle() {
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

    /// Creates the projection's schema (and role) and runs the plugin's `setup` in one
    /// transaction, serialised across hosts so that concurrent `CREATE ... IF NOT EXISTS`
    /// cannot collide.
    async fn setup(&mut self) -> Result<(), BatchError> {
        let started = Instant::now();
        let target = (self.config.namespace.clone(), self.plugin.name.clone());
        if self.prepared.as_ref() != Some(&target) || self.session.is_none() {
            let credentials = match self.config.isolation {
                SqlIsolation::Role => Some(
                    role::prepare(
                        &self.pool,
                        &self.config.replica_set,
                        &self.plugin.name,
                        &self.config.namespace,
                    )
                    .await?,
                ),
                SqlIsolation::Unconfined => {
                    sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {}", self.schema))
                        .execute(&self.pool)
                        .await?;
                    None
                }
            };
            self.session = Some(ProjectionSession::new(
                self.session_options.clone(),
                self.pool.clone(),
                credentials,
                &self.config.replica_set,
                &self.plugin.name,
            ));
            self.prepared = Some(target);
        }
        // Concurrent `CREATE ... IF NOT EXISTS` of several hosts can collide, so setups of one
        // read model are serialised. The lock is a row of the host's (a projection's session
        // cannot take it, nor hold it against another projection), held by a host transaction
        // while the projection's own session runs the plugin's setup.
        let mut lock = self.pool.begin().await?;
        sqlx::query(
            "SELECT pg_catalog.set_config('idle_in_transaction_session_timeout', $1, true)",
        )
        .bind(
            (self.config.settings.call_timeout + Duration::from_secs(60))
                .as_millis()
                .to_string(),
        )
        .execute(&mut *lock)
        .await?;
        crate::db::host_lock(&mut lock, &format!("setup:{}", self.config.namespace)).await?;
        let mut tx = self.begin().await?;
        tx.mark_dirty();
        let instance = self.instance().await?;
        let outcome = instance.setup(tx).await;
        if let Err(failure) = outcome.result {
            if let Some(tx) = outcome.tx {
                let _ = tx.rollback().await;
            }
            if failure.poisons_instance() {
                self.instance = None;
            }
            return Err(BatchError::Plugin {
                failure,
                batch: FailedBatch::default(),
            });
        }
        let mut tx = outcome
            .tx
            .ok_or_else(|| BatchError::Instantiate("setup lost its transaction".into()))?;
        tx.seal(self.config.settings.call_timeout).await?;
        tx.refuse_large_objects().await?;
        tx.commit().await?;
        lock.commit().await?;
        tracing::info!(
            projection = self.name(),
            version = %self.plugin.version,
            sha256 = %&self.plugin.sha256[..12],
            role = self.session.as_ref().and_then(|s| s.role()).unwrap_or("(the host's own: SQL_ISOLATION=none)"),
            elapsed = ?started.elapsed(),
            "read model set up"
        );
        Ok(())
    }

    /// Follows the registry: swaps in another build of this read model at this batch boundary
    /// (continue mode), moves along when its schema was renamed (a rebuild was promoted), and
    /// returns false when the read model is no longer run (retired).
    async fn follow_registry(&mut self) -> Result<bool, BatchError> {
        let registry = self.registry.borrow_and_update().clone();
        let Some(wanted) = registry.track(&self.config.track) else {
            tracing::info!(
                projection = self.name(),
                "this read model is no longer run (its plugin was retired); stopping its pipeline"
            );
            return Ok(false);
        };
        if wanted.namespace != self.config.namespace {
            tracing::info!(projection = self.name(), from = %self.config.namespace, to = %wanted.namespace, "the read model's schema was renamed");
            self.config.namespace = wanted.namespace.clone();
            self.schema = quote_ident(&wanted.namespace);
        }
        if wanted.sha256 != self.plugin.sha256 {
            // Compile the new build in the background; the current one keeps committing until
            // it is ready (the commit guard stops it once the new build wrote a partition).
            if self.next.as_ref().is_none_or(|n| n.sha256 != wanted.sha256) {
                let (cache, projection, sha) = (
                    self.cache.clone(),
                    wanted.projection.clone(),
                    wanted.sha256.clone(),
                );
                self.next = Some(NextBuild {
                    sha256: wanted.sha256.clone(),
                    generation: wanted.activated_generation,
                    ready: tokio::spawn(async move { cache.get(&projection, &sha).await }),
                });
            }
            if self.next.as_ref().is_some_and(|n| n.ready.is_finished()) {
                let next = self.next.take().expect("checked above");
                let (plugin, mut instance) = next
                    .ready
                    .await
                    .map_err(|e| BatchError::Instantiate(e.to_string()))?
                    .map_err(|e| BatchError::Instantiate(format!("{e:#}")))?;
                apply_limits(&mut instance, &self.config.settings);
                tracing::info!(
                    projection = self.name(),
                    from = %format!("{} {}", self.plugin.version, &self.plugin.sha256[..12]),
                    to = %format!("{} {}", plugin.version, &plugin.sha256[..12]),
                    "swapping the plugin at this batch boundary"
                );
                self.metrics.plugin_swapped(
                    self.name(),
                    (&self.plugin.version, &self.plugin.sha256),
                    (&plugin.version, &plugin.sha256),
                );
                if plugin.subscription != self.plugin.subscription {
                    self.reader = Arc::new(EventReader::new(
                        &self.config.events_table,
                        &plugin.subscription,
                    ));
                    self.prefetch = None;
                }
                self.plugin = plugin;
                self.instance = Some(instance);
                self.build_generation = next.generation;
                // The new build may not fail where the old one did.
                self.containment.clear();
                self.retained = None;
                self.park_next.clear();
                self.needs_setup = true;
                self.board.update(&self.config.track, |s| {
                    s.plugin_version = self.plugin.version.clone();
                    s.plugin_sha256 = self.plugin.sha256.clone();
                });
            }
        } else if self.next.is_some() {
            // Swapped back before the other build was ready.
            self.next = None;
        }
        if self.needs_setup {
            self.setup().await?;
            self.needs_setup = false;
        }
        Ok(true)
    }

    async fn instance(&mut self) -> Result<&mut PluginInstance, BatchError> {
        if self.instance.is_none() {
            let mut instance = PluginInstance::instantiate(&self.runtime, &self.plugin)
                .await
                .map_err(|e| BatchError::Instantiate(format!("{e:#}")))?;
            apply_limits(&mut instance, &self.config.settings);
            self.instance = Some(instance);
        }
        Ok(self.instance.as_mut().expect("set above"))
    }

    /// Loads the checkpoints (and parked aggregates) of partitions claimed since the last batch:
    /// a new epoch means a new claim, and another worker may have advanced them meanwhile.
    async fn refresh_checkpoints(&mut self, lease: &Lease) -> Result<(), BatchError> {
        let stale: Vec<i32> = lease
            .partitions
            .iter()
            .filter(|(p, e)| self.checkpoints.get(p).is_none_or(|(epoch, _)| epoch != e))
            .map(|(p, _)| p.as_i32())
            .collect();
        if stale.is_empty() {
            return Ok(());
        }
        let rows: Vec<(i32, i64)> = sqlx::query_as(
            "SELECT partition, position FROM projection_host.checkpoints
              WHERE replica_set = $1 AND projection = $2 AND partition = ANY($3)",
        )
        .bind(&self.config.replica_set)
        .bind(&self.config.track)
        .bind(&stale)
        .fetch_all(&self.pool)
        .await?;
        let found: HashMap<i32, i64> = rows.into_iter().collect();
        refuse_checkpoints_past_the_head(&self.pool, &self.config, self.head.current().raw, &found)
            .await?;
        for (p, e) in &lease.partitions {
            if stale.contains(&p.as_i32()) {
                self.checkpoints
                    .insert(*p, (*e, found.get(&p.as_i32()).copied().unwrap_or(0)));
            }
        }
        self.parked.extend(
            dead_letters::parked_aggregates(
                &self.pool,
                &self.config.replica_set,
                &self.config.track,
                &stale,
            )
            .await?,
        );
        self.publish_dead_letters().await?;
        Ok(())
    }

    /// Re-reads halts and parked aggregates after an operator acted.
    async fn reload_failures(&mut self) -> Result<(), sqlx::Error> {
        self.halted =
            dead_letters::halts(&self.pool, &self.config.replica_set, &self.config.track).await?;
        let held: Vec<i32> = self.checkpoints.keys().map(|p| p.as_i32()).collect();
        self.parked = dead_letters::parked_aggregates(
            &self.pool,
            &self.config.replica_set,
            &self.config.track,
            &held,
        )
        .await?;
        self.publish_dead_letters().await
    }

    /// The dead-letter gauges: the projection's total, and per partition held.
    async fn publish_dead_letters(&mut self) -> Result<(), sqlx::Error> {
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

    fn checkpoint(&self, partition: PartitionId) -> i64 {
        self.checkpoints.get(&partition).map_or(0, |(_, c)| *c)
    }

    fn lowest_checkpoint(&self, partitions: &[(PartitionId, Epoch)]) -> i64 {
        partitions
            .iter()
            .map(|(p, _)| self.checkpoint(*p))
            .min()
            .unwrap_or(0)
    }

    /// Publishes each held partition's state and lag, the projection's lag and lowest
    /// checkpoint, and whether `--once` reached its target. Halted, paused and held partitions
    /// count in full: their lag keeps growing with the head.
    fn report_position(&mut self, leased: &[(PartitionId, Epoch)], raw_head: i64, force: bool) {
        let paused = self.controls.borrow().paused.contains(self.name());
        let held: HashSet<PartitionId> = self.containment.held().collect();
        let mut gap = 0i64;
        let mut reports = Vec::with_capacity(leased.len());
        for (p, _) in leased {
            let halted_at = self.halted.get(p).copied();
            let lag = match halted_at {
                // Nothing from the halted event on is applied.
                Some(at) => raw_head - at + 1,
                None => raw_head - self.checkpoint(*p),
            }
            .max(0);
            gap += lag;
            let state = if halted_at.is_some() {
                "halted"
            } else if paused {
                "paused"
            } else if held.contains(p) {
                "retrying"
            } else {
                "running"
            };
            reports.push(PartitionReport {
                partition: p.0,
                state,
                lag,
                halted_at,
            });
        }
        // Per-partition series cost a few label lookups each: with small batches they are
        // published when a state changes, else at most every PARTITION_REPORT_EVERY.
        let states: Vec<PublishedState> = reports
            .iter()
            .map(|r| (r.partition, r.state, r.halted_at))
            .collect();
        let due = force
            || self
                .published
                .as_ref()
                .is_none_or(|(last, at)| *last != states || at.elapsed() >= PARTITION_REPORT_EVERY);
        if due {
            for report in &reports {
                self.metrics.set_partition(self.name(), report);
            }
            let kept: BTreeSet<u32> = leased.iter().map(|(p, _)| p.0).collect();
            self.metrics.retain_partitions(Some(self.name()), &kept);
            self.published = Some((states, Instant::now()));
        }
        let lowest = leased.iter().map(|(p, _)| self.checkpoint(*p)).min();
        let lag = gap as f64 / f64::from(self.config.partitions.max(1));
        self.metrics.set_lag(self.name(), lag, lowest);
        let lowest = lowest.unwrap_or(0);
        let caught_up = self.config.once_target.is_some_and(|target| {
            leased.len() as u32 == self.config.partitions
                && self.halted.is_empty()
                && self.containment.is_idle()
                && lowest >= target
        });
        self.board.update(self.name(), |s| {
            s.lowest_checkpoint = lowest;
            s.lag_events = lag;
            s.behind = gap;
            s.caught_up |= caught_up;
        });
    }

    /// One batch over the active partitions. Returns the events applied and the position covered.
    async fn process(
        &mut self,
        active: &[(PartitionId, Epoch)],
        from: i64,
        safe_head: i64,
    ) -> Result<(usize, i64), BatchError> {
        let started = Instant::now();
        let (mut events, safe_head) = self.read(from, safe_head).await?;
        self.stages.read += started.elapsed();
        let mut full = events.len() as u32 >= self.limit;
        // Cap the bytes handed to one call (limit max_batch_bytes); keep at least one event.
        let mut bytes = 0u64;
        if let Some(cut) = events.iter().position(|e| {
            bytes += (e.payload.len() + e.metadata.as_ref().map_or(0, String::len)) as u64;
            bytes > self.config.settings.max_batch_bytes
        }) {
            events.truncate(cut.max(1));
            full = true;
        }
        // A full page covers only up to its last event; otherwise everything up to the head.
        let covered_to = if full {
            events.last().map_or(safe_head, |e| e.global_position)
        } else {
            safe_head
        };
        if full {
            self.start_prefetch(covered_to, self.head.current().safe, self.next_limit(true));
        }
        let handed = self
            .apply(active, from, covered_to, events, started)
            .await?;
        self.limit = self.next_limit(full);
        Ok((handed, covered_to))
    }

    /// Re-runs a part of a failed batch from the retained events.
    async fn run_step(
        &mut self,
        scope: &[(PartitionId, Epoch)],
        step: &Step,
    ) -> Result<(usize, i64), BatchError> {
        let started = Instant::now();
        let from = self.lowest_checkpoint(scope);
        if step.up_to <= from {
            // Already applied (another step, or another worker before a re-claim).
            return Ok((0, from));
        }
        let partitions = self.config.partitions;
        let in_step = |p: &PartitionId, e: &StoredEvent| {
            e.global_position > from
                && e.global_position <= step.up_to
                && scope.iter().any(|(q, _)| q == p)
        };
        let covered = self
            .retained
            .as_ref()
            .is_some_and(|r| r.from <= from && r.up_to >= step.up_to);
        let events: Vec<StoredEvent> = if covered {
            let retained = self.retained.as_mut().expect("checked above");
            if retained.events.is_none() {
                // The range read before, below the safe head: the same events, all of them.
                let mut conn = self.pool.acquire().await?;
                let events = self
                    .reader
                    .read(&mut conn, retained.from, retained.up_to, u32::MAX)
                    .await?;
                retained.events = Some(
                    events
                        .into_iter()
                        .map(|e| (PartitionId::of(&e.aggregate_id, partitions), e))
                        .collect(),
                );
            }
            retained
                .events
                .iter()
                .flatten()
                .filter(|(p, e)| in_step(p, e))
                .map(|(_, e)| e.clone())
                .collect()
        } else {
            // A step of an earlier failure (a held event's retry): its own range, which is
            // below the safe head and no larger than the batch it came from.
            let mut conn = self.pool.acquire().await?;
            self.reader
                .read(&mut conn, from, step.up_to, u32::MAX)
                .await?
                .into_iter()
                .filter(|e| in_step(&PartitionId::of(&e.aggregate_id, partitions), e))
                .collect()
        };
        self.stages.read += started.elapsed();
        let handed = self.apply(scope, from, step.up_to, events, started).await?;
        Ok((handed, step.up_to))
    }

    /// Hands the events of `active` partitions not yet applied to the plugin (parking what the
    /// dead-letter policy parks), and commits them with checkpoints at `covered_to`.
    async fn apply(
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
            if !active_set.contains(&p) || e.global_position <= self.checkpoint(p) {
                continue;
            }
            if let Some(error) = self.park_next.get(&e.global_position) {
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
            } else if self.parked.contains(&e.aggregate_id)
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
        self.parked.extend(newly_parked);
        self.stages.commit += commit_started.elapsed();
        for (p, e) in active {
            let entry = self.checkpoints.entry(*p).or_insert((*e, 0));
            entry.1 = entry.1.max(covered_to);
        }
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
                self.park_next.remove(&position);
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
    async fn replay(&mut self, active: &[(PartitionId, Epoch)]) -> Result<(), BatchError> {
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
        let events = {
            let mut conn = self.pool.acquire().await?;
            self.reader.read_positions(&mut conn, &positions).await?
        };
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
        let lowest = self.lowest_checkpoint(active);
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
    async fn commit(
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
                plugin_version: &self.plugin.version,
                plugin_sha256: &self.plugin.sha256,
                build_generation: self.build_generation,
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
    fn next_limit(&self, full: bool) -> u32 {
        if full {
            self.limit.saturating_mul(2).min(self.config.max_batch_size)
        } else {
            self.config.batch_size
        }
    }

    /// Subscribed events after `from`, from the prefetched page when it matches (returning the
    /// head that page was read up to), else read now.
    async fn read(
        &mut self,
        from: i64,
        safe_head: i64,
    ) -> Result<(Vec<StoredEvent>, i64), sqlx::Error> {
        if let Some(prefetch) = self.prefetch.take() {
            if prefetch.after == from && prefetch.limit == self.limit && prefetch.up_to <= safe_head
            {
                match prefetch.events.await {
                    Ok(Ok(events)) => return Ok((events, prefetch.up_to)),
                    Ok(Err(e)) => return Err(e),
                    Err(_) => {} // the task failed; read again below
                }
            } else {
                prefetch.events.abort();
            }
        }
        let mut conn = self.pool.acquire().await?;
        Ok((
            self.reader
                .read(&mut conn, from, safe_head, self.limit)
                .await?,
            safe_head,
        ))
    }

    fn start_prefetch(&mut self, after: i64, up_to: i64, limit: u32) {
        if up_to <= after {
            return;
        }
        let pool = self.pool.clone();
        let reader = self.reader.clone();
        let events = tokio::spawn(async move {
            let mut conn = pool.acquire().await?;
            reader.read(&mut conn, after, up_to, limit).await
        });
        if let Some(old) = self.prefetch.replace(Prefetch {
            after,
            up_to,
            limit,
            events,
        }) {
            old.events.abort();
        }
    }

    async fn handle(
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
                    self.instance = None;
                }
                // The caller knows the batch and attaches it.
                Err(BatchError::Plugin {
                    failure,
                    batch: FailedBatch::default(),
                })
            }
        }
    }

    /// Reports a failed batch and decides what happens next. A plugin failure is contained:
    /// narrowing steps follow at once, and a known failing event is retried later while its
    /// partition is held aside. Only what affects the whole worker (the database, a failed
    /// setup, a transient error) waits here, with backoff.
    async fn retry_after(
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
        let reason = match &error {
            BatchError::Plugin { failure, .. } if failure.is_transient() => "database",
            BatchError::Plugin { .. } | BatchError::Instantiate(_) | BatchError::Refused(_) => {
                "plugin"
            }
            _ => "database",
        };
        self.metrics.batch_failed(self.name(), reason);
        self.limit = self.config.batch_size;
        let (message, verdict) = match &error {
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
                    self.retain(batch);
                    self.containment.failed(
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
        };
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
                self.failures += 1;
                let delay = backoff(
                    self.failures,
                    Duration::from_millis(100),
                    Duration::from_secs(30),
                );
                if reason == "database" {
                    tracing::warn!(projection = self.name(), generation, partitions = partitions.len(), partition_list = %partition_list, attempt = self.failures, retry_in = ?delay, "batch rolled back: {message}");
                } else {
                    tracing::error!(projection = self.name(), generation, partitions = partitions.len(), partition_list = %partition_list, attempt = self.failures, retry_in = ?delay, "batch rolled back: {message}");
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }

    /// Keeps the failed batch's range so that the narrowing steps can re-run its parts. Only
    /// the latest failure's range is kept (memory stays at one batch); a step outside it reads
    /// its own range instead.
    fn retain(&mut self, batch: &FailedBatch) {
        if batch.handed.is_empty() {
            return;
        }
        let covered = self
            .retained
            .as_ref()
            .is_some_and(|r| r.from <= batch.from && r.up_to >= batch.up_to);
        if !covered {
            self.retained = Some(Retained {
                from: batch.from,
                up_to: batch.up_to,
                events: None,
            });
        }
    }

    /// The failure policy, once one event failed `max_retries` + 1 times.
    async fn give_up(&mut self, position: i64, partition: PartitionId, message: &str) {
        match self.config.settings.on_failure {
            OnFailure::DeadLetter => {
                // The held partition's next step parks it (with its aggregate's later events)
                // and commits the checkpoint past it.
                self.park_next.insert(position, message.to_string());
                self.containment.retry_now(partition, Instant::now());
            }
            OnFailure::Stop => {
                match dead_letters::halt(
                    &self.pool,
                    &self.config.replica_set,
                    &self.config.track,
                    partition,
                    position,
                    message,
                )
                .await
                {
                    Ok(()) => {
                        self.halted.insert(partition, position);
                        self.containment.release(partition);
                        let aggregate = self.retained_aggregate(position).unwrap_or_default();
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

    /// The aggregate of a retained event, for the log.
    fn retained_aggregate(&self, position: i64) -> Option<String> {
        self.retained
            .as_ref()?
            .events
            .iter()
            .flatten()
            .find(|(_, e)| e.global_position == position)
            .map(|(_, e)| e.aggregate_id.clone())
    }

    fn report_error(&self, message: &str) {
        self.board.record_error(self.name(), message);
        let message = message.to_string();
        self.board.update(self.name(), |s| {
            s.state = ProjectionState::Failing;
            s.last_error = Some(message);
            s.last_error_at = Some(chrono::Utc::now());
        });
    }
}

/// Sandbox and host-memory limits of the projection's settings.
fn apply_limits(instance: &mut PluginInstance, settings: &ProjectionSettings) {
    instance.set_limits(
        settings.memory_limit,
        settings.call_timeout,
        HostMemoryLimits {
            write_bytes: settings.max_write_bytes,
            query_bytes: settings.max_query_bytes,
        },
    );
}

/// A checkpoint can never be above the highest event: one that is (written by hand, or left
/// from another events table) would make the partition skip every event up to it. The
/// projection is refused, naming what is wrong, until an operator fixes the checkpoint.
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
    let head: i64 = sqlx::query_scalar(&format!(
        "SELECT coalesce(max(global_position), 0) FROM {}",
        config.events_table
    ))
    .fetch_one(pool)
    .await?;
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
         Not running it; correct them (UPDATE projection_host.checkpoints SET position = ... WHERE replica_set = '{}' AND projection = '{}')",
        config.track,
        list.join(", "),
        config.replica_set,
        config.track
    )))
}
