//! Coordination through PostgreSQL: membership (register, heartbeat, stale removal), one leader
//! at a time computing a balanced, sticky assignment (a new numbered generation per change),
//! and each worker claiming what is assigned to it and releasing what is not.
//!
//! Handoff is cooperative: the old owner stops taking batches for a partition, lets its
//! in-flight batch finish, releases the row; only then can the new owner claim it, with the
//! epoch incremented. A worker that lost a partition without noticing (paused, cut off) is
//! stopped by fencing at its next commit.

pub mod assignment;
pub mod controls;
pub mod membership;
pub mod ownership;
mod reconcile;
pub mod resize;

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::base::notify;
use crate::ids::{Epoch, Generation, PartitionId, WorkerId};
use crate::metrics::HostMetrics;
use crate::source::wakeup::Wakeup;
use crate::store::{self, replica_sets};
pub use membership::{Member, Strategy};
pub use ownership::{Lease, Ownership};

#[derive(Debug, thiserror::Error)]
pub enum CoordinationError {
    #[error(
        "replica set '{replica_set}' has {stored} partitions, but this host was started with \
         --partitions {configured} (PARTITIONS). If the set was resized, set PARTITIONS={stored} or leave it \
         out; to change the count, run `projection-host partitions resize --replica-set {replica_set} \
         --to {configured}` while the fleet runs (nothing is replayed)"
    )]
    PartitionCountMismatch {
        replica_set: String,
        stored: u32,
        configured: u32,
    },
    #[error("another process registered as worker '{worker}' in replica set '{replica_set}'; this one stops (give each host its own POD_NAME)")]
    IdentityTaken { replica_set: String, worker: String },
    #[error("database error during coordination: {0}")]
    Sql(#[from] sqlx::Error),
}

#[derive(Debug, Clone)]
pub struct CoordinationConfig {
    pub replica_set: String,
    pub partitions: Option<u32>,
    pub heartbeat_interval: Duration,
    pub stale_timeout: Duration,
    pub coordination_timeout: Duration,
    pub strategy: Strategy,
    /// Longest wait for an in-flight batch when a partition is handed over.
    pub revoke_timeout: Duration,
    /// The events table (the leader measures rebuild lag against its head).
    pub events_table: crate::db::QualifiedName,
    /// A rebuild is promoted once every partition is at most this many positions behind.
    pub promote_lag: i64,
    /// Retired versions' read models are dropped after this long.
    pub retired_grace: Duration,
}

/// A joined coordinator and what it publishes.
pub struct Joined {
    pub coordinator: Coordinator,
    pub status: watch::Receiver<CoordinationStatus>,
    pub controls: watch::Receiver<controls::Shared>,
    pub registry: watch::Receiver<Arc<crate::lifecycle::Registry>>,
    /// Cancelled when the set was resized under this host: it must stop and join again with the
    /// new partition count.
    pub resized: CancellationToken,
}

/// What the coordinator last saw; read by probes, status and metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CoordinationStatus {
    pub registered: bool,
    pub leader: bool,
    pub generation: i64,
    /// `None` until the first coordination round.
    pub phase: Option<replica_sets::Phase>,
    pub partitions: u32,
    pub live_workers: usize,
    pub assigned: usize,
    pub owned: usize,
    /// Every partition assigned to this worker is held.
    pub holds_assignment: bool,
}

pub struct Coordinator {
    pool: PgPool,
    config: CoordinationConfig,
    member: Member,
    partitions: u32,
    ownership: Arc<Ownership>,
    wakeup: Wakeup,
    metrics: HostMetrics,
    status: watch::Sender<CoordinationStatus>,
    controls: watch::Sender<controls::Shared>,
    registry: watch::Sender<Arc<crate::lifecycle::Registry>>,
    releasing: Arc<Mutex<HashSet<PartitionId>>>,
    last_generation: Option<Generation>,
    last_assigned: Vec<PartitionId>,
    waiting_since: Option<Instant>,
    resized: CancellationToken,
}

use crate::store::partitions::Row as PartitionRow;

use replica_sets::Seen as ReplicaSetRow;

