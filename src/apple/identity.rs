//! Who is speaking on the MDM channels: the `Mdm-Signature` header (a detached CMS signature of
//! the body by the device's identity) must verify, and its certificate must be one this CA
//! issued, unexpired and unrevoked. Binding that certificate to a particular device is the
//! service's job; this module only answers "which of our certificates signed this body".

use base64::Engine;
use der::Decode;

use crate::pki::scep;
use crate::store::{CERT_VALID, CertificateRecord, Store};

/// Largest `Mdm-Signature` header accepted (a signature with a 4096-bit certificate chain is
/// about 4 KiB of base64).
const MAX_SIGNATURE_LEN: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    /// Not a signature at all: a client bug, answered 400.
    #[error("malformed Mdm-Signature: {0}")]
    Malformed(String),
    /// The request is not authenticated: answered 401, which tells a device that management
    /// has ended.
    #[error("{0}")]
    Unauthenticated(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// The certificate of ours that signed a request.
#[derive(Clone, Debug)]
pub struct DeviceIdentity {
    pub certificate: CertificateRecord,
    /// The enrollment record the certificate was issued under.
    pub enrollment_id: String,
}

/// Verifies `signature_header` (base64, BER or DER CMS) over `body` and finds the certificate.
pub async fn authenticate(
    store: &Store,
    signature_header: Option<&str>,
    body: &[u8],
) -> Result<DeviceIdentity, IdentityError> {
    let header = signature_header.ok_or_else(|| {
        IdentityError::Unauthenticated(
            "no Mdm-Signature header: the enrollment profile asks devices to sign (SignMessage)"
                .into(),
        )
    })?;
    let signer = verify_signature(header, body)?;
    certificate_of_ours(store, &signer.certificate_der).await
}

/// Checks the header's signature over the body; returns the signer.
pub fn verify_signature(header: &str, body: &[u8]) -> Result<scep::VerifiedSigner, IdentityError> {
    if header.len() > MAX_SIGNATURE_LEN {
        return Err(IdentityError::Malformed("the header is too long".into()));
    }
    let compact: String = header.chars().filter(|c| !c.is_whitespace()).collect();
    let der = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|_| IdentityError::Malformed("not base64".into()))?;
    scep::verify_detached(&der, body).map_err(|e| match e {
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
pub async fn certificate_of_ours(
    store: &Store,
    certificate_der: &[u8],
) -> Result<DeviceIdentity, IdentityError> {
    let certificate = x509_cert::Certificate::from_der(certificate_der)
        .map_err(|e| IdentityError::Malformed(format!("signer certificate: {e}")))?;
    let serial =
        crate::pki::ca::serial_hex(certificate.tbs_certificate().serial_number().as_bytes());
    let record = store
        .certificate(&serial)
        .await
        .map_err(|e| IdentityError::Internal(e.to_string()))?
        // Same serial is not enough: the very certificate must be the one we issued.
        .filter(|r| r.der == certificate_der)
        .ok_or_else(|| {
            IdentityError::Unauthenticated("the signing certificate was not issued here".into())
        })?;
    if record.status != CERT_VALID {
        return Err(IdentityError::Unauthenticated(
            "the signing certificate is revoked".into(),
        ));
    }
    let now = chrono::Utc::now();
    if record.not_after <= now || record.not_before > now {
        return Err(IdentityError::Unauthenticated(
            "the signing certificate is not valid now".into(),
        ));
    }
    let enrollment_id = record.enrollment_id.clone().ok_or_else(|| {
        IdentityError::Unauthenticated("the signing certificate has no enrollment".into())
    })?;
    Ok(DeviceIdentity {
        certificate: record,
        enrollment_id,
    })
}
