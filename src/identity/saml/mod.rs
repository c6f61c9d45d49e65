//! SAML 2.0 sign-in, as a service provider (SP) with samael: SP-initiated Web Browser SSO
//! (AuthnRequest over HTTP-Redirect, signed Response posted to our ACS over HTTP-POST).
//!
//! * [`metadata`]: the IdP's metadata (fetched or read at load, checked: it must carry a
//!   signing certificate) and our own SP metadata.
//! * [`request`]: the AuthnRequest and its 128-bit random ID.
//! * [`response`]: verifying a posted Response and turning it into an [`Identity`].
//!
//! The replay cache is the caller's: [`SamlLogin`] says which assertion ID to remember and
//! until when (see `docs/security.md`, "SAML 2.0").

mod metadata;
mod request;
mod response;

use std::path::Path;

use chrono::{DateTime, Utc};
use samael::service_provider::ServiceProvider;
use serde::Deserialize;

use super::{Identity, IdpError};

pub use request::new_request_id;

/// The largest clock skew an operator may allow: beyond a few minutes it stops being skew and
/// starts extending how long a stolen Response stays usable.
pub const MAX_CLOCK_SKEW_SECS: u64 = 300;
/// Bounds of `max_response_age_secs`.
pub const MAX_RESPONSE_AGE_SECS: u64 = 3600;

const NAMEID_PERSISTENT: &str = "urn:oasis:names:tc:SAML:2.0:nameid-format:persistent";
const NAMEID_TRANSIENT: &str = "urn:oasis:names:tc:SAML:2.0:nameid-format:transient";
const NAMEID_EMAIL: &str = "urn:oasis:names:tc:SAML:1.1:nameid-format:emailAddress";
const NAMEID_UNSPECIFIED: &str = "urn:oasis:names:tc:SAML:1.1:nameid-format:unspecified";

/// One `[idp.NAME]` table with `type = "saml"`. Every key is documented in
/// `docs/configuration.md` ("Identity providers → SAML 2.0").
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamlSettings {
    /// What the sign-in page shows.
    pub label: Option<String>,
    /// Where to fetch the IdP's metadata (https; http only on loopback). One of
    /// `metadata_url` and `metadata_file`.
    pub metadata_url: Option<String>,
    /// The IdP's metadata as a local file (pins it: nothing is fetched).
    pub metadata_file: Option<Box<Path>>,
    /// PEM CA certificate(s) to trust, besides the public roots, when fetching `metadata_url`.
    pub metadata_ca_file: Option<Box<Path>>,
    /// Accept unsolicited (IdP-initiated) Responses, which carry no InResponseTo.
    #[serde(default)]
    pub allow_idp_initiated: bool,
    /// How often the IdP's metadata is read again (seconds), to pick up a signing key rollover;
    /// a failed refresh keeps the metadata in hand and retries in 5 minutes.
    #[serde(default = "default_metadata_refresh_secs")]
    pub metadata_refresh_secs: u64,
    /// How far the IdP's clock may be off from ours, in seconds (0..=300).
    #[serde(default = "default_clock_skew_secs")]
    pub clock_skew_secs: u64,
    /// How old a Response's IssueInstant may be, in seconds (1..=3600).
    #[serde(default = "default_max_response_age_secs")]
    pub max_response_age_secs: u64,
    /// The NameID format to ask for: `persistent`, `transient`, `email`, `unspecified` or a
    /// full URN.
    #[serde(default = "default_name_id_format")]
    pub name_id_format: Box<str>,
    /// The attribute that identifies the person when the NameID is transient (or absent).
    pub subject_attribute: Option<Box<str>>,
    /// Attribute names (the `Name` of `<saml:Attribute>`); an empty string reads nothing.
    /// (`Box<str>`/`Box<Path>` rather than `String`/`PathBuf` here and above: this struct is a
    /// variant of `ProviderSettings`, and clippy bounds how much larger one variant may be.)
    #[serde(default = "default_login_attribute")]
    pub login_attribute: Box<str>,
    #[serde(default = "default_email_attribute")]
    pub email_attribute: Box<str>,
    #[serde(default = "default_display_name_attribute")]
    pub display_name_attribute: Box<str>,
    #[serde(default = "default_groups_attribute")]
    pub groups_attribute: Box<str>,
}

