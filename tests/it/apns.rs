//! A loopback stand-in for the APNs provider API (the one part of the world that cannot be
//! reached from here): HTTP/2 only, over TLS that requires the push certificate as client
//! certificate, `POST /3/device/{token}` answered as APNs answers. It records every push, and
//! per token it can be told to answer with errors first (410 Unregistered, 503).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Version};
use axum::routing::post;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// A push as the stand-in received it.
#[derive(Clone, Debug)]
pub struct Push {
    pub token: String,
    pub topic: String,
    pub push_type: String,
    pub priority: String,
    pub body: serde_json::Value,
    pub version: Version,
}

/// Answers to give before succeeding: (HTTP status, APNs reason).
type Answers = VecDeque<(u16, &'static str)>;

#[derive(Clone, Default)]
struct Shared {
    pushes: Arc<Mutex<Vec<Push>>>,
    /// Woken at every push that arrives.
    arrived: Arc<tokio::sync::Notify>,
    /// Per token, answers to give before succeeding: (status, reason).
    script: Arc<Mutex<HashMap<String, Answers>>>,
}

pub struct ApnsStandIn {
    pub url: String,
    /// The stand-in's server certificate, for the broker's `apns_ca_file`.
    pub ca_file: std::path::PathBuf,
    /// The push certificate and key (PEM), issued by a test CA the stand-in trusts.
    pub push_cert_pem: String,
    pub push_key_pem: String,
    shared: Shared,
    _dir: tempfile::TempDir,
}

impl ApnsStandIn {
    pub async fn start(topic: &str) -> ApnsStandIn {
        let dir = tempfile::tempdir().unwrap();
        // The TLS server certificate.
        let server_key = rcgen::KeyPair::generate().unwrap();
        let server_cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&server_key)
            .unwrap();
        let ca_file = dir.path().join("apns-ca.pem");
        std::fs::write(&ca_file, server_cert.pem()).unwrap();
        // A CA for push certificates, and the push certificate (RSA, topic as UID).
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Test Apple Push CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.clone().self_signed(&ca_key).unwrap();
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let pkcs8 = trustbroker::pki::ca::generate_rsa_pkcs8(2048).unwrap();
        let push_key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(pkcs8.clone()),
            &rcgen::PKCS_RSA_SHA256,
        )
        .unwrap();
        let mut push = rcgen::CertificateParams::default();
        push.distinguished_name.push(
            rcgen::DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 1]),
            rcgen::DnValue::Utf8String(topic.into()),
        );
        push.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let push_cert = push.signed_by(&push_key, &issuer).unwrap();

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .unwrap();
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(server_cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )
            .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let shared = Shared::default();
        let app = Router::new()
            .route("/3/device/{token}", post(receive))
            .with_state(shared.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!(
            "https://127.0.0.1:{}",
            listener.local_addr().unwrap().port()
        );
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    // HTTP/2 only, as APNs.
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .http2_only()
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
                        .await;
                });
            }
        });
        ApnsStandIn {
            url,
            ca_file,
            push_cert_pem: push_cert.pem(),
            push_key_pem: trustbroker::pki::pem("PRIVATE KEY", &pkcs8),
            shared,
            _dir: dir,
        }
    }

    /// Answers the next pushes to `token` with these (status, reason) first.
    pub fn script(&self, token: &str, answers: &[(u16, &'static str)]) {
        self.shared
            .script
            .lock()
            .unwrap()
            .insert(token.to_owned(), answers.iter().copied().collect());
    }

    pub fn pushes(&self) -> Vec<Push> {
        self.shared.pushes.lock().unwrap().clone()
    }

    /// Waits until `count` pushes arrived (pushes go out in the background).
    pub async fn wait_for(&self, count: usize) -> Vec<Push> {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            // Registered before looking, so a push between the look and the wait still wakes.
            let arrived = self.shared.arrived.notified();
            let pushes = self.pushes();
            if pushes.len() >= count {
                return pushes;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                panic!("expected {count} pushes, got {:?}", self.pushes());
            }
        }
    }
}

async fn receive(
    State(shared): State<Shared>,
    Path(token): Path<String>,
    version: Version,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    shared.pushes.lock().unwrap().push(Push {
        token: token.clone(),
        topic: header("apns-topic"),
        push_type: header("apns-push-type"),
        priority: header("apns-priority"),
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        version,
    });
    shared.arrived.notify_waiters();
    let scripted = shared
        .script
        .lock()
        .unwrap()
        .get_mut(&token)
        .and_then(VecDeque::pop_front);
    match scripted {
        Some((status, reason)) => (
            StatusCode::from_u16(status).unwrap(),
            serde_json::json!({ "reason": reason }).to_string(),
        ),
        None => (StatusCode::OK, String::new()),
    }
}

mod flows {
    use reqwest::StatusCode;
    use serde_json::json;

    use super::ApnsStandIn;
    use crate::device::{self, Device};
    use crate::harness::TestServer;

