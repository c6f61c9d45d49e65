//! Per-device tokens' public side: `GET /.well-known/jwks.json` (the keys that verify them,
//! no authentication) and `POST /validate/v1/introspect` (RFC 7662, for app clients).

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};

use super::AppState;
use super::error::ApiError;
use super::observe::REQUEST_ID_HEADER;
use crate::audit;
use crate::store::NewAuditEntry;
use crate::tokens::device::{Introspection, JWKS_MAX_AGE, MAX_TOKEN_BYTES};
use crate::tokens::shared::{AuthenticatedClient, ValidationError};

pub const JWKS_PATH: &str = "/.well-known/jwks.json";
pub const INTROSPECT_PATH: &str = "/validate/v1/introspect";
/// These routes' part of the OpenAPI document (`http::openapi`).
#[derive(utoipa::OpenApi)]
#[openapi(paths(jwks, introspect))]
pub struct Doc;

/// The audit action of refused introspections and inactive answers.
pub const AUDIT_INTROSPECT: &str = "device-token.introspect";

/// An introspection body: the token (≤ 8 KiB) and a few form parameters, with room for
/// percent-encoding.
const INTROSPECT_BODY_LIMIT: usize = 2 * MAX_TOKEN_BYTES;

pub fn router() -> Router<AppState> {
    Router::new().route(JWKS_PATH, get(jwks)).route(
        INTROSPECT_PATH,
        post(introspect).layer(DefaultBodyLimit::max(INTROSPECT_BODY_LIMIT)),
    )
}

/// The public keys that verify per-device tokens (RFC 7517), cacheable.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "validation", operation_id = "jwks",
    responses((status = 200, description = "`{keys: [JWK…]}`: the current, next and recently retired ES256 keys.", body = Object)))]
async fn jwks(State(state): State<AppState>) -> Result<Response, ApiError> {
    let jwks = state
        .device_tokens
        .jwks()
        .await
        .map_err(|e| ApiError::internal(&e))?;
    let mut response = Json(&*jwks).into_response();
    let cache = format!("public, max-age={}", JWKS_MAX_AGE.as_secs());
    if let Ok(value) = HeaderValue::from_str(&cache) {
        response.headers_mut().insert(header::CACHE_CONTROL, value);
    }
    Ok(response)
}

/// RFC 7662: `token` (form-encoded; JSON accepted too), HTTP Basic client credentials. The
/// answer is `{"active": false}` for any token that is not an active device token of the
/// client's integration, whatever the reason (the reason goes to metrics and the debug log).
/// RFC 7662 token introspection of a per-device token, for the integration's app clients.
/// Answers are `no-store`.
#[utoipa::path(post, path = "/validate/v1/introspect", tag = "validation", operation_id = "introspect",
    security(("app_client" = [])),
    request_body(content = Object, content_type = "application/x-www-form-urlencoded",
        description = "`token=…` (RFC 7662); a JSON `{\"token\": …}` is accepted too."),
    responses(
        (status = 200, description = "`{\"active\": true, token_type, client_id, iss, aud, sub, iat, nbf, exp, jti, groups, owner?, email?}` or `{\"active\": false}`.", body = Object),
        (status = 400, description = "No or malformed `token` (`invalid_request`).", body = crate::http::openapi::OAuthErrorBody),
        (status = 401, description = "No app client credentials, or refused ones (`invalid_client`).", body = crate::http::openapi::OAuthErrorBody),
        (status = 429, description = "The client is over its rate (`rate_limited`, `Retry-After`).", body = crate::http::openapi::OAuthErrorBody),
        (status = 503, description = "App clients cannot be checked right now (`temporarily_unavailable`).", body = crate::http::openapi::OAuthErrorBody),
    ))]
