//! A node killed with `kill -9` under load, behind nginx, two broker processes on one
//! PostgreSQL: during SCEP issuance and during command delivery. Clients retry what failed (as
//! devices do); afterwards no challenge has issued two certificates, no command was lost or
//! queued twice, and every device ends with exactly its command, acknowledged.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use plist::Dictionary;
use reqwest::StatusCode;
use serde_json::json;
use trustbroker::pki::scep::PkiStatus;
use trustbroker::pki::scep::client::{self, ClientIdentity};

use crate::device::{Device, pkcs_req, uuid_and_type};
use crate::harness::{BrokerProcess, TestDb, TestServer, client_trusting, peer_env};
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
    fn start(pg_url: &str, public_url: &str) -> Cluster {
        let mut cluster = Cluster {
            pg_url: pg_url.to_owned(),
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

    /// The node a cluster name (`host/pid/random`) belongs to.
    fn index_of(&self, node_name: &str) -> Option<usize> {
        let pid = node_name.split('/').nth(1)?.parse::<u32>().ok()?;
        self.nodes
            .iter()
            .position(|n| n.as_ref().is_some_and(|n| n.pid() == pid))
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

/// Two nodes on `pg_url` behind a fresh nginx; the front the clients use.
fn behind_nginx(nginx_binary: &str, pg_url: &str) -> (Cluster, Nginx, Arc<TestServer>) {
    let port = free_port();
    let public_url = format!("https://127.0.0.1:{port}");
    let cluster = Cluster::start(pg_url, &public_url);
    let nginx = Nginx::start(nginx_binary, port, &cluster.upstreams());
    let front = Arc::new(TestServer::front(public_url, client_trusting(&nginx.cert)));
    (cluster, nginx, front)
}

/// The shared PostgreSQL database of the suite, when it runs.
async fn shared_postgres() -> Option<crate::harness::PgTestDb> {
    match TestDb::all()
        .await
        .into_iter()
        .find(|d| d.name() == "postgres")
    {
        Some(TestDb::Postgres(pg)) => Some(pg),
        _ => None,
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
    let Some(pg) = shared_postgres().await else {
        return;
    };
    let (mut cluster, nginx, front) = behind_nginx(&nginx_binary, &pg.url);
    let admin = cluster.admin_key();
    let ca = front.ca_der().await;

    // One-time challenges and device keys, made before the load.
    let mut challenges = Vec::new();
    for _ in 0..DEVICES {
        challenges.push(front.challenge(&admin).await);
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
    front.queue_device_information(&admin, &ids).await;

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

/// Devices in the fan-out scenario.
const FLEET: i64 = 10_000;

/// One policy for the whole fleet: a profile and an app whose configuration names the owner,
/// two commands per device.
const FLEET_POLICY: &str = r#"name: fleet-baseline
targets:
  groups:
    - { provider: corp, id: fleet }
profiles:
  - name: passcode
    payloads:
      - { PayloadType: com.apple.mobiledevice.passwordpolicy, minLength: 8 }
apps:
  - bundle_id: com.pingidentity.pingid
    itunes_store_id: 1076521545
    configuration:
      user_email: "${user.email}"
"#;

/// `n` people in group `fleet` of provider `corp`, each with an active enrollment and a
/// checked-in device (no push token: the fan-out is about queuing), written in a few
/// statements.
async fn seed_fleet(pool: &sqlx::PgPool, n: i64) {
    let now = trustbroker::store::now();
    let statements = [
        "INSERT INTO groups (id, provider, external_id, name, created_at, updated_at) \
         VALUES ('g-fleet', 'corp', 'fleet', 'fleet', $1, $1)",
        "INSERT INTO users (id, provider, subject, login, email, display_name, created_at, \
         last_sign_in_at) SELECT 'u-' || i, 'corp', 's-' || i, 'user' || i, \
         'user' || i || '@example.org', 'User ' || i, $1, $1 FROM generate_series(1, $2) AS i",
        "INSERT INTO user_groups (user_id, group_id, source, first_seen_at, last_seen_at) \
         SELECT 'u-' || i, 'g-fleet', 'sign-in', $1, $1 FROM generate_series(1, $2) AS i",
        "INSERT INTO enrollments (id, for_user, requested_by, created_at, status, user_id, udid, \
         bound_at) SELECT 'e-' || i, 'user' || i, 'faults', $1, 'active', 'u-' || i, \
         '00008120-' || lpad(to_hex(i), 16, '0'), $1 FROM generate_series(1, $2) AS i",
        "INSERT INTO mdm_devices (udid, enrollment_id, serial_number, product_name, topic, \
         owner_id, owner_bound_at, authenticated_at, updated_at) \
         SELECT '00008120-' || lpad(to_hex(i), 16, '0'), 'e-' || i, 'F' || i, 'iPhone15,2', \
         'com.apple.mgmt.External.faults', 'u-' || i, $1, $1, $1 FROM generate_series(1, $2) AS i",
        "INSERT INTO mdm_enrollments (id, udid, channel, push_token, push_magic, status, \
         push_status, created_at, updated_at) SELECT '00008120-' || lpad(to_hex(i), 16, '0'), \
         '00008120-' || lpad(to_hex(i), 16, '0'), 'device', NULL, 'magic-' || i, 'active', \
         'unknown', $1, $1 FROM generate_series(1, $2) AS i",
    ];
    let mut tx = pool.begin().await.unwrap();
    for sql in statements {
        let mut query = sqlx::query(sql).bind(now);
        if sql.contains("$2") {
            query = query.bind(n);
        }
        query.execute(&mut *tx).await.unwrap();
    }
    tx.commit().await.unwrap();
    sqlx::query("ANALYZE").execute(pool).await.unwrap();
}

async fn count(pool: &sqlx::PgPool, sql: &'static str) -> i64 {
    sqlx::query_scalar(sql).fetch_one(pool).await.unwrap()
}

/// A policy applied through the load balancer to 10,000 devices, and the node serving the
/// fan-out killed with `kill -9` part way. Its claim on the apply runs out and the other node
/// finishes the pass: every device ends with exactly its two commands, none queued twice.
/// Long (a debug build queues 20,000 commands): run by `tests/faults.sh`.
#[tokio::test]
#[ignore = "long: tests/faults.sh runs it"]
async fn a_node_killed_during_a_fleet_fan_out_leaves_every_device_with_exactly_its_commands() {
    let Some(nginx_binary) = peer_env("TRUSTBROKER_TEST_NGINX") else {
        return;
    };
    let Some(pg) = shared_postgres().await else {
        return;
    };
    let (mut cluster, nginx, front) = behind_nginx(&nginx_binary, &pg.url);
    let admin = cluster.admin_key();
    let pool = sqlx::PgPool::connect(&pg.url).await.unwrap();
    let seeding = Instant::now();
    seed_fleet(&pool, FLEET).await;
    let seeded_in = seeding.elapsed();

    let started = Instant::now();
    let applied = front
        .client
        .post(front.url("/api/v1/policies/apply"))
        .bearer_auth(&admin)
        .json(
            &json!({"files": {"fleet.yaml": BASE64.encode(FLEET_POLICY)}, "git_commit": "0fa175"}),
        )
        .send()
        .await
        .unwrap();
    assert!(applied.status().is_success(), "{:?}", applied.text().await);
    let commands = || count(&pool, "SELECT COUNT(*) FROM mdm_commands");
    // Part way: kill the node holding the apply's claim.
    let (victim, queued_at_kill) = loop {
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "the fan-out did not start"
        );
        let queued = commands().await;
        assert!(
            queued < 2 * FLEET,
            "the fan-out finished before the kill; raise FLEET"
        );
        let holder: Option<String> = sqlx::query_scalar(
            "SELECT claimed_by FROM reconcile_requests WHERE claimed_by IS NOT NULL LIMIT 1",
        )
        .fetch_optional(&pool)
        .await
        .unwrap()
        .flatten();
        if queued >= FLEET / 5
            && let Some(i) = holder.as_deref().and_then(|h| cluster.index_of(h))
        {
            break (i, queued);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    cluster.kill(victim);
    let killed_at = started.elapsed();

    // The survivor takes the claim over once it runs out, and finishes.
    let mut resumed_at = None;
    loop {
        let queued = commands().await;
        if resumed_at.is_none() && queued > queued_at_kill {
            resumed_at = Some(started.elapsed());
        }
        let left = count(&pool, "SELECT COUNT(*) FROM reconcile_requests").await;
        if queued >= 2 * FLEET && left == 0 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(600),
            "{queued} of {} commands after 600 s",
            2 * FLEET
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let done_at = started.elapsed();

    // Exactly two commands per device, one of each kind; nothing twice.
    let per_device: Vec<(i64, i64)> = sqlx::query_as(
        "SELECT COUNT(*), COUNT(DISTINCT request_type) FROM mdm_commands GROUP BY enrollment_id",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(per_device.len() as i64, FLEET, "every device got commands");
    assert!(
        per_device.iter().all(|&(n, kinds)| n == 2 && kinds == 2),
        "a device without exactly its two commands"
    );
    assert_eq!(commands().await, 2 * FLEET);
    eprintln!(
        "kill -9 during a {FLEET}-device fan-out: fleet written in {seeded_in:?}; node {victim} \
         killed at {killed_at:?} with {queued_at_kill} of {} commands queued; the other node \
         resumed at {resumed_at:?}; all queued at {done_at:?}; each device exactly 2, none twice",
        2 * FLEET
    );
    pool.close().await;
    drop(nginx);
    cluster.kill(1 - victim);
}

/// What the devices saw during the outage scenario.
#[derive(Default)]
struct Seen {
    ok: usize,
    unavailable: usize,
    other: Vec<u16>,
    slowest: Duration,
    /// When (since the start) each request that failed ended, and each that succeeded.
    last_failure: Option<Duration>,
    first_success_after_failure: Option<Duration>,
}

/// PostgreSQL stopped for 30 s under two nodes behind nginx while devices keep checking in and
/// acknowledging: requests fail fast with 503 (none hangs), the nodes recover without a
/// restart, and every command queued before the outage is delivered and acknowledged once.
/// Long (30 s of outage): run by `tests/faults.sh`.
#[tokio::test]
#[ignore = "long: tests/faults.sh runs it"]
async fn postgres_stopped_for_30_s_under_load_loses_nothing() {
    const DEVICES: usize = 16;
    let outage_for = Duration::from_secs(
        std::env::var("TRUSTBROKER_FAULTS_OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(30),
    );
    let Some(nginx_binary) = peer_env("TRUSTBROKER_TEST_NGINX") else {
        return;
    };
    let Some(pg) = crate::outage::PrivatePostgres::start() else {
        return;
    };
    let (mut cluster, nginx, front) = behind_nginx(&nginx_binary, &pg.url());
    let admin = cluster.admin_key();
    let mut devices = Vec::new();
    for _ in 0..DEVICES {
        let device = Device::enroll(&front, &front.challenge(&admin).await).await;
        device.check_in(&front).await;
        devices.push(Arc::new(device));
    }
    let ids: Vec<&str> = devices.iter().map(|d| d.udid.as_str()).collect();

    // Devices Idle every 100 ms, acknowledge what they get and resend an acknowledgement that
    // failed; each records what it received.
    let started = Instant::now();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let seen = Arc::new(std::sync::Mutex::new(Seen::default()));
    let mut tasks = tokio::task::JoinSet::new();
    for device in &devices {
        let (front, device, stop, seen) =
            (front.clone(), device.clone(), stop.clone(), seen.clone());
        tasks.spawn(async move {
            let mut received = Vec::new();
            let mut unacknowledged: Option<String> = None;
            while !stop.load(Ordering::Relaxed) {
                let sent = Instant::now();
                let (status, command) = match &unacknowledged {
                    Some(uuid) => {
                        device
                            .report(&front, "Acknowledged", Some(uuid), Dictionary::new())
                            .await
                    }
                    None => device.report(&front, "Idle", None, Dictionary::new()).await,
                };
                let took = sent.elapsed();
                {
                    let mut seen = seen.lock().unwrap();
                    seen.slowest = seen.slowest.max(took);
                    match status {
                        StatusCode::OK => {
                            seen.ok += 1;
                            if seen.last_failure.is_some()
                                && seen.first_success_after_failure.is_none()
                            {
                                seen.first_success_after_failure = Some(started.elapsed());
                            }
                        }
                        StatusCode::SERVICE_UNAVAILABLE => {
                            seen.unavailable += 1;
                            seen.last_failure = Some(started.elapsed());
                            seen.first_success_after_failure = None;
                        }
                        other => {
                            seen.other.push(other.as_u16());
                            seen.last_failure = Some(started.elapsed());
                            seen.first_success_after_failure = None;
                        }
                    }
                }
                if status == StatusCode::OK {
                    // An acknowledgement went through; any command is the next one.
                    unacknowledged = command.map(|c| {
                        let (uuid, _) = uuid_and_type(&c);
                        received.push(uuid.clone());
                        uuid
                    });
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            (device.udid.clone(), received, unacknowledged)
        });
    }

    // A command for every device shortly before the outage, so that some are in flight when
    // the database stops.
    tokio::time::sleep(Duration::from_secs(2)).await;
    front.queue_device_information(&admin, &ids).await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert!(pg.stop(), "PostgreSQL stops");
    let stopped_at = started.elapsed();
    // Both nodes say they are not ready, each asked directly (not through nginx).
    let mut probes = tokio::task::JoinSet::new();
    for base in cluster.upstreams() {
        probes.spawn(async move {
            let client = reqwest::Client::new();
            let asked = Instant::now();
            loop {
                let ready = client
                    .get(format!("http://{base}/readyz"))
                    .send()
                    .await
                    .map(|r| r.status());
                if matches!(ready, Ok(StatusCode::SERVICE_UNAVAILABLE)) {
                    return asked.elapsed();
                }
                assert!(
                    asked.elapsed() < Duration::from_secs(5),
                    "{base} still ready: {ready:?}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    let not_ready = probes.join_all().await;
    tokio::time::sleep(outage_for.saturating_sub(started.elapsed() - stopped_at)).await;
    assert!(pg.resume(), "PostgreSQL starts again");
    let resumed_at = started.elapsed();
    tokio::time::sleep(Duration::from_secs(5)).await;
    stop.store(true, Ordering::Relaxed);
    let delivered = tasks.join_all().await;

    let seen = std::mem::take(&mut *seen.lock().unwrap());
    assert!(seen.unavailable > 0, "the outage was seen by the devices");
    assert!(
        seen.other.is_empty(),
        "answers other than 200 and 503: {:?}",
        seen.other
    );
    assert!(
        seen.slowest < Duration::from_secs(8),
        "a request hung for {:?}",
        seen.slowest
    );
    let recovered_at = seen
        .first_success_after_failure
        .expect("requests succeed again after the outage");
    for (udid, received, unacknowledged) in &delivered {
        assert_eq!(received.len(), 1, "{udid} received {received:?}");
        assert!(unacknowledged.is_none(), "{udid} could not acknowledge");
    }
    let pool = sqlx::PgPool::connect(&pg.url()).await.unwrap();
    let acknowledged: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM mdm_commands WHERE status = 'acknowledged' \
         AND request_type = 'DeviceInformation'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    let total: i64 = sqlx::query_scalar(
        "SELECT COUNT(*) FROM mdm_commands WHERE request_type = 'DeviceInformation'",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((acknowledged, total), (DEVICES as i64, DEVICES as i64));
    eprintln!(
        "PostgreSQL stopped {:?} under {DEVICES} devices through nginx: {} requests answered 200, \
         {} answered 503, slowest {:?}; /readyz 503 on both nodes {:?} after the stop; first \
         success {:?} after PostgreSQL started; {DEVICES} commands queued before, each \
         delivered and acknowledged once",
        resumed_at - stopped_at,
        seen.ok,
        seen.unavailable,
        seen.slowest,
        not_ready,
        recovered_at.saturating_sub(resumed_at),
    );
    pool.close().await;
    drop(nginx);
    cluster.kill(0);
    cluster.kill(1);
}
