//! Caps on concurrent expensive work per route group, refused cheaply when full.
//!
//! Routes that do work before (or while) they learn who is talking — SCEP PKIOperation, the MDM
//! channels, the SAML ACS, the OIDC callback, the LDAP password form — each take a permit from
//! their group's semaphore for the life of the request. When none is free the request waits in
//! line for at most `[limits] wait_ms`, behind at most [`WAITING_PER_PERMIT`] others per permit,
//! and is then answered 503 with `Retry-After`. A burst (a fleet woken at once) is served a few
//! milliseconds late instead of sent away for seconds; a flood's backlog outlives it by no more
//! than the wait, a waiting request holds no permit and has read no body, and every other route
//! keeps answering.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::ApiError;
use crate::config::LimitSettings;

/// Which requests of a route take a permit.
#[derive(Clone, Copy, Debug)]
enum Applies {
    Always,
    /// SCEP: everything but the cheap GetCACaps/GetCACert reads.
    ScepPkiOperation,
}

/// Requests that may wait for a permit, per permit: past it, the excess is refused at once.
pub const WAITING_PER_PERMIT: usize = 8;

/// One route group's cap: at most `max` requests in flight, a bounded line waiting for a bounded
/// time, the rest refused.
#[derive(Clone)]
pub struct Cap {
    group: &'static str,
    permits: Arc<Semaphore>,
    waiting: Arc<AtomicUsize>,
    max_waiting: usize,
    wait: Duration,
    retry_after: HeaderValue,
    applies: Applies,
}

/// A place in a cap's line, given back when the request stops waiting.
struct InLine<'a>(&'a AtomicUsize);

impl<'a> InLine<'a> {
    fn join(waiting: &'a AtomicUsize, max: usize) -> Option<InLine<'a>> {
        waiting
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| InLine(waiting))
    }
}

impl Drop for InLine<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Cap {
    fn new(group: &'static str, max: usize, wait: Duration, retry_after_secs: u64) -> Cap {
        Cap {
            group,
            permits: Arc::new(Semaphore::new(max)),
            waiting: Arc::new(AtomicUsize::new(0)),
            max_waiting: max.saturating_mul(WAITING_PER_PERMIT),
            wait,
            retry_after: HeaderValue::from(retry_after_secs),
            applies: Applies::Always,
        }
    }

    /// A permit now, or within the wait if the line has room (first come, first served: tokio's
    /// semaphore is fair); `None` when the request is to be refused.
    async fn admit(&self) -> Option<OwnedSemaphorePermit> {
        if let Ok(permit) = self.permits.clone().try_acquire_owned() {
            return Some(permit);
        }
        if self.wait.is_zero() {
            return None;
        }
        let _in_line = InLine::join(&self.waiting, self.max_waiting)?;
        let permit = tokio::time::timeout(self.wait, self.permits.clone().acquire_owned()).await;
        metrics::counter!("trustbroker_route_cap_waits_total", "group" => self.group).increment(1);
        permit.ok()?.ok()
    }

    fn applies_to(&self, request: &Request) -> bool {
        match self.applies {
            Applies::Always => true,
            Applies::ScepPkiOperation => {
                // Decoded exactly as the handler decodes it, so no spelling slips past.
                let operation = Query::<HashMap<String, String>>::try_from_uri(request.uri())
                    .ok()
                    .and_then(|Query(mut params)| params.remove("operation"));
                let cheap_read = request.method() == Method::GET
                    && matches!(operation.as_deref(), Some("GetCACaps" | "GetCACert"));
                !cheap_read
            }
        }
    }

    fn refuse(&self) -> Response {
        metrics::counter!("trustbroker_route_cap_refusals_total", "group" => self.group)
            .increment(1);
        tracing::debug!(
            group = self.group,
            "route group at its concurrency cap; 503"
        );
        let mut response = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the server is busy with this kind of request; retry later",
        )
        .into_response();
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, self.retry_after.clone());
        response
    }
}

/// The middleware: `.route(path, get(h).layer(from_fn_with_state(caps.scep.clone(), guard)))`.
pub async fn guard(State(cap): State<Cap>, request: Request, next: Next) -> Response {
    if !cap.applies_to(&request) {
        return next.run(request).await;
    }
    // Held until the handler has answered (or the request timeout dropped it).
    let Some(_permit) = cap.admit().await else {
        return cap.refuse();
    };
    next.run(request).await
}

