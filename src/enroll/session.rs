//! Portal cookies: the signed-in session and the state of a sign-in in flight, both sealed with
//! the master key (AEAD, so they can be neither read nor forged), each with its own expiry
//! inside the seal. No server-side session table: any instance can read them.

use axum::http::header::{COOKIE, SET_COOKIE};
use axum::http::{HeaderMap, HeaderValue};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use subtle::ConstantTimeEq;

use crate::secrets::MasterKey;

pub const SESSION_COOKIE: &str = "tb_session";
/// The anti-CSRF token of a person not signed in yet (the sign-in forms post it back).
pub const CSRF_COOKIE: &str = "tb_csrf";
pub const LOGIN_COOKIE: &str = "tb_login";
/// A sign-in at the provider must finish within this long.
pub const LOGIN_TTL_SECS: i64 = 600;

const SESSION_PURPOSE: &str = "portal-session";
const LOGIN_PURPOSE: &str = "portal-login";

/// A signed-in person.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Session {
    pub user_id: String,
    pub provider: String,
    /// Posted back by the portal's forms.
    pub csrf: String,
    pub expires_at: i64,
}

/// Where a sign-in leads once the provider vouched for the person: the enrollment portal, or
/// the admin console (`?for=admin` on the login routes, `for=admin` in the LDAP form). The
/// provider flows are the same; only what the identity is used for differs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SignInTarget {
    #[default]
    Portal,
    Console,
}

impl SignInTarget {
    /// `for=admin` selects the console; anything else (or nothing) the portal.
    pub fn from_param(value: Option<&str>) -> SignInTarget {
        match value {
            Some("admin") => SignInTarget::Console,
            _ => SignInTarget::Portal,
        }
    }
}

/// A sign-in in flight at an OpenID or SAML provider.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PendingLogin {
    pub provider: String,
    /// What the sign-in is for (sealed with the rest, so it cannot be switched on the way).
    #[serde(default)]
    pub target: SignInTarget,
    pub oidc: Option<crate::identity::oidc::OidcPending>,
    /// The AuthnRequest ID a SAML Response must answer.
    pub saml_request_id: Option<String>,
    pub expires_at: i64,
}

/// How cookies are marked and named: on HTTPS (the public URL decides) they are `Secure` and
/// carry the `__Host-` prefix, which browsers accept only on a Secure, `Path=/` cookie without a
/// `Domain`; so a sibling subdomain, or a plain-http page of ours, cannot plant one (session
/// fixation, or a CSRF token the attacker knows). Plain http keeps the bare names, where the
/// prefix is not allowed.
#[derive(Clone, Copy, Debug)]
pub struct CookiePolicy {
    pub secure: bool,
}

impl CookiePolicy {
    /// The name cookie `base` goes by under this policy.
    pub fn name(&self, base: &str) -> String {
        if self.secure {
            format!("__Host-{base}")
        } else {
            base.to_owned()
        }
    }

    /// The value of cookie `base` in the request, under its policy name only: on HTTPS a bare
    /// `tb_session` is someone else's cookie and is ignored.
    pub fn get<'a>(&self, headers: &'a HeaderMap, base: &str) -> Option<&'a str> {
        cookie(headers, &self.name(base))
    }

    /// A `Set-Cookie` value. `cross_site_post` is for the SAML ACS, which the IdP's page posts
    /// to from another site: Lax cookies are not sent then, so it needs `SameSite=None`, which
    /// browsers accept only with `Secure`.
    pub fn set(&self, base: &str, value: &str, max_age: i64, cross_site_post: bool) -> HeaderValue {
        let same_site = if cross_site_post && self.secure {
            "None"
        } else {
            "Lax"
        };
        let secure = if self.secure { "; Secure" } else { "" };
        let name = self.name(base);
        // Never a Domain attribute: a host-only cookie (and `__Host-` requires it).
        let text = format!(
            "{name}={value}; Path=/; Max-Age={max_age}; HttpOnly; SameSite={same_site}{secure}"
        );
        HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static(""))
    }

    pub fn clear(&self, base: &str) -> HeaderValue {
        self.set(base, "", 0, false)
    }
}

/// The value of cookie `name` in the request, if present.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(n, _)| *n == name)
        .map(|(_, v)| v)
}

pub fn append(headers: &mut HeaderMap, value: HeaderValue) {
    headers.append(SET_COOKIE, value);
}

pub fn random_token() -> String {
    URL_SAFE_NO_PAD.encode(crate::random::bytes::<32>())
}

/// Constant-time comparison of a posted token with the expected one.
pub fn tokens_match(posted: &str, expected: &str) -> bool {
    !expected.is_empty() && bool::from(posted.as_bytes().ct_eq(expected.as_bytes()))
}

