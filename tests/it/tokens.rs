//! Shared app-config tokens end to end: integrations, generated and imported tokens, effective
//! dates and expiry, rotation with overlap, revocation (refused for the last active token,
//! effective on a second node within a second), reveal, app clients, and validation for a
//! third-party app's back end (`POST /validate/v1/tokens`) with every way a token is refused,
//! bad client credentials and the rate limit. Each on SQLite and PostgreSQL where it matters.

use std::time::{Duration, Instant};

use reqwest::{Method, StatusCode};
use serde_json::{Value as Json, json};

use crate::device::Device;
use crate::harness::{TestDb, TestServer, run_cli};

struct Tokens {
    server: TestServer,
    admin: String,
}

/// An app client's credentials.
#[derive(Clone)]
struct Client {
    id: String,
    secret: String,
}

impl Tokens {
    async fn start_on(db: &TestDb) -> Tokens {
        Self::with(TestServer::start_on(db).await).await
    }

    async fn with(server: TestServer) -> Tokens {
        let admin = server.admin_key("tokens-admin", &["admin"]).await;
        Tokens { server, admin }
    }

    async fn call_as(
        &self,
        key: &str,
        method: Method,
        path: &str,
        body: Option<Json>,
    ) -> (StatusCode, Json) {
        let mut request = self
            .server
            .client
            .request(method, self.server.url(&format!("/api/v1{path}")))
            .bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Json::Null))
    }

    async fn call(&self, method: Method, path: &str, body: Option<Json>) -> (StatusCode, Json) {
        self.call_as(&self.admin, method, path, body).await
    }

    async fn integration(&self, name: &str, overlap_secs: i64) -> Json {
        let (status, body) = self
            .call(
                Method::POST,
                "/token-integrations",
                Some(json!({
                    "name": name,
                    "display_name": format!("{name} app"),
                    "bundle_id": "com.pingidentity.pingid",
                    "config_key": "PINGID_MDM_TOKEN",
                    "overlap_secs": overlap_secs,
                })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body
    }

    /// Creates (or with `value`, imports) a token; the answer.
    async fn token(&self, integration: &str, body: Json) -> Json {
        let (status, created) = self
            .call(
                Method::POST,
                &format!("/token-integrations/{integration}/tokens"),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{created}");
        created
    }

    async fn tokens(&self, integration: &str) -> Vec<Json> {
        let (status, body) = self
            .call(
                Method::GET,
                &format!("/token-integrations/{integration}/tokens"),
                None,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{body}");
        body["tokens"].as_array().unwrap().clone()
    }

    async fn rotate(&self, integration: &str, body: Json) -> Json {
        let (status, rotated) = self
            .call(
                Method::POST,
                &format!("/token-integrations/{integration}/tokens/rotate"),
                Some(body),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{rotated}");
        rotated
    }

    async fn revoke(&self, integration: &str, id: &str, force: bool) -> (StatusCode, Json) {
        self.call(
            Method::POST,
            &format!("/token-integrations/{integration}/tokens/{id}/revoke"),
            Some(json!({"force": force})),
        )
        .await
    }

    async fn client(&self, integration: &str) -> Client {
        let (status, body) = self
            .call(
                Method::POST,
                &format!("/token-integrations/{integration}/clients"),
                Some(json!({"name": format!("backend-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        assert!(body.get("secret_hash").is_none(), "{body}");
        Client {
            id: body["id"].as_str().unwrap().to_owned(),
            secret: body["client_secret"].as_str().unwrap().to_owned(),
        }
    }

    /// Applies a policy set whose app configuration carries `${token.<integration>}` for each
    /// of `integrations` (none: an empty set).
    async fn deliver(&self, integrations: &[&str]) {
        apply_delivering(&self.server, &self.admin, integrations).await;
    }

    async fn validate(&self, client: &Client, token: &str) -> Json {
        validate_at(&self.server, client, json!({"token": token})).await
    }

    async fn active(&self, client: &Client, token: &str) -> bool {
        let answer = self.validate(client, token).await;
        match answer["active"].as_bool().unwrap() {
            true => true,
            false => {
                assert_eq!(answer, json!({"active": false}), "nothing else is said");
                false
            }
        }
    }
}

/// A policy whose app configuration carries `${token.<integration>}` for each integration.
fn delivering_policy(integrations: &[&str]) -> String {
    let mut configuration = String::new();
    for integration in integrations {
        configuration.push_str(&format!(
            "      TOKEN_{}: \"${{token.{integration}}}\"\n",
            integration.to_uppercase().replace('-', "_")
        ));
    }
    format!(
        r#"name: delivers
targets:
  groups:
    - {{ provider: corp, id: "cn=pingid-users" }}
apps:
  - bundle_id: com.pingidentity.pingid
    itunes_store_id: 1076521545
    configuration:
{configuration}"#
    )
}

pub async fn apply_delivering(server: &TestServer, admin: &str, integrations: &[&str]) {
    let files = if integrations.is_empty() {
        json!({})
    } else {
        crate::policy::files(&[("delivers.yaml", delivering_policy(integrations))])
    };
    let response = server
        .client
        .post(server.url("/api/v1/policies/apply"))
        .bearer_auth(admin)
        .json(&json!({"files": files, "allow_destructive": true}))
        .send()
        .await
        .unwrap();
    let status = response.status();
    assert_eq!(
        status,
        StatusCode::CREATED,
        "{}",
        response.text().await.unwrap()
    );
}

/// `POST /validate/v1/tokens` on `server` as `client`; the answer, which must be 200.
async fn validate_at(server: &TestServer, client: &Client, body: Json) -> Json {
    let (status, answer) = validate_raw(server, Some(client), body).await;
    assert_eq!(status, StatusCode::OK, "{answer}");
    answer
}

async fn validate_raw(
    server: &TestServer,
    client: Option<&Client>,
    body: Json,
) -> (StatusCode, Json) {
    let mut request = server
        .client
        .post(server.url("/validate/v1/tokens"))
        .json(&body);
    if let Some(client) = client {
        request = request.basic_auth(&client.id, Some(&client.secret));
    }
    let response = request.send().await.unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Json::Null))
}

fn id_of(token: &Json) -> String {
    token["id"].as_str().unwrap().to_owned()
}

/// A time `secs` from now, RFC 3339.
fn in_secs(secs: i64) -> String {
    (chrono::Utc::now() + chrono::Duration::seconds(secs)).to_rfc3339()
}

#[tokio::test]
async fn generated_and_imported_tokens_are_active_together_and_listed_by_last_four() {
    for db in TestDb::all().await {
        let t = Tokens::start_on(&db).await;
        t.integration("pingid", 3600).await;
        let client = t.client("pingid").await;

        let generated = t.token("pingid", json!({"label": "first"})).await;
        let value = generated["value"].as_str().unwrap().to_owned();
        assert_eq!(value.len(), 43, "32 random bytes, base64url: {generated}");
        assert!(
            value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        );
        assert_eq!(generated["source"], "generated");
        assert_eq!(generated["status"], "active");
        assert_eq!(generated["last4"], &value[value.len() - 4..]);

        let imported_value = "PING-portal-token-0123456789abcdef";
        let imported = t
            .token(
                "pingid",
                json!({"label": "from the portal", "value": imported_value}),
            )
            .await;
        assert!(
            imported.get("value").is_none(),
            "an import echoes nothing: {imported}"
        );
        assert_eq!(imported["source"], "imported");
        assert_eq!(imported["last4"], "cdef");

        // The same value twice in one integration is refused.
        let (status, body) = t
            .call(
                Method::POST,
                "/token-integrations/pingid/tokens",
                Some(json!({"value": imported_value})),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        // Bounded imports.
        for bad in ["short", "has spaces in the middle of it", &"x".repeat(600)] {
            let (status, body) = t
                .call(
                    Method::POST,
                    "/token-integrations/pingid/tokens",
                    Some(json!({"value": bad})),
                )
                .await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        }

        assert!(t.active(&client, &value).await, "{}", db.name());
        assert!(t.active(&client, imported_value).await);

        // Lists: last four characters, no values; the newest active one is current.
        let listed = t.tokens("pingid").await;
        assert_eq!(listed.len(), 2);
        let text = serde_json::to_string(&listed).unwrap();
        assert!(
            !text.contains(&value) && !text.contains(imported_value),
            "{text}"
        );
        assert_eq!(listed[0]["id"], imported["id"]);
        assert_eq!(listed[0]["current"], true);
        assert_eq!(listed[1]["current"], false);
        assert!(listed.iter().all(|t| t["status"] == "active"));
        assert!(listed.iter().all(|t| t["delivered"] == 0));
        let (_, integration) = t
            .call(Method::GET, "/token-integrations/pingid", None)
            .await;
        assert_eq!(integration["active_tokens"], 2, "{integration}");
        assert_eq!(integration["current_token"], imported["id"]);
        assert_eq!(integration["config_key"], "PINGID_MDM_TOKEN");

        // The delivery cache agrees, with the opened value.
        let current = t.server.server.as_ref().unwrap().tokens.current_values();
        let pingid = &current["pingid"];
        assert_eq!(pingid.value, imported_value);
        assert_eq!(pingid.token_id, id_of(&imported));
        assert_eq!(pingid.config_key, "PINGID_MDM_TOKEN");
        assert_eq!(pingid.bundle_id, "com.pingidentity.pingid");

        // Unknown integrations and malformed input.
        let (status, _) = t
            .call(Method::GET, "/token-integrations/nope/tokens", None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, body) = t
            .call(
                Method::POST,
                "/token-integrations",
                Some(json!({"name": "Bad Name", "bundle_id": "x", "config_key": "K"})),
            )
            .await;
        assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
        let (status, _) = t
            .call(
                Method::POST,
                "/token-integrations",
                Some(json!({"name": "pingid", "bundle_id": "x", "config_key": "K"})),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT);
        t.server.stop().await;
    }
}

#[tokio::test]
async fn future_tokens_wait_for_their_date_and_expired_ones_stop() {
    for db in TestDb::all().await {
        let t = Tokens::start_on(&db).await;
        t.integration("pingid", 3600).await;
        let client = t.client("pingid").await;
        let far = t
            .token("pingid", json!({"not_before": in_secs(30 * 86_400)}))
            .await;
        assert_eq!(far["status"], "scheduled");
        let soon = t.token("pingid", json!({"not_before": in_secs(2)})).await;
        let ending = t.token("pingid", json!({"expires_at": in_secs(2)})).await;
        let (soon_value, ending_value) = (
            soon["value"].as_str().unwrap().to_owned(),
            ending["value"].as_str().unwrap().to_owned(),
        );
        assert!(!t.active(&client, far["value"].as_str().unwrap()).await);
        assert!(
            !t.active(&client, &soon_value).await,
            "not valid before its date"
        );
        assert!(t.active(&client, &ending_value).await);
        // Times are whole seconds: past both moments with a second to spare.
        tokio::time::sleep(Duration::from_millis(3200)).await;
        assert!(t.active(&client, &soon_value).await, "valid from its date");
        assert!(!t.active(&client, &ending_value).await, "expired");
        let listed = t.tokens("pingid").await;
        let status_of =
            |id: &Json| listed.iter().find(|t| t["id"] == *id).unwrap()["status"].clone();
        assert_eq!(status_of(&far["id"]), "scheduled");
        assert_eq!(status_of(&soon["id"]), "active");
        assert_eq!(status_of(&ending["id"]), "expired");
        // An expiry before the start, or already past, is refused.
        for body in [
            json!({"not_before": in_secs(100), "expires_at": in_secs(50)}),
            json!({"expires_at": in_secs(-10)}),
        ] {
            let (status, answer) = t
                .call(
                    Method::POST,
                    "/token-integrations/pingid/tokens",
                    Some(body),
                )
                .await;
            assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{answer}");
        }
        // The background task turned both moments into reconcile requests, once.
        let deadline = Instant::now() + Duration::from_secs(5);
        while unnoted_transitions(&t.server, &db).await > 0 {
            assert!(Instant::now() < deadline, "transitions not noted");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        t.server.stop().await;
    }
}

/// Tokens whose start or end has passed and was not yet noted by any node.
async fn unnoted_transitions(server: &TestServer, db: &TestDb) -> i64 {
    let sql = "SELECT COUNT(*) FROM shared_tokens WHERE revoked_at IS NULL AND \
               ((NOT start_noted AND not_before <= $1) OR (NOT end_noted AND expires_at <= $1))";
    let now = trustbroker::store::now();
    match db {
        TestDb::Postgres(pg) => {
            let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
            let count = sqlx::query_scalar(sql)
                .bind(now)
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            count
        }
        TestDb::Sqlite => {
            let data = server
                .server
                .as_ref()
                .unwrap()
                .tls_cert_path
                .parent()
                .unwrap()
                .parent()
                .unwrap();
            let url = format!("sqlite://{}", data.join("trustbroker.db").display());
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            let count = sqlx::query_scalar(sql)
                .bind(now)
                .fetch_one(&pool)
                .await
                .unwrap();
            pool.close().await;
            count
        }
    }
}

#[tokio::test]
async fn rotation_keeps_the_old_token_valid_for_the_overlap() {
    for db in TestDb::all().await {
        let t = Tokens::start_on(&db).await;
        t.integration("pingid", 3600).await;
        t.integration("short", 2).await;
        let client = t.client("pingid").await;
        let short_client = t.client("short").await;

        let old = t.token("pingid", json!({"label": "v1"})).await;
        let rotated = t.rotate("pingid", json!({"label": "v2"})).await;
        let new = &rotated["created"];
        assert_eq!(new["current"], true, "{rotated}");
        assert_eq!(rotated["previous"]["id"], old["id"]);
        let expires: chrono::DateTime<chrono::Utc> = rotated["previous"]["expires_at"]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let left = expires - chrono::Utc::now();
        assert!(
            left > chrono::Duration::seconds(3590) && left <= chrono::Duration::seconds(3600),
            "{left}"
        );
        assert!(t.active(&client, old["value"].as_str().unwrap()).await);
        assert!(t.active(&client, new["value"].as_str().unwrap()).await);
        let current = t.server.server.as_ref().unwrap().tokens.current_values();
        assert_eq!(current["pingid"].token_id, id_of(new));

        // Rotation to an imported value; the previous one's expiry is never lengthened.
        let imported = "vendor-issued-token-ABCDEFGH";
        let again = t
            .rotate("pingid", json!({"label": "v3", "value": imported}))
            .await;
        assert!(again["created"].get("value").is_none(), "{again}");
        assert_eq!(again["previous"]["id"], new["id"]);
        assert!(t.active(&client, imported).await);
        let listed = t.tokens("pingid").await;
        let v1 = listed.iter().find(|x| x["id"] == old["id"]).unwrap();
        assert_eq!(v1["expires_at"], rotated["previous"]["expires_at"]);

        // A short overlap ends: the old token stops, the new one goes on.
        let first = t.token("short", json!({})).await;
        let second = t.rotate("short", json!({})).await;
        let first_value = first["value"].as_str().unwrap();
        assert!(
            t.active(&short_client, first_value).await,
            "during the overlap"
        );
        tokio::time::sleep(Duration::from_millis(3200)).await;
        assert!(
            !t.active(&short_client, first_value).await,
            "after the overlap"
        );
        assert!(
            t.active(&short_client, second["created"]["value"].as_str().unwrap())
                .await
        );
        // Each integration validates its own tokens only.
        assert!(!t.active(&short_client, imported).await);
        t.server.stop().await;
    }
}

#[tokio::test]
async fn revoking_the_last_active_token_needs_force_only_where_a_policy_delivers_it() {
    for db in TestDb::all().await {
        let t = Tokens::start_on(&db).await;
        t.integration("pingid", 3600).await;
        t.integration("other", 3600).await;
        t.deliver(&["pingid"]).await;
        // An integration no policy delivers: its last active token goes without force.
        let other_client = t.client("other").await;
        let lone = t.token("other", json!({})).await;
        let (status, body) = t.revoke("other", &id_of(&lone), false).await;
        assert_eq!(status, StatusCode::OK, "{}: {body}", db.name());
        assert_eq!(body["status"], "revoked");
        assert!(
            !t.active(&other_client, lone["value"].as_str().unwrap())
                .await
        );

        let client = t.client("pingid").await;
        let old = t.token("pingid", json!({})).await;
        let (status, body) = t.revoke("pingid", &id_of(&old), false).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert_eq!(body["error"]["code"], "last_active_token");
        assert!(t.active(&client, old["value"].as_str().unwrap()).await);

        // With a replacement active, the old one goes at once.
        let rotated = t.rotate("pingid", json!({})).await;
        let new = &rotated["created"];
        let (status, body) = t.revoke("pingid", &id_of(&old), false).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["status"], "revoked");
        assert!(!t.active(&client, old["value"].as_str().unwrap()).await);
        // Again: nothing changes.
        let (status, _) = t.revoke("pingid", &id_of(&old), false).await;
        assert_eq!(status, StatusCode::OK);

        // A scheduled token is no replacement.
        t.token("pingid", json!({"not_before": in_secs(86_400)}))
            .await;
        let (status, _) = t.revoke("pingid", &id_of(new), false).await;
        assert_eq!(status, StatusCode::CONFLICT);
        let (status, body) = t.revoke("pingid", &id_of(new), true).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert!(!t.active(&client, new["value"].as_str().unwrap()).await);
        assert!(
            !t.server
                .server
                .as_ref()
                .unwrap()
                .tokens
                .current_values()
                .contains_key("pingid"),
            "nothing to deliver"
        );
        let (status, _) = t.revoke("pingid", "0000000000000000", true).await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        // Every change was audited.
        let audit = t
            .server
            .get_json("/api/v1/audit?limit=100", Some(&t.admin))
            .await;
        let actions: Vec<&str> = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["action"].as_str().unwrap())
            .collect();
        for action in [
            "token-integration.create",
            "app-client.create",
            "token.create",
            "token.rotate",
            "token.revoke",
        ] {
            assert!(actions.contains(&action), "{action}: {actions:?}");
        }
        let refused = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["action"] == "token.revoke" && e["outcome"] == "failure");
        assert!(refused.is_some(), "the refusal is audited");
        t.server.stop().await;
    }
}

#[tokio::test]
async fn validation_refuses_every_bad_token_alike() {
    let t = Tokens::start_on(&TestDb::Sqlite).await;
    t.integration("pingid", 0).await;
    t.integration("other", 3600).await;
    let client = t.client("pingid").await;
    let good = t.token("pingid", json!({})).await;
    let good_value = good["value"].as_str().unwrap().to_owned();
    let spare = t.token("pingid", json!({})).await;
    let revoked = t.token("pingid", json!({})).await;
    let (status, _) = t.revoke("pingid", &id_of(&revoked), false).await;
    assert_eq!(status, StatusCode::OK);
    let expiring = t.token("pingid", json!({"expires_at": in_secs(1)})).await;
    let other = t.token("other", json!({})).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;

    let mut wrong = good_value.clone();
    wrong.replace_range(0..1, if wrong.starts_with('A') { "B" } else { "A" });
    let refused = [
        wrong.as_str(),
        revoked["value"].as_str().unwrap(),
        expiring["value"].as_str().unwrap(),
        other["value"].as_str().unwrap(),
        "",
        "has a space",
        "ünïcödé",
        &"x".repeat(2000),
    ];
    for token in refused {
        let answer = t.validate(&client, token).await;
        assert_eq!(answer, json!({"active": false}), "{token:.40}");
    }
    let answer = t.validate(&client, &good_value).await;
    assert_eq!(answer, json!({"active": true, "integration": "pingid"}));
    assert!(t.active(&client, spare["value"].as_str().unwrap()).await);

    // Malformed requests (not tokens) are errors, after authentication.
    let (status, _) = validate_raw(&t.server, Some(&client), json!({"tok": "x"})).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = validate_raw(
        &t.server,
        Some(&client),
        json!({"token": good_value, "device": "x' OR 1=1 --"}),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let big = t
        .server
        .client
        .post(t.server.url("/validate/v1/tokens"))
        .basic_auth(&client.id, Some(&client.secret))
        .body(format!("{{\"token\": \"{}\"}}", "x".repeat(5000)))
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // The outcomes are counted per integration.
    let metrics = t.server.get_text("/metrics").await;
    // (An expired token is "expired" until the index drops it at its expiry, then "unknown".)
    for outcome in ["active", "unknown", "malformed"] {
        let line = format!(
            "trustbroker_token_validations_total{{integration=\"pingid\",outcome=\"{outcome}\"}}"
        );
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }
    t.server.stop().await;
}

#[tokio::test]
async fn a_validation_reports_the_device_only_for_an_active_token() {
    for db in TestDb::all().await {
        let t = Tokens::start_on(&db).await;
        t.integration("pingid", 3600).await;
        let client = t.client("pingid").await;
        let token = t.token("pingid", json!({})).await;
        let value = token["value"].as_str().unwrap();
        let device = Device::enroll(&t.server, &t.server.challenge(&t.admin).await).await;
        device.check_in(&t.server).await;

        let answer = validate_at(
            &t.server,
            &client,
            json!({"token": value, "device": device.udid}),
        )
        .await;
        assert_eq!(
            answer,
            json!({"active": true, "integration": "pingid",
                   "device": {"enrolled": true, "retired": false}}),
            "{}",
            db.name()
        );
        // By serial number too.
        let answer = validate_at(
            &t.server,
            &client,
            json!({"token": value, "device": "C02SIMULATED"}),
        )
        .await;
        assert_eq!(answer["device"]["enrolled"], true, "{answer}");
        // A device never seen.
        let answer = validate_at(
            &t.server,
            &client,
            json!({"token": value, "device": "UNKNOWN-DEVICE"}),
        )
        .await;
        assert_eq!(
            answer["device"],
            json!({"enrolled": false, "retired": false})
        );
        // Nothing about the device with an inactive token.
        let answer = validate_at(
            &t.server,
            &client,
            json!({"token": "not-a-token-at-all", "device": device.udid}),
        )
        .await;
        assert_eq!(answer, json!({"active": false}));

        let (status, body) = t
            .call(
                Method::POST,
                &format!("/enrollments/{}/retire", device.udid),
                None,
            )
            .await;
        assert!(status.is_success(), "{body}");
        let answer = validate_at(
            &t.server,
            &client,
            json!({"token": value, "device": device.udid}),
        )
        .await;
        assert_eq!(
            answer["device"],
            json!({"enrolled": false, "retired": true}),
            "{answer}"
        );
        t.server.stop().await;
    }
}

#[tokio::test]
async fn bad_or_revoked_client_credentials_are_refused() {
    let t = Tokens::start_on(&TestDb::Sqlite).await;
    t.integration("pingid", 3600).await;
    let client = t.client("pingid").await;
    let token = t.token("pingid", json!({})).await;
    let value = token["value"].as_str().unwrap();
    let body = json!({"token": value});

    let (status, _) = validate_raw(&t.server, None, body.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let wrong_secret = Client {
        secret: "A".repeat(43),
        ..client.clone()
    };
    let unknown = Client {
        id: "tbc_0000000000000000".into(),
        ..client.clone()
    };
    for bad in [&wrong_secret, &unknown] {
        let response = t
            .server
            .client
            .post(t.server.url("/validate/v1/tokens"))
            .basic_auth(&bad.id, Some(&bad.secret))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        let challenge = response.headers()["www-authenticate"].to_str().unwrap();
        assert!(challenge.starts_with("Basic "), "{challenge}");
    }
    // An admin key is no client credential.
    let response = t
        .server
        .client
        .post(t.server.url("/validate/v1/tokens"))
        .bearer_auth(&t.admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    assert_eq!(
        validate_at(&t.server, &client, body.clone()).await["active"],
        true
    );
    let (status, revoked) = t
        .call(
            Method::POST,
            &format!("/token-integrations/pingid/clients/{}/revoke", client.id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert!(revoked["revoked_at"].is_string());
    let (status, _) = validate_raw(&t.server, Some(&client), body.clone()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "revoked at once");
    let (_, clients) = t
        .call(Method::GET, "/token-integrations/pingid/clients", None)
        .await;
    assert_eq!(clients["clients"][0]["id"], client.id.as_str());
    assert!(clients["clients"][0].get("secret_hash").is_none());

    // The refusals are audited (records are written off the request path).
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let audit = t
            .server
            .get_json("/api/v1/audit?action=token.validate", Some(&t.admin))
            .await;
        let denied = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["outcome"] == "denied")
            .count();
        if denied >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "{audit:#}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    t.server.stop().await;
}

#[tokio::test]
async fn a_client_over_its_rate_gets_429() {
    let server = TestServer::start_configured(
        |_| {},
        "[tokens]\nvalidations_per_client_per_second = 1\nvalidation_burst = 3\n",
    )
    .await;
    let t = Tokens::with(server).await;
    t.integration("pingid", 3600).await;
    let client = t.client("pingid").await;
    let other = t.client("pingid").await;
    let body = json!({"token": "whatever-token"});
    for _ in 0..3 {
        let (status, _) = validate_raw(&t.server, Some(&client), body.clone()).await;
        assert_eq!(status, StatusCode::OK);
    }
    let response = t
        .server
        .client
        .post(t.server.url("/validate/v1/tokens"))
        .basic_auth(&client.id, Some(&client.secret))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(response.headers()["retry-after"], "1");
    // Per client: another one is not held back.
    let (status, _) = validate_raw(&t.server, Some(&other), body.clone()).await;
    assert_eq!(status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = validate_raw(&t.server, Some(&client), body).await;
    assert_eq!(status, StatusCode::OK, "refilled");
    t.server.stop().await;
}

#[tokio::test]
async fn reveal_needs_its_own_scope_and_is_audited() {
    let t = Tokens::start_on(&TestDb::Sqlite).await;
    t.integration("pingid", 3600).await;
    let created = t.token("pingid", json!({})).await;
    let id = id_of(&created);
    let writer = t
        .server
        .admin_key("writer", &["tokens:read", "tokens:write"])
        .await;
    let revealer = t.server.admin_key("revealer", &["tokens:reveal"]).await;
    let path = format!("/token-integrations/pingid/tokens/{id}/reveal");
    let (status, _) = t.call_as(&writer, Method::GET, &path, None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A read key sees the token, never its value.
    let (status, shown) = t
        .call_as(
            &writer,
            Method::GET,
            &format!("/token-integrations/pingid/tokens/{id}"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(shown.get("value").is_none(), "{shown}");
    let response = t
        .server
        .client
        .get(t.server.url(&format!("/api/v1{path}")))
        .bearer_auth(&revealer)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["cache-control"], "no-store");
    let revealed: Json = response.json().await.unwrap();
    assert_eq!(revealed["value"], created["value"]);
    // Imported values are revealed the same way.
    let imported = t
        .token("pingid", json!({"value": "typed-in-from-the-portal"}))
        .await;
    let (_, revealed) = t
        .call_as(
            &revealer,
            Method::GET,
            &format!(
                "/token-integrations/pingid/tokens/{}/reveal",
                id_of(&imported)
            ),
            None,
        )
        .await;
    assert_eq!(revealed["value"], "typed-in-from-the-portal");

    let audit = t
        .server
        .get_json("/api/v1/audit?action=token.reveal", Some(&t.admin))
        .await;
    let entries = audit["entries"].as_array().unwrap();
    assert_eq!(entries.len(), 2, "{audit:#}");
    assert_eq!(entries[1]["actor"], "key:revealer");
    assert_eq!(entries[1]["target"], format!("pingid/{id}"));
    let denied = t
        .server
        .get_json("/api/v1/audit?outcome=denied", Some(&t.admin))
        .await;
    assert!(
        denied["entries"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["actor"] == "key:writer"),
        "the refused reveal is audited: {denied:#}"
    );
    t.server.stop().await;
}

#[tokio::test]
async fn acknowledged_deliveries_are_counted_per_token() {
    for db in TestDb::all().await {
        let t = Tokens::start_on(&db).await;
        t.integration("pingid", 3600).await;
        let token = t.token("pingid", json!({})).await;
        let device = Device::enroll(&t.server, &t.server.challenge(&t.admin).await).await;
        device.check_in(&t.server).await;
        let (status, queued) = t
            .call(
                Method::POST,
                "/commands",
                Some(json!({"enrollment_ids": [device.udid],
                            "command": {"RequestType": "ProfileList"}})),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{queued}");
        let uuid = queued["commands"][0]["command_uuid"].as_str().unwrap();
        let store = t.server.store();
        let record = store.device(&device.udid).await.unwrap().unwrap();
        let item = "app:com.pingidentity.pingid";
        store
            .record_token_delivery(
                &id_of(&token),
                &record.enrollment_id,
                &device.udid,
                item,
                uuid,
            )
            .await
            .unwrap();
        // The latest command for the pair wins; recording it twice changes nothing.
        store
            .record_token_delivery(
                &id_of(&token),
                &record.enrollment_id,
                &device.udid,
                item,
                uuid,
            )
            .await
            .unwrap();
        let counts = |tokens: Vec<Json>| {
            (
                tokens[0]["delivered"].clone(),
                tokens[0]["acknowledged"].clone(),
            )
        };
        assert_eq!(
            counts(t.tokens("pingid").await),
            (json!(1), json!(0)),
            "{}",
            db.name()
        );
        let offered = device.idle(&t.server).await.expect("the command");
        assert_eq!(offered["CommandUUID"].as_string(), Some(uuid));
        device
            .report(
                &t.server,
                "Acknowledged",
                Some(uuid),
                plist::Dictionary::new(),
            )
            .await;
        assert_eq!(counts(t.tokens("pingid").await), (json!(1), json!(1)));
        t.server.stop().await;
    }
}

#[tokio::test]
async fn revocation_holds_on_a_second_node_within_a_second() {
    let Some(pg) = crate::harness::PgTestDb::create().await else {
        return;
    };
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("secret.key");
    let node = || {
        let (url, key_file) = (pg.url.clone(), key_file.clone());
        TestServer::start_with(move |args| {
            args.database_url = Some(url);
            args.secret_key_file = Some(key_file);
        })
    };
    let first = Tokens::with(node().await).await;
    let second = node().await;
    first.integration("pingid", 3600).await;
    let client = first.client("pingid").await;
    let old = first.token("pingid", json!({})).await;
    let old_value = old["value"].as_str().unwrap().to_owned();
    let rotated = first.rotate("pingid", json!({})).await;
    let new_value = rotated["created"]["value"].as_str().unwrap().to_owned();
    // The second node learns of the client and tokens by itself.
    let until = |deadline_ms: u64, check: Json| {
        let (second, client) = (&second, &client);
        async move {
            let started = Instant::now();
            loop {
                let answer = validate_raw(second, Some(client), check.clone()).await.1;
                if answer["active"] == false {
                    return started.elapsed();
                }
                assert!(
                    started.elapsed() < Duration::from_millis(deadline_ms),
                    "still active on the second node: {answer}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(2);
    while validate_raw(&second, Some(&client), json!({"token": old_value}))
        .await
        .1["active"]
        != true
    {
        assert!(
            Instant::now() < deadline,
            "the second node never saw the token"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while validate_at(&second, &client, json!({"token": new_value})).await["active"] != true {
        assert!(
            Instant::now() < deadline,
            "the second node never saw the rotation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Both nodes share the lookup key: the values open and hash the same everywhere.
    assert_eq!(
        second.server.as_ref().unwrap().tokens.current_values()["pingid"].value,
        new_value
    );

    let (status, body) = first.revoke("pingid", &id_of(&old), false).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let took = until(1000, json!({"token": old_value})).await;
    eprintln!("revocation reached the second node in {took:?}");
    assert!(validate_at(&second, &client, json!({"token": new_value})).await["active"] == true);

    // A revoked client too.
    let (status, _) = first
        .call(
            Method::POST,
            &format!("/token-integrations/pingid/clients/{}/revoke", client.id),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    let started = Instant::now();
    loop {
        let (status, _) = validate_raw(&second, Some(&client), json!({"token": new_value})).await;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "client still accepted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    second.stop().await;
    first.server.stop().await;
}

/// Runs the binary with `--data-dir data` off the test's thread: the server under test shares
/// that thread (a current-thread runtime), and a transaction it has open must be able to
/// finish while the command waits for the database.
async fn run_cli_beside(
    data: &str,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (bool, String, String) {
    let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    all.extend(["--data-dir".to_string(), data.to_string()]);
    let envs: Vec<(String, String)> = envs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        let envs: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        run_cli(&args, &envs)
    })
    .await
    .unwrap()
}

#[tokio::test]
async fn the_command_line_manages_integrations_tokens_and_clients() {
    let server = TestServer::start().await;
    let data_dir = server
        .server
        .as_ref()
        .unwrap()
        .tls_cert_path
        .parent()
        .and_then(|tls| tls.parent())
        .unwrap()
        .to_path_buf();
    let data = data_dir.to_str().unwrap();
    let cli = async |args: &[&str], envs: &[(&str, &str)]| {
        let (ok, out, err) = run_cli_beside(data, args, envs).await;
        assert!(ok, "{args:?}: {err}");
        out
    };
    cli(
        &[
            "token",
            "integration",
            "create",
            "--name",
            "pingid",
            "--bundle-id",
            "com.pingidentity.pingid",
            "--config-key",
            "PINGID_MDM_TOKEN",
        ],
        &[],
    )
    .await;
    let listed = cli(&["token", "integration", "list"], &[]).await;
    assert!(listed.contains("PINGID_MDM_TOKEN"), "{listed}");
    let value = "vendor-portal-token-0001";
    let import = [
        "token",
        "import",
        "--integration",
        "pingid",
        "--label",
        "portal",
    ];
    let out = cli(&import, &[("TRUSTBROKER_TOKEN_VALUE", value)]).await;
    assert!(
        !out.contains(value),
        "an import never prints the value: {out}"
    );
    let out = cli(&["token", "create", "--integration", "pingid"], &[]).await;
    let generated = out.lines().last().unwrap().trim().to_owned();
    assert_eq!(generated.len(), 43, "{out}");
    let out = cli(&["app-client", "create", "--integration", "pingid"], &[]).await;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap()
            .trim()
            .to_owned()
    };
    let client = Client {
        id: field("client_id "),
        secret: field("client_secret "),
    };
    let listed = cli(&["token", "list", "--integration", "pingid"], &[]).await;
    assert!(
        listed.contains("0001") && !listed.contains(value),
        "{listed}"
    );
    assert!(!listed.contains(&generated), "{listed}");

    // The running server picks up what the command line did (another process) by itself.
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (status, answer) = validate_raw(&server, Some(&client), json!({"token": value})).await;
        if status == StatusCode::OK && answer["active"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "{status} {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Revoking the last active token of an integration a policy delivers is refused without
    // --force; then rotated and revoked.
    let policy_admin = server.admin_key("policy-admin", &["admin"]).await;
    apply_delivering(&server, &policy_admin, &["pingid"]).await;
    let ids: Vec<String> = cli(&["token", "list", "--integration", "pingid"], &[])
        .await
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().next().unwrap().to_owned())
        .collect();
    assert_eq!(ids.len(), 2);
    let revoke = |id: &str| ["token", "revoke", "--integration", "pingid", id].map(str::to_owned);
    let older = revoke(&ids[1]);
    let (ok, _, err) = run_cli_beside(data, &older.each_ref().map(String::as_str), &[]).await;
    assert!(ok, "another token is active: {err}");
    let last = revoke(&ids[0]);
    let (ok, _, err) = run_cli_beside(data, &last.each_ref().map(String::as_str), &[]).await;
    assert!(!ok && err.contains("force"), "{err}");
    cli(&["token", "rotate", "--integration", "pingid"], &[]).await;
    let revoke_client = [
        "app-client",
        "revoke",
        "--integration",
        "pingid",
        &client.id,
    ];
    cli(&revoke_client, &[]).await;
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (status, _) = validate_raw(&server, Some(&client), json!({"token": value})).await;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert!(Instant::now() < deadline, "{status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = cli(&["app-client", "list", "--integration", "pingid"], &[]).await;
    assert!(listed.contains("LAST USED"), "{listed}");
    // Deleting the integration: refused while a policy delivers it, then forced.
    let delete = ["token", "integration", "delete", "pingid"];
    let (ok, _, err) = run_cli_beside(data, &delete, &[]).await;
    assert!(!ok && err.contains("force"), "{err}");
    let out = cli(
        &["token", "integration", "delete", "pingid", "--force"],
        &[],
    )
    .await;
    assert!(out.contains("deleted integration 'pingid'"), "{out}");
    let listed = cli(&["token", "integration", "list"], &[]).await;
    assert!(!listed.contains("PINGID_MDM_TOKEN"), "{listed}");
    let auditor = server.admin_key("auditor", &["audit:read"]).await;
    let audit = server
        .get_json("/api/v1/audit?limit=50", Some(&auditor))
        .await;
    let cli_actions = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["actor"].as_str().unwrap().starts_with("cli:"))
        .count();
    assert!(cli_actions >= 7, "{audit:#}");
    server.stop().await;
}

#[tokio::test]
async fn deleting_an_integration_is_refused_while_in_use_and_revokes_everything_it_had() {
    for db in TestDb::all().await {
        let t = Tokens::start_on(&db).await;
        t.integration("pingid", 3600).await;
        let client = t.client("pingid").await;
        let token = t.token("pingid", json!({})).await;
        let value = token["value"].as_str().unwrap().to_owned();
        t.deliver(&["pingid"]).await;
        let delete = async |force: bool| {
            t.call(
                Method::DELETE,
                "/token-integrations/pingid",
                Some(json!({"force": force})),
            )
            .await
        };

        // A policy delivers it: refused, nothing changed.
        let (status, body) = delete(false).await;
        assert_eq!(status, StatusCode::CONFLICT, "{}: {body}", db.name());
        assert_eq!(body["error"]["code"], "integration_in_use");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("policies"),
            "{body}"
        );
        assert!(t.active(&client, &value).await);

        // No policy delivers it, but its token is active: still refused.
        t.deliver(&[]).await;
        let (status, body) = delete(false).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        assert!(
            body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("1 active token"),
            "{body}"
        );
        assert!(t.active(&client, &value).await);

        // With force: deleted, its token and client refused at once.
        let (status, body) = delete(true).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["revoked"]["tokens"], 1, "{body}");
        assert_eq!(body["revoked"]["app_clients"], 1, "{body}");
        let (status, _) = validate_raw(&t.server, Some(&client), json!({"token": value})).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "the client went with it");
        let (status, _) = t
            .call(Method::GET, "/token-integrations/pingid", None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        let (status, listed) = t.call(Method::GET, "/token-integrations", None).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(listed["integrations"], json!([]), "{listed}");
        let (status, _) = delete(true).await;
        assert_eq!(status, StatusCode::NOT_FOUND);

        // The name can be used again; the old token stays revoked.
        t.integration("pingid", 3600).await;
        let fresh = t.client("pingid").await;
        assert!(!t.active(&fresh, &value).await);
        assert!(
            t.tokens("pingid")
                .await
                .iter()
                .all(|t| t["status"] == "revoked")
        );

        let audit = t
            .server
            .get_json("/api/v1/audit?limit=100", Some(&t.admin))
            .await;
        let deletes: Vec<&str> = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["action"] == "token-integration.delete")
            .map(|e| e["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(
            deletes.iter().filter(|o| **o == "failure").count(),
            3,
            "{deletes:?}"
        );
        assert_eq!(
            deletes.iter().filter(|o| **o == "success").count(),
            1,
            "{deletes:?}"
        );
        t.server.stop().await;
    }
}

#[tokio::test]
async fn app_clients_show_when_they_last_validated() {
    for db in TestDb::all().await {
        let t = Tokens::start_on(&db).await;
        t.integration("pingid", 3600).await;
        let used = t.client("pingid").await;
        let idle = t.client("pingid").await;
        let token = t.token("pingid", json!({})).await;
        let tokens = t.server.server.as_ref().unwrap().tokens.clone();
        let last_used = async || -> Json {
            let (status, body) = t
                .call(Method::GET, "/token-integrations/pingid/clients", None)
                .await;
            assert_eq!(status, StatusCode::OK, "{body}");
            body["clients"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| {
                    (
                        c["id"].as_str().unwrap().to_owned(),
                        c["last_used_at"].clone(),
                    )
                })
                .collect::<serde_json::Map<String, Json>>()
                .into()
        };
        // Validations alone write nothing (no write per validation).
        for _ in 0..5 {
            assert!(t.active(&used, token["value"].as_str().unwrap()).await);
        }
        let before = last_used().await;
        assert_eq!(before[&used.id], Json::Null, "{}: {before}", db.name());
        // The once-a-minute write (called here rather than waited for).
        tokens.flush_client_use().await;
        let after = last_used().await;
        let at: chrono::DateTime<chrono::Utc> =
            serde_json::from_value(after[&used.id].clone()).unwrap();
        assert!(
            (chrono::Utc::now() - at).num_seconds().abs() <= 5,
            "{after}"
        );
        assert_eq!(after[&idle.id], Json::Null, "{after}");
        t.server.stop().await;
    }
}
