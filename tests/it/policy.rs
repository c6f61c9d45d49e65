//! Group-driven policy end to end, with the device simulator: a policy set applied over the
//! admin API, a person's group membership putting their enrolled device in scope, the
//! reconciler's InstallProfile and InstallApplication offered and acknowledged, the state API,
//! leaving the group, exactly-once across passes, restarts and two nodes, a one-payload edit,
//! and destructive plans refused without consent.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64::Engine;
use plist::{Dictionary, Value};
use reqwest::StatusCode;
use serde_json::{Value as Json, json};
use trustbroker::identity::{Group, Identity};
use trustbroker::pki::challenge::{self, ChallengeRequest};
use trustbroker::store::{Store, TargetScope, UserRecord};

use crate::device::{Device, uuid_and_type};
use crate::harness::{TestDb, TestServer};

const PROVIDER: &str = "corp";
const PROFILE_ID: &str = "org.trustbroker.policy.engineering.passcode";
const APP: &str = "com.pingidentity.pingid";

/// The policy file of these tests, targeting `group`, with a passcode of `min_length`.
pub(crate) fn engineering(group: &str, min_length: u32, on_leave: &str) -> String {
    format!(
        r#"name: engineering
description: passcode and PingID for engineers
targets:
  groups:
    - {{ provider: {PROVIDER}, id: "{group}" }}
profiles:
  - name: passcode
    payloads:
      - {{ PayloadType: com.apple.mobiledevice.passwordpolicy, minLength: {min_length} }}
apps:
  - bundle_id: {APP}
    itunes_store_id: 1076521545
    configuration:
      user_email: "${{user.email}}"
{on_leave}"#
    )
}

pub(crate) fn files(policies: &[(&str, String)]) -> Json {
    let map: BTreeMap<&str, String> = policies
        .iter()
        .map(|(path, text)| {
            (
                *path,
                base64::engine::general_purpose::STANDARD.encode(text.as_bytes()),
            )
        })
        .collect();
    json!(map)
}

struct Fleet {
    server: TestServer,
    admin: String,
    group: String,
}

impl Fleet {
    async fn apply(
        &self,
        policies: &[(&str, String)],
        allow_destructive: bool,
    ) -> (StatusCode, Json) {
        post(
            &self.server,
            &self.admin,
            "/api/v1/policies/apply",
            json!({"files": files(policies), "allow_destructive": allow_destructive,
                   "git_commit": "0123abcd"}),
        )
        .await
    }

    /// A person signed in with the given groups (as an SSO sign-in records them).
    async fn sign_in(&self, login: &str, groups: &[&str]) -> UserRecord {
        sign_in(self.server.store(), login, groups).await
    }

    /// A device enrolled for `user`, checked in (Authenticate, TokenUpdate).
    async fn device_for(&self, user: &UserRecord) -> Device {
        let issued = challenge::create(
            self.server.store(),
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
        let device = Device::enroll(&self.server, &issued.challenge).await;
        device.check_in(&self.server).await;
        device
    }

    async fn state(&self, device: &Device) -> Json {
        self.server
            .get_json(
                &format!("/api/v1/enrollments/{}/state", device.udid),
                Some(&self.admin),
            )
            .await
    }

    async fn commands(&self, device: &Device) -> Vec<Json> {
        let body = self
            .server
            .get_json(
                &format!("/api/v1/enrollments/{}/commands", device.udid),
                Some(&self.admin),
            )
            .await;
        body["commands"].as_array().unwrap().clone()
    }
}

async fn post(server: &TestServer, key: &str, path: &str, body: Json) -> (StatusCode, Json) {
    let response = server
        .client
        .post(server.url(path))
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Json::Null))
}

async fn sign_in(store: &Store, login: &str, groups: &[&str]) -> UserRecord {
    store
        .record_sign_in(
            &Identity {
                provider: PROVIDER.into(),
                subject: format!("subject-{login}"),
                login: Some(login.into()),
                email: Some(format!("{login}@example.org")),
                display_name: Some(login.to_uppercase()),
                groups: groups
                    .iter()
                    .map(|g| Group {
                        id: (*g).into(),
                        name: (*g).into(),
                    })
                    .collect(),
            },
            "sign-in",
        )
        .await
        .unwrap()
}

