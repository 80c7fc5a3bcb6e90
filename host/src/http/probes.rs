//! `/health` (liveness: the process answers; no database check, so a database outage does not
//! restart every pod) and `/ready` (readiness: database reachable, registered, holding the
//! assigned partitions, not shutting down), and `/metrics`.

use std::sync::atomic::Ordering;
use std::time::Duration;

use super::api::Ready;
use super::AppState;
use crate::metrics::HostMetrics;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;

pub async fn health() -> impl IntoResponse {
    (StatusCode::OK, "OK")
}

pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let coordination = state.coordination.borrow().clone();
    let mut reasons: Vec<String> = Vec::new();
    if state.shutting_down.load(Ordering::SeqCst) {
        reasons.push("shutting down".into());
    }
    if !coordination.registered {
        reasons.push("not registered in the replica set".into());
    }
    if !coordination.holds_assignment {
        reasons.push(format!(
            "holding {} of {} assigned partitions (generation {}, phase {})",
            coordination.owned,
            coordination.assigned,
            coordination.generation,
            coordination
                .phase
                .map_or("not yet known", |phase| phase.as_str())
        ));
    }
    let db = tokio::time::timeout(
        Duration::from_secs(2),
        sqlx::query("SELECT 1").execute(&state.pool),
    )
    .await;
    match db {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => reasons.push(format!("database unreachable: {e}")),
        Err(_) => reasons.push("database did not answer within 2s".into()),
    }
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Ready {
            ready: reasons.is_empty(),
            worker: state.worker.as_str().to_string(),
            reasons,
            generation: coordination.generation,
            partitions_held: coordination.owned,
        }),
    )
}

pub async fn metrics(State(metrics): State<HostMetrics>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics.render(),
    )
}
