//! Apple MDM end to end with the device simulator: SCEP enrollment, check-in, the command
//! queue (ordering, NotNow, duplicates, cancel), inventory, and device identity on every
//! request; plus the captured conformance exchanges replayed through the parsers.

use plist::{Dictionary, Value};
use reqwest::StatusCode;
use serde_json::{Value as Json, json};

use crate::device::{Device, put_signed, sign_with, uuid_and_type, xml};
use crate::harness::{TestDb, TestServer};

struct Mdm {
    server: TestServer,
    admin: String,
}

impl Mdm {
    async fn start_on(db: &TestDb) -> Mdm {
        let server = TestServer::start_on(db).await;
        let admin = server.admin_key("mdm-admin", &["admin"]).await;
        Mdm { server, admin }
    }

    async fn start() -> Mdm {
        Self::start_on(&TestDb::Sqlite).await
    }

    async fn challenge(&self) -> String {
        let body: Json = self
            .server
            .client
            .post(self.server.url("/api/v1/scep/challenges"))
            .bearer_auth(&self.admin)
            .json(&json!({"for_user": "alice@example.org"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["challenge"].as_str().unwrap().to_owned()
    }

    /// A device that enrolled over SCEP and checked in.
    async fn enrolled_device(&self) -> Device {
        let device = Device::enroll(&self.server, &self.challenge().await).await;
        device.check_in(&self.server).await;
        device
    }

    async fn enqueue(&self, ids: &[&str], command: Json, extra: Json) -> (StatusCode, Json) {
        let mut body = json!({"enrollment_ids": ids, "command": command});
        if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
            b.extend(e.clone());
        }
        let response = self
            .server
            .client
            .post(self.server.url("/api/v1/commands"))
            .bearer_auth(&self.admin)
            .json(&body)
            .send()
            .await
            .unwrap();
        (response.status(), response.json().await.unwrap())
    }

    async fn enqueue_one(&self, id: &str, command: Json) -> String {
        let (status, body) = self.enqueue(&[id], command, json!({})).await;
        assert_eq!(status, StatusCode::CREATED, "{body}");
        body["commands"][0]["command_uuid"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    async fn history(&self, id: &str) -> Vec<Json> {
        let body = self
            .server
            .get_json(
                &format!("/api/v1/enrollments/{id}/commands"),
                Some(&self.admin),
            )
            .await;
        body["commands"].as_array().unwrap().clone()
    }
}

fn query_responses() -> Dictionary {
    let mut responses = Dictionary::new();
    responses.insert("OSVersion".into(), "14.7".into());
    responses.insert("BuildVersion".into(), "23H124".into());
    responses.insert("SerialNumber".into(), "C02SIMULATED".into());
    responses.insert("IsSupervised".into(), Value::Boolean(false));
    let mut extra = Dictionary::new();
    extra.insert("QueryResponses".into(), Value::Dictionary(responses));
    extra
}

#[tokio::test]
async fn a_device_enrolls_checks_in_and_answers_commands() {
    for db in TestDb::all().await {
        let mdm = Mdm::start_on(&db).await;
        let device = mdm.enrolled_device().await;
        let listed = mdm
            .server
            .get_json("/api/v1/enrollments", Some(&mdm.admin))
            .await;
        let enrollment = &listed["enrollments"][0];
        assert_eq!(enrollment["id"], device.udid.as_str(), "{listed}");
        assert_eq!(enrollment["status"], "active");
        assert_eq!(enrollment["device"]["serial_number"], "C02SIMULATED");
        assert!(
            enrollment.get("push_magic").is_none(),
            "secrets stay out of the API"
        );

        // Nothing queued: an empty 200.
        assert!(device.idle(&mdm.server).await.is_none());

        let info = mdm
            .enqueue_one(
                &device.udid,
                json!({"RequestType": "DeviceInformation", "Queries": ["OSVersion", "BuildVersion"]}),
            )
            .await;
        let list = mdm
            .enqueue_one(&device.udid, json!({"RequestType": "ProfileList"}))
            .await;

        let command = device.idle(&mdm.server).await.expect("a command");
        assert_eq!(
            uuid_and_type(&command),
            (info.clone(), "DeviceInformation".into())
        );
        let queries = command["Command"].as_dictionary().unwrap()["Queries"]
            .as_array()
            .unwrap();
        assert_eq!(queries.len(), 2);

        let (status, next) = device
            .report(&mdm.server, "Acknowledged", Some(&info), query_responses())
            .await;
        assert_eq!(status, StatusCode::OK);
        let next = next.expect("the next command follows the result");
        assert_eq!(uuid_and_type(&next), (list.clone(), "ProfileList".into()));

        let mut profiles = Dictionary::new();
        let mut profile = Dictionary::new();
        profile.insert("PayloadIdentifier".into(), "org.example.wifi".into());
        profile.insert(
            "PayloadUUID".into(),
            "8E4C7F2A-0000-4000-8000-000000000001".into(),
        );
        profiles.insert(
            "ProfileList".into(),
            Value::Array(vec![Value::Dictionary(profile)]),
        );
        let (status, next) = device
            .report(&mdm.server, "Acknowledged", Some(&list), profiles)
            .await;
        assert_eq!(status, StatusCode::OK);
        assert!(next.is_none());

        let shown = mdm
            .server
            .get_json(
                &format!("/api/v1/enrollments/{}", device.udid),
                Some(&mdm.admin),
            )
            .await;
        assert_eq!(shown["device"]["os_version"], "14.7", "{shown}");
        assert_eq!(shown["device"]["inventory"]["BuildVersion"], "23H124");
        assert_eq!(
            shown["device"]["profiles"][0]["PayloadIdentifier"],
            "org.example.wifi"
        );
        let history = mdm.history(&device.udid).await;
        assert_eq!(history.len(), 2);
        assert_eq!(history[0]["status"], "acknowledged");
        assert!(history[0]["sent_at"].is_string() && history[0]["answered_at"].is_string());
        assert_eq!(history[0]["result"]["QueryResponses"]["OSVersion"], "14.7");
        assert_eq!(history[0]["command"]["RequestType"], "DeviceInformation");
        mdm.server.stop().await;
    }
}

#[tokio::test]
async fn not_now_defers_without_spinning_and_errors_are_kept() {
    let mdm = Mdm::start().await;
    let device = mdm.enrolled_device().await;
    let a = mdm
        .enqueue_one(&device.udid, json!({"RequestType": "SecurityInfo"}))
        .await;
    let b = mdm
        .enqueue_one(&device.udid, json!({"RequestType": "ProfileList"}))
        .await;
    let first = device.idle(&mdm.server).await.unwrap();
    assert_eq!(uuid_and_type(&first).0, a);
    // NotNow: the next offer skips what the device just deferred.
    let (_, next) = device
        .report(&mdm.server, "NotNow", Some(&a), Dictionary::new())
        .await;
    assert_eq!(uuid_and_type(&next.unwrap()).0, b);
    let (_, next) = device
        .report(&mdm.server, "NotNow", Some(&b), Dictionary::new())
        .await;
    assert!(next.is_none(), "no spinning on deferred commands");
    // The next Idle offers them again, in order.
    let again = device.idle(&mdm.server).await.unwrap();
    assert_eq!(uuid_and_type(&again).0, a);

    let mut chain = Dictionary::new();
    let mut item = Dictionary::new();
    item.insert("ErrorCode".into(), Value::Integer(12021.into()));
    item.insert("ErrorDomain".into(), "MCMDMErrorDomain".into());
    item.insert("LocalizedDescription".into(), "Not permitted".into());
    chain.insert(
        "ErrorChain".into(),
        Value::Array(vec![Value::Dictionary(item)]),
    );
    let (_, next) = device.report(&mdm.server, "Error", Some(&a), chain).await;
    assert_eq!(uuid_and_type(&next.unwrap()).0, b);
    let history = mdm.history(&device.udid).await;
    assert_eq!(history[0]["status"], "error");
    assert_eq!(history[0]["error_chain"][0]["ErrorCode"], 12021);
    assert_eq!(history[1]["status"], "sent");
    mdm.server.stop().await;
}

#[tokio::test]
async fn duplicates_cancel_and_stray_results() {
    let mdm = Mdm::start().await;
    let device = mdm.enrolled_device().await;
    let lock = json!({"RequestType": "DeviceLock", "Message": "Call IT"});
    let first = mdm.enqueue_one(&device.udid, lock.clone()).await;
    let (status, again) = mdm.enqueue(&[&device.udid], lock.clone(), json!({})).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(again["commands"][0]["status"], "duplicate");
    assert_eq!(again["commands"][0]["command_uuid"], first.as_str());
    let (_, forced) = mdm
        .enqueue(&[&device.udid], lock, json!({"allow_duplicates": true}))
        .await;
    let second = forced["commands"][0]["command_uuid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(second, first);

    let cancel = |uuid: String| {
        let server = &mdm.server;
        let admin = mdm.admin.clone();
        async move {
            server
                .client
                .delete(server.url(&format!("/api/v1/commands/{uuid}")))
                .bearer_auth(admin)
                .send()
                .await
                .unwrap()
                .status()
        }
    };
    assert_eq!(cancel(first.clone()).await, StatusCode::OK);
    assert_eq!(cancel(first.clone()).await, StatusCode::NOT_FOUND);
    assert_eq!(
        cancel("no-such-command".into()).await,
        StatusCode::NOT_FOUND
    );

    // A result for an unknown command is harmless and the queue goes on.
    let (status, next) = device
        .report(
            &mdm.server,
            "Acknowledged",
            Some("0000-unknown"),
            Dictionary::new(),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(uuid_and_type(&next.unwrap()).0, second);
    let (_, next) = device
        .report(
            &mdm.server,
            "Acknowledged",
            Some(&second),
            Dictionary::new(),
        )
        .await;
    assert!(next.is_none());
    // Answering a finished command again changes nothing.
    let (status, _) = device
        .report(&mdm.server, "Error", Some(&second), Dictionary::new())
        .await;
    assert_eq!(status, StatusCode::OK);
    let history = mdm.history(&device.udid).await;
    let statuses: Vec<&str> = history
        .iter()
        .map(|c| c["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses, ["cancelled", "acknowledged"]);

    // Bad enqueues: unknown enrollment, unknown key, both forms at once.
    let (status, body) = mdm
        .enqueue(
            &["nobody"],
            json!({"RequestType": "ProfileList"}),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("nobody")
    );
    let (status, _) = mdm
        .enqueue(
            &[&device.udid],
            json!({"RequestType": "DeviceLock", "Bogus": 1}),
            json!({}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    let (status, _) = mdm
        .enqueue(
            &[&device.udid],
            json!({"RequestType": "ProfileList"}),
            json!({"command_plist": "<plist/>"}),
        )
        .await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(mdm.history(&device.udid).await.len(), 2);
    mdm.server.stop().await;
}

#[tokio::test]
async fn raw_plist_commands_reach_the_device_unchanged() {
    let mdm = Mdm::start().await;
    let device = mdm.enrolled_device().await;
    let raw = r#"<?xml version="1.0" encoding="UTF-8"?>
<plist version="1.0"><dict><key>RequestType</key><string>ScheduleOSUpdateScan</string>
<key>Force</key><true/></dict></plist>"#;
    let response = mdm
        .server
        .client
        .post(mdm.server.url("/api/v1/commands"))
        .bearer_auth(&mdm.admin)
        .json(&json!({"enrollment_ids": [device.udid], "command_plist": raw}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let command = device.idle(&mdm.server).await.unwrap();
    let body = command["Command"].as_dictionary().unwrap();
    assert_eq!(body["RequestType"], Value::from("ScheduleOSUpdateScan"));
    assert_eq!(body["Force"], Value::Boolean(true));
    mdm.server.stop().await;
}

#[tokio::test]
async fn identity_is_checked_on_every_request_and_bad_input_changes_nothing() {
    let mdm = Mdm::start().await;
    let alice = mdm.enrolled_device().await;
    let bob = mdm.enrolled_device().await;
    mdm.enqueue_one(&alice.udid, json!({"RequestType": "SecurityInfo"}))
        .await;
    let mut idle = Dictionary::new();
    idle.insert("UDID".into(), alice.udid.clone().into());
    idle.insert("Status".into(), "Idle".into());
    let idle = xml(idle);

    // No signature, a signature over another body, garbage in the header.
    let status = |r: reqwest::Response| r.status();
    assert_eq!(
        status(put_signed(&mdm.server, "/mdm/connect", idle.clone(), None).await),
        StatusCode::UNAUTHORIZED
    );
    let other = alice.sign(b"another body");
    assert_eq!(
        status(put_signed(&mdm.server, "/mdm/connect", idle.clone(), Some(&other)).await),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(put_signed(&mdm.server, "/mdm/connect", idle.clone(), Some("%%%")).await),
        StatusCode::BAD_REQUEST
    );
    assert_eq!(
        status(put_signed(&mdm.server, "/mdm/connect", idle.clone(), Some("AAAA")).await),
        StatusCode::BAD_REQUEST
    );
    // Bob's valid certificate speaking for Alice's device.
    let forged = bob.sign(&idle);
    assert_eq!(
        status(put_signed(&mdm.server, "/mdm/connect", idle.clone(), Some(&forged)).await),
        StatusCode::UNAUTHORIZED
    );
    // Alice's key with a self-signed certificate: not ours.
    let stranger =
        trustbroker::pki::scep::client::ClientIdentity::from_pkcs8(&alice.identity.pkcs8).unwrap();
    let signed = sign_with(&stranger, &idle);
    assert_eq!(
        status(put_signed(&mdm.server, "/mdm/connect", idle.clone(), Some(&signed)).await),
        StatusCode::UNAUTHORIZED
    );

    // Malformed bodies from the real device: truncated, nested too deep, unknown type.
    let truncated = idle[..idle.len() / 2].to_vec();
    assert_eq!(
        status(alice.put(&mdm.server, "/mdm/connect", truncated).await),
        StatusCode::BAD_REQUEST
    );
    let deep = format!(
        "<plist version=\"1.0\">{}{}</plist>",
        "<array>".repeat(5000),
        "</array>".repeat(5000)
    );
    assert_eq!(
        status(
            alice
                .put(&mdm.server, "/mdm/checkin", deep.into_bytes())
                .await
        ),
        StatusCode::BAD_REQUEST
    );
    let unknown = xml(alice.message("Bogus"));
    assert_eq!(
        status(alice.put(&mdm.server, "/mdm/checkin", unknown).await),
        StatusCode::BAD_REQUEST
    );
    let oversized = vec![b' '; 3 * 1024 * 1024];
    assert_eq!(
        status(alice.put(&mdm.server, "/mdm/connect", oversized).await),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // UserAuthenticate: Apple's "not supported" answer.
    let mut user_auth = alice.message("UserAuthenticate");
    user_auth.insert("UserID".into(), "501".into());
    user_auth.insert("DigestResponse".into(), "x".into());
    assert_eq!(
        status(alice.put(&mdm.server, "/mdm/checkin", xml(user_auth)).await),
        StatusCode::GONE
    );
    // None of that touched the queue.
    let history = mdm.history(&alice.udid).await;
    assert_eq!(history.len(), 1);
    assert_eq!(history[0]["status"], "queued");

    // A revoked certificate is refused; the device is told management is over.
    let serial = certificate_serial(&alice);
    let revoked = mdm
        .server
        .client
        .post(
            mdm.server
                .url(&format!("/api/v1/certificates/{serial}/revoke")),
        )
        .bearer_auth(&mdm.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    let (code, _) = alice
        .report(&mdm.server, "Idle", None, Dictionary::new())
        .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    assert_eq!(mdm.history(&alice.udid).await[0]["status"], "queued");
    mdm.server.stop().await;
}

/// The serial of the device's certificate as the API names it.
pub fn certificate_serial(device: &Device) -> String {
    use der::Decode;
    let cert = x509_cert::Certificate::from_der(&device.identity.certificate_der).unwrap();
    trustbroker::pki::ca::serial_hex(cert.tbs_certificate().serial_number().as_bytes())
}

#[tokio::test]
async fn one_certificate_cannot_enroll_two_devices() {
    let mdm = Mdm::start().await;
    let alice = mdm.enrolled_device().await;
    let mut clone = alice.message("Authenticate");
    clone.insert("UDID".into(), "SECOND-DEVICE-UDID".into());
    let response = alice.put(&mdm.server, "/mdm/checkin", xml(clone)).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // A message for a device that never authenticated.
    let mut token = alice.message("TokenUpdate");
    token.insert("UDID".into(), "NEVER-SEEN".into());
    token.insert("Token".into(), Value::Data(vec![1; 32]));
    token.insert("PushMagic".into(), "x".into());
    let response = alice.put(&mdm.server, "/mdm/checkin", xml(token)).await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    mdm.server.stop().await;
}

/// Many devices authenticating at once: each Authenticate reads then writes in one
/// transaction, which on SQLite must take the write lock up front or fail with
/// SQLITE_BUSY_SNAPSHOT (a 500) when another device commits first.
#[tokio::test]
async fn concurrent_enrollments_all_check_in() {
    for db in TestDb::all().await {
        let mdm = std::sync::Arc::new(Mdm::start_on(&db).await);
        let mut devices = Vec::new();
        for _ in 0..12 {
            let challenge = mdm.challenge().await;
            devices.push(Device::enroll(&mdm.server, &challenge).await);
        }
        let attempts: Vec<_> = devices
            .into_iter()
            .map(|device| {
                let mdm = mdm.clone();
                tokio::spawn(async move {
                    let auth = device.authenticate(&mdm.server).await.status();
                    let token = device.token_update(&mdm.server).await.status();
                    (auth, token)
                })
            })
            .collect();
        for attempt in attempts {
            let (auth, token) = attempt.await.unwrap();
            assert_eq!(
                (auth, token),
                (StatusCode::OK, StatusCode::OK),
                "{}",
                db.name()
            );
        }
        let listed = mdm
            .server
            .get_json("/api/v1/enrollments", Some(&mdm.admin))
            .await;
        assert_eq!(
            listed["enrollments"].as_array().map(Vec::len),
            Some(12),
            "{}",
            db.name()
        );
    }
}

#[tokio::test]
async fn bootstrap_tokens_are_escrowed_and_returned() {
    let mdm = Mdm::start().await;
    let device = mdm.enrolled_device().await;
    let mut set = device.message("SetBootstrapToken");
    set.insert(
        "BootstrapToken".into(),
        Value::Data(b"bootstrap-secret".to_vec()),
    );
    let response = device.put(&mdm.server, "/mdm/checkin", xml(set)).await;
    assert_eq!(response.status(), StatusCode::OK);
    let response = device
        .put(
            &mdm.server,
            "/mdm/checkin",
            xml(device.message("GetBootstrapToken")),
        )
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let body = response.bytes().await.unwrap();
    let value = Value::from_reader(std::io::Cursor::new(body.to_vec())).unwrap();
    assert_eq!(
        value.as_dictionary().unwrap()["BootstrapToken"],
        Value::Data(b"bootstrap-secret".to_vec())
    );
    let stored = mdm
        .server
        .store()
        .device(&device.udid)
        .await
        .unwrap()
        .unwrap();
    let sealed = stored.bootstrap_token.unwrap();
    assert!(!sealed.contains("bootstrap-secret"), "sealed at rest");
    // CheckOut ends the channel: the next connect is refused.
    let response = device
        .put(&mdm.server, "/mdm/checkin", xml(device.message("CheckOut")))
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let (code, _) = device
        .report(&mdm.server, "Idle", None, Dictionary::new())
        .await;
    assert_eq!(code, StatusCode::UNAUTHORIZED);
    mdm.server.stop().await;
}

/// The captured exchanges: every Mdm-Signature verifies against its body, every message parses.
#[test]
fn conformance_exchanges_verify_and_parse() {
    use trustbroker::apple::identity::verify_signature;
    use trustbroker::apple::messages::{CheckIn, Report};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/apple-mdm");
    let ca_pem = std::fs::read_to_string(dir.join("exchanges/device-ca.pem")).unwrap();
    for n in 0..7 {
        let meta: Json = serde_json::from_slice(
            &std::fs::read(dir.join(format!("exchanges/{n:03}_meta.json"))).unwrap(),
        )
        .unwrap();
        let body = std::fs::read(dir.join(format!("exchanges/{n:03}_req.plist"))).unwrap();
        let header = meta["headers"]["Mdm-Signature"].as_str().unwrap();
        let signer = verify_signature(header, &body).unwrap_or_else(|e| panic!("{n}: {e}"));
        // The signer chains to the capture's device CA.
        let tmp = tempfile::tempdir().unwrap();
        std::fs::write(tmp.path().join("ca.pem"), &ca_pem).unwrap();
        std::fs::write(
            tmp.path().join("leaf.pem"),
            trustbroker::pki::pem("CERTIFICATE", &signer.certificate_der),
        )
        .unwrap();
        let verified = std::process::Command::new("openssl")
            .current_dir(tmp.path())
            .args(["verify", "-CAfile", "ca.pem", "leaf.pem"])
            .output()
            .unwrap();
        assert!(verified.status.success(), "{n}: {verified:?}");
        // And a signature over any other body fails.
        assert!(verify_signature(header, b"<plist/>").is_err());
        let message = trustbroker::apple::plist::parse_value(&body).unwrap();
        if message.as_dictionary().unwrap().contains_key("MessageType") {
            CheckIn::from_plist(&body).unwrap();
        } else {
            Report::from_plist(&body).unwrap();
        }
        let response = std::fs::read(dir.join(format!("exchanges/{n:03}_resp.plist"))).unwrap();
        if !response.is_empty() {
            let command = trustbroker::apple::commands::from_plist(&response).unwrap();
            assert!(!command.request_type.is_empty());
        }
    }
}

#[test]
fn device_signatures_in_ber_verify() {
    use trustbroker::apple::identity::verify_signature;
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/apple-mdm/mdm-signature");
    let body = std::fs::read(dir.join("body2.plist")).unwrap();
    let header2 = std::fs::read_to_string(dir.join("header2.b64")).unwrap();
    let header1 = std::fs::read_to_string(dir.join("header1.b64")).unwrap();
    assert!(
        base64_der(&header2).starts_with(&[0x30, 0x80]),
        "the vector is BER"
    );
    verify_signature(header2.trim(), &body).unwrap();
    // header1 parses but is not a signature over this body.
    let err = verify_signature(header1.trim(), &body).unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");
}

fn base64_der(text: &str) -> Vec<u8> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .unwrap()
}

#[test]
fn nanomdm_messages_parse() {
    use trustbroker::apple::messages::{CheckIn, Report, ReportStatus};
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/apple-mdm/nanomdm-testdata");
    for (file, kind) in [
        ("Authenticate.1.plist", "Authenticate"),
        ("Authenticate.2.plist", "Authenticate"),
        ("TokenUpdate.1.plist", "TokenUpdate"),
        ("TokenUpdate.2.plist", "TokenUpdate"),
    ] {
        let body = std::fs::read(dir.join(file)).unwrap();
        let message = CheckIn::from_plist(&body).unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(message.message_type(), kind);
        assert!(message.channel().enrollment_id().is_some(), "{file}");
        if let CheckIn::TokenUpdate(update) = &message {
            assert!(!update.push_magic.is_empty());
            assert!(!update.token.is_empty());
        }
    }
    let body = std::fs::read(dir.join("DeviceInformation.1.plist")).unwrap();
    let report = Report::from_plist(&body).unwrap();
    assert_eq!(report.status, ReportStatus::Acknowledged);
    assert!(report.command_uuid.is_some());
    let value = trustbroker::apple::plist::parse_value(&body).unwrap();
    let json = trustbroker::apple::inventory::to_json(&value);
    assert_eq!(json["QueryResponses"]["HostName"], "fruit.example.com");
}

/// Nothing is read before the sender is known: a plist bomb signed by a stranger's
/// self-signed certificate is refused without being looked at, while the broker keeps
/// answering; from an enrolled device, the bounded reader refuses it just as fast.
#[tokio::test]
async fn plist_bombs_are_refused_before_or_while_reading_and_health_stays_fast() {
    use std::time::{Duration, Instant};
    use trustbroker::apple::plist::testing::reference_bomb;

    let mdm = Mdm::start().await;
    let alice = mdm.enrolled_device().await;
    // 14^8 ≈ 1.5 × 10⁹ elements once its shared references are expanded.
    let bomb = reference_bomb(8, 14);
    // A self-signed certificate (for Alice's own key: holding the key is not enough).
    let stranger =
        trustbroker::pki::scep::client::ClientIdentity::from_pkcs8(&alice.identity.pkcs8).unwrap();
    let signed_by_stranger = sign_with(&stranger, &bomb);

    let started = Instant::now();
    let mut attacks = tokio::task::JoinSet::new();
    for i in 0..16 {
        let client = mdm.server.client.clone();
        let path = if i % 2 == 0 {
            "/mdm/connect"
        } else {
            "/mdm/checkin"
        };
        let url = mdm.server.url(path);
        let (body, signature) = (bomb.clone(), signed_by_stranger.clone());
        attacks.spawn(async move {
            client
                .put(url)
                .timeout(Duration::from_secs(10))
                .header("Mdm-Signature", signature)
                .body(body)
                .send()
                .await
                .map(|r| r.status())
        });
    }
    // The broker answers while the attack runs.
    let health_started = Instant::now();
    let health = mdm
        .server
        .client
        .get(mdm.server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);
    assert!(health_started.elapsed() < Duration::from_secs(1));
    while let Some(outcome) = attacks.join_next().await {
        assert_eq!(outcome.unwrap().unwrap(), StatusCode::UNAUTHORIZED);
    }
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // The same bomb from an enrolled device: read within limits and refused.
    let started = Instant::now();
    let response = alice.put(&mdm.server, "/mdm/connect", bomb.clone()).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let text = response.text().await.unwrap();
    assert!(text.contains("too large"), "{text}");
    // A bound on a guard, not a benchmark: expanding the bomb would take minutes and gigabytes;
    // refusing it takes milliseconds, seconds on a debug build with every core busy.
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // Entity declarations: never sent by devices, refused.
    let entities = format!(
        "<?xml version=\"1.0\"?><!DOCTYPE plist [<!ENTITY u \"{}\">]>\
         <plist><dict><key>UDID</key><string>&u;</string>\
         <key>Status</key><string>Idle</string></dict></plist>",
        alice.udid
    );
    let response = alice
        .put(&mdm.server, "/mdm/connect", entities.into_bytes())
        .await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // A large honest answer (a Mac's application list) is read off the async workers and kept.
    let uuid = mdm
        .enqueue_one(
            &alice.udid,
            json!({"RequestType": "InstalledApplicationList"}),
        )
        .await;
    let offered = alice.idle(&mdm.server).await.unwrap();
    assert_eq!(uuid_and_type(&offered).0, uuid);
    let apps: Vec<Value> = (0..3000)
        .map(|i| {
            let mut app = Dictionary::new();
            app.insert("Identifier".into(), format!("com.example.app{i}").into());
            app.insert("Name".into(), format!("App {i}").into());
            app.insert("Version".into(), "1.0".into());
            Value::Dictionary(app)
        })
        .collect();
    let mut extra = Dictionary::new();
    extra.insert("InstalledApplicationList".into(), Value::Array(apps));
    let (status, _) = alice
        .report(&mdm.server, "Acknowledged", Some(&uuid), extra)
        .await;
    assert_eq!(status, StatusCode::OK);
    let history = mdm.history(&alice.udid).await;
    let answered = history.iter().find(|c| c["uuid"] == uuid.as_str()).unwrap();
    assert_eq!(answered["status"], "acknowledged");
}

/// Two nodes on one PostgreSQL database, each with its own MDM request caches: a command
/// queued through one reaches the device's next Idle on the other within a second, and a
/// retirement through one refuses the device on the other within a second — after the other
/// has cached the device's certificate and its empty queue.
#[tokio::test]
async fn caches_follow_changes_made_on_another_node_within_a_second() {
    use std::time::{Duration, Instant};
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
    let first = node().await;
    let admin = first.admin_key("mdm-admin", &["admin"]).await;
    let a = Mdm {
        server: first,
        admin,
    };
    let b = node().await;
    let device = a.enrolled_device().await;
    let other = a.enrolled_device().await;
    // Node B has read both certificates and found both queues empty; from here on it answers
    // their Idles from its caches.
    for _ in 0..3 {
        assert!(device.idle(&b).await.is_none());
        assert!(other.idle(&b).await.is_none());
    }

    // Queued through A: B's next Idle after its poll gets it (never later than a second).
    let queued_at = Instant::now();
    let uuid = a
        .enqueue_one(&device.udid, json!({"RequestType": "SecurityInfo"}))
        .await;
    let command = loop {
        if let Some(command) = device.idle(&b).await {
            break command;
        }
        assert!(
            queued_at.elapsed() < Duration::from_millis(1000),
            "node B did not offer the command queued through node A within a second"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        uuid_and_type(&command),
        (uuid.clone(), "SecurityInfo".into())
    );
    // Answered on B; the queue is empty again on both nodes.
    let (status, next) = device
        .report(&b, "Acknowledged", Some(&uuid), Dictionary::new())
        .await;
    assert_eq!(status, StatusCode::OK);
    assert!(next.is_none());
    assert!(device.idle(&b).await.is_none());
    assert!(device.idle(&a.server).await.is_none());
    assert_eq!(a.history(&device.udid).await[0]["status"], "acknowledged");

    // Retired through A: B refuses the device within a second; the other device still speaks.
    let response = a
        .server
        .client
        .post(
            a.server
                .url(&format!("/api/v1/enrollments/{}/retire", device.udid)),
        )
        .bearer_auth(&a.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let retired_at = Instant::now();
    loop {
        let (status, _) = device.report(&b, "Idle", None, Dictionary::new()).await;
        if status == StatusCode::UNAUTHORIZED {
            break;
        }
        assert_eq!(status, StatusCode::OK);
        assert!(
            retired_at.elapsed() < Duration::from_millis(1000),
            "node B still served a device retired through node A"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // On A, at once.
    let (status, _) = device
        .report(&a.server, "Idle", None, Dictionary::new())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(other.idle(&b).await.is_none());

    // A channel made on A (a TokenUpdate) is served on B at once: a cached standing that
    // would refuse is read again first.
    let third = Device::enroll(&a.server, &a.challenge().await).await;
    assert_eq!(third.authenticate(&a.server).await.status(), StatusCode::OK);
    // B caches the certificate before the channel exists (the connect is refused: no
    // TokenUpdate yet).
    let (status, _) = third.report(&b, "Idle", None, Dictionary::new()).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(third.token_update(&a.server).await.status(), StatusCode::OK);
    assert!(third.idle(&b).await.is_none());
    b.stop().await;
    a.server.stop().await;
}
