//! The operator's contract: `GET /api/v1/openapi.json` is a valid OpenAPI 3.1 document (checked
//! by an independent validator, Python's openapi-spec-validator), documents every route the
//! server really registers under `/api/v1`, `/scim/v2` and the token-validation paths, and its
//! security requirements say what the server enforces.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::harness::{TestServer, peer_env};

const DOC: &str = "/api/v1/openapi.json";
const METHODS: [&str; 8] = [
    "get", "head", "delete", "options", "patch", "post", "put", "trace",
];

/// Whether a registered path is one the document must describe.
fn is_api(path: &str) -> bool {
    path.starts_with("/api/v1/")
        || path.starts_with("/scim/v2/")
        || path.starts_with("/validate/")
        || path == "/.well-known/jwks.json"
}

/// The route table of a router as it was built: path → the methods it answers (`None`: a
/// service that takes any method). Read from axum's `Debug` output of the router (its route
/// ids, paths and method routers), the only view axum gives of a built router; the callers
/// check that the walk found the routes they know, so a change of that format fails the test
/// instead of making it pass on nothing.
fn route_table(router: &axum::Router) -> BTreeMap<String, Option<BTreeSet<String>>> {
    let text = format!("{router:?}");
    // Only the path router: the fallback router has ids of its own.
    let start = text
        .find("path_router:")
        .expect("a path router in the Debug output");
    let end = text.find("fallback_router:").unwrap_or(text.len());
    let text = &text[start..end];
    let mut paths = BTreeMap::new();
    let mut endpoints = BTreeMap::new();
    for chunk in text.split("RouteId(").skip(1) {
        let Some((id, rest)) = chunk.split_once("): ") else {
            continue;
        };
        let Ok(id) = id.parse::<u32>() else { continue };
        if let Some(quoted) = rest.strip_prefix('"') {
            let path = quoted.split('"').next().expect("a quoted path");
            paths.insert(id, path.to_string());
        } else if let Some(router) = rest.strip_prefix("MethodRouter(MethodRouter {") {
            // The per-method endpoints come before the method router's fallback.
            let fields = router.split(" fallback:").next().expect("fields");
            let methods = METHODS
                .iter()
                .filter(|m| {
                    let field = format!(" {m}: ");
                    let value = fields
                        .split(&field)
                        .nth(1)
                        .unwrap_or_else(|| panic!("no {m} in a method router: {fields}"));
                    !value.starts_with("None")
                })
                .map(|m| m.to_string())
                .collect();
            endpoints.insert(id, Some(methods));
        } else if rest.starts_with("Route(") {
            endpoints.insert(id, None);
        } else {
            panic!(
                "unexpected route table entry: {}",
                &rest[..rest.len().min(80)]
            );
        }
    }
    assert_eq!(
        paths.keys().collect::<Vec<_>>(),
        endpoints.keys().collect::<Vec<_>>(),
        "every route id has a path and an endpoint"
    );
    paths
        .into_iter()
        .filter(|(_, path)| !path.contains("__private__axum"))
        .map(|(id, path)| (path, endpoints.remove(&id).flatten()))
        .collect()
}

async fn served_document(server: &TestServer) -> Value {
    // No credentials: the document holds no secrets.
    let response = server
        .client
        .get(server.url(DOC))
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), StatusCode::OK);
    response.json().await.expect("a JSON document")
}

/// `(method, path)` of every operation in the document.
fn operations(document: &Value) -> Vec<(String, String, &Value)> {
    let mut all = Vec::new();
    for (path, item) in document["paths"].as_object().expect("paths") {
        for method in METHODS {
            if let Some(operation) = item.get(method) {
                all.push((method.to_string(), path.clone(), operation));
            }
        }
    }
    all
}

/// The roles an operation's requirement names for `scheme`, if it names the scheme.
fn roles(operation: &Value, scheme: &str) -> Option<Vec<String>> {
    operation["security"].as_array()?.iter().find_map(|req| {
        req.get(scheme).map(|roles| {
            roles
                .as_array()
                .expect("roles")
                .iter()
                .map(|r| r.as_str().expect("a role").to_string())
                .collect()
        })
    })
}

