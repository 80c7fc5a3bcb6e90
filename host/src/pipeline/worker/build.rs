//! The plugin build a worker runs: its instance (made again after a trap), the next build
//! compiled in the background for a swap at a batch boundary, and the read model's setup
//! (schema, role, the plugin's `setup`) that a new build runs first.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::failure::{BatchError, FailedBatch};
use super::ProjectionWorker;
use crate::db::quote_ident;
use crate::pipeline::policy::ProjectionSettings;
use crate::runtime::state::HostMemoryLimits;
use crate::runtime::{Plugin, PluginInstance};
use crate::sink::role;
use crate::sink::session::ProjectionSession;
use crate::sink::SqlIsolation;
use crate::source::EventReader;

/// A build being prepared for a swap.
pub(super) struct NextBuild {
    sha256: String,
    generation: i64,
    ready: tokio::task::JoinHandle<anyhow::Result<(Arc<Plugin>, PluginInstance)>>,
}

/// The build a worker runs, and what it prepared for it.
pub(super) struct BuildSlot {
    pub plugin: Arc<Plugin>,
    /// `None` after a trap: the next call makes a new instance.
    pub instance: Option<PluginInstance>,
    /// The next build, being compiled in the background while the current one keeps working.
    pub next: Option<NextBuild>,
    /// A new plugin build was swapped in and still has to run its setup.
    pub needs_setup: bool,
    /// The generation that activated the running build.
    pub generation: i64,
    /// The projection's own sessions, known after setup.
    pub session: Option<ProjectionSession>,
    /// The schema and plugin name whose role and grants this worker already prepared; a
    /// continue-mode swap of the same read model skips that DDL, which would lengthen the pause.
    pub prepared: Option<(String, Arc<str>)>,
}

impl BuildSlot {
    pub fn new(plugin: Arc<Plugin>, instance: PluginInstance, generation: i64) -> BuildSlot {
        BuildSlot {
            plugin,
            instance: Some(instance),
            next: None,
            needs_setup: true,
            generation,
            session: None,
            prepared: None,
        }
    }
}

/// Sandbox and host-memory limits of the projection's settings.
pub(super) fn apply_limits(instance: &mut PluginInstance, settings: &ProjectionSettings) {
    instance.set_limits(
        settings.memory_limit,
        settings.call_timeout,
        HostMemoryLimits {
            write_bytes: settings.max_write_bytes,
            query_bytes: settings.max_query_bytes,
        },
    );
}

impl ProjectionWorker {
    /// Creates the projection's schema (and role) and runs the plugin's `setup` in one
    /// transaction, serialised across hosts so that concurrent `CREATE ... IF NOT EXISTS`
    /// cannot collide.
    pub(super) async fn setup(&mut self) -> Result<(), BatchError> {
        let started = Instant::now();
        let target = (
            self.config.namespace.clone(),
            self.build.plugin.name.clone(),
        );
        if self.build.prepared.as_ref() != Some(&target) || self.build.session.is_none() {
            let credentials = match self.config.isolation {
                SqlIsolation::Role => Some(
                    role::prepare(
                        &self.pool,
                        &self.config.replica_set,
                        &self.build.plugin.name,
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
            self.build.session = Some(ProjectionSession::new(
                self.session_options.clone(),
                self.pool.clone(),
                credentials,
                &self.config.replica_set,
                &self.build.plugin.name,
            ));
            self.build.prepared = Some(target);
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
        crate::db::host_lock(
            &mut lock,
            crate::base::locks::HostLock::Setup {
                namespace: &self.config.namespace,
            },
        )
        .await?;
        let mut tx = self.begin().await?;
        tx.mark_dirty();
        let instance = self.instance().await?;
        let outcome = instance.setup(tx).await;
        if let Err(failure) = outcome.result {
            if let Some(tx) = outcome.tx {
                let _ = tx.rollback().await;
            }
            if failure.poisons_instance() {
                self.build.instance = None;
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
            version = %self.build.plugin.version,
            sha256 = %&self.build.plugin.sha256[..12],
            role = self.build.session.as_ref().and_then(|s| s.role()).unwrap_or("(the host's own: SQL_ISOLATION=none)"),
            elapsed = ?started.elapsed(),
            "read model set up"
        );
        Ok(())
    }

    /// Follows the registry: swaps in another build of this read model at this batch boundary
    /// (continue mode), moves along when its schema was renamed (a rebuild was promoted), and
    /// returns false when the read model is no longer run (retired).
    pub(super) async fn follow_registry(&mut self) -> Result<bool, BatchError> {
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
        if wanted.sha256 != self.build.plugin.sha256 {
            // Compile the new build in the background; the current one keeps committing until
            // it is ready (the commit guard stops it once the new build wrote a partition).
            if self
                .build
                .next
                .as_ref()
                .is_none_or(|n| n.sha256 != wanted.sha256)
            {
                let (cache, projection, sha) = (
                    self.cache.clone(),
                    wanted.projection.clone(),
                    wanted.sha256.clone(),
                );
                self.build.next = Some(NextBuild {
                    sha256: wanted.sha256.clone(),
                    generation: wanted.activated_generation,
                    ready: tokio::spawn(async move { cache.get(&projection, &sha).await }),
                });
            }
            if self
                .build
                .next
                .as_ref()
                .is_some_and(|n| n.ready.is_finished())
            {
                let next = self.build.next.take().expect("checked above");
                let (plugin, mut instance) = next
                    .ready
                    .await
                    .map_err(|e| BatchError::Instantiate(e.to_string()))?
                    .map_err(|e| BatchError::Instantiate(format!("{e:#}")))?;
                apply_limits(&mut instance, &self.config.settings);
                tracing::info!(
                    projection = self.name(),
                    from = %format!("{} {}", self.build.plugin.version, &self.build.plugin.sha256[..12]),
                    to = %format!("{} {}", plugin.version, &plugin.sha256[..12]),
                    "swapping the plugin at this batch boundary"
                );
                self.metrics.plugin_swapped(
                    self.name(),
                    (&self.build.plugin.version, &self.build.plugin.sha256),
                    (&plugin.version, &plugin.sha256),
                );
                if plugin.subscription != self.build.plugin.subscription {
                    self.reading.resubscribe(EventReader::new(
                        &self.config.events_table,
                        &plugin.subscription,
                    ));
                }
                self.build.plugin = plugin;
                self.build.instance = Some(instance);
                self.build.generation = next.generation;
                // The new build may not fail where the old one did.
                self.failures.forget_for_new_build();
                self.reading.forget_retained();
                self.build.needs_setup = true;
                self.board.update(&self.config.track, |s| {
                    s.plugin_version = self.build.plugin.version.clone();
                    s.plugin_sha256 = self.build.plugin.sha256.clone();
                });
            }
        } else if self.build.next.is_some() {
            // Swapped back before the other build was ready.
            self.build.next = None;
        }
        if self.build.needs_setup {
            self.setup().await?;
            self.build.needs_setup = false;
        }
        Ok(true)
    }

    pub(super) async fn instance(&mut self) -> Result<&mut PluginInstance, BatchError> {
        if self.build.instance.is_none() {
            let mut instance = PluginInstance::instantiate(&self.runtime, &self.build.plugin)
                .await
                .map_err(|e| BatchError::Instantiate(format!("{e:#}")))?;
            apply_limits(&mut instance, &self.config.settings);
            self.build.instance = Some(instance);
        }
        Ok(self.build.instance.as_mut().expect("set above"))
    }
}
