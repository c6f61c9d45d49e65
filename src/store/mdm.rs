//! Apple MDM state: devices (bound to the enrollment record whose certificate first
//! authenticated them), their command channels ("enrollments"), and the command queue.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::states::{offered_commands_sql, pending_commands_sql};
use super::{
    ChannelStatus, ChannelType, CommandStatus, PushStatus, Store, StoreError, StoreResult, on_pool,
};

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct DeviceRecord {
    /// The UDID, or the EnrollmentID of a User Enrollment.
    pub udid: String,
    /// The enrollment record (`enrollments.id`) whose certificates may speak for this device.
    pub enrollment_id: String,
    pub serial_number: Option<String>,
    pub model: Option<String>,
    pub model_name: Option<String>,
    pub product_name: Option<String>,
    pub device_name: Option<String>,
    pub os_version: Option<String>,
    pub build_version: Option<String>,
    pub topic: String,
    /// JSON: the last DeviceInformation QueryResponses.
    pub inventory: Option<String>,
    /// JSON: the last ProfileList.
    pub profiles: Option<String>,
    #[serde(skip)]
    pub bootstrap_token: Option<String>,
    pub authenticated_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// The person (`users.id`) the device was enrolled for, bound at its first Authenticate.
    pub owner_id: Option<String>,
    pub owner_bound_at: Option<DateTime<Utc>>,
}

/// What an Authenticate says about a device.
#[derive(Clone, Debug, Default)]
pub struct DeviceFacts {
    pub serial_number: Option<String>,
    pub model: Option<String>,
    pub model_name: Option<String>,
    pub product_name: Option<String>,
    pub device_name: Option<String>,
    pub os_version: Option<String>,
    pub build_version: Option<String>,
}

/// A command channel: the device channel, or a user channel on it.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct MdmEnrollment {
    pub id: String,
    pub udid: String,
    pub channel: ChannelType,
    pub user_id: Option<String>,
    pub user_short_name: Option<String>,
    pub user_long_name: Option<String>,
    #[serde(skip)]
    pub push_token: Option<String>,
    #[serde(skip)]
    pub push_magic: Option<String>,
    #[serde(skip)]
    pub unlock_token: Option<String>,
    pub status: ChannelStatus,
    pub push_status: PushStatus,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub last_seen_at: Option<DateTime<Utc>>,
}

/// A certificate as a device request needs it (see [`Store::certificate_standing`]).
#[derive(Clone, Debug)]
pub struct CertificateStanding {
    pub certificate: super::CertificateRecord,
    /// The device bound to the certificate's enrollment record, once it sent Authenticate.
    pub bound_udid: Option<String>,
    /// That device's command channels.
    pub channels: Vec<ChannelState>,
}

/// A command channel as a connect needs it.
#[derive(Clone, Debug)]
pub struct ChannelState {
    pub id: String,
    pub status: ChannelStatus,
    pub last_seen_at: Option<DateTime<Utc>>,
    /// A command is queued, sent or deferred: without one, an Idle needs no queue read.
    pub has_work: bool,
}

#[derive(sqlx::FromRow)]
struct StandingRow {
    #[sqlx(flatten)]
    certificate: super::CertificateRecord,
    bound_udid: Option<String>,
    channel_id: Option<String>,
    channel_status: Option<ChannelStatus>,
    channel_last_seen_at: Option<DateTime<Utc>>,
    channel_has_work: bool,
}

/// What a TokenUpdate records for a channel.
#[derive(Clone, Debug)]
pub struct TokenUpdateRecord {
    pub enrollment_id: String,
    pub udid: String,
    pub channel: ChannelType,
    pub user_id: Option<String>,
    pub user_short_name: Option<String>,
    pub user_long_name: Option<String>,
    /// Hex of the APNs device token.
    pub push_token: String,
    pub push_magic: String,
    /// Sealed with the master key (it can clear the passcode).
    pub unlock_token: Option<String>,
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct CommandRecord {
    pub uuid: String,
    pub enrollment_id: String,
    pub request_type: String,
    #[serde(skip)]
    pub fingerprint: String,
    #[serde(skip)]
    pub body: Vec<u8>,
    pub status: CommandStatus,
    pub created_by: String,
    pub queued_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
    pub answered_at: Option<DateTime<Utc>>,
    #[serde(skip)]
    pub result: Option<Vec<u8>>,
    pub error_chain: Option<String>,
}

/// A command to queue for one enrollment.
#[derive(Clone, Debug)]
pub struct NewCommand {
    pub uuid: String,
    pub enrollment_id: String,
    pub request_type: String,
    pub fingerprint: String,
    pub body: Vec<u8>,
    pub created_by: String,
}

/// The outcome of queueing one command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Queued {
    Queued,
    /// An identical command is already pending for that enrollment: its UUID.
    Duplicate(String),
}