#[tokio::test]
async fn the_document_covers_every_api_route_the_server_registers() {
    let server = TestServer::start().await;
    let document = served_document(&server).await;
    let table = route_table(&server.server.as_ref().expect("running").router);
    // The walk sees what we know is there, so an unreadable table cannot pass as an empty one.
    assert!(table.contains_key("/healthz"), "{table:?}");
    assert_eq!(
        table.get("/api/v1/admin-keys"),
        Some(&Some(BTreeSet::from([
            "get".to_string(),
            "post".to_string()
        ])))
    );
    let api: Vec<_> = table.iter().filter(|(path, _)| is_api(path)).collect();
    assert!(api.len() > 40, "only {} API routes found", api.len());

    let mut missing = Vec::new();
    for (path, methods) in &api {
        let Some(item) = document["paths"].get(path.as_str()) else {
            missing.push(format!("{path} (no path item)"));
            continue;
        };
        match methods {
            Some(methods) => {
                for method in methods {
                    if item.get(method.as_str()).is_none() {
                        missing.push(format!("{} {path}", method.to_uppercase()));
                    }
                }
            }
            // A service that takes any method: some operation must describe it.
            None => {
                if !METHODS.iter().any(|m| item.get(*m).is_some()) {
                    missing.push(format!("{path} (no operation)"));
                }
            }
        }
    }
    assert!(
        missing.is_empty(),
        "routes the OpenAPI document lacks: {missing:#?}"
    );

    // And nothing is documented that is not served.
    for (method, path, _) in operations(&document) {
        let served = match table.get(&path) {
            Some(Some(methods)) => methods.contains(&method),
            Some(None) => true,
            None => false,
        };
        assert!(served, "documented but not routed: {method} {path}");
    }
    server.stop().await;
}

#[tokio::test]
async fn every_documented_requirement_is_what_the_server_enforces() {
    let server = TestServer::start().await;
    let document = served_document(&server).await;
    // Valid keys holding one unrelated scope each: refused with 403 naming the scope wherever
    // one is documented, let through where the document names none. (A key created with no
    // scope at all is an `admin` key.)
    let audit_only = server
        .admin_key("openapi-audit-only", &["audit:read"])
        .await;
    let keys_only = server
        .admin_key("openapi-keys-only", &["admin-keys:read"])
        .await;
    let mut checked = 0;
    for (method, path, operation) in operations(&document) {
        let url = server.url(&path.replace('{', "x").replace('}', ""));
        let method = Method::from_bytes(method.to_uppercase().as_bytes()).expect("method");
        let anonymous = server
            .client
            .request(method.clone(), &url)
            .send()
            .await
            .expect("request sent");
        if let Some(roles) = roles(operation, "admin_key") {
            assert!(path.starts_with("/api/v1/"), "{path}");
            assert_eq!(
                anonymous.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path} without a key"
            );
            let other = if roles == ["audit:read"] {
                &keys_only
            } else {
                &audit_only
            };
            let response = server
                .client
                .request(method.clone(), &url)
                .bearer_auth(other)
                .send()
                .await
                .expect("request sent");
            let status = response.status();
            let body: Value = response.json().await.unwrap_or_default();
            match roles.as_slice() {
                [] => assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                    "{method} {path} is documented for any key but answered {status}"
                ),
                [scope] => {
                    assert_eq!(status, StatusCode::FORBIDDEN, "{method} {path}: {body}");
                    let message = body["error"]["message"].as_str().unwrap_or_default();
                    assert!(
                        message.contains(&format!("'{scope}'")),
                        "{method} {path} is documented with scope {scope}, but the server \
                         said: {message}"
                    );
                }
                more => panic!("{method} {path} names several scopes: {more:?}"),
            }
            checked += 1;
        } else if roles(operation, "scim_token").is_some() {
            assert!(path.starts_with("/scim/v2/"), "{path}");
            assert_eq!(
                anonymous.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path}"
            );
            checked += 1;
        } else if roles(operation, "app_client").is_some() {
            assert!(path.starts_with("/validate/"), "{path}");
            assert_eq!(
                anonymous.status(),
                StatusCode::UNAUTHORIZED,
                "{method} {path}"
            );
            checked += 1;
        } else {
            // Only the public documents go without credentials.
            assert!(
                path == DOC || path == "/.well-known/jwks.json",
                "{method} {path} has no security requirement"
            );
            assert_eq!(anonymous.status(), StatusCode::OK, "{method} {path}");
        }
    }
    assert!(checked > 60, "only {checked} operations checked");
    server.stop().await;
}

