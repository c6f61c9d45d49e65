//! Caps on concurrent expensive work per route group, refused cheaply when full.
//!
//! Routes that do work before (or while) they learn who is talking — SCEP PKIOperation, the MDM
//! channels, the SAML ACS, the OIDC callback, the LDAP password form — each take a permit from
//! their group's semaphore for the life of the request. When none is free the request is answered
//! at once with 503 and `Retry-After`: never queued, so a flood cannot build a backlog that
//! outlives it, and every other route keeps answering.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use super::error::ApiError;
use crate::config::LimitSettings;

/// Which requests of a route take a permit.
#[derive(Clone, Copy, Debug)]
enum Applies {
    Always,
    /// SCEP: everything but the cheap GetCACaps/GetCACert reads.
    ScepPkiOperation,
}

/// One route group's cap: at most `max` requests in flight, the rest refused.
#[derive(Clone)]
pub struct Cap {
    group: &'static str,
    permits: Arc<Semaphore>,
    retry_after: HeaderValue,
    applies: Applies,
}

impl Cap {
    fn new(group: &'static str, max: usize, retry_after_secs: u64) -> Cap {
        Cap {
            group,
            permits: Arc::new(Semaphore::new(max)),
            retry_after: HeaderValue::from(retry_after_secs),
            applies: Applies::Always,
        }
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
    let Ok(_permit) = cap.permits.clone().try_acquire_owned() else {
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
        let retry = limits.retry_after_secs;
        let mut scep = Cap::new("scep", limits.scep, retry);
        scep.applies = Applies::ScepPkiOperation;
        RouteCaps {
            scep,
            mdm: Cap::new("mdm", limits.mdm, retry),
            saml_acs: Cap::new("saml_acs", limits.saml_acs, retry),
            oidc_callback: Cap::new("oidc_callback", limits.oidc_callback, retry),
            ldap_sign_in: Cap::new("ldap_sign_in", limits.ldap_sign_in, retry),
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
        let mut cap = Cap::new("scep", 1, 5);
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
}
