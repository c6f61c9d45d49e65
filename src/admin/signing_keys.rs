//! The signing keys of per-device tokens: list them, rotate them
//! (`/api/v1/token-signing-keys`, scopes `tokens:read` and `tokens:write`).

use axum::Json;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{self, Admin};
use crate::audit::{OUTCOME_FAILURE, OUTCOME_SUCCESS};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::store::StoreError;
use crate::tokens::device::DeviceTokenError;

/// The audit action of a rotation (API and command line).
pub const AUDIT_ROTATE: &str = "token-signing-key.rotate";

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(list))
        .routes(routes!(rotate))
}

/// The keys that sign per-device tokens (public parts and states only).
#[utoipa::path(get, path = "/token-signing-keys", operation_id = "list_token_signing_keys", tag = "tokens", security(("admin_key" = ["tokens:read"])),
    responses((status = 200, description = "`{keys: [...]}`", body = Object)))]
async fn list(
    _admin: Admin<auth::TokensRead>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let keys = state
        .device_tokens
        .signing_keys()
        .await
        .map_err(api_error)?;
    Ok(Json(json!({"keys": keys})))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RotateSigningKey)]
struct RotateRequest {
    /// Rotate even if the next key was published moments ago (after a key compromise).
    #[serde(default)]
    force: bool,
}

/// Rotates the signing key: the published next key becomes current, a new next key is
/// published. The body is optional. Audited.
#[utoipa::path(post, path = "/token-signing-keys/rotate", operation_id = "rotate_token_signing_key", tag = "tokens", security(("admin_key" = ["tokens:write"])),
    request_body(content = Option<RotateRequest>),
    responses(
        (status = 200, description = "`{rotation: {current, next, retired}}`", body = Object),
        (status = 409, description = "The next key was published too recently for verifiers to have it (use `force`).", body = crate::http::openapi::ErrorBody),
    ))]
async fn rotate(
    admin: Admin<auth::TokensWrite>,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    // The body is optional: `{}` or nothing rotates without force.
    let request: RotateRequest = if body.iter().all(u8::is_ascii_whitespace) {
        RotateRequest::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?
    };
    match state.device_tokens.rotate(request.force).await {
        Ok(rotation) => {
            let detail = json!({"rotation": rotation, "force": request.force});
            admin
                .audit(
                    &state,
                    AUDIT_ROTATE,
                    Some(&rotation.current),
                    OUTCOME_SUCCESS,
                    Some(detail),
                )
                .await;
            Ok(Json(json!({"rotation": rotation})))
        }
        Err(e) => {
            let detail = json!({"error": e.to_string(), "force": request.force});
            admin
                .audit(&state, AUDIT_ROTATE, None, OUTCOME_FAILURE, Some(detail))
                .await;
            Err(api_error(e))
        }
    }
}

fn api_error(err: DeviceTokenError) -> ApiError {
    match err {
        DeviceTokenError::NextKeyTooNew { .. } => {
            ApiError::new(StatusCode::CONFLICT, "conflict", err.to_string())
        }
        DeviceTokenError::Store(StoreError::Conflict(message)) => {
            ApiError::new(StatusCode::CONFLICT, "conflict", message)
        }
        DeviceTokenError::Invalid(_) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            err.to_string(),
        ),
        other => ApiError::internal(&other),
    }
}
