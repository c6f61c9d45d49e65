//! Per-request observability: a request id on every request and response, a tracing span that
//! carries it, and Prometheus counters and latency histograms per route.

use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::HeaderName;
use axum::middleware::Next;
use axum::response::Response;
use tower_http::request_id::{MakeRequestId, RequestId};
use uuid::Uuid;

pub static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Fresh request ids: random UUIDs.
#[derive(Clone, Copy, Default)]
pub struct MakeRequestUuid;

impl MakeRequestId for MakeRequestUuid {
    fn make_request_id<B>(&mut self, _request: &axum::http::Request<B>) -> Option<RequestId> {
        Uuid::new_v4().to_string().parse().ok().map(RequestId::new)
    }
}

/// The request id of a request (set by the request-id layer before anything else runs).
pub fn request_id_of<B>(request: &axum::http::Request<B>) -> Option<String> {
    request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// Counts and times each request under its route template (never the raw path, which would
/// let clients mint unbounded label values).
pub async fn record_metrics(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = request.method().as_str().to_string();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(
        "trustbroker_http_requests_total",
        "method" => method.clone(), "route" => route.clone(), "status" => status
    )
    .increment(1);
    metrics::histogram!(
        "trustbroker_http_request_duration_seconds",
        "method" => method, "route" => route
    )
    .record(started.elapsed().as_secs_f64());
    response
}
