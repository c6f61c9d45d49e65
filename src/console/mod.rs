//! The admin console at `/admin`: people an identity provider vouches for sign in through the
//! portal's provider code (`enroll`'s `/auth/...` routes with `for=admin`), get the admin API's
//! scopes from their groups (`[admin.groups]`), and read and act on devices and the audit log
//! in server-rendered pages. Owns its pages, session cookie and checks; must not speak an
//! IdP's protocol or run SQL (queries live in `store::console`).

pub mod chart;
pub mod grants;
mod pages;
mod people;
mod policies;
pub mod session;
mod tokens;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use askama::Template;
use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::header::{
    CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
    X_FRAME_OPTIONS,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;

use self::grants::{Grant, Grants, Need};
use self::session::{ADMIN_COOKIE, AdminSession};
use crate::audit::{self, OUTCOME_DENIED, OUTCOME_SUCCESS};
use crate::enroll::session::LOGIN_COOKIE;
use crate::http::AppState;
use crate::http::observe::{self, REQUEST_ID_HEADER};
use crate::http::outage::{OutageGuard, database_outage_is_503};
use crate::identity::{Identity, Provider};
use crate::store::NewAuditEntry;

/// `[admin]`: who may use the console and for how long a sign-in lasts.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ConsoleSettings {
    /// A group (the provider's id for it, such as an LDAP DN, or its name) → the scopes its
    /// members get: the admin API's scope names, `*` for all of them, or `devices:lock`.
    pub groups: BTreeMap<String, Vec<String>>,
    /// A session ends after this many seconds without a page load.
    pub session_idle_secs: u64,
    /// …and this many seconds after sign-in in any case.
    pub session_max_secs: u64,
    /// Directories on this server whose policy sets the console may plan (a checkout of a
    /// proposed change, say), given as absolute paths; a directory planned must be one of
    /// them or inside one, after symbolic links are resolved. Empty (the default): planning
    /// from a server path is off.
    pub plan_paths: Vec<std::path::PathBuf>,
}

pub const DEFAULT_IDLE_SECS: u64 = 900;
pub const DEFAULT_MAX_SECS: u64 = 8 * 3600;

impl Default for ConsoleSettings {
    fn default() -> ConsoleSettings {
        ConsoleSettings {
            groups: BTreeMap::new(),
            session_idle_secs: DEFAULT_IDLE_SECS,
            session_max_secs: DEFAULT_MAX_SECS,
            plan_paths: Vec::new(),
        }
    }
}

impl ConsoleSettings {
    pub fn validate(&self) -> Result<(), String> {
        for (group, names) in &self.groups {
            if names.is_empty() {
                return Err(format!(
                    "admin.groups.\"{group}\" grants nothing: list scopes, or remove the group"
                ));
            }
            for name in names {
                Grant::parse(name).map_err(|e| format!("admin.groups.\"{group}\": {e}"))?;
            }
        }
        if self.plan_paths.len() > 32 {
            return Err("admin.plan_paths lists more than 32 directories".into());
        }
        for root in &self.plan_paths {
            if !root.is_absolute() {
                return Err(format!(
                    "admin.plan_paths: \"{}\" must be an absolute path",
                    root.display()
                ));
            }
            if root
                .components()
                .any(|c| matches!(c, std::path::Component::ParentDir))
            {
                return Err(format!(
                    "admin.plan_paths: \"{}\" must not contain \"..\"",
                    root.display()
                ));
            }
        }
        if !(60..=86_400).contains(&self.session_max_secs) {
            return Err("admin.session_max_secs must be between 60 and 86400".into());
        }
        if !(60..=self.session_max_secs).contains(&self.session_idle_secs) {
            return Err(
                "admin.session_idle_secs must be at least 60 and at most admin.session_max_secs"
                    .into(),
            );
        }
        Ok(())
    }
}

