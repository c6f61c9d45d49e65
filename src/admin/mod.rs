//! The admin REST API under `/api/v1`: keys and scopes, the audit log.
//! Owns authentication of admin callers; reaches storage only through services.

pub mod auth;
pub mod keys;
pub mod mdm;
pub mod pki;
pub mod policies;
pub mod scim_clients;
pub mod scope;
pub mod signing_keys;
pub mod tokens;
pub mod users;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::audit::{OUTCOME_FAILURE, OUTCOME_SUCCESS};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::store::AuditQuery;
use auth::Admin;

/// The admin API's routes, each registered from its handler's OpenAPI annotation
/// (`http::openapi`), so no route can be added here without being documented.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(whoami))
        .routes(routes!(list_audit))
        .routes(routes!(list_keys, create_key))
        .routes(routes!(revoke_key))
        .merge(pki::router())
        .merge(mdm::router())
        .merge(users::router())
        .merge(policies::router())
        .merge(signing_keys::router())
        .merge(tokens::router())
        .merge(scim_clients::router())
}

/// The key this request was made with: its id, name and scopes.
#[utoipa::path(get, path = "/whoami", tag = "admin", security(("admin_key" = [])),
    responses((status = 200, description = "The calling key.", body = WhoAmI)))]
async fn whoami(admin: Admin<auth::AnyKey>) -> Json<WhoAmI> {
    Json(WhoAmI {
        id: admin.principal.key_id,
        name: admin.principal.name,
        scopes: admin.principal.scopes.iter().map(|s| s.as_str()).collect(),
    })
}

/// The calling key.
#[derive(Serialize, ToSchema)]
struct WhoAmI {
    id: String,
    name: String,
    scopes: Vec<&'static str>,
}

/// The admin keys.
#[derive(Serialize, ToSchema)]
#[schema(as = AdminKeyList)]
struct KeyList {
    keys: Vec<keys::KeySummary>,
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct AuditParams {
    /// Entries per page, 1 to 1000 (default 100).
    limit: Option<u32>,
    /// Only entries older than this id (the previous page's `next_before`).
    before: Option<i64>,
    /// Only this actor (`key:NAME`, `user:…`, …).
    actor: Option<String>,
    /// Only this action (`admin-key.create`, …).
    action: Option<String>,
    /// Only this outcome: `success`, `failure` or `denied`.
    outcome: Option<String>,
}

const AUDIT_PAGE_DEFAULT: u32 = 100;
const AUDIT_PAGE_MAX: u32 = 1000;

/// The audit log, newest first, a page at a time.
#[utoipa::path(get, path = "/audit", tag = "admin", security(("admin_key" = ["audit:read"])),
    params(AuditParams),
    responses((status = 200, description = "`{entries, next_before}`; `next_before` is null on the last page.", body = Object)))]
async fn list_audit(
    _admin: Admin<auth::AuditRead>,
    State(state): State<AppState>,
    Query(params): Query<AuditParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = params.limit.unwrap_or(AUDIT_PAGE_DEFAULT);
    if !(1..=AUDIT_PAGE_MAX).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be between 1 and {AUDIT_PAGE_MAX}"
        )));
    }
    let entries = state
        .store
        .list_audit(&AuditQuery {
            actor: params.actor,
            action: params.action,
            outcome: params.outcome,
            before: params.before,
            limit,
        })
        .await?;
    // A full page may have a successor; its cursor is the last id shown.
    let next_before = (entries.len() == limit as usize)
        .then(|| entries.last().map(|e| e.id))
        .flatten();
    Ok(Json(
        json!({"entries": entries, "next_before": next_before}),
    ))
}

/// Admin keys (never their secrets).
#[utoipa::path(get, path = "/admin-keys", tag = "admin", security(("admin_key" = ["admin-keys:read"])),
    responses((status = 200, description = "Every key, revoked ones too.", body = KeyList)))]
