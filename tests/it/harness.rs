//! Test harness: in-process servers, the real binary as a child process, fresh databases, and
//! where the peers started by `tests/run.sh` are.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use sqlx::Connection;
use tempfile::TempDir;
use trustbroker::config::{Config, ConfigArgs, FileConfig};
use trustbroker::server::{self, RunningServer};

/// True when `tests/run.sh` started the peers; then a missing peer is a failure, not a skip.
pub fn peers_required() -> bool {
    std::env::var("TRUSTBROKER_TEST_PEERS").is_ok_and(|v| v == "1")
}

/// The value of a peer's environment variable. Without `tests/run.sh` (a bare `cargo test`),
/// tests that need a peer are skipped with a message; under it, a missing variable fails.
pub fn peer_env(name: &str) -> Option<String> {
    match std::env::var(name) {
        Ok(v) if !v.is_empty() => Some(v),
        _ if peers_required() => panic!("{name} is not set although TRUSTBROKER_TEST_PEERS=1"),
        _ => {
            eprintln!("skipped: {name} is not set (run the suite with tests/run.sh)");
            None
        }
    }
}

/// A database to run a server or store test on.
pub enum TestDb {
    Sqlite,
    Postgres(PgTestDb),
}

impl TestDb {
    /// The backends to run a conformance test on: SQLite always, PostgreSQL when available.
    pub async fn all() -> Vec<TestDb> {
        let mut dbs = vec![TestDb::Sqlite];
        if let Some(pg) = PgTestDb::create().await {
            dbs.push(TestDb::Postgres(pg));
        }
        dbs
    }

    pub fn database_url(&self) -> Option<String> {
        match self {
            TestDb::Sqlite => None,
            TestDb::Postgres(pg) => Some(pg.url.clone()),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            TestDb::Sqlite => "sqlite",
            TestDb::Postgres(_) => "postgres",
        }
    }
}

/// A fresh PostgreSQL database, dropped (best effort) when the test ends.
pub struct PgTestDb {
    pub url: String,
    admin_url: String,
    name: String,
}

impl PgTestDb {
    pub async fn create() -> Option<PgTestDb> {
        let admin_url = peer_env("TRUSTBROKER_TEST_PG")?;
        let name = format!("tb_test_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .unwrap_or_else(|e| panic!("cannot reach PostgreSQL at {admin_url}: {e}"));
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE");
        let base = admin_url
            .rsplit_once('/')
            .map(|(base, _)| base)
            .expect("TRUSTBROKER_TEST_PG ends in /DATABASE");
        Some(PgTestDb {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        })
    }
}

impl Drop for PgTestDb {
    fn drop(&mut self) {
        // Drop runs outside any runtime; a short-lived thread with its own runtime cleans up.
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let mut conn = sqlx::PgConnection::connect(&admin_url).await.ok()?;
                sqlx::query(sqlx::AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&mut conn)
                .await
                .ok()
            })
        })
        .join();
    }
}

/// A server running in this process on an ephemeral loopback port, with its own data directory.
pub struct TestServer {
    pub server: Option<RunningServer>,
    pub base: String,
    /// The plain-HTTP listener (SCEP clients such as scepclient speak HTTP).
    pub http_base: String,
    pub client: reqwest::Client,
    /// Kept so the directory lives as long as the server.
    _data_dir: TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_on(db: &TestDb) -> TestServer {
        let url = db.database_url();
        Self::start_with(move |args| args.database_url = url).await
    }

    pub async fn start_with(adjust: impl FnOnce(&mut ConfigArgs)) -> TestServer {
        Self::start_configured(adjust, "").await
    }

    /// A server with settings from a configuration file's text (identity providers, say) as
    /// well as from flags.
    pub async fn start_configured(
        adjust: impl FnOnce(&mut ConfigArgs),
        file_toml: &str,
    ) -> TestServer {
        let data_dir = tempfile::tempdir().expect("tempdir");
        let mut args = ConfigArgs {
            data_dir: Some(data_dir.path().to_path_buf()),
            listen: Some("127.0.0.1:0".parse().expect("addr")),
            http_listen: Some("127.0.0.1:0".parse().expect("addr")),
            ..Default::default()
        };
        adjust(&mut args);
        let file: FileConfig = toml::from_str(file_toml).expect("test configuration file");
        let config = Config::merge(args, file).expect("config");
        let server = server::start(config).await.expect("server starts");
        let base = format!("https://{}", server.https_addr);
        let http_base = server
            .http_addr
            .map(|addr| format!("http://{addr}"))
            .unwrap_or_default();
        let client = client_trusting(&server.tls_cert_path);
        TestServer {
            server: Some(server),
            base,
            http_base,
            client,
            _data_dir: data_dir,
        }
    }

