//! People who signed in at the portal, the groups their providers put them in (with where and
//! when each membership was seen), the devices bound to them, and the SAML replay cache.

use std::collections::BTreeSet;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Store, StoreResult, on_pool};
use crate::identity::Identity;

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct UserRecord {
    pub id: String,
    pub provider: String,
    pub subject: String,
    pub login: Option<String>,
    pub email: Option<String>,
    pub display_name: Option<String>,
    pub created_at: DateTime<Utc>,
    pub last_sign_in_at: DateTime<Utc>,
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct MembershipRecord {
    pub group_id: String,
    pub provider: String,
    pub external_id: String,
    pub name: String,
    /// How the membership was learnt, e.g. `sign-in`.
    pub source: String,
    pub first_seen_at: DateTime<Utc>,
    pub last_seen_at: DateTime<Utc>,
}

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct GroupRecord {
    pub id: String,
    pub provider: String,
    pub external_id: String,
    pub name: String,
    pub members: i64,
    pub updated_at: DateTime<Utc>,
}

/// A device bound to a person.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct OwnedDevice {
    pub udid: String,
    pub serial_number: Option<String>,
    pub model_name: Option<String>,
    pub device_name: Option<String>,
    pub os_version: Option<String>,
    pub owner_bound_at: Option<DateTime<Utc>>,
}

macro_rules! select_users {
    ($clause:literal) => {
        concat!(
            "SELECT id, provider, subject, login, email, display_name, created_at, \
             last_sign_in_at FROM users ",
            $clause
        )
    };
}

