//! The operator's contract: the OpenAPI 3.1 document of `/api/v1`, `/scim/v2` and the token
//! validation routes, served unauthenticated at `GET /api/v1/openapi.json`.
//!
//! The admin and SCIM routers are `utoipa_axum::OpenApiRouter`s: a route is registered from the
//! handler's `#[utoipa::path]` annotation, so the router and the document come from the same
//! handler list. The validation routes keep their own small state (`http::validate`) and are
//! added as plain routes whose annotations each module's `Doc` collects; the route-coverage
//! test (tests/it/openapi.rs) walks the route table the server really builds and fails when any
//! of these routes is missing from the document. The document is built once, when the router is.

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use sha2::{Digest, Sha256};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{
    Components, ContactBuilder, InfoBuilder, LicenseBuilder, OpenApi as Document, RefOr,
    ResponseBuilder, Tag,
};
use utoipa::{OpenApi, ToSchema};
use utoipa_axum::router::OpenApiRouter;

use super::AppState;

/// Where the document is served.
pub const PATH: &str = "/api/v1/openapi.json";
/// The name of the admin API's security scheme (a Bearer admin key; its scopes are the roles).
pub const ADMIN_KEY: &str = "admin_key";
/// The SCIM clients' Bearer token (`trustbroker scim-client create`).
pub const SCIM_TOKEN: &str = "scim_token";
/// App clients' HTTP Basic credentials (`trustbroker app-client create`).
pub const APP_CLIENT: &str = "app_client";
/// How long a client may keep the document: it changes only with the binary.
const MAX_AGE_SECS: u32 = 300;

/// The API's error body (`http::error::ApiError`): every error of `/api/v1` and of the
/// validation routes has this shape.
#[derive(ToSchema)]
#[schema(as = Error)]
#[allow(dead_code)] // describes `ApiError`'s JSON; never built
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(ToSchema)]
#[allow(dead_code)] // describes `ApiError`'s JSON; never built
pub struct ErrorDetail {
    /// A stable, machine-readable code: `bad_request`, `unauthorized`, `forbidden`,
    /// `not_found`, `conflict`, `invalid_request`, `payload_too_large`, `rate_limited`,
    /// `unavailable`, `internal`, or a more specific one named in the operation.
    #[schema(example = "not_found")]
    pub code: String,
    /// What went wrong, for a person to act on.
    pub message: String,
}

/// The SCIM error body (RFC 7644 §3.12), sent as `application/scim+json`.
#[derive(ToSchema)]
#[schema(as = ScimError)]
#[allow(dead_code)] // describes `scim::error::ScimError`'s JSON; never built
pub struct ScimErrorBody {
    /// `["urn:ietf:params:scim:api:messages:2.0:Error"]`
    pub schemas: Vec<String>,
    /// The HTTP status, as a string.
    #[schema(example = "404")]
    pub status: String,
    /// RFC 7644 table 9 (`invalidFilter`, `uniqueness`, `invalidPath`, …); absent for
    /// 401/404/412.
    #[schema(rename = "scimType")]
    pub scim_type: Option<String>,
    pub detail: String,
}

/// RFC 6749 §5.2's error body, which token introspection (RFC 7662) answers with.
#[derive(ToSchema)]
#[schema(as = OAuthError)]
#[allow(dead_code)] // describes `http::jwks`'s error JSON; never built
pub struct OAuthErrorBody {
    /// `invalid_request`, `invalid_client`, `rate_limited`, `temporarily_unavailable`.
    pub error: String,
    pub error_description: String,
}

/// This document's own route, and the schemas `finish` refers to.
#[derive(OpenApi)]
#[openapi(paths(serve_document), components(schemas(ErrorBody, ScimErrorBody)))]
struct Meta;

/// The documented routes: `/api/v1` (admin API and this document), `/scim/v2`, and the token
/// validation routes; the caller merges them into the application's router.
pub fn documented_routes(state: &AppState) -> Router<AppState> {
    let (router, document) = assemble();
    let served = Served::new(&document);
    router
        .merge(super::validate::router(state))
        .merge(super::jwks::router())
        .route_service(PATH, get(serve_document).with_state(served))
}

/// The whole document, as served.
pub fn document() -> Document {
    assemble().1
}

fn assemble() -> (Router<AppState>, Document) {
    let (router, mut document) = OpenApiRouter::<AppState>::default()
        .nest("/api/v1", crate::admin::router())
        .nest("/scim/v2", crate::scim::router())
        .split_for_parts();
    // The routes that keep their own state are plain routes; their handlers' annotations are
    // collected by each module's `Doc` (the coverage test holds them to the route table).
    document.merge(super::validate::Doc::openapi());
    document.merge(super::jwks::Doc::openapi());
    document.merge(Meta::openapi());
    (router, finish(document))
}

