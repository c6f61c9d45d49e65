//! The CA's persistent state: its keys, enrollment records, one-time challenges and the
//! inventory of issued certificates.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{CertificateStatus, EnrollmentStatus, Pool, Store, StoreError, StoreResult, on_pool};

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct CaKeyRow {
    /// `ca` or `ra`.
    pub role: String,
    pub certificate: Vec<u8>,
    pub sealed_key: String,
    pub imported: bool,
    pub created_at: DateTime<Utc>,
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct EnrollmentRecord {
    pub id: String,
    pub for_user: Option<String>,
    pub for_device: Option<String>,
    /// The person (`users.id`) who signed in at the portal for this enrollment.
    pub user_id: Option<String>,
    pub requested_by: String,
    pub created_at: DateTime<Utc>,
    pub status: EnrollmentStatus,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct CertificateRecord {
    pub serial: String,
    pub enrollment_id: Option<String>,
    pub subject: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    pub status: CertificateStatus,
    pub revoked_at: Option<DateTime<Utc>>,
    pub revocation_reason: Option<String>,
    pub renewed_from: Option<String>,
    pub transaction_id: String,
    pub sender_nonce: String,
    pub der: Vec<u8>,
    pub issued_at: DateTime<Utc>,
}

/// What [`Store::scep_redemption`] read.
#[derive(Clone, Debug)]
pub struct Redemption {
    /// A certificate was issued under this transaction ID before.
    pub transaction_seen: bool,
    /// The enrollment the challenge redeems for, if it is unused and unexpired.
    pub enrollment: Option<EnrollmentRecord>,
}

#[derive(sqlx::FromRow)]
struct RedemptionRow {
    transaction_seen: bool,
    id: Option<String>,
    for_user: Option<String>,
    for_device: Option<String>,
    user_id: Option<String>,
    requested_by: Option<String>,
    created_at: Option<DateTime<Utc>>,
    status: Option<EnrollmentStatus>,
}

impl From<RedemptionRow> for Redemption {
    fn from(row: RedemptionRow) -> Self {
        let enrollment = match (row.id, row.requested_by, row.created_at, row.status) {
            (Some(id), Some(requested_by), Some(created_at), Some(status)) => {
                Some(EnrollmentRecord {
                    id,
                    for_user: row.for_user,
                    for_device: row.for_device,
                    user_id: row.user_id,
                    requested_by,
                    created_at,
                    status,
                })
            }
            _ => None,
        };
        Redemption {
            transaction_seen: row.transaction_seen,
            enrollment,
        }
    }
}

/// Why a challenge could not be redeemed. The requester is told only that it was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum RedeemRefusal {
    /// Unknown, already used, or expired (one query cannot tell, and need not).
    NotRedeemable,
}

/// Why a renewal could not be recorded.
#[derive(Debug, PartialEq, Eq)]
pub enum RenewalRefusal {
    /// The certificate was renewed already, or is no longer valid (revoked meanwhile).
    NotRenewable,
}

/// The outcome of recording a certificate under a SCEP transaction.
#[derive(Debug, PartialEq, Eq)]
pub enum Recorded {
    Issued,
    /// The same (transactionID, senderNonce) is recorded already (a concurrent replay won):
    /// nothing was written; the caller looks the transaction up again.
    Duplicate,
}

/// A certificate with who asked for it and what replaced it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct RequestedCertificate {
    #[sqlx(flatten)]
    pub certificate: CertificateRecord,
    /// SHA-256 (hex) of the SubjectPublicKeyInfo that signed the SCEP request; `None` for
    /// certificates recorded before it was kept (their signer key was the certified key).
    pub signer_key_sha256: Option<String>,
    /// The certificate a renewal issued in this one's place.
    pub superseded_by: Option<String>,
}

/// `SELECT <every certificate column> FROM certificates` followed by the given clause.
macro_rules! select_certificates {
    ($clause:literal) => {
        concat!(
            "SELECT serial, enrollment_id, subject, not_before, not_after, status, revoked_at, \
             revocation_reason, renewed_from, transaction_id, sender_nonce, der, issued_at \
             FROM certificates ",
            $clause
        )
    };
}

/// `SELECT <every certificate column>, signer_key_sha256, superseded_by FROM certificates`
/// followed by the given clause.
macro_rules! select_requested_certificates {
    ($clause:literal) => {
        concat!(
            "SELECT serial, enrollment_id, subject, not_before, not_after, status, revoked_at, \
             revocation_reason, renewed_from, transaction_id, sender_nonce, der, issued_at, \
             signer_key_sha256, superseded_by FROM certificates ",
            $clause
        )
    };
}

