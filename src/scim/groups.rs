//! `/scim/v2/Groups`: the groups of the client's provider. A group's stable ID (what policies
//! target as `{provider, id}`) is its `externalId` when the IdP sends one, else its SCIM id.

use std::collections::BTreeSet;

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use serde_json::{Value as Json, json};

use super::auth::ScimClient;
use super::error::ScimError;
use super::filter::get_ci;
use super::patch::{self, MemberOp};
use super::resources;
use super::{ListQuery, MAX_SCAN, ScimResponse, base, check_version, if_match, parse_body};
use crate::http::AppState;
use crate::store::{MemberChange, ScimGroupRow, Versioned};

async fn find(state: &AppState, client: &ScimClient, id: &str) -> Result<ScimGroupRow, ScimError> {
    // Another provider's groups are not there at all for this client.
    state
        .store
        .scim_group(&client.provider, id)
        .await?
        .ok_or_else(|| ScimError::not_found("group"))
}

/// Whether a rendered group should carry its members (they may be many thousands).
fn wants_members(query: &ListQuery) -> bool {
    let (attributes, excluded) = query.attributes();
    let named = |list: &[String]| {
        list.iter().any(|a| {
            a.eq_ignore_ascii_case("members") || a.to_ascii_lowercase().starts_with("members.")
        })
    };
    if attributes.is_empty() {
        !named(&excluded)
    } else {
        named(&attributes)
    }
}

async fn render(
    state: &AppState,
    row: &ScimGroupRow,
    with_members: bool,
) -> Result<Json, ScimError> {
    let members = if with_members {
        state.store.scim_group_members(&row.group_id).await?
    } else {
        Vec::new()
    };
    let mut group = resources::render_group(row, &members, &base(state));
    if !with_members && let Some(map) = group.as_object_mut() {
        map.remove("members");
    }
    Ok(group)
}

/// Refuses member IDs that are not SCIM users of this client's provider (400, no change).
async fn check_members(
    state: &AppState,
    client: &ScimClient,
    ids: &[String],
) -> Result<(), ScimError> {
    if ids.is_empty() {
        return Ok(());
    }
    let known = state.store.known_scim_users(&client.provider, ids).await?;
    match ids.iter().find(|id| !known.contains(*id)) {
        Some(unknown) => Err(ScimError::invalid_value(format!(
            "member '{}' is not a user provisioned by this client's provider",
            crate::audit::truncated(unknown, 128)
        ))),
        None => Ok(()),
    }
}

fn display_name(body: &Json) -> Result<String, ScimError> {
    match get_ci(body, "displayName") {
        Some(Json::String(name)) if !name.trim().is_empty() && name.len() <= 1024 => {
            Ok(name.clone())
        }
        _ => Err(ScimError::invalid_value(
            "'displayName' is required: a non-empty string of at most 1024 bytes",
        )),
    }
}

fn external_id(body: &Json) -> Result<Option<String>, ScimError> {
    match get_ci(body, "externalId") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(id)) if !id.is_empty() && id.len() <= 1024 => Ok(Some(id.clone())),
        Some(_) => Err(ScimError::invalid_value(
            "'externalId' must be a string of at most 1024 bytes",
        )),
    }
}

/// Groups of the calling client's provider, filtered and paged (RFC 7644 §3.4.2).
#[utoipa::path(get, path = "/Groups", operation_id = "scim_list_groups", tag = "scim", security(("scim_token" = [])), params(ListQuery),
    responses(
        (status = 200, description = "A `ListResponse` of groups.", content_type = "application/scim+json", body = Object),
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
        .and_then(|f| f.narrowing(super::filter::Resource::Group));
    let rows = state
        .store
        .scim_groups(&client.provider, narrowing.as_ref(), MAX_SCAN)
        .await?;
    let base = base(&state);
    // Filters match on the group without its members (displayName, externalId, id).
    let matched: Vec<(usize, Json)> = rows
        .iter()
        .enumerate()
        .map(|(i, row)| (i, resources::render_group(row, &[], &base)))
        .filter(|(_, group)| filter.as_ref().is_none_or(|f| f.matches(group)))
        .collect();
    let (skip, count) = query.page();
    let with_members = wants_members(&query);
    let mut page = Vec::new();
    for (i, _) in matched.iter().skip(skip).take(count) {
        if let Some(row) = rows.get(*i) {
            page.push(render(&state, row, with_members).await?);
        }
    }
    let total = matched.len();
    let mut body = super::list_response(page, 0, count, &query);
    if let Some(map) = body.as_object_mut() {
        map.insert("totalResults".into(), json!(total));
        map.insert("startIndex".into(), json!(skip + 1));
    }
    Ok(ScimResponse::ok(body))
}