/// Adds what no single handler says: the description, the security schemes, and the error
/// responses every operation of a scheme can give.
fn finish(mut document: Document) -> Document {
    document.info = InfoBuilder::new()
        .title("trustbroker")
        .version(env!("CARGO_PKG_VERSION"))
        .description(Some(
            "The admin API (`/api/v1`, Bearer admin keys whose scopes each operation names), \
             SCIM 2.0 provisioning (`/scim/v2`, a SCIM client's Bearer token) and token \
             validation for third-party apps (`/validate/v1`, an app client's HTTP Basic \
             credentials). Errors of `/api/v1` and `/validate/v1` have the `Error` shape; \
             SCIM errors have the `ScimError` shape. docs/api.md is the human-written guide.",
        ))
        .license(Some(LicenseBuilder::new().name("Apache-2.0").build()))
        .contact(Some(
            ContactBuilder::new().name(Some("trustbroker")).build(),
        ))
        .build();
    let components = document.components.get_or_insert_with(Components::new);
    components.add_security_scheme(
        ADMIN_KEY,
        SecurityScheme::Http(
            Http::builder()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "An admin key (`trustbroker admin-key create`). The roles listed in an \
                     operation's requirement are the scopes the key must hold (`admin` holds \
                     them all); none listed means any valid key. Without a valid key: 401; \
                     without the scope: 403.",
                ))
                .build(),
        ),
    );
    components.add_security_scheme(
        SCIM_TOKEN,
        SecurityScheme::Http(
            Http::builder()
                .scheme(HttpAuthScheme::Bearer)
                .description(Some(
                    "A SCIM client's token (`trustbroker scim-client create` or \
                     `POST /api/v1/scim-clients`); it acts for one identity provider.",
                ))
                .build(),
        ),
    );
    components.add_security_scheme(
        APP_CLIENT,
        SecurityScheme::Http(
            Http::builder()
                .scheme(HttpAuthScheme::Basic)
                .description(Some(
                    "An app client's ID and secret (`trustbroker app-client create`), as OAuth's \
                     `client_secret_basic`; it validates its own integration's tokens only.",
                ))
                .build(),
        ),
    );
    let error = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    "application/json",
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                            "Error",
                        ))))
                        .build(),
                )
                .build(),
        )
    };
    let scim_error = |description: &str| {
        RefOr::T(
            ResponseBuilder::new()
                .description(description)
                .content(
                    super::super::scim::error::CONTENT_TYPE,
                    utoipa::openapi::ContentBuilder::new()
                        .schema(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                            "ScimError",
                        ))))
                        .build(),
                )
                .build(),
        )
    };
    for item in document.paths.paths.values_mut() {
        for operation in operations(item) {
            let schemes: Vec<String> = operation
                .security
                .iter()
                .flatten()
                .flat_map(|requirement| {
                    serde_json::to_value(requirement)
                        .ok()
                        .and_then(|v| v.as_object().map(|o| o.keys().cloned().collect::<Vec<_>>()))
                        .unwrap_or_default()
                })
                .collect();
            let responses = &mut operation.responses.responses;
            let mut add = |status: &str, response: RefOr<utoipa::openapi::Response>| {
                responses.entry(status.to_string()).or_insert(response);
            };
            if schemes.iter().any(|s| s == ADMIN_KEY) {
                add(
                    "401",
                    error("No admin key, or one that is unknown, wrong or revoked."),
                );
                add(
                    "403",
                    error("The key lacks the scope this operation needs."),
                );
            }
            if schemes.iter().any(|s| s == SCIM_TOKEN) {
                add(
                    "401",
                    scim_error("No SCIM token, or one that is not valid."),
                );
                add(
                    "default",
                    scim_error(
                        "Any other error (400 with a scimType, 404, 409, 412, 413, 500, 503).",
                    ),
                );
            } else {
                add(
                    "default",
                    error(
                        "Any other error: 400 malformed request, 404, 409 conflict, 413 body too \
                         large, 415, 422 invalid value, 429, 500, 503 database unavailable.",
                    ),
                );
            }
        }
    }
    document.tags = Some(
        [
            ("admin", "Admin keys, the audit log, the caller's identity."),
            ("pki", "SCEP challenges and issued certificates."),
            (
                "mdm",
                "Enrollments, devices, commands, the APNs push certificate.",
            ),
            (
                "directory",
                "People and groups seen at sign-in, LDAP sync or SCIM.",
            ),
            (
                "policies",
                "The policy set: plan, apply, versions, devices' state.",
            ),
            (
                "tokens",
                "App-config token integrations, tokens, app clients, signing keys.",
            ),
            (
                "scim-clients",
                "Identity providers' credentials for /scim/v2.",
            ),
            ("scim", "SCIM 2.0 service provider (RFC 7643/7644)."),
            (
                "validation",
                "Token validation for third-party apps' back ends.",
            ),
            ("meta", "This document."),
        ]
        .into_iter()
        .map(|(name, description)| {
            let mut tag = Tag::new(name);
            tag.description = Some(description.to_string());
            tag
        })
        .collect(),
    );
    document
}

