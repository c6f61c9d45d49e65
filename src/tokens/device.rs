//! Per-device signed tokens: a JWT (ES256) the broker signs for one device and one integration,
//! carrying the device (`sub`), its owner and their groups in scope. Apps verify it offline
//! against `/.well-known/jwks.json`, or online at `POST /validate/v1/introspect`, which also
//! knows about revocation and retired devices.
//!
//! Signing keys are P-256 keys made with ring, sealed at rest with the master key. A key is
//! `next` (published, not signing), then `current` (signing), then `retired` (published while a
//! token it signed lives): rotation promotes the next key, so verifiers that cache the JWKS
//! know a key before they meet a token it signed.
//!
//! jsonwebtoken is built without a crypto backend (its RustCrypto one needs a release of rsa
//! that conflicts with our pin, and aws-lc-rs is not ours): [`ring_es256`] gives it ring, for
//! ES256 only, so no other algorithm can be signed or verified at all.
//!
//! Owns: signing keys, issuing, revoking and introspecting device tokens. Must not: deliver
//! them (the policy reconciler does), authenticate app clients (`tokens::shared`).

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Utc};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use ring::rand::SystemRandom;
use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

use crate::secrets::{MasterKey, SealError};
use crate::store::{
    DeviceTokenInsert, DeviceTokenRow, EnrollmentStatus, NewTokenSigningKey, SigningKeyStatus,
    Store, StoreError, TokenSigningKeyRow,
};

/// The one algorithm device tokens use.
pub const ALGORITHM: &str = "ES256";
/// A device token's lifetime unless the request names another.
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);
/// The longest lifetime a request may ask for.
pub const MAX_LIFETIME: Duration = Duration::from_secs(366 * 24 * 3600);
/// Longest token introspection reads, and longest token the broker issues.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// How long clients may cache the JWKS (its `Cache-Control`). A rotation within this time of
/// the next key's publication is refused unless forced: a client may not have seen it yet.
pub const JWKS_MAX_AGE: Duration = Duration::from_secs(300);
/// How far in the future a token's `nbf` may lie (clock skew between nodes).
const NBF_SKEW_SECS: u64 = 60;
/// Most groups a token carries.
const MAX_GROUPS: usize = 512;
/// Longest text of one identifier, group or email in a token.
const MAX_FIELD_BYTES: usize = 512;
/// Expired tokens are forgotten this long after their expiry (introspection answers
/// `active: false` for unknown tokens all the same).
const PURGE_AFTER: Duration = Duration::from_secs(7 * 24 * 3600);
const PURGE_EVERY: Duration = Duration::from_secs(3600);
/// How long this node reuses the JWKS document it built (it is public and unauthenticated).
const JWKS_CACHE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DeviceTokenError {
    /// The caller's request is malformed (our caller: the reconciler or an admin).
    #[error("invalid device token request: {0}")]
    Invalid(String),
    /// The enrollment record is retired, not bound yet, or bound to another device.
    #[error("enrollment {enrollment_id} is not active with device {udid}: no token is issued")]
    EnrollmentNotActive { enrollment_id: String, udid: String },
    #[error(
        "the token would be {0} bytes, over the {MAX_TOKEN_BYTES}-byte limit of introspection \
         (too many groups in scope?)"
    )]
    TooLarge(usize),
    #[error(
        "the next signing key was published {published_secs} s ago and clients may cache the \
         JWKS for {} s: rotate in {wait_secs} s, or force it (after a key compromise)",
        JWKS_MAX_AGE.as_secs()
    )]
    NextKeyTooNew { published_secs: u64, wait_secs: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("a sealed signing key or device token does not open: {0}")]
    Seal(#[from] SealError),
    #[error("stored signing key {0} is unusable")]
    CorruptKey(String),
    #[error("signing key generation failed")]
    KeyGeneration,
    #[error("signing the token failed: {0}")]
    Signing(jsonwebtoken::errors::Error),
}

/// What the reconciler asks a token for.
#[derive(Clone, Copy, Debug)]
pub struct DeviceTokenRequest<'a> {
    /// The integration (`token_integrations.name`): the token's audience.
    pub integration: &'a str,
    /// The enrollment record the device is enrolled under (`enrollments.id`).
    pub enrollment_id: &'a str,
    /// The device: the token's subject.
    pub udid: &'a str,
    /// The owner's stable user ID (`users.id`).
    pub owner_id: Option<&'a str>,
    pub owner_email: Option<&'a str>,
    /// The owner's groups in scope, as `provider:id`; order and repeats do not matter.
    pub groups: &'a [String],
    /// How long a new token lives; `None`: the broker's default ([`DEFAULT_LIFETIME`]).
    pub lifetime: Option<Duration>,
}

/// A token to deliver. The same string comes back while it is fresh.
#[derive(Clone)]
pub struct IssuedDeviceToken {
    /// The JWT: a bearer credential of the device, never logged.
    pub jwt: String,
    pub jti: String,
    pub kid: String,
    pub issued_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
    /// A token stored earlier (true), or one issued by this call.
    pub reused: bool,
}

