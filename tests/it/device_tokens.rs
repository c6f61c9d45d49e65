//! Per-device signed tokens: issued for an enrolled device, verified by an independent JWT
//! implementation (jose, run by `tests/peers/jwt.sh`) against the JWKS served over HTTPS, also
//! across a key rotation; introspection (RFC 7662) active for a good token and inactive for
//! forged, tampered, expired, other-audience, revoked and retired ones.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::{Value as Json, json};
use trustbroker::identity::{Group, Identity};
use trustbroker::pki::challenge::{self, ChallengeRequest};
use trustbroker::tokens::device::{DeviceTokenError, DeviceTokenRequest, DeviceTokens};

use crate::device::Device;
use crate::harness::{TestDb, TestServer, peer_env, run_cli};

const DAY: Duration = Duration::from_secs(86_400);

struct Broker {
    server: TestServer,
    admin: String,
    data_dir: tempfile::TempDir,
    database_url: Option<String>,
}

/// An enrolled device and who owns it.
struct Enrolled {
    device: Device,
    enrollment_id: String,
    owner_id: String,
    email: String,
}

/// An app client's credentials.
struct Client {
    id: String,
    secret: String,
}

impl Broker {
    async fn start(db: &TestDb) -> Broker {
        let data_dir = tempfile::tempdir().unwrap();
        let path = data_dir.path().to_path_buf();
        let database_url = db.database_url();
        let url = database_url.clone();
        let server = TestServer::start_with(move |args| {
            args.data_dir = Some(path);
            args.database_url = url;
        })
        .await;
        let admin = server.admin_key("device-tokens-admin", &["admin"]).await;
        Broker {
            server,
            admin,
            data_dir,
            database_url,
        }
    }

    fn tokens(&self) -> DeviceTokens {
        self.server.server.as_ref().unwrap().device_tokens.clone()
    }

    fn issuer(&self) -> String {
        self.server.server.as_ref().unwrap().public_url.clone()
    }

