//! The HTTP surface: probes (and, later, the admin API) on the health port, Prometheus on the
//! metrics port.

pub mod admin;
pub mod api;
mod error;
mod probes;

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, OnceLock};

use anyhow::Context;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use crate::config::HttpConfig;
use crate::coordination::CoordinationStatus;
use crate::ids::WorkerId;
use crate::metrics::HostMetrics;
use crate::pipeline::StatusBoard;

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
    pub shutting_down: Arc<AtomicBool>,
    pub worker: WorkerId,
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

/// Both ports, bound before the host touches the database: a taken port ends the start before
/// anything is written or registered.
pub struct Listeners {
    health: tokio::net::TcpListener,
    metrics: tokio::net::TcpListener,
}

pub async fn bind(config: &HttpConfig) -> anyhow::Result<Listeners> {
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
    Ok(Listeners { health, metrics })
}

/// The health port's two phases: while the host starts (waiting for PostgreSQL, say) only
/// `/health` answers 200 and everything else 503 with what the start waits for; once
/// [`Front::started`] hands over the state, every route is served.
#[derive(Clone, Default)]
pub struct Front {
    router: Arc<OnceLock<Router>>,
    starting: crate::base::status_line::StatusLine,
}

impl Front {
    /// Where the start shows what it is doing (the reason `/ready` gives).
    pub fn starting_status(&self) -> crate::base::status_line::StatusLine {
        self.starting.clone()
    }

    pub fn started(&self, state: AppState) {
        let _ = self.router.set(router(state));
    }
}

async fn front_dispatch(State(front): State<Front>, request: Request) -> Response {
    match front.router.get().cloned() {
        Some(router) => match router.oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        },
        None => {
            let reason = front.starting.get();
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(api::Starting {
                    ready: false,
                    reasons: vec![format!("starting: {reason}")],
                }),
            )
                .into_response()
        }
    }
}

/// Serves both ports until `stop`.
pub fn serve(
    listeners: Listeners,
    front: Front,
    metrics: HostMetrics,
    stop: CancellationToken,
) -> Vec<JoinHandle<()>> {
    let addresses = (
        listeners.health.local_addr().ok(),
        listeners.metrics.local_addr().ok(),
    );
    tracing::info!(health = ?addresses.0, metrics = ?addresses.1, "serving HTTP");
    let app = Router::new()
        .route("/health", get(probes::health))
        .fallback(front_dispatch)
        .with_state(front);
    let metrics_app = metrics_router(metrics);
    let s1 = stop.clone();
    let h1 = tokio::spawn(async move {
        if let Err(e) = axum::serve(listeners.health, app)
            .with_graceful_shutdown(s1.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "health server failed");
        }
    });
    let h2 = tokio::spawn(async move {
        if let Err(e) = axum::serve(listeners.metrics, metrics_app)
            .with_graceful_shutdown(stop.cancelled_owned())
            .await
        {
            tracing::error!(error = %e, "metrics server failed");
        }
    });
    vec![h1, h2]
}
