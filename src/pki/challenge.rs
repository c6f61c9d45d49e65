//! One-time SCEP challenges, each bound to an enrollment record.
//!
//! A challenge carries 256 random bits and is stored only as its SHA-256: it is a bearer secret
//! until redeemed. Redemption is atomic in the store (see `Store::redeem_challenge_and_record`).

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::store::{EnrollmentRecord, EnrollmentStatus, Store, StoreResult};

/// Who a challenge is for, as given by whoever asked for it.
#[derive(Clone, Debug, Default)]
pub struct ChallengeRequest {
    pub requested_by: String,
    pub for_user: Option<String>,
    pub for_device: Option<String>,
    /// The signed-in person the enrollment is for (`users.id`).
    pub user_id: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct IssuedChallenge {
    pub challenge: String,
    pub expires_at: DateTime<Utc>,
    pub enrollment_id: String,
}

/// Creates an enrollment record and a fresh one-time challenge bound to it.
pub async fn create(
    store: &Store,
    ttl: std::time::Duration,
    request: ChallengeRequest,
) -> StoreResult<IssuedChallenge> {
    let now = crate::store::now();
    let enrollment = EnrollmentRecord {
        id: uuid::Uuid::new_v4().to_string(),
        for_user: request.for_user,
        for_device: request.for_device,
        user_id: request.user_id,
        requested_by: request.requested_by,
        created_at: now,
        status: EnrollmentStatus::Pending,
    };
    store.insert_enrollment(&enrollment).await?;
    let challenge = URL_SAFE_NO_PAD.encode(crate::random::bytes::<32>());
    let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1));
    let expires_at = now + ttl;
    store
        .insert_challenge(&hash(&challenge), &enrollment.id, now, expires_at)
        .await?;
    Ok(IssuedChallenge {
        challenge,
        expires_at,
        enrollment_id: enrollment.id,
    })
}

/// A fresh one-time challenge for an existing enrollment record: the certificate it brings
/// belongs to that record, so the device it is bound to keeps speaking with it (an identity
/// renewal).
pub async fn create_for_record(
    store: &Store,
    enrollment_id: &str,
    ttl: std::time::Duration,
) -> StoreResult<IssuedChallenge> {
    let now = crate::store::now();
    let challenge = URL_SAFE_NO_PAD.encode(crate::random::bytes::<32>());
    let ttl = chrono::Duration::from_std(ttl).unwrap_or(chrono::Duration::hours(1));
    let expires_at = now + ttl;
    store
        .insert_challenge(&hash(&challenge), enrollment_id, now, expires_at)
        .await?;
    Ok(IssuedChallenge {
        challenge,
        expires_at,
        enrollment_id: enrollment_id.to_owned(),
    })
}

/// The stored form of a challenge.
pub fn hash(challenge: &str) -> String {
    hex::encode(Sha256::digest(challenge.as_bytes()))
}
