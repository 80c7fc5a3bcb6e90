use serde::de::DeserializeOwned;

use crate::bindings::pupsourcing::projection::types::{Batch, Event as RawEvent};
use crate::HandlerError;

/// A UUID as 16 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Uuid(pub [u8; 16]);

impl core::fmt::Display for Uuid {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// One event of a batch, with text fields resolved.
#[derive(Clone, Copy)]
pub struct Event<'a> {
    raw: &'a RawEvent,
    batch: &'a Batch,
}

impl<'a> Event<'a> {
    pub(crate) fn new(raw: &'a RawEvent, batch: &'a Batch) -> Self {
        Event { raw, batch }
    }

    /// `global_position`.
    pub fn position(&self) -> i64 {
        self.raw.global_position
    }

    pub fn bounded_context(&self) -> &'a str {
        lookup(&self.batch.bounded_contexts, self.raw.bounded_context)
    }

    pub fn aggregate_type(&self) -> &'a str {
        lookup(&self.batch.aggregate_types, self.raw.aggregate_type)
    }

    pub fn aggregate_id(&self) -> &'a str {
        &self.raw.aggregate_id
    }

    pub fn aggregate_version(&self) -> i64 {
        self.raw.aggregate_version
    }

    pub fn event_id(&self) -> Uuid {
        let (hi, lo) = self.raw.event_id;
        let mut bytes = [0u8; 16];
        bytes[..8].copy_from_slice(&hi.to_be_bytes());
        bytes[8..].copy_from_slice(&lo.to_be_bytes());
        Uuid(bytes)
    }

    pub fn event_type(&self) -> &'a str {
        lookup(&self.batch.event_types, self.raw.event_type)
    }

    pub fn event_version(&self) -> i32 {
        self.raw.event_version
    }

    pub fn payload(&self) -> &'a [u8] {
        &self.raw.payload
    }

    /// Decodes the payload as JSON into `T`. The error names the event.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, HandlerError> {
        serde_json::from_slice(&self.raw.payload).map_err(|e| HandlerError {
            message: format!(
                "payload of {} event {}/{} v{} is not the expected JSON: {e}",
                self.event_type(),
                self.aggregate_type(),
                self.aggregate_id(),
                self.aggregate_version()
            ),
            position: Some(self.position()),
        })
    }

    /// The `metadata` column as JSON text.
    pub fn metadata(&self) -> Option<&'a str> {
        self.raw.metadata.as_deref()
    }

    pub fn trace_id(&self) -> Option<&'a str> {
        self.raw.trace_id.as_deref()
    }

    pub fn correlation_id(&self) -> Option<&'a str> {
        self.raw.correlation_id.as_deref()
    }

    pub fn causation_id(&self) -> Option<&'a str> {
        self.raw.causation_id.as_deref()
    }

    /// `created_at` in microseconds since the Unix epoch.
    pub fn created_at_micros(&self) -> i64 {
        self.raw.created_at_micros
    }
}

fn lookup(table: &[String], index: u32) -> &str {
    // The host always sends valid indexes; an empty string is a safe answer to a broken batch.
    table.get(index as usize).map_or("", String::as_str)
}