    /// Queues a command; the answer's `push` for each target.
    async fn enqueue(server: &TestServer, admin: &str, ids: &[&str], nopush: bool) -> Vec<String> {
        let response = server
            .client
            .post(server.url("/api/v1/commands"))
            .bearer_auth(admin)
            .json(
                &json!({"enrollment_ids": ids, "command": {"RequestType": "ProfileList"},
                          "allow_duplicates": true, "nopush": nopush}),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        let body: serde_json::Value = response.json().await.unwrap();
        body["commands"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["push"].as_str().unwrap().to_owned())
            .collect()
    }

    /// A server pushing through the stand-in, its push certificate imported; an admin key.
    async fn pushing_through(apns: &ApnsStandIn, file_toml: &str) -> (TestServer, String) {
        let (url, ca) = (apns.url.clone(), apns.ca_file.clone());
        let server = TestServer::start_configured(
            move |a| {
                a.apns_url = Some(url);
                a.apns_ca_file = Some(ca);
            },
            file_toml,
        )
        .await;
        let admin = server.admin_key("apns", &["admin"]).await;
        let imported = server
            .client
            .put(server.url("/api/v1/push-certificate"))
            .bearer_auth(&admin)
            .json(&json!({"certificate_pem": apns.push_cert_pem, "key_pem": apns.push_key_pem}))
            .send()
            .await
            .unwrap();
        assert_eq!(imported.status(), StatusCode::OK);
        (server, admin)
    }

    async fn push_status(server: &TestServer, admin: &str, id: &str) -> String {
        let shown = server
            .get_json(&format!("/api/v1/enrollments/{id}"), Some(admin))
            .await;
        shown["push_status"].as_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn enqueueing_wakes_devices_over_apns_with_retries_and_dead_tokens() {
        let apns = ApnsStandIn::start(device::TOPIC).await;
        let (server, admin) = pushing_through(&apns, "").await;

        let mut devices = Vec::new();
        for _ in 0..3 {
            let challenge: serde_json::Value = server
                .client
                .post(server.url("/api/v1/scep/challenges"))
                .bearer_auth(&admin)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let device = Device::enroll(&server, challenge["challenge"].as_str().unwrap()).await;
            device.check_in(&server).await;
            devices.push(device);
        }
        let [steady, flaky, gone] = [&devices[0], &devices[1], &devices[2]];
        apns.script(
            &hex::encode(&flaky.push_token),
            &[(503, "ServiceUnavailable")],
        );
        apns.script(&hex::encode(&gone.push_token), &[(410, "Unregistered")]);

        enqueue(
            &server,
            &admin,
            &[&steady.udid, &flaky.udid, &gone.udid],
            false,
        )
        .await;
        let pushes = apns.wait_for(4).await;
        let to = |d: &Device| {
            pushes
                .iter()
                .filter(|p| p.token == hex::encode(&d.push_token))
                .collect::<Vec<_>>()
        };
        let first = to(steady)[0];
        assert_eq!(first.version, axum::http::Version::HTTP_2);
        assert_eq!(first.topic, device::TOPIC);
        assert_eq!(first.push_type, "mdm");
        assert_eq!(first.priority, "10");
        assert_eq!(first.body, json!({"mdm": steady.push_magic}));
        assert_eq!(to(flaky).len(), 2, "retried after 503");
        assert_eq!(to(gone).len(), 1, "410 is final");
        // Background pushes: wait for the outcome to be recorded.
        for _ in 0..100 {
            if push_status(&server, &admin, &gone.udid).await == "unregistered" {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(
            push_status(&server, &admin, &gone.udid).await,
            "unregistered"
        );
        assert_eq!(push_status(&server, &admin, &steady.udid).await, "ok");

        // A dead token is not pushed again, and nopush pushes nothing: both decided before
        // the answer, which says so.
        assert_eq!(
            enqueue(&server, &admin, &[&gone.udid], false).await,
            ["no-token"]
        );
        assert_eq!(
            enqueue(&server, &admin, &[&steady.udid], true).await,
            ["not-requested"]
        );
        // A new TokenUpdate revives the channel.
        assert_eq!(gone.token_update(&server).await.status(), StatusCode::OK);
        assert_eq!(
            enqueue(&server, &admin, &[&gone.udid], false).await,
            ["requested"]
        );
        let pushes = apns.wait_for(5).await;
        assert_eq!(pushes.len(), 5);
        assert_eq!(pushes[4].token, hex::encode(&gone.push_token));
        let metrics = server.get_text("/metrics").await;
        assert!(
            metrics.contains("trustbroker_apns_pushes_total{outcome=\"sent\"}"),
            "{metrics}"
        );
        server.stop().await;
    }

    /// Pushes that reached `device`'s token so far.
    fn pushes_to(apns: &ApnsStandIn, device: &Device) -> usize {
        let token = hex::encode(&device.push_token);
        apns.pushes().iter().filter(|p| p.token == token).count()
    }

    #[tokio::test]
    async fn silent_devices_with_commands_waiting_are_pushed_again_until_heard_from() {
        let apns = ApnsStandIn::start(device::TOPIC).await;
        let (server, admin) = pushing_through(&apns, "apns_repush_after_secs = 2\n").await;
        let silent = Device::enroll(&server, &server.challenge(&admin).await).await;
        silent.check_in(&server).await;
        let answering = Device::enroll(&server, &server.challenge(&admin).await).await;
        answering.check_in(&server).await;

        enqueue(&server, &admin, &[&silent.udid, &answering.udid], false).await;
        apns.wait_for(2).await;
        // One device comes at once and clears its queue; the other stays silent.
        answering.acknowledge_next(&server).await;

        // The silent one is pushed again after 2 s of silence, then after 4 s more.
        let started = std::time::Instant::now();
        while pushes_to(&apns, &silent) < 3 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(20),
                "pushed {} times",
                pushes_to(&apns, &silent)
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        let took = started.elapsed();
        assert!(
            took >= std::time::Duration::from_secs(4),
            "the wait doubles: three pushes took {took:?}"
        );
        assert_eq!(
            pushes_to(&apns, &answering),
            1,
            "a device heard from is left alone"
        );

        // Heard from at last: its queue done, it is not pushed again.
        silent.acknowledge_next(&server).await;
        let settled = pushes_to(&apns, &silent);
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        assert_eq!(pushes_to(&apns, &silent), settled);
        let metrics = server.get_text("/metrics").await;
        assert!(
            metrics.contains("trustbroker_apns_repushes_total"),
            "{metrics}"
        );
        server.stop().await;
    }
}
