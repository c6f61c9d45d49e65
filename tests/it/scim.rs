//! SCIM 2.0 provisioning end to end: Okta's and Entra ID's published request sequences over
//! raw HTTP, an independent SCIM client library (scim2-client, installed by
//! tests/peers/scim.sh), membership and deactivation reaching an enrolled device as queued
//! commands, and hostile input refused with a SCIM error and no change.

use std::time::{Duration, Instant};

use plist::Dictionary;
use reqwest::{Method, StatusCode};
use serde_json::{Value as Json, json};
use trustbroker::identity::{Group, Identity};
use trustbroker::pki::challenge::{self, ChallengeRequest};
use trustbroker::store::{AccountStatus, UserRecord};

use crate::device::Device;
use crate::harness::{TestDb, TestServer, peer_env};
use crate::policy::{drain, engineering, files, types};

const PROVIDER: &str = "corp";
const PATCH_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

struct Scim<'a> {
    server: &'a TestServer,
    token: String,
}

impl Scim<'_> {
    async fn send(&self, method: Method, path: &str, body: Option<Json>) -> (StatusCode, Json) {
        self.send_with(method, path, body, &[]).await
    }

    async fn send_with(
        &self,
        method: Method,
        path: &str,
        body: Option<Json>,
        headers: &[(&str, &str)],
    ) -> (StatusCode, Json) {
        let mut request = self
            .server
            .client
            .request(method, self.server.url(&format!("/scim/v2{path}")))
            .bearer_auth(&self.token);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some(body) = body {
            request = request
                .header("content-type", "application/scim+json")
                .body(body.to_string());
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        if status.is_client_error() || status.is_server_error() {
            let content_type = response.headers()["content-type"]
                .to_str()
                .unwrap()
                .to_string();
            assert_eq!(content_type, "application/scim+json", "{status} {path}");
        }
        let text = response.text().await.unwrap();
        let body = if text.is_empty() {
            Json::Null
        } else {
            serde_json::from_str(&text).unwrap()
        };
        if status.is_client_error() {
            assert_eq!(
                body["schemas"][0], "urn:ietf:params:scim:api:messages:2.0:Error",
                "{body}"
            );
            assert_eq!(body["status"], status.as_u16().to_string(), "{body}");
        }
        (status, body)
    }
}

async fn scim_client(server: &TestServer, provider: &str) -> String {
    trustbroker::scim::auth::create(server.store(), provider, "idp", "test")
        .await
        .unwrap()
        .token
}

/// A device enrolled for `user` and checked in.
async fn device_for(server: &TestServer, user: &UserRecord) -> Device {
    let issued = challenge::create(
        server.store(),
        Duration::from_secs(600),
        ChallengeRequest {
            requested_by: "test".into(),
            for_user: user.login.clone(),
            for_device: None,
            user_id: Some(user.id.clone()),
        },
    )
    .await
    .unwrap();
    let device = Device::enroll(server, &issued.challenge).await;
    device.check_in(server).await;
    device
}

async fn apply(server: &TestServer, admin: &str, group: &str) {
    let response = server
        .client
        .post(server.url("/api/v1/policies/apply"))
        .bearer_auth(admin)
        .json(
            &json!({"files": files(&[("engineering.yaml", engineering(group, 8, ""))]),
                      "allow_destructive": true}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
}

fn okta_user() -> Json {
    // Okta's SCIM 2.0 reference: "Create the user".
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": "test.user@okta.local",
        "name": {"givenName": "Test", "familyName": "User"},
        "emails": [{"primary": true, "value": "test.user@okta.local", "type": "work"}],
        "displayName": "Test User",
        "locale": "en-US",
        "externalId": "00ujl29u0le5T6Aj10h7",
        "groups": [],
        "password": "1mz050nq",
        "active": true
    })
}