async fn introspect(
    State(state): State<AppState>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let origin = Origin {
        request_id: headers
            .get(&REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|id| audit::truncated(id, 128)),
        source: peer.map(|Extension(ConnectInfo(addr))| addr.ip().to_string()),
    };
    let client = match authenticate_client(&state, &origin, &headers).await {
        Ok(client) => client,
        Err(refusal) => return refusal,
    };
    let token = match token_parameter(&headers, &body) {
        Ok(token) => token,
        Err(refusal) => return refusal.into_response(),
    };
    match state
        .device_tokens
        .introspect(&token, &client.integration)
        .await
    {
        Ok(Introspection::Active(active)) => {
            let claims = &active.claims;
            let mut answer = json!({
                "active": true,
                "token_type": "device",
                "client_id": client.id,
                "iss": claims.iss,
                "aud": claims.aud,
                "sub": claims.sub,
                "iat": claims.iat,
                "nbf": claims.nbf,
                "exp": claims.exp,
                "jti": claims.jti,
                "groups": claims.groups,
            });
            if let Some(object) = answer.as_object_mut() {
                if let Some(owner) = &claims.owner {
                    object.insert("owner".into(), json!(owner));
                }
                if let Some(email) = &claims.email {
                    object.insert("email".into(), json!(email));
                }
            }
            no_store(Json(answer).into_response())
        }
        Ok(Introspection::Inactive(reason)) => {
            // Someone holds a token that is not good (any more): worth a bounded record.
            let detail = json!({"reason": reason.as_str()});
            let actor = format!("app-client:{}", client.id);
            let target = Some(client.integration.clone());
            audit_bounded(
                &state,
                &origin,
                actor,
                audit::OUTCOME_FAILURE,
                target,
                detail,
            );
            no_store(Json(json!({"active": false})).into_response())
        }
        Err(e) => ApiError::internal(&e).into_response(),
    }
}

fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// An OAuth error body (RFC 6749 section 5.2), as RFC 7662 answers a bad request.
fn oauth_error(status: StatusCode, error: &'static str, description: &str) -> Response {
    let mut response = (
        status,
        Json(json!({"error": error, "error_description": description})),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"trustbroker\""),
        );
    }
    no_store(response)
}

/// Why a request body was refused: a status and an RFC 6749 error description.
#[derive(Debug)]
struct BadBody(StatusCode, &'static str);

impl IntoResponse for BadBody {
    fn into_response(self) -> Response {
        oauth_error(self.0, "invalid_request", self.1)
    }
}

/// The `token` parameter of a form-encoded (RFC 7662) or JSON body.
fn token_parameter(headers: &HeaderMap, body: &[u8]) -> Result<String, BadBody> {
    let bad = |description| Err(BadBody(StatusCode::BAD_REQUEST, description));
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let token = match content_type.as_str() {
        "application/x-www-form-urlencoded" => {
            let Ok(text) = std::str::from_utf8(body) else {
                return bad("the body is not UTF-8");
            };
            let mut token = None;
            for pair in text.split('&').filter(|p| !p.is_empty()) {
                let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
                if form_decode(name).as_deref() != Some("token") {
                    // RFC 7662: other parameters (token_type_hint, extensions) may be ignored.
                    continue;
                }
                if token.is_some() {
                    return bad("the token parameter is given more than once");
                }
                let Some(value) = form_decode(value) else {
                    return bad("the token parameter is not valid percent-encoded UTF-8");
                };
                token = Some(value);
            }
            token
        }
        "application/json" => {
            #[derive(Deserialize)]
            struct JsonBody {
                token: Option<String>,
            }
            match serde_json::from_slice::<JsonBody>(body) {
                Ok(parsed) => parsed.token,
                Err(_) => return bad("the body is not a JSON object with a token string"),
            }
        }
        _ => {
            return Err(BadBody(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "send application/x-www-form-urlencoded (RFC 7662) or application/json",
            ));
        }
    };
    match token {
        Some(token) if !token.is_empty() => Ok(token),
        _ => bad("the token parameter is missing"),
    }
}

/// One `application/x-www-form-urlencoded` name or value: `+` is a space, then percent-decoding.
fn form_decode(text: &str) -> Option<String> {
    let spaced = text.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()
        .map(|s| s.into_owned())
}

/// The client's HTTP Basic credentials (RFC 6749 section 2.3.1: each part form-encoded).
fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") || encoded.len() > 1024 {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (id, secret) = text.split_once(':')?;
    Some((form_decode(id)?, form_decode(secret)?))
}

