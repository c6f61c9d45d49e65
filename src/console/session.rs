//! The console's session: who signed in, what they may do, their CSRF token, and two
//! deadlines: an idle one (moved forward by every page they load) and an absolute one. Sealed
//! with the master key under a purpose of its own, in a host-only HttpOnly cookie
//! (`__Host-tb_admin` on HTTPS), so no server-side table and no portal cookie can stand in.

use axum::http::HeaderMap;
use serde::{Deserialize, Serialize};

use crate::enroll::session::{self as cookies, CookiePolicy};
use crate::secrets::MasterKey;

pub const ADMIN_COOKIE: &str = "tb_admin";
const PURPOSE: &str = "console-session";

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AdminSession {
    pub provider: String,
    pub subject: String,
    /// What the provider calls them, for the page header.
    pub name: String,
    /// Grant names (`Grants::names`), fixed at sign-in.
    pub grants: Vec<String>,
    pub csrf: String,
    /// Unix seconds: the session ends when no page was loaded until then…
    pub idle_until: i64,
    /// …and at this time whatever happens.
    pub expires_at: i64,
}

impl AdminSession {
    /// The actor its actions are audited as, like `key:NAME` for an API key.
    pub fn actor(&self) -> String {
        format!("admin:{}:{}", self.provider, self.subject)
    }

    pub fn is_live(&self, now: i64) -> bool {
        now < self.idle_until && now < self.expires_at
    }
}

pub fn seal(key: &MasterKey, session: &AdminSession) -> String {
    cookies::seal(key, PURPOSE, session)
}

/// The session in the request, if its cookie opens and neither deadline has passed.
pub fn open(key: &MasterKey, policy: &CookiePolicy, headers: &HeaderMap) -> Option<AdminSession> {
    let session: AdminSession = cookies::open(key, PURPOSE, policy.get(headers, ADMIN_COOKIE)?)?;
    session
        .is_live(chrono::Utc::now().timestamp())
        .then_some(session)
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::header::COOKIE;

    fn session(idle_until: i64, expires_at: i64) -> AdminSession {
        AdminSession {
            provider: "oidc".into(),
            subject: "alice".into(),
            name: "Alice".into(),
            grants: vec!["admin".into()],
            csrf: "x".repeat(43),
            idle_until,
            expires_at,
        }
    }

    #[test]
    fn sessions_end_at_either_deadline_and_only_open_under_their_purpose() {
        let key = MasterKey::from_bytes(&[9; 32]);
        let policy = CookiePolicy { secure: true };
        let now = chrono::Utc::now().timestamp();
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(
                COOKIE,
                format!("__Host-{ADMIN_COOKIE}={value}").parse().unwrap(),
            );
            headers
        };
        let live = seal(&key, &session(now + 60, now + 600));
        assert_eq!(
            open(&key, &policy, &with(&live)).unwrap().actor(),
            "admin:oidc:alice"
        );
        assert!(
            open(
                &key,
                &policy,
                &with(&seal(&key, &session(now - 1, now + 600)))
            )
            .is_none()
        );
        assert!(
            open(
                &key,
                &policy,
                &with(&seal(&key, &session(now + 60, now - 1)))
            )
            .is_none()
        );
        // A portal session sealed with the same key is not a console session.
        let portal = crate::enroll::session::seal_session(
            &key,
            &crate::enroll::session::Session {
                user_id: "u".into(),
                provider: "oidc".into(),
                csrf: "c".into(),
                expires_at: now + 600,
            },
        );
        assert!(open(&key, &policy, &with(&portal)).is_none());
    }
}
