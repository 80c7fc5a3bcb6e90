//! Write event-sourced projections for `projection-host` in Rust.
//!
//! A projection is a type that implements [`Projection`], exported with
//! [`export_projection!`], and built with `cargo build --release --target wasm32-wasip2`:
//!
//! ```ignore
//! use projection_sdk::prelude::*;
//!
//! struct Counter;
//!
//! impl Projection for Counter {
//!     fn describe() -> Descriptor {
//!         Descriptor::new("event_counter", env!("CARGO_PKG_VERSION"))
//!     }
//!
//!     fn setup() -> Result<(), Error> {
//!         sql::execute(
//!             "CREATE TABLE IF NOT EXISTS event_counts (event_type TEXT PRIMARY KEY, n BIGINT NOT NULL)",
//!             &[],
//!         )?;
//!         Ok(())
//!     }
//!
//!     fn handle(event: &Event<'_>) -> Result<(), HandlerError> {
//!         read_model::upsert("event_counts", &[event.event_type().into()], &[add("n", 1)])?;
//!         Ok(())
//!     }
//! }
//!
//! export_projection!(Counter);
//! ```
//!
//! See `docs/plugin-guide.md` in the repository for the contract and its guarantees.

// Lets the generated bindings name this crate by its public path, as dependents see it.
extern crate self as projection_sdk;

mod event;
pub mod log;
pub mod read_model;
pub mod sql;

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        world: "projection",
        path: "../wit",
        pub_export_macro: true,
        export_macro_name: "__export_projection_world",
        default_bindings_module: "projection_sdk::bindings",
        runtime_path: "projection_sdk::__wit_bindgen_rt::rt",
    });
}

#[doc(hidden)]
pub use wit_bindgen as __wit_bindgen_rt;

pub use event::{Event, Uuid};
pub use read_model::{add, max, min, set, set_if_absent, Assignment};

/// The WIT types, re-exported under stable names.
pub use bindings::pupsourcing::projection::types::{
    Error, ErrorKind, HandlerError, Subscription, Value,
};

/// The SDK's own description of a projection; converted to the WIT `descriptor`.
#[derive(Debug, Clone, Default)]
pub struct Descriptor {
    name: String,
    version: String,
    bounded_contexts: Vec<String>,
    aggregate_types: Vec<String>,
    event_types: Vec<String>,
}

impl Descriptor {
    /// `name` is the projection's identity (checkpoints, schema); `version` its own version.
    pub fn new(name: impl Into<String>, version: impl Into<String>) -> Self {
        Descriptor {
            name: name.into(),
            version: version.into(),
            ..Default::default()
        }
    }

    /// Only events of these bounded contexts (default: all).
    pub fn bounded_contexts<S: Into<String>>(mut self, items: impl IntoIterator<Item = S>) -> Self {
        self.bounded_contexts = items.into_iter().map(Into::into).collect();
        self
    }

    /// Only events of these aggregate types (default: all).
    pub fn aggregate_types<S: Into<String>>(mut self, items: impl IntoIterator<Item = S>) -> Self {
        self.aggregate_types = items.into_iter().map(Into::into).collect();
        self
    }

    /// Only events of these types (default: all).
    pub fn event_types<S: Into<String>>(mut self, items: impl IntoIterator<Item = S>) -> Self {
        self.event_types = items.into_iter().map(Into::into).collect();
        self
    }
}

impl From<Descriptor> for bindings::pupsourcing::projection::types::Descriptor {
    fn from(d: Descriptor) -> Self {
        bindings::pupsourcing::projection::types::Descriptor {
            name: d.name,
            version: d.version,
            subscription: Subscription {
                bounded_contexts: d.bounded_contexts,
                aggregate_types: d.aggregate_types,
                event_types: d.event_types,
            },
        }
    }
}

/// A projection. The host calls `describe` once per load, `setup` once per start (inside a
/// transaction), and then `handle_batch` for every batch of subscribed events.
pub trait Projection {
    /// Name, version and subscription.
    fn describe() -> Descriptor;

    /// Creates or upgrades the read model. Must be idempotent (`CREATE TABLE IF NOT EXISTS`).
    fn setup() -> Result<(), Error> {
        Ok(())
    }

