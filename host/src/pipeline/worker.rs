//! `ProjectionWorker`: one projection's loop over this worker's partitions.
//!
//! Each batch: lease the usable partitions -> read subscribed events after the lowest of their
//! checkpoints, up to the safe head -> keep the events of leased partitions not yet applied ->
//! `handle-batch` inside a transaction -> flush the writes, record checkpoints (fenced) ->
//! commit. Whatever fails, the transaction rolls back and the same range is read again, so an
//! event is applied exactly once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sqlx::{PgPool, Postgres, Transaction};
use tokio_util::sync::CancellationToken;

use super::progress::Progress;
use super::retry::backoff;
use super::status::{ProjectionState, ProjectionStatus, StatusBoard};
use crate::coordination::controls::Paused;
use crate::coordination::{Lease, Ownership};
use crate::db::quote_ident;
use crate::ids::{Epoch, PartitionId, WorkerId};
use crate::metrics::HostMetrics;
use crate::runtime::limits::Breach;
use crate::runtime::{Plugin, PluginFailure, PluginInstance, Runtime};
use crate::sink::commit::{record_batch, BatchCommit, CommitOutcome};
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
    /// Projections an operator paused.
    pub paused: tokio::sync::watch::Receiver<Paused>,
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
    pub call_timeout: Duration,
    pub events_table: crate::db::QualifiedName,
    /// `--once`: report caught-up once every partition reached this position.
    pub once_target: Option<i64>,
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
    },
    #[error("this worker no longer owns every partition of the batch (fenced); the batch was rolled back")]
    Fenced,
    #[error("cannot create a plugin instance: {0}")]
    Instantiate(String),
}

pub struct ProjectionWorker {
    plugin: Arc<Plugin>,
    runtime: Arc<Runtime>,
    instance: Option<PluginInstance>,
    reader: Arc<EventReader>,
    pool: PgPool,
    ownership: Arc<Ownership>,
    head: SafeHead,
    paused: tokio::sync::watch::Receiver<Paused>,
    config: PipelineConfig,
    /// `SET LOCAL` statements every batch transaction starts with.
    prelude: String,
    schema: String,
    checkpoints: HashMap<PartitionId, (Epoch, i64)>,
    metrics: HostMetrics,
    board: StatusBoard,
    coordinator: Wakeup,
    limit: u32,
    failures: u32,
    stages: StageTimes,
    /// While catching up, the next page is read while the current one is handled.
    prefetch: Option<Prefetch>,
    /// After a plugin failure: read no further than this, to commit the events before the
    /// failing one and narrow the failure down to a single event.
    read_cap: Option<i64>,
}

/// A read started ahead of time: subscribed events in `(after, up_to]`, at most `limit`.
struct Prefetch {
    after: i64,
    up_to: i64,
    limit: u32,
    events: tokio::task::JoinHandle<Result<Vec<StoredEvent>, sqlx::Error>>,
}

/// Where batch time went, summed over the run (logged when the projection stops).
#[derive(Debug, Default)]
struct StageTimes {
    read: Duration,
    handle: Duration,
    commit: Duration,
}

impl ProjectionWorker {
    pub fn new(
        plugin: Arc<Plugin>,
        instance: PluginInstance,
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
            paused,
        } = context;
        let schema = quote_ident(&plugin.name);
        let prelude = format!(
            "SET LOCAL synchronous_commit = off; SET LOCAL search_path = {schema}; SET LOCAL statement_timeout = {}",
            config.call_timeout.as_millis().max(1)
        );
        metrics.register_projection(&plugin.name, &plugin.version, &plugin.sha256);
        board.insert(ProjectionStatus {
            name: plugin.name.to_string(),
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
            paused,
            config,
            prelude,
            schema,
            checkpoints: HashMap::new(),
            metrics,
            board,
            coordinator,
            failures: 0,
            stages: StageTimes::default(),
            prefetch: None,
            read_cap: None,
        }
    }

    fn name(&self) -> &str {
        &self.plugin.name
    }

