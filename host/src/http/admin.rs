//! The admin API (JSON, bearer token): status, pause and resume, dead letters, plugins. Every
//! route is listed in `ROUTES` and described in `openapi.json`; a test keeps the two in sync.
//! Every body is a type of [`super::api`], which the CLI client reads too.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};

use super::api::{
    self, AdminStatus, ControlResult, DeadLetter, DeadLetterQuery, PartitionStatus, PauseRequest,
    Plugin, ProjectionView, PromoteRequest, PushQuery, RetryRequest, RetryResult,
};
use super::error::ApiError;
use super::AppState;
use crate::coordination::controls;
use crate::lifecycle::registry;
use crate::pipeline::{ProjectionStatus, StatusBoard};
use crate::store::checkpoints;
use crate::store::dead_letters;

/// Every admin route, as (method, OpenAPI path).
#[cfg(test)]
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/admin/status"),
    ("post", "/admin/projections/{name}/pause"),
    ("post", "/admin/projections/{name}/resume"),
    ("get", "/admin/dead-letters"),
    ("post", "/admin/dead-letters/retry"),
    ("post", "/admin/dead-letters/{id}/skip"),
    ("get", "/admin/plugins"),
    ("post", "/admin/plugins"),
    ("post", "/admin/plugins/{projection}/promote"),
    ("post", "/admin/plugins/{projection}/rollback"),
    ("get", "/admin/openapi.json"),
];

pub const OPENAPI: &str = include_str!("openapi.json");

pub fn router(state: AppState) -> Router<AppState> {
    Router::new()
        .route("/admin/status", get(status))
        .route("/admin/projections/{name}/pause", post(pause))
        .route("/admin/projections/{name}/resume", post(resume))
        .route("/admin/dead-letters", get(list_dead_letters))
        .route("/admin/dead-letters/retry", post(retry_dead_letters))
        .route("/admin/dead-letters/{id}/skip", post(skip_dead_letter))
        .route(
            "/admin/plugins",
            get(list_plugins)
                .post(push_plugin)
                .layer(axum::extract::DefaultBodyLimit::max(64 << 20)),
        )
        .route("/admin/plugins/{projection}/promote", post(promote_plugin))
        .route(
            "/admin/plugins/{projection}/rollback",
            post(rollback_plugin),
        )
        .route("/admin/openapi.json", get(openapi))
        .layer(axum::middleware::from_fn_with_state(state, require_token))
}

/// Refuses every admin request without the configured bearer token.
async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(expected) = state.admin_token.as_deref() else {
        return Err(ApiError::Disabled);
    };
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
        return Err(ApiError::Unauthorized);
    }
    Ok(next.run(request).await)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn status(State(state): State<AppState>) -> Result<Json<AdminStatus>, ApiError> {
    let db = crate::status::load(&state.pool, &state.replica_set, &state.events_table)
        .await
        .map_err(ApiError::Internal)?;
    let checkpoints = checkpoints::by_partition(&state.pool, &state.replica_set).await?;
    let projections = projection_views(&db, &state.board);
    let partitions = partition_statuses(&db, checkpoints);
    Ok(Json(AdminStatus {
        replica_set: db.replica_set,
        generation: db.generation,
        phase: db.phase,
        strategy: db.strategy,
        leader: db.leader,
        partitions_total: db.partitions,
        stream_head: db.head,
        this_worker: state.worker.to_string(),
        workers: db.workers.iter().map(api::Worker::from).collect(),
        partitions,
        projections,
        recent_errors: state
            .board
            .recent_errors()
            .iter()
            .map(api::RecentError::from)
            .collect(),
        history: state
            .board
            .history()
            .iter()
            .map(api::Sample::from)
            .collect(),
    }))
}

/// Every projection the database or this host knows, by name.
fn projection_views(db: &crate::status::Status, board: &StatusBoard) -> Vec<ProjectionView> {
    let local: BTreeMap<String, ProjectionStatus> = board
        .all()
        .into_iter()
        .map(|s| (s.name.clone(), s))
        .collect();
    let mut names: Vec<String> = db
        .projections
        .iter()
        .map(|p| p.projection.clone())
        .collect();
    names.extend(local.keys().cloned());
    names.sort();
    names.dedup();
    names
        .into_iter()
        .map(|name| {
            let on_this_host = local.get(&name).map(api::LocalProjection::from);
            projection_view(db, on_this_host, name)
        })
        .collect()
}

