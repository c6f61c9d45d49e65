//! The HTTP surface: operations endpoints, admin authentication and scopes, the audit log,
//! and how bad requests are answered.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::harness::{TestDb, TestServer};

/// Asserts the API's one error shape and returns its code.
async fn error_code(response: reqwest::Response, status: StatusCode) -> String {
    assert_eq!(response.status(), status);
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let body: Value = response.json().await.expect("JSON error body");
    let message = body["error"]["message"].as_str().expect("message");
    assert!(!message.is_empty());
    body["error"]["code"].as_str().expect("code").to_string()
}

#[tokio::test]
async fn health_readiness_and_metrics_answer_on_both_databases() {
    for db in TestDb::all().await {
        let server = TestServer::start_on(&db).await;
        let health = server
            .client
            .get(server.url("/healthz"))
            .send()
            .await
            .unwrap();
        assert_eq!(health.status(), StatusCode::OK);
        assert!(health.headers().contains_key("x-request-id"));
        let ready: Value = server.get_json("/readyz", None).await;
        assert_eq!(ready["status"], "ok");
        assert_eq!(ready["database"], db.name());
        let metrics = server.get_text("/metrics").await;
        assert!(
            metrics.contains("trustbroker_http_requests_total{method=\"GET\",route=\"/healthz\""),
            "{metrics}"
        );
        assert!(metrics.contains("trustbroker_http_request_duration_seconds_bucket"));
        assert!(metrics.contains("process_resident_memory_bytes"));
        server.stop().await;
    }
}

#[tokio::test]
async fn readiness_fails_when_the_database_is_gone() {
    let server = TestServer::start().await;
    server.store().close().await;
    let response = server
        .client
        .get(server.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(response, StatusCode::SERVICE_UNAVAILABLE).await,
        "unavailable"
    );
    // Liveness is about the process, not its dependencies.
    let health = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
}