impl Store {
    /// Records a sign-in: the person (created on first sight, refreshed after), and their groups
    /// at this provider exactly as the provider listed them now. Memberships the provider no
    /// longer lists are removed; that change is what group-driven policy reacts to.
    pub async fn record_sign_in(
        &self,
        identity: &Identity,
        source: &str,
    ) -> StoreResult<UserRecord> {
        let now = super::now();
        let upsert_user = "INSERT INTO users (id, provider, subject, login, email, display_name, \
                           created_at, last_sign_in_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $7) \
                           ON CONFLICT (provider, subject) DO UPDATE SET login = $4, email = $5, \
                           display_name = $6, last_sign_in_at = $7 RETURNING id";
        let upsert_group = "INSERT INTO groups (id, provider, external_id, name, created_at, \
                            updated_at) VALUES ($1, $2, $3, $4, $5, $5) \
                            ON CONFLICT (provider, external_id) DO UPDATE SET name = $4, \
                            updated_at = $5 RETURNING id";
        let upsert_member = "INSERT INTO user_groups (user_id, group_id, source, first_seen_at, \
                             last_seen_at) VALUES ($1, $2, $3, $4, $4) \
                             ON CONFLICT (user_id, group_id) DO UPDATE SET source = $3, \
                             last_seen_at = $4";
        let current = "SELECT g.id FROM user_groups m JOIN groups g ON g.id = m.group_id \
                       WHERE m.user_id = $1 AND g.provider = $2";
        let remove = "DELETE FROM user_groups WHERE user_id = $1 AND group_id = $2";
        let request = "INSERT INTO reconcile_requests (user_id, reason, requested_at) \
                       VALUES ($1, $2, $3)";
        // A person SCIM provisioned before their first sign-in, under `user_name` or `email`
        // matching, carries a placeholder subject: this sign-in (same provider, same login or
        // e-mail) makes it the real one, so both are the same person.
        let adopt = "UPDATE users SET subject = $1 WHERE id = (SELECT id FROM users \
                     WHERE provider = $2 AND subject IN ($3, $4) ORDER BY created_at LIMIT 1) \
                     AND NOT EXISTS (SELECT 1 FROM users WHERE provider = $2 AND subject = $1)";
        let [by_login, by_email] =
            super::scim::placeholder_subjects(identity.login.as_deref(), identity.email.as_deref());
        let user_id: String = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            if by_login.is_some() || by_email.is_some() {
                sqlx::query(adopt)
                    .bind(&identity.subject)
                    .bind(&identity.provider)
                    .bind(&by_login)
                    .bind(&by_email)
                    .execute(&mut *tx)
                    .await?;
            }
            let user_id: String = sqlx::query_scalar(upsert_user)
                .bind(uuid::Uuid::new_v4().to_string())
                .bind(&identity.provider)
                .bind(&identity.subject)
                .bind(&identity.login)
                .bind(&identity.email)
                .bind(&identity.display_name)
                .bind(now)
                .fetch_one(&mut *tx)
                .await?;
            let held: BTreeSet<String> = sqlx::query_scalar(current)
                .bind(&user_id)
                .bind(&identity.provider)
                .fetch_all(&mut *tx)
                .await?
                .into_iter()
                .collect();
            let mut seen = BTreeSet::new();
            for group in &identity.groups {
                let group_id: String = sqlx::query_scalar(upsert_group)
                    .bind(uuid::Uuid::new_v4().to_string())
                    .bind(&identity.provider)
                    .bind(&group.id)
                    .bind(&group.name)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?;
                sqlx::query(upsert_member)
                    .bind(&user_id)
                    .bind(&group_id)
                    .bind(source)
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                seen.insert(group_id);
            }
            for gone in held.iter().filter(|g| !seen.contains(*g)) {
                sqlx::query(remove)
                    .bind(&user_id)
                    .bind(gone)
                    .execute(&mut *tx)
                    .await?;
            }
            // A membership change is what group-driven policy reacts to: the reconciler
            // looks at this person's devices (on whichever node claims the request).
            if held != seen {
                sqlx::query(request)
                    .bind(&user_id)
                    .bind(format!("{source}: groups changed"))
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
            Ok::<_, sqlx::Error>(user_id)
        }
        .await)?;
        self.user(&user_id)
            .await?
            .ok_or(super::StoreError::NotFound)
    }

    pub async fn user(&self, id: &str) -> StoreResult<Option<UserRecord>> {
        Ok(on_pool!(self, |pool| sqlx::query_as(select_users!(
            "WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(pool)
        .await?))
    }

    /// Users in ID order, `limit` at a time after `after`.
    pub async fn list_users(
        &self,
        after: Option<&str>,
        limit: i64,
    ) -> StoreResult<Vec<UserRecord>> {
        Ok(on_pool!(self, |pool| sqlx::query_as(select_users!(
            "WHERE id > $1 ORDER BY id LIMIT $2"
        ))
        .bind(after.unwrap_or(""))
        .bind(limit)
        .fetch_all(pool)
        .await?))
    }

    pub async fn memberships(&self, user_id: &str) -> StoreResult<Vec<MembershipRecord>> {
        let sql = "SELECT g.id AS group_id, g.provider, g.external_id, g.name, m.source, \
                   m.first_seen_at, m.last_seen_at FROM user_groups m \
                   JOIN groups g ON g.id = m.group_id WHERE m.user_id = $1 ORDER BY g.name, g.id";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(user_id)
            .fetch_all(pool)
            .await?))
    }

    pub async fn list_groups(&self) -> StoreResult<Vec<GroupRecord>> {
        let sql = "SELECT g.id, g.provider, g.external_id, g.name, g.updated_at, \
                   (SELECT COUNT(*) FROM user_groups m WHERE m.group_id = g.id) AS members \
                   FROM groups g ORDER BY g.provider, g.name, g.id";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .fetch_all(pool)
            .await?))
    }

    pub async fn devices_of(&self, user_id: &str) -> StoreResult<Vec<OwnedDevice>> {
        let sql = "SELECT udid, serial_number, model_name, device_name, os_version, \
                   owner_bound_at FROM mdm_devices WHERE owner_id = $1 ORDER BY udid";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(user_id)
            .fetch_all(pool)
            .await?))
    }

    /// Marks a SAML assertion as used. False when it was used before: a replay.
    pub async fn consume_saml_assertion(
        &self,
        provider: &str,
        assertion_id: &str,
        expires_at: DateTime<Utc>,
    ) -> StoreResult<bool> {
        let now = super::now();
        let prune = "DELETE FROM saml_assertions WHERE expires_at < $1";
        let insert = "INSERT INTO saml_assertions (assertion_id, provider, expires_at) \
                      VALUES ($1, $2, $3) ON CONFLICT (assertion_id) DO NOTHING";
        let inserted = on_pool!(self, |pool| {
            sqlx::query(prune).bind(now).execute(pool).await?;
            sqlx::query(insert)
                .bind(assertion_id)
                .bind(provider)
                .bind(expires_at)
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(inserted == 1)
    }
}
