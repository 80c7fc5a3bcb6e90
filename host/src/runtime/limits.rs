//! Sandbox limits: the epoch ticker behind per-call CPU deadlines, and the per-instance memory
//! cap. A breach is recorded in the store so that the failure can name the limit.

use std::time::{Duration, Instant};

use wasmtime::{Engine, ResourceLimiter};

/// How often the engine's epoch advances; the granularity of deadlines and of cooperative
/// yields to the async executor.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// Advances the engine's epoch from a plain thread until the engine is dropped.
pub fn start_epoch_ticker(engine: &Engine) {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wasm-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        })
        .expect("spawning the epoch ticker thread");
}

/// Which limit stopped a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Breach {
    Deadline(Duration),
    Memory(u64),
}

/// Per-store limit state.
pub struct Limits {
    pub memory_bytes: u64,
    pub call_timeout: Duration,
    pub deadline: Option<Instant>,
    pub breach: Option<Breach>,
}

impl Limits {
    pub fn new(memory_bytes: u64, call_timeout: Duration) -> Self {
        Limits {
            memory_bytes,
            call_timeout,
            deadline: None,
            breach: None,
        }
    }

    /// Arms the deadline for the next call.
    pub fn arm(&mut self) {
        self.deadline = Some(Instant::now() + self.call_timeout);
        self.breach = None;
    }

    /// Called on every epoch tick during a call: keep going (yielding to tokio) or stop.
    pub fn on_tick(&mut self) -> wasmtime::Result<wasmtime::UpdateDeadline> {
        match self.deadline {
            Some(deadline) if Instant::now() >= deadline => {
                self.breach = Some(Breach::Deadline(self.call_timeout));
                Err(wasmtime::Error::msg(format!(
                    "plugin call exceeded its deadline of {:?} (limit plugin_call_timeout)",
                    self.call_timeout
                )))
            }
            _ => Ok(wasmtime::UpdateDeadline::Yield(1)),
        }
    }
}

impl ResourceLimiter for Limits {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired as u64 > self.memory_bytes {
            self.breach = Some(Breach::Memory(self.memory_bytes));
            return Err(wasmtime::Error::msg(format!(
                "plugin memory would grow to {desired} bytes, over its limit of {} bytes (limit plugin_memory_limit)",
                self.memory_bytes
            )));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 1_000_000)
    }
}
