//! Connections are bounded: idle, silent and half-preface clients are closed after their
//! timeout, a full listener refuses new connections at once, and honest devices keep being
//! served throughout; expensive routes refuse the excess with 503 + Retry-After; what a caller
//! with a bad admin key can make us write to the audit log is bounded.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::task::JoinSet;

use crate::device::Device;
use crate::harness::{TestServer, client_trusting};

/// The first 16 of the 24 bytes of the HTTP/2 connection preface.
const HALF_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";
/// The whole preface and an empty SETTINGS frame: an HTTP/2 client that then says nothing.
const PREFACE_AND_SETTINGS: &[u8] =
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00";

fn tls_connector(server: &TestServer) -> tokio_rustls::TlsConnector {
    let path = &server.server.as_ref().expect("running").tls_cert_path;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(path).expect("PEM") {
        roots.add(cert.expect("certificate")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

fn addr_of(base: &str) -> String {
    base.trim_start_matches("https://")
        .trim_start_matches("http://")
        .to_string()
}

/// Reads until the server closes the connection; when that happened.
async fn closed_at(mut stream: impl AsyncRead + Unpin) -> Instant {
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf).await {
            Ok(0) | Err(_) => return Instant::now(),
            Ok(_) => {}
        }
    }
}

/// A fresh client (so a fresh connection) and GET /healthz: the status and how long it took.
async fn healthz(server: &TestServer, base: &str) -> (StatusCode, Duration) {
    let client = client_trusting(&server.server.as_ref().expect("running").tls_cert_path);
    let started = Instant::now();
    let status = client
        .get(format!("{base}/healthz"))
        .send()
        .await
        .map(|r| r.status())
        .unwrap_or(StatusCode::BAD_GATEWAY);
    (status, started.elapsed())
}

fn resident_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_idle_connections_leave_honest_devices_served_and_are_closed() {
    const TIMEOUT_SECS: u64 = 8;
    let server = TestServer::start_configured(
        |_| {},
        &format!(
            "[server]\nmax_connections = 5000\nhandshake_timeout_secs = {TIMEOUT_SECS}\n\
             first_request_timeout_secs = {TIMEOUT_SECS}\nidle_timeout_secs = {TIMEOUT_SECS}\n"
        ),
    )
    .await;
    let admin = server.admin_key("conn-admin", &["admin"]).await;
    let device = Device::enroll(&server, &server.challenge(&admin).await).await;
    let https = addr_of(&server.base);
    let http = addr_of(&server.http_base);
    let connector = tls_connector(&server);
    let rss_before = resident_kib();

    // (kind, count): silent TCP on both listeners, half a preface in clear and over TLS, TLS
    // then silence, and an HTTP/2 client that sends its preface and SETTINGS and then nothing.
    let kinds: [(&str, usize); 6] = [
        ("https-silent", 500),
        ("http-silent", 300),
        ("http-half-preface", 300),
        ("tls-idle", 400),
        ("tls-half-preface", 300),
        ("http2-preface-then-idle", 200),
    ];
    let opening = Instant::now();
    let closed: Arc<Mutex<Vec<(&'static str, Instant)>>> = Arc::default();
    let mut opened = JoinSet::new();
    let mut watchers = JoinSet::new();
    // Opened 200 at a time: a burst larger than the listen backlog would leave some waiting
    // in the kernel for SYN retransmissions, which is not what this test is about.
    let openers = Arc::new(tokio::sync::Semaphore::new(200));
    for (kind, count) in kinds {
        for _ in 0..count {
            let (https, http, connector) = (https.clone(), http.clone(), connector.clone());
            let openers = openers.clone();
            opened.spawn(async move {
                let _opening = openers.acquire_owned().await.expect("semaphore");
                let target = if kind.starts_with("https") || kind.starts_with("tls") {
                    https
                } else {
                    http
                };
                let mut tcp = TcpStream::connect(&target).await.expect("connect");
                let stream: Box<dyn AsyncRead + Unpin + Send> = match kind {
                    "https-silent" | "http-silent" => Box::new(tcp),
                    "http-half-preface" => {
                        tcp.write_all(HALF_PREFACE).await.expect("write");
                        Box::new(tcp)
                    }
                    "http2-preface-then-idle" => {
                        tcp.write_all(PREFACE_AND_SETTINGS).await.expect("write");
                        Box::new(tcp)
                    }
                    _ => {
                        let name = ServerName::try_from("localhost").expect("name");
                        let mut tls = connector.connect(name, tcp).await.expect("handshake");
                        if kind == "tls-half-preface" {
                            tls.write_all(HALF_PREFACE).await.expect("write");
                            tls.flush().await.expect("flush");
                        }
                        Box::new(tls)
                    }
                };
                (kind, stream)
            });
        }
    }
    while let Some(done) = opened.join_next().await {
        let (kind, stream) = done.expect("opened");
        let closed = closed.clone();
        watchers.spawn(async move {
            let at = closed_at(stream).await;
            closed.lock().expect("lock").push((kind, at));
        });
    }
    let open_took = opening.elapsed();
    let rss_open = resident_kib();

    // While they are all open, honest clients are served on both listeners.
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        for base in [&server.base, &server.http_base] {
            let (status, took) = healthz(&server, base).await;
            assert_eq!(status, StatusCode::OK, "/healthz on {base}");
            slowest = slowest.max(took);
        }
    }
    device.check_in(&server).await;
    assert!(device.idle(&server).await.is_none(), "no command queued");
    let honest_done = opening.elapsed();
    let closed_early = closed.lock().expect("lock").len();
    eprintln!(
        "2000 idle connections opened in {open_took:?}; honest requests done at {honest_done:?} \
         (slowest /healthz {slowest:?}); RSS {rss_before} KiB before, {rss_open} KiB with them open"
    );
    assert!(
        slowest < Duration::from_secs(1),
        "/healthz took {slowest:?} with idle connections open"
    );
    if honest_done < Duration::from_secs(TIMEOUT_SECS - 1) {
        assert_eq!(
            closed_early, 0,
            "connections were closed before their timeout"
        );
    }

    // Every one of them is closed by the server once its timeout has passed (plus the grace an
    // HTTP/2 peer gets to answer the GOAWAY), without the client doing anything.
    let bound = Duration::from_secs(TIMEOUT_SECS + 20);
    let all_closed = tokio::time::timeout(bound, async {
        while watchers.join_next().await.is_some() {}
    })
    .await;
    let closed = closed.lock().expect("lock").clone();
    let mut by_kind = std::collections::BTreeMap::<&str, (usize, Duration)>::new();
    for (kind, at) in &closed {
        let entry = by_kind.entry(kind).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(at.duration_since(opening));
    }
    eprintln!("closed by the server (count, latest after opening): {by_kind:?}");
    assert!(
        all_closed.is_ok(),
        "only {} of 2000 idle connections were closed within {bound:?}: {by_kind:?}",
        closed.len()
    );
    // And the server still serves.
    assert_eq!(healthz(&server, &server.base).await.0, StatusCode::OK);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_listener_refuses_new_connections_at_once_and_recovers() {
    const MAX: usize = 50;
    let server = TestServer::start_configured(
        |_| {},
        &format!("[server]\nmax_connections = {MAX}\nhandshake_timeout_secs = 60\n"),
    )
    .await;
    let https = addr_of(&server.base);
    // Fill the HTTPS listener with silent connections (TLS handshakes that never start).
    let mut holders = Vec::new();
    for _ in 0..MAX {
        holders.push(TcpStream::connect(&https).await.expect("connect"));
    }
    // Each further connection is closed at once, with no byte of TLS sent back: accepted in
    // order, so these come after the holders.
    let started = Instant::now();
    const EXTRA: usize = 500;
    let mut refused = JoinSet::new();
    for _ in 0..EXTRA {
        let https = https.clone();
        refused.spawn(async move {
            let mut tcp = TcpStream::connect(&https).await.expect("connect");
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => true,
                Ok(Ok(_)) | Err(_) => false,
            }
        });
    }
    let mut closed_at_once = 0;
    while let Some(done) = refused.join_next().await {
        closed_at_once += usize::from(done.expect("task"));
    }
    let took = started.elapsed();
    eprintln!("{EXTRA} connections over the limit refused in {took:?}");
    assert_eq!(closed_at_once, EXTRA, "every extra connection is closed");

    // The plain HTTP listener has its own limit: it answers, and counts the refusals.
    let metrics = server
        .client
        .get(format!("{}/metrics", server.http_base))
        .send()
        .await
        .expect("metrics over plain HTTP")
        .text()
        .await
        .expect("text");
    let refusals: f64 = metrics
        .lines()
        .find(|l| l.starts_with("trustbroker_connections_refused_total") && l.contains("\"https\""))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    assert!(refusals >= EXTRA as f64, "refusals counted: {refusals}");

    // When the holders go, HTTPS serves again.
    drop(holders);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if healthz(&server, &server.base).await.0 == StatusCode::OK {
            break;
        }
        assert!(Instant::now() < deadline, "HTTPS did not recover");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
}

/// Sends a request's head and a little of its body, then holds it: the handler waits for the
/// rest with its group's permit taken.
async fn hold_request(http: &str, method: &str, path: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(http).await.expect("connect");
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: \
         application/x-www-form-urlencoded\r\nContent-Length: 100000\r\n\r\nabc"
    );
    tcp.write_all(head.as_bytes()).await.expect("write");
    tcp
}

