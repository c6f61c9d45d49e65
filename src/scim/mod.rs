//! SCIM 2.0 provisioning (RFC 7643/7644) at `/scim/v2`: identity providers (Okta, Entra ID, …)
//! push people and groups; a change of membership or of `active` reaches the reconciler at once.
//! Owns the SCIM wire format, its filters and PATCH dialects, and client-token authentication;
//! reaches storage only through the store's SCIM methods, and never touches devices directly.

pub mod auth;
pub mod error;
pub mod filter;
mod groups;
pub mod patch;
pub mod resources;
mod users;

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value as Json, json};
use utoipa::IntoParams;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::http::AppState;
use auth::ScimClient;
use error::{CONTENT_TYPE, ScimError};

/// Largest request body: a PATCH adding thousands of members fits.
pub const MAX_BODY: usize = 1024 * 1024;
/// Most resources in one page of a list.
pub const MAX_COUNT: usize = 200;
/// Page size when the client names none.
const DEFAULT_COUNT: usize = 100;
/// Most resources of one provider a filter is evaluated over.
const MAX_SCAN: i64 = 50_000;

/// The SCIM routes, each registered from its handler's OpenAPI annotation (`http::openapi`).
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(service_provider_config))
        .routes(routes!(resource_types))
        .routes(routes!(resource_type))
        .routes(routes!(schemas))
        .routes(routes!(schema))
        .routes(routes!(users::list, users::create))
        .routes(routes!(
            users::get,
            users::replace,
            users::patch,
            users::delete
        ))
        .routes(routes!(groups::list, groups::create))
        .routes(routes!(
            groups::get,
            groups::replace,
            groups::patch,
            groups::delete
        ))
        .fallback(|| async { ScimError::not_found("SCIM endpoint") })
        .layer(DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::map_response(error::scim_error_bodies))
}

/// A SCIM response: `application/scim+json`, with an ETag and a Location when given.
pub struct ScimResponse {
    status: StatusCode,
    body: Option<Json>,
    etag: Option<String>,
    location: Option<String>,
}

impl ScimResponse {
    fn ok(body: Json) -> Self {
        ScimResponse {
            status: StatusCode::OK,
            body: Some(body),
            etag: None,
            location: None,
        }
    }

    fn no_content() -> Self {
        ScimResponse {
            status: StatusCode::NO_CONTENT,
            body: None,
            etag: None,
            location: None,
        }
    }

    /// A resource: its `meta.version` becomes the ETag, and on 201 its `meta.location` the
    /// Location.
    fn resource(status: StatusCode, body: Json) -> Self {
        let etag = body
            .pointer("/meta/version")
            .and_then(Json::as_str)
            .map(str::to_string);
        let location = (status == StatusCode::CREATED)
            .then(|| {
                body.pointer("/meta/location")
                    .and_then(Json::as_str)
                    .map(str::to_string)
            })
            .flatten();
        ScimResponse {
            status,
            body: Some(body),
            etag,
            location,
        }
    }
}

impl IntoResponse for ScimResponse {
    fn into_response(self) -> Response {
        let mut response = match self.body {
            Some(body) => (self.status, body.to_string()).into_response(),
            None => self.status.into_response(),
        };
        let headers = response.headers_mut();
        if self.status != StatusCode::NO_CONTENT {
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(CONTENT_TYPE));
        }
        for (name, value) in [(header::ETAG, self.etag), (header::LOCATION, self.location)] {
            if let Some(value) = value.and_then(|v| HeaderValue::from_str(&v).ok()) {
                headers.insert(name, value);
            }
        }
        response
    }
}

/// The public base URL (no trailing slash), for `meta.location`; empty keeps locations relative.
fn base(state: &AppState) -> String {
    state
        .config
        .public_url
        .as_deref()
        .unwrap_or_default()
        .trim_end_matches('/')
        .to_string()
}

/// Parses a request body as JSON (SCIM clients send `application/scim+json` or
/// `application/json`; the type is not held against them).
fn parse_body(body: &Bytes) -> Result<Json, ScimError> {
    serde_json::from_slice(body)
        .map_err(|e| ScimError::invalid_syntax(format!("the body is not valid JSON: {e}")))
}

/// What an `If-Match` header demands: `None` when absent or `*`.
fn if_match(headers: &HeaderMap) -> Result<Option<Vec<String>>, ScimError> {
    let Some(value) = headers.get(header::IF_MATCH) else {
        return Ok(None);
    };
    let value = value
        .to_str()
        .map_err(|_| ScimError::invalid_syntax("If-Match is not readable text"))?;
    if value.trim() == "*" {
        return Ok(None);
    }
    Ok(Some(
        value
            .split(',')
            .map(|tag| {
                tag.trim()
                    .trim_start_matches("W/")
                    .trim_matches('"')
                    .to_string()
            })
            .collect(),
    ))
}

/// Refuses the write (412) unless the resource is at a version `If-Match` names.
fn check_version(wanted: &Option<Vec<String>>, version: i64) -> Result<(), ScimError> {
    match wanted {
        Some(tags) if !tags.iter().any(|t| *t == version.to_string()) => {
            Err(ScimError::precondition_failed())
        }
        _ => Ok(()),
    }
}

