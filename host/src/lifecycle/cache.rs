//! Plugins by content hash: compiled once per process (memory) and once per machine (a
//! `.cwasm` file keyed by sha256 and the engine's compatibility hash), so that a restart or a
//! swap does not recompile.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use sqlx::PgPool;

use crate::runtime::{Plugin, PluginInstance, Runtime};

pub struct PluginCache {
    runtime: Arc<Runtime>,
    pool: PgPool,
    replica_set: String,
    loaded: Mutex<HashMap<String, Arc<Plugin>>>,
}

impl PluginCache {
    pub fn new(runtime: Arc<Runtime>, pool: PgPool, replica_set: String) -> PluginCache {
        PluginCache {
            runtime,
            pool,
            replica_set,
            loaded: Mutex::default(),
        }
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// Remembers a plugin loaded from a file.
    pub fn insert(&self, plugin: Arc<Plugin>) {
        if let Ok(mut loaded) = self.loaded.lock() {
            loaded.insert(plugin.sha256.clone(), plugin);
        }
    }

    /// The plugin with this content hash, and a fresh instance of it: from memory, else from the
    /// registry's bytes (compiled through the on-disk cache).
    pub async fn get(
        &self,
        projection: &str,
        sha256: &str,
    ) -> anyhow::Result<(Arc<Plugin>, PluginInstance)> {
        let known = self.loaded.lock().ok().and_then(|l| l.get(sha256).cloned());
        if let Some(plugin) = known {
            let instance = PluginInstance::instantiate(&self.runtime, &plugin).await?;
            return Ok((plugin, instance));
        }
        let bytes: Vec<u8> = sqlx::query_scalar(
            "SELECT wasm FROM projection_host.plugins WHERE replica_set = $1 AND projection = $2 AND sha256 = $3",
        )
        .bind(&self.replica_set)
        .bind(projection)
        .bind(sha256)
        .fetch_optional(&self.pool)
        .await?
        .with_context(|| format!("plugin {projection} {sha256} is not in the registry"))?;
        let label = PathBuf::from(format!("registry:{projection}@{}", &sha256[..12]));
        let (plugin, instance) = self.runtime.load_bytes(&label, &bytes).await?;
        anyhow::ensure!(
            plugin.sha256 == sha256,
            "the registry's bytes for {sha256} hash to {}",
            plugin.sha256
        );
        self.insert(plugin.clone());
        Ok((plugin, instance))
    }
}
