//! Directory sync: group memberships and account status as a provider's directory reports them
//! (the LDAP group sync writes here). Every write is a delta — only what changed is written —
//! and each change records a reconcile request for the person in the same transaction, so a
//! change the reconciler must act on can never be committed without the request that wakes it.

use std::collections::{BTreeSet, HashMap};

use super::{AccountStatus, Store, StoreResult, on_pool};

/// Values bound per statement when a list is split: far below SQLite's (32766) and
/// PostgreSQL's (65535) bind-parameter limits, and small enough to keep each statement quick.
pub(super) const CHUNK: usize = 500;

/// A person of one provider as the store knows them: what a directory sync compares with.
#[derive(Clone, Debug, PartialEq, Eq, sqlx::FromRow)]
pub struct DirectoryUser {
    pub id: String,
    pub subject: String,
    pub login: Option<String>,
    pub email: Option<String>,
    pub display_name: Option<String>,
    pub status: AccountStatus,
}

/// What one group's sync changed: the user IDs that joined and left it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MembershipDelta {
    pub joined: Vec<String>,
    pub left: Vec<String>,
}

/// An account whose status changed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StatusChange {
    pub user_id: String,
    pub subject: String,
    pub from: AccountStatus,
    pub to: AccountStatus,
}

/// A person's details as the directory has them now; `None` leaves the stored value alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DirectoryDetails {
    pub subject: String,
    pub login: Option<String>,
    pub email: Option<String>,
    pub display_name: Option<String>,
}

