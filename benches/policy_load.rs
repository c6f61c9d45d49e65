//! Group-driven policy at fleet scale: how long the reconciler takes to bring N enrolled
//! devices into a policy, and one person's group change to their device's commands.
//!
//!   cargo bench --bench policy_load -- --devices 100000 [--database-url postgres://…]
//!
//! The broker runs in this process (so its memory is this process's), with a loopback APNs
//! stand-in that counts the pushes it receives. The fleet is written straight into the
//! database with multi-row INSERTs (people, one group, enrollment records, devices, active
//! device channels with push tokens); that is timed apart and is not what is measured. Then:
//!
//! 1. fleet: a policy set is applied over the admin API whose first policy (one inline profile,
//!    one app whose configuration carries `${user.email}`, so resolved per device) targets the
//!    group every person is in: time until all 2·N commands are queued and N pushes received;
//! 2. a second full pass with nothing to do;
//! 3. one person: a sign-in records them in the group the second policy targets; time until
//!    their device's two commands are queued, for `--people` different people.
//!
//! `benches/policy.sh` runs it on SQLite and PostgreSQL at 10,000 and 100,000 devices.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use base64::Engine;
use clap::Parser;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use trustbroker::config::{Config, ConfigArgs, FileConfig};

#[path = "common/bench_db.rs"]
mod bench_db;
use bench_db::{Db, insert};
use trustbroker::identity::{Group, Identity};
use trustbroker::store::TargetScope;

/// The broker's allocator (src/main.rs, `trustbroker::allocator`): the in-process server is
/// measured as it ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Enrolled devices (one person each) to generate.
    #[arg(long, default_value_t = 100_000)]
    devices: usize,
    /// PostgreSQL URL of an empty database; without it, SQLite in a temporary data directory.
    #[arg(long)]
    database_url: Option<String>,
    #[arg(long, default_value = "trustbroker")]
    label: String,
    /// People whose group change is timed one after the other.
    #[arg(long, default_value_t = 20)]
    people: usize,
    /// How long to wait for the fleet's commands and pushes before reporting what arrived.
    #[arg(long, default_value_t = 600)]
    timeout_secs: u64,
    /// Generate channels without push tokens, so that nothing is pushed: the reconciler's
    /// own throughput, without the pushes' database writes competing (a diagnostic).
    #[arg(long)]
    no_push: bool,
    /// The broker's log filter (the reconciler logs each pass at info).
    #[arg(long, default_value = "warn,trustbroker::policy=info")]
    log: String,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

const TOPIC: &str = "com.apple.mgmt.External.bench";
const PROVIDER: &str = "corp";
const FLEET_GROUP: &str = "cn=fleet,ou=groups,dc=example,dc=org";
const PILOT_GROUP: &str = "cn=pilot,ou=groups,dc=example,dc=org";
/// Devices per multi-row INSERT, and per transaction.
const ROWS_PER_INSERT: usize = 500;
const DEVICES_PER_TX: usize = 5_000;
/// Commands each policy queues per device: its profile and its app.
const COMMANDS_PER_POLICY: i64 = 2;

fn fleet_policy() -> String {
    format!(
        r#"name: fleet-baseline
description: passcode and PingID for the whole fleet
targets:
  groups:
    - {{ provider: {PROVIDER}, id: "{FLEET_GROUP}" }}
profiles:
  - name: passcode
    payloads:
      - {{ PayloadType: com.apple.mobiledevice.passwordpolicy, minLength: 8 }}
apps:
  - bundle_id: com.pingidentity.pingid
    itunes_store_id: 1076521545
    configuration:
      user_email: "${{user.email}}"
"#
    )
}

fn pilot_policy() -> String {
    format!(
        r#"name: pilot
description: restrictions and a pilot app for the pilot group
targets:
  groups:
    - {{ provider: {PROVIDER}, id: "{PILOT_GROUP}" }}
profiles:
  - name: restrictions
    payloads:
      - {{ PayloadType: com.apple.applicationaccess, allowAirDrop: false }}
apps:
  - bundle_id: com.example.pilot
    itunes_store_id: 1234567890
    configuration:
      user_login: "${{user.login}}"
"#
    )
}

/// The generated person and device number `i`: what can be derived from `i` is, so that the
/// people of the last part can be found again without keeping the fleet in memory.
struct Member {
    user_id: String,
    enrollment_id: String,
    udid: String,
    subject: String,
    login: String,
    email: String,
    display_name: String,
    serial: String,
    push_token: String,
    push_magic: String,
}

