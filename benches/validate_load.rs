//! Token validation for third-party apps under load: validations per second and latency of
//! `POST /validate/v1/tokens` at a few concurrency levels, over HTTP/1.1 keep-alive on
//! loopback, against a broker running in this process (SQLite in a temporary data directory,
//! the full middleware stack, metrics and logging at `--log`).
//!
//!   cargo bench --bench validate_load -- --concurrency 1,8,32,128 --seconds 10
//!
//! The load generator is hand-written (one request in flight per connection, the request
//! bytes prepared once, responses read by Content-Length) so that the client costs as little
//! as possible of the two cores it shares with the server. Every answer is checked before it
//! counts. `--invalid-percent` mixes in tokens that are refused (each audited within the
//! unauthenticated budget); `--device` asks about a device in each request (a database read).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use base64::Engine;
use clap::Parser;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use trustbroker::config::{Config, ConfigArgs, FileConfig};
use trustbroker::tokens::shared::{IntegrationRequest, TokenRequest};

/// The broker's allocator (src/main.rs, `trustbroker::allocator`): the in-process server is
/// measured as it ships.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
struct Args {
    /// Connections, each with one request in flight, per level.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32,128")]
    concurrency: Vec<usize>,
    /// Seconds measured per level (after one second of warm-up).
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Share of requests carrying a token that is refused.
    #[arg(long, default_value_t = 0)]
    invalid_percent: u32,
    /// Name a device in each request (UDID of no enrolled device: one indexed read).
    #[arg(long)]
    device: bool,
    /// Send `GET /healthz` instead (the same server, middleware and connections; a handler that
    /// does nothing): the stack's own ceiling, to compare validation with.
    #[arg(long)]
    baseline: bool,
    /// The broker's log filter (info is what a deployment runs).
    #[arg(long, default_value = "info")]
    log: String,
    /// Worker threads of the broker's runtime, and of the load generator's.
    #[arg(long, default_value_t = 2)]
    server_threads: usize,
    #[arg(long, default_value_t = 2)]
    client_threads: usize,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

fn main() -> anyhow::Result<()> {
    trustbroker::allocator::pad_glibc_heaps();
    let args = Args::parse();
    trustbroker::telemetry::init_logging(trustbroker::config::LogFormat::Human, &args.log);
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.server_threads)
        .thread_name("broker")
        .enable_all()
        .build()?;
    let client_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads)
        .thread_name("load")
        .enable_all()
        .build()?;
    let data_dir = tempfile::tempdir()?;
    let setup = server_rt.block_on(start(&data_dir, &args))?;
    println!(
        "| connections | validations/s | p50 ms | p99 ms | p99.9 ms | max ms | refused % | \
         broker µs CPU/validation | load generator µs CPU/validation | cores busy |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &connections in &args.concurrency {
        let report = client_rt.block_on(run_level(&setup, &args, connections))?;
        println!(
            "| {connections} | {:.0} | {:.3} | {:.3} | {:.3} | {:.3} | {:.1} | {:.1} | {:.1} | {:.2} |",
            report.per_second,
            report.p50_ms,
            report.p99_ms,
            report.p999_ms,
            report.max_ms,
            report.refused_percent,
            report.broker_us,
            report.load_us,
            report.cores,
        );
    }
    server_rt.block_on(async move {
        setup.server.shutdown().await;
    });
    Ok(())
}

struct Setup {
    server: trustbroker::server::RunningServer,
    addr: std::net::SocketAddr,
    valid: Vec<u8>,
    invalid: Vec<u8>,
}