/// `$first, $first+1, …` for `count` values.
pub(super) fn placeholders(first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| format!("${n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `(${first}, $1, $2, $3, $3), (${first+1}, …)`: one user_groups row per user ID, the group
/// ($1), source ($2) and time ($3) shared.
pub(super) fn membership_rows(count: usize) -> String {
    (4..4 + count)
        .map(|n| format!("(${n}, $1, $2, $3, $3)"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `(${first}, NULL, $1, $2), …`: one reconcile request per user ID, reason ($1) and time ($2)
/// shared.
pub(super) fn request_rows(count: usize) -> String {
    (3..3 + count)
        .map(|n| format!("(${n}, NULL, $1, $2)"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a reconcile request says about a status change.
fn status_reason(to: AccountStatus) -> &'static str {
    match to {
        AccountStatus::Active => "ldap-sync: account active again",
        AccountStatus::Disabled => "ldap-sync: account disabled",
        AccountStatus::Deleted => "ldap-sync: account deleted",
    }
}

impl Store {
    /// Every person of `provider` the store knows, by subject.
    pub async fn directory_users(&self, provider: &str) -> StoreResult<Vec<DirectoryUser>> {
        let sql = "SELECT id, subject, login, email, display_name, status FROM users \
                   WHERE provider = $1 ORDER BY subject";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(provider)
            .fetch_all(pool)
            .await?))
    }

    /// The IDs (`external_id`, an LDAP DN) of every group of `provider` the store knows.
    pub async fn directory_groups(&self, provider: &str) -> StoreResult<Vec<String>> {
        let sql = "SELECT external_id FROM groups WHERE provider = $1 ORDER BY external_id";
        Ok(on_pool!(self, |pool| sqlx::query_scalar(sql)
            .bind(provider)
            .fetch_all(pool)
            .await?))
    }

    /// Makes the members of group `group_id` at `provider` exactly the known people among
    /// `members` (subjects; people the store does not know are skipped, not created), writing
    /// only the difference: missing memberships are inserted with `source`, memberships no longer
    /// listed are deleted (whatever their source: the directory is the authority on its groups),
    /// and every other row is left as it is. Each person who joined or left gets a reconcile
    /// request in the same transaction.
    ///
    /// `last_seen_at` is written only when a row is inserted. Rewriting it for every unchanged
    /// member at every sync would rewrite a 100,000-member group each interval (WAL and MVCC
    /// churn) to record nothing a reader needs: a row's presence is the statement that the last
    /// successful sync still saw the membership.
    ///
    /// A group the store does not know is created only when it gains a member, so a policy
    /// naming a group no one known is in leaves no trace.
    pub async fn sync_group_members(
        &self,
        provider: &str,
        group_id: &str,
        group_name: &str,
        members: &[String],
        source: &str,
    ) -> StoreResult<MembershipDelta> {
        let now = super::now();
        // Resolved before the write transaction: people are never deleted, and one created
        // meanwhile is picked up by the next sync. SQLite's write lock is not held for the reads.
        let wanted = self.user_ids_by_subject(provider, members).await?;
        let find_group = "SELECT id, name FROM groups WHERE provider = $1 AND external_id = $2";
        let rename_group = "UPDATE groups SET name = $1, updated_at = $2 WHERE id = $3";
        // DO UPDATE rather than DO NOTHING so that RETURNING yields the row a concurrent
        // sign-in may have just created.
        let create_group = "INSERT INTO groups (id, provider, external_id, name, created_at, \
                            updated_at) VALUES ($1, $2, $3, $4, $5, $5) \
                            ON CONFLICT (provider, external_id) DO UPDATE SET name = excluded.name \
                            RETURNING id";
        let current_members = "SELECT user_id FROM user_groups WHERE group_id = $1";
        let joined_reason = format!("ldap-sync: joined {group_id}");
        let left_reason = format!("ldap-sync: left {group_id}");
        let delta = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let existing: Option<(String, String)> = sqlx::query_as(find_group)
                .bind(provider)
                .bind(group_id)
                .fetch_optional(&mut *tx)
                .await?;
            let row_id = match existing {
                Some((row_id, name)) => {
                    if name != group_name {
                        sqlx::query(rename_group)
                            .bind(group_name)
                            .bind(now)
                            .bind(&row_id)
                            .execute(&mut *tx)
                            .await?;
                    }
                    row_id
                }
                None if wanted.is_empty() => {
                    tx.rollback().await?;
                    return Ok(MembershipDelta::default());
                }
                None => {
                    sqlx::query_scalar(create_group)
                        .bind(uuid::Uuid::new_v4().to_string())
                        .bind(provider)
                        .bind(group_id)
                        .bind(group_name)
                        .bind(now)
                        .fetch_one(&mut *tx)
                        .await?
                }
            };
            let current: BTreeSet<String> = sqlx::query_scalar(current_members)
                .bind(&row_id)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            let to_add: Vec<&String> = wanted.difference(&current).collect();
            let to_remove: Vec<&String> = current.difference(&wanted).collect();
            // RETURNING tells which rows this transaction changed: a sign-in or another node
            // may have made the same change first, and then it is theirs to report.
            let mut delta = MembershipDelta::default();
            for chunk in to_add.chunks(CHUNK) {
                let sql = format!(
                    "INSERT INTO user_groups (user_id, group_id, source, first_seen_at, \
                     last_seen_at) VALUES {} ON CONFLICT (user_id, group_id) DO NOTHING \
                     RETURNING user_id",
                    membership_rows(chunk.len())
                );
                let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                    .bind(&row_id)
                    .bind(source)
                    .bind(now);
                for user_id in chunk {
                    query = query.bind(*user_id);
                }
                let inserted: Vec<String> = query.fetch_all(&mut *tx).await?;
                delta.joined.extend(inserted);
            }
            for chunk in to_remove.chunks(CHUNK) {
                let sql = format!(
                    "DELETE FROM user_groups WHERE group_id = $1 AND user_id IN ({}) \
                     RETURNING user_id",
                    placeholders(2, chunk.len())
                );
                let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind(&row_id);
                for user_id in chunk {
                    query = query.bind(*user_id);
                }
                let deleted: Vec<String> = query.fetch_all(&mut *tx).await?;
                delta.left.extend(deleted);
            }
            for (user_ids, reason) in [(&delta.joined, &joined_reason), (&delta.left, &left_reason)]
            {
                for chunk in user_ids.chunks(CHUNK) {
                    let sql = format!(
                        "INSERT INTO reconcile_requests (user_id, udid, reason, requested_at) \
                         VALUES {}",
                        request_rows(chunk.len())
                    );
                    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(reason).bind(now);
                    for user_id in chunk {
                        query = query.bind(user_id);
                    }
                    query.execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
            delta.joined.sort();
            delta.left.sort();
            Ok::<_, sqlx::Error>(delta)
        }
        .await)?;
        Ok(delta)
    }

    /// Sets the status of the given people of `provider` (by subject), writing `status` and
    /// `status_changed_at` only for those whose status differs; people the store does not
    /// know are skipped. Each change records a reconcile request in the same transaction.
    pub async fn set_account_status(
        &self,
        provider: &str,
        statuses: &[(String, AccountStatus)],
    ) -> StoreResult<Vec<StatusChange>> {
        let now = super::now();
        let update = "UPDATE users SET status = $1, status_changed_at = $2 \
                      WHERE id = $3 AND status = $4";
        let request = "INSERT INTO reconcile_requests (user_id, udid, reason, requested_at) \
                       VALUES ($1, NULL, $2, $3)";
        let changes = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let mut changes = Vec::new();
            for chunk in statuses.chunks(CHUNK) {
                let sql = format!(
                    "SELECT id, subject, status FROM users WHERE provider = $1 AND subject IN ({})",
                    placeholders(2, chunk.len())
                );
                let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql)).bind(provider);
                for (subject, _) in chunk {
                    query = query.bind(subject);
                }
                let found: Vec<(String, String, AccountStatus)> = query.fetch_all(&mut *tx).await?;
                let wanted: HashMap<&str, AccountStatus> = chunk
                    .iter()
                    .map(|(s, status)| (s.as_str(), *status))
                    .collect();
                for (user_id, subject, from) in found {
                    let Some(&to) = wanted.get(subject.as_str()) else {
                        continue;
                    };
                    if from == to {
                        continue;
                    }
                    // Compare-and-set on the status read: a concurrent sync on another node
                    // that made the same change first leaves nothing to do here.
                    let updated = sqlx::query(update)
                        .bind(to)
                        .bind(now)
                        .bind(&user_id)
                        .bind(from)
                        .execute(&mut *tx)
                        .await?
                        .rows_affected();
                    if updated == 1 {
                        sqlx::query(request)
                            .bind(&user_id)
                            .bind(status_reason(to))
                            .bind(now)
                            .execute(&mut *tx)
                            .await?;
                        changes.push(StatusChange {
                            user_id,
                            subject,
                            from,
                            to,
                        });
                    }
                }
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(changes)
        }
        .await)?;
        Ok(changes)
    }

    /// Brings the login, e-mail address and display name of the given people of `provider` to
    /// what the directory has (a `None` keeps the stored value), and records a reconcile
    /// request for each person updated: policies may use these values (`${user.email}`).
    /// Returns the user IDs updated.
    pub async fn update_directory_details(
        &self,
        provider: &str,
        people: &[DirectoryDetails],
    ) -> StoreResult<Vec<String>> {
        if people.is_empty() {
            return Ok(Vec::new());
        }
        let now = super::now();
        // Only a row that still differs is updated: of two nodes syncing at once, one records
        // the request.
        let update = "UPDATE users SET login = COALESCE($1, login), \
                      email = COALESCE($2, email), display_name = COALESCE($3, display_name) \
                      WHERE provider = $4 AND subject = $5 \
                      AND (login IS DISTINCT FROM COALESCE($1, login) \
                      OR email IS DISTINCT FROM COALESCE($2, email) \
                      OR display_name IS DISTINCT FROM COALESCE($3, display_name)) RETURNING id";
        let request = "INSERT INTO reconcile_requests (user_id, udid, reason, requested_at) \
                       VALUES ($1, NULL, 'ldap-sync: directory details changed', $2)";
        let updated = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let mut updated = Vec::new();
            for person in people {
                let user_id: Option<String> = sqlx::query_scalar(update)
                    .bind(&person.login)
                    .bind(&person.email)
                    .bind(&person.display_name)
                    .bind(provider)
                    .bind(&person.subject)
                    .fetch_optional(&mut *tx)
                    .await?;
                if let Some(user_id) = user_id {
                    sqlx::query(request)
                        .bind(&user_id)
                        .bind(now)
                        .execute(&mut *tx)
                        .await?;
                    updated.push(user_id);
                }
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(updated)
        }
        .await)?;
        Ok(updated)
    }

    /// The IDs of the people of `provider` with these subjects (unknown subjects are skipped).
    async fn user_ids_by_subject(
        &self,
        provider: &str,
        subjects: &[String],
    ) -> StoreResult<BTreeSet<String>> {
        let mut ids = BTreeSet::new();
        for chunk in subjects.chunks(CHUNK) {
            let sql = format!(
                "SELECT id FROM users WHERE provider = $1 AND subject IN ({})",
                placeholders(2, chunk.len())
            );
            let found: Vec<String> = on_pool!(self, |pool| {
                let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone())).bind(provider);
                for subject in chunk {
                    query = query.bind(subject);
                }
                query.fetch_all(pool).await?
            });
            ids.extend(found);
        }
        Ok(ids)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn row_lists_number_their_placeholders_after_the_shared_ones() {
        assert_eq!(placeholders(2, 3), "$2, $3, $4");
        assert_eq!(
            membership_rows(2),
            "($4, $1, $2, $3, $3), ($5, $1, $2, $3, $3)"
        );
        assert_eq!(request_rows(2), "($3, NULL, $1, $2), ($4, NULL, $1, $2)");
    }
}
