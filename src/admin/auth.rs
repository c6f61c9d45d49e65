//! The admin API's authentication: `Authorization: Bearer <key>`, checked per request.
//!
//! A handler declares the scope it needs in its signature, `Admin<scope::AuditRead>`, so no
//! route can forget the check: without a valid key the handler is never called (401), and
//! without the scope neither (403). Refusals of presented keys are audited.

use std::marker::PhantomData;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, FromRequestParts, OriginalUri};
use axum::http::header::AUTHORIZATION;
use axum::http::request::Parts;

use super::keys::{self, AuthFailure, Principal};
use super::scope::Scope;
use crate::audit;
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::observe::REQUEST_ID_HEADER;
use crate::store::NewAuditEntry;

/// A scope requirement, named as a type so that it can appear in a handler's signature.
pub trait Required: Send + Sync + 'static {
    /// `None`: any valid key will do.
    const SCOPE: Option<Scope>;
}

macro_rules! required_scopes {
    ($($name:ident => $scope:expr),* $(,)?) => {
        $(
            pub struct $name;
            impl Required for $name {
                const SCOPE: Option<Scope> = $scope;
            }
        )*
    };
}

required_scopes! {
    AnyKey => None,
    AuditRead => Some(Scope::AuditRead),
    AdminKeysRead => Some(Scope::AdminKeysRead),
    AdminKeysWrite => Some(Scope::AdminKeysWrite),
    ScepChallenge => Some(Scope::ScepChallenge),
    CertificatesRead => Some(Scope::CertificatesRead),
    CertificatesWrite => Some(Scope::CertificatesWrite),
    DevicesRead => Some(Scope::DevicesRead),
    CommandsWrite => Some(Scope::CommandsWrite),
    PushCertWrite => Some(Scope::PushCertWrite),
    UsersRead => Some(Scope::UsersRead),
    PoliciesRead => Some(Scope::PoliciesRead),
    PoliciesWrite => Some(Scope::PoliciesWrite),
    TokensRead => Some(Scope::TokensRead),
    TokensWrite => Some(Scope::TokensWrite),
    TokensReveal => Some(Scope::TokensReveal),
    ScimAdmin => Some(Scope::ScimAdmin),
}

/// Where a request came from, for audit records.
#[derive(Clone, Debug, Default)]
pub struct RequestOrigin {
    pub request_id: Option<String>,
    pub source: Option<String>,
}

impl RequestOrigin {
    fn of(parts: &Parts) -> Self {
        RequestOrigin {
            request_id: parts
                .headers
                .get(&REQUEST_ID_HEADER)
                .and_then(|v| v.to_str().ok())
                // A client may bring its own request id: bounded like anything it sends.
                .map(|id| audit::truncated(id, 128)),
            source: parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|ConnectInfo(addr)| addr.ip().to_string()),
        }
    }

    /// An audit entry for `actor` doing `action`, from this origin.
    pub fn entry(&self, actor: &str, action: &str, outcome: &str) -> NewAuditEntry {
        NewAuditEntry {
            actor: actor.to_string(),
            action: action.to_string(),
            outcome: outcome.to_string(),
            request_id: self.request_id.clone(),
            source: self.source.clone(),
            ..Default::default()
        }
    }
}

/// Proof that the request carries a valid, unrevoked key holding scope `S`.
pub struct Admin<S: Required> {
    pub principal: Principal,
    pub origin: RequestOrigin,
    _scope: PhantomData<S>,
}

impl<S: Required> Admin<S> {
    /// Records a successful (or failed) action by this caller.
    pub async fn audit(
        &self,
        state: &AppState,
        action: &str,
        target: Option<&str>,
        outcome: &str,
        detail: Option<serde_json::Value>,
    ) {
        let mut entry = self.origin.entry(&self.principal.actor(), action, outcome);
        entry.target = target.map(str::to_string);
        entry.detail = detail.map(|d| d.to_string());
        audit::record(&state.store, entry).await;
    }
}

impl<S: Required> FromRequestParts<AppState> for Admin<S> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let origin = RequestOrigin::of(parts);
        // Nested routers see a shortened URI; the audit record wants the one the client sent.
        let path = parts.extensions.get::<OriginalUri>().map_or_else(
            || parts.uri.path().to_string(),
            |uri| uri.path().to_string(),
        );
        // The path is the client's choice: kept to a bounded length.
        let action = format!(
            "{} {}",
            parts.method,
            audit::truncated(&path, audit::MAX_UNAUTHENTICATED_FIELD)
        );
        let presented = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            })
            .map(str::trim);
        // A request without any key is not audited: nothing was attempted in anyone's name.
        let Some(presented) = presented else {
            return Err(ApiError::unauthorized(
                "an admin key is required: send 'Authorization: Bearer <key>' \
                 (create one with 'trustbroker admin-key create --name NAME')",
            ));
        };
        let principal = match keys::authenticate(&state.store, presented).await {
            Ok(principal) => principal,
            Err(AuthFailure::Store(e)) => return Err(e.into()),
            Err(failure) => {
                tracing::info!(reason = %failure, "admin key refused");
                // Only a revoked key proved who it was; otherwise name just the id it claimed.
                let actor = match &failure {
                    AuthFailure::Revoked(name) => format!("key:{name}"),
                    _ => keys::key_id_of(presented)
                        .map(|id| format!("key-id:{id}"))
                        .unwrap_or_else(|| "anonymous".into()),
                };
                let mut entry = origin.entry(&actor, &action, audit::OUTCOME_DENIED);
                entry.detail = Some(serde_json::json!({"reason": failure.to_string()}).to_string());
                // The caller proved nothing: what it can make us write is bounded.
                audit::record_unauthenticated(&state.store, &state.audit_budget, entry).await;
                return Err(ApiError::unauthorized(
                    "the admin key is not valid (unknown, wrong or revoked)",
                ));
            }
        };
        if let Some(required) = S::SCOPE
            && !required.is_granted_by(&principal.scopes)
        {
            let mut entry = origin.entry(&principal.actor(), &action, audit::OUTCOME_DENIED);
            entry.detail = Some(
                serde_json::json!({"reason": "missing scope", "required": required.as_str()})
                    .to_string(),
            );
            audit::record(&state.store, entry).await;
            return Err(ApiError::forbidden(format!(
                "the key '{}' lacks the scope '{required}' that this action needs",
                principal.name
            )));
        }
        Ok(Admin {
            principal,
            origin,
            _scope: PhantomData,
        })
    }
}
