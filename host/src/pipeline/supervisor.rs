//! Runs one pipeline per read model the registry says the fleet runs (the active version of
//! each projection, plus a rebuild in progress), and keeps the registry fed with the plugin
//! files mounted on this host.

use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::policy::Settings;
use super::worker::{PipelineConfig, PipelineContext, ProjectionWorker};
use crate::lifecycle::registry::{self, Mounted};
use crate::lifecycle::PluginCache;

/// Plugin files of this host (`--plugin` files and `--plugins` directories), rescanned for
/// new or changed components.
pub struct MountedPlugins {
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    seen: HashMap<PathBuf, String>,
    host: String,
}

impl MountedPlugins {
    pub fn new(files: Vec<PathBuf>, dirs: Vec<PathBuf>) -> Self {
        MountedPlugins {
            files,
            dirs,
            seen: HashMap::new(),
            host: gethostname::gethostname().to_string_lossy().into_owned(),
        }
    }

    fn paths(&self) -> Vec<PathBuf> {
        let mut paths = self.files.clone();
        for dir in &self.dirs {
            if let Ok(entries) = std::fs::read_dir(dir) {
                paths.extend(
                    entries
                        .filter_map(Result::ok)
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|x| x == "wasm")),
                );
            }
        }
        paths.sort();
        paths.dedup();
        paths
    }

    /// Loads every new or changed file, checks it, and registers it. A file that cannot be used
    /// (unreadable, not a component, a describe that traps or runs past its deadline) is
    /// reported and skipped, at start as later; the messages are returned.
    pub async fn scan(
        &mut self,
        cache: &PluginCache,
        pool: &sqlx::PgPool,
        replica_set: &str,
    ) -> anyhow::Result<Vec<String>> {
        let mut unusable = Vec::new();
        for path in self.paths() {
            let bytes = match std::fs::read(&path) {
                Ok(b) => b,
                Err(e) => {
                    let message = format!("cannot read plugin {}: {e}", path.display());
                    tracing::error!("{message}; skipping it");
                    unusable.push(message);
                    continue;
                }
            };
            let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            if self.seen.get(&path) == Some(&sha) {
                continue;
            }
            let loaded = cache.runtime().load_bytes(&path, &bytes).await;
            let (plugin, _) = match loaded {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(file = %path.display(), error = %e, "a mounted plugin file is not usable; skipping it (the other projections run, and a registered version of it keeps running)");
                    unusable.push(e.to_string());
                    self.seen.insert(path, sha);
                    continue;
                }
            };
            cache.insert(plugin.clone());
            let outcome =
                registry::register_mounted(pool, replica_set, &plugin, &bytes, &self.host).await?;
            match outcome {
                Mounted::FirstVersion => {
                    tracing::info!(projection = %plugin.name, version = %plugin.version, sha256 = %plugin.sha256, "registered the first version of a projection")
                }
                Mounted::Activated => {
                    tracing::info!(projection = %plugin.name, version = %plugin.version, sha256 = %plugin.sha256, file = %path.display(), "a new mounted plugin file: activated on every host (continue mode)")
                }
                Mounted::Known => {
                    tracing::debug!(projection = %plugin.name, sha256 = %plugin.sha256, "mounted plugin already registered")
                }
            }
            self.seen.insert(path, sha);
        }
        Ok(unusable)
    }
}

pub struct Supervisor {
    pub context: PipelineContext,
    /// Every field but `track`, `namespace` and `settings`, which come per read model.
    pub template: PipelineConfig,
    pub settings: Settings,
    pub cache: Arc<PluginCache>,
    pub mounted: MountedPlugins,
    pub scan_interval: Duration,
}

