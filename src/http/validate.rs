//! Token validation for third-party apps' back ends: `POST /validate/v1/tokens`.
//!
//! The caller is an app client (not an admin), authenticated with HTTP Basic: its client ID and
//! secret, as OAuth's `client_secret_basic`. The body is `{"token": "...", "device": "..."?}`;
//! the answer is `{"active": false}` for anything but an active token of the client's own
//! integration (wrong, revoked, expired, scheduled, another integration's, malformed alike),
//! and `{"active": true, "integration": ..., "device": {...}?}` otherwise. Refused credentials
//! are 401, a client over its rate 429; both are audited within the unauthenticated budget.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::body::to_bytes;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::AppState;
use super::error::ApiError;
use super::observe::REQUEST_ID_HEADER;
use crate::audit::{self, UnauthenticatedBudget};
use crate::store::{NewAuditEntry, Store};
use crate::tokens::shared::{
    AuthenticatedClient, DeviceAnswer, TokenOutcome, TokenService, ValidationError,
};

pub const TOKENS_PATH: &str = "/validate/v1/tokens";

/// This route's part of the OpenAPI document (`http::openapi`).
#[derive(utoipa::OpenApi)]
#[openapi(paths(validate_token))]
pub struct Doc;
/// A token, a device ID and JSON punctuation fit many times over.
const MAX_BODY: usize = 4096;
/// Longest Authorization header worth decoding (an ID and a 43-character secret in base64).
const MAX_CREDENTIALS: usize = 512;

/// The route holds its own small state: axum clones a handler's state for every request, and
/// cloning the whole `AppState` (a dozen reference counts, shared by every core) cost a sixth
/// of the CPU at 40,000 validations per second (docs/benchmarks.md).
pub fn router(state: &AppState) -> Router<AppState> {
    let own = ValidateState(Arc::new(Needs {
        tokens: state.tokens.clone(),
        store: state.store.clone(),
        audit_budget: state.audit_budget.clone(),
    }));
    Router::new().route_service(TOKENS_PATH, post(validate_token).with_state(own))
}

/// What validation needs of the application state, behind one reference count.
#[derive(Clone)]
pub struct ValidateState(Arc<Needs>);

pub struct Needs {
    tokens: TokenService,
    store: Store,
    audit_budget: Arc<UnauthenticatedBudget>,
}

impl std::ops::Deref for ValidateState {
    type Target = Needs;
    fn deref(&self) -> &Needs {
        &self.0
    }
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
struct ValidateBody {
    /// The token the app received through managed app configuration.
    token: String,
    /// The device's ID, when the app knows it: the answer then says whether the token was
    /// delivered to that device.
    device: Option<String>,
}

/// Whether a token is an active token of the calling app client's integration. Anything else
/// (wrong, revoked, expired, not yet valid, another integration's, malformed) is
/// `{"active": false}`, alike. Answers are `no-store`.
#[utoipa::path(post, path = "/validate/v1/tokens", tag = "validation", operation_id = "validate_token",
    security(("app_client" = [])),
    request_body = ValidateBody,
    responses(
        (status = 200, description = "Active (`integration`, `device` when one was named) or not.", body = Answer),
        (status = 400, description = "The body is not `{token, device?}`.", body = crate::http::openapi::ErrorBody),
        (status = 401, description = "No app client credentials, or refused ones.", body = crate::http::openapi::ErrorBody),
        (status = 413, description = "The body is larger than 4 KiB.", body = crate::http::openapi::ErrorBody),
        (status = 429, description = "The client is over its validation rate (`Retry-After`).", body = crate::http::openapi::ErrorBody),
        (status = 503, description = "App clients cannot be checked right now.", body = crate::http::openapi::ErrorBody),
    ))]
async fn validate_token(State(state): State<ValidateState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    // Kept raw: turned into text only for an audit record (refusals), not on every request.
    let origin = Origin {
        request_id: parts.headers.get(&REQUEST_ID_HEADER).cloned(),
        peer: parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| *addr),
    };
    let Some((client_id, secret)) = basic_credentials(&parts.headers) else {
        // Nothing was attempted in anyone's name: not audited.
        return unauthorized(
            "client credentials are required: HTTP Basic with the app client's ID and secret (trustbroker app-client create)",
        );
    };
    let client = match state.tokens.authenticate_client(&client_id, &secret).await {
        Ok(client) => client,
        Err(err) => return refused(&state, &origin, &client_id, err),
    };
    let body = match to_bytes(body, MAX_BODY).await {
        Ok(body) => body,
        Err(_) => {
            return ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("the body is larger than {MAX_BODY} bytes"),
            )
            .into_response();
        }
    };
    let body: ValidateBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => {
            return invalid(format!(
                "the body must be {{\"token\": \"...\", \"device\": \"...\"}} (device \
                 optional): {e}"
            ));
        }
    };
    match state
        .tokens
        .validate(&client, &body.token, body.device.as_deref())
        .await
    {
        Ok(validation) if validation.outcome == TokenOutcome::Active => {
            let answer = Active {
                active: true,
                integration: &client.integration,
                device: validation.device,
            };
            no_store(axum::Json(answer).into_response())
        }
        Ok(validation) => {
            audit_inactive(&state, &origin, &client, validation.outcome);
            no_store(axum::Json(Inactive { active: false }).into_response())
        }
        Err(err) => refused(&state, &origin, &client_id, err),
    }
}

