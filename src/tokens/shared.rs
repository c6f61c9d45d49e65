//! Shared app-config tokens, the PingID pattern: per integration (an app, and the managed app
//! configuration key its token goes under), tokens generated here or imported from the
//! vendor's portal; several may be active, the newest active one is delivered; rotation keeps
//! the old one valid for an overlap; revocation is immediate. App clients (an app's back end)
//! validate tokens against an in-memory index of keyed hashes.
//!
//! Values are sealed with the master key; rows are found by HMAC-SHA256 under a lookup key
//! that is itself sealed, so a copy of the database alone cannot confirm a guessed token. Each
//! node keeps an index of live tokens and clients, reloaded when the store's token generation
//! moves (every change bumps it; nodes look four times a second), so a revocation made on one
//! node holds on every node within a second. Validation reads no database row for the token.
//!
//! Must not: speak HTTP, queue commands (the reconciler delivers `current_values`).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, SubsecRound, Utc};
use ring::{digest, hmac};
use serde::Serialize;
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use crate::policy::ReconcileWake;
use crate::policy::model::Variable;
use crate::secrets::{MasterKey, SealError};
use crate::store::{
    AppClientRecord, ChannelStatus, DeviceStanding, EnrollmentStatus, IntegrationChanges,
    IntegrationDeletion, IntegrationRecord, NewAppClient, NewIntegration, NewToken, Revocation,
    Store, StoreError, TokenIndexRows, TokenRecord, TokenSource,
};

/// How often each node looks at the token generation.
const POLL: Duration = Duration::from_millis(250);
/// An index not confirmed current for this long is refreshed before it answers a validation:
/// revocation must hold within a second even if the poller stalls.
const MAX_STALENESS: Duration = Duration::from_millis(1000);
/// The longest wait between looks for tokens that became active or expired.
const TRANSITION_CHECK: Duration = Duration::from_secs(60);
/// How often the moments app clients last validated are written (see
/// [`TokenService::flush_client_use`]).
const CLIENT_USE_FLUSH: Duration = Duration::from_secs(60);
/// Rotation overlap when an integration is created without one: a week.
pub const DEFAULT_OVERLAP_SECS: i64 = 7 * 86_400;
const MAX_OVERLAP_SECS: i64 = 365 * 86_400;
/// Imported values: long enough to carry real entropy, short enough to bound every input.
const IMPORT_MIN_LEN: usize = 16;
const IMPORT_MAX_LEN: usize = 512;
/// A presented token longer than any stored one cannot match: refused before hashing.
const PRESENTED_MAX_LEN: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The request is malformed or out of bounds (422).
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    /// A name or value already taken (409).
    #[error("{0}")]
    Conflict(String),
    /// Revoking the only active token of an integration that a policy delivers would leave
    /// the app without one (409).
    #[error(
        "token {id} is the only active token of integration '{integration}', which the applied \
         policies deliver: devices would be left without a valid token. Rotate first (a \
         replacement becomes active), or revoke with force"
    )]
    LastActiveToken { integration: String, id: String },
    /// Deleting an integration that the applied policy set delivers, or that has active
    /// tokens, needs `force` (409).
    #[error(
        "integration '{integration}' is {reason}: devices would be left without its token. \
         Remove it from the policies (or revoke its tokens) first, or delete with force"
    )]
    IntegrationInUse { integration: String, reason: String },
    #[error("a sealed token value does not open: {0}")]
    Seal(#[from] SealError),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for TokenError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Conflict(message) => TokenError::Conflict(message),
            other => TokenError::Store(other),
        }
    }
}

/// A token's standing at a moment; derived from its times, never stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TokenStatus {
    /// Its effective date is still ahead.
    Scheduled,
    Active,
    Revoked,
    Expired,
}

impl TokenStatus {
    pub fn of(token: &TokenRecord, at: DateTime<Utc>) -> TokenStatus {
        if token.revoked_at.is_some() {
            TokenStatus::Revoked
        } else if token.expires_at.is_some_and(|end| end <= at) {
            TokenStatus::Expired
        } else if token.not_before > at {
            TokenStatus::Scheduled
        } else {
            TokenStatus::Active
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            TokenStatus::Scheduled => "scheduled",
            TokenStatus::Active => "active",
            TokenStatus::Revoked => "revoked",
            TokenStatus::Expired => "expired",
        }
    }
}

/// A token as the API and CLI show it: never the value, only its last four characters.
#[derive(Clone, Debug, Serialize)]
pub struct TokenView {
    pub id: String,
    pub integration: String,
    pub label: String,
    pub source: TokenSource,
    pub last4: String,
    pub status: TokenStatus,
    /// The one delivered to devices now (the newest active one).
    pub current: bool,
    pub not_before: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub revoked_by: Option<String>,
    pub revoked_at: Option<DateTime<Utc>>,
    /// Devices sent a configuration carrying it (their latest command for it).
    pub delivered: i64,
    /// Of those, the ones whose device acknowledged that command.
    pub acknowledged: i64,
}

/// A token just made. `value` is there only for a generated token, and only this once.
#[derive(Clone, Debug, Serialize)]
pub struct CreatedToken {
    #[serde(flatten)]
    pub token: TokenView,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// What a rotation did.
#[derive(Clone, Debug, Serialize)]
pub struct Rotation {
    pub created: CreatedToken,
    /// The token rotated out, with its new expiry; `None` when there was no current token.
    pub previous: Option<TokenView>,
}

/// An integration with where its tokens stand.
#[derive(Clone, Debug, Serialize)]
pub struct IntegrationView {
    #[serde(flatten)]
    pub integration: IntegrationRecord,
    pub current_token: Option<String>,
    pub active_tokens: usize,
    pub active_clients: usize,
}

/// An integration to create.
#[derive(Clone, Debug)]
pub struct IntegrationRequest {
    pub name: String,
    pub display_name: Option<String>,
    pub bundle_id: String,
    pub config_key: String,
    pub device_tokens: bool,
    pub overlap_secs: Option<i64>,
}

/// A token to create (`value: None`) or import.
#[derive(Clone, Default)]
pub struct TokenRequest {
    pub label: Option<String>,
    /// An imported value, typed from the vendor's portal.
    pub value: Option<String>,
    pub not_before: Option<DateTime<Utc>>,
    pub expires_at: Option<DateTime<Utc>>,
}

/// A freshly created app client; `secret` is the only copy there will ever be.
#[derive(Clone, Debug, Serialize)]
pub struct IssuedClient {
    #[serde(flatten)]
    pub client: AppClientRecord,
    pub client_secret: String,
}

/// The token each integration delivers now, for the reconciler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CurrentToken {
    pub token_id: String,
    pub value: String,
    pub integration: String,
    pub config_key: String,
    pub bundle_id: String,
}

