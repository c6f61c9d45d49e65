//! PostgreSQL stops under a serving node and starts again: `/readyz` says so at once, requests
//! fail fast with 503 and `Retry-After` (none hangs), liveness stays up, the pool reconnects by
//! itself, and what was queued before the outage is still delivered after it.
//!
//! The test runs a PostgreSQL server of its own (Debian's binaries, a throwaway cluster on a
//! free port) so that stopping it disturbs no other test.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use serde_json::json;

use trustbroker::console::session::seal;

use crate::device::{Device, uuid_and_type};
use crate::harness::{TestServer, peers_required};

pub struct PrivatePostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
}

impl PrivatePostgres {
    /// `None` where it cannot run (no Debian PostgreSQL binaries, not root), which fails the
    /// test where the peers are required.
    pub fn start() -> Option<PrivatePostgres> {
        let started = Self::try_start();
        assert!(
            started.is_some() || !peers_required(),
            "a private PostgreSQL could not start"
        );
        started
    }

    fn try_start() -> Option<PrivatePostgres> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()?;
        let dir = tempfile::tempdir().ok()?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port();
        // initdb refuses root: the cluster belongs to the postgres user.
        if !give_to_postgres(&[dir.path()]) {
            return None;
        }
        let pg = PrivatePostgres { dir, bin, port };
        let data = pg.data();
        assert!(pg.as_postgres(&[
            "initdb",
            "-D",
            &data,
            "-A",
            "trust",
            "-U",
            "postgres",
            "--no-sync"
        ]));
        assert!(pg.resume(), "the private PostgreSQL starts");
        Some(pg)
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn as_postgres(&self, args: &[&str]) -> bool {
        let program = self.bin.join(args[0]);
        Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(program)
            .args(&args[1..])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Turns TLS on (a throwaway self-signed certificate) and replaces the client rules:
    /// TCP from loopback with or without TLS, or only with it (`hostssl`). Applied by a restart
    /// (a reload would take effect some time after `pg_ctl` returns).
    pub fn serve_tls(&self, required: bool) {
        let data = self.dir.path().join("data");
        if !data.join("server.key").exists() {
            crate::harness::openssl_in(
                &data,
                &[
                    "req",
                    "-x509",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-nodes",
                    "-subj",
                    "/CN=localhost",
                    "-days",
                    "1",
                    "-keyout",
                    "server.key",
                    "-out",
                    "server.crt",
                ],
            );
            std::fs::write(data.join("postgresql.auto.conf"), "ssl = on\n").unwrap();
        }
        let tcp = if required { "hostssl" } else { "host" };
        let rules = format!("local all all trust\n{tcp} all all 127.0.0.1/32 trust\n");
        std::fs::write(data.join("pg_hba.conf"), rules).unwrap();
        let files = [
            "server.key",
            "server.crt",
            "postgresql.auto.conf",
            "pg_hba.conf",
        ]
        .map(|file| data.join(file));
        assert!(give_to_postgres(&files.each_ref().map(|f| f.as_path())));
        let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        std::fs::set_permissions(data.join("server.key"), private).unwrap();
        assert!(
            self.stop() && self.resume(),
            "the private PostgreSQL restarts"
        );
    }

    pub fn stop(&self) -> bool {
        self.as_postgres(&["pg_ctl", "-D", &self.data(), "-m", "fast", "-w", "stop"])
    }

    pub fn resume(&self) -> bool {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.dir.path().display()
        );
        self.as_postgres(&[
            "pg_ctl",
            "-D",
            &self.data(),
            "-o",
            &options,
            "-l",
            &format!("{}/log", self.dir.path().display()),
            "-w",
            "start",
        ])
    }
}

/// `chown postgres:postgres` on `paths`: the server runs as that user and reads only its own.
fn give_to_postgres(paths: &[&std::path::Path]) -> bool {
    Command::new("chown")
        .arg("postgres:postgres")
        .args(paths)
        .status()
        .is_ok_and(|s| s.success())
}

impl Drop for PrivatePostgres {
    fn drop(&mut self) {
        self.as_postgres(&["pg_ctl", "-D", &self.data(), "-m", "immediate", "stop"]);
    }
}

const KEY_HEX: &str = "6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f6f";

