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
//! Having seen the database down, the layer answers 503 straight away (a circuit breaker), so
//! that during an outage requests do not each wait out the pool's acquire timeout. One
//! background probe pings the database every 100 ms meanwhile and closes the breaker as soon as
//! it answers: requests are served again within a tenth of a second of the database's return,
//! not after a fixed delay.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::store::Store;

/// How long the check waits for the database.
const PROBE_TIMEOUT: Duration = Duration::from_millis(500);
/// How often the open breaker's probe asks the database whether it is back.
const PROBE_EVERY: Duration = Duration::from_millis(100);
/// How recent a disk-full write failure must be for a 500 to be answered as 507.
const DISK_FULL_WINDOW: Duration = Duration::from_secs(2);
/// What clients are told to wait before trying again.
const RETRY_AFTER_SECS: &str = "5";

/// Writes an outage answer's body from its status, error code and message: JSON for the API
/// and devices, a page for the console.
pub type RenderOutage = fn(StatusCode, &'static str, &'static str) -> Response;

/// The layer's state: the store to probe, until when the breaker is open, and how answers look.
/// Clones share the breaker, so the API's and the console's routers open and close it together.
#[derive(Clone)]
pub struct OutageGuard {
    store: Store,
    /// Requests are refused without trying while set.
    open: Arc<AtomicBool>,
    /// A probe task is running (at most one).
    probing: Arc<AtomicBool>,
    render: RenderOutage,
}

impl OutageGuard {
    pub fn new(store: Store) -> OutageGuard {
        OutageGuard {
            store,
            open: Arc::new(AtomicBool::new(false)),
            probing: Arc::new(AtomicBool::new(false)),
            render: json_body,
        }
    }

    /// The same breaker, answering with bodies `render` writes.
    pub fn rendering(&self, render: RenderOutage) -> OutageGuard {
        OutageGuard {
            render,
            ..self.clone()
        }
    }

    fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// Opens the breaker and starts the probe that will close it, unless one runs already.
    fn open(&self) {
        self.open.store(true, Ordering::Release);
        if self.probing.swap(true, Ordering::AcqRel) {
            return;
        }
        let guard = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(PROBE_EVERY).await;
                if answers(&guard.store).await {
                    break;
                }
            }
            // In this order: an `open` racing with the close starts a probe of its own, so the
            // breaker can close early (requests then probe for themselves) but never stay open
            // with no probe running.
            guard.probing.store(false, Ordering::Release);
            guard.open.store(false, Ordering::Release);
            tracing::info!("the database answers again: serving requests");
        });
    }
}

/// Operations routes answer for themselves: liveness must not depend on the database, metrics
/// must be readable during an outage. Readiness is refused with the rest while the breaker is
/// open, so that a load balancer sees the node ready exactly when it serves again.
fn is_operations(request: &Request) -> bool {
    matches!(request.uri().path(), "/healthz" | "/metrics")
}

pub async fn database_outage_is_503(
    State(guard): State<OutageGuard>,
    request: Request,
    next: Next,
) -> Response {
    if guard.is_open() && !is_operations(&request) {
        return unavailable(&guard);
    }
    let response = next.run(request).await;
    if response.status() != StatusCode::INTERNAL_SERVER_ERROR {
        return response;
    }
    if crate::store::disk_full_within(DISK_FULL_WINDOW) {
        return disk_full(&guard);
    }
    if answers(&guard.store).await {
        return response;
    }
    guard.open();
    unavailable(&guard)
}

async fn answers(store: &Store) -> bool {
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT, store.ping()).await,
        Ok(Ok(()))
    )
}

/// A write failed for lack of space: 507, which says what to fix. The transaction that failed
/// was rolled back whole, so nothing was half-written.
fn disk_full(guard: &OutageGuard) -> Response {
    metrics::counter!("trustbroker_database_disk_full_responses_total").increment(1);
    retry_later((guard.render)(
        StatusCode::INSUFFICIENT_STORAGE,
        "disk_full",
        "the database's disk is full: nothing was written; an operator must free space",
    ))
}

fn unavailable(guard: &OutageGuard) -> Response {
    metrics::counter!("trustbroker_database_unavailable_responses_total").increment(1);
    retry_later((guard.render)(
        StatusCode::SERVICE_UNAVAILABLE,
        "unavailable",
        "the database does not answer; try again shortly",
    ))
}

fn retry_later(mut response: Response) -> Response {
    response.headers_mut().insert(
        header::RETRY_AFTER,
        HeaderValue::from_static(RETRY_AFTER_SECS),
    );
    response
}

/// The API's error shape.
fn json_body(status: StatusCode, code: &'static str, message: &'static str) -> Response {
    (
        status,
        Json(json!({"error": {"code": code, "message": message}})),
    )
        .into_response()
}
