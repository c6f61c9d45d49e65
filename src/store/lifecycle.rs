//! An enrollment record's life on a device: bound by the first Authenticate with one of its
//! certificates, replaced when the device enrolls again with a fresh record, retired by an
//! admin or by that replacement. Each change is one write transaction, its audit record
//! included, so a retired enrollment never has a valid certificate, a pending command or a
//! push token left, on any node.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::json;

use super::audit::INSERT_AUDIT;
use super::mdm::DeviceFacts;
use super::states::pending_commands_sql;
use super::{
    CertificateStatus, ChannelStatus, CommandStatus, EnrollmentStatus, PushStatus,
    RetirementReason, Store, StoreError, StoreResult, on_pool,
};
use crate::config::ReenrollmentPolicy;

impl RetirementReason {
    /// The RFC 5280 reason its certificates are revoked with.
    fn revocation_reason(self) -> &'static str {
        match self {
            RetirementReason::Reenrolled => "superseded",
            RetirementReason::Retired => "cessationOfOperation",
        }
    }

    /// What the device's channels become: pending for the enrollment that replaces this one
    /// (until its TokenUpdate), checked out when nothing does.
    fn channel_status(self) -> ChannelStatus {
        match self {
            RetirementReason::Reenrolled => ChannelStatus::Pending,
            RetirementReason::Retired => ChannelStatus::CheckedOut,
        }
    }
}

/// How an Authenticate bound the device.
#[derive(Debug, PartialEq, Eq)]
pub enum Bound {
    /// Already bound to this record: its facts were refreshed.
    Refreshed,
    /// A device seen for the first time.
    Enrolled,
    /// The device moved from `previous`, which is now retired.
    Reenrolled { previous: String },
}

/// Why an Authenticate could not bind the device. The device is told none of this (see
/// `apple::service`): the reason is for the log.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BindRefusal {
    /// The device is enrolled under another active record and the re-enrollment policy says no.
    #[error("the device is enrolled under another enrollment and the policy '{}' refuses re-enrollment", .0.as_str())]
    DeviceBoundElsewhere(ReenrollmentPolicy),
    /// This enrollment record's certificate already speaks for another device.
    #[error("the enrollment record is bound to another device")]
    CertificateBoundElsewhere,
    /// This enrollment record was retired.
    #[error("the enrollment record is retired")]
    RecordRetired,
    /// The certificate names no enrollment record we have.
    #[error("the enrollment record does not exist")]
    UnknownRecord,
}

/// A device's enrollment, one per enrollment record it was bound to, for its history.
#[derive(Clone, Debug, Serialize)]
pub struct EnrollmentSpan {
    /// The enrollment record (`enrollments.id`).
    pub id: String,
    pub status: EnrollmentStatus,
    /// The person the record was issued to (`users.id`): the device's owner while it lasted.
    pub owner_id: Option<String>,
    pub requested_by: String,
    pub started_at: Option<DateTime<Utc>>,
    pub retired_at: Option<DateTime<Utc>>,
    pub retired_reason: Option<RetirementReason>,
    pub retired_by: Option<String>,
    /// The record that replaced this one when the device re-enrolled.
    pub superseded_by: Option<String>,
}

#[derive(sqlx::FromRow)]
struct SpanRow {
    id: String,
    status: EnrollmentStatus,
    user_id: Option<String>,
    requested_by: String,
    bound_at: Option<DateTime<Utc>>,
    retired_at: Option<DateTime<Utc>>,
    retired_reason: Option<RetirementReason>,
    retired_by: Option<String>,
    superseded_by: Option<String>,
}

impl SpanRow {
    fn into_span(self) -> EnrollmentSpan {
        EnrollmentSpan {
            id: self.id,
            status: self.status,
            owner_id: self.user_id,
            requested_by: self.requested_by,
            started_at: self.bound_at,
            retired_at: self.retired_at,
            retired_reason: self.retired_reason,
            retired_by: self.retired_by,
            superseded_by: self.superseded_by,
        }
    }
}

/// What retiring an enrollment did.
#[derive(Clone, Debug, Serialize)]
pub struct Retirement {
    pub enrollment_id: String,
    /// The device it was bound to, if any.
    pub udid: Option<String>,
    /// It was retired before this request: nothing changed.
    pub already_retired: bool,
    pub retired_at: Option<DateTime<Utc>>,
    pub retired_reason: Option<RetirementReason>,
    pub certificates_revoked: u64,
    pub commands_cancelled: u64,
}

