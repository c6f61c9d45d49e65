//! The IdP's metadata (where we send people, which certificates sign its Responses) and ours.

use std::time::Duration;

use chrono::{DateTime, Utc};
use der::Decode;
use samael::metadata::{
    EntityDescriptor, HTTP_POST_BINDING, HTTP_REDIRECT_BINDING, IndexedEndpoint, SpSsoDescriptor,
};
use samael::traits::ToXml;
use sha2::{Digest, Sha256};

use super::{SamlSettings, SpEndpoints, misconfigured};
use crate::identity::IdpError;

const SAML2_PROTOCOL: &str = "urn:oasis:names:tc:SAML:2.0:protocol";
/// Metadata of one IdP is a few KiB; federation aggregates (not supported) are megabytes.
const MAX_METADATA_BYTES: usize = 1024 * 1024;
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// What we kept from the IdP's metadata, for requests and for `check()`.
#[derive(Clone, Debug)]
pub(super) struct IdpMetadata {
    pub entity_id: String,
    pub sso_redirect_url: String,
    pub source: String,
    pub signing_certs: Vec<CertSummary>,
    pub valid_until: Option<DateTime<Utc>>,
    pub want_authn_requests_signed: bool,
}

#[derive(Clone, Debug)]
pub(super) struct CertSummary {
    pub subject: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
    pub sha256: String,
}

