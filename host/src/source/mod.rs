//! Events -> batches: reading the events table in position order, only up to the safe head,
//! only what a projection subscribed to; and waking up when new events arrive.

mod event;
pub mod layout;
mod reader;
pub mod safe_head;
pub mod wakeup;

pub use event::StoredEvent;
pub use reader::{EventReader, Page};
pub use safe_head::{Head, SafeHead};

/// The highest position in the events table, read from the table itself (not this host's view
/// of the safe head, which may lag another host's): for checks that must not under-count.
pub async fn stream_head<'e>(
    executor: impl sqlx::PgExecutor<'e>,
    events_table: &crate::db::QualifiedName,
) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(&format!(
        "SELECT coalesce(max(global_position), 0) FROM {events_table}"
    ))
    .fetch_one(executor)
    .await
}

/// What a projection subscribed to; empty lists mean "all".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Subscription {
    pub bounded_contexts: Vec<String>,
    pub aggregate_types: Vec<String>,
    pub event_types: Vec<String>,
}
