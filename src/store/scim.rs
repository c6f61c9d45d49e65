//! SCIM 2.0 provisioning: the clients (one provider's credential each), and the SCIM view of
//! the people and groups they push. A SCIM user is the `users` row of its provider (SCIM id =
//! `users.id`), a SCIM group is the `groups` row (SCIM id = `groups.id`), so sign-ins, the
//! directory sync and SCIM write the same people and groups. Like the directory sync, every
//! change the reconciler must act on (status, membership) records its reconcile request in the
//! same transaction.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};

use super::directory::{CHUNK, membership_rows, placeholders, request_rows};
use super::{AccountStatus, Store, StoreError, StoreResult, on_pool};

/// The `source` of memberships written by SCIM.
pub const SCIM_SOURCE: &str = "scim";

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ScimClientRecord {
    pub id: String,
    pub provider: String,
    pub name: String,
    pub secret_hash: String,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// How a SCIM user is matched to the person a sign-in of the same provider made
/// (`[idp.NAME] scim_match`). Only ever within the client's own provider.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ScimMatch {
    /// `externalId` (or, when none is sent, `userName`) is the sign-in's subject.
    #[default]
    ExternalId,
    /// `userName` is the sign-in's login (compared without case).
    UserName,
    /// The SCIM user's e-mail (primary, else work, else first) is the sign-in's e-mail
    /// (compared without case).
    Email,
}

impl ScimMatch {
    pub fn as_str(self) -> &'static str {
        match self {
            ScimMatch::ExternalId => "external_id",
            ScimMatch::UserName => "user_name",
            ScimMatch::Email => "email",
        }
    }

    /// The value a person is found by under this mode (lower case for userName and e-mail);
    /// `None` when the user carries none (only possible for e-mail).
    pub fn key(self, user: &ScimUserWrite) -> Option<String> {
        match self {
            ScimMatch::ExternalId => Some(
                user.external_id
                    .clone()
                    .unwrap_or_else(|| user.user_name.clone()),
            ),
            ScimMatch::UserName => Some(user.user_name.to_lowercase()),
            ScimMatch::Email => user.email.as_ref().map(|e| e.to_lowercase()),
        }
    }

    /// The subject of a person SCIM provisions before they ever signed in: the IdP subject
    /// itself for `external_id`; otherwise a placeholder that the person's first sign-in
    /// (matching login or e-mail) replaces with the real subject (see
    /// [`placeholder_subjects`]).
    pub fn subject_for(self, key: &str) -> String {
        match self {
            ScimMatch::ExternalId => key.to_string(),
            ScimMatch::UserName => format!("{PLACEHOLDER_PREFIX}user_name:{key}"),
            ScimMatch::Email => format!("{PLACEHOLDER_PREFIX}email:{key}"),
        }
    }
}

/// Subjects that begin so were made by SCIM for a person not yet seen at sign-in.
pub const PLACEHOLDER_PREFIX: &str = "scim:";

/// The placeholder subjects a sign-in with this login and e-mail adopts (a person SCIM
/// provisioned first under `user_name` or `email` matching).
pub fn placeholder_subjects(login: Option<&str>, email: Option<&str>) -> [Option<String>; 2] {
    [
        login.map(|l| ScimMatch::UserName.subject_for(&l.to_lowercase())),
        email.map(|e| ScimMatch::Email.subject_for(&e.to_lowercase())),
    ]
}

/// A person as SCIM knows them.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ScimUserRow {
    pub user_id: String,
    pub user_name: String,
    pub external_id: Option<String>,
    pub active: bool,
    /// JSON: the attributes the IdP pushed (known ones only).
    pub resource: String,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// What a SCIM write makes of a person.
#[derive(Clone, Debug)]
pub struct ScimUserWrite {
    pub user_name: String,
    pub external_id: Option<String>,
    pub active: bool,
    pub email: Option<String>,
    pub display_name: Option<String>,
    pub resource: String,
    /// The resource's `displayName`, lower-cased ("" without one): what list filters match
    /// on in SQL.
    pub display_name_key: String,
    /// Every `emails[].value`, lower-cased, each between newlines ("\n" without any).
    pub emails_key: String,
}