impl Coordinator {
    /// Creates or checks the replica set and registers this worker.
    pub async fn join(
        pool: PgPool,
        config: CoordinationConfig,
        member: Member,
        ownership: Arc<Ownership>,
        wakeup: Wakeup,
        metrics: HostMetrics,
    ) -> Result<Joined, CoordinationError> {
        let started = Instant::now();
        let partitions = membership::ensure_replica_set(
            &pool,
            &config.replica_set,
            config.partitions,
            config.strategy,
        )
        .await?;
        let took_over = member.register(&pool).await?;
        metrics.workers_registered_total.inc();
        metrics.set_worker_state(member.worker.as_str(), "ready");
        if took_over {
            tracing::warn!(worker = %member.worker, "took over the worker id from an earlier process (restart with the same POD_NAME)");
        }
        tracing::info!(
            replica_set = %config.replica_set,
            worker = %member.worker,
            partitions,
            strategy = %config.strategy,
            "joined the replica set"
        );
        let (controls, controls_rx) =
            watch::channel(controls::load(&pool, &config.replica_set).await?);
        let (registry, registry_rx) =
            watch::channel(crate::lifecycle::registry::load(&pool, &config.replica_set).await?);
        let (status, rx) = watch::channel(CoordinationStatus {
            registered: true,
            partitions,
            ..Default::default()
        });
        metrics
            .coordination_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        let resized = CancellationToken::new();
        Ok(Joined {
            coordinator: Coordinator {
                pool,
                config,
                member,
                partitions,
                ownership,
                wakeup,
                metrics,
                status,
                controls,
                registry,
                releasing: Arc::default(),
                last_generation: None,
                last_assigned: Vec::new(),
                waiting_since: None,
                resized: resized.clone(),
            },
            status: rx,
            controls: controls_rx,
            registry: registry_rx,
            resized,
        })
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// Heartbeats and coordination rounds until `cancel`; then leaves the replica set (after
    /// the caller stopped the pipelines). Returns an error only for conditions that must stop
    /// the process (another process took our identity).
    pub async fn run(
        mut self,
        cancel: CancellationToken,
        leave: CancellationToken,
    ) -> Result<(), CoordinationError> {
        let mut next_heartbeat = tokio::time::Instant::now();
        let mut failures = 0u32;
        loop {
            let mut wait = self.config.heartbeat_interval;
            if tokio::time::Instant::now() >= next_heartbeat {
                match self.heartbeat().await {
                    Ok(()) => {
                        next_heartbeat =
                            tokio::time::Instant::now() + self.config.heartbeat_interval
                    }
                    Err(CoordinationError::IdentityTaken {
                        replica_set,
                        worker,
                    }) => {
                        self.ownership.forfeit_all();
                        return Err(CoordinationError::IdentityTaken {
                            replica_set,
                            worker,
                        });
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "heartbeat failed; retrying");
                        next_heartbeat = tokio::time::Instant::now() + Duration::from_millis(500);
                    }
                }
            }
            match self.round().await {
                Ok(next) => {
                    failures = 0;
                    wait = wait.min(next);
                }
                Err(e) => {
                    failures += 1;
                    wait = crate::base::retry::backoff(
                        failures,
                        Duration::from_millis(100),
                        Duration::from_secs(5),
                    );
                    tracing::warn!(error = %e, retry_in = ?wait, "coordination round failed");
                }
            }
            let until_heartbeat =
                next_heartbeat.saturating_duration_since(tokio::time::Instant::now());
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.wakeup.notified() => {}
                _ = tokio::time::sleep(wait.min(until_heartbeat)) => {}
            }
        }
        // Shutdown: no more rebalancing, but keep heartbeating while the app drains the
        // pipelines, so that peers do not declare us stale mid-drain. Then leave.
        self.metrics
            .set_worker_state(self.member.worker.as_str(), "stopping");
        loop {
            tokio::select! {
                _ = leave.cancelled() => break,
                _ = tokio::time::sleep(self.config.heartbeat_interval) => {
                    if let Err(e) = self.member.heartbeat(&self.pool).await {
                        tracing::warn!(error = %e, "heartbeat failed while draining");
                    }
                }
            }
        }
        match self.member.leave(&self.pool).await {
            Ok(released) => tracing::info!(released, "left the replica set; peers take over now"),
            Err(e) => {
                tracing::warn!(error = %e, "could not leave the replica set cleanly; peers take over after the stale timeout")
            }
        }
        self.metrics
            .set_worker_state(self.member.worker.as_str(), "stopped");
        Ok(())
    }

    async fn heartbeat(&mut self) -> Result<(), CoordinationError> {
        let started = Instant::now();
        let beat = self.member.heartbeat(&self.pool).await?;
        self.metrics
            .heartbeat_latency_seconds
            .observe(started.elapsed().as_secs_f64());
        match beat {
            membership::Heartbeat::Alive => Ok(()),
            membership::Heartbeat::Removed => {
                tracing::warn!(worker = %self.member.worker, "this worker was removed as stale (paused or cut off?); registering again");
                // Whatever we held has been reassigned; fencing guards the in-flight batch.
                self.ownership.forfeit_all();
                self.member.register(&self.pool).await?;
                self.metrics.workers_registered_total.inc();
                Ok(())
            }
            membership::Heartbeat::Replaced => Err(CoordinationError::IdentityTaken {
                replica_set: self.member.replica_set.clone(),
                worker: self.member.worker.to_string(),
            }),
        }
    }

    /// One round: leader duties if we hold (or can take) the lease, then claim and release.
    /// Returns how soon the next round is due.
    async fn round(&mut self) -> Result<Duration, CoordinationError> {
        let started = Instant::now();
        let rs = self.try_lead().await?;
        if rs.partitions as u32 != self.partitions {
            self.resized_under_us(rs.partitions as u32);
            return Ok(self.config.heartbeat_interval);
        }
        let mut next = self.config.heartbeat_interval;
        if rs.leader {
            next = next.min(self.lead().await?);
        } else if let Some(ms) = rs.leader_until_ms {
            // Wake up when the leader's lease runs out, to take over promptly.
            next = next.min(Duration::from_millis(ms.max(0) as u64 + 20));
        }
        let rs = self.replica_set_row().await?;
        if rs.partitions as u32 != self.partitions {
            self.resized_under_us(rs.partitions as u32);
            return Ok(next);
        }
        next = next.min(self.reconcile(&rs).await?);
        controls::publish(
            &self.controls,
            controls::load(&self.pool, &self.config.replica_set).await?,
        );
        let registry =
            crate::lifecycle::registry::load(&self.pool, &self.config.replica_set).await?;
        self.registry.send_if_modified(|current| {
            let changed = **current != *registry;
            *current = registry;
            changed
        });
        self.metrics
            .coordination_duration_seconds
            .observe(started.elapsed().as_secs_f64());
        Ok(next)
    }

    /// The set now has `now` partitions: nothing this host holds or reads is valid under them
    /// (the resize fenced every claim). Drop it all, plan and claim nothing more, and tell the
    /// app to join again.
    fn resized_under_us(&mut self, now: u32) {
        if self.resized.is_cancelled() {
            return;
        }
        tracing::warn!(
            replica_set = %self.config.replica_set,
            from = %self.partitions,
            to = %now,
            "the replica set was resized; stopping this host's pipelines to join again with the new partition count"
        );
        self.ownership.forfeit_all();
        self.resized.cancel();
    }

    async fn try_lead(&self) -> Result<ReplicaSetRow, CoordinationError> {
        Ok(replica_sets::try_lead(
            &self.pool,
            &self.config.replica_set,
            &self.member.worker,
            self.config.stale_timeout,
        )
        .await?)
    }

    async fn replica_set_row(&self) -> Result<ReplicaSetRow, CoordinationError> {
        Ok(
            replica_sets::seen_by(&self.pool, &self.config.replica_set, &self.member.worker)
                .await?,
        )
    }

    async fn live_workers(&self) -> Result<Vec<WorkerId>, CoordinationError> {
        Ok(store::workers::ids(&self.pool, &self.config.replica_set).await?)
    }

    async fn partition_rows(&self) -> Result<Vec<PartitionRow>, CoordinationError> {
        Ok(store::partitions::list(&self.pool, &self.config.replica_set).await?)
    }

    /// Leader duties: remove stale workers, re-plan, and lift the recreate barrier. Returns when
    /// the next stale check is due.
    async fn lead(&mut self) -> Result<Duration, CoordinationError> {
        let removed = membership::remove_stale(
            &self.pool,
            &self.config.replica_set,
            self.config.stale_timeout,
        )
        .await?;
        self.metrics
            .stale_workers_cleaned_total
            .inc_by(removed.len() as u64);
        let workers = self.live_workers().await?;
        let rows = self.partition_rows().await?;
        let current: Vec<Option<WorkerId>> = rows
            .iter()
            .map(|r| r.assigned_to.clone().map(WorkerId))
            .collect();
        let planned = assignment::plan(&workers, &current);
        let moved = assignment::moved(&current, &planned);
        if moved > 0 {
            self.write_generation(&rows, &planned, &workers, moved, &removed)
                .await?;
        }
        self.lift_recreate_barrier(&workers).await?;
        crate::lifecycle::duties::run(&crate::lifecycle::duties::Duties {
            pool: &self.pool,
            replica_set: &self.config.replica_set,
            events_table: &self.config.events_table,
            partitions: self.partitions,
            promote_lag: self.config.promote_lag,
            retired_grace: self.config.retired_grace,
        })
        .await;
        // Next stale check: when the oldest heartbeat would expire.
        let until = store::workers::until_next_stale(
            &self.pool,
            &self.config.replica_set,
            self.config.stale_timeout,
        )
        .await?;
        Ok(until.unwrap_or_default() + Duration::from_millis(20))
    }

    async fn write_generation(
        &mut self,
        rows: &[PartitionRow],
        planned: &[Option<WorkerId>],
        workers: &[WorkerId],
        moved: usize,
        removed: &[String],
    ) -> Result<(), CoordinationError> {
        let reason = if !removed.is_empty() {
            format!("stale workers removed: {}", removed.join(", "))
        } else {
            "membership changed".to_string()
        };
        let mut tx = self.pool.begin().await?;
        let started_by = replica_sets::StartedBy::Leader {
            leader: &self.member.worker,
            workers,
            moved,
        };
        let Some(generation) =
            replica_sets::new_generation(&mut tx, &self.config.replica_set, &started_by, &reason)
                .await?
        else {
            return Ok(());
        };
        let (parts, owners): (Vec<i32>, Vec<Option<String>>) = rows
            .iter()
            .zip(planned)
            .map(|(r, w)| (r.partition, w.as_ref().map(|w| w.0.clone())))
            .unzip();
        store::partitions::assign(
            &mut tx,
            &self.config.replica_set,
            generation,
            &parts,
            &owners,
        )
        .await?;
        notify::coordination(&mut *tx, &self.config.replica_set).await?;
        tx.commit().await?;
        self.metrics.generations_total.inc();
        self.metrics
            .partition_assignments_total
            .inc_by(moved as u64);
        tracing::info!(
            replica_set = %self.config.replica_set,
            generation,
            workers = workers.len(),
            moved,
            %reason,
            "new generation: partitions reassigned"
        );
        Ok(())
    }

    /// Recreate strategy: the new generation starts only once every owner of the previous one
    /// has released (or is gone and will be fenced).
    async fn lift_recreate_barrier(&self, workers: &[WorkerId]) -> Result<(), CoordinationError> {
        let lifted = replica_sets::lift_stop_barrier(
            &self.pool,
            &self.config.replica_set,
            &self.member.worker,
            workers,
        )
        .await?;
        if lifted {
            tracing::info!(replica_set = %self.config.replica_set, "recreate: every owner of the previous generation stopped; starting the new one");
            membership::notify(&self.pool, &self.config.replica_set).await?;
        }
        Ok(())
    }

    /// Worker duties: forget what we lost, release what is no longer ours, claim what is.
    async fn reconcile(&mut self, rs: &ReplicaSetRow) -> Result<Duration, CoordinationError> {
        let me = self.member.worker.as_str();
        let running = rs.phase == replica_sets::Phase::Running;
        let rows = self.partition_rows().await?;
        let workers: HashSet<String> = self
            .live_workers()
            .await?
            .into_iter()
            .map(|w| w.0)
            .collect();
        let held: HashMap<PartitionId, Epoch> = self.ownership.held().into_iter().collect();
        let releasing: HashSet<PartitionId> =
            self.releasing.lock().map(|r| r.clone()).unwrap_or_default();

        let reconcile::Plan {
            lost,
            release,
            claim,
            assigned,
        } = reconcile::plan(&reconcile::Seen {
            rows: &rows,
            me,
            running,
            held: &held,
            releasing: &releasing,
            live_workers: &workers,
        });
        if !lost.is_empty() {
            tracing::warn!(partitions = lost.len(), partition_list = %PartitionId::list(&lost), "partitions were taken over by another worker; dropping them");
            self.ownership.forfeit(&lost);
        }
        for p in release {
            self.spawn_release(p);
        }
        let mut next = self.config.heartbeat_interval;
        if !claim.is_empty() {
            self.claim(&claim, rs.generation).await?;
        }
        let held_now: HashSet<PartitionId> =
            self.ownership.held().into_iter().map(|(p, _)| p).collect();
        let holds_assignment = running && assigned.iter().all(|p| held_now.contains(p));
        if !holds_assignment {
            // Waiting for a release or the recreate barrier: look again soon (NOTIFY usually
            // wakes us first).
            next = next.min(Duration::from_millis(250));
            let since = *self.waiting_since.get_or_insert_with(Instant::now);
            if since.elapsed() > self.config.coordination_timeout {
                tracing::warn!(
                    waited = ?since.elapsed(),
                    missing = assigned.iter().filter(|p| !held_now.contains(p)).count(),
                    phase = rs.phase.as_str(),
                    "still waiting for assigned partitions to be released (COORDINATION_TIMEOUT exceeded)"
                );
                self.waiting_since = Some(Instant::now());
            }
        } else {
            self.waiting_since = None;
        }

        self.publish(rs, &assigned, &held_now, holds_assignment, workers.len());
        Ok(next)
    }

    /// Publishes what reconciling found: the generation (counting a reconfiguration when the
    /// assignment changed), the metrics, and the status probes and the admin API read.
    fn publish(
        &mut self,
        rs: &ReplicaSetRow,
        assigned: &[PartitionId],
        held_now: &HashSet<PartitionId>,
        holds_assignment: bool,
        live_workers: usize,
    ) {
        let generation = Generation(rs.generation);
        if self.last_generation != Some(generation) {
            if self.last_generation.is_some() && assigned != self.last_assigned.as_slice() {
                self.metrics.reconfiguration_total.inc();
            }
            tracing::info!(
                generation = generation.0,
                assigned = assigned.len(),
                held = held_now.len(),
                "running generation"
            );
            self.last_generation = Some(generation);
            self.last_assigned = assigned.to_vec();
        }
        self.metrics.generation.set(rs.generation);
        self.metrics.active_workers.set(live_workers as i64);
        self.metrics
            .current_generation_partitions
            .set(assigned.len() as i64);
        self.metrics.owned_partitions.set(held_now.len() as i64);
        self.metrics.set_worker_state(
            self.member.worker.as_str(),
            if holds_assignment { "running" } else { "ready" },
        );
        self.status.send_replace(CoordinationStatus {
            registered: true,
            leader: rs.leader,
            generation: rs.generation,
            phase: Some(rs.phase),
            partitions: self.partitions,
            live_workers,
            assigned: assigned.len(),
            owned: held_now.len(),
            holds_assignment,
        });
    }

    async fn claim(
        &self,
        partitions: &[PartitionId],
        generation: i64,
    ) -> Result<(), CoordinationError> {
        let ids: Vec<i32> = partitions.iter().map(|p| p.as_i32()).collect();
        let mut tx = self.pool.begin().await?;
        // A zombie's commit may hold the row; do not wait long, the next round retries.
        sqlx::query("SET LOCAL lock_timeout = '2s'")
            .execute(&mut *tx)
            .await?;
        let claimed = match store::partitions::claim(
            &mut tx,
            &self.config.replica_set,
            &self.member.worker,
            &ids,
            self.partitions,
        )
        .await
        {
            Ok(rows) => rows,
            Err(e)
                if crate::base::sqlstate::of(&e).as_deref()
                    == Some(crate::base::sqlstate::LOCK_NOT_AVAILABLE) =>
            {
                tracing::info!("a partition row is locked by a previous owner's commit; retrying the claim shortly");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        tx.commit().await?;
        for (p, epoch) in &claimed {
            self.ownership.grant(PartitionId(*p as u32), Epoch(*epoch));
        }
        if !claimed.is_empty() {
            let list: Vec<String> = claimed
                .iter()
                .map(|(p, e)| format!("{}@{}", PartitionId(*p as u32), Epoch(*e)))
                .collect();
            tracing::info!(generation, partitions = list.len(), partition_list = %list.join(" "), "claimed partitions");
        }
        Ok(())
    }

    fn spawn_release(&self, partition: PartitionId) {
        if let Ok(mut r) = self.releasing.lock() {
            if !r.insert(partition) {
                return;
            }
        }
        let ownership = self.ownership.clone();
        let pool = self.pool.clone();
        let releasing = self.releasing.clone();
        let replica_set = self.config.replica_set.clone();
        let worker = self.member.worker.clone();
        let timeout = self.config.revoke_timeout;
        let wakeup = self.wakeup.clone();
        tokio::spawn(async move {
            let started = Instant::now();
            // Not held locally: release whatever epoch the database has for this worker id.
            let epoch = ownership.revoke(partition, timeout).await;
            let result = store::partitions::release(
                &pool,
                &replica_set,
                partition.as_i32(),
                &worker,
                epoch.map(|e| e.0),
            )
            .await;
            match result {
                Ok(_) => {
                    let _ = membership::notify(&pool, &replica_set).await;
                    tracing::info!(
                        partition = partition.0,
                        waited_ms = started.elapsed().as_millis() as u64,
                        "released partition"
                    );
                }
                Err(e) => {
                    tracing::warn!(partition = partition.0, error = %e, "releasing a partition failed; the next round retries")
                }
            }
            if let Ok(mut r) = releasing.lock() {
                r.remove(&partition);
            }
            wakeup.wake();
        });
    }
}
