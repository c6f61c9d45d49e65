//! SAML 2.0 sign-in against the real SimpleSAMLphp IdP (`tests/peers/saml.sh`): a headless
//! browser (reqwest, a hand-kept cookie jar, redirects followed by hand) does an SP-initiated
//! login and hands the signed Response to `SamlProvider::finish`, unchanged or tampered with.
//!
//! The IdP trusts one SP: entity `http://127.0.0.1:8080/auth/saml/saml/metadata`, ACS
//! `…/saml/acs` (an IdP named `saml` on a broker at http://127.0.0.1:8080).

use std::process::Command;

use base64::Engine;
use chrono::{Duration, Utc};
use samael::crypto::{CertificateDer, Crypto, CryptoProvider};
use trustbroker::identity::saml::{
    SamlLogin, SamlProvider, SamlSettings, SpEndpoints, new_request_id,
};
use trustbroker::identity::{Group, IdpError};

use crate::harness::peer_env;

const SP_ENTITY: &str = "http://127.0.0.1:8080/auth/saml/saml/metadata";
const SP_ACS: &str = "http://127.0.0.1:8080/auth/saml/saml/acs";
const RELAY: &str = "relay-7f3a";

fn endpoints() -> SpEndpoints {
    SpEndpoints {
        metadata_url: SP_ENTITY.into(),
        acs_url: SP_ACS.into(),
    }
}

fn settings(metadata_url: &str) -> SamlSettings {
    SamlSettings {
        metadata_url: Some(metadata_url.into()),
        ..SamlSettings::default()
    }
}

async fn provider(metadata_url: &str) -> SamlProvider {
    loaded(settings(metadata_url)).await
}

async fn loaded(settings: SamlSettings) -> SamlProvider {
    SamlProvider::load("saml", &settings, endpoints())
        .await
        .expect("the provider loads the IdP's metadata")
}

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

fn unb64(s: &str) -> String {
    String::from_utf8(
        base64::engine::general_purpose::STANDARD
            .decode(s)
            .expect("base64"),
    )
    .expect("UTF-8")
}

fn refused(result: Result<SamlLogin, IdpError>, what: &str) -> String {
    match result {
        Err(IdpError::Refused(m)) => m,
        Err(other) => panic!("{what}: expected Refused, got {other:?}"),
        Ok(login) => panic!("{what}: accepted, subject {:?}", login.identity.subject),
    }
}

/// A browser enough for SimpleSAMLphp: cookies by name, redirects followed by hand.
struct Browser {
    client: reqwest::Client,
    cookies: Vec<(String, String)>,
}

impl Browser {
    fn new() -> Browser {
        Browser {
            client: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .timeout(std::time::Duration::from_secs(20))
                .build()
                .expect("client"),
            cookies: Vec::new(),
        }
    }

