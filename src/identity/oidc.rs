//! OpenID Connect sign-in (placeholder interface; being written).
use serde::Deserialize;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OidcSettings {
    pub label: Option<String>,
    pub issuer: String,
}