/// Who retires an enrollment, for the audit record written with it.
#[derive(Clone, Debug, Default)]
pub struct RetireRequest {
    pub actor: String,
    pub request_id: Option<String>,
    pub source: Option<String>,
}

/// The audit action of each lifecycle change.
pub const AUDIT_ENROLL: &str = "device.enroll";
pub const AUDIT_REENROLL: &str = "device.reenroll";
pub const AUDIT_RETIRE: &str = "enrollment.retire";

/// How often an Authenticate that lost a race to a concurrent one for the same device is
/// tried again (on PostgreSQL; SQLite's write lock serialises them).
const BIND_ATTEMPTS: usize = 3;

enum Attempt {
    Done(Result<Bound, BindRefusal>),
    LostRace,
}

/// Retires enrollment record `$record` inside transaction `$tx`: marks it retired, revokes its
/// valid certificates, expires its unredeemed challenges and, when it is bound to device
/// `$udid`, cancels the device's pending commands and forgets its push tokens. Evaluates to
/// `(certificates revoked, commands cancelled)`.
macro_rules! retire_in_tx {
    ($tx:ident, $record:expr, $udid:expr, $now:expr, $reason:expr, $by:expr, $superseded_by:expr) => {
        async {
            let reason: RetirementReason = $reason;
            let udid: Option<&str> = $udid;
            sqlx::query(
                "UPDATE enrollments SET status = $2, retired_at = $3, retired_reason = $4, \
                 retired_by = $5, superseded_by = $6 WHERE id = $1 AND status <> $2",
            )
            .bind($record)
            .bind(EnrollmentStatus::Retired)
            .bind($now)
            .bind(reason)
            .bind($by)
            .bind($superseded_by)
            .execute(&mut *$tx)
            .await?;
            let revoked = sqlx::query(
                "UPDATE certificates SET status = $2, revoked_at = $3, revocation_reason = $4 \
                 WHERE enrollment_id = $1 AND status = $5",
            )
            .bind($record)
            .bind(CertificateStatus::Revoked)
            .bind($now)
            .bind(reason.revocation_reason())
            .bind(CertificateStatus::Valid)
            .execute(&mut *$tx)
            .await?
            .rows_affected();
            // A challenge not yet redeemed would mint a certificate for a retired record.
            sqlx::query(
                "UPDATE scep_challenges SET expires_at = $2 \
                 WHERE enrollment_id = $1 AND redeemed_at IS NULL AND expires_at > $2",
            )
            .bind($record)
            .bind($now)
            .execute(&mut *$tx)
            .await?;
            // Its per-device tokens (tokens::device) fail introspection from this commit on.
            sqlx::query(
                "UPDATE device_tokens SET status = 'revoked', revoked_at = $2, \
                 revoked_reason = $3 WHERE enrollment_id = $1 AND status = 'active'",
            )
            .bind($record)
            .bind($now)
            .bind(reason.as_str())
            .execute(&mut *$tx)
            .await?;
            let mut cancelled = 0;
            if let Some(udid) = udid {
                cancelled = sqlx::query(concat!(
                    "UPDATE mdm_commands SET status = $3, answered_at = $2 \
                     WHERE enrollment_id IN (SELECT id FROM mdm_enrollments WHERE udid = $1) \
                     AND status IN ",
                    pending_commands_sql!()
                ))
                .bind(udid)
                .bind($now)
                .bind(CommandStatus::Cancelled)
                .execute(&mut *$tx)
                .await?
                .rows_affected();
                sqlx::query(
                    "UPDATE mdm_enrollments SET status = $2, push_token = NULL, \
                     push_magic = NULL, unlock_token = NULL, push_status = $4, \
                     updated_at = $3 WHERE udid = $1",
                )
                .bind(udid)
                .bind(reason.channel_status())
                .bind($now)
                .bind(PushStatus::Unknown)
                .execute(&mut *$tx)
                .await?;
                sqlx::query(
                    "UPDATE mdm_devices SET bootstrap_token = NULL, updated_at = $2 \
                     WHERE udid = $1",
                )
                .bind(udid)
                .bind($now)
                .execute(&mut *$tx)
                .await?;
            }
            Ok::<(u64, u64), sqlx::Error>((revoked, cancelled))
        }
    };
}

