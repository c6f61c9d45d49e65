//! The SCEP endpoint end to end: micromdm's scepclient against the running broker, the
//! project's own client over every cipher, one-time challenges under concurrency, replays,
//! renewal and revocation, and hostile input.

use std::process::Command;
use std::sync::Arc;

use reqwest::StatusCode;
use serde_json::Value;
use trustbroker::pki::scep::client::{self, ClientIdentity, Request};
use trustbroker::pki::scep::{ContentCipher, DigestAlgorithm, FailInfo, MessageType, PkiStatus};

use crate::harness::{TestDb, TestServer, openssl_in, peer_env};

/// A server, an admin key for challenges and certificates, and the CA certificate.
struct Scep {
    server: TestServer,
    admin: String,
    ca: Vec<u8>,
}

impl Scep {
    async fn start_on(db: &TestDb) -> Scep {
        Self::with(TestServer::start_on(db).await).await
    }

    async fn with(server: TestServer) -> Scep {
        let admin = server
            .admin_key(
                "scep-admin",
                &["scep:challenge", "certificates:read", "certificates:write"],
            )
            .await;
        let ca = server
            .client
            .get(server.url("/scep?operation=GetCACert"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            ca.headers()["content-type"],
            "application/x-x509-ca-cert",
            "a CA without RA answers with one DER certificate"
        );
        let ca = ca.bytes().await.unwrap().to_vec();
        Scep { server, admin, ca }
    }

    async fn challenge(&self) -> Value {
        self.server
            .client
            .post(self.server.url("/api/v1/scep/challenges"))
            .bearer_auth(&self.admin)
            .json(&serde_json::json!({"for_user": "bob@example.org"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn post(&self, body: Vec<u8>) -> reqwest::Response {
        self.server
            .client
            .post(self.server.url("/scep?operation=PKIOperation"))
            .header("content-type", "application/x-pki-message")
            .body(body)
            .send()
            .await
            .unwrap()
    }

    async fn certificates(&self) -> Vec<Value> {
        let listed = self
            .server
            .get_json("/api/v1/certificates", Some(&self.admin))
            .await;
        listed["certificates"].as_array().unwrap().clone()
    }
}

/// Client keys are slow to make; the suite shares a few.
fn identity(n: usize) -> &'static ClientIdentity {
    static IDS: std::sync::OnceLock<Vec<ClientIdentity>> = std::sync::OnceLock::new();
    &IDS.get_or_init(|| {
        (0..3)
            .map(|_| ClientIdentity::generate(2048).unwrap())
            .collect()
    })[n]
}

fn pkcs_req(
    id: &ClientIdentity,
    ca: &[u8],
    challenge: Option<&str>,
    cipher: ContentCipher,
    digest: DigestAlgorithm,
) -> Vec<u8> {
    let csr = id
        .csr("whatever-the-device-asks", challenge, digest)
        .unwrap();
    let txn = uuid::Uuid::new_v4().to_string();
    client::build_request(
        id,
        &Request {
            message_type: MessageType::PkcsReq,
            content: &csr,
            recipient_der: ca,
            cipher,
            digest,
            transaction_id: &txn,
            sender_nonce: &uuid::Uuid::new_v4().into_bytes(),
        },
    )
    .unwrap()
}

async fn outcome(scep: &Scep, id: &ClientIdentity, body: Vec<u8>) -> client::CertRepOutcome {
    let response = scep.post(body).await;
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.headers()["content-type"],
        "application/x-pki-message"
    );
    let bytes = response.bytes().await.unwrap();
    client::open_cert_rep(&bytes, id, &scep.ca).unwrap()
}

#[tokio::test]
async fn capabilities_and_ca_certificate() {
    let server = TestServer::start().await;
    let caps = server.get_text("/scep?operation=GetCACaps").await;
    for cap in [
        "POSTPKIOperation",
        "SHA-256",
        "SHA-512",
        "AES",
        "SCEPStandard",
        "Renewal",
    ] {
        assert!(caps.lines().any(|l| l == cap), "{cap} missing from {caps}");
    }
    let unknown = server
        .client
        .get(server.url("/scep?operation=Nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::BAD_REQUEST);
    server.stop().await;

    // With an RA, GetCACert is a degenerate PKCS#7 holding the CA and the RA.
    let server = TestServer::start_with(|args| args.scep_ra = Some(true)).await;
    ca_and_ra(&server).await;
    server.stop().await;
}

#[tokio::test]
async fn every_cipher_and_digest_enrolls_once_per_challenge() {
    let scep = Scep::with(TestServer::start().await).await;
    let id = identity(0);
    let mut serials = Vec::new();
    // Single DES only with scep_allow_single_des: see single_des_only_when_allowed.
    for cipher in [
        ContentCipher::DesEde3Cbc,
        ContentCipher::Aes128Cbc,
        ContentCipher::Aes256Cbc,
    ] {
        for digest in [
            DigestAlgorithm::Sha1,
            DigestAlgorithm::Sha256,
            DigestAlgorithm::Sha512,
        ] {
            let challenge = scep.challenge().await;
            let body = pkcs_req(
                id,
                &scep.ca,
                challenge["challenge"].as_str(),
                cipher,
                digest,
            );
            let got = outcome(&scep, id, body).await;
            assert_eq!(got.status, PkiStatus::Success, "{cipher:?} {digest:?}");
            // Never weaker than the request: SHA-1 requests get SHA-256 replies.
            assert!(got.digest >= digest.max(DigestAlgorithm::Sha256));
            let leaf = x509(&got.certificates[0]);
            assert!(
                leaf.contains(&format!(
                    "CN = {}",
                    challenge["enrollment_id"].as_str().unwrap()
                )),
                "{leaf}"
            );
            assert!(
                !leaf.contains("whatever-the-device-asks"),
                "subject comes from the enrollment"
            );
            assert!(leaf.contains("TLS Web Client Authentication"), "{leaf}");
            assert!(
                leaf.contains("Digital Signature, Key Encipherment"),
                "{leaf}"
            );
            assert!(leaf.contains("OU = bob@example.org"), "{leaf}");
            serials.push(serial_of(&leaf));
        }
    }
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), 9);
    assert!(
        serials.iter().all(|s| s.len() >= 30),
        "128-bit serials: {serials:?}"
    );
    assert_eq!(scep.certificates().await.len(), 9);
    scep.server.stop().await;
}

#[tokio::test]
async fn one_challenge_issues_exactly_one_certificate_under_concurrency() {
    for db in TestDb::all().await {
        let scep = Arc::new(Scep::start_on(&db).await);
        let challenge = scep.challenge().await;
        let challenge = challenge["challenge"].as_str().unwrap().to_string();
        let attempts: Vec<_> = (0..8)
            .map(|i| {
                let scep = scep.clone();
                let challenge = challenge.clone();
                tokio::spawn(async move {
                    let id = identity(i % 3);
                    let body = pkcs_req(
                        id,
                        &scep.ca,
                        Some(&challenge),
                        ContentCipher::Aes128Cbc,
                        DigestAlgorithm::Sha256,
                    );
                    outcome(&scep, id, body).await
                })
            })
            .collect();
        let mut successes = 0;
        for attempt in attempts {
            let got = attempt.await.unwrap();
            match got.status {
                PkiStatus::Success => successes += 1,
                _ => assert_eq!(got.fail_info, Some(FailInfo::BadRequest)),
            }
        }
        assert_eq!(successes, 1, "{}", db.name());
        assert_eq!(scep.certificates().await.len(), 1, "{}", db.name());
    }
}

#[tokio::test]
async fn wrong_reused_expired_and_missing_challenges_issue_nothing() {
    // Stored times are whole seconds, so a challenge lives between TTL - 1 and TTL seconds:
    // 3 leaves a loaded machine at least 2 s to redeem the first one.
    let server = TestServer::start_with(|args| args.scep_challenge_ttl_secs = Some(3)).await;
    let scep = Scep::with(server).await;
    let id = identity(1);
    let req = |challenge: Option<&str>| {
        pkcs_req(
            id,
            &scep.ca,
            challenge,
            ContentCipher::Aes256Cbc,
            DigestAlgorithm::Sha256,
        )
    };
    for challenge in [Some("not-a-challenge"), None] {
        let got = outcome(&scep, id, req(challenge)).await;
        assert_eq!(got.status, PkiStatus::Failure);
        assert_eq!(got.fail_info, Some(FailInfo::BadRequest));
    }
    let issued = scep.challenge().await;
    let challenge = issued["challenge"].as_str().unwrap();
    assert_eq!(
        outcome(&scep, id, req(Some(challenge))).await.status,
        PkiStatus::Success
    );
    let reused = outcome(&scep, id, req(Some(challenge))).await;
    assert_eq!(reused.status, PkiStatus::Failure);
    let expiring = scep.challenge().await;
    tokio::time::sleep(std::time::Duration::from_millis(3100)).await;
    let expired = outcome(&scep, id, req(expiring["challenge"].as_str())).await;
    assert_eq!(expired.status, PkiStatus::Failure);
    assert_eq!(scep.certificates().await.len(), 1);
    scep.server.stop().await;
}

#[tokio::test]
async fn a_replayed_request_never_issues_twice() {
    for db in TestDb::all().await {
        let scep = Scep::start_on(&db).await;
        let id = identity(2);
        let challenge = scep.challenge().await;
        let body = pkcs_req(
            id,
            &scep.ca,
            challenge["challenge"].as_str(),
            ContentCipher::DesEde3Cbc,
            DigestAlgorithm::Sha1,
        );
        let first = outcome(&scep, id, body.clone()).await;
        let again = outcome(&scep, id, body.clone()).await;
        assert_eq!(first.status, PkiStatus::Success, "{}", db.name());
        // The retry gets the certificate it already has, not a second one.
        assert_eq!(again.status, PkiStatus::Success, "{}", db.name());
        assert_eq!(
            again.certificates[0],
            first.certificates[0],
            "{}",
            db.name()
        );
        // Concurrent retries too: one certificate in all.
        let scep = Arc::new(scep);
        let retries: Vec<_> = (0..4)
            .map(|_| {
                let (scep, body) = (scep.clone(), body.clone());
                tokio::spawn(async move { outcome(&scep, id, body).await })
            })
            .collect();
        for retry in retries {
            let reply = retry.await.unwrap();
            assert_eq!(reply.status, PkiStatus::Success, "{}", db.name());
            assert_eq!(
                reply.certificates[0],
                first.certificates[0],
                "{}",
                db.name()
            );
        }
        assert_eq!(scep.certificates().await.len(), 1, "{}", db.name());
    }
}

#[tokio::test]
async fn renewal_needs_a_valid_certificate_of_ours_and_revocation_ends_it() {
    let scep = Scep::with(TestServer::start().await).await;
    let id = identity(0);
    let challenge = scep.challenge().await;
    let first = outcome(
        &scep,
        id,
        pkcs_req(
            id,
            &scep.ca,
            challenge["challenge"].as_str(),
            ContentCipher::Aes128Cbc,
            DigestAlgorithm::Sha256,
        ),
    )
    .await;
    let issued = first.certificates[0].clone();
    let renewal = |signer: &ClientIdentity| {
        let csr = signer.csr("renew", None, DigestAlgorithm::Sha256).unwrap();
        client::build_request(
            signer,
            &Request {
                message_type: MessageType::RenewalReq,
                content: &csr,
                recipient_der: &scep.ca,
                cipher: ContentCipher::Aes128Cbc,
                digest: DigestAlgorithm::Sha256,
                transaction_id: &uuid::Uuid::new_v4().to_string(),
                sender_nonce: &[9; 16],
            },
        )
        .unwrap()
    };
    let holder = id.with_certificate(issued.clone());
    let renewed = outcome(&scep, &holder, renewal(&holder)).await;
    assert_eq!(renewed.status, PkiStatus::Success);
    assert_ne!(renewed.certificates[0], issued);
    let certs = scep.certificates().await;
    assert_eq!(certs.len(), 2);
    assert!(
        certs
            .iter()
            .any(|c| c["renewed_from"].as_str() == Some(&serial_of(&x509(&issued))))
    );
    // Same enrollment, so the same subject.
    assert_eq!(
        subject_of(&x509(&renewed.certificates[0])),
        subject_of(&x509(&issued))
    );

    // A self-signed certificate is not ours: no renewal without a challenge.
    let stranger = outcome(&scep, id, renewal(id)).await;
    assert_eq!(stranger.status, PkiStatus::Failure);
    assert_eq!(stranger.fail_info, Some(FailInfo::BadCertId));

    let serial = serial_of(&x509(&issued));
    let revoked = scep
        .server
        .client
        .post(
            scep.server
                .url(&format!("/api/v1/certificates/{serial}/revoke")),
        )
        .bearer_auth(&scep.admin)
        .json(&serde_json::json!({"reason": "device lost"}))
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    let refused = outcome(&scep, &holder, renewal(&holder)).await;
    assert_eq!(refused.status, PkiStatus::Failure);
    assert_eq!(refused.fail_info, Some(FailInfo::BadCertId));
    assert_eq!(
        scep.certificates().await.len(),
        2,
        "nothing issued after revocation"
    );
    let again = scep
        .server
        .client
        .post(
            scep.server
                .url(&format!("/api/v1/certificates/{serial}/revoke")),
        )
        .bearer_auth(&scep.admin)
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::NOT_FOUND);
    scep.server.stop().await;
}

#[tokio::test]
async fn hostile_input_gets_failures_or_4xx_and_issues_nothing() {
    let scep =
        Scep::with(TestServer::start_with(|a| a.max_body_bytes = Some(16 * 1024)).await).await;
    let id = identity(1);
    let challenge = scep.challenge().await;
    let good = pkcs_req(
        id,
        &scep.ca,
        challenge["challenge"].as_str(),
        ContentCipher::Aes128Cbc,
        DigestAlgorithm::Sha256,
    );

    // Garbage and truncation: not addressable, so a 400.
    for body in [b"garbage".to_vec(), good[..200].to_vec(), Vec::new()] {
        assert_eq!(scep.post(body).await.status(), StatusCode::BAD_REQUEST);
    }
    // Oversized: 413 before anything is parsed.
    assert_eq!(
        scep.post(vec![0x30; 64 * 1024]).await.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    // A tampered signature: a signed FAILURE with badMessageCheck.
    let mut tampered = good.clone();
    let last = tampered.len() - 1;
    tampered[last] ^= 0x55;
    let got = outcome(&scep, id, tampered).await;
    assert_eq!(got.fail_info, Some(FailInfo::BadMessageCheck));
    // Encrypted to someone else: badMessageCheck as well.
    let other = identity(2);
    let foreign = pkcs_req(
        id,
        &other.certificate_der,
        challenge["challenge"].as_str(),
        ContentCipher::Aes128Cbc,
        DigestAlgorithm::Sha256,
    );
    let got = outcome(&scep, id, foreign).await;
    assert_eq!(got.fail_info, Some(FailInfo::BadMessageCheck));
    // GET with base64 works the same way as POST, and bad base64 is a 400.
    let bad_b64 = scep
        .server
        .client
        .get(scep.server.url("/scep?operation=PKIOperation&message=%%%"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_b64.status(), StatusCode::BAD_REQUEST);

    assert!(scep.certificates().await.is_empty(), "nothing was issued");
    // The challenge survived all of that and still works, over GET.
    use base64::Engine;
    let encoded = base64::engine::general_purpose::STANDARD.encode(&good);
    let response = scep
        .server
        .client
        .get(scep.server.url("/scep"))
        .query(&[("operation", "PKIOperation"), ("message", encoded.as_str())])
        .send()
        .await
        .unwrap();
    let bytes = response.bytes().await.unwrap();
    let got = client::open_cert_rep(&bytes, id, &scep.ca).unwrap();
    assert_eq!(got.status, PkiStatus::Success);
    scep.server.stop().await;
}

#[tokio::test]
async fn micromdm_scepclient_enrolls_with_a_one_time_challenge() {
    if peer_env("TRUSTBROKER_TEST_PEERS").is_none() {
        return;
    }
    // scepclient 2.1.0 encrypts with single DES whatever GetCACaps offers.
    let scep =
        Scep::with(TestServer::start_with(|a| a.scep_allow_single_des = Some(true)).await).await;
    let challenge = scep.challenge().await;
    let dir = tempfile::tempdir().unwrap();
    // tokio's Command: a blocking wait would starve the server on this runtime.
    let run = |challenge: &str| {
        tokio::process::Command::new("scepclient")
            .current_dir(dir.path())
            .args([
                "-private-key",
                "device.key",
                "-server-url",
                &format!("{}/scep", scep.server.http_base),
                "-challenge",
                challenge,
                "-cn",
                "ignored-by-policy",
            ])
            .kill_on_drop(true)
            .output()
    };
    let out = run(challenge["challenge"].as_str().unwrap())
        .await
        .expect("scepclient runs");
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    std::fs::write(
        dir.path().join("ca.pem"),
        trustbroker::pki::pem("CERTIFICATE", &scep.ca),
    )
    .unwrap();
    chains_to_the_ca(dir.path());
    let text = openssl_in(
        dir.path(),
        &["x509", "-in", "client.pem", "-noout", "-text"],
    );
    assert!(
        text.contains(challenge["enrollment_id"].as_str().unwrap()),
        "{text}"
    );
    assert_eq!(scep.certificates().await.len(), 1);

    // Run again with client.pem present, scepclient renews: a RenewalReq signed by it.
    let first = std::fs::read(dir.path().join("client.pem")).unwrap();
    std::fs::write(dir.path().join("old.pem"), &first).unwrap();
    let renew = |certificate: &str| {
        tokio::process::Command::new("scepclient")
            .current_dir(dir.path())
            .args([
                "-private-key",
                "device.key",
                "-certificate",
                certificate,
                "-server-url",
                &format!("{}/scep", scep.server.http_base),
            ])
            .kill_on_drop(true)
            .output()
    };
    let out = renew("client.pem").await.expect("scepclient runs");
    assert!(out.status.success(), "{out:?}");
    let second = std::fs::read(dir.path().join("client.pem")).unwrap();
    assert_ne!(first, second, "a new certificate");
    assert_eq!(scep.certificates().await.len(), 2);
    // Renewing from the old certificate again mints nothing new: scepclient derives its
    // transaction ID from its key, so this is the retry it looks like, answered with the same
    // renewed certificate.
    let out = renew("old.pem").await.expect("scepclient runs");
    assert!(out.status.success(), "{out:?}");
    assert_eq!(std::fs::read(dir.path().join("old.pem")).unwrap(), second);
    assert_eq!(scep.certificates().await.len(), 2);

    // The same challenge again, from a fresh key: refused, nothing issued.
    std::fs::remove_file(dir.path().join("client.pem")).unwrap();
    std::fs::remove_file(dir.path().join("device.key")).unwrap();
    std::fs::remove_file(dir.path().join("csr.pem")).ok();
    let out = tokio::time::timeout(
        std::time::Duration::from_secs(30),
        run(challenge["challenge"].as_str().unwrap()),
    )
    .await;
    assert!(!dir.path().join("client.pem").exists(), "{out:?}");
    assert_eq!(scep.certificates().await.len(), 2);
    scep.server.stop().await;
}

/// A request of `message_type` carrying `content`, signed by `signer`, under `txn`.
fn signed_request(
    signer: &ClientIdentity,
    ca: &[u8],
    message_type: MessageType,
    content: &[u8],
    txn: &str,
) -> Vec<u8> {
    client::build_request(
        signer,
        &Request {
            message_type,
            content,
            recipient_der: ca,
            cipher: ContentCipher::Aes128Cbc,
            digest: DigestAlgorithm::Sha256,
            transaction_id: txn,
            sender_nonce: &uuid::Uuid::new_v4().into_bytes(),
        },
    )
    .unwrap()
}

fn spki(id: &ClientIdentity) -> Vec<u8> {
    id.public_key_der().unwrap()
}

/// The SubjectPublicKeyInfo a certificate certifies.
fn certified_key(certificate: &[u8]) -> Vec<u8> {
    use der::{Decode, Encode};
    x509_cert::Certificate::from_der(certificate)
        .unwrap()
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .unwrap()
}

#[tokio::test]
async fn a_throwaway_signer_enrolls_and_only_that_signer_gets_the_certificate_again() {
    let scep = Scep::with(TestServer::start().await).await;
    // The device's key is identity 0; it signs with a throwaway self-signed certificate of
    // another key (identity 1), as some clients and simulators do.
    let device = identity(0);
    let signer = identity(1);
    let stranger = identity(2);
    let challenge = scep.challenge().await;
    let csr = device
        .csr(
            "device",
            challenge["challenge"].as_str(),
            DigestAlgorithm::Sha256,
        )
        .unwrap();
    let txn = uuid::Uuid::new_v4().to_string();
    let pkcs_req =
        |who: &ClientIdentity| signed_request(who, &scep.ca, MessageType::PkcsReq, &csr, &txn);
    // The reply is encrypted to the signer: only its key opens it.
    let issued = outcome(&scep, signer, pkcs_req(signer)).await;
    assert_eq!(issued.status, PkiStatus::Success, "{issued:?}");
    let certificate = issued.certificates[0].clone();
    assert_eq!(
        certified_key(&certificate),
        spki(device),
        "the CSR's key is certified"
    );
    let reply = scep.post(pkcs_req(signer)).await.bytes().await.unwrap();
    assert!(
        client::open_cert_rep(&reply, device, &scep.ca).is_err(),
        "the device key cannot open a reply sent to the signer"
    );

    // Replays: the same transaction signed by another key is refused, not answered with the
    // certificate; the same signer gets the same certificate (a new nonce or the same body).
    let replayed = outcome(&scep, stranger, pkcs_req(stranger)).await;
    assert_eq!(replayed.status, PkiStatus::Failure);
    assert_eq!(replayed.fail_info, Some(FailInfo::BadRequest));
    assert!(replayed.certificates.is_empty());
    let own_csr = stranger
        .csr(
            "x",
            challenge["challenge"].as_str(),
            DigestAlgorithm::Sha256,
        )
        .unwrap();
    let own = outcome(
        &scep,
        stranger,
        signed_request(stranger, &scep.ca, MessageType::PkcsReq, &own_csr, &txn),
    )
    .await;
    assert_eq!(
        own.status,
        PkiStatus::Failure,
        "its own CSR under that transaction"
    );
    let again = outcome(&scep, signer, pkcs_req(signer)).await;
    assert_eq!(again.status, PkiStatus::Success);
    assert_eq!(again.certificates[0], certificate);

    // GetCertInitial: by transaction, to its requester only.
    let parsed = trustbroker::pki::scep::parse_csr(&csr).unwrap();
    let poll_content = client::issuer_and_subject(&scep.ca, &parsed.subject_der).unwrap();
    let poll = |who: &ClientIdentity| {
        signed_request(who, &scep.ca, MessageType::CertPoll, &poll_content, &txn)
    };
    let polled = outcome(&scep, signer, poll(signer)).await;
    assert_eq!(polled.status, PkiStatus::Success);
    assert_eq!(polled.certificates[0], certificate);
    let refused = outcome(&scep, stranger, poll(stranger)).await;
    assert_eq!(refused.status, PkiStatus::Failure);
    assert_eq!(refused.fail_info, Some(FailInfo::BadCertId));

    // GetCert: by serial, to its requester or the holder of the certified key, never to
    // anyone else (who is told there is no such certificate).
    let serial = client::issuer_and_serial(&certificate).unwrap();
    let get = |who: &ClientIdentity| {
        signed_request(
            who,
            &scep.ca,
            MessageType::GetCert,
            &serial,
            &uuid::Uuid::new_v4().to_string(),
        )
    };
    for who in [signer, device] {
        let got = outcome(&scep, who, get(who)).await;
        assert_eq!(got.status, PkiStatus::Success);
        assert_eq!(got.certificates[0], certificate);
    }
    let refused = outcome(&scep, stranger, get(stranger)).await;
    assert_eq!(refused.status, PkiStatus::Failure);
    assert_eq!(refused.fail_info, Some(FailInfo::BadCertId));
    let unknown = client::issuer_and_serial(&signer.certificate_der).unwrap();
    let got = outcome(
        &scep,
        signer,
        signed_request(signer, &scep.ca, MessageType::GetCert, &unknown, "unknown"),
    )
    .await;
    assert_eq!(got.fail_info, Some(FailInfo::BadCertId), "same as unknown");

    assert_eq!(scep.certificates().await.len(), 1);
    scep.server.stop().await;
}

#[tokio::test]
async fn bad_padding_and_well_padded_garbage_get_the_same_failure() {
    let scep = Scep::with(TestServer::start().await).await;
    let signer = identity(1);
    let challenge = scep.challenge().await;
    let csr = identity(0)
        .csr(
            "device",
            challenge["challenge"].as_str(),
            DigestAlgorithm::Sha256,
        )
        .unwrap();
    let around = |envelope: &[u8]| {
        client::build_request_around(
            signer,
            &Request {
                message_type: MessageType::PkcsReq,
                content: &[],
                recipient_der: &scep.ca,
                cipher: ContentCipher::Aes128Cbc,
                digest: DigestAlgorithm::Sha256,
                transaction_id: &uuid::Uuid::new_v4().to_string(),
                sender_nonce: &uuid::Uuid::new_v4().into_bytes(),
            },
            envelope,
        )
        .unwrap()
    };
    use trustbroker::pki::scep::{seal_envelope, seal_envelope_unpadded};
    for (cipher, block) in [
        (ContentCipher::DesEde3Cbc, 8usize),
        (ContentCipher::Aes128Cbc, 16),
        (ContentCipher::Aes256Cbc, 16),
    ] {
        // The CSR in whole blocks whose last byte is no PKCS#7 padding…
        let mut unpadded = csr.clone();
        unpadded.resize(csr.len().div_ceil(block) * block + block, 0x5a);
        *unpadded.last_mut().unwrap() = 0;
        let bad_padding = seal_envelope_unpadded(&unpadded, &scep.ca, cipher).unwrap();
        // …and well-padded envelopes around garbage and around DER that is no CSR.
        let garbage =
            seal_envelope(&[0x30, 0x82, 0x01, 0x00, 7, 7, 7, 7], &scep.ca, cipher).unwrap();
        let not_a_csr = seal_envelope(&signer.certificate_der, &scep.ca, cipher).unwrap();
        let mut answers = Vec::new();
        for envelope in [bad_padding, garbage, not_a_csr] {
            let got = outcome(&scep, signer, around(&envelope)).await;
            assert_eq!(got.status, PkiStatus::Failure);
            answers.push(got.fail_info);
        }
        assert_eq!(
            answers,
            vec![Some(FailInfo::BadMessageCheck); 3],
            "{cipher:?}: one answer for a bad padding and for bad content"
        );
    }
    // None of it spent the challenge.
    let body = signed_request(
        signer,
        &scep.ca,
        MessageType::PkcsReq,
        &csr,
        &uuid::Uuid::new_v4().to_string(),
    );
    assert_eq!(
        outcome(&scep, signer, body).await.status,
        PkiStatus::Success
    );
    assert_eq!(scep.certificates().await.len(), 1);
    scep.server.stop().await;
}

#[tokio::test]
async fn single_des_only_when_allowed() {
    for allowed in [false, true] {
        let server = TestServer::start_with(|a| {
            if allowed {
                a.scep_allow_single_des = Some(true);
            }
        })
        .await;
        // DES is never advertised (SCEP has no capability for it); DES3 and AES always.
        let caps = server.get_text("/scep?operation=GetCACaps").await;
        assert!(!caps.lines().any(|l| l == "DES"), "{caps}");
        assert!(caps.lines().any(|l| l == "DES3"), "{caps}");
        let scep = Scep::with(server).await;
        let id = identity(2);
        let challenge = scep.challenge().await;
        let des = pkcs_req(
            id,
            &scep.ca,
            challenge["challenge"].as_str(),
            ContentCipher::DesCbc,
            DigestAlgorithm::Sha256,
        );
        let got = outcome(&scep, id, des).await;
        if allowed {
            assert_eq!(got.status, PkiStatus::Success);
            assert_eq!(scep.certificates().await.len(), 1);
        } else {
            assert_eq!(got.status, PkiStatus::Failure);
            assert_eq!(got.fail_info, Some(FailInfo::BadAlg));
            assert!(scep.certificates().await.is_empty());
            // The challenge is still good for a client that speaks 3DES.
            let des3 = pkcs_req(
                id,
                &scep.ca,
                challenge["challenge"].as_str(),
                ContentCipher::DesEde3Cbc,
                DigestAlgorithm::Sha256,
            );
            assert_eq!(outcome(&scep, id, des3).await.status, PkiStatus::Success);
        }
        scep.server.stop().await;
    }
}

/// A RenewalReq signed by `holder` (a certificate of ours and its key) for a CSR of `new_key`.
fn renewal_req(holder: &ClientIdentity, new_key: &ClientIdentity, ca: &[u8], txn: &str) -> Vec<u8> {
    let csr = new_key.csr("renew", None, DigestAlgorithm::Sha256).unwrap();
    signed_request(holder, ca, MessageType::RenewalReq, &csr, txn)
}

#[tokio::test]
async fn a_certificate_is_renewed_once_and_stays_good_only_for_the_overlap() {
    for db in TestDb::all().await {
        let scep = Scep::start_on(&db).await;
        let store = scep.server.store();
        let challenge = scep.challenge().await;
        let device =
            crate::device::Device::enroll(&scep.server, challenge["challenge"].as_str().unwrap())
                .await;
        device.check_in(&scep.server).await;
        let old = device.identity.certificate_der.clone();
        let old_serial = serial_of(&x509(&old));
        let before = store
            .certificate(&old_serial)
            .await
            .unwrap()
            .unwrap()
            .not_after;

        let txn = uuid::Uuid::new_v4().to_string();
        let renewed = outcome(
            &scep,
            &device.identity,
            renewal_req(&device.identity, identity(0), &scep.ca, &txn),
        )
        .await;
        assert_eq!(renewed.status, PkiStatus::Success, "{}", db.name());
        let new = renewed.certificates[0].clone();

        // The old certificate is cut to the default overlap (4 hours), and still works in it.
        let record = store.certificate(&old_serial).await.unwrap().unwrap();
        let overlap = record.not_after - chrono::Utc::now();
        assert!(record.not_after < before, "{}", db.name());
        assert!(
            overlap > chrono::Duration::minutes(235) && overlap <= chrono::Duration::hours(4),
            "{overlap}"
        );
        assert_eq!(record.status.as_str(), "valid");
        assert!(device.idle(&scep.server).await.is_none());

        // A retry of that renewal gets the same certificate; any other renewal from the old
        // certificate is refused, concurrent ones included.
        let again = outcome(
            &scep,
            &device.identity,
            renewal_req(&device.identity, identity(0), &scep.ca, &txn),
        )
        .await;
        assert_eq!(again.certificates.first(), Some(&new), "{}", db.name());
        let scep = Arc::new(scep);
        let holder = Arc::new(device.identity.with_certificate(old.clone()));
        let attempts: Vec<_> = (0..4)
            .map(|_| {
                let scep = scep.clone();
                let holder = holder.clone();
                tokio::spawn(async move {
                    let body = renewal_req(
                        &holder,
                        identity(1),
                        &scep.ca,
                        &uuid::Uuid::new_v4().to_string(),
                    );
                    outcome(&scep, &holder, body).await
                })
            })
            .collect();
        for attempt in attempts {
            let got = attempt.await.unwrap();
            assert_eq!(got.status, PkiStatus::Failure, "{}", db.name());
            assert_eq!(got.fail_info, Some(FailInfo::BadRequest));
        }
        assert_eq!(scep.certificates().await.len(), 2, "{}", db.name());

        // The new certificate renews, once, and concurrent renewals of it yield one.
        let holder = Arc::new(identity(0).with_certificate(new.clone()));
        let attempts: Vec<_> = (0..4)
            .map(|_| {
                let scep = scep.clone();
                let holder = holder.clone();
                tokio::spawn(async move {
                    let body = renewal_req(
                        &holder,
                        identity(1),
                        &scep.ca,
                        &uuid::Uuid::new_v4().to_string(),
                    );
                    outcome(&scep, &holder, body).await.status
                })
            })
            .collect();
        let mut successes = 0;
        for attempt in attempts {
            if attempt.await.unwrap() == PkiStatus::Success {
                successes += 1;
            }
        }
        assert_eq!(successes, 1, "{}", db.name());
        assert_eq!(scep.certificates().await.len(), 3, "{}", db.name());
    }
}

#[tokio::test]
async fn after_the_overlap_the_renewed_certificate_no_longer_authenticates() {
    let scep =
        Scep::with(TestServer::start_with(|a| a.scep_renewal_overlap_secs = Some(1)).await).await;
    let challenge = scep.challenge().await;
    let device =
        crate::device::Device::enroll(&scep.server, challenge["challenge"].as_str().unwrap()).await;
    device.check_in(&scep.server).await;
    let old_serial = serial_of(&x509(&device.identity.certificate_der));
    let renewed = outcome(
        &scep,
        &device.identity,
        renewal_req(
            &device.identity,
            identity(0),
            &scep.ca,
            &uuid::Uuid::new_v4().to_string(),
        ),
    )
    .await;
    assert_eq!(renewed.status, PkiStatus::Success);
    let new = identity(0).with_certificate(renewed.certificates[0].clone());
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;

    let record = scep
        .server
        .store()
        .certificate(&old_serial)
        .await
        .unwrap()
        .unwrap();
    assert!(
        record.not_after <= chrono::Utc::now(),
        "{:?}",
        record.not_after
    );
    // The old identity gets 401 on the command channel; the renewed one is served.
    let (status, _) = device
        .report(&scep.server, "Idle", None, plist::Dictionary::new())
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let switched = crate::device::Device {
        udid: device.udid.clone(),
        identity: new,
        push_token: device.push_token.clone(),
        push_magic: device.push_magic.clone(),
    };
    assert!(switched.idle(&scep.server).await.is_none());
    // And the old one cannot renew any more.
    let late = outcome(
        &scep,
        &device.identity,
        renewal_req(
            &device.identity,
            identity(1),
            &scep.ca,
            &uuid::Uuid::new_v4().to_string(),
        ),
    )
    .await;
    assert_eq!(late.status, PkiStatus::Failure);
    scep.server.stop().await;
}

fn x509(der: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("c.der"), der).unwrap();
    openssl_in(
        dir.path(),
        &[
            "x509",
            "-inform",
            "DER",
            "-in",
            "c.der",
            "-noout",
            "-text",
            "-nameopt",
            "oneline,-esc_msb",
        ],
    )
}

fn serial_of(text: &str) -> String {
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("Serial Number:") {
            let rest = rest.trim();
            let hex = if rest.is_empty() {
                lines.next().unwrap_or("").trim()
            } else {
                rest.split(' ').next().unwrap_or("")
            };
            return hex
                .replace(':', "")
                .to_lowercase()
                .trim_start_matches("0x")
                .to_string();
        }
    }
    panic!("no serial in {text}");
}

fn subject_of(text: &str) -> String {
    text.lines()
        .find(|l| l.trim().starts_with("Subject:"))
        .unwrap_or_default()
        .trim()
        .to_string()
}

/// A broker on `db` that creates an ECDSA P-256 CA with an RSA RA.
async fn p256_server(db: &TestDb, allow_single_des: bool) -> TestServer {
    let url = db.database_url();
    TestServer::start_with(move |args| {
        args.database_url = url;
        args.ca_key_algorithm = Some(trustbroker::config::CaKeyAlgorithm::EcdsaP256);
        args.scep_ra = Some(true);
        args.scep_allow_single_des = Some(allow_single_des);
    })
    .await
}

/// GetCACert of a CA with an RA: the CA and the RA (DER), told apart by basicConstraints.
async fn ca_and_ra(server: &TestServer) -> (Vec<u8>, Vec<u8>) {
    let response = server
        .client
        .get(server.url("/scep?operation=GetCACert"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        response.headers()["content-type"],
        "application/x-x509-ca-ra-cert"
    );
    let bag = response.bytes().await.unwrap();
    let certs = trustbroker::pki::scep::parse_degenerate_certificates(&bag).unwrap();
    assert_eq!(certs.len(), 2);
    let (ca, ra): (Vec<_>, Vec<_>) = certs
        .into_iter()
        .partition(|der| x509(der).contains("CA:TRUE"));
    assert_eq!((ca.len(), ra.len()), (1, 1));
    (ca[0].clone(), ra[0].clone())
}

/// `client.pem` in `dir` chains to `ca.pem` as a TLS client certificate (openssl says so).
fn chains_to_the_ca(dir: &std::path::Path) {
    openssl_in(
        dir,
        &[
            "verify",
            "-CAfile",
            "ca.pem",
            "-purpose",
            "sslclient",
            "client.pem",
        ],
    );
}

#[tokio::test]
async fn a_p256_ca_issues_through_an_rsa_ra_to_scepclient_on_both_databases() {
    if peer_env("TRUSTBROKER_TEST_PEERS").is_none() {
        return;
    }
    for db in TestDb::all().await {
        // scepclient 2.1.0 encrypts with single DES whatever GetCACaps offers.
        let server = p256_server(&db, true).await;
        let (ca, ra) = ca_and_ra(&server).await;
        let ca_text = x509(&ca);
        assert!(ca_text.contains("ecdsa-with-SHA256"), "{ca_text}");
        assert!(ca_text.contains("prime256v1"), "{ca_text}");
        let ra_text = x509(&ra);
        assert!(ra_text.contains("rsaEncryption"), "{ra_text}");
        assert!(
            ra_text.contains("Digital Signature, Key Encipherment"),
            "{ra_text}"
        );
        let scep = Scep {
            admin: server
                .admin_key(
                    "scep-admin",
                    &["scep:challenge", "certificates:read", "certificates:write"],
                )
                .await,
            server,
            ca: ra.clone(),
        };
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("ca.pem"),
            trustbroker::pki::pem("CERTIFICATE", &ca),
        )
        .unwrap();
        std::fs::write(
            dir.path().join("ra.pem"),
            trustbroker::pki::pem("CERTIFICATE", &ra),
        )
        .unwrap();

        // micromdm's scepclient, the real peer: enrolls, then renews. It encrypts to every
        // certificate GetCACert returns unless told which (and panics on the P-256 CA's key):
        // -ca-fingerprint picks the RA, as a device picks the certificate for key encipherment.
        let challenge = scep.challenge().await;
        let ra_fingerprint = {
            use sha2::Digest;
            hex::encode(sha2::Sha256::digest(&ra))
        };
        let scepclient = |extra: &[&str]| {
            let mut cmd = tokio::process::Command::new("scepclient");
            cmd.current_dir(dir.path())
                .args([
                    "-private-key",
                    "device.key",
                    "-server-url",
                    &format!("{}/scep", scep.server.http_base),
                    "-ca-fingerprint",
                    &ra_fingerprint,
                ])
                .args(extra)
                .kill_on_drop(true);
            cmd.output()
        };
        let out = scepclient(&[
            "-challenge",
            challenge["challenge"].as_str().unwrap(),
            "-cn",
            "ignored-by-policy",
        ])
        .await
        .expect("scepclient runs");
        assert!(
            out.status.success(),
            "{}: {}{}",
            db.name(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // openssl, independently: the certificate chains to the P-256 CA, signed with
        // ecdsa-with-SHA256, over the device's RSA key.
        chains_to_the_ca(dir.path());
        let leaf = openssl_in(
            dir.path(),
            &["x509", "-in", "client.pem", "-noout", "-text"],
        );
        assert!(
            leaf.contains("Signature Algorithm: ecdsa-with-SHA256"),
            "{leaf}"
        );
        assert!(leaf.contains("rsaEncryption"), "{leaf}");
        assert!(
            leaf.contains(challenge["enrollment_id"].as_str().unwrap()),
            "{leaf}"
        );
        // The RA is not an issuer: the leaf does not verify under it.
        let out = Command::new("openssl")
            .current_dir(dir.path())
            .args(["verify", "-CAfile", "ra.pem", "client.pem"])
            .output()
            .unwrap();
        assert!(!out.status.success());

        let first = std::fs::read(dir.path().join("client.pem")).unwrap();
        let out = scepclient(&["-certificate", "client.pem"])
            .await
            .expect("scepclient runs");
        assert!(out.status.success(), "{}: {out:?}", db.name());
        let renewed = std::fs::read(dir.path().join("client.pem")).unwrap();
        assert_ne!(first, renewed, "a RenewalReq got a new certificate");
        chains_to_the_ca(dir.path());
        assert_eq!(scep.certificates().await.len(), 2);

        // The CertRep is signed by the RSA RA: the project's client checks the signer is the
        // RA, and openssl verifies the CMS signature and chains its signer to the CA.
        let id = identity(0);
        let challenge = scep.challenge().await;
        let body = pkcs_req(
            id,
            &ra,
            challenge["challenge"].as_str(),
            ContentCipher::Aes256Cbc,
            DigestAlgorithm::Sha256,
        );
        let response = scep.post(body).await;
        assert_eq!(response.status(), StatusCode::OK);
        let reply = response.bytes().await.unwrap();
        let got = client::open_cert_rep(&reply, id, &ra).unwrap();
        assert_eq!(got.status, PkiStatus::Success);
        assert!(x509(&got.certificates[0]).contains("ecdsa-with-SHA256"));
        std::fs::write(dir.path().join("certrep.der"), &reply).unwrap();
        openssl_in(
            dir.path(),
            &[
                "cms",
                "-verify",
                "-inform",
                "DER",
                "-in",
                "certrep.der",
                "-CAfile",
                "ca.pem",
                "-purpose",
                "any",
                "-signer",
                "signer.pem",
                "-out",
                "content.der",
            ],
        );
        let signer = openssl_in(
            dir.path(),
            &[
                "x509",
                "-in",
                "signer.pem",
                "-outform",
                "DER",
                "-out",
                "signer.der",
            ],
        );
        assert!(signer.is_empty());
        assert_eq!(std::fs::read(dir.path().join("signer.der")).unwrap(), ra);
        scep.server.stop().await;
    }
}

#[tokio::test]
async fn a_device_under_a_p256_ca_checks_in_and_idles() {
    for db in TestDb::all().await {
        let server = p256_server(&db, false).await;
        let (ca, ra) = ca_and_ra(&server).await;
        let admin = server.admin_key("mdm-admin", &["admin"]).await;
        let challenge = server.challenge(&admin).await;
        // The simulator's enrollment, addressed to the RA.
        let key = identity(1);
        let got = crate::device::scep_request_to(&server, key, &ra, &challenge).await;
        assert_eq!(got.status, PkiStatus::Success, "{}", db.name());
        let issued = got.certificates[0].clone();
        assert_eq!(
            got.certificates.get(1),
            Some(&ca),
            "the chain ends at the CA"
        );
        assert!(x509(&issued).contains("ecdsa-with-SHA256"));
        let device = crate::device::Device {
            udid: uuid::Uuid::new_v4().to_string().to_uppercase(),
            identity: key.with_certificate(issued),
            push_token: trustbroker::random::bytes::<32>().to_vec(),
            push_magic: uuid::Uuid::new_v4().to_string().to_uppercase(),
        };
        device.check_in(&server).await;
        assert!(device.idle(&server).await.is_none(), "{}", db.name());
        let listed = server.get_json("/api/v1/enrollments", Some(&admin)).await;
        assert_eq!(listed["enrollments"][0]["status"], "active", "{listed}");
        assert_eq!(listed["enrollments"][0]["id"], device.udid.as_str());

        // As a TLS client certificate the ECDSA-signed certificate chains to the P-256 CA
        // (the listener's client-certificate roots) and identifies the device unsigned.
        use rsa::pkcs8::EncodePrivateKey;
        let tls_cert = std::fs::read(&server.server.as_ref().unwrap().tls_cert_path).unwrap();
        let pem = trustbroker::pki::pem("CERTIFICATE", &device.identity.certificate_der)
            + &device
                .identity
                .key
                .to_pkcs8_pem(rsa::pkcs8::LineEnding::LF)
                .unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&tls_cert).unwrap())
            .identity(reqwest::Identity::from_pem(pem.as_bytes()).unwrap())
            .build()
            .unwrap();
        let idle = crate::device::xml({
            let mut m = plist::Dictionary::new();
            m.insert("Status".into(), "Idle".into());
            m.insert("UDID".into(), device.udid.clone().into());
            m
        });
        let response = client
            .put(server.url("/mdm/connect"))
            .body(idle.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{}", db.name());
        // Unsigned and without the certificate: nobody.
        let response = server
            .client
            .put(server.url("/mdm/connect"))
            .body(idle)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        server.stop().await;
    }
}