impl fmt::Debug for IssuedDeviceToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("IssuedDeviceToken")
            .field("jti", &self.jti)
            .field("kid", &self.kid)
            .field("issued_at", &self.issued_at)
            .field("expires_at", &self.expires_at)
            .field("reused", &self.reused)
            .finish_non_exhaustive()
    }
}

/// The claims of a device token.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceTokenClaims {
    pub iss: String,
    /// The integration.
    pub aud: String,
    /// The device's UDID.
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    #[serde(default)]
    pub groups: Vec<String>,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    pub jti: String,
}

/// What introspection found.
#[derive(Clone, Debug)]
pub enum Introspection {
    Active(Box<ActiveDeviceToken>),
    Inactive(InactiveReason),
}

#[derive(Clone, Debug)]
pub struct ActiveDeviceToken {
    pub claims: DeviceTokenClaims,
    pub kid: String,
    pub enrollment_id: String,
}

/// Why a token is not active. For logs and metrics only: the caller is told `active: false`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InactiveReason {
    /// Not a JWT, or not one of ours in shape (header, claims).
    Malformed,
    TooLarge,
    /// `alg` other than ES256 (`none`, HS256, …).
    Algorithm,
    /// A `kid` we never made.
    UnknownKey,
    Signature,
    Expired,
    NotYetValid,
    Issuer,
    /// Made for another integration than the caller's.
    Audience,
    /// Signed by us but not stored (purged long after expiry).
    UnknownToken,
    Revoked,
    /// The device's enrollment record is retired.
    EnrollmentRetired,
    /// The stored token disagrees with the claims (cannot happen without our key).
    Mismatch,
}

impl InactiveReason {
    pub fn as_str(self) -> &'static str {
        match self {
            InactiveReason::Malformed => "malformed",
            InactiveReason::TooLarge => "too_large",
            InactiveReason::Algorithm => "algorithm",
            InactiveReason::UnknownKey => "unknown_key",
            InactiveReason::Signature => "signature",
            InactiveReason::Expired => "expired",
            InactiveReason::NotYetValid => "not_yet_valid",
            InactiveReason::Issuer => "issuer",
            InactiveReason::Audience => "audience",
            InactiveReason::UnknownToken => "unknown_token",
            InactiveReason::Revoked => "revoked",
            InactiveReason::EnrollmentRetired => "enrollment_retired",
            InactiveReason::Mismatch => "mismatch",
        }
    }
}

/// A signing key as the CLI and the admin API list it (never its private part).
#[derive(Clone, Debug, Serialize)]
pub struct SigningKeyInfo {
    pub kid: String,
    pub algorithm: String,
    pub status: SigningKeyStatus,
    /// In the JWKS now.
    pub published: bool,
    pub created_at: DateTime<Utc>,
    pub activated_at: Option<DateTime<Utc>>,
    pub retired_at: Option<DateTime<Utc>>,
}

/// What a rotation did.
#[derive(Clone, Debug, Serialize)]
pub struct Rotation {
    /// The key that signed until now (published while its tokens live).
    pub retired: String,
    /// The key that signs from now on (published since the last rotation).
    pub current: String,
    /// The key published now, signing from the next rotation.
    pub next: String,
}

/// One key of the JWKS (RFC 7517, RFC 7518 section 6.2).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PublicJwk {
    pub kty: String,
    pub crv: String,
    pub x: String,
    pub y: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    #[serde(default, rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
}

/// The published keys: `{"keys": [...]}`.
#[derive(Clone, Debug, Serialize)]
pub struct Jwks {
    pub keys: Vec<PublicJwk>,
}

/// Issues, revokes and introspects device tokens. Cheap to clone.
#[derive(Clone)]
pub struct DeviceTokens {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    master: Arc<MasterKey>,
    /// The broker's public URL: every token's `iss`.
    issuer: String,
    default_lifetime: Duration,
    /// Public keys by kid. A kid names one key for ever, so entries never go stale.
    verifiers: Mutex<HashMap<String, Arc<DecodingKey>>>,
    jwks: Mutex<Option<(Instant, Arc<Jwks>)>>,
}

impl fmt::Debug for DeviceTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceTokens")
            .field("issuer", &self.inner.issuer)
            .finish_non_exhaustive()
    }
}

