//! Admin API for SCIM clients (`/scim-clients`, scope `scim:admin`): an identity provider's
//! credential for `/scim/v2`. The same operations as `trustbroker scim-client`, audited the
//! same way; the token appears only in the answer that creates it.

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{self, Admin};
use crate::audit::{OUTCOME_FAILURE, OUTCOME_SUCCESS};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::scim::auth::{self as scim_auth, ClientError};
use crate::store::ScimClientRecord;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(list, create))
        .routes(routes!(revoke))
}

impl From<ClientError> for ApiError {
    fn from(err: ClientError) -> Self {
        match err {
            ClientError::InvalidName(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                err.to_string(),
            ),
            ClientError::NotFound(_) => ApiError::not_found(err.to_string()),
            ClientError::Store(e) => e.into(),
        }
    }
}

/// A client as lists show it: never the secret nor its hash.
fn view(client: &ScimClientRecord) -> Value {
    json!({
        "id": client.id,
        "provider": client.provider,
        "name": client.name,
        "status": if client.revoked_at.is_some() { "revoked" } else { "active" },
        "created_at": client.created_at,
        "created_by": client.created_by,
        "last_used_at": client.last_used_at,
        "revoked_at": client.revoked_at,
    })
}

/// SCIM clients of every provider (never their tokens).
#[utoipa::path(get, path = "/scim-clients", operation_id = "list_scim_clients", tag = "scim-clients", security(("admin_key" = ["scim:admin"])),
    responses((status = 200, description = "`{clients: [{id, provider, name, status, created_at, created_by, last_used_at, revoked_at}]}`", body = Object)))]
async fn list(
    _admin: Admin<auth::ScimAdmin>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let clients = state.store.list_scim_clients().await?;
    Ok(Json(
        json!({"clients": clients.iter().map(view).collect::<Vec<_>>()}),
    ))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreateScimClient)]
struct CreateClient {
    /// The identity provider (`[idp.NAME]` in the configuration) the client acts for.
    provider: String,
    /// Defaults to `scim`, as on the command line.
    name: Option<String>,
}

/// Creates a SCIM client; its token is in this answer only (`no-store`). Audited.
#[utoipa::path(post, path = "/scim-clients", operation_id = "create_scim_client", tag = "scim-clients", security(("admin_key" = ["scim:admin"])),
    request_body = CreateClient,
    responses(
        (status = 201, description = "`{id, provider, name, token}`", body = Object),
        (status = 422, description = "Unknown provider or invalid name.", body = crate::http::openapi::ErrorBody),
    ))]
async fn create(
    admin: Admin<auth::ScimAdmin>,
    State(state): State<AppState>,
    Json(body): Json<CreateClient>,
) -> Result<Response, ApiError> {
    let name = body.name.unwrap_or_else(|| "scim".into());
    let result = async {
        // A client of a provider no one configured would provision people no sign-in finds.
        if !state
            .config
            .identity_providers
            .iter()
            .any(|(n, _)| *n == body.provider)
        {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_request",
                format!(
                    "no identity provider '{}' is configured ([idp.{}])",
                    body.provider, body.provider
                ),
            ));
        }
        let actor = admin.principal.actor();
        Ok(scim_auth::create(&state.store, &body.provider, &name, &actor).await?)
    }
    .await;
    match result {
        Ok(issued) => {
            let detail = json!({"id": issued.id, "provider": issued.provider});
            admin
                .audit(
                    &state,
                    "scim-client.create",
                    Some(&name),
                    OUTCOME_SUCCESS,
                    Some(detail),
                )
                .await;
            let mut response = (StatusCode::CREATED, Json(json!(issued))).into_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(response)
        }
        Err(err) => {
            let detail = json!({"provider": body.provider, "error": err.message});
            admin
                .audit(
                    &state,
                    "scim-client.create",
                    Some(&name),
                    OUTCOME_FAILURE,
                    Some(detail),
                )
                .await;
            Err(err)
        }
    }
}

/// Revokes a SCIM client at once. Audited.
#[utoipa::path(post, path = "/scim-clients/{id}/revoke", operation_id = "revoke_scim_client", tag = "scim-clients", security(("admin_key" = ["scim:admin"])),
    params(("id" = String, Path, description = "The client's ID.")),
    responses(
        (status = 200, description = "`{revoked: {...}}`", body = Object),
        (status = 404, description = "No such client.", body = crate::http::openapi::ErrorBody),
    ))]
async fn revoke(
    admin: Admin<auth::ScimAdmin>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    match scim_auth::revoke(&state.store, &id).await {
        Ok(revoked) => {
            let detail = json!({"provider": revoked.provider, "name": revoked.name});
            admin
                .audit(
                    &state,
                    "scim-client.revoke",
                    Some(&id),
                    OUTCOME_SUCCESS,
                    Some(detail),
                )
                .await;
            Ok(Json(view(&revoked)))
        }
        Err(err) => {
            let err = ApiError::from(err);
            let detail = json!({"error": err.message});
            admin
                .audit(
                    &state,
                    "scim-client.revoke",
                    Some(&id),
                    OUTCOME_FAILURE,
                    Some(detail),
                )
                .await;
            Err(err)
        }
    }
}
