//! The portal's HTML: small server-rendered pages that work in mobile Safari, with every value
//! from outside escaped.

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};

use crate::identity::{IdentityProviders, Provider};
use crate::store::{MembershipRecord, UserRecord};

pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The pages' only style sheet, inline; the Content-Security-Policy allows exactly this text
/// by its hash (see `headers`), so no other inline style or script runs.
pub const STYLE: &str = "body{font-family:-apple-system,system-ui,sans-serif;max-width:28rem;\
     margin:2rem auto;padding:0 1rem;line-height:1.4}\
     form{margin:1rem 0;padding:1rem;border:1px solid #ccc;border-radius:.5rem}\
     input,button,a.button{font-size:1rem;width:100%;box-sizing:border-box;margin:.25rem 0;\
     padding:.6rem}\
     button,a.button{background:#0a60d0;color:#fff;border:0;border-radius:.4rem}\
     a.button{display:block;text-align:center;text-decoration:none}\
     .error{color:#a00} .muted{color:#666}";

fn layout(title: &str, body: &str) -> String {
    format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\
         <title>{title}</title><style>{STYLE}</style></head><body>\
         <h1>{title}</h1>{body}</body></html>",
        title = escape(title)
    )
}

/// The sign-in choices: a form for each LDAP provider, a button-styled link for each SSO one.
pub fn sign_in(providers: &IdentityProviders, csrf: &str, error: Option<&str>) -> String {
    let mut body = String::new();
    if let Some(error) = error {
        body.push_str(&format!(
            "<p class=\"error\" role=\"alert\">{}</p>",
            escape(error)
        ));
    }
    if providers.is_empty() {
        body.push_str(
            "<p>No sign-in method is configured. An administrator adds identity providers \
             under <code>[idp.NAME]</code> in the configuration file.</p>",
        );
    }
    body.push_str("<p>Sign in with your company account to enroll this device.</p>");
    for p in providers.iter() {
        let name = escape(&p.name);
        let label = escape(&p.label);
        match &p.provider {
            Provider::Ldap(_) => body.push_str(&format!(
                "<form method=\"post\" action=\"/auth/ldap/{name}\">\
                 <strong>{label}</strong>\
                 <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
                 <label>User name<input name=\"login\" autocomplete=\"username\" \
                 autocapitalize=\"none\" autocorrect=\"off\" required></label>\
                 <label>Password<input name=\"password\" type=\"password\" \
                 autocomplete=\"current-password\" required></label>\
                 <button type=\"submit\">Sign in</button></form>",
                csrf = escape(csrf)
            )),
            // Links, not forms: a form's submission that redirects to another origin (the
            // provider) is blocked by `form-action 'self'`.
            Provider::Oidc(_) => body.push_str(&format!(
                "<p><a class=\"button\" href=\"/auth/oidc/{name}/login\">\
                 Sign in with {label}</a></p>"
            )),
            Provider::Saml(_) => body.push_str(&format!(
                "<p><a class=\"button\" href=\"/auth/saml/{name}/login\">\
                 Sign in with {label}</a></p>"
            )),
        }
    }
    layout("Enroll your device", &body)
}

/// Who is signed in, and the button that downloads their enrollment profile.
pub fn signed_in(user: &UserRecord, groups: &[MembershipRecord], csrf: &str) -> String {
    let who = user
        .display_name
        .as_deref()
        .or(user.login.as_deref())
        .unwrap_or(&user.subject);
    let mut body = format!("<p>Signed in as <strong>{}</strong>", escape(who));
    if let Some(email) = &user.email {
        body.push_str(&format!(" (<span id=\"email\">{}</span>)", escape(email)));
    }
    body.push_str("</p>");
    if !groups.is_empty() {
        body.push_str("<p class=\"muted\">Groups: <span id=\"groups\">");
        let names: Vec<String> = groups.iter().map(|g| escape(&g.name)).collect();
        body.push_str(&names.join(", "));
        body.push_str("</span></p>");
    }
    body.push_str(&format!(
        "<form method=\"post\" action=\"/enroll/profile\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <p>Download the enrollment profile, then install it in Settings \
         (General → VPN &amp; Device Management on iOS, Privacy &amp; Security → Profiles on \
         macOS). It works once, for this device.</p>\
         <button type=\"submit\" id=\"download\">Download enrollment profile</button></form>\
         <form method=\"post\" action=\"/enroll/sign-out\">\
         <input type=\"hidden\" name=\"csrf\" value=\"{csrf}\">\
         <button type=\"submit\">Sign out</button></form>",
        csrf = escape(csrf)
    ));
    layout("Enroll your device", &body)
}

/// A page that says what went wrong and links back to the portal.
pub fn problem(status: StatusCode, message: &str) -> Response {
    let body = format!(
        "<p class=\"error\" role=\"alert\">{}</p><p><a href=\"/enroll\">Back to sign-in</a></p>",
        escape(message)
    );
    (status, Html(layout("Enrollment", &body))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markup_is_escaped() {
        assert_eq!(
            escape("<script>\"x\" & 'y'</script>"),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
    }
}