    /// A person signed in with groups, and a device enrolled (SCEP, Authenticate,
    /// TokenUpdate) under a fresh enrollment record issued to them.
    async fn enrolled(&self, login: &str) -> Enrolled {
        let user = self
            .server
            .store()
            .record_sign_in(
                &Identity {
                    provider: "corp".into(),
                    subject: format!("subject-{login}"),
                    login: Some(login.into()),
                    email: Some(format!("{login}@example.org")),
                    display_name: None,
                    groups: vec![Group {
                        id: "staff".into(),
                        name: "Staff".into(),
                    }],
                },
                "sign-in",
            )
            .await
            .unwrap();
        let issued = challenge::create(
            self.server.store(),
            Duration::from_secs(600),
            ChallengeRequest {
                requested_by: "portal".into(),
                user_id: Some(user.id.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let device = Device::enroll(&self.server, &issued.challenge).await;
        device.check_in(&self.server).await;
        Enrolled {
            device,
            enrollment_id: issued.enrollment_id,
            owner_id: user.id,
            email: format!("{login}@example.org"),
        }
    }

    /// An integration with device tokens, and an app client of its own (admin API).
    async fn integration(&self, name: &str) -> Client {
        let created = self
            .post_admin(
                "/api/v1/token-integrations",
                json!({"name": name, "bundle_id": format!("com.example.{name}"),
                       "config_key": "MDM_TOKEN", "device_tokens": true}),
            )
            .await;
        assert!(created.is_object(), "{created}");
        let client = self
            .post_admin(
                &format!("/api/v1/token-integrations/{name}/clients"),
                json!({}),
            )
            .await;
        Client {
            id: client["id"].as_str().unwrap().to_owned(),
            secret: client["client_secret"].as_str().unwrap().to_owned(),
        }
    }

    async fn post_admin(&self, path: &str, body: Json) -> Json {
        let response = self
            .server
            .client
            .post(self.server.url(path))
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        assert!(
            response.status().is_success(),
            "POST {path}: {}",
            response.status()
        );
        response.json().await.unwrap()
    }

    async fn jwks(&self) -> Json {
        let response = self
            .server
            .client
            .get(self.server.url("/.well-known/jwks.json"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["cache-control"].to_str().unwrap(),
            "public, max-age=300"
        );
        response.json().await.unwrap()
    }

    /// `POST /validate/v1/introspect` with a form body, as RFC 7662 has it.
    async fn introspect(&self, client: &Client, token: &str) -> Json {
        let response = self
            .server
            .client
            .post(self.server.url("/validate/v1/introspect"))
            .basic_auth(&client.id, Some(&client.secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("token={token}&token_type_hint=device"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(
            response.headers()["cache-control"].to_str().unwrap(),
            "no-store"
        );
        response.json().await.unwrap()
    }

    async fn active(&self, client: &Client, token: &str) -> bool {
        let answer = self.introspect(client, token).await;
        let active = answer["active"].as_bool().unwrap();
        if !active {
            assert_eq!(
                answer,
                json!({"active": false}),
                "inactive answers say nothing else"
            );
        }
        active
    }

    async fn rotate(&self, body: Json) -> (StatusCode, Json) {
        let response = self
            .server
            .client
            .post(self.server.url("/api/v1/token-signing-keys/rotate"))
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        (response.status(), response.json().await.unwrap())
    }

    /// The command line, against this broker's database.
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let mut all: Vec<&str> = args.to_vec();
        let data = self.data_dir.path().to_str().unwrap();
        all.extend(["--data-dir", data]);
        if let Some(url) = &self.database_url {
            all.extend(["--database-url", url]);
        }
        run_cli(&all, &[])
    }
}

fn request<'a>(
    integration: &'a str,
    enrolled: &'a Enrolled,
    groups: &'a [String],
) -> DeviceTokenRequest<'a> {
    DeviceTokenRequest {
        integration,
        enrollment_id: &enrolled.enrollment_id,
        udid: &enrolled.device.udid,
        owner_id: Some(&enrolled.owner_id),
        owner_email: Some(&enrolled.email),
        groups,
        lifetime: None,
    }
}

/// What jose (tests/peers/jwt/verify.mjs) says of `token` against `jwks`.
async fn jose_verify(script: &str, jwks: &Json, token: &str, issuer: &str, audience: &str) -> Json {
    let input = json!({"jwks": jwks, "token": token, "issuer": issuer, "audience": audience});
    let script = script.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut child = Command::new("node")
            .arg(&script)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("node runs");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.to_string().as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "verify.mjs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("one JSON line")
    })
    .await
    .unwrap()
}

fn kids(jwks: &Json) -> Vec<String> {
    jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect()
}

fn b64(bytes: impl AsRef<[u8]>) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn part(token: &str, n: usize) -> String {
    token.split('.').nth(n).unwrap().to_owned()
}

fn decoded(token: &str, n: usize) -> Json {
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part(token, n)).unwrap()).unwrap()
}

