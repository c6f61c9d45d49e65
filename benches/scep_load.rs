//! SCEP issuance load generator: drives PKCSReq enrollments against any SCEP server and reports
//! issuance per second and latency percentiles per concurrency level. Keys and signed,
//! enveloped requests are generated before the clock starts, so the figures are the server's.
//!
//!   cargo bench --bench scep_load -- --url http://127.0.0.1:9080/scep --admin-key KEY
//!   cargo bench --bench scep_load -- --url http://127.0.0.1:2016/scep --challenge secret
//!
//! With `--admin-key`, every request redeems its own one-time challenge minted through the
//! admin API at the same origin (trustbroker); with `--challenge`, all share a static one
//! (trustbroker's optional static challenge, or micromdm's scepserver). `benches/scep.sh` runs
//! the whole side-by-side comparison. Every reply is parsed and its signature verified; a
//! request counts as issued only on a signed CertRep SUCCESS from the server's certificate.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use clap::Parser;
use trustbroker::pki::scep::client::{ClientIdentity, Request, build_request};
use trustbroker::pki::scep::{
    self, ContentCipher, DigestAlgorithm, MessageType, PkiStatus, parse_degenerate_certificates,
};

#[derive(Parser)]
struct Args {
    /// The SCEP endpoint, e.g. http://127.0.0.1:9080/scep.
    #[arg(long)]
    url: String,
    /// Admin key with scope scep:challenge: one one-time challenge per request.
    #[arg(long, conflicts_with = "challenge")]
    admin_key: Option<String>,
    /// A static challenge shared by every request.
    #[arg(long)]
    challenge: Option<String>,
    /// Concurrency levels, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32")]
    concurrency: Vec<usize>,
    /// Requests per concurrency level.
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Distinct client keys to pre-generate (requests reuse them round-robin).
    #[arg(long, default_value_t = 32)]
    keys: usize,
    /// Envelope cipher: aes256, aes128, des3 or des (micromdm's scepserver needs des3 or des).
    #[arg(long, default_value = "aes256")]
    cipher: String,
    /// Label for the result rows.
    #[arg(long, default_value = "server")]
    label: String,
    /// The server's process ID, when it runs on this machine: its CPU time (user + system,
    /// from /proc) per issued certificate is reported for each level.
    #[arg(long)]
    server_pid: Option<u32>,
    /// The command name of a database server on this machine (`postgres`): the CPU time of
    /// all its processes (and of children that exited meanwhile) per issued certificate is
    /// reported with the load generator's own, for where an issuance's CPU goes.
    #[arg(long)]
    database_process: Option<String>,
    /// Writes each request's start (ms after the level started) and latency (ms) to
    /// FILE-LEVEL.csv, to see when the slow ones happened.
    #[arg(long)]
    timeline: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

struct Outcome {
    /// When the request was sent, after the level started.
    sent: Duration,
    latency: Duration,
    error: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.admin_key.is_some() || args.challenge.is_some(),
        "pass --admin-key (one-time challenges) or --challenge (a static one)"
    );
    let cipher = match args.cipher.as_str() {
        "aes256" => ContentCipher::Aes256Cbc,
        "aes128" => ContentCipher::Aes128Cbc,
        "des3" => ContentCipher::DesEde3Cbc,
        "des" => ContentCipher::DesCbc,
        other => anyhow::bail!("unknown cipher {other}"),
    };
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(256)
        .timeout(Duration::from_secs(30))
        .build()?;
    let recipient = recipient_certificate(&http, &args.url).await?;

    let started = Instant::now();
    let identities = generate_identities(args.keys).await?;
    eprintln!(
        "{} client keys (RSA-2048) in {:.1} s",
        identities.len(),
        started.elapsed().as_secs_f64()
    );

    println!(
        "| server | concurrency | requests | issued | failed | issuances/s | p50 ms | p99 ms | max ms | server CPU ms/issuance |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &concurrency in &args.concurrency {
        let challenges = challenges(&http, &args, args.requests).await?;
        let requests = build_requests(&identities, &recipient, cipher, challenges).await?;
        let server_before = args.server_pid.and_then(cpu_seconds);
        let client_before = cpu_seconds(std::process::id());
        let database_before = args.database_process.as_deref().map(cpu_seconds_named);
        let (outcomes, elapsed) = run(&http, &args.url, requests, concurrency).await;
        let server_cpu = args
            .server_pid
            .and_then(cpu_seconds)
            .zip(server_before)
            .map(|(after, before)| after - before);
        let client_cpu = cpu_seconds(std::process::id())
            .zip(client_before)
            .map(|(after, before)| after - before);
        let database_cpu = args
            .database_process
            .as_deref()
            .map(cpu_seconds_named)
            .zip(database_before)
            .map(|(after, before)| after - before);
        report(&args.label, concurrency, &outcomes, elapsed, server_cpu);
        if let Some(prefix) = &args.timeline {
            write_timeline(&format!("{prefix}-{concurrency}.csv"), &outcomes)?;
        }
        let per_request = |cpu: f64| cpu * 1000.0 / outcomes.len().max(1) as f64;
        if let Some(cpu) = client_cpu {
            eprintln!(
                "  {} c={concurrency}: load generator CPU {:.2} ms/request",
                args.label,
                per_request(cpu)
            );
        }
        if let (Some(cpu), Some(name)) = (database_cpu, &args.database_process) {
            eprintln!(
                "  {} c={concurrency}: {name} CPU {:.2} ms/request",
                args.label,
                per_request(cpu)
            );
        }
    }
    Ok(())
}