#[derive(Clone, Debug, sqlx::FromRow)]
pub struct ScimGroupRow {
    pub group_id: String,
    pub external_id: Option<String>,
    pub display_name: String,
    pub version: i64,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// How a group write changes the members (user IDs).
#[derive(Clone, Debug)]
pub enum MemberChange {
    /// Add these and remove those; the rest stay.
    Delta {
        add: Vec<String>,
        remove: Vec<String>,
    },
    /// The members are exactly these.
    Replace(Vec<String>),
}

/// Why a SCIM create did not write.
enum Refused {
    /// The person matched already has a SCIM resource.
    Provisioned,
    /// More than one of the provider's people match.
    Ambiguous,
}

/// What a SCIM list can ask of the database: a condition every resource its filter matches
/// meets (it may let more through: the filter itself is then evaluated on what comes back).
/// Values are ready to compare: lower-cased where the attribute compares without case.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ScimNarrowing {
    All(Vec<ScimNarrowing>),
    Any(Vec<ScimNarrowing>),
    Text {
        column: ScimColumn,
        op: TextMatch,
        value: String,
    },
    Active(bool),
}

/// An attribute the store keeps a searchable copy of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScimColumn {
    /// Users only (lower-cased).
    UserName,
    /// Users and groups (as sent: it compares with case).
    ExternalId,
    /// Users and groups (lower-cased).
    DisplayName,
    /// Users only: `emails[].value` (lower-cased).
    Emails,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TextMatch {
    Eq,
    StartsWith,
    Contains,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum ScimKind {
    User,
    Group,
}

enum Bind {
    Text(String),
    Bool(bool),
}

/// `%`, `_` and `\` taken literally in a LIKE pattern (`ESCAPE '\'`).
fn like_literal(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// The SQL of a narrowing (parameters from `$first`, values pushed to `binds`). Only the
/// statement's shape comes from here; every value is a parameter. A condition that does not
/// apply to `kind` is `TRUE` (the filter decides).
fn narrowing_sql(n: &ScimNarrowing, kind: ScimKind, binds: &mut Vec<Bind>, first: usize) -> String {
    let param = |bind: Bind, binds: &mut Vec<Bind>| {
        binds.push(bind);
        format!("${}", first + binds.len() - 1)
    };
    match n {
        ScimNarrowing::All(parts) | ScimNarrowing::Any(parts) if parts.is_empty() => "1 = 1".into(),
        ScimNarrowing::All(parts) => parts
            .iter()
            .map(|p| format!("({})", narrowing_sql(p, kind, binds, first)))
            .collect::<Vec<_>>()
            .join(" AND "),
        ScimNarrowing::Any(parts) => parts
            .iter()
            .map(|p| format!("({})", narrowing_sql(p, kind, binds, first)))
            .collect::<Vec<_>>()
            .join(" OR "),
        ScimNarrowing::Active(active) if kind == ScimKind::User => {
            format!("s.active = {}", param(Bind::Bool(*active), binds))
        }
        ScimNarrowing::Active(_) => "1 = 1".into(),
        ScimNarrowing::Text { column, op, value } => {
            // (column, whether rows from before the keys existed may hold NULL)
            let (sql_column, nullable) = match (kind, column) {
                (ScimKind::User, ScimColumn::UserName) => ("s.user_name_key", false),
                (_, ScimColumn::ExternalId) => ("s.external_id", false),
                (_, ScimColumn::DisplayName) => ("s.display_name_key", true),
                (ScimKind::User, ScimColumn::Emails) => ("s.emails_key", true),
                (ScimKind::Group, _) => return "1 = 1".into(),
            };
            let test = match (column, op) {
                (_, TextMatch::Eq) if *column != ScimColumn::Emails => {
                    format!("{sql_column} = {}", param(Bind::Text(value.clone()), binds))
                }
                _ => {
                    let literal = like_literal(value);
                    let pattern = match (column, op) {
                        (ScimColumn::Emails, TextMatch::Eq) => format!("%\n{literal}\n%"),
                        (ScimColumn::Emails, TextMatch::StartsWith) => format!("%\n{literal}%"),
                        (_, TextMatch::StartsWith) => format!("{literal}%"),
                        _ => format!("%{literal}%"),
                    };
                    format!(
                        "{sql_column} LIKE {} ESCAPE '\\'",
                        param(Bind::Text(pattern), binds)
                    )
                }
            };
            if nullable {
                format!("{sql_column} IS NULL OR {test}")
            } else {
                test
            }
        }
    }
}

/// The outcome of a conditional write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Versioned<T> {
    Written(T),
    /// The resource changed since it was read (or was removed): nothing was written.
    Stale,
}

const SELECT_CLIENTS: &str = "SELECT id, provider, name, secret_hash, created_at, created_by, \
                              last_used_at, revoked_at FROM scim_clients ";
const SELECT_USERS: &str = "SELECT s.user_id, s.user_name, s.external_id, s.active, s.resource, \
                            s.version, s.created_at, s.updated_at FROM scim_users s ";
const SELECT_GROUPS: &str = "SELECT s.group_id, s.external_id, s.display_name, s.version, \
                             s.created_at, s.updated_at FROM scim_groups s ";

fn status_of(active: bool) -> AccountStatus {
    if active {
        AccountStatus::Active
    } else {
        AccountStatus::Disabled
    }
}

fn status_reason(to: AccountStatus) -> &'static str {
    match to {
        AccountStatus::Active => "scim: account active",
        AccountStatus::Disabled => "scim: account deactivated",
        AccountStatus::Deleted => "scim: account deleted",
    }
}