/// Answers every command the device is offered (Acknowledged, or as `answer` says) until it
/// is offered nothing, waiting up to 30 s for the first one; returns the commands in order.
pub(crate) async fn drain(
    server: &TestServer,
    device: &Device,
    mut answer: impl FnMut(&str) -> Dictionary,
) -> Vec<(String, Dictionary)> {
    // Generous: the whole suite shares two cores; only a broken reconciler takes this long.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut next = loop {
        match device.idle(server).await {
            Some(command) => break Some(command),
            None if Instant::now() > deadline => break None,
            None => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    let mut seen = Vec::new();
    while let Some(command) = next {
        let (uuid, request_type) = uuid_and_type(&command);
        let extra = answer(&request_type);
        let (status, offered) = device
            .report(server, "Acknowledged", Some(&uuid), extra)
            .await;
        assert_eq!(status, StatusCode::OK);
        seen.push((
            request_type,
            command["Command"].as_dictionary().unwrap().clone(),
        ));
        next = offered;
    }
    seen
}

pub(crate) fn types(commands: &[(String, Dictionary)]) -> Vec<&str> {
    let mut types: Vec<&str> = commands.iter().map(|(t, _)| t.as_str()).collect();
    types.sort();
    types
}

fn item<'a>(state: &'a Json, key: &str) -> &'a Json {
    state["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["item"] == key)
        .unwrap_or_else(|| panic!("no item {key} in {state:#}"))
}

/// What a device holding the policy's profile and app answers to inventory queries.
fn answer_inventory(request_type: &str) -> Dictionary {
    match request_type {
        "ProfileList" => profile_list(&[PROFILE_ID]),
        "ManagedApplicationList" => {
            let mut status = Dictionary::new();
            status.insert("Status".into(), "Managed".into());
            let mut apps = Dictionary::new();
            apps.insert(APP.into(), Value::Dictionary(status));
            let mut d = Dictionary::new();
            d.insert("ManagedApplicationList".into(), Value::Dictionary(apps));
            d
        }
        _ => Dictionary::new(),
    }
}

/// The ProfileList answer of a device holding the given profiles.
fn profile_list(identifiers: &[&str]) -> Dictionary {
    let list = identifiers
        .iter()
        .map(|id| {
            let mut p = Dictionary::new();
            p.insert("PayloadIdentifier".into(), (*id).into());
            p.insert(
                "PayloadUUID".into(),
                "00000000-0000-0000-0000-000000000000".into(),
            );
            Value::Dictionary(p)
        })
        .collect();
    let mut d = Dictionary::new();
    d.insert("ProfileList".into(), Value::Array(list));
    d
}

