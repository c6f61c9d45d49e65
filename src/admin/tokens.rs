//! Admin API for app-config tokens: integrations (`/token-integrations`), their shared tokens
//! (create or import, rotate, revoke, reveal) and app clients. Every change and every reveal
//! is audited; values appear only in the answer that creates them and in a reveal.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{self, Admin};
use crate::audit::{OUTCOME_FAILURE, OUTCOME_SUCCESS};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::store::{AppClientRecord, IntegrationChanges, IntegrationDeletion};
use crate::tokens::shared::{
    CreatedToken, IntegrationRequest, IntegrationView, IssuedClient, Rotation, TokenError,
    TokenRequest, TokenView,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(list_integrations, create_integration))
        .routes(routes!(
            show_integration,
            update_integration,
            delete_integration
        ))
        .routes(routes!(list_tokens, create_token))
        .routes(routes!(rotate))
        .routes(routes!(show_token))
        .routes(routes!(reveal))
        .routes(routes!(revoke))
        .routes(routes!(list_clients, create_client))
        .routes(routes!(revoke_client))
}

impl From<TokenError> for ApiError {
    fn from(err: TokenError) -> Self {
        match err {
            TokenError::Invalid(message) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_request", message)
            }
            TokenError::NotFound(message) => ApiError::not_found(message),
            TokenError::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", message)
            }
            TokenError::LastActiveToken { .. } => {
                ApiError::new(StatusCode::CONFLICT, "last_active_token", err.to_string())
            }
            TokenError::IntegrationInUse { .. } => {
                ApiError::new(StatusCode::CONFLICT, "integration_in_use", err.to_string())
            }
            TokenError::Seal(e) => ApiError::internal(&e),
            TokenError::Store(e) => e.into(),
        }
    }
}

/// Who acts on tokens, for the audit record: an API key ([`Admin`]) or an admin signed in at
/// the console (`console::SignedIn`). Both go through the operations below, so the rules (in
/// the token service) and the audit records (here) are the same whichever door was used.
pub(crate) trait TokenActor {
    fn actor(&self) -> String;
    async fn audit(
        &self,
        state: &AppState,
        action: &str,
        target: Option<&str>,
        outcome: &str,
        detail: Option<Value>,
    );
}

impl<S: auth::Required> TokenActor for Admin<S> {
    fn actor(&self) -> String {
        self.principal.actor()
    }

    async fn audit(
        &self,
        state: &AppState,
        action: &str,
        target: Option<&str>,
        outcome: &str,
        detail: Option<Value>,
    ) {
        Admin::audit(self, state, action, target, outcome, detail).await;
    }
}

/// Audits an action's outcome (success with `detail`, failure with the error) and maps it.
async fn audited<A: TokenActor, T>(
    by: &A,
    state: &AppState,
    action: &str,
    target: &str,
    result: Result<T, TokenError>,
    detail: impl FnOnce(&T) -> Value,
) -> Result<T, ApiError> {
    match result {
        Ok(done) => {
            let detail = detail(&done);
            by.audit(state, action, Some(target), OUTCOME_SUCCESS, Some(detail))
                .await;
            Ok(done)
        }
        Err(err) => {
            let err = ApiError::from(err);
            let detail = json!({"error": err.message});
            by.audit(state, action, Some(target), OUTCOME_FAILURE, Some(detail))
                .await;
            Err(err)
        }
    }
}

// ---- the audited operations the API and the console share ----

/// Creates an integration (`token-integration.create`).
pub(crate) async fn create_integration_as<A: TokenActor>(
    by: &A,
    state: &AppState,
    request: IntegrationRequest,
) -> Result<IntegrationView, ApiError> {
    let name = request.name.clone();
    let result = state.tokens.create_integration(request, &by.actor()).await;
    audited(by, state, "token-integration.create", &name, result, |i| {
        json!({"bundle_id": i.integration.bundle_id, "config_key": i.integration.config_key,
               "device_tokens": i.integration.device_tokens})
    })
    .await
}

/// Creates a token: generated (`token.create`), or imported when `request.value` is given
/// (`token.import`). The value is in the answer only when generated.
pub(crate) async fn create_token_as<A: TokenActor>(
    by: &A,
    state: &AppState,
    name: &str,
    request: TokenRequest,
) -> Result<CreatedToken, ApiError> {
    let action = token_action(&request);
    let result = state.tokens.create_token(name, request, &by.actor()).await;
    audited(by, state, action, name, result, |c| {
        json!({"id": c.token.id, "label": c.token.label, "last4": c.token.last4,
               "not_before": c.token.not_before, "expires_at": c.token.expires_at})
    })
    .await
}

