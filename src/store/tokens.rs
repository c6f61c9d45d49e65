//! App-config tokens in the store: integrations, shared tokens (sealed values found by a keyed
//! hash), app clients, which token each device was sent, and the generation counter that every
//! node watches to reload its validation index.
//!
//! Every write that changes what validates or what is delivered bumps `token_state.generation`
//! first, in its own transaction: that row lock also serializes token changes across nodes, so
//! "is this the last active token?" cannot be answered twice at once.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{
    ChannelStatus, CommandStatus, EnrollmentStatus, Store, StoreError, StoreResult, TokenSource,
    on_pool,
};

/// An app that tokens are delivered to, and where in its managed configuration they go.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct IntegrationRecord {
    pub name: String,
    pub display_name: String,
    pub bundle_id: String,
    pub config_key: String,
    pub device_tokens: bool,
    pub overlap_secs: i64,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

pub struct NewIntegration<'a> {
    pub name: &'a str,
    pub display_name: &'a str,
    pub bundle_id: &'a str,
    pub config_key: &'a str,
    pub device_tokens: bool,
    pub overlap_secs: i64,
    pub created_by: &'a str,
}

/// What an update changes; `None` leaves a field as it is.
#[derive(Clone, Debug, Default)]
pub struct IntegrationChanges {
    pub display_name: Option<String>,
    pub bundle_id: Option<String>,
    pub config_key: Option<String>,
    pub device_tokens: Option<bool>,
    pub overlap_secs: Option<i64>,
}

/// A shared token as stored: its value only sealed, plus the keyed hash it is found by.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct TokenRecord {
    pub id: String,
    pub integration: String,
    pub label: String,
    pub source: TokenSource,
    /// Hex HMAC-SHA256 of the value under the lookup key.
    pub value_hash: String,
    pub sealed_value: String,
    pub last4: String,
    pub not_before: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub revoked_by: Option<String>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// Creation order across nodes.
    pub seq: i64,
}

impl TokenRecord {
    /// Valid at `at`: not revoked, effective, not expired.
    pub fn is_active_at(&self, at: DateTime<Utc>) -> bool {
        self.revoked_at.is_none()
            && self.not_before <= at
            && self.expires_at.is_none_or(|end| at < end)
    }
}

pub struct NewToken<'a> {
    pub id: &'a str,
    pub integration: &'a str,
    pub label: &'a str,
    pub source: TokenSource,
    pub value_hash: &'a str,
    pub sealed_value: &'a str,
    pub last4: &'a str,
    pub not_before: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_by: &'a str,
}

/// Per token: devices it was last sent to, and how many of those commands were acknowledged.
#[derive(Clone, Debug, Default, sqlx::FromRow)]
pub struct TokenDeliveryCounts {
    pub token_id: String,
    pub delivered: i64,
    pub acknowledged: i64,
}

/// Credentials of an app's back end; never the secret, only its SHA-256.
#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct AppClientRecord {
    pub id: String,
    pub integration: String,
    pub name: String,
    #[serde(skip)]
    pub secret_hash: String,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub revoked_by: Option<String>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// When it last validated a token (kept to the minute: see
    /// [`Store::record_app_client_use`]).
    pub last_used_at: Option<DateTime<Utc>>,
}

pub struct NewAppClient<'a> {
    pub id: &'a str,
    pub integration: &'a str,
    pub name: &'a str,
    pub secret_hash: &'a str,
    pub created_by: &'a str,
}

/// What a revocation did.
#[derive(Clone, Debug)]
pub enum Revocation {
    Revoked(Box<TokenRecord>),
    /// It was revoked before; nothing changed.
    AlreadyRevoked(Box<TokenRecord>),
    /// Refused: it is the integration's only active token, and `force` was not given.
    LastActive,
    NotFound,
}

/// What deleting an integration did, or why it did not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IntegrationDeletion {
    Deleted {
        tokens_revoked: u64,
        clients_revoked: u64,
        device_tokens_revoked: u64,
    },
    /// Refused: it has this many active tokens and `force` was not given.
    ActiveTokens(i64),
    NotFound,
}

