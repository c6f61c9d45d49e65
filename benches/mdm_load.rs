//! Apple MDM load: enrolls N simulated devices against a running broker (SCEP with one-time
//! challenges, Authenticate, TokenUpdate), then measures
//!
//! 1. signed `Idle` connects per second with `wrk`, replaying pre-signed per-device bodies
//!    from a Lua script (so client-side signing costs nothing during the run), at each
//!    connection count; and
//! 2. command round trips per second: one DeviceInformation queued per device, then each
//!    device's `Idle` (which fetches it) and `Acknowledged` (which records the result), both
//!    pre-signed, driven by this program at the given concurrency.
//!
//!   cargo bench --bench mdm_load -- --url http://127.0.0.1:9480 --admin-key KEY --devices 1000
//!
//! `benches/mdm.sh` runs it against SQLite and PostgreSQL at 1,000 and 10,000 devices. Devices
//! share one RSA key (each has its own certificate and enrollment): key generation is not what
//! is measured.
//!
//! With `--fleet-database` (the broker's own database), the devices are not enrolled: they are
//! written straight into it (`common/mdm_fleet.rs`: 100,000 in well under a minute, where SCEP
//! takes over twenty), and the Idle runs cycle over all of them, so that every per-node cache
//! fills; the broker's VmRSS and VmHWM are printed after each run (`benches/mdm.sh` with
//! `BENCH_FLEET=1`).

use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine;
use clap::Parser;
use plist::{Dictionary, Value};
use trustbroker::pki::scep::client::{self, ClientIdentity, Request};
use trustbroker::pki::scep::{CmsSigner, ContentCipher, DigestAlgorithm, MessageType, PkiStatus};

// Shared with the other load generators; not all of it is used here.
#[allow(dead_code)]
#[path = "common/bench_db.rs"]
mod bench_db;
#[path = "common/mdm_fleet.rs"]
mod mdm_fleet;

#[derive(Parser)]
struct Args {
    /// The broker's base URL (plain HTTP listener), e.g. http://127.0.0.1:9480.
    #[arg(long)]
    url: String,
    /// Admin key with scopes scep:challenge and commands:write.
    #[arg(long)]
    admin_key: String,
    #[arg(long, default_value_t = 1000)]
    devices: usize,
    /// wrk connection counts for the Idle test.
    #[arg(long, value_delimiter = ',', default_value = "32,128")]
    connections: Vec<usize>,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Concurrency of the round-trip test.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// The broker's process id, to report its resident memory.
    #[arg(long)]
    server_pid: Option<u32>,
    #[arg(long, default_value = "server")]
    label: String,
    /// Skip the command round trips (Idle runs only).
    #[arg(long)]
    no_round_trips: bool,
    /// Write the devices straight into this database (the broker's: `sqlite:PATH` or a
    /// PostgreSQL URL) instead of enrolling them over SCEP; implies --no-round-trips.
    #[arg(long)]
    fleet_database: Option<String>,
    /// Keep the wrk script and the pre-signed Idle bodies in this directory (to replay them
    /// later, e.g. against a broker under `valgrind --tool=callgrind`).
    #[arg(long)]
    keep_script: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

struct Device {
    udid: String,
    identity: Arc<dyn CmsSigner + Send + Sync>,
}

impl Device {
    fn signed(&self, dict: Dictionary) -> (Vec<u8>, String) {
        let mut body = Vec::new();
        Value::Dictionary(dict)
            .to_writer_xml(&mut body)
            .expect("writing a plist to memory");
        let signature =
            trustbroker::pki::scep::sign_detached(&body, DigestAlgorithm::Sha256, &*self.identity)
                .expect("signing");
        (
            body,
            base64::engine::general_purpose::STANDARD.encode(signature),
        )
    }

