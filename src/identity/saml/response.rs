//! Verifying a Response posted to our ACS, and reading the person from it.
//!
//! Two layers, both must pass:
//! 1. samael verifies every XML signature with the certificates from the IdP metadata only
//!    (never one embedded in the Response), restricted to SHA-2 algorithms, then *reduces the
//!    document to the signed part* and parses the Assertion from that reduced document; the
//!    claims below are read from that Assertion, so whatever an attacker wraps around or next to
//!    the signed part is never looked at (XML signature wrapping). It also checks Destination,
//!    InResponseTo, Issuer, Status, audience, bearer confirmation and times (system clock).
//! 2. Our own checks of the same Assertion against `now`, stricter where samael is lenient:
//!    an AudienceRestriction is required, IssueInstant must not be in the future, an
//!    InResponseTo is refused when none was expected, an AuthnStatement is required.

use std::borrow::Cow;

use base64::Engine;
use chrono::{DateTime, Duration, Utc};
use samael::crypto::AllowedSignatureAlgorithm;
use samael::schema::{Assertion, SubjectConfirmationData};

use super::{NAMEID_TRANSIENT, SamlLogin, SamlProvider, misconfigured};
use crate::identity::{Group, Identity, IdpError};

/// SHA-2 only: no SHA-1 (collisions), no DSA.
pub(super) const ALLOWED_ALGORITHMS: &[AllowedSignatureAlgorithm] = &[
    AllowedSignatureAlgorithm::RsaSha256,
    AllowedSignatureAlgorithm::RsaSha384,
    AllowedSignatureAlgorithm::RsaSha512,
    AllowedSignatureAlgorithm::EcdsaSha256,
    AllowedSignatureAlgorithm::EcdsaSha384,
    AllowedSignatureAlgorithm::EcdsaSha512,
];

/// A Response is a few KiB; this bounds the XML handed to libxml2.
const MAX_RESPONSE_B64_BYTES: usize = 512 * 1024;

const BEARER: &str = "urn:oasis:names:tc:SAML:2.0:cm:bearer";

pub(super) fn verify(
    p: &SamlProvider,
    saml_response: &str,
    expected_request_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<SamlLogin, IdpError> {
    let refused = |m: String| IdpError::Refused(format!("{}: {m}", p.name));
    if expected_request_id.is_none() && !p.settings.allow_idp_initiated {
        return Err(refused(
            "an unsolicited (IdP-initiated) Response, and allow_idp_initiated is off".into(),
        ));
    }
    let xml = decode(saml_response).map_err(refused)?;

    // samael checks InResponseTo unless told the Response may be unsolicited; only then.
    let sp = match expected_request_id {
        Some(_) => Cow::Borrowed(&p.sp),
        None => {
            let mut sp = p.sp.clone();
            sp.allow_idp_initiated = true;
            Cow::Owned(sp)
        }
    };
    // samael parses without any signature check when it finds no certificate. `load` refuses
    // such metadata; fail closed here too, should that ever change.
    if !matches!(sp.idp_signing_certs(), Ok(Some(certs)) if !certs.is_empty()) {
        return Err(misconfigured(
            &p.name,
            "no signing certificate to verify responses with".into(),
        ));
    }
    let ids = expected_request_id.map(|id| [id]);
    let assertion = sp
        .parse_xml_response(&xml, ids.as_ref().map(|ids| &ids[..]))
        .map_err(|e| refused(chain(&e)))?;

    let not_on_or_after =
        check_assertion(p, &assertion, expected_request_id, now).map_err(refused)?;
    let identity = identity_from(p, &assertion)?;
    Ok(SamlLogin {
        identity,
        assertion_id: assertion.id,
        not_on_or_after,
    })
}

fn decode(b64: &str) -> Result<String, String> {
    if b64.len() > MAX_RESPONSE_B64_BYTES {
        return Err(format!(
            "the SAMLResponse is larger than {MAX_RESPONSE_B64_BYTES} bytes"
        ));
    }
    // Some IdPs wrap the base64 at 76 columns.
    let compact: Vec<u8> = b64.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact)
        .map_err(|e| format!("the SAMLResponse is not base64: {e}"))?;
    let xml = String::from_utf8(bytes).map_err(|_| "the SAMLResponse is not UTF-8".to_string())?;
    // Never needed by SAML; refusing it rules out entity expansion in any XML parser below.
    if xml.contains("<!DOCTYPE") || xml.contains("<!ENTITY") {
        return Err("the SAMLResponse has a DOCTYPE".into());
    }
    Ok(xml)
}

