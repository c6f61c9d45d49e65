//! Database outages answered as what they are: 503 with `Retry-After`, not 500, and at once.
//!
//! Every handler's own error type maps a failed query to 500, which tells a device or an
//! operator that the broker is broken. When a handler answers 500, this layer asks the database
//! (bounded to half a second): if it does not answer, the answer becomes 503 "the database does
//! not answer" with `Retry-After`, which devices, IdPs and load balancers retry. One place for
//! every route, instead of every error type learning to tell outages apart; it costs a ping
//! only on responses that already failed.
//!
//! A write that failed because the database's disk is full is answered 507 (Insufficient
//! Storage) with a message saying so.
//!
//! Having seen the database down, the layer answers 503 straight away for the next second
//! (a circuit breaker), so that during an outage requests do not each wait out the pool's
//! acquire timeout; the first request after that second goes through and probes again.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::store::Store;

/// How long the check waits for the database.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How long requests are answered 503 without trying, after the database was seen down.
const OPEN_FOR: Duration = Duration::from_secs(1);
/// How recent a disk-full write failure must be for a 500 to be answered as 507.
const DISK_FULL_WINDOW: Duration = Duration::from_secs(2);
/// What clients are told to wait before trying again.
const RETRY_AFTER_SECS: &str = "5";

/// The layer's state: the store to probe, and until when the breaker is open.
#[derive(Clone)]
pub struct OutageGuard {
    store: Store,
    born: Instant,
    /// Milliseconds since `born` until which requests are refused without trying; 0: closed.
    open_until_ms: Arc<AtomicU64>,
}

impl OutageGuard {
    pub fn new(store: Store) -> OutageGuard {
        OutageGuard {
            store,
            born: Instant::now(),
            open_until_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn is_open(&self) -> bool {
        self.now_ms() < self.open_until_ms.load(Ordering::Relaxed)
    }

    fn open(&self) {
        let until = self.now_ms().saturating_add(OPEN_FOR.as_millis() as u64);
        self.open_until_ms.store(until, Ordering::Relaxed);
    }
}

/// Operations routes answer for themselves: readiness must probe, liveness must not depend on
/// the database, metrics must be readable during an outage.
fn is_operations(request: &Request) -> bool {
    matches!(request.uri().path(), "/healthz" | "/readyz" | "/metrics")
}

pub async fn database_outage_is_503(
    State(guard): State<OutageGuard>,
    request: Request,
    next: Next,
) -> Response {
    if guard.is_open() && !is_operations(&request) {
        return unavailable();
    }
    let response = next.run(request).await;
    if response.status() != StatusCode::INTERNAL_SERVER_ERROR {
        return response;
    }
    if crate::store::disk_full_within(DISK_FULL_WINDOW) {
        return disk_full();
    }
    let answers = matches!(
        tokio::time::timeout(PROBE_TIMEOUT, guard.store.ping()).await,
        Ok(Ok(()))
    );
    if answers {
        return response;
    }
    guard.open();
    unavailable()
}

/// A write failed for lack of space: 507, which says what to fix. The transaction that failed
/// was rolled back whole, so nothing was half-written.
fn disk_full() -> Response {
    metrics::counter!("trustbroker_database_disk_full_responses_total").increment(1);
    let mut response = (
        StatusCode::INSUFFICIENT_STORAGE,
        Json(json!({"error": {
            "code": "disk_full",
            "message": "the database's disk is full: nothing was written; an operator must free space",
        }})),
    )
        .into_response();
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    response
}

fn unavailable() -> Response {
    metrics::counter!("trustbroker_database_unavailable_responses_total").increment(1);
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!({"error": {
            "code": "unavailable",
            "message": "the database does not answer; try again shortly",
        }})),
    )
        .into_response();
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    response
}
