//! The AuthnRequest, sent over the HTTP-Redirect binding.

use chrono::{DateTime, Utc};
use samael::metadata::HTTP_POST_BINDING;
use samael::schema::{AuthnRequest, Issuer, NameIdPolicy};

use super::{NAMEID_UNSPECIFIED, SpEndpoints};

const ENTITY_FORMAT: &str = "urn:oasis:names:tc:SAML:2.0:nameid-format:entity";

/// A fresh AuthnRequest ID: 128 random bits, hex, after an underscore (an XML ID must not start
/// with a digit). samael's own IDs carry only 32 random bits, too few for an ID that the
/// Response's InResponseTo is checked against.
pub fn new_request_id() -> String {
    format!("_{}", hex::encode(crate::random::bytes::<16>()))
}

/// The IdP's SSO URL with `SAMLRequest` (deflated, base64) and `RelayState` (when not empty).
/// The request names our ACS and asks for the HTTP-POST binding, so the IdP cannot pick another
/// endpoint from our metadata.
pub(super) fn redirect_url(
    sso_url: &str,
    sp: &SpEndpoints,
    name_id_format: &str,
    id: &str,
    now: DateTime<Utc>,
    relay_state: &str,
) -> Result<String, Box<dyn std::error::Error>> {
    let request = AuthnRequest {
        id: id.into(),
        version: "2.0".into(),
        issue_instant: now,
        destination: Some(sso_url.into()),
        issuer: Some(Issuer {
            format: Some(ENTITY_FORMAT.into()),
            value: Some(sp.metadata_url.clone()),
            ..Issuer::default()
        }),
        name_id_policy: Some(NameIdPolicy {
            format: (name_id_format != NAMEID_UNSPECIFIED).then(|| name_id_format.into()),
            allow_create: Some(true),
            ..NameIdPolicy::default()
        }),
        assertion_consumer_service_url: Some(sp.acs_url.clone()),
        protocol_binding: Some(HTTP_POST_BINDING.into()),
        ..AuthnRequest::default()
    };
    let url = request
        .redirect(relay_state)?
        .ok_or("the AuthnRequest has no Destination")?;
    Ok(url.into())
}
