//! Admin API keys: issuing, verifying, revoking.
//!
//! A key reads `tbk_<id>_<secret>`: `id` (12 hex digits) finds the row, `secret` (32 random
//! bytes, base64url) is checked against the stored SHA-256 in constant time. Keys are shown once,
//! at creation, and never stored.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::scope::{self, Scope};
use crate::store::{AdminKeyRecord, NewAdminKey, Store, StoreError};

const PREFIX: &str = "tbk_";
/// `last_used_at` is refreshed at most this often, so that reading with a key is not a write.
const TOUCH_INTERVAL: Duration = Duration::seconds(60);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error(
        "invalid key name '{0}': use 1 to 64 letters, digits, '.', '-' or '_', starting with a letter or digit"
    )]
    InvalidName(String),
    #[error(transparent)]
    UnknownScope(#[from] scope::UnknownScope),
    #[error("no active admin key named '{0}'")]
    NotFound(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for KeyError {
    fn from(err: StoreError) -> Self {
        KeyError::Store(err)
    }
}

/// Why a presented key was not accepted. Each reason is logged; clients only ever see 401.
#[derive(Debug, thiserror::Error)]
pub enum AuthFailure {
    #[error("malformed key")]
    Malformed,
    #[error("unknown key id")]
    UnknownId,
    #[error("wrong secret")]
    WrongSecret,
    #[error("key '{0}' is revoked")]
    Revoked(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// An authenticated caller of the admin API.
#[derive(Clone, Debug)]
pub struct Principal {
    pub key_id: String,
    pub name: String,
    pub scopes: Vec<Scope>,
}

impl Principal {
    /// How audit records name this caller.
    pub fn actor(&self) -> String {
        format!("key:{}", self.name)
    }
}

/// A freshly created key; `key` is the only copy of the secret there will ever be.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct IssuedKey {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub key: String,
}

/// A key as listed (no secret, no hash).
#[derive(Debug, Serialize, utoipa::ToSchema)]
#[schema(as = AdminKey)]
pub struct KeySummary {
    pub id: String,
    pub name: String,
    pub scopes: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub created_by: String,
    pub last_used_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl From<AdminKeyRecord> for KeySummary {
    fn from(r: AdminKeyRecord) -> Self {
        KeySummary {
            id: r.id,
            name: r.name,
            scopes: r.scopes.split_whitespace().map(String::from).collect(),
            created_at: r.created_at,
            created_by: r.created_by,
            last_used_at: r.last_used_at,
            revoked_at: r.revoked_at,
        }
    }
}

/// Parses scope names given by an operator; none means `admin`.
pub fn parse_scopes<S: AsRef<str>>(names: &[S]) -> Result<Vec<Scope>, KeyError> {
    let mut scopes = names
        .iter()
        .map(|n| n.as_ref().trim().parse::<Scope>())
        .collect::<Result<Vec<_>, _>>()?;
    if scopes.is_empty() {
        scopes.push(Scope::Admin);
    }
    scopes.sort();
    scopes.dedup();
    Ok(scopes)
}

pub async fn create(
    store: &Store,
    name: &str,
    scopes: &[Scope],
    created_by: &str,
) -> Result<IssuedKey, KeyError> {
    validate_name(name)?;
    let id = hex::encode(crate::random::bytes::<6>());
    let secret = URL_SAFE_NO_PAD.encode(crate::random::bytes::<32>());
    let secret_hash = hash_secret(&secret);
    let stored_scopes = scope::to_stored(scopes);
    store
        .insert_admin_key(NewAdminKey {
            id: &id,
            name,
            secret_hash: &secret_hash,
            scopes: &stored_scopes,
            created_by,
            created_at: crate::store::now(),
        })
        .await?;
    Ok(IssuedKey {
        key: format!("{PREFIX}{id}_{secret}"),
        id,
        name: name.to_string(),
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
    })
}

pub async fn list(store: &Store) -> Result<Vec<KeySummary>, KeyError> {
    Ok(store
        .list_admin_keys()
        .await?
        .into_iter()
        .map(KeySummary::from)
        .collect())
}

/// Revokes the active key called `name`, returning its id.
pub async fn revoke(store: &Store, name: &str) -> Result<String, KeyError> {
    match store.revoke_admin_key(name, crate::store::now()).await {
        Ok(id) => Ok(id),
        Err(StoreError::NotFound) => Err(KeyError::NotFound(name.to_string())),
        Err(e) => Err(e.into()),
    }
}

/// Checks a presented key. The id is public (it names the key in logs and audit records);
/// only the secret is compared, in constant time.
pub async fn authenticate(store: &Store, presented: &str) -> Result<Principal, AuthFailure> {
    let (id, secret) = split_key(presented).ok_or(AuthFailure::Malformed)?;
    let record = store
        .admin_key_by_id(id)
        .await?
        .ok_or(AuthFailure::UnknownId)?;
    let presented_hash = hash_secret(secret);
    if !bool::from(
        presented_hash
            .as_bytes()
            .ct_eq(record.secret_hash.as_bytes()),
    ) {
        return Err(AuthFailure::WrongSecret);
    }
    if record.revoked_at.is_some() {
        return Err(AuthFailure::Revoked(record.name));
    }
    let now = crate::store::now();
    if record
        .last_used_at
        .is_none_or(|last| now - last > TOUCH_INTERVAL)
    {
        // Best effort: a failed refresh must not refuse an otherwise valid key.
        if let Err(e) = store.touch_admin_key(&record.id, now).await {
            tracing::warn!(error = %e, key = %record.name, "could not record admin key use");
        }
    }
    Ok(Principal {
        key_id: record.id,
        name: record.name,
        scopes: scope::parse_stored(&record.scopes),
    })
}

/// The key id of a presented key, if it is well-formed (for audit records of refusals).
pub fn key_id_of(presented: &str) -> Option<&str> {
    split_key(presented).map(|(id, _)| id)
}

fn split_key(presented: &str) -> Option<(&str, &str)> {
    let rest = presented.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id_ok = id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let secret_ok = !secret.is_empty() && secret.len() <= 64;
    (id_ok && secret_ok).then_some((id, secret))
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

pub fn validate_name(name: &str) -> Result<(), KeyError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_alphanumeric())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(KeyError::InvalidName(name.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_split_into_id_and_secret() {
        assert_eq!(
            split_key("tbk_0123456789ab_c2VjcmV0"),
            Some(("0123456789ab", "c2VjcmV0"))
        );
        for bad in [
            "",
            "tbk_",
            "tbk_0123456789ab",
            "tbk_0123456789ab_",
            "tbk_xyz_secret",
            "Bearer tbk_0123456789ab_s",
        ] {
            assert_eq!(split_key(bad), None, "{bad}");
        }
    }

    #[test]
    fn names_are_restricted() {
        assert!(validate_name("ci-deploy_1.prod").is_ok());
        for bad in ["", "-lead", "has space", "semi;colon", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn scopes_default_to_admin_and_are_deduplicated() {
        assert_eq!(parse_scopes::<&str>(&[]).unwrap(), vec![Scope::Admin]);
        assert_eq!(
            parse_scopes(&["audit:read", "audit:read"]).unwrap(),
            vec![Scope::AuditRead]
        );
        assert!(parse_scopes(&["root"]).is_err());
    }
}
