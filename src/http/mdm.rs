//! The device-facing MDM endpoints: check-in (CheckInURL) and the command channel (ServerURL).
//! Thin: authenticate the body's signature, hand it to `apple::service`, map the outcome.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::AppState;
use super::error::ApiError;
use crate::apple::identity::{self, IdentityError};
use crate::apple::service::{MdmError, MdmReply};

pub const CHECKIN_PATH: &str = "/mdm/checkin";
pub const CONNECT_PATH: &str = "/mdm/connect";

const SIGNATURE_HEADER: &str = "mdm-signature";

pub async fn check_in(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let identity = match authenticate(&state, &headers, &body).await {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    respond(state.mdm.check_in(&identity, &body).await, "checkin")
}

pub async fn connect(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let identity = match authenticate(&state, &headers, &body).await {
        Ok(identity) => identity,
        Err(response) => return response,
    };
    respond(state.mdm.connect(&identity, &body).await, "connect")
}

async fn authenticate(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<identity::DeviceIdentity, Response> {
    let signature = match headers.get(SIGNATURE_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(value)) => Some(value),
        Some(Err(_)) => {
            return Err(
                ApiError::bad_request("the Mdm-Signature header is not text").into_response(),
            );
        }
    };
    identity::authenticate(&state.store, signature, body)
        .await
        .map_err(|e| {
            let (status, code) = match &e {
                IdentityError::Malformed(_) => (StatusCode::BAD_REQUEST, "bad_request"),
                IdentityError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
                IdentityError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            };
            tracing::info!(error = %e, "MDM: request refused");
            ApiError::new(status, code, e.to_string()).into_response()
        })
}

fn respond(outcome: Result<MdmReply, MdmError>, channel: &'static str) -> Response {
    match outcome {
        Ok(MdmReply::Empty) => StatusCode::OK.into_response(),
        Ok(MdmReply::Plist(body)) => (
            [(header::CONTENT_TYPE, "application/xml; charset=utf-8")],
            body,
        )
            .into_response(),
        Err(e) => {
            let (status, code) = match &e {
                MdmError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
                MdmError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
                MdmError::Gone(_) => (StatusCode::GONE, "not_supported"),
                MdmError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "not_implemented"),
                MdmError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            };
            if status.is_server_error() {
                tracing::error!(error = %e, channel, "MDM: request failed");
            } else {
                tracing::info!(error = %e, channel, "MDM: request refused");
            }
            let message = match &e {
                MdmError::Internal(_) => "internal error".to_owned(),
                other => other.to_string(),
            };
            ApiError::new(status, code, message).into_response()
        }
    }
}