fn default_metadata_refresh_secs() -> u64 {
    6 * 3600
}

fn default_clock_skew_secs() -> u64 {
    60
}
fn default_max_response_age_secs() -> u64 {
    180
}
fn default_name_id_format() -> Box<str> {
    "persistent".into()
}
fn default_login_attribute() -> Box<str> {
    "uid".into()
}
fn default_email_attribute() -> Box<str> {
    "mail".into()
}
fn default_display_name_attribute() -> Box<str> {
    "displayName".into()
}
fn default_groups_attribute() -> Box<str> {
    "groups".into()
}

impl Default for SamlSettings {
    /// The defaults of an `[idp.NAME]` table that names no metadata yet (tests and tools set
    /// `metadata_url` or `metadata_file`).
    fn default() -> Self {
        SamlSettings {
            label: None,
            metadata_url: None,
            metadata_file: None,
            metadata_ca_file: None,
            allow_idp_initiated: false,
            metadata_refresh_secs: default_metadata_refresh_secs(),
            clock_skew_secs: default_clock_skew_secs(),
            max_response_age_secs: default_max_response_age_secs(),
            name_id_format: default_name_id_format(),
            subject_attribute: None,
            login_attribute: default_login_attribute(),
            email_attribute: default_email_attribute(),
            display_name_attribute: default_display_name_attribute(),
            groups_attribute: default_groups_attribute(),
        }
    }
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
#[derive(Clone, Debug)]
pub struct SamlLogin {
    pub identity: Identity,
    /// The signed Assertion's ID. The caller must refuse a second sign-in with the same ID.
    pub assertion_id: String,
    /// Until when this provider would still accept the assertion (the earliest NotOnOrAfter of
    /// its Conditions and bearer SubjectConfirmationData, plus the allowed clock skew): keep
    /// the ID in the replay cache at least until then.
    pub not_on_or_after: DateTime<Utc>,
}

/// A loaded SAML identity provider. Immutable after [`SamlProvider::load`]: `Send + Sync`, share
/// it behind an `Arc`; [`SamlProvider::finish`] is blocking CPU work (libxml2/xmlsec), run it in
/// `spawn_blocking`.
pub struct SamlProvider {
    name: String,
    settings: SamlSettings,
    endpoints: SpEndpoints,
    /// The NameID format URN asked for in AuthnRequests and announced in our metadata.
    name_id_format: String,
    idp: metadata::IdpMetadata,
    /// samael's verifier, configured with the IdP metadata checked at load (never changed
    /// afterwards: the signing certificates it trusts are exactly those).
    sp: ServiceProvider,
    sp_metadata: String,
}

impl std::fmt::Debug for SamlProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SamlProvider")
            .field("name", &self.name)
            .field("idp_entity_id", &self.idp.entity_id)
            .field("sp_entity_id", &self.endpoints.metadata_url)
            .finish_non_exhaustive()
    }
}

impl SamlProvider {
    /// Checks the settings, gets the IdP's metadata (`metadata_url` over HTTP(S), no redirects,
    /// 10 s timeout; or `metadata_file`) and refuses metadata that cannot be verified against.
    pub async fn load(
        name: &str,
        settings: &SamlSettings,
        sp: SpEndpoints,
    ) -> Result<SamlProvider, IdpError> {
        check_settings(name, settings, &sp)?;
        let (xml, source) = metadata::fetch(name, settings).await?;
        Self::build(name, settings, sp, &xml, source)
    }

