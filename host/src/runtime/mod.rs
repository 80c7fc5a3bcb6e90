//! The sole home of wasmtime: the engine, loading and checking components, instances with
//! their sandbox, and the host imports.

pub mod bindings;
mod imports;
pub mod instance;
pub mod limits;
pub mod loader;
pub mod state;

use std::time::Duration;

use wasmtime::component::{HasSelf, Linker};
use wasmtime::{Config, Engine};

pub use imports::TransientDatabaseError;
pub use instance::{PluginFailure, PluginInstance};
pub use loader::Plugin;
use state::StoreState;

/// Sandbox settings for every plugin instance.
#[derive(Debug, Clone)]
pub struct RuntimeConfig {
    pub memory_limit: u64,
    pub call_timeout: Duration,
    /// Where compiled components are kept between runs (`None`: compile every time).
    pub cache_dir: Option<std::path::PathBuf>,
}

/// The engine (one per process), the linker with the host imports, and the epoch ticker.
pub struct Runtime {
    engine: Engine,
    linker: Linker<StoreState>,
    config: RuntimeConfig,
    /// Components compiled by this process, by sha256: a rejoin after a resize (or a file
    /// scanned again) does not compile the same bytes twice.
    compiled: std::sync::Mutex<std::collections::HashMap<String, wasmtime::component::Component>>,
}

impl Runtime {
    pub fn new(config: RuntimeConfig) -> anyhow::Result<Runtime> {
        if let Some(dir) = &config.cache_dir {
            loader::prepare_cache_dir(dir)?;
        }
        let mut wasm = Config::new();
        wasm.wasm_component_model(true)
            // CPU deadlines: the guest checks the epoch at function entries and loop heads.
            .epoch_interruption(true)
            // We do not use the component-model async ABI; leaving it on costs ~1 µs per call.
            .concurrency_support(false)
            // One core compiles a new plugin build while the others keep projecting (a
            // parallel compile would starve the running pipelines during a swap).
            .parallel_compilation(false)
            .max_wasm_stack(1 << 20);
        let engine = Engine::new(&wasm)?;
        limits::start_epoch_ticker(&engine);

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        bindings::Projection::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)?;
        Ok(Runtime {
            engine,
            linker,
            config,
            compiled: Default::default(),
        })
    }

    /// Identifies the engine's code generation settings: compiled artifacts are only reused by
    /// an identical engine.
    fn compatibility(&self) -> String {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        format!("{:016x}", hasher.finish())
    }
}
