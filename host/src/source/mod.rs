//! Events -> batches: reading the events table in position order, only up to the safe head,
//! only what a projection subscribed to; and waking up when new events arrive.

mod event;
pub mod layout;
mod reader;
pub mod safe_head;
pub mod wakeup;

pub use event::StoredEvent;
pub use reader::EventReader;
pub use safe_head::{Head, SafeHead};