const INSERT_CERTIFICATE: &str = "INSERT INTO certificates (serial, enrollment_id, subject, \
     not_before, not_after, status, renewed_from, transaction_id, sender_nonce, der, issued_at, \
     signer_key_sha256) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)";

/// Redeems a one-time challenge ($13 now, $14 its hash, $15 its enrollment) and records the
/// certificate ($1–$12 as in [`INSERT_CERTIFICATE`]), on SQLite: two statements in one call,
/// inside the caller's transaction; both write a row, or the caller rolls back.
const SQLITE_REDEEM_AND_RECORD: &str = "INSERT INTO certificates (serial, enrollment_id, \
     subject, not_before, not_after, status, renewed_from, transaction_id, sender_nonce, der, \
     issued_at, signer_key_sha256) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12); \
     UPDATE scep_challenges SET redeemed_at = $13 \
     WHERE challenge_hash = $14 AND enrollment_id = $15 \
       AND redeemed_at IS NULL AND expires_at > $13";

/// The same on PostgreSQL in one statement: the certificate row is inserted only for the row
/// the UPDATE redeemed, and a unique violation undoes the UPDATE with it.
const POSTGRES_REDEEM_AND_RECORD: &str = "WITH redeemed AS (\
       UPDATE scep_challenges SET redeemed_at = $13 \
       WHERE challenge_hash = $14 AND enrollment_id = $15 \
         AND redeemed_at IS NULL AND expires_at > $13 \
       RETURNING 1) \
     INSERT INTO certificates (serial, enrollment_id, subject, not_before, not_after, status, \
       renewed_from, transaction_id, sender_nonce, der, issued_at, signer_key_sha256) \
     SELECT $1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12 FROM redeemed";

/// At most this many certificates are read back for one transaction ID (they are one or two:
/// a transaction ID belongs to one requester).
const TRANSACTION_ROWS: i64 = 16;

/// Filters for listing certificates; `before` is the `serial` of the last row of a page.
#[derive(Clone, Debug, Default)]
pub struct CertificateQuery {
    pub enrollment_id: Option<String>,
    pub status: Option<CertificateStatus>,
    pub after: Option<String>,
    pub limit: u32,
}

