//! Per-request observability: a request id on every request and response, a tracing span that
//! carries it, and Prometheus counters and latency histograms per route.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use metrics::{Counter, Histogram};
use tower_http::request_id::{MakeRequestId, RequestId};
use uuid::Uuid;

pub static REQUEST_ID_HEADER: HeaderName = HeaderName::from_static("x-request-id");

/// Fresh request ids, UUID-shaped and unique: a random seed drawn once per process, mixed with
/// a counter (a bijection, so no two requests of a process share one). Ids need to be unique,
/// not secret; drawing fresh randomness for each was a system call per request.
#[derive(Clone, Copy, Default)]
pub struct MakeRequestUuid;

fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The next request id.
pub fn next_request_id() -> Uuid {
    static SEED: OnceLock<(u64, u64)> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let (high, low) = *SEED.get_or_init(|| Uuid::new_v4().as_u64_pair());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let bits = (u128::from(splitmix64(high ^ n)) << 64) | u128::from(splitmix64(low ^ n));
    uuid::Builder::from_random_bytes(bits.to_be_bytes()).into_uuid()
}

impl MakeRequestId for MakeRequestUuid {
    fn make_request_id<B>(&mut self, _request: &axum::http::Request<B>) -> Option<RequestId> {
        let mut buffer = [0u8; uuid::fmt::Hyphenated::LENGTH];
        let text = next_request_id().hyphenated().encode_lower(&mut buffer);
        HeaderValue::from_str(text).ok().map(RequestId::new)
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

/// The request id of a request, borrowed ("" without one).
pub fn request_id_str<B>(request: &axum::http::Request<B>) -> &str {
    request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// Most (method, route, status) handles kept; past this, handles are looked up each time.
const MAX_SERIES: usize = 1024;

/// The metric handles of each route, method and status seen, so that a request does not build
/// label strings and look them up in the registry. Made with the router, after the recorder
/// is installed.
#[derive(Clone, Default)]
pub struct RouteMetrics(Arc<RwLock<Series>>);

#[derive(Default)]
struct Series {
    count: usize,
    by_route: HashMap<Box<str>, Vec<Handles>>,
}

struct Handles {
    method: Method,
    status: u16,
    requests: Counter,
    duration: Histogram,
}

fn handles(method: &Method, route: &str, status: u16) -> Handles {
    let (method_label, route_label) = (method.as_str().to_owned(), route.to_owned());
    Handles {
        method: method.clone(),
        status,
        requests: metrics::counter!(
            "trustbroker_http_requests_total",
            "method" => method_label.clone(), "route" => route_label.clone(),
            "status" => status.to_string()
        ),
        duration: metrics::histogram!(
            "trustbroker_http_request_duration_seconds",
            "method" => method_label, "route" => route_label
        ),
    }
}

impl Series {
    fn find(&self, method: &Method, route: &str, status: u16) -> Option<&Handles> {
        self.by_route
            .get(route)?
            .iter()
            .find(|h| h.status == status && h.method == method)
    }
}

impl RouteMetrics {
    fn record(&self, method: &Method, route: &str, status: u16, seconds: f64) {
        if let Ok(series) = self.0.read()
            && let Some(h) = series.find(method, route, status)
        {
            h.requests.increment(1);
            h.duration.record(seconds);
            return;
        }
        let made = handles(method, route, status);
        made.requests.increment(1);
        made.duration.record(seconds);
        if let Ok(mut series) = self.0.write()
            && series.count < MAX_SERIES
            && series.find(method, route, status).is_none()
        {
            series.count += 1;
            series.by_route.entry(route.into()).or_default().push(made);
        }
    }
}

/// Counts and times each request under its route template (never the raw path, which would
/// let clients mint unbounded label values).
pub async fn record_metrics(
    State(metrics): State<RouteMetrics>,
    request: Request,
    next: Next,
) -> Response {
    let route = request.extensions().get::<MatchedPath>().cloned();
    let method = request.method().clone();
    let started = Instant::now();
    let response = next.run(request).await;
    metrics.record(
        &method,
        route.as_ref().map_or("unmatched", |p| p.as_str()),
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}
