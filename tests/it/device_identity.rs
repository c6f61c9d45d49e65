//! Device identity without `Mdm-Signature`: the TLS client certificate on our own listener, a
//! trusted proxy's certificate header, and certificates of a migrated MDM's CA.

use plist::Dictionary;
use reqwest::StatusCode;
use trustbroker::pki::scep::client::ClientIdentity;

use crate::device::{Device, TOPIC, sign_with, xml};
use crate::harness::TestServer;
use crate::profiles::{import_push, push_certificate};

const CHECKIN: &str = "application/x-apple-aspen-mdm-checkin";

fn authenticate_message(udid: &str) -> Vec<u8> {
    let mut m = Dictionary::new();
    m.insert("MessageType".into(), "Authenticate".into());
    m.insert("UDID".into(), udid.into());
    m.insert("Topic".into(), TOPIC.into());
    xml(m)
}

/// A server with a push certificate (check-ins name its topic) and an admin key.
async fn server_with(file_toml: &str) -> (TestServer, String) {
    let server = TestServer::start_configured(|_| {}, file_toml).await;
    let admin = server.admin_key("identity-admin", &["admin"]).await;
    let (cert, key) = push_certificate(TOPIC);
    assert_eq!(
        import_push(&server, &admin, &cert, &key).await.status(),
        StatusCode::OK
    );
    (server, admin)
}

async fn enrolled(server: &TestServer, admin: &str) -> Device {
    Device::enroll(server, &server.challenge(admin).await).await
}

fn key_pem(identity: &ClientIdentity) -> String {
    use rsa::pkcs8::EncodePrivateKey;
    identity
        .key
        .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
        .unwrap()
        .to_string()
}

/// An HTTPS client presenting `identity` as its TLS client certificate.
fn client_with_certificate(server: &TestServer, identity: &ClientIdentity) -> reqwest::Client {
    let tls_cert = std::fs::read(&server.server.as_ref().unwrap().tls_cert_path).unwrap();
    let pem = trustbroker::pki::pem("CERTIFICATE", &identity.certificate_der) + &key_pem(identity);
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&tls_cert).unwrap())
        .identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap())
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_tls_client_certificate_identifies_a_device_that_does_not_sign() {
    let (server, admin) = server_with("").await;
    let device = enrolled(&server, &admin).await;
    let client = client_with_certificate(&server, &device.identity);
    let checkin = |client: &reqwest::Client| {
        client
            .put(server.url("/mdm/checkin"))
            .header("content-type", CHECKIN)
            .body(authenticate_message(&device.udid))
            .send()
    };
    assert_eq!(checkin(&client).await.unwrap().status(), StatusCode::OK);
    // The same request without the certificate (and unsigned): not authenticated.
    assert_eq!(
        checkin(&server.client).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    // Browsers and admin clients present none and are unaffected.
    assert_eq!(
        server
            .client
            .get(server.url("/enroll"))
            .send()
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    // A revoked certificate still completes TLS (it chains to our CA) but identifies no one.
    let serial = crate::mdm::certificate_serial(&device);
    let revoked = server
        .client
        .post(server.url(&format!("/api/v1/certificates/{serial}/revoke")))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"reason": "key-compromise"}))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    assert_eq!(
        checkin(&client).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    server.stop().await;
}

#[tokio::test]
async fn a_certificate_from_another_ca_fails_the_tls_handshake() {
    let (server, _) = server_with("").await;
    let stranger = ClientIdentity::generate(2048).unwrap();
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &rustls::pki_types::PrivatePkcs8KeyDer::from(
            rsa::pkcs8::EncodePrivateKey::to_pkcs8_der(&stranger.key)
                .unwrap()
                .as_bytes()
                .to_vec(),
        ),
        &rcgen::PKCS_RSA_SHA256,
    )
    .unwrap();
    let self_signed = rcgen::CertificateParams::new(vec!["device".into()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let stranger = stranger.with_certificate(self_signed.der().to_vec());
    let client = client_with_certificate(&server, &stranger);
    let result = client
        .put(server.url("/mdm/checkin"))
        .header("content-type", CHECKIN)
        .body(authenticate_message("STRANGER"))
        .send()
        .await;
    // Refused by the TLS layer (the server's alert), not by anything above it.
    let error = result.expect_err("the handshake must fail");
    let alert = tls_alert(&error);
    assert!(
        matches!(alert.as_deref(), Some("UnknownCA" | "BadCertificate")),
        "expected the server's certificate alert, got {alert:?} from {error:?}"
    );
    server.stop().await;
}

/// The TLS alert a request failed with, found in its chain of causes (the TLS stack reports
/// it as an I/O error "received fatal alert: <name>").
fn tls_alert(error: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cause = Some(error);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(alert) = io.to_string().strip_prefix("received fatal alert: ")
        {
            return Some(alert.to_owned());
        }
        cause = e.source();
    }
    None
}