/// Fetches (`metadata_url`) or reads (`metadata_file`) the metadata; returns it and a short
/// description of where it came from.
pub(super) async fn fetch(
    name: &str,
    settings: &SamlSettings,
) -> Result<(String, String), IdpError> {
    if let Some(path) = &settings.metadata_file {
        let xml = tokio::fs::read_to_string(path).await.map_err(|e| {
            misconfigured(
                name,
                format!("cannot read metadata_file {}: {e}", path.display()),
            )
        })?;
        return Ok((xml, format!("file {}", path.display())));
    }
    let Some(url) = &settings.metadata_url else {
        return Err(misconfigured(
            name,
            "set metadata_url or metadata_file".into(),
        ));
    };
    let parsed = reqwest::Url::parse(url)
        .map_err(|e| misconfigured(name, format!("metadata_url '{url}' is not a URL: {e}")))?;
    // The metadata carries the keys every Response is verified with: fetch it over TLS, or
    // over plain HTTP only from this machine.
    let loopback = parsed.host_str().is_some_and(|host| {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    match parsed.scheme() {
        "https" => {}
        "http" if loopback => {}
        _ => {
            return Err(misconfigured(
                name,
                format!(
                    "metadata_url '{url}' must be https:// (plain http only on loopback): it carries \
                     the keys responses are verified with; or download it and use metadata_file"
                ),
            ));
        }
    }
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(FETCH_TIMEOUT)
        .connect_timeout(CONNECT_TIMEOUT)
        .user_agent(concat!("trustbroker/", env!("CARGO_PKG_VERSION")));
    if let Some(ca) = &settings.metadata_ca_file {
        let pem = tokio::fs::read(ca).await.map_err(|e| {
            misconfigured(
                name,
                format!("cannot read metadata_ca_file {}: {e}", ca.display()),
            )
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            misconfigured(
                name,
                format!("metadata_ca_file {} is not PEM: {e}", ca.display()),
            )
        })?;
        if certs.is_empty() {
            return Err(misconfigured(
                name,
                format!("metadata_ca_file {} holds no certificate", ca.display()),
            ));
        }
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    let client = builder
        .build()
        .map_err(|e| misconfigured(name, format!("HTTP client: {}", chain(&e))))?;
    let mut response = client
        .get(parsed.clone())
        .header(
            reqwest::header::ACCEPT,
            "application/samlmetadata+xml, application/xml, text/xml",
        )
        .send()
        .await
        .map_err(|e| transport_error(name, url, &e))?;
    let status = response.status();
    if status.is_redirection() {
        let to = response
            .headers()
            .get(reqwest::header::LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("?");
        return Err(misconfigured(
            name,
            format!(
                "metadata_url '{url}' redirects (HTTP {status}) to '{to}'; redirects are not \
                 followed: set metadata_url to the final address"
            ),
        ));
    }
    if !status.is_success() {
        return Err(IdpError::Unreachable(format!(
            "{name}: metadata_url '{url}' answered HTTP {status}"
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = response
        .chunk()
        .await
        .map_err(|e| transport_error(name, url, &e))?
    {
        if body.len() + chunk.len() > MAX_METADATA_BYTES {
            return Err(misconfigured(
                name,
                format!(
                    "the metadata at '{url}' is larger than {MAX_METADATA_BYTES} bytes; \
                     point metadata_url at this IdP's own metadata, not a federation aggregate"
                ),
            ));
        }
        body.extend_from_slice(&chunk);
    }
    let xml = String::from_utf8(body)
        .map_err(|_| misconfigured(name, format!("the metadata at '{url}' is not UTF-8")))?;
    Ok((xml, url.clone()))
}

fn transport_error(name: &str, url: &str, e: &reqwest::Error) -> IdpError {
    let detail = chain(e);
    if e.is_timeout() {
        return IdpError::Unreachable(format!(
            "{name}: metadata_url '{url}' did not answer within {} s",
            FETCH_TIMEOUT.as_secs()
        ));
    }
    if is_tls(e) {
        return IdpError::Tls(format!(
            "{name}: fetching metadata_url '{url}': {detail} (a private CA? set metadata_ca_file)"
        ));
    }
    IdpError::Unreachable(format!("{name}: fetching metadata_url '{url}': {detail}"))
}

/// The error and its sources, joined: reqwest's own message alone rarely says what failed.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

fn is_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(e);
    while let Some(err) = current {
        if err.downcast_ref::<rustls::Error>().is_some() {
            return true;
        }
        // io::Error hides its payload from source(): look inside.
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io
                .get_ref()
                .is_some_and(|inner| inner.downcast_ref::<rustls::Error>().is_some())
        {
            return true;
        }
        current = err.source();
    }
    false
}

impl IdpMetadata {
    /// Parses and checks the IdP's metadata. The signing-certificate check that matters is
    /// done by the caller against samael (see `SamlProvider::build`); here each certificate
    /// must at least be a readable X.509 certificate.
    pub(super) fn parse(
        name: &str,
        xml: &str,
        source: String,
        now: DateTime<Utc>,
    ) -> Result<(EntityDescriptor, IdpMetadata), IdpError> {
        if xml.contains("<!DOCTYPE") || xml.contains("<!ENTITY") {
            return Err(misconfigured(
                name,
                format!("the IdP metadata ({source}) has a DOCTYPE; SAML metadata never needs one"),
            ));
        }
        if root_local_name(xml) == Some("EntitiesDescriptor") {
            return Err(misconfigured(
                name,
                format!(
                    "the metadata ({source}) is an EntitiesDescriptor (a federation aggregate); \
                     use this IdP's own EntityDescriptor"
                ),
            ));
        }
        let entity: EntityDescriptor = xml.parse().map_err(|e| {
            misconfigured(
                name,
                format!("the IdP metadata ({source}) is not a SAML EntityDescriptor: {e}"),
            )
        })?;
        let entity_id = entity
            .entity_id
            .clone()
            .filter(|id| !id.trim().is_empty())
            .ok_or_else(|| {
                misconfigured(name, format!("the IdP metadata ({source}) has no entityID"))
            })?;
        if let Some(valid_until) = entity.valid_until
            && valid_until <= now
        {
            return Err(misconfigured(
                name,
                format!(
                    "the IdP metadata ({source}) expired at {valid_until} (validUntil); \
                     get fresh metadata from the IdP"
                ),
            ));
        }
        let descriptors: Vec<_> = entity
            .idp_sso_descriptors
            .iter()
            .flatten()
            .filter(|d| {
                d.protocol_support_enumeration
                    .as_deref()
                    .is_some_and(|p| p.split_whitespace().any(|p| p == SAML2_PROTOCOL))
            })
            .collect();
        if descriptors.is_empty() {
            return Err(misconfigured(
                name,
                format!(
                    "the metadata ({source}) has no IDPSSODescriptor for SAML 2.0 \
                     (is it an SP's metadata, or SAML 1 only?)"
                ),
            ));
        }
        let sso_redirect_url = descriptors
            .iter()
            .flat_map(|d| d.single_sign_on_services.iter())
            .find(|s| s.binding == HTTP_REDIRECT_BINDING)
            .map(|s| s.location.clone())
            .ok_or_else(|| {
                let found: Vec<_> = descriptors
                    .iter()
                    .flat_map(|d| d.single_sign_on_services.iter())
                    .map(|s| s.binding.rsplit(':').next().unwrap_or("").to_string())
                    .collect();
                misconfigured(
                    name,
                    format!(
                        "the IdP metadata ({source}) has no SingleSignOnService with the \
                         HTTP-Redirect binding (found: {})",
                        if found.is_empty() {
                            "none".into()
                        } else {
                            found.join(", ")
                        }
                    ),
                )
            })?;
        if reqwest::Url::parse(&sso_redirect_url)
            .map(|u| !matches!(u.scheme(), "https" | "http"))
            .unwrap_or(true)
        {
            return Err(misconfigured(
                name,
                format!("the IdP's SSO location '{sso_redirect_url}' is not an http(s) URL"),
            ));
        }
        let mut signing_certs = Vec::new();
        for descriptor in &descriptors {
            for key in &descriptor.key_descriptors {
                // A KeyDescriptor without `use` is for signing and encryption alike.
                let signing = matches!(key.key_use.as_deref(), None | Some("") | Some("signing"));
                if !signing {
                    continue;
                }
                for b64 in key.key_info.x509_data.iter().flat_map(|d| &d.certificates) {
                    let der = samael::crypto::decode_x509_cert(b64).map_err(|e| {
                        misconfigured(
                            name,
                            format!("a signing certificate in the IdP metadata is not base64: {e}"),
                        )
                    })?;
                    signing_certs.push(summarize(der.der_data()).map_err(|e| {
                        misconfigured(
                            name,
                            format!("a signing certificate in the IdP metadata is not X.509: {e}"),
                        )
                    })?);
                }
            }
        }
        let want_authn_requests_signed = descriptors
            .iter()
            .any(|d| d.want_authn_requests_signed == Some(true));
        let valid_until = entity.valid_until;
        Ok((
            entity,
            IdpMetadata {
                entity_id,
                sso_redirect_url,
                source,
                signing_certs,
                valid_until,
                want_authn_requests_signed,
            },
        ))
    }

    pub(super) fn check_lines(&self, sp: &SpEndpoints, now: DateTime<Utc>) -> Vec<String> {
        let mut lines = vec![
            format!("metadata: {} (read and parsed)", self.source),
            format!("IdP entity ID: {}", self.entity_id),
            format!("SSO endpoint (HTTP-Redirect): {}", self.sso_redirect_url),
        ];
        if let Some(valid_until) = self.valid_until {
            lines.push(format!("metadata valid until {valid_until}"));
        }
        for (i, cert) in self.signing_certs.iter().enumerate() {
            let state = if cert.not_after <= now {
                "EXPIRED (signatures still verify: SAML trusts the key in the metadata, but the IdP should roll over)".to_string()
            } else if cert.not_before > now {
                "not yet valid".to_string()
            } else {
                format!("valid, {} days left", (cert.not_after - now).num_days())
            };
            lines.push(format!(
                "signing certificate {}: {} — {} to {} — {} — SHA-256 {}",
                i + 1,
                cert.subject,
                cert.not_before.format("%Y-%m-%d"),
                cert.not_after.format("%Y-%m-%d"),
                state,
                cert.sha256
            ));
        }
        if self.want_authn_requests_signed {
            lines.push(
                "warning: the IdP wants signed AuthnRequests (WantAuthnRequestsSigned); trustbroker \
                 sends them unsigned — turn that off for this SP at the IdP"
                    .into(),
            );
        }
        lines.push(format!(
            "register at the IdP: SP entity ID {} (also its metadata URL), ACS {} (HTTP-POST)",
            sp.metadata_url, sp.acs_url
        ));
        lines
    }
}

/// The local name of the document element, without parsing the whole document.
fn root_local_name(xml: &str) -> Option<&str> {
    let mut rest = xml;
    loop {
        let start = rest.find('<')?;
        rest = &rest[start + 1..];
        if rest.starts_with('?') || rest.starts_with('!') {
            continue;
        }
        let end = rest.find(|c: char| c.is_whitespace() || c == '>' || c == '/')?;
        let qname = &rest[..end];
        return Some(qname.rsplit(':').next().unwrap_or(qname));
    }
}

fn summarize(der: &[u8]) -> Result<CertSummary, der::Error> {
    let cert = x509_cert::Certificate::from_der(der)?;
    let validity = cert.tbs_certificate().validity();
    Ok(CertSummary {
        subject: cert.tbs_certificate().subject().to_string(),
        not_before: validity.not_before.to_system_time().into(),
        not_after: validity.not_after.to_system_time().into(),
        sha256: hex::encode(Sha256::digest(der)),
    })
}

/// Our SP metadata: entity ID = metadata URL, one HTTP-POST ACS, unsigned AuthnRequests,
/// signed assertions wanted. No validUntil: it is stable for as long as the URLs are.
pub(super) fn sp_metadata_xml(
    sp: &SpEndpoints,
    name_id_format: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let name_id_formats =
        (name_id_format != super::NAMEID_UNSPECIFIED).then(|| vec![name_id_format.to_string()]);
    let entity = EntityDescriptor {
        entity_id: Some(sp.metadata_url.clone()),
        sp_sso_descriptors: Some(vec![SpSsoDescriptor {
            protocol_support_enumeration: Some(SAML2_PROTOCOL.into()),
            authn_requests_signed: Some(false),
            want_assertions_signed: Some(true),
            name_id_formats,
            assertion_consumer_services: vec![IndexedEndpoint {
                binding: HTTP_POST_BINDING.into(),
                location: sp.acs_url.clone(),
                response_location: None,
                index: 0,
                is_default: Some(true),
            }],
            ..SpSsoDescriptor::default()
        }]),
        ..EntityDescriptor::default()
    };
    let xml = entity.to_string()?;
    Ok(xml)
}
