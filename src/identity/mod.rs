//! Who a person is, as their identity provider says: LDAP (a password checked by binding as
//! the user), OpenID Connect (authorization code with PKCE) and SAML 2.0 (a signed Response
//! posted to our ACS). Each provider turns a successful sign-in into the same [`Identity`];
//! nothing outside this module speaks a provider's protocol.

pub mod ldap;
pub mod oidc;
pub mod saml;

use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// A configured provider, ready to sign people in.
// One value per configured provider, built once: the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Provider {
    Ldap(ldap::LdapProvider),
    Oidc(oidc::OidcProvider),
    /// Loaded on first use: its metadata may come over HTTP, and an IdP that is down at start
    /// must not keep the broker (and the other providers) from serving.
    Saml(SamlSlot),
}

pub struct SamlSlot {
    name: String,
    settings: saml::SamlSettings,
    pub endpoints: saml::SpEndpoints,
    /// The provider, and when to read the IdP's metadata again.
    loaded: tokio::sync::Mutex<Option<(Instant, Arc<saml::SamlProvider>)>>,
}

/// After a failed refresh, the metadata in hand is used this long before the next try.
const SAML_METADATA_RETRY: Duration = Duration::from_secs(300);

impl SamlSlot {
    /// The provider, loading its IdP metadata on first use and again every
    /// `metadata_refresh_secs`. A failed refresh keeps the metadata in hand (and says so in the
    /// log); a failed first load is an error, retried at the next use.
    pub async fn get(&self) -> Result<Arc<saml::SamlProvider>, IdpError> {
        let mut loaded = self.loaded.lock().await;
        if let Some((refresh_at, provider)) = loaded.as_ref()
            && Instant::now() < *refresh_at
        {
            return Ok(provider.clone());
        }
        match saml::SamlProvider::load(&self.name, &self.settings, self.endpoints.clone()).await {
            Ok(provider) => {
                let provider = Arc::new(provider);
                let refresh = Duration::from_secs(self.settings.metadata_refresh_secs);
                *loaded = Some((Instant::now() + refresh, provider.clone()));
                Ok(provider)
            }
            Err(e) => match loaded.as_mut() {
                Some((refresh_at, provider)) => {
                    tracing::warn!(provider = %self.name, error = %e,
                        "SAML metadata refresh failed: keeping the metadata read earlier");
                    *refresh_at = Instant::now() + SAML_METADATA_RETRY;
                    Ok(provider.clone())
                }
                None => Err(e),
            },
        }
    }
}

/// One entry of the enrollment portal's list.
pub struct ConfiguredProvider {
    pub name: String,
    /// What the portal's button or form title says.
    pub label: String,
    pub provider: Provider,
}

/// Every configured provider, in configuration (name) order.
#[derive(Default)]
pub struct IdentityProviders {
    providers: Vec<ConfiguredProvider>,
}

impl IdentityProviders {
    /// Builds every provider from configuration; `public_url` has no trailing slash. Nothing is
    /// fetched here (see [`SamlSlot`] and [`oidc::OidcProvider::new`]).
    pub fn from_config(
        settings: &[(String, ProviderSettings)],
        public_url: &str,
    ) -> Result<IdentityProviders, IdpError> {
        let mut providers = Vec::with_capacity(settings.len());
        for (name, setting) in settings {
            let (label, provider) = match setting {
                ProviderSettings::Ldap(s) => (
                    s.label.clone(),
                    Provider::Ldap(ldap::LdapProvider::new(name, s)?),
                ),
                ProviderSettings::Oidc(s) => (
                    s.label.clone(),
                    Provider::Oidc(oidc::OidcProvider::new(
                        name,
                        s,
                        &oidc_callback_url(public_url, name),
                    )?),
                ),
                ProviderSettings::Saml(s) => (
                    s.label.clone(),
                    Provider::Saml(SamlSlot {
                        name: name.clone(),
                        settings: s.clone(),
                        endpoints: saml_endpoints(public_url, name),
                        loaded: tokio::sync::Mutex::new(None),
                    }),
                ),
            };
            providers.push(ConfiguredProvider {
                name: name.clone(),
                label: label.unwrap_or_else(|| name.clone()),
                provider,
            });
        }
        Ok(IdentityProviders { providers })
    }

    pub fn get(&self, name: &str) -> Option<&ConfiguredProvider> {
        self.providers.iter().find(|p| p.name == name)
    }

    pub fn iter(&self) -> impl Iterator<Item = &ConfiguredProvider> {
        self.providers.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.providers.is_empty()
    }
}

/// The redirect URL to register at an OpenID provider.
pub fn oidc_callback_url(public_url: &str, name: &str) -> String {
    format!("{public_url}/auth/oidc/{name}/callback")
}

/// The SP metadata URL (also the entity ID) and ACS URL to register at a SAML IdP.
pub fn saml_endpoints(public_url: &str, name: &str) -> saml::SpEndpoints {
    saml::SpEndpoints {
        metadata_url: format!("{public_url}/auth/saml/{name}/metadata"),
        acs_url: format!("{public_url}/auth/saml/{name}/acs"),
    }
}
