//! The HTTP surface: probes (and, later, the admin API) on the health port, Prometheus on the
//! metrics port.

pub mod admin;
mod error;
mod probes;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use axum::routing::get;
use axum::Router;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::HttpConfig;
use crate::coordination::CoordinationStatus;
use crate::ids::WorkerId;
use crate::metrics::HostMetrics;
use crate::pipeline::StatusBoard;
use crate::source::SafeHead;

/// Everything the handlers read.
#[derive(Clone)]
pub struct AppState {
    pub replica_set: String,
    pub events_table: crate::db::QualifiedName,
    /// `None`: the admin API answers 503 (disabled).
    pub admin_token: Option<String>,
    pub pool: PgPool,
    pub coordination: watch::Receiver<CoordinationStatus>,
    pub board: StatusBoard,
    pub metrics: HostMetrics,
    pub shutting_down: Arc<AtomicBool>,
    pub worker: WorkerId,
    pub head: SafeHead,
    /// For checking uploaded plugins.
    pub runtime: std::sync::Arc<crate::runtime::Runtime>,
}

/// The router of the health port: probes, the admin API and the status page.
pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/health", get(probes::health))
        .route("/ready", get(probes::ready))
        .route("/status", get(status_page))
        .merge(admin::router(state.clone()))
        .with_state(state)
}

/// A small page that renders `/admin/status` (the token comes from the URL fragment, which is
/// never sent to the server: `/status#token=...`).
async fn status_page() -> axum::response::Html<&'static str> {
    axum::response::Html(include_str!("status_page.html"))
}

/// The router of the metrics port.
pub fn metrics_router(metrics: HostMetrics) -> Router {
    Router::new()
        .route("/metrics", get(probes::metrics))
        .with_state(metrics)
}

/// Binds both listeners (so a taken port fails the start with a clear message) and serves
/// until `stop`.
pub async fn serve(
    config: &HttpConfig,
    state: AppState,
    stop: CancellationToken,
) -> anyhow::Result<Vec<JoinHandle<()>>> {
    let health = tokio::net::TcpListener::bind(config.health_addr)
        .await
        .with_context(|| {
            format!(
                "binding the health/admin port {} (HEALTH_ADDR)",
                config.health_addr
            )
        })?;
    let metrics = tokio::net::TcpListener::bind(config.metrics_addr)
        .await
        .with_context(|| {
            format!(
                "binding the metrics port {} (METRICS_ADDR)",
                config.metrics_addr
            )
        })?;
    tracing::info!(health = %config.health_addr, metrics = %config.metrics_addr, "serving HTTP");
    let metrics_app = metrics_router(state.metrics.clone());
    let app = router(state);
    let s1 = stop.clone();
    let h1 = tokio::spawn(async move {
        if let Err(e) = axum::serve(health, app)
            .with_graceful_shutdown(s1.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "health server failed");
        }
    });
    let h2 = tokio::spawn(async move {
        if let Err(e) = axum::serve(metrics, metrics_app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    Ok(vec![h1, h2])
}