/// Our checks of the verified Assertion at `now`; returns until when it stays acceptable.
fn check_assertion(
    p: &SamlProvider,
    a: &Assertion,
    expected_request_id: Option<&str>,
    now: DateTime<Utc>,
) -> Result<DateTime<Utc>, String> {
    let skew = Duration::seconds(p.settings.clock_skew_secs as i64);
    let max_age = Duration::seconds(p.settings.max_response_age_secs as i64);
    if a.version != "2.0" {
        return Err(format!(
            "the assertion has version '{}', not 2.0",
            a.version
        ));
    }
    if a.id.is_empty() {
        return Err("the assertion has no ID".into());
    }
    if a.issuer.value.as_deref() != Some(p.idp.entity_id.as_str()) {
        return Err(format!(
            "the assertion's Issuer is {:?}, not the IdP's entity ID '{}'",
            a.issuer.value, p.idp.entity_id
        ));
    }
    if a.issue_instant > now + skew {
        return Err(format!(
            "the assertion was issued in the future ({}): check both clocks",
            a.issue_instant
        ));
    }
    if a.issue_instant + max_age + skew < now {
        return Err(format!(
            "the assertion is too old: issued at {}, more than max_response_age_secs ago",
            a.issue_instant
        ));
    }
    let conditions = a
        .conditions
        .as_ref()
        .ok_or("the assertion has no Conditions")?;
    if let Some(not_before) = conditions.not_before
        && now + skew < not_before
    {
        return Err(format!("the assertion is not valid before {not_before}"));
    }
    if let Some(not_on_or_after) = conditions.not_on_or_after
        && now - skew >= not_on_or_after
    {
        return Err(format!("the assertion expired at {not_on_or_after}"));
    }
    let restrictions = conditions.audience_restrictions.as_deref().unwrap_or(&[]);
    if restrictions.is_empty() {
        return Err("the assertion has no AudienceRestriction".into());
    }
    let audience = &p.endpoints.metadata_url;
    for restriction in restrictions {
        if !restriction.audience.iter().any(|a| a == audience) {
            return Err(format!(
                "the assertion is meant for {:?}, not this SP ({audience})",
                restriction.audience
            ));
        }
    }
    let bearer: Vec<_> = a
        .subject
        .iter()
        .flat_map(|s| s.subject_confirmations.iter().flatten())
        .filter(|c| c.method.as_deref() == Some(BEARER))
        .collect();
    let mut first_error = None;
    let mut confirmed_until = None;
    for confirmation in bearer {
        match check_confirmation(
            confirmation.subject_confirmation_data.as_ref(),
            &p.endpoints.acs_url,
            expected_request_id,
            now,
            skew,
        ) {
            Ok(until) => {
                confirmed_until = Some(until);
                break;
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    let confirmed_until = confirmed_until.ok_or_else(|| {
        first_error.unwrap_or_else(|| "the assertion has no bearer SubjectConfirmation".into())
    })?;
    if a.authn_statements.as_ref().is_none_or(|s| s.is_empty()) {
        return Err("the assertion has no AuthnStatement".into());
    }
    let until = conditions
        .not_on_or_after
        .map_or(confirmed_until, |c| c.min(confirmed_until));
    Ok(until + skew)
}

fn check_confirmation(
    data: Option<&SubjectConfirmationData>,
    acs_url: &str,
    expected_request_id: Option<&str>,
    now: DateTime<Utc>,
    skew: Duration,
) -> Result<DateTime<Utc>, String> {
    let data = data.ok_or("the bearer SubjectConfirmation has no SubjectConfirmationData")?;
    if data.recipient.as_deref() != Some(acs_url) {
        return Err(format!(
            "the assertion's Recipient is {:?}, not our ACS ({acs_url})",
            data.recipient
        ));
    }
    let not_on_or_after = data
        .not_on_or_after
        .ok_or("the bearer SubjectConfirmationData has no NotOnOrAfter")?;
    if now - skew >= not_on_or_after {
        return Err(format!(
            "the assertion's subject confirmation expired at {not_on_or_after}"
        ));
    }
    if let Some(not_before) = data.not_before
        && now + skew < not_before
    {
        return Err(format!(
            "the assertion's subject confirmation is not valid before {not_before}"
        ));
    }
    match (expected_request_id, data.in_response_to.as_deref()) {
        (Some(expected), Some(got)) if expected == got => {}
        (Some(_), Some(got)) => {
            return Err(format!(
                "the Response answers request {got}, not the one this browser sent"
            ));
        }
        (Some(_), None) => {
            return Err("the Response answers no request although this browser sent one".into());
        }
        (None, Some(got)) => {
            return Err(format!(
                "the Response answers request {got}, but this browser sent none"
            ));
        }
        (None, None) => {}
    }
    Ok(not_on_or_after)
}

/// The values of one attribute (by `Name`), trimmed, empty ones dropped, duplicates removed.
fn attribute_values<'a>(a: &'a Assertion, name: &str) -> Vec<&'a str> {
    if name.is_empty() {
        return Vec::new();
    }
    let mut values: Vec<&str> = Vec::new();
    let all = a
        .attribute_statements
        .iter()
        .flatten()
        .flat_map(|s| &s.attributes)
        .filter(|attr| attr.name.as_deref() == Some(name))
        .flat_map(|attr| &attr.values)
        .filter_map(|v| v.value.as_deref())
        .map(str::trim)
        .filter(|v| !v.is_empty());
    for value in all {
        if !values.contains(&value) {
            values.push(value);
        }
    }
    values
}

fn identity_from(p: &SamlProvider, a: &Assertion) -> Result<Identity, IdpError> {
    let s = &p.settings;
    let name_id = a.subject.as_ref().and_then(|s| s.name_id.as_ref());
    // A transient NameID changes at every sign-in: it cannot key a person.
    let usable_name_id = name_id.filter(|n| n.format.as_deref() != Some(NAMEID_TRANSIENT));
    let subject = match (usable_name_id, &s.subject_attribute) {
        (Some(n), _) => {
            if n.value.trim().is_empty() {
                return Err(IdpError::Refused(format!(
                    "{}: the NameID is empty",
                    p.name
                )));
            }
            n.value.clone()
        }
        (None, Some(attribute)) => match attribute_values(a, attribute).as_slice() {
            [one] => (*one).to_string(),
            [] => {
                return Err(misconfigured(
                    &p.name,
                    format!(
                        "the NameID is transient or absent and the subject_attribute '{attribute}' \
                         is not in the assertion: release it to this SP at the IdP"
                    ),
                ));
            }
            _ => {
                return Err(IdpError::Refused(format!(
                    "{}: the subject_attribute '{attribute}' has several values",
                    p.name
                )));
            }
        },
        (None, None) => {
            return Err(misconfigured(
                &p.name,
                "the IdP sent a transient NameID (or none), which changes at every sign-in: \
                 configure a persistent NameID for this SP at the IdP, or set subject_attribute"
                    .into(),
            ));
        }
    };
    let first = |name: &str| attribute_values(a, name).first().map(|v| v.to_string());
    let mut groups: Vec<Group> = attribute_values(a, &s.groups_attribute)
        .into_iter()
        .map(|v| Group {
            id: v.to_string(),
            name: v.to_string(),
        })
        .collect();
    groups.sort();
    Ok(Identity {
        provider: p.name.clone(),
        subject,
        login: first(&s.login_attribute),
        email: first(&s.email_attribute),
        display_name: first(&s.display_name_attribute),
        groups,
    })
}

/// samael's errors say little on their own ("Failed to parse SAMLResponse"): add the causes.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}