impl DeviceTokens {
    /// `issuer`: the broker's public URL; `default_lifetime`: of tokens whose request names
    /// none (clamped to 1 s ..= [`MAX_LIFETIME`]).
    pub fn new(
        store: Store,
        master: Arc<MasterKey>,
        issuer: String,
        default_lifetime: Duration,
    ) -> DeviceTokens {
        ring_es256::install();
        DeviceTokens {
            inner: Arc::new(Inner {
                store,
                master,
                issuer,
                default_lifetime: default_lifetime.clamp(Duration::from_secs(1), MAX_LIFETIME),
                verifiers: Mutex::default(),
                jwks: Mutex::default(),
            }),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.inner.issuer
    }

    /// The token to deliver to a device for an integration: the stored one while it expires
    /// later than now + `refresh_before` (so repeated reconcile passes get the same string),
    /// else a new one. A new token does not revoke the older: it stays valid until it expires
    /// or [`DeviceTokens::revoke_for`] revokes it. A change of owner, email, groups or issuer
    /// also makes a new token. No token is issued for an enrollment that is not active with
    /// `udid` ([`DeviceTokenError::EnrollmentNotActive`]).
    pub async fn current_or_issue(
        &self,
        request: DeviceTokenRequest<'_>,
        refresh_before: Duration,
    ) -> Result<IssuedDeviceToken, DeviceTokenError> {
        let lifetime = request.lifetime.unwrap_or(self.inner.default_lifetime);
        check_request(&request, lifetime, refresh_before)?;
        let mut groups = request.groups.to_vec();
        groups.sort();
        groups.dedup();
        let claims_hash = self.claims_hash(&request, &groups);
        let now = crate::store::now();
        let fresh_after = now + chrono_duration(refresh_before);
        let store = &self.inner.store;
        if let Some(row) = store
            .fresh_device_token(
                request.enrollment_id,
                request.integration,
                &claims_hash,
                fresh_after,
            )
            .await?
        {
            return self.stored(row);
        }

        let key = self.signing_key().await?;
        let jti = URL_SAFE_NO_PAD.encode(crate::random::bytes::<16>());
        let expires_at = now + chrono_duration(lifetime);
        let claims = DeviceTokenClaims {
            iss: self.inner.issuer.clone(),
            aud: request.integration.to_owned(),
            sub: request.udid.to_owned(),
            owner: request.owner_id.map(str::to_owned),
            email: request.owner_email.map(str::to_owned),
            groups,
            iat: now.timestamp(),
            nbf: now.timestamp(),
            exp: expires_at.timestamp(),
            jti: jti.clone(),
        };
        let jwt = sign(&key, &claims)?;
        if jwt.len() > MAX_TOKEN_BYTES {
            return Err(DeviceTokenError::TooLarge(jwt.len()));
        }
        let row = DeviceTokenRow {
            token: self.inner.master.seal(&token_purpose(&jti), jwt.as_bytes()),
            jti: jti.clone(),
            enrollment_id: request.enrollment_id.to_owned(),
            udid: request.udid.to_owned(),
            integration: request.integration.to_owned(),
            kid: key.kid.clone(),
            claims_hash,
            issued_at: now,
            expires_at,
            status: crate::store::DEVICE_TOKEN_ACTIVE.to_owned(),
            revoked_at: None,
            revoked_reason: None,
        };
        match store.insert_device_token(&row, fresh_after).await? {
            DeviceTokenInsert::Inserted => {
                metrics::counter!("trustbroker_device_tokens_issued_total",
                    "integration" => request.integration.to_owned())
                .increment(1);
                tracing::info!(
                    integration = request.integration,
                    enrollment = request.enrollment_id,
                    udid = request.udid,
                    jti = %jti,
                    kid = %key.kid,
                    expires_at = %expires_at,
                    "device token issued"
                );
                Ok(IssuedDeviceToken {
                    jwt,
                    jti,
                    kid: key.kid,
                    issued_at: now,
                    expires_at,
                    reused: false,
                })
            }
            DeviceTokenInsert::Existing(row) => self.stored(*row),
            DeviceTokenInsert::EnrollmentNotActive => Err(DeviceTokenError::EnrollmentNotActive {
                enrollment_id: request.enrollment_id.to_owned(),
                udid: request.udid.to_owned(),
            }),
        }
    }

    /// Revokes the active tokens of an enrollment record (for one integration, or all of
    /// them): they are inactive at introspection from now on, on every node. Returns how many.
    /// (Retiring an enrollment, or re-enrolling its device, revokes them in the same
    /// transaction: see `store::lifecycle`.)
    pub async fn revoke_for(
        &self,
        enrollment_id: &str,
        integration: Option<&str>,
        reason: &str,
    ) -> Result<u64, DeviceTokenError> {
        let reason = crate::audit::truncated(reason, 256);
        let revoked = self
            .inner
            .store
            .revoke_device_tokens(enrollment_id, integration, &reason, crate::store::now())
            .await?;
        if revoked > 0 {
            tracing::info!(
                enrollment = enrollment_id,
                integration = integration.unwrap_or("*"),
                revoked,
                reason = %reason,
                "device tokens revoked"
            );
        }
        Ok(revoked)
    }

    /// Checks `token` for a caller of integration `audience`: our signature (ES256, a kid we
    /// made), issuer, audience, times, and that it is stored, not revoked, and its device's
    /// enrollment is not retired. Errors are ours (database); a bad token is `Inactive`.
    pub async fn introspect(
        &self,
        token: &str,
        audience: &str,
    ) -> Result<Introspection, DeviceTokenError> {
        let outcome = self.check(token, audience).await;
        let label = match &outcome {
            Ok(Introspection::Active(_)) => "active",
            Ok(Introspection::Inactive(reason)) => reason.as_str(),
            Err(_) => "error",
        };
        metrics::counter!("trustbroker_device_token_introspections_total",
            "integration" => audience.to_owned(), "outcome" => label)
        .increment(1);
        if let Ok(Introspection::Inactive(reason)) = &outcome {
            tracing::debug!(
                integration = audience,
                reason = reason.as_str(),
                "device token inactive"
            );
        }
        outcome
    }

    async fn check(&self, token: &str, audience: &str) -> Result<Introspection, DeviceTokenError> {
        use InactiveReason as R;
        let inactive = |reason| Ok(Introspection::Inactive(reason));
        if token.len() > MAX_TOKEN_BYTES {
            return inactive(R::TooLarge);
        }
        let kid = match strict_header(token) {
            Ok(kid) => kid,
            Err(reason) => return inactive(reason),
        };
        let Some(key) = self.verifier(&kid).await? else {
            return inactive(R::UnknownKey);
        };
        let mut validation = Validation::new(Algorithm::ES256);
        validation.leeway = 0;
        // nbf is checked below, with room for clock skew between nodes; exp exactly.
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "nbf", "iss", "aud", "sub"]);
        validation.set_issuer(&[&self.inner.issuer]);
        validation.set_audience(&[audience]);
        let claims = match jsonwebtoken::decode::<DeviceTokenClaims>(token, &key, &validation) {
            Ok(data) => data.claims,
            Err(e) => return inactive(reason_of(&e)),
        };
        let now = crate::store::now().timestamp();
        let skew = i64::try_from(NBF_SKEW_SECS).unwrap_or(0);
        if claims.nbf > now.saturating_add(skew) {
            return inactive(R::NotYetValid);
        }
        let Some(standing) = self.inner.store.device_token_standing(&claims.jti).await? else {
            return inactive(R::UnknownToken);
        };
        if standing.kid != kid || standing.integration != claims.aud || standing.udid != claims.sub
        {
            return inactive(R::Mismatch);
        }
        if standing.status != crate::store::DEVICE_TOKEN_ACTIVE {
            return inactive(R::Revoked);
        }
        if standing.enrollment_status != EnrollmentStatus::Active {
            return inactive(R::EnrollmentRetired);
        }
        Ok(Introspection::Active(Box::new(ActiveDeviceToken {
            claims,
            kid,
            enrollment_id: standing.enrollment_id,
        })))
    }

    /// The published keys (next, current, retired with live tokens); makes the first keys if
    /// there are none. Built at most every few seconds per node.
    pub async fn jwks(&self) -> Result<Arc<Jwks>, DeviceTokenError> {
        if let Ok(cached) = self.inner.jwks.lock()
            && let Some((built, jwks)) = cached.as_ref()
            && built.elapsed() < JWKS_CACHE
        {
            return Ok(jwks.clone());
        }
        ensure_signing_keys(&self.inner.store, &self.inner.master).await?;
        let rows = self
            .inner
            .store
            .published_token_signing_keys(crate::store::now())
            .await?;
        let keys = rows
            .iter()
            .map(|row| {
                let mut jwk = public_jwk(row)?;
                jwk.kid = Some(row.kid.clone());
                jwk.use_ = Some("sig".into());
                jwk.alg = Some(row.algorithm.clone());
                Ok(jwk)
            })
            .collect::<Result<Vec<_>, DeviceTokenError>>()?;
        let jwks = Arc::new(Jwks { keys });
        if let Ok(mut cached) = self.inner.jwks.lock() {
            *cached = Some((Instant::now(), jwks.clone()));
        }
        Ok(jwks)
    }

    /// Every signing key, newest first.
    pub async fn signing_keys(&self) -> Result<Vec<SigningKeyInfo>, DeviceTokenError> {
        list_signing_keys(&self.inner.store).await
    }

    /// Rotates the signing keys (see [`rotate_signing_keys`]) and forgets this node's JWKS.
    pub async fn rotate(&self, force: bool) -> Result<Rotation, DeviceTokenError> {
        let rotation = rotate_signing_keys(&self.inner.store, &self.inner.master, force).await?;
        if let Ok(mut cached) = self.inner.jwks.lock() {
            *cached = None;
        }
        Ok(rotation)
    }

    /// Forgets tokens long expired, every hour until `shutdown`.
    /// Purges on the node holding `lease` (once for the cluster).
    pub fn spawn_purge(
        &self,
        lease: crate::cluster::Lease,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        let store = self.inner.store.clone();
        tokio::spawn(async move {
            loop {
                if !lease.take(PURGE_EVERY).await {
                    tokio::select! {
                        _ = tokio::time::sleep(PURGE_EVERY) => {}
                        _ = shutdown.changed() => {}
                    }
                    if *shutdown.borrow() {
                        break;
                    }
                    continue;
                }
                let before = crate::store::now() - chrono_duration(PURGE_AFTER);
                match store.purge_device_tokens(before).await {
                    Ok(0) => {}
                    Ok(purged) => tracing::info!(purged, "expired device tokens forgotten"),
                    Err(e) => tracing::warn!(error = %e, "purging expired device tokens failed"),
                }
                tokio::select! {
                    _ = tokio::time::sleep(PURGE_EVERY) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    break;
                }
            }
        })
    }

    fn stored(&self, row: DeviceTokenRow) -> Result<IssuedDeviceToken, DeviceTokenError> {
        let jwt = self
            .inner
            .master
            .open(&token_purpose(&row.jti), &row.token)?;
        let jwt =
            String::from_utf8(jwt).map_err(|_| DeviceTokenError::Seal(SealError::Malformed))?;
        Ok(IssuedDeviceToken {
            jwt,
            jti: row.jti,
            kid: row.kid,
            issued_at: row.issued_at,
            expires_at: row.expires_at,
            reused: true,
        })
    }

    /// SHA-256 over what a token says about the device and its owner: when it changes, the
    /// stored token no longer describes them and a new one is issued.
    fn claims_hash(&self, request: &DeviceTokenRequest<'_>, groups: &[String]) -> String {
        let described = serde_json::json!({
            "iss": self.inner.issuer,
            "sub": request.udid,
            "owner": request.owner_id,
            "email": request.owner_email,
            "groups": groups,
        });
        hex::encode(Sha256::digest(described.to_string().as_bytes()))
    }

    /// The current signing key, made at first use.
    async fn signing_key(&self) -> Result<SigningKey, DeviceTokenError> {
        let store = &self.inner.store;
        let row = match store.current_token_signing_key().await? {
            Some(row) => row,
            None => {
                ensure_signing_keys(store, &self.inner.master).await?;
                store
                    .current_token_signing_key()
                    .await?
                    .ok_or(DeviceTokenError::Store(StoreError::NotFound))?
            }
        };
        let pkcs8 = self
            .inner
            .master
            .open(&signing_key_purpose(&row.kid), &row.private_key)?;
        Ok(SigningKey {
            kid: row.kid,
            pkcs8,
        })
    }

    /// The public key named `kid`, if we made one.
    async fn verifier(&self, kid: &str) -> Result<Option<Arc<DecodingKey>>, DeviceTokenError> {
        if let Ok(cache) = self.inner.verifiers.lock()
            && let Some(key) = cache.get(kid)
        {
            return Ok(Some(key.clone()));
        }
        let Some(row) = self.inner.store.token_signing_key(kid).await? else {
            return Ok(None);
        };
        let jwk = public_jwk(&row)?;
        let key = DecodingKey::from_ec_components(&jwk.x, &jwk.y)
            .map_err(|_| DeviceTokenError::CorruptKey(row.kid.clone()))?;
        let key = Arc::new(key);
        if let Ok(mut cache) = self.inner.verifiers.lock() {
            cache.insert(row.kid, key.clone());
        }
        Ok(Some(key))
    }
}

