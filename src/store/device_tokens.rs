//! Per-device signed tokens and the keys that sign them (`token_signing_keys`,
//! `device_tokens`). Private keys and issued tokens arrive here sealed; nothing here signs or
//! verifies (that is `tokens::device`).

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{EnrollmentStatus, Store, StoreError, StoreResult, on_pool};

/// Where a token signing key stands (`token_signing_keys.status`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SigningKeyStatus {
    /// Published in the JWKS, not signing yet: verifiers learn it before they meet it.
    Next,
    /// Signs new tokens.
    Current,
    /// Signs no more; published while a token it signed has not expired.
    Retired,
}

impl SigningKeyStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SigningKeyStatus::Next => "next",
            SigningKeyStatus::Current => "current",
            SigningKeyStatus::Retired => "retired",
        }
    }
}

impl fmt::Display for SigningKeyStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A signing key status this version does not know.
#[derive(Debug, thiserror::Error)]
#[error("unknown token signing key status '{0}'")]
pub struct UnknownSigningKeyStatus(String);

impl FromStr for SigningKeyStatus {
    type Err = UnknownSigningKeyStatus;
    fn from_str(value: &str) -> Result<Self, UnknownSigningKeyStatus> {
        match value {
            "next" => Ok(SigningKeyStatus::Next),
            "current" => Ok(SigningKeyStatus::Current),
            "retired" => Ok(SigningKeyStatus::Retired),
            other => Err(UnknownSigningKeyStatus(other.to_owned())),
        }
    }
}

impl TryFrom<String> for SigningKeyStatus {
    type Error = UnknownSigningKeyStatus;
    fn try_from(value: String) -> Result<Self, UnknownSigningKeyStatus> {
        value.parse()
    }
}

impl Serialize for SigningKeyStatus {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

/// A token signing key as stored.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct TokenSigningKeyRow {
    pub kid: String,
    pub algorithm: String,
    /// The public key's JWK members (JSON).
    pub public_jwk: String,
    /// PKCS#8, sealed with the master key.
    pub private_key: String,
    #[sqlx(try_from = "String")]
    pub status: SigningKeyStatus,
    pub created_at: DateTime<Utc>,
    pub activated_at: Option<DateTime<Utc>>,
    pub retired_at: Option<DateTime<Utc>>,
}

/// A token signing key to insert.
pub struct NewTokenSigningKey {
    pub kid: String,
    pub algorithm: &'static str,
    pub public_jwk: String,
    pub private_key: String,
    pub status: SigningKeyStatus,
}

/// A per-device token as stored (the JWT itself sealed).
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DeviceTokenRow {
    pub jti: String,
    pub enrollment_id: String,
    pub udid: String,
    pub integration: String,
    pub kid: String,
    pub token: String,
    pub claims_hash: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    pub status: String,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revoked_reason: Option<String>,
}

/// What introspection needs to know about a token beyond its signature.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DeviceTokenStanding {
    pub enrollment_id: String,
    pub udid: String,
    pub integration: String,
    pub kid: String,
    pub status: String,
    pub expires_at: DateTime<Utc>,
    pub enrollment_status: EnrollmentStatus,
}

/// What [`Store::insert_device_token`] did.
#[derive(Debug)]
pub enum DeviceTokenInsert {
    Inserted,
    /// Another caller issued a fresh token first: that one stands, this one was not stored.
    Existing(Box<DeviceTokenRow>),
    /// The enrollment record is not active with that device (retired, never bound, unknown).
    EnrollmentNotActive,
}

/// The spelling of device token states in `device_tokens.status`.
pub const DEVICE_TOKEN_ACTIVE: &str = "active";
pub const DEVICE_TOKEN_REVOKED: &str = "revoked";

/// `SELECT <every column> FROM device_tokens t` followed by the given clause.
macro_rules! select_device_tokens {
    ($clause:literal) => {
        concat!(
            "SELECT t.jti, t.enrollment_id, t.udid, t.integration, t.kid, t.token, \
             t.claims_hash, t.issued_at, t.expires_at, t.status, t.revoked_at, \
             t.revoked_reason FROM device_tokens t ",
            $clause
        )
    };
}

/// `SELECT <every column> FROM token_signing_keys` followed by the given clause.
macro_rules! select_signing_keys {
    ($clause:literal) => {
        concat!(
            "SELECT kid, algorithm, public_jwk, private_key, status, created_at, activated_at, \
             retired_at FROM token_signing_keys ",
            $clause
        )
    };
}

/// The newest active token of an active enrollment for an integration, with the given claims,
/// that expires after a time: `$1` enrollment, `$2` integration, `$3` claims hash, `$4` time,
/// `$5` the active enrollment status.
const FRESH_TOKEN: &str = select_device_tokens!(
    "JOIN enrollments e ON e.id = t.enrollment_id \
     WHERE t.enrollment_id = $1 AND t.integration = $2 AND t.claims_hash = $3 \
     AND t.expires_at > $4 AND t.status = 'active' AND e.status = $5 \
     ORDER BY t.expires_at DESC, t.jti LIMIT 1"
);