    fn report(&self, status: &str, uuid: Option<&str>) -> (Vec<u8>, String) {
        let mut d = Dictionary::new();
        d.insert("UDID".into(), self.udid.clone().into());
        d.insert("Status".into(), status.into());
        if let Some(uuid) = uuid {
            d.insert("CommandUUID".into(), uuid.into());
        }
        self.signed(d)
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .timeout(Duration::from_secs(60))
        .build()?;
    let started = Instant::now();
    let devices = match &args.fleet_database {
        Some(url) => write_fleet(url, args.devices).await?,
        None => enroll_all(&http, &args).await?,
    };
    eprintln!(
        "{} devices enrolled and checked in in {:.1} s",
        devices.len(),
        started.elapsed().as_secs_f64()
    );

    let temporary = tempfile::tempdir()?;
    let dir = match &args.keep_script {
        Some(kept) => {
            std::fs::create_dir_all(kept)?;
            kept.clone()
        }
        None => temporary.path().to_owned(),
    };
    let script = dir.join("idle.lua");
    let started = Instant::now();
    std::fs::write(&script, idle_script(&devices, &dir)?)?;
    eprintln!(
        "Idle bodies signed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    println!(
        "| server | devices | test | connections | requests/s | p50 ms | p99 ms | non-2xx | server RSS MiB | server CPU ms / 1,000 |"
    );
    println!("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|");
    for &connections in &args.connections {
        let cpu_before = cpu_ms(args.server_pid);
        let out = std::process::Command::new("wrk")
            .args([
                "-t2",
                &format!("-c{connections}"),
                &format!("-d{}s", args.duration),
                "--latency",
                "-s",
                script.to_str().unwrap_or_default(),
                &args.url,
            ])
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        anyhow::ensure!(out.status.success(), "wrk failed: {text}");
        let requests = wrk_requests(&text);
        println!(
            "| {} | {} | signed Idle (wrk) | {connections} | {} | {} | {} | {} | {} | {} |",
            args.label,
            devices.len(),
            wrk_field(&text, "Requests/sec:"),
            wrk_field(&text, "50%"),
            wrk_field(&text, "99%"),
            non_2xx(&text),
            rss_mib(args.server_pid),
            per_thousand(cpu_before, cpu_ms(args.server_pid), requests),
        );
        if args.fleet_database.is_some() {
            eprintln!(
                "server memory after {connections} connections: VmRSS {} MiB, VmHWM {} MiB",
                status_mib(args.server_pid, "VmRSS:"),
                status_mib(args.server_pid, "VmHWM:"),
            );
        }
    }
    if !args.no_round_trips && args.fleet_database.is_none() {
        round_trips(&http, &args, &devices).await?;
    }
    Ok(())
}

/// One challenge, SCEP enrollment, Authenticate and TokenUpdate per device, 16 at a time.
async fn enroll_all(http: &reqwest::Client, args: &Args) -> anyhow::Result<Vec<Device>> {
    let ca = http
        .get(format!("{}/scep?operation=GetCACert", args.url))
        .send()
        .await?
        .error_for_status()?
        .bytes()
        .await?
        .to_vec();
    let key = Arc::new(tokio::task::spawn_blocking(|| ClientIdentity::generate(2048)).await??);
    let (ca, next) = (Arc::new(ca), Arc::new(AtomicUsize::new(0)));
    let mut workers = Vec::new();
    for _ in 0..16 {
        let (http, ca, key, next) = (http.clone(), ca.clone(), key.clone(), next.clone());
        let (url, admin, total) = (args.url.clone(), args.admin_key.clone(), args.devices);
        workers.push(tokio::spawn(async move {
            let mut mine = Vec::new();
            while next.fetch_add(1, Ordering::Relaxed) < total {
                mine.push(enroll_one(&http, &url, &admin, &ca, &key).await?);
            }
            anyhow::Ok(mine)
        }));
    }
    let mut devices = Vec::new();
    for worker in workers {
        devices.append(&mut worker.await??);
    }
    Ok(devices)
}

async fn enroll_one(
    http: &reqwest::Client,
    url: &str,
    admin: &str,
    ca: &[u8],
    key: &ClientIdentity,
) -> anyhow::Result<Device> {
    let challenge: serde_json::Value = http
        .post(format!("{url}/api/v1/scep/challenges"))
        .bearer_auth(admin)
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let challenge = challenge["challenge"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let csr = key.csr("device", Some(&challenge), DigestAlgorithm::Sha256)?;
    let txn = uuid::Uuid::new_v4().to_string();
    let request = client::build_request(
        key,
        &Request {
            message_type: MessageType::PkcsReq,
            content: &csr,
            recipient_der: ca,
            cipher: ContentCipher::Aes128Cbc,
            digest: DigestAlgorithm::Sha256,
            transaction_id: &txn,
            sender_nonce: &trustbroker::random::bytes::<16>(),
        },
    )?;
    let reply = http
        .post(format!("{url}/scep?operation=PKIOperation"))
        .body(request)
        .send()
        .await?
        .bytes()
        .await?;
    let outcome = client::open_cert_rep(&reply, key, ca)?;
    anyhow::ensure!(outcome.status == PkiStatus::Success, "SCEP: {outcome:?}");
    let device = Device {
        udid: uuid::Uuid::new_v4().to_string().to_uppercase(),
        identity: Arc::new(key.with_certificate(outcome.certificates[0].clone())),
    };
    let topic = "com.apple.mgmt.External.bench";
    let mut auth = Dictionary::new();
    auth.insert("MessageType".into(), "Authenticate".into());
    auth.insert("UDID".into(), device.udid.clone().into());
    auth.insert("Topic".into(), topic.into());
    let mut token = Dictionary::new();
    token.insert("MessageType".into(), "TokenUpdate".into());
    token.insert("UDID".into(), device.udid.clone().into());
    token.insert("Topic".into(), topic.into());
    token.insert(
        "Token".into(),
        Value::Data(trustbroker::random::bytes::<32>().to_vec()),
    );
    token.insert("PushMagic".into(), uuid::Uuid::new_v4().to_string().into());
    for message in [auth, token] {
        let (body, signature) = device.signed(message);
        put(http, &format!("{url}/mdm/checkin"), body, &signature).await?;
    }
    Ok(device)
}

async fn put(
    http: &reqwest::Client,
    url: &str,
    body: Vec<u8>,
    signature: &str,
) -> anyhow::Result<Vec<u8>> {
    let response = http
        .put(url)
        .header("content-type", "application/x-apple-aspen-mdm-checkin")
        .header("mdm-signature", signature)
        .body(body)
        .send()
        .await?;
    let status = response.status();
    let body = response.bytes().await?;
    anyhow::ensure!(
        status.is_success(),
        "HTTP {status}: {}",
        String::from_utf8_lossy(&body)
    );
    Ok(body.to_vec())
}

/// The fleet written into the broker's database (see `common/mdm_fleet.rs`).
async fn write_fleet(url: &str, count: usize) -> anyhow::Result<Vec<Device>> {
    let database = if url.starts_with("postgres") {
        trustbroker::config::Database::Postgres { url: url.into() }
    } else {
        trustbroker::config::Database::Sqlite {
            path: url
                .trim_start_matches("sqlite://")
                .trim_start_matches("sqlite:")
                .into(),
        }
    };
    let db = bench_db::Db::open(&database).await?;
    let started = Instant::now();
    let fleet = tokio::task::spawn_blocking(move || mdm_fleet::make(count)).await??;
    eprintln!(
        "{count} certificates made in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    mdm_fleet::write(&db, &fleet).await?;
    Ok(fleet
        .into_iter()
        .map(|d| Device {
            udid: d.udid,
            identity: Arc::new(d.identity),
        })
        .collect())
}

/// A wrk script cycling over every device's pre-signed Idle. The bodies and signatures are
/// files in `dir` that the script reads at start (a table literal of 100,000 is too much for
/// wrk's Lua); signed on every core.
fn idle_script(devices: &[Device], dir: &std::path::Path) -> anyhow::Result<String> {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per_thread = devices.len().div_ceil(threads).max(1);
    let signed: Vec<(Vec<u8>, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = devices
            .chunks(per_thread)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|d| d.report("Idle", None))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    });
    anyhow::ensure!(signed.len() == devices.len(), "a signing thread failed");
    let mut bodies = Vec::new();
    let mut signatures = String::new();
    for (body, signature) in &signed {
        anyhow::ensure!(!body.contains(&1u8), "a body holds the separator byte");
        bodies.extend_from_slice(body);
        bodies.push(1);
        let _ = writeln!(signatures, "{signature}");
    }
    let bodies_file = dir.join("bodies");
    let signatures_file = dir.join("signatures");
    std::fs::write(&bodies_file, bodies)?;
    std::fs::write(&signatures_file, signatures)?;
    Ok(format!(
        "local bodies, signatures = {{}}, {{}}\n\
         local f = assert(io.open(\"{}\", \"rb\"))\n\
         for body in f:read(\"*a\"):gmatch(\"([^\\1]+)\\1\") do bodies[#bodies + 1] = body end\n\
         f:close()\n\
         for line in io.lines(\"{}\") do signatures[#signatures + 1] = line end\n\
         local i = math.random(#bodies)\n\
         request = function()\n\
           i = i % #bodies + 1\n\
           return wrk.format(\"PUT\", \"/mdm/connect\", {{[\"Content-Type\"] = \
         \"application/x-apple-aspen-mdm-checkin\", [\"Mdm-Signature\"] = signatures[i]}}, \
         bodies[i])\n\
         end\n",
        bodies_file.display(),
        signatures_file.display()
    ))
}

/// Queue one command per device, then Idle (fetch) and Acknowledged (answer), pre-signed.
async fn round_trips(
    http: &reqwest::Client,
    args: &Args,
    devices: &[Device],
) -> anyhow::Result<()> {
    let ids: Vec<&str> = devices.iter().map(|d| d.udid.as_str()).collect();
    let queued: serde_json::Value = http
        .post(format!("{}/api/v1/commands", args.url))
        .bearer_auth(&args.admin_key)
        .json(&serde_json::json!({"enrollment_ids": ids, "nopush": true,
            "command": {"RequestType": "DeviceInformation", "Queries": ["OSVersion"]}}))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let mut uuids = std::collections::HashMap::new();
    for entry in queued["commands"].as_array().into_iter().flatten() {
        uuids.insert(
            entry["enrollment_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            entry["command_uuid"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        );
    }
    let pairs: Vec<_> = devices
        .iter()
        .map(|d| {
            let uuid = uuids.get(&d.udid).cloned().unwrap_or_default();
            (
                d.report("Idle", None),
                d.report("Acknowledged", Some(&uuid)),
            )
        })
        .collect();
    let pairs = Arc::new(pairs);
    let next = Arc::new(AtomicUsize::new(0));
    let cpu_before = cpu_ms(args.server_pid);
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..args.concurrency {
        let (http, pairs, next) = (http.clone(), pairs.clone(), next.clone());
        let url = format!("{}/mdm/connect", args.url);
        workers.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut failures = 0usize;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(((idle, idle_sig), (ack, ack_sig))) = pairs.get(i) else {
                    break;
                };
                let sent = Instant::now();
                let fetched = put(&http, &url, idle.clone(), idle_sig).await;
                let answered = put(&http, &url, ack.clone(), ack_sig).await;
                match (fetched, answered) {
                    (Ok(command), Ok(_)) if !command.is_empty() => {
                        latencies.push(sent.elapsed());
                    }
                    _ => failures += 1,
                }
            }
            (latencies, failures)
        }));
    }
    let (mut latencies, mut failures) = (Vec::new(), 0);
    for worker in workers {
        let (mut l, f) = worker.await?;
        latencies.append(&mut l);
        failures += f;
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map(|d| format!("{:.2}", d.as_secs_f64() * 1000.0))
            .unwrap_or_default()
    };
    println!(
        "| {} | {} | command round trip (Idle→command, Acknowledged) | {} | {:.0} | {} | {} | {failures} | {} | {} |",
        args.label,
        devices.len(),
        args.concurrency,
        latencies.len() as f64 / elapsed.as_secs_f64(),
        pct(0.5),
        pct(0.99),
        rss_mib(args.server_pid),
        per_thousand(cpu_before, cpu_ms(args.server_pid), latencies.len() as u64),
    );
    Ok(())
}