/// An active token of the caller's integration.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = ActiveToken)]
struct Active<'a> {
    /// Always `true`.
    active: bool,
    integration: &'a str,
    /// Only when the request named a device.
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<DeviceAnswer>,
}

/// Anything else: the same answer whatever the reason.
#[derive(Serialize, utoipa::ToSchema)]
#[schema(as = InactiveToken)]
struct Inactive {
    /// Always `false`.
    active: bool,
}

/// The answer of `POST /validate/v1/tokens`: one of the two bodies above (for the document).
#[derive(Serialize, utoipa::ToSchema)]
#[serde(untagged)]
#[schema(as = TokenValidation)]
#[allow(dead_code)] // names the two answers for the OpenAPI document; never built
enum Answer<'a> {
    Active(Active<'a>),
    Inactive(Inactive),
}

/// Where a request came from, for audit records.
struct Origin {
    request_id: Option<HeaderValue>,
    peer: Option<SocketAddr>,
}

impl Origin {
    fn entry(&self, actor: String, outcome: &str, detail: serde_json::Value) -> NewAuditEntry {
        NewAuditEntry {
            actor,
            action: "token.validate".into(),
            outcome: outcome.into(),
            detail: Some(detail.to_string()),
            request_id: self
                .request_id
                .as_ref()
                .and_then(|v| v.to_str().ok())
                .map(|id| audit::truncated(id, 128)),
            source: self.peer.map(|addr| addr.ip().to_string()),
            ..Default::default()
        }
    }
}

/// `Authorization: Basic base64(id:secret)`, bounded; `None` when absent or malformed.
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    if value.len() > MAX_CREDENTIALS {
        return None;
    }
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_string(), secret.to_string()))
}

/// The answer to a refused validation, audited (bounded like any unauthenticated record).
fn refused(
    state: &ValidateState,
    origin: &Origin,
    client_id: &str,
    err: ValidationError,
) -> Response {
    match err {
        ValidationError::BadClient(reason) => {
            tracing::info!(reason = reason.as_str(), "app client refused");
            let actor = format!(
                "app-client-id:{}",
                audit::truncated(client_id, audit::MAX_UNAUTHENTICATED_FIELD)
            );
            let entry = origin.entry(
                actor,
                audit::OUTCOME_DENIED,
                json!({"reason": reason.as_str()}),
            );
            record_bounded(state, entry);
            unauthorized("the client credentials are not valid (unknown, wrong or revoked)")
        }
        ValidationError::RateLimited {
            client_id,
            integration,
            retry_after_secs,
        } => {
            let entry = origin.entry(
                format!("app-client:{client_id}"),
                audit::OUTCOME_DENIED,
                json!({"reason": "rate limited", "integration": integration}),
            );
            record_bounded(state, entry);
            let mut response = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "this client is over its validation rate; retry later",
            )
            .into_response();
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            response
        }
        ValidationError::InvalidDevice(message) => invalid(message),
        ValidationError::Unavailable(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "tokens cannot be validated right now; retry shortly",
        )
        .into_response(),
        ValidationError::Store(e) => ApiError::from(e).into_response(),
    }
}

/// An inactive answer is a failure worth a record (someone holds a bad token), within the
/// budget: a client replaying bad tokens cannot flood the log.
fn audit_inactive(
    state: &ValidateState,
    origin: &Origin,
    client: &AuthenticatedClient,
    outcome: TokenOutcome,
) {
    let mut entry = origin.entry(
        format!("app-client:{}", client.id),
        audit::OUTCOME_FAILURE,
        json!({"outcome": outcome.as_str()}),
    );
    entry.target = Some(client.integration.clone());
    record_bounded(state, entry);
}

/// Writes the record off the request path: the answer does not wait for the database.
fn record_bounded(state: &ValidateState, entry: NewAuditEntry) {
    let store = state.store.clone();
    let budget = state.audit_budget.clone();
    tokio::spawn(async move {
        audit::record_unauthenticated(&store, &budget, entry).await;
    });
}

fn unauthorized(message: &str) -> Response {
    let mut response = ApiError::unauthorized(message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Basic realm=\"trustbroker-validate\", charset=\"UTF-8\""),
    );
    response
}

fn invalid(message: impl Into<String>) -> Response {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
        message.into(),
    )
    .into_response()
}

/// Validation answers are about this moment: never cached.
fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_auth(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
        headers
    }

    #[test]
    fn basic_credentials_are_parsed_strictly() {
        let encoded = STANDARD.encode("tbc_1:s3cret:with:colons");
        assert_eq!(
            basic_credentials(&with_auth(&format!("Basic {encoded}"))),
            Some(("tbc_1".into(), "s3cret:with:colons".into()))
        );
        assert_eq!(
            basic_credentials(&with_auth(&format!("basic {encoded}"))),
            Some(("tbc_1".into(), "s3cret:with:colons".into()))
        );
        assert_eq!(basic_credentials(&with_auth("Bearer abc")), None);
        assert_eq!(basic_credentials(&with_auth("Basic !!!")), None);
        let no_colon = STANDARD.encode("justanid");
        assert_eq!(
            basic_credentials(&with_auth(&format!("Basic {no_colon}"))),
            None
        );
        let long = STANDARD.encode("x".repeat(600));
        assert_eq!(
            basic_credentials(&with_auth(&format!("Basic {long}"))),
            None
        );
        assert_eq!(basic_credentials(&HeaderMap::new()), None);
    }
}
