//! Group-driven policy state: applied policy versions, the per-device ledger of managed items
//! (what the reconciler put on each device, and the command it last sent for each), and the
//! reconcile requests that wake the reconciler on any node.
//!
//! The ledger is what makes the reconciler exactly-once: every transition of an item is a
//! compare-and-set on its `revision`, and every command it queues is recorded under
//! (enrollment, item, revision), a primary key. Two nodes (or a node restarted mid-way) that
//! decide the same change both try the same transition; one wins, the other changes nothing.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{
    AccountStatus, CertificateStatus, ChannelStatus, CommandStatus, EnrollmentStatus, ItemAction,
    ItemKind, NewCommand, Pool, PushStatus, Store, StoreResult, on_pool,
};

/// One applied policy set.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct PolicyVersionRecord {
    pub version: i64,
    pub applied_at: DateTime<Utc>,
    pub applied_by: String,
    pub git_commit: Option<String>,
    pub digest: String,
    /// JSON `{path: base64}`: the files the set was compiled from.
    #[serde(skip)]
    pub files: String,
    /// JSON: the plan's totals at apply time.
    pub summary: Option<String>,
}

/// Something the reconciler should look at: a person (`user_id`), a device (`udid`), or, with
/// neither, every device.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ReconcileRequest {
    pub id: i64,
    pub user_id: Option<String>,
    pub udid: Option<String>,
    pub reason: String,
}

/// Which devices a read of [`Store::reconcile_targets`] covers.
#[derive(Clone, Copy, Debug)]
pub enum TargetScope<'a> {
    /// Every managed device, in UDID order after the given one.
    All { after: Option<&'a str> },
    /// The devices of one person.
    User(&'a str),
    /// The devices of these people (at most a few hundred), in UDID order after the given one.
    Users {
        user_ids: &'a [String],
        after: Option<&'a str>,
    },
    /// One device.
    Device(&'a str),
}

/// A managed device as the reconciler sees it: its current enrollment record, its owner and
/// what they look like now, what the device last reported, and whether its device channel
/// takes commands.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DeviceTarget {
    pub udid: String,
    /// The enrollment record (`enrollments.id`) the device is managed under now.
    pub enrollment_id: String,
    pub owner_id: Option<String>,
    pub serial_number: Option<String>,
    pub device_name: Option<String>,
    pub model: Option<String>,
    pub model_name: Option<String>,
    pub product_name: Option<String>,
    /// JSON: the last ProfileList.
    pub profiles: Option<String>,
    pub profiles_reported_at: Option<DateTime<Utc>>,
    /// JSON: the last ManagedApplicationList (bundle ID → status).
    pub apps: Option<String>,
    pub apps_reported_at: Option<DateTime<Utc>>,
    pub owner_login: Option<String>,
    pub owner_email: Option<String>,
    pub owner_display_name: Option<String>,
    pub owner_subject: Option<String>,
    pub owner_status: Option<AccountStatus>,
    /// The device channel's state; `None` before its first TokenUpdate.
    pub channel_status: Option<ChannelStatus>,
    /// The device channel has a push token APNs has not declared dead.
    pub wakeable: bool,
    /// The newest usable certificate of the enrollment record (the device's identity), and
    /// when it expires.
    pub identity_serial: Option<String>,
    pub identity_not_after: Option<DateTime<Utc>>,
}

/// A managed item as the ledger holds it, with the state of the command last sent for it.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct ManagedItemRow {
    pub enrollment_id: String,
    pub udid: String,
    pub item_key: String,
    pub kind: ItemKind,
    pub wanted: bool,
    pub content_hash: String,
    pub config_hash: Option<String>,
    pub policy: String,
    pub group_ref: Option<String>,
    pub revision: i64,
    pub action: ItemAction,
    pub command_uuid: Option<String>,
    pub due_at: Option<DateTime<Utc>>,
    pub updated_at: DateTime<Utc>,
    pub command_status: Option<CommandStatus>,
    pub command_answered_at: Option<DateTime<Utc>>,
    /// JSON: the device's ErrorChain when the command failed.
    pub command_error: Option<String>,
}