/// The console's routes with their own middleware (request id, timeout, body limit, metrics,
/// security headers): `server` merges them beside `http::router`'s, whose layers do not reach
/// routes merged after them.
pub fn router(state: AppState, outage: &OutageGuard) -> Router {
    let timeout = state.config.request_timeout;
    let max_body = state.config.max_body_bytes;
    let signed_in = Router::new()
        .route("/admin", get(pages::overview))
        .route("/admin/devices", get(pages::devices))
        .route("/admin/devices/{udid}", get(pages::device))
        .route("/admin/devices/{udid}/actions", post(pages::device_action))
        .route("/admin/commands/{uuid}/cancel", post(pages::cancel_command))
        .route("/admin/commands/{uuid}/resend", post(pages::resend_command))
        .route("/admin/people", get(people::people))
        .route("/admin/people/{id}", get(people::person))
        .route("/admin/groups", get(people::groups))
        .route("/admin/policies", get(policies::policies))
        .route(
            "/admin/policies/plan",
            // A policy file, not a few fields.
            post(policies::plan).layer(DefaultBodyLimit::max(max_body)),
        )
        .route(
            "/admin/policies/plan/upload",
            // A whole set: the API's body bound, and per file the loader's (checked as read).
            post(policies::plan_upload).layer(DefaultBodyLimit::max(max_body)),
        )
        .route("/admin/policies/plan/path", post(policies::plan_path))
        .route(
            "/admin/tokens",
            get(tokens::integrations).post(tokens::create_integration),
        )
        .route("/admin/tokens/{name}", get(tokens::integration))
        .route("/admin/tokens/{name}/rotate", post(tokens::rotate))
        .route("/admin/tokens/{name}/tokens", post(tokens::create_token))
        .route(
            "/admin/tokens/{name}/tokens/{id}/revoke",
            post(tokens::revoke),
        )
        .route(
            "/admin/tokens/{name}/tokens/{id}/reveal",
            post(tokens::reveal),
        )
        .route("/admin/tokens/{name}/clients", post(tokens::create_client))
        .route(
            "/admin/tokens/{name}/clients/{id}/revoke",
            post(tokens::revoke_client),
        )
        .route("/admin/audit", get(pages::audit))
        .route("/admin/sign-out", post(sign_out))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_session,
        ));
    // Polled by the device page: authenticated, but it does not keep the session alive (a
    // tab left open must still go idle).
    let live = Router::new()
        .route("/admin/devices/{udid}/live", get(pages::live))
        .route_layer(middleware::from_fn_with_state(state.clone(), peek_session));
    Router::new()
        .route("/admin/sign-in", get(sign_in))
        .route("/admin/assets/console.css", get(style_sheet))
        .route("/admin/assets/console.js", get(script))
        .merge(signed_in)
        .merge(live)
        .with_state(state)
        .layer(middleware::from_fn_with_state(
            outage.rendering(outage_page),
            database_outage_is_503,
        ))
        .layer(middleware::map_response(secure_headers))
        .layer(middleware::from_fn_with_state(
            observe::RouteMetrics::default(),
            observe::record_metrics,
        ))
        // The console's forms are a few fields.
        .layer(DefaultBodyLimit::max(16 * 1024))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID_HEADER.clone()))
        .layer(SetRequestIdLayer::new(
            REQUEST_ID_HEADER.clone(),
            observe::MakeRequestUuid,
        ))
}

pub const STYLE: &str = include_str!("../../assets/console/console.css");
pub const SCRIPT: &str = include_str!("../../assets/console/console.js");

async fn style_sheet() -> Response {
    (
        [
            (CONTENT_TYPE, "text/css; charset=utf-8"),
            (CACHE_CONTROL, "max-age=3600"),
        ],
        STYLE,
    )
        .into_response()
}

