use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::Row;

/// One row of the pupsourcing `events` table.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub global_position: i64,
    pub bounded_context: String,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub aggregate_version: i64,
    pub event_id: uuid::Uuid,
    pub event_type: String,
    pub event_version: i32,
    pub payload: Vec<u8>,
    pub metadata: Option<String>,
    pub trace_id: Option<String>,
    pub correlation_id: Option<String>,
    pub causation_id: Option<String>,
    pub created_at: DateTime<Utc>,
}

/// Decodes by column position, in the order of the reader's SELECT list (by-name lookups cost
/// a measurable share of catch-up time).
impl<'r> sqlx::FromRow<'r, PgRow> for StoredEvent {
    fn from_row(row: &'r PgRow) -> Result<Self, sqlx::Error> {
        Ok(StoredEvent {
            global_position: row.try_get(0)?,
            bounded_context: row.try_get(1)?,
            aggregate_type: row.try_get(2)?,
            aggregate_id: row.try_get(3)?,
            aggregate_version: row.try_get(4)?,
            event_id: row.try_get(5)?,
            event_type: row.try_get(6)?,
            event_version: row.try_get(7)?,
            payload: row.try_get(8)?,
            metadata: row.try_get(9)?,
            trace_id: row.try_get(10)?,
            correlation_id: row.try_get(11)?,
            causation_id: row.try_get(12)?,
            created_at: row.try_get(13)?,
        })
    }
}
