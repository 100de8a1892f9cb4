//! The admin HTTP server: `/health`, `/ready`, `/metrics`, and the
//! dashboard page at `/` with what it is told at `/api/overview`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::dashboard::{Overview, PAGE};
use crate::metrics::{Metrics, Readiness};

#[derive(Clone)]
struct Admin {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    overview: Arc<Overview>,
}

/// The admin routes.
pub fn router(metrics: Arc<Metrics>, readiness: Arc<Readiness>, overview: Arc<Overview>) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/api/overview", get(|State(admin): State<Admin>| async move { Json(admin.overview.as_ref().clone()) }))
        .route("/api/tap", get(|State(admin): State<Admin>| async move { Json(admin.metrics.taps.watch()) }))
        .route("/health", get(|| async { Json(serde_json::json!({ "status": "ok" })) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(Admin { metrics, readiness, overview })
}

async fn page() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            // Everything the page loads is its own: no script or style from elsewhere.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'self'; connect-src *; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'",
            ),
        ],
        PAGE,
    )
}

async fn ready(State(admin): State<Admin>) -> impl IntoResponse {
    let not_ready = admin.readiness.not_ready();
    if not_ready.is_empty() {
        return (StatusCode::OK, Json(serde_json::json!({ "status": "ready" })));
    }
    let down: Vec<serde_json::Value> = not_ready
        .down
        .iter()
        .map(|(component, error)| serde_json::json!({ "component": component, "error": error }))
        .collect();
    let status = if down.is_empty() { "starting" } else { "down" };
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "status": status, "waiting_for": not_ready.starting, "down": down })),
    )
}

async fn metrics_text(State(admin): State<Admin>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], admin.metrics.encode())
}

/// Serves the admin routes on `listener` until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
    overview: Arc<Overview>,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics, readiness, overview))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
