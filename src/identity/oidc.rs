//! OpenID Connect sign-in (the `openidconnect` crate): discovery, authorization code with PKCE
//! (S256), state and nonce, ID token checks (issuer, audience, expiry, nonce, an algorithm
//! allow-list), a configurable groups claim with the userinfo endpoint as fallback, over an
//! HTTP client that follows no redirects.
//!
//! What a sign-in in flight must remember (state, nonce, PKCE verifier) is returned to the
//! caller as [`OidcPending`]; the portal keeps it sealed in a short-lived cookie, so any
//! instance behind a load balancer can finish the sign-in.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreErrorResponseType,
    CoreGenderClaim, CoreJsonWebKey, CoreJweContentEncryptionAlgorithm, CoreJwsSigningAlgorithm,
    CoreProviderMetadata, CoreRevocableToken, CoreRevocationErrorResponse,
    CoreTokenIntrospectionResponse, CoreTokenType,
};
use openidconnect::{
    AdditionalClaims, AuthorizationCode, ClaimsVerificationError, Client, ClientId, ClientSecret,
    CsrfToken, EmptyExtraTokenFields, EndpointMaybeSet, EndpointNotSet, EndpointSet, IdTokenFields,
    IssuerUrl, Nonce, OAuth2TokenResponse, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    SignatureVerificationError, StandardErrorResponse, StandardTokenResponse, TokenResponse,
    UserInfoClaims,
};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{Group, Identity, IdpError};
use crate::config::Secret;

const DEFAULT_SCOPES: [&str; 3] = ["openid", "email", "profile"];
const DEFAULT_ALGORITHMS: [&str; 3] = ["RS256", "PS256", "ES256"];
/// Provider metadata and keys are fetched again after this long (keys rotate).
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);

/// `[idp.NAME]` with `type = "oidc"`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcSettings {
    /// The button text on the enrollment portal (default: the provider's name).
    pub label: Option<String>,
    /// The issuer URL; `{issuer}/.well-known/openid-configuration` must name the same issuer.
    pub issuer: String,
    pub client_id: String,
    /// Sent with HTTP Basic authentication to the token endpoint; none for a public client.
    pub client_secret: Option<Secret>,
    /// Scopes besides `openid` (default `email profile`); add `groups` where the provider
    /// releases groups only on request.
    pub scopes: Option<Vec<String>>,
    /// The claim that lists groups (default `groups`), read from the ID token and, when it is
    /// not there, from the userinfo endpoint.
    #[serde(default = "default_groups_claim")]
    pub groups_claim: String,
    /// The claim used as the login name (default `preferred_username`).
    #[serde(default = "default_login_claim")]
    pub login_claim: String,
    /// ID token signing algorithms accepted (default RS256, PS256, ES256; `none` never).
    pub algorithms: Option<Vec<String>>,
    /// A PEM CA bundle to trust for the provider's HTTPS endpoints, instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// Timeout for each HTTP request to the provider (default 10 s).
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
}

fn default_groups_claim() -> String {
    "groups".into()
}

fn default_login_claim() -> String {
    "preferred_username".into()
}

fn default_timeout_secs() -> u64 {
    10
}

/// Every claim we did not ask the library to type: the groups and login claims are named in
/// configuration, so they are read from here.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
struct ExtraClaims {
    #[serde(flatten)]
    claims: HashMap<String, serde_json::Value>,
}

impl AdditionalClaims for ExtraClaims {}

type ExtraTokenResponse = StandardTokenResponse<
    IdTokenFields<
        ExtraClaims,
        EmptyExtraTokenFields,
        CoreGenderClaim,
        CoreJweContentEncryptionAlgorithm,
        CoreJwsSigningAlgorithm,
    >,
    CoreTokenType,
>;

/// A client made from discovery: auth URL set, token and userinfo URLs as discovered.
type DiscoveredClient = Client<
    ExtraClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    ExtraTokenResponse,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;

/// What a sign-in in flight must remember until the provider sends the person back.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct OidcPending {
    pub state: String,
    pub nonce: String,
    pub pkce_verifier: String,
}