/// Authenticates the app client of an introspection request through the clients' shared
/// index (`tokens::shared`): the same credentials, rate limit and metrics as
/// `POST /validate/v1/tokens`. Refusals are audited within the unauthenticated budget.
async fn authenticate_client(
    state: &AppState,
    origin: &Origin,
    headers: &HeaderMap,
) -> Result<AuthenticatedClient, Response> {
    let refused = || {
        oauth_error(
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            "app client credentials (HTTP Basic) are missing or refused",
        )
    };
    let Some((id, secret)) = basic_credentials(headers) else {
        return Err(refused());
    };
    match state.tokens.authenticate_client(&id, &secret).await {
        Ok(client) => Ok(client),
        Err(ValidationError::BadClient(reason)) => {
            let actor = format!(
                "app-client-id:{}",
                audit::truncated(&id, audit::MAX_UNAUTHENTICATED_FIELD)
            );
            let detail = json!({"reason": reason.as_str()});
            audit_bounded(state, origin, actor, audit::OUTCOME_DENIED, None, detail);
            Err(refused())
        }
        Err(ValidationError::RateLimited {
            client_id,
            integration,
            retry_after_secs,
        }) => {
            let detail = json!({"reason": "rate limited"});
            let actor = format!("app-client:{client_id}");
            let target = Some(integration);
            audit_bounded(state, origin, actor, audit::OUTCOME_DENIED, target, detail);
            let mut response = oauth_error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                "this client is over its validation rate; retry later",
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            Err(response)
        }
        Err(ValidationError::Unavailable(_)) => Err(oauth_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "app clients cannot be checked right now; retry shortly",
        )),
        Err(ValidationError::InvalidDevice(message)) => Err(oauth_error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            &message,
        )),
        Err(ValidationError::Store(e)) => Err(ApiError::internal(&e).into_response()),
    }
}

/// Where a request came from, for audit records.
struct Origin {
    request_id: Option<String>,
    source: Option<String>,
}

/// An audit record of a caller who is not an admin, written off the request path and within
/// the budget of such records (a client replaying bad tokens cannot flood the log).
fn audit_bounded(
    state: &AppState,
    origin: &Origin,
    actor: String,
    outcome: &str,
    target: Option<String>,
    detail: Value,
) {
    let entry = NewAuditEntry {
        actor,
        action: AUDIT_INTROSPECT.into(),
        target,
        outcome: outcome.into(),
        detail: Some(detail.to_string()),
        request_id: origin.request_id.clone(),
        source: origin.source.clone(),
    };
    let store = state.store.clone();
    let budget = state.audit_budget.clone();
    tokio::spawn(async move {
        audit::record_unauthenticated(&store, &budget, entry).await;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_come_from_forms_and_json() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/x-www-form-urlencoded; charset=utf-8"),
        );
        assert_eq!(
            token_parameter(&headers, b"token_type_hint=x&token=a.b%2Ec").unwrap(),
            "a.b.c"
        );
        assert!(token_parameter(&headers, b"token=a&token=b").is_err());
        assert!(token_parameter(&headers, b"token_type_hint=x").is_err());
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        assert_eq!(
            token_parameter(&headers, br#"{"token":"a.b.c"}"#).unwrap(),
            "a.b.c"
        );
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        let refused = token_parameter(&headers, b"token=a").unwrap_err();
        assert_eq!(refused.0, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        let mut headers = HeaderMap::new();
        let encoded = base64::engine::general_purpose::STANDARD.encode("my%20id:s+cret");
        headers.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {encoded}")).unwrap(),
        );
        assert_eq!(
            basic_credentials(&headers),
            Some(("my id".into(), "s cret".into()))
        );
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert_eq!(basic_credentials(&headers), None);
    }
}