const INSERT_SIGNING_KEY: &str = "INSERT INTO token_signing_keys \
    (kid, algorithm, public_jwk, private_key, status, created_at, activated_at) \
    VALUES ($1, $2, $3, $4, $5, $6, $7)";

impl Store {
    /// Every token signing key, newest first.
    pub async fn token_signing_keys(&self) -> StoreResult<Vec<TokenSigningKeyRow>> {
        let sql = select_signing_keys!("ORDER BY created_at DESC, kid");
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .fetch_all(pool)
            .await?))
    }

    /// The keys the JWKS publishes: next, current, and retired ones that signed a token not
    /// yet expired at `now`.
    pub async fn published_token_signing_keys(
        &self,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<TokenSigningKeyRow>> {
        let sql = select_signing_keys!(
            "k WHERE k.status IN ('next', 'current') OR EXISTS (SELECT 1 FROM device_tokens t \
             WHERE t.kid = k.kid AND t.expires_at > $1) ORDER BY k.created_at DESC, k.kid"
        );
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(now)
            .fetch_all(pool)
            .await?))
    }

    pub async fn token_signing_key(&self, kid: &str) -> StoreResult<Option<TokenSigningKeyRow>> {
        let sql = select_signing_keys!("WHERE kid = $1");
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(kid)
            .fetch_optional(pool)
            .await?))
    }

    /// The key that signs now, if any was made.
    pub async fn current_token_signing_key(&self) -> StoreResult<Option<TokenSigningKeyRow>> {
        let sql = select_signing_keys!("WHERE status = 'current'");
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .fetch_optional(pool)
            .await?))
    }

    /// The first keys: a current and a next one, in one transaction. `Ok(false)`: keys exist
    /// already (another node made them first), nothing was written.
    pub async fn insert_first_token_signing_keys(
        &self,
        current: &NewTokenSigningKey,
        next: &NewTokenSigningKey,
        now: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let outcome: Result<bool, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let existing: i64 = sqlx::query_scalar(
                "SELECT COUNT(*) FROM token_signing_keys WHERE status IN ('current', 'next')",
            )
            .fetch_one(&mut *tx)
            .await?;
            if existing > 0 {
                return Ok(false);
            }
            for key in [current, next] {
                let activated = (key.status == SigningKeyStatus::Current).then_some(now);
                let inserted = sqlx::query(INSERT_SIGNING_KEY)
                    .bind(&key.kid)
                    .bind(key.algorithm)
                    .bind(&key.public_jwk)
                    .bind(&key.private_key)
                    .bind(key.status.as_str())
                    .bind(now)
                    .bind(activated)
                    .execute(&mut *tx)
                    .await;
                match inserted {
                    Ok(_) => {}
                    // A concurrent first use on another node won (PostgreSQL): use its keys.
                    Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                        tx.rollback().await?;
                        return Ok(false);
                    }
                    Err(e) => return Err(e),
                }
            }
            tx.commit().await?;
            Ok(true)
        }
        .await);
        Ok(outcome?)
    }

    /// Rotates in one transaction: `current_kid` retires, `next_kid` starts signing and
    /// `new_next` is published as the next key. `Conflict` when the keys are no longer those
    /// (a concurrent rotation).
    pub async fn rotate_token_signing_keys(
        &self,
        current_kid: &str,
        next_kid: &str,
        new_next: &NewTokenSigningKey,
        now: DateTime<Utc>,
    ) -> StoreResult<()> {
        let outcome: Result<bool, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let retired = sqlx::query(
                "UPDATE token_signing_keys SET status = 'retired', retired_at = $2 \
                 WHERE kid = $1 AND status = 'current'",
            )
            .bind(current_kid)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            let promoted = sqlx::query(
                "UPDATE token_signing_keys SET status = 'current', activated_at = $2 \
                 WHERE kid = $1 AND status = 'next'",
            )
            .bind(next_kid)
            .bind(now)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if retired != 1 || promoted != 1 {
                tx.rollback().await?;
                return Ok(false);
            }
            let inserted = sqlx::query(INSERT_SIGNING_KEY)
                .bind(&new_next.kid)
                .bind(new_next.algorithm)
                .bind(&new_next.public_jwk)
                .bind(&new_next.private_key)
                .bind(SigningKeyStatus::Next.as_str())
                .bind(now)
                .bind(None::<DateTime<Utc>>)
                .execute(&mut *tx)
                .await;
            match inserted {
                Ok(_) => {}
                Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                    tx.rollback().await?;
                    return Ok(false);
                }
                Err(e) => return Err(e),
            }
            tx.commit().await?;
            Ok(true)
        }
        .await);
        if outcome? {
            Ok(())
        } else {
            Err(StoreError::Conflict(
                "the signing keys changed during the rotation (another rotation?); list them \
                 and try again"
                    .into(),
            ))
        }
    }

    /// The newest active token of enrollment `enrollment_id` (while it is active) for
    /// `integration` with claims `claims_hash`, if it expires after `fresh_after`.
    pub async fn fresh_device_token(
        &self,
        enrollment_id: &str,
        integration: &str,
        claims_hash: &str,
        fresh_after: DateTime<Utc>,
    ) -> StoreResult<Option<DeviceTokenRow>> {
        Ok(on_pool!(self, |pool| sqlx::query_as(FRESH_TOKEN)
            .bind(enrollment_id)
            .bind(integration)
            .bind(claims_hash)
            .bind(fresh_after)
            .bind(EnrollmentStatus::Active)
            .fetch_optional(pool)
            .await?))
    }

    /// Stores a token just signed, unless the enrollment record is not active with that device,
    /// or a fresh token (expiring after `fresh_after`, same claims) was stored meanwhile: of
    /// concurrent issuers for one enrollment, one token is kept and the others get it back.
    pub async fn insert_device_token(
        &self,
        token: &DeviceTokenRow,
        fresh_after: DateTime<Utc>,
    ) -> StoreResult<DeviceTokenInsert> {
        let outcome: Result<DeviceTokenInsert, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            // Locks the enrollment row (PostgreSQL) for the rest of the transaction, so that
            // concurrent issuers queue here and a retirement cannot slip in between.
            let active = sqlx::query(
                "UPDATE enrollments SET status = status \
                 WHERE id = $1 AND status = $2 AND udid = $3",
            )
            .bind(&token.enrollment_id)
            .bind(EnrollmentStatus::Active)
            .bind(&token.udid)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if active != 1 {
                tx.rollback().await?;
                return Ok(DeviceTokenInsert::EnrollmentNotActive);
            }
            let existing: Option<DeviceTokenRow> = sqlx::query_as(FRESH_TOKEN)
                .bind(&token.enrollment_id)
                .bind(&token.integration)
                .bind(&token.claims_hash)
                .bind(fresh_after)
                .bind(EnrollmentStatus::Active)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(existing) = existing {
                tx.rollback().await?;
                return Ok(DeviceTokenInsert::Existing(Box::new(existing)));
            }
            sqlx::query(
                "INSERT INTO device_tokens (jti, enrollment_id, udid, integration, kid, token, \
                 claims_hash, issued_at, expires_at, status) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
            )
            .bind(&token.jti)
            .bind(&token.enrollment_id)
            .bind(&token.udid)
            .bind(&token.integration)
            .bind(&token.kid)
            .bind(&token.token)
            .bind(&token.claims_hash)
            .bind(token.issued_at)
            .bind(token.expires_at)
            .bind(DEVICE_TOKEN_ACTIVE)
            .execute(&mut *tx)
            .await?;
            tx.commit().await?;
            Ok(DeviceTokenInsert::Inserted)
        }
        .await);
        Ok(outcome?)
    }

    /// Revokes the active tokens of enrollment `enrollment_id` (for one integration, or all);
    /// returns how many.
    pub async fn revoke_device_tokens(
        &self,
        enrollment_id: &str,
        integration: Option<&str>,
        reason: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<u64> {
        let sql = "UPDATE device_tokens SET status = 'revoked', revoked_at = $3, \
                   revoked_reason = $4 WHERE enrollment_id = $1 AND status = 'active' \
                   AND (integration = $2 OR $2 IS NULL)";
        Ok(on_pool!(self, |pool| sqlx::query(sql)
            .bind(enrollment_id)
            .bind(integration)
            .bind(now)
            .bind(reason)
            .execute(pool)
            .await?
            .rows_affected()))
    }

    /// A token's row and its enrollment's status, by jti.
    pub async fn device_token_standing(
        &self,
        jti: &str,
    ) -> StoreResult<Option<DeviceTokenStanding>> {
        let sql = "SELECT t.enrollment_id, t.udid, t.integration, t.kid, t.status, t.expires_at, \
                   e.status AS enrollment_status FROM device_tokens t \
                   JOIN enrollments e ON e.id = t.enrollment_id WHERE t.jti = $1";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(jti)
            .fetch_optional(pool)
            .await?))
    }

    /// The tokens issued for enrollment `enrollment_id` that have not expired at `now`, newest
    /// first (sealed values included: callers show only what they should).
    pub async fn device_tokens_of(
        &self,
        enrollment_id: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<DeviceTokenRow>> {
        let sql = select_device_tokens!(
            "WHERE t.enrollment_id = $1 AND t.expires_at > $2 \
             ORDER BY t.issued_at DESC, t.jti"
        );
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(enrollment_id)
            .bind(now)
            .fetch_all(pool)
            .await?))
    }

    /// Forgets tokens that expired before `before`; returns how many.
    pub async fn purge_device_tokens(&self, before: DateTime<Utc>) -> StoreResult<u64> {
        let sql = "DELETE FROM device_tokens WHERE expires_at < $1";
        Ok(on_pool!(self, |pool| sqlx::query(sql)
            .bind(before)
            .execute(pool)
            .await?
            .rows_affected()))
    }
}