impl Supervisor {
    /// Runs until `stop`, then lets every pipeline finish its batch (up to `drain`).
    pub async fn run(mut self, stop: CancellationToken, drain: Duration) {
        // Each pipeline task returns whether it panicked, and wakes this loop when it ends.
        let mut running: HashMap<String, JoinHandle<bool>> = HashMap::new();
        let mut panics = PanicRecord::default();
        let (ended_tx, mut ended_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        tokio::spawn(forget_lost_partitions(self.context.clone(), stop.clone()));
        let mut registry = self.context.registry.clone();
        let mut next_scan = tokio::time::Instant::now() + self.scan_interval;
        loop {
            while ended_rx.try_recv().is_ok() {}
            // Reap the tasks that ended. A track is restarted only once its previous task was
            // reaped here, so two pipelines of one read model never run at once.
            let finished: Vec<String> = running
                .iter()
                .filter(|(_, h)| h.is_finished())
                .map(|(track, _)| track.clone())
                .collect();
            for track in finished {
                let Some(handle) = running.remove(&track) else {
                    continue;
                };
                // Finished: the output is ready without waiting.
                let panicked = match handle.now_or_never() {
                    Some(Ok(panicked)) => panicked,
                    Some(Err(e)) => e.is_panic(),
                    None => false,
                };
                if panicked {
                    self.context.metrics.pipeline_panicked(&track);
                    let delay = panics.record(&track);
                    // The panic itself was logged by the panic hook, with its message and
                    // location.
                    tracing::error!(projection = %track, restart_in = ?delay, "the pipeline task panicked; restarting it");
                }
            }
            let current = registry.borrow_and_update().clone();
            for version in &current.running {
                // A task that ended since the reaping above is reaped on the next pass (its end
                // wakes this loop).
                if running.contains_key(&version.track)
                    || panics.waiting(&version.track, tokio::time::Instant::now())
                {
                    continue;
                }
                match self.cache.get(&version.projection, &version.sha256).await {
                    Ok((plugin, instance)) => {
                        let mut config = self.template.clone();
                        config.track = version.track.clone();
                        config.namespace = version.namespace.clone();
                        config.settings = self.settings.for_projection(&version.projection);
                        config.build_generation = version.activated_generation;
                        tracing::info!(projection = %version.track, version = %plugin.version, sha256 = %&plugin.sha256[..12], state = %version.state, "starting the pipeline");
                        let worker =
                            ProjectionWorker::new(plugin, instance, self.context.clone(), config);
                        running.insert(version.track.clone(), {
                            let (ended_tx, stop) = (ended_tx.clone(), stop.clone());
                            tokio::spawn(async move {
                                let panicked = AssertUnwindSafe(worker.run(stop))
                                    .catch_unwind()
                                    .await
                                    .is_err();
                                let _ = ended_tx.send(());
                                panicked
                            })
                        });
                    }
                    Err(e) => {
                        tracing::error!(projection = %version.track, error = %format!("{e:#}"), "cannot load the registered plugin; retrying")
                    }
                }
            }
            let next_restart = panics.next_restart();
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = registry.changed() => {}
                Some(()) = ended_rx.recv() => {}
                _ = crate::base::retry::sleep_until(next_restart) => {}
                _ = tokio::time::sleep_until(next_scan) => {
                    next_scan = tokio::time::Instant::now() + self.scan_interval;
                    let pool = self.context.pool.clone();
                    if let Err(e) = self.mounted.scan(&self.cache, &pool, &self.template.replica_set).await {
                        tracing::warn!(error = %format!("{e:#}"), "scanning the mounted plugins failed");
                    }
                }
            }
        }
        let handles: Vec<JoinHandle<bool>> = running.into_values().collect();
        let aborts: Vec<_> = handles.iter().map(JoinHandle::abort_handle).collect();
        if tokio::time::timeout(drain, futures::future::join_all(handles))
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?drain, "in-flight batches did not finish within the shutdown timeout; abandoning them (they roll back)");
            aborts.iter().for_each(|a| a.abort());
        }
    }
}

/// Removes the per-partition series of partitions this host no longer holds as soon as the
/// ownership changes, before any pipeline gets to its next batch: summed over pods, a lost
/// partition must not count twice (the HPA and the lag alerts read these sums).
async fn forget_lost_partitions(context: PipelineContext, stop: CancellationToken) {
    let mut changed = context.ownership.subscribe();
    loop {
        let held: std::collections::BTreeSet<u32> =
            context.ownership.held().iter().map(|(p, _)| p.0).collect();
        context.metrics.retain_partitions(None, &held);
        tokio::select! {
            _ = stop.cancelled() => return,
            result = changed.changed() => if result.is_err() { return },
        }
    }
}

/// Pipelines that panicked: restarted at once the first time, with a growing delay when they
/// keep panicking (a panic more than a minute after the last one counts as a first again).
#[derive(Default)]
struct PanicRecord {
    by_track: HashMap<String, (u32, tokio::time::Instant)>,
}

impl PanicRecord {
    const FORGET_AFTER: Duration = Duration::from_secs(60);

    /// Notes a panic; returns how long to wait before the restart.
    fn record(&mut self, track: &str) -> Duration {
        let now = tokio::time::Instant::now();
        let count = match self.by_track.get(track) {
            Some((n, at)) if now.duration_since(*at) < Self::FORGET_AFTER => n + 1,
            _ => 1,
        };
        let delay = if count == 1 {
            Duration::ZERO
        } else {
            crate::base::retry::backoff(
                count - 1,
                Duration::from_millis(500),
                Duration::from_secs(30),
            )
        };
        self.by_track
            .insert(track.to_string(), (count, now + delay));
        delay
    }

    /// The pipeline must not restart yet.
    fn waiting(&self, track: &str, now: tokio::time::Instant) -> bool {
        self.by_track.get(track).is_some_and(|(_, at)| *at > now)
    }

    fn next_restart(&self) -> Option<tokio::time::Instant> {
        let now = tokio::time::Instant::now();
        self.by_track
            .values()
            .map(|(_, at)| *at)
            .filter(|at| *at > now)
            .min()
    }
}
