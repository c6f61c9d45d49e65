//! People who signed in at the enrollment portal: `GET /users`, `GET /users/{id}` (groups with
//! where and when each was seen, and enrolled devices), `GET /groups`.

use axum::Json;
use axum::extract::{Path, Query, State};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{self, Admin};
use crate::http::AppState;
use crate::http::error::ApiError;

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(list_users))
        .routes(routes!(show_user))
        .routes(routes!(list_groups))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// The previous page's `next_after` (a user ID).
    after: Option<String>,
    /// People per page, 1 to 1000 (default 100).
    limit: Option<u32>,
}

/// People known to the broker, a page at a time.
#[utoipa::path(get, path = "/users", tag = "directory", security(("admin_key" = ["users:read"])),
    params(ListParams),
    responses((status = 200, description = "`{users: [...], next_after}`", body = Object)))]
async fn list_users(
    _admin: Admin<auth::UsersRead>,
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = super::page_limit(params.limit)?;
    let users = state
        .store
        .list_users(params.after.as_deref(), i64::from(limit))
        .await?;
    let next_after = (users.len() == limit as usize)
        .then(|| users.last().map(|u| u.id.clone()))
        .flatten();
    Ok(Json(json!({"users": users, "next_after": next_after})))
}

/// One person, with their groups (where and when each was seen) and enrolled devices.
#[utoipa::path(get, path = "/users/{id}", tag = "directory", security(("admin_key" = ["users:read"])),
    params(("id" = String, Path, description = "The user's ID.")),
    responses(
        (status = 200, description = "The user with `groups` and `devices`.", body = Object),
        (status = 404, description = "No user with that ID.", body = crate::http::openapi::ErrorBody),
    ))]
async fn show_user(
    _admin: Admin<auth::UsersRead>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let user = state
        .store
        .user(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("no user with that ID"))?;
    let groups = state.store.memberships(&id).await?;
    let devices = state.store.devices_of(&id).await?;
    let mut view = serde_json::to_value(&user).map_err(|e| ApiError::internal(&e))?;
    if let Some(object) = view.as_object_mut() {
        object.insert("groups".into(), json!(groups));
        object.insert("devices".into(), json!(devices));
    }
    Ok(Json(view))
}

/// Every group seen, with its member count.
#[utoipa::path(get, path = "/groups", tag = "directory", security(("admin_key" = ["users:read"])),
    responses((status = 200, description = "`{groups: [...]}`", body = Object)))]
async fn list_groups(
    _admin: Admin<auth::UsersRead>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"groups": state.store.list_groups().await?})))
}
