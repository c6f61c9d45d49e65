//! Operations endpoints: liveness, readiness, metrics.

use std::time::Duration;

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
    // Bounded: a load balancer's probe must get its answer before its own timeout.
    let ping = match tokio::time::timeout(DATABASE_PROBE_TIMEOUT, state.store.ping()).await {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(_) => Err(format!("no answer within {DATABASE_PROBE_TIMEOUT:?}")),
    };
    match ping {
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
    refresh_gauges(&state).await;
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        telemetry::render_metrics(&state.metrics),
    )
        .into_response()
}

/// How long a scrape waits for the database before it reports it down.
const DATABASE_PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Gauges read at scrape time rather than kept up to date: whether the database answers and
/// how long the CA and the push certificate have left. An alert on an expiring certificate must
/// fire even if nothing touched the certificate since the process started.
async fn refresh_gauges(state: &AppState) {
    let up = matches!(
        tokio::time::timeout(DATABASE_PROBE_TIMEOUT, state.store.ping()).await,
        Ok(Ok(()))
    );
    metrics::gauge!("trustbroker_database_up").set(if up { 1.0 } else { 0.0 });
    if let Some(left) = certificate_seconds_left(&state.ca.ca.certificate_der) {
        metrics::gauge!("trustbroker_ca_certificate_expiry_seconds").set(left as f64);
    }
    if up {
        // Sets trustbroker_apns_certificate_expiry_seconds when a push certificate exists.
        let _ = tokio::time::timeout(
            DATABASE_PROBE_TIMEOUT,
            crate::apple::push_cert::expiry_status(&state.store),
        )
        .await;
    }
}

/// Seconds from now until the certificate's notAfter (negative once expired).
fn certificate_seconds_left(der: &[u8]) -> Option<i64> {
    use der::Decode;
    let certificate = x509_cert::Certificate::from_der(der).ok()?;
    let not_after = certificate
        .tbs_certificate()
        .validity()
        .not_after
        .to_unix_duration()
        .as_secs();
    let now = chrono::Utc::now().timestamp();
    Some(i64::try_from(not_after).ok()? - now)
}