/// Sets the person's status (and records a reconcile request) when it differs, inside the
/// caller's transaction.
macro_rules! set_status {
    ($tx:expr, $user_id:expr, $to:expr, $now:expr) => {{
        let changed = sqlx::query(
            "UPDATE users SET status = $1, status_changed_at = $2 WHERE id = $3 AND status <> $1",
        )
        .bind($to)
        .bind($now)
        .bind($user_id)
        .execute(&mut *$tx)
        .await?
        .rows_affected();
        if changed > 0 {
            sqlx::query(
                "INSERT INTO reconcile_requests (user_id, udid, reason, requested_at) \
                 VALUES ($1, NULL, $2, $3)",
            )
            .bind($user_id)
            .bind(status_reason($to))
            .bind($now)
            .execute(&mut *$tx)
            .await?;
        }
    }};
}

/// Inserts and deletes memberships of `$group` (delta lists of user IDs), with a reconcile
/// request per person who joined or left; evaluates to the number of people affected.
macro_rules! write_members {
    ($tx:expr, $group:expr, $add:expr, $remove:expr, $now:expr) => {{
        let mut joined: Vec<String> = Vec::new();
        let mut left: Vec<String> = Vec::new();
        for chunk in $add.chunks(CHUNK) {
            let sql = format!(
                "INSERT INTO user_groups (user_id, group_id, source, first_seen_at, \
                 last_seen_at) VALUES {} ON CONFLICT (user_id, group_id) DO NOTHING \
                 RETURNING user_id",
                membership_rows(chunk.len())
            );
            let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
                .bind($group)
                .bind(SCIM_SOURCE)
                .bind($now);
            for user_id in chunk {
                query = query.bind(user_id);
            }
            let inserted: Vec<String> = query.fetch_all(&mut *$tx).await?;
            joined.extend(inserted);
        }
        for chunk in $remove.chunks(CHUNK) {
            let sql = format!(
                "DELETE FROM user_groups WHERE group_id = $1 AND user_id IN ({}) \
                 RETURNING user_id",
                placeholders(2, chunk.len())
            );
            let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql)).bind($group);
            for user_id in chunk {
                query = query.bind(user_id);
            }
            let deleted: Vec<String> = query.fetch_all(&mut *$tx).await?;
            left.extend(deleted);
        }
        let joined_reason = format!("scim: joined {}", $group);
        let left_reason = format!("scim: left {}", $group);
        for (user_ids, reason) in [(&joined, &joined_reason), (&left, &left_reason)] {
            for chunk in user_ids.chunks(CHUNK) {
                let sql = format!(
                    "INSERT INTO reconcile_requests (user_id, udid, reason, requested_at) \
                     VALUES {}",
                    request_rows(chunk.len())
                );
                let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(reason)
                    .bind($now);
                for user_id in chunk {
                    query = query.bind(user_id);
                }
                query.execute(&mut *$tx).await?;
            }
        }
        joined.len() + left.len()
    }};
}