pub fn seal_session(key: &MasterKey, session: &Session) -> String {
    seal(key, SESSION_PURPOSE, session)
}

pub fn open_session(
    key: &MasterKey,
    cookies: &CookiePolicy,
    headers: &HeaderMap,
) -> Option<Session> {
    let session: Session = open(key, SESSION_PURPOSE, cookies.get(headers, SESSION_COOKIE)?)?;
    (session.expires_at > chrono::Utc::now().timestamp()).then_some(session)
}

pub fn seal_login(key: &MasterKey, login: &PendingLogin) -> String {
    seal(key, LOGIN_PURPOSE, login)
}

pub fn open_login(
    key: &MasterKey,
    cookies: &CookiePolicy,
    headers: &HeaderMap,
) -> Option<PendingLogin> {
    let login: PendingLogin = open(key, LOGIN_PURPOSE, cookies.get(headers, LOGIN_COOKIE)?)?;
    (login.expires_at > chrono::Utc::now().timestamp()).then_some(login)
}

pub(crate) fn seal<T: Serialize>(key: &MasterKey, purpose: &str, value: &T) -> String {
    let json = serde_json::to_vec(value).unwrap_or_default();
    // The sealed form is base64 already; URL-safe keeps it a valid cookie value.
    URL_SAFE_NO_PAD.encode(key.seal(purpose, &json))
}

pub(crate) fn open<T: DeserializeOwned>(key: &MasterKey, purpose: &str, value: &str) -> Option<T> {
    let sealed = URL_SAFE_NO_PAD.decode(value).ok()?;
    let sealed = String::from_utf8(sealed).ok()?;
    let json = key.open(purpose, &sealed).ok()?;
    serde_json::from_slice(&json).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> MasterKey {
        MasterKey::from_bytes(&[7; 32])
    }

    #[test]
    fn sessions_round_trip_and_expire() {
        let mut headers = HeaderMap::new();
        let session = Session {
            user_id: "u1".into(),
            provider: "ldap".into(),
            csrf: random_token(),
            expires_at: chrono::Utc::now().timestamp() + 60,
        };
        let value = seal_session(&key(), &session);
        headers.insert(
            COOKIE,
            format!("a=b; {SESSION_COOKIE}={value}").parse().unwrap(),
        );
        let http = CookiePolicy { secure: false };
        assert_eq!(open_session(&key(), &http, &headers).unwrap().user_id, "u1");
        // Another key, or the login purpose, cannot open it.
        assert!(open_session(&MasterKey::from_bytes(&[8; 32]), &http, &headers).is_none());
        // On HTTPS only the `__Host-` name counts: the bare one may have been planted.
        let https = CookiePolicy { secure: true };
        assert!(open_session(&key(), &https, &headers).is_none());
        headers.insert(
            COOKIE,
            format!("__Host-{SESSION_COOKIE}={value}").parse().unwrap(),
        );
        assert_eq!(
            open_session(&key(), &https, &headers).unwrap().user_id,
            "u1"
        );
        assert!(open_session(&key(), &http, &headers).is_none());
        let expired = Session {
            expires_at: chrono::Utc::now().timestamp() - 1,
            ..session
        };
        let value = seal_session(&key(), &expired);
        headers.insert(COOKIE, format!("{SESSION_COOKIE}={value}").parse().unwrap());
        assert!(open_session(&key(), &http, &headers).is_none());
    }

    #[test]
    fn a_tampered_cookie_is_ignored() {
        let mut headers = HeaderMap::new();
        headers.insert(COOKIE, format!("{SESSION_COOKIE}=AAAA").parse().unwrap());
        assert!(open_session(&key(), &CookiePolicy { secure: false }, &headers).is_none());
    }

    #[test]
    fn cookies_are_http_only_and_secure_on_https() {
        let https = CookiePolicy { secure: true };
        let text = https.set("x", "v", 60, true);
        let text = text.to_str().unwrap();
        assert!(text.starts_with("__Host-x=v; Path=/;"), "{text}");
        assert!(text.contains("HttpOnly") && text.contains("Secure"));
        assert!(text.contains("SameSite=None"));
        assert!(!text.to_ascii_lowercase().contains("domain="), "{text}");
        let http = CookiePolicy { secure: false };
        assert!(
            http.set("x", "v", 60, true)
                .to_str()
                .unwrap()
                .starts_with("x=v;")
        );
        assert!(
            http.set("x", "v", 60, true)
                .to_str()
                .unwrap()
                .contains("SameSite=Lax")
        );
    }

    #[test]
    fn csrf_tokens_compare_exactly() {
        assert!(tokens_match("abc", "abc"));
        assert!(!tokens_match("abd", "abc"));
        assert!(!tokens_match("", ""));
    }
}
