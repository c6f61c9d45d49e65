//! SAML 2.0 sign-in (placeholder interface; being written).
use serde::Deserialize;

use super::{Identity, IdpError};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamlSettings {
    pub label: Option<String>,
    pub metadata_url: Option<String>,
}

/// Where this service provider lives, derived from the public URL and the provider's name.
#[derive(Clone, Debug)]
pub struct SpEndpoints {
    /// Also the SP entity ID: `{public}/auth/saml/{name}/metadata`.
    pub metadata_url: String,
    /// `{public}/auth/saml/{name}/acs`.
    pub acs_url: String,
}

/// A verified sign-in: the person, and what the replay cache must remember.
pub struct SamlLogin {
    pub identity: Identity,
    pub assertion_id: String,
    pub not_on_or_after: chrono::DateTime<chrono::Utc>,
}

pub struct SamlProvider {
    name: String,
}

impl SamlProvider {
    pub async fn load(
        name: &str,
        _settings: &SamlSettings,
        _sp: SpEndpoints,
    ) -> Result<SamlProvider, IdpError> {
        Ok(SamlProvider { name: name.into() })
    }

    pub fn metadata_xml(&self) -> Result<String, IdpError> {
        Err(IdpError::Misconfigured(format!(
            "{}: not built yet",
            self.name
        )))
    }

    /// The IdP URL to send the browser to, and the AuthnRequest ID to expect back.
    pub fn begin(&self, _relay_state: &str) -> Result<(String, String), IdpError> {
        Err(IdpError::Misconfigured(format!(
            "{}: not built yet",
            self.name
        )))
    }

    pub fn finish(
        &self,
        _saml_response: &str,
        _expected_request_id: Option<&str>,
    ) -> Result<SamlLogin, IdpError> {
        Err(IdpError::Misconfigured(format!(
            "{}: not built yet",
            self.name
        )))
    }
}

impl SamlProvider {
    pub fn check(&self) -> Result<Vec<String>, IdpError> {
        Err(IdpError::Misconfigured(format!(
            "{}: not built yet",
            self.name
        )))
    }
}