    /// A handle on something in front of servers (a load balancer at `base`), for the helpers
    /// that take a `TestServer` (the device simulator, say). It runs nothing itself.
    pub fn front(base: String, client: reqwest::Client) -> TestServer {
        TestServer {
            server: None,
            base,
            http_base: String::new(),
            client,
            _data_dir: tempfile::tempdir().expect("tempdir"),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn store(&self) -> &trustbroker::store::Store {
        &self.server.as_ref().expect("running").store
    }

    /// An admin key with the given scopes, created through the service as the CLI does.
    pub async fn admin_key(&self, name: &str, scopes: &[&str]) -> String {
        let scopes = trustbroker::admin::keys::parse_scopes(scopes).expect("scopes");
        trustbroker::admin::keys::create(self.store(), name, &scopes, "test")
            .await
            .expect("key created")
            .key
    }

    /// A fresh one-time SCEP challenge, made with an admin key holding `scep:challenge`.
    pub async fn challenge(&self, admin: &str) -> String {
        let body: serde_json::Value = self
            .client
            .post(self.url("/api/v1/scep/challenges"))
            .bearer_auth(admin)
            .json(&serde_json::json!({}))
            .send()
            .await
            .expect("request sent")
            .json()
            .await
            .expect("a JSON body");
        body["challenge"].as_str().expect("a challenge").to_owned()
    }

    /// Queues DeviceInformation for `udids` through the admin API (expecting 201); the
    /// commands' UUIDs in the order of `udids`.
    pub async fn queue_device_information(&self, admin: &str, udids: &[&str]) -> Vec<String> {
        let response = self
            .client
            .post(self.url("/api/v1/commands"))
            .bearer_auth(admin)
            .json(&serde_json::json!({"enrollment_ids": udids,
                "command": {"RequestType": "DeviceInformation", "Queries": ["OSVersion"]}}))
            .send()
            .await
            .expect("request sent");
        assert_eq!(response.status(), reqwest::StatusCode::CREATED);
        let body: serde_json::Value = response.json().await.expect("a JSON body");
        body["commands"]
            .as_array()
            .expect("commands")
            .iter()
            .map(|c| c["command_uuid"].as_str().expect("a UUID").to_owned())
            .collect()
    }

    /// GET `path` (with an admin key when given), expecting success; the body as JSON.
    pub async fn get_json(&self, path: &str, key: Option<&str>) -> serde_json::Value {
        let mut request = self.client.get(self.url(path));
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.send().await.expect("request sent");
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().await.expect("a JSON body")
    }

    /// The CA certificate (DER), as SCEP's GetCACert serves it.
    pub async fn ca_der(&self) -> Vec<u8> {
        let response = self
            .client
            .get(self.url("/scep?operation=GetCACert"))
            .send()
            .await
            .expect("request sent");
        response.bytes().await.expect("a body").to_vec()
    }

    /// GET `path` without credentials; the body as text, whatever the status.
    pub async fn get_text(&self, path: &str) -> String {
        let response = self
            .client
            .get(self.url(path))
            .send()
            .await
            .expect("request sent");
        response.text().await.expect("a text body")
    }

    pub async fn stop(mut self) {
        if let Some(server) = self.server.take() {
            server.shutdown().await;
        }
    }
}

/// An HTTPS client that trusts exactly the given (self-signed) certificate.
pub fn client_trusting(cert_path: &Path) -> reqwest::Client {
    let pem = std::fs::read(cert_path).expect("read certificate");
    reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).expect("PEM"))
        .tls_built_in_root_certs(false)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client")
}

