//! Read-only queries for the admin console's pages: the device list with its filters, the
//! fleet's counts for the overview, and the audit log searched by target and time. Writes go
//! through the same store methods the admin API uses.

use chrono::{DateTime, SubsecRound, Utc};

use super::{AuditEntry, ChannelStatus, CommandStatus, Store, StoreResult, on_pool};

/// Most rows one console list shows (the filters narrow it).
pub const CONSOLE_PAGE_MAX: u32 = 500;

/// What the device list is filtered by; `None` matches everything.
#[derive(Clone, Debug, Default)]
pub struct DeviceFilter {
    /// Part of the device name, serial number or UDID (case-insensitive).
    pub text: Option<String>,
    /// Part of the owner's login, email or display name (case-insensitive).
    pub owner: Option<String>,
    /// A group (its name or the provider's id) the owner is in.
    pub group: Option<String>,
    /// The device channel's status.
    pub status: Option<ChannelStatus>,
    /// Seen (checked in) at or after this time.
    pub seen_since: Option<DateTime<Utc>>,
    pub limit: u32,
}

/// A device as the console's list shows it.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DeviceRow {
    pub udid: String,
    pub device_name: Option<String>,
    pub serial_number: Option<String>,
    pub product_name: Option<String>,
    pub model_name: Option<String>,
    pub os_version: Option<String>,
    pub owner_login: Option<String>,
    pub owner_email: Option<String>,
    pub owner_name: Option<String>,
    pub status: Option<ChannelStatus>,
    pub last_seen_at: Option<DateTime<Utc>>,
}

/// Devices counted by their channel's status and product name.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DeviceCount {
    pub status: Option<ChannelStatus>,
    pub product_name: Option<String>,
    pub count: i64,
}

/// Filters for the console's audit search; `None` matches everything.
#[derive(Clone, Debug, Default)]
pub struct AuditSearch {
    /// Part of the actor, anywhere, in any case (`alice` finds `admin:oidc:alice`,
    /// `admin:oidc:` every admin of that provider).
    pub actor: Option<String>,
    /// The action starts with this (`command.`, `enrollment.retire`).
    pub action: Option<String>,
    /// The target, exactly.
    pub target: Option<String>,
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    pub limit: u32,
}

/// A person as the console's list shows them.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct PersonRow {
    pub id: String,
    pub provider: String,
    pub subject: String,
    pub login: Option<String>,
    pub email: Option<String>,
    pub display_name: Option<String>,
    pub last_sign_in_at: DateTime<Utc>,
    /// Devices bound to them.
    pub devices: i64,
}

/// How many parameters [`hour_bucket_sql`] uses: `$1` is `now + 1 h`, `$2`…`$25` are
/// `now - 1 h`…`now - 24 h` (see [`hour_bounds`]).
const HOUR_BOUNDS: usize = 25;

/// `now` and the bounds of the overview's 24 hours, as [`hour_bucket_sql`] binds them. `now`
/// is cut to microseconds (what PostgreSQL keeps), so both databases compare alike.
pub fn hour_bounds(now: DateTime<Utc>) -> Vec<DateTime<Utc>> {
    let now = now.trunc_subsecs(6);
    let hour = chrono::Duration::hours(1);
    std::iter::once(now + hour)
        .chain((1..HOUR_BOUNDS as i32).map(|k| now - hour * k))
        .collect()
}

/// A SQL expression numbering `column`'s time as `(now - at).num_hours()` does for the charts
/// (`chart::Counts::add`): 0 for the hour before `now` (and up to an hour ahead), k for
/// `now - (k+1) h < at <= now - k h`, -1 an hour or more ahead, 24 for older. Comparisons with
/// bound times only, so one text serves both databases and every index.
fn hour_bucket_sql(column: &str) -> String {
    let mut sql = format!("CAST(CASE WHEN {column} >= $1 THEN -1");
    for age in 0..HOUR_BOUNDS - 1 {
        sql.push_str(&format!(" WHEN {column} > ${} THEN {age}", age + 2));
    }
    sql.push_str(" ELSE 24 END AS BIGINT)");
    sql
}

/// `text` as a LIKE pattern matching it anywhere (`%`, `_` and `\` escaped), lower-cased.
fn contains_pattern(text: &str) -> String {
    format!("%{}%", like_escape(&text.to_lowercase()))
}

fn prefix_pattern(text: &str) -> String {
    format!("{}%", like_escape(text))
}

