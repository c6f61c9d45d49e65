//! `/scim/v2/Users`: the people of the client's provider.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value as Json, json};

use super::auth::ScimClient;
use super::error::ScimError;
use super::{ListQuery, MAX_SCAN, ScimResponse, base, check_version, if_match, parse_body};
use super::{patch, resources};
use crate::http::AppState;
use crate::store::{ScimUserRow, Versioned};

/// Attempts at a read-modify-write before a concurrent writer is reported as a conflict.
const ATTEMPTS: usize = 3;

async fn find(state: &AppState, client: &ScimClient, id: &str) -> Result<ScimUserRow, ScimError> {
    // Another provider's people are not there at all for this client.
    state
        .store
        .scim_user(&client.provider, id)
        .await?
        .ok_or_else(|| ScimError::not_found("user"))
}

/// Users of the calling client's provider, filtered and paged (RFC 7644 §3.4.2).
#[utoipa::path(get, path = "/Users", operation_id = "scim_list_users", tag = "scim", security(("scim_token" = [])), params(ListQuery),
    responses(
        (status = 200, description = "A `ListResponse` of users.", content_type = "application/scim+json", body = Object),
        (status = 400, description = "An invalid filter (`invalidFilter`) or one too broad to evaluate.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
    ))]
pub(super) async fn list(
    client: ScimClient,
    State(state): State<AppState>,
    Query(query): Query<ListQuery>,
) -> Result<ScimResponse, ScimError> {
    let filter = query.filter()?;
    let narrowing = filter
        .as_ref()
        .and_then(|f| f.narrowing(super::filter::Resource::User));
    let rows = state
        .store
        .scim_users(&client.provider, narrowing.as_ref(), MAX_SCAN)
        .await?;
    let base = base(&state);
    let matched: Vec<Json> = rows
        .iter()
        .map(|row| resources::render_user(row, &base))
        .filter(|user| filter.as_ref().is_none_or(|f| f.matches(user)))
        .collect();
    let (skip, count) = query.page();
    Ok(ScimResponse::ok(super::list_response(
        matched, skip, count, &query,
    )))
}

/// One user.
#[utoipa::path(get, path = "/Users/{id}", operation_id = "scim_get_user", tag = "scim", security(("scim_token" = [])), params(("id" = String, Path, description = "The user's SCIM id."), ListQuery),
    responses(
        (status = 200, description = "The user (`ETag`: its version).", content_type = "application/scim+json", body = Object),
        (status = 404, description = "No such user for this provider.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
    ))]
