//! Operations endpoints: liveness, readiness, metrics.

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use crate::telemetry;

/// Liveness: the process answers.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// Readiness: the database answers too.
pub async fn readyz(State(state): State<AppState>) -> Response {
    let backend = state.store.backend().as_str();
    match state.store.ping().await {
        Ok(()) => {
            // An expiring push certificate is a warning, not unreadiness: the broker serves.
            let push = crate::apple::push_cert::expiry_status(&state.store)
                .await
                .ok()
                .flatten();
            Json(json!({"status": "ok", "database": backend, "push_certificate": push}))
                .into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, "readiness check failed");
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({"error": {"code": "unavailable", "message": format!("the {backend} database does not answer")}})),
            )
                .into_response()
        }
    }
}

/// Prometheus text exposition.
pub async fn metrics(State(state): State<AppState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        telemetry::render_metrics(&state.metrics),
    )
        .into_response()
}