impl Store {
    pub async fn insert_scim_client(&self, client: &ScimClientRecord) -> StoreResult<()> {
        let sql = "INSERT INTO scim_clients (id, provider, name, secret_hash, created_at, \
                   created_by) VALUES ($1, $2, $3, $4, $5, $6)";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(&client.id)
            .bind(&client.provider)
            .bind(&client.name)
            .bind(&client.secret_hash)
            .bind(client.created_at)
            .bind(&client.created_by)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    pub async fn scim_client(&self, id: &str) -> StoreResult<Option<ScimClientRecord>> {
        let sql = format!("{SELECT_CLIENTS} WHERE id = $1");
        Ok(on_pool!(self, |pool| sqlx::query_as(sqlx::AssertSqlSafe(
            sql
        ))
        .bind(id)
        .fetch_optional(pool)
        .await?))
    }

    /// Every client, active first.
    pub async fn list_scim_clients(&self) -> StoreResult<Vec<ScimClientRecord>> {
        let sql =
            format!("{SELECT_CLIENTS} ORDER BY (revoked_at IS NOT NULL), provider, created_at");
        Ok(on_pool!(self, |pool| sqlx::query_as(sqlx::AssertSqlSafe(
            sql
        ))
        .fetch_all(pool)
        .await?))
    }

    /// Revokes the active client `id`; `NotFound` when there is none.
    pub async fn revoke_scim_client(&self, id: &str) -> StoreResult<ScimClientRecord> {
        let sql = "UPDATE scim_clients SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL";
        let done = on_pool!(self, |pool| sqlx::query(sql)
            .bind(super::now())
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected());
        if done == 0 {
            return Err(StoreError::NotFound);
        }
        self.scim_client(id).await?.ok_or(StoreError::NotFound)
    }

    pub async fn touch_scim_client(&self, id: &str, at: DateTime<Utc>) -> StoreResult<()> {
        let sql = "UPDATE scim_clients SET last_used_at = $1 WHERE id = $2";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(at)
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    pub async fn scim_user(
        &self,
        provider: &str,
        user_id: &str,
    ) -> StoreResult<Option<ScimUserRow>> {
        let sql = format!("{SELECT_USERS} WHERE s.provider = $1 AND s.user_id = $2");
        Ok(on_pool!(self, |pool| sqlx::query_as(sqlx::AssertSqlSafe(
            sql
        ))
        .bind(provider)
        .bind(user_id)
        .fetch_optional(pool)
        .await?))
    }

    /// The SCIM users of `provider` in creation order, at most `limit`, narrowed in SQL by
    /// `narrowing` when given.
    pub async fn scim_users(
        &self,
        provider: &str,
        narrowing: Option<&ScimNarrowing>,
        limit: i64,
    ) -> StoreResult<Vec<ScimUserRow>> {
        let mut binds = Vec::new();
        let condition = narrowing.map_or_else(
            || "1 = 1".to_string(),
            |n| narrowing_sql(n, ScimKind::User, &mut binds, 2),
        );
        let sql = format!(
            "{SELECT_USERS} WHERE s.provider = $1 AND ({condition}) \
             ORDER BY s.created_at, s.user_id LIMIT ${}",
            binds.len() + 2
        );
        Ok(on_pool!(self, |pool| {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone())).bind(provider);
            for bind in &binds {
                query = match bind {
                    Bind::Text(text) => query.bind(text.clone()),
                    Bind::Bool(value) => query.bind(*value),
                };
            }
            query.bind(limit).fetch_all(pool).await?
        }))
    }