/// A validating app client, authenticated.
#[derive(Clone, Debug)]
pub struct AuthenticatedClient {
    pub id: String,
    pub integration: String,
}

/// Why client credentials were refused. Clients only ever see 401.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientRefusal {
    /// Unknown or revoked client ID.
    UnknownClient,
    WrongSecret,
}

impl ClientRefusal {
    pub fn as_str(self) -> &'static str {
        match self {
            ClientRefusal::UnknownClient => "unknown or revoked client",
            ClientRefusal::WrongSecret => "wrong client secret",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("client credentials refused: {}", .0.as_str())]
    BadClient(ClientRefusal),
    #[error("client {client_id} is over its validation rate")]
    RateLimited {
        client_id: String,
        integration: String,
        retry_after_secs: u64,
    },
    /// The index could not be confirmed current (the database is unreachable).
    #[error("the token index is stale: {0}")]
    Unavailable(String),
    #[error("{0}")]
    InvalidDevice(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Why a token was found inactive, for metrics and the audit log (never for the client).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenOutcome {
    Active,
    /// Not a token of the client's integration: wrong, revoked, another integration's.
    Unknown,
    Scheduled,
    Expired,
    Malformed,
}

impl TokenOutcome {
    pub const ALL: [TokenOutcome; 5] = [
        TokenOutcome::Active,
        TokenOutcome::Unknown,
        TokenOutcome::Scheduled,
        TokenOutcome::Expired,
        TokenOutcome::Malformed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TokenOutcome::Active => "active",
            TokenOutcome::Unknown => "unknown",
            TokenOutcome::Scheduled => "scheduled",
            TokenOutcome::Expired => "expired",
            TokenOutcome::Malformed => "malformed",
        }
    }
}

/// A device named in a validation, as the answer reports it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct DeviceAnswer {
    /// Managed now: its enrollment is active and it has not checked out.
    pub enrolled: bool,
    pub retired: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub owner: Option<OwnerAnswer>,
}

#[derive(Clone, Debug, Serialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct OwnerAnswer {
    pub id: String,
    pub email: Option<String>,
    pub login: Option<String>,
}

/// The answer to one validation.
#[derive(Clone, Debug)]
pub struct Validation {
    pub outcome: TokenOutcome,
    /// Only for an active token and a device that was asked about.
    pub device: Option<DeviceAnswer>,
}

/// Per-client validation rate (a token bucket).
#[derive(Clone, Copy, Debug)]
pub struct ValidationLimits {
    pub per_second: u32,
    pub burst: u32,
}

impl Default for ValidationLimits {
    fn default() -> Self {
        ValidationLimits {
            per_second: 1000,
            burst: 2000,
        }
    }
}

/// Integrations, shared tokens, app clients and validation. Cheap to clone.
#[derive(Clone)]
pub struct TokenService {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    master: Arc<MasterKey>,
    lookup: hmac::Key,
    index: RwLock<Arc<Index>>,
    /// When the index was last confirmed to match the database, in ms since `epoch`.
    verified_ms: AtomicU64,
    epoch: Instant,
    /// One inline refresh at a time when validations find the index stale.
    refreshing: tokio::sync::Mutex<()>,
    limiter: RateLimiter,
    /// When client use was last written (`None`: never).
    use_flushed: Mutex<Option<Instant>>,
    wake: Option<ReconcileWake>,
}

impl TokenService {
    /// Loads (at first start, makes) the lookup key and builds the index. `wake` is this
    /// node's reconciler, woken after changes that alter what is delivered.
    pub async fn start(
        store: Store,
        master: Arc<MasterKey>,
        wake: Option<ReconcileWake>,
        limits: ValidationLimits,
    ) -> Result<TokenService, TokenError> {
        let lookup = lookup_key(&store, &master).await?;
        let service = TokenService {
            inner: Arc::new(Inner {
                store,
                master,
                lookup,
                index: RwLock::new(Arc::new(Index::default())),
                verified_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                refreshing: tokio::sync::Mutex::new(()),
                limiter: RateLimiter::new(limits),
                use_flushed: Mutex::new(None),
                wake,
            }),
        };
        service.reload().await?;
        Ok(service)
    }

    // ---- integrations ----

    pub async fn create_integration(
        &self,
        request: IntegrationRequest,
        actor: &str,
    ) -> Result<IntegrationView, TokenError> {
        validate_name(&request.name)?;
        let display_name = request.display_name.unwrap_or_else(|| request.name.clone());
        validate_display_name(&display_name)?;
        validate_bundle_id(&request.bundle_id)?;
        validate_config_key(&request.config_key)?;
        let overlap_secs = request.overlap_secs.unwrap_or(DEFAULT_OVERLAP_SECS);
        validate_overlap(overlap_secs)?;
        self.inner
            .store
            .insert_integration(&NewIntegration {
                name: &request.name,
                display_name: &display_name,
                bundle_id: &request.bundle_id,
                config_key: &request.config_key,
                device_tokens: request.device_tokens,
                overlap_secs,
                created_by: actor,
            })
            .await?;
        self.changed(false).await;
        self.integration(&request.name).await
    }

    pub async fn integrations(&self) -> Result<Vec<IntegrationView>, TokenError> {
        let now = crate::store::now();
        let mut views = Vec::new();
        for integration in self.inner.store.integrations().await? {
            let tokens = self.inner.store.tokens_of(&integration.name).await?;
            let clients = self.inner.store.app_clients(&integration.name).await?;
            views.push(integration_view(integration, &tokens, &clients, now));
        }
        Ok(views)
    }

    pub async fn integration(&self, name: &str) -> Result<IntegrationView, TokenError> {
        let integration = self.integration_record(name).await?;
        let tokens = self.inner.store.tokens_of(name).await?;
        let clients = self.inner.store.app_clients(name).await?;
        Ok(integration_view(
            integration,
            &tokens,
            &clients,
            crate::store::now(),
        ))
    }