/// How a token's creation is audited: `token.import` for a value given, else `token.create`.
pub(crate) fn token_action(request: &TokenRequest) -> &'static str {
    if request.value.is_some() {
        "token.import"
    } else {
        "token.create"
    }
}

/// Rotates an integration's current token (`token.rotate`).
pub(crate) async fn rotate_as<A: TokenActor>(
    by: &A,
    state: &AppState,
    name: &str,
    label: Option<String>,
    value: Option<String>,
) -> Result<Rotation, ApiError> {
    let result = state.tokens.rotate(name, label, value, &by.actor()).await;
    audited(by, state, "token.rotate", name, result, |r| {
        json!({"id": r.created.token.id, "source": r.created.token.source,
               "last4": r.created.token.last4,
               "previous": r.previous.as_ref().map(|p| json!({"id": p.id, "expires_at": p.expires_at}))})
    })
    .await
}

/// Revokes a token (`token.revoke`); the last active one of a delivered integration only
/// with `force`.
pub(crate) async fn revoke_as<A: TokenActor>(
    by: &A,
    state: &AppState,
    name: &str,
    id: &str,
    force: bool,
) -> Result<TokenView, ApiError> {
    let result = state.tokens.revoke(name, id, force, &by.actor()).await;
    let target = format!("{name}/{id}");
    audited(
        by,
        state,
        "token.revoke",
        &target,
        result,
        |_| json!({"force": force}),
    )
    .await
}

/// A token's value (`token.reveal`, scope `tokens:reveal`, checked by the caller).
pub(crate) async fn reveal_as<A: TokenActor>(
    by: &A,
    state: &AppState,
    name: &str,
    id: &str,
) -> Result<String, ApiError> {
    let result = state.tokens.reveal(name, id).await;
    let target = format!("{name}/{id}");
    audited(by, state, "token.reveal", &target, result, |_| json!({})).await
}

/// Issues an app client (`app-client.create`); its secret is in the answer only.
pub(crate) async fn create_client_as<A: TokenActor>(
    by: &A,
    state: &AppState,
    name: &str,
    client_name: Option<String>,
) -> Result<IssuedClient, ApiError> {
    let result = state
        .tokens
        .create_client(name, client_name, &by.actor())
        .await;
    audited(
        by,
        state,
        "app-client.create",
        name,
        result,
        |c| json!({"id": c.client.id, "name": c.client.name}),
    )
    .await
}

/// Revokes an app client (`app-client.revoke`).
pub(crate) async fn revoke_client_as<A: TokenActor>(
    by: &A,
    state: &AppState,
    name: &str,
    id: &str,
) -> Result<AppClientRecord, ApiError> {
    let result = state.tokens.revoke_client(name, id, &by.actor()).await;
    let target = format!("{name}/{id}");
    audited(
        by,
        state,
        "app-client.revoke",
        &target,
        result,
        |c| json!({"name": c.name}),
    )
    .await
}

/// A JSON answer that carries a secret: never cached.
fn secret_answer(status: StatusCode, body: Value) -> Response {
    let mut response = (status, Json(body)).into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A JSON body that may be left out (an empty body reads as `{}`).
fn optional_body<T: DeserializeOwned + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            format!("the body is not the expected JSON: {e}"),
        )
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> Result<Value, ApiError> {
    serde_json::to_value(value).map_err(|e| ApiError::internal(&e))
}

// ---- integrations ----

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateIntegration {
    name: String,
    display_name: Option<String>,
    bundle_id: String,
    config_key: String,
    #[serde(default)]
    device_tokens: bool,
    overlap_secs: Option<i64>,
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct UpdateIntegration {
    display_name: Option<String>,
    bundle_id: Option<String>,
    config_key: Option<String>,
    device_tokens: Option<bool>,
    overlap_secs: Option<i64>,
}

/// Token integrations (one per managed app and configuration key).
#[utoipa::path(get, path = "/token-integrations", tag = "tokens", security(("admin_key" = ["tokens:read"])),
    responses((status = 200, description = "`{integrations: [...]}`", body = Object)))]
async fn list_integrations(
    _admin: Admin<auth::TokensRead>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let integrations = state.tokens.integrations().await?;
    Ok(Json(json!({"integrations": integrations})))
}