/// A private signing key, opened.
struct SigningKey {
    kid: String,
    pkcs8: Vec<u8>,
}

fn sign(key: &SigningKey, claims: &DeviceTokenClaims) -> Result<String, DeviceTokenError> {
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some(key.kid.clone());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_ec_der(&key.pkcs8))
        .map_err(DeviceTokenError::Signing)
}

fn token_purpose(jti: &str) -> String {
    format!("device-token:{jti}")
}

fn signing_key_purpose(kid: &str) -> String {
    format!("token-signing-key:{kid}")
}

/// Whole seconds, capped far beyond any lifetime so that date arithmetic cannot overflow.
fn chrono_duration(duration: Duration) -> chrono::Duration {
    let capped = duration.min(MAX_LIFETIME * 4).as_secs();
    chrono::Duration::seconds(i64::try_from(capped).unwrap_or(0))
}

fn check_request(
    request: &DeviceTokenRequest<'_>,
    lifetime: Duration,
    refresh_before: Duration,
) -> Result<(), DeviceTokenError> {
    let invalid = |message: String| Err(DeviceTokenError::Invalid(message));
    let plain = |text: &str| {
        !text.is_empty() && text.len() <= MAX_FIELD_BYTES && !text.chars().any(char::is_control)
    };
    if request.integration.is_empty()
        || request.integration.len() > 128
        || !request.integration.bytes().all(|b| b.is_ascii_graphic())
    {
        return invalid("the integration is 1 to 128 printable ASCII characters".into());
    }
    for (what, value) in [
        ("enrollment ID", Some(request.enrollment_id)),
        ("UDID", Some(request.udid)),
        ("owner ID", request.owner_id),
        ("owner email", request.owner_email),
    ] {
        if let Some(value) = value
            && !plain(value)
        {
            return invalid(format!(
                "the {what} is 1 to {MAX_FIELD_BYTES} bytes without control characters"
            ));
        }
    }
    if request.groups.len() > MAX_GROUPS {
        return invalid(format!("at most {MAX_GROUPS} groups go into a token"));
    }
    if let Some(bad) = request.groups.iter().find(|g| !plain(g)) {
        return invalid(format!(
            "group '{}' is not 1 to {MAX_FIELD_BYTES} bytes without control characters",
            crate::audit::truncated(bad, 64)
        ));
    }
    if lifetime < Duration::from_secs(1) || lifetime > MAX_LIFETIME {
        return invalid(format!(
            "a token lives 1 s to {} days",
            MAX_LIFETIME.as_secs() / 86_400
        ));
    }
    if refresh_before >= lifetime {
        return invalid(format!(
            "refresh_before ({} s) must be shorter than the lifetime ({} s), or every pass \
             would issue a new token",
            refresh_before.as_secs(),
            lifetime.as_secs()
        ));
    }
    Ok(())
}

