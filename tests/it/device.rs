//! A simulated Apple device: it generates its key, enrolls over SCEP with a one-time
//! challenge, signs every MDM request with its identity (`Mdm-Signature`, detached CMS), checks
//! in and answers commands, as a real device does after installing its enrollment profile.

use base64::Engine;
use plist::{Dictionary, Value};
use reqwest::StatusCode;
use trustbroker::pki::scep::client::{self, ClientIdentity, Request};
use trustbroker::pki::scep::{ContentCipher, DigestAlgorithm, MessageType, PkiStatus};

use crate::harness::TestServer;

pub const TOPIC: &str = "com.apple.mgmt.External.e3b8ceac-1f18-4c8e-8a1b-0c4c9ba5d8bd";

pub struct Device {
    pub udid: String,
    pub identity: ClientIdentity,
    pub push_token: Vec<u8>,
    pub push_magic: String,
}

impl Device {
    /// Enrolls over SCEP with `challenge`; panics unless a certificate is issued.
    pub async fn enroll(server: &TestServer, challenge: &str) -> Device {
        let key = tokio::task::spawn_blocking(|| ClientIdentity::generate(2048))
            .await
            .unwrap()
            .unwrap();
        let issued = scep_enroll(server, &key, challenge).await;
        let udid = uuid::Uuid::new_v4().to_string().to_uppercase();
        Device {
            push_token: trustbroker::random::bytes::<32>().to_vec(),
            push_magic: uuid::Uuid::new_v4().to_string().to_uppercase(),
            identity: key.with_certificate(issued),
            udid,
        }
    }

    pub fn sign(&self, body: &[u8]) -> String {
        sign_with(&self.identity, body)
    }

    /// PUTs `body`, signed by this device, to `path`.
    pub async fn put(&self, server: &TestServer, path: &str, body: Vec<u8>) -> reqwest::Response {
        let signature = self.sign(&body);
        put_signed(server, path, body, Some(&signature)).await
    }

    pub fn message(&self, message_type: &str) -> Dictionary {
        let mut d = Dictionary::new();
        d.insert("MessageType".into(), message_type.into());
        d.insert("UDID".into(), self.udid.clone().into());
        d.insert("Topic".into(), TOPIC.into());
        d
    }

    pub async fn authenticate(&self, server: &TestServer) -> reqwest::Response {
        let mut m = self.message("Authenticate");
        m.insert("SerialNumber".into(), "C02SIMULATED".into());
        m.insert("Model".into(), "MacBookPro18,3".into());
        m.insert("ModelName".into(), "MacBook Pro".into());
        m.insert("ProductName".into(), "MacBookPro18,3".into());
        m.insert("DeviceName".into(), "Simulated Mac".into());
        m.insert("OSVersion".into(), "14.6".into());
        m.insert("BuildVersion".into(), "23G80".into());
        self.put(server, "/mdm/checkin", xml(m)).await
    }

    pub async fn token_update(&self, server: &TestServer) -> reqwest::Response {
        let mut m = self.message("TokenUpdate");
        m.insert("Token".into(), Value::Data(self.push_token.clone()));
        m.insert("PushMagic".into(), self.push_magic.clone().into());
        m.insert("UnlockToken".into(), Value::Data(b"unlock-me".to_vec()));
        self.put(server, "/mdm/checkin", xml(m)).await
    }

    /// Authenticate then TokenUpdate, both accepted.
    pub async fn check_in(&self, server: &TestServer) {
        assert_eq!(self.authenticate(server).await.status(), StatusCode::OK);
        assert_eq!(self.token_update(server).await.status(), StatusCode::OK);
    }

    /// A command-channel report; returns the status and the command offered, if any.
    pub async fn report(
        &self,
        server: &TestServer,
        status: &str,
        command_uuid: Option<&str>,
        extra: Dictionary,
    ) -> (StatusCode, Option<Dictionary>) {
        let mut m = Dictionary::new();
        m.insert("UDID".into(), self.udid.clone().into());
        m.insert("Status".into(), status.into());
        if let Some(uuid) = command_uuid {
            m.insert("CommandUUID".into(), uuid.into());
        }
        for (k, v) in extra {
            m.insert(k, v);
        }
        let response = self.put(server, "/mdm/connect", xml(m)).await;
        let code = response.status();
        let body = response.bytes().await.unwrap();
        if body.is_empty() {
            return (code, None);
        }
        let value = Value::from_reader(std::io::Cursor::new(body.to_vec())).ok();
        (code, value.and_then(Value::into_dictionary))
    }