impl Member {
    fn new(i: usize) -> Member {
        let login = format!("user{i:07}");
        Member {
            user_id: uuid::Uuid::new_v4().to_string(),
            enrollment_id: uuid::Uuid::new_v4().to_string(),
            udid: udid(i),
            subject: format!("bench-{i:07}"),
            email: format!("{login}@example.org"),
            display_name: format!("User {i}"),
            serial: format!("BENCH{i:07}"),
            push_token: hex::encode(trustbroker::random::bytes::<32>()),
            push_magic: uuid::Uuid::new_v4().to_string().to_uppercase(),
            login,
        }
    }

    /// Their identity as a sign-in reports it, in `groups`.
    fn identity(i: usize, groups: &[&str]) -> Identity {
        let m = Member::new(i);
        Identity {
            provider: PROVIDER.into(),
            subject: m.subject,
            login: Some(m.login),
            email: Some(m.email),
            display_name: Some(m.display_name),
            groups: groups
                .iter()
                .map(|g| Group {
                    id: (*g).into(),
                    name: (*g).into(),
                })
                .collect(),
        }
    }
}

/// A UDID in the shape of recent iPhones'.
fn udid(i: usize) -> String {
    format!("00008120-{i:016X}")
}

impl Db {
    /// Writes the fleet: N people in one group, each with an active enrollment record, a
    /// device and an active device channel. Returns nothing: nothing is kept.
    async fn generate(&self, devices: usize, push_tokens: bool) -> anyhow::Result<()> {
        let now = trustbroker::store::now();
        let group_id = uuid::Uuid::new_v4().to_string();
        let group = "INSERT INTO groups (id, provider, external_id, name, created_at, updated_at) \
                     VALUES ($1, $2, $3, $3, $4, $4)";
        on_db!(self, |pool| sqlx::query(group)
            .bind(&group_id)
            .bind(PROVIDER)
            .bind(FLEET_GROUP)
            .bind(now)
            .execute(pool)
            .await?
            .rows_affected());
        let mut next = 0;
        while next < devices {
            let end = (next + DEVICES_PER_TX).min(devices);
            let members: Vec<Member> = (next..end).map(Member::new).collect();
            on_db!(self, |pool| {
                let mut tx = pool.begin().await?;
                for chunk in members.chunks(ROWS_PER_INSERT) {
                    let n = chunk.len();
                    let sql = insert(
                        "users (id, provider, subject, login, email, display_name, created_at, \
                         last_sign_in_at)",
                        n,
                        2,
                        5,
                        "(#0, $2, #1, #2, #3, #4, $1, $1)",
                    );
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(now)
                        .bind(PROVIDER);
                    for m in chunk {
                        q = q
                            .bind(&m.user_id)
                            .bind(&m.subject)
                            .bind(&m.login)
                            .bind(&m.email)
                            .bind(&m.display_name);
                    }
                    q.execute(&mut *tx).await?;

                    let sql = insert(
                        "user_groups (user_id, group_id, source, first_seen_at, last_seen_at)",
                        n,
                        2,
                        1,
                        "(#0, $2, 'sign-in', $1, $1)",
                    );
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(now)
                        .bind(&group_id);
                    for m in chunk {
                        q = q.bind(&m.user_id);
                    }
                    q.execute(&mut *tx).await?;

                    let sql = insert(
                        "enrollments (id, for_user, requested_by, created_at, status, user_id, \
                         udid, bound_at)",
                        n,
                        1,
                        4,
                        "(#0, #1, 'bench', $1, 'active', #2, #3, $1)",
                    );
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
                    for m in chunk {
                        q = q
                            .bind(&m.enrollment_id)
                            .bind(&m.login)
                            .bind(&m.user_id)
                            .bind(&m.udid);
                    }
                    q.execute(&mut *tx).await?;

                    let sql = insert(
                        "mdm_devices (udid, enrollment_id, serial_number, product_name, topic, \
                         owner_id, owner_bound_at, authenticated_at, updated_at)",
                        n,
                        2,
                        4,
                        "(#0, #1, #2, 'iPhone15,2', $2, #3, $1, $1, $1)",
                    );
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now).bind(TOPIC);
                    for m in chunk {
                        q = q
                            .bind(&m.udid)
                            .bind(&m.enrollment_id)
                            .bind(&m.serial)
                            .bind(&m.user_id);
                    }
                    q.execute(&mut *tx).await?;

                    let sql = insert(
                        "mdm_enrollments (id, udid, channel, push_token, push_magic, status, \
                         push_status, created_at, updated_at)",
                        n,
                        1,
                        3,
                        "(#0, #0, 'device', #1, #2, 'active', 'unknown', $1, $1)",
                    );
                    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
                    for m in chunk {
                        let token = push_tokens.then_some(&m.push_token);
                        q = q.bind(&m.udid).bind(token).bind(&m.push_magic);
                    }
                    q.execute(&mut *tx).await?;
                }
                tx.commit().await?;
            });
            next = end;
        }
        // The fleet's tables get statistics, as autovacuum would have given them long ago;
        // the ledger and the queue are left as a fresh database has them (never analysed:
        // PostgreSQL estimates from their size). Analysed while empty, they would make the
        // planner cache plans for empty tables (see docs/benchmarks.md).
        self.analyze("users, groups, user_groups, enrollments, mdm_devices, mdm_enrollments")
            .await
    }

    /// ANALYZE on PostgreSQL (this machine's server runs without autovacuum); nothing on
    /// SQLite, which the broker never analyses either.
    async fn analyze(&self, tables: &str) -> anyhow::Result<()> {
        if let Db::Postgres(pool) = self {
            let sql = format!("ANALYZE {tables}");
            sqlx::query(sqlx::AssertSqlSafe(sql)).execute(pool).await?;
        }
        Ok(())
    }
}

