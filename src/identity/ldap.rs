//! LDAP sign-in (placeholder interface; being written).
use serde::Deserialize;

use super::{Identity, IdpError};

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapSettings {
    pub label: Option<String>,
    pub url: String,
}

pub struct LdapProvider {
    name: String,
}

impl LdapProvider {
    pub fn new(name: &str, _settings: &LdapSettings) -> Result<LdapProvider, IdpError> {
        Ok(LdapProvider { name: name.into() })
    }

    pub async fn authenticate(&self, _login: &str, _password: &str) -> Result<Identity, IdpError> {
        Err(IdpError::Misconfigured(format!(
            "{}: not built yet",
            self.name
        )))
    }

    pub async fn check(&self) -> Result<Vec<String>, IdpError> {
        Err(IdpError::Misconfigured(format!(
            "{}: not built yet",
            self.name
        )))
    }
}
