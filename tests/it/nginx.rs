//! Two broker nodes on one PostgreSQL database behind Debian's nginx, which terminates TLS and
//! balances requests round robin: a portal sign-in, SCEP, check-in and the command channel work
//! whichever node answers; a command queued on one node is delivered through the other; a
//! retirement and a token revocation made on one node hold on every node within a second.
//!
//! nginx's access log names the upstream that served each request, so the test can show that
//! both nodes took part in each flow.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use plist::Dictionary;
use reqwest::StatusCode;
use serde_json::{Value as Json, json};

use crate::device::{Device, uuid_and_type};
use crate::harness::{TestDb, TestServer, client_trusting, peer_env, peers_required};
use crate::portal::{Browser, hidden_input, ldap_toml};

/// nginx in front of `upstreams` (host:port of plain-HTTP listeners), on a free loopback port.
pub struct Nginx {
    child: Child,
    dir: tempfile::TempDir,
    pub cert: PathBuf,
}

impl Nginx {
    pub fn start(binary: &str, port: u16, upstreams: &[String]) -> Nginx {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        let cert_path = dir.path().join("cert.pem");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
        let servers: String = upstreams
            .iter()
            .map(|u| format!("    server {u} max_fails=0;\n"))
            .collect();
        let d = dir.path().display();
        // What docs/operations.md recommends, on loopback: TLS ends here, the client's address
        // and certificate travel in headers the nodes trust from this address only.
        let conf = format!(
            "user root;\nworker_processes 1;\nerror_log {d}/error.log;\npid {d}/nginx.pid;\n\
             events {{ worker_connections 512; }}\n\
             http {{\n\
               log_format upstreams '$request_method $uri $status $upstream_addr';\n\
               access_log {d}/access.log upstreams;\n\
               client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
               fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n\
               upstream brokers {{\n{servers}    keepalive 16;\n  }}\n\
               server {{\n\
                 listen 127.0.0.1:{port} ssl http2;\n\
                 ssl_certificate {d}/cert.pem;\n\
                 ssl_certificate_key {d}/key.pem;\n\
                 ssl_verify_client optional_no_ca;\n\
                 client_max_body_size 16m;\n\
                 location / {{\n\
                   proxy_pass http://brokers;\n\
                   proxy_http_version 1.1;\n\
                   proxy_set_header Connection \"\";\n\
                   proxy_set_header Host $host;\n\
                   proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n\
                   proxy_set_header X-Forwarded-Proto https;\n\
                   proxy_set_header X-SSL-Client-Cert $ssl_client_escaped_cert;\n\
                   proxy_connect_timeout 2s;\n\
                   proxy_read_timeout 60s;\n\
                 }}\n\
               }}\n\
             }}\n"
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new(binary)
            .args([
                "-p",
                &d.to_string(),
                "-c",
                "nginx.conf",
                "-g",
                "daemon off;",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start nginx");
        let nginx = Nginx {
            child,
            cert: cert_path,
            dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nginx did not listen: {}",
                nginx.errors()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        nginx
    }

    pub fn errors(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default()
    }

    /// (method, path, status, upstream) of each request so far, oldest first.
    pub fn log(&self) -> Vec<(String, String, u16, String)> {
        std::fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|line| {
                let mut parts = line.split(' ');
                Some((
                    parts.next()?.to_owned(),
                    parts.next()?.to_owned(),
                    parts.next()?.parse().ok()?,
                    parts.next()?.to_owned(),
                ))
            })
            .collect()
    }

    /// The upstreams that served requests to `path` (logged after `from` entries).
    pub fn upstreams_of(&self, path: &str, from: usize) -> std::collections::BTreeSet<String> {
        self.log()
            .into_iter()
            .skip(from)
            .filter(|(_, p, _, _)| p == path)
            .map(|(_, _, _, upstream)| upstream)
            .collect()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A loopback port that is free now and that no other test's `bind(…:0)` can take before the
/// caller binds it: the kernel hands those out from its ephemeral range, so this one comes
/// from the 10,000 ports below it, each handed out once per test process (an nginx port taken
/// by a broker started meanwhile in a parallel test failed the fault test once).
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    let low = ephemeral_low.saturating_sub(10_000).max(10_000);
    let span = ephemeral_low.saturating_sub(low).max(1);
    // Processes started together begin at different places in the span.
    let start = std::process::id() % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let Ok(port) = u16::try_from(low + offset) else {
            continue;
        };
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below the ephemeral range ({low}–{ephemeral_low})");
}

fn http_upstream(server: &TestServer) -> String {
    server.http_base.trim_start_matches("http://").to_owned()
}

async fn admin_post(
    server: &TestServer,
    admin: &str,
    path: &str,
    body: Json,
) -> (StatusCode, Json) {
    let response = server
        .client
        .post(server.url(&format!("/api/v1{path}")))
        .bearer_auth(admin)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = response.status();
    (status, response.json().await.unwrap_or(Json::Null))
}

/// Polls `check` until it holds; how long that took. Fails after `limit`.
async fn within<F, Fut>(limit: Duration, what: &str, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let started = Instant::now();
    loop {
        if check().await {
            return started.elapsed();
        }
        assert!(started.elapsed() < limit, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test]
async fn two_nodes_behind_nginx_serve_any_request_on_either_node() {
    let Some(nginx_binary) = peer_env("TRUSTBROKER_TEST_NGINX") else {
        return;
    };
    let (Some(ldap_url), Some(ldap_ca)) = (
        peer_env("TRUSTBROKER_TEST_LDAP_URL"),
        peer_env("TRUSTBROKER_TEST_LDAP_CA"),
    ) else {
        assert!(!peers_required(), "slapd is required");
        return;
    };
    let Some(db) = TestDb::all()
        .await
        .into_iter()
        .find(|d| d.name() == "postgres")
    else {
        return;
    };
    let port = free_port();
    let public_url = format!("https://127.0.0.1:{port}");
    let keys = tempfile::tempdir().unwrap();
    let config = format!(
        "trusted_proxies = [\"127.0.0.1\"]\n[mdm]\ntrusted_proxies = [\"127.0.0.1\"]\n\
         client_cert_header = \"x-ssl-client-cert\"\n{}",
        ldap_toml(&ldap_url, &ldap_ca, "brokerpw")
    );
    let node = |args: &mut trustbroker::config::ConfigArgs| {
        args.database_url = db.database_url();
        args.secret_key_file = Some(keys.path().join("secret.key"));
        args.public_url = Some(public_url.clone());
    };
    let a = TestServer::start_configured(node, &config).await;
    let b = TestServer::start_configured(node, &config).await;
    let nginx = Nginx::start(&nginx_binary, port, &[http_upstream(&a), http_upstream(&b)]);
    let both: std::collections::BTreeSet<String> = [http_upstream(&a), http_upstream(&b)].into();
    let front = TestServer::front(public_url.clone(), client_trusting(&nginx.cert));
    let admin = a.admin_key("cluster-admin", &["admin"]).await;

    // A person signs in through the portal: the form comes from one node, the sign-in is
    // posted to the other, the profile is downloaded from either.
    let mut browser = Browser::trusting(&std::fs::read(&nginx.cert).unwrap());
    let page = browser.page(&front.url("/enroll")).await;
    let csrf = hidden_input(&page, "csrf");
    let done = browser
        .post_form(
            &front.url("/auth/ldap/ldap"),
            &[("csrf", &csrf), ("login", "alice"), ("password", "alicepw")],
        )
        .await;
    assert_eq!(done.status(), StatusCode::SEE_OTHER, "{}", nginx.errors());
    let page = browser.page(&front.url("/enroll")).await;
    assert!(page.contains("Download enrollment profile"), "{page}");
    let log = nginx.log();
    let portal: std::collections::BTreeSet<String> = log
        .iter()
        .filter(|(_, path, _, _)| path == "/enroll" || path == "/auth/ldap/ldap")
        .map(|(_, _, _, upstream)| upstream.clone())
        .collect();
    assert_eq!(portal, both, "the sign-in crossed nodes: {log:?}");

    // A device enrolls over SCEP and checks in through nginx: both nodes serve it.
    let mark = nginx.log().len();
    let device = Device::enroll(&front, &a.challenge(&admin).await).await;
    device.check_in(&front).await;
    assert_eq!(nginx.upstreams_of("/scep", mark), both);
    assert_eq!(nginx.upstreams_of("/mdm/checkin", mark), both);

    // A command queued on node B reaches the device through either node, and its answer,
    // sent through the other, is recorded once.
    let (status, queued) = admin_post(
        &b,
        &admin,
        "/commands",
        json!({"enrollment_ids": [&device.udid], "command": {"RequestType": "DeviceInformation", "Queries": ["OSVersion"]}}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{queued}");
    let mark = nginx.log().len();
    let command = device.idle(&front).await.expect("the queued command");
    let (uuid, request_type) = uuid_and_type(&command);
    assert_eq!(request_type, "DeviceInformation");
    let (status, next) = device
        .report(&front, "Acknowledged", Some(&uuid), Dictionary::new())
        .await;
    assert_eq!((status, next), (StatusCode::OK, None));
    assert_eq!(nginx.upstreams_of("/mdm/connect", mark), both);
    let history = a
        .get_json(
            &format!("/api/v1/enrollments/{}/commands", device.udid),
            Some(&admin),
        )
        .await;
    assert_eq!(
        history["commands"][0]["status"], "acknowledged",
        "{history}"
    );

    // An app-config token revoked on node A stops validating on both nodes within a second.
    let (status, _) = admin_post(
        &a,
        &admin,
        "/token-integrations",
        json!({"name": "pingid", "display_name": "PingID", "bundle_id": "com.pingidentity.pingid", "config_key": "PINGID_MDM_TOKEN"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, first) = admin_post(
        &a,
        &admin,
        "/token-integrations/pingid/tokens",
        json!({"label": "first"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{first}");
    // A second active token: revoking the first is then no "last token" question.
    let (status, second) = admin_post(
        &a,
        &admin,
        "/token-integrations/pingid/tokens",
        json!({"label": "second"}),
    )
    .await;
    assert_eq!(status, StatusCode::CREATED, "{second}");
    let (_, client) = admin_post(
        &a,
        &admin,
        "/token-integrations/pingid/clients",
        json!({"name": "pingid-backend"}),
    )
    .await;
    let value = first["value"].as_str().unwrap().to_owned();
    let validate = || {
        let (front, client, value) = (&front, &client, &value);
        async move {
            let answer: Json = front
                .client
                .post(front.url("/validate/v1/tokens"))
                .basic_auth(
                    client["id"].as_str().unwrap(),
                    client["client_secret"].as_str(),
                )
                .json(&json!({"token": value}))
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            // None until the node serving this request has loaded the new client.
            answer["active"].as_bool()
        }
    };
    within(
        Duration::from_secs(3),
        "both nodes know the new token",
        || async { validate().await == Some(true) && validate().await == Some(true) },
    )
    .await;
    let (status, body) = admin_post(
        &a,
        &admin,
        &format!(
            "/token-integrations/pingid/tokens/{}/revoke",
            first["id"].as_str().unwrap()
        ),
        json!({}),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(second["id"].is_string());
    let mark = nginx.log().len();
    let took = within(
        Duration::from_secs(1),
        "revocation on both nodes",
        || async { validate().await == Some(false) && validate().await == Some(false) },
    )
    .await;
    assert_eq!(nginx.upstreams_of("/validate/v1/tokens", mark), both);
    eprintln!("token revocation held on both nodes after {took:?}");

    // Retired on node B: the device is refused on both nodes from its next request.
    let response = b
        .client
        .post(b.url(&format!("/api/v1/enrollments/{}/retire", device.udid)))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mark = nginx.log().len();
    let took = within(
        Duration::from_secs(1),
        "retirement on both nodes",
        || async {
            let (first, _) = device.report(&front, "Idle", None, Dictionary::new()).await;
            let (second, _) = device.report(&front, "Idle", None, Dictionary::new()).await;
            first == StatusCode::UNAUTHORIZED && second == StatusCode::UNAUTHORIZED
        },
    )
    .await;
    assert_eq!(nginx.upstreams_of("/mdm/connect", mark), both);
    eprintln!("retirement held on both nodes after {took:?}");

    drop(nginx);
    a.stop().await;
    b.stop().await;
}

/// The nginx configuration the docs show parses with Debian's nginx (`nginx -t`).
#[test]
fn the_documented_nginx_configuration_is_valid() {
    let Some(binary) = peer_env("TRUSTBROKER_TEST_NGINX") else {
        return;
    };
    let docs = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/nginx/trustbroker.conf"),
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["mdm.example.org".to_owned()])
        .unwrap()
        .self_signed(&key)
        .unwrap();
    let site = docs
        .replace(
            "/etc/ssl/trustbroker/fullchain.pem",
            &format!("{d}/cert.pem"),
        )
        .replace("/etc/ssl/trustbroker/privkey.pem", &format!("{d}/key.pem"));
    std::fs::write(dir.path().join("cert.pem"), cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.serialize_pem()).unwrap();
    std::fs::write(
        dir.path().join("nginx.conf"),
        format!(
            "error_log {d}/error.log;\npid {d}/nginx.pid;\nevents {{}}\nhttp {{\n\
             access_log off;\nclient_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/f; uwsgi_temp_path {d}/u; scgi_temp_path {d}/s;\n{site}\n}}\n"
        ),
    )
    .unwrap();
    let out = Command::new(binary)
        .args(["-t", "-p", &d.to_string(), "-c", "nginx.conf"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
