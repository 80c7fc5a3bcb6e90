//! Counts every event of the store per (bounded context, event type): a projection with a
//! composite key and rows written from every partition at once, so it only uses merges that
//! commute (add, min, max).

use projection_sdk::prelude::*;

struct EventCounter;

impl Projection for EventCounter {
    fn describe() -> Descriptor {
        Descriptor::new("event_counter", env!("CARGO_PKG_VERSION"))
    }

    fn setup() -> Result<(), Error> {
        sql::execute(
            "CREATE TABLE IF NOT EXISTS event_counts (
                 bounded_context TEXT NOT NULL,
                 event_type      TEXT NOT NULL,
                 events          BIGINT NOT NULL,
                 first_position  BIGINT NOT NULL,
                 last_position   BIGINT NOT NULL,
                 PRIMARY KEY (bounded_context, event_type)
             )",
            &[],
        )?;
        Ok(())
    }

    fn handle(event: &Event<'_>) -> Result<(), HandlerError> {
        read_model::upsert(
            "event_counts",
            &[event.bounded_context().into(), event.event_type().into()],
            &[
                add("events", 1),
                min("first_position", event.position()),
                max("last_position", event.position()),
            ],
        )?;
        Ok(())
    }
}

export_projection!(EventCounter);
