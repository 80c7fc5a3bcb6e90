//! The read query of one projection: its subscription pushed into SQL.

use futures::{Stream, TryStreamExt};
use sqlx::postgres::PgRow;
use sqlx::PgConnection;

use super::StoredEvent;
use super::Subscription;
use crate::db::QualifiedName;

pub struct EventReader {
    sql: String,
    by_position: String,
    bounded_contexts: Vec<String>,
    aggregate_types: Vec<String>,
    event_types: Vec<String>,
}

impl EventReader {
    pub fn new(events_table: &QualifiedName, subscription: &Subscription) -> Self {
        let mut sql = format!(
            "SELECT global_position, bounded_context, aggregate_type, aggregate_id, aggregate_version,
                    event_id, event_type, event_version, payload, metadata::text AS metadata,
                    trace_id, correlation_id, causation_id, created_at
               FROM {events_table}
              WHERE global_position > $1 AND global_position <= $2"
        );
        // Only filters that restrict anything, so the planner can use the primary key alone
        // for "all events" projections.
        if !subscription.bounded_contexts.is_empty() {
            sql.push_str(" AND bounded_context = ANY($4)");
        }
        if !subscription.aggregate_types.is_empty() {
            sql.push_str(" AND aggregate_type = ANY($5)");
        }
        if !subscription.event_types.is_empty() {
            sql.push_str(" AND event_type = ANY($6)");
        }
        sql.push_str(" ORDER BY global_position LIMIT $3");
        let by_position = format!(
            "SELECT global_position, bounded_context, aggregate_type, aggregate_id, aggregate_version,
                    event_id, event_type, event_version, payload, metadata::text AS metadata,
                    trace_id, correlation_id, causation_id, created_at
               FROM {events_table} WHERE global_position = ANY($1) ORDER BY global_position"
        );
        EventReader {
            sql,
            by_position,
            bounded_contexts: subscription.bounded_contexts.clone(),
            aggregate_types: subscription.aggregate_types.clone(),
            event_types: subscription.event_types.clone(),
        }
    }

    /// Subscribed events with `after < global_position <= up_to`, at most `limit`, in order.
    pub async fn read(
        &self,
        conn: &mut PgConnection,
        after: i64,
        up_to: i64,
        limit: u32,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        // Unused parameters are still bound: PostgreSQL ignores extra ones only if they are
        // typed, which these are.
        let mut query = sqlx::query(&self.sql)
            .bind(after)
            .bind(up_to)
            .bind(i64::from(limit));
        if !self.bounded_contexts.is_empty() {
            query = query.bind(&self.bounded_contexts);
        } else {
            query = query.bind(None::<Vec<String>>);
        }
        if !self.aggregate_types.is_empty() {
            query = query.bind(&self.aggregate_types);
        } else {
            query = query.bind(None::<Vec<String>>);
        }
        if !self.event_types.is_empty() {
            query = query.bind(&self.event_types);
        } else {
            query = query.bind(None::<Vec<String>>);
        }
        // Positions are unique, so the range bounds the row count; reserving up front spares
        // the copies of a growing page.
        let most = up_to.saturating_sub(after).clamp(0, i64::from(limit));
        collect(query.fetch(&mut *conn), most as usize).await
    }

    /// The events at the given positions, in order (replaying parked events).
    pub async fn read_positions(
        &self,
        conn: &mut PgConnection,
        positions: &[i64],
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        collect(
            sqlx::query(&self.by_position)
                .bind(positions)
                .fetch(&mut *conn),
            positions.len(),
        )
        .await
    }
}

async fn collect(
    mut rows: impl Stream<Item = Result<PgRow, sqlx::Error>> + Unpin,
    capacity: usize,
) -> Result<Vec<StoredEvent>, sqlx::Error> {
    let mut events = Vec::with_capacity(capacity);
    while let Some(row) = rows.try_next().await? {
        events.push(StoredEvent::from_result_row(&row, events.is_empty())?);
    }
    Ok(events)
}