#[tokio::test]
async fn device_tokens_verify_with_an_independent_library_against_the_jwks_across_rotation() {
    let Some(script) = peer_env("TRUSTBROKER_TEST_JWT_VERIFY") else {
        return;
    };
    for db in TestDb::all().await {
        let broker = Broker::start(&db).await;
        let tokens = broker.tokens();
        let issuer = broker.issuer();
        let alice = broker.enrolled("alice").await;
        let groups = vec!["corp:staff".to_string(), "corp:apple-users".to_string()];

        let first = tokens
            .current_or_issue(request("pingid", &alice, &groups), DAY)
            .await
            .unwrap();
        assert!(!first.reused);
        let header = decoded(&first.jwt, 0);
        assert_eq!(header["alg"], "ES256");
        assert_eq!(header["typ"], "JWT");
        assert_eq!(header["kid"], first.kid.as_str());

        // Published: the current key and the next one, each a P-256 signing key.
        let jwks = broker.jwks().await;
        assert_eq!(jwks["keys"].as_array().unwrap().len(), 2, "{}", db.name());
        for key in jwks["keys"].as_array().unwrap() {
            assert_eq!(key["kty"], "EC");
            assert_eq!(key["crv"], "P-256");
            assert_eq!(key["alg"], "ES256");
            assert_eq!(key["use"], "sig");
            assert!(key.get("d").is_none(), "no private part");
        }
        assert!(kids(&jwks).contains(&first.kid));

        let verified = jose_verify(&script, &jwks, &first.jwt, &issuer, "pingid").await;
        assert_eq!(verified["ok"], true, "{verified}");
        let payload = &verified["payload"];
        assert_eq!(payload["iss"], issuer.as_str());
        assert_eq!(payload["aud"], "pingid");
        assert_eq!(payload["sub"], alice.device.udid.as_str());
        assert_eq!(payload["owner"], alice.owner_id.as_str());
        assert_eq!(payload["email"], "alice@example.org");
        assert_eq!(payload["groups"], json!(["corp:apple-users", "corp:staff"]));
        assert_eq!(payload["jti"], first.jti.as_str());
        assert_eq!(payload["nbf"], payload["iat"]);
        let lifetime = payload["exp"].as_i64().unwrap() - payload["iat"].as_i64().unwrap();
        assert_eq!(lifetime, 7 * 86_400, "the default lifetime is 7 days");
        // jose checks the audience and the issuer, not only the signature.
        let other = jose_verify(&script, &jwks, &first.jwt, &issuer, "other-app").await;
        assert_eq!(other["ok"], false);
        let other = jose_verify(&script, &jwks, &first.jwt, "https://elsewhere", "pingid").await;
        assert_eq!(other["ok"], false);

        // A rotation right after the next key's publication is refused: verifiers may cache
        // the JWKS for five minutes. Forced, the next key signs and a new one is published.
        let (status, body) = broker.rotate(json!({})).await;
        assert_eq!(status, StatusCode::CONFLICT, "{body}");
        let (status, body) = broker.rotate(json!({"force": true})).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let rotation = &body["rotation"];
        assert_eq!(rotation["retired"], first.kid.as_str());
        let current = rotation["current"].as_str().unwrap().to_owned();
        let next = rotation["next"].as_str().unwrap().to_owned();
        assert!(
            kids(&jwks).contains(&current),
            "the new signer was published before"
        );

        // The retired key stays published while the token it signed lives.
        let jwks = broker.jwks().await;
        let published = kids(&jwks);
        assert_eq!(published.len(), 3, "{published:?}");
        for kid in [&first.kid, &current, &next] {
            assert!(published.contains(kid), "{kid} in {published:?}");
        }
        let verified = jose_verify(&script, &jwks, &first.jwt, &issuer, "pingid").await;
        assert_eq!(
            verified["ok"], true,
            "the old token after rotation: {verified}"
        );

        // The stored token is still the one delivered; a new one (other groups) is signed by
        // the new current key, and verifies too.
        let again = tokens
            .current_or_issue(request("pingid", &alice, &groups), DAY)
            .await
            .unwrap();
        assert_eq!(again.jwt, first.jwt);
        let fewer = vec!["corp:staff".to_string()];
        let second = tokens
            .current_or_issue(request("pingid", &alice, &fewer), DAY)
            .await
            .unwrap();
        assert_ne!(second.jwt, first.jwt);
        assert_eq!(second.kid, current);
        assert_eq!(decoded(&second.jwt, 0)["kid"], current.as_str());
        let verified = jose_verify(&script, &jwks, &second.jwt, &issuer, "pingid").await;
        assert_eq!(verified["ok"], true, "{verified}");
        assert_eq!(verified["payload"]["groups"], json!(["corp:staff"]));

        // The admin API and the command line list the keys; the command line rotates too,
        // and both rotations are audited.
        let listed = broker
            .server
            .get_json("/api/v1/token-signing-keys", Some(&broker.admin))
            .await;
        let statuses: Vec<(&str, &str)> = listed["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| (k["kid"].as_str().unwrap(), k["status"].as_str().unwrap()))
            .collect();
        assert!(statuses.contains(&(first.kid.as_str(), "retired")));
        assert!(statuses.contains(&(current.as_str(), "current")));
        assert!(statuses.contains(&(next.as_str(), "next")));
        let (ok, _, stderr) = broker.cli(&["signing-key", "rotate"]);
        assert!(!ok, "refused without --force: the next key is new");
        assert!(stderr.contains("force"), "{stderr}");
        let (ok, stdout, stderr) = broker.cli(&["signing-key", "rotate", "--force"]);
        assert!(ok, "{stderr}");
        assert!(stdout.contains(&format!("{next} signs now")), "{stdout}");
        let (ok, stdout, stderr) = broker.cli(&["signing-key", "list"]);
        assert!(ok, "{stderr}");
        assert_eq!(stdout.lines().count(), 1 + 4, "{stdout}");
        let audit = broker
            .server
            .get_json(
                "/api/v1/audit?action=token-signing-key.rotate",
                Some(&broker.admin),
            )
            .await;
        let outcomes: Vec<&str> = audit["entries"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["outcome"].as_str().unwrap())
            .collect();
        assert_eq!(outcomes.len(), 4, "{outcomes:?}");
        assert_eq!(outcomes.iter().filter(|o| **o == "success").count(), 2);

        broker.server.stop().await;
    }
}

#[tokio::test]
async fn introspection_is_active_only_for_our_live_tokens_of_the_callers_integration() {
    for db in TestDb::all().await {
        let broker = Broker::start(&db).await;
        let tokens = broker.tokens();
        let pingid = broker.integration("pingid").await;
        let other = broker.integration("other").await;
        let short = broker.integration("short").await;
        let alice = broker.enrolled("alice").await;
        let groups = vec!["corp:staff".to_string()];
        let issued = tokens
            .current_or_issue(request("pingid", &alice, &groups), DAY)
            .await
            .unwrap();
        let token = issued.jwt.clone();

        let answer = broker.introspect(&pingid, &token).await;
        assert_eq!(answer["active"], true, "{}: {answer}", db.name());
        assert_eq!(answer["token_type"], "device");
        assert_eq!(answer["client_id"], pingid.id.as_str());
        assert_eq!(answer["iss"], broker.issuer().as_str());
        assert_eq!(answer["aud"], "pingid");
        assert_eq!(answer["sub"], alice.device.udid.as_str());
        assert_eq!(answer["owner"], alice.owner_id.as_str());
        assert_eq!(answer["email"], "alice@example.org");
        assert_eq!(answer["groups"], json!(["corp:staff"]));
        assert_eq!(answer["jti"], issued.jti.as_str());
        assert_eq!(answer["exp"], issued.expires_at.timestamp());
        for claim in ["iat", "nbf"] {
            assert!(answer[claim].is_i64(), "{claim}");
        }

        // JSON is accepted as well as the form; the client must authenticate.
        let response = broker
            .server
            .client
            .post(broker.server.url("/validate/v1/introspect"))
            .basic_auth(&pingid.id, Some(&pingid.secret))
            .json(&json!({"token": token}))
            .send()
            .await
            .unwrap();
        let body: Json = response.json().await.unwrap();
        assert_eq!(body["active"], true);
        for (id, secret) in [
            (None, None),
            (Some(pingid.id.as_str()), Some("wrong")),
            (Some("client-nobody"), Some(pingid.secret.as_str())),
        ] {
            let mut request = broker
                .server
                .client
                .post(broker.server.url("/validate/v1/introspect"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("token={token}"));
            if let Some(id) = id {
                request = request.basic_auth(id, secret);
            }
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
            assert!(
                response.headers()["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .starts_with("Basic")
            );
            let body: Json = response.json().await.unwrap();
            assert_eq!(body["error"], "invalid_client");
        }
        let response = broker
            .server
            .client
            .post(broker.server.url("/validate/v1/introspect"))
            .basic_auth(&pingid.id, Some(&pingid.secret))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("token_type_hint=device")
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let body: Json = response.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request");

        // Another integration's client: the token is not for it.
        assert!(!broker.active(&other, &token).await, "wrong audience");

        // Tampering: another device in the claims, or a signature bit flipped.
        let mut claims = decoded(&token, 1);
        claims["sub"] = json!("ANOTHER-DEVICE");
        let forged = format!(
            "{}.{}.{}",
            part(&token, 0),
            b64(claims.to_string()),
            part(&token, 2)
        );
        assert!(!broker.active(&pingid, &forged).await, "tampered claims");
        let mut signature = URL_SAFE_NO_PAD.decode(part(&token, 2)).unwrap();
        signature[10] ^= 0x01;
        let flipped = format!(
            "{}.{}.{}",
            part(&token, 0),
            part(&token, 1),
            b64(&signature)
        );
        assert!(
            !broker.active(&pingid, &flipped).await,
            "tampered signature"
        );

        // `alg: none`, with and without a signature part.
        let none = b64(json!({"alg": "none", "typ": "JWT", "kid": issued.kid}).to_string());
        assert!(
            !broker
                .active(&pingid, &format!("{none}.{}.", part(&token, 1)))
                .await
        );
        assert!(
            !broker
                .active(&pingid, &format!("{none}.{}", part(&token, 1)))
                .await
        );

        // HS256 with our public key as the HMAC secret, in the shapes a confused verifier
        // might use: the JWK's JSON, the raw point, the PEM of the public key.
        let jwks = broker.jwks().await;
        let jwk = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["kid"] == issued.kid.as_str())
            .unwrap()
            .clone();
        let x = URL_SAFE_NO_PAD.decode(jwk["x"].as_str().unwrap()).unwrap();
        let y = URL_SAFE_NO_PAD.decode(jwk["y"].as_str().unwrap()).unwrap();
        let point: Vec<u8> = [vec![0x04], x, y].concat();
        let spki: Vec<u8> = [
            hex::decode("3059301306072a8648ce3d020106082a8648ce3d030107034200").unwrap(),
            point.clone(),
        ]
        .concat();
        let pem = format!(
            "-----BEGIN PUBLIC KEY-----\n{}\n-----END PUBLIC KEY-----\n",
            base64::engine::general_purpose::STANDARD.encode(&spki)
        );
        let hs_header = b64(json!({"alg": "HS256", "typ": "JWT", "kid": issued.kid}).to_string());
        let signing_input = format!("{hs_header}.{}", part(&token, 1));
        for secret in [jwk.to_string().into_bytes(), point, spki, pem.into_bytes()] {
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &secret);
            let mac = ring::hmac::sign(&key, signing_input.as_bytes());
            let hs256 = format!("{signing_input}.{}", b64(mac.as_ref()));
            assert!(
                !broker.active(&pingid, &hs256).await,
                "HS256 with the public key"
            );
        }

        // A kid we never made, garbage, an oversized token.
        let mut header = decoded(&token, 0);
        header["kid"] = json!("not-a-key-of-ours");
        let unknown = format!(
            "{}.{}.{}",
            b64(header.to_string()),
            part(&token, 1),
            part(&token, 2)
        );
        assert!(!broker.active(&pingid, &unknown).await, "unknown kid");
        assert!(!broker.active(&pingid, "not-a-jwt").await);
        let huge = format!(
            "{}.{}.{}",
            part(&token, 0),
            "A".repeat(9000),
            part(&token, 2)
        );
        assert!(!broker.active(&pingid, &huge).await, "over 8 KiB");

        // Expired: a token that lived one second.
        let brief = tokens
            .current_or_issue(
                DeviceTokenRequest {
                    lifetime: Some(Duration::from_secs(1)),
                    ..request("short", &alice, &groups)
                },
                Duration::ZERO,
            )
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(2100)).await;
        assert!(!broker.active(&short, &brief.jwt).await, "expired");

        // Revoked for the integration (the device left the groups in scope): inactive at
        // once; other integrations' tokens stay.
        let for_other = tokens
            .current_or_issue(request("other", &alice, &groups), DAY)
            .await
            .unwrap();
        assert!(broker.active(&pingid, &token).await);
        let revoked = tokens
            .revoke_for(&alice.enrollment_id, Some("pingid"), "left scope")
            .await
            .unwrap();
        assert_eq!(revoked, 1);
        assert!(!broker.active(&pingid, &token).await, "revoked");
        assert!(broker.active(&other, &for_other.jwt).await);

        // Retired: every token of the enrollment is inactive, and no new one is issued.
        let response = broker
            .server
            .client
            .post(broker.server.url(&format!(
                "/api/v1/enrollments/{}/retire",
                alice.enrollment_id
            )))
            .bearer_auth(&broker.admin)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!broker.active(&other, &for_other.jwt).await, "retired");
        let refused = tokens
            .current_or_issue(request("other", &alice, &groups), DAY)
            .await;
        assert!(
            matches!(refused, Err(DeviceTokenError::EnrollmentNotActive { .. })),
            "{refused:?}"
        );

        broker.server.stop().await;
    }
}