    /// Changes an integration; its devices are reconciled (the app or key may have changed).
    pub async fn update_integration(
        &self,
        name: &str,
        changes: IntegrationChanges,
    ) -> Result<IntegrationView, TokenError> {
        if let Some(display_name) = &changes.display_name {
            validate_display_name(display_name)?;
        }
        if let Some(bundle_id) = &changes.bundle_id {
            validate_bundle_id(bundle_id)?;
        }
        if let Some(config_key) = &changes.config_key {
            validate_config_key(config_key)?;
        }
        if let Some(overlap) = changes.overlap_secs {
            validate_overlap(overlap)?;
        }
        self.inner
            .store
            .update_integration(name, &changes)
            .await?
            .ok_or_else(|| no_integration(name))?;
        self.changed(true).await;
        self.integration(name).await
    }

    /// Deletes an integration: its tokens, app clients and per-device tokens are revoked at
    /// once, and every device is reconciled. Refused, unless `force`, while the applied policy
    /// set delivers it (`${token.…}` or `${device_token.…}`) or it has an active token.
    pub async fn delete_integration(
        &self,
        name: &str,
        force: bool,
        actor: &str,
    ) -> Result<IntegrationDeletion, TokenError> {
        self.integration_record(name).await?;
        if !force
            && (delivered_by_policy(&self.inner.store).await?.contains(name)
                || device_tokens_by_policy(&self.inner.store)
                    .await?
                    .contains(name))
        {
            return Err(TokenError::IntegrationInUse {
                integration: name.to_string(),
                reason: "delivered by the applied policies".into(),
            });
        }
        match self
            .inner
            .store
            .delete_integration(name, actor, force)
            .await?
        {
            deleted @ IntegrationDeletion::Deleted { .. } => {
                self.changed(true).await;
                Ok(deleted)
            }
            IntegrationDeletion::ActiveTokens(n) => Err(TokenError::IntegrationInUse {
                integration: name.to_string(),
                reason: format!("holding {n} active token(s)"),
            }),
            IntegrationDeletion::NotFound => Err(no_integration(name)),
        }
    }

    async fn integration_record(&self, name: &str) -> Result<IntegrationRecord, TokenError> {
        self.inner
            .store
            .integration(name)
            .await?
            .ok_or_else(|| no_integration(name))
    }

    // ---- tokens ----

    /// Generates a token (`request.value` `None`) or imports one. The value comes back only
    /// for a generated token; an imported one is never echoed.
    pub async fn create_token(
        &self,
        integration: &str,
        request: TokenRequest,
        actor: &str,
    ) -> Result<CreatedToken, TokenError> {
        self.integration_record(integration).await?;
        let now = crate::store::now();
        let not_before = request
            .not_before
            .map(|t| t.trunc_subsecs(0))
            .unwrap_or(now);
        let expires_at = request.expires_at.map(|t| t.trunc_subsecs(0));
        if let Some(end) = expires_at {
            if end <= not_before {
                return Err(TokenError::Invalid(
                    "expires_at must be later than not_before".into(),
                ));
            }
            if end <= now {
                return Err(TokenError::Invalid("expires_at is in the past".into()));
            }
        }
        let prepared = self.prepare(integration, request.label, request.value)?;
        let record = self
            .inner
            .store
            .insert_token(&prepared.new_token(integration, not_before, expires_at, actor))
            .await?;
        self.changed(not_before <= now).await;
        let token = self.view_one(&record).await?;
        Ok(CreatedToken {
            token,
            value: prepared.shown,
        })
    }

    /// A new token effective now (generated, or `value` imported); the current one stays valid
    /// for the integration's overlap (unless it expires sooner), then expires.
    pub async fn rotate(
        &self,
        integration: &str,
        label: Option<String>,
        value: Option<String>,
        actor: &str,
    ) -> Result<Rotation, TokenError> {
        let record = self.integration_record(integration).await?;
        let now = crate::store::now();
        let overlap_until = now + chrono::Duration::seconds(record.overlap_secs);
        let prepared = self.prepare(integration, label, value)?;
        let (created, previous) = self
            .inner
            .store
            .rotate_token(
                &prepared.new_token(integration, now, None, actor),
                overlap_until,
            )
            .await?;
        self.changed(true).await;
        let created = CreatedToken {
            token: self.view_one(&created).await?,
            value: prepared.shown,
        };
        let previous = match previous {
            Some(p) => Some(self.view_one(&p).await?),
            None => None,
        };
        Ok(Rotation { created, previous })
    }

    /// Revokes a token at once (see [`TokenError::LastActiveToken`] for the one refusal:
    /// only for an integration that the applied policies deliver).
    pub async fn revoke(
        &self,
        integration: &str,
        id: &str,
        force: bool,
        actor: &str,
    ) -> Result<TokenView, TokenError> {
        self.integration_record(integration).await?;
        // The last active token is guarded only where it matters: an integration that the
        // applied policy set delivers (`${token.<integration>}`).
        let guarded = !force
            && delivered_by_policy(&self.inner.store)
                .await?
                .contains(integration);
        match self
            .inner
            .store
            .revoke_token(integration, id, actor, !guarded)
            .await?
        {
            Revocation::Revoked(record) => {
                self.changed(true).await;
                self.view_one(&record).await
            }
            Revocation::AlreadyRevoked(record) => self.view_one(&record).await,
            Revocation::LastActive => Err(TokenError::LastActiveToken {
                integration: integration.to_string(),
                id: id.to_string(),
            }),
            Revocation::NotFound => Err(no_token(integration, id)),
        }
    }

    /// An integration's tokens, newest first, with their delivery counts.
    pub async fn tokens(&self, integration: &str) -> Result<Vec<TokenView>, TokenError> {
        self.integration_record(integration).await?;
        let records = self.inner.store.tokens_of(integration).await?;
        let counts: HashMap<String, (i64, i64)> = self
            .inner
            .store
            .token_delivery_counts(integration)
            .await?
            .into_iter()
            .map(|c| (c.token_id, (c.delivered, c.acknowledged)))
            .collect();
        let now = crate::store::now();
        let current = current_of(&records, now).map(|t| t.id.clone());
        Ok(records
            .iter()
            .map(|r| {
                let (delivered, acknowledged) = counts.get(&r.id).copied().unwrap_or_default();
                view(
                    r,
                    now,
                    current.as_deref() == Some(&r.id),
                    delivered,
                    acknowledged,
                )
            })
            .collect())
    }

