//! Enrollment profiles and the push certificate: what the profile holds (checked against
//! Apple's schema), its signature (checked by OpenSSL), and a device that enrolls from it.

use plist::Value;
use reqwest::StatusCode;
use serde_json::{Value as Json, json};

use crate::device::{self, Device, xml};
use crate::harness::TestServer;
use crate::schema;

/// A self-signed stand-in for Apple's MDM push certificate: RSA, topic in the subject UID.
pub fn push_certificate(topic: &str) -> (String, String) {
    let pkcs8 = trustbroker::pki::ca::generate_rsa_pkcs8(2048).unwrap();
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8.clone()),
        &rcgen::PKCS_RSA_SHA256,
    )
    .unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name.push(
        rcgen::DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 1]),
        rcgen::DnValue::Utf8String(topic.into()),
    );
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("APSP:{topic}"));
    let cert = params.self_signed(&key).unwrap();
    (cert.pem(), trustbroker::pki::pem("PRIVATE KEY", &pkcs8))
}

pub async fn import_push(
    server: &TestServer,
    admin: &str,
    cert: &str,
    key: &str,
) -> reqwest::Response {
    server
        .client
        .put(server.url("/api/v1/push-certificate"))
        .bearer_auth(admin)
        .json(&json!({"certificate_pem": cert, "key_pem": key}))
        .send()
        .await
        .unwrap()
}