    /// Like [`SamlProvider::load`], with the IdP metadata XML already in hand.
    pub fn from_metadata_xml(
        name: &str,
        settings: &SamlSettings,
        sp: SpEndpoints,
        idp_metadata_xml: &str,
    ) -> Result<SamlProvider, IdpError> {
        check_settings(name, settings, &sp)?;
        Self::build(
            name,
            settings,
            sp,
            idp_metadata_xml,
            "metadata given directly".into(),
        )
    }

    fn build(
        name: &str,
        settings: &SamlSettings,
        endpoints: SpEndpoints,
        xml: &str,
        source: String,
    ) -> Result<SamlProvider, IdpError> {
        let name_id_format = name_id_format_urn(&settings.name_id_format)
            .ok_or_else(|| misconfigured(name, format!(
                "name_id_format = \"{}\" is not persistent, transient, email, unspecified or a urn:oasis:names:tc:SAML:… URN",
                settings.name_id_format
            )))?;
        let (entity, idp) = metadata::IdpMetadata::parse(name, xml, source, Utc::now())?;
        let sp = ServiceProvider {
            entity_id: Some(endpoints.metadata_url.clone()),
            metadata_url: Some(endpoints.metadata_url.clone()),
            acs_url: Some(endpoints.acs_url.clone()),
            slo_url: None,
            idp_metadata: entity,
            allow_idp_initiated: false,
            max_issue_delay: chrono::Duration::seconds(settings.max_response_age_secs as i64),
            max_clock_skew: chrono::Duration::seconds(settings.clock_skew_secs as i64),
            allowed_signature_algorithms: Some(response::ALLOWED_ALGORITHMS.to_vec()),
            ..ServiceProvider::default()
        };
        // What samael will verify with is what counts: ask it, not our own reading of the
        // metadata. No certificate means samael would accept unsigned Responses.
        match sp.idp_signing_certs() {
            Ok(Some(certs)) if !certs.is_empty() => {}
            Ok(_) => {
                return Err(misconfigured(
                    name,
                    format!(
                        "the IdP metadata ({}) has no signing certificate (a KeyDescriptor use=\"signing\" \
                         with an X509Certificate); refusing it, since responses could not be verified",
                        idp.source
                    ),
                ));
            }
            Err(e) => {
                return Err(misconfigured(
                    name,
                    format!("a signing certificate in the IdP metadata cannot be read: {e}"),
                ));
            }
        }
        let sp_metadata = metadata::sp_metadata_xml(&endpoints, &name_id_format)
            .map_err(|e| misconfigured(name, format!("cannot build our SP metadata: {e}")))?;
        Ok(SamlProvider {
            name: name.into(),
            settings: settings.clone(),
            endpoints,
            name_id_format,
            idp,
            sp,
            sp_metadata,
        })
    }

    /// The configured name (`[idp.NAME]`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The IdP's entity ID, from its metadata.
    pub fn idp_entity_id(&self) -> &str {
        &self.idp.entity_id
    }

    /// Our SP metadata (entity ID = the metadata URL, the HTTP-POST ACS, the NameID format),
    /// to serve at `SpEndpoints::metadata_url` and register at the IdP.
    pub fn metadata_xml(&self) -> Result<String, IdpError> {
        Ok(self.sp_metadata.clone())
    }

    /// The IdP URL to send the browser to (HTTP-Redirect binding: deflated, base64 AuthnRequest
    /// plus `RelayState`), and the AuthnRequest ID to expect back as InResponseTo. The relay
    /// state is opaque to the IdP and comes back with the Response; SAML limits it to 80 bytes.
    pub fn begin(&self, relay_state: &str) -> Result<(String, String), IdpError> {
        if relay_state.len() > 80 {
            return Err(misconfigured(
                &self.name,
                "the relay state is longer than the 80 bytes SAML allows".into(),
            ));
        }
        let id = new_request_id();
        let url = request::redirect_url(
            &self.idp.sso_redirect_url,
            &self.endpoints,
            &self.name_id_format,
            &id,
            Utc::now(),
            relay_state,
        )
        .map_err(|e| misconfigured(&self.name, format!("cannot encode the AuthnRequest: {e}")))?;
        Ok((url, id))
    }