    fn keep_cookies(&mut self, response: &reqwest::Response) {
        for header in response.headers().get_all(reqwest::header::SET_COOKIE) {
            let Some((name, value)) = header
                .to_str()
                .ok()
                .and_then(|h| h.split(';').next())
                .and_then(|pair| pair.split_once('='))
            else {
                continue;
            };
            self.cookies.retain(|(n, _)| n != name.trim());
            self.cookies.push((name.trim().into(), value.trim().into()));
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(n, v)| format!("{n}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Sends the request, then follows redirects with GETs; returns the last URL and body.
    async fn fetch(&mut self, request: reqwest::RequestBuilder) -> (reqwest::Url, String) {
        let mut response = request
            .header(reqwest::header::COOKIE, self.cookie_header())
            .send()
            .await
            .expect("the IdP answers");
        for _ in 0..10 {
            self.keep_cookies(&response);
            if !response.status().is_redirection() {
                let url = response.url().clone();
                let status = response.status();
                let body = response.text().await.expect("body");
                assert!(status.is_success(), "HTTP {status} from {url}: {body:.400}");
                return (url, body);
            }
            let location = response
                .headers()
                .get(reqwest::header::LOCATION)
                .and_then(|l| l.to_str().ok())
                .expect("a redirect has a Location");
            let next = response.url().join(location).expect("Location is a URL");
            response = self
                .client
                .get(next)
                .header(reqwest::header::COOKIE, self.cookie_header())
                .send()
                .await
                .expect("the IdP answers");
        }
        panic!("too many redirects");
    }
}

fn html_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&#039;", "'")
        .replace("&#39;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

/// The value of `<input … name="NAME" value="…">` in a SimpleSAMLphp page.
fn form_field(page: &str, name: &str) -> Option<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = page.find(&marker)? + marker.len();
    let end = page[start..].find('"')? + start;
    Some(html_unescape(&page[start..end]))
}

/// Signs in at the IdP from `sso_url` (the redirect `begin()` made, or an IdP-initiated
/// address) and returns the auto-POST form's SAMLResponse and RelayState.
pub async fn idp_login(sso_url: &str, user: &str, password: &str) -> (String, Option<String>) {
    let mut browser = Browser::new();
    let (login_url, page) = browser.fetch(browser.client.get(sso_url)).await;
    assert!(
        login_url.path().contains("loginuserpass"),
        "expected the login form, got {login_url}"
    );
    let auth_state = form_field(&page, "AuthState").expect("AuthState in the login form");
    let mut post_url = login_url.clone();
    post_url.set_query(None);
    let form = [
        ("username", user),
        ("password", password),
        ("AuthState", auth_state.as_str()),
    ];
    let (_, page) = browser
        .fetch(browser.client.post(post_url).form(&form))
        .await;
    let response = form_field(&page, "SAMLResponse")
        .unwrap_or_else(|| panic!("no SAMLResponse for {user}: {page:.600}"));
    assert!(
        page.contains(&format!("action=\"{SP_ACS}\"")),
        "the IdP posts to our ACS"
    );
    (response, form_field(&page, "RelayState"))
}

/// A real SP-initiated sign-in: `begin()`, the IdP's login form, the posted Response.
/// Returns the Response (base64) and the AuthnRequest ID to expect.
async fn sign_in(p: &SamlProvider, user: &str, password: &str) -> (String, String) {
    let (url, request_id) = p.begin(RELAY).expect("begin");
    let (response, relay) = idp_login(&url, user, password).await;
    assert_eq!(relay.as_deref(), Some(RELAY), "RelayState comes back");
    assert!(
        unb64(&response).contains(&format!("InResponseTo=\"{request_id}\"")),
        "the IdP answered our AuthnRequest"
    );
    (response, request_id)
}

/// Removes every `<ds:Signature>…</ds:Signature>`, or only the n-th (0-based; SimpleSAMLphp:
/// 0 = the Response's, 1 = the Assertion's).
fn strip_signatures(xml: &str, only: Option<usize>) -> String {
    let mut out = String::new();
    let mut rest = xml;
    let mut index = 0;
    while let Some(start) = rest.find("<ds:Signature") {
        let end = rest[start..]
            .find("</ds:Signature>")
            .expect("closed Signature")
            + start
            + "</ds:Signature>".len();
        let keep = only.is_some_and(|n| n != index);
        out.push_str(&rest[..start]);
        if keep {
            out.push_str(&rest[start..end]);
        }
        rest = &rest[end..];
        index += 1;
    }
    out.push_str(rest);
    out
}

fn assertion_of(xml: &str) -> &str {
    let start = xml.find("<saml:Assertion").expect("an Assertion");
    let end = xml.find("</saml:Assertion>").expect("closed") + "</saml:Assertion>".len();
    &xml[start..end]
}

#[tokio::test]
async fn sign_in_yields_the_person_with_groups() {
    let Some(url) = peer_env("TRUSTBROKER_TEST_SAML_METADATA_URL") else {
        return;
    };
    let p = provider(&url).await;
    assert_eq!(
        p.idp_entity_id(),
        url,
        "SimpleSAMLphp's entity ID is its metadata URL"
    );

    let (response, id) = sign_in(&p, "alice", "alicepw").await;
    let login = p.finish(&response, Some(&id)).expect("alice signs in");
    let alice = &login.identity;
    assert_eq!(alice.provider, "saml");
    assert_eq!(alice.subject, "alice", "the persistent NameID");
    assert_eq!(alice.login.as_deref(), Some("alice"));
    assert_eq!(alice.email.as_deref(), Some("alice@example.org"));
    assert_eq!(alice.display_name.as_deref(), Some("Alice Anderson"));
    let group = |n: &str| Group {
        id: n.into(),
        name: n.into(),
    };
    assert_eq!(alice.groups, vec![group("admins"), group("staff")]);
    assert!(
        login.assertion_id.starts_with('_'),
        "{}",
        login.assertion_id
    );
    // SimpleSAMLphp: NotOnOrAfter = issue + 5 min; plus our 60 s skew.
    let now = Utc::now();
    assert!(login.not_on_or_after > now + Duration::minutes(5));
    assert!(login.not_on_or_after <= now + Duration::minutes(6) + Duration::seconds(5));

    let (response, id) = sign_in(&p, "bob", "bobpw").await;
    let bob = p
        .finish(&response, Some(&id))
        .expect("bob signs in")
        .identity;
    assert_eq!(bob.subject, "bob");
    assert_eq!(bob.groups, vec![group("mdm-users"), group("staff")]);

    // Settings choose the attributes.
    let custom = loaded(SamlSettings {
        display_name_attribute: "cn".into(),
        email_attribute: "eduPersonPrincipalName".into(),
        groups_attribute: "".into(),
        ..settings(&url)
    })
    .await;
    let (response, id) = sign_in(&custom, "carol", "carolpw").await;
    let carol = custom.finish(&response, Some(&id)).expect("carol").identity;
    assert_eq!(carol.display_name.as_deref(), Some("Carol Clark"));
    assert_eq!(carol.email.as_deref(), Some("carol@example.org"));
    assert!(carol.groups.is_empty());

    let lines = p.check().join("\n");
    assert!(
        lines.contains("signing certificate 1: CN=test-idp.example.org"),
        "{lines}"
    );
    assert!(
        lines.contains("http://127.0.0.1:8443/saml2/idp/SSOService.php"),
        "{lines}"
    );
}

#[tokio::test]
async fn a_tampered_response_is_refused() {
    let Some(url) = peer_env("TRUSTBROKER_TEST_SAML_METADATA_URL") else {
        return;
    };
    let p = provider(&url).await;
    let (response, id) = sign_in(&p, "bob", "bobpw").await;
    let xml = unb64(&response);
    for (what, from, to) in [
        ("NameID", ">bob</saml:NameID>", ">alice</saml:NameID>"),
        (
            "a group",
            ">mdm-users</saml:AttributeValue>",
            ">admins</saml:AttributeValue>",
        ),
        ("the audience", SP_ENTITY, "http://127.0.0.1:8080/x"),
    ] {
        assert!(xml.contains(from), "{what}: '{from}' is in the Response");
        let tampered = xml.replacen(from, to, 1);
        let m = refused(p.finish(&b64(&tampered), Some(&id)), what);
        assert!(m.contains("sign"), "{what}: {m}");
    }
    // The untouched Response still passes: the refusals above are the tampering's.
    p.finish(&response, Some(&id)).expect("the original");
}

#[tokio::test]
async fn unsigned_or_foreign_signed_responses_are_refused() {
    let Some(url) = peer_env("TRUSTBROKER_TEST_SAML_METADATA_URL") else {
        return;
    };
    let p = provider(&url).await;
    let (response, id) = sign_in(&p, "alice", "alicepw").await;
    let xml = unb64(&response);

    let unsigned = strip_signatures(&xml, None);
    assert!(!unsigned.contains("Signature"));
    refused(p.finish(&b64(&unsigned), Some(&id)), "no signature");

    // The Assertion's own signature is enough (the unsigned Response around it is then not
    // read at all) ...
    let assertion_signed = strip_signatures(&xml, Some(0));
    let login = p
        .finish(&b64(&assertion_signed), Some(&id))
        .expect("only the Assertion signed");
    assert_eq!(login.identity.subject, "alice");
    // ... but SimpleSAMLphp signs the Response over the signed Assertion: removing the
    // Assertion's signature is tampering with what the Response's signature covers.
    let m = refused(
        p.finish(&b64(&strip_signatures(&xml, Some(1))), Some(&id)),
        "Assertion signature removed",
    );
    assert!(m.contains("sign"), "{m}");

    // Signed by someone else, who put their own certificate in KeyInfo: only the metadata's
    // certificate counts.
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("k.der");
    let cert = dir.path().join("c.der");
    let status = Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", "/CN=test-idp.example.org", "-outform", "DER"])
        .arg("-keyout")
        .arg(dir.path().join("k.pem"))
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(status.status.success(), "{status:?}");
    let status = Command::new("openssl")
        .args(["pkey", "-outform", "DER", "-in"])
        .arg(dir.path().join("k.pem"))
        .arg("-out")
        .arg(&key)
        .output()
        .expect("openssl");
    assert!(status.status.success(), "{status:?}");
    let cert_der = std::fs::read(&cert).expect("cert");
    let key_der = std::fs::read(&key).expect("key");
    let idp_cert_b64 = {
        let start = xml.find("<ds:X509Certificate>").expect("KeyInfo") + 20;
        let end = xml[start..].find('<').expect("closed") + start;
        xml[start..end].to_string()
    };
    let forged = strip_signatures(&xml, Some(0))
        .replace(">alice</saml:NameID>", ">admin</saml:NameID>")
        .replace(
            &idp_cert_b64,
            &base64::engine::general_purpose::STANDARD.encode(&cert_der),
        );
    let forged = Crypto::sign_xml(&forged, &key_der).expect("re-signed with another key");
    Crypto::verify_signed_xml(&forged, &CertificateDer::from(cert_der), Some("ID"))
        .expect("the forgery is validly signed by its own key");
    let m = refused(p.finish(&b64(&forged), Some(&id)), "signed by another key");
    assert!(m.contains("sign"), "{m}");
}

#[tokio::test]
async fn signature_wrapping_reads_only_the_signed_assertion() {
    let Some(url) = peer_env("TRUSTBROKER_TEST_SAML_METADATA_URL") else {
        return;
    };
    let p = provider(&url).await;
    let (response, id) = sign_in(&p, "bob", "bobpw").await;
    // Keep only the Assertion's signature, so the Response wrapper can be rearranged.
    let xml = strip_signatures(&unb64(&response), Some(0));
    p.finish(&b64(&xml), Some(&id))
        .expect("the Assertion's signature alone verifies");
    let signed = assertion_of(&xml).to_string();
    let evil = strip_signatures(&signed, None)
        .replace(">bob</saml:NameID>", ">admin</saml:NameID>")
        .replace(">mdm-users<", ">admins<");
    let evil_new_id = {
        let start = evil.find("ID=\"").expect("ID") + 4;
        let end = evil[start..].find('"').expect("closed") + start;
        evil.replace(&evil[start..end], "_evil0123456789")
    };
    let cases = [
        // The evil assertion first, the signed one after it.
        (
            "evil before",
            xml.replace(&signed, &format!("{evil_new_id}{signed}")),
        ),
        (
            "evil after",
            xml.replace(&signed, &format!("{signed}{evil_new_id}")),
        ),
        // Same ID as the signed one: which one a reference points at would be ambiguous.
        (
            "duplicate ID",
            xml.replace(&signed, &format!("{evil}{signed}")),
        ),
        // The signed assertion hidden in an Extensions element, the evil one in its place.
        (
            "signed one moved into Extensions",
            xml.replace(
                &signed,
                &format!("<samlp:Extensions>{signed}</samlp:Extensions>{evil_new_id}"),
            ),
        ),
        // The evil assertion nested inside the signed one.
        (
            "evil nested in the signed one",
            xml.replace(
                "</saml:Assertion>",
                &format!("{evil_new_id}</saml:Assertion>"),
            ),
        ),
    ];
    for (what, wrapped) in cases {
        match p.finish(&b64(&wrapped), Some(&id)) {
            Err(IdpError::Refused(_)) => {}
            Err(other) => panic!("{what}: {other:?}"),
            Ok(login) => {
                assert_eq!(
                    login.identity.subject, "bob",
                    "{what}: read the unsigned assertion"
                );
                assert!(
                    !login.identity.groups.iter().any(|g| g.id == "admins"),
                    "{what}: read the unsigned assertion's groups"
                );
            }
        }
    }
}

#[tokio::test]
async fn audience_destination_and_in_response_to_must_be_ours() {
    let Some(url) = peer_env("TRUSTBROKER_TEST_SAML_METADATA_URL") else {
        return;
    };
    let p = provider(&url).await;
    let (response, id) = sign_in(&p, "alice", "alicepw").await;

    // The same IdP, but this SP has another entity ID: the assertion is not for it.
    let other = SamlProvider::load(
        "saml",
        &settings(&url),
        SpEndpoints {
            metadata_url: "http://127.0.0.1:8080/auth/saml/other/metadata".into(),
            acs_url: SP_ACS.into(),
        },
    )
    .await
    .expect("load");
    let m = refused(other.finish(&response, Some(&id)), "wrong audience");
    assert!(m.to_lowercase().contains("audience"), "{m}");

    // Another ACS: Destination and Recipient are not ours.
    let other_acs = SamlProvider::load(
        "saml",
        &settings(&url),
        SpEndpoints {
            metadata_url: SP_ENTITY.into(),
            acs_url: "http://127.0.0.1:8080/auth/saml/other/acs".into(),
        },
    )
    .await
    .expect("load");
    let m = refused(other_acs.finish(&response, Some(&id)), "wrong destination");
    assert!(m.contains("destination") || m.contains("ACS"), "{m}");

    // An answer to another request (another browser's, or an old one).
    refused(
        p.finish(&response, Some(&new_request_id())),
        "wrong InResponseTo",
    );
    // An answer to a request although this browser sent none, even with IdP-initiated on.
    let unsolicited_ok = loaded(SamlSettings {
        allow_idp_initiated: true,
        ..settings(&url)
    })
    .await;
    let m = refused(
        unsolicited_ok.finish(&response, None),
        "InResponseTo without a request",
    );
    assert!(m.contains("sent none"), "{m}");

    p.finish(&response, Some(&id)).expect("the right request");
}

#[tokio::test]
async fn idp_initiated_sign_in_only_when_allowed() {
    let Some(url) = peer_env("TRUSTBROKER_TEST_SAML_METADATA_URL") else {
        return;
    };
    let p = provider(&url).await;
    let idp_base = url.split("/saml2/").next().expect("IdP base URL");
    let mut sso =
        reqwest::Url::parse(&format!("{idp_base}/saml2/idp/SSOService.php")).expect("url");
    sso.query_pairs_mut().append_pair("spentityid", SP_ENTITY);
    let (response, _) = idp_login(sso.as_str(), "carol", "carolpw").await;
    assert!(!unb64(&response).contains("InResponseTo"), "unsolicited");

    let m = refused(p.finish(&response, None), "IdP-initiated by default");
    assert!(m.contains("allow_idp_initiated"), "{m}");
    // Nor may it stand in for the answer to a request this browser sent.
    refused(
        p.finish(&response, Some(&new_request_id())),
        "no InResponseTo",
    );

    let allowing = loaded(SamlSettings {
        allow_idp_initiated: true,
        ..settings(&url)
    })
    .await;
    let login = allowing.finish(&response, None).expect("allowed");
    assert_eq!(login.identity.subject, "carol");
    refused(
        allowing.finish(&response, Some(&new_request_id())),
        "unsolicited where a request was sent",
    );
}

/// The provider cannot see a replay: the same Response verifies twice, with the same
/// assertion ID, which is what the caller's replay cache keys on (until `not_on_or_after`).
#[tokio::test]
async fn a_replayed_response_has_the_same_assertion_id_for_the_cache() {
    let Some(url) = peer_env("TRUSTBROKER_TEST_SAML_METADATA_URL") else {
        return;
    };
    let p = provider(&url).await;
    let (response, id) = sign_in(&p, "alice", "alicepw").await;
    let first = p.finish(&response, Some(&id)).expect("first");
    let second = p.finish(&response, Some(&id)).expect("second");
    assert_eq!(first.assertion_id, second.assertion_id);
    assert_eq!(first.not_on_or_after, second.not_on_or_after);
    assert!(
        unb64(&response).contains(&format!("ID=\"{}\"", first.assertion_id)),
        "the signed Assertion's own ID"
    );
    // A new sign-in is a new assertion.
    let (again, id) = sign_in(&p, "alice", "alicepw").await;
    let third = p.finish(&again, Some(&id)).expect("third");
    assert_ne!(first.assertion_id, third.assertion_id);
}

#[tokio::test]
async fn expired_and_not_yet_valid_responses_are_refused() {
    let Some(url) = peer_env("TRUSTBROKER_TEST_SAML_METADATA_URL") else {
        return;
    };
    let p = provider(&url).await;
    let (response, id) = sign_in(&p, "bob", "bobpw").await;
    let now = Utc::now();
    p.finish_at(&response, Some(&id), now).expect("now");
    let m = refused(
        p.finish_at(
            &response,
            Some(&id),
            now + Duration::minutes(4) + Duration::seconds(30),
        ),
        "older than max_response_age_secs (180 s) + skew",
    );
    assert!(m.contains("too old"), "{m}");
    let m = refused(
        p.finish_at(&response, Some(&id), now + Duration::minutes(7)),
        "expired",
    );
    assert!(m.contains("expired") || m.contains("too old"), "{m}");
    let m = refused(
        p.finish_at(&response, Some(&id), now - Duration::minutes(10)),
        "not yet valid",
    );
    assert!(
        m.contains("future") || m.contains("not valid before"),
        "{m}"
    );

    // A longer max_response_age_secs: then the assertion's own NotOnOrAfter decides.
    let patient = loaded(SamlSettings {
        max_response_age_secs: 3600,
        clock_skew_secs: 0,
        ..settings(&url)
    })
    .await;
    patient
        .finish_at(&response, Some(&id), now + Duration::minutes(4))
        .expect("before NotOnOrAfter");
    let m = refused(
        patient.finish_at(
            &response,
            Some(&id),
            now + Duration::minutes(5) + Duration::seconds(5),
        ),
        "past NotOnOrAfter",
    );
    assert!(m.contains("expired"), "{m}");
}

#[tokio::test]
async fn metadata_without_a_signing_certificate_is_refused_at_load() {
    let Some(url) = peer_env("TRUSTBROKER_TEST_SAML_METADATA_URL") else {
        return;
    };
    let xml = reqwest::get(&url)
        .await
        .expect("metadata")
        .text()
        .await
        .expect("text");
    let start = xml
        .find("<md:KeyDescriptor use=\"signing\">")
        .expect("a signing key");
    let end = xml[start..].find("</md:KeyDescriptor>").expect("closed") + start + 19;
    let without = format!("{}{}", &xml[..start], &xml[end..]);
    assert!(
        without.contains("use=\"encryption\""),
        "an encryption key stays"
    );

    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("idp.xml");
    std::fs::write(&file, &without).expect("write");
    let s = SamlSettings {
        metadata_file: Some(file.as_path().into()),
        ..SamlSettings::default()
    };
    match SamlProvider::load("saml", &s, endpoints()).await {
        Err(IdpError::Misconfigured(m)) => assert!(m.contains("no signing certificate"), "{m}"),
        other => panic!("expected Misconfigured: {:?}", other.map(|_| "a provider")),
    }
    // The same file with the key is fine.
    std::fs::write(&file, &xml).expect("write");
    SamlProvider::load("saml", &s, endpoints())
        .await
        .expect("metadata_file with its signing key");

    // Unreachable metadata is the operator's to fix, and says so.
    let closed = SamlSettings {
        metadata_url: Some("http://127.0.0.1:9/metadata".into()),
        ..SamlSettings::default()
    };
    match SamlProvider::load("saml", &closed, endpoints()).await {
        Err(IdpError::Unreachable(m)) => assert!(m.contains("127.0.0.1:9"), "{m}"),
        other => panic!("expected Unreachable: {:?}", other.map(|_| "a provider")),
    }
}

/// The IdP's metadata is read again (`metadata_refresh_secs`; 0 here: at every use), and a
/// refresh that fails keeps the metadata read before instead of breaking sign-in.
#[tokio::test]
async fn metadata_is_refreshed_and_a_failed_refresh_keeps_the_last_good_one() {
    let Some(url) = peer_env("TRUSTBROKER_TEST_SAML_METADATA_URL") else {
        return;
    };
    let xml = reqwest::get(&url).await.unwrap().text().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("idp-metadata.xml");
    std::fs::write(&file, &xml).unwrap();
    let table = format!(
        "type = \"saml\"\nmetadata_file = \"{}\"\nmetadata_refresh_secs = 0\n",
        file.display()
    );
    let settings: trustbroker::identity::ProviderSettings = toml::from_str(&table).unwrap();
    let providers = trustbroker::identity::IdentityProviders::from_config(
        &[("saml".to_string(), settings)],
        "http://127.0.0.1:8080",
    )
    .unwrap();
    let trustbroker::identity::Provider::Saml(slot) = &providers.get("saml").unwrap().provider
    else {
        panic!("a SAML provider");
    };
    let first = slot.get().await.unwrap();
    let second = slot.get().await.unwrap();
    assert!(!std::sync::Arc::ptr_eq(&first, &second), "read again");
    std::fs::write(&file, "not metadata").unwrap();
    let kept = slot.get().await.expect("the last good metadata is kept");
    assert!(std::sync::Arc::ptr_eq(&kept, &second));
    // It still verifies sign-ins.
    let (response, request_id) = sign_in(&kept, "bob", "bobpw").await;
    let login = kept.finish(&response, Some(&request_id)).unwrap();
    assert_eq!(login.identity.subject, "bob");
}