impl Store {
    /// Authenticate: binds device `udid` to enrollment record `record_id` (the record of the
    /// certificate that signed). A device bound to this record already is refreshed. A device
    /// bound to another record moves to this one when the record is fresh (never bound, not
    /// retired) and `policy` allows it: the other record is retired in the same transaction
    /// (certificates revoked, queue cancelled, push tokens forgotten) and the new record's
    /// person becomes the owner. Every channel of the device goes back to `pending` until its
    /// next TokenUpdate, because Authenticate means the device (re)enrolled.
    pub async fn authenticate_device(
        &self,
        udid: &str,
        record_id: &str,
        topic: &str,
        facts: &DeviceFacts,
        policy: ReenrollmentPolicy,
    ) -> StoreResult<Result<Bound, BindRefusal>> {
        for _ in 0..BIND_ATTEMPTS {
            let attempt = self
                .try_authenticate(udid, record_id, topic, facts, policy)
                .await;
            // Whatever happened, this node's MDM caches look again (cache hook).
            self.local_changes().identity_changed();
            match attempt? {
                Attempt::Done(outcome) => return Ok(outcome),
                Attempt::LostRace => continue,
            }
        }
        Err(StoreError::Conflict(
            "the device's enrollment kept changing under concurrent Authenticates".into(),
        ))
    }

