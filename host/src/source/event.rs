use chrono::{DateTime, Utc};

/// One row of the pupsourcing `events` table.
#[derive(Debug, Clone, sqlx::FromRow)]
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