impl Store {
    pub async fn ca_keys(&self) -> StoreResult<Vec<CaKeyRow>> {
        let sql = "SELECT role, certificate, sealed_key, imported, created_at FROM ca_keys";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .fetch_all(pool)
            .await?))
    }

    /// Stores the CA (and RA) rows in one transaction; `Conflict` if a CA already exists.
    pub async fn insert_ca_keys(&self, rows: &[CaKeyRow]) -> StoreResult<()> {
        let sql = "INSERT INTO ca_keys (role, certificate, sealed_key, imported, created_at) \
                   VALUES ($1, $2, $3, $4, $5)";
        let result: Result<(), sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            for row in rows {
                sqlx::query(sql)
                    .bind(&row.role)
                    .bind(&row.certificate)
                    .bind(&row.sealed_key)
                    .bind(row.imported)
                    .bind(row.created_at)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        }
        .await);
        result.map_err(|e| StoreError::conflict_on_unique(e, "a CA already exists"))
    }

    pub async fn insert_enrollment(&self, e: &EnrollmentRecord) -> StoreResult<()> {
        let sql = "INSERT INTO enrollments (id, for_user, for_device, requested_by, created_at, \
                   status, user_id) VALUES ($1, $2, $3, $4, $5, $6, $7)";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(&e.id)
            .bind(&e.for_user)
            .bind(&e.for_device)
            .bind(&e.requested_by)
            .bind(e.created_at)
            .bind(e.status)
            .bind(&e.user_id)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    pub async fn enrollment(&self, id: &str) -> StoreResult<Option<EnrollmentRecord>> {
        let sql = "SELECT id, for_user, for_device, user_id, requested_by, created_at, status \
                   FROM enrollments WHERE id = $1";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(id)
            .fetch_optional(pool)
            .await?))
    }

    pub async fn insert_challenge(
        &self,
        challenge_hash: &str,
        enrollment_id: &str,
        created_at: DateTime<Utc>,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let sql = "INSERT INTO scep_challenges (challenge_hash, enrollment_id, created_at, \
                   expires_at) VALUES ($1, $2, $3, $4)";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(challenge_hash)
            .bind(enrollment_id)
            .bind(created_at)
            .bind(expires_at)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// The enrollment a challenge would redeem for, if it is unused and unexpired now. A read
    /// only: redemption happens in [`Store::redeem_challenge_and_record`].
    pub async fn redeemable_challenge(
        &self,
        challenge_hash: &str,
        now: DateTime<Utc>,
    ) -> StoreResult<Option<String>> {
        let sql = "SELECT enrollment_id FROM scep_challenges \
                   WHERE challenge_hash = $1 AND redeemed_at IS NULL AND expires_at > $2";
        Ok(on_pool!(self, |pool| sqlx::query_scalar(sql)
            .bind(challenge_hash)
            .bind(now)
            .fetch_optional(pool)
            .await?))
    }

    /// What a PKCSReq with this challenge and transaction ID needs from the database before
    /// anything is signed, in one query (one round trip, one hand-off to SQLite's thread):
    /// whether a certificate was issued under the transaction ID before (a retry: the caller
    /// then looks it up), and the enrollment the challenge redeems for if it is unused and
    /// unexpired now. A read only: redemption happens in [`Store::redeem_challenge_and_record`].
    pub async fn scep_redemption(
        &self,
        challenge_hash: &str,
        now: DateTime<Utc>,
        transaction_id: &str,
    ) -> StoreResult<Redemption> {
        let sql = "SELECT EXISTS (SELECT 1 FROM certificates WHERE transaction_id = $3) \
                     AS transaction_seen, \
                   e.id, e.for_user, e.for_device, e.user_id, e.requested_by, e.created_at, \
                   e.status \
                   FROM (SELECT 1 AS one) AS one \
                   LEFT JOIN scep_challenges c ON c.challenge_hash = $1 \
                     AND c.redeemed_at IS NULL AND c.expires_at > $2 \
                   LEFT JOIN enrollments e ON e.id = c.enrollment_id";
        let row: RedemptionRow = on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(challenge_hash)
            .bind(now)
            .bind(transaction_id)
            .fetch_one(pool)
            .await?);
        Ok(row.into())
    }

    /// Atomically marks the challenge used and records the certificate issued under it, with
    /// the key that signed the request. Of any number of concurrent redemptions of one
    /// challenge exactly one commits; the others are refused and leave nothing behind.
    ///
    /// The two writes are one statement on PostgreSQL (a data-modifying WITH, atomic on its
    /// own: one round trip instead of four) and one call inside `BEGIN IMMEDIATE … COMMIT` on
    /// SQLite, which has no data-modifying WITH (three hand-offs to its thread instead of four).
    pub async fn redeem_challenge_and_record(
        &self,
        challenge_hash: &str,
        enrollment_id: &str,
        now: DateTime<Utc>,
        certificate: &CertificateRecord,
        signer_key_sha256: &str,
    ) -> StoreResult<Result<Recorded, RedeemRefusal>> {
        let outcome: Result<Result<(), RedeemRefusal>, sqlx::Error> = match &self.pool {
            Pool::Sqlite(pool) => {
                async {
                    let mut tx = super::begin_write(pool).await?;
                    // The INSERT always writes its row (or fails, and the transaction is
                    // rolled back when dropped); the UPDATE writes one only if the challenge
                    // is still redeemable: two rows, or nothing is kept.
                    let written =
                        bind_certificate(sqlx::query(SQLITE_REDEEM_AND_RECORD), certificate)
                            .bind(signer_key_sha256)
                            .bind(now)
                            .bind(challenge_hash)
                            .bind(enrollment_id)
                            .execute(&mut *tx)
                            .await?
                            .rows_affected();
                    if written != 2 {
                        tx.rollback().await?;
                        return Ok(Err(RedeemRefusal::NotRedeemable));
                    }
                    tx.commit().await?;
                    Ok(Ok(()))
                }
                .await
            }
            Pool::Postgres(pool) => {
                bind_certificate(sqlx::query(POSTGRES_REDEEM_AND_RECORD), certificate)
                    .bind(signer_key_sha256)
                    .bind(now)
                    .bind(challenge_hash)
                    .bind(enrollment_id)
                    .execute(pool)
                    .await
                    .map(|done| match done.rows_affected() {
                        1 => Ok(()),
                        _ => Err(RedeemRefusal::NotRedeemable),
                    })
            }
        };
        recorded_or_duplicate(outcome)
    }

    /// Records a certificate issued under the static challenge.
    pub async fn record_certificate(
        &self,
        certificate: &CertificateRecord,
        signer_key_sha256: &str,
    ) -> StoreResult<Recorded> {
        let outcome: Result<Result<(), RedeemRefusal>, sqlx::Error> = on_pool!(self, |pool| {
            bind_certificate(sqlx::query(INSERT_CERTIFICATE), certificate)
                .bind(signer_key_sha256)
                .execute(pool)
                .await
                .map(|_| Ok(()))
        });
        match recorded_or_duplicate(outcome)? {
            Ok(recorded) => Ok(recorded),
            Err(RedeemRefusal::NotRedeemable) => Err(StoreError::Conflict(
                "certificate could not be recorded".into(),
            )),
        }
    }

    /// Records the certificate a RenewalReq issued and, in the same transaction, retires the one
    /// it renews: marked superseded, its `not_after` set to `retire_at` (the caller's
    /// min(not_after, end of the overlap the device needs to switch)). Of concurrent renewals of one
    /// certificate exactly one commits: a certificate is renewed once.
    pub async fn record_renewal(
        &self,
        certificate: &CertificateRecord,
        signer_key_sha256: &str,
        renewed: &str,
        retire_at: DateTime<Utc>,
    ) -> StoreResult<Result<Recorded, RenewalRefusal>> {
        let retire = "UPDATE certificates SET superseded_by = $1, \
                      not_after = $2 \
                      WHERE serial = $3 AND status = $4 AND superseded_by IS NULL";
        let outcome: Result<Result<(), RenewalRefusal>, sqlx::Error> =
            on_pool!(self, |pool| async {
                let mut tx = super::begin_write(pool).await?;
                let retired = sqlx::query(retire)
                    .bind(&certificate.serial)
                    .bind(retire_at)
                    .bind(renewed)
                    .bind(CertificateStatus::Valid)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                if retired != 1 {
                    tx.rollback().await?;
                    return Ok(Err(RenewalRefusal::NotRenewable));
                }
                bind_certificate(sqlx::query(INSERT_CERTIFICATE), certificate)
                    .bind(signer_key_sha256)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(Ok(()))
            }
            .await);
        // The renewed certificate's shortened life, to this node's MDM caches (apple::cache).
        self.local_changes().identity_changed();
        match outcome {
            Ok(Ok(())) => Ok(Ok(Recorded::Issued)),
            Ok(Err(refusal)) => Ok(Err(refusal)),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                Ok(Ok(Recorded::Duplicate))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Records a device certificate another CA issued (a device migrating from another MDM),
    /// under an enrollment record of its own, the first time the device presents it. Nothing
    /// happens when it is already recorded; the caller reads the row back either way.
    pub async fn record_migrated_certificate(
        &self,
        enrollment: &EnrollmentRecord,
        certificate: &CertificateRecord,
    ) -> StoreResult<()> {
        let enrollment_sql = "INSERT INTO enrollments (id, for_user, for_device, requested_by, \
                              created_at, status, user_id) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                              ON CONFLICT (id) DO NOTHING";
        let certificate_sql = "INSERT INTO certificates (serial, enrollment_id, subject, \
             not_before, not_after, status, renewed_from, transaction_id, sender_nonce, der, \
             issued_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) \
             ON CONFLICT DO NOTHING";
        let result: Result<(), sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            sqlx::query(enrollment_sql)
                .bind(&enrollment.id)
                .bind(&enrollment.for_user)
                .bind(&enrollment.for_device)
                .bind(&enrollment.requested_by)
                .bind(enrollment.created_at)
                .bind(enrollment.status)
                .bind(&enrollment.user_id)
                .execute(&mut *tx)
                .await?;
            bind_certificate(sqlx::query(certificate_sql), certificate)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
        .await);
        Ok(result?)
    }

    /// The certificates issued under a transaction ID, newest first, with their requesters.
    pub async fn transaction_certificates(
        &self,
        transaction_id: &str,
    ) -> StoreResult<Vec<RequestedCertificate>> {
        let sql = select_requested_certificates!(
            "WHERE transaction_id = $1 ORDER BY issued_at DESC, serial LIMIT $2"
        );
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(transaction_id)
            .bind(TRANSACTION_ROWS)
            .fetch_all(pool)
            .await?))
    }

    /// A certificate with its requester and what superseded it.
    pub async fn requested_certificate(
        &self,
        serial: &str,
    ) -> StoreResult<Option<RequestedCertificate>> {
        let sql = select_requested_certificates!("WHERE serial = $1");
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(serial)
            .fetch_optional(pool)
            .await?))
    }

    pub async fn certificate(&self, serial: &str) -> StoreResult<Option<CertificateRecord>> {
        let sql = select_certificates!("WHERE serial = $1");
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(serial)
            .fetch_optional(pool)
            .await?))
    }

    pub async fn list_certificates(
        &self,
        query: &CertificateQuery,
    ) -> StoreResult<Vec<CertificateRecord>> {
        let sql = select_certificates!(
            "WHERE ($1 IS NULL OR enrollment_id = $1) AND ($2 IS NULL OR status = $2) \
             AND ($3 IS NULL OR serial > $3) ORDER BY serial LIMIT $4"
        );
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(&query.enrollment_id)
            .bind(query.status)
            .bind(&query.after)
            .bind(i64::from(query.limit))
            .fetch_all(pool)
            .await?))
    }

    /// Revokes a valid certificate; `NotFound` when there is no such valid certificate.
    pub async fn revoke_certificate(
        &self,
        serial: &str,
        reason: &str,
        at: DateTime<Utc>,
    ) -> StoreResult<()> {
        let sql = "UPDATE certificates SET status = $1, revoked_at = $2, revocation_reason = $3 \
                   WHERE serial = $4 AND status = $5";
        let changed = on_pool!(self, |pool| sqlx::query(sql)
            .bind(CertificateStatus::Revoked)
            .bind(at)
            .bind(reason)
            .bind(serial)
            .bind(CertificateStatus::Valid)
            .execute(pool)
            .await?
            .rows_affected());
        // This node's MDM caches refuse the certificate at once (apple::cache).
        self.local_changes().identity_changed();
        if changed == 1 {
            Ok(())
        } else {
            Err(StoreError::NotFound)
        }
    }
}

