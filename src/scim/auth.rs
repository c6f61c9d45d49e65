//! SCIM client credentials: `tbs_<id>_<secret>`, bound to one identity provider. Like admin
//! keys, only the SHA-256 of the secret is stored and it is compared in constant time; a SCIM
//! token is good for `/scim/v2` only (admin keys are not accepted there, nor it elsewhere).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, OriginalUri};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chrono::Duration;
use serde::Serialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::error::ScimError;
use crate::audit;
use crate::http::AppState;
use crate::http::observe::REQUEST_ID_HEADER;
use crate::store::{NewAuditEntry, ScimClientRecord, Store, StoreError};

const PREFIX: &str = "tbs_";
/// `last_used_at` is refreshed at most this often, so that a read is not a write.
const TOUCH_INTERVAL: Duration = Duration::seconds(60);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "invalid client name '{0}': use 1 to 64 letters, digits, '.', '-' or '_', starting with a letter or digit"
    )]
    InvalidName(String),
    #[error("no active SCIM client with id '{0}'")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A freshly created client; `token` is the only copy of the secret there will ever be.
#[derive(Debug, Serialize)]
pub struct IssuedClient {
    pub id: String,
    pub provider: String,
    pub name: String,
    pub token: String,
}

/// Creates a client of `provider` (the caller checks that the provider is configured).
pub async fn create(
    store: &Store,
    provider: &str,
    name: &str,
    created_by: &str,
) -> Result<IssuedClient, ClientError> {
    crate::admin::keys::validate_name(name)
        .map_err(|_| ClientError::InvalidName(name.to_string()))?;
    let id = hex::encode(crate::random::bytes::<6>());
    let secret = URL_SAFE_NO_PAD.encode(crate::random::bytes::<32>());
    store
        .insert_scim_client(&ScimClientRecord {
            id: id.clone(),
            provider: provider.to_string(),
            name: name.to_string(),
            secret_hash: hash_secret(&secret),
            created_at: crate::store::now(),
            created_by: created_by.to_string(),
            last_used_at: None,
            revoked_at: None,
        })
        .await?;
    Ok(IssuedClient {
        token: format!("{PREFIX}{id}_{secret}"),
        id,
        provider: provider.to_string(),
        name: name.to_string(),
    })
}