/// One integration.
#[utoipa::path(get, path = "/token-integrations/{name}", tag = "tokens", security(("admin_key" = ["tokens:read"])),
    params(("name" = String, Path, description = "The integration's name.")),
    responses((status = 200, description = "The integration.", body = Object), (status = 404, description = "No such integration (or token, or client).", body = crate::http::openapi::ErrorBody)))]
async fn show_integration(
    _admin: Admin<auth::TokensRead>,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(to_json(&state.tokens.integration(&name).await?)?))
}

/// Creates an integration. Audited.
#[utoipa::path(post, path = "/token-integrations", tag = "tokens", security(("admin_key" = ["tokens:write"])),
    request_body = CreateIntegration,
    responses(
        (status = 201, description = "The new integration.", body = Object),
        (status = 409, description = "An integration of that name exists.", body = crate::http::openapi::ErrorBody),
        (status = 422, description = "An invalid field.", body = crate::http::openapi::ErrorBody),
    ))]
async fn create_integration(
    admin: Admin<auth::TokensWrite>,
    State(state): State<AppState>,
    Json(body): Json<CreateIntegration>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let request = IntegrationRequest {
        name: body.name,
        display_name: body.display_name,
        bundle_id: body.bundle_id,
        config_key: body.config_key,
        device_tokens: body.device_tokens,
        overlap_secs: body.overlap_secs,
    };
    let created = create_integration_as(&admin, &state, request).await?;
    Ok((StatusCode::CREATED, Json(to_json(&created)?)))
}

/// Changes an integration's fields (those given). Audited.
#[utoipa::path(patch, path = "/token-integrations/{name}", tag = "tokens", security(("admin_key" = ["tokens:write"])),
    params(("name" = String, Path, description = "The integration's name.")),
    request_body = UpdateIntegration,
    responses(
        (status = 200, description = "The integration as changed.", body = Object),
        (status = 404, description = "No such integration (or token, or client).", body = crate::http::openapi::ErrorBody),
        (status = 422, description = "An invalid field.", body = crate::http::openapi::ErrorBody),
    ))]
async fn update_integration(
    admin: Admin<auth::TokensWrite>,
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: UpdateIntegration = optional_body(&body)?;
    let detail = json!({
        "display_name": body.display_name, "bundle_id": body.bundle_id,
        "config_key": body.config_key, "device_tokens": body.device_tokens,
        "overlap_secs": body.overlap_secs,
    });
    let changes = IntegrationChanges {
        display_name: body.display_name,
        bundle_id: body.bundle_id,
        config_key: body.config_key,
        device_tokens: body.device_tokens,
        overlap_secs: body.overlap_secs,
    };
    let result = state.tokens.update_integration(&name, changes).await;
    let updated = audited(
        &admin,
        &state,
        "token-integration.update",
        &name,
        result,
        |_| detail,
    )
    .await?;
    Ok(Json(to_json(&updated)?))
}

/// `DELETE /token-integrations/{name}` (body `{"force": true}` or `?force=true`).
/// Deletes an integration, revoking its tokens, app clients and device tokens. Refused while
/// the applied policies deliver it or it has an active token, unless `force`. Audited.
#[utoipa::path(delete, path = "/token-integrations/{name}", tag = "tokens", security(("admin_key" = ["tokens:write"])),
    params(("name" = String, Path, description = "The integration's name."), ForceQuery),
    request_body(content = Option<RevokeBody>, description = "Optional: `{\"force\": true}`, as the query parameter."),
    responses(
        (status = 200, description = "What was deleted and revoked.", body = Object),
        (status = 404, description = "No such integration (or token, or client).", body = crate::http::openapi::ErrorBody),
        (status = 409, description = "In use (`integration_in_use`): delivered by the applied policies or with an active token.", body = crate::http::openapi::ErrorBody),
    ))]
async fn delete_integration(
    admin: Admin<auth::TokensWrite>,
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(query): Query<ForceQuery>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: RevokeBody = optional_body(&body)?;
    let force = body.force || query.force;
    let actor = admin.principal.actor();
    let result = state.tokens.delete_integration(&name, force, &actor).await;
    let deleted = audited(
        &admin,
        &state,
        "token-integration.delete",
        &name,
        result,
        |d| json!({"force": force, "revoked": deletion_counts(d)}),
    )
    .await?;
    Ok(Json(
        json!({"integration": name, "deleted": true, "revoked": deletion_counts(&deleted)}),
    ))
}