/// A console page, read with a session sealed here with the server's master key.
async fn console_page(server: &TestServer, path: &str) -> reqwest::Response {
    let key = trustbroker::secrets::MasterKey::parse(KEY_HEX).unwrap();
    let session = crate::console::session(&["*"], 600, 3600);
    let sealed = seal(&key, &session);
    // Under both names: which one counts depends on the server's scheme.
    server
        .client
        .get(server.url(path))
        .header(
            "cookie",
            format!("tb_admin={sealed}; __Host-tb_admin={sealed}"),
        )
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_database_outage_is_503_at_once_and_the_node_recovers_by_itself() {
    let Some(pg) = PrivatePostgres::start() else {
        return;
    };
    let url = pg.url();
    let key_dir = tempfile::tempdir().unwrap();
    let key_file = key_dir.path().join("secret.key");
    std::fs::write(&key_file, KEY_HEX).unwrap();
    let server = TestServer::start_with(move |args| {
        args.database_url = Some(url);
        args.secret_key_file = Some(key_file);
    })
    .await;
    let admin = server.admin_key("ops", &["admin"]).await;
    let device = Device::enroll(&server, &server.challenge(&admin).await).await;
    device.check_in(&server).await;
    let queued: serde_json::Value = server
        .client
        .post(server.url("/api/v1/commands"))
        .bearer_auth(&admin)
        .json(&json!({"enrollment_ids": [&device.udid], "command": {"RequestType": "DeviceInformation", "Queries": ["OSVersion"]}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let uuid = queued["commands"][0]["command_uuid"]
        .as_str()
        .unwrap()
        .to_owned();

    assert!(pg.stop(), "PostgreSQL stops");
    let down = Instant::now();
    // Readiness fails at once; liveness does not.
    let ready = server
        .client
        .get(server.url("/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    let healthy = server
        .client
        .get(server.url("/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(healthy.status(), StatusCode::OK);
    // An admin request and a device's request fail fast, as 503 with Retry-After.
    let started = Instant::now();
    let listed = server
        .client
        .get(server.url("/api/v1/enrollments"))
        .bearer_auth(&admin)
        .send()
        .await
        .unwrap();
    let admin_took = started.elapsed();
    assert_eq!(listed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(listed.headers()["retry-after"], "5");
    let started = Instant::now();
    let (status, _) = device
        .report(&server, "Idle", None, plist::Dictionary::new())
        .await;
    let device_took = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    for took in [admin_took, device_took] {
        assert!(
            took < Duration::from_secs(8),
            "a request during the outage took {took:?}"
        );
    }
    // Meanwhile the node answers at once rather than trying the database on every request.
    let started = Instant::now();
    let (status, _) = device
        .report(&server, "Idle", None, plist::Dictionary::new())
        .await;
    let while_open = started.elapsed();
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    let metrics = server.get_text("/metrics").await;
    assert!(metrics.contains("trustbroker_database_up 0"), "{metrics}");
    // The console shares the breaker and says the same, as a page.
    let console = console_page(&server, "/admin/devices").await;
    assert_eq!(console.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(console.headers()["retry-after"], "5");
    assert!(
        console.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/html")
    );
    let page = console.text().await.unwrap();
    assert!(page.contains("The database does not answer"), "{page}");

    // PostgreSQL comes back: the same node serves again without a restart.
    assert!(pg.resume(), "PostgreSQL starts again");
    let outage = down.elapsed();
    let back = Instant::now();
    loop {
        let ready = server
            .client
            .get(server.url("/readyz"))
            .send()
            .await
            .unwrap();
        if ready.status() == StatusCode::OK {
            break;
        }
        assert!(back.elapsed() < Duration::from_secs(15), "no recovery");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let recovered = back.elapsed();
    // Nothing was lost: the command queued before the outage is delivered now.
    let command = device.idle(&server).await.expect("the queued command");
    assert_eq!(uuid_and_type(&command).0, uuid);
    assert_eq!(
        console_page(&server, "/admin/devices").await.status(),
        StatusCode::OK
    );
    eprintln!(
        "outage {outage:?}: first 503s after {admin_took:?} and {device_took:?}, then after \
         {while_open:?}; ready again {recovered:?} after PostgreSQL started"
    );
    server.stop().await;
}