async fn probe(server: &TestServer, method: &str, path: &str) -> reqwest::Response {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    server
        .client
        .request(method, format!("{}{path}", server.http_base))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("garbage")
        .send()
        .await
        .expect("request sent")
}

#[tokio::test]
async fn capped_routes_refuse_the_excess_with_503_and_retry_after() {
    let server = TestServer::start_configured(
        |_| {},
        "[limits]\nscep = 1\nmdm = 1\nsaml_acs = 1\nldap_sign_in = 1\nretry_after_secs = 7\n",
    )
    .await;
    let http = addr_of(&server.http_base);
    // (held, probed): a request held open, and requests of the same group that it blocks.
    let scep = ("POST", "/scep?operation=PKIOperation");
    let checkin = ("PUT", "/mdm/checkin");
    for ((hold_method, hold_path), probes) in [
        (
            scep,
            vec![scep, ("GET", "/scep?operation=PKIOperation&message=AAAA")],
        ),
        (checkin, vec![checkin, ("PUT", "/mdm/connect")]),
        (
            ("POST", "/auth/ldap/corp"),
            vec![("POST", "/auth/ldap/corp")],
        ),
        (
            ("POST", "/auth/saml/corp/acs"),
            vec![("POST", "/auth/saml/corp/acs")],
        ),
    ] {
        let held = hold_request(&http, hold_method, hold_path).await;
        let (method, path) = probes[0];
        // The held request has its permit once a probe is refused.
        let deadline = Instant::now() + Duration::from_secs(10);
        let refused = loop {
            let response = probe(&server, method, path).await;
            if response.status() == StatusCode::SERVICE_UNAVAILABLE {
                break response;
            }
            assert!(
                Instant::now() < deadline,
                "{method} {path}: never refused while a request holds the only permit (got {})",
                response.status()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(
            refused
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
            Some("7"),
            "{method} {path}"
        );
        let body: serde_json::Value = refused.json().await.expect("JSON error");
        assert_eq!(body["error"]["code"], "unavailable");
        for (other_method, other_path) in &probes[1..] {
            let response = probe(&server, other_method, other_path).await;
            assert_eq!(
                response.status(),
                StatusCode::SERVICE_UNAVAILABLE,
                "{other_method} {other_path}: same group"
            );
        }
        // Everything else answers meanwhile, the cheap SCEP reads included.
        assert_eq!(healthz(&server, &server.base).await.0, StatusCode::OK);
        let ca = server
            .client
            .get(server.url("/scep?operation=GetCACert"))
            .send()
            .await
            .expect("GetCACert");
        assert_eq!(ca.status(), StatusCode::OK);
        // The permit comes back when the held request goes.
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(10);
        while probe(&server, method, path).await.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert!(
                Instant::now() < deadline,
                "{method} {path}: permit never returned"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn a_capped_request_waits_in_line_and_is_served_when_a_permit_frees() {
    let server = TestServer::start_configured(|_| {}, "[limits]\nmdm = 1\nwait_ms = 10000\n").await;
    let http = addr_of(&server.http_base);
    let held = hold_request(&http, "PUT", "/mdm/checkin").await;
    // A probe still unanswered after 300 ms is waiting behind the held request (before the held
    // request has its permit, a probe is answered at once: 4xx for its garbage body).
    let deadline = Instant::now() + Duration::from_secs(10);
    let waiting = loop {
        let server_client = server.client.clone();
        let url = format!("{}/mdm/checkin", server.http_base);
        let mut waiter = tokio::spawn(async move {
            server_client
                .put(url)
                .body("garbage")
                .send()
                .await
                .map(|r| r.status())
        });
        if tokio::time::timeout(Duration::from_millis(300), &mut waiter)
            .await
            .is_err()
        {
            break waiter;
        }
        assert!(
            Instant::now() < deadline,
            "the held request never took the permit"
        );
    };
    drop(held);
    let status = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("answered once the permit came back")
        .expect("task")
        .expect("response");
    assert_ne!(status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        status.is_client_error(),
        "its garbage body refused: {status}"
    );
    server.stop().await;
}

#[tokio::test]
async fn refused_admin_keys_write_bounded_audit_records() {
    let server = TestServer::start_configured(
        |_| {},
        "[limits]\nunauthenticated_audit_per_minute = 10\n\
         unauthenticated_audit_per_source_per_minute = 3\n",
    )
    .await;
    let auditor = server.admin_key("auditor", &["audit:read"]).await;
    let long_name = "a".repeat(5000);
    for _ in 0..12 {
        let response = server
            .client
            .delete(server.url(&format!("/api/v1/admin-keys/{long_name}")))
            .bearer_auth("tbk_0123456789ab_not-a-real-secret")
            .header("x-request-id", "r".repeat(1000))
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    }
    let log = server
        .get_json("/api/v1/audit?outcome=denied", Some(&auditor))
        .await;
    let entries = log["entries"].as_array().expect("entries");
    assert_eq!(
        entries.len(),
        3,
        "one source gets 3 records a minute: {log:#}"
    );
    for entry in entries {
        let action = entry["action"].as_str().expect("action");
        assert!(
            action.starts_with("DELETE /api/v1/admin-keys/aaa"),
            "{action}"
        );
        assert!(action.len() <= 256, "action of {} bytes", action.len());
        assert!(action.ends_with('…'), "marked as cut: {action}");
        let request_id = entry["request_id"].as_str().expect("request id");
        assert!(
            request_id.len() <= 256,
            "request id of {} bytes",
            request_id.len()
        );
    }
    server.stop().await;
}

/// An HTTP/2 GET of `path` on stream 1 (HPACK: static-table method and scheme, literal path and
/// authority), ending the stream.
fn h2_get(path: &str) -> Vec<u8> {
    let mut block = vec![0x82, 0x86, 0x44, u8::try_from(path.len()).expect("short")];
    block.extend_from_slice(path.as_bytes());
    block.extend_from_slice(&[0x41, 9]);
    block.extend_from_slice(b"localhost");
    let len = u32::try_from(block.len()).expect("short").to_be_bytes();
    // HEADERS, END_STREAM | END_HEADERS, stream 1.
    let mut frame = vec![len[1], len[2], len[3], 0x01, 0x05, 0, 0, 0, 1];
    frame.extend_from_slice(&block);
    frame
}

#[tokio::test]
async fn idle_connections_close_after_their_last_request_and_busy_ones_stay() {
    const IDLE_SECS: u64 = 2;
    // Keep-alive PINGs far apart: what closes the idle HTTP/2 connection is the idle timeout.
    let server = TestServer::start_configured(
        |_| {},
        &format!(
            "[server]\nidle_timeout_secs = {IDLE_SECS}\nfirst_request_timeout_secs = {IDLE_SECS}\n\
             http2_keep_alive_interval_secs = 3600\n"
        ),
    )
    .await;
    let http = addr_of(&server.http_base);
    let bound = Duration::from_secs(IDLE_SECS + 15);

    // HTTP/1 keep-alive: answered, then closed once idle.
    let mut h1 = TcpStream::connect(&http).await.expect("connect");
    h1.write_all(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .expect("write");
    let mut buf = [0u8; 1024];
    let n = h1.read(&mut buf).await.expect("response");
    assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", &buf[..n]);
    tokio::time::timeout(bound, closed_at(h1))
        .await
        .expect("idle HTTP/1 connection closed");

    // HTTP/2: one request answered, then the connection idles and is closed (GOAWAY, and
    // dropped when the peer does not answer the shutdown PING).
    let mut h2 = TcpStream::connect(&http).await.expect("connect");
    h2.write_all(PREFACE_AND_SETTINGS).await.expect("preface");
    h2.write_all(&h2_get("/healthz")).await.expect("request");
    let started = Instant::now();
    let mut received = Vec::new();
    let closed = tokio::time::timeout(bound, async {
        loop {
            match h2.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "idle HTTP/2 connection still open after {bound:?}"
    );
    assert!(
        received.windows(2).any(|w| w == b"ok"),
        "the request was answered before the close"
    );
    eprintln!(
        "idle HTTP/2 connection closed {:?} after its request",
        started.elapsed()
    );

    // A request in flight longer than the idle timeout and the 5 s close grace together (a slow
    // upload) is not cut off.
    let mut busy = TcpStream::connect(&http).await.expect("connect");
    busy.write_all(
        b"POST /scep?operation=PKIOperation HTTP/1.1\r\nHost: localhost\r\nContent-Length: 6\r\n\r\nabc",
    )
    .await
    .expect("head");
    tokio::time::sleep(Duration::from_secs(IDLE_SECS + 7)).await;
    busy.write_all(b"def").await.expect("the rest of the body");
    let n = busy.read(&mut buf).await.expect("response");
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 400"),
        "the slow request got its answer: {:?}",
        String::from_utf8_lossy(&buf[..n])
    );
    server.stop().await;
}