/// One group.
#[utoipa::path(get, path = "/Groups/{id}", operation_id = "scim_get_group", tag = "scim", security(("scim_token" = [])), params(("id" = String, Path, description = "The group's SCIM id."), ListQuery),
    responses(
        (status = 200, description = "The group (`ETag`: its version).", content_type = "application/scim+json", body = Object),
        (status = 404, description = "No such group for this provider.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
    ))]
pub(super) async fn get(
    client: ScimClient,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<ListQuery>,
) -> Result<ScimResponse, ScimError> {
    let row = find(&state, &client, &id).await?;
    let (attributes, excluded) = query.attributes();
    let group = render(&state, &row, wants_members(&query)).await?;
    Ok(ScimResponse::resource(
        StatusCode::OK,
        resources::project(group, &attributes, &excluded),
    ))
}

/// Creates a group; the reconciler sees the change at once.
#[utoipa::path(post, path = "/Groups", operation_id = "scim_create_group", tag = "scim", security(("scim_token" = [])),
    request_body(content = Object, content_type = "application/scim+json", description = "A SCIM Group resource (RFC 7643)."),
    responses(
        (status = 201, description = "The group (`Location`, `ETag`).", content_type = "application/scim+json", body = Object),
        (status = 400, description = "Not a valid Group resource.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
        (status = 409, description = "The group exists (`uniqueness`).", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
    ))]
pub(super) async fn create(
    client: ScimClient,
    State(state): State<AppState>,
    body: Bytes,
) -> Result<ScimResponse, ScimError> {
    let body = parse_body(&body)?;
    let name = display_name(&body)?;
    let external = external_id(&body)?;
    let members = patch::member_ids(get_ci(&body, "members"))?;
    check_members(&state, &client, &members).await?;
    let group_id = state
        .store
        .create_scim_group(&client.provider, external.as_deref(), &name, &members)
        .await?;
    state.reconciler.wake().wake();
    client
        .audit(
            &state,
            "scim.group.create",
            Some(&group_id),
            json!({"displayName": name, "externalId": external, "members": members.len()}),
        )
        .await;
    let row = find(&state, &client, &group_id).await?;
    Ok(ScimResponse::resource(
        StatusCode::CREATED,
        render(&state, &row, true).await?,
    ))
}

/// Writes a new name and a member change if the group is still at the version read.
async fn write(
    state: &AppState,
    client: &ScimClient,
    row: &ScimGroupRow,
    wanted: &Option<Vec<String>>,
    name: &str,
    change: &MemberChange,
    action: &str,
) -> Result<(), ScimError> {
    match state
        .store
        .update_scim_group(&client.provider, &row.group_id, row.version, name, change)
        .await?
    {
        Versioned::Written((_, affected)) => {
            if affected > 0 {
                state.reconciler.wake().wake();
            }
            let (added, removed, replaced) = match change {
                MemberChange::Delta { add, remove } => (add.len(), remove.len(), None),
                MemberChange::Replace(ids) => (0, 0, Some(ids.len())),
            };
            client
                .audit(
                    state,
                    action,
                    Some(&row.group_id),
                    json!({"displayName": name, "add": added, "remove": removed,
                           "replace": replaced, "changed": affected}),
                )
                .await;
            Ok(())
        }
        Versioned::Stale if wanted.is_some() => Err(ScimError::precondition_failed()),
        Versioned::Stale => Err(ScimError::new(
            StatusCode::CONFLICT,
            None,
            "the group was changed concurrently; try again",
        )),
    }
}

fn same_external_id(row: &ScimGroupRow, external: Option<&str>) -> Result<(), ScimError> {
    // The external ID is what policies target: a client cannot move a group under them.
    match external {
        Some(id) if row.external_id.as_deref() != Some(id) => Err(ScimError::new(
            StatusCode::BAD_REQUEST,
            Some("mutability"),
            "'externalId' of a group cannot change: policies target it",
        )),
        _ => Ok(()),
    }
}