/// What the device said about a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandOutcome {
    Acknowledged,
    Error,
    FormatError,
    NotNow,
}

impl CommandOutcome {
    fn status(self) -> CommandStatus {
        match self {
            CommandOutcome::Acknowledged => CommandStatus::Acknowledged,
            CommandOutcome::Error => CommandStatus::Error,
            CommandOutcome::FormatError => CommandStatus::FormatError,
            CommandOutcome::NotNow => CommandStatus::NotNow,
        }
    }
}

macro_rules! select_devices {
    ($clause:literal) => {
        concat!(
            "SELECT udid, enrollment_id, serial_number, model, model_name, product_name, \
             device_name, os_version, build_version, topic, inventory, profiles, \
             bootstrap_token, authenticated_at, updated_at, owner_id, owner_bound_at \
             FROM mdm_devices ",
            $clause
        )
    };
}

macro_rules! select_enrollments {
    ($clause:literal) => {
        concat!(
            "SELECT id, udid, channel, user_id, user_short_name, user_long_name, push_token, \
             push_magic, unlock_token, status, push_status, created_at, updated_at, \
             last_seen_at FROM mdm_enrollments ",
            $clause
        )
    };
}

macro_rules! select_commands {
    ($($clause:expr),+) => {
        concat!(
            "SELECT uuid, enrollment_id, request_type, fingerprint, body, status, created_by, \
             queued_at, sent_at, answered_at, result, error_chain FROM mdm_commands ",
            $($clause),+
        )
    };
}

impl Store {
    pub async fn device(&self, udid: &str) -> StoreResult<Option<DeviceRecord>> {
        Ok(on_pool!(self, |pool| sqlx::query_as(select_devices!(
            "WHERE udid = $1"
        ))
        .bind(udid)
        .fetch_optional(pool)
        .await?))
    }