    pub async fn token(&self, integration: &str, id: &str) -> Result<TokenView, TokenError> {
        self.tokens(integration)
            .await?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| no_token(integration, id))
    }

    /// A token's full value (callers audit this).
    pub async fn reveal(&self, integration: &str, id: &str) -> Result<String, TokenError> {
        let record = self
            .inner
            .store
            .token(integration, id)
            .await?
            .ok_or_else(|| no_token(integration, id))?;
        open_value(&self.inner.master, &record)
    }

    /// One token's view, with its counts and whether it is current.
    async fn view_one(&self, record: &TokenRecord) -> Result<TokenView, TokenError> {
        self.token(&record.integration, &record.id).await
    }

    /// The value to store for a new token: generated, or an import checked for shape.
    fn prepare(
        &self,
        integration: &str,
        label: Option<String>,
        value: Option<String>,
    ) -> Result<PreparedToken, TokenError> {
        let label = label.unwrap_or_default();
        validate_label(&label)?;
        let (value, source, shown) = match value {
            Some(value) => {
                validate_import(&value)?;
                (value, TokenSource::Imported, None)
            }
            None => {
                let value = URL_SAFE_NO_PAD.encode(crate::random::bytes::<32>());
                (value.clone(), TokenSource::Generated, Some(value))
            }
        };
        let id = hex::encode(crate::random::bytes::<8>());
        let sealed_value = self
            .inner
            .master
            .seal(&seal_purpose(integration, &id), value.as_bytes());
        Ok(PreparedToken {
            id,
            label,
            source,
            value_hash: hex::encode(keyed_hash(&self.inner.lookup, &value)),
            sealed_value,
            last4: last4(&value),
            shown,
        })
    }

    // ---- app clients ----

    pub async fn create_client(
        &self,
        integration: &str,
        name: Option<String>,
        actor: &str,
    ) -> Result<IssuedClient, TokenError> {
        self.integration_record(integration).await?;
        let name = name.unwrap_or_else(|| integration.to_string());
        validate_client_name(&name)?;
        let id = format!("tbc_{}", hex::encode(crate::random::bytes::<8>()));
        let secret = URL_SAFE_NO_PAD.encode(crate::random::bytes::<32>());
        let client = self
            .inner
            .store
            .insert_app_client(&NewAppClient {
                id: &id,
                integration,
                name: &name,
                secret_hash: &hex::encode(secret_digest(&secret)),
                created_by: actor,
            })
            .await?;
        self.changed(false).await;
        Ok(IssuedClient {
            client,
            client_secret: secret,
        })
    }

    pub async fn clients(&self, integration: &str) -> Result<Vec<AppClientRecord>, TokenError> {
        self.integration_record(integration).await?;
        Ok(self.inner.store.app_clients(integration).await?)
    }

    pub async fn revoke_client(
        &self,
        integration: &str,
        id: &str,
        actor: &str,
    ) -> Result<AppClientRecord, TokenError> {
        self.integration_record(integration).await?;
        let revoked = self
            .inner
            .store
            .revoke_app_client(integration, id, actor)
            .await?
            .ok_or_else(|| {
                TokenError::NotFound(format!(
                    "integration '{integration}' has no active client {id}"
                ))
            })?;
        self.changed(false).await;
        Ok(revoked)
    }

    // ---- delivery ----

    /// The token each integration delivers now (its newest active one), from this node's
    /// cache. Integrations without an active token are absent.
    pub fn current_values(&self) -> HashMap<String, CurrentToken> {
        self.index().current_at(Utc::now())
    }

    /// [`Self::current_values`] after making sure the cache matches the database (one cheap
    /// read): for a reconcile pass that may serve a request another node recorded a moment
    /// ago, before this node's poller saw the change.
    pub async fn fresh_current_values(&self) -> Result<HashMap<String, CurrentToken>, TokenError> {
        self.refresh().await?;
        Ok(self.current_values())
    }

    // ---- validation ----

    /// Checks an app client's credentials against the index (no database read).
    pub async fn authenticate_client(
        &self,
        client_id: &str,
        secret: &str,
    ) -> Result<AuthenticatedClient, ValidationError> {
        let index = self.fresh_index().await?;
        // Hashed before the lookup, so an unknown ID costs the same as a wrong secret.
        let presented = secret_digest(secret);
        let Some(client) = index.clients.get(client_id) else {
            count_validation("none", "bad_client");
            return Err(ValidationError::BadClient(ClientRefusal::UnknownClient));
        };
        if !bool::from(presented.ct_eq(&client.secret_hash)) {
            count_validation(&client.integration, "bad_client");
            return Err(ValidationError::BadClient(ClientRefusal::WrongSecret));
        }
        if let Err(wait) = self.inner.limiter.take(client_id, Instant::now()) {
            count_validation(&client.integration, "rate_limited");
            return Err(ValidationError::RateLimited {
                client_id: client_id.to_string(),
                integration: client.integration.clone(),
                retry_after_secs: wait.as_secs().max(1),
            });
        }
        Ok(AuthenticatedClient {
            id: client_id.to_string(),
            integration: client.integration.clone(),
        })
    }

    /// Whether `token` is an active token of the client's integration; with `device`, where
    /// that device stands (only asked of the database when the token is active).
    pub async fn validate(
        &self,
        client: &AuthenticatedClient,
        token: &str,
        device: Option<&str>,
    ) -> Result<Validation, ValidationError> {
        if let Some(device) = device {
            validate_device_id(device)?;
        }
        let index = self.fresh_index().await?;
        let integration = index.integrations.get(&client.integration);
        let outcome = match integration {
            _ if !well_formed(token) => TokenOutcome::Malformed,
            Some(integration) => {
                integration.check(&keyed_hash(&self.inner.lookup, token), Utc::now())
            }
            None => TokenOutcome::Unknown,
        };
        match integration {
            Some(integration) => integration.count(outcome),
            None => count_validation(&client.integration, outcome.as_str()),
        }
        let device = match (outcome, device) {
            (TokenOutcome::Active, Some(device)) => Some(
                self.inner
                    .store
                    .device_standing(device)
                    .await?
                    .map_or_else(DeviceAnswer::unknown, DeviceAnswer::from),
            ),
            _ => None,
        };
        Ok(Validation { outcome, device })
    }

    // ---- the index and its freshness ----

    fn index(&self) -> Arc<Index> {
        match self.inner.index.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// The index, refreshed first if the poller has not confirmed it for too long.
    async fn fresh_index(&self) -> Result<Arc<Index>, ValidationError> {
        let stale = |s: &Self| {
            s.now_ms()
                .saturating_sub(s.inner.verified_ms.load(Ordering::Acquire))
                > MAX_STALENESS.as_millis() as u64
        };
        if stale(self) {
            let _one = self.inner.refreshing.lock().await;
            if stale(self) {
                self.refresh().await.map_err(|e| {
                    tracing::error!(error = %e, "tokens: cannot confirm the validation index");
                    ValidationError::Unavailable(e.to_string())
                })?;
            }
        }
        Ok(self.index())
    }

    /// Reloads the index if the store's generation moved; either way it is then confirmed.
    pub async fn refresh(&self) -> Result<(), TokenError> {
        let started = self.now_ms();
        let generation = self.inner.store.token_generation().await?;
        if generation != self.index().generation {
            return self.reload().await;
        }
        self.inner.verified_ms.fetch_max(started, Ordering::AcqRel);
        Ok(())
    }

    /// Rebuilds the index from the store.
    async fn reload(&self) -> Result<(), TokenError> {
        let started = self.now_ms();
        let rows = self.inner.store.token_index_rows().await?;
        let built = Index::build(rows, &self.inner.master);
        match self.inner.index.write() {
            // An older read finishing late must not replace a newer one.
            Ok(mut guard) if guard.generation <= built.generation => *guard = Arc::new(built),
            Ok(_) => {}
            Err(poisoned) => *poisoned.into_inner() = Arc::new(built),
        }
        self.inner.verified_ms.fetch_max(started, Ordering::AcqRel);
        Ok(())
    }

    /// After a change made here: this node's index at once (others follow the generation),
    /// and the reconciler when what is delivered may have changed.
    async fn changed(&self, delivery: bool) {
        if let Err(e) = self.reload().await {
            tracing::warn!(error = %e, "tokens: reload after a change failed; the poller retries");
        }
        if delivery && let Some(wake) = &self.inner.wake {
            wake.wake();
        }
    }

    /// Keeps the index current until `stopped` turns true: the generation four times a
    /// second, and tokens becoming active or expiring turned into reconcile requests (looked
    /// for at the next such moment the index has shown, and every minute).
    pub fn spawn(self, mut stopped: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let mut next_look = Instant::now();
            let mut next_use_flush = Instant::now() + CLIENT_USE_FLUSH;
            // Remembered across reloads: a token that expires drops out of the index.
            let mut next_moment: Option<DateTime<Utc>> = None;
            loop {
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "tokens: could not check the token generation");
                }
                let now = Utc::now();
                let upcoming = self.index().next_transition_after(now);
                next_moment = match (next_moment, upcoming) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                };
                if Instant::now() >= next_look || next_moment.is_some_and(|at| at <= now) {
                    next_look = Instant::now() + TRANSITION_CHECK;
                    next_moment = upcoming;
                    self.note_transitions().await;
                }
                if Instant::now() >= next_use_flush {
                    next_use_flush = Instant::now() + CLIENT_USE_FLUSH;
                    self.flush_client_use().await;
                }
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = stopped.changed() => {}
                }
                if *stopped.borrow() {
                    self.flush_client_use().await;
                    return;
                }
            }
        })
    }

    /// Writes when each app client last validated, for those that did since the last write
    /// (the rate limiter's buckets already hold the moment of each client's last request, so
    /// validation itself does nothing more). The poller calls this once a minute; a client's
    /// `last_used_at` is thus at most a minute and a poll behind.
    pub async fn flush_client_use(&self) {
        let now = Instant::now();
        let since = {
            let mut flushed = match self.inner.use_flushed.lock() {
                Ok(guard) => guard,
                Err(poisoned) => poisoned.into_inner(),
            };
            flushed.replace(now)
        };
        let wall = Utc::now();
        let uses: Vec<(String, DateTime<Utc>)> = self
            .inner
            .limiter
            .used_since(since)
            .into_iter()
            .map(|(client, at)| {
                let ago = chrono::Duration::from_std(now.saturating_duration_since(at))
                    .unwrap_or_default();
                (client, (wall - ago).trunc_subsecs(0))
            })
            .collect();
        if uses.is_empty() {
            return;
        }
        if let Err(e) = self.inner.store.record_app_client_use(&uses).await {
            tracing::warn!(error = %e, "tokens: could not record when app clients were used");
        }
    }

    /// Turns tokens that became active or expired into one reconcile request (one node wins
    /// each moment), and refreshes this node's index.
    async fn note_transitions(&self) {
        match self.inner.store.note_token_transitions().await {
            Ok(integrations) if !integrations.is_empty() => {
                tracing::info!(
                    ?integrations,
                    "tokens: a token became active or expired; reconciling"
                );
                self.changed(true).await;
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "tokens: noting token transitions failed"),
        }
    }
}