#[tokio::test]
async fn known_operations_have_their_scopes_statuses_and_schemas() {
    let server = TestServer::start().await;
    let document = served_document(&server).await;
    assert_eq!(document["openapi"], "3.1.0");
    assert_eq!(document["info"]["title"], "trustbroker");
    let schemes = &document["components"]["securitySchemes"];
    assert_eq!(schemes["admin_key"]["scheme"], "bearer");
    assert_eq!(schemes["scim_token"]["scheme"], "bearer");
    assert_eq!(schemes["app_client"]["scheme"], "basic");

    let op = |method: &str, path: &str| -> Value { document["paths"][path][method].clone() };
    let statuses = |operation: &Value| -> BTreeSet<String> {
        operation["responses"]
            .as_object()
            .expect("responses")
            .keys()
            .cloned()
            .collect()
    };

    let create_key = op("post", "/api/v1/admin-keys");
    assert_eq!(
        roles(&create_key, "admin_key"),
        Some(vec!["admin-keys:write".into()])
    );
    for status in ["201", "401", "403", "409", "422", "default"] {
        assert!(statuses(&create_key).contains(status), "{status}");
    }
    assert_eq!(
        create_key["requestBody"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/CreateKey"
    );
    assert_eq!(
        create_key["responses"]["403"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/Error"
    );
    let error = &document["components"]["schemas"]["ErrorDetail"];
    assert!(error["properties"]["code"].is_object(), "{error}");

    let audit = op("get", "/api/v1/audit");
    assert_eq!(roles(&audit, "admin_key"), Some(vec!["audit:read".into()]));
    let params: BTreeSet<_> = audit["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap().to_string(),
                p["in"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for name in ["limit", "before", "actor", "action", "outcome"] {
        assert!(
            params.contains(&(name.into(), "query".into())),
            "{name}: {params:?}"
        );
    }

    let reveal = op(
        "get",
        "/api/v1/token-integrations/{name}/tokens/{id}/reveal",
    );
    assert_eq!(
        roles(&reveal, "admin_key"),
        Some(vec!["tokens:reveal".into()])
    );
    let retire = op("post", "/api/v1/enrollments/{id}/retire");
    assert_eq!(
        roles(&retire, "admin_key"),
        Some(vec!["certificates:write".into()])
    );
    assert!(statuses(&retire).contains("404"));
    let whoami = op("get", "/api/v1/whoami");
    assert_eq!(roles(&whoami, "admin_key"), Some(vec![]));
    assert_eq!(
        whoami["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/WhoAmI"
    );
    let certificate = &document["components"]["schemas"]["Certificate"];
    for field in ["serial", "subject", "status", "not_after", "pem"] {
        assert!(
            certificate["properties"][field].is_object(),
            "{field}: {certificate}"
        );
    }

    let scim_delete = op("delete", "/scim/v2/Users/{id}");
    assert_eq!(roles(&scim_delete, "scim_token"), Some(vec![]));
    for status in ["204", "401", "404", "412"] {
        assert!(statuses(&scim_delete).contains(status), "{status}");
    }
    assert_eq!(
        scim_delete["responses"]["401"]["content"]["application/scim+json"]["schema"]["$ref"],
        "#/components/schemas/ScimError"
    );
    let scim_list = op("get", "/scim/v2/Groups");
    let names: Vec<_> = scim_list["parameters"]
        .as_array()
        .expect("parameters")
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_string())
        .collect();
    assert!(names.contains(&"startIndex".to_string()), "{names:?}");

    let validate = op("post", "/validate/v1/tokens");
    assert_eq!(roles(&validate, "app_client"), Some(vec![]));
    for status in ["200", "401", "429"] {
        assert!(statuses(&validate).contains(status), "{status}");
    }
    assert_eq!(
        validate["responses"]["200"]["content"]["application/json"]["schema"]["$ref"],
        "#/components/schemas/TokenValidation"
    );
    let answers: Vec<_> = document["components"]["schemas"]["TokenValidation"]["oneOf"]
        .as_array()
        .expect("oneOf")
        .iter()
        .map(|s| s["$ref"].as_str().unwrap_or_default().to_string())
        .collect();
    assert_eq!(
        answers,
        [
            "#/components/schemas/ActiveToken",
            "#/components/schemas/InactiveToken"
        ]
    );
    assert!(op("get", DOC)["security"].is_null());
    server.stop().await;
}

#[tokio::test]
async fn the_document_is_cacheable_and_revalidated_by_its_entity_tag() {
    let server = TestServer::start().await;
    let response = server
        .client
        .get(server.url(DOC))
        .send()
        .await
        .expect("request sent");
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers().clone();
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["cache-control"], "public, max-age=300");
    let etag = headers["etag"].to_str().expect("etag").to_string();
    let again = server
        .client
        .get(server.url(DOC))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("request sent");
    assert_eq!(again.status(), StatusCode::NOT_MODIFIED);
    assert_eq!(again.headers()["etag"], etag.as_str());
    server.stop().await;
}

/// Runs the independent validator on `document`; `(passed, its output)`.
fn validate_with(validator: &str, document: &Value) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("openapi.json");
    std::fs::write(&file, serde_json::to_vec_pretty(document).expect("json")).expect("write");
    let output = std::process::Command::new(validator)
        .args(["--schema", "3.1"])
        .arg(&file)
        .output()
        .expect("the validator runs");
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    text.truncate(4000);
    (output.status.success(), text)
}

#[tokio::test]
async fn an_independent_validator_accepts_the_served_document() {
    let Some(validator) = peer_env("TRUSTBROKER_TEST_OPENAPI_VALIDATOR") else {
        return;
    };
    let server = TestServer::start().await;
    let document = served_document(&server).await;
    let (passed, output) = validate_with(&validator, &document);
    assert!(
        passed,
        "openapi-spec-validator refused the document:\n{output}"
    );
    assert!(output.contains("OK"), "{output}");

    // The validator does check: a path parameter the path does not declare is refused.
    let mut broken = document.clone();
    broken["paths"]["/api/v1/whoami"]["get"]["parameters"] = serde_json::json!([{"name": "id", "in": "path", "required": true, "schema": {"type": "string"}}]);
    let (passed, output) = validate_with(&validator, &broken);
    assert!(!passed, "a broken document passed: {output}");
    server.stop().await;
}