/// Reads a token's header as strictly as we write it: three base64url parts, `alg` ES256, a
/// `kid`, `typ` JWT if present, no `crit`. Returns the kid.
fn strict_header(token: &str) -> Result<String, InactiveReason> {
    #[derive(Deserialize)]
    struct RawHeader {
        alg: String,
        kid: Option<String>,
        typ: Option<String>,
        crit: Option<serde_json::Value>,
    }
    let mut parts = token.split('.');
    let (Some(header), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(InactiveReason::Malformed);
    };
    let bytes = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| InactiveReason::Malformed)?;
    let header: RawHeader =
        serde_json::from_slice(&bytes).map_err(|_| InactiveReason::Malformed)?;
    if header.alg != ALGORITHM {
        return Err(InactiveReason::Algorithm);
    }
    if header.crit.is_some()
        || header
            .typ
            .as_deref()
            .is_some_and(|t| !t.eq_ignore_ascii_case("JWT"))
    {
        return Err(InactiveReason::Malformed);
    }
    match header.kid {
        Some(kid) if !kid.is_empty() && kid.len() <= 128 => Ok(kid),
        _ => Err(InactiveReason::UnknownKey),
    }
}

fn reason_of(error: &jsonwebtoken::errors::Error) -> InactiveReason {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::InvalidSignature => InactiveReason::Signature,
        ErrorKind::ExpiredSignature => InactiveReason::Expired,
        ErrorKind::ImmatureSignature => InactiveReason::NotYetValid,
        ErrorKind::InvalidIssuer => InactiveReason::Issuer,
        ErrorKind::InvalidAudience => InactiveReason::Audience,
        ErrorKind::InvalidAlgorithm | ErrorKind::UnsupportedAlgorithm => InactiveReason::Algorithm,
        _ => InactiveReason::Malformed,
    }
}