/// A new token's stored form, before its times are known.
struct PreparedToken {
    id: String,
    label: String,
    source: TokenSource,
    value_hash: String,
    sealed_value: String,
    last4: String,
    /// The value to show once: generated tokens only.
    shown: Option<String>,
}

impl PreparedToken {
    fn new_token<'a>(
        &'a self,
        integration: &'a str,
        not_before: DateTime<Utc>,
        expires_at: Option<DateTime<Utc>>,
        actor: &'a str,
    ) -> NewToken<'a> {
        NewToken {
            id: &self.id,
            integration,
            label: &self.label,
            source: self.source,
            value_hash: &self.value_hash,
            sealed_value: &self.sealed_value,
            last4: &self.last4,
            not_before,
            expires_at,
            created_by: actor,
        }
    }
}

/// What validation and delivery read: built from the store, swapped whole.
#[derive(Default)]
struct Index {
    generation: i64,
    integrations: HashMap<String, IntegrationIndex>,
    clients: HashMap<String, ClientEntry>,
}

struct IntegrationIndex {
    record: IntegrationRecord,
    /// `trustbroker_token_validations_total` for this integration, per [`TokenOutcome`]:
    /// made at first use (the metrics recorder exists by then), so that counting a
    /// validation neither allocates its labels nor looks them up.
    counters: [OnceLock<metrics::Counter>; TokenOutcome::ALL.len()],
    /// Live tokens (not revoked, not expired when loaded) by keyed hash.
    by_hash: HashMap<[u8; 32], Window>,
    /// The same tokens with their values, newest first, for delivery.
    newest_first: Vec<OpenToken>,
}

#[derive(Clone, Copy)]
struct Window {
    hash: [u8; 32],
    not_before: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
}