fn operations(
    item: &mut utoipa::openapi::path::PathItem,
) -> impl Iterator<Item = &mut utoipa::openapi::path::Operation> {
    [
        item.get.as_mut(),
        item.put.as_mut(),
        item.post.as_mut(),
        item.delete.as_mut(),
        item.patch.as_mut(),
        item.head.as_mut(),
        item.options.as_mut(),
        item.trace.as_mut(),
    ]
    .into_iter()
    .flatten()
}

/// The serialized document and its entity tag, made once.
#[derive(Clone)]
struct Served {
    body: Bytes,
    etag: HeaderValue,
}

impl Served {
    fn new(document: &Document) -> Served {
        // Serializing plain maps and strings cannot fail; an empty body would show at once.
        let body = serde_json::to_vec(document).unwrap_or_default();
        let digest = Sha256::digest(&body);
        let etag = format!("\"{}\"", hex::encode(digest));
        Served {
            etag: HeaderValue::from_str(&etag).unwrap_or(HeaderValue::from_static("\"0\"")),
            body: Bytes::from(body),
        }
    }
}

/// The OpenAPI document of this server. It holds no secrets (routes, parameters, schemas,
/// the names of scopes), so it needs no authentication.
#[utoipa::path(
    get,
    path = "/api/v1/openapi.json",
    tag = "meta",
    operation_id = "openapi_document",
    responses(
        (status = 200, description = "This document (OpenAPI 3.1), cacheable for 5 minutes.",
         content_type = "application/json", body = serde_json::Value),
        (status = 304, description = "Unchanged since the `If-None-Match` entity tag."),
    )
)]
async fn serve_document(State(served): State<Served>, headers: HeaderMap) -> Response {
    let cache = HeaderValue::from_str(&format!("public, max-age={MAX_AGE_SECS}"))
        .unwrap_or(HeaderValue::from_static("no-cache"));
    let unchanged = headers
        .get(header::IF_NONE_MATCH)
        .is_some_and(|tag| tag.as_bytes() == served.etag.as_bytes());
    let mut response = if unchanged {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        Response::new(Body::from(served.body.clone()))
    };
    let headers = response.headers_mut();
    if !unchanged {
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
    }
    headers.insert(header::CACHE_CONTROL, cache);
    headers.insert(header::ETAG, served.etag);
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Component schemas are one namespace: utoipa names a schema after its type, and two
    /// types of one name (a `RevokeBody` here and there) would silently leave one operation
    /// pointing at the other's schema. Each router's own document must agree with the whole
    /// (list a new router here).
    #[test]
    fn no_two_schemas_share_a_name() {
        let whole = document();
        let whole = whole.components.expect("components").schemas;
        let parts: Vec<(&str, Document)> = vec![
            ("admin", crate::admin::router().into_openapi()),
            ("admin::pki", crate::admin::pki::router().into_openapi()),
            ("admin::mdm", crate::admin::mdm::router().into_openapi()),
            ("admin::users", crate::admin::users::router().into_openapi()),
            (
                "admin::policies",
                crate::admin::policies::router().into_openapi(),
            ),
            (
                "admin::signing_keys",
                crate::admin::signing_keys::router().into_openapi(),
            ),
            (
                "admin::tokens",
                crate::admin::tokens::router().into_openapi(),
            ),
            (
                "admin::scim_clients",
                crate::admin::scim_clients::router().into_openapi(),
            ),
            ("scim", crate::scim::router().into_openapi()),
            ("validate", super::super::validate::Doc::openapi()),
            ("jwks", super::super::jwks::Doc::openapi()),
        ];
        let mut seen = 0;
        for (name, part) in parts {
            for (schema, definition) in part.components.map(|c| c.schemas).unwrap_or_default() {
                let merged = whole.get(&schema).expect("every schema is in the document");
                assert_eq!(
                    serde_json::to_value(merged).ok(),
                    serde_json::to_value(&definition).ok(),
                    "the schema {schema} of {name} is another type's in the document: give one \
                     of them #[schema(as = OtherName)]"
                );
                seen += 1;
            }
        }
        assert!(seen > 20, "only {seen} schemas compared");
    }

    #[test]
    fn operation_ids_are_unique() {
        let document = serde_json::to_value(document()).expect("json");
        let mut ids = std::collections::BTreeSet::new();
        for item in document["paths"].as_object().expect("paths").values() {
            for operation in item.as_object().expect("item").values() {
                let id = operation["operationId"].as_str().expect("an operationId");
                assert!(ids.insert(id.to_string()), "operationId {id} is used twice");
            }
        }
        assert!(ids.len() > 60);
    }
}