#[tokio::test]
async fn okta_provisioning_reaches_the_device_and_deactivation_removes_what_policy_installed() {
    for db in TestDb::all().await {
        let server = TestServer::start_on(&db).await;
        let admin = server.admin_key("scim-admin", &["admin"]).await;
        let scim = Scim {
            server: &server,
            token: scim_client(&server, PROVIDER).await,
        };

        // Get by filter, then create (Okta's import and push).
        let filter =
            "/Users?filter=userName%20eq%20%22test.user%40okta.local%22&startIndex=1&count=100";
        let (status, found) = scim.send(Method::GET, filter, None).await;
        assert_eq!(status, StatusCode::OK, "{found}");
        assert_eq!(found["totalResults"], 0);
        assert_eq!(found["Resources"], json!([]));
        let (status, user) = scim.send(Method::POST, "/Users", Some(okta_user())).await;
        assert_eq!(status, StatusCode::CREATED, "{}: {user}", db.name());
        let user_id = user["id"].as_str().unwrap().to_string();
        assert_eq!(user["userName"], "test.user@okta.local");
        assert_eq!(user["meta"]["version"], "W/\"1\"");
        assert!(user.get("password").is_none(), "never stored nor returned");
        let (status, dup) = scim.send(Method::POST, "/Users", Some(okta_user())).await;
        assert_eq!(status, StatusCode::CONFLICT);
        assert_eq!(dup["scimType"], "uniqueness");
        let (_, found) = scim.send(Method::GET, filter, None).await;
        assert_eq!(found["totalResults"], 1);
        assert_eq!(found["Resources"][0]["id"], user_id.as_str());

        // A sign-in of the same provider with the externalId as subject is the same person.
        let signed_in = server
            .store()
            .record_sign_in(
                &Identity {
                    provider: PROVIDER.into(),
                    subject: "00ujl29u0le5T6Aj10h7".into(),
                    login: Some("test.user@okta.local".into()),
                    email: Some("test.user@okta.local".into()),
                    display_name: Some("Test User".into()),
                    groups: Vec::<Group>::new(),
                },
                "sign-in",
            )
            .await
            .unwrap();
        assert_eq!(signed_in.id, user_id, "{}", db.name());
        let device = device_for(&server, &signed_in).await;

        // Okta creates the group without an externalId: its SCIM id is the stable ID policies
        // target.
        let (status, group) = scim
            .send(
                Method::POST,
                "/Groups",
                Some(
                    json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                            "displayName": "Test SCIMv2", "members": []}),
                ),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{group}");
        let group_id = group["id"].as_str().unwrap().to_string();
        apply(&server, &admin, &group_id).await;
        assert_eq!(device.idle(&server).await, None, "not a member yet");

        // Okta pushes the membership: the device is offered the policy within seconds.
        let started = Instant::now();
        let (status, body) = scim
            .send(
                Method::PATCH,
                &format!("/Groups/{group_id}"),
                Some(json!({"schemas": [PATCH_SCHEMA], "Operations": [{"op": "add", "path": "members",
                    "value": [{"value": user_id, "display": "test.user@okta.local"}]}]})),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT, "{body}");
        let offered = drain(&server, &device, |_| Dictionary::new()).await;
        assert_eq!(
            types(&offered),
            ["InstallApplication", "InstallProfile"],
            "{}",
            db.name()
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{:?}",
            started.elapsed()
        );

        // Okta renames with the id alongside: the same group, nothing to send.
        let (status, _) = scim
            .send(
                Method::PATCH,
                &format!("/Groups/{group_id}"),
                Some(
                    json!({"schemas": [PATCH_SCHEMA], "Operations": [{"op": "replace",
                    "value": {"id": group_id, "displayName": "Test SCIMv2 renamed"}}]}),
                ),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (_, read) = scim
            .send(Method::GET, &format!("/Groups/{group_id}"), None)
            .await;
        assert_eq!(read["displayName"], "Test SCIMv2 renamed");
        assert_eq!(read["members"][0]["value"], user_id.as_str());
        assert_eq!(read["meta"]["version"], "W/\"3\"");

        // Deactivate (Okta): the person is disabled and what policy installed is removed.
        let (status, patched) = scim
            .send(
                Method::PATCH,
                &format!("/Users/{user_id}"),
                Some(json!({"schemas": [PATCH_SCHEMA],
                            "Operations": [{"op": "replace", "value": {"active": false}}]})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{patched}");
        assert_eq!(patched["active"], false);
        let status_now = server.store().directory_users(PROVIDER).await.unwrap();
        assert_eq!(status_now[0].status, AccountStatus::Disabled);
        let removed = drain(&server, &device, |_| Dictionary::new()).await;
        assert!(
            types(&removed).contains(&"RemoveProfile"),
            "{}: {:?}",
            db.name(),
            types(&removed)
        );

        // Delete: the person is marked deleted; the row and the device stay.
        let (status, _) = scim
            .send(Method::DELETE, &format!("/Users/{user_id}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let (status, _) = scim
            .send(Method::GET, &format!("/Users/{user_id}"), None)
            .await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        assert!(server.store().user(&user_id).await.unwrap().is_some());
        assert_eq!(server.store().devices_of(&user_id).await.unwrap().len(), 1);
        let audit = server
            .get_json("/api/v1/audit?action=scim.user.delete", Some(&admin))
            .await;
        assert_eq!(audit["entries"].as_array().unwrap().len(), 1, "{audit}");
        server.stop().await;
    }
}

#[tokio::test]
async fn entra_patch_shapes_membership_batches_and_etags() {
    for db in TestDb::all().await {
        let server = TestServer::start_on(&db).await;
        let scim = Scim {
            server: &server,
            token: scim_client(&server, PROVIDER).await,
        };
        // Entra ID's "Create User" request (its SCIM validator's sample).
        let (status, user) = scim
            .send(
                Method::POST,
                "/Users",
                Some(json!({
                    "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User",
                                "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"],
                    "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef",
                    "userName": "Test_User_ab6490ee-1e48-479e-a20b-2d77186b5dd1",
                    "active": true,
                    "emails": [{"primary": true, "type": "work",
                                "value": "Test_User_fd0ea19b-0777-472c-9f96-4f70d2226f2e@testuser.com"}],
                    "meta": {"resourceType": "User"},
                    "name": {"formatted": "givenName familyName", "familyName": "familyName",
                             "givenName": "givenName"},
                    "roles": []
                })),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{}: {user}", db.name());
        let user_id = user["id"].as_str().unwrap().to_string();
        let (_, found) = scim
            .send(
                Method::GET,
                "/Users?filter=userName+eq+%22Test_User_ab6490ee-1e48-479e-a20b-2d77186b5dd1%22",
                None,
            )
            .await;
        assert_eq!(found["totalResults"], 1);

        // Entra's PATCH: capitalised ops, a filtered path, a sub-attribute, "False".
        let (status, patched) = scim
            .send(
                Method::PATCH,
                &format!("/Users/{user_id}"),
                Some(json!({"schemas": [PATCH_SCHEMA], "Operations": [
                    {"op": "Replace", "path": "emails[type eq \"work\"].value",
                     "value": "updatedEmail@microsoft.com"},
                    {"op": "Replace", "path": "name.familyName", "value": "updatedFamilyName"},
                    {"op": "Add", "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department",
                     "value": "Engineering"},
                    {"op": "Replace", "path": "active", "value": "False"}
                ]})),
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{patched}");
        assert_eq!(patched["emails"][0]["value"], "updatedEmail@microsoft.com");
        assert_eq!(patched["name"]["familyName"], "updatedFamilyName");
        assert_eq!(patched["active"], false);
        assert_eq!(
            patched["urn:ietf:params:scim:schemas:extension:enterprise:2.0:User"]["department"],
            "Engineering"
        );
        let person = server.store().user(&user_id).await.unwrap().unwrap();
        assert_eq!(person.email.as_deref(), Some("updatedEmail@microsoft.com"));
        let (_, attrs) = scim
            .send(
                Method::GET,
                &format!("/Users/{user_id}?attributes=userName,emails.value"),
                None,
            )
            .await;
        assert_eq!(
            attrs["emails"],
            json!([{"value": "updatedEmail@microsoft.com"}])
        );
        assert!(
            attrs.get("name").is_none() && attrs.get("id").is_some(),
            "{attrs}"
        );

        // If-Match: a stale version is refused, the current one accepted.
        let version = patched["meta"]["version"].as_str().unwrap().to_string();
        let replacement = json!({"userName": "Test_User_ab6490ee-1e48-479e-a20b-2d77186b5dd1",
                                 "externalId": "0a21f0f2-8d2a-4f8e-bf98-7363c4aed4ef", "active": true});
        let (status, _) = scim
            .send_with(
                Method::PUT,
                &format!("/Users/{user_id}"),
                Some(replacement.clone()),
                &[("if-match", "W/\"1\"")],
            )
            .await;
        assert_eq!(status, StatusCode::PRECONDITION_FAILED);
        let (status, put) = scim
            .send_with(
                Method::PUT,
                &format!("/Users/{user_id}"),
                Some(replacement),
                &[("if-match", &version)],
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{put}");
        assert_eq!(put["active"], true);

        // Members: thousands in one batch, Entra's add and both remove shapes.
        let mut others = Vec::new();
        for i in 0..30 {
            let (_, u) = scim
                .send(
                    Method::POST,
                    "/Users",
                    Some(json!({"userName": format!("member{i}@x"),
                                                          "externalId": format!("m{i}")})),
                )
                .await;
            others.push(u["id"].as_str().unwrap().to_string());
        }
        let (status, group) = scim
            .send(
                Method::POST,
                "/Groups",
                Some(
                    json!({"schemas": ["urn:ietf:params:scim:schemas:core:2.0:Group"],
                            "externalId": "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159",
                            "displayName": "displayName", "meta": {"resourceType": "Group"}}),
                ),
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{group}");
        let group_id = group["id"].as_str().unwrap().to_string();
        let value: Vec<Json> = others.iter().map(|id| json!({"value": id})).collect();
        let (status, _) = scim
            .send(
                Method::PATCH,
                &format!("/Groups/{group_id}"),
                Some(json!({"schemas": [PATCH_SCHEMA], "Operations": [
                    {"name": "addMember", "op": "Add", "path": "members", "value": value},
                    {"name": "addMember", "op": "Add", "path": "members",
                     "value": [{"displayName": "new member", "value": user_id}]}]})),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        let memberships = server.store().memberships(&user_id).await.unwrap();
        assert_eq!(memberships.len(), 1);
        assert_eq!(
            memberships[0].external_id,
            "8aa1a0c0-c4c3-4bc0-b4a5-2ef676900159"
        );
        assert_eq!(memberships[0].source, "scim");
        let (_, lean) = scim
            .send(
                Method::GET,
                &format!("/Groups/{group_id}?excludedAttributes=members"),
                None,
            )
            .await;
        assert!(lean.get("members").is_none(), "{lean}");
        let (_, full) = scim
            .send(Method::GET, &format!("/Groups/{group_id}"), None)
            .await;
        assert_eq!(full["members"].as_array().unwrap().len(), 31);
        let (_, listed) = scim
            .send(
                Method::GET,
                "/Groups?filter=displayName%20eq%20%22displayName%22&excludedAttributes=members",
                None,
            )
            .await;
        assert_eq!(listed["totalResults"], 1);
        assert!(listed["Resources"][0].get("members").is_none());
        // Remove: Entra's value list, and the members[value eq "…"] path.
        let (status, _) = scim
            .send(
                Method::PATCH,
                &format!("/Groups/{group_id}"),
                Some(json!({"schemas": [PATCH_SCHEMA], "Operations": [
                    {"name": "removeMember", "op": "Remove", "path": "members",
                     "value": [{"value": user_id}]},
                    {"op": "Remove", "path": format!("members[value eq \"{}\"]", others[0])}]})),
            )
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(
            server
                .store()
                .memberships(&user_id)
                .await
                .unwrap()
                .is_empty()
        );
        let (_, full) = scim
            .send(Method::GET, &format!("/Groups/{group_id}"), None)
            .await;
        assert_eq!(full["members"].as_array().unwrap().len(), 29);
        // Delete the group: everyone leaves; the groups row (a policy target) stays.
        let (status, _) = scim
            .send(Method::DELETE, &format!("/Groups/{group_id}"), None)
            .await;
        assert_eq!(status, StatusCode::NO_CONTENT);
        assert!(
            server
                .store()
                .memberships(&others[1])
                .await
                .unwrap()
                .is_empty()
        );
        server.stop().await;
    }
}

#[tokio::test]
async fn hostile_input_is_refused_with_scim_errors_and_changes_nothing() {
    let server = TestServer::start().await;
    let scim = Scim {
        server: &server,
        token: scim_client(&server, PROVIDER).await,
    };
    let other = Scim {
        server: &server,
        token: scim_client(&server, "other-idp").await,
    };
    let (_, user) = scim
        .send(
            Method::POST,
            "/Users",
            Some(json!({"userName": "victim@x", "externalId": "v1",
                                                  "favouriteColour": "blue"})),
        )
        .await;
    let user_id = user["id"].as_str().unwrap().to_string();
    assert!(
        user.get("favouriteColour").is_none(),
        "unknown attributes are ignored"
    );
    let (_, group) = scim
        .send(
            Method::POST,
            "/Groups",
            Some(json!({"displayName": "g", "externalId": "g1",
                                                   "members": [{"value": user_id}]})),
        )
        .await;
    let group_id = group["id"].as_str().unwrap().to_string();
    let unchanged = |resource: &Json| resource["meta"]["version"] == "W/\"1\"";

    // Without a token, with a wrong one, with a revoked one: 401.
    for token in ["", "tbs_000000000000_nope", "Basic abc"] {
        let bad = Scim {
            server: &server,
            token: token.to_string(),
        };
        let (status, _) = bad.send(Method::GET, "/Users", None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{token}");
    }
    // An admin key is no SCIM token.
    let admin = server.admin_key("not-scim", &["admin"]).await;
    let (status, _) = Scim {
        server: &server,
        token: admin,
    }
    .send(Method::GET, "/Users", None)
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);

    // Another provider's client sees nothing and changes nothing.
    let (_, listed) = other.send(Method::GET, "/Users", None).await;
    assert_eq!(listed["totalResults"], 0);
    for (method, path, body) in [
        (Method::GET, format!("/Users/{user_id}"), None),
        (
            Method::PATCH,
            format!("/Users/{user_id}"),
            Some(json!({"Operations": [{"op": "replace", "value": {"active": false}}]})),
        ),
        (
            Method::PUT,
            format!("/Users/{user_id}"),
            Some(json!({"userName": "taken@x"})),
        ),
        (Method::DELETE, format!("/Users/{user_id}"), None),
        (
            Method::PATCH,
            format!("/Groups/{group_id}"),
            Some(
                json!({"Operations": [{"op": "replace", "path": "displayName", "value": "pwned"}]}),
            ),
        ),
        (Method::DELETE, format!("/Groups/{group_id}"), None),
    ] {
        let (status, _) = other.send(method.clone(), &path, body).await;
        assert_eq!(status, StatusCode::NOT_FOUND, "{method} {path}");
    }
    // Nor can it add our user to its own group.
    let (status, err) = other
        .send(
            Method::POST,
            "/Groups",
            Some(json!({"displayName": "x", "members": [{"value": user_id}]})),
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(err["scimType"], "invalidValue");

    // Filters: injection attempts are parse errors or match nothing.
    for filter in [
        "userName%20eq%20%22x%22%20or%201%3D1",
        "userName%20eq%20%22x%22%3B%20DROP%20TABLE%20users",
        "userName%20eq",
    ] {
        let (status, err) = scim
            .send(Method::GET, &format!("/Users?filter={filter}"), None)
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{filter}");
        assert_eq!(err["scimType"], "invalidFilter");
    }
    let (_, none) = scim
        .send(
            Method::GET,
            "/Users?filter=userName%20eq%20%22x%5C%22)%20or%20(1%3D1%22",
            None,
        )
        .await;
    assert_eq!(none["totalResults"], 0);
    let long = "a".repeat(2000);
    let (status, _) = scim
        .send(
            Method::GET,
            &format!("/Users?filter=userName%20eq%20%22{long}%22"),
            None,
        )
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // PATCH: an invalid path, a bad value, too many members, too big a body.
    for (body, want, scim_type) in [
        (
            json!({"Operations": [{"op": "replace", "path": "favouriteColour", "value": "x"}]}),
            StatusCode::BAD_REQUEST,
            "invalidPath",
        ),
        (
            json!({"Operations": [{"op": "replace", "path": "emails[type eq", "value": "x"}]}),
            StatusCode::BAD_REQUEST,
            "invalidPath",
        ),
        (
            json!({"Operations": [{"op": "replace", "path": "active", "value": "perhaps"}]}),
            StatusCode::BAD_REQUEST,
            "invalidValue",
        ),
        (
            json!({"Operations": [{"op": "replace", "path": "userName", "value": ""}]}),
            StatusCode::BAD_REQUEST,
            "invalidValue",
        ),
    ] {
        let (status, err) = scim
            .send(Method::PATCH, &format!("/Users/{user_id}"), Some(body))
            .await;
        assert_eq!(
            (status, err["scimType"].as_str().unwrap()),
            (want, scim_type),
            "{err}"
        );
    }
    let many: Vec<Json> = (0..10_001)
        .map(|i| json!({"value": format!("{i:08}")}))
        .collect();
    let (status, err) = scim
        .send(
            Method::PATCH,
            &format!("/Groups/{group_id}"),
            Some(json!({"Operations": [{"op": "add", "path": "members", "value": many}]})),
        )
        .await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{err}");
    let huge = json!({"userName": "x", "title": "a".repeat(1_100_000)});
    let (status, _) = scim.send(Method::POST, "/Users", Some(huge)).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    let (status, err) = scim
        .send(Method::PATCH, &format!("/Groups/{group_id}"),
              Some(json!({"Operations": [{"op": "add", "path": "members", "value": [{"value": "nobody"}]}]})))
        .await;
    assert_eq!(
        (status, err["scimType"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalidValue"))
    );
    let (status, err) = scim
        .send(
            Method::PATCH,
            &format!("/Groups/{group_id}"),
            Some(
                json!({"Operations": [{"op": "replace", "path": "externalId", "value": "moved"}]}),
            ),
        )
        .await;
    assert_eq!(
        (status, err["scimType"].as_str()),
        (StatusCode::BAD_REQUEST, Some("mutability"))
    );
    let (status, err) = scim
        .send(Method::POST, "/Users", Some(json!("not an object")))
        .await;
    assert_eq!(
        (status, err["scimType"].as_str()),
        (StatusCode::BAD_REQUEST, Some("invalidSyntax"))
    );

    // Nothing changed.
    let (_, user) = scim
        .send(Method::GET, &format!("/Users/{user_id}"), None)
        .await;
    assert!(unchanged(&user), "{user}");
    assert_eq!(user["active"], true);
    let (_, group) = scim
        .send(Method::GET, &format!("/Groups/{group_id}"), None)
        .await;
    assert!(unchanged(&group), "{group}");
    assert_eq!(group["displayName"], "g");
    assert_eq!(group["members"].as_array().unwrap().len(), 1);

    // Revoked: refused from then on.
    let id = scim.token.split('_').nth(1).unwrap();
    trustbroker::scim::auth::revoke(server.store(), id)
        .await
        .unwrap();
    let (status, _) = scim.send(Method::GET, "/Users", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    server.stop().await;
}

#[tokio::test]
async fn discovery_endpoints_describe_the_service() {
    let server = TestServer::start().await;
    let scim = Scim {
        server: &server,
        token: scim_client(&server, PROVIDER).await,
    };
    let (status, config) = scim.send(Method::GET, "/ServiceProviderConfig", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(config["patch"]["supported"], true);
    assert_eq!(config["etag"]["supported"], true);
    let (_, types) = scim.send(Method::GET, "/ResourceTypes", None).await;
    assert_eq!(types["totalResults"], 2);
    let (_, schemas) = scim.send(Method::GET, "/Schemas", None).await;
    assert_eq!(schemas["totalResults"], 3);
    let (status, _) = scim.send(Method::GET, "/Nope", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    server.stop().await;
}

#[tokio::test]
async fn an_independent_scim_client_library_provisions_and_deactivates() {
    let Some(driver) = peer_env("TRUSTBROKER_TEST_SCIM_CLIENT") else {
        return;
    };
    let server = TestServer::start().await;
    let token = scim_client(&server, PROVIDER).await;
    let cert = server.server.as_ref().unwrap().tls_cert_path.clone();
    let python = std::path::Path::new(&driver).with_file_name("venv/bin/python");
    let output = tokio::process::Command::new(python)
        .arg(&driver)
        .arg(&server.base)
        .arg(&token)
        .arg(&cert)
        .output()
        .await
        .unwrap();
    assert!(
        output.status.success(),
        "driver failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let ids: Json = serde_json::from_slice(&output.stdout).unwrap();
    let user_id = ids["user_id"].as_str().unwrap();
    let person = server.store().user(user_id).await.unwrap().unwrap();
    assert_eq!(person.subject, "py-subject-1");
    let users = server.store().directory_users(PROVIDER).await.unwrap();
    assert_eq!(users[0].status, AccountStatus::Disabled);
    let memberships = server.store().memberships(user_id).await.unwrap();
    assert_eq!(memberships[0].external_id, "py-group-ext");
    server.stop().await;
}

#[tokio::test]
async fn scim_clients_from_the_command_line_are_audited_and_revocable() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("trustbroker.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = \"{}\"\n[idp.okta]\ntype = \"oidc\"\nissuer = \"https://okta.example\"\nclient_id = \"c\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let config = file.to_str().unwrap();
    let (ok, _, err) = crate::harness::run_cli(
        &[
            "--config",
            config,
            "scim-client",
            "create",
            "--provider",
            "nobody",
        ],
        &[],
    );
    assert!(
        !ok && err.contains("no identity provider 'nobody'"),
        "{err}"
    );
    let (ok, out, err) = crate::harness::run_cli(
        &[
            "--config",
            config,
            "scim-client",
            "create",
            "--provider",
            "okta",
            "--name",
            "okta-scim",
        ],
        &[],
    );
    assert!(ok, "{err}");
    let token = out.lines().last().unwrap().trim().to_string();
    assert!(token.starts_with("tbs_"), "{out}");
    let id = token.split('_').nth(1).unwrap().to_string();
    let (ok, out, _) = crate::harness::run_cli(&["--config", config, "scim-client", "list"], &[]);
    assert!(
        ok && out.contains(&id) && out.contains("okta-scim") && out.contains("active"),
        "{out}"
    );
    assert!(!out.contains(&token), "never the secret");
    let (ok, out, err) =
        crate::harness::run_cli(&["--config", config, "scim-client", "revoke", &id], &[]);
    assert!(ok, "{err}");
    assert!(out.contains("revoked"), "{out}");
    let (ok, _, _) =
        crate::harness::run_cli(&["--config", config, "scim-client", "revoke", &id], &[]);
    assert!(!ok, "revoked once only");
    let store = trustbroker::store::Store::open_sqlite(&dir.path().join("trustbroker.db"), 1)
        .await
        .unwrap();
    let actions: Vec<String> = store
        .list_audit(&trustbroker::store::AuditQuery {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|e| format!("{} {}", e.action, e.outcome))
        .collect();
    for want in [
        "scim-client.create success",
        "scim-client.revoke success",
        "scim-client.revoke failure",
    ] {
        assert!(actions.iter().any(|a| a == want), "{want}: {actions:?}");
    }
}

/// A broker with providers `corp` (SCIM users matched as `mode` says; `None`: the default)
/// and `other` (default matching). Nothing is fetched from the issuers: sign-ins here are
/// recorded as the sign-in flow records them.
async fn matching_server(db: &TestDb, mode: Option<&str>) -> TestServer {
    let scim_match = mode
        .map(|m| format!("scim_match = \"{m}\"\n"))
        .unwrap_or_default();
    let toml = format!(
        "[idp.corp]\ntype = \"oidc\"\nissuer = \"http://127.0.0.1:9/corp\"\n\
         client_id = \"broker\"\n{scim_match}\n\
         [idp.other]\ntype = \"oidc\"\nissuer = \"http://127.0.0.1:9/other\"\n\
         client_id = \"broker\"\n"
    );
    let url = db.database_url();
    TestServer::start_configured(move |args| args.database_url = url, &toml).await
}

/// Records a sign-in of `provider` (the row the SSO flow writes).
async fn signed_in(
    server: &TestServer,
    provider: &str,
    subject: &str,
    login: &str,
    email: &str,
) -> UserRecord {
    server
        .store()
        .record_sign_in(
            &Identity {
                provider: provider.into(),
                subject: subject.into(),
                login: Some(login.into()),
                email: Some(email.into()),
                display_name: None,
                groups: Vec::<Group>::new(),
            },
            "sign-in",
        )
        .await
        .unwrap()
}

fn scim_user(user_name: &str, external_id: &str, email: Option<&str>) -> Json {
    let mut user = json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:User"],
        "userName": user_name,
        "externalId": external_id,
        "active": true,
    });
    if let Some(email) = email {
        user["emails"] = json!([{"value": email, "type": "work", "primary": true}]);
    }
    user
}

#[tokio::test]
async fn scim_match_links_the_person_who_signed_in_under_each_mode_and_only_at_its_provider() {
    // (mode, what the SCIM user carries that matches alice's sign-in)
    let modes = [None, Some("user_name"), Some("email")];
    for mode in modes {
        for db in TestDb::all().await {
            let label = format!("{} {mode:?}", db.name());
            let server = matching_server(&db, mode).await;
            let corp = Scim {
                server: &server,
                token: scim_client(&server, PROVIDER).await,
            };
            // alice signed in at corp; a person at `other` has the very same subject, login
            // and e-mail, and must never be the one SCIM links to.
            let alice = signed_in(
                &server,
                PROVIDER,
                "sub-alice",
                "Alice@Example.org",
                "alice.s@example.org",
            )
            .await;
            let twin = signed_in(
                &server,
                "other",
                "sub-alice",
                "Alice@Example.org",
                "alice.s@example.org",
            )
            .await;
            assert_ne!(alice.id, twin.id);
            // Only the matching attribute of the mode equals what the sign-in carries.
            let user = match mode {
                None => scim_user("someone.else@example.org", "sub-alice", None),
                Some("user_name") => {
                    scim_user("alice@example.org", "okta-00u1", Some("x@example.org"))
                }
                _ => scim_user("a.smith", "okta-00u1", Some("ALICE.S@example.org")),
            };
            let (status, created) = corp.send(Method::POST, "/Users", Some(user)).await;
            assert_eq!(status, StatusCode::CREATED, "{label}: {created}");
            assert_eq!(
                created["id"],
                alice.id.as_str(),
                "{label}: the signed-in person"
            );
            let after = server.store().user(&alice.id).await.unwrap().unwrap();
            assert_eq!(
                after.subject, "sub-alice",
                "{label}: the sign-in keeps finding them"
            );
            let twin_after = server.store().user(&twin.id).await.unwrap().unwrap();
            assert_eq!(
                twin_after.login, twin.login,
                "{label}: other provider untouched"
            );
            assert_eq!(twin_after.subject, twin.subject, "{label}");

            // A person only `other` knows: corp's client cannot reach them, whatever it sends;
            // it gets a new corp person instead.
            let bob = signed_in(&server, "other", "sub-bob", "bob", "bob@example.org").await;
            let (status, created) = corp
                .send(
                    Method::POST,
                    "/Users",
                    Some(scim_user("bob", "sub-bob", Some("bob@example.org"))),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{label}: {created}");
            let corp_bob = created["id"].as_str().unwrap().to_owned();
            assert_ne!(corp_bob, bob.id, "{label}: never another provider's person");
            let corp_bob_row = server.store().user(&corp_bob).await.unwrap().unwrap();
            assert_eq!(corp_bob_row.provider, PROVIDER, "{label}");
            // … and deactivating that user changes nothing of other's bob.
            let (status, _) = corp
                .send(
                    Method::PATCH,
                    &format!("/Users/{corp_bob}"),
                    Some(json!({"schemas": [PATCH_SCHEMA],
                                "Operations": [{"op": "replace", "value": {"active": false}}]})),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{label}");
            let others = server.store().directory_users("other").await.unwrap();
            assert!(
                others.iter().all(|u| u.status == AccountStatus::Active),
                "{label}: {others:?}"
            );
            // Renaming a linked user to another person's login does not move the link.
            let (status, renamed) = corp
                .send(
                    Method::PATCH,
                    &format!("/Users/{}", alice.id),
                    Some(json!({"schemas": [PATCH_SCHEMA],
                                "Operations": [{"op": "replace", "path": "userName", "value": "carol.renamed"}]})),
                )
                .await;
            assert_eq!(status, StatusCode::OK, "{label}: {renamed}");
            assert_eq!(renamed["id"], alice.id.as_str(), "{label}");

            // Provisioned first, signed in later: the sign-in finds the SCIM person.
            let (status, dave) = corp
                .send(
                    Method::POST,
                    "/Users",
                    Some(scim_user(
                        "dave@example.org",
                        "sub-dave",
                        Some("dave@example.org"),
                    )),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED, "{label}: {dave}");
            let dave_signed_in = signed_in(
                &server,
                PROVIDER,
                "sub-dave",
                "DAVE@example.org",
                "dave@example.org",
            )
            .await;
            assert_eq!(dave["id"], dave_signed_in.id.as_str(), "{label}");
            assert_eq!(dave_signed_in.subject, "sub-dave", "{label}");
            // … and the same sign-in at `other` is another person.
            let dave_other = signed_in(
                &server,
                "other",
                "sub-dave",
                "dave@example.org",
                "dave@example.org",
            )
            .await;
            assert_ne!(dave_other.id, dave_signed_in.id, "{label}");
            server.stop().await;
        }
    }
}

#[tokio::test]
async fn email_matching_refuses_a_user_it_cannot_place() {
    for db in TestDb::all().await {
        let server = matching_server(&db, Some("email")).await;
        let corp = Scim {
            server: &server,
            token: scim_client(&server, PROVIDER).await,
        };
        // No e-mail: nothing to match on.
        let (status, body) = corp
            .send(Method::POST, "/Users", Some(scim_user("erin", "x1", None)))
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(body["scimType"], "invalidValue");
        // Two of corp's people share the e-mail: which one is it? Refused, nothing written.
        signed_in(&server, PROVIDER, "sub-f1", "f1", "shared@example.org").await;
        signed_in(&server, PROVIDER, "sub-f2", "f2", "shared@example.org").await;
        let (status, body) = corp
            .send(
                Method::POST,
                "/Users",
                Some(scim_user("f", "x2", Some("Shared@example.org"))),
            )
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{}: {body}", db.name());
        assert_eq!(body["scimType"], "uniqueness");
        let (_, listed) = corp.send(Method::GET, "/Users", None).await;
        assert_eq!(listed["totalResults"], 0, "{listed}");
        server.stop().await;
    }
}

#[tokio::test]
async fn scim_clients_over_the_admin_api_need_their_scope_and_are_audited() {
    let db = TestDb::Sqlite;
    let server = matching_server(&db, None).await;
    let admin = server.admin_key("scim-admin", &["scim:admin"]).await;
    let other = server.admin_key("tokens-only", &["tokens:write"]).await;
    let api = async |key: &str, method: Method, path: &str, body: Option<Json>| {
        let mut request = server
            .client
            .request(method, server.url(&format!("/api/v1{path}")))
            .bearer_auth(key);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.unwrap();
        let status = response.status();
        let text = response.text().await.unwrap();
        (
            status,
            serde_json::from_str::<Json>(&text).unwrap_or(Json::Null),
        )
    };

    // Without the scope: 403, nothing made.
    let (status, _) = api(
        &other,
        Method::POST,
        "/scim-clients",
        Some(json!({"provider": PROVIDER})),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _) = api(&other, Method::GET, "/scim-clients", None).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    // A provider no one configured is refused.
    let (status, body) = api(
        &admin,
        Method::POST,
        "/scim-clients",
        Some(json!({"provider": "nobody"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    let (status, body) = api(
        &admin,
        Method::POST,
        "/scim-clients",
        Some(json!({"provider": PROVIDER, "name": "okta scim"})),
    )
    .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "bad name: {body}");

    let (status, created) = api(
        &admin,
        Method::POST,
        "/scim-clients",
        Some(json!({"provider": PROVIDER, "name": "okta-scim"})),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{created}");
    let token = created["token"].as_str().unwrap().to_owned();
    let id = created["id"].as_str().unwrap().to_owned();
    assert!(token.starts_with("tbs_"), "{created}");
    // The token works at /scim/v2, for that provider.
    let scim = Scim {
        server: &server,
        token: token.clone(),
    };
    let (status, _) = scim.send(Method::GET, "/Users", None).await;
    assert_eq!(status, StatusCode::OK);

    let (status, listed) = api(&admin, Method::GET, "/scim-clients", None).await;
    assert_eq!(status, StatusCode::OK);
    let client = listed["clients"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id.as_str())
        .unwrap()
        .clone();
    assert_eq!(client["status"], "active");
    assert_eq!(client["provider"], PROVIDER);
    assert!(client["last_used_at"].is_string(), "{client}");
    assert!(!listed.to_string().contains(&token), "never the secret");
    assert!(client.get("secret_hash").is_none());

    let (status, revoked) = api(
        &admin,
        Method::POST,
        &format!("/scim-clients/{id}/revoke"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{revoked}");
    assert_eq!(revoked["status"], "revoked");
    let (status, _) = scim.send(Method::GET, "/Users", None).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "refused from then on");
    let (status, _) = api(
        &admin,
        Method::POST,
        &format!("/scim-clients/{id}/revoke"),
        None,
    )
    .await;
    assert_eq!(status, StatusCode::NOT_FOUND);

    let auditor = server.admin_key("auditor", &["audit:read"]).await;
    let audit = server
        .get_json("/api/v1/audit?limit=100", Some(&auditor))
        .await;
    let seen: Vec<String> = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"].as_str().unwrap().starts_with("scim-client."))
        .map(|e| {
            format!(
                "{} {}",
                e["action"].as_str().unwrap(),
                e["outcome"].as_str().unwrap()
            )
        })
        .collect();
    for want in [
        "scim-client.create success",
        "scim-client.create failure",
        "scim-client.revoke success",
        "scim-client.revoke failure",
    ] {
        assert!(seen.iter().any(|s| s == want), "{want}: {seen:?}");
    }
    server.stop().await;
}

#[tokio::test]
async fn list_filters_narrowed_in_sql_find_every_match_on_both_databases() {
    for db in TestDb::all().await {
        let server = TestServer::start_on(&db).await;
        let scim = Scim {
            server: &server,
            token: scim_client(&server, PROVIDER).await,
        };
        let mut ids = std::collections::BTreeMap::new();
        for (key, user) in [
            (
                "u1",
                json!({"userName": "Alice_Smith@Example.org", "externalId": "00uAbc",
                       "displayName": "Ålice Smith", "active": true,
                       "emails": [{"value": "alice@work.example", "type": "work"},
                                  {"value": "ALICE@home.example", "type": "home"}]}),
            ),
            (
                "u2",
                json!({"userName": "alice%smith@example.org", "externalId": "00uabc",
                       "displayName": "Alice Other", "active": false,
                       "emails": [{"value": "a2@work.example", "type": "work", "primary": true}]}),
            ),
            (
                "u3",
                json!({"userName": "  bob@example.org ", "externalId": "x\\y",
                       "displayName": "Bob", "active": true}),
            ),
        ] {
            let (status, created) = scim.send(Method::POST, "/Users", Some(user)).await;
            assert_eq!(status, StatusCode::CREATED, "{created}");
            ids.insert(created["id"].as_str().unwrap().to_owned(), key);
        }
        let found = async |filter: &str| -> Vec<&str> {
            let path = format!("/Users?filter={}", urlencode(filter));
            let (status, body) = scim.send(Method::GET, &path, None).await;
            assert_eq!(status, StatusCode::OK, "{filter}: {body}");
            let mut keys: Vec<&str> = body["Resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|r| ids[r["id"].as_str().unwrap()])
                .collect();
            keys.sort();
            assert_eq!(body["totalResults"], keys.len(), "{filter}");
            keys
        };
        for (filter, want) in [
            (r#"userName eq "ALICE_SMITH@EXAMPLE.ORG""#, vec!["u1"]),
            (r#"userName sw "alice_""#, vec!["u1"]),
            (r#"userName co "%""#, vec!["u2"]),
            (r#"userName eq "bob@example.org""#, vec!["u3"]),
            (r#"displayName co "ÅLICE""#, vec!["u1"]),
            (r#"displayName sw "alice""#, vec!["u2"]),
            (r#"emails.value eq "alice@home.example""#, vec!["u1"]),
            (r#"emails[type eq "work"].value sw "A2@""#, vec!["u2"]),
            (r#"emails co "@work""#, vec![]),
            (r#"emails.value co "@WORK.""#, vec!["u1", "u2"]),
            (r#"active eq "False""#, vec!["u2"]),
            (r#"active eq true and emails pr"#, vec!["u1"]),
            (r#"externalId eq "00uabc""#, vec!["u2"]),
            (r#"externalId co "\\""#, vec!["u3"]),
            (
                r#"displayName eq "bob" or emails.value co "home""#,
                vec!["u1", "u3"],
            ),
            (r#"not (active eq true)"#, vec!["u2"]),
            (
                r#"userName eq "nobody" or displayName co "other""#,
                vec!["u2"],
            ),
        ] {
            assert_eq!(found(filter).await, want, "{}: {filter}", db.name());
        }
        // A change moves the search keys with it.
        let bob = ids.iter().find(|(_, k)| **k == "u3").unwrap().0.clone();
        let (status, _) = scim
            .send(
                Method::PATCH,
                &format!("/Users/{bob}"),
                Some(json!({"schemas": [PATCH_SCHEMA], "Operations": [
                    {"op": "replace", "path": "displayName", "value": "Robert"},
                    {"op": "add", "path": "emails", "value": [{"value": "Rob@Example.org"}]}]})),
            )
            .await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(found(r#"displayName eq "robert""#).await, vec!["u3"]);
        assert_eq!(found(r#"displayName eq "bob""#).await, Vec::<&str>::new());
        assert_eq!(
            found(r#"emails.value eq "rob@example.org""#).await,
            vec!["u3"]
        );

        // Groups: displayName without case, externalId with.
        for (name, external) in [("Engineering", "grp-A"), ("Sales_EU", "grp-a")] {
            let (status, _) = scim
                .send(
                    Method::POST,
                    "/Groups",
                    Some(json!({"displayName": name, "externalId": external})),
                )
                .await;
            assert_eq!(status, StatusCode::CREATED);
        }
        for (filter, want) in [
            (r#"displayName eq "ENGINEERING""#, vec!["Engineering"]),
            (r#"displayName sw "sales_""#, vec!["Sales_EU"]),
            (r#"externalId eq "grp-a""#, vec!["Sales_EU"]),
            (
                r#"displayName co "eer" or externalId eq "grp-a""#,
                vec!["Engineering", "Sales_EU"],
            ),
        ] {
            let path = format!("/Groups?filter={}", urlencode(filter));
            let (status, body) = scim.send(Method::GET, &path, None).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let mut names: Vec<&str> = body["Resources"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| g["displayName"].as_str().unwrap())
                .collect();
            names.sort();
            assert_eq!(names, want, "{}: {filter}", db.name());
        }
        server.stop().await;
    }
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