struct OpenToken {
    id: String,
    value: String,
    not_before: DateTime<Utc>,
    expires_at: Option<DateTime<Utc>>,
}

struct ClientEntry {
    integration: String,
    secret_hash: [u8; 32],
}

impl Index {
    fn build(rows: TokenIndexRows, master: &MasterKey) -> Index {
        let mut integrations: HashMap<String, IntegrationIndex> = rows
            .integrations
            .into_iter()
            .map(|record| {
                let index = IntegrationIndex {
                    record,
                    counters: Default::default(),
                    by_hash: HashMap::new(),
                    newest_first: Vec::new(),
                };
                (index.record.name.clone(), index)
            })
            .collect();
        // Rows come newest first per integration.
        for token in rows.tokens {
            let Some(integration) = integrations.get_mut(&token.integration) else {
                continue;
            };
            let Some(hash) = decode_hash(&token.value_hash) else {
                tracing::error!(token = %token.id, "tokens: a stored keyed hash is malformed; skipped");
                continue;
            };
            let value = match open_value(master, &token) {
                Ok(value) => value,
                Err(e) => {
                    tracing::error!(token = %token.id, error = %e, "tokens: skipped a token");
                    continue;
                }
            };
            integration.by_hash.insert(
                hash,
                Window {
                    hash,
                    not_before: token.not_before,
                    expires_at: token.expires_at,
                },
            );
            integration.newest_first.push(OpenToken {
                id: token.id,
                value,
                not_before: token.not_before,
                expires_at: token.expires_at,
            });
        }
        let clients = rows
            .clients
            .into_iter()
            .filter_map(|c| {
                let secret_hash = decode_hash(&c.secret_hash)?;
                Some((
                    c.id,
                    ClientEntry {
                        integration: c.integration,
                        secret_hash,
                    },
                ))
            })
            .collect();
        Index {
            generation: rows.generation,
            integrations,
            clients,
        }
    }

    fn current_at(&self, at: DateTime<Utc>) -> HashMap<String, CurrentToken> {
        self.integrations
            .values()
            .filter_map(|i| {
                let token = i
                    .newest_first
                    .iter()
                    .find(|t| t.not_before <= at && t.expires_at.is_none_or(|end| at < end))?;
                Some((
                    i.record.name.clone(),
                    CurrentToken {
                        token_id: token.id.clone(),
                        value: token.value.clone(),
                        integration: i.record.name.clone(),
                        config_key: i.record.config_key.clone(),
                        bundle_id: i.record.bundle_id.clone(),
                    },
                ))
            })
            .collect()
    }

    /// The earliest moment after `now` at which some token starts or ends.
    fn next_transition_after(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.integrations
            .values()
            .flat_map(|i| i.newest_first.iter())
            .flat_map(|t| [Some(t.not_before), t.expires_at])
            .flatten()
            .filter(|at| *at > now)
            .min()
    }
}

impl IntegrationIndex {
    fn count(&self, outcome: TokenOutcome) {
        let slot = TokenOutcome::ALL.iter().position(|o| *o == outcome);
        match slot.and_then(|i| self.counters.get(i)) {
            Some(counter) => counter
                .get_or_init(|| {
                    metrics::counter!(
                        "trustbroker_token_validations_total",
                        "integration" => self.record.name.clone(),
                        "outcome" => outcome.as_str()
                    )
                })
                .increment(1),
            None => count_validation(&self.record.name, outcome.as_str()),
        }
    }

    /// The keyed hash was found by a hash-map lookup: its timing depends on a value an
    /// attacker cannot compute without the lookup key, so it tells nothing about the token.
    fn check(&self, hash: &[u8; 32], at: DateTime<Utc>) -> TokenOutcome {
        match self.by_hash.get(hash) {
            Some(window) if bool::from(window.hash.ct_eq(hash)) => {
                if window.not_before > at {
                    TokenOutcome::Scheduled
                } else if window.expires_at.is_some_and(|end| end <= at) {
                    TokenOutcome::Expired
                } else {
                    TokenOutcome::Active
                }
            }
            _ => TokenOutcome::Unknown,
        }
    }
}

impl From<DeviceStanding> for DeviceAnswer {
    fn from(d: DeviceStanding) -> Self {
        DeviceAnswer {
            enrolled: d.enrollment_status == EnrollmentStatus::Active
                && d.channel_status != Some(ChannelStatus::CheckedOut),
            retired: d.enrollment_status == EnrollmentStatus::Retired,
            owner: d.owner_id.map(|id| OwnerAnswer {
                id,
                email: d.owner_email,
                login: d.owner_login,
            }),
        }
    }
}

impl DeviceAnswer {
    /// A device this broker never managed.
    fn unknown() -> Self {
        DeviceAnswer {
            enrolled: false,
            retired: false,
            owner: None,
        }
    }
}

/// A token bucket per client, in memory (each node limits on its own).
struct RateLimiter {
    per_second: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl RateLimiter {
    fn new(limits: ValidationLimits) -> RateLimiter {
        RateLimiter {
            per_second: f64::from(limits.per_second.max(1)),
            burst: f64::from(limits.burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// The clients whose last request came after `since` (all, for `None`), with its moment.
    fn used_since(&self, since: Option<Instant>) -> Vec<(String, Instant)> {
        let buckets = match self.buckets.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        buckets
            .iter()
            .filter(|(_, b)| since.is_none_or(|since| b.at > since))
            .map(|(client, b)| (client.clone(), b.at))
            .collect()
    }

    /// Takes one validation from `client`'s bucket; `Err(wait)` when it is empty. Buckets
    /// exist only for authenticated clients, so the map stays as small as the client list.
    fn take(&self, client: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = match self.buckets.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let bucket = match buckets.get_mut(client) {
            Some(bucket) => bucket,
            None => buckets.entry(client.to_string()).or_insert(Bucket {
                tokens: self.burst,
                at: now,
            }),
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.per_second).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - bucket.tokens) / self.per_second,
            ))
        }
    }
}

fn count_validation(integration: &str, outcome: &'static str) {
    metrics::counter!(
        "trustbroker_token_validations_total",
        "integration" => integration.to_string(),
        "outcome" => outcome
    )
    .increment(1);
}