    /// Verifies a posted `SAMLResponse` (the form value, base64) and returns who signed in.
    /// `expected_request_id` is the ID [`SamlProvider::begin`] returned for this browser, or
    /// `None` for an unsolicited Response (refused unless `allow_idp_initiated`). Blocking.
    pub fn finish(
        &self,
        saml_response: &str,
        expected_request_id: Option<&str>,
    ) -> Result<SamlLogin, IdpError> {
        self.finish_at(saml_response, expected_request_id, Utc::now())
    }

    /// [`SamlProvider::finish`] with the time windows also checked against `now` (tests;
    /// samael's own checks always use the system clock, so both must pass).
    pub fn finish_at(
        &self,
        saml_response: &str,
        expected_request_id: Option<&str>,
        now: DateTime<Utc>,
    ) -> Result<SamlLogin, IdpError> {
        response::verify(self, saml_response, expected_request_id, now)
    }

    /// Human-readable lines for `trustbroker idp test NAME`: where the metadata came from, the
    /// IdP's entity ID, its SSO endpoint, each signing certificate and its validity, warnings,
    /// and what to register at the IdP.
    pub fn check(&self) -> Vec<String> {
        self.idp.check_lines(&self.endpoints, Utc::now())
    }
}

fn misconfigured(name: &str, message: String) -> IdpError {
    IdpError::Misconfigured(format!("{name}: {message}"))
}

fn name_id_format_urn(setting: &str) -> Option<String> {
    match setting {
        "persistent" => Some(NAMEID_PERSISTENT.into()),
        "transient" => Some(NAMEID_TRANSIENT.into()),
        "email" | "emailAddress" => Some(NAMEID_EMAIL.into()),
        "unspecified" => Some(NAMEID_UNSPECIFIED.into()),
        urn if urn.starts_with("urn:oasis:names:tc:SAML:") => Some(urn.into()),
        _ => None,
    }
}

fn check_settings(name: &str, s: &SamlSettings, sp: &SpEndpoints) -> Result<(), IdpError> {
    match (&s.metadata_url, &s.metadata_file) {
        (Some(_), Some(_)) => {
            return Err(misconfigured(
                name,
                "set metadata_url or metadata_file, not both".into(),
            ));
        }
        (None, None) => {
            return Err(misconfigured(
                name,
                "set metadata_url (the IdP's metadata address) or metadata_file".into(),
            ));
        }
        _ => {}
    }
    if s.clock_skew_secs > MAX_CLOCK_SKEW_SECS {
        return Err(misconfigured(
            name,
            format!("clock_skew_secs must be at most {MAX_CLOCK_SKEW_SECS}"),
        ));
    }
    if !(1..=MAX_RESPONSE_AGE_SECS).contains(&s.max_response_age_secs) {
        return Err(misconfigured(
            name,
            format!("max_response_age_secs must be between 1 and {MAX_RESPONSE_AGE_SECS}"),
        ));
    }
    if s.subject_attribute.as_deref() == Some("") {
        return Err(misconfigured(
            name,
            "subject_attribute must not be empty (leave it out to use the NameID)".into(),
        ));
    }
    for (what, url) in [("metadata URL", &sp.metadata_url), ("ACS URL", &sp.acs_url)] {
        let ok = reqwest::Url::parse(url)
            .is_ok_and(|u| matches!(u.scheme(), "https" | "http") && u.host().is_some());
        if !ok {
            return Err(misconfigured(
                name,
                format!("our SP {what} '{url}' is not an absolute http(s) URL"),
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests;