    /// Runs until `stop`: batches already started finish; no new one starts.
    pub async fn run(mut self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            match self.setup().await {
                Ok(()) => break,
                Err(e) => {
                    self.failures += 1;
                    let delay = backoff(
                        self.failures,
                        Duration::from_millis(200),
                        Duration::from_secs(30),
                    );
                    tracing::error!(projection = self.name(), error = %e, retry_in = ?delay, "projection setup failed");
                    self.report_error(&e.to_string());
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
        while !stop.is_cancelled() {
            let paused = self.paused.borrow_and_update().contains(&*self.plugin.name);
            if paused {
                self.board
                    .update(&self.plugin.name, |s| s.state = ProjectionState::Paused);
                tracing::info!(
                    projection = self.name(),
                    "paused by an operator; waiting for resume"
                );
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = self.paused.changed() => {}
                }
                if !self.paused.borrow().contains(self.name()) {
                    tracing::info!(projection = self.name(), "resumed");
                    self.board
                        .update(&self.plugin.name, |s| s.state = ProjectionState::Running);
                }
                continue;
            }
            let lease = self.ownership.lease();
            if lease.is_empty() {
                drop(lease);
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ownership_changed.changed() => {}
                }
                continue;
            }
            if let Err(e) = self.refresh_checkpoints(&lease).await {
                drop(lease);
                self.retry_after(&stop, BatchError::Database(e)).await;
                continue;
            }
            let head = self.head.current();
            let from = self.lowest_checkpoint(&lease);
            self.report_position(&lease, from, head.raw);
            let up_to = match self.read_cap {
                Some(cap) if cap > from => head.safe.min(cap),
                _ => {
                    self.read_cap = None;
                    head.safe
                }
            };
            if from >= up_to {
                drop(lease);
                let mut head_rx = self.head.clone();
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = ownership_changed.changed() => {}
                    _ = head_rx.wait_past(from, self.config.poll_interval) => {}
                }
                continue;
            }
            let started = Instant::now();
            match self.process(&lease, from, up_to).await {
                Ok((events, to)) => {
                    drop(lease);
                    self.failures = 0;
                    progress.record(&self.plugin.name, events, to, head.raw);
                    self.board.update(&self.plugin.name, |s| {
                        s.state = ProjectionState::Running;
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

    /// Creates the projection's schema and runs the plugin's `setup` in one transaction,
    /// serialised across hosts so that concurrent `CREATE ... IF NOT EXISTS` cannot collide.
    async fn setup(&mut self) -> Result<(), BatchError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtext('projection_host.setup'), hashtext($1))",
        )
        .bind(&*self.plugin.name)
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!("CREATE SCHEMA IF NOT EXISTS {}", self.schema))
            .execute(&mut *tx)
            .await?;
        sqlx::Executor::execute(&mut *tx, self.prelude.as_str()).await?;
        let instance = self.instance().await?;
        let outcome = instance.setup(tx).await;
        if let Err(failure) = outcome.result {
            if failure.poisons_instance() {
                self.instance = None;
            }
            return Err(BatchError::Plugin {
                failure,
                first: 0,
                middle: 0,
                last: 0,
                events: 0,
            });
        }
        let tx = outcome
            .tx
            .ok_or_else(|| BatchError::Instantiate("setup lost its transaction".into()))?;
        tx.commit().await?;
        tracing::info!(projection = self.name(), version = %self.plugin.version, sha256 = %&self.plugin.sha256[..12], "read model set up");
        Ok(())
    }

    async fn instance(&mut self) -> Result<&mut PluginInstance, BatchError> {
        if self.instance.is_none() {
            let instance = PluginInstance::instantiate(&self.runtime, &self.plugin)
                .await
                .map_err(|e| BatchError::Instantiate(format!("{e:#}")))?;
            self.instance = Some(instance);
        }
        Ok(self.instance.as_mut().expect("set above"))
    }

    /// Loads the checkpoints of partitions claimed since the last batch (a new epoch means a
    /// new claim; another worker may have advanced the checkpoint meanwhile).
    async fn refresh_checkpoints(&mut self, lease: &Lease) -> Result<(), sqlx::Error> {
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
        .bind(&*self.plugin.name)
        .bind(&stale)
        .fetch_all(&self.pool)
        .await?;
        let found: HashMap<i32, i64> = rows.into_iter().collect();
        for (p, e) in &lease.partitions {
            if stale.contains(&p.as_i32()) {
                self.checkpoints
                    .insert(*p, (*e, found.get(&p.as_i32()).copied().unwrap_or(0)));
            }
        }
        Ok(())
    }

    fn checkpoint(&self, partition: PartitionId) -> i64 {
        self.checkpoints.get(&partition).map_or(0, |(_, c)| *c)
    }

    fn lowest_checkpoint(&self, lease: &Lease) -> i64 {
        lease
            .partitions
            .iter()
            .map(|(p, _)| self.checkpoint(*p))
            .min()
            .unwrap_or(0)
    }

    fn report_position(&self, lease: &Lease, lowest: i64, raw_head: i64) {
        let gap: i64 = lease
            .partitions
            .iter()
            .map(|(p, _)| (raw_head - self.checkpoint(*p)).max(0))
            .sum();
        let lag = gap as f64 / f64::from(self.config.partitions.max(1));
        self.metrics.set_lag(self.name(), lag, lowest);
        let caught_up = self.config.once_target.is_some_and(|target| {
            lease.partitions.len() as u32 == self.config.partitions && lowest >= target
        });
        self.board.update(self.name(), |s| {
            s.lowest_checkpoint = lowest;
            s.lag_events = lag;
            s.caught_up |= caught_up;
        });
    }

    /// One batch. Returns the events applied and the position covered.
    async fn process(
        &mut self,
        lease: &Lease,
        from: i64,
        safe_head: i64,
    ) -> Result<(usize, i64), BatchError> {
        let started = Instant::now();
        let (events, safe_head) = self.read(from, safe_head).await?;
        self.stages.read += started.elapsed();
        let full = events.len() as u32 >= self.limit;
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
        let mine: Vec<StoredEvent> = events
            .into_iter()
            .filter(|e| {
                let p = PartitionId::of(&e.aggregate_id, partitions);
                lease.contains(p) && e.global_position > self.checkpoint(p)
            })
            .collect();

        let mut tx = self.pool.begin().await?;
        sqlx::Executor::execute(&mut *tx, self.prelude.as_str()).await?;
        let plugin_started = Instant::now();
        let handed = mine.len();
        if !mine.is_empty() {
            tx = self.handle(tx, mine).await?;
        }
        let plugin_seconds = plugin_started.elapsed().as_secs_f64();
        self.stages.handle += plugin_started.elapsed();
        let commit_started = Instant::now();
        let outcome = record_batch(
            &mut tx,
            &BatchCommit {
                replica_set: &self.config.replica_set,
                projection: &self.plugin.name,
                worker: &self.config.worker,
                partitions: &lease.partitions,
                from_position: from,
                to_position: covered_to,
                events: handed,
                plugin_version: &self.plugin.version,
                plugin_sha256: &self.plugin.sha256,
            },
        )
        .await?;
        match outcome {
            CommitOutcome::Recorded => tx.commit().await?,
            CommitOutcome::Fenced => {
                tx.rollback().await?;
                let lost: Vec<PartitionId> = lease.partitions.iter().map(|(p, _)| *p).collect();
                self.ownership.forfeit(&lost);
                self.coordinator.wake();
                return Err(BatchError::Fenced);
            }
        }
        self.stages.commit += commit_started.elapsed();
        for (p, e) in &lease.partitions {
            let entry = self.checkpoints.entry(*p).or_insert((*e, 0));
            entry.1 = entry.1.max(covered_to);
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
        tx: Transaction<'static, Postgres>,
        events: Vec<StoredEvent>,
    ) -> Result<Transaction<'static, Postgres>, BatchError> {
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
        let instance = self.instance().await?;
        let outcome = instance.handle_batch(tx, events).await;
        match outcome.result {
            Ok(()) => outcome.tx.ok_or_else(|| {
                BatchError::Instantiate("the plugin call lost its transaction".into())
            }),
            Err(failure) => {
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
                })
            }
        }
    }

    /// Reports a failed batch and waits before the same range is tried again.
    async fn retry_after(&mut self, stop: &CancellationToken, error: BatchError) {
        if let BatchError::Fenced = error {
            self.metrics.batch_fenced(self.name());
            tracing::warn!(projection = self.name(), "{error}");
            return;
        }
        self.failures += 1;
        let delay = backoff(
            self.failures,
            Duration::from_millis(100),
            Duration::from_secs(30),
        );
        let reason = match &error {
            BatchError::Plugin { failure, .. } if failure.is_transient() => "database",
            BatchError::Plugin { .. } | BatchError::Instantiate(_) => "plugin",
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
            } => {
                if !failure.is_transient() && *events > 0 {
                    // Commit what is before the failing event, then retry that event alone.
                    self.read_cap = Some(match failure.position() {
                        Some(p) if p > *first && p <= *last => p - 1,
                        Some(p) if p == *first => p,
                        _ if *events > 1 => *middle,
                        _ => *first,
                    });
                }
                if let PluginFailure::Limit { breach, .. } = failure {
                    self.metrics.limit_tripped(
                        self.name(),
                        match breach {
                            Breach::Deadline(_) => "deadline",
                            Breach::Memory(_) => "memory",
                        },
                    );
                }
                let at = match failure.position() {
                    Some(p) => format!("event at position {p}"),
                    None if events > &1 => {
                        format!("events at positions {first}..={last} ({events} events)")
                    }
                    None if events == &1 => format!("event at position {first}"),
                    None => "setup".to_string(),
                };
                format!("{error} [while handling {at}]")
            }
            other => other.to_string(),
        };
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