/// The HMAC key token values are found by: made at first start, sealed in the store.
async fn lookup_key(store: &Store, master: &MasterKey) -> Result<hmac::Key, TokenError> {
    const PURPOSE: &str = "token-lookup-key";
    let sealed = match store.token_state().await? {
        (_, Some(sealed)) => sealed,
        (_, None) => {
            let fresh = master.seal(PURPOSE, &crate::random::bytes::<32>());
            // Another node starting at the same moment may win; its key is the one used.
            store.init_token_lookup_key(&fresh).await?
        }
    };
    let bytes = master.open(PURPOSE, &sealed)?;
    Ok(hmac::Key::new(hmac::HMAC_SHA256, &bytes))
}

fn keyed_hash(key: &hmac::Key, value: &str) -> [u8; 32] {
    let tag = hmac::sign(key, value.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(tag.as_ref());
    out
}

/// SHA-256 of a client secret: secrets carry 256 random bits, so a slow hash adds nothing.
fn secret_digest(secret: &str) -> [u8; 32] {
    let digest = digest::digest(&digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(digest.as_ref());
    out
}

fn decode_hash(text: &str) -> Option<[u8; 32]> {
    hex::decode(text).ok()?.try_into().ok()
}

/// The seal's associated data: a sealed value moved to another row does not open.
fn seal_purpose(integration: &str, id: &str) -> String {
    format!("shared-token:{integration}:{id}")
}

fn open_value(master: &MasterKey, token: &TokenRecord) -> Result<String, TokenError> {
    let bytes = master.open(
        &seal_purpose(&token.integration, &token.id),
        &token.sealed_value,
    )?;
    String::from_utf8(bytes).map_err(|_| TokenError::Seal(SealError::Malformed))
}

fn last4(value: &str) -> String {
    let chars: Vec<char> = value.chars().collect();
    chars
        .get(chars.len().saturating_sub(4)..)
        .unwrap_or_default()
        .iter()
        .collect()
}

/// The integrations whose shared token (`${token.<integration>}`) some app configuration of
/// the applied policy set carries, read from the store (so every node and the command line
/// agree). An applied version that does not load (apply refuses such a set, so only a damaged
/// row) is an error: the caller cannot tell, and must say `force`.
async fn delivered_by_policy(store: &Store) -> Result<BTreeSet<String>, TokenError> {
    Ok(policy_variables(store)
        .await?
        .into_iter()
        .filter_map(|v| match v {
            Variable::Token(integration) => Some(integration),
            _ => None,
        })
        .collect())
}

/// As [`delivered_by_policy`], for per-device tokens (`${device_token.<integration>}`).
async fn device_tokens_by_policy(store: &Store) -> Result<BTreeSet<String>, TokenError> {
    Ok(policy_variables(store)
        .await?
        .into_iter()
        .filter_map(|v| match v {
            Variable::DeviceToken(integration) => Some(integration),
            _ => None,
        })
        .collect())
}

/// Every variable the apps of the applied policy set use.
async fn policy_variables(store: &Store) -> Result<BTreeSet<Variable>, TokenError> {
    let Some(record) = store.latest_policy_version().await? else {
        return Ok(BTreeSet::new());
    };
    let set = crate::policy::reconcile::decode_files(&record.files)
        .map_err(|e| e.to_string())
        .and_then(|files| {
            crate::policy::load::load_files(&files).map_err(|diagnostics| {
                diagnostics
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; ")
            })
        });
    match set {
        Ok(set) => Ok(set
            .policies
            .iter()
            .flat_map(|p| p.apps.iter())
            .flat_map(|a| a.variables.iter().cloned())
            .collect()),
        Err(problems) => Err(TokenError::Invalid(format!(
            "the applied policy version {} does not load ({problems}): cannot tell which \
             integrations it delivers; use force",
            record.version
        ))),
    }
}

/// The newest token active at `at` (records ordered newest first).
fn current_of(records: &[TokenRecord], at: DateTime<Utc>) -> Option<&TokenRecord> {
    records.iter().find(|r| r.is_active_at(at))
}

fn view(
    r: &TokenRecord,
    at: DateTime<Utc>,
    current: bool,
    delivered: i64,
    acknowledged: i64,
) -> TokenView {
    TokenView {
        id: r.id.clone(),
        integration: r.integration.clone(),
        label: r.label.clone(),
        source: r.source,
        last4: r.last4.clone(),
        status: TokenStatus::of(r, at),
        current,
        not_before: r.not_before,
        expires_at: r.expires_at,
        created_by: r.created_by.clone(),
        created_at: r.created_at,
        revoked_by: r.revoked_by.clone(),
        revoked_at: r.revoked_at,
        delivered,
        acknowledged,
    }
}

fn integration_view(
    integration: IntegrationRecord,
    tokens: &[TokenRecord],
    clients: &[AppClientRecord],
    at: DateTime<Utc>,
) -> IntegrationView {
    IntegrationView {
        current_token: current_of(tokens, at).map(|t| t.id.clone()),
        active_tokens: tokens.iter().filter(|t| t.is_active_at(at)).count(),
        active_clients: clients.iter().filter(|c| c.revoked_at.is_none()).count(),
        integration,
    }
}

fn no_integration(name: &str) -> TokenError {
    TokenError::NotFound(format!("no token integration named '{name}'"))
}

fn no_token(integration: &str, id: &str) -> TokenError {
    TokenError::NotFound(format!("integration '{integration}' has no token {id}"))
}

// ---- input bounds ----

/// `[a-z0-9-_]`, 1 to 64, starting with a letter or digit: it appears in URLs and in
/// `${token.<name>}`.
pub fn validate_name(name: &str) -> Result<(), TokenError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(TokenError::Invalid(format!(
            "invalid integration name '{}': use 1 to 64 of a-z, 0-9, '-' and '_', starting \
             with a letter or digit",
            crate::audit::truncated(name, 80)
        )))
    }
}

fn printable(text: &str) -> bool {
    !text.chars().any(char::is_control)
}

fn validate_display_name(text: &str) -> Result<(), TokenError> {
    if (1..=128).contains(&text.chars().count()) && printable(text) {
        Ok(())
    } else {
        Err(TokenError::Invalid(
            "display_name must be 1 to 128 characters, without control characters".into(),
        ))
    }
}

fn validate_label(text: &str) -> Result<(), TokenError> {
    if text.chars().count() <= 128 && printable(text) {
        Ok(())
    } else {
        Err(TokenError::Invalid(
            "label must be at most 128 characters, without control characters".into(),
        ))
    }
}

