//! Unit tests that need no IdP: settings, metadata checks, the AuthnRequest encoding, refusals
//! that happen before or without a valid signature. `tests/it/saml.rs` runs the real thing
//! against SimpleSAMLphp.

use std::io::Read;
use std::str::FromStr;

use base64::Engine;
use samael::schema::AuthnRequest;

use super::*;

const SSO: &str = "https://idp.example.org/saml/sso?tenant=a";
const IDP_ENTITY: &str = "https://idp.example.org/saml/metadata";

fn endpoints() -> SpEndpoints {
    SpEndpoints {
        metadata_url: "https://mdm.example.org/auth/saml/corp/metadata".into(),
        acs_url: "https://mdm.example.org/auth/saml/corp/acs".into(),
    }
}

fn settings() -> SamlSettings {
    SamlSettings {
        metadata_file: Some(std::path::Path::new("/unused").into()),
        ..SamlSettings::default()
    }
}

fn cert_b64() -> String {
    let key = rcgen::generate_simple_self_signed(vec!["idp.example.org".into()]).expect("cert");
    base64::engine::general_purpose::STANDARD.encode(key.cert.der())
}

/// IdP metadata with the given KeyDescriptors and SSO bindings.
fn metadata(key_descriptors: &str, sso: &str) -> String {
    format!(
        r#"<?xml version="1.0"?>
<md:EntityDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata" xmlns:ds="http://www.w3.org/2000/09/xmldsig#" entityID="{IDP_ENTITY}">
  <md:IDPSSODescriptor protocolSupportEnumeration="urn:oasis:names:tc:SAML:2.0:protocol">
    {key_descriptors}
    <md:NameIDFormat>urn:oasis:names:tc:SAML:2.0:nameid-format:persistent</md:NameIDFormat>
    {sso}
  </md:IDPSSODescriptor>
</md:EntityDescriptor>"#
    )
}

fn key_descriptor(use_: &str) -> String {
    format!(
        r#"<md:KeyDescriptor{use_}><ds:KeyInfo><ds:X509Data><ds:X509Certificate>{}</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor>"#,
        cert_b64()
    )
}

fn redirect_sso() -> String {
    format!(
        r#"<md:SingleSignOnService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-Redirect" Location="{}"/>"#,
        SSO.replace('&', "&amp;")
    )
}

