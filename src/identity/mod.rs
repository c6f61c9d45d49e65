//! Who a person is, as their identity provider says: LDAP (a password checked by binding as
//! the user), OpenID Connect (authorization code with PKCE) and SAML 2.0 (a signed Response
//! posted to our ACS). Each provider turns a successful sign-in into the same [`Identity`];
//! nothing outside this module speaks a provider's protocol.

pub mod ldap;
pub mod oidc;
pub mod saml;

use serde::{Deserialize, Serialize};

/// A group a person belongs to: `id` is what the provider keeps stable (an LDAP DN, a claim or
/// attribute value); `name` is what a person reads.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Group {
    pub id: String,
    pub name: String,
}

/// A signed-in person.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    /// The configured name of the provider that vouched for them.
    pub provider: String,
    /// Stable for this person at this provider (LDAP entryUUID or DN, OIDC `sub`, SAML NameID).
    pub subject: String,
    /// What they typed or the provider's preferred username, when it has one.
    pub login: Option<String>,
    pub email: Option<String>,
    pub display_name: Option<String>,
    pub groups: Vec<Group>,
}

/// Why a provider could not produce an identity. `Refused` is the person's fault (wrong
/// password, a tampered or replayed response) and is shown to them without detail; the others
/// are the operator's to fix and carry what `trustbroker idp test` prints.
#[derive(Debug, thiserror::Error)]
pub enum IdpError {
    #[error("sign-in refused: {0}")]
    Refused(String),
    #[error("the identity provider cannot be reached: {0}")]
    Unreachable(String),
    #[error("TLS with the identity provider failed: {0}")]
    Tls(String),
    #[error("the identity provider is misconfigured: {0}")]
    Misconfigured(String),
    #[error("the identity provider answered unexpectedly: {0}")]
    Protocol(String),
}

/// One `[idp.NAME]` table of the configuration file.
#[derive(Clone, Debug, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum ProviderSettings {
    Ldap(ldap::LdapSettings),
    Oidc(oidc::OidcSettings),
    Saml(saml::SamlSettings),
}

impl ProviderSettings {
    pub fn kind(&self) -> &'static str {
        match self {
            ProviderSettings::Ldap(_) => "ldap",
            ProviderSettings::Oidc(_) => "oidc",
            ProviderSettings::Saml(_) => "saml",
        }
    }
}

/// Provider names appear in URLs (`/auth/oidc/{name}/callback`): keep them to a safe alphabet.
pub fn valid_provider_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}
