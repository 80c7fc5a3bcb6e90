//! One live plugin instance: a store with its sandbox and a bound `projection` world. Calls
//! take the batch's transaction in and hand it back, with the outcome sorted into what the
//! pipeline needs to decide: commit, retry, or apply the failure policy.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use wasmtime::Store;

use super::bindings::types::{self, Batch, Event};
use super::bindings::{Projection, ProjectionPre};
use super::limits::{Breach, Limits};
use super::state::{HostMemoryLimits, StoreState};
use super::{Runtime, TransientDatabaseError};
use crate::sink::session::BatchTx;
use crate::sink::EffectError;
use crate::source::StoredEvent;

/// Extra wall-clock time on top of the CPU deadline before a call is abandoned; covers host
/// imports (database round trips), which epochs cannot interrupt.
const WALL_CLOCK_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PluginFailure {
    /// The plugin returned an error for the batch.
    #[error("the plugin rejected the batch: {message}")]
    Rejected {
        message: String,
        position: Option<i64>,
    },
    /// The guest trapped (a panic, `unreachable`, a bad memory access ...).
    #[error("the plugin trapped: {message}")]
    Trap { message: String },
    /// A sandbox limit stopped the call.
    #[error("{message}")]
    Limit { breach: Breach, message: String },
    /// PostgreSQL rejected the plugin's writes or SQL.
    #[error("the read-model write failed: {0}")]
    Sql(EffectError),
    /// The database connection failed; the batch can simply be retried.
    #[error("{0}")]
    Transient(String),
}

impl PluginFailure {
    /// After a trap the instance cannot be entered again; it must be re-created.
    pub fn poisons_instance(&self) -> bool {
        matches!(
            self,
            PluginFailure::Trap { .. } | PluginFailure::Limit { .. } | PluginFailure::Transient(_)
        )
    }

    pub fn is_transient(&self) -> bool {
        matches!(self, PluginFailure::Transient(_))
            || matches!(self, PluginFailure::Sql(e) if e.database.is_some_and(|d| d.transient))
    }

    /// The failing event's position, when the plugin said which one it was.
    pub fn position(&self) -> Option<i64> {
        match self {
            PluginFailure::Rejected { position, .. } => *position,
            _ => None,
        }
    }
}

/// The transaction handed back after a call, and what happened.
pub struct CallOutcome {
    pub tx: Option<BatchTx>,
    pub result: Result<(), PluginFailure>,
}

pub struct PluginInstance {
    store: Store<StoreState>,
    bindings: Projection,
}

impl PluginInstance {
    pub(super) async fn new(
        runtime: &Runtime,
        pre: &ProjectionPre<StoreState>,
        projection: Arc<str>,
    ) -> anyhow::Result<Self> {
        let limits = Limits::new(runtime.config.memory_limit, runtime.config.call_timeout);
        let mut store = Store::new(&runtime.engine, StoreState::new(projection, limits));
        store.limiter(|state| &mut state.limits);
        store.epoch_deadline_callback(|mut ctx| ctx.data_mut().limits.on_tick());
        store.set_epoch_deadline(1);
        let bindings = pre.instantiate_async(&mut store).await?;
        Ok(PluginInstance { store, bindings })
    }

    /// A fresh instance of an already loaded plugin (after a trap poisoned the previous one).
    pub async fn instantiate(runtime: &Runtime, plugin: &super::Plugin) -> anyhow::Result<Self> {
        Self::new(runtime, &plugin.pre, plugin.name.clone()).await
    }

    /// Applies a projection's own sandbox limits (from its settings).
    pub fn set_limits(
        &mut self,
        memory_bytes: u64,
        call_timeout: Duration,
        host: HostMemoryLimits,
    ) {
        let state = self.store.data_mut();
        state.limits.memory_bytes = memory_bytes;
        state.limits.call_timeout = call_timeout;
        state.batch.memory = host;
        state.batch.buffer.set_max_bytes(host.write_bytes);
    }