/// Everything a node's validation index and delivery cache are built from.
#[derive(Clone, Debug, Default)]
pub struct TokenIndexRows {
    /// The generation read before the rows: a change committed meanwhile moves it again.
    pub generation: i64,
    pub integrations: Vec<IntegrationRecord>,
    /// Tokens not revoked and not expired (scheduled ones included).
    pub tokens: Vec<TokenRecord>,
    /// Clients not revoked.
    pub clients: Vec<AppClientRecord>,
}

/// A device as a validation reports it: named by UDID or serial number.
#[derive(Clone, Debug, sqlx::FromRow)]
pub struct DeviceStanding {
    pub udid: String,
    pub enrollment_status: EnrollmentStatus,
    pub channel_status: Option<ChannelStatus>,
    pub owner_id: Option<String>,
    pub owner_email: Option<String>,
    pub owner_login: Option<String>,
}

macro_rules! select_integrations {
    ($clause:literal) => {
        concat!(
            "SELECT name, display_name, bundle_id, config_key, device_tokens, overlap_secs, \
             created_by, created_at, updated_at FROM token_integrations ",
            $clause
        )
    };
}

macro_rules! select_tokens {
    ($clause:literal) => {
        concat!(
            "SELECT id, integration, label, source, value_hash, sealed_value, last4, not_before, \
             expires_at, created_by, created_at, revoked_by, revoked_at, seq FROM shared_tokens ",
            $clause
        )
    };
}

macro_rules! select_clients {
    ($clause:literal) => {
        concat!(
            "SELECT id, integration, name, secret_hash, created_by, created_at, revoked_by, \
             revoked_at, last_used_at FROM app_clients ",
            $clause
        )
    };
}

/// Moves the generation on; the first statement of every token write (see the module doc).
const BUMP_GENERATION: &str =
    "UPDATE token_state SET generation = generation + 1 WHERE id = 1 RETURNING generation";
/// Asks every node's reconciler for a pass over every device.
const REQUEST_RECONCILE: &str = "INSERT INTO reconcile_requests (user_id, udid, reason, \
                                 requested_at) VALUES (NULL, NULL, $1, $2)";

/// The INSERT of a token row, inside a write transaction that already bumped the generation
/// to `$seq` (a macro: the transaction's driver differs per pool). A token effective at
/// creation needs no later "became active" note.
macro_rules! insert_token_row {
    ($tx:expr, $new:expr, $now:expr, $seq:expr) => {
        sqlx::query(
            "INSERT INTO shared_tokens (id, integration, label, source, value_hash, \
             sealed_value, last4, not_before, expires_at, created_by, created_at, start_noted, \
             end_noted, seq) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, FALSE, $13)",
        )
        .bind($new.id)
        .bind($new.integration)
        .bind($new.label)
        .bind($new.source)
        .bind($new.value_hash)
        .bind($new.sealed_value)
        .bind($new.last4)
        .bind($new.not_before)
        .bind($new.expires_at)
        .bind($new.created_by)
        .bind($now)
        .bind($new.not_before <= $now)
        .bind($seq)
        .execute(&mut *$tx)
        .await
    };
}

