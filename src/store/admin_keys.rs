//! Admin API keys: hashed secrets, scopes, revocation.

use chrono::{DateTime, Utc};

use super::{Store, StoreError, StoreResult, on_pool};

/// A key as stored: never the secret, only its hash.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct AdminKeyRecord {
    pub id: String,
    pub name: String,
    pub secret_hash: String,
    /// Space-separated scope names.
    pub scopes: String,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

pub struct NewAdminKey<'a> {
    pub id: &'a str,
    pub name: &'a str,
    pub secret_hash: &'a str,
    pub scopes: &'a str,
    pub created_by: &'a str,
    pub created_at: DateTime<Utc>,
}

/// `SELECT <every column> FROM admin_keys` followed by the given clause.
macro_rules! select_keys {
    ($clause:literal) => {
        concat!(
            "SELECT id, name, secret_hash, scopes, created_at, created_by, last_used_at, \
             revoked_at FROM admin_keys ",
            $clause
        )
    };
}

impl Store {
    pub async fn insert_admin_key(&self, key: NewAdminKey<'_>) -> StoreResult<()> {
        let sql = "INSERT INTO admin_keys (id, name, secret_hash, scopes, created_at, created_by) \
                   VALUES ($1, $2, $3, $4, $5, $6)";
        let result = on_pool!(self, |pool| sqlx::query(sql)
            .bind(key.id)
            .bind(key.name)
            .bind(key.secret_hash)
            .bind(key.scopes)
            .bind(key.created_at)
            .bind(key.created_by)
            .execute(pool)
            .await
            .map(|done| done.rows_affected()));
        result.map_err(|e| {
            StoreError::conflict_on_unique(
                e,
                format!("an active admin key named '{}' already exists", key.name),
            )
        })?;
        Ok(())
    }

    pub async fn admin_key_by_id(&self, id: &str) -> StoreResult<Option<AdminKeyRecord>> {
        let sql = select_keys!("WHERE id = $1");
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(id)
            .fetch_optional(pool)
            .await?))
    }

    /// All keys, active first, then by name and age.
    pub async fn list_admin_keys(&self) -> StoreResult<Vec<AdminKeyRecord>> {
        let sql = select_keys!("ORDER BY (revoked_at IS NOT NULL), name, created_at");
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .fetch_all(pool)
            .await?))
    }

    /// Revokes the active key called `name`; `NotFound` when there is none.
    pub async fn revoke_admin_key(&self, name: &str, at: DateTime<Utc>) -> StoreResult<String> {
        let sql = "UPDATE admin_keys SET revoked_at = $1 \
                   WHERE name = $2 AND revoked_at IS NULL RETURNING id";
        let id: Option<String> = on_pool!(self, |pool| sqlx::query_scalar(sql)
            .bind(at)
            .bind(name)
            .fetch_optional(pool)
            .await?);
        id.ok_or(StoreError::NotFound)
    }

    pub async fn touch_admin_key(&self, id: &str, at: DateTime<Utc>) -> StoreResult<()> {
        let sql = "UPDATE admin_keys SET last_used_at = $1 WHERE id = $2";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(at)
            .bind(id)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }
}