/// The `trustbroker` binary run as a child process, as an operator would run it.
pub struct BrokerProcess {
    child: Child,
    pub https_addr: SocketAddr,
    pub fingerprint: String,
    pub cert_path: PathBuf,
    pub stdout: Vec<String>,
}

pub fn binary() -> Command {
    binary_at(Path::new(env!("CARGO_BIN_EXE_trustbroker")))
}

/// A broker binary (this build's or another release's) without the suite's environment.
pub fn binary_at(path: &Path) -> Command {
    let mut cmd = Command::new(path);
    // The suite's own environment must not leak into the child's configuration.
    for (key, _) in std::env::vars() {
        if key.starts_with("TRUSTBROKER_") || key == "DATABASE_URL" {
            cmd.env_remove(key);
        }
    }
    cmd
}

impl BrokerProcess {
    /// Runs `trustbroker serve` with `args` and waits until it prints its banner.
    pub fn serve(args: &[&str], envs: &[(&str, &str)]) -> BrokerProcess {
        Self::serve_with(binary(), args, envs)
    }

    /// `serve` with another binary (`binary_at`), e.g. the previous release.
    pub fn serve_with(mut cmd: Command, args: &[&str], envs: &[(&str, &str)]) -> BrokerProcess {
        cmd.arg("serve")
            .args(args)
            .envs(envs.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd.spawn().expect("spawn trustbroker");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut https_addr = None;
        let mut fingerprint = None;
        let mut cert_path = None;
        // The banner ends with the line that tells how to get an admin key.
        while !seen
            .last()
            .is_some_and(|l: &String| l.trim().starts_with("admin key:"))
        {
            assert!(Instant::now() < deadline, "no banner: {seen:?}");
            let Some(Ok(line)) = lines.next() else {
                let status = child.wait().expect("wait");
                panic!("trustbroker serve exited ({status}) before its banner: {seen:?}");
            };
            if let Some(addr) = line.trim().strip_prefix("https:") {
                https_addr = addr
                    .trim()
                    .trim_start_matches("https://")
                    .parse::<SocketAddr>()
                    .ok();
            }
            if let Some((_, path)) = line.split_once("TLS certificate")
                && let Some((_, path)) = path.split_once(": ")
            {
                cert_path = Some(PathBuf::from(path.trim()));
            }
            if let Some(fp) = line.trim().strip_prefix("TLS SHA-256 fingerprint:") {
                fingerprint = Some(fp.trim().to_string());
            }
            seen.push(line);
        }
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        BrokerProcess {
            child,
            https_addr: https_addr.expect("https address in banner"),
            fingerprint: fingerprint.expect("fingerprint"),
            cert_path: cert_path.expect("certificate path in banner"),
            stdout: seen,
        }
    }

    pub fn base(&self) -> String {
        format!("https://{}", self.https_addr)
    }

    pub fn client(&self) -> reqwest::Client {
        client_trusting(&self.cert_path)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`: the process dies where it stands, nothing drained or released.
    pub fn kill_hard(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits for the exit status. Async, so that the test's own clients keep
    /// running and can answer the server's graceful close (an HTTP/2 GOAWAY and PING).
    pub async fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status();
        assert!(sent.is_ok_and(|s| s.success()), "kill -TERM {pid}");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "no exit within 30 s of SIGTERM");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the binary to completion; returns (success, stdout, stderr).
pub fn run_cli(args: &[&str], envs: &[(&str, &str)]) -> (bool, String, String) {
    let (code, stdout, stderr) = run_binary(binary(), args, envs);
    (code == Some(0), stdout, stderr)
}

/// Runs a binary to its end: exit code (None if killed by a signal), stdout, stderr.
pub fn run_binary(
    mut cmd: Command,
    args: &[&str],
    envs: &[(&str, &str)],
) -> (Option<i32>, String, String) {
    let out = cmd
        .args(args)
        .envs(envs.iter().copied())
        .output()
        .expect("run trustbroker");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The key printed alone on the last line of `admin-key create`.
pub fn created_key(stdout: &str) -> String {
    let key = stdout.lines().last().expect("output").trim().to_string();
    assert!(key.starts_with("tbk_"), "last line is not a key: {stdout}");
    key
}

/// `openssl` in `dir`; its output, failing the test when it fails.
pub fn openssl_in(dir: &std::path::Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