/// The value after `label` on wrk's output line that starts with it.
fn wrk_field(text: &str, label: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| l.starts_with(label))
        .and_then(|l| l.split_whitespace().nth(1))
        .map(|v| match v.strip_suffix("ms") {
            Some(ms) => ms.to_owned(),
            None => match v.strip_suffix("us") {
                Some(us) => format!("{:.2}", us.parse::<f64>().unwrap_or(0.0) / 1000.0),
                None => match v.strip_suffix('s') {
                    Some(s) if label.ends_with('%') => {
                        format!("{:.0}", s.parse::<f64>().unwrap_or(0.0) * 1000.0)
                    }
                    _ => v.to_owned(),
                },
            },
        })
        .unwrap_or_default()
}

fn non_2xx(text: &str) -> String {
    text.lines()
        .find(|l| l.contains("Non-2xx or 3xx responses:"))
        .and_then(|l| l.split(':').nth(1))
        .map(|v| v.trim().to_owned())
        .unwrap_or_else(|| "0".into())
}

fn rss_mib(pid: Option<u32>) -> String {
    status_mib(pid, "VmRSS:")
}

/// A memory figure of /proc/PID/status (`VmRSS:`, `VmHWM:`) in MiB.
fn status_mib(pid: Option<u32>, field: &str) -> String {
    let Some(pid) = pid else {
        return String::new();
    };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| format!("{:.0}", kb / 1024.0))
        .unwrap_or_default()
}

/// How many requests wrk completed ("N requests in ...").
fn wrk_requests(text: &str) -> u64 {
    text.lines()
        .find(|l| l.contains(" requests in "))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The server's CPU time so far (user + system, from /proc/PID/stat), in milliseconds.
fn cpu_ms(pid: Option<u32>) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // Fields after the command name (which may hold spaces) start at state (field 3).
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // Clock ticks of 10 ms (USER_HZ is 100 on Linux).
    Some((utime + stime) * 10)
}

fn per_thousand(before: Option<u64>, after: Option<u64>, requests: u64) -> String {
    match (before, after) {
        (Some(b), Some(a)) if requests > 0 => {
            format!(
                "{:.0}",
                (a.saturating_sub(b)) as f64 * 1000.0 / requests as f64
            )
        }
        _ => String::new(),
    }
}