fn public_jwk(row: &TokenSigningKeyRow) -> Result<PublicJwk, DeviceTokenError> {
    serde_json::from_str(&row.public_jwk).map_err(|_| DeviceTokenError::CorruptKey(row.kid.clone()))
}

/// A fresh P-256 key: its kid (the RFC 7638 thumbprint of its public JWK), public JWK, and
/// private key sealed for `status`.
fn generate_key(
    master: &MasterKey,
    status: SigningKeyStatus,
) -> Result<NewTokenSigningKey, DeviceTokenError> {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
        .map_err(|_| DeviceTokenError::KeyGeneration)?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .map_err(|_| DeviceTokenError::KeyGeneration)?;
    // An uncompressed P-256 point: 0x04 ‖ x (32 bytes) ‖ y (32 bytes).
    let point = pair.public_key().as_ref();
    let (Some(x), Some(y)) = (point.get(1..33), point.get(33..65)) else {
        return Err(DeviceTokenError::KeyGeneration);
    };
    let jwk = PublicJwk {
        kty: "EC".into(),
        crv: "P-256".into(),
        x: URL_SAFE_NO_PAD.encode(x),
        y: URL_SAFE_NO_PAD.encode(y),
        kid: None,
        use_: None,
        alg: None,
    };
    let kid = thumbprint(&jwk);
    let public_jwk = serde_json::to_string(&jwk).map_err(|_| DeviceTokenError::KeyGeneration)?;
    Ok(NewTokenSigningKey {
        private_key: master.seal(&signing_key_purpose(&kid), pkcs8.as_ref()),
        kid,
        algorithm: ALGORITHM,
        public_jwk,
        status,
    })
}