/// A broker with one integration, two active tokens and one client whose rate is unlimited
/// for the purpose; the two requests, ready to send.
async fn start(data_dir: &tempfile::TempDir, args: &Args) -> anyhow::Result<Setup> {
    let config_args = ConfigArgs {
        data_dir: Some(data_dir.path().to_path_buf()),
        listen: Some("127.0.0.1:0".parse()?),
        http_listen: Some("127.0.0.1:0".parse()?),
        ..Default::default()
    };
    let file: FileConfig = toml::from_str(
        "[tokens]\nvalidations_per_client_per_second = 10000000\n\
         validation_burst = 10000000\n",
    )?;
    let server = trustbroker::server::start(Config::merge(config_args, file)?).await?;
    let addr = server
        .http_addr
        .context("the plain HTTP listener is bound")?;
    let tokens = &server.tokens;
    tokens
        .create_integration(
            IntegrationRequest {
                name: "pingid".into(),
                display_name: None,
                bundle_id: "com.pingidentity.pingid".into(),
                config_key: "PINGID_MDM_TOKEN".into(),
                device_tokens: false,
                overlap_secs: None,
            },
            "bench",
        )
        .await?;
    let mut values = Vec::new();
    for _ in 0..2 {
        let created = tokens
            .create_token("pingid", TokenRequest::default(), "bench")
            .await?;
        values.push(created.value.context("a generated value")?);
    }
    let client = tokens.create_client("pingid", None, "bench").await?;
    let credentials = base64::engine::general_purpose::STANDARD
        .encode(format!("{}:{}", client.client.id, client.client_secret));
    let device = if args.device {
        ", \"device\": \"00008030-001A2C3E0C12802E\""
    } else {
        ""
    };
    let request = |token: &str| {
        let body = format!("{{\"token\": \"{token}\"{device}}}");
        format!(
            "POST /validate/v1/tokens HTTP/1.1\r\nHost: {addr}\r\n\
             Authorization: Basic {credentials}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .into_bytes()
    };
    let valid_token = values.last().context("a token")?;
    if args.baseline {
        let health = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\n\r\n").into_bytes();
        return Ok(Setup {
            valid: health.clone(),
            invalid: health,
            server,
            addr,
        });
    }
    Ok(Setup {
        valid: request(valid_token),
        invalid: request(&format!("{}x", &valid_token[1..])),
        server,
        addr,
    })
}

struct Report {
    per_second: f64,
    /// CPU time per validation of the broker's threads and of the load generator's: what the
    /// rate would be on cores of its own, whatever else the machine was doing.
    broker_us: f64,
    load_us: f64,
    /// Cores this process kept busy.
    cores: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
    max_ms: f64,
    refused_percent: f64,
}

async fn run_level(setup: &Setup, args: &Args, connections: usize) -> anyhow::Result<Report> {
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    let load = Arc::new(Load {
        addr: setup.addr,
        valid: setup.valid.clone(),
        invalid: setup.invalid.clone(),
        invalid_percent: if args.baseline {
            0
        } else {
            args.invalid_percent
        },
        baseline: args.baseline,
        measuring: measuring.clone(),
        stop: stop.clone(),
    });
    for n in 0..connections {
        let load = load.clone();
        tasks.push(tokio::spawn(async move { connection(&load, n).await }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    measuring.store(true, Ordering::Release);
    let started = Instant::now();
    let cpu_before = thread_cpu();
    tokio::time::sleep(Duration::from_secs(args.seconds)).await;
    let cpu_after = thread_cpu();
    stop.store(true, Ordering::Release);
    let elapsed = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut refused = 0usize;
    for task in tasks {
        let (mut own, own_refused) = task.await??;
        latencies.append(&mut own);
        refused += own_refused;
    }
    anyhow::ensure!(!latencies.is_empty(), "no request completed");
    latencies.sort_unstable();
    let at = |q: f64| {
        let i = ((latencies.len() as f64 * q) as usize).min(latencies.len() - 1);
        f64::from(latencies[i]) / 1000.0
    };
    let count = latencies.len() as f64;
    let broker_ns = cpu_after.0.saturating_sub(cpu_before.0) as f64;
    let load_ns = cpu_after.1.saturating_sub(cpu_before.1) as f64;
    Ok(Report {
        per_second: count / elapsed,
        broker_us: broker_ns / 1000.0 / count,
        load_us: load_ns / 1000.0 / count,
        cores: (broker_ns + load_ns) / 1e9 / elapsed,
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        p999_ms: at(0.999),
        max_ms: at(1.0),
        refused_percent: 100.0 * refused as f64 / latencies.len() as f64,
    })
}

/// What every connection of a level sends, and the switches they watch.
struct Load {
    addr: std::net::SocketAddr,
    valid: Vec<u8>,
    invalid: Vec<u8>,
    invalid_percent: u32,
    baseline: bool,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

/// One keep-alive connection sending requests back to back; latencies in microseconds of
/// the measured window, and how many answers were `active: false`.
async fn connection(load: &Load, n: usize) -> anyhow::Result<(Vec<u32>, usize)> {
    let Load {
        addr,
        valid,
        invalid,
        invalid_percent,
        baseline,
        measuring,
        stop,
    } = load;
    let (invalid_percent, baseline) = (*invalid_percent, *baseline);
    let mut stream = TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let mut buffer = vec![0u8; 4096];
    let mut latencies = Vec::with_capacity(1 << 16);
    let mut refused = 0;
    let mut sent: u64 = n as u64;
    while !stop.load(Ordering::Acquire) {
        sent += 1;
        let bad = invalid_percent > 0 && sent % 100 < u64::from(invalid_percent);
        let request = if bad { invalid } else { valid };
        let started = Instant::now();
        stream.write_all(request).await?;
        let active = read_response(&mut stream, &mut buffer).await? || baseline;
        let took = started.elapsed();
        anyhow::ensure!(active != bad, "unexpected answer (active: {active})");
        if measuring.load(Ordering::Acquire) {
            latencies.push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
            refused += usize::from(!active);
        }
    }
    Ok((latencies, refused))
}

/// Reads one response (head, then Content-Length bytes of body); whether it said
/// `"active":true`. Anything but 200 is an error.
async fn read_response(stream: &mut TcpStream, buffer: &mut [u8]) -> anyhow::Result<bool> {
    let mut filled = 0;
    loop {
        let read = stream.read(&mut buffer[filled..]).await?;
        anyhow::ensure!(read > 0, "the server closed the connection");
        filled += read;
        let Some(head_end) = buffer[..filled].windows(4).position(|w| w == b"\r\n\r\n") else {
            anyhow::ensure!(filled < buffer.len(), "response head too long");
            continue;
        };
        let head = std::str::from_utf8(&buffer[..head_end])?;
        anyhow::ensure!(head.starts_with("HTTP/1.1 200"), "{head}");
        let length: usize = head
            .lines()
            .find_map(|line| {
                let (name, value) = line.split_once(':')?;
                name.eq_ignore_ascii_case("content-length")
                    .then(|| value.trim().parse().ok())
                    .flatten()
            })
            .context("no Content-Length")?;
        let total = head_end + 4 + length;
        anyhow::ensure!(total <= buffer.len(), "response too long");
        while filled < total {
            let read = stream.read(&mut buffer[filled..total]).await?;
            anyhow::ensure!(read > 0, "the server closed the connection");
            filled += read;
        }
        let body = &buffer[head_end + 4..total];
        return Ok(body.windows(13).any(|w| w == b"\"active\":true"));
    }
}

/// CPU time (ns) of this process's threads so far: (the broker's, the load generator's). The
/// load generator's threads are named `load`; everything else (the broker's runtime, SQLite's
/// worker threads) counts as the broker.
fn thread_cpu() -> (u64, u64) {
    let mut broker = 0;
    let mut load = 0;
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (0, 0);
    };
    for task in tasks.flatten() {
        let path = task.path();
        let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
        // schedstat: time on CPU (ns), time waiting, timeslices.
        let on_cpu: u64 = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(0);
        if name.trim() == "load" {
            load += on_cpu;
        } else {
            broker += on_cpu;
        }
    }
    (broker, load)
}