pub struct OidcProvider {
    name: String,
    settings: OidcSettings,
    issuer: IssuerUrl,
    redirect_url: RedirectUrl,
    algorithms: Vec<CoreJwsSigningAlgorithm>,
    http: reqwest::Client,
    discovered: Mutex<Option<(Instant, Arc<DiscoveredClient>)>>,
}

impl OidcProvider {
    /// Checks the settings; nothing is fetched until the first sign-in (an unreachable provider
    /// must not keep the broker from starting).
    pub fn new(
        name: &str,
        settings: &OidcSettings,
        redirect_url: &str,
    ) -> Result<OidcProvider, IdpError> {
        let misconfigured = |what: String| IdpError::Misconfigured(format!("{name}: {what}"));
        let issuer = IssuerUrl::new(settings.issuer.clone())
            .map_err(|e| misconfigured(format!("issuer '{}': {e}", settings.issuer)))?;
        let redirect_url = RedirectUrl::new(redirect_url.to_owned())
            .map_err(|e| misconfigured(format!("redirect URL: {e}")))?;
        let algorithms = settings
            .algorithms
            .clone()
            .unwrap_or_else(|| DEFAULT_ALGORITHMS.map(String::from).to_vec())
            .iter()
            .map(|alg| parse_algorithm(alg).map_err(misconfigured))
            .collect::<Result<Vec<_>, _>>()?;
        if algorithms.is_empty() {
            return Err(misconfigured("algorithms must name at least one".into()));
        }
        let mut http = reqwest::Client::builder()
            // Following redirects would let the provider's answers point us anywhere (SSRF).
            .redirect(reqwest::redirect::Policy::none())
            .timeout(Duration::from_secs(settings.timeout_secs.max(1)));
        if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path)
                .map_err(|e| misconfigured(format!("ca_file {}: {e}", path.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| misconfigured(format!("ca_file {}: {e}", path.display())))?;
            http = http.tls_built_in_root_certs(false);
            for cert in certs {
                http = http.add_root_certificate(cert);
            }
        }
        let http = http
            .build()
            .map_err(|e| misconfigured(format!("HTTP client: {e}")))?;
        Ok(OidcProvider {
            name: name.to_owned(),
            settings: settings.clone(),
            issuer,
            redirect_url,
            algorithms,
            http,
            discovered: Mutex::new(None),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The provider's metadata and keys, fetched at most once per [`DISCOVERY_TTL`].
    async fn client(&self) -> Result<Arc<DiscoveredClient>, IdpError> {
        self.client_fetched_after(None).await
    }

    /// Like [`Self::client`], but fetched again unless the cached one is newer than `after`
    /// (another request may have refreshed it meanwhile).
    async fn client_fetched_after(
        &self,
        after: Option<Instant>,
    ) -> Result<Arc<DiscoveredClient>, IdpError> {
        let mut cached = self.discovered.lock().await;
        if let Some((at, client)) = cached.as_ref()
            && at.elapsed() < DISCOVERY_TTL
            && after.is_none_or(|after| *at > after)
        {
            return Ok(client.clone());
        }
        let client = Arc::new(self.discover().await?);
        *cached = Some((Instant::now(), client.clone()));
        Ok(client)
    }

    async fn discover(&self) -> Result<DiscoveredClient, IdpError> {
        // The library checks that the document names the issuer we asked for.
        let metadata = CoreProviderMetadata::discover_async(self.issuer.clone(), &self.http)
            .await
            .map_err(|e| self.discovery_error(e))?;
        let secret = self
            .settings
            .client_secret
            .as_ref()
            .map(|s| ClientSecret::new(s.0.clone()));
        Ok(DiscoveredClient::from_provider_metadata(
            metadata,
            ClientId::new(self.settings.client_id.clone()),
            secret,
        )
        .set_redirect_uri(self.redirect_url.clone()))
    }

    fn discovery_error<E: std::error::Error>(&self, e: E) -> IdpError {
        let chain = error_chain(&e);
        let text = format!(
            "{}: discovery at {}: {chain}",
            self.name,
            self.issuer.as_str()
        );
        if chain.contains("certificate") || chain.contains("tls") || chain.contains("TLS") {
            IdpError::Tls(text)
        } else if chain.contains("connect") || chain.contains("timed out") || chain.contains("dns")
        {
            IdpError::Unreachable(text)
        } else {
            IdpError::Misconfigured(text)
        }
    }

    /// Starts a sign-in: the URL to send the browser to, and what to remember until it returns.
    pub async fn begin(&self) -> Result<(String, OidcPending), IdpError> {
        let client = self.client().await?;
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .set_pkce_challenge(challenge);
        let scopes = self
            .settings
            .scopes
            .clone()
            .unwrap_or_else(|| DEFAULT_SCOPES[1..].iter().map(|s| s.to_string()).collect());
        for scope in scopes.into_iter().filter(|s| s != "openid") {
            request = request.add_scope(Scope::new(scope));
        }
        let (url, state, nonce) = request.url();
        Ok((
            url.to_string(),
            OidcPending {
                state: state.secret().clone(),
                nonce: nonce.secret().clone(),
                pkce_verifier: verifier.secret().clone(),
            },
        ))
    }

    /// Finishes a sign-in with what the provider sent back to the redirect URL.
    pub async fn finish(
        &self,
        pending: &OidcPending,
        state: &str,
        code: &str,
    ) -> Result<Identity, IdpError> {
        use subtle::ConstantTimeEq;
        if !bool::from(state.as_bytes().ct_eq(pending.state.as_bytes())) {
            return Err(IdpError::Refused(
                "the state does not match this sign-in".into(),
            ));
        }
        let client = self.client().await?;
        let response = client
            .exchange_code(AuthorizationCode::new(code.to_owned()))
            .map_err(|e| IdpError::Misconfigured(format!("{}: {e}", self.name)))?
            .set_pkce_verifier(PkceCodeVerifier::new(pending.pkce_verifier.clone()))
            .request_async(&self.http)
            .await
            .map_err(|e| {
                // An invalid_grant (a used or forged code) is the person's, not the operator's.
                IdpError::Refused(format!("token request: {}", error_chain(&e)))
            })?;
        let id_token = response
            .id_token()
            .ok_or_else(|| IdpError::Protocol(format!("{}: no ID token returned", self.name)))?;
        let nonce = Nonce::new(pending.nonce.clone());
        let verify = |client: &DiscoveredClient| {
            let verifier = client
                .id_token_verifier()
                .set_allowed_algs(self.algorithms.clone());
            id_token.claims(&verifier, &nonce).cloned()
        };
        let checked_at = Instant::now();
        let claims = match verify(&client) {
            // Signed with a key we have not seen: the provider rotated its keys since we
            // fetched them. Fetch them again (once) and check the same token with those.
            Err(ClaimsVerificationError::SignatureVerification(
                SignatureVerificationError::NoMatchingKey,
            )) => {
                tracing::info!(provider = %self.name, "ID token signed with an unknown key: refreshing the provider's keys");
                let fresh = self.client_fetched_after(Some(checked_at)).await?;
                verify(&fresh)
            }
            other => other,
        }
        .map_err(|e| IdpError::Refused(format!("ID token: {}", error_chain(&e))))?;
        let extra = &claims.additional_claims().claims;
        let mut groups = extra.get(&self.settings.groups_claim).map(claim_groups);
        // Standard claims are typed by the library and so absent from the extra map.
        let standard_login = |username: Option<&openidconnect::EndUserUsername>| {
            (self.settings.login_claim == "preferred_username")
                .then(|| username.map(|u| u.to_string()))
                .flatten()
        };
        let mut login = standard_login(claims.preferred_username())
            .or_else(|| extra.get(&self.settings.login_claim).and_then(claim_string));
        let mut email = claims.email().map(|e| e.to_string());
        let mut display_name = claims
            .name()
            .and_then(|n| n.get(None))
            .map(|n| n.to_string());
        if groups.is_none() && client.user_info_url().is_some() {
            // Many providers keep the ID token small and release groups at userinfo only.
            let info: UserInfoClaims<ExtraClaims, CoreGenderClaim> = client
                .user_info(
                    response.access_token().clone(),
                    Some(claims.subject().clone()),
                )
                .map_err(|e| IdpError::Misconfigured(format!("{}: {e}", self.name)))?
                .request_async(&self.http)
                .await
                .map_err(|e| IdpError::Protocol(format!("userinfo: {}", error_chain(&e))))?;
            let extra = &info.additional_claims().claims;
            groups = extra.get(&self.settings.groups_claim).map(claim_groups);
            login = login
                .or_else(|| standard_login(info.preferred_username()))
                .or_else(|| extra.get(&self.settings.login_claim).and_then(claim_string));
            email = email.or_else(|| info.email().map(|e| e.to_string()));
            display_name = display_name
                .or_else(|| info.name().and_then(|n| n.get(None)).map(|n| n.to_string()));
        }
        Ok(Identity {
            provider: self.name.clone(),
            subject: claims.subject().to_string(),
            login,
            email,
            display_name,
            groups: groups.unwrap_or_default(),
        })
    }

    /// For `trustbroker idp test`: discovery, then what it found.
    pub async fn check(&self) -> Result<Vec<String>, IdpError> {
        let client = self.discover().await?;
        let mut lines = vec![
            format!(
                "discovery at {} names the same issuer",
                self.issuer.as_str()
            ),
            format!("authorization endpoint {}", client.auth_uri().as_str()),
        ];
        match client.token_uri() {
            Some(url) => lines.push(format!("token endpoint {}", url.as_str())),
            None => {
                return Err(IdpError::Misconfigured(format!(
                    "{}: discovery names no token endpoint",
                    self.name
                )));
            }
        }
        match client.user_info_url() {
            Some(url) => lines.push(format!("userinfo endpoint {}", url.as_str())),
            None => lines.push(format!(
                "no userinfo endpoint: groups must be in the ID token's '{}' claim",
                self.settings.groups_claim
            )),
        }
        lines.push(format!(
            "redirect URL to register: {}",
            self.redirect_url.as_str()
        ));
        Ok(lines)
    }
}

fn parse_algorithm(name: &str) -> Result<CoreJwsSigningAlgorithm, String> {
    if name.eq_ignore_ascii_case("none") || name.starts_with("HS") {
        return Err(format!(
            "algorithm '{name}' is not allowed (no unsigned or shared-secret ID tokens)"
        ));
    }
    serde_json::from_value(serde_json::Value::String(name.to_owned()))
        .map_err(|_| format!("unknown ID token algorithm '{name}'"))
}

/// A groups claim is a list of strings (or one string); each value is both id and name.
fn claim_groups(value: &serde_json::Value) -> Vec<Group> {
    let values: Vec<&str> = match value {
        serde_json::Value::Array(items) => items.iter().filter_map(|v| v.as_str()).collect(),
        serde_json::Value::String(s) => vec![s.as_str()],
        _ => Vec::new(),
    };
    let mut groups: Vec<Group> = values
        .into_iter()
        .filter(|v| !v.is_empty())
        .map(|v| Group {
            id: v.to_owned(),
            name: v.to_owned(),
        })
        .collect();
    groups.sort();
    groups.dedup();
    groups
}

fn claim_string(value: &serde_json::Value) -> Option<String> {
    value.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
}

/// An error and its causes on one line: the outermost alone rarely says what went wrong.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsigned_and_shared_secret_algorithms_are_refused() {
        assert!(parse_algorithm("none").is_err());
        assert!(parse_algorithm("HS256").is_err());
        assert!(parse_algorithm("RS999").is_err());
        assert_eq!(
            parse_algorithm("ES256"),
            Ok(CoreJwsSigningAlgorithm::EcdsaP256Sha256)
        );
    }

    #[test]
    fn groups_claims_are_lists_or_one_string() {
        let list = claim_groups(&serde_json::json!(["staff", "admins", "staff", 7, ""]));
        let names: Vec<_> = list.iter().map(|g| g.id.as_str()).collect();
        assert_eq!(names, ["admins", "staff"]);
        assert_eq!(claim_groups(&serde_json::json!("solo")).len(), 1);
        assert!(claim_groups(&serde_json::json!({"a": 1})).is_empty());
    }
}
