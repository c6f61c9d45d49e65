//! People who signed in at the enrollment portal: `GET /users`, `GET /users/{id}` (groups with
//! where and when each was seen, and enrolled devices), `GET /groups`.

use axum::extract::{Path, Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::auth::{self, Admin};
use crate::http::AppState;
use crate::http::error::ApiError;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/users", get(list_users))
        .route("/users/{id}", get(show_user))
        .route("/groups", get(list_groups))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListParams {
    after: Option<String>,
    limit: Option<u32>,
}

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

async fn list_groups(
    _admin: Admin<auth::UsersRead>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(json!({"groups": state.store.list_groups().await?})))
}
