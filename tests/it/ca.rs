//! The CA's lifecycle: created at first start with its key sealed at rest, imported from PEM,
//! one-time challenges from the API and the command line.

use std::process::Command;

use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{TestServer, run_cli};

fn openssl(args: &[&str], dir: &std::path::Path) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_ca_is_created_once_with_its_key_sealed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (ok, first, err) = run_cli(&["ca", "init", "--data-dir", data], &[]);
    assert!(ok, "{err}");
    assert!(first.starts_with("created CA"), "{first}");
    let (ok, second, _) = run_cli(&["ca", "init", "--data-dir", data], &[]);
    assert!(ok);
    assert!(second.starts_with("existing CA"), "{second}");
    let fingerprint = |s: &str| s.rsplit(' ').next().unwrap().trim().to_string();
    assert_eq!(fingerprint(&first), fingerprint(&second));

    // The certificate is a CA that openssl accepts; the key is nowhere in plain text.
    let (ok, shown, _) = run_cli(&["ca", "show", "--data-dir", data], &[]);
    assert!(ok);
    let pem_start = shown.find("-----BEGIN CERTIFICATE-----").unwrap();
    std::fs::write(dir.path().join("ca.pem"), &shown[pem_start..]).unwrap();
    let text = openssl(&["x509", "-in", "ca.pem", "-noout", "-text"], dir.path());
    assert!(text.contains("CA:TRUE"), "{text}");
    assert!(text.contains("Certificate Sign"), "{text}");
    assert!(text.contains("2048 bit"), "{text}");
    let db = std::fs::read(dir.path().join("trustbroker.db")).unwrap();
    assert!(
        !db.windows(11).any(|w| w == b"PRIVATE KEY"),
        "no PEM key in the database"
    );

    // Without the master key the CA cannot be used.
    std::fs::write(
        dir.path().join("secret.key"),
        "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n",
    )
    .unwrap();
    let (ok, _, err) = run_cli(&["ca", "show", "--data-dir", data], &[]);
    assert!(!ok);
    assert!(err.contains("master key"), "{err}");
}

#[tokio::test]
async fn an_existing_ca_can_be_imported_and_is_checked() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let data = data.to_str().unwrap();
    let d = dir.path();
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=Enterprise Issuing CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
        d,
    );
    openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "30",
            "-subj",
            "/CN=leaf",
            "-keyout",
            "leaf.key",
            "-out",
            "leaf.pem",
            "-addext",
            "basicConstraints=CA:FALSE",
        ],
        d,
    );
    let path = |f: &str| d.join(f).to_str().unwrap().to_string();

    // A non-CA certificate, and a key that is not the certificate's, are refused.
    let (ok, _, err) = run_cli(
        &[
            "ca",
            "import",
            "--cert",
            &path("leaf.pem"),
            "--key",
            &path("leaf.key"),
            "--data-dir",
            data,
        ],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("not a CA"), "{err}");
    let (ok, _, err) = run_cli(
        &[
            "ca",
            "import",
            "--cert",
            &path("ca.pem"),
            "--key",
            &path("leaf.key"),
            "--data-dir",
            data,
        ],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("does not belong"), "{err}");

    let (ok, _, err) = run_cli(
        &[
            "ca",
            "import",
            "--cert",
            &path("ca.pem"),
            "--key",
            &path("ca.key"),
            "--data-dir",
            data,
        ],
        &[],
    );
    assert!(ok, "{err}");
    let expected = openssl(
        &["x509", "-in", "ca.pem", "-noout", "-fingerprint", "-sha256"],
        d,
    );
    let (_, shown, _) = run_cli(&["ca", "show", "--data-dir", data], &[]);
    let expected = expected.trim().rsplit('=').next().unwrap().to_string();
    assert!(shown.contains(&expected), "{shown} vs {expected}");

    // A second import would strand every device of the first CA.
    let (ok, _, err) = run_cli(
        &[
            "ca",
            "import",
            "--cert",
            &path("ca.pem"),
            "--key",
            &path("ca.key"),
            "--data-dir",
            data,
        ],
        &[],
    );
    assert!(!ok);
    assert!(err.contains("already exists"), "{err}");
}

#[tokio::test]
async fn challenges_come_from_the_api_and_the_command_line_and_stay_secret() {
    let server = TestServer::start().await;
    let issuer = server.admin_key("mdm-portal", &["scep:challenge"]).await;
    let reader = server.admin_key("reader", &["audit:read"]).await;
    let url = server.url("/api/v1/scep/challenges");
    let created = server
        .client
        .post(&url)
        .bearer_auth(&issuer)
        .json(&serde_json::json!({"for_user": "alice@example.org"}))
        .send()
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    let body: Value = created.json().await.unwrap();
    let challenge = body["challenge"].as_str().unwrap();
    assert!(challenge.len() >= 43, "at least 256 bits: {challenge}");
    let expires =
        chrono::DateTime::parse_from_rfc3339(body["expires_at"].as_str().unwrap()).unwrap();
    let ttl = expires.signed_duration_since(chrono::Utc::now());
    assert!(ttl > chrono::Duration::minutes(59) && ttl <= chrono::Duration::hours(1));
    // No body at all is fine too; two challenges never repeat.
    let second: Value = server
        .client
        .post(&url)
        .bearer_auth(&issuer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_ne!(second["challenge"], body["challenge"]);

    let denied = server
        .client
        .post(&url)
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap();
    assert_eq!(denied.status(), StatusCode::FORBIDDEN);
    let bad = server
        .client
        .post(&url)
        .bearer_auth(&issuer)
        .json(&serde_json::json!({"for_user": ""}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let audit = server
        .client
        .get(server.url("/api/v1/audit?action=scep-challenge.create"))
        .bearer_auth(&reader)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(audit.contains("alice@example.org"), "{audit}");
    assert!(
        !audit.contains(challenge),
        "the audit log never holds a challenge"
    );
    server.stop().await;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    let (ok, out, err) = run_cli(
        &[
            "scep",
            "challenge",
            "--for-device",
            "C02XYZ",
            "--data-dir",
            data,
        ],
        &[("TRUSTBROKER_SCEP_CHALLENGE_TTL_SECS", "600")],
    );
    assert!(ok, "{err}");
    let issued: Value = serde_json::from_str(out.trim()).unwrap();
    assert!(issued["challenge"].as_str().unwrap().len() >= 43);
    assert!(issued["expires_at"].is_string());
}
