//! `ProjectionWorker`: one projection's loop over this worker's partitions.
//!
//! Each batch: lease the usable partitions -> read subscribed events after the lowest of their
//! checkpoints, up to the safe head -> keep the events of leased partitions not yet applied ->
//! `handle-batch` inside a transaction (under the projection's role) -> flush the writes, park
//! what the dead-letter policy parks, record checkpoints (fenced) -> commit. Whatever fails, the
//! transaction rolls back and the same range is read again, so an event is applied exactly once.
//!
//! When the plugin keeps failing, the batch is narrowed down to the failing event (committing
//! the events before it), retried `max_retries` times, and then the projection's failure policy
//! applies: halt that partition (stop) or park the event and its aggregate's later events
//! (dead-letter).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

use super::dead_letters::{self, ToPark};
use super::policy::{OnFailure, ProjectionSettings};
use super::progress::Progress;
use super::status::{ProjectionState, ProjectionStatus, StatusBoard};
use crate::base::retry::backoff;
use crate::coordination::controls::Shared as Controls;
use crate::coordination::{Lease, Ownership};
use crate::db::quote_ident;
use crate::ids::{CommitToken, Epoch, PartitionId, WorkerId};
use crate::lifecycle::{PluginCache, Registry};
use crate::metrics::HostMetrics;
use crate::runtime::limits::Breach;
use crate::runtime::state::HostMemoryLimits;
use crate::runtime::{Plugin, PluginFailure, PluginInstance, Runtime};
use crate::sink::commit::{record_batch, BatchCommit, Caller, CommitOutcome};
use crate::sink::role::{self, RoleError};
use crate::sink::session::{BatchTx, ProjectionSession, TxSettings};
use crate::sink::SqlIsolation;
use crate::source::wakeup::Wakeup;
use crate::source::{EventReader, SafeHead, StoredEvent};

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
        first: i64,
        /// Position of the last event of the first half, for narrowing the failure down.
        middle: i64,
        last: i64,
        events: usize,
        /// The event, when the batch held only one.
        single: Option<EventRef>,
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