#[tokio::test]
async fn membership_drives_installs_removals_and_state_exactly_once() {
    for db in TestDb::all().await {
        let data_dir = tempfile::tempdir().unwrap();
        let dir = data_dir.path().to_path_buf();
        let url = db.database_url();
        let start = || {
            let (dir, url) = (dir.clone(), url.clone());
            TestServer::start_with(move |args| {
                args.data_dir = Some(dir);
                args.database_url = url;
            })
        };
        let server = start().await;
        let admin = server.admin_key("policy-admin", &["admin"]).await;
        let group = format!(
            "cn=eng-{},ou=groups,dc=example,dc=org",
            uuid::Uuid::new_v4()
        );
        let fleet = Fleet {
            server,
            admin,
            group,
        };
        let alice = fleet.sign_in("alice", &[&fleet.group]).await;
        let device = fleet.device_for(&alice).await;
        // Bob is in another group: his device is outside the policy.
        let bob = fleet
            .sign_in("bob", &["cn=sales,ou=groups,dc=example,dc=org"])
            .await;
        let bobs = fleet.device_for(&bob).await;

        // Apply: the device is in scope and is offered the profile and the app.
        let (status, applied) = fleet
            .apply(
                &[("engineering.yaml", engineering(&fleet.group, 8, ""))],
                false,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{}: {applied:#}", db.name());
        let plan = &applied["plan"];
        assert_eq!(plan["totals"]["install_profile"], 1, "{plan:#}");
        assert_eq!(plan["totals"]["install_app"], 1, "{plan:#}");
        assert_eq!(plan["policies"][0]["entering"], 1, "{plan:#}");
        let offered = drain(&fleet.server, &device, |_| Dictionary::new()).await;
        assert_eq!(
            types(&offered),
            ["InstallApplication", "InstallProfile"],
            "{}",
            db.name()
        );
        assert_eq!(
            bobs.idle(&fleet.server).await,
            None,
            "outside the scope: nothing"
        );
        let app = &offered
            .iter()
            .find(|(t, _)| t == "InstallApplication")
            .unwrap()
            .1;
        assert_eq!(
            app["Configuration"].as_dictionary().unwrap()["user_email"],
            Value::String("alice@example.org".into()),
            "the app's configuration carries the person's own email"
        );
        assert_eq!(app["iTunesStoreID"], Value::Integer(1076521545.into()));
        let profile = &offered
            .iter()
            .find(|(t, _)| t == "InstallProfile")
            .unwrap()
            .1;
        let signed = profile["Payload"].as_data().unwrap();
        assert!(
            windows_contain(signed, b"com.apple.mobiledevice.passwordpolicy"),
            "the profile carries the passcode payload"
        );
        assert!(signed.starts_with(&[0x30]), "the profile is signed (CMS)");

        // The next pass asks the device what it has (its reports are older than the installs),
        // and it reports both: installed, not drifted.
        let node = &fleet.server.server.as_ref().unwrap().reconciler;
        let asked = node
            .reconcile(TargetScope::All { after: None })
            .await
            .unwrap();
        assert_eq!(asked.commands, 2, "{}: {asked:?}", db.name());
        let answered = drain(&fleet.server, &device, answer_inventory).await;
        assert_eq!(types(&answered), ["ManagedApplicationList", "ProfileList"]);
        let state = fleet.state(&device).await;
        assert_eq!(
            item(&state, &format!("profile:{PROFILE_ID}"))["status"],
            "installed",
            "{state:#}"
        );
        assert_eq!(
            item(&state, &format!("app:{APP}"))["status"],
            "installed",
            "{state:#}"
        );
        assert_eq!(item(&state, &format!("app:{APP}"))["policy"], "engineering");
        assert_eq!(
            item(&state, &format!("app:{APP}"))["group"],
            format!("{PROVIDER}:{}", fleet.group)
        );

        // Another pass, and a restart, queue nothing new.
        let again = node
            .reconcile(TargetScope::All { after: None })
            .await
            .unwrap();
        assert_eq!(again.commands, 0, "{}: {again:?}", db.name());
        let before = fleet.commands(&device).await.len();
        let Fleet {
            server,
            admin,
            group,
        } = fleet;
        server.stop().await;
        let server = start().await;
        let fleet = Fleet {
            server,
            admin,
            group,
        };
        let node = &fleet.server.server.as_ref().unwrap().reconciler;
        node.refresh().await.unwrap();
        let after_restart = node
            .reconcile(TargetScope::All { after: None })
            .await
            .unwrap();
        assert_eq!(
            after_restart.commands,
            0,
            "{}: {after_restart:?}",
            db.name()
        );
        assert_eq!(fleet.commands(&device).await.len(), before);

        // An edit of one payload: exactly one update per device, nothing else.
        let (status, applied) = fleet
            .apply(
                &[("engineering.yaml", engineering(&fleet.group, 10, ""))],
                false,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{applied:#}");
        assert_eq!(
            applied["plan"]["totals"]["update_profile"], 1,
            "{applied:#}"
        );
        assert_eq!(applied["plan"]["totals"]["install_app"], 0, "{applied:#}");
        let offered = drain(&fleet.server, &device, |_| Dictionary::new()).await;
        assert_eq!(types(&offered), ["InstallProfile"], "{}", db.name());
        // The same set again changes nothing.
        let (status, same) = fleet
            .apply(
                &[("engineering.yaml", engineering(&fleet.group, 10, ""))],
                false,
            )
            .await;
        assert_eq!(status, StatusCode::OK, "{same:#}");
        assert_eq!(same["unchanged"], true);

        // Leaving the group removes what the policy installed.
        fleet.sign_in("alice", &[]).await;
        let offered = drain(&fleet.server, &device, |_| Dictionary::new()).await;
        assert_eq!(
            types(&offered),
            ["RemoveApplication", "RemoveProfile"],
            "{}",
            db.name()
        );
        let removed = &offered
            .iter()
            .find(|(t, _)| t == "RemoveProfile")
            .unwrap()
            .1;
        assert_eq!(removed["Identifier"], Value::String(PROFILE_ID.into()));
        let state = fleet.state(&device).await;
        assert_eq!(
            item(&state, &format!("profile:{PROFILE_ID}"))["status"],
            "removed",
            "{state:#}"
        );

        // A wipe on leave is destructive: refused without consent, applied with it.
        let wiping = engineering(&fleet.group, 10, "on_leave: { wipe: { after: 72h } }\n");
        let (status, refused) = fleet
            .apply(&[("engineering.yaml", wiping.clone())], false)
            .await;
        assert_eq!(status, StatusCode::CONFLICT, "{refused:#}");
        assert_eq!(
            refused["plan"]["destructive"][0]["action"], "wipe",
            "{refused:#}"
        );
        let (status, applied) = fleet.apply(&[("engineering.yaml", wiping)], true).await;
        assert_eq!(status, StatusCode::CREATED, "{applied:#}");
        fleet.server.stop().await;
    }
}

fn windows_contain(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Two nodes on one PostgreSQL database reacting to the same change queue each command once.
#[tokio::test]
async fn two_nodes_queue_each_command_once() {
    let Some(pg) = crate::harness::PgTestDb::create().await else {
        return;
    };
    // Two nodes share the database and the master key, as a deployment's nodes do.
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("secret.key");
    let node = || {
        let (url, key_file) = (pg.url.clone(), key_file.clone());
        TestServer::start_with(move |args| {
            args.database_url = Some(url);
            args.secret_key_file = Some(key_file);
        })
    };
    let first = node().await;
    let second = node().await;
    let admin = first.admin_key("policy-admin", &["admin"]).await;
    let group = format!(
        "cn=eng-{},ou=groups,dc=example,dc=org",
        uuid::Uuid::new_v4()
    );
    let fleet = Fleet {
        server: first,
        admin,
        group,
    };
    let mut devices = Vec::new();
    for n in 0..8 {
        let user = fleet.sign_in(&format!("person{n}"), &[&fleet.group]).await;
        devices.push(fleet.device_for(&user).await);
    }
    let (status, applied) = fleet
        .apply(
            &[("engineering.yaml", engineering(&fleet.group, 8, ""))],
            false,
        )
        .await;
    assert_eq!(status, StatusCode::CREATED, "{applied:#}");
    // Both nodes, at once, on top of whatever their loops already did.
    let a = &fleet.server.server.as_ref().unwrap().reconciler;
    let b = &second.server.as_ref().unwrap().reconciler;
    b.refresh().await.unwrap();
    let (ra, rb) = tokio::join!(
        a.reconcile(TargetScope::All { after: None }),
        b.reconcile(TargetScope::All { after: None })
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert!(ra.commands + rb.commands <= 16, "{ra:?} {rb:?}");
    for device in &devices {
        let commands = fleet.commands(device).await;
        let mut types: Vec<&str> = commands
            .iter()
            .map(|c| c["request_type"].as_str().unwrap())
            .collect();
        types.sort();
        assert_eq!(
            types,
            ["InstallApplication", "InstallProfile"],
            "{commands:#?}"
        );
    }
    second.stop().await;
    fleet.server.stop().await;
}

/// The signed content of a CMS SignedData profile, as a plist (the XML is carried whole).
fn signed_plist(signed: &[u8]) -> Dictionary {
    let start = signed
        .windows(5)
        .position(|w| w == b"<?xml")
        .expect("an XML plist inside");
    let end = signed
        .windows(8)
        .rposition(|w| w == b"</plist>")
        .expect("the plist's end")
        + 8;
    Value::from_reader_xml(&signed[start..end])
        .unwrap()
        .into_dictionary()
        .unwrap()
}

/// A device whose identity certificate nears its expiry is sent its enrollment profile again
/// with a fresh challenge for its own enrollment record; the certificate it enrolls with it
/// keeps speaking for the device, and the renewal is not sent again.
#[tokio::test]
async fn identity_certificates_are_renewed_before_they_expire() {
    // Certificates good for a day, renewed 30 days ahead: due at once.
    let server = TestServer::start_configured(
        |args| args.cert_validity_days = Some(1),
        "[policy]\nidentity_renewal_days = 30\n",
    )
    .await;
    let admin = server.admin_key("policy-admin", &["admin"]).await;
    let (cert, key) = crate::profiles::push_certificate(crate::device::TOPIC);
    let imported = crate::profiles::import_push(&server, &admin, &cert, &key).await;
    assert_eq!(imported.status(), StatusCode::OK);
    let fleet = Fleet {
        server,
        admin,
        group: "cn=unused".into(),
    };
    let alice = fleet.sign_in("alice", &[]).await;
    let mut device = fleet.device_for(&alice).await;
    let offered = drain(&fleet.server, &device, |_| Dictionary::new()).await;
    assert_eq!(types(&offered), ["InstallProfile"]);
    let profile = signed_plist(offered[0].1["Payload"].as_data().unwrap());
    let content = profile["PayloadContent"].as_array().unwrap();
    let scep = content
        .iter()
        .filter_map(Value::as_dictionary)
        .find(|p| p["PayloadType"].as_string() == Some("com.apple.security.scep"))
        .expect("a SCEP payload");
    let challenge = scep["PayloadContent"].as_dictionary().unwrap()["Challenge"]
        .as_string()
        .unwrap()
        .to_owned();
    assert!(
        profile["PayloadIdentifier"]
            .as_string()
            .unwrap()
            .starts_with("org.trustbroker.enrollment."),
        "the enrollment profile, replaced in place"
    );
    // The device enrolls its new identity with the challenge and speaks with it.
    let key = tokio::task::spawn_blocking(|| {
        trustbroker::pki::scep::client::ClientIdentity::generate(2048)
    })
    .await
    .unwrap()
    .unwrap();
    // Stored times are whole seconds: a certificate issued in the same second as the old one
    // would expire at the same time, and either could count as the newest.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let issued = crate::device::scep_enroll(&fleet.server, &key, &challenge).await;
    device.identity = key.with_certificate(issued);
    assert_eq!(device.idle(&fleet.server).await, None);
    // Its new certificate is as short-lived, so it is due again: once per certificate.
    let node = &fleet.server.server.as_ref().unwrap().reconciler;
    let pass = node
        .reconcile(TargetScope::All { after: None })
        .await
        .unwrap();
    assert_eq!(pass.commands, 1, "{pass:?}");
    let again = node
        .reconcile(TargetScope::All { after: None })
        .await
        .unwrap();
    assert_eq!(again.commands, 0, "{again:?}");
    fleet.server.stop().await;
}

/// `trustbroker policy …` as a policy repository's CI job runs it: validate (file:line:column
/// for every mistake), then plan and apply against a running broker with an admin key, a
/// destructive plan refused (exit 1) until consented to, and plan against the database.
#[tokio::test]
async fn the_command_line_validates_plans_and_applies_against_a_server() {
    let root = env!("CARGO_MANIFEST_DIR");
    let run = |args: &[&str], envs: &[(&str, &str)]| {
        let out = crate::harness::binary()
            .args(args)
            .envs(envs.iter().copied())
            .output()
            .expect("run trustbroker");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stdout, stderr) = run(&["policy", "validate", &format!("{root}/policies")], &[]);
    assert_eq!(code, Some(0), "the examples load: {stdout}{stderr}");
    let (code, _, stderr) = run(
        &[
            "policy",
            "validate",
            &format!("{root}/tests/fixtures/policies-invalid"),
        ],
        &[],
    );
    assert_eq!(code, Some(2), "{stderr}");
    let located = stderr
        .lines()
        .filter(|l| {
            let mut parts = l.splitn(4, ':');
            let (_, line, column) = (parts.next(), parts.next(), parts.next());
            line.is_some_and(|n| n.parse::<usize>().is_ok_and(|n| n > 0))
                && column.is_some_and(|n| n.parse::<usize>().is_ok_and(|n| n > 0))
        })
        .count();
    assert!(
        located >= 3,
        "each mistake with its line and column: {stderr}"
    );

    let data = tempfile::tempdir().unwrap();
    let data_dir = data.path().to_str().unwrap().to_owned();
    let broker = crate::harness::BrokerProcess::serve(
        &["--data-dir", &data_dir, "--listen", "127.0.0.1:0"],
        &[],
    );
    let (code, stdout, _) = run(
        &[
            "admin-key",
            "create",
            "--name",
            "policy-ci",
            "--scope",
            "policies:read",
            "--scope",
            "policies:write",
            "--data-dir",
            &data_dir,
        ],
        &[],
    );
    assert_eq!(code, Some(0));
    let key = crate::harness::created_key(&stdout);
    let policies = tempfile::tempdir().unwrap();
    let dir = policies.path().to_str().unwrap().to_owned();
    std::fs::write(
        policies.path().join("engineering.yaml"),
        engineering("cn=eng,ou=groups,dc=example,dc=org", 8, ""),
    )
    .unwrap();
    let base = broker.base();
    let ca = broker.cert_path.to_str().unwrap().to_owned();
    let remote = |command: &str, extra: &[&str]| {
        let mut args = vec![
            "policy",
            command,
            dir.as_str(),
            "--server",
            &base,
            "--server-ca",
            &ca,
        ];
        args.extend_from_slice(extra);
        run(&args, &[("TRUSTBROKER_ADMIN_KEY", key.as_str())])
    };
    let (code, stdout, stderr) = remote("plan", &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("engineering (new"), "{stdout}");
    let (code, stdout, stderr) = remote("apply", &["--git-commit", "abc123"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("applied as version 1"), "{stdout}");
    // A wipe on leave is refused without consent, then applied with it.
    std::fs::write(
        policies.path().join("engineering.yaml"),
        engineering(
            "cn=eng,ou=groups,dc=example,dc=org",
            8,
            "on_leave: { wipe: { after: 72h } }\n",
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = remote("apply", &[]);
    assert_eq!(code, Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("DESTRUCTIVE") && stderr.contains("--allow-destructive"),
        "{stdout}{stderr}"
    );
    let (code, stdout, stderr) = remote("apply", &["--allow-destructive"]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("applied as version 2"), "{stdout}");
    // The same set, planned against the database directly: no change.
    let (code, stdout, stderr) = run(&["policy", "plan", &dir, "--data-dir", &data_dir], &[]);
    assert_eq!(code, Some(0), "{stdout}{stderr}");
    assert!(stdout.contains("no change"), "{stdout}");
    // Without the key, --server is refused with what to do.
    let (code, _, stderr) = run(&["policy", "plan", &dir, "--server", &base], &[]);
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("TRUSTBROKER_ADMIN_KEY"), "{stderr}");
    broker.terminate().await;
}

/// With slapd: a person is added to a group with ldapmodify; after one sync (every second
/// here) their enrolled device is offered the policy's profile and app, acknowledges them and
/// reports the profile, and the state API says installed; removed from the group, the device
/// is offered the removals.
#[tokio::test]
async fn an_ldap_group_change_reaches_the_device_after_one_sync() {
    let Some(ldap) = crate::ldap_sync::Sandbox::new() else {
        return;
    };
    ldap.ldapadd(&format!(
        "{}{}{}",
        ldap.person("dana"),
        ldap.person("placeholder"),
        ldap.group_of_names("eng", &["placeholder"])
    ));
    let group = ldap.dn("cn=eng");
    let idp = format!(
        "[idp.corp]\ntype = \"ldap\"\nurl = \"{}\"\nca_file = \"{}\"\n\
         bind_dn = \"cn=broker,ou=services,dc=example,dc=org\"\nbind_password = \"brokerpw\"\n\
         user_base = \"{}\"\ngroup_sync_interval_secs = 1\n",
        ldap.url, ldap.ca, ldap.base
    );
    for db in TestDb::all().await {
        let url = db.database_url();
        let server = TestServer::start_configured(move |args| args.database_url = url, &idp).await;
        let admin = server.admin_key("policy-admin", &["admin"]).await;
        // Dana signs in with her password, as at the portal.
        let provider = trustbroker::identity::ldap::LdapProvider::new(
            PROVIDER,
            &ldap.settings("cn=broker,ou=services,dc=example,dc=org", "brokerpw", ""),
        )
        .unwrap();
        let identity = provider.authenticate("dana", "danapw").await.unwrap();
        let dana = server
            .store()
            .record_sign_in(&identity, "sign-in")
            .await
            .unwrap();
        let fleet = Fleet {
            server,
            admin,
            group: group.clone(),
        };
        let device = fleet.device_for(&dana).await;
        let (status, applied) = fleet
            .apply(
                &[("engineering.yaml", engineering(&fleet.group, 8, ""))],
                false,
            )
            .await;
        assert_eq!(status, StatusCode::CREATED, "{applied:#}");
        assert_eq!(
            device.idle(&fleet.server).await,
            None,
            "not in the group yet"
        );

        ldap.ldapmodify(&format!(
            "dn: {group}\nchangetype: modify\nadd: member\nmember: {}\n",
            ldap.dn("uid=dana")
        ));
        let offered = drain(&fleet.server, &device, |t| match t {
            "ProfileList" => profile_list(&[PROFILE_ID]),
            _ => Dictionary::new(),
        })
        .await;
        assert_eq!(
            types(&offered),
            ["InstallApplication", "InstallProfile"],
            "{}",
            db.name()
        );
        let app = &offered
            .iter()
            .find(|(t, _)| t == "InstallApplication")
            .unwrap()
            .1;
        assert_eq!(
            app["Configuration"].as_dictionary().unwrap()["user_email"],
            Value::String("dana@example.org".into())
        );
        // A pass asks what the device has; it reports both.
        let node = &fleet.server.server.as_ref().unwrap().reconciler;
        node.reconcile(TargetScope::All { after: None })
            .await
            .unwrap();
        let answered = drain(&fleet.server, &device, answer_inventory).await;
        assert_eq!(types(&answered), ["ManagedApplicationList", "ProfileList"]);
        let state = fleet.state(&device).await;
        assert_eq!(
            item(&state, &format!("profile:{PROFILE_ID}"))["status"],
            "installed",
            "{state:#}"
        );
        assert_eq!(
            item(&state, &format!("app:{APP}"))["status"],
            "installed",
            "{state:#}"
        );
        let memberships = fleet
            .server
            .get_json(&format!("/api/v1/users/{}", dana.id), Some(&fleet.admin))
            .await;
        assert!(
            memberships["groups"]
                .as_array()
                .unwrap()
                .iter()
                .any(|g| g["external_id"] == group.as_str() && g["source"] == "ldap-sync"),
            "{memberships:#}"
        );

        ldap.ldapmodify(&format!(
            "dn: {group}\nchangetype: modify\ndelete: member\nmember: {}\n",
            ldap.dn("uid=dana")
        ));
        let offered = drain(&fleet.server, &device, |_| Dictionary::new()).await;
        assert_eq!(
            types(&offered),
            ["RemoveApplication", "RemoveProfile"],
            "{}",
            db.name()
        );
        fleet.server.stop().await;
    }
}

/// A policy delivers an integration's shared token in the app's managed configuration; a
/// rotation re-delivers the new one (Settings, the app being installed), the per-token counts
/// show what devices acknowledged, and the device's state says which token it holds.
#[tokio::test]
async fn a_token_rotation_is_delivered_to_the_app_and_counted() {
    let server = TestServer::start().await;
    let admin = server.admin_key("policy-admin", &["admin"]).await;
    let group = "cn=pingid-users,ou=groups,dc=example,dc=org".to_owned();
    let fleet = Fleet {
        server,
        admin,
        group,
    };
    let (status, body) = post(
        &fleet.server,
        &fleet.admin,
        "/api/v1/token-integrations",
        json!({"name": "pingid", "bundle_id": APP, "config_key": "PINGID_MDM_TOKEN"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body:#}");
    let (status, first) = post(
        &fleet.server,
        &fleet.admin,
        "/api/v1/token-integrations/pingid/tokens",
        json!({"label": "first"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{first:#}");
    let first_value = first["value"].as_str().unwrap().to_owned();
    let alice = fleet.sign_in("alice", &[&fleet.group]).await;
    let device = fleet.device_for(&alice).await;
    let policy = format!(
        r#"name: pingid
targets:
  groups:
    - {{ provider: {PROVIDER}, id: "{}" }}
apps:
  - bundle_id: {APP}
    itunes_store_id: 1076521545
    configuration:
      PINGID_MDM_TOKEN: "${{token.pingid}}"
      user_email: "${{user.email}}"
"#,
        fleet.group
    );
    let (status, applied) = fleet.apply(&[("pingid.yaml", policy)], false).await;
    assert_eq!(status, StatusCode::CREATED, "{applied:#}");
    let offered = drain(&fleet.server, &device, |_| Dictionary::new()).await;
    assert_eq!(types(&offered), ["InstallApplication"]);
    let configuration = offered[0].1["Configuration"]
        .as_dictionary()
        .unwrap()
        .clone();
    assert_eq!(
        configuration["PINGID_MDM_TOKEN"],
        Value::String(first_value.clone())
    );

    // Rotate: the new token goes out as the app's new configuration.
    let (status, rotated) = post(
        &fleet.server,
        &fleet.admin,
        "/api/v1/token-integrations/pingid/tokens/rotate",
        json!({"label": "second"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{rotated:#}");
    let second_value = rotated["created"]["value"].as_str().unwrap().to_owned();
    let second_id = rotated["created"]["id"].as_str().unwrap().to_owned();
    // (The same pass asks what apps the device has: it has not said since the install.)
    let offered: Vec<(String, Dictionary)> = drain(&fleet.server, &device, answer_inventory)
        .await
        .into_iter()
        .filter(|(t, _)| t != "ManagedApplicationList")
        .collect();
    assert_eq!(
        types(&offered),
        ["Settings"],
        "a configuration change, not a reinstall"
    );
    let setting = offered[0].1["Settings"].as_array().unwrap()[0]
        .as_dictionary()
        .unwrap()
        .clone();
    assert_eq!(
        setting["Item"],
        Value::String("ApplicationConfiguration".into())
    );
    assert_eq!(setting["Identifier"], Value::String(APP.into()));
    assert_eq!(
        setting["Configuration"].as_dictionary().unwrap()["PINGID_MDM_TOKEN"],
        Value::String(second_value)
    );
    // Counts per token: the device acknowledged both configurations.
    let tokens = fleet
        .server
        .get_json(
            "/api/v1/token-integrations/pingid/tokens",
            Some(&fleet.admin),
        )
        .await;
    for token in tokens["tokens"].as_array().unwrap() {
        assert_eq!(token["delivered"], 1, "{tokens:#}");
        assert_eq!(token["acknowledged"], 1, "{tokens:#}");
    }
    // The state says which token the device holds: the newest acknowledged.
    let state = fleet.state(&device).await;
    let held = &item(&state, &format!("app:{APP}"))["tokens"];
    assert_eq!(held[0]["token_id"], second_id.as_str(), "{state:#}");
    assert_eq!(held[0]["acknowledged"], true, "{state:#}");
    // Another pass sends nothing: the configuration is the one delivered.
    let node = &fleet.server.server.as_ref().unwrap().reconciler;
    let again = node
        .reconcile(TargetScope::All { after: None })
        .await
        .unwrap();
    assert_eq!(again.commands, 0, "{again:?}");
    fleet.server.stop().await;
}

/// `${device_token.<integration>}`: the reconciler issues the device its own signed token and
/// delivers it in the app's configuration; another pass reuses it (nothing is re-sent); when
/// the owner leaves the group the app is removed and the token is inactive at introspection
/// at once.
#[tokio::test]
async fn a_device_token_is_delivered_reused_and_revoked_on_leave() {
    let server = TestServer::start().await;
    let admin = server.admin_key("policy-admin", &["admin"]).await;
    let fleet = Fleet {
        server,
        admin,
        group: "cn=device-token-users,ou=groups,dc=example,dc=org".to_owned(),
    };
    let (status, body) = post(
        &fleet.server,
        &fleet.admin,
        "/api/v1/token-integrations",
        json!({"name": "pingid", "bundle_id": APP, "config_key": "PINGID_MDM_TOKEN",
               "device_tokens": true}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{body:#}");
    let (status, client) = post(
        &fleet.server,
        &fleet.admin,
        "/api/v1/token-integrations/pingid/clients",
        json!({"name": "pingid-backend"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{client:#}");
    let (client_id, secret) = (
        client["id"].as_str().unwrap().to_owned(),
        client["client_secret"].as_str().unwrap().to_owned(),
    );
    let alice = fleet.sign_in("alice", &[&fleet.group]).await;
    let device = fleet.device_for(&alice).await;
    let policy = format!(
        r#"name: pingid-device
targets:
  groups:
    - {{ provider: {PROVIDER}, id: "{}" }}
apps:
  - bundle_id: {APP}
    itunes_store_id: 1076521545
    configuration:
      DEVICE_TOKEN: "${{device_token.pingid}}"
"#,
        fleet.group
    );
    let (status, applied) = fleet.apply(&[("pingid.yaml", policy)], false).await;
    assert_eq!(status, StatusCode::CREATED, "{applied:#}");
    let offered = drain(&fleet.server, &device, answer_inventory).await;
    assert_eq!(types(&offered), ["InstallApplication"]);
    let jwt = offered[0].1["Configuration"].as_dictionary().unwrap()["DEVICE_TOKEN"]
        .as_string()
        .unwrap()
        .to_owned();
    let introspect = |token: String| {
        let (server, id, secret) = (&fleet.server, client_id.clone(), secret.clone());
        async move {
            let response = server
                .client
                .post(server.url("/validate/v1/introspect"))
                .basic_auth(id, Some(secret))
                .header("content-type", "application/x-www-form-urlencoded")
                .body(format!("token={token}"))
                .send()
                .await
                .unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            response.json::<Json>().await.unwrap()
        }
    };
    let answer = introspect(jwt.clone()).await;
    assert_eq!(answer["active"], true, "{answer:#}");
    assert_eq!(answer["sub"], device.udid.as_str(), "{answer:#}");
    // Passes reuse the token: nothing is sent again.
    let node = &fleet.server.server.as_ref().unwrap().reconciler;
    let again = node
        .reconcile(TargetScope::All { after: None })
        .await
        .unwrap();
    assert_eq!(again.commands, 1, "only the stale app inventory: {again:?}");
    let offered = drain(&fleet.server, &device, answer_inventory).await;
    assert_eq!(types(&offered), ["ManagedApplicationList"]);
    // Leaving the group: removed, and the token is inactive at once.
    fleet.sign_in("alice", &[]).await;
    let offered = drain(&fleet.server, &device, answer_inventory).await;
    assert_eq!(types(&offered), ["RemoveApplication"]);
    let answer = introspect(jwt).await;
    assert_eq!(answer["active"], false, "{answer:#}");
    fleet.server.stop().await;
}
