//! The HTTPS certificate: operator-supplied PEM files, or a development certificate generated
//! once into `<data-dir>/tls/` and reused on later starts.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use chrono::{DateTime, Duration, Utc};
use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{Config, TlsSource};

/// How long a generated development certificate is valid.
const DEV_CERT_VALIDITY_DAYS: i64 = 365;
/// A generated certificate this close to expiry is replaced at start.
const DEV_CERT_RENEW_BEFORE_DAYS: i64 = 30;

pub struct TlsMaterial {
    pub server_config: Arc<ServerConfig>,
    /// SHA-256 of the leaf certificate's DER, as colon-separated upper-case hex.
    pub fingerprint_sha256: String,
    pub cert_path: PathBuf,
    pub generated: bool,
}

/// What was generated, kept beside the certificate to decide whether it still fits.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct DevCertManifest {
    names: Vec<String>,
    not_after: DateTime<Utc>,
}

/// `device_roots`: the CAs whose certificates devices may present as TLS client certificates
/// (ours, and any migrated MDM's); empty turns client certificates off.
pub fn load(
    config: &Config,
    device_roots: &[CertificateDer<'static>],
) -> anyhow::Result<TlsMaterial> {
    let (cert_path, key_path, generated) = match &config.tls {
        TlsSource::Files { cert, key } => (cert.clone(), key.clone(), false),
        TlsSource::Generated => {
            let (cert, key) = ensure_dev_certificate(config)?;
            (cert, key, true)
        }
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert_path)
        .with_context(|| format!("reading TLS certificate {}", cert_path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("parsing TLS certificate {}", cert_path.display()))?;
    let Some(leaf) = chain.first() else {
        bail!("{} holds no certificate", cert_path.display());
    };
    let fingerprint_sha256 = fingerprint(leaf);
    let key = PrivateKeyDer::from_pem_file(&key_path)
        .with_context(|| format!("reading TLS private key {}", key_path.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?;
    let builder = if device_roots.is_empty() {
        builder.with_no_client_auth()
    } else {
        let mut roots = rustls::RootCertStore::empty();
        for root in device_roots {
            roots
                .add(root.clone())
                .context("a device CA certificate is not usable as a TLS trust anchor")?;
        }
        // Optional: browsers, admin clients and devices that sign their messages present none.
        // A certificate that is presented must chain to a device CA; who it belongs to is
        // decided per request (`apple::identity`).
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .allow_unauthenticated()
                .build()
                .context("TLS client certificate verifier")?;
        builder.with_client_cert_verifier(verifier)
    };
    let mut server_config = builder
        .with_single_cert(chain, key)
        .context("the TLS certificate and key do not belong together")?;
    server_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsMaterial {
        server_config: Arc::new(server_config),
        fingerprint_sha256,
        cert_path,
        generated,
    })
}

pub fn fingerprint(der: &[u8]) -> String {
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The names a development certificate must cover: loopback, the listeners, the public host.
fn dev_cert_names(config: &Config) -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    for addr in [Some(config.listen), config.http_listen]
        .into_iter()
        .flatten()
    {
        if !addr.ip().is_unspecified() {
            names.push(addr.ip().to_string());
        }
    }
    names.extend(config.public_host());
    names.sort();
    names.dedup();
    names
}

fn ensure_dev_certificate(config: &Config) -> anyhow::Result<(PathBuf, PathBuf)> {
    let dir = config.data_dir.join("tls");
    let cert_path = dir.join("dev-cert.pem");
    let key_path = dir.join("dev-key.pem");
    let manifest_path = dir.join("dev-cert.json");
    let names = dev_cert_names(config);
    let still_fits = fs::read_to_string(&manifest_path)
        .ok()
        .and_then(|text| serde_json::from_str::<DevCertManifest>(&text).ok())
        .is_some_and(|m| {
            m.names == names
                && m.not_after - Utc::now() > Duration::days(DEV_CERT_RENEW_BEFORE_DAYS)
        });
    if still_fits && cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    crate::fsutil::create_private_dir(&dir)?;
    let not_after = Utc::now() + Duration::days(DEV_CERT_VALIDITY_DAYS);
    let (cert_pem, key_pem) = generate_dev_certificate(&names, not_after)?;
    write_file(&key_path, key_pem.as_bytes(), 0o600)?;
    write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
    let manifest = DevCertManifest { names, not_after };
    write_file(
        &manifest_path,
        serde_json::to_string_pretty(&manifest)?.as_bytes(),
        0o644,
    )?;
    tracing::info!(path = %cert_path.display(), "generated a development TLS certificate");
    Ok((cert_path, key_path))
}

fn generate_dev_certificate(
    names: &[String],
    not_after: DateTime<Utc>,
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate().context("generating the TLS key")?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "trustbroker development certificate");
    params.distinguished_name = dn;
    params.subject_alt_names = names
        .iter()
        .map(|name| match name.parse() {
            Ok(ip) => Ok(SanType::IpAddress(ip)),
            Err(_) => name.clone().try_into().map(SanType::DnsName),
        })
        .collect::<Result<_, _>>()
        .context("certificate names")?;
    params.not_before = rcgen::date_time_ymd(2000, 1, 1);
    params.not_after = time_from_chrono(not_after)?;
    let cert = params
        .self_signed(&key)
        .context("signing the TLS certificate")?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn time_from_chrono(at: DateTime<Utc>) -> anyhow::Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(at.timestamp())
        .context("certificate expiry out of range")
}

/// Writes `bytes` to `path` with `mode`, replacing it atomically.
fn write_file(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    {
        let mut file = crate::fsutil::create_with_mode(&tmp, mode)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_colon_hex() {
        let fp = fingerprint(b"abc");
        assert_eq!(fp.len(), 32 * 3 - 1);
        assert!(fp.starts_with("BA:78:16:BF"));
    }
}