async fn list_keys(
    _admin: Admin<auth::AdminKeysRead>,
    State(state): State<AppState>,
) -> Result<Json<KeyList>, ApiError> {
    let keys = keys::list(&state.store).await?;
    Ok(Json(KeyList { keys }))
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    name: String,
    #[serde(default)]
    scopes: Vec<String>,
}

/// Creates an admin key; the key itself is in this answer only. A key cannot grant a scope it
/// does not hold. Audited.
#[utoipa::path(post, path = "/admin-keys", tag = "admin", security(("admin_key" = ["admin-keys:write"])),
    request_body = CreateKey,
    responses(
        (status = 201, description = "The new key, shown once.", body = keys::IssuedKey),
        (status = 403, description = "The key lacks `admin-keys:write`, or a scope it asked to grant.", body = crate::http::openapi::ErrorBody),
        (status = 409, description = "A key of that name exists.", body = crate::http::openapi::ErrorBody),
        (status = 422, description = "Invalid name or unknown scope.", body = crate::http::openapi::ErrorBody),
    ))]
async fn create_key(
    admin: Admin<auth::AdminKeysWrite>,
    State(state): State<AppState>,
    Json(body): Json<CreateKey>,
) -> Result<(StatusCode, Json<keys::IssuedKey>), ApiError> {
    let action = "admin-key.create";
    let result = async {
        keys::validate_name(&body.name)?;
        let scopes = keys::parse_scopes(&body.scopes)?;
        // A key cannot mint a key more powerful than itself.
        if let Some(missing) = scopes
            .iter()
            .find(|s| !s.is_granted_by(&admin.principal.scopes))
        {
            return Err(ApiError::forbidden(format!(
                "a key cannot grant the scope '{missing}', which it does not hold itself"
            )));
        }
        Ok(keys::create(&state.store, &body.name, &scopes, &admin.principal.actor()).await?)
    }
    .await;
    match result {
        Ok(issued) => {
            let detail = json!({"id": issued.id, "scopes": issued.scopes});
            admin
                .audit(
                    &state,
                    action,
                    Some(&body.name),
                    OUTCOME_SUCCESS,
                    Some(detail),
                )
                .await;
            Ok((StatusCode::CREATED, Json(issued)))
        }
        Err(err) => {
            let detail = json!({"error": err.message});
            admin
                .audit(
                    &state,
                    action,
                    Some(&body.name),
                    OUTCOME_FAILURE,
                    Some(detail),
                )
                .await;
            Err(err)
        }
    }
}

/// Revokes an admin key by name. Audited.
#[utoipa::path(delete, path = "/admin-keys/{name}", tag = "admin", security(("admin_key" = ["admin-keys:write"])),
    params(("name" = String, Path, description = "The key's name.")),
    responses(
        (status = 200, description = "`{revoked: {id, name}}`", body = Object),
        (status = 404, description = "No such key.", body = crate::http::openapi::ErrorBody),
    ))]
async fn revoke_key(
    admin: Admin<auth::AdminKeysWrite>,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let action = "admin-key.revoke";
    match keys::revoke(&state.store, &name).await {
        Ok(id) => {
            let detail = json!({"id": id});
            admin
                .audit(&state, action, Some(&name), OUTCOME_SUCCESS, Some(detail))
                .await;
            Ok(Json(json!({"revoked": {"id": id, "name": name}})))
        }
        Err(err) => {
            let err = ApiError::from(err);
            let detail = json!({"error": err.message});
            admin
                .audit(&state, action, Some(&name), OUTCOME_FAILURE, Some(detail))
                .await;
            Err(err)
        }
    }
}

/// The `limit` of a listing: 1 to 1000, 100 when not given.
pub(crate) fn page_limit(limit: Option<u32>) -> Result<u32, ApiError> {
    let limit = limit.unwrap_or(100);
    if (1..=1000).contains(&limit) {
        Ok(limit)
    } else {
        Err(ApiError::bad_request("limit must be between 1 and 1000"))
    }
}