    pub(super) fn set_projection(&mut self, name: Arc<str>) {
        self.store.data_mut().projection = name;
    }

    pub async fn describe(&mut self) -> Result<types::Descriptor, PluginFailure> {
        self.store.data_mut().start_call();
        let budget = self.store_call_budget();
        let call = self
            .bindings
            .pupsourcing_projection_handler()
            .call_describe(&mut self.store);
        let result = timed(call, budget).await;
        self.classify(result.map(|r| r.map(Ok::<_, types::HandlerError>)))
    }

    /// Runs `setup` inside `tx`, then flushes its keyed writes.
    pub async fn setup(&mut self, tx: BatchTx) -> CallOutcome {
        self.begin(tx);
        let budget = self.store_call_budget();
        let call = self
            .bindings
            .pupsourcing_projection_handler()
            .call_setup(&mut self.store);
        let result = timed(call, budget).await;
        self.poison_if_abandoned(&result);
        let result = self.classify(result.map(|r| {
            r.map(|inner| {
                inner.map_err(|e| types::HandlerError {
                    message: format!("setup failed ({:?}): {}", e.kind, e.message),
                    position: None,
                })
            })
        }));
        self.finish(result).await
    }

    /// Runs `handle-batch` inside `tx`, then flushes its keyed writes.
    pub async fn handle_batch(&mut self, tx: BatchTx, events: Vec<StoredEvent>) -> CallOutcome {
        let batch = to_wit_batch(events);
        self.begin(tx);
        let budget = self.store_call_budget();
        let call = self
            .bindings
            .pupsourcing_projection_handler()
            .call_handle_batch(&mut self.store, &batch);
        let result = timed(call, budget).await;
        self.poison_if_abandoned(&result);
        let result = self.classify(result);
        self.finish(result).await
    }

    fn store_call_budget(&self) -> Duration {
        self.store.data().limits.call_timeout + WALL_CLOCK_GRACE
    }

    /// A call cut off by the wall clock may have left a statement running on the batch's
    /// session: it is ended on the server instead of reused.
    fn poison_if_abandoned<T>(&mut self, result: &Result<T, tokio::time::error::Elapsed>) {
        if result.is_err() {
            if let Some(tx) = self.store.data_mut().batch.tx.as_mut() {
                tx.poison();
            }
        }
    }

    fn begin(&mut self, tx: BatchTx) {
        let state = self.store.data_mut();
        state.batch.tx = Some(tx);
        state.batch.buffer.clear();
        state.batch.failed = None;
        state.batch.logged = 0;
        state.start_call();
    }

    async fn finish(&mut self, mut result: Result<(), PluginFailure>) -> CallOutcome {
        let batch = &mut self.store.data_mut().batch;
        if result.is_ok() {
            if let Some(failed) = batch.failed.take() {
                result = Err(PluginFailure::Sql(failed));
            } else if let Err(e) = batch.flush().await {
                result = Err(PluginFailure::Sql(e));
            }
        }
        batch.buffer.clear();
        CallOutcome {
            tx: batch.tx.take(),
            result,
        }
    }

