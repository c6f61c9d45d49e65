//! The APNs push certificate: imported from PEM (certificate and RSA key), its topic read from
//! the certificate's UID attribute (`com.apple.mgmt.External.<uuid>` for MDM), the key sealed
//! at rest. One is active; devices enrolled under its topic can be woken with it.

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