    /// Creates the SCIM user: the person `key` finds under `mode` (see [`ScimMatch`]) among the
    /// provider's people is adopted if they signed in before, else created. `Conflict` when the
    /// userName is taken, the person already has a SCIM resource, or (userName and e-mail
    /// matching) several of the provider's people match. Returns the user ID.
    pub async fn create_scim_user(
        &self,
        provider: &str,
        mode: ScimMatch,
        key: &str,
        user: &ScimUserWrite,
    ) -> StoreResult<String> {
        let now = super::now();
        let upsert = "INSERT INTO users (id, provider, subject, login, email, display_name, \
                      created_at, last_sign_in_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
                      ON CONFLICT (provider, subject) DO UPDATE SET login = excluded.login, \
                      email = COALESCE(excluded.email, users.email), \
                      display_name = COALESCE(excluded.display_name, users.display_name) \
                      RETURNING id";
        // Only ever among the client's own provider's people.
        let find = match mode {
            ScimMatch::ExternalId => None,
            ScimMatch::UserName => Some(
                "SELECT id FROM users WHERE provider = $1 AND LOWER(login) = LOWER($2) \
                 ORDER BY created_at, id LIMIT 2",
            ),
            ScimMatch::Email => Some(
                "SELECT id FROM users WHERE provider = $1 AND LOWER(email) = LOWER($2) \
                 ORDER BY created_at, id LIMIT 2",
            ),
        };
        let refresh = "UPDATE users SET login = $1, email = COALESCE($2, email), \
                       display_name = COALESCE($3, display_name) WHERE id = $4";
        let taken = "SELECT COUNT(*) FROM scim_users WHERE user_id = $1";
        let insert = "INSERT INTO scim_users (user_id, provider, user_name, user_name_key, \
                      external_id, active, resource, version, created_at, updated_at, \
                      display_name_key, emails_key) \
                      VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8, $8, $9, $10)";
        let matched_value = match mode {
            ScimMatch::Email => user.email.clone().unwrap_or_default(),
            _ => user.user_name.clone(),
        };
        let result = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let found: Vec<String> = match find {
                Some(sql) => {
                    sqlx::query_scalar(sql)
                        .bind(provider)
                        .bind(&matched_value)
                        .fetch_all(&mut *tx)
                        .await?
                }
                None => Vec::new(),
            };
            if found.len() > 1 {
                tx.rollback().await?;
                return Ok(Err(Refused::Ambiguous));
            }
            let user_id: String = match found.into_iter().next() {
                Some(user_id) => {
                    sqlx::query(refresh)
                        .bind(&user.user_name)
                        .bind(&user.email)
                        .bind(&user.display_name)
                        .bind(&user_id)
                        .execute(&mut *tx)
                        .await?;
                    user_id
                }
                None => {
                    sqlx::query_scalar(upsert)
                        .bind(uuid::Uuid::new_v4().to_string())
                        .bind(provider)
                        .bind(mode.subject_for(key))
                        .bind(&user.user_name)
                        .bind(&user.email)
                        .bind(&user.display_name)
                        .bind(now)
                        .fetch_one(&mut *tx)
                        .await?
                }
            };
            let existing: i64 = sqlx::query_scalar(taken)
                .bind(&user_id)
                .fetch_one(&mut *tx)
                .await?;
            if existing > 0 {
                tx.rollback().await?;
                return Ok(Err(Refused::Provisioned));
            }
            sqlx::query(insert)
                .bind(&user_id)
                .bind(provider)
                .bind(&user.user_name)
                .bind(user.user_name.to_lowercase())
                .bind(&user.external_id)
                .bind(user.active)
                .bind(&user.resource)
                .bind(now)
                .bind(&user.display_name_key)
                .bind(&user.emails_key)
                .execute(&mut *tx)
                .await?;
            // A person provisioned again after a delete, or created inactive.
            set_status!(tx, &user_id, status_of(user.active), now);
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Ok(user_id))
        }
        .await);
        let matched_on = match mode {
            ScimMatch::ExternalId => "externalId",
            ScimMatch::UserName => "userName",
            ScimMatch::Email => "e-mail",
        };
        match result {
            Ok(Ok(user_id)) => Ok(user_id),
            Ok(Err(Refused::Provisioned)) => Err(StoreError::Conflict(format!(
                "a user with this {matched_on} is already provisioned"
            ))),
            Ok(Err(Refused::Ambiguous)) => Err(StoreError::Conflict(format!(
                "several people of provider '{provider}' have this {matched_on}: cannot tell \
                 which one this user is"
            ))),
            Err(e) => Err(StoreError::conflict_on_unique(
                e,
                format!("the userName '{}' is already taken", user.user_name),
            )),
        }
    }

    /// Replaces the SCIM user `user_id` if it is still at `version`: the resource, the
    /// person's details and subject, and their status (a change records a reconcile request).
    /// Returns the new version.
    pub async fn update_scim_user(
        &self,
        provider: &str,
        mode: ScimMatch,
        user_id: &str,
        version: i64,
        user: &ScimUserWrite,
    ) -> StoreResult<Versioned<i64>> {
        let now = super::now();
        let update = "UPDATE scim_users SET user_name = $1, user_name_key = $2, external_id = $3, \
                      active = $4, resource = $5, version = version + 1, updated_at = $6, \
                      display_name_key = $10, emails_key = $11 \
                      WHERE provider = $7 AND user_id = $8 AND version = $9 RETURNING version";
        // The subject follows externalId under `external_id` matching; under the others it is
        // the sign-in's own and stays, unless it is still SCIM's placeholder.
        let details = "UPDATE users SET subject = CASE WHEN $1 IS NOT NULL AND ($6 OR subject \
                       LIKE 'scim:%') THEN $1 ELSE subject END, login = $2, \
                       email = COALESCE($3, email), display_name = COALESCE($4, display_name) \
                       WHERE id = $5";
        let subject = mode.key(user).map(|key| mode.subject_for(&key));
        let result = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let written: Option<i64> = sqlx::query_scalar(update)
                .bind(&user.user_name)
                .bind(user.user_name.to_lowercase())
                .bind(&user.external_id)
                .bind(user.active)
                .bind(&user.resource)
                .bind(now)
                .bind(provider)
                .bind(user_id)
                .bind(version)
                .bind(&user.display_name_key)
                .bind(&user.emails_key)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(written) = written else {
                tx.rollback().await?;
                return Ok(Versioned::Stale);
            };
            sqlx::query(details)
                .bind(&subject)
                .bind(&user.user_name)
                .bind(&user.email)
                .bind(&user.display_name)
                .bind(user_id)
                .bind(mode == ScimMatch::ExternalId)
                .execute(&mut *tx)
                .await?;
            set_status!(tx, user_id, status_of(user.active), now);
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Versioned::Written(written))
        }
        .await);
        result.map_err(|e| {
            StoreError::conflict_on_unique(
                e,
                format!(
                    "the userName '{}' or the externalId is already taken",
                    user.user_name
                ),
            )
        })
    }

    /// Deletes the SCIM user: the person is marked deleted (the reconciler deprovisions their
    /// devices) and the SCIM resource goes; the `users` row, devices and audit history stay.
    /// False when there was no such SCIM user.
    pub async fn delete_scim_user(&self, provider: &str, user_id: &str) -> StoreResult<bool> {
        let now = super::now();
        let delete = "DELETE FROM scim_users WHERE provider = $1 AND user_id = $2";
        Ok(on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let gone = sqlx::query(delete)
                .bind(provider)
                .bind(user_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if gone == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            set_status!(tx, user_id, AccountStatus::Deleted, now);
            tx.commit().await?;
            Ok::<_, sqlx::Error>(true)
        }
        .await)?)
    }

    /// Of `user_ids`, those that are SCIM users of `provider`.
    pub async fn known_scim_users(
        &self,
        provider: &str,
        user_ids: &[String],
    ) -> StoreResult<BTreeSet<String>> {
        let mut known = BTreeSet::new();
        for chunk in user_ids.chunks(CHUNK) {
            let sql = format!(
                "SELECT user_id FROM scim_users WHERE provider = $1 AND user_id IN ({})",
                placeholders(2, chunk.len())
            );
            let found: Vec<String> = on_pool!(self, |pool| {
                let mut query = sqlx::query_scalar(sqlx::AssertSqlSafe(sql.clone())).bind(provider);
                for id in chunk {
                    query = query.bind(id);
                }
                query.fetch_all(pool).await?
            });
            known.extend(found);
        }
        Ok(known)
    }

    pub async fn scim_group(
        &self,
        provider: &str,
        group_id: &str,
    ) -> StoreResult<Option<ScimGroupRow>> {
        let sql = format!("{SELECT_GROUPS} WHERE s.provider = $1 AND s.group_id = $2");
        Ok(on_pool!(self, |pool| sqlx::query_as(sqlx::AssertSqlSafe(
            sql
        ))
        .bind(provider)
        .bind(group_id)
        .fetch_optional(pool)
        .await?))
    }

    /// The SCIM groups of `provider` in creation order, at most `limit`, narrowed in SQL by
    /// `narrowing` when given.
    pub async fn scim_groups(
        &self,
        provider: &str,
        narrowing: Option<&ScimNarrowing>,
        limit: i64,
    ) -> StoreResult<Vec<ScimGroupRow>> {
        let mut binds = Vec::new();
        let condition = narrowing.map_or_else(
            || "1 = 1".to_string(),
            |n| narrowing_sql(n, ScimKind::Group, &mut binds, 2),
        );
        let sql = format!(
            "{SELECT_GROUPS} WHERE s.provider = $1 AND ({condition}) \
             ORDER BY s.created_at, s.group_id LIMIT ${}",
            binds.len() + 2
        );
        Ok(on_pool!(self, |pool| {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone())).bind(provider);
            for bind in &binds {
                query = match bind {
                    Bind::Text(text) => query.bind(text.clone()),
                    Bind::Bool(value) => query.bind(*value),
                };
            }
            query.bind(limit).fetch_all(pool).await?
        }))
    }

    /// The members of a group (user ID and display name) that are not deleted, in ID order.
    pub async fn scim_group_members(
        &self,
        group_id: &str,
    ) -> StoreResult<Vec<(String, Option<String>)>> {
        let sql = "SELECT u.id, COALESCE(u.display_name, u.login) FROM user_groups m \
                   JOIN users u ON u.id = m.user_id \
                   WHERE m.group_id = $1 AND u.status <> 'deleted' ORDER BY u.id";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(group_id)
            .fetch_all(pool)
            .await?))
    }

    /// Creates the SCIM group of `provider` with these members: `groups.external_id` is the
    /// SCIM externalId (the stable ID policies target) or else the new group's own ID. A group
    /// the provider's sign-ins already brought is adopted. `Conflict` when it already has a
    /// SCIM resource. Returns the group ID.
    pub async fn create_scim_group(
        &self,
        provider: &str,
        external_id: Option<&str>,
        display_name: &str,
        members: &[String],
    ) -> StoreResult<String> {
        let now = super::now();
        let new_id = uuid::Uuid::new_v4().to_string();
        let upsert = "INSERT INTO groups (id, provider, external_id, name, created_at, \
                      updated_at) VALUES ($1, $2, $3, $4, $5, $5) \
                      ON CONFLICT (provider, external_id) DO UPDATE SET name = excluded.name, \
                      updated_at = excluded.updated_at RETURNING id";
        let taken = "SELECT COUNT(*) FROM scim_groups WHERE group_id = $1";
        let insert = "INSERT INTO scim_groups (group_id, provider, external_id, display_name, \
                      version, created_at, updated_at, display_name_key) \
                      VALUES ($1, $2, $3, $4, 1, $5, $5, $6)";
        let created = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let group_id: String = sqlx::query_scalar(upsert)
                .bind(&new_id)
                .bind(provider)
                .bind(external_id.unwrap_or(&new_id))
                .bind(display_name)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
            let existing: i64 = sqlx::query_scalar(taken)
                .bind(&group_id)
                .fetch_one(&mut *tx)
                .await?;
            if existing > 0 {
                tx.rollback().await?;
                return Ok(None);
            }
            sqlx::query(insert)
                .bind(&group_id)
                .bind(provider)
                .bind(external_id)
                .bind(display_name)
                .bind(now)
                .bind(display_name.to_lowercase())
                .execute(&mut *tx)
                .await?;
            let none: Vec<String> = Vec::new();
            let _joined = write_members!(tx, &group_id, members, none, now);
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Some(group_id))
        }
        .await)?;
        created.ok_or_else(|| {
            StoreError::Conflict("a group with this externalId is already provisioned".into())
        })
    }

    /// Updates the SCIM group `group_id` if it is still at `version`: its name (and
    /// `groups.name`), and its members as `change` says, writing only the difference with a
    /// reconcile request per person who joined or left. Returns the new version and the number
    /// of people affected.
    pub async fn update_scim_group(
        &self,
        provider: &str,
        group_id: &str,
        version: i64,
        display_name: &str,
        change: &MemberChange,
    ) -> StoreResult<Versioned<(i64, usize)>> {
        let now = super::now();
        let update = "UPDATE scim_groups SET display_name = $1, version = version + 1, \
                      updated_at = $2, display_name_key = $6 WHERE provider = $3 \
                      AND group_id = $4 AND version = $5 RETURNING version";
        let rename = "UPDATE groups SET name = $1, updated_at = $2 WHERE id = $3 AND name <> $1";
        let current = "SELECT user_id FROM user_groups WHERE group_id = $1";
        Ok(on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let written: Option<i64> = sqlx::query_scalar(update)
                .bind(display_name)
                .bind(now)
                .bind(provider)
                .bind(group_id)
                .bind(version)
                .bind(display_name.to_lowercase())
                .fetch_optional(&mut *tx)
                .await?;
            let Some(written) = written else {
                tx.rollback().await?;
                return Ok(Versioned::Stale);
            };
            sqlx::query(rename)
                .bind(display_name)
                .bind(now)
                .bind(group_id)
                .execute(&mut *tx)
                .await?;
            let (add, remove): (Vec<String>, Vec<String>) = match change {
                MemberChange::Delta { add, remove } => (add.clone(), remove.clone()),
                MemberChange::Replace(wanted) => {
                    let held: BTreeSet<String> = sqlx::query_scalar(current)
                        .bind(group_id)
                        .fetch_all(&mut *tx)
                        .await?
                        .into_iter()
                        .collect();
                    let wanted: BTreeSet<String> = wanted.iter().cloned().collect();
                    (
                        wanted.difference(&held).cloned().collect(),
                        held.difference(&wanted).cloned().collect(),
                    )
                }
            };
            let affected = write_members!(tx, group_id, add, remove, now);
            tx.commit().await?;
            Ok::<_, sqlx::Error>(Versioned::Written((written, affected)))
        }
        .await)?)
    }

    /// Deletes the SCIM group: every member leaves (each with a reconcile request) and the
    /// SCIM resource goes; the `groups` row stays, as policies may name it. False when there
    /// was no such SCIM group.
    pub async fn delete_scim_group(&self, provider: &str, group_id: &str) -> StoreResult<bool> {
        let now = super::now();
        let delete = "DELETE FROM scim_groups WHERE provider = $1 AND group_id = $2";
        let current = "SELECT user_id FROM user_groups WHERE group_id = $1";
        Ok(on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let gone = sqlx::query(delete)
                .bind(provider)
                .bind(group_id)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if gone == 0 {
                tx.rollback().await?;
                return Ok(false);
            }
            let held: Vec<String> = sqlx::query_scalar(current)
                .bind(group_id)
                .fetch_all(&mut *tx)
                .await?;
            let none: Vec<String> = Vec::new();
            let _left = write_members!(tx, group_id, none, held, now);
            tx.commit().await?;
            Ok::<_, sqlx::Error>(true)
        }
        .await)?)
    }
}