#[tokio::test]
async fn admin_keys_are_required_and_scoped() {
    let server = TestServer::start().await;
    let admin = server.admin_key("root", &[]).await;
    let auditor = server.admin_key("auditor", &["audit:read"]).await;
    let audit_url = server.url("/api/v1/audit");

    // No key, a malformed key, a wrong secret for a real id: 401 with a challenge header.
    let wrong_secret = format!("{}x", &admin[..admin.len() - 1]);
    for header in [
        None,
        Some("Bearer nonsense".to_string()),
        Some(format!("Bearer {wrong_secret}")),
        Some(format!("Basic {admin}")),
    ] {
        let mut request = server.client.get(&audit_url);
        if let Some(h) = &header {
            request = request.header("authorization", h);
        }
        let response = request.send().await.unwrap();
        assert!(response.headers().contains_key("www-authenticate"));
        assert_eq!(
            error_code(response, StatusCode::UNAUTHORIZED).await,
            "unauthorized",
            "{header:?}"
        );
    }

    // A key without the scope: 403; with it: 200.
    let forbidden = server
        .client
        .get(server.url("/api/v1/admin-keys"))
        .bearer_auth(&auditor)
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(forbidden, StatusCode::FORBIDDEN).await,
        "forbidden"
    );
    let allowed = server
        .client
        .get(&audit_url)
        .bearer_auth(&auditor)
        .send()
        .await
        .unwrap();
    assert_eq!(allowed.status(), StatusCode::OK);

    // Revocation takes effect on the next request.
    let revoked = server
        .client
        .delete(server.url("/api/v1/admin-keys/auditor"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    let after = server
        .client
        .get(&audit_url)
        .bearer_auth(&auditor)
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(after, StatusCode::UNAUTHORIZED).await,
        "unauthorized"
    );

    // The refusals of presented keys and the revocation are in the audit log.
    let log: Value = server
        .client
        .get(&audit_url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entries = log["entries"].as_array().unwrap();
    let outcomes = |action: &str, outcome: &str| {
        entries
            .iter()
            .filter(|e| e["action"] == action && e["outcome"] == outcome)
            .count()
    };
    assert_eq!(outcomes("admin-key.revoke", "success"), 1, "{log:#}");
    assert_eq!(outcomes("GET /api/v1/admin-keys", "denied"), 1, "{log:#}");
    // nonsense (anonymous), wrong secret, and the revoked key afterwards.
    assert_eq!(outcomes("GET /api/v1/audit", "denied"), 3, "{log:#}");
    let revoke = entries
        .iter()
        .find(|e| e["action"] == "admin-key.revoke")
        .unwrap();
    assert_eq!(revoke["actor"], "key:root");
    assert_eq!(revoke["target"], "auditor");
    assert!(
        revoke["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    assert_eq!(revoke["source"], "127.0.0.1");
    server.stop().await;
}

#[tokio::test]
async fn keys_created_over_the_api_work_and_cannot_exceed_their_creator() {
    let server = TestServer::start().await;
    let manager = server
        .admin_key("manager", &["admin-keys:write", "admin-keys:read"])
        .await;
    let create = |body: Value| {
        server
            .client
            .post(server.url("/api/v1/admin-keys"))
            .bearer_auth(&manager)
            .json(&body)
            .send()
    };
    let created = create(json!({"name": "reader", "scopes": ["admin-keys:read"]}))
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let created: Value = created.json().await.unwrap();
    let key = created["key"].as_str().unwrap();
    let whoami: Value = server.get_json("/api/v1/whoami", Some(key)).await;
    assert_eq!(whoami["name"], "reader");
    assert_eq!(whoami["scopes"], json!(["admin-keys:read"]));

    // Escalation, a duplicate name, a bad name, an unknown scope: refused with clear codes.
    let escalate = create(json!({"name": "boss", "scopes": ["admin"]}))
        .await
        .unwrap();
    assert_eq!(
        error_code(escalate, StatusCode::FORBIDDEN).await,
        "forbidden"
    );
    let duplicate = create(json!({"name": "reader", "scopes": ["admin-keys:read"]}))
        .await
        .unwrap();
    assert_eq!(
        error_code(duplicate, StatusCode::CONFLICT).await,
        "conflict"
    );
    let bad_name = create(json!({"name": "no spaces please", "scopes": []}))
        .await
        .unwrap();
    assert_eq!(
        error_code(bad_name, StatusCode::UNPROCESSABLE_ENTITY).await,
        "invalid_request"
    );
    let bad_scope = create(json!({"name": "x", "scopes": ["root"]}))
        .await
        .unwrap();
    assert_eq!(
        error_code(bad_scope, StatusCode::UNPROCESSABLE_ENTITY).await,
        "invalid_request"
    );

    // Listing never shows secrets or hashes.
    let listed = server
        .client
        .get(server.url("/api/v1/admin-keys"))
        .bearer_auth(&manager)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(listed.contains("\"reader\""));
    assert!(!listed.contains(&key["tbk_0123456789ab_".len()..]));
    assert!(!listed.contains("secret_hash"));
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_get_json_errors_and_change_nothing() {
    let server = TestServer::start_with(|args| args.max_body_bytes = Some(64 * 1024)).await;
    let admin = server.admin_key("root", &[]).await;
    let keys_url = server.url("/api/v1/admin-keys");
    let count_keys = || async {
        let listed: Value = server
            .client
            .get(&keys_url)
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        listed["keys"].as_array().unwrap().len()
    };
    let before = count_keys().await;

    let post = |body: Vec<u8>, content_type: &'static str| {
        server
            .client
            .post(&keys_url)
            .bearer_auth(&admin)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let malformed = post(b"{\"name\": ".to_vec(), "application/json")
        .await
        .unwrap();
    assert_eq!(
        error_code(malformed, StatusCode::BAD_REQUEST).await,
        "bad_request"
    );
    let wrong_shape = post(b"{\"name\": 7}".to_vec(), "application/json")
        .await
        .unwrap();
    assert_eq!(
        error_code(wrong_shape, StatusCode::UNPROCESSABLE_ENTITY).await,
        "invalid_request"
    );
    let unknown_field = post(
        b"{\"name\":\"a\",\"admin\":true}".to_vec(),
        "application/json",
    )
    .await
    .unwrap();
    assert_eq!(
        error_code(unknown_field, StatusCode::UNPROCESSABLE_ENTITY).await,
        "invalid_request"
    );
    let not_json = post(b"name=a".to_vec(), "application/x-www-form-urlencoded")
        .await
        .unwrap();
    assert_eq!(
        error_code(not_json, StatusCode::UNSUPPORTED_MEDIA_TYPE).await,
        "unsupported_media_type"
    );
    let mut huge = b"{\"name\":\"".to_vec();
    huge.extend(std::iter::repeat_n(b'a', 200 * 1024));
    huge.extend(b"\"}");
    let oversized = post(huge.clone(), "application/json").await.unwrap();
    assert_eq!(
        error_code(oversized, StatusCode::PAYLOAD_TOO_LARGE).await,
        "payload_too_large"
    );
    // The same body streamed without a Content-Length is cut off as well.
    let stream = futures_stream(huge);
    let chunked = server
        .client
        .post(&keys_url)
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(chunked, StatusCode::PAYLOAD_TOO_LARGE).await,
        "payload_too_large"
    );

    let wrong_method = server
        .client
        .put(&keys_url)
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(wrong_method, StatusCode::METHOD_NOT_ALLOWED).await,
        "method_not_allowed"
    );
    let unknown = server
        .client
        .get(server.url("/api/v1/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(unknown, StatusCode::NOT_FOUND).await,
        "not_found"
    );
    let bad_query = server
        .client
        .get(server.url("/api/v1/audit?limit=many"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(bad_query, StatusCode::BAD_REQUEST).await,
        "bad_request"
    );
    let out_of_range = server
        .client
        .get(server.url("/api/v1/audit?limit=100000"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(out_of_range, StatusCode::BAD_REQUEST).await,
        "bad_request"
    );
    let revoke_missing = server
        .client
        .delete(server.url("/api/v1/admin-keys/ghost"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(revoke_missing, StatusCode::NOT_FOUND).await,
        "not_found"
    );

    assert_eq!(
        count_keys().await,
        before,
        "a refused request changed state"
    );
    server.stop().await;
}

/// A body stream in 8 KiB chunks, so the client sends it without a Content-Length.
fn futures_stream(
    bytes: Vec<u8>,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send + 'static {
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        bytes.chunks(8192).map(|c| Ok(c.to_vec())).collect();
    tokio_stream::iter(chunks)
}

#[tokio::test]
async fn audit_log_pages_newest_first_with_filters() {
    let server = TestServer::start().await;
    let admin = server.admin_key("root", &[]).await;
    for i in 0..5 {
        let created = server
            .client
            .post(server.url("/api/v1/admin-keys"))
            .bearer_auth(&admin)
            .json(&json!({"name": format!("k{i}"), "scopes": ["audit:read"]}))
            .send()
            .await
            .unwrap();
        assert_eq!(created.status(), StatusCode::CREATED);
    }
    let page = |query: String| {
        let client = server.client.clone();
        let url = server.url(&format!("/api/v1/audit?{query}"));
        let admin = admin.clone();
        async move {
            client
                .get(url)
                .bearer_auth(admin)
                .send()
                .await
                .unwrap()
                .json::<Value>()
                .await
                .unwrap()
        }
    };
    let first = page("action=admin-key.create&limit=2".into()).await;
    let names: Vec<&str> = first["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["target"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["k4", "k3"]);
    let cursor = first["next_before"]
        .as_i64()
        .expect("cursor on a full page");
    let second = page(format!("action=admin-key.create&limit=2&before={cursor}")).await;
    let names: Vec<&str> = second["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["target"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["k2", "k1"]);
    let none = page("actor=key:nobody".into()).await;
    assert_eq!(none["entries"].as_array().unwrap().len(), 0);
    assert!(none["next_before"].is_null());
    server.stop().await;
}