/// A loopback stand-in for the APNs provider API: HTTP/2 over TLS that requires a push
/// certificate issued by its own CA, answering every `POST /3/device/{token}` 200 and counting
/// it (only counting: a list of 100,000 pushes would be broker memory in this process).
struct ApnsStandIn {
    url: String,
    ca_file: std::path::PathBuf,
    push_cert_pem: String,
    push_key_pem: String,
    received: Arc<AtomicUsize>,
    _dir: tempfile::TempDir,
}

impl ApnsStandIn {
    async fn start(topic: &str) -> anyhow::Result<ApnsStandIn> {
        let dir = tempfile::tempdir()?;
        let server_key = rcgen::KeyPair::generate()?;
        let server_cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?
            .self_signed(&server_key)?;
        let ca_file = dir.path().join("apns-ca.pem");
        std::fs::write(&ca_file, server_cert.pem())?;
        // The push certificate (RSA, the topic as UID), issued by a CA only the stand-in trusts.
        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::default();
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "Bench Apple Push CA");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_cert = ca_params.clone().self_signed(&ca_key)?;
        let issuer = rcgen::Issuer::new(ca_params, ca_key);
        let pkcs8 = trustbroker::pki::ca::generate_rsa_pkcs8(2048)?;
        let push_key = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &PrivatePkcs8KeyDer::from(pkcs8.clone()),
            &rcgen::PKCS_RSA_SHA256,
        )?;
        let mut push = rcgen::CertificateParams::default();
        push.distinguished_name.push(
            rcgen::DnType::CustomDnType(vec![0, 9, 2342, 19200300, 100, 1, 1]),
            rcgen::DnValue::Utf8String(topic.into()),
        );
        push.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let push_cert = push.signed_by(&push_key, &issuer)?;

        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca_cert.der().clone())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()?;
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![CertificateDer::from(server_cert.der().to_vec())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
            )?;
        tls.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));

        let received = Arc::new(AtomicUsize::new(0));
        let app = Router::new()
            .route("/3/device/{token}", post(receive))
            .with_state(received.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("https://127.0.0.1:{}", listener.local_addr()?.port());
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, app) = (acceptor.clone(), app.clone());
                tokio::spawn(async move {
                    let Ok(stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let _ = auto::Builder::new(TokioExecutor::new())
                        .http2_only()
                        .serve_connection(TokioIo::new(stream), TowerToHyperService::new(app))
                        .await;
                });
            }
        });
        Ok(ApnsStandIn {
            url,
            ca_file,
            push_cert_pem: push_cert.pem(),
            push_key_pem: trustbroker::pki::pem("PRIVATE KEY", &pkcs8),
            received,
            _dir: dir,
        })
    }

    fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }
}

/// Takes the body before answering: a stream answered with its body unread is reset, and h2
/// closes connections that reset too many.
async fn receive(State(received): State<Arc<AtomicUsize>>, body: Bytes) -> StatusCode {
    if !body.is_empty() {
        received.fetch_add(1, Ordering::Relaxed);
    }
    StatusCode::OK
}