async fn script() -> Response {
    (
        [
            (CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (CACHE_CONTROL, "max-age=3600"),
        ],
        SCRIPT,
    )
        .into_response()
}

/// Our own style sheet and script only, by URL: nothing inline runs, no other origin is
/// reached, forms post only to us, no framing.
static CONTENT_SECURITY: HeaderValue = HeaderValue::from_static(
    "default-src 'none'; style-src 'self'; script-src 'self'; connect-src 'self'; \
     img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
);

async fn secure_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(CONTENT_SECURITY_POLICY, CONTENT_SECURITY.clone());
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    if !headers.contains_key(CACHE_CONTROL) {
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    response
}

/// A signed-in admin, for handlers: their session, what they may do, and where the request
/// came from (for the audit record).
#[derive(Clone)]
pub struct SignedIn {
    pub session: AdminSession,
    pub grants: Grants,
    pub request_id: Option<String>,
    pub source: Option<String>,
}

impl SignedIn {
    pub fn actor(&self) -> String {
        self.session.actor()
    }

    pub fn allows(&self, need: Need) -> bool {
        self.grants.allows(need)
    }

    pub fn csrf_ok(&self, posted: &str) -> bool {
        crate::enroll::session::tokens_match(posted, &self.session.csrf)
    }

    /// Records an action by this admin, exactly as the API records a key's.
    pub async fn audit(
        &self,
        state: &AppState,
        action: &str,
        target: Option<&str>,
        outcome: &str,
        detail: Option<serde_json::Value>,
    ) {
        audit::record(
            &state.store,
            NewAuditEntry {
                actor: self.actor(),
                action: action.to_owned(),
                target: target.map(str::to_owned),
                outcome: outcome.to_owned(),
                detail: detail.map(|d| d.to_string()),
                request_id: self.request_id.clone(),
                source: self.source.clone(),
            },
        )
        .await;
    }

    /// `Ok` when this admin holds `need`; otherwise the refusal is audited and answered 403,
    /// whatever the page showed (a hidden button is refused here too).
    pub async fn require(
        &self,
        state: &AppState,
        need: Need,
        action: &str,
        target: Option<&str>,
    ) -> Result<(), Response> {
        if self.allows(need) {
            return Ok(());
        }
        self.audit(
            state,
            action,
            target,
            OUTCOME_DENIED,
            Some(json!({"reason": "missing scope", "required": need.as_str()})),
        )
        .await;
        Err(problem(
            StatusCode::FORBIDDEN,
            "Not allowed",
            &format!(
                "Your groups do not give you the '{}' scope this action needs.",
                need.as_str()
            ),
            true,
        ))
    }

    /// `Ok` when `posted` is this session's CSRF token; otherwise audited and refused.
    pub async fn check_csrf(
        &self,
        state: &AppState,
        posted: &str,
        action: &str,
        target: Option<&str>,
    ) -> Result<(), Response> {
        if self.csrf_ok(posted) {
            return Ok(());
        }
        self.audit(
            state,
            action,
            target,
            OUTCOME_DENIED,
            Some(json!({"reason": "CSRF token missing or wrong"})),
        )
        .await;
        Err(problem(
            StatusCode::FORBIDDEN,
            "Form refused",
            "This form has expired or came from another site. Load the page again and retry.",
            true,
        ))
    }
}

fn origin_of(request: &Request) -> (Option<String>, Option<String>) {
    let request_id = request
        .headers()
        .get(&REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|id| audit::truncated(id, 128));
    let source = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| addr.ip().to_string());
    (request_id, source)
}

fn signed_in_from(state: &AppState, request: &Request) -> Option<SignedIn> {
    let session = session::open(&state.master_key, &state.cookies, request.headers())?;
    let grants = Grants::from_names(&session.grants);
    let (request_id, source) = origin_of(request);
    Some(SignedIn {
        session,
        grants,
        request_id,
        source,
    })
}

/// Pages and forms need a live session: a page load without one shows the sign-in page, a
/// form post is refused (401, nothing done). A page answered moves the idle deadline.
async fn require_session(
    State(state): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let Some(signed_in) = signed_in_from(&state, &request) else {
        return signed_out(&state, &request);
    };
    let mut session = signed_in.session.clone();
    request.extensions_mut().insert(signed_in);
    let mut response = next.run(request).await;
    if response
        .headers()
        .contains_key(axum::http::header::SET_COOKIE)
    {
        // Signed out.
        return response;
    }
    let now = chrono::Utc::now().timestamp();
    let idle = i64::try_from(state.config.console.session_idle_secs).unwrap_or(900);
    session.idle_until = (now + idle).min(session.expires_at);
    let sealed = session::seal(&state.master_key, &session);
    let cookie = state
        .cookies
        .set(ADMIN_COOKIE, &sealed, session.idle_until - now, false);
    crate::enroll::session::append(response.headers_mut(), cookie);
    response
}