fn good_metadata() -> String {
    metadata(&key_descriptor(r#" use="signing""#), &redirect_sso())
}

fn provider() -> SamlProvider {
    SamlProvider::from_metadata_xml("corp", &settings(), endpoints(), &good_metadata())
        .expect("provider")
}

fn misconfigured_message(result: Result<SamlProvider, IdpError>) -> String {
    match result {
        Err(IdpError::Misconfigured(m)) => m,
        Err(other) => panic!("expected Misconfigured, got {other:?}"),
        Ok(_) => panic!("expected Misconfigured, got a provider"),
    }
}

#[test]
fn provider_is_send_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<SamlProvider>();
    assert_send_sync::<std::sync::Arc<SamlProvider>>();
}

#[test]
fn request_ids_are_128_random_bits_and_valid_xml_ids() {
    let ids: std::collections::HashSet<String> = (0..1000).map(|_| new_request_id()).collect();
    assert_eq!(ids.len(), 1000, "IDs repeat");
    for id in &ids {
        assert_eq!(id.len(), 33, "{id}");
        assert!(
            id.starts_with('_'),
            "an XML ID must not start with a digit: {id}"
        );
        assert!(
            id[1..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }
}

#[test]
fn authn_request_is_deflated_base64_with_destination_acs_and_post_binding() {
    let p = provider();
    let (url, id) = p.begin("state-123").expect("begin");
    let url = reqwest::Url::parse(&url).expect("url");
    assert_eq!(url.host_str(), Some("idp.example.org"));
    assert_eq!(url.path(), "/saml/sso");
    let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
    let get = |k: &str| {
        pairs
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(
        get("tenant").as_deref(),
        Some("a"),
        "the SSO URL's own query stays"
    );
    assert_eq!(get("RelayState").as_deref(), Some("state-123"));
    let deflated = base64::engine::general_purpose::STANDARD
        .decode(get("SAMLRequest").expect("SAMLRequest"))
        .expect("base64");
    let mut xml = String::new();
    flate2::read::DeflateDecoder::new(&deflated[..])
        .read_to_string(&mut xml)
        .expect("raw deflate");
    let request = AuthnRequest::from_str(&xml).expect("an AuthnRequest");
    assert_eq!(request.id, id);
    assert_eq!(request.version, "2.0");
    assert_eq!(request.destination.as_deref(), Some(SSO));
    assert_eq!(
        request.assertion_consumer_service_url.as_deref(),
        Some(endpoints().acs_url.as_str())
    );
    assert_eq!(
        request.protocol_binding.as_deref(),
        Some("urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST")
    );
    assert_eq!(
        request.issuer.and_then(|i| i.value).as_deref(),
        Some(endpoints().metadata_url.as_str())
    );
    assert_eq!(
        request.name_id_policy.and_then(|n| n.format).as_deref(),
        Some(NAMEID_PERSISTENT)
    );
    assert!((Utc::now() - request.issue_instant).num_seconds().abs() < 5);

    let (_, second) = p.begin("").expect("begin");
    assert_ne!(id, second);
    assert!(
        p.begin(&"x".repeat(81)).is_err(),
        "RelayState over 80 bytes"
    );
}

#[test]
fn sp_metadata_names_entity_and_post_acs() {
    let xml = provider().metadata_xml().expect("metadata");
    let parsed: samael::metadata::EntityDescriptor = xml.parse().expect("parses back");
    assert_eq!(
        parsed.entity_id.as_deref(),
        Some(endpoints().metadata_url.as_str())
    );
    let sp = &parsed.sp_sso_descriptors.expect("SPSSODescriptor")[0];
    assert_eq!(
        sp.assertion_consumer_services[0].location,
        endpoints().acs_url
    );
    assert_eq!(
        sp.assertion_consumer_services[0].binding,
        "urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST"
    );
    assert_eq!(sp.want_assertions_signed, Some(true));
}

#[test]
fn metadata_without_a_signing_certificate_is_refused() {
    let none = metadata("", &redirect_sso());
    let m = misconfigured_message(SamlProvider::from_metadata_xml(
        "corp",
        &settings(),
        endpoints(),
        &none,
    ));
    assert!(m.contains("no signing certificate"), "{m}");

    let encryption_only = metadata(&key_descriptor(r#" use="encryption""#), &redirect_sso());
    let m = misconfigured_message(SamlProvider::from_metadata_xml(
        "corp",
        &settings(),
        endpoints(),
        &encryption_only,
    ));
    assert!(m.contains("no signing certificate"), "{m}");

    // No `use` means signing and encryption: accepted.
    let unspecified = metadata(&key_descriptor(""), &redirect_sso());
    SamlProvider::from_metadata_xml("corp", &settings(), endpoints(), &unspecified)
        .expect("a KeyDescriptor without use signs");
}

#[test]
fn unusable_metadata_is_refused_with_a_reason() {
    let key = key_descriptor(r#" use="signing""#);
    let post_only = metadata(
        &key,
        r#"<md:SingleSignOnService Binding="urn:oasis:names:tc:SAML:2.0:bindings:HTTP-POST" Location="https://idp.example.org/sso"/>"#,
    );
    let cases = [
        (post_only, "HTTP-Redirect"),
        (
            format!(
                r#"<md:EntitiesDescriptor xmlns:md="urn:oasis:names:tc:SAML:2.0:metadata">{}</md:EntitiesDescriptor>"#,
                good_metadata().replace(r#"<?xml version="1.0"?>"#, "")
            ),
            "EntitiesDescriptor",
        ),
        (
            good_metadata().replace(
                "<md:EntityDescriptor ",
                r#"<md:EntityDescriptor validUntil="2020-01-01T00:00:00Z" "#,
            ),
            "expired",
        ),
        (
            good_metadata().replace(
                r#"<?xml version="1.0"?>"#,
                r#"<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "b">]>"#,
            ),
            "DOCTYPE",
        ),
        (
            good_metadata().replace("urn:oasis:names:tc:SAML:2.0:protocol", "urn:x"),
            "SAML 2.0",
        ),
        ("not xml".to_string(), "EntityDescriptor"),
        (
            metadata(
                r#"<md:KeyDescriptor use="signing"><ds:KeyInfo><ds:X509Data><ds:X509Certificate>AAAA</ds:X509Certificate></ds:X509Data></ds:KeyInfo></md:KeyDescriptor>"#,
                &redirect_sso(),
            ),
            "not X.509",
        ),
    ];
    for (xml, expected) in cases {
        let m = misconfigured_message(SamlProvider::from_metadata_xml(
            "corp",
            &settings(),
            endpoints(),
            &xml,
        ));
        assert!(m.contains(expected), "expected '{expected}' in: {m}");
    }
}

#[test]
fn settings_defaults_and_unknown_keys() {
    let s: SamlSettings = toml::from_str("metadata_url = \"https://idp/md\"").expect("settings");
    assert!(!s.allow_idp_initiated);
    assert_eq!(s.clock_skew_secs, 60);
    assert_eq!(s.max_response_age_secs, 180);
    assert_eq!(&*s.name_id_format, "persistent");
    assert_eq!(&*s.groups_attribute, "groups");
    assert_eq!(&*s.email_attribute, "mail");
    assert_eq!(&*s.display_name_attribute, "displayName");
    assert_eq!(&*s.login_attribute, "uid");
    assert!(s.subject_attribute.is_none());
    assert!(toml::from_str::<SamlSettings>("metadata_ulr = \"x\"").is_err());

    let check = |s: SamlSettings| {
        misconfigured_message(SamlProvider::from_metadata_xml(
            "corp",
            &s,
            endpoints(),
            &good_metadata(),
        ))
    };
    assert!(
        check(SamlSettings {
            metadata_url: Some("https://idp/md".into()),
            ..settings()
        })
        .contains("not both")
    );
    assert!(
        check(SamlSettings {
            clock_skew_secs: 301,
            ..settings()
        })
        .contains("clock_skew_secs")
    );
    assert!(
        check(SamlSettings {
            max_response_age_secs: 0,
            ..settings()
        })
        .contains("max_response_age_secs")
    );
    assert!(
        check(SamlSettings {
            name_id_format: "bogus".into(),
            ..settings()
        })
        .contains("name_id_format")
    );
}

#[tokio::test]
async fn plain_http_metadata_only_on_loopback() {
    let s = SamlSettings {
        metadata_url: Some("http://idp.example.org/metadata".into()),
        ..SamlSettings::default()
    };
    let m = misconfigured_message(SamlProvider::load("corp", &s, endpoints()).await);
    assert!(m.contains("https://"), "{m}");
}

fn forged_response(in_response_to: &str) -> String {
    let now = Utc::now();
    let later = now + chrono::Duration::minutes(5);
    let sp = endpoints();
    let xml = format!(
        r#"<samlp:Response xmlns:samlp="urn:oasis:names:tc:SAML:2.0:protocol" xmlns:saml="urn:oasis:names:tc:SAML:2.0:assertion" ID="_r1" Version="2.0" IssueInstant="{now}" Destination="{acs}" InResponseTo="{in_response_to}"><saml:Issuer>{IDP_ENTITY}</saml:Issuer><samlp:Status><samlp:StatusCode Value="urn:oasis:names:tc:SAML:2.0:status:Success"/></samlp:Status><saml:Assertion ID="_a1" Version="2.0" IssueInstant="{now}"><saml:Issuer>{IDP_ENTITY}</saml:Issuer><saml:Subject><saml:NameID Format="urn:oasis:names:tc:SAML:2.0:nameid-format:persistent">admin</saml:NameID><saml:SubjectConfirmation Method="urn:oasis:names:tc:SAML:2.0:cm:bearer"><saml:SubjectConfirmationData NotOnOrAfter="{later}" Recipient="{acs}" InResponseTo="{in_response_to}"/></saml:SubjectConfirmation></saml:Subject><saml:Conditions NotBefore="{now}" NotOnOrAfter="{later}"><saml:AudienceRestriction><saml:Audience>{entity}</saml:Audience></saml:AudienceRestriction></saml:Conditions><saml:AuthnStatement AuthnInstant="{now}"><saml:AuthnContext><saml:AuthnContextClassRef>urn:oasis:names:tc:SAML:2.0:ac:classes:Password</saml:AuthnContextClassRef></saml:AuthnContext></saml:AuthnStatement></saml:Assertion></samlp:Response>"#,
        now = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        later = later.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        acs = sp.acs_url,
        entity = sp.metadata_url,
    );
    base64::engine::general_purpose::STANDARD.encode(xml)
}

#[test]
fn an_unsigned_response_is_refused() {
    let p = provider();
    let (_, id) = p.begin("").expect("begin");
    match p.finish(&forged_response(&id), Some(&id)) {
        Err(IdpError::Refused(m)) => assert!(m.contains("sign"), "{m}"),
        other => panic!("an unsigned Response must be refused: {other:?}"),
    }
}

#[test]
fn idp_initiated_is_off_by_default_and_garbage_is_refused() {
    let p = provider();
    match p.finish(&forged_response(""), None) {
        Err(IdpError::Refused(m)) => assert!(m.contains("allow_idp_initiated"), "{m}"),
        other => panic!("{other:?}"),
    }
    for garbage in [
        "%%%",
        "",
        &base64::engine::general_purpose::STANDARD.encode("<x/>"),
        &base64::engine::general_purpose::STANDARD.encode([0xff, 0xfe]),
        &base64::engine::general_purpose::STANDARD
            .encode(r#"<!DOCTYPE x [<!ENTITY a "b">]><samlp:Response/>"#),
        &"A".repeat(600 * 1024),
    ] {
        assert!(
            matches!(p.finish(garbage, Some("_x")), Err(IdpError::Refused(_))),
            "{:.40}",
            garbage
        );
    }
}

#[test]
fn check_lists_entity_endpoint_and_certificate() {
    let lines = provider().check();
    let text = lines.join("\n");
    assert!(text.contains(IDP_ENTITY), "{text}");
    assert!(text.contains("HTTP-Redirect"), "{text}");
    assert!(text.contains("signing certificate 1"), "{text}");
    assert!(text.contains("days left"), "{text}");
    assert!(text.contains(&endpoints().acs_url), "{text}");
}

#[test]
fn the_documented_example_parses_as_an_idp_table() {
    use crate::identity::ProviderSettings;
    type Tables = std::collections::BTreeMap<String, ProviderSettings>;
    let tables: Tables = toml::from_str(
        r#"
        [corp-saml]
        type = "saml"
        label = "Corporate sign-in"
        metadata_url = "https://idp.example.org/saml/metadata"
        clock_skew_secs = 30
        subject_attribute = "uid"
        groups_attribute = "memberOf"
        display_name_attribute = "cn"
        "#,
    )
    .expect("an [idp.NAME] table");
    let Some(ProviderSettings::Saml(s)) = tables.get("corp-saml") else {
        panic!("a SAML provider");
    };
    assert_eq!(s.label.as_deref(), Some("Corporate sign-in"));
    assert_eq!(s.clock_skew_secs, 30);
    assert_eq!(s.subject_attribute.as_deref(), Some("uid"));
    assert_eq!(&*s.groups_attribute, "memberOf");
    assert_eq!(&*s.email_attribute, "mail");
    let typo = "[x]\ntype = \"saml\"\nmetadata_url = \"https://i/m\"\ngroup_attribute = \"g\"\n";
    assert!(
        toml::from_str::<Tables>(typo).is_err(),
        "unknown keys are refused"
    );
}
