//! The APNs push certificate: imported from PEM (certificate and RSA key) or PKCS#12, its topic
//! read from the certificate's UID attribute (`com.apple.mgmt.External.<uuid>` for MDM), the key
//! sealed at rest. One is active; devices enrolled under its topic can be woken with it.

use anyhow::{Context, anyhow, bail};
use der::Decode;
use x509_cert::Certificate;

use crate::secrets::MasterKey;
use crate::store::{PushCertificateRow, Store};

/// userId (RFC 4519): where Apple puts the push topic.
const UID: const_oid::ObjectIdentifier = const_oid::db::rfc4519::UID;

/// The purpose a sealed push key is bound to.
pub const SEAL_PURPOSE: &str = "apns-push-key";

/// What an import left in place.
#[derive(Debug)]
pub struct Imported {
    pub topic: String,
    pub not_after: chrono::DateTime<chrono::Utc>,
}

/// Checks the pair (the key belongs to the certificate, the certificate names a topic and is
/// valid now) and makes it the push certificate.
pub async fn import(
    store: &Store,
    master: &MasterKey,
    cert_pem: &str,
    key_pem: &str,
) -> anyhow::Result<Imported> {
    let (cert_der, pkcs8) = crate::pki::ca::parse_pem_pair(cert_pem, key_pem)?;
    let certificate = Certificate::from_der(&cert_der).context("parsing the certificate")?;
    let topic = topic_of(&certificate)?;
    let validity = certificate.tbs_certificate().validity();
    let not_after: chrono::DateTime<chrono::Utc> = validity.not_after.to_system_time().into();
    if not_after <= chrono::Utc::now() {
        bail!("the push certificate expired on {not_after}; renew it at identity.apple.com");
    }
    store
        .replace_push_certificate(&PushCertificateRow {
            topic: topic.clone(),
            certificate: cert_der,
            sealed_key: master.seal(SEAL_PURPOSE, &pkcs8),
            not_after,
            imported_at: crate::store::now(),
        })
        .await?;
    Ok(Imported { topic, not_after })
}

/// A PKCS#12 bundle (what Keychain Access exports) as a PEM certificate and PKCS#8 key.
/// Keychain still protects exports with RC2 and 3DES, which OpenSSL 3 keeps in its legacy
/// provider: it is loaded on first use, beside the default one.
pub fn pkcs12_to_pem(der: &[u8], password: &str) -> anyhow::Result<(String, String)> {
    use std::sync::OnceLock;
    static LEGACY: OnceLock<Option<openssl::provider::Provider>> = OnceLock::new();
    LEGACY.get_or_init(|| openssl::provider::Provider::try_load(None, "legacy", true).ok());
    let bundle =
        openssl::pkcs12::Pkcs12::from_der(der).map_err(|_| anyhow!("not a PKCS#12 file (.p12)"))?;
    let parsed = bundle.parse2(password).map_err(|_| {
        anyhow!("cannot open the PKCS#12 file: wrong password, or an unsupported encryption")
    })?;
    let cert = parsed
        .cert
        .ok_or_else(|| anyhow!("the PKCS#12 file holds no certificate"))?;
    let key = parsed
        .pkey
        .ok_or_else(|| anyhow!("the PKCS#12 file holds no private key"))?;
    let cert_pem = String::from_utf8(cert.to_pem().context("encoding the certificate")?)
        .context("encoding the certificate")?;
    let key_pem = String::from_utf8(
        key.private_key_to_pem_pkcs8()
            .context("encoding the private key")?,
    )
    .context("encoding the private key")?;
    Ok((cert_pem, key_pem))
}

/// The APNs topic: the certificate subject's UID.
pub fn topic_of(certificate: &Certificate) -> anyhow::Result<String> {
    for attribute in certificate.tbs_certificate().subject().iter() {
        if attribute.oid == UID {
            let value = attribute
                .value
                .decode_as::<der::asn1::Utf8StringRef<'_>>()
                .map(|s| s.as_str().to_owned())
                .or_else(|_| {
                    attribute
                        .value
                        .decode_as::<der::asn1::PrintableStringRef<'_>>()
                        .map(|s| s.as_str().to_owned())
                })
                .map_err(|_| anyhow!("the certificate's UID is not text"))?;
            return Ok(value);
        }
    }
    bail!("the certificate has no UID (topic) in its subject: is it an APNs push certificate?")
}

/// How long before its expiry the push certificate is warned about: Apple's renewal must keep
/// the same topic, and a lapsed certificate leaves every device unreachable.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// What readiness and the logs say about the push certificate's expiry.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ExpiryStatus {
    pub topic: String,
    pub not_after: chrono::DateTime<chrono::Utc>,
    pub days_left: i64,
    /// Set within [`EXPIRY_WARNING_DAYS`] of expiry, or after it.
    pub warning: Option<String>,
}

/// The push certificate's expiry, with the `trustbroker_apns_certificate_expiry_seconds`
/// gauge set to the time left; `None` when none is imported.
pub async fn expiry_status(store: &Store) -> anyhow::Result<Option<ExpiryStatus>> {
    let Some(push) = store.push_certificate().await? else {
        return Ok(None);
    };
    let left = push.not_after - chrono::Utc::now();
    metrics::gauge!("trustbroker_apns_certificate_expiry_seconds").set(left.num_seconds() as f64);
    let days_left = left.num_days();
    let warning = if left <= chrono::Duration::zero() {
        Some(format!(
            "the APNs push certificate for {} expired on {}: devices cannot be woken; renew it \
             at identity.apple.com with the same Apple ID and import it",
            push.topic, push.not_after
        ))
    } else if days_left < EXPIRY_WARNING_DAYS {
        Some(format!(
            "the APNs push certificate for {} expires in {days_left} day(s), on {}: renew it at \
             identity.apple.com (same Apple ID, same topic) and import it",
            push.topic, push.not_after
        ))
    } else {
        None
    };
    Ok(Some(ExpiryStatus {
        topic: push.topic,
        not_after: push.not_after,
        days_left,
        warning,
    }))
}