/// Revokes the active client `id`.
pub async fn revoke(store: &Store, id: &str) -> Result<ScimClientRecord, ClientError> {
    match store.revoke_scim_client(id).await {
        Ok(record) => Ok(record),
        Err(StoreError::NotFound) => Err(ClientError::NotFound(id.to_string())),
        Err(e) => Err(e.into()),
    }
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

fn split_token(presented: &str) -> Option<(&str, &str)> {
    let rest = presented.strip_prefix(PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let id_ok = id.len() == 12 && id.bytes().all(|b| b.is_ascii_hexdigit());
    let secret_ok = !secret.is_empty() && secret.len() <= 64;
    (id_ok && secret_ok).then_some((id, secret))
}

/// Why a presented token was refused (logged and audited; the client only sees 401).
#[derive(Debug, thiserror::Error)]
enum Refusal {
    #[error("malformed token")]
    Malformed,
    #[error("unknown client id")]
    UnknownId,
    #[error("wrong secret")]
    WrongSecret,
    #[error("client is revoked")]
    Revoked,
}

/// Proof that the request carries a valid token of an active SCIM client: every `/scim/v2`
/// handler takes one, and everything it touches is scoped to `provider`.
pub struct ScimClient {
    pub id: String,
    pub name: String,
    pub provider: String,
    request_id: Option<String>,
    source: Option<String>,
}

impl ScimClient {
    /// Records a change made by this client in the audit log.
    pub async fn audit(
        &self,
        state: &AppState,
        action: &str,
        target: Option<&str>,
        detail: serde_json::Value,
    ) {
        let entry = NewAuditEntry {
            actor: format!("scim:{}:{}", self.provider, self.name),
            action: action.to_string(),
            outcome: audit::OUTCOME_SUCCESS.to_string(),
            target: target.map(str::to_string),
            detail: Some(detail.to_string()),
            request_id: self.request_id.clone(),
            source: self.source.clone(),
        };
        audit::record(&state.store, entry).await;
    }
}

impl FromRequestParts<AppState> for ScimClient {
    type Rejection = ScimError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ScimError> {
        let request_id = parts
            .headers
            .get(&REQUEST_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .map(|id| audit::truncated(id, 128));
        let source = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|ConnectInfo(addr)| addr.ip().to_string());
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        // No token: nothing was attempted in anyone's name, so nothing to audit.
        let Some(presented) = presented else {
            return Err(ScimError::unauthorized());
        };
        let record = match check(&state.store, presented).await {
            Ok(record) => record,
            Err(Ok(refusal)) => {
                tracing::info!(reason = %refusal, "SCIM client token refused");
                let path = parts.extensions.get::<OriginalUri>().map_or_else(
                    || parts.uri.path().to_string(),
                    |uri| uri.path().to_string(),
                );
                let actor = split_token(presented)
                    .map(|(id, _)| format!("scim-client-id:{id}"))
                    .unwrap_or_else(|| "anonymous".into());
                let entry = NewAuditEntry {
                    actor,
                    action: format!(
                        "{} {}",
                        parts.method,
                        audit::truncated(&path, audit::MAX_UNAUTHENTICATED_FIELD)
                    ),
                    outcome: audit::OUTCOME_DENIED.to_string(),
                    detail: Some(serde_json::json!({"reason": refusal.to_string()}).to_string()),
                    request_id,
                    source,
                    ..Default::default()
                };
                // The caller proved nothing: what it can make us write is bounded.
                audit::record_unauthenticated(&state.store, &state.audit_budget, entry).await;
                return Err(ScimError::new(
                    axum::http::StatusCode::UNAUTHORIZED,
                    None,
                    "the SCIM client token is not valid (unknown, wrong or revoked)",
                ));
            }
            Err(Err(e)) => return Err(e.into()),
        };
        Ok(ScimClient {
            id: record.id,
            name: record.name,
            provider: record.provider,
            request_id,
            source,
        })
    }
}

/// Checks a presented token: the id finds the client, the secret is compared in constant time.
async fn check(
    store: &Store,
    presented: &str,
) -> Result<ScimClientRecord, Result<Refusal, StoreError>> {
    let (id, secret) = split_token(presented).ok_or(Ok(Refusal::Malformed))?;
    let record = store
        .scim_client(id)
        .await
        .map_err(Err)?
        .ok_or(Ok(Refusal::UnknownId))?;
    let presented_hash = hash_secret(secret);
    if !bool::from(
        presented_hash
            .as_bytes()
            .ct_eq(record.secret_hash.as_bytes()),
    ) {
        return Err(Ok(Refusal::WrongSecret));
    }
    if record.revoked_at.is_some() {
        return Err(Ok(Refusal::Revoked));
    }
    let now = crate::store::now();
    if record
        .last_used_at
        .is_none_or(|last| now - last > TOUCH_INTERVAL)
        && let Err(e) = store.touch_scim_client(&record.id, now).await
    {
        // Best effort: a failed refresh must not refuse an otherwise valid token.
        tracing::warn!(error = %e, client = %record.id, "could not record SCIM client use");
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_split_into_id_and_secret() {
        assert_eq!(
            split_token("tbs_0123456789ab_c2VjcmV0"),
            Some(("0123456789ab", "c2VjcmV0"))
        );
        for bad in [
            "",
            "tbs_",
            "tbk_0123456789ab_s",
            "tbs_0123456789ab_",
            "tbs_xyz_s",
        ] {
            assert_eq!(split_token(bad), None, "{bad}");
        }
    }
}
