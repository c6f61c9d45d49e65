//! The SCIM error shape (RFC 7644 §3.12): `{"schemas": [...Error], "status": "400",
//! "scimType": "invalidFilter", "detail": "..."}` with `application/scim+json`.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::store::StoreError;

pub const ERROR_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:Error";
pub const CONTENT_TYPE: &str = "application/scim+json";

#[derive(Debug)]
pub struct ScimError {
    pub status: StatusCode,
    /// RFC 7644 table 9 (`invalidFilter`, `uniqueness`, `invalidPath`, …); none for 401/404/412.
    pub scim_type: Option<&'static str>,
    pub detail: String,
}

impl ScimError {
    pub fn new(
        status: StatusCode,
        scim_type: Option<&'static str>,
        detail: impl Into<String>,
    ) -> Self {
        ScimError {
            status,
            scim_type,
            detail: detail.into(),
        }
    }

    pub fn bad(scim_type: &'static str, detail: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, Some(scim_type), detail)
    }

    pub fn invalid_value(detail: impl Into<String>) -> Self {
        Self::bad("invalidValue", detail)
    }

    pub fn invalid_path(detail: impl Into<String>) -> Self {
        Self::bad("invalidPath", detail)
    }

    pub fn invalid_syntax(detail: impl Into<String>) -> Self {
        Self::bad("invalidSyntax", detail)
    }

    pub fn invalid_filter(detail: impl Into<String>) -> Self {
        Self::bad("invalidFilter", detail)
    }

    pub fn not_found(what: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, None, format!("no such {what}"))
    }

    pub fn uniqueness(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, Some("uniqueness"), detail)
    }

    pub fn precondition_failed() -> Self {
        Self::new(
            StatusCode::PRECONDITION_FAILED,
            None,
            "the resource changed since that version (If-Match); read it again",
        )
    }

    pub fn too_large(detail: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, Some("tooMany"), detail)
    }

    pub fn unauthorized() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            None,
            "a SCIM client token is required: 'Authorization: Bearer <token>' \
             (create one with 'trustbroker scim-client create --provider NAME')",
        )
    }

    /// An internal failure: the cause goes to the log, the client gets a generic message.
    pub fn internal(cause: &dyn std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "SCIM internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            None,
            "internal error; the server log has the details",
        )
    }
}

impl From<StoreError> for ScimError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Conflict(message) => Self::uniqueness(message),
            StoreError::NotFound => Self::not_found("resource"),
            other => Self::internal(&other),
        }
    }
}

impl IntoResponse for ScimError {
    fn into_response(self) -> Response {
        let mut body = json!({
            "schemas": [ERROR_SCHEMA],
            "status": self.status.as_u16().to_string(),
            "detail": self.detail,
        });
        if let (Some(scim_type), Some(map)) = (self.scim_type, body.as_object_mut()) {
            map.insert("scimType".into(), scim_type.into());
        }
        let mut response = (self.status, body.to_string()).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        if self.status == StatusCode::UNAUTHORIZED {
            headers.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"trustbroker-scim\""),
            );
        }
        response
    }
}

/// Middleware for `/scim/v2`: an error response that is not already SCIM-shaped (a rejection
/// by a layer or an extractor: 405, 408, 413) is rewritten into the SCIM error shape.
pub async fn scim_error_bodies(response: Response) -> Response {
    let status = response.status();
    let is_scim = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with(CONTENT_TYPE));
    if !(status.is_client_error() || status.is_server_error()) || is_scim {
        return response;
    }
    let scim_type = match status {
        StatusCode::PAYLOAD_TOO_LARGE => Some("tooMany"),
        s if s.is_client_error() => Some("invalidSyntax"),
        _ => None,
    };
    let detail = match status {
        StatusCode::PAYLOAD_TOO_LARGE => "the request body is larger than this server accepts",
        StatusCode::METHOD_NOT_ALLOWED => "this SCIM endpoint does not accept that HTTP method",
        StatusCode::REQUEST_TIMEOUT => "the request took too long and was abandoned",
        StatusCode::NOT_FOUND => "no such SCIM endpoint",
        _ => "the request was refused",
    };
    let scim_type = if status == StatusCode::NOT_FOUND {
        None
    } else {
        scim_type
    };
    ScimError::new(status, scim_type, detail).into_response()
}