fn deletion_counts(deletion: &IntegrationDeletion) -> Value {
    match deletion {
        IntegrationDeletion::Deleted {
            tokens_revoked,
            clients_revoked,
            device_tokens_revoked,
        } => json!({"tokens": tokens_revoked, "app_clients": clients_revoked,
                    "device_tokens": device_tokens_revoked}),
        _ => Value::Null,
    }
}

#[derive(Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ForceQuery {
    /// Delete even while in use.
    #[serde(default)]
    force: bool,
}

// ---- tokens ----

#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreateToken)]
struct CreateToken {
    label: Option<String>,
    /// An imported value; without it, the broker generates one.
    value: Option<String>,
    not_before: Option<DateTime<Utc>>,
    expires_at: Option<DateTime<Utc>>,
}

#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RotateTokens)]
struct RotateBody {
    label: Option<String>,
    value: Option<String>,
}

#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RevokeToken)]
struct RevokeBody {
    /// Revoke even the last active token of an integration the policies deliver.
    #[serde(default)]
    force: bool,
}

/// An integration's tokens (their last four characters, never values).
#[utoipa::path(get, path = "/token-integrations/{name}/tokens", tag = "tokens", security(("admin_key" = ["tokens:read"])),
    params(("name" = String, Path, description = "The integration's name.")),
    responses((status = 200, description = "`{integration, tokens: [...]}`", body = Object), (status = 404, description = "No such integration (or token, or client).", body = crate::http::openapi::ErrorBody)))]
async fn list_tokens(
    _admin: Admin<auth::TokensRead>,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let tokens = state.tokens.tokens(&name).await?;
    Ok(Json(json!({"integration": name, "tokens": tokens})))
}

/// One token (without its value).
#[utoipa::path(get, path = "/token-integrations/{name}/tokens/{id}", tag = "tokens", security(("admin_key" = ["tokens:read"])),
    params(("name" = String, Path, description = "The integration's name."), ("id" = String, Path, description = "The token's ID.")),
    responses((status = 200, description = "The token.", body = Object), (status = 404, description = "No such integration (or token, or client).", body = crate::http::openapi::ErrorBody)))]
async fn show_token(
    _admin: Admin<auth::TokensRead>,
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(to_json(&state.tokens.token(&name, &id).await?)?))
}

/// Creates (or imports, with `value`) a token; its value is in this answer (`no-store`).
/// Audited.
#[utoipa::path(post, path = "/token-integrations/{name}/tokens", tag = "tokens", security(("admin_key" = ["tokens:write"])),
    params(("name" = String, Path, description = "The integration's name.")),
    request_body(content = Option<CreateToken>, description = "Optional; empty generates a token active now."),
    responses(
        (status = 201, description = "The token with its value.", body = Object),
        (status = 404, description = "No such integration (or token, or client).", body = crate::http::openapi::ErrorBody),
        (status = 422, description = "An invalid value or window.", body = crate::http::openapi::ErrorBody),
    ))]
async fn create_token(
    admin: Admin<auth::TokensWrite>,
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: CreateToken = optional_body(&body)?;
    let request = TokenRequest {
        label: body.label,
        value: body.value,
        not_before: body.not_before,
        expires_at: body.expires_at,
    };
    let created = create_token_as(&admin, &state, &name, request).await?;
    Ok(secret_answer(StatusCode::CREATED, to_json(&created)?))
}

/// Rotates: a new token, the current ones expiring after the integration's overlap; devices
/// get the new value. The value is in this answer (`no-store`). Audited.
#[utoipa::path(post, path = "/token-integrations/{name}/tokens/rotate", operation_id = "rotate_tokens", tag = "tokens", security(("admin_key" = ["tokens:write"])),
    params(("name" = String, Path, description = "The integration's name.")),
    request_body(content = Option<RotateBody>),
    responses(
        (status = 201, description = "The new token (with its value) and the ones it replaces.", body = Object),
        (status = 404, description = "No such integration (or token, or client).", body = crate::http::openapi::ErrorBody),
        (status = 422, description = "An invalid value.", body = crate::http::openapi::ErrorBody),
    ))]
async fn rotate(
    admin: Admin<auth::TokensWrite>,
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: RotateBody = optional_body(&body)?;
    let rotation = rotate_as(&admin, &state, &name, body.label, body.value).await?;
    Ok(secret_answer(StatusCode::CREATED, to_json(&rotation)?))
}