#[tokio::test]
async fn current_or_issue_returns_the_same_token_until_its_refresh_window() {
    for db in TestDb::all().await {
        let broker = Broker::start(&db).await;
        let tokens = broker.tokens();
        let bob = broker.enrolled("bob").await;
        let groups = vec!["corp:staff".to_string()];

        // Concurrent passes (on PostgreSQL, concurrent transactions) agree on one token.
        let tasks: Vec<_> = (0..6)
            .map(|_| {
                let tokens = tokens.clone();
                let (enrollment, udid) = (bob.enrollment_id.clone(), bob.device.udid.clone());
                let (owner, email, groups) =
                    (bob.owner_id.clone(), bob.email.clone(), groups.clone());
                tokio::spawn(async move {
                    let request = DeviceTokenRequest {
                        integration: "pingid",
                        enrollment_id: &enrollment,
                        udid: &udid,
                        owner_id: Some(&owner),
                        owner_email: Some(&email),
                        groups: &groups,
                        lifetime: None,
                    };
                    tokens.current_or_issue(request, DAY).await.unwrap()
                })
            })
            .collect();
        let mut issued = Vec::new();
        for task in tasks {
            issued.push(task.await.unwrap());
        }
        let first = issued[0].clone();
        for other in &issued {
            assert_eq!(other.jwt, first.jwt, "{}", db.name());
        }
        assert_eq!(issued.iter().filter(|t| !t.reused).count(), 1);
        let again = tokens
            .current_or_issue(request("pingid", &bob, &groups), DAY)
            .await
            .unwrap();
        assert_eq!(again.jwt, first.jwt);
        assert!(again.reused);

        // A token inside the refresh window is replaced; the old one is not revoked.
        let short = tokens
            .current_or_issue(
                DeviceTokenRequest {
                    lifetime: Some(Duration::from_secs(120)),
                    ..request("short", &bob, &groups)
                },
                Duration::from_secs(60),
            )
            .await
            .unwrap();
        let renewed = tokens
            .current_or_issue(request("short", &bob, &groups), DAY)
            .await
            .unwrap();
        assert_ne!(renewed.jwt, short.jwt, "expires within a day: renewed");
        assert!(!renewed.reused);
        assert!(renewed.expires_at > short.expires_at);
        let standing = broker
            .server
            .store()
            .device_token_standing(&short.jti)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(standing.status, "active");

        // A refresh window as long as the lifetime would renew at every pass: refused.
        let refused = tokens
            .current_or_issue(
                DeviceTokenRequest {
                    lifetime: Some(DAY),
                    ..request("pingid", &bob, &groups)
                },
                DAY,
            )
            .await;
        assert!(
            matches!(refused, Err(DeviceTokenError::Invalid(_))),
            "{refused:?}"
        );

        broker.server.stop().await;
    }
}