/// The live endpoint: a session is needed, but reading does not extend it.
async fn peek_session(State(state): State<AppState>, mut request: Request, next: Next) -> Response {
    let Some(signed_in) = signed_in_from(&state, &request) else {
        return (
            StatusCode::UNAUTHORIZED,
            [(CONTENT_TYPE, "application/json")],
            r#"{"error":{"code":"unauthorized","message":"the console session has ended"}}"#,
        )
            .into_response();
    };
    request.extensions_mut().insert(signed_in);
    next.run(request).await
}

fn signed_out(state: &AppState, request: &Request) -> Response {
    if request.method() == Method::GET || request.method() == Method::HEAD {
        let mut response = sign_in_page(state, request.headers(), StatusCode::OK, None);
        // A stale cookie is dropped.
        if state.cookies.get(request.headers(), ADMIN_COOKIE).is_some() {
            crate::enroll::session::append(
                response.headers_mut(),
                state.cookies.clear(ADMIN_COOKIE),
            );
        }
        response
    } else {
        problem(
            StatusCode::UNAUTHORIZED,
            "Signed out",
            "Your console session has ended, so nothing was done. Sign in again.",
            false,
        )
    }
}

async fn sign_in(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if session::open(&state.master_key, &state.cookies, &headers).is_some() {
        return crate::enroll::see_other("/admin");
    }
    sign_in_page(&state, &headers, StatusCode::OK, None)
}

/// A way to sign in, as the sign-in page lists it.
pub struct ProviderChoice {
    pub name: String,
    pub label: String,
    /// `None` for a password form (LDAP), else the SSO start URL.
    pub link: Option<String>,
}

/// The console's sign-in page: each configured provider, through the portal's sign-in routes.
pub fn sign_in_page(
    state: &AppState,
    headers: &HeaderMap,
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    let (csrf, cookie) = crate::enroll::sign_in_csrf(state, headers);
    let providers = state
        .identity
        .iter()
        .map(|p| ProviderChoice {
            name: p.name.clone(),
            label: p.label.clone(),
            link: match &p.provider {
                Provider::Ldap(_) => None,
                Provider::Oidc(_) => Some(format!("/auth/oidc/{}/login?for=admin", p.name)),
                Provider::Saml(_) => Some(format!("/auth/saml/{}/login?for=admin", p.name)),
            },
        })
        .collect();
    let page = pages::SignInPage {
        providers,
        csrf: &csrf,
        error,
        configured: !state.config.console.groups.is_empty(),
    };
    let mut response = render(status, &page);
    if let Some(cookie) = cookie {
        crate::enroll::session::append(response.headers_mut(), cookie);
    }
    response
}

/// After the provider vouched for the person: their groups decide their scopes; none, no
/// console. Both outcomes are audited.
pub async fn complete_sign_in(state: &AppState, identity: Identity) -> Response {
    let actor = format!("admin:{}:{}", identity.provider, identity.subject);
    let grants = Grants::for_groups(&state.config.console.groups, &identity.groups);
    let groups: Vec<&str> = identity.groups.iter().map(|g| g.id.as_str()).collect();
    let record = |outcome: &str, detail: serde_json::Value| NewAuditEntry {
        actor: actor.clone(),
        action: "console.sign-in".into(),
        target: None,
        outcome: outcome.to_owned(),
        detail: Some(detail.to_string()),
        request_id: None,
        source: Some("console".into()),
    };
    if grants.is_empty() {
        audit::record(
            &state.store,
            record(
                OUTCOME_DENIED,
                json!({"groups": groups, "reason": "no admin group"}),
            ),
        )
        .await;
        return problem(
            StatusCode::FORBIDDEN,
            "No console access",
            "You signed in, but none of your groups is allowed to use the admin console. \
             If you need it, ask whoever runs this service to add your group under \
             [admin.groups].",
            false,
        );
    }
    // The admin is a person like any other: recorded with their groups (as a portal sign-in
    // records them), so the people pages show who administers.
    let person = match state.store.record_sign_in(&identity, "sign-in").await {
        Ok(person) => person,
        Err(e) => {
            tracing::error!(error = %e, "console sign-in: recording the person");
            return problem(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Something went wrong",
                "Your sign-in could not be recorded. Try again later.",
                false,
            );
        }
    };
    // A changed membership was recorded as a reconcile request: serve it now on this node.
    state.reconciler.wake().wake();
    audit::record(
        &state.store,
        NewAuditEntry {
            target: Some(person.id),
            ..record(
                OUTCOME_SUCCESS,
                json!({"groups": groups, "scopes": grants.names()}),
            )
        },
    )
    .await;
    let now = chrono::Utc::now().timestamp();
    let settings = &state.config.console;
    let max = i64::try_from(settings.session_max_secs).unwrap_or(DEFAULT_MAX_SECS as i64);
    let idle = i64::try_from(settings.session_idle_secs).unwrap_or(DEFAULT_IDLE_SECS as i64);
    let session = AdminSession {
        name: identity
            .display_name
            .or(identity.login)
            .or(identity.email)
            .unwrap_or_else(|| identity.subject.clone()),
        provider: identity.provider,
        subject: identity.subject,
        grants: grants.names(),
        csrf: crate::enroll::session::random_token(),
        idle_until: now + idle.min(max),
        expires_at: now + max,
    };
    let mut response = crate::enroll::see_other("/admin");
    let sealed = session::seal(&state.master_key, &session);
    let headers = response.headers_mut();
    crate::enroll::session::append(
        headers,
        state
            .cookies
            .set(ADMIN_COOKIE, &sealed, session.idle_until - now, false),
    );
    crate::enroll::session::append(headers, state.cookies.clear(LOGIN_COOKIE));
    response
}