/// The RFC 7638 JWK thumbprint (SHA-256, base64url): the required members in lexicographic
/// order, no whitespace.
fn thumbprint(jwk: &PublicJwk) -> String {
    let canonical = format!(
        r#"{{"crv":"{}","kty":"{}","x":"{}","y":"{}"}}"#,
        jwk.crv, jwk.kty, jwk.x, jwk.y
    );
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// Makes the first signing keys (a current and a next one) unless there are keys already.
pub async fn ensure_signing_keys(
    store: &Store,
    master: &MasterKey,
) -> Result<(), DeviceTokenError> {
    if store.current_token_signing_key().await?.is_some() {
        return Ok(());
    }
    let current = generate_key(master, SigningKeyStatus::Current)?;
    let next = generate_key(master, SigningKeyStatus::Next)?;
    if store
        .insert_first_token_signing_keys(&current, &next, crate::store::now())
        .await?
    {
        tracing::info!(current = %current.kid, next = %next.kid, "device token signing keys created");
    }
    Ok(())
}

/// Every signing key, newest first, and whether the JWKS publishes it.
pub async fn list_signing_keys(store: &Store) -> Result<Vec<SigningKeyInfo>, DeviceTokenError> {
    let published: std::collections::HashSet<String> = store
        .published_token_signing_keys(crate::store::now())
        .await?
        .into_iter()
        .map(|row| row.kid)
        .collect();
    Ok(store
        .token_signing_keys()
        .await?
        .into_iter()
        .map(|row| SigningKeyInfo {
            published: published.contains(&row.kid),
            kid: row.kid,
            algorithm: row.algorithm,
            status: row.status,
            created_at: row.created_at,
            activated_at: row.activated_at,
            retired_at: row.retired_at,
        })
        .collect())
}

/// Rotates the signing keys: the next key (published since the last rotation) signs from now
/// on, the current one retires (published until its tokens expire), and a new next key is
/// published. Refused while the next key is younger than [`JWKS_MAX_AGE`] unless `force`.
/// Makes the first keys if there are none, and rotates them.
pub async fn rotate_signing_keys(
    store: &Store,
    master: &MasterKey,
    force: bool,
) -> Result<Rotation, DeviceTokenError> {
    ensure_signing_keys(store, master).await?;
    let keys = store.token_signing_keys().await?;
    let find = |status| keys.iter().find(|k| k.status == status);
    let (Some(current), Some(next)) = (
        find(SigningKeyStatus::Current),
        find(SigningKeyStatus::Next),
    ) else {
        return Err(DeviceTokenError::Store(StoreError::Conflict(
            "there is no current and next signing key to rotate (a rotation in progress?)".into(),
        )));
    };
    let now = crate::store::now();
    let published_secs = u64::try_from((now - next.created_at).num_seconds()).unwrap_or(0);
    if !force && published_secs < JWKS_MAX_AGE.as_secs() {
        return Err(DeviceTokenError::NextKeyTooNew {
            published_secs,
            wait_secs: JWKS_MAX_AGE.as_secs() - published_secs,
        });
    }
    let new_next = generate_key(master, SigningKeyStatus::Next)?;
    store
        .rotate_token_signing_keys(&current.kid, &next.kid, &new_next, now)
        .await?;
    tracing::info!(retired = %current.kid, current = %next.kid, next = %new_next.kid,
        "device token signing keys rotated");
    Ok(Rotation {
        retired: current.kid.clone(),
        current: next.kid.clone(),
        next: new_next.kid,
    })
}

/// jsonwebtoken's crypto, from ring, for ES256 alone: any other algorithm is refused when a
/// signer or verifier is asked for, whatever the token's header says.
mod ring_es256 {
    use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
    use jsonwebtoken::errors::{ErrorKind, Result};
    use jsonwebtoken::jwk::{EllipticCurve, ThumbprintHash};
    use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};
    use ring::rand::SystemRandom;
    use ring::signature::{
        ECDSA_P256_SHA256_FIXED, ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, UnparsedPublicKey,
    };

    static PROVIDER: CryptoProvider = CryptoProvider {
        signer_factory,
        verifier_factory,
        key_utils: KeyUtils {
            rsa_pub_components_from_private_key: |_| Err(ErrorKind::UnsupportedAlgorithm.into()),
            rsa_pub_components_from_public_key: |_| Err(ErrorKind::UnsupportedAlgorithm.into()),
            ec_pub_components_from_private_key: ec_components_unsupported,
            ed_pub_components_from_private_key: |_, _| Err(ErrorKind::UnsupportedAlgorithm.into()),
            compute_digest,
        },
    };

    /// Installs the provider for this process (once; a provider installed earlier stays).
    pub(super) fn install() {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        INSTALL.call_once(|| {
            if CryptoProvider::install_default(&PROVIDER).is_err() {
                tracing::debug!("a jsonwebtoken crypto provider was installed before ours");
            }
        });
    }

    fn ec_components_unsupported(
        _: &[u8],
        _: Algorithm,
    ) -> Result<(EllipticCurve, Vec<u8>, Vec<u8>)> {
        Err(ErrorKind::UnsupportedAlgorithm.into())
    }

    fn compute_digest(data: &[u8], hash: ThumbprintHash) -> Result<Vec<u8>> {
        let algorithm = match hash {
            ThumbprintHash::SHA256 => &ring::digest::SHA256,
            ThumbprintHash::SHA384 => &ring::digest::SHA384,
            ThumbprintHash::SHA512 => &ring::digest::SHA512,
            _ => return Err(ErrorKind::UnsupportedAlgorithm.into()),
        };
        Ok(ring::digest::digest(algorithm, data).as_ref().to_vec())
    }

    fn signer_factory(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
        if *algorithm != Algorithm::ES256 {
            return Err(ErrorKind::UnsupportedAlgorithm.into());
        }
        let pair = EcdsaKeyPair::from_pkcs8(
            &ECDSA_P256_SHA256_FIXED_SIGNING,
            key.as_bytes(),
            &SystemRandom::new(),
        )
        .map_err(|_| ErrorKind::InvalidEcdsaKey)?;
        Ok(Box::new(Signer(pair)))
    }

    fn verifier_factory(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
        if *algorithm != Algorithm::ES256 {
            return Err(ErrorKind::UnsupportedAlgorithm.into());
        }
        Ok(Box::new(Verifier(key.try_get_as_bytes()?.to_vec())))
    }

    struct Signer(EcdsaKeyPair);

    impl signature::Signer<Vec<u8>> for Signer {
        fn try_sign(&self, message: &[u8]) -> std::result::Result<Vec<u8>, signature::Error> {
            self.0
                .sign(&SystemRandom::new(), message)
                .map(|s| s.as_ref().to_vec())
                .map_err(|_| signature::Error::new())
        }
    }

    impl JwtSigner for Signer {
        fn algorithm(&self) -> Algorithm {
            Algorithm::ES256
        }
    }

    /// An uncompressed P-256 point.
    struct Verifier(Vec<u8>);

    impl signature::Verifier<Vec<u8>> for Verifier {
        fn verify(
            &self,
            message: &[u8],
            signature: &Vec<u8>,
        ) -> std::result::Result<(), signature::Error> {
            UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &self.0)
                .verify(message, signature)
                .map_err(|_| signature::Error::new())
        }
    }

    impl JwtVerifier for Verifier {
        fn algorithm(&self) -> Algorithm {
            Algorithm::ES256
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thumbprint_matches_rfc_7638_shape() {
        let jwk = PublicJwk {
            kty: "EC".into(),
            crv: "P-256".into(),
            x: "x".into(),
            y: "y".into(),
            kid: None,
            use_: None,
            alg: None,
        };
        let expected = URL_SAFE_NO_PAD.encode(Sha256::digest(
            br#"{"crv":"P-256","kty":"EC","x":"x","y":"y"}"#,
        ));
        assert_eq!(thumbprint(&jwk), expected);
    }

    #[test]
    fn headers_other_than_ours_are_refused_before_any_key_is_looked_up() {
        let b64 = |s: &str| URL_SAFE_NO_PAD.encode(s);
        let token = |h: &str| format!("{}.{}.sig", b64(h), b64("{}"));
        assert_eq!(
            strict_header(&token(r#"{"alg":"ES256","kid":"k"}"#)),
            Ok("k".into())
        );
        assert_eq!(
            strict_header(&token(r#"{"alg":"none","kid":"k"}"#)),
            Err(InactiveReason::Algorithm)
        );
        assert_eq!(
            strict_header(&token(r#"{"alg":"HS256","kid":"k"}"#)),
            Err(InactiveReason::Algorithm)
        );
        assert_eq!(
            strict_header(&token(r#"{"alg":"ES256"}"#)),
            Err(InactiveReason::UnknownKey)
        );
        assert_eq!(
            strict_header(&token(r#"{"alg":"ES256","kid":"k","crit":["b64"]}"#)),
            Err(InactiveReason::Malformed)
        );
        assert_eq!(strict_header("a.b"), Err(InactiveReason::Malformed));
        assert_eq!(strict_header("a.b.c.d"), Err(InactiveReason::Malformed));
    }

    #[test]
    fn the_ring_provider_signs_and_verifies_es256_only() {
        ring_es256::install();
        let master = MasterKey::from_bytes(&[3; 32]);
        let new = generate_key(&master, SigningKeyStatus::Current).unwrap();
        let pkcs8 = master
            .open(&signing_key_purpose(&new.kid), &new.private_key)
            .unwrap();
        let key = SigningKey {
            kid: new.kid.clone(),
            pkcs8,
        };
        let now = chrono::Utc::now().timestamp();
        let claims = DeviceTokenClaims {
            iss: "https://broker".into(),
            aud: "pingid".into(),
            sub: "UDID".into(),
            owner: Some("u1".into()),
            email: None,
            groups: vec!["corp:staff".into()],
            iat: now,
            nbf: now,
            exp: now + 60,
            jti: "j".into(),
        };
        let jwt = sign(&key, &claims).unwrap();
        let jwk: PublicJwk = serde_json::from_str(&new.public_jwk).unwrap();
        let decoding = DecodingKey::from_ec_components(&jwk.x, &jwk.y).unwrap();
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_audience(&["pingid"]);
        let decoded = jsonwebtoken::decode::<DeviceTokenClaims>(&jwt, &decoding, &validation)
            .unwrap()
            .claims;
        assert_eq!(decoded, claims);
        let header = jsonwebtoken::decode_header(&jwt).unwrap();
        assert_eq!(header.kid.as_deref(), Some(new.kid.as_str()));
        assert_eq!(header.typ.as_deref(), Some("JWT"));

        // Another algorithm cannot be had from the provider, for signing or verifying.
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"secret").unwrap(),
        );
        assert!(hs.is_err());
        let mut tampered = jwt.clone();
        tampered.pop();
        tampered.push(if jwt.ends_with('A') { 'B' } else { 'A' });
        assert!(
            jsonwebtoken::decode::<DeviceTokenClaims>(&tampered, &decoding, &validation).is_err()
        );
    }

    #[test]
    fn requests_are_bounded() {
        let groups = vec!["corp:staff".to_string()];
        let ok = DeviceTokenRequest {
            integration: "pingid",
            enrollment_id: "e1",
            udid: "U1",
            owner_id: Some("u1"),
            owner_email: Some("a@example.org"),
            groups: &groups,
            lifetime: None,
        };
        let day = Duration::from_secs(86_400);
        assert!(check_request(&ok, DEFAULT_LIFETIME, day).is_ok());
        assert!(
            check_request(&ok, day, day).is_err(),
            "refresh window >= lifetime"
        );
        assert!(check_request(&ok, MAX_LIFETIME + day, day).is_err());
        let spaced = DeviceTokenRequest {
            integration: "ping id",
            ..ok
        };
        assert!(check_request(&spaced, DEFAULT_LIFETIME, day).is_err());
        let many: Vec<String> = (0..=MAX_GROUPS).map(|i| format!("corp:{i}")).collect();
        let crowded = DeviceTokenRequest {
            groups: &many,
            ..ok
        };
        assert!(check_request(&crowded, DEFAULT_LIFETIME, day).is_err());
    }
}