/// Replaces a group (PUT).
#[utoipa::path(put, path = "/Groups/{id}", operation_id = "scim_replace_group", tag = "scim", security(("scim_token" = [])), params(("id" = String, Path, description = "The group's SCIM id."), ("If-Match" = Option<String>, Header, description = "Only if the resource's ETag (`meta.version`) still matches.")),
    request_body(content = Object, content_type = "application/scim+json", description = "The whole SCIM Group resource."),
    responses(
        (status = 200, description = "The group as replaced.", content_type = "application/scim+json", body = Object),
        (status = 400, description = "Not a valid Group resource.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
        (status = 404, description = "No such group for this provider.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
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
    let wanted = if_match(&headers)?;
    let body = parse_body(&body)?;
    let name = display_name(&body)?;
    let external = external_id(&body)?;
    let members = patch::member_ids(get_ci(&body, "members"))?;
    let row = find(&state, &client, &id).await?;
    check_version(&wanted, row.version)?;
    same_external_id(&row, external.as_deref())?;
    check_members(&state, &client, &members).await?;
    let change = MemberChange::Replace(members);
    write(
        &state,
        &client,
        &row,
        &wanted,
        &name,
        &change,
        "scim.group.replace",
    )
    .await?;
    let row = find(&state, &client, &id).await?;
    Ok(ScimResponse::resource(
        StatusCode::OK,
        render(&state, &row, true).await?,
    ))
}

/// Changes a group with a `PatchOp` (RFC 7644 §3.5.2; Okta's and Entra ID's dialects).
#[utoipa::path(patch, path = "/Groups/{id}", operation_id = "scim_patch_group", tag = "scim", security(("scim_token" = [])), params(("id" = String, Path, description = "The group's SCIM id."), ("If-Match" = Option<String>, Header, description = "Only if the resource's ETag (`meta.version`) still matches.")),
    request_body(content = Object, content_type = "application/scim+json", description = "A `urn:ietf:params:scim:api:messages:2.0:PatchOp`."),
    responses(
        (status = 200, description = "The group as changed.", content_type = "application/scim+json", body = Object),
        (status = 400, description = "An invalid operation, path or value.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
        (status = 404, description = "No such group for this provider.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
        (status = 412, description = "The `If-Match` version is not the current one.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
    ))]
pub(super) async fn patch(
    client: ScimClient,
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
    body: Bytes,
) -> Result<ScimResponse, ScimError> {
    let wanted = if_match(&headers)?;
    let operations = patch::parse_request(&parse_body(&body)?)?;
    let group_patch = patch::group_patch(&operations)?;
    let row = find(&state, &client, &id).await?;
    check_version(&wanted, row.version)?;
    same_external_id(&row, group_patch.external_id.as_deref())?;
    let added: Vec<String> = group_patch
        .members
        .iter()
        .flat_map(|op| match op {
            MemberOp::Add(ids) | MemberOp::Replace(ids) => ids.clone(),
            MemberOp::Remove(_) | MemberOp::RemoveWhere(_) => Vec::new(),
        })
        .collect();
    check_members(&state, &client, &added).await?;
    let needs_current = group_patch
        .members
        .iter()
        .any(|op| matches!(op, MemberOp::RemoveWhere(_)));
    let current: Option<BTreeSet<String>> = if needs_current {
        Some(
            state
                .store
                .scim_group_members(&row.group_id)
                .await?
                .into_iter()
                .map(|(id, _)| id)
                .collect(),
        )
    } else {
        None
    };
    let change = patch::plan_members(&group_patch.members, current.as_ref());
    let name = group_patch
        .display_name
        .unwrap_or_else(|| row.display_name.clone());
    write(
        &state,
        &client,
        &row,
        &wanted,
        &name,
        &change,
        "scim.group.patch",
    )
    .await?;
    // A group may have thousands of members: the body is sent only when asked for.
    if query.attributes.is_none() && query.excluded_attributes.is_none() {
        return Ok(ScimResponse::no_content());
    }
    let row = find(&state, &client, &id).await?;
    let (attributes, excluded) = query.attributes();
    let group = render(&state, &row, wants_members(&query)).await?;
    Ok(ScimResponse::resource(
        StatusCode::OK,
        resources::project(group, &attributes, &excluded),
    ))
}

/// Deletes a group.
#[utoipa::path(delete, path = "/Groups/{id}", operation_id = "scim_delete_group", tag = "scim", security(("scim_token" = [])), params(("id" = String, Path, description = "The group's SCIM id."), ("If-Match" = Option<String>, Header, description = "Only if the resource's ETag (`meta.version`) still matches.")),
    responses(
        (status = 204, description = "Deleted."),
        (status = 404, description = "No such group for this provider.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
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
    if !state.store.delete_scim_group(&client.provider, &id).await? {
        return Err(ScimError::not_found("group"));
    }
    state.reconciler.wake().wake();
    client
        .audit(
            &state,
            "scim.group.delete",
            Some(&id),
            json!({"displayName": row.display_name}),
        )
        .await;
    Ok(ScimResponse::no_content())
}
