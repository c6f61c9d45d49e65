//! A node killed with `kill -9` under load, behind nginx, two broker processes on one
//! PostgreSQL: during SCEP issuance and during command delivery. Clients retry what failed (as
//! devices do); afterwards no challenge has issued two certificates, no command was lost or
//! queued twice, and every device ends with exactly its command, acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use plist::Dictionary;
use reqwest::StatusCode;
use serde_json::{Value as Json, json};
use trustbroker::pki::scep::PkiStatus;
use trustbroker::pki::scep::client::{self, ClientIdentity};

use crate::device::{Device, pkcs_req, uuid_and_type};
use crate::harness::{BrokerProcess, PgTestDb, TestDb, TestServer, client_trusting, peer_env};
use crate::nginx::{Nginx, free_port};

const DEVICES: usize = 32;
const CONCURRENCY: usize = 8;

/// Two broker processes (fixed ports, so a restarted node is where nginx looks for it).
struct Cluster {
    pg_url: String,
    keys: tempfile::TempDir,
    data: [tempfile::TempDir; 2],
    http_ports: [u16; 2],
    public_url: String,
    nodes: [Option<BrokerProcess>; 2],
}

impl Cluster {
    fn start(pg: &PgTestDb, public_url: &str) -> Cluster {
        let mut cluster = Cluster {
            pg_url: pg.url.clone(),
            keys: tempfile::tempdir().unwrap(),
            data: [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()],
            http_ports: [free_port(), free_port()],
            public_url: public_url.to_owned(),
            nodes: [None, None],
        };
        for i in 0..2 {
            cluster.restart(i);
        }
        cluster
    }

    fn restart(&mut self, i: usize) {
        let data = self.data[i].path().display().to_string();
        let http = format!("127.0.0.1:{}", self.http_ports[i]);
        let key = self.keys.path().join("secret.key").display().to_string();
        self.nodes[i] = Some(BrokerProcess::serve(
            &[
                "--data-dir",
                &data,
                "--listen",
                "127.0.0.1:0",
                "--http-listen",
                &http,
                "--public-url",
                &self.public_url,
            ],
            &[
                ("DATABASE_URL", &self.pg_url),
                ("TRUSTBROKER_SECRET_KEY_FILE", &key),
            ],
        ));
    }

    fn kill(&mut self, i: usize) {
        if let Some(node) = self.nodes[i].take() {
            node.kill_hard();
        }
    }

    fn upstreams(&self) -> Vec<String> {
        self.http_ports
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect()
    }

    fn admin_key(&self) -> String {
        let key = self.keys.path().join("secret.key").display().to_string();
        let (ok, stdout, stderr) = crate::harness::run_cli(
            &["admin-key", "create", "--name", "faults"],
            &[
                ("DATABASE_URL", &self.pg_url),
                ("TRUSTBROKER_SECRET_KEY_FILE", &key),
            ],
        );
        assert!(ok, "{stderr}");
        crate::harness::created_key(&stdout)
    }
}

