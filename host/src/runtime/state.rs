//! What a plugin's store holds: the sandboxed WASI context, limits, and the current batch's
//! read-model context (transaction, effect buffer, table shapes).

use std::sync::Arc;

use wasmtime::component::ResourceTable;
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::limits::Limits;
use crate::sink::session::BatchTx;
use crate::sink::EffectError;
use crate::sink::{EffectBuffer, SchemaCache};

/// Captured guest stdout/stderr per call, so that a `println!` or a panic message reaches the
/// logs instead of a terminal.
const OUTPUT_CAPACITY: usize = 64 * 1024;

/// Most rows a plugin's buffered writes may touch in one batch.
pub const MAX_PENDING_ROWS: usize = 1_000_000;
/// Most rows a plugin query may return.
pub const MAX_QUERY_ROWS: usize = 100_000;

/// Host memory a plugin can make grow within one call, in bytes (per-projection settings).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostMemoryLimits {
    /// Keys and values buffered by the keyed API (limit max_write_bytes).
    pub write_bytes: u64,
    /// The rows of one `query` result (limit max_query_bytes).
    pub query_bytes: u64,
}

impl Default for HostMemoryLimits {
    fn default() -> Self {
        HostMemoryLimits {
            write_bytes: 64 << 20,
            query_bytes: 16 << 20,
        }
    }
}

/// Read-model access for the batch in progress.
pub struct BatchContext {
    pub tx: Option<BatchTx>,
    pub memory: HostMemoryLimits,
    pub buffer: EffectBuffer,
    pub schemas: SchemaCache,
    /// A SQL error the plugin saw: the transaction is aborted, so the batch must fail even if
    /// the plugin goes on and returns success.
    pub failed: Option<EffectError>,
    pub logged: usize,
}

pub struct StoreState {
    pub projection: Arc<str>,
    wasi: WasiCtx,
    table: ResourceTable,
    pub limits: Limits,
    pub batch: BatchContext,
    stdout: MemoryOutputPipe,
    stderr: MemoryOutputPipe,
    /// Output lengths when the current call started.
    output_mark: (usize, usize),
}

impl StoreState {
    pub fn new(projection: Arc<str>, limits: Limits) -> Self {
        let stdout = MemoryOutputPipe::new(OUTPUT_CAPACITY);
        let stderr = MemoryOutputPipe::new(OUTPUT_CAPACITY);
        let wasi = sandboxed_wasi(stdout.clone(), stderr.clone());
        StoreState {
            projection,
            wasi,
            table: ResourceTable::new(),
            limits,
            batch: BatchContext {
                tx: None,
                memory: HostMemoryLimits::default(),
                buffer: EffectBuffer::new(
                    MAX_PENDING_ROWS,
                    HostMemoryLimits::default().write_bytes,
                ),
                schemas: SchemaCache::default(),
                failed: None,
                logged: 0,
            },
            stdout,
            stderr,
            output_mark: (0, 0),
        }
    }

    /// Arms the limits and remembers where the guest's output stands.
    pub fn start_call(&mut self) {
        self.limits.arm();
        self.output_mark = (self.stdout.contents().len(), self.stderr.contents().len());
    }

    /// What the guest printed during the current call (a panic message, typically), on one
    /// line.
    pub fn call_output(&self) -> String {
        let out = self.stdout.contents();
        let err = self.stderr.contents();
        let mut text =
            String::from_utf8_lossy(out.get(self.output_mark.0..).unwrap_or_default()).into_owned();
        text.push_str(&String::from_utf8_lossy(
            err.get(self.output_mark.1..).unwrap_or_default(),
        ));
        crate::base::text::plugin_message(&text.split_whitespace().collect::<Vec<_>>().join(" "))
    }
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

/// WASI with no ambient authority: no preopened directories, no environment or arguments, no
/// network, a clock stuck at the epoch, and deterministic "randomness" (std's HashMap still
/// works; nothing can be learned from it).
fn sandboxed_wasi(stdout: MemoryOutputPipe, stderr: MemoryOutputPipe) -> WasiCtx {
    let mut builder = WasiCtx::builder();
    builder
        .stdout(stdout)
        .stderr(stderr)
        .allow_tcp(false)
        .allow_udp(false)
        .allow_ip_name_lookup(false)
        .secure_random(wasmtime_wasi::Deterministic::new(vec![
            0x5a, 0xa5, 0x3c, 0xc3,
        ]))
        .insecure_random(wasmtime_wasi::Deterministic::new(vec![0x96, 0x69]))
        .insecure_random_seed(0)
        .wall_clock(FrozenClock)
        .monotonic_clock(FrozenClock);
    builder.build()
}

/// A clock that never moves: plugins get no time source (use the event's `created-at`).
struct FrozenClock;

impl wasmtime_wasi::HostWallClock for FrozenClock {
    fn resolution(&self) -> std::time::Duration {
        std::time::Duration::from_secs(1)
    }
    fn now(&self) -> std::time::Duration {
        std::time::Duration::ZERO
    }
}

impl wasmtime_wasi::HostMonotonicClock for FrozenClock {
    fn resolution(&self) -> u64 {
        1_000_000_000
    }
    fn now(&self) -> u64 {
        0
    }
}