impl Store {
    /// The generation and the sealed lookup key (`None` before the first start made one).
    pub async fn token_state(&self) -> StoreResult<(i64, Option<String>)> {
        let sql = "SELECT generation, lookup_key FROM token_state WHERE id = 1";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .fetch_one(pool)
            .await?))
    }

    /// The one read each node makes a few times a second.
    pub async fn token_generation(&self) -> StoreResult<i64> {
        let sql = "SELECT generation FROM token_state WHERE id = 1";
        Ok(on_pool!(self, |pool| sqlx::query_scalar(sql)
            .fetch_one(pool)
            .await?))
    }

    /// Stores the sealed lookup key unless a node stored one first; returns the one in force.
    pub async fn init_token_lookup_key(&self, sealed: &str) -> StoreResult<String> {
        let set = "UPDATE token_state SET lookup_key = $1 WHERE id = 1 AND lookup_key IS NULL";
        on_pool!(self, |pool| sqlx::query(set)
            .bind(sealed)
            .execute(pool)
            .await?
            .rows_affected());
        let (_, key) = self.token_state().await?;
        key.ok_or(StoreError::NotFound)
    }

    pub async fn insert_integration(&self, new: &NewIntegration<'_>) -> StoreResult<()> {
        let now = super::now();
        // A deleted integration's name may be used again: the row comes back with the new
        // settings (its old tokens and clients stay revoked).
        let sql = "INSERT INTO token_integrations (name, display_name, bundle_id, config_key, \
                   device_tokens, overlap_secs, created_by, created_at, updated_at) \
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8) \
                   ON CONFLICT (name) DO UPDATE SET display_name = excluded.display_name, \
                   bundle_id = excluded.bundle_id, config_key = excluded.config_key, \
                   device_tokens = excluded.device_tokens, \
                   overlap_secs = excluded.overlap_secs, created_by = excluded.created_by, \
                   created_at = excluded.created_at, updated_at = excluded.updated_at, \
                   deleted_at = NULL, deleted_by = NULL \
                   WHERE token_integrations.deleted_at IS NOT NULL";
        let result: Result<u64, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            sqlx::query(BUMP_GENERATION).execute(&mut *tx).await?;
            let written = sqlx::query(sql)
                .bind(new.name)
                .bind(new.display_name)
                .bind(new.bundle_id)
                .bind(new.config_key)
                .bind(new.device_tokens)
                .bind(new.overlap_secs)
                .bind(new.created_by)
                .bind(now)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            if written == 0 {
                tx.rollback().await?;
            } else {
                tx.commit().await?;
            }
            Ok(written)
        }
        .await);
        let taken = || format!("an integration named '{}' already exists", new.name);
        match result {
            Ok(0) => Err(StoreError::Conflict(taken())),
            Ok(_) => Ok(()),
            Err(e) => Err(StoreError::conflict_on_unique(e, taken())),
        }
    }

    pub async fn integrations(&self) -> StoreResult<Vec<IntegrationRecord>> {
        let sql = select_integrations!("WHERE deleted_at IS NULL ORDER BY name");
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .fetch_all(pool)
            .await?))
    }

    pub async fn integration(&self, name: &str) -> StoreResult<Option<IntegrationRecord>> {
        let sql = select_integrations!("WHERE name = $1 AND deleted_at IS NULL");
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(name)
            .fetch_optional(pool)
            .await?))
    }

    /// Changes an integration; asks for re-delivery (its app or key may have changed).
    /// `None` when there is no such integration.
    pub async fn update_integration(
        &self,
        name: &str,
        changes: &IntegrationChanges,
    ) -> StoreResult<Option<IntegrationRecord>> {
        let now = super::now();
        let sql = "UPDATE token_integrations SET \
                   display_name = COALESCE($2, display_name), \
                   bundle_id = COALESCE($3, bundle_id), config_key = COALESCE($4, config_key), \
                   device_tokens = COALESCE($5, device_tokens), \
                   overlap_secs = COALESCE($6, overlap_secs), updated_at = $7 \
                   WHERE name = $1 AND deleted_at IS NULL RETURNING name, display_name, bundle_id, config_key, \
                   device_tokens, overlap_secs, created_by, created_at, updated_at";
        let updated: Result<Option<IntegrationRecord>, sqlx::Error> =
            on_pool!(self, |pool| async {
                let mut tx = super::begin_write(pool).await?;
                sqlx::query(BUMP_GENERATION).execute(&mut *tx).await?;
                let updated: Option<IntegrationRecord> = sqlx::query_as(sql)
                    .bind(name)
                    .bind(&changes.display_name)
                    .bind(&changes.bundle_id)
                    .bind(&changes.config_key)
                    .bind(changes.device_tokens)
                    .bind(changes.overlap_secs)
                    .bind(now)
                    .fetch_optional(&mut *tx)
                    .await?;
                if updated.is_none() {
                    tx.rollback().await?;
                    return Ok(None);
                }
                sqlx::query(REQUEST_RECONCILE)
                    .bind(format!("token integration {name} changed"))
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
                tx.commit().await?;
                Ok(updated)
            }
            .await);
        Ok(updated?)
    }

    /// Adds a token. When it is effective at once, every device is reconciled (it may be the
    /// new current token); a scheduled one is reconciled when it starts.
    pub async fn insert_token(&self, new: &NewToken<'_>) -> StoreResult<TokenRecord> {
        let now = super::now();
        let result: Result<(), sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let seq: i64 = sqlx::query_scalar(BUMP_GENERATION)
                .fetch_one(&mut *tx)
                .await?;
            insert_token_row!(tx, new, now, seq)?;
            if new.not_before <= now {
                sqlx::query(REQUEST_RECONCILE)
                    .bind(format!("token {} added", new.integration))
                    .bind(now)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await
        }
        .await);
        result.map_err(|e| {
            StoreError::conflict_on_unique(
                e,
                "this integration already has a token with that value",
            )
        })?;
        self.token(new.integration, new.id)
            .await?
            .ok_or(StoreError::NotFound)
    }

    /// Rotation: adds `new` (effective now) and shortens the current token's life to
    /// `overlap_until` unless it ends sooner, in one transaction. Returns the new token and
    /// the one rotated out, if there was one.
    pub async fn rotate_token(
        &self,
        new: &NewToken<'_>,
        overlap_until: DateTime<Utc>,
    ) -> StoreResult<(TokenRecord, Option<TokenRecord>)> {
        let now = super::now();
        let current = select_tokens!(
            "WHERE integration = $1 AND revoked_at IS NULL AND not_before <= $2 \
             AND (expires_at IS NULL OR expires_at > $2) \
             ORDER BY not_before DESC, seq DESC LIMIT 1"
        );
        let shorten = "UPDATE shared_tokens SET expires_at = $2, end_noted = FALSE WHERE id = $1";
        let result: Result<Option<TokenRecord>, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let seq: i64 = sqlx::query_scalar(BUMP_GENERATION)
                .fetch_one(&mut *tx)
                .await?;
            let previous: Option<TokenRecord> = sqlx::query_as(current)
                .bind(new.integration)
                .bind(now)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(previous) = &previous
                && previous.expires_at.is_none_or(|end| end > overlap_until)
            {
                sqlx::query(shorten)
                    .bind(&previous.id)
                    .bind(overlap_until)
                    .execute(&mut *tx)
                    .await?;
            }
            insert_token_row!(tx, new, now, seq)?;
            sqlx::query(REQUEST_RECONCILE)
                .bind(format!("token {} rotated", new.integration))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(previous)
        }
        .await);
        let previous = result.map_err(|e| {
            StoreError::conflict_on_unique(
                e,
                "this integration already has a token with that value",
            )
        })?;
        let created = self
            .token(new.integration, new.id)
            .await?
            .ok_or(StoreError::NotFound)?;
        let previous = match previous {
            Some(p) => self.token(new.integration, &p.id).await?,
            None => None,
        };
        Ok((created, previous))
    }

    /// Revokes a token at once. Refused (`LastActive`) when it is active and no other token of
    /// its integration is, unless `force`.
    pub async fn revoke_token(
        &self,
        integration: &str,
        id: &str,
        revoked_by: &str,
        force: bool,
    ) -> StoreResult<Revocation> {
        let now = super::now();
        let one = select_tokens!("WHERE integration = $1 AND id = $2");
        let others_active = "SELECT COUNT(*) FROM shared_tokens WHERE integration = $1 \
                             AND id <> $2 AND revoked_at IS NULL AND not_before <= $3 \
                             AND (expires_at IS NULL OR expires_at > $3)";
        let revoke = "UPDATE shared_tokens SET revoked_at = $2, revoked_by = $3 WHERE id = $1";
        let outcome: Result<Revocation, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            sqlx::query(BUMP_GENERATION).execute(&mut *tx).await?;
            let token: Option<TokenRecord> = sqlx::query_as(one)
                .bind(integration)
                .bind(id)
                .fetch_optional(&mut *tx)
                .await?;
            let Some(token) = token else {
                tx.rollback().await?;
                return Ok(Revocation::NotFound);
            };
            if token.revoked_at.is_some() {
                tx.rollback().await?;
                return Ok(Revocation::AlreadyRevoked(Box::new(token)));
            }
            if token.is_active_at(now) && !force {
                let others: i64 = sqlx::query_scalar(others_active)
                    .bind(integration)
                    .bind(id)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?;
                if others == 0 {
                    tx.rollback().await?;
                    return Ok(Revocation::LastActive);
                }
            }
            sqlx::query(revoke)
                .bind(id)
                .bind(now)
                .bind(revoked_by)
                .execute(&mut *tx)
                .await?;
            sqlx::query(REQUEST_RECONCILE)
                .bind(format!("token {integration} revoked"))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(Revocation::Revoked(Box::new(TokenRecord {
                revoked_at: Some(now),
                revoked_by: Some(revoked_by.to_string()),
                ..token
            })))
        }
        .await);
        Ok(outcome?)
    }

    /// An integration's tokens, newest first (the order "current" is chosen in).
    pub async fn tokens_of(&self, integration: &str) -> StoreResult<Vec<TokenRecord>> {
        let sql = select_tokens!("WHERE integration = $1 ORDER BY not_before DESC, seq DESC");
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(integration)
            .fetch_all(pool)
            .await?))
    }

    pub async fn token(&self, integration: &str, id: &str) -> StoreResult<Option<TokenRecord>> {
        let sql = select_tokens!("WHERE integration = $1 AND id = $2");
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(integration)
            .bind(id)
            .fetch_optional(pool)
            .await?))
    }

    /// Per token of `integration` that was delivered at all: devices sent it, and how many of
    /// those commands the devices acknowledged.
    pub async fn token_delivery_counts(
        &self,
        integration: &str,
    ) -> StoreResult<Vec<TokenDeliveryCounts>> {
        let sql = "SELECT d.token_id, COUNT(*) AS delivered, \
                   COALESCE(SUM(CASE WHEN c.status = $2 THEN 1 ELSE 0 END), 0) AS acknowledged \
                   FROM token_deliveries d JOIN shared_tokens t ON t.id = d.token_id \
                   LEFT JOIN mdm_commands c ON c.uuid = d.command_uuid \
                   WHERE t.integration = $1 GROUP BY d.token_id";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(integration)
            .bind(CommandStatus::Acknowledged)
            .fetch_all(pool)
            .await?))
    }

    /// Records that `command_uuid` carries shared token `token_id` to enrollment record
    /// `enrollment_id` (the latest command wins for that pair). Called by the reconciler.
    pub async fn record_token_delivery(
        &self,
        token_id: &str,
        enrollment_id: &str,
        udid: &str,
        item_key: &str,
        command_uuid: &str,
    ) -> StoreResult<()> {
        let sql = "INSERT INTO token_deliveries (token_id, enrollment_id, udid, item_key, \
                   command_uuid, delivered_at) VALUES ($1, $2, $3, $4, $5, $6) \
                   ON CONFLICT (token_id, enrollment_id) DO UPDATE SET udid = excluded.udid, \
                   item_key = excluded.item_key, command_uuid = excluded.command_uuid, \
                   delivered_at = excluded.delivered_at";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(token_id)
            .bind(enrollment_id)
            .bind(udid)
            .bind(item_key)
            .bind(command_uuid)
            .bind(super::now())
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// Deletes an integration: its tokens, app clients and per-device tokens are revoked at
    /// once (validation and introspection refuse them on every node within a second), the row
    /// stays (marked deleted) for history, and every device is reconciled. Refused while it has
    /// active tokens unless `force`.
    pub async fn delete_integration(
        &self,
        name: &str,
        deleted_by: &str,
        force: bool,
    ) -> StoreResult<IntegrationDeletion> {
        let now = super::now();
        let exists = "SELECT COUNT(*) FROM token_integrations WHERE name = $1 \
                      AND deleted_at IS NULL";
        let active = "SELECT COUNT(*) FROM shared_tokens WHERE integration = $1 \
                      AND revoked_at IS NULL AND not_before <= $2 \
                      AND (expires_at IS NULL OR expires_at > $2)";
        let tokens = "UPDATE shared_tokens SET revoked_at = $2, revoked_by = $3 \
                      WHERE integration = $1 AND revoked_at IS NULL";
        let clients = "UPDATE app_clients SET revoked_at = $2, revoked_by = $3 \
                       WHERE integration = $1 AND revoked_at IS NULL";
        let device_tokens = "UPDATE device_tokens SET status = 'revoked', revoked_at = $2, \
                             revoked_reason = $3 WHERE integration = $1 AND status = 'active'";
        let mark = "UPDATE token_integrations SET deleted_at = $2, deleted_by = $3, \
                    updated_at = $2 WHERE name = $1";
        let outcome: Result<IntegrationDeletion, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            sqlx::query(BUMP_GENERATION).execute(&mut *tx).await?;
            let found: i64 = sqlx::query_scalar(exists)
                .bind(name)
                .fetch_one(&mut *tx)
                .await?;
            if found == 0 {
                tx.rollback().await?;
                return Ok(IntegrationDeletion::NotFound);
            }
            if !force {
                let live: i64 = sqlx::query_scalar(active)
                    .bind(name)
                    .bind(now)
                    .fetch_one(&mut *tx)
                    .await?;
                if live > 0 {
                    tx.rollback().await?;
                    return Ok(IntegrationDeletion::ActiveTokens(live));
                }
            }
            let tokens_revoked = sqlx::query(tokens)
                .bind(name)
                .bind(now)
                .bind(deleted_by)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let clients_revoked = sqlx::query(clients)
                .bind(name)
                .bind(now)
                .bind(deleted_by)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            let device_tokens_revoked = sqlx::query(device_tokens)
                .bind(name)
                .bind(now)
                .bind(format!("integration deleted by {deleted_by}"))
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(mark)
                .bind(name)
                .bind(now)
                .bind(deleted_by)
                .execute(&mut *tx)
                .await?;
            sqlx::query(REQUEST_RECONCILE)
                .bind(format!("token integration {name} deleted"))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(IntegrationDeletion::Deleted {
                tokens_revoked,
                clients_revoked,
                device_tokens_revoked,
            })
        }
        .await);
        Ok(outcome?)
    }

    /// Records when app clients last validated: `(client ID, when)`. Only moves forward, and
    /// bumps no generation (nothing that validates changes), so it is cheap to call once a
    /// minute for the clients that were used.
    pub async fn record_app_client_use(&self, uses: &[(String, DateTime<Utc>)]) -> StoreResult<()> {
        let sql = "UPDATE app_clients SET last_used_at = $2 WHERE id = $1 \
                   AND (last_used_at IS NULL OR last_used_at < $2)";
        for (id, at) in uses {
            on_pool!(self, |pool| sqlx::query(sql)
                .bind(id)
                .bind(at)
                .execute(pool)
                .await?
                .rows_affected());
        }
        Ok(())
    }

    pub async fn insert_app_client(&self, new: &NewAppClient<'_>) -> StoreResult<AppClientRecord> {
        let now = super::now();
        let sql = "INSERT INTO app_clients (id, integration, name, secret_hash, created_by, \
                   created_at) VALUES ($1, $2, $3, $4, $5, $6)";
        let result: Result<(), sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            sqlx::query(BUMP_GENERATION).execute(&mut *tx).await?;
            sqlx::query(sql)
                .bind(new.id)
                .bind(new.integration)
                .bind(new.name)
                .bind(new.secret_hash)
                .bind(new.created_by)
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await
        }
        .await);
        result.map_err(|e| {
            StoreError::conflict_on_unique(
                e,
                format!(
                    "integration '{}' already has an active client named '{}'",
                    new.integration, new.name
                ),
            )
        })?;
        self.app_client(new.id).await?.ok_or(StoreError::NotFound)
    }

    /// An integration's clients, active first, then by name.
    pub async fn app_clients(&self, integration: &str) -> StoreResult<Vec<AppClientRecord>> {
        let sql = select_clients!(
            "WHERE integration = $1 ORDER BY (revoked_at IS NOT NULL), name, created_at"
        );
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(integration)
            .fetch_all(pool)
            .await?))
    }

    pub async fn app_client(&self, id: &str) -> StoreResult<Option<AppClientRecord>> {
        let sql = select_clients!("WHERE id = $1");
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(id)
            .fetch_optional(pool)
            .await?))
    }

    /// Revokes a client of `integration`; `None` when it has no active client with that ID.
    pub async fn revoke_app_client(
        &self,
        integration: &str,
        id: &str,
        revoked_by: &str,
    ) -> StoreResult<Option<AppClientRecord>> {
        let now = super::now();
        let sql = "UPDATE app_clients SET revoked_at = $3, revoked_by = $4 \
                   WHERE integration = $1 AND id = $2 AND revoked_at IS NULL \
                   RETURNING id, integration, name, secret_hash, created_by, created_at, \
                   revoked_by, revoked_at, last_used_at";
        let revoked: Result<Option<AppClientRecord>, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            sqlx::query(BUMP_GENERATION).execute(&mut *tx).await?;
            let revoked: Option<AppClientRecord> = sqlx::query_as(sql)
                .bind(integration)
                .bind(id)
                .bind(now)
                .bind(revoked_by)
                .fetch_optional(&mut *tx)
                .await?;
            if revoked.is_some() {
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            Ok(revoked)
        }
        .await);
        Ok(revoked?)
    }

    /// What a node's validation index is built from (see [`TokenIndexRows`]).
    pub async fn token_index_rows(&self) -> StoreResult<TokenIndexRows> {
        let now = super::now();
        let generation = self.token_generation().await?;
        let integrations = self.integrations().await?;
        let tokens_sql = select_tokens!(
            "WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > $1) \
             ORDER BY integration, not_before DESC, seq DESC"
        );
        let clients_sql = select_clients!("WHERE revoked_at IS NULL");
        let (tokens, clients) = on_pool!(self, |pool| (
            sqlx::query_as(tokens_sql).bind(now).fetch_all(pool).await?,
            sqlx::query_as(clients_sql).fetch_all(pool).await?
        ));
        Ok(TokenIndexRows {
            generation,
            integrations,
            tokens,
            clients,
        })
    }

    /// Marks the tokens that became active or expired by `now` as noted, and asks for a
    /// reconcile pass if there were any, in one transaction; only one node notes each moment.
    /// Returns the integrations concerned.
    pub async fn note_token_transitions(&self) -> StoreResult<Vec<String>> {
        let now = super::now();
        let started = "UPDATE shared_tokens SET start_noted = TRUE WHERE NOT start_noted \
                       AND revoked_at IS NULL AND not_before <= $1 RETURNING integration";
        let ended = "UPDATE shared_tokens SET end_noted = TRUE WHERE NOT end_noted \
                     AND revoked_at IS NULL AND expires_at <= $1 RETURNING integration";
        let noted: Result<Vec<String>, sqlx::Error> = on_pool!(self, |pool| async {
            let mut tx = super::begin_write(pool).await?;
            let mut integrations: Vec<String> = sqlx::query_scalar(started)
                .bind(now)
                .fetch_all(&mut *tx)
                .await?;
            integrations.extend(
                sqlx::query_scalar::<_, String>(ended)
                    .bind(now)
                    .fetch_all(&mut *tx)
                    .await?,
            );
            integrations.sort();
            integrations.dedup();
            if integrations.is_empty() {
                tx.rollback().await?;
                return Ok(integrations);
            }
            sqlx::query(REQUEST_RECONCILE)
                .bind(format!(
                    "token of {} became active or expired",
                    integrations.join(", ")
                ))
                .bind(now)
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(integrations)
        }
        .await);
        Ok(noted?)
    }

    /// The device with this UDID (or, failing that, serial number) and where it stands.
    pub async fn device_standing(
        &self,
        udid_or_serial: &str,
    ) -> StoreResult<Option<DeviceStanding>> {
        let sql = "SELECT d.udid, e.status AS enrollment_status, c.status AS channel_status, \
                   u.id AS owner_id, u.email AS owner_email, u.login AS owner_login \
                   FROM mdm_devices d JOIN enrollments e ON e.id = d.enrollment_id \
                   LEFT JOIN mdm_enrollments c ON c.id = d.udid \
                   LEFT JOIN users u ON u.id = d.owner_id \
                   WHERE d.udid = $1 OR d.serial_number = $1 \
                   ORDER BY (d.udid = $1) DESC, d.updated_at DESC LIMIT 1";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(udid_or_serial)
            .fetch_optional(pool)
            .await?))
    }
}