#[tokio::test]
async fn a_device_enrolled_again_loses_the_tokens_of_its_old_enrollment() {
    for db in TestDb::all().await {
        let broker = Broker::start(&db).await;
        let tokens = broker.tokens();
        let pingid = broker.integration("pingid").await;
        let carol = broker.enrolled("carol").await;
        let groups = vec!["corp:staff".to_string()];
        let old = tokens
            .current_or_issue(request("pingid", &carol, &groups), DAY)
            .await
            .unwrap();
        assert!(broker.active(&pingid, &old.jwt).await);

        // Wiped and enrolled again: a fresh record, the same UDID. The Authenticate that
        // binds it retires the old record, and its tokens with it, in one transaction.
        let issued = challenge::create(
            broker.server.store(),
            Duration::from_secs(600),
            ChallengeRequest {
                requested_by: "portal".into(),
                user_id: Some(carol.owner_id.clone()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        let mut fresh = Device::enroll(&broker.server, &issued.challenge).await;
        fresh.udid = carol.device.udid.clone();
        fresh.check_in(&broker.server).await;
        assert!(!broker.active(&pingid, &old.jwt).await, "{}", db.name());
        let again = Enrolled {
            device: fresh,
            enrollment_id: issued.enrollment_id,
            owner_id: carol.owner_id.clone(),
            email: carol.email.clone(),
        };
        let new = tokens
            .current_or_issue(request("pingid", &again, &groups), DAY)
            .await
            .unwrap();
        assert_ne!(new.jwt, old.jwt);
        assert!(broker.active(&pingid, &new.jwt).await);
        let refused = tokens
            .current_or_issue(request("pingid", &carol, &groups), DAY)
            .await;
        assert!(
            matches!(refused, Err(DeviceTokenError::EnrollmentNotActive { .. })),
            "{refused:?}"
        );

        broker.server.stop().await;
    }
}