/// One transition of one managed item, decided by the reconciler against `expected_revision`
/// (`None`: the item has no row yet).
#[derive(Clone, Debug)]
pub struct ItemChange {
    pub enrollment_id: String,
    pub udid: String,
    pub item_key: String,
    pub kind: ItemKind,
    pub wanted: bool,
    pub content_hash: String,
    pub config_hash: Option<String>,
    pub policy: String,
    pub group_ref: Option<String>,
    pub expected_revision: Option<i64>,
    pub action: ItemAction,
    /// The command that carries the change out, queued on the device channel; `None` when the
    /// change needs none (an item left in place on leave, an install cancelled before it was
    /// sent).
    pub command: Option<NewCommand>,
    /// A command of this item still queued (never offered) that the change makes pointless.
    pub cancel_command: Option<String>,
    /// For a deprovisioning action: when it falls due.
    pub due_at: Option<DateTime<Utc>>,
}

macro_rules! select_targets {
    ($clause:literal) => {
        concat!(
            "SELECT d.udid, d.enrollment_id, d.owner_id, d.serial_number, d.device_name, \
             d.model, d.model_name, d.product_name, d.profiles, d.profiles_reported_at, \
             d.apps, d.apps_reported_at, \
             u.login AS owner_login, u.email AS owner_email, \
             u.display_name AS owner_display_name, u.subject AS owner_subject, \
             u.status AS owner_status, c.status AS channel_status, \
             (c.push_token IS NOT NULL AND c.push_status <> $2) AS wakeable, \
             k.serial AS identity_serial, k.not_after AS identity_not_after \
             FROM mdm_devices d \
             JOIN enrollments e ON e.id = d.enrollment_id AND e.status = $3 \
             LEFT JOIN users u ON u.id = d.owner_id \
             LEFT JOIN mdm_enrollments c ON c.id = d.udid \
             LEFT JOIN certificates k ON k.serial = (SELECT n.serial FROM certificates n \
                 WHERE n.enrollment_id = d.enrollment_id AND n.status = $5 \
                 AND n.superseded_by IS NULL ORDER BY n.not_after DESC, n.serial LIMIT 1) ",
            $clause
        )
    };
}

/// `$first, $first+1, …` for `count` values: the placeholders of an `IN (…)` list.
fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A shared app-config token a device was sent, in a configuration of one of its items.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct HeldToken {
    pub item_key: String,
    pub integration: String,
    pub token_id: String,
    pub last4: String,
    pub command_uuid: String,
    pub delivered_at: DateTime<Utc>,
    /// Whether the device acknowledged the command that carried it.
    pub acknowledged: bool,
}