/// One event, for the failure policy.
#[derive(Debug, Clone)]
struct EventRef {
    position: i64,
    partition: PartitionId,
    aggregate_id: String,
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
    /// After a plugin failure: read no further than this, to commit the events before the
    /// failing one and narrow the failure down to a single event.
    read_cap: Option<i64>,
    /// The single failing event and how often it failed.
    attempts: Option<(i64, u32)>,
    /// The dead-letter policy decided to park this event (position, error) in the next batch.
    park_next: Option<(i64, String)>,
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
            last_error: None,
            last_error_at: None,
            last_commit_at: None,
            caught_up: false,
        });
        ProjectionWorker {
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
            read_cap: None,
            attempts: None,
            park_next: None,
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
                    self.retry_after(&stop, e).await;
                    continue;
                }
            }
            let controls = self.controls.borrow_and_update().clone();
            if controls_seen.as_ref() != Some(&controls) {
                // Halts and parked events may have changed (resume, skip, retry).
                if let Err(e) = self.reload_failures().await {
                    self.retry_after(&stop, BatchError::Database(e)).await;
                    continue;
                }
                controls_seen = Some(controls.clone());
            }
            if controls.paused.contains(self.name()) {
                self.board
                    .update(&self.config.track, |s| s.state = ProjectionState::Paused);
                tracing::info!(
                    projection = self.name(),
                    "paused by an operator; waiting for resume"
                );
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = self.controls.changed() => {}
                }
                self.board
                    .update(&self.config.track, |s| s.state = ProjectionState::Running);
                continue;
            }
            let lease = self.ownership.lease();
            if lease.is_empty() {
                drop(lease);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ownership_changed.changed() => {}
                    _ = self.controls.changed() => {}
                }
                continue;
            }
            if let Err(e) = self.refresh_checkpoints(&lease).await {
                drop(lease);
                self.retry_after(&stop, e).await;
                continue;
            }
            let active: Vec<(PartitionId, Epoch)> = lease
                .partitions
                .iter()
                .filter(|(p, _)| !self.halted.contains_key(p))
                .copied()
                .collect();
            if active.is_empty() {
                // Every held partition is halted (stop policy): wait for an operator.
                drop(lease);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ownership_changed.changed() => {}
                    _ = self.controls.changed() => {}
                }
                continue;
            }
            if controls.retry.contains(self.name()) {
                if let Err(e) = self.replay(&active).await {
                    drop(lease);
                    self.retry_after(&stop, e).await;
                    continue;
                }
            }
            let head = self.head.current();
            let from = self.lowest_checkpoint(&active);
            self.report_position(&active, lease.partitions.len(), from, head.raw);
            let up_to = match self.read_cap {
                Some(cap) if cap > from => head.readable_from(from).min(cap),
                _ => {
                    self.read_cap = None;
                    head.readable_from(from)
                }
            };
            if from >= up_to {
                drop(lease);
                let mut head_rx = self.head.clone();
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ownership_changed.changed() => {}
                    _ = self.controls.changed() => {}
                    _ = self.registry.changed() => {}
                    _ = head_rx.wait_past(from, self.config.poll_interval) => {}
                }
                continue;
            }
            let started = Instant::now();
            match self.process(&active, from, up_to).await {
                Ok((events, to)) => {
                    drop(lease);
                    self.failures = 0;
                    progress.record(&self.config.track, events, to, head.raw);
                    let state = if self.halted.is_empty() {
                        ProjectionState::Running
                    } else {
                        ProjectionState::Failing
                    };
                    self.board.update(&self.config.track, |s| {
                        s.state = state;
                        s.events_processed += events as u64;
                        s.last_commit_at = Some(chrono::Utc::now());
                    });
                    tracing::trace!(projection = self.name(), events, from, to, elapsed = ?started.elapsed(), "batch committed");
                }
                Err(e) => {
                    drop(lease);
                    self.retry_after(&stop, e).await;
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
                first: 0,
                middle: 0,
                last: 0,
                events: 0,
                single: None,
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
                self.read_cap = None;
                self.attempts = None;
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
        let count =
            dead_letters::count(&self.pool, &self.config.replica_set, &self.config.track).await?;
        self.metrics.set_dead_letters(self.name(), count);
        if self.halted.is_empty() {
            self.attempts = None;
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

    fn report_position(
        &self,
        active: &[(PartitionId, Epoch)],
        held: usize,
        lowest: i64,
        raw_head: i64,
    ) {
        let gap: i64 = active
            .iter()
            .map(|(p, _)| (raw_head - self.checkpoint(*p)).max(0))
            .sum::<i64>()
            + self
                .halted
                .values()
                .map(|pos| (raw_head - pos + 1).max(0))
                .sum::<i64>();
        let lag = gap as f64 / f64::from(self.config.partitions.max(1));
        self.metrics.set_lag(self.name(), lag, lowest);
        let caught_up = self.config.once_target.is_some_and(|target| {
            held as u32 == self.config.partitions && self.halted.is_empty() && lowest >= target
        });
        self.board.update(self.name(), |s| {
            s.lowest_checkpoint = lowest;
            s.lag_events = lag;
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
        if full && self.read_cap.is_none() {
            self.start_prefetch(covered_to, self.head.current().safe, self.next_limit(true));
        }

        let partitions = self.config.partitions;
        let active_set: HashSet<PartitionId> = active.iter().map(|(p, _)| *p).collect();
        let park_next = self.park_next.clone();
        let mut mine = Vec::with_capacity(events.len());
        let mut park: Vec<(PartitionId, StoredEvent, String)> = Vec::new();
        for e in events {
            let p = PartitionId::of(&e.aggregate_id, partitions);
            if !active_set.contains(&p) || e.global_position <= self.checkpoint(p) {
                continue;
            }
            if let Some((position, error)) = park_next
                .as_ref()
                .filter(|(pos, _)| *pos == e.global_position)
            {
                self.parked.insert(e.aggregate_id.clone());
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
            } else if self.parked.contains(&e.aggregate_id) {
                park.push((
                    p,
                    e,
                    "follows a parked event of the same aggregate".to_string(),
                ));
            } else {
                mine.push(e);
            }
        }

        let mut tx = self.begin().await?;
        let plugin_started = Instant::now();
        let handed = mine.len();
        if !mine.is_empty() {
            tx = self.handle(tx, mine).await?;
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
        self.stages.commit += commit_started.elapsed();
        for (p, e) in active {
            let entry = self.checkpoints.entry(*p).or_insert((*e, 0));
            entry.1 = entry.1.max(covered_to);
        }
        if !park.is_empty() {
            if let Some((position, _)) = park_next {
                tracing::error!(
                    projection = self.name(),
                    position,
                    "parked the failing event in the dead-letter list; later events of its aggregate will be parked too (list them with `projection-host dead-letters list`)"
                );
                self.park_next = None;
                self.attempts = None;
            }
            let count =
                dead_letters::count(&self.pool, &self.config.replica_set, &self.config.track)
                    .await?;
            self.metrics.set_dead_letters(self.name(), count);
        }
        self.limit = self.next_limit(full);
        if self.read_cap.is_some_and(|cap| covered_to >= cap) {
            self.read_cap = None;
        }
        self.metrics.batch_committed(
            self.name(),
            handed,
            started.elapsed().as_secs_f64(),
            plugin_seconds,
        );
        Ok((handed, covered_to))
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
        let middle =
            events[(count / 2).saturating_sub(1).min(count.saturating_sub(1))].global_position;
        let single = (count == 1).then(|| EventRef {
            position: events[0].global_position,
            partition: PartitionId::of(&events[0].aggregate_id, self.config.partitions),
            aggregate_id: events[0].aggregate_id.clone(),
        });
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
                Err(BatchError::Plugin {
                    failure,
                    first,
                    middle,
                    last,
                    events: count,
                    single,
                })
            }
        }
    }

    /// Reports a failed batch and decides what happens next: retry (narrowed down), or the
    /// failure policy once a single event failed too often.
    async fn retry_after(&mut self, stop: &CancellationToken, error: BatchError) {
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
        self.failures += 1;
        let mut delay = backoff(
            self.failures,
            Duration::from_millis(100),
            Duration::from_secs(30),
        );
        let reason = match &error {
            BatchError::Plugin { failure, .. } if failure.is_transient() => "database",
            BatchError::Plugin { .. } | BatchError::Instantiate(_) | BatchError::Refused(_) => {
                "plugin"
            }
            _ => "database",
        };
        self.metrics.batch_failed(self.name(), reason);
        self.limit = self.config.batch_size;
        let message = match &error {
            BatchError::Plugin {
                failure,
                first,
                middle,
                last,
                events,
                single,
            } => {
                if let PluginFailure::Limit { breach, .. } = failure {
                    self.metrics.limit_tripped(
                        self.name(),
                        match breach {
                            Breach::Deadline(_) => "deadline",
                            Breach::Memory(_) => "memory",
                        },
                    );
                }
                if !failure.is_transient() && *events > 0 {
                    // Commit what is before the failing event, then retry that event alone.
                    self.read_cap = Some(match failure.position() {
                        Some(p) if p > *first && p <= *last => p - 1,
                        Some(p) if p == *first => p,
                        _ if *events > 1 => *middle,
                        _ => *first,
                    });
                }
                let at = match failure.position() {
                    Some(p) => format!("event at position {p}"),
                    None if *events > 1 => {
                        format!("events at positions {first}..={last} ({events} events)")
                    }
                    None if *events == 1 => format!("event at position {first}"),
                    None => "setup".to_string(),
                };
                let message = format!("{error} [while handling {at}]");
                if let (Some(event), false) = (single, failure.is_transient()) {
                    let attempts = match self.attempts {
                        Some((p, n)) if p == event.position => n + 1,
                        _ => 1,
                    };
                    self.attempts = Some((event.position, attempts));
                    if attempts > self.config.settings.max_retries {
                        self.give_up(event, &message).await;
                        delay = Duration::ZERO;
                    }
                }
                message
            }
            other => other.to_string(),
        };
        // Server messages can carry plugin data (a trigger's RAISE): one bounded line.
        let message = crate::base::text::plugin_message(&message);
        if reason == "database" {
            tracing::warn!(projection = self.name(), attempt = self.failures, retry_in = ?delay, "batch rolled back: {message}");
        } else {
            tracing::error!(projection = self.name(), attempt = self.failures, retry_in = ?delay, "batch rolled back: {message}");
        }
        self.report_error(&message);
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }

    /// The failure policy, once one event failed `max_retries` + 1 times.
    async fn give_up(&mut self, event: &EventRef, message: &str) {
        match self.config.settings.on_failure {
            OnFailure::DeadLetter => {
                // The next batch parks it (with its aggregate's later events) and commits the
                // checkpoint past it.
                self.park_next = Some((event.position, message.to_string()));
                self.read_cap = Some(event.position);
            }
            OnFailure::Stop => {
                match dead_letters::halt(
                    &self.pool,
                    &self.config.replica_set,
                    &self.config.track,
                    event.partition,
                    event.position,
                    message,
                )
                .await
                {
                    Ok(()) => {
                        self.halted.insert(event.partition, event.position);
                        self.read_cap = None;
                        self.attempts = None;
                        tracing::error!(
                            projection = self.name(),
                            partition = %event.partition,
                            position = event.position,
                            aggregate = %event.aggregate_id,
                            "partition halted at a failing event (ON_FAILURE=stop); other partitions go on; fix the cause and run `projection-host resume {}`",
                            self.name()
                        );
                    }
                    Err(e) => {
                        tracing::warn!(projection = self.name(), error = %e, "could not record the halt; retrying")
                    }
                }
            }
        }
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
