//! The admin HTTP server: `/health`, `/ready`, `/metrics`.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::metrics::{Metrics, Readiness};

#[derive(Clone)]
struct Admin {
    metrics: Arc<Metrics>,
    readiness: Arc<Readiness>,
}

/// The admin routes.
pub fn router(metrics: Arc<Metrics>, readiness: Arc<Readiness>) -> Router {
    Router::new()
        .route("/health", get(|| async { Json(serde_json::json!({ "status": "ok" })) }))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics_text))
        .with_state(Admin { metrics, readiness })
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
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(metrics, readiness))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}
