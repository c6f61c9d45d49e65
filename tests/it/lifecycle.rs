//! A device over its whole life: wiped and enrolled again with a fresh profile, handed to
//! another person, retired by an admin (API and command line). Each on SQLite and PostgreSQL.

use plist::{Dictionary, Value};
use reqwest::StatusCode;
use serde_json::{Value as Json, json};
use trustbroker::config::ReenrollmentPolicy;
use trustbroker::identity::Identity;
use trustbroker::pki::challenge::{self, ChallengeRequest};

use crate::device::{Device, uuid_and_type, xml};
use crate::harness::{TestDb, TestServer, run_cli};
use crate::mdm::certificate_serial;

struct Broker {
    server: TestServer,
    admin: String,
    /// Where the SQLite database lives, for the command line (PostgreSQL: its URL).
    data_dir: tempfile::TempDir,
    database_url: Option<String>,
}

/// A challenge and the enrollment record it enrolls under.
struct Issued {
    challenge: String,
    record: String,
}

impl Broker {
    async fn start(db: &TestDb, policy: ReenrollmentPolicy) -> Broker {
        let data_dir = tempfile::tempdir().unwrap();
        let path = data_dir.path().to_path_buf();
        let database_url = db.database_url();
        let url = database_url.clone();
        let server = TestServer::start_with(move |args| {
            args.data_dir = Some(path);
            args.database_url = url;
            args.mdm_reenrollment = Some(policy);
        })
        .await;
        let admin = server.admin_key("lifecycle-admin", &["admin"]).await;
        Broker {
            server,
            admin,
            data_dir,
            database_url,
        }
    }

    /// A person as the portal records them at sign-in; their `users.id`.
    async fn person(&self, login: &str) -> String {
        let identity = Identity {
            provider: "corp".into(),
            subject: format!("subject-{login}"),
            login: Some(login.into()),
            email: Some(format!("{login}@example.org")),
            display_name: None,
            groups: Vec::new(),
        };
        self.server
            .store()
            .record_sign_in(&identity, "sign-in")
            .await
            .unwrap()
            .id
    }

    /// A fresh enrollment record for `user_id` (as the portal makes one) and its challenge.
    async fn issue(&self, user_id: &str) -> Issued {
        let issued = challenge::create(
            self.server.store(),
            std::time::Duration::from_secs(600),
            ChallengeRequest {
                requested_by: "portal".into(),
                user_id: Some(user_id.into()),
                ..Default::default()
            },
        )
        .await
        .unwrap();
        Issued {
            challenge: issued.challenge,
            record: issued.enrollment_id,
        }
    }

    /// A device enrolled (SCEP, Authenticate, TokenUpdate) under a fresh record for `user_id`.
    async fn enrolled(&self, user_id: &str) -> (Device, String) {
        let issued = self.issue(user_id).await;
        let device = Device::enroll(&self.server, &issued.challenge).await;
        device.check_in(&self.server).await;
        (device, issued.record)
    }

    /// The same device wiped: a new key and certificate from a fresh record, the same UDID.
    async fn wiped(&self, device: &Device, user_id: &str) -> (Device, String) {
        let issued = self.issue(user_id).await;
        let mut fresh = Device::enroll(&self.server, &issued.challenge).await;
        fresh.udid = device.udid.clone();
        (fresh, issued.record)
    }