impl Store {
    /// The shared tokens delivered to an enrollment record's device, newest first.
    pub async fn held_tokens(&self, enrollment_id: &str) -> StoreResult<Vec<HeldToken>> {
        let sql = "SELECT d.item_key, t.integration, d.token_id, t.last4, d.command_uuid, \
                   d.delivered_at, (c.status IS NOT NULL AND c.status = $2) AS acknowledged \
                   FROM token_deliveries d JOIN shared_tokens t ON t.id = d.token_id \
                   LEFT JOIN mdm_commands c ON c.uuid = d.command_uuid \
                   WHERE d.enrollment_id = $1 ORDER BY d.delivered_at DESC, c.seq DESC";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(enrollment_id)
            .bind(CommandStatus::Acknowledged)
            .fetch_all(pool)
            .await?))
    }

    /// Records an applied policy set as the next version, and asks every node's reconciler
    /// for a full pass, in one transaction.
    pub async fn record_policy_version(
        &self,
        applied_by: &str,
        git_commit: Option<&str>,
        digest: &str,
        files_json: &str,
        summary_json: &str,
    ) -> StoreResult<i64> {
        let now = super::now();
        let insert = "INSERT INTO policy_versions (applied_at, applied_by, git_commit, digest, \
                      files, summary) VALUES ($1, $2, $3, $4, $5, $6) RETURNING version";
        let request = "INSERT INTO reconcile_requests (user_id, udid, reason, requested_at) \
                       VALUES (NULL, NULL, $1, $2)";
        let version: Result<i64, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let version: i64 = sqlx::query_scalar(insert)
                .bind(now)
                .bind(applied_by)
                .bind(git_commit)
                .bind(digest)
                .bind(files_json)
                .bind(summary_json)
                .fetch_one(&mut *tx)
                .await?;
            sqlx::query(request)
                .bind(format!("policy set v{version} applied"))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(version)
        }
        .await);
        Ok(version?)
    }

    /// The newest applied policy set, files included.
    pub async fn latest_policy_version(&self) -> StoreResult<Option<PolicyVersionRecord>> {
        let sql = "SELECT version, applied_at, applied_by, git_commit, digest, files, summary \
                   FROM policy_versions ORDER BY version DESC LIMIT 1";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .fetch_optional(pool)
            .await?))
    }

    /// The newest version number (0: none), the one read each node makes every second.
    pub async fn latest_policy_version_number(&self) -> StoreResult<i64> {
        let sql = "SELECT COALESCE(MAX(version), 0) FROM policy_versions";
        Ok(on_pool!(self, |pool| sqlx::query_scalar(sql)
            .fetch_one(pool)
            .await?))
    }

    /// Applied versions, newest first, without their files.
    pub async fn policy_versions(&self, limit: i64) -> StoreResult<Vec<PolicyVersionRecord>> {
        let sql = "SELECT version, applied_at, applied_by, git_commit, digest, '' AS files, \
                   summary FROM policy_versions ORDER BY version DESC LIMIT $1";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(limit)
            .fetch_all(pool)
            .await?))
    }

    /// Asks the reconciler to look at a person's devices, one device, or (both `None`) all.
    pub async fn request_reconcile(
        &self,
        user_id: Option<&str>,
        udid: Option<&str>,
        reason: &str,
    ) -> StoreResult<()> {
        let sql = "INSERT INTO reconcile_requests (user_id, udid, reason, requested_at) \
                   VALUES ($1, $2, $3, $4)";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(user_id)
            .bind(udid)
            .bind(reason)
            .bind(super::now())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// Claims up to `limit` requests, oldest first, for `node` until `until_ms` (Unix
    /// milliseconds): those nobody holds and those whose claim ran out before `now_ms` (their
    /// node died or stalled). On PostgreSQL rows another node is claiming are skipped, not
    /// waited for. A served request is deleted with [`Store::finish_reconcile_requests`];
    /// serving one twice is harmless (the ledger queues each command once).
    pub async fn claim_reconcile_requests(
        &self,
        limit: i64,
        node: &str,
        now_ms: i64,
        until_ms: i64,
    ) -> StoreResult<Vec<ReconcileRequest>> {
        let sql = match &self.pool {
            Pool::Sqlite(_) => {
                "UPDATE reconcile_requests SET claimed_by = $2, claimed_until = $3 \
                 WHERE id IN (SELECT id FROM reconcile_requests WHERE claimed_until < $4 \
                 ORDER BY id LIMIT $1) RETURNING id, user_id, udid, reason"
            }
            Pool::Postgres(_) => {
                "UPDATE reconcile_requests SET claimed_by = $2, claimed_until = $3 \
                 WHERE id IN (SELECT id FROM reconcile_requests WHERE claimed_until < $4 \
                 ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED) RETURNING id, user_id, udid, reason"
            }
        };
        let mut requests: Vec<ReconcileRequest> = on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(limit)
            .bind(node)
            .bind(until_ms)
            .bind(now_ms)
            .fetch_all(pool)
            .await?);
        // RETURNING does not keep the subquery's order.
        requests.sort_by_key(|r| r.id);
        Ok(requests)
    }

    /// Moves `node`'s claim on `ids` to `until_ms` (a long pass still running); a claim
    /// another node has taken over stays theirs.
    pub async fn renew_reconcile_claims(
        &self,
        ids: &[i64],
        node: &str,
        until_ms: i64,
    ) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "UPDATE reconcile_requests SET claimed_until = $1 \
             WHERE claimed_by = $2 AND id IN ({})",
            placeholders(3, ids.len())
        );
        on_pool!(self, |pool| {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(until_ms)
                .bind(node);
            for id in ids {
                query = query.bind(id);
            }
            query.execute(pool).await?.rows_affected()
        });
        Ok(())
    }

    /// Deletes served requests.
    pub async fn finish_reconcile_requests(&self, ids: &[i64]) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "DELETE FROM reconcile_requests WHERE id IN ({})",
            placeholders(1, ids.len())
        );
        on_pool!(self, |pool| {
            let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
            for id in ids {
                query = query.bind(id);
            }
            query.execute(pool).await?.rows_affected()
        });
        Ok(())
    }

    /// Managed devices (their current enrollment record active), `limit` at most, in UDID
    /// order.
    pub async fn reconcile_targets(
        &self,
        scope: TargetScope<'_>,
        limit: i64,
    ) -> StoreResult<Vec<DeviceTarget>> {
        if let TargetScope::Users { user_ids, after } = scope {
            return self.targets_of_users(user_ids, after, limit).await;
        }
        let (sql, key) = match scope {
            TargetScope::Users { .. } => unreachable!("answered above"),
            TargetScope::All { after } => (
                select_targets!("WHERE d.udid > $1 ORDER BY d.udid LIMIT $4"),
                after.unwrap_or(""),
            ),
            TargetScope::User(user_id) => (
                select_targets!("WHERE d.owner_id = $1 ORDER BY d.udid LIMIT $4"),
                user_id,
            ),
            TargetScope::Device(udid) => (
                select_targets!("WHERE d.udid = $1 ORDER BY d.udid LIMIT $4"),
                udid,
            ),
        };
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(key)
            .bind(PushStatus::Unregistered)
            .bind(EnrollmentStatus::Active)
            .bind(limit)
            .bind(CertificateStatus::Valid)
            .fetch_all(pool)
            .await?))
    }

    /// The managed devices of `user_ids`, `limit` at most, in UDID order after `after`: one
    /// query for a batch of people (a group push of thousands is served page by page, not
    /// person by person).
    async fn targets_of_users(
        &self,
        user_ids: &[String],
        after: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<DeviceTarget>> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "{}WHERE d.owner_id IN ({}) AND d.udid > $1 ORDER BY d.udid LIMIT $4",
            select_targets!(""),
            placeholders(6, user_ids.len())
        );
        Ok(on_pool!(self, |pool| {
            // Only placeholders are formatted in; every value is bound.
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()))
                .bind(after.unwrap_or(""))
                .bind(PushStatus::Unregistered)
                .bind(EnrollmentStatus::Active)
                .bind(limit)
                .bind(CertificateStatus::Valid);
            for user in user_ids {
                query = query.bind(user);
            }
            query.fetch_all(pool).await?
        }))
    }

    /// The groups of each of `user_ids`: (user_id, provider, group external ID).
    pub async fn groups_of_users(
        &self,
        user_ids: &[String],
    ) -> StoreResult<Vec<(String, String, String)>> {
        if user_ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT m.user_id, g.provider, g.external_id FROM user_groups m \
             JOIN groups g ON g.id = m.group_id WHERE m.user_id IN ({})",
            placeholders(1, user_ids.len())
        );
        Ok(on_pool!(self, |pool| {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()));
            for id in user_ids {
                query = query.bind(id);
            }
            query.fetch_all(pool).await?
        }))
    }

    /// The ledgers of the given enrollment records, ordered by record and item.
    pub async fn managed_items(
        &self,
        enrollment_ids: &[String],
    ) -> StoreResult<Vec<ManagedItemRow>> {
        if enrollment_ids.is_empty() {
            return Ok(Vec::new());
        }
        let sql = format!(
            "SELECT i.enrollment_id, i.udid, i.item_key, i.kind, i.wanted, i.content_hash, \
             i.config_hash, i.policy, i.group_ref, i.revision, i.action, i.command_uuid, \
             i.due_at, i.updated_at, c.status AS command_status, c.answered_at AS command_answered_at, \
             c.error_chain AS command_error \
             FROM managed_items i LEFT JOIN mdm_commands c ON c.uuid = i.command_uuid \
             WHERE i.enrollment_id IN ({}) ORDER BY i.enrollment_id, i.item_key",
            placeholders(1, enrollment_ids.len())
        );
        Ok(on_pool!(self, |pool| {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()));
            for id in enrollment_ids {
                query = query.bind(id);
            }
            query.fetch_all(pool).await?
        }))
    }

    /// Carries out the changes in one transaction, each only if its item is still at the
    /// revision the reconciler saw. Returns, per change, whether it was made (false: another
    /// node or an earlier pass made it first).
    ///
    /// New items (the bulk of a rollout) are written with multi-row inserts, `CHUNK` at a time;
    /// `ON CONFLICT DO NOTHING RETURNING` says which rows this transaction created. Callers
    /// order changes by (udid, item) so that two nodes lock rows in the same order.
    pub async fn apply_item_changes(&self, changes: &[ItemChange]) -> StoreResult<Vec<bool>> {
        /// Rows per statement: 13 values each stays far below both backends' parameter limits.
        const CHUNK: usize = 200;
        let now = super::now();
        let update_item = "UPDATE managed_items SET wanted = $5, content_hash = $6, \
                           config_hash = $7, policy = $8, group_ref = $9, action = $10, \
                           command_uuid = COALESCE($11, command_uuid), updated_at = $12, due_at = $13, \
                           revision = revision + 1 \
                           WHERE enrollment_id = $1 AND udid = $2 AND item_key = $3 \
                           AND kind = $4 AND revision = $14";
        let cancel = "UPDATE mdm_commands SET status = $2, answered_at = $3 \
                      WHERE uuid = $1 AND status = $4";
        let outcome: Result<Vec<bool>, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let mut made = vec![false; changes.len()];
            for (chunk_start, chunk) in changes.chunks(CHUNK).enumerate() {
                let offset = chunk_start * CHUNK;
                // New rows, in one statement; which of them this transaction created.
                let fresh: Vec<(usize, &ItemChange)> = chunk
                    .iter()
                    .enumerate()
                    .filter(|(_, c)| c.expected_revision.is_none())
                    .collect();
                if !fresh.is_empty() {
                    let mut insert = sqlx::QueryBuilder::new(
                        "INSERT INTO managed_items (enrollment_id, udid, item_key, kind, wanted, \
                         content_hash, config_hash, policy, group_ref, revision, action, \
                         command_uuid, updated_at, due_at) ",
                    );
                    insert.push_values(&fresh, |mut row, (_, c)| {
                        row.push_bind(&c.enrollment_id)
                            .push_bind(&c.udid)
                            .push_bind(&c.item_key)
                            .push_bind(c.kind)
                            .push_bind(c.wanted)
                            .push_bind(&c.content_hash)
                            .push_bind(&c.config_hash)
                            .push_bind(&c.policy)
                            .push_bind(&c.group_ref)
                            .push_bind(1_i64)
                            .push_bind(c.action)
                            .push_bind(c.command.as_ref().map(|c| &c.uuid))
                            .push_bind(now)
                            .push_bind(c.due_at);
                    });
                    insert.push(
                        " ON CONFLICT (enrollment_id, item_key) DO NOTHING \
                         RETURNING enrollment_id, item_key",
                    );
                    let created: std::collections::HashSet<(String, String)> = insert
                        .build_query_as::<(String, String)>()
                        .fetch_all(&mut *tx)
                        .await?
                        .into_iter()
                        .collect();
                    for (index, c) in &fresh {
                        if created.contains(&(c.enrollment_id.clone(), c.item_key.clone()))
                            && let Some(slot) = made.get_mut(offset + index)
                        {
                            *slot = true;
                        }
                    }
                }
                // Transitions of existing rows: a compare-and-set each.
                for (index, c) in chunk.iter().enumerate() {
                    let Some(revision) = c.expected_revision else {
                        continue;
                    };
                    let rows = sqlx::query(update_item)
                        .bind(&c.enrollment_id)
                        .bind(&c.udid)
                        .bind(&c.item_key)
                        .bind(c.kind)
                        .bind(c.wanted)
                        .bind(&c.content_hash)
                        .bind(&c.config_hash)
                        .bind(&c.policy)
                        .bind(&c.group_ref)
                        .bind(c.action)
                        .bind(c.command.as_ref().map(|c| &c.uuid))
                        .bind(now)
                        .bind(c.due_at)
                        .bind(revision)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if rows == 1
                        && let Some(slot) = made.get_mut(offset + index)
                    {
                        *slot = true;
                    }
                }
                let done: Vec<&ItemChange> = chunk
                    .iter()
                    .enumerate()
                    .filter(|(index, _)| made.get(offset + index).copied().unwrap_or(false))
                    .map(|(_, c)| c)
                    .collect();
                let with_command: Vec<(&ItemChange, &NewCommand)> = done
                    .iter()
                    .filter_map(|c| c.command.as_ref().map(|command| (*c, command)))
                    .collect();
                if !with_command.is_empty() {
                    // The backstop: a second command for the same transition is a unique
                    // violation, and the whole batch rolls back.
                    let mut history = sqlx::QueryBuilder::new(
                        "INSERT INTO managed_item_commands (enrollment_id, item_key, revision, \
                         content_hash, action, command_uuid, queued_at) ",
                    );
                    history.push_values(&with_command, |mut row, (c, command)| {
                        row.push_bind(&c.enrollment_id)
                            .push_bind(&c.item_key)
                            .push_bind(c.expected_revision.map_or(1, |r| r + 1))
                            .push_bind(&c.content_hash)
                            .push_bind(c.action)
                            .push_bind(&command.uuid)
                            .push_bind(now);
                    });
                    history.build().execute(&mut *tx).await?;
                    let mut queue = sqlx::QueryBuilder::new(
                        "INSERT INTO mdm_commands (uuid, enrollment_id, request_type, \
                         fingerprint, body, status, created_by, queued_at) ",
                    );
                    queue.push_values(&with_command, |mut row, (_, command)| {
                        row.push_bind(&command.uuid)
                            .push_bind(&command.enrollment_id)
                            .push_bind(&command.request_type)
                            .push_bind(&command.fingerprint)
                            .push_bind(&command.body)
                            .push_bind(CommandStatus::Queued)
                            .push_bind(&command.created_by)
                            .push_bind(now);
                    });
                    queue.build().execute(&mut *tx).await?;
                }
                for c in &done {
                    if let Some(uuid) = &c.cancel_command {
                        sqlx::query(cancel)
                            .bind(uuid)
                            .bind(CommandStatus::Cancelled)
                            .bind(now)
                            .bind(CommandStatus::Queued)
                            .execute(&mut *tx)
                            .await?;
                    }
                }
            }
            tx.commit().await?;
            Ok(made)
        }
        .await);
        // This node's "has work" view looks at the queue again (apple::cache).
        self.local_changes().queue_changed();
        Ok(outcome?)
    }
}