/// A unique violation on (transaction_id, sender_nonce) means a concurrent replay won (or, at
/// 2^-128, a serial collided): nothing was written, and the caller looks the transaction up.
fn recorded_or_duplicate<R>(
    outcome: Result<Result<(), R>, sqlx::Error>,
) -> StoreResult<Result<Recorded, R>> {
    match outcome {
        Ok(Ok(())) => Ok(Ok(Recorded::Issued)),
        Ok(Err(refusal)) => Ok(Err(refusal)),
        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => Ok(Ok(Recorded::Duplicate)),
        Err(e) => Err(e.into()),
    }
}

fn bind_certificate<'q, DB: sqlx::Database>(
    query: sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>,
    c: &'q CertificateRecord,
) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments>
where
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Option<String>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    DateTime<Utc>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    CertificateStatus: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    Vec<u8>: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    query
        .bind(c.serial.clone())
        .bind(c.enrollment_id.clone())
        .bind(c.subject.clone())
        .bind(c.not_before)
        .bind(c.not_after)
        .bind(c.status)
        .bind(c.renewed_from.clone())
        .bind(c.transaction_id.clone())
        .bind(c.sender_nonce.clone())
        .bind(c.der.clone())
        .bind(c.issued_at)
}

/// A signing key other than the CA's (the profile signer), with its certificate.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct SigningKeyRow {
    pub purpose: String,
    pub certificate: Vec<u8>,
    pub sealed_key: String,
    pub created_at: DateTime<Utc>,
}

impl Store {
    pub async fn signing_key(&self, purpose: &str) -> StoreResult<Option<SigningKeyRow>> {
        let sql = "SELECT purpose, certificate, sealed_key, created_at FROM signing_keys \
                   WHERE purpose = $1";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(purpose)
            .fetch_optional(pool)
            .await?))
    }

    /// Stores a signing key unless one exists for the purpose (another node may have won).
    pub async fn insert_signing_key(&self, row: &SigningKeyRow) -> StoreResult<()> {
        let sql = "INSERT INTO signing_keys (purpose, certificate, sealed_key, created_at) \
                   VALUES ($1, $2, $3, $4) ON CONFLICT (purpose) DO NOTHING";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(&row.purpose)
            .bind(&row.certificate)
            .bind(&row.sealed_key)
            .bind(row.created_at)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }
}