    /// Projects one event. Returning an error fails the batch at this event.
    fn handle(event: &Event<'_>) -> Result<(), HandlerError>;

    /// Projects a batch; the default calls [`Projection::handle`] for each event in order and
    /// tags an error with the failing event's position.
    fn handle_batch(events: &[Event<'_>]) -> Result<(), HandlerError> {
        for event in events {
            read_model::set_current_position(Some(event.position()));
            Self::handle(event).map_err(|mut e| {
                e.position.get_or_insert(event.position());
                e
            })?;
        }
        Ok(())
    }
}

/// Glue between the generated bindings and a [`Projection`]; used by [`export_projection!`].
#[doc(hidden)]
pub fn __handle_batch<P: Projection>(
    batch: bindings::pupsourcing::projection::types::Batch,
) -> Result<(), HandlerError> {
    let events: Vec<Event<'_>> = batch
        .events
        .iter()
        .map(|raw| Event::new(raw, &batch))
        .collect();
    let result =
        P::handle_batch(&events).and_then(|()| read_model::send().map_err(HandlerError::from));
    read_model::set_current_position(None);
    if result.is_err() {
        read_model::discard();
    }
    result
}

/// Glue for `setup`: gathered writes are sent before it returns.
#[doc(hidden)]
pub fn __setup<P: Projection>() -> Result<(), Error> {
    let result = P::setup().and_then(|()| read_model::send().map_err(|e| e.error));
    if result.is_err() {
        read_model::discard();
    }
    result
}

/// Exports a [`Projection`] implementation as the component's `projection` world.
#[macro_export]
macro_rules! export_projection {
    ($projection:ty) => {
        const _: () = {
            struct __ProjectionExport;

            impl $crate::bindings::exports::pupsourcing::projection::handler::Guest
                for __ProjectionExport
            {
                fn describe() -> $crate::bindings::pupsourcing::projection::types::Descriptor {
                    <$projection as $crate::Projection>::describe().into()
                }

                fn setup() -> Result<(), $crate::Error> {
                    $crate::__setup::<$projection>()
                }

                fn handle_batch(
                    batch: $crate::bindings::pupsourcing::projection::types::Batch,
                ) -> Result<(), $crate::HandlerError> {
                    $crate::__handle_batch::<$projection>(batch)
                }
            }

            $crate::bindings::__export_projection_world!(
                __ProjectionExport with_types_in $crate::bindings
            );
        };
    };
}

impl HandlerError {
    /// An error with a message and no position (the SDK adds the event's position).
    pub fn new(message: impl Into<String>) -> Self {
        HandlerError {
            message: message.into(),
            position: None,
        }
    }
}

impl From<Error> for HandlerError {
    fn from(e: Error) -> Self {
        HandlerError::new(format!("{:?}: {}", e.kind, e.message))
    }
}

impl Error {
    pub fn invalid_argument(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::InvalidArgument,
            message: message.into(),
        }
    }
}

/// Everything a projection file usually needs.
pub mod prelude {
    pub use crate::read_model::{self, add, max, min, set, set_if_absent};
    pub use crate::{
        export_projection, log, sql, Descriptor, Error, ErrorKind, Event, HandlerError, Projection,
        Value,
    };
    pub use serde::Deserialize;
}

impl From<i64> for Value {
    fn from(v: i64) -> Self {
        Value::Int(v)
    }
}
impl From<i32> for Value {
    fn from(v: i32) -> Self {
        Value::Int(v.into())
    }
}
impl From<u32> for Value {
    fn from(v: u32) -> Self {
        Value::Int(v.into())
    }
}
impl From<f64> for Value {
    fn from(v: f64) -> Self {
        Value::Float(v)
    }
}
impl From<bool> for Value {
    fn from(v: bool) -> Self {
        Value::Boolean(v)
    }
}
impl From<&str> for Value {
    fn from(v: &str) -> Self {
        Value::Text(v.into())
    }
}
impl From<String> for Value {
    fn from(v: String) -> Self {
        Value::Text(v)
    }
}
impl From<Vec<u8>> for Value {
    fn from(v: Vec<u8>) -> Self {
        Value::Bytes(v)
    }
}
impl From<serde_json::Value> for Value {
    fn from(v: serde_json::Value) -> Self {
        Value::Json(v.to_string())
    }
}
impl<T: Into<Value>> From<Option<T>> for Value {
    fn from(v: Option<T>) -> Self {
        v.map_or(Value::Null, Into::into)
    }
}

impl Value {
    pub fn as_int(&self) -> Option<i64> {
        match self {
            Value::Int(v) => Some(*v),
            _ => None,
        }
    }

    pub fn as_text(&self) -> Option<&str> {
        match self {
            Value::Text(v) | Value::Json(v) => Some(v),
            _ => None,
        }
    }
}
