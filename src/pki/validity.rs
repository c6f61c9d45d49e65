//! One answer to "may this certificate speak now?": asked by SCEP renewal and by both MDM
//! channels, so that revocation, expiry and a renewal's overlap end mean the same everywhere.

use chrono::{DateTime, Utc};

use crate::store::{CertificateRecord, CertificateStatus};

/// Why a certificate of ours may not be used now.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unusable {
    #[error("the certificate is revoked")]
    Revoked,
    #[error("the certificate is not valid yet")]
    NotYetValid,
    #[error("the certificate has expired")]
    Expired,
}

/// Whether `record` may authenticate a request at `now`: unrevoked and within its validity
/// (a renewed certificate's validity ends when its overlap with the new one does).
pub fn usable_at(record: &CertificateRecord, now: DateTime<Utc>) -> Result<(), Unusable> {
    if record.status != CertificateStatus::Valid {
        return Err(Unusable::Revoked);
    }
    if record.not_before > now {
        return Err(Unusable::NotYetValid);
    }
    if record.not_after <= now {
        return Err(Unusable::Expired);
    }
    Ok(())
}