#[tokio::test]
async fn a_trusted_proxy_header_identifies_a_device_and_others_are_ignored() {
    let toml =
        "[mdm]\ntrusted_proxies = [\"127.0.0.1\"]\nclient_cert_header = \"X-SSL-Client-Cert\"\n";
    let (server, admin) = server_with(toml).await;
    let device = enrolled(&server, &admin).await;
    let pem = trustbroker::pki::pem("CERTIFICATE", &device.identity.certificate_der);
    // nginx: $ssl_client_escaped_cert is URL-encoded PEM.
    let escaped: String =
        percent_encoding::utf8_percent_encode(&pem, percent_encoding::NON_ALPHANUMERIC).to_string();
    let plain = reqwest::Client::new();
    let put = |header: Option<&str>| {
        let mut request = plain
            .put(format!("{}/mdm/checkin", server.http_base))
            .header("content-type", CHECKIN)
            .body(authenticate_message(&device.udid));
        if let Some(value) = header {
            request = request.header("X-SSL-Client-Cert", value.to_owned());
        }
        request.send()
    };
    assert_eq!(put(Some(&escaped)).await.unwrap().status(), StatusCode::OK);
    assert_eq!(put(None).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        put(Some("not a certificate")).await.unwrap().status(),
        StatusCode::BAD_REQUEST
    );
    server.stop().await;

    // The same header from an address that is not a trusted proxy is ignored.
    let toml =
        "[mdm]\ntrusted_proxies = [\"10.0.0.0/8\"]\nclient_cert_header = \"X-SSL-Client-Cert\"\n";
    let (server, admin) = server_with(toml).await;
    let device = enrolled(&server, &admin).await;
    let pem = trustbroker::pki::pem("CERTIFICATE", &device.identity.certificate_der);
    let escaped =
        percent_encoding::utf8_percent_encode(&pem, percent_encoding::NON_ALPHANUMERIC).to_string();
    let response = reqwest::Client::new()
        .put(format!("{}/mdm/checkin", server.http_base))
        .header("content-type", CHECKIN)
        .header("X-SSL-Client-Cert", escaped)
        .body(authenticate_message(&device.udid))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    server.stop().await;
}

/// Another MDM's CA and a device certificate it issued (RSA, as SCEP gives devices).
fn migrated_device(ca: &rcgen::Issuer<'_, rcgen::KeyPair>) -> ClientIdentity {
    let identity = ClientIdentity::generate(2048).unwrap();
    let pkcs8 = rsa::pkcs8::EncodePrivateKey::to_pkcs8_der(&identity.key).unwrap();
    let key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
        &rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8.as_bytes().to_vec()),
        &rcgen::PKCS_RSA_SHA256,
    )
    .unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "old-mdm-device");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let cert = params.signed_by(&key, ca).unwrap();
    identity.with_certificate(cert.der().to_vec())
}

fn old_ca() -> (rcgen::Issuer<'static, rcgen::KeyPair>, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "Old MDM device CA");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let cert = params.self_signed(&key).unwrap();
    let pem = cert.pem();
    (rcgen::Issuer::new(params, key), pem)
}

#[tokio::test]
async fn devices_of_a_migrated_mdm_are_accepted_and_recorded() {
    let (ca, ca_pem) = old_ca();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("old-ca.pem");
    std::fs::write(&ca_file, ca_pem).unwrap();
    let toml = format!("[mdm]\nmigrated_ca_files = [\"{}\"]\n", ca_file.display());
    let (server, admin) = server_with(&toml).await;
    let identity = migrated_device(&ca);
    let udid = "MIGRATED-DEVICE-0001";
    let put = async |identity: &ClientIdentity, udid: &str| {
        let body = authenticate_message(udid);
        let signature = sign_with(identity, &body);
        crate::device::put_signed(&server, "/mdm/checkin", body, Some(&signature)).await
    };
    assert_eq!(put(&identity, udid).await.status(), StatusCode::OK);
    // And again: the recorded certificate is found directly now.
    assert_eq!(put(&identity, udid).await.status(), StatusCode::OK);
    let device = server
        .get_json("/api/v1/enrollments?limit=10", Some(&admin))
        .await;
    assert!(
        device["enrollments"].as_array().unwrap().is_empty(),
        "no TokenUpdate yet"
    );
    let record = server
        .store()
        .device(udid)
        .await
        .unwrap()
        .expect("device recorded");
    assert!(
        record.enrollment_id.starts_with("migrated-"),
        "{}",
        record.enrollment_id
    );
    // It is in the certificate inventory, and revoking it there ends its management.
    let listed = server
        .get_json(
            &format!(
                "/api/v1/certificates?enrollment_id={}",
                record.enrollment_id
            ),
            Some(&admin),
        )
        .await;
    let serial = listed["certificates"][0]["serial"]
        .as_str()
        .unwrap()
        .to_owned();
    let revoked = server
        .client
        .post(server.url(&format!("/api/v1/certificates/{serial}/revoke")))
        .bearer_auth(&admin)
        .json(&serde_json::json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    assert_eq!(
        put(&identity, udid).await.status(),
        StatusCode::UNAUTHORIZED
    );

    // A certificate from a CA that is not configured is refused and not recorded.
    let (other_ca, _) = old_ca();
    let stranger = migrated_device(&other_ca);
    assert_eq!(
        put(&stranger, "STRANGER").await.status(),
        StatusCode::UNAUTHORIZED
    );
    assert!(server.store().device("STRANGER").await.unwrap().is_none());
    server.stop().await;
}