fn projection_view(
    db: &crate::status::Status,
    on_this_host: Option<api::LocalProjection>,
    name: String,
) -> ProjectionView {
    let stored = db.projections.iter().find(|p| p.projection == name);
    let paused = db.paused.iter().find(|p| p.projection == name);
    let halts: Vec<api::Halt> = db
        .halts
        .iter()
        .filter(|h| h.projection == name)
        .map(api::Halt::from)
        .collect();
    ProjectionView {
        paused: paused.is_some(),
        halted: halts.iter().map(|h| (h.partition, h.position)).collect(),
        halts,
        paused_reason: paused.and_then(|p| p.reason.clone()),
        dead_letters: db
            .dead_letters
            .iter()
            .find(|d| d.projection == name)
            .map_or(0, |d| d.events),
        lowest_checkpoint: stored.map_or(0, |p| p.lowest_checkpoint),
        // Nothing applied yet: the whole stream is ahead of it.
        lag_positions: stored.map_or(db.head, |p| p.lag_positions),
        last_commit: stored.and_then(|p| p.last_commit),
        on_this_host,
        name,
    }
}

/// Every partition with its owner and, per projection, its checkpoint and lag.
fn partition_statuses(
    db: &crate::status::Status,
    mut checkpoints: BTreeMap<i32, BTreeMap<String, i64>>,
) -> Vec<PartitionStatus> {
    db.partition_owners
        .iter()
        .map(|p| {
            let checkpoints = checkpoints.remove(&p.partition).unwrap_or_default();
            let lag = checkpoints
                .iter()
                .map(|(k, v)| (k.clone(), (db.head - v).max(0)))
                .collect();
            PartitionStatus {
                partition: p.partition,
                owner: p.owner.clone(),
                epoch: p.epoch,
                assigned_to: p.assigned_to.clone(),
                checkpoints,
                lag,
            }
        })
        .collect()
}

async fn pause(
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Option<Json<PauseRequest>>,
) -> Result<Json<ControlResult>, ApiError> {
    set_paused(&state, name, true, body.and_then(|b| b.0.reason)).await
}

