//! The `trustbroker` binary as an operator runs it: first start, restart, configuration
//! layering, admin keys from the command line, PostgreSQL, graceful shutdown.

use std::os::unix::fs::PermissionsExt;

use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{BrokerProcess, PgTestDb, created_key, run_cli};

#[tokio::test]
async fn first_start_creates_the_data_dir_and_a_restart_reuses_it() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data_arg = data.to_str().unwrap();
    let broker = BrokerProcess::serve(&["--data-dir", data_arg, "--listen", "127.0.0.1:0"], &[]);
    assert!(
        broker
            .stdout
            .iter()
            .any(|l| l.contains("trustbroker admin-key create --name NAME")),
        "{:?}",
        broker.stdout
    );
    let mode = std::fs::metadata(&data).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data dir must be private");
    let key_mode = std::fs::metadata(data.join("tls/dev-key.pem"))
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(key_mode, 0o600, "TLS key must be private");
    assert!(
        data.join("trustbroker.db-wal").exists(),
        "SQLite runs in WAL mode"
    );

    let health = broker
        .client()
        .get(format!("{}/healthz", broker.base()))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    // A key created while the server runs works against it.
    let (ok, out, err) = run_cli(
        &[
            "admin-key",
            "create",
            "--name",
            "ops",
            "--data-dir",
            data_arg,
        ],
        &[],
    );
    assert!(ok, "{err}");
    let key = created_key(&out);
    let whoami = broker
        .client()
        .get(format!("{}/api/v1/whoami", broker.base()))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(whoami.status(), StatusCode::OK);
    let first_fingerprint = broker.fingerprint.clone();
    let status = broker.terminate().await;
    assert!(
        status.success(),
        "SIGTERM ends the server cleanly: {status}"
    );

    // Restart: same certificate, same keys, same audit log.
    let again = BrokerProcess::serve(&["--data-dir", data_arg, "--listen", "127.0.0.1:0"], &[]);
    assert_eq!(again.fingerprint, first_fingerprint);
    let audit: Value = again
        .client()
        .get(format!("{}/api/v1/audit", again.base()))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let created = audit["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "admin-key.create")
        .expect("CLI key creation audited");
    assert!(created["actor"].as_str().unwrap().starts_with("cli:"));
    assert_eq!(created["target"], "ops");
    assert!(again.terminate().await.success());
}

#[tokio::test]
async fn environment_overrides_the_config_file_and_flags_override_both() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let file = dir.path().join("trustbroker.toml");
    std::fs::write(
        &file,
        format!(
            "data_dir = \"{}\"\nlisten = \"127.0.0.1:1\"\npublic_url = \"https://from-file.example\"\nlog_format = \"json\"\n",
            data.display()
        ),
    )
    .unwrap();
    let broker = BrokerProcess::serve(
        &[
            "--config",
            file.to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
        ],
        &[
            ("TRUSTBROKER_LISTEN", "127.0.0.1:2"),
            ("TRUSTBROKER_PUBLIC_URL", "https://from-env.example/"),
        ],
    );
    assert!(
        broker
            .stdout
            .iter()
            .any(|l| l.contains("public URL: https://from-env.example")),
        "{:?}",
        broker.stdout
    );
    assert!(
        data.join("trustbroker.db").exists(),
        "data_dir from the file"
    );
    assert!(broker.terminate().await.success());

    // Unknown keys and bad values in the file are refused before anything starts.
    std::fs::write(&file, "lisen = \"127.0.0.1:9\"\n").unwrap();
    let (ok, _, err) = run_cli(&["--config", file.to_str().unwrap(), "migrate"], &[]);
    assert!(!ok);
    assert!(err.contains("unknown field"), "{err}");
}

#[tokio::test]
async fn admin_keys_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (ok, out, err) = run_cli(
        &[
            "admin-key",
            "create",
            "--name",
            "auditor",
            "--scope",
            "audit:read",
            "--data-dir",
            data,
        ],
        &[],
    );
    assert!(ok, "{err}");
    let key = created_key(&out);
    let (ok, out, _) = run_cli(&["admin-key", "list", "--data-dir", data], &[]);
    assert!(ok);
    assert!(out.contains("auditor") && out.contains("active") && out.contains("audit:read"));
    assert!(!out.contains(&key), "list never prints secrets");

    let (ok, _, err) = run_cli(
        &[
            "admin-key",
            "create",
            "--name",
            "auditor",
            "--data-dir",
            data,
        ],
        &[],
    );
    assert!(!ok, "duplicate active name refused");
    assert!(err.contains("already exists"), "{err}");
    let (ok, _, err) = run_cli(
        &[
            "admin-key",
            "create",
            "--name",
            "x",
            "--scope",
            "superuser",
            "--data-dir",
            data,
        ],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("unknown scope"), "{err}");

    let (ok, out, _) = run_cli(&["admin-key", "revoke", "auditor", "--data-dir", data], &[]);
    assert!(ok, "{out}");
    let (_, out, _) = run_cli(&["admin-key", "list", "--data-dir", data], &[]);
    assert!(out.contains("revoked"), "{out}");
    let (ok, _, err) = run_cli(&["admin-key", "revoke", "auditor", "--data-dir", data], &[]);
    assert!(!ok);
    assert!(err.contains("no active admin key"), "{err}");
    // The name is free again once revoked.
    let (ok, _, err) = run_cli(
        &[
            "admin-key",
            "create",
            "--name",
            "auditor",
            "--data-dir",
            data,
        ],
        &[],
    );
    assert!(ok, "{err}");
}

#[tokio::test]
async fn the_same_binary_runs_on_postgresql() {
    let Some(pg) = PgTestDb::create().await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (ok, out, err) = run_cli(
        &["migrate", "--database-url", &pg.url, "--data-dir", data],
        &[],
    );
    assert!(ok, "{err}");
    assert!(out.contains("postgres"), "{out}");
    let (ok, out, err) = run_cli(
        &["admin-key", "create", "--name", "ops"],
        &[("DATABASE_URL", &pg.url), ("TRUSTBROKER_DATA_DIR", data)],
    );
    assert!(ok, "{err}");
    let key = created_key(&out);
    let broker = BrokerProcess::serve(
        &["--listen", "127.0.0.1:0", "--data-dir", data],
        &[("DATABASE_URL", &pg.url)],
    );
    let client = broker.client();
    let ready: Value = client
        .get(format!("{}/readyz", broker.base()))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["database"], "postgres");
    let whoami = client
        .get(format!("{}/api/v1/whoami", broker.base()))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(whoami.status(), StatusCode::OK);
    assert!(
        !dir.path().join("trustbroker.db").exists(),
        "no SQLite file on PostgreSQL"
    );
    assert!(broker.terminate().await.success());
}

#[tokio::test]
async fn plain_http_listener_serves_the_same_app() {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        probe.local_addr().unwrap().port()
    };
    let http_listen = format!("127.0.0.1:{port}");
    let broker = BrokerProcess::serve(
        &[
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            &http_listen,
        ],
        &[],
    );
    let response = reqwest::get(format!("http://{http_listen}/healthz"))
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(broker.terminate().await.success());
}