/// Revokes a token at once, on every node. Audited.
#[utoipa::path(post, path = "/token-integrations/{name}/tokens/{id}/revoke", operation_id = "revoke_token", tag = "tokens", security(("admin_key" = ["tokens:write"])),
    params(("name" = String, Path, description = "The integration's name."), ("id" = String, Path, description = "The token's ID.")),
    request_body(content = Option<RevokeBody>),
    responses(
        (status = 200, description = "The revoked token.", body = Object),
        (status = 404, description = "No such integration (or token, or client).", body = crate::http::openapi::ErrorBody),
        (status = 409, description = "The last active token of a delivered integration (`last_active_token`); use `force`.", body = crate::http::openapi::ErrorBody),
    ))]
async fn revoke(
    admin: Admin<auth::TokensWrite>,
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
    body: Bytes,
) -> Result<Json<Value>, ApiError> {
    let body: RevokeBody = optional_body(&body)?;
    let revoked = revoke_as(&admin, &state, &name, &id, body.force).await?;
    Ok(Json(to_json(&revoked)?))
}

/// A token's value (`no-store`). Audited.
#[utoipa::path(get, path = "/token-integrations/{name}/tokens/{id}/reveal", operation_id = "reveal_token", tag = "tokens", security(("admin_key" = ["tokens:reveal"])),
    params(("name" = String, Path, description = "The integration's name."), ("id" = String, Path, description = "The token's ID.")),
    responses((status = 200, description = "`{id, integration, value}`", body = Object), (status = 404, description = "No such integration (or token, or client).", body = crate::http::openapi::ErrorBody)))]
async fn reveal(
    admin: Admin<auth::TokensReveal>,
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let value = reveal_as(&admin, &state, &name, &id).await?;
    Ok(secret_answer(
        StatusCode::OK,
        json!({"id": id, "integration": name, "value": value}),
    ))
}

// ---- app clients ----

#[derive(Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = CreateAppClient)]
struct CreateClient {
    name: Option<String>,
}

/// An integration's app clients (never their secrets).
#[utoipa::path(get, path = "/token-integrations/{name}/clients", tag = "tokens", security(("admin_key" = ["tokens:read"])),
    params(("name" = String, Path, description = "The integration's name.")),
    responses((status = 200, description = "`{integration, clients: [...]}`", body = Object), (status = 404, description = "No such integration (or token, or client).", body = crate::http::openapi::ErrorBody)))]
async fn list_clients(
    _admin: Admin<auth::TokensRead>,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let clients = state.tokens.clients(&name).await?;
    Ok(Json(json!({"integration": name, "clients": clients})))
}

/// Creates an app client; its secret is in this answer only (`no-store`). Audited.
#[utoipa::path(post, path = "/token-integrations/{name}/clients", tag = "tokens", security(("admin_key" = ["tokens:write"])),
    params(("name" = String, Path, description = "The integration's name.")),
    request_body(content = Option<CreateClient>),
    responses(
        (status = 201, description = "`{id, name, integration, secret}`", body = Object),
        (status = 404, description = "No such integration (or token, or client).", body = crate::http::openapi::ErrorBody),
        (status = 422, description = "An invalid name.", body = crate::http::openapi::ErrorBody),
    ))]
async fn create_client(
    admin: Admin<auth::TokensWrite>,
    State(state): State<AppState>,
    Path(name): Path<String>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let body: CreateClient = optional_body(&body)?;
    let issued = create_client_as(&admin, &state, &name, body.name).await?;
    Ok(secret_answer(StatusCode::CREATED, to_json(&issued)?))
}

/// Revokes an app client. Audited.
#[utoipa::path(post, path = "/token-integrations/{name}/clients/{id}/revoke", tag = "tokens", security(("admin_key" = ["tokens:write"])),
    params(("name" = String, Path, description = "The integration's name."), ("id" = String, Path, description = "The app client's ID.")),
    responses((status = 200, description = "The revoked client.", body = Object), (status = 404, description = "No such integration (or token, or client).", body = crate::http::openapi::ErrorBody)))]
async fn revoke_client(
    admin: Admin<auth::TokensWrite>,
    State(state): State<AppState>,
    Path((name, id)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    let revoked = revoke_client_as(&admin, &state, &name, &id).await?;
    Ok(Json(to_json(&revoked)?))
}