    /// Turns a call's outcome into a `PluginFailure` that names the cause.
    fn classify<T>(
        &self,
        result: Result<
            wasmtime::Result<Result<T, types::HandlerError>>,
            tokio::time::error::Elapsed,
        >,
    ) -> Result<T, PluginFailure> {
        let state = self.store.data();
        match result {
            Err(_elapsed) => Err(PluginFailure::Limit {
                breach: Breach::Deadline(state.limits.call_timeout),
                message: format!(
                    "plugin call did not return within {:?} of wall-clock time (limit plugin_call_timeout plus {:?} for database work)",
                    state.limits.call_timeout, WALL_CLOCK_GRACE
                ),
            }),
            Ok(Ok(Ok(value))) => Ok(value),
            Ok(Ok(Err(e))) => Err(PluginFailure::Rejected {
                message: crate::base::text::plugin_message(&e.message),
                position: e.position,
            }),
            Ok(Err(trap)) => {
                if let Some(failed) = state
                    .batch
                    .failed
                    .as_ref()
                    .filter(|f| f.kind == crate::sink::EffectErrorKind::LimitExceeded && f.database.is_some())
                {
                    // The statement timeout ended the plugin's SQL; the deadline that fired as
                    // the guest resumed is the same limit seen twice. Name the statement.
                    return Err(PluginFailure::Limit {
                        breach: Breach::Deadline(state.limits.call_timeout),
                        message: failed.message.clone(),
                    });
                }
                if let Some(breach) = state.limits.breach {
                    let message = match breach {
                        Breach::Deadline(limit) => format!("plugin call exceeded its CPU deadline of {limit:?} (limit plugin_call_timeout)"),
                        Breach::Memory(limit) => format!("plugin exceeded its memory limit of {} MiB (limit plugin_memory_limit)", limit >> 20),
                    };
                    return Err(PluginFailure::Limit { breach, message });
                }
                if let Some(db) = trap.downcast_ref::<TransientDatabaseError>() {
                    return Err(PluginFailure::Transient(db.to_string()));
                }
                // The trap kind (not its multi-line wasm backtrace), plus what the guest printed,
                // which for a Rust panic is the panic message.
                let mut message = match trap.downcast_ref::<wasmtime::Trap>() {
                    Some(kind) => kind.to_string(),
                    None => trap.root_cause().to_string(),
                };
                let output = state.call_output();
                if !output.is_empty() {
                    message.push_str("; plugin output: ");
                    message.push_str(&output);
                }
                tracing::debug!(projection = %state.projection, "plugin trap details: {trap:?}");
                Err(PluginFailure::Trap { message })
            }
        }
    }
}

async fn timed<F: std::future::Future>(
    call: F,
    budget: Duration,
) -> Result<F::Output, tokio::time::error::Elapsed> {
    tokio::time::timeout(budget, call).await
}

/// Builds the WIT batch, sending each repeated text once. Takes the events by value so that
/// their strings move instead of being copied.
fn to_wit_batch(events: Vec<StoredEvent>) -> Batch {
    #[derive(Default)]
    struct Interner {
        index: HashMap<String, u32>,
        list: Vec<String>,
        last: Option<u32>,
    }
    impl Interner {
        fn id(&mut self, s: String) -> u32 {
            // Neighbouring events mostly repeat the same text; comparing with the last one is
            // cheaper than hashing.
            if let Some(last) = self.last.filter(|i| self.list[*i as usize] == s) {
                return last;
            }
            let i = match self.index.get(&s) {
                Some(i) => *i,
                None => {
                    let i = self.list.len() as u32;
                    self.list.push(s.clone());
                    self.index.insert(s, i);
                    i
                }
            };
            self.last = Some(i);
            i
        }
    }
    let mut contexts = Interner::default();
    let mut aggregate_types = Interner::default();
    let mut event_types = Interner::default();
    let events = events
        .into_iter()
        .map(|e| Event {
            global_position: e.global_position,
            bounded_context: contexts.id(e.bounded_context),
            aggregate_type: aggregate_types.id(e.aggregate_type),
            aggregate_id: e.aggregate_id,
            aggregate_version: e.aggregate_version,
            event_id: e.event_id.as_u64_pair(),
            event_type: event_types.id(e.event_type),
            event_version: e.event_version,
            payload: e.payload,
            metadata: e.metadata,
            trace_id: e.trace_id,
            correlation_id: e.correlation_id,
            causation_id: e.causation_id,
            created_at_micros: e.created_at.timestamp_micros(),
        })
        .collect();
    Batch {
        bounded_contexts: contexts.list,
        aggregate_types: aggregate_types.list,
        event_types: event_types.list,
        events,
    }
}