/// User + system CPU time of process `pid` in seconds, from /proc/PID/stat (fields 14 and 15,
/// in USER_HZ ticks: 100 per second on Linux).
fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = stat_ticks(&stat, 2)?;
    Some(ticks as f64 / 100.0)
}

/// The CPU time of every process named `name` (the command name in /proc/PID/stat), with that
/// of its children that exited and were waited for (fields 16 and 17): a database server's
/// backends, counted by their parent once they are gone.
fn cpu_seconds_named(name: &str) -> f64 {
    let Ok(processes) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    // A stat line begins `PID (NAME) STATE`.
    let named = format!(" ({name}) ");
    let ticks: u64 = processes
        .filter_map(|entry| std::fs::read_to_string(entry.ok()?.path().join("stat")).ok())
        .filter(|stat| stat.contains(&named))
        .filter_map(|stat| stat_ticks(&stat, 4))
        .sum();
    ticks as f64 / 100.0
}

/// The sum of the `count` CPU-time fields of a /proc stat line from utime (field 14) on.
fn stat_ticks(stat: &str, count: usize) -> Option<u64> {
    // The command name (field 2) may hold spaces: count from the closing parenthesis.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace()
        .skip(11)
        .take(count)
        .map(|field| field.parse::<u64>().ok())
        .sum()
}

/// The certificate requests are encrypted to: the RA when the server has one, else the CA.
async fn recipient_certificate(http: &reqwest::Client, url: &str) -> anyhow::Result<Vec<u8>> {
    let response = http
        .get(url)
        .query(&[("operation", "GetCACert")])
        .send()
        .await?
        .error_for_status()?;
    let content_type = response
        .headers()
        .get(reqwest::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.bytes().await?.to_vec();
    if content_type.contains("ca-ra-cert") {
        let certificates = parse_degenerate_certificates(&body)?;
        // The RA is the one that is not self-issued.
        return certificates
            .into_iter()
            .find(|der| !self_issued(der))
            .ok_or_else(|| anyhow::anyhow!("GetCACert: CA/RA bag without an RA"));
    }
    Ok(body)
}

fn self_issued(der: &[u8]) -> bool {
    use der::Decode;
    x509_cert::Certificate::from_der(der)
        .map(|c| c.tbs_certificate().issuer() == c.tbs_certificate().subject())
        .unwrap_or(true)
}

async fn generate_identities(count: usize) -> anyhow::Result<Vec<Arc<ClientIdentity>>> {
    let mut tasks = Vec::new();
    for _ in 0..count.max(1) {
        tasks.push(tokio::task::spawn_blocking(|| {
            ClientIdentity::generate(2048)
        }));
    }
    let mut identities = Vec::new();
    for task in tasks {
        identities.push(Arc::new(task.await??));
    }
    Ok(identities)
}

/// One challenge per request: minted one-time challenges, or the static one repeated.
async fn challenges(
    http: &reqwest::Client,
    args: &Args,
    count: usize,
) -> anyhow::Result<Vec<String>> {
    if let Some(fixed) = &args.challenge {
        return Ok(vec![fixed.clone(); count]);
    }
    let key = args.admin_key.as_deref().unwrap_or_default();
    let base = args
        .url
        .rsplit_once('/')
        .map(|(origin, _)| origin)
        .unwrap_or(&args.url);
    let endpoint = format!("{base}/api/v1/scep/challenges");
    let mut out = Vec::with_capacity(count);
    for i in 0..count {
        let body: serde_json::Value = http
            .post(&endpoint)
            .bearer_auth(key)
            .json(&serde_json::json!({ "for_device": format!("bench-{i}") }))
            .send()
            .await?
            .error_for_status()?
            .json()
            .await?;
        let challenge = body["challenge"]
            .as_str()
            .ok_or_else(|| anyhow::anyhow!("challenge response without a challenge: {body}"))?;
        out.push(challenge.to_owned());
    }
    Ok(out)
}

/// Signs and envelopes every request up front, spread over the cores.
async fn build_requests(
    identities: &[Arc<ClientIdentity>],
    recipient: &[u8],
    cipher: ContentCipher,
    challenges: Vec<String>,
) -> anyhow::Result<Vec<Vec<u8>>> {
    let recipient = Arc::new(recipient.to_vec());
    let mut tasks = Vec::new();
    for (i, challenge) in challenges.into_iter().enumerate() {
        let identity = identities[i % identities.len()].clone();
        let recipient = recipient.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            let nonce = trustbroker::random::bytes::<16>();
            let transaction_id = hex::encode(trustbroker::random::bytes::<20>());
            let csr = identity.csr(
                &format!("bench-{i}"),
                Some(&challenge),
                DigestAlgorithm::Sha256,
            )?;
            build_request(
                &identity,
                &Request {
                    message_type: MessageType::PkcsReq,
                    content: &csr,
                    recipient_der: &recipient,
                    cipher,
                    digest: DigestAlgorithm::Sha256,
                    transaction_id: &transaction_id,
                    sender_nonce: &nonce,
                },
            )
        }));
    }
    let mut requests = Vec::with_capacity(tasks.len());
    for task in tasks {
        requests.push(task.await??);
    }
    Ok(requests)
}