#[derive(Deserialize)]
struct CsrfForm {
    #[serde(default)]
    csrf: String,
}

async fn sign_out(
    State(state): State<AppState>,
    axum::Extension(admin): axum::Extension<SignedIn>,
    form: Result<axum::Form<CsrfForm>, axum::extract::rejection::FormRejection>,
) -> Response {
    let posted = form.map(|f| f.0.csrf).unwrap_or_default();
    if let Err(refused) = admin
        .check_csrf(&state, &posted, "console.sign-out", None)
        .await
    {
        return refused;
    }
    admin
        .audit(&state, "console.sign-out", None, OUTCOME_SUCCESS, None)
        .await;
    let mut response = crate::enroll::see_other("/admin/sign-in");
    crate::enroll::session::append(response.headers_mut(), state.cookies.clear(ADMIN_COOKIE));
    response
}

/// An askama page as a response; a template error (ours) is logged and answered 500.
pub(crate) fn render<T: Template>(status: StatusCode, page: &T) -> Response {
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => {
            tracing::error!(error = %e, "console template failed");
            (
                StatusCode::INTERNAL_SERVER_ERROR,
                "the page could not be drawn",
            )
                .into_response()
        }
    }
}

/// A page that says what went wrong.
/// A database outage or a full disk, as a page (the layer adds `Retry-After`).
fn outage_page(status: StatusCode, _code: &'static str, message: &'static str) -> Response {
    let title = if status == StatusCode::INSUFFICIENT_STORAGE {
        "The database's disk is full"
    } else {
        "The database does not answer"
    };
    problem(status, title, message, false)
}

pub(crate) fn problem(status: StatusCode, title: &str, message: &str, signed_in: bool) -> Response {
    render(
        status,
        &pages::ProblemPage {
            title,
            message,
            signed_in,
        },
    )
}

pub(crate) fn internal(e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "console internal error");
    problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong",
        "Something went wrong on our side. Try again later.",
        true,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_refuse_unknown_scopes_and_odd_lifetimes() {
        let mut settings = ConsoleSettings::default();
        assert!(settings.validate().is_ok());
        settings.groups.insert(
            "helpdesk".into(),
            vec!["devices:read".into(), "devices:wipe".into()],
        );
        assert!(settings.validate().unwrap_err().contains("devices:wipe"));
        settings.groups.clear();
        settings.session_idle_secs = settings.session_max_secs + 1;
        assert!(settings.validate().is_err());
    }

    #[test]
    fn the_policy_allows_no_inline_code() {
        let policy = CONTENT_SECURITY.to_str().unwrap();
        assert!(!policy.contains("unsafe"), "{policy}");
        assert!(policy.contains("frame-ancestors 'none'"));
    }
}
