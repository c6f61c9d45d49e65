//! The SCEP endpoint (RFC 8894 §4): GetCACaps, GetCACert and PKIOperation over GET and POST.
//! Thin: it decodes the transport and hands the message to `pki::service`.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;

use super::AppState;
use super::error::ApiError;
use crate::pki::service::PkiReply;

/// What this CA can do, one capability a line (RFC 8894 §3.5.2).
const CAPABILITIES: &str =
    "POSTPKIOperation\nSHA-1\nSHA-256\nSHA-512\nAES\nDES3\nSCEPStandard\nRenewal\n";

pub async fn get(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    match params.get("operation").map(String::as_str) {
        Some("GetCACaps") => ([(header::CONTENT_TYPE, "text/plain")], CAPABILITIES).into_response(),
        Some("GetCACert") => match state.scep.ca_certificates() {
            Ok((content_type, body)) => {
                ([(header::CONTENT_TYPE, content_type)], body).into_response()
            }
            Err(e) => ApiError::internal(&e).into_response(),
        },
        Some("PKIOperation") => {
            let Some(message) = params.get("message") else {
                return ApiError::bad_request("PKIOperation over GET needs a message parameter")
                    .into_response();
            };
            // Form decoding turned any unescaped '+' of the base64 into a space.
            let cleaned: String = message
                .chars()
                .filter(|c| *c != '\n' && *c != '\r')
                .map(|c| if c == ' ' { '+' } else { c })
                .collect();
            match STANDARD.decode(cleaned.as_bytes()) {
                Ok(body) => reply(state.scep.pki_operation(body).await),
                Err(_) => {
                    ApiError::bad_request("the message parameter is not base64").into_response()
                }
            }
        }
        Some(other) => ApiError::bad_request(format!(
            "unknown SCEP operation '{other}' (GetCACaps, GetCACert, PKIOperation)"
        ))
        .into_response(),
        None => ApiError::bad_request("missing the operation parameter").into_response(),
    }
}

pub async fn post(
    State(state): State<AppState>,
    Query(params): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    match params.get("operation").map(String::as_str) {
        Some("PKIOperation") => reply(state.scep.pki_operation(body.to_vec()).await),
        _ => ApiError::bad_request("POST supports only operation=PKIOperation").into_response(),
    }
}

fn reply(reply: PkiReply) -> Response {
    match reply {
        PkiReply::CertRep(body) => {
            ([(header::CONTENT_TYPE, "application/x-pki-message")], body).into_response()
        }
        PkiReply::Unaddressable(message) => {
            ApiError::new(StatusCode::BAD_REQUEST, "bad_request", message).into_response()
        }
    }
}
