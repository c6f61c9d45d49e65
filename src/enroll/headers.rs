//! The security headers every portal response carries (pages, error pages, redirects and the
//! profile download alike), set in one place so no handler can forget them.
//!
//! The pages need nothing but their own inline style sheet and to post forms to us, so the
//! policy allows exactly that: no script at all, the one style sheet by its SHA-256 (no
//! `'unsafe-inline'`), forms only to our own origin, no framing, no `<base>`. Responses are
//! `no-store`: they carry CSRF tokens, sign-in state and one-time enrollment challenges.

use std::sync::LazyLock;

use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::{HeaderName, HeaderValue};
use axum::response::Response;
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use sha2::{Digest, Sha256};

use super::page::STYLE;

/// The policy, with the style sheet's hash worked out once.
static CONTENT_SECURITY: LazyLock<HeaderValue> = LazyLock::new(|| {
    let style = STANDARD.encode(Sha256::digest(STYLE.as_bytes()));
    let policy = format!(
        "default-src 'none'; style-src 'sha256-{style}'; form-action 'self'; \
         frame-ancestors 'none'; base-uri 'none'"
    );
    HeaderValue::from_str(&policy)
        .unwrap_or_else(|_| HeaderValue::from_static("default-src 'none'"))
});

const FIXED: [(HeaderName, &str); 4] = [
    (X_FRAME_OPTIONS, "DENY"),
    (X_CONTENT_TYPE_OPTIONS, "nosniff"),
    // The OIDC callback's URL holds the authorization code: never pass it on as a Referer.
    (REFERRER_POLICY, "no-referrer"),
    (CACHE_CONTROL, "no-store"),
];

/// Middleware (`map_response`) for the portal's router.
pub async fn secure(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(CONTENT_SECURITY_POLICY, CONTENT_SECURITY.clone());
    for (name, value) in FIXED {
        headers.insert(name, HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_policy_names_the_style_sheet_by_its_hash_and_nothing_inline() {
        let policy = CONTENT_SECURITY.to_str().unwrap();
        for part in [
            "default-src 'none'",
            "frame-ancestors 'none'",
            "form-action 'self'",
            "base-uri 'none'",
            "style-src 'sha256-",
        ] {
            assert!(policy.contains(part), "{part} missing from {policy}");
        }
        assert!(!policy.contains("unsafe"), "{policy}");
        assert!(!policy.contains("script-src"), "{policy}");
    }
}