pub(super) async fn get(
    client: ScimClient,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<ScimResponse, ScimError> {
    let row = find(&state, &client, &id).await?;
    let (attributes, excluded) = query.attributes();
    let user = resources::project(
        resources::render_user(&row, &base(&state)),
        &attributes,
        &excluded,
    );
    Ok(ScimResponse::resource(StatusCode::OK, user))
}

/// Creates a user; the reconciler sees the change at once.
#[utoipa::path(post, path = "/Users", operation_id = "scim_create_user", tag = "scim", security(("scim_token" = [])),
    request_body(content = Object, content_type = "application/scim+json", description = "A SCIM User resource (RFC 7643)."),
    responses(
        (status = 201, description = "The user (`Location`, `ETag`).", content_type = "application/scim+json", body = Object),
        (status = 400, description = "Not a valid User resource.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
        (status = 409, description = "The user exists (`uniqueness`).", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
    ))]
pub(super) async fn create(
    client: ScimClient,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<ScimResponse, ScimError> {
    let resource = resources::clean_user(&parse_body(&body)?)?;
    let write = resources::user_write(&resource)?;
    let mode = state.config.scim_match(&client.provider);
    let key = mode.key(&write).ok_or_else(|| {
        ScimError::invalid_value(
            "this provider matches people by e-mail (scim_match = \"email\"): 'emails' needs a value",
        )
    })?;
    let user_id = state
        .store
        .create_scim_user(&client.provider, mode, &key, &write)
        .await?;
    state.reconciler.wake().wake();
    client
        .audit(
            &state,
            "scim.user.create",
            Some(&user_id),
            json!({"userName": write.user_name, "externalId": write.external_id,
                   "active": write.active, "matched_by": mode.as_str()}),
        )
        .await;
    let row = find(&state, &client, &user_id).await?;
    Ok(ScimResponse::resource(
        StatusCode::CREATED,
        resources::render_user(&row, &base(&state)),
    ))
}

/// Reads the user, makes the new resource from it with `change`, and writes it if no one
/// wrote in between (a retry otherwise, or 412 when the client named the version).
async fn modify(
    client: &ScimClient,
    state: &AppState,
    id: &str,
    headers: &HeaderMap,
    action: &str,
    change: impl Fn(&Json) -> Result<Json, ScimError>,
) -> Result<ScimResponse, ScimError> {
    let wanted = if_match(headers)?;
    for _ in 0..ATTEMPTS {
        let row = find(state, client, id).await?;
        check_version(&wanted, row.version)?;
        let current: Json = serde_json::from_str(&row.resource).unwrap_or_else(|_| json!({}));
        let resource = resources::clean_user(&change(&current)?)?;
        let write = resources::user_write(&resource)?;
        match state
            .store
            .update_scim_user(
                &client.provider,
                state.config.scim_match(&client.provider),
                id,
                row.version,
                &write,
            )
            .await?
        {
            Versioned::Written(_) => {
                state.reconciler.wake().wake();
                client
                    .audit(
                        state,
                        action,
                        Some(id),
                        json!({"userName": write.user_name, "active": write.active,
                               "was_active": row.active}),
                    )
                    .await;
                let row = find(state, client, id).await?;
                return Ok(ScimResponse::resource(
                    StatusCode::OK,
                    resources::render_user(&row, &base(state)),
                ));
            }
            Versioned::Stale if wanted.is_some() => return Err(ScimError::precondition_failed()),
            Versioned::Stale => continue,
        }
    }
    Err(ScimError::new(
        StatusCode::CONFLICT,
        None,
        "the user is being changed concurrently; try again",
    ))
}

/// Replaces a user (PUT).
#[utoipa::path(put, path = "/Users/{id}", operation_id = "scim_replace_user", tag = "scim", security(("scim_token" = [])), params(("id" = String, Path, description = "The user's SCIM id."), ("If-Match" = Option<String>, Header, description = "Only if the resource's ETag (`meta.version`) still matches.")),
    request_body(content = Object, content_type = "application/scim+json", description = "The whole SCIM User resource."),
    responses(
        (status = 200, description = "The user as replaced.", content_type = "application/scim+json", body = Object),
        (status = 400, description = "Not a valid User resource.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
        (status = 404, description = "No such user for this provider.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
        (status = 409, description = "A uniqueness conflict.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
        (status = 412, description = "The `If-Match` version is not the current one.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
    ))]
pub(super) async fn replace(
    client: ScimClient,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<ScimResponse, ScimError> {
    let body = parse_body(&body)?;
    modify(&client, &state, &id, &headers, "scim.user.replace", |_| {
        Ok(body.clone())
    })
    .await
}

/// Changes a user with a `PatchOp` (RFC 7644 §3.5.2; Okta's and Entra ID's dialects).
#[utoipa::path(patch, path = "/Users/{id}", operation_id = "scim_patch_user", tag = "scim", security(("scim_token" = [])), params(("id" = String, Path, description = "The user's SCIM id."), ("If-Match" = Option<String>, Header, description = "Only if the resource's ETag (`meta.version`) still matches.")),
    request_body(content = Object, content_type = "application/scim+json", description = "A `urn:ietf:params:scim:api:messages:2.0:PatchOp`."),
    responses(
        (status = 200, description = "The user as changed.", content_type = "application/scim+json", body = Object),
        (status = 400, description = "An invalid operation, path or value.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
        (status = 404, description = "No such user for this provider.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
        (status = 412, description = "The `If-Match` version is not the current one.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
    ))]
pub(super) async fn patch(
    client: ScimClient,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Result<ScimResponse, ScimError> {
    let operations = patch::parse_request(&parse_body(&body)?)?;
    modify(
        &client,
        &state,
        &id,
        &headers,
        "scim.user.patch",
        |current| {
            let mut resource = current.clone();
            patch::apply_to_user(&mut resource, &operations)?;
            Ok(resource)
        },
    )
    .await
}

/// Deletes a user.
#[utoipa::path(delete, path = "/Users/{id}", operation_id = "scim_delete_user", tag = "scim", security(("scim_token" = [])), params(("id" = String, Path, description = "The user's SCIM id."), ("If-Match" = Option<String>, Header, description = "Only if the resource's ETag (`meta.version`) still matches.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 404, description = "No such user for this provider.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
        (status = 412, description = "The `If-Match` version is not the current one.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
    ))]
pub(super) async fn delete(
    client: ScimClient,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<ScimResponse, ScimError> {
    let wanted = if_match(&headers)?;
    let row = find(&state, &client, &id).await?;
    check_version(&wanted, row.version)?;
    if !state.store.delete_scim_user(&client.provider, &id).await? {
        return Err(ScimError::not_found("user"));
    }
    state.reconciler.wake().wake();
    client
        .audit(
            &state,
            "scim.user.delete",
            Some(&id),
            json!({"userName": row.user_name}),
        )
        .await;
    Ok(ScimResponse::no_content())
}