fn like_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if matches!(c, '%' | '_' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl Store {
    /// Devices matching `filter`, by name, at most `filter.limit` (capped).
    pub async fn console_devices(&self, filter: &DeviceFilter) -> StoreResult<Vec<DeviceRow>> {
        // Absent filters bind NULL and match everything: one statement serves every search.
        let sql = "SELECT d.udid, d.device_name, d.serial_number, d.product_name, d.model_name, \
                   d.os_version, u.login AS owner_login, u.email AS owner_email, \
                   u.display_name AS owner_name, e.status, e.last_seen_at \
                   FROM mdm_devices d \
                   LEFT JOIN users u ON u.id = d.owner_id \
                   LEFT JOIN mdm_enrollments e ON e.id = d.udid \
                   WHERE ($1 IS NULL OR LOWER(COALESCE(d.device_name, '')) LIKE $1 ESCAPE '\\' \
                          OR LOWER(COALESCE(d.serial_number, '')) LIKE $1 ESCAPE '\\' \
                          OR LOWER(d.udid) LIKE $1 ESCAPE '\\') \
                     AND ($2 IS NULL OR LOWER(COALESCE(u.login, '')) LIKE $2 ESCAPE '\\' \
                          OR LOWER(COALESCE(u.email, '')) LIKE $2 ESCAPE '\\' \
                          OR LOWER(COALESCE(u.display_name, '')) LIKE $2 ESCAPE '\\') \
                     AND ($3 IS NULL OR d.owner_id IN (SELECT ug.user_id FROM user_groups ug \
                          JOIN groups g ON g.id = ug.group_id \
                          WHERE g.name = $3 OR g.external_id = $3)) \
                     AND ($4 IS NULL OR e.status = $4) \
                     AND ($5 IS NULL OR e.last_seen_at >= $5) \
                   ORDER BY LOWER(COALESCE(d.device_name, d.udid)), d.udid LIMIT $6";
        let text = filter.text.as_deref().map(contains_pattern);
        let owner = filter.owner.as_deref().map(contains_pattern);
        let limit = i64::from(filter.limit.clamp(1, CONSOLE_PAGE_MAX));
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(&text)
            .bind(&owner)
            .bind(&filter.group)
            .bind(filter.status)
            .bind(filter.seen_since)
            .bind(limit)
            .fetch_all(pool)
            .await?))
    }

    /// People whose login, e-mail or name contains `text`, in `group` (its name, the
    /// provider's id for it, or ours), by name; at most `limit` (capped).
    pub async fn console_people(
        &self,
        text: Option<&str>,
        group: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<PersonRow>> {
        let sql = "SELECT u.id, u.provider, u.subject, u.login, u.email, u.display_name, \
                   u.last_sign_in_at, \
                   (SELECT COUNT(*) FROM mdm_devices d WHERE d.owner_id = u.id) AS devices \
                   FROM users u \
                   WHERE ($1 IS NULL OR LOWER(COALESCE(u.login, '')) LIKE $1 ESCAPE '\\' \
                          OR LOWER(COALESCE(u.email, '')) LIKE $1 ESCAPE '\\' \
                          OR LOWER(COALESCE(u.display_name, '')) LIKE $1 ESCAPE '\\') \
                     AND ($2 IS NULL OR u.id IN (SELECT ug.user_id FROM user_groups ug \
                          JOIN groups g ON g.id = ug.group_id \
                          WHERE g.name = $2 OR g.external_id = $2 OR g.id = $2)) \
                   ORDER BY LOWER(COALESCE(u.display_name, u.login, u.subject)), u.id LIMIT $3";
        let text = text.map(contains_pattern);
        let limit = i64::from(limit.clamp(1, CONSOLE_PAGE_MAX));
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(&text)
            .bind(group)
            .bind(limit)
            .fetch_all(pool)
            .await?))
    }

    /// Every device counted by its device channel's status and its product name.
    pub async fn console_device_counts(&self) -> StoreResult<Vec<DeviceCount>> {
        let sql = "SELECT e.status, d.product_name, COUNT(*) AS count \
                   FROM mdm_devices d LEFT JOIN mdm_enrollments e ON e.id = d.udid \
                   GROUP BY e.status, d.product_name";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .fetch_all(pool)
            .await?))
    }

    /// Command channels seen in each of the 24 hours before `now`, counted in the database
    /// (a channel's `last_seen_at` moves at most once a minute): `(age, count)` rows, `age`
    /// as [`hour_bucket_sql`] numbers it.
    pub async fn console_check_ins_by_hour(
        &self,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<(i64, i64)>> {
        let sql = format!(
            "SELECT {} AS age, COUNT(*) FROM mdm_enrollments \
             WHERE last_seen_at >= ${} GROUP BY 1",
            hour_bucket_sql("last_seen_at"),
            HOUR_BOUNDS
        );
        let bounds = hour_bounds(now);
        Ok(on_pool!(self, |pool| {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()));
            for bound in &bounds {
                query = query.bind(*bound);
            }
            query.fetch_all(pool).await?
        }))
    }

    /// Commands answered in each of the 24 hours before `now`, by how they were answered:
    /// `(age, status, count)` rows, `age` as [`hour_bucket_sql`] numbers it.
    pub async fn console_outcomes_by_hour(
        &self,
        now: DateTime<Utc>,
    ) -> StoreResult<Vec<(i64, CommandStatus, i64)>> {
        let sql = format!(
            "SELECT {} AS age, status, COUNT(*) FROM mdm_commands \
             WHERE answered_at >= ${} GROUP BY 1, 2",
            hour_bucket_sql("answered_at"),
            HOUR_BOUNDS
        );
        let bounds = hour_bounds(now);
        Ok(on_pool!(self, |pool| {
            let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql.clone()));
            for bound in &bounds {
                query = query.bind(*bound);
            }
            query.fetch_all(pool).await?
        }))
    }

    /// Devices whose newest valid identity certificate expires before `before`.
    pub async fn console_identities_expiring(&self, before: DateTime<Utc>) -> StoreResult<i64> {
        let sql = "SELECT COUNT(*) FROM mdm_devices d \
                   WHERE (SELECT MAX(c.not_after) FROM certificates c \
                          WHERE c.enrollment_id = d.enrollment_id AND c.status = 'valid') < $1";
        let (count,): (i64,) = on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(before)
            .fetch_one(pool)
            .await?);
        Ok(count)
    }

    /// The audit log searched by part of the actor, action prefix, target and time, newest
    /// first.
    pub async fn console_audit(&self, search: &AuditSearch) -> StoreResult<Vec<AuditEntry>> {
        let sql = "SELECT id, at, actor, action, target, outcome, detail, request_id, source \
                   FROM audit_log \
                   WHERE ($1 IS NULL OR LOWER(actor) LIKE $1 ESCAPE '\\') \
                     AND ($2 IS NULL OR action LIKE $2 ESCAPE '\\') \
                     AND ($3 IS NULL OR target = $3) \
                     AND ($4 IS NULL OR at >= $4) \
                     AND ($5 IS NULL OR at < $5) \
                   ORDER BY id DESC LIMIT $6";
        let actor = search.actor.as_deref().map(contains_pattern);
        let action = search.action.as_deref().map(prefix_pattern);
        let limit = i64::from(search.limit.clamp(1, CONSOLE_PAGE_MAX));
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(&actor)
            .bind(&action)
            .bind(&search.target)
            .bind(search.since)
            .bind(search.until)
            .bind(limit)
            .fetch_all(pool)
            .await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn like_patterns_escape_wildcards() {
        assert_eq!(contains_pattern("A_b%c\\"), "%a\\_b\\%c\\\\%");
        assert_eq!(prefix_pattern("admin:"), "admin:%");
    }

    /// The SQL numbering of hours agrees with the charts' own (`(now - at).num_hours()`),
    /// boundaries included.
    #[tokio::test]
    async fn hours_are_numbered_in_sql_as_the_charts_number_them() {
        let pool = sqlx::SqlitePool::connect("sqlite::memory:").await.unwrap();
        sqlx::query("CREATE TABLE t (at TEXT NOT NULL)")
            .execute(&pool)
            .await
            .unwrap();
        let now = crate::store::now();
        let second = chrono::Duration::seconds(1);
        let hour = chrono::Duration::hours(1);
        let mut times = Vec::new();
        for k in -2..27 {
            for offset in [-second, chrono::Duration::zero(), second, hour / 2] {
                times.push(now - hour * k + offset);
            }
        }
        for at in &times {
            sqlx::query("INSERT INTO t (at) VALUES ($1)")
                .bind(at)
                .execute(&pool)
                .await
                .unwrap();
        }
        let sql = format!(
            "SELECT {} AS age, COUNT(*) FROM t WHERE at >= ${} GROUP BY 1",
            hour_bucket_sql("at"),
            HOUR_BOUNDS
        );
        let mut query = sqlx::query_as(sqlx::AssertSqlSafe(sql));
        for bound in hour_bounds(now) {
            query = query.bind(bound);
        }
        let rows: Vec<(i64, i64)> = query.fetch_all(&pool).await.unwrap();
        let mut expected = std::collections::BTreeMap::<i64, i64>::new();
        for at in &times {
            if *at >= now - hour * 24 {
                *expected
                    .entry((now - *at).num_hours().clamp(-1, 24))
                    .or_default() += 1;
            }
        }
        let got: std::collections::BTreeMap<i64, i64> = rows.into_iter().collect();
        assert_eq!(got, expected);
    }
}