/// The query of a list (and `attributes`/`excludedAttributes` of a read).
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(rename_all = "camelCase")]
#[into_params(parameter_in = Query)]
struct ListQuery {
    /// A SCIM filter (`userName eq "a@example.com"`, `displayName sw "Eng"`, …).
    filter: Option<String>,
    /// 1-based index of the first result (default 1).
    start_index: Option<i64>,
    /// Results per page, at most 200 (default 100).
    count: Option<i64>,
    /// Attributes to return, comma-separated.
    attributes: Option<String>,
    /// Attributes to leave out, comma-separated.
    excluded_attributes: Option<String>,
}

impl ListQuery {
    fn attributes(&self) -> (Vec<String>, Vec<String>) {
        let split = |v: &Option<String>| -> Vec<String> {
            v.as_deref()
                .unwrap_or_default()
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                // Bounded like any input: a name is short and a resource has few of them.
                .take(64)
                .map(str::to_string)
                .collect()
        };
        (split(&self.attributes), split(&self.excluded_attributes))
    }

    /// `(startIndex - 1, count)`: out-of-range values are brought into range, as RFC 7644
    /// §3.4.2.4 says.
    fn page(&self) -> (usize, usize) {
        let start = self.start_index.unwrap_or(1).max(1);
        let count = self
            .count
            .map_or(DEFAULT_COUNT, |c| usize::try_from(c.max(0)).unwrap_or(0))
            .min(MAX_COUNT);
        (usize::try_from(start - 1).unwrap_or(0), count)
    }

    fn filter(&self) -> Result<Option<filter::Filter>, ScimError> {
        self.filter.as_deref().map(filter::parse).transpose()
    }
}

/// A ListResponse of `matched` resources, showing the page `(skip, count)` of them.
fn list_response(matched: Vec<Json>, skip: usize, count: usize, query: &ListQuery) -> Json {
    let (attributes, excluded) = query.attributes();
    let total = matched.len();
    let page: Vec<Json> = matched
        .into_iter()
        .skip(skip)
        .take(count)
        .map(|r| resources::project(r, &attributes, &excluded))
        .collect();
    json!({
        "schemas": [resources::LIST_SCHEMA],
        "totalResults": total,
        "startIndex": skip + 1,
        "itemsPerPage": page.len(),
        "Resources": page,
    })
}

/// What this service provider supports (RFC 7643 §5).
#[utoipa::path(get, path = "/ServiceProviderConfig", operation_id = "scim_service_provider_config", tag = "scim", security(("scim_token" = [])),
    responses((status = 200, description = "The ServiceProviderConfig.", content_type = "application/scim+json", body = Object)))]
async fn service_provider_config(
    _client: ScimClient,
    State(state): State<AppState>,
) -> ScimResponse {
    ScimResponse::ok(resources::service_provider_config(
        &base(&state),
        MAX_COUNT,
        MAX_BODY,
    ))
}

/// The resource types served (User, Group).
#[utoipa::path(get, path = "/ResourceTypes", operation_id = "scim_resource_types", tag = "scim", security(("scim_token" = [])),
    responses((status = 200, description = "A `ListResponse` of ResourceTypes.", content_type = "application/scim+json", body = Object)))]
async fn resource_types(_client: ScimClient, State(state): State<AppState>) -> ScimResponse {
    let types = resources::resource_types(&base(&state));
    ScimResponse::ok(list_response(types, 0, MAX_COUNT, &ListQuery::default()))
}

/// One resource type.
#[utoipa::path(get, path = "/ResourceTypes/{id}", operation_id = "scim_resource_type", tag = "scim", security(("scim_token" = [])),
    params(("id" = String, Path, description = "`User` or `Group`.")),
    responses(
        (status = 200, description = "The ResourceType.", content_type = "application/scim+json", body = Object),
        (status = 404, description = "No such resource type.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
    ))]
async fn resource_type(
    _client: ScimClient,
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<ScimResponse, ScimError> {
    resources::resource_types(&base(&state))
        .into_iter()
        .find(|t| t.get("id").and_then(Json::as_str) == Some(id.as_str()))
        .map(ScimResponse::ok)
        .ok_or_else(|| ScimError::not_found("resource type"))
}

/// The schemas of the resources served.
#[utoipa::path(get, path = "/Schemas", operation_id = "scim_schemas", tag = "scim", security(("scim_token" = [])),
    responses((status = 200, description = "A `ListResponse` of Schemas.", content_type = "application/scim+json", body = Object)))]
async fn schemas(_client: ScimClient, State(state): State<AppState>) -> ScimResponse {
    let schemas = resources::schemas(&base(&state));
    ScimResponse::ok(list_response(schemas, 0, MAX_COUNT, &ListQuery::default()))
}

/// One schema.
#[utoipa::path(get, path = "/Schemas/{id}", operation_id = "scim_schema", tag = "scim", security(("scim_token" = [])),
    params(("id" = String, Path, description = "The schema's URN.")),
    responses(
        (status = 200, description = "The Schema.", content_type = "application/scim+json", body = Object),
        (status = 404, description = "No such schema.", content_type = "application/scim+json", body = crate::http::openapi::ScimErrorBody),
    ))]
async fn schema(
    _client: ScimClient,
    State(state): State<AppState>,
    axum::extract::Path(id): axum::extract::Path<String>,
) -> Result<ScimResponse, ScimError> {
    resources::schemas(&base(&state))
        .into_iter()
        .find(|s| s.get("id").and_then(Json::as_str) == Some(id.as_str()))
        .map(ScimResponse::ok)
        .ok_or_else(|| ScimError::not_found("schema"))
}