async fn resume(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ControlResult>, ApiError> {
    set_paused(&state, name, false, None).await
}

async fn set_paused(
    state: &AppState,
    name: String,
    paused: bool,
    reason: Option<String>,
) -> Result<Json<ControlResult>, ApiError> {
    crate::runtime::loader::validate_name(&name)
        .map_err(|e| ApiError::BadRequest(format!("'{name}' is not a projection name: {e}")))?;
    known_projection(state, &name).await?;
    controls::set_paused(
        &state.pool,
        &state.replica_set,
        &name,
        paused,
        reason.as_deref(),
    )
    .await?;
    tracing::info!(projection = %name, paused, reason = reason.as_deref().unwrap_or(""), "projection control changed through the admin API");
    Ok(Json(ControlResult {
        projection: name,
        paused,
    }))
}

/// Refuses a name no plugin of this replica set was ever registered under, naming the known
/// ones: a typo must not store a control that a projection deployed later would inherit.
async fn known_projection(state: &AppState, name: &str) -> Result<(), ApiError> {
    // The registry lists its rows ordered by projection, so one name's versions are adjacent.
    let mut known: Vec<String> = registry::list(&state.pool, &state.replica_set)
        .await?
        .into_iter()
        .map(|row| row.projection)
        .collect();
    known.dedup();
    if known.iter().any(|k| k == name) {
        return Ok(());
    }
    Err(ApiError::NotFound(format!(
        "replica set {} has no projection '{name}'; known: {}",
        state.replica_set,
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    )))
}

async fn list_dead_letters(
    State(state): State<AppState>,
    Query(filter): Query<DeadLetterQuery>,
) -> Result<Json<Vec<DeadLetter>>, ApiError> {
    if let Some(name) = &filter.projection {
        known_projection(&state, name).await?;
    }
    let rows = dead_letters::list(
        &state.pool,
        &state.replica_set,
        filter.projection.as_deref(),
    )
    .await?;
    Ok(Json(rows.into_iter().map(DeadLetter::from).collect()))
}

async fn retry_dead_letters(
    State(state): State<AppState>,
    Json(request): Json<RetryRequest>,
) -> Result<Json<RetryResult>, ApiError> {
    known_projection(&state, &request.projection).await?;
    let events = dead_letters::request_retry(
        &state.pool,
        &state.replica_set,
        &request.projection,
        &request.aggregate_id,
    )
    .await?;
    if events == 0 {
        return Err(ApiError::NotFound(format!(
            "no parked events of aggregate '{}' in projection '{}'",
            request.aggregate_id, request.projection
        )));
    }
    tracing::info!(projection = %request.projection, aggregate = %request.aggregate_id, events, "retry of parked events requested through the admin API");
    Ok(Json(RetryResult {
        projection: request.projection,
        aggregate_id: request.aggregate_id,
        events,
    }))
}

async fn skip_dead_letter(
    State(state): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Json<DeadLetter>, ApiError> {
    let skipped = dead_letters::skip(&state.pool, &state.replica_set, id)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no parked event with id {id}")))?;
    tracing::warn!(projection = %skipped.projection, position = skipped.position, aggregate = %skipped.aggregate_id, "parked event skipped through the admin API: it will never be applied");
    Ok(Json(skipped.into()))
}

async fn list_plugins(State(state): State<AppState>) -> Result<Json<Vec<Plugin>>, ApiError> {
    let rows = registry::list(&state.pool, &state.replica_set).await?;
    Ok(Json(rows.into_iter().map(Plugin::from).collect()))
}

/// Registers an uploaded component after the same checks as a mounted one (a valid component,
/// the right contract version, a valid name).
async fn push_plugin(
    State(state): State<AppState>,
    Query(options): Query<PushQuery>,
    body: axum::body::Bytes,
) -> Result<Json<Plugin>, ApiError> {
    let label = std::path::PathBuf::from("upload");
    let (plugin, _) = state
        .runtime
        .load_bytes(&label, &body)
        .await
        .map_err(|e| ApiError::BadRequest(e.to_string()))?;
    let mode = options.mode.unwrap_or(registry::Mode::Continue);
    let row = registry::push(
        &state.pool,
        &state.replica_set,
        &plugin,
        &body,
        mode,
        options.activate.unwrap_or(true),
    )
    .await
    .map_err(registry_error)?;
    tracing::info!(projection = %row.projection, version = %row.version, sha256 = %row.sha256, state = %row.state, mode = %row.mode, "plugin pushed through the admin API");
    Ok(Json(row.into()))
}

async fn promote_plugin(
    State(state): State<AppState>,
    Path(projection): Path<String>,
    Json(request): Json<PromoteRequest>,
) -> Result<Json<Plugin>, ApiError> {
    let row = registry::promote(
        &state.pool,
        &state.replica_set,
        &projection,
        &request.sha256,
    )
    .await
    .map_err(registry_error)?;
    Ok(Json(row.into()))
}

async fn rollback_plugin(
    State(state): State<AppState>,
    Path(projection): Path<String>,
) -> Result<Json<Plugin>, ApiError> {
    let row = registry::rollback(&state.pool, &state.replica_set, &projection)
        .await
        .map_err(registry_error)?;
    Ok(Json(row.into()))
}

fn registry_error(e: registry::RegistryError) -> ApiError {
    match e {
        registry::RegistryError::Refused(message) => ApiError::BadRequest(message),
        registry::RegistryError::Sql(e) => ApiError::Database(e),
    }
}

async fn openapi() -> ([(header::HeaderName, &'static str); 1], &'static str) {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_openapi_description_lists_exactly_the_routes() {
        let spec: serde_json::Value = serde_json::from_str(OPENAPI).expect("openapi.json is JSON");
        let paths = spec["paths"].as_object().expect("paths");
        let mut described: Vec<(String, String)> = Vec::new();
        for (path, item) in paths {
            for method in item.as_object().expect("path item").keys() {
                described.push((method.clone(), path.clone()));
            }
        }
        described.sort();
        let mut routes: Vec<(String, String)> = ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        routes.sort();
        assert_eq!(described, routes, "openapi.json and admin::ROUTES disagree");
        assert!(spec["components"]["securitySchemes"]["bearer"].is_object());
    }

    #[test]
    fn tokens_compare_in_full() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }
}