    async fn try_authenticate(
        &self,
        udid: &str,
        record_id: &str,
        topic: &str,
        facts: &DeviceFacts,
        policy: ReenrollmentPolicy,
    ) -> StoreResult<Attempt> {
        let now = super::now();
        let actor = format!("device:{udid}");
        let outcome: Result<Attempt, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            // Lock the device's row first (a no-op write: SQLite's BEGIN IMMEDIATE holds
            // the lock already), so that on PostgreSQL concurrent Authenticates of one
            // device queue here and each reads what the one before it wrote.
            sqlx::query("UPDATE mdm_devices SET updated_at = updated_at WHERE udid = $1")
                .bind(udid)
                .execute(&mut *tx)
                .await?;
            let record: Option<(EnrollmentStatus, Option<String>)> =
                sqlx::query_as("SELECT status, user_id FROM enrollments WHERE id = $1")
                    .bind(record_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            let Some((status, owner)) = record else {
                return Ok(Attempt::Done(Err(BindRefusal::UnknownRecord)));
            };
            if status == EnrollmentStatus::Retired {
                return Ok(Attempt::Done(Err(BindRefusal::RecordRetired)));
            }
            let bound: Option<(String, Option<String>)> =
                sqlx::query_as("SELECT enrollment_id, owner_id FROM mdm_devices WHERE udid = $1")
                    .bind(udid)
                    .fetch_optional(&mut *tx)
                    .await?;

            if let Some((current, _)) = &bound
                && current == record_id
            {
                sqlx::query(
                    "UPDATE mdm_devices SET serial_number = $2, model = $3, \
                         model_name = $4, product_name = $5, device_name = $6, \
                         os_version = $7, build_version = $8, topic = $9, \
                         authenticated_at = $10, updated_at = $10 WHERE udid = $1",
                )
                .bind(udid)
                .bind(&facts.serial_number)
                .bind(&facts.model)
                .bind(&facts.model_name)
                .bind(&facts.product_name)
                .bind(&facts.device_name)
                .bind(&facts.os_version)
                .bind(&facts.build_version)
                .bind(topic)
                .bind(now)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE mdm_enrollments SET status = $3, updated_at = $2 \
                         WHERE udid = $1 AND status = $4",
                )
                .bind(udid)
                .bind(now)
                .bind(ChannelStatus::Pending)
                .bind(ChannelStatus::Active)
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
                return Ok(Attempt::Done(Ok(Bound::Refreshed)));
            }

            // Only a record no device has used may enroll one.
            let taken: Option<String> =
                sqlx::query_scalar("SELECT udid FROM mdm_devices WHERE enrollment_id = $1")
                    .bind(record_id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if !status.is_fresh() || taken.is_some() {
                return Ok(Attempt::Done(Err(BindRefusal::CertificateBoundElsewhere)));
            }

            let previous = match &bound {
                None => None,
                Some((current, current_owner)) => {
                    let current_status: Option<EnrollmentStatus> =
                        sqlx::query_scalar("SELECT status FROM enrollments WHERE id = $1")
                            .bind(current)
                            .fetch_optional(&mut *tx)
                            .await?;
                    // An enrollment an admin retired holds the device no longer.
                    let released = current_status == Some(EnrollmentStatus::Retired);
                    let allowed = released
                        || match policy {
                            ReenrollmentPolicy::Allow => true,
                            ReenrollmentPolicy::SameOwner => *current_owner == owner,
                            ReenrollmentPolicy::Deny => false,
                        };
                    if !allowed {
                        return Ok(Attempt::Done(Err(BindRefusal::DeviceBoundElsewhere(
                            policy,
                        ))));
                    }
                    Some((current.clone(), current_owner.clone()))
                }
            };

            // Claim the record: of concurrent Authenticates with it, one gets it.
            // (The fresh statuses, as `EnrollmentStatus::is_fresh` names them.)
            let claimed = sqlx::query(
                "UPDATE enrollments SET status = $2, udid = $3, bound_at = $4 \
                     WHERE id = $1 AND status IN ($5, $6)",
            )
            .bind(record_id)
            .bind(EnrollmentStatus::Active)
            .bind(udid)
            .bind(now)
            .bind(EnrollmentStatus::Pending)
            .bind(EnrollmentStatus::Migrated)
            .execute(&mut *tx)
            .await?
            .rows_affected();
            if claimed != 1 {
                tx.rollback().await?;
                return Ok(Attempt::Done(Err(BindRefusal::CertificateBoundElsewhere)));
            }

            let mut detail = json!({"enrollment": record_id, "owner": owner});
            match &previous {
                None => {
                    // The device belongs to whoever the enrollment record was issued to.
                    let inserted = sqlx::query(
                        "INSERT INTO mdm_devices (udid, enrollment_id, serial_number, model, \
                             model_name, product_name, device_name, os_version, build_version, \
                             topic, authenticated_at, updated_at, owner_id, owner_bound_at) \
                             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, $12, \
                             CASE WHEN $12 IS NULL THEN NULL ELSE $11 END)",
                    )
                    .bind(udid)
                    .bind(record_id)
                    .bind(&facts.serial_number)
                    .bind(&facts.model)
                    .bind(&facts.model_name)
                    .bind(&facts.product_name)
                    .bind(&facts.device_name)
                    .bind(&facts.os_version)
                    .bind(&facts.build_version)
                    .bind(topic)
                    .bind(now)
                    .bind(&owner)
                    .execute(&mut *tx)
                    .await;
                    match inserted {
                        Ok(_) => {}
                        // A concurrent Authenticate of the same device with another record
                        // won: try again, against what it wrote.
                        Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                            tx.rollback().await?;
                            return Ok(Attempt::LostRace);
                        }
                        Err(e) => return Err(e),
                    }
                }
                Some((current, current_owner)) => {
                    let moved = sqlx::query(
                        "UPDATE mdm_devices SET enrollment_id = $2, serial_number = $3, \
                             model = $4, model_name = $5, product_name = $6, device_name = $7, \
                             os_version = $8, build_version = $9, topic = $10, \
                             authenticated_at = $11, updated_at = $11, owner_id = $12, \
                             owner_bound_at = CASE WHEN $12 IS NULL THEN NULL ELSE $11 END \
                             WHERE udid = $1 AND enrollment_id = $13",
                    )
                    .bind(udid)
                    .bind(record_id)
                    .bind(&facts.serial_number)
                    .bind(&facts.model)
                    .bind(&facts.model_name)
                    .bind(&facts.product_name)
                    .bind(&facts.device_name)
                    .bind(&facts.os_version)
                    .bind(&facts.build_version)
                    .bind(topic)
                    .bind(now)
                    .bind(&owner)
                    .bind(current)
                    .execute(&mut *tx)
                    .await?
                    .rows_affected();
                    if moved != 1 {
                        tx.rollback().await?;
                        return Ok(Attempt::LostRace);
                    }
                    let (revoked, cancelled) = retire_in_tx!(
                        tx,
                        current,
                        Some(udid),
                        now,
                        RetirementReason::Reenrolled,
                        &actor,
                        Some(record_id)
                    )
                    .await?;
                    detail = json!({
                        "enrollment": record_id, "owner": owner,
                        "previous_enrollment": current, "previous_owner": current_owner,
                        "certificates_revoked": revoked, "commands_cancelled": cancelled,
                        "policy": policy.as_str(),
                    });
                }
            }
            sqlx::query(
                "UPDATE mdm_enrollments SET status = $3, updated_at = $2 \
                     WHERE udid = $1 AND status = $4",
            )
            .bind(udid)
            .bind(now)
            .bind(ChannelStatus::Pending)
            .bind(ChannelStatus::Active)
            .execute(&mut *tx)
            .await?;
            let action = if previous.is_some() {
                AUDIT_REENROLL
            } else {
                AUDIT_ENROLL
            };
            sqlx::query(INSERT_AUDIT)
                .bind(now)
                .bind(&actor)
                .bind(action)
                .bind(udid)
                .bind(crate::audit::OUTCOME_SUCCESS)
                .bind(detail.to_string())
                .bind(None::<String>)
                .bind(None::<String>)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Attempt::Done(Ok(match previous {
                None => Bound::Enrolled,
                Some((previous, _)) => Bound::Reenrolled { previous },
            })))
        }
        .await);
        Ok(outcome?)
    }

    /// Retires enrollment `id` — an enrollment record, or a command channel (a UDID), meaning
    /// the record its device is bound to — and audits it in the same transaction. Its
    /// certificates are revoked, so both MDM channels refuse them from the next request on
    /// every node; its device's queue is cancelled and its channels checked out. Retiring a
    /// retired enrollment changes nothing and says so. `None`: no such enrollment.
    pub async fn retire_enrollment(
        &self,
        id: &str,
        by: &RetireRequest,
    ) -> StoreResult<Option<Retirement>> {
        let now = super::now();
        let reason = RetirementReason::Retired;
        let outcome: Result<Option<Retirement>, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let mut record: Option<String> =
                sqlx::query_scalar("SELECT id FROM enrollments WHERE id = $1")
                    .bind(id)
                    .fetch_optional(&mut *tx)
                    .await?;
            if record.is_none() {
                record = sqlx::query_scalar(
                    "SELECT d.enrollment_id FROM mdm_enrollments e \
                         JOIN mdm_devices d ON d.udid = e.udid WHERE e.id = $1",
                )
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            }
            let Some(record) = record else {
                return Ok(None);
            };
            let (status, retired_at, retired_reason): (
                EnrollmentStatus,
                Option<DateTime<Utc>>,
                Option<RetirementReason>,
            ) = sqlx::query_as(
                "SELECT status, retired_at, retired_reason FROM enrollments WHERE id = $1",
            )
            .bind(&record)
            .fetch_one(&mut *tx)
            .await?;
            let udid: Option<String> =
                sqlx::query_scalar("SELECT udid FROM mdm_devices WHERE enrollment_id = $1")
                    .bind(&record)
                    .fetch_optional(&mut *tx)
                    .await?;
            let already = status == EnrollmentStatus::Retired;
            let retirement = if already {
                Retirement {
                    enrollment_id: record.clone(),
                    udid,
                    already_retired: true,
                    retired_at,
                    retired_reason,
                    certificates_revoked: 0,
                    commands_cancelled: 0,
                }
            } else {
                let (revoked, cancelled) = retire_in_tx!(
                    tx,
                    &record,
                    udid.as_deref(),
                    now,
                    reason,
                    &by.actor,
                    None::<String>
                )
                .await?;
                Retirement {
                    enrollment_id: record.clone(),
                    udid,
                    already_retired: false,
                    retired_at: Some(now),
                    retired_reason: Some(reason),
                    certificates_revoked: revoked,
                    commands_cancelled: cancelled,
                }
            };
            let detail = json!({
                "requested": id, "device": retirement.udid,
                "already_retired": retirement.already_retired,
                "certificates_revoked": retirement.certificates_revoked,
                "commands_cancelled": retirement.commands_cancelled,
            });
            sqlx::query(INSERT_AUDIT)
                .bind(now)
                .bind(&by.actor)
                .bind(AUDIT_RETIRE)
                .bind(&record)
                .bind(crate::audit::OUTCOME_SUCCESS)
                .bind(detail.to_string())
                .bind(&by.request_id)
                .bind(&by.source)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Some(retirement))
        }
        .await);
        // This node's MDM caches drop the retired device at once (cache hook).
        self.local_changes().identity_changed();
        Ok(outcome?)
    }

    /// The enrollments device `udid` has had, oldest first (within one second, the current
    /// one last).
    pub async fn enrollment_history(&self, udid: &str) -> StoreResult<Vec<EnrollmentSpan>> {
        let sql = "SELECT id, status, user_id, requested_by, bound_at, retired_at, \
                   retired_reason, retired_by, superseded_by FROM enrollments \
                   WHERE udid = $1 \
                   ORDER BY bound_at, CASE WHEN retired_at IS NULL THEN 1 ELSE 0 END, \
                   retired_at, id";
        let rows: Vec<SpanRow> = on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(udid)
            .fetch_all(pool)
            .await?);
        Ok(rows.into_iter().map(SpanRow::into_span).collect())
    }
}