/// Apple's bundle identifiers: letters, digits, '-' and '.', at most 155 characters.
fn validate_bundle_id(text: &str) -> Result<(), TokenError> {
    if (1..=155).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        Ok(())
    } else {
        Err(TokenError::Invalid(format!(
            "invalid bundle_id '{}': use 1 to 155 letters, digits, '-' and '.'",
            crate::audit::truncated(text, 80)
        )))
    }
}

fn validate_config_key(text: &str) -> Result<(), TokenError> {
    if (1..=128).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        Ok(())
    } else {
        Err(TokenError::Invalid(format!(
            "invalid config_key '{}': use 1 to 128 letters, digits, '_', '-' and '.'",
            crate::audit::truncated(text, 80)
        )))
    }
}

fn validate_overlap(secs: i64) -> Result<(), TokenError> {
    if (0..=MAX_OVERLAP_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(TokenError::Invalid(format!(
            "overlap_secs must be between 0 and {MAX_OVERLAP_SECS} (365 days)"
        )))
    }
}

fn validate_client_name(text: &str) -> Result<(), TokenError> {
    if (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        Ok(())
    } else {
        Err(TokenError::Invalid(
            "a client name is 1 to 64 letters, digits, '_', '-' and '.'".into(),
        ))
    }
}

/// An imported value: printable ASCII without spaces, as vendors' portals show tokens.
fn validate_import(value: &str) -> Result<(), TokenError> {
    if (IMPORT_MIN_LEN..=IMPORT_MAX_LEN).contains(&value.len()) && well_formed(value) {
        Ok(())
    } else {
        Err(TokenError::Invalid(format!(
            "an imported token is {IMPORT_MIN_LEN} to {IMPORT_MAX_LEN} printable ASCII \
             characters without spaces"
        )))
    }
}

/// Could be a token at all: bounded, printable ASCII without spaces.
fn well_formed(token: &str) -> bool {
    (1..=PRESENTED_MAX_LEN).contains(&token.len()) && token.bytes().all(|b| b.is_ascii_graphic())
}

/// A UDID or serial number: 1 to 64 letters, digits, '-', '_', '.', ':'.
fn validate_device_id(text: &str) -> Result<(), ValidationError> {
    if (1..=64).contains(&text.len())
        && text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'))
    {
        Ok(())
    } else {
        Err(ValidationError::InvalidDevice(
            "device is a UDID or serial number: 1 to 64 letters, digits, '-', '_', '.', ':'".into(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(not_before: i64, expires_at: Option<i64>, revoked: bool) -> TokenRecord {
        let at = |s: i64| DateTime::from_timestamp(s, 0).unwrap();
        TokenRecord {
            id: "t".into(),
            integration: "i".into(),
            label: String::new(),
            source: TokenSource::Generated,
            value_hash: String::new(),
            sealed_value: String::new(),
            last4: String::new(),
            not_before: at(not_before),
            expires_at: expires_at.map(at),
            created_by: "test".into(),
            created_at: at(0),
            revoked_by: None,
            revoked_at: revoked.then(|| at(1)),
            seq: 1,
        }
    }

    #[test]
    fn status_follows_the_times() {
        let now = DateTime::from_timestamp(100, 0).unwrap();
        assert_eq!(
            TokenStatus::of(&record(200, None, false), now),
            TokenStatus::Scheduled
        );
        assert_eq!(
            TokenStatus::of(&record(50, None, false), now),
            TokenStatus::Active
        );
        assert_eq!(
            TokenStatus::of(&record(50, Some(100), false), now),
            TokenStatus::Expired
        );
        assert_eq!(
            TokenStatus::of(&record(50, Some(101), false), now),
            TokenStatus::Active
        );
        assert_eq!(
            TokenStatus::of(&record(50, None, true), now),
            TokenStatus::Revoked
        );
        assert_eq!(
            TokenStatus::of(&record(200, Some(50), true), now),
            TokenStatus::Revoked
        );
    }

    #[test]
    fn names_and_values_are_bounded() {
        assert!(validate_name("pingid").is_ok());
        assert!(validate_name("ping_id-2").is_ok());
        for bad in ["", "-x", "PingID", "ping id", "ping/id", &"a".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(validate_import("abcdefghijklmnop").is_ok());
        assert!(validate_import("short").is_err());
        assert!(validate_import("with a space in it ok").is_err());
        assert!(validate_import(&"x".repeat(513)).is_err());
        assert!(validate_import("ünïcödé-is-not-ascii").is_err());
        assert!(validate_config_key("PINGID_MDM_TOKEN").is_ok());
        assert!(validate_config_key("bad key").is_err());
        assert!(validate_bundle_id("com.pingidentity.pingid").is_ok());
        assert!(validate_bundle_id("com/evil").is_err());
        assert!(validate_device_id("00008030-001A2C3E0C12802E").is_ok());
        assert!(validate_device_id("C02XK0ABJG5H").is_ok());
        assert!(validate_device_id("x' OR 1=1").is_err());
        assert!(!well_formed(""));
        assert!(!well_formed(&"x".repeat(PRESENTED_MAX_LEN + 1)));
    }

    #[test]
    fn last_four_characters() {
        assert_eq!(last4("abcdefgh"), "efgh");
        assert_eq!(last4("ab"), "ab");
        assert_eq!(last4(""), "");
    }

    #[test]
    fn keyed_hashes_depend_on_the_key() {
        let a = hmac::Key::new(hmac::HMAC_SHA256, &[1; 32]);
        let b = hmac::Key::new(hmac::HMAC_SHA256, &[2; 32]);
        assert_eq!(keyed_hash(&a, "token"), keyed_hash(&a, "token"));
        assert_ne!(keyed_hash(&a, "token"), keyed_hash(&b, "token"));
        assert_ne!(keyed_hash(&a, "token"), keyed_hash(&a, "token2"));
    }

    #[test]
    fn the_bucket_refills_at_its_rate() {
        let limiter = RateLimiter::new(ValidationLimits {
            per_second: 10,
            burst: 3,
        });
        let start = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take("c", start).is_ok());
        }
        let wait = limiter.take("c", start).unwrap_err();
        assert!(wait <= Duration::from_millis(100), "{wait:?}");
        assert!(
            limiter.take("other", start).is_ok(),
            "buckets are per client"
        );
        assert!(
            limiter
                .take("c", start + Duration::from_millis(100))
                .is_ok()
        );
        assert!(
            limiter
                .take("c", start + Duration::from_millis(100))
                .is_err()
        );
    }
}