/// The caps of every route group, built once from `[limits]`.
#[derive(Clone)]
pub struct RouteCaps {
    pub scep: Cap,
    pub mdm: Cap,
    pub saml_acs: Cap,
    pub oidc_callback: Cap,
    pub ldap_sign_in: Cap,
}

impl RouteCaps {
    pub fn new(limits: &LimitSettings) -> RouteCaps {
        let cap = |group, max| {
            Cap::new(
                group,
                max,
                Duration::from_millis(limits.wait_ms),
                limits.retry_after_secs,
            )
        };
        let mut scep = cap("scep", limits.scep);
        scep.applies = Applies::ScepPkiOperation;
        RouteCaps {
            scep,
            mdm: cap("mdm", limits.mdm),
            saml_acs: cap("saml_acs", limits.saml_acs),
            oidc_callback: cap("oidc_callback", limits.oidc_callback),
            ldap_sign_in: cap("ldap_sign_in", limits.ldap_sign_in),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;

    fn request(method: Method, uri: &str) -> Request {
        Request::builder()
            .method(method)
            .uri(uri)
            .body(Body::empty())
            .unwrap()
    }

    #[test]
    fn scep_reads_are_free_and_every_operation_spelling_is_capped() {
        let mut cap = Cap::new("scep", 1, Duration::ZERO, 5);
        cap.applies = Applies::ScepPkiOperation;
        assert!(!cap.applies_to(&request(Method::GET, "/scep?operation=GetCACert")));
        assert!(!cap.applies_to(&request(Method::GET, "/scep?operation=GetCACaps")));
        for uri in [
            "/scep?operation=PKIOperation&message=x",
            "/scep?operation=PKIOper%61tion&message=x",
            "/scep?operation=GetCACert&operation=PKIOperation",
            "/scep",
        ] {
            assert!(cap.applies_to(&request(Method::GET, uri)), "{uri}");
        }
        assert!(cap.applies_to(&request(Method::POST, "/scep?operation=GetCACert")));
    }

    #[tokio::test]
    async fn a_request_waits_its_turn_within_the_wait() {
        let cap = Cap::new("mdm", 1, Duration::from_secs(10), 5);
        let held = cap.admit().await.expect("the free permit");
        let waiter = tokio::spawn({
            let cap = cap.clone();
            async move { cap.admit().await.is_some() }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiter.is_finished(), "waiting while the permit is held");
        assert_eq!(cap.waiting.load(Ordering::Acquire), 1);
        drop(held);
        assert!(waiter.await.unwrap(), "served once the permit came back");
        assert_eq!(cap.waiting.load(Ordering::Acquire), 0);
    }

    #[tokio::test]
    async fn a_request_is_refused_when_the_wait_runs_out() {
        let cap = Cap::new("mdm", 1, Duration::from_millis(250), 5);
        let _held = cap.admit().await.expect("the free permit");
        let started = std::time::Instant::now();
        assert!(cap.admit().await.is_none());
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert_eq!(cap.waiting.load(Ordering::Acquire), 0, "left the line");
    }

    #[tokio::test]
    async fn a_full_line_refuses_at_once_and_no_wait_means_no_line() {
        let cap = Cap::new("mdm", 1, Duration::from_secs(10), 5);
        let _held = cap.admit().await.expect("the free permit");
        let mut line = Vec::new();
        for _ in 0..WAITING_PER_PERMIT {
            let cap = cap.clone();
            line.push(tokio::spawn(async move { cap.admit().await.is_some() }));
        }
        tokio::time::timeout(Duration::from_secs(5), async {
            while cap.waiting.load(Ordering::Acquire) < WAITING_PER_PERMIT {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("the line fills");
        let started = std::time::Instant::now();
        assert!(cap.admit().await.is_none(), "the line is full");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "not after the 10 s wait"
        );

        let no_wait = Cap::new("mdm", 1, Duration::ZERO, 5);
        let _held = no_wait.admit().await.expect("the free permit");
        assert!(no_wait.admit().await.is_none());
        assert_eq!(no_wait.waiting.load(Ordering::Acquire), 0);
        for waiter in line {
            waiter.abort();
        }
    }
}