async fn run(
    http: &reqwest::Client,
    url: &str,
    requests: Vec<Vec<u8>>,
    concurrency: usize,
) -> (Vec<Outcome>, Duration) {
    let requests = Arc::new(requests);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (http, url, requests, next) =
            (http.clone(), url.to_owned(), requests.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut outcomes = Vec::new();
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(body) = requests.get(i) else { break };
                let sent = Instant::now();
                let error = enroll(&http, &url, body.clone()).await.err();
                outcomes.push(Outcome {
                    sent: sent - started,
                    latency: sent.elapsed(),
                    error,
                });
            }
            outcomes
        }));
    }
    let mut outcomes = Vec::new();
    for worker in workers {
        if let Ok(mut some) = worker.await {
            outcomes.append(&mut some);
        }
    }
    (outcomes, started.elapsed())
}

async fn enroll(http: &reqwest::Client, url: &str, body: Vec<u8>) -> Result<(), String> {
    let response = http
        .post(url)
        .query(&[("operation", "PKIOperation")])
        .header(reqwest::header::CONTENT_TYPE, "application/x-pki-message")
        .body(body)
        .send()
        .await
        .map_err(|e| format!("transport: {e}"))?;
    let status = response.status();
    let bytes = response
        .bytes()
        .await
        .map_err(|e| format!("transport: {e}"))?;
    if !status.is_success() {
        return Err(format!("HTTP {status}"));
    }
    let reply = scep::parse_pki_message(&bytes).map_err(|e| format!("bad CertRep: {e}"))?;
    match reply.pki_status {
        Some(PkiStatus::Success) => Ok(()),
        other => Err(format!("CertRep {other:?} {:?}", reply.fail_info)),
    }
}

fn write_timeline(path: &str, outcomes: &[Outcome]) -> anyhow::Result<()> {
    let mut rows: Vec<&Outcome> = outcomes.iter().collect();
    rows.sort_by_key(|o| o.sent);
    let mut csv = String::from("sent_ms,latency_ms,ok\n");
    for o in rows {
        csv.push_str(&format!(
            "{:.3},{:.3},{}\n",
            o.sent.as_secs_f64() * 1000.0,
            o.latency.as_secs_f64() * 1000.0,
            o.error.is_none()
        ));
    }
    std::fs::write(path, csv)?;
    Ok(())
}

fn report(
    label: &str,
    concurrency: usize,
    outcomes: &[Outcome],
    elapsed: Duration,
    server_cpu: Option<f64>,
) {
    let issued = outcomes.iter().filter(|o| o.error.is_none()).count();
    let failed = outcomes.len() - issued;
    let mut latencies: Vec<Duration> = outcomes.iter().map(|o| o.latency).collect();
    latencies.sort();
    let percentile = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p).ceil() as usize).saturating_sub(1))
            .map(|d| d.as_secs_f64() * 1000.0)
            .unwrap_or(0.0)
    };
    let cpu = server_cpu
        .map(|seconds| format!("{:.2}", seconds * 1000.0 / issued.max(1) as f64))
        .unwrap_or_else(|| "–".into());
    println!(
        "| {label} | {concurrency} | {} | {issued} | {failed} | {:.0} | {:.1} | {:.1} | {:.1} | {cpu} |",
        outcomes.len(),
        issued as f64 / elapsed.as_secs_f64(),
        percentile(0.50),
        percentile(0.99),
        percentile(1.0),
    );
    let mut reasons: Vec<&str> = outcomes.iter().filter_map(|o| o.error.as_deref()).collect();
    reasons.sort();
    reasons.dedup();
    for reason in reasons.iter().take(3) {
        eprintln!("  {label} c={concurrency}: failure: {reason}");
    }
}