/// (VmRSS, VmHWM) of this process in MiB.
fn memory_mib() -> (f64, f64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kb| kb.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Starts the peak (VmHWM) over from the current RSS, so that it covers only what follows.
fn reset_peak_memory() {
    if let Err(e) = std::fs::write("/proc/self/clear_refs", "5") {
        eprintln!("could not reset the peak RSS ({e}); it includes the generation");
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = ((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1);
    sorted.get(rank).copied().unwrap_or(f64::NAN)
}

fn main() -> anyhow::Result<()> {
    trustbroker::allocator::pad_glibc_heaps();
    tokio::runtime::Runtime::new()?.block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        (1..=5_000_000).contains(&args.devices),
        "--devices must be between 1 and 5,000,000"
    );
    // Each person is timed once: a second sign-in with the same groups changes nothing.
    anyhow::ensure!(
        args.people <= args.devices,
        "--people must not exceed --devices"
    );
    trustbroker::telemetry::init_logging(trustbroker::config::LogFormat::Human, &args.log);
    println!(
        "| server | devices | generate s | apply (plan) s | all queued s | devices/s | \
         all pushed s | 2nd pass s | one person p50 ms | p99 ms | RSS MiB start → peak → end |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|");
    let apns = ApnsStandIn::start(TOPIC).await?;
    let data_dir = tempfile::tempdir()?;
    let config_args = ConfigArgs {
        data_dir: Some(data_dir.path().to_path_buf()),
        database_url: args.database_url.clone(),
        listen: Some("127.0.0.1:0".parse()?),
        http_listen: Some("127.0.0.1:0".parse()?),
        apns_url: Some(apns.url.clone()),
        apns_ca_file: Some(apns.ca_file.clone()),
        ..Default::default()
    };
    // The periodic full pass (default every 15 min) would otherwise run into the measurement
    // of a slow run; the start-time one runs before the fleet exists.
    let file: FileConfig = toml::from_str("[policy]\nfull_pass_interval_secs = 86400\n")?;
    let config = Config::merge(config_args, file)?;
    let database = config.database.clone();
    let server = trustbroker::server::start(config).await?;
    let base = format!(
        "http://{}",
        server
            .http_addr
            .context("the plain HTTP listener is bound")?
    );
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3600))
        .build()?;
    let scopes = trustbroker::admin::keys::parse_scopes(&["admin"])?;
    let admin = trustbroker::admin::keys::create(&server.store, "bench", &scopes, "bench")
        .await?
        .key;
    http.put(format!("{base}/api/v1/push-certificate"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"certificate_pem": apns.push_cert_pem,
                                   "key_pem": apns.push_key_pem}))
        .send()
        .await?
        .error_for_status()
        .context("importing the push certificate")?;

    let db = Db::open(&database).await?;
    let n = args.devices;
    let started = Instant::now();
    db.generate(n, !args.no_push).await?;
    let generated = started.elapsed().as_secs_f64();
    eprintln!("{n} devices generated in {generated:.1} s");
    let (rss_start, _) = memory_mib();
    reset_peak_memory();

    // 1. The fleet comes into scope.
    let files = serde_json::json!({
        "fleet-baseline.yaml": base64::engine::general_purpose::STANDARD.encode(fleet_policy()),
        "pilot.yaml": base64::engine::general_purpose::STANDARD.encode(pilot_policy()),
    });
    let target = COMMANDS_PER_POLICY * n as i64;
    let started = Instant::now();
    let applied = http
        .post(format!("{base}/api/v1/policies/apply"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({"files": files}))
        .send()
        .await?;
    let apply_status = applied.status();
    let applied: serde_json::Value = applied.json().await?;
    anyhow::ensure!(
        apply_status == reqwest::StatusCode::CREATED,
        "apply: {apply_status} {applied}"
    );
    let planned = started.elapsed().as_secs_f64();
    eprintln!(
        "applied (plan over {n} devices) in {planned:.2} s: {}",
        applied["plan"]["totals"]
    );
    let deadline = started + Duration::from_secs(args.timeout_secs);
    let mut queued_at = None;
    let mut pushed_at = None;
    let mut last_progress = Instant::now();
    let (mut queued, mut pushed) = (0, 0);
    while (queued_at.is_none() || pushed_at.is_none()) && Instant::now() < deadline {
        if queued_at.is_none() {
            // MAX(seq) is one index probe; COUNT(*) is read only once it can be done.
            queued = db.scalar("SELECT MAX(seq) FROM mdm_commands").await?;
            if queued >= target {
                queued = db.scalar("SELECT COUNT(*) FROM mdm_commands").await?;
                if queued >= target {
                    queued_at = Some(started.elapsed().as_secs_f64());
                }
            }
        }
        pushed = apns.received();
        if pushed_at.is_none() && (pushed >= n || args.no_push) {
            pushed_at = Some(started.elapsed().as_secs_f64());
        }
        if last_progress.elapsed() >= Duration::from_secs(5) {
            last_progress = Instant::now();
            let (rss, peak) = memory_mib();
            eprintln!(
                "  {:>6.1} s: {queued}/{target} commands queued, {pushed}/{n} pushes, \
                 RSS {rss:.0} MiB (peak {peak:.0})",
                started.elapsed().as_secs_f64()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, peak_fleet) = memory_mib();
    let show = |at: Option<f64>, done: i64, of: i64| match at {
        Some(s) => format!("{s:.1}"),
        None => format!("> {} ({done} of {of})", args.timeout_secs),
    };
    let queued_text = show(queued_at, queued, target);
    let pushed_text = show(pushed_at, pushed as i64, n as i64);
    let rate = queued_at.map_or(String::new(), |s| format!("{:.0}", n as f64 / s));
    if queued_at.is_none() || pushed_at.is_none() {
        println!(
            "| {} | {n} | {generated:.1} | {planned:.1} | {queued_text} | {rate} | {pushed_text} \
             | | | | {rss_start:.0} → {peak_fleet:.0} → |",
            args.label
        );
        return Ok(());
    }
    eprintln!("all queued in {queued_text} s, all pushed in {pushed_text} s");

    // 2. A full pass with nothing to do, once the ledger and the queue have statistics (by a
    // periodic pass, 15 minutes later, autovacuum would have analysed them).
    db.analyze("managed_items, managed_item_commands, mdm_commands")
        .await?;
    let started = Instant::now();
    let pass = server
        .reconciler
        .reconcile(TargetScope::All { after: None })
        .await?;
    let second_pass = started.elapsed().as_secs_f64();
    anyhow::ensure!(pass.commands == 0, "the second pass queued {pass:?}");
    eprintln!("second full pass: {second_pass:.2} s, {pass:?}");
    let (_, peak_pass) = memory_mib();
    let pushed_ok = db
        .scalar("SELECT COUNT(*) FROM mdm_enrollments WHERE push_status = 'ok'")
        .await?;
    eprintln!("{pushed_ok} device channels are marked pushed (APNs answered 200)");

    // 3. One person at a time joins the pilot group.
    let mut latencies = Vec::new();
    let mut sign_ins = Vec::new();
    for k in 0..args.people {
        let i = k * n / args.people.max(1);
        let device = udid(i);
        let before = db.commands_of(&device).await?;
        let identity = Member::identity(i, &[FLEET_GROUP, PILOT_GROUP]);
        let started = Instant::now();
        server.store.record_sign_in(&identity, "sign-in").await?;
        sign_ins.push(started.elapsed().as_secs_f64() * 1000.0);
        server.reconciler.wake().wake();
        loop {
            if db.commands_of(&device).await? >= before + COMMANDS_PER_POLICY {
                latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                break;
            }
            anyhow::ensure!(
                started.elapsed() < Duration::from_secs(30),
                "{device}: the pilot's commands were not queued within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let in_order: Vec<String> = latencies.iter().map(|ms| format!("{ms:.0}")).collect();
    eprintln!(
        "one person, every sample in order (ms): {}",
        in_order.join(" ")
    );
    latencies.sort_by(f64::total_cmp);
    sign_ins.sort_by(f64::total_cmp);
    eprintln!(
        "one person: sign-in recorded in p50 {:.1} ms; commands queued p50 {:.1} ms, p99 {:.1} \
         ms, max {:.1} ms over {}",
        percentile(&sign_ins, 0.5),
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or(f64::NAN),
        latencies.len()
    );
    let (rss_end, peak_end) = memory_mib();
    eprintln!(
        "RSS: {rss_start:.0} MiB after generation; peak {peak_fleet:.0} MiB (fleet), \
         {peak_pass:.0} MiB (with the second pass), {peak_end:.0} MiB (end); {rss_end:.0} MiB \
         at the end"
    );
    println!(
        "| {} | {n} | {generated:.1} | {planned:.1} | {queued_text} | {rate} | {pushed_text} | \
         {second_pass:.1} | {:.1} | {:.1} | {rss_start:.0} → {peak_end:.0} → {rss_end:.0} |",
        args.label,
        percentile(&latencies, 0.5),
        percentile(&latencies, 0.99),
    );
    server.shutdown().await;
    Ok(())
}