    pub async fn idle(&self, server: &TestServer) -> Option<Dictionary> {
        let (status, command) = self.report(server, "Idle", None, Dictionary::new()).await;
        assert_eq!(status, StatusCode::OK);
        command
    }

    /// Fetches the next queued command and acknowledges it; its UUID.
    pub async fn acknowledge_next(&self, server: &TestServer) -> String {
        let command = self.idle(server).await.expect("a queued command");
        let (uuid, _) = uuid_and_type(&command);
        let (status, _) = self
            .report(server, "Acknowledged", Some(&uuid), Dictionary::new())
            .await;
        assert_eq!(status, StatusCode::OK);
        uuid
    }
}

/// The UUID and RequestType of a command as the device received it.
pub fn uuid_and_type(command: &Dictionary) -> (String, String) {
    let uuid = command["CommandUUID"].as_string().unwrap().to_owned();
    let request_type = command["Command"].as_dictionary().unwrap()["RequestType"]
        .as_string()
        .unwrap()
        .to_owned();
    (uuid, request_type)
}

pub fn sign_with(identity: &ClientIdentity, body: &[u8]) -> String {
    let der =
        trustbroker::pki::scep::sign_detached(body, DigestAlgorithm::Sha256, identity).unwrap();
    base64::engine::general_purpose::STANDARD.encode(der)
}

pub async fn put_signed(
    server: &TestServer,
    path: &str,
    body: Vec<u8>,
    signature: Option<&str>,
) -> reqwest::Response {
    let mut request = server
        .client
        .put(server.url(path))
        .header("content-type", "application/x-apple-aspen-mdm-checkin")
        .body(body);
    if let Some(signature) = signature {
        request = request.header("Mdm-Signature", signature);
    }
    request.send().await.unwrap()
}

pub fn xml(dict: Dictionary) -> Vec<u8> {
    let mut out = Vec::new();
    Value::Dictionary(dict).to_writer_xml(&mut out).unwrap();
    out
}

/// SCEP PKCSReq with `challenge`; the issued certificate.
pub async fn scep_enroll(server: &TestServer, key: &ClientIdentity, challenge: &str) -> Vec<u8> {
    let outcome = scep_request(server, key, challenge).await;
    assert_eq!(outcome.status, PkiStatus::Success, "{outcome:?}");
    outcome.certificates[0].clone()
}

/// A SCEP PKCSReq message from `key` to the CA `ca` (DER) with `challenge`: a fresh
/// transaction each call, so resending the same bytes is a replay.
pub fn pkcs_req(key: &ClientIdentity, ca: &[u8], challenge: &str) -> Vec<u8> {
    let csr = key
        .csr("device", Some(challenge), DigestAlgorithm::Sha256)
        .unwrap();
    let txn = uuid::Uuid::new_v4().to_string();
    client::build_request(
        key,
        &Request {
            message_type: MessageType::PkcsReq,
            content: &csr,
            recipient_der: ca,
            cipher: ContentCipher::Aes256Cbc,
            digest: DigestAlgorithm::Sha256,
            transaction_id: &txn,
            sender_nonce: &uuid::Uuid::new_v4().into_bytes(),
        },
    )
    .unwrap()
}

/// SCEP PKCSReq with `challenge`; the server's CertRep, opened, whatever it says.
pub async fn scep_request(
    server: &TestServer,
    key: &ClientIdentity,
    challenge: &str,
) -> client::CertRepOutcome {
    let ca = server.ca_der().await;
    scep_request_to(server, key, &ca, challenge).await
}

/// [`scep_request`] encrypted to `recipient` (the CA, or the RA of a CA that has one).
pub async fn scep_request_to(
    server: &TestServer,
    key: &ClientIdentity,
    recipient: &[u8],
    challenge: &str,
) -> client::CertRepOutcome {
    let body = pkcs_req(key, recipient, challenge);
    let reply = server
        .client
        .post(server.url("/scep?operation=PKIOperation"))
        .body(body)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    client::open_cert_rep(&reply, key, recipient).unwrap()
}