    async fn enqueue(&self, udid: &str, request_type: &str) -> String {
        let response = self
            .server
            .client
            .post(self.server.url("/api/v1/commands"))
            .bearer_auth(&self.admin)
            .json(
                &json!({"enrollment_ids": [udid], "command": {"RequestType": request_type},
                          "nopush": true}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: Json = response.json().await.unwrap();
        body["commands"][0]["command_uuid"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn command_status(&self, uuid: &str) -> String {
        let body = self
            .server
            .get_json(&format!("/api/v1/commands/{uuid}"), Some(&self.admin))
            .await;
        body["status"].as_str().unwrap().to_owned()
    }

    async fn device(&self, udid: &str) -> Json {
        self.server
            .get_json(&format!("/api/v1/devices/{udid}"), Some(&self.admin))
            .await
    }

    async fn retire(&self, id: &str) -> (StatusCode, Json) {
        let response = self
            .server
            .client
            .post(self.server.url(&format!("/api/v1/enrollments/{id}/retire")))
            .bearer_auth(&self.admin)
            .send()
            .await
            .unwrap();
        (response.status(), response.json().await.unwrap())
    }

    async fn certificate_status(&self, device: &Device) -> String {
        let serial = certificate_serial(device);
        let body = self
            .server
            .get_json(&format!("/api/v1/certificates/{serial}"), Some(&self.admin))
            .await;
        body["status"].as_str().unwrap().to_owned()
    }

    async fn audit(&self, action: &str) -> Vec<Json> {
        let body = self
            .server
            .get_json(&format!("/api/v1/audit?action={action}"), Some(&self.admin))
            .await;
        body["entries"].as_array().unwrap().clone()
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

/// Both MDM channels refuse `device`: a check-in (TokenUpdate) and a connect (Idle).
async fn refused_on_both_channels(broker: &Broker, device: &Device, db: &TestDb) {
    assert_eq!(
        device.token_update(&broker.server).await.status(),
        StatusCode::UNAUTHORIZED,
        "check-in, {}",
        db.name()
    );
    let (status, command) = device
        .report(&broker.server, "Idle", None, Dictionary::new())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "connect, {}", db.name());
    assert!(command.is_none());
}

#[tokio::test]
async fn a_wiped_device_enrolls_again_and_only_the_new_enrollment_gets_commands() {
    for db in TestDb::all().await {
        let broker = Broker::start(&db, ReenrollmentPolicy::Allow).await;
        let alice = broker.person("alice").await;
        let bob = broker.person("bob").await;
        let (old, old_record) = broker.enrolled(&alice).await;
        // One command delivered but not answered, one still queued: both die with the wipe.
        let sent = broker.enqueue(&old.udid, "SecurityInfo").await;
        let queued = broker.enqueue(&old.udid, "ProfileList").await;
        let offered = old.idle(&broker.server).await.expect("a command");
        assert_eq!(uuid_and_type(&offered).0, sent);

        // Wiped, and handed to Bob with a fresh profile.
        let (new, new_record) = broker.wiped(&old, &bob).await;
        assert_eq!(
            new.authenticate(&broker.server).await.status(),
            StatusCode::OK,
            "{}",
            db.name()
        );
        assert_eq!(
            new.token_update(&broker.server).await.status(),
            StatusCode::OK
        );
        assert_eq!(broker.command_status(&sent).await, "cancelled");
        assert_eq!(broker.command_status(&queued).await, "cancelled");

        let after = broker.enqueue(&new.udid, "SecurityInfo").await;
        let command = new.idle(&broker.server).await.expect("the new command");
        assert_eq!(uuid_and_type(&command).0, after, "{}", db.name());

        // The old identity is over on both channels, its certificate revoked.
        refused_on_both_channels(&broker, &old, &db).await;
        assert_eq!(broker.certificate_status(&old).await, "revoked");
        assert_eq!(broker.certificate_status(&new).await, "valid");

        // The history: Alice's enrollment retired by the re-enrollment, Bob's active.
        let device = broker.device(&new.udid).await;
        assert_eq!(device["enrollment_record_id"], new_record.as_str());
        assert_eq!(device["owner"]["id"], bob.as_str(), "{device}");
        let history = device["enrollments"].as_array().unwrap();
        assert_eq!(history.len(), 2, "{device}");
        assert_eq!(history[0]["id"], old_record.as_str());
        assert_eq!(history[0]["owner"]["id"], alice.as_str());
        assert_eq!(history[0]["status"], "retired");
        assert_eq!(history[0]["retired_reason"], "re-enrolled");
        assert_eq!(history[0]["superseded_by"], new_record.as_str());
        assert!(history[0]["started_at"].is_string() && history[0]["retired_at"].is_string());
        assert_eq!(history[1]["id"], new_record.as_str());
        assert_eq!(history[1]["status"], "active");
        assert_eq!(history[1]["owner"]["login"], "bob");
        assert!(history[1]["retired_at"].is_null());
        let channels = device["channels"].as_array().unwrap();
        assert_eq!(channels[0]["status"], "active");

        let audited = broker.audit("device.reenroll").await;
        assert_eq!(audited.len(), 1, "{audited:?}");
        assert_eq!(audited[0]["target"], new.udid.as_str());
        let detail: Json = serde_json::from_str(audited[0]["detail"].as_str().unwrap()).unwrap();
        assert_eq!(detail["previous_enrollment"], old_record.as_str());
        assert_eq!(detail["enrollment"], new_record.as_str());
        assert_eq!(detail["commands_cancelled"], 2);

        // A certificate bound to another device still cannot take this one over.
        let (other, _) = broker.enrolled(&alice).await;
        let mut takeover = other.message("Authenticate");
        takeover.insert("UDID".into(), new.udid.clone().into());
        let response = other
            .put(&broker.server, "/mdm/checkin", xml(takeover))
            .await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            broker.device(&new.udid).await["enrollment_record_id"],
            new_record.as_str()
        );
        broker.server.stop().await;
    }
}

#[tokio::test]
async fn same_owner_refuses_another_persons_record_and_accepts_the_owners() {
    for db in TestDb::all().await {
        let broker = Broker::start(&db, ReenrollmentPolicy::SameOwner).await;
        let alice = broker.person("alice").await;
        let bob = broker.person("bob").await;
        let (old, old_record) = broker.enrolled(&alice).await;

        let (bobs, _) = broker.wiped(&old, &bob).await;
        assert_eq!(
            bobs.authenticate(&broker.server).await.status(),
            StatusCode::UNAUTHORIZED,
            "{}",
            db.name()
        );
        // Nothing changed: the old enrollment still works.
        assert!(old.idle(&broker.server).await.is_none());
        assert_eq!(
            broker.device(&old.udid).await["enrollment_record_id"],
            old_record.as_str()
        );
        let denied = broker.audit("device.reenroll").await;
        assert_eq!(denied[0]["outcome"], "denied", "{denied:?}");

        let (alices, alices_record) = broker.wiped(&old, &alice).await;
        assert_eq!(
            alices.authenticate(&broker.server).await.status(),
            StatusCode::OK,
            "{}",
            db.name()
        );
        assert_eq!(
            alices.token_update(&broker.server).await.status(),
            StatusCode::OK
        );
        let device = broker.device(&old.udid).await;
        assert_eq!(device["enrollment_record_id"], alices_record.as_str());
        assert_eq!(device["owner"]["id"], alice.as_str());
        refused_on_both_channels(&broker, &old, &db).await;
        broker.server.stop().await;
    }
}

#[tokio::test]
async fn deny_refuses_until_the_admin_retires_the_old_enrollment() {
    for db in TestDb::all().await {
        let broker = Broker::start(&db, ReenrollmentPolicy::Deny).await;
        let alice = broker.person("alice").await;
        let (old, old_record) = broker.enrolled(&alice).await;
        let (new, new_record) = broker.wiped(&old, &alice).await;
        assert_eq!(
            new.authenticate(&broker.server).await.status(),
            StatusCode::UNAUTHORIZED,
            "{}",
            db.name()
        );
        assert!(old.idle(&broker.server).await.is_none());

        // The help desk retires the old enrollment (by the device's UDID).
        let (status, body) = broker.retire(&old.udid).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["retired"]["enrollment_id"], old_record.as_str());
        refused_on_both_channels(&broker, &old, &db).await;

        assert_eq!(
            new.authenticate(&broker.server).await.status(),
            StatusCode::OK,
            "{}",
            db.name()
        );
        assert_eq!(
            new.token_update(&broker.server).await.status(),
            StatusCode::OK
        );
        let uuid = broker.enqueue(&new.udid, "ProfileList").await;
        let command = new.idle(&broker.server).await.expect("a command");
        assert_eq!(uuid_and_type(&command).0, uuid);
        let history = broker.device(&new.udid).await["enrollments"].clone();
        assert_eq!(history[0]["retired_reason"], "retired", "{history}");
        assert_eq!(history[0]["superseded_by"], Json::Null);
        assert_eq!(history[1]["id"], new_record.as_str());
        broker.server.stop().await;
    }
}

#[tokio::test]
async fn retiring_an_enrollment_refuses_both_channels_at_once_and_cancels_its_queue() {
    for db in TestDb::all().await {
        let broker = Broker::start(&db, ReenrollmentPolicy::Allow).await;
        let alice = broker.person("alice").await;
        let (device, record) = broker.enrolled(&alice).await;
        // Its channel is known to the fast path of the command channel first.
        assert!(device.idle(&broker.server).await.is_none());
        let pending = broker.enqueue(&device.udid, "SecurityInfo").await;

        let (status, body) = broker.retire(&record).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        let retired = &body["retired"];
        assert_eq!(retired["already_retired"], false);
        assert_eq!(retired["udid"], device.udid.as_str());
        assert_eq!(retired["certificates_revoked"], 1);
        assert_eq!(retired["commands_cancelled"], 1);
        refused_on_both_channels(&broker, &device, &db).await;
        assert_eq!(broker.command_status(&pending).await, "cancelled");
        assert_eq!(broker.certificate_status(&device).await, "revoked");
        let shown = broker.device(&device.udid).await;
        assert_eq!(shown["channels"][0]["status"], "checked-out", "{shown}");
        assert_eq!(shown["enrollments"][0]["status"], "retired");

        let audited = broker.audit("enrollment.retire").await;
        assert_eq!(audited.len(), 1, "{audited:?}");
        assert_eq!(audited[0]["target"], record.as_str());
        assert_eq!(audited[0]["outcome"], "success");
        assert!(
            audited[0]["actor"]
                .as_str()
                .unwrap()
                .contains("lifecycle-admin")
        );

        // Twice is fine, and says so.
        let (status, again) = broker.retire(&record).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(again["retired"]["already_retired"], true, "{again}");
        assert_eq!(again["retired"]["certificates_revoked"], 0);
        let (status, _) = broker.retire("no-such-enrollment").await;
        assert_eq!(status, StatusCode::NOT_FOUND);
        // Another admin's key without certificates:write may not.
        let reader = broker.server.admin_key("reader", &["devices:read"]).await;
        let response = broker
            .server
            .client
            .post(
                broker
                    .server
                    .url(&format!("/api/v1/enrollments/{record}/retire")),
            )
            .bearer_auth(reader)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        broker.server.stop().await;
    }
}

#[tokio::test]
async fn retiring_from_the_command_line_refuses_both_channels() {
    for db in TestDb::all().await {
        let broker = Broker::start(&db, ReenrollmentPolicy::Allow).await;
        let alice = broker.person("alice").await;
        let (device, record) = broker.enrolled(&alice).await;
        let pending = broker.enqueue(&device.udid, "SecurityInfo").await;

        let (ok, out, err) = broker.cli(&["enrollment", "retire", &record]);
        assert!(ok, "{out}{err}");
        assert!(out.contains("1 certificate(s) revoked"), "{out}");
        assert!(out.contains("1 command(s) cancelled"), "{out}");
        refused_on_both_channels(&broker, &device, &db).await;
        assert_eq!(broker.command_status(&pending).await, "cancelled");
        let audited = broker.audit("enrollment.retire").await;
        assert_eq!(audited.len(), 1);
        assert!(
            audited[0]["actor"].as_str().unwrap().starts_with("cli:"),
            "{audited:?}"
        );
        assert_eq!(audited[0]["source"], "cli");

        let (ok, out, _) = broker.cli(&["enrollment", "retire", &record]);
        assert!(ok);
        assert!(out.contains("already retired"), "{out}");
        let (ok, out, _) = broker.cli(&["enrollment", "history", &device.udid]);
        assert!(ok);
        assert!(out.contains(&record) && out.contains("retired"), "{out}");
        let (ok, _, err) = broker.cli(&["enrollment", "retire", "no-such-enrollment"]);
        assert!(!ok);
        assert!(err.contains("no enrollment"), "{err}");
        broker.server.stop().await;
    }
}

/// The body a device gets when an Authenticate is refused must not tell whether the UDID is
/// enrolled already.
#[tokio::test]
async fn refusals_do_not_tell_whether_a_udid_is_enrolled() {
    for db in TestDb::all().await {
        let broker = Broker::start(&db, ReenrollmentPolicy::Deny).await;
        let alice = broker.person("alice").await;
        let (enrolled, _) = broker.enrolled(&alice).await;

        // A fresh certificate for a UDID enrolled elsewhere.
        let (fresh, _) = broker.wiped(&enrolled, &alice).await;
        let elsewhere = fresh.authenticate(&broker.server).await;
        assert_eq!(elsewhere.status(), StatusCode::UNAUTHORIZED);
        let elsewhere = elsewhere.bytes().await.unwrap();

        // A certificate bound to another device, for a UDID never seen.
        let mut stranger = enrolled.message("Authenticate");
        stranger.insert("UDID".into(), "NEVER-SEEN-UDID".into());
        let bound = enrolled
            .put(&broker.server, "/mdm/checkin", xml(stranger))
            .await;
        assert_eq!(bound.status(), StatusCode::UNAUTHORIZED);
        let bound = bound.bytes().await.unwrap();
        assert_eq!(elsewhere, bound, "{}", db.name());

        // The same for other check-ins: a UDID that never authenticated, another device's.
        let token = |udid: &str| {
            let mut m = enrolled.message("TokenUpdate");
            m.insert("UDID".into(), udid.into());
            m.insert("Token".into(), Value::Data(vec![1; 32]));
            m.insert("PushMagic".into(), "magic".into());
            xml(m)
        };
        let (other, _) = broker.enrolled(&alice).await;
        let unknown = enrolled
            .put(&broker.server, "/mdm/checkin", token("NEVER-SEEN-UDID"))
            .await;
        let foreign = enrolled
            .put(&broker.server, "/mdm/checkin", token(&other.udid))
            .await;
        assert_eq!(unknown.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(foreign.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            unknown.bytes().await.unwrap(),
            foreign.bytes().await.unwrap()
        );
        broker.server.stop().await;
    }
}

/// Fresh certificates racing to enroll one UDID: no 5xx, and afterwards exactly one active
/// enrollment, the one the device is bound to, the others retired.
#[tokio::test]
async fn concurrent_reenrollments_leave_one_active_enrollment() {
    for db in TestDb::all().await {
        let broker = std::sync::Arc::new(Broker::start(&db, ReenrollmentPolicy::Allow).await);
        let alice = broker.person("alice").await;
        let (old, _) = broker.enrolled(&alice).await;
        let mut wiped = Vec::new();
        for _ in 0..6 {
            wiped.push(broker.wiped(&old, &alice).await.0);
        }
        let attempts: Vec<_> = wiped
            .into_iter()
            .map(|device| {
                let broker = broker.clone();
                tokio::spawn(async move { device.authenticate(&broker.server).await.status() })
            })
            .collect();
        for attempt in attempts {
            let status = attempt.await.unwrap();
            assert!(
                status == StatusCode::OK || status == StatusCode::UNAUTHORIZED,
                "{status} on {}",
                db.name()
            );
        }
        let device = broker.device(&old.udid).await;
        let history = device["enrollments"].as_array().unwrap();
        let active: Vec<&Json> = history.iter().filter(|e| e["status"] == "active").collect();
        assert_eq!(active.len(), 1, "{device}");
        assert_eq!(active[0]["id"], device["enrollment_record_id"]);
        assert!(
            history
                .iter()
                .all(|e| e["status"] == "active" || e["status"] == "retired"),
            "{device}"
        );
    }
}