    /// TokenUpdate: creates or refreshes the channel and makes it active.
    pub async fn token_update(&self, t: &TokenUpdateRecord) -> StoreResult<()> {
        let now = super::now();
        let sql = "INSERT INTO mdm_enrollments (id, udid, channel, user_id, user_short_name, \
                   user_long_name, push_token, push_magic, unlock_token, status, push_status, \
                   created_at, updated_at, last_seen_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $11, $12, $10, $10, $10) \
                   ON CONFLICT (id) DO UPDATE SET push_token = excluded.push_token, \
                   push_magic = excluded.push_magic, \
                   unlock_token = COALESCE(excluded.unlock_token, mdm_enrollments.unlock_token), \
                   user_short_name = excluded.user_short_name, \
                   user_long_name = excluded.user_long_name, status = excluded.status, \
                   push_status = excluded.push_status, updated_at = excluded.updated_at, \
                   last_seen_at = excluded.last_seen_at";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(&t.enrollment_id)
            .bind(&t.udid)
            .bind(t.channel)
            .bind(&t.user_id)
            .bind(&t.user_short_name)
            .bind(&t.user_long_name)
            .bind(&t.push_token)
            .bind(&t.push_magic)
            .bind(&t.unlock_token)
            .bind(now)
            .bind(ChannelStatus::Active)
            .bind(PushStatus::Unknown)
            .execute(pool)
            .await?
            .rows_affected());
        self.local_changes().identity_changed();
        Ok(())
    }

    /// CheckOut: the device left management; its channels stop receiving commands.
    pub async fn check_out(&self, udid: &str) -> StoreResult<()> {
        let sql = "UPDATE mdm_enrollments SET status = $3, updated_at = $2 WHERE udid = $1";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(udid)
            .bind(super::now())
            .bind(ChannelStatus::CheckedOut)
            .execute(pool)
            .await?
            .rows_affected());
        self.local_changes().identity_changed();
        Ok(())
    }

    pub async fn set_bootstrap_token(&self, udid: &str, sealed: Option<&str>) -> StoreResult<()> {
        let sql = "UPDATE mdm_devices SET bootstrap_token = $2, updated_at = $3 WHERE udid = $1";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(udid)
            .bind(sealed)
            .bind(super::now())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// Stores what DeviceInformation or ProfileList reported (JSON), and the OS facts.
    pub async fn update_inventory(
        &self,
        udid: &str,
        inventory: Option<&str>,
        profiles: Option<&str>,
        facts: &DeviceFacts,
    ) -> StoreResult<()> {
        let sql = "UPDATE mdm_devices SET inventory = COALESCE($2, inventory), \
                   profiles = COALESCE($3, profiles), \
                   os_version = COALESCE($4, os_version), \
                   build_version = COALESCE($5, build_version), \
                   serial_number = COALESCE($6, serial_number), \
                   device_name = COALESCE($7, device_name), \
                   model_name = COALESCE($8, model_name), \
                   product_name = COALESCE($9, product_name), updated_at = $10, \
                   profiles_reported_at = CASE WHEN $3 IS NULL THEN profiles_reported_at \
                   ELSE $10 END \
                   WHERE udid = $1";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(udid)
            .bind(inventory)
            .bind(profiles)
            .bind(&facts.os_version)
            .bind(&facts.build_version)
            .bind(&facts.serial_number)
            .bind(&facts.device_name)
            .bind(&facts.model_name)
            .bind(&facts.product_name)
            .bind(super::now())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// Stores a ManagedApplicationList answer (JSON, bundle ID → its status) and when it came.
    pub async fn update_managed_apps(&self, udid: &str, apps: &str) -> StoreResult<()> {
        let sql = "UPDATE mdm_devices SET apps = $2, apps_reported_at = $3, updated_at = $3 \
                   WHERE udid = $1";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(udid)
            .bind(apps)
            .bind(super::now())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// What certificate `serial` is and whom it speaks for, in the one read that every device
    /// request makes before its body is looked at: the certificate record, the device bound to
    /// its enrollment record, and that device's channels with their queue state.
    pub async fn certificate_standing(
        &self,
        serial: &str,
    ) -> StoreResult<Option<CertificateStanding>> {
        let sql = concat!(
            "SELECT k.serial, k.enrollment_id, k.subject, k.not_before, k.not_after, \
                   k.status, k.revoked_at, k.revocation_reason, k.renewed_from, \
                   k.transaction_id, k.sender_nonce, k.der, k.issued_at, \
                   d.udid AS bound_udid, e.id AS channel_id, e.status AS channel_status, \
                   e.last_seen_at AS channel_last_seen_at, \
                   EXISTS (SELECT 1 FROM mdm_commands c WHERE c.enrollment_id = e.id \
                           AND c.status IN ",
            pending_commands_sql!(),
            ") AS channel_has_work \
                   FROM certificates k \
                   LEFT JOIN mdm_devices d ON d.enrollment_id = k.enrollment_id \
                   LEFT JOIN mdm_enrollments e ON e.udid = d.udid \
                   WHERE k.serial = $1"
        );
        let rows: Vec<StandingRow> = on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(serial)
            .fetch_all(pool)
            .await?);
        let mut rows = rows.into_iter();
        let Some(first) = rows.next() else {
            return Ok(None);
        };
        let mut channels = Vec::new();
        let bound_udid = first.bound_udid.clone();
        let certificate = first.certificate.clone();
        for row in std::iter::once(first).chain(rows) {
            if let (Some(id), Some(status)) = (row.channel_id, row.channel_status) {
                channels.push(ChannelState {
                    id,
                    status,
                    last_seen_at: row.channel_last_seen_at,
                    has_work: row.channel_has_work,
                });
            }
        }
        Ok(Some(CertificateStanding {
            certificate,
            bound_udid,
            channels,
        }))
    }

    pub async fn mdm_enrollment(&self, id: &str) -> StoreResult<Option<MdmEnrollment>> {
        Ok(on_pool!(self, |pool| sqlx::query_as(select_enrollments!(
            "WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(pool)
        .await?))
    }

    /// Active channels with a push token that have commands waiting (queued, or answered
    /// NotNow) since before `cutoff` and have not been heard from since `cutoff`: the devices a
    /// push did not bring back. `limit` at most, in ID order after `after`.
    pub async fn silent_channels_with_work(
        &self,
        cutoff: DateTime<Utc>,
        after: &str,
        limit: i64,
    ) -> StoreResult<Vec<String>> {
        let sql = "SELECT e.id FROM mdm_enrollments e \
                   WHERE e.status = 'active' AND e.push_token IS NOT NULL \
                   AND e.push_status <> 'unregistered' \
                   AND (e.last_seen_at IS NULL OR e.last_seen_at < $1) AND e.id > $2 \
                   AND e.id IN (SELECT c.enrollment_id FROM mdm_commands c \
                   WHERE c.status IN ('queued', 'not-now') AND c.queued_at < $1) \
                   ORDER BY e.id LIMIT $3";
        Ok(on_pool!(self, |pool| sqlx::query_scalar(sql)
            .bind(cutoff)
            .bind(after)
            .bind(limit)
            .fetch_all(pool)
            .await?))
    }

    /// The command channels of device `udid` (device channel and user channels).
    pub async fn channels_of(&self, udid: &str) -> StoreResult<Vec<MdmEnrollment>> {
        Ok(on_pool!(self, |pool| sqlx::query_as(select_enrollments!(
            "WHERE udid = $1 ORDER BY id"
        ))
        .bind(udid)
        .fetch_all(pool)
        .await?))
    }

    /// Enrollments ordered by id, after `after`, at most `limit`.
    pub async fn list_mdm_enrollments(
        &self,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<MdmEnrollment>> {
        Ok(on_pool!(self, |pool| sqlx::query_as(select_enrollments!(
            "WHERE ($1 IS NULL OR id > $1) ORDER BY id LIMIT $2"
        ))
        .bind(after)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?))
    }

    /// Notes that the channel was heard from (called at most once a minute per channel).
    pub async fn touch_enrollment(&self, id: &str, at: DateTime<Utc>) -> StoreResult<()> {
        let sql = "UPDATE mdm_enrollments SET last_seen_at = $2 WHERE id = $1";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(id)
            .bind(at)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    pub async fn set_push_status(&self, id: &str, status: PushStatus) -> StoreResult<()> {
        let sql = "UPDATE mdm_enrollments SET push_status = $2 WHERE id = $1";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(id)
            .bind(status)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// Queues commands, each in its enrollment's order. With `dedupe`, a command identical to
    /// one still pending for the same enrollment is not queued again.
    pub async fn enqueue(&self, commands: &[NewCommand], dedupe: bool) -> StoreResult<Vec<Queued>> {
        let now = super::now();
        let find = concat!(
            "SELECT uuid FROM mdm_commands WHERE enrollment_id = $1 AND fingerprint = $2 \
             AND status IN ",
            pending_commands_sql!(),
            " ORDER BY seq LIMIT 1"
        );
        let insert = "INSERT INTO mdm_commands (uuid, enrollment_id, request_type, fingerprint, \
                      body, status, created_by, queued_at) \
                      VALUES ($1, $2, $3, $4, $5, $8, $6, $7)";
        let outcome: Result<Vec<Queued>, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let mut out = Vec::with_capacity(commands.len());
            for c in commands {
                if dedupe {
                    let existing: Option<String> = sqlx::query_scalar(find)
                        .bind(&c.enrollment_id)
                        .bind(&c.fingerprint)
                        .fetch_optional(&mut *tx)
                        .await?;
                    if let Some(uuid) = existing {
                        out.push(Queued::Duplicate(uuid));
                        continue;
                    }
                }
                sqlx::query(insert)
                    .bind(&c.uuid)
                    .bind(&c.enrollment_id)
                    .bind(&c.request_type)
                    .bind(&c.fingerprint)
                    .bind(&c.body)
                    .bind(&c.created_by)
                    .bind(now)
                    .bind(CommandStatus::Queued)
                    .execute(&mut *tx)
                    .await?;
                out.push(Queued::Queued);
            }
            tx.commit().await?;
            Ok(out)
        }
        .await);
        // This node's "has work" view looks at the queue again (apple::cache).
        self.local_changes().queue_changed();
        outcome.map_err(|e| StoreError::conflict_on_unique(e, "a command with that UUID exists"))
    }

    /// The next command to send on a channel, marked sent. After a NotNow the device is busy,
    /// so commands it deferred wait for its next Idle (`include_not_now`) instead of being
    /// offered again at once, which would spin.
    pub async fn next_command(
        &self,
        enrollment_id: &str,
        include_not_now: bool,
    ) -> StoreResult<Option<CommandRecord>> {
        let find = select_commands!(
            "WHERE enrollment_id = $1 AND (status IN ",
            offered_commands_sql!(),
            " OR ($2 AND status = $3)) ORDER BY seq LIMIT 1"
        );
        let mark = "UPDATE mdm_commands SET status = $4, sent_at = $2 \
                    WHERE uuid = $1 AND status = $3";
        // Reads first: most connects find nothing, and a read takes no write lock.
        for _ in 0..3 {
            let next: Option<CommandRecord> = on_pool!(self, |pool| sqlx::query_as(find)
                .bind(enrollment_id)
                .bind(include_not_now)
                .bind(CommandStatus::NotNow)
                .fetch_optional(pool)
                .await?);
            let Some(mut command) = next else {
                return Ok(None);
            };
            let now = super::now();
            let marked = on_pool!(self, |pool| sqlx::query(mark)
                .bind(&command.uuid)
                .bind(now)
                .bind(command.status)
                .bind(CommandStatus::Sent)
                .execute(pool)
                .await?
                .rows_affected());
            if marked == 1 {
                command.status = CommandStatus::Sent;
                command.sent_at = Some(now);
                return Ok(Some(command));
            }
            // Answered or cancelled between the read and the write: look again.
        }
        Ok(None)
    }

    /// Records a device's answer to one of its commands. Returns the command when it was
    /// pending on this enrollment; an unknown or finished command changes nothing.
    pub async fn record_result(
        &self,
        enrollment_id: &str,
        uuid: &str,
        outcome: CommandOutcome,
        raw: &[u8],
        error_chain: Option<&str>,
    ) -> StoreResult<Option<CommandRecord>> {
        let sql = concat!(
            "UPDATE mdm_commands SET status = $3, answered_at = $4, result = $5, \
             error_chain = $6 WHERE uuid = $1 AND enrollment_id = $2 AND status IN ",
            pending_commands_sql!()
        );
        let changed = on_pool!(self, |pool| sqlx::query(sql)
            .bind(uuid)
            .bind(enrollment_id)
            .bind(outcome.status())
            .bind(super::now())
            .bind(raw)
            .bind(error_chain)
            .execute(pool)
            .await?
            .rows_affected());
        if changed == 0 {
            return Ok(None);
        }
        self.command(uuid).await
    }

    pub async fn command(&self, uuid: &str) -> StoreResult<Option<CommandRecord>> {
        Ok(on_pool!(self, |pool| sqlx::query_as(select_commands!(
            "WHERE uuid = $1"
        ))
        .bind(uuid)
        .fetch_optional(pool)
        .await?))
    }

    /// A channel's commands, oldest first.
    pub async fn commands_for(
        &self,
        enrollment_id: &str,
        limit: u32,
    ) -> StoreResult<Vec<CommandRecord>> {
        Ok(on_pool!(self, |pool| sqlx::query_as(select_commands!(
            "WHERE enrollment_id = $1 ORDER BY seq LIMIT $2"
        ))
        .bind(enrollment_id)
        .bind(i64::from(limit))
        .fetch_all(pool)
        .await?))
    }

    /// Cancels a command that has not been answered; false if there is none.
    pub async fn cancel_command(&self, uuid: &str) -> StoreResult<bool> {
        let sql = concat!(
            "UPDATE mdm_commands SET status = $3, answered_at = $2 WHERE uuid = $1 AND status IN ",
            pending_commands_sql!()
        );
        let changed = on_pool!(self, |pool| sqlx::query(sql)
            .bind(uuid)
            .bind(super::now())
            .bind(CommandStatus::Cancelled)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(changed == 1)
    }
}

/// The APNs push certificate for the MDM topic, its key sealed.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct PushCertificateRow {
    pub topic: String,
    pub certificate: Vec<u8>,
    pub sealed_key: String,
    pub not_after: DateTime<Utc>,
    pub imported_at: DateTime<Utc>,
}

impl Store {
    pub async fn push_certificate(&self) -> StoreResult<Option<PushCertificateRow>> {
        let sql = "SELECT topic, certificate, sealed_key, not_after, imported_at \
                   FROM push_certificates ORDER BY imported_at DESC LIMIT 1";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .fetch_optional(pool)
            .await?))
    }

    /// Makes `row` the push certificate, replacing any other.
    pub async fn replace_push_certificate(&self, row: &PushCertificateRow) -> StoreResult<()> {
        let outcome: Result<(), sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            sqlx::query("DELETE FROM push_certificates")
                .execute(&mut *tx)
                .await?;
            sqlx::query(
                "INSERT INTO push_certificates (topic, certificate, sealed_key, not_after, \
                 imported_at) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(&row.topic)
            .bind(&row.certificate)
            .bind(&row.sealed_key)
            .bind(row.not_after)
            .bind(row.imported_at)
            .execute(&mut *tx)
            .await?;
            tx.commit().await
        }
        .await);
        Ok(outcome?)
    }
}