/// Sends `attempt` until it gets an answer that is not a transport error or a 5xx from the
/// load balancer (the node behind it died); counts the retries.
async fn with_retries<F, Fut>(retries: &AtomicUsize, mut attempt: F) -> reqwest::Response
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = reqwest::Result<reqwest::Response>>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match attempt().await {
            Ok(response) if !response.status().is_server_error() => return response,
            _ => {
                retries.fetch_add(1, Ordering::Relaxed);
                assert!(
                    Instant::now() < deadline,
                    "no answer within 60 s of retrying"
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn scep_with_retries(
    front: &TestServer,
    ca: &[u8],
    key: &ClientIdentity,
    challenge: &str,
    retries: &AtomicUsize,
) -> Vec<u8> {
    // The same message each time: a retry is a replay the CA must answer, not a new request.
    let body = pkcs_req(key, ca, challenge);
    let reply = with_retries(retries, || {
        front
            .client
            .post(front.url("/scep?operation=PKIOperation"))
            .body(body.clone())
            .send()
    })
    .await;
    let bytes = reply.bytes().await.unwrap();
    let outcome = client::open_cert_rep(&bytes, key, ca).unwrap();
    assert_eq!(outcome.status, PkiStatus::Success, "{outcome:?}");
    outcome.certificates[0].clone()
}

#[tokio::test]
async fn a_node_killed_during_issuance_and_delivery_loses_and_doubles_nothing() {
    let Some(nginx_binary) = peer_env("TRUSTBROKER_TEST_NGINX") else {
        return;
    };
    let Some(TestDb::Postgres(pg)) = TestDb::all()
        .await
        .into_iter()
        .find(|d| d.name() == "postgres")
    else {
        return;
    };
    let port = free_port();
    let public_url = format!("https://127.0.0.1:{port}");
    let mut cluster = Cluster::start(&pg, &public_url);
    let nginx = Nginx::start(&nginx_binary, port, &cluster.upstreams());
    let front = Arc::new(TestServer::front(
        public_url.clone(),
        client_trusting(&nginx.cert),
    ));
    let admin = cluster.admin_key();
    let ca = front.ca_der().await;

    // One-time challenges and device keys, made before the load.
    let mut challenges = Vec::new();
    for _ in 0..DEVICES {
        let answer: Json = front
            .client
            .post(front.url("/api/v1/scep/challenges"))
            .bearer_auth(&admin)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        challenges.push(answer["challenge"].as_str().unwrap().to_owned());
    }
    let keys: Vec<ClientIdentity> = tokio::task::spawn_blocking(|| {
        (0..DEVICES)
            .map(|_| ClientIdentity::generate(2048).unwrap())
            .collect()
    })
    .await
    .unwrap();

    // Issuance at concurrency 8; node 0 dies after a quarter has been issued.
    let retries = Arc::new(AtomicUsize::new(0));
    let issued = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (key, challenge) in keys.into_iter().zip(challenges) {
        let (front, ca, retries, issued, gate) = (
            front.clone(),
            ca.clone(),
            retries.clone(),
            issued.clone(),
            gate.clone(),
        );
        tasks.spawn(async move {
            let _slot = gate.acquire().await.unwrap();
            let certificate = scep_with_retries(&front, &ca, &key, &challenge, &retries).await;
            issued.fetch_add(1, Ordering::Relaxed);
            key.with_certificate(certificate)
        });
    }
    let started = Instant::now();
    while issued.load(Ordering::Relaxed) < DEVICES / 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.kill(0);
    let killed_at = started.elapsed();
    let identities = tasks.join_all().await;
    let scep_took = started.elapsed();
    let scep_retries = retries.swap(0, Ordering::Relaxed);
    cluster.restart(0);

    let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
    let doubled: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM (SELECT enrollment_id FROM certificates \
         GROUP BY enrollment_id HAVING COUNT(*) > 1) AS doubled",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(doubled, 0, "a challenge issued two certificates");
    let certificates: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM certificates")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(certificates, DEVICES as i64);

    // Every device checks in, a command is queued for all, and node 1 dies while devices
    // fetch and acknowledge it.
    let mut devices = Vec::new();
    for identity in identities {
        let device = Device {
            udid: uuid::Uuid::new_v4().to_string().to_uppercase(),
            identity,
            push_token: trustbroker::random::bytes::<32>().to_vec(),
            push_magic: uuid::Uuid::new_v4().to_string().to_uppercase(),
        };
        device.check_in(&front).await;
        devices.push(Arc::new(device));
    }
    let ids: Vec<&str> = devices.iter().map(|d| d.udid.as_str()).collect();
    let queued = front
        .client
        .post(front.url("/api/v1/commands"))
        .bearer_auth(&admin)
        .json(&json!({"enrollment_ids": ids, "command": {"RequestType": "DeviceInformation", "Queries": ["OSVersion"]}}))
        .send()
        .await
        .unwrap();
    assert_eq!(queued.status(), StatusCode::CREATED);

    let answered = Arc::new(AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for device in &devices {
        let (front, device, retries, answered, gate) = (
            front.clone(),
            device.clone(),
            retries.clone(),
            answered.clone(),
            gate.clone(),
        );
        tasks.spawn(async move {
            let _slot = gate.acquire().await.unwrap();
            let mut seen = Vec::new();
            // Idle until the command comes, acknowledge it, and Idle once more: nothing left.
            loop {
                let (status, command) =
                    device.report(&front, "Idle", None, Dictionary::new()).await;
                if status.is_server_error() {
                    retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
                assert_eq!(status, StatusCode::OK);
                let Some(command) = command else { break };
                let (uuid, _) = uuid_and_type(&command);
                seen.push(uuid.clone());
                loop {
                    let (status, _) = device
                        .report(&front, "Acknowledged", Some(&uuid), Dictionary::new())
                        .await;
                    if !status.is_server_error() {
                        assert_eq!(status, StatusCode::OK);
                        break;
                    }
                    retries.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                answered.fetch_add(1, Ordering::Relaxed);
            }
            (device.udid.clone(), seen)
        });
    }
    let started = Instant::now();
    while answered.load(Ordering::Relaxed) < DEVICES / 4 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    cluster.kill(1);
    let delivered = tasks.join_all().await;
    let delivery_took = started.elapsed();
    let delivery_retries = retries.load(Ordering::Relaxed);
    for (udid, seen) in &delivered {
        assert!(!seen.is_empty(), "{udid} never got its command");
        assert!(
            seen.iter().all(|uuid| *uuid == seen[0]),
            "{udid} got two different commands: {seen:?}"
        );
    }
    let rows: Vec<(String, i64, i64)> = sqlx::query_as(
        "SELECT enrollment_id, COUNT(*), SUM(CASE WHEN status = 'acknowledged' THEN 1 ELSE 0 END) \
         FROM mdm_commands GROUP BY enrollment_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), DEVICES, "{rows:?}");
    assert!(
        rows.iter()
            .all(|(_, queued, acked)| *queued == 1 && *acked == 1),
        "each device: one command, acknowledged: {rows:?}"
    );
    eprintln!(
        "kill -9 during SCEP: {DEVICES} issued in {scep_took:?} (node killed at {killed_at:?}), \
         {scep_retries} client retries, 0 doubled; during delivery: {DEVICES} acknowledged in \
         {delivery_took:?}, {delivery_retries} client retries, each command queued once"
    );
    pool.close().await;
    drop(nginx);
    cluster.kill(0);
}
