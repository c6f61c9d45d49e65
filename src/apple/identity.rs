//! Who is speaking on the MDM channels. The device proves it holds a certificate by one of:
//! the `Mdm-Signature` header (a detached CMS signature of the body), the TLS client
//! certificate on our own listener, or a certificate header set by a trusted TLS-terminating
//! proxy. The certificate must be one this CA issued (or a migrated MDM's CA, recorded on first
//! sight), unexpired and unrevoked. Binding it to a particular device is the service's job;
//! this module only answers "which of our certificates is this, and may it speak now", and it
//! answers before anything else of a request is read.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use anyhow::Context;
use base64::Engine;
use der::Decode;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::ClientCertVerifier;

use chrono::{DateTime, Utc};

use super::cache::{self, MdmCache, Stamp};
use crate::pki::{scep, validity};
use crate::store::{
    CertificateRecord, CertificateStanding, CertificateStatus, ChannelStatus, EnrollmentRecord,
    EnrollmentStatus, Store,
};

/// Largest `Mdm-Signature` header accepted (a signature with a 4096-bit certificate chain is
/// about 4 KiB of base64).
const MAX_SIGNATURE_LEN: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Not a signature at all: a client bug, answered 400.
    #[error("malformed device credentials: {0}")]
    Malformed(String),
    /// The request is not authenticated: answered 401, which tells a device that management
    /// has ended.
    #[error("{0}")]
    Unauthenticated(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// What the store says a certificate may speak for: it is ours (these very bytes), was valid
/// and unrevoked when read, and is of the enrollment record bound to `bound_udid`, whose
/// channels these are. Shared by the requests that present the same certificate while the
/// node's cache holds it (see [`super::cache`]).
#[derive(Debug)]
pub struct Standing {
    serial: String,
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
    enrollment_id: String,
    bound_udid: Option<String>,
    channels: Vec<Channel>,
}

impl Standing {
    /// Still within its dates: a standing is only made for a valid, unrevoked certificate
    /// (see `pki::validity::usable_at`), and any change of status makes a new one.
    fn usable_at(&self, now: DateTime<Utc>) -> bool {
        self.not_before <= now && now < self.not_after
    }
}

/// A command channel of the device a certificate speaks for.
#[derive(Debug)]
pub struct Channel {
    pub id: String,
    pub status: ChannelStatus,
    /// When `last_seen_at` was last written, as far as this node knows (Unix seconds;
    /// `i64::MIN`: never).
    last_seen: AtomicI64,
}

impl Channel {
    /// Whether `last_seen_at` should be written now (at most once per `resolution`); if so,
    /// it is noted as written so that concurrent requests do not write it too.
    pub fn claim_seen(&self, now: DateTime<Utc>, resolution: chrono::Duration) -> bool {
        let seen = self.last_seen.load(Ordering::Acquire);
        let now = now.timestamp();
        if seen != i64::MIN && now.saturating_sub(seen) < resolution.num_seconds() {
            return false;
        }
        self.last_seen
            .compare_exchange(seen, now, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }
}

/// A device proven to hold a certificate of ours that may speak now: the only way to reach
/// the MDM service. Only [`verify`] (and [`verify_cached`], [`reread`]) make one, and they
/// read nothing of the body but the signature, so nothing a device sends is parsed before
/// this exists.
#[derive(Clone, Debug)]
pub struct VerifiedDevice {
    standing: Arc<Standing>,
    /// Per channel, whether the store had work queued when this request read it; empty when
    /// the standing came from the cache (the cache's idle view answers instead).
    work_read: Vec<bool>,
    /// The queue stamp taken before that read (see [`super::cache::Stamp`]).
    queue_stamp: Option<Stamp>,
    /// The certificate, kept when the standing came from the cache: a refusal reads it again.
    cached: Option<Vec<u8>>,
}

impl VerifiedDevice {
    /// The certificate's serial (hex).
    pub fn serial(&self) -> &str {
        &self.standing.serial
    }

    /// The enrollment record the certificate was issued under.
    pub fn enrollment_id(&self) -> &str {
        &self.standing.enrollment_id
    }

    /// The device (UDID or EnrollmentID) the certificate speaks for, once it authenticated.
    pub fn bound_device(&self) -> Option<&str> {
        self.standing.bound_udid.as_deref()
    }

    /// Channel `id` of device `udid` and its position, if the certificate speaks for that
    /// device.
    pub fn channel(&self, id: &str, udid: &str) -> Option<(usize, &Channel)> {
        if self.bound_device() != Some(udid) {
            return None;
        }
        self.standing
            .channels
            .iter()
            .enumerate()
            .find(|(_, c)| c.id == id)
    }

    /// Whether the store had work queued for the channel at `index` when this request read
    /// it; `None` when this request read nothing (the standing came from the cache).
    pub fn work_read(&self, index: usize) -> Option<bool> {
        self.work_read.get(index).copied()
    }

    /// The queue stamp taken before this request's read.
    pub fn queue_stamp(&self) -> Option<Stamp> {
        self.queue_stamp
    }

    /// Whether the standing came from the cache (and may be out of date by up to a second).
    pub fn from_cache(&self) -> bool {
        self.cached.is_some()
    }
}

/// What a request offers as proof of identity.
#[derive(Debug, Default)]
pub struct Credentials<'a> {
    /// The `Mdm-Signature` header: when present it decides, whatever else is offered.
    pub signature_header: Option<&'a str>,
    /// The certificate the client presented in the TLS handshake with us.
    pub tls_client_certificate: Option<&'a [u8]>,
    /// A certificate from a trusted proxy's header (already decoded; the caller checked that
    /// the request came from a trusted proxy).
    pub proxy_certificate: Option<Vec<u8>>,
}

/// The certificate a request presents, its signature over the body checked when it signs;
/// whose it is, is not decided yet (see [`verify`]).
/// What the signature's certificate offers for verification comes from the node's cache.
/// Returns the certificate and, when it signed, its key in the cache (its SHA-256: the request
/// need not hash it again).
pub fn presented_certificate(
    cache: &MdmCache,
    credentials: Credentials<'_>,
    body: &[u8],
) -> Result<(Vec<u8>, Option<cache::CertificateKey>), IdentityError> {
    Ok(if let Some(header) = credentials.signature_header {
        let (signer, key) = verify_signature_with(header, body, &|der| cache.signer_key(der))?;
        (signer.certificate_der, Some(key.certificate))
    } else if let Some(der) = credentials.tls_client_certificate {
        (der.to_vec(), None)
    } else if let Some(der) = credentials.proxy_certificate {
        (der, None)
    } else {
        return Err(IdentityError::Unauthenticated(
            "no Mdm-Signature header and no client certificate: the enrollment profile asks \
             devices to sign (SignMessage)"
                .into(),
        ));
    })
}

/// Which of our certificates (or a migrated CA's, recorded now) `certificate_der` is, and
/// whether it may speak now: one read of the certificate, its device and that device's
/// channels. `queue_stamp` is the cache's queue stamp taken before the read, if any.
pub async fn verify(
    store: &Store,
    migrated: &MigratedCas,
    certificate_der: &[u8],
    queue_stamp: Option<Stamp>,
) -> Result<VerifiedDevice, IdentityError> {
    match certificate_of_ours(store, certificate_der, queue_stamp).await {
        Err(IdentityError::Unauthenticated(_)) if migrated.issued(certificate_der) => {
            migrated.record(store, certificate_der).await?;
            certificate_of_ours(store, certificate_der, queue_stamp).await
        }
        other => other,
    }
}

/// [`verify`], answered from the node's cache when it holds a current standing for these
/// very bytes (no database read); otherwise read, and remembered. `key` is the certificate's
/// [`cache::certificate_key`] when the caller has it already.
pub async fn verify_cached(
    cache: &MdmCache,
    store: &Store,
    migrated: &MigratedCas,
    certificate_der: Vec<u8>,
    key: Option<cache::CertificateKey>,
) -> Result<VerifiedDevice, IdentityError> {
    let key = key.unwrap_or_else(|| cache::certificate_key(&certificate_der));
    let queue_stamp = cache.queue_stamp();
    if let Some(standing) = cache.standing(&key)
        && standing.usable_at(Utc::now())
    {
        return Ok(VerifiedDevice {
            standing,
            work_read: Vec::new(),
            queue_stamp,
            cached: Some(certificate_der),
        });
    }
    let stamp = cache.identity_stamp();
    let device = verify(store, migrated, &certificate_der, queue_stamp).await?;
    if let Some(stamp) = stamp {
        cache.remember_standing(key, stamp, device.standing.clone());
    }
    Ok(device)
}

/// The standing of a device's certificate read from the store again (when one from the cache
/// would refuse the request); the cache is updated with it. A device not from the cache is
/// returned as it is: it was read by this request.
pub async fn reread(
    cache: &MdmCache,
    store: &Store,
    device: &VerifiedDevice,
) -> Result<Option<VerifiedDevice>, IdentityError> {
    let Some(der) = &device.cached else {
        return Ok(None);
    };
    let queue_stamp = cache.queue_stamp();
    let stamp = cache.identity_stamp();
    let fresh = certificate_of_ours(store, der, queue_stamp).await?;
    if let Some(stamp) = stamp {
        cache.remember_standing(cache::certificate_key(der), stamp, fresh.standing.clone());
    }
    Ok(Some(fresh))
}

/// The CAs of another MDM whose devices are moving here: certificates they issued are device
/// identities too. Each is recorded in the certificate inventory on first sight, under an
/// enrollment record of its own, so that revocation and device binding work as for ours.
#[derive(Default)]
pub struct MigratedCas {
    roots: Vec<CertificateDer<'static>>,
    verifier: Option<Arc<dyn ClientCertVerifier>>,
}

impl MigratedCas {
    pub fn load(files: &[PathBuf]) -> anyhow::Result<MigratedCas> {
        let mut roots = Vec::new();
        for file in files {
            let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file)
                .with_context(|| format!("reading migrated CA {}", file.display()))?
                .collect::<Result<_, _>>()
                .with_context(|| format!("parsing migrated CA {}", file.display()))?;
            anyhow::ensure!(!certs.is_empty(), "{} holds no certificate", file.display());
            roots.extend(certs);
        }
        if roots.is_empty() {
            return Ok(MigratedCas::default());
        }
        let mut store = rustls::RootCertStore::empty();
        for root in &roots {
            store
                .add(root.clone())
                .context("a migrated CA certificate is not usable as a trust anchor")?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier =
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
                .build()
                .context("migrated CA verifier")?;
        Ok(MigratedCas {
            roots,
            verifier: Some(verifier),
        })
    }

    pub fn roots(&self) -> &[CertificateDer<'static>] {
        &self.roots
    }

    /// Whether a migrated CA issued `der` and it is valid now (signature, dates, usage).
    fn issued(&self, der: &[u8]) -> bool {
        let Some(verifier) = &self.verifier else {
            return false;
        };
        let cert = CertificateDer::from(der.to_vec());
        verifier
            .verify_client_cert(&cert, &[], UnixTime::now())
            .is_ok()
    }

    async fn record(&self, store: &Store, der: &[u8]) -> Result<(), IdentityError> {
        use sha2::{Digest, Sha256};
        let certificate = x509_cert::Certificate::from_der(der)
            .map_err(|e| IdentityError::Malformed(format!("certificate: {e}")))?;
        let tbs = certificate.tbs_certificate();
        let fingerprint = hex::encode(Sha256::digest(der));
        let time = |t: &x509_cert::time::Time| {
            chrono::DateTime::from_timestamp(t.to_unix_duration().as_secs() as i64, 0)
                .unwrap_or_default()
        };
        let now = crate::store::now();
        let enrollment = EnrollmentRecord {
            id: format!("migrated-{}", &fingerprint[..32]),
            for_user: None,
            for_device: None,
            user_id: None,
            requested_by: "migration".into(),
            created_at: now,
            status: EnrollmentStatus::Migrated,
        };
        let record = CertificateRecord {
            serial: crate::pki::ca::serial_hex(tbs.serial_number().as_bytes()),
            enrollment_id: Some(enrollment.id.clone()),
            subject: tbs.subject().to_string(),
            not_before: time(&tbs.validity().not_before),
            not_after: time(&tbs.validity().not_after),
            status: CertificateStatus::Valid,
            revoked_at: None,
            revocation_reason: None,
            renewed_from: None,
            transaction_id: "migrated".into(),
            sender_nonce: fingerprint,
            // The bytes as presented: later requests are matched against exactly these.
            der: der.to_vec(),
            issued_at: now,
        };
        tracing::info!(serial = %record.serial, subject = %record.subject,
            "recording a migrated MDM's device certificate");
        store
            .record_migrated_certificate(&enrollment, &record)
            .await
            .map_err(|e| IdentityError::Internal(e.to_string()))
    }
}

/// Checks the header's signature over the body; returns the signer.
pub fn verify_signature(header: &str, body: &[u8]) -> Result<scep::VerifiedSigner, IdentityError> {
    verify_signature_with(header, body, &|der| {
        scep::SignerKey::from_certificate(der).ok()
    })
    .map(|(signer, _)| signer)
}

/// [`verify_signature`], with what each certificate offers for verification from `key_of`;
/// returns also what `key_of` said of the signer's certificate.
fn verify_signature_with<K: std::borrow::Borrow<scep::SignerKey>>(
    header: &str,
    body: &[u8],
    key_of: &dyn Fn(&[u8]) -> Option<K>,
) -> Result<(scep::VerifiedSigner, K), IdentityError> {
    if header.len() > MAX_SIGNATURE_LEN {
        return Err(IdentityError::Malformed(
            "the Mdm-Signature header is too long".into(),
        ));
    }
    // Devices send one line: it is decoded as it is, and only if that fails, again without
    // folded whitespace (which the decoder refuses). Scanning for whitespace first, or copying
    // the header char by char, cost 1.5% and 3% of a signed Idle's instructions.
    let engine = &base64::engine::general_purpose::STANDARD;
    let decoded = match engine.decode(header.as_bytes()) {
        Err(_) if header.bytes().any(|b| b.is_ascii_whitespace()) => {
            let compact: Vec<u8> = header
                .bytes()
                .filter(|b| !b.is_ascii_whitespace())
                .collect();
            engine.decode(compact)
        }
        other => other,
    };
    let der =
        decoded.map_err(|_| IdentityError::Malformed("the Mdm-Signature is not base64".into()))?;
    scep::verify_detached_with(&der, body, key_of).map_err(|e| match e {
        scep::ScepError::BadSignature => {
            IdentityError::Unauthenticated("the Mdm-Signature does not match the body".into())
        }
        scep::ScepError::UnsupportedAlgorithm(what) => {
            IdentityError::Unauthenticated(format!("unsupported signature algorithm: {what}"))
        }
        other => IdentityError::Malformed(other.to_string()),
    })
}

/// The inventory record of `certificate_der` if this CA issued it and it is still good.
async fn certificate_of_ours(
    store: &Store,
    certificate_der: &[u8],
    queue_stamp: Option<Stamp>,
) -> Result<VerifiedDevice, IdentityError> {
    let certificate = x509_cert::Certificate::from_der(certificate_der)
        .map_err(|e| IdentityError::Malformed(format!("signer certificate: {e}")))?;
    let serial =
        crate::pki::ca::serial_hex(certificate.tbs_certificate().serial_number().as_bytes());
    let standing = store
        .certificate_standing(&serial)
        .await
        .map_err(|e| IdentityError::Internal(e.to_string()))?
        // Same serial is not enough: the very certificate must be the one we issued.
        .filter(|s| s.certificate.der == certificate_der)
        .ok_or_else(|| {
            IdentityError::Unauthenticated("the signing certificate was not issued here".into())
        })?;
    validity::usable_at(&standing.certificate, chrono::Utc::now())
        .map_err(|e| IdentityError::Unauthenticated(format!("signing certificate: {e}")))?;
    let CertificateStanding {
        certificate,
        bound_udid,
        channels,
    } = standing;
    let enrollment_id = certificate.enrollment_id.ok_or_else(|| {
        IdentityError::Unauthenticated("the signing certificate has no enrollment".into())
    })?;
    let work_read = channels.iter().map(|c| c.has_work).collect();
    let channels = channels
        .into_iter()
        .map(|c| Channel {
            id: c.id,
            status: c.status,
            last_seen: AtomicI64::new(c.last_seen_at.map_or(i64::MIN, |t| t.timestamp())),
        })
        .collect();
    Ok(VerifiedDevice {
        standing: Arc::new(Standing {
            serial: certificate.serial,
            not_before: certificate.not_before,
            not_after: certificate.not_after,
            enrollment_id,
            bound_udid,
            channels,
        }),
        work_read,
        queue_stamp,
        cached: None,
    })
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;

    use super::*;
    use crate::pki::scep::client::ClientIdentity;
    use crate::pki::scep::{DigestAlgorithm, SignerKey, sign_detached};

    fn header(body: &[u8], signer: &ClientIdentity) -> String {
        let der = sign_detached(body, DigestAlgorithm::Sha256, signer).unwrap();
        base64::engine::general_purpose::STANDARD.encode(der)
    }

    /// A remembered signer key serves verification, the signature is still checked against
    /// each body, and a key that is not the certificate's fails closed.
    #[test]
    fn remembered_signer_keys_still_verify_every_body() {
        let (device, other) = (
            ClientIdentity::generate(2048).unwrap(),
            ClientIdentity::generate(2048).unwrap(),
        );
        let body = b"<plist><dict><key>Status</key><string>Idle</string></dict></plist>";
        let signed = header(body, &device);
        let remembered = SignerKey::from_certificate(&device.certificate_der).unwrap();
        let lookups = Cell::new(0);
        let cached = |_: &[u8]| {
            lookups.set(lookups.get() + 1);
            Some(remembered.clone())
        };

        let (signer, _) = verify_signature_with(&signed, body, &cached).unwrap();
        assert_eq!(signer.certificate_der, device.certificate_der);
        assert_eq!(lookups.get(), 1, "the key came from the lookup");

        // Another body under the same signature: refused, though the key is remembered.
        let err = verify_signature_with(&signed, b"<plist><dict/></plist>", &cached).unwrap_err();
        assert!(matches!(err, IdentityError::Unauthenticated(_)), "{err}");

        // A lookup that answers with another certificate's key: the SignerInfo does not name
        // it, and nothing verifies.
        let wrong = SignerKey::from_certificate(&other.certificate_der).unwrap();
        let err =
            verify_signature_with(&signed, body, &|_: &[u8]| Some(wrong.clone())).unwrap_err();
        assert!(matches!(err, IdentityError::Malformed(_)), "{err}");

        // A header folded over lines (as some proxies pass it) verifies the same; one that is
        // not base64 is malformed, folded or not.
        let folded: String = signed
            .as_bytes()
            .chunks(64)
            .map(|line| std::str::from_utf8(line).unwrap())
            .collect::<Vec<_>>()
            .join("\r\n ");
        assert!(folded.len() > signed.len());
        let (signer, _) = verify_signature_with(&folded, body, &cached).unwrap();
        assert_eq!(signer.certificate_der, device.certificate_der);
        for bad in ["not base64!", "bm90 IGJh*c2U2NA=="] {
            let err = verify_signature_with(bad, body, &cached).unwrap_err();
            assert!(matches!(err, IdentityError::Malformed(_)), "{err}");
        }

        // And the uncached path agrees.
        assert_eq!(
            verify_signature(&signed, body).unwrap().certificate_der,
            device.certificate_der
        );
    }
}
