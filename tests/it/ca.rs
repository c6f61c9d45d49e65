//! The CA's lifecycle: created at first start with its key sealed at rest, imported from PEM,
//! one-time challenges from the API and the command line.

use reqwest::StatusCode;
use serde_json::Value;

use crate::harness::{TestServer, openssl_in, run_cli};

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
    let text = openssl_in(dir.path(), &["x509", "-in", "ca.pem", "-noout", "-text"]);
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
    openssl_in(
        d,
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
    );
    openssl_in(
        d,
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
    let expected = openssl_in(
        d,
        &["x509", "-in", "ca.pem", "-noout", "-fingerprint", "-sha256"],
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

#[tokio::test]
async fn a_p256_ca_is_created_with_an_rsa_ra_and_kept_whatever_the_setting_says_later() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().to_str().unwrap();
    // Without an RA the setting is refused before anything is created.
    let (ok, _, err) = run_cli(
        &["ca", "init", "--data-dir", data],
        &[("TRUSTBROKER_CA_KEY_ALGORITHM", "ecdsa-p256")],
    );
    assert!(!ok);
    assert!(err.contains("needs scep_ra = true"), "{err}");
    assert!(!dir.path().join("trustbroker.db").exists());

    let (ok, created, err) = run_cli(
        &[
            "ca",
            "init",
            "--data-dir",
            data,
            "--ca-key-algorithm",
            "ecdsa-p256",
            "--scep-ra",
            "true",
        ],
        &[],
    );
    assert!(ok, "{err}");
    assert!(created.starts_with("created CA"), "{created}");
    let (ok, shown, err) = run_cli(&["ca", "show", "--data-dir", data], &[]);
    assert!(ok, "{err}");
    assert!(shown.starts_with("CA key: ecdsa-p256"), "{shown}");
    // The CA then the RA, each as PEM.
    let pems: Vec<&str> = shown
        .match_indices("-----BEGIN CERTIFICATE-----")
        .map(|(i, _)| {
            let end = shown[i..].find("-----END CERTIFICATE-----").unwrap() + i + 25;
            &shown[i..end]
        })
        .collect();
    assert_eq!(pems.len(), 2, "{shown}");
    std::fs::write(dir.path().join("ca.pem"), pems[0]).unwrap();
    std::fs::write(dir.path().join("ra.pem"), pems[1]).unwrap();
    let ca = openssl_in(dir.path(), &["x509", "-in", "ca.pem", "-noout", "-text"]);
    assert!(ca.contains("ecdsa-with-SHA256"), "{ca}");
    assert!(ca.contains("prime256v1"), "{ca}");
    assert!(ca.contains("CA:TRUE"), "{ca}");
    let ra = openssl_in(dir.path(), &["x509", "-in", "ra.pem", "-noout", "-text"]);
    assert!(ra.contains("rsaEncryption"), "{ra}");
    assert!(ra.contains("2048 bit"), "{ra}");
    assert!(ra.contains("Digital Signature, Key Encipherment"), "{ra}");
    // The RA is certified by the CA (openssl's own check of the ECDSA signature).
    openssl_in(dir.path(), &["verify", "-CAfile", "ca.pem", "ra.pem"]);

    // The setting never converts an existing CA: back to RSA, the P-256 CA stays.
    let (ok, again, err) = run_cli(
        &["ca", "init", "--data-dir", data],
        &[("TRUSTBROKER_CA_KEY_ALGORITHM", "rsa")],
    );
    assert!(ok, "{err}");
    assert!(again.starts_with("existing CA"), "{again}");
    assert!(
        err.contains("the CA in the database keeps its key"),
        "{err}"
    );
    assert!(
        err.contains(r#"stored="ecdsa-p256" configured="rsa""#),
        "{err}"
    );
    let fingerprint = |s: &str| s.rsplit(' ').next().unwrap().trim().to_string();
    assert_eq!(fingerprint(&created), fingerprint(&again));
    let (_, shown, _) = run_cli(&["ca", "show", "--data-dir", data], &[]);
    assert!(shown.starts_with("CA key: ecdsa-p256"), "{shown}");
}

#[tokio::test]
async fn a_p256_ca_is_imported_with_an_rsa_ra_and_refused_without_one_or_on_another_curve() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let data = d.join("data");
    let data = data.to_str().unwrap();
    let path = |f: &str| d.join(f).to_str().unwrap().to_string();
    // A P-256 CA whose key is SEC1 ("EC PRIVATE KEY"), a P-384 one, and an RSA RA under the
    // P-256 CA for key encipherment.
    openssl_in(
        d,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "ca.key",
        ],
    );
    assert!(
        std::fs::read_to_string(d.join("ca.key"))
            .unwrap()
            .contains("BEGIN EC PRIVATE KEY")
    );
    let ca_cert = |key: &str, out: &str| {
        openssl_in(
            d,
            &[
                "req",
                "-x509",
                "-new",
                "-key",
                key,
                "-days",
                "30",
                "-subj",
                "/CN=Enterprise EC Issuing CA",
                "-out",
                out,
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        )
    };
    ca_cert("ca.key", "ca.pem");
    openssl_in(
        d,
        &[
            "ecparam",
            "-name",
            "secp384r1",
            "-genkey",
            "-noout",
            "-out",
            "p384.key",
        ],
    );
    ca_cert("p384.key", "p384.pem");
    openssl_in(
        d,
        &[
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=Enterprise RA",
            "-keyout",
            "ra.key",
            "-out",
            "ra.csr",
        ],
    );
    std::fs::write(
        d.join("ra.ext"),
        "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n",
    )
    .unwrap();
    openssl_in(
        d,
        &[
            "x509",
            "-req",
            "-in",
            "ra.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "ra.ext",
            "-out",
            "ra.pem",
        ],
    );
    let import = |cert: &str, key: &str, ra: Option<(&str, &str)>| {
        let (cert, key) = (path(cert), path(key));
        let mut args = vec!["ca", "import", "--cert", &cert, "--key", &key];
        let ra = ra.map(|(c, k)| (path(c), path(k)));
        if let Some((c, k)) = &ra {
            args.extend(["--ra-cert", c.as_str(), "--ra-key", k.as_str()]);
        }
        args.extend(["--data-dir", data]);
        run_cli(&args, &[])
    };

    let (ok, _, err) = import("ca.pem", "ca.key", None);
    assert!(!ok);
    assert!(err.contains("needs an RSA RA"), "{err}");
    assert!(err.contains("--ra-cert"), "{err}");
    let (ok, _, err) = import("p384.pem", "p384.key", Some(("ra.pem", "ra.key")));
    assert!(!ok);
    assert!(err.contains("secp384r1"), "{err}");
    assert!(err.contains("must be on P-256"), "{err}");
    // The RA must be RSA: the CA's own P-256 pair is refused in that role.
    let (ok, _, err) = import("ca.pem", "ca.key", Some(("ca.pem", "ca.key")));
    assert!(!ok);
    assert!(err.contains("must be RSA"), "{err}");
    // Nothing was stored by the refusals.
    let (ok, _, _) = run_cli(&["ca", "show", "--data-dir", data], &[]);
    assert!(!ok, "no CA yet");

    let (ok, _, err) = import("ca.pem", "ca.key", Some(("ra.pem", "ra.key")));
    assert!(ok, "{err}");
    let (_, shown, _) = run_cli(&["ca", "show", "--data-dir", data], &[]);
    assert!(shown.starts_with("CA key: ecdsa-p256"), "{shown}");
    let expected = openssl_in(
        d,
        &["x509", "-in", "ca.pem", "-noout", "-fingerprint", "-sha256"],
    );
    let expected = expected.trim().rsplit('=').next().unwrap().to_string();
    assert!(shown.contains(&expected), "{shown} vs {expected}");

    // The imported CA issues: a PKCS#8 request to the RA gets a certificate that openssl
    // verifies under the imported CA, signed with ecdsa-with-SHA256.
    let server = TestServer::start_with(|a| a.data_dir = Some(d.join("data"))).await;
    let admin = server.admin_key("ca-admin", &["scep:challenge"]).await;
    let challenge = server.challenge(&admin).await;
    let ra_der = {
        use rustls::pki_types::pem::PemObject;
        rustls::pki_types::CertificateDer::from_pem_file(d.join("ra.pem"))
            .unwrap()
            .to_vec()
    };
    let key = trustbroker::pki::scep::client::ClientIdentity::generate(2048).unwrap();
    let got = crate::device::scep_request_to(&server, &key, &ra_der, &challenge).await;
    assert_eq!(got.status, trustbroker::pki::scep::PkiStatus::Success);
    std::fs::write(
        d.join("leaf.pem"),
        trustbroker::pki::pem("CERTIFICATE", &got.certificates[0]),
    )
    .unwrap();
    openssl_in(d, &["verify", "-CAfile", "ca.pem", "leaf.pem"]);
    let leaf = openssl_in(d, &["x509", "-in", "leaf.pem", "-noout", "-text"]);
    assert!(
        leaf.contains("Signature Algorithm: ecdsa-with-SHA256"),
        "{leaf}"
    );
    server.stop().await;
}