async fn request_profile(server: &TestServer, admin: &str, query: &str) -> reqwest::Response {
    server
        .client
        .post(server.url(&format!("/api/v1/enrollment-profiles{query}")))
        .bearer_auth(admin)
        .json(&json!({"for_user": "alice@example.org"}))
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_profile_enrolls_a_device_end_to_end() {
    let server = TestServer::start().await;
    let admin = server.admin_key("profiles", &["admin"]).await;

    // No push certificate yet: the profile would name no topic.
    let response = request_profile(&server, &admin, "").await;
    assert_eq!(response.status(), StatusCode::CONFLICT);
    let body: Json = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "no_push_certificate");

    let (cert, key) = push_certificate(device::TOPIC);
    let (other_cert, _) = push_certificate("com.apple.mgmt.External.other");
    let mismatched = import_push(&server, &admin, &other_cert, &key).await;
    assert_eq!(mismatched.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let imported = import_push(&server, &admin, &cert, &key).await;
    assert_eq!(imported.status(), StatusCode::OK);
    let shown = server
        .get_json("/api/v1/push-certificate", Some(&admin))
        .await;
    assert_eq!(shown["topic"], device::TOPIC);

    let response = request_profile(&server, &admin, "?signed=false").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    assert_eq!(
        response.headers()["content-type"],
        "application/x-apple-aspen-config"
    );
    let enrollment_id = response.headers()["x-enrollment-id"]
        .to_str()
        .unwrap()
        .to_owned();
    let body = response.bytes().await.unwrap();
    let profile = Value::from_reader(std::io::Cursor::new(body.to_vec()))
        .unwrap()
        .into_dictionary()
        .unwrap();

    // Every key and type as Apple's schema has them.
    let common = schema::payload_keys(&schema::load("profiles/CommonPayloadKeys.yaml"));
    let top = schema::payload_keys(&schema::load("profiles/TopLevel.yaml"));
    let mut problems = schema::check(&profile, &top, &[], "profile");
    let payloads = profile["PayloadContent"].as_array().unwrap();
    let by_type = |t: &str| {
        payloads
            .iter()
            .map(|p| p.as_dictionary().unwrap())
            .find(|p| p["PayloadType"].as_string() == Some(t))
            .unwrap_or_else(|| panic!("no {t} payload"))
    };
    for kind in [
        "com.apple.security.root",
        "com.apple.security.scep",
        "com.apple.mdm",
    ] {
        let keys = schema::payload_keys(&schema::load(&format!("profiles/{kind}.yaml")));
        problems.extend(schema::check(by_type(kind), &keys, &common, kind));
    }
    assert!(problems.is_empty(), "{problems:#?}");

    // What the payloads say.
    let ca_der = server.ca_der().await;
    let root = by_type("com.apple.security.root");
    assert_eq!(root["PayloadContent"], Value::Data(ca_der.clone()));
    let scep = by_type("com.apple.security.scep");
    let scep_content = scep["PayloadContent"].as_dictionary().unwrap();
    assert_eq!(
        scep_content["URL"].as_string(),
        Some(server.url("/scep").as_str())
    );
    assert_eq!(scep_content["Keysize"], Value::Integer(2048.into()));
    assert_eq!(scep_content["Key Type"].as_string(), Some("RSA"));
    use sha1::Digest;
    assert_eq!(
        scep_content["CAFingerprint"],
        Value::Data(sha1::Sha1::digest(&ca_der).to_vec())
    );
    let subject = format!("{:?}", scep_content["Subject"]);
    assert!(subject.contains(&enrollment_id), "{subject}");
    let mdm = by_type("com.apple.mdm");
    assert_eq!(mdm["IdentityCertificateUUID"], scep["PayloadUUID"]);
    assert_eq!(mdm["Topic"].as_string(), Some(device::TOPIC));
    assert_eq!(
        mdm["ServerURL"].as_string(),
        Some(server.url("/mdm/connect").as_str())
    );
    assert_eq!(
        mdm["CheckInURL"].as_string(),
        Some(server.url("/mdm/checkin").as_str())
    );
    assert_eq!(mdm["SignMessage"], Value::Boolean(true));
    assert_eq!(mdm["CheckOutWhenRemoved"], Value::Boolean(true));

    // The device enrolls with the profile's one-time challenge, once.
    let challenge = scep_content["Challenge"].as_string().unwrap();
    let device = Device::enroll(&server, challenge).await;
    device.check_in(&server).await;
    let enrolled = server
        .get_json(
            &format!("/api/v1/enrollments/{}", device.udid),
            Some(&admin),
        )
        .await;
    assert_eq!(
        enrolled["device"]["enrollment_record_id"],
        enrollment_id.as_str()
    );
    // Checking in under another topic than the push certificate's is refused.
    let mut wrong = device.message("Authenticate");
    wrong.insert("Topic".into(), "com.apple.mgmt.External.other".into());
    let response = device.put(&server, "/mdm/checkin", xml(wrong)).await;
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    server.stop().await;
}

#[tokio::test]
async fn signed_profiles_verify_with_openssl_against_the_ca() {
    let server = TestServer::start().await;
    let admin = server.admin_key("profiles", &["admin"]).await;
    let (cert, key) = push_certificate(device::TOPIC);
    assert_eq!(
        import_push(&server, &admin, &cert, &key).await.status(),
        StatusCode::OK
    );
    let response = request_profile(&server, &admin, "").await;
    assert_eq!(response.status(), StatusCode::CREATED);
    let signed = response.bytes().await.unwrap();
    let ca_der = server.ca_der().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("profile.p7"), &signed).unwrap();
    std::fs::write(
        dir.path().join("ca.pem"),
        trustbroker::pki::pem("CERTIFICATE", &ca_der),
    )
    .unwrap();
    let out = std::process::Command::new("openssl")
        .current_dir(dir.path())
        .args([
            "cms",
            "-verify",
            "-inform",
            "DER",
            "-in",
            "profile.p7",
            "-CAfile",
            "ca.pem",
            "-purpose",
            "any",
            "-out",
            "profile.plist",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let content = std::fs::read(dir.path().join("profile.plist")).unwrap();
    let profile = Value::from_reader(std::io::Cursor::new(content)).unwrap();
    assert_eq!(
        profile.as_dictionary().unwrap()["PayloadType"].as_string(),
        Some("Configuration")
    );
    // Two profiles, two challenges: each is one-time.
    let again = request_profile(&server, &admin, "?signed=false").await;
    let again =
        Value::from_reader(std::io::Cursor::new(again.bytes().await.unwrap().to_vec())).unwrap();
    assert!(!format!("{again:?}").is_empty());
    server.stop().await;
}

/// Every typed command, built from JSON, against Apple's schema for it.
#[test]
fn typed_commands_match_apples_schema() {
    let cases = [
        (
            "profile.install",
            json!({"RequestType": "InstallProfile", "Payload": "PD94bWw+"}),
        ),
        (
            "profile.remove",
            json!({"RequestType": "RemoveProfile", "Identifier": "org.example.wifi"}),
        ),
        (
            "device.lock",
            json!({"RequestType": "DeviceLock", "Message": "Lost", "PhoneNumber": "+1 555 0100", "PIN": "123456"}),
        ),
        (
            "device.erase",
            json!({"RequestType": "EraseDevice", "PIN": "123456", "PreserveDataPlan": true}),
        ),
        (
            "application.install",
            json!({"RequestType": "InstallApplication", "iTunesStoreID": 361309726,
            "ManagementFlags": 1, "Configuration": {"token": "tb1.abc", "server": "https://example.org"}}),
        ),
        (
            "settings",
            json!({"RequestType": "Settings", "Settings": [{"Item": "ApplicationConfiguration",
            "Identifier": "com.example.app", "Configuration": {"token": "tb1.abc"}}]}),
        ),
        (
            "information.device",
            json!({"RequestType": "DeviceInformation", "Queries": ["OSVersion", "SerialNumber"]}),
        ),
        (
            "profile.list",
            json!({"RequestType": "ProfileList", "ManagedOnly": true}),
        ),
        (
            "application.installed.list",
            json!({"RequestType": "InstalledApplicationList", "ManagedAppsOnly": true, "Identifiers": ["com.example.app"]}),
        ),
        (
            "information.security",
            json!({"RequestType": "SecurityInfo"}),
        ),
        (
            "device.restart",
            json!({"RequestType": "RestartDevice", "NotifyUser": true}),
        ),
    ];
    let request_type = serde_norway::from_str::<serde_norway::Value>(
        "- key: RequestType\n  type: <string>\n  presence: required\n",
    )
    .unwrap();
    let request_type = request_type.as_sequence().unwrap().clone();
    for (file, command) in cases {
        let schema = schema::load(&format!("commands/{file}.yaml"));
        let built = trustbroker::apple::commands::from_json(&command)
            .unwrap_or_else(|e| panic!("{file}: {e}"));
        assert_eq!(
            schema["payload"]["requesttype"].as_str(),
            Some(built.request_type.as_str())
        );
        let problems = schema::check(
            &built.body,
            &schema::payload_keys(&schema),
            &request_type,
            file,
        );
        assert!(problems.is_empty(), "{problems:#?}");
    }
}

/// PKCS#12 as Keychain Access exports it (RC2/3DES, OpenSSL's `-legacy`) and as OpenSSL 3
/// writes it by default (AES-256, PBKDF2), over the API and the command line.
#[tokio::test]
async fn push_certificates_import_from_pkcs12() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = push_certificate(device::TOPIC);
    std::fs::write(dir.path().join("push.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("push.key"), &key).unwrap();
    let export = |name: &str, legacy: bool| {
        let mut args = vec![
            "pkcs12",
            "-export",
            "-in",
            "push.pem",
            "-inkey",
            "push.key",
            "-out",
            name,
            "-passout",
            "pass:s3cret",
        ];
        if legacy {
            args.push("-legacy");
        }
        let out = std::process::Command::new("openssl")
            .current_dir(dir.path())
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::fs::read(dir.path().join(name)).unwrap()
    };
    let modern = export("modern.p12", false);
    let legacy = export("legacy.p12", true);

    let server = TestServer::start().await;
    let admin = server.admin_key("push", &["admin"]).await;
    let put = |body: serde_json::Value| {
        server
            .client
            .put(server.url("/api/v1/push-certificate"))
            .bearer_auth(&admin)
            .json(&body)
            .send()
    };
    use base64::Engine;
    let b64 = |der: &[u8]| base64::engine::general_purpose::STANDARD.encode(der);
    for p12 in [&modern, &legacy] {
        let response = put(serde_json::json!({"pkcs12_base64": b64(p12), "password": "s3cret"}))
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let body: serde_json::Value = response.json().await.unwrap();
        assert_eq!(body["topic"], device::TOPIC);
    }
    let wrong = put(serde_json::json!({"pkcs12_base64": b64(&legacy), "password": "nope"}))
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: serde_json::Value = wrong.json().await.unwrap();
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("wrong password"),
        "{body}"
    );
    let both = put(serde_json::json!({"pkcs12_base64": b64(&legacy), "certificate_pem": cert}))
        .await
        .unwrap();
    assert_eq!(both.status(), StatusCode::UNPROCESSABLE_ENTITY);
    server.stop().await;

    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let p12 = dir.path().join("legacy.p12");
    let (ok, _, stderr) = crate::harness::run_cli(
        &[
            "push-cert",
            "import",
            "--p12",
            p12.to_str().unwrap(),
            "--data-dir",
            data,
        ],
        &[("TRUSTBROKER_P12_PASSWORD", "wrong")],
    );
    assert!(!ok && stderr.contains("wrong password"), "{stderr}");
    let (ok, stdout, stderr) = crate::harness::run_cli(
        &[
            "push-cert",
            "import",
            "--p12",
            p12.to_str().unwrap(),
            "--data-dir",
            data,
        ],
        &[("TRUSTBROKER_P12_PASSWORD", "s3cret")],
    );
    assert!(ok, "{stderr}");
    assert!(stdout.contains(device::TOPIC), "{stdout}");
}
