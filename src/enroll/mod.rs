//! The enrollment portal at `/enroll`: a person signs in with one of the configured identity
//! providers and downloads an enrollment profile whose one-time challenge is bound to them.
//! Sign-in routes live under `/auth/{kind}/{name}/...`, stable URLs an IdP admin registers.

pub mod client_address;
mod headers;
mod page;
pub mod session;
pub mod throttle;

use std::net::SocketAddr;

use axum::Extension;
use axum::extract::ConnectInfo;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, Query, State};
use axum::http::header::{CONTENT_DISPOSITION, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use serde_json::json;

use self::session::{
    CSRF_COOKIE, LOGIN_COOKIE, LOGIN_TTL_SECS, PendingLogin, SESSION_COOKIE, Session, SignInTarget,
};
use crate::apple::enrollment::ProfileError;
use crate::audit::{self, OUTCOME_DENIED, OUTCOME_FAILURE, OUTCOME_SUCCESS};
use crate::http::AppState;
use crate::http::limit::{self, Cap, RouteCaps};
use crate::identity::{ConfiguredProvider, Identity, IdpError, Provider};
use crate::pki::challenge::ChallengeRequest;
use crate::store::NewAuditEntry;

/// `caps`: the sign-in steps that cost a directory bind, a token request or an XML signature
/// check each take a permit of their group (503 when none is free).
pub fn router(caps: &RouteCaps) -> Router<AppState> {
    let capped = |cap: &Cap| middleware::from_fn_with_state(cap.clone(), limit::guard);
    Router::new()
        .route("/enroll", get(portal))
        .route("/enroll/profile", post(download_profile))
        .route("/enroll/sign-out", post(sign_out))
        .route(
            "/auth/ldap/{name}",
            post(ldap_sign_in).layer(capped(&caps.ldap_sign_in)),
        )
        .route("/auth/oidc/{name}/login", get(oidc_login))
        .route(
            "/auth/oidc/{name}/callback",
            get(oidc_callback).layer(capped(&caps.oidc_callback)),
        )
        .route("/auth/saml/{name}/login", get(saml_login))
        .route(
            "/auth/saml/{name}/acs",
            post(saml_acs).layer(capped(&caps.saml_acs)),
        )
        .route("/auth/saml/{name}/metadata", get(saml_metadata))
        // On every answer of these routes, including rejections and 405s.
        .layer(middleware::map_response(headers::secure))
}

/// The sign-in page, or, once signed in, who the person is and their profile download.
async fn portal(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Some(session) = session::open_session(&state.master_key, &state.cookies, &headers)
        && let Ok(Some(user)) = state.store.user(&session.user_id).await
    {
        let groups = state.store.memberships(&user.id).await.unwrap_or_default();
        return Html(page::signed_in(&user, &groups, &session.csrf)).into_response();
    }
    sign_in_page(&state, &headers, StatusCode::OK, None)
}

/// The sign-in page with a CSRF token for its forms (kept in a cookie: double submit).
fn sign_in_page(
    state: &AppState,
    headers: &HeaderMap,
    status: StatusCode,
    error: Option<&str>,
) -> Response {
    let (csrf, cookie) = sign_in_csrf(state, headers);
    let mut response = (status, Html(page::sign_in(&state.identity, &csrf, error))).into_response();
    if let Some(cookie) = cookie {
        session::append(response.headers_mut(), cookie);
    }
    response
}

/// The anti-CSRF token the sign-in forms (portal and console alike) post back, and the cookie
/// to set when the browser has none yet (double submit).
pub(crate) fn sign_in_csrf(state: &AppState, headers: &HeaderMap) -> (String, Option<HeaderValue>) {
    let existing = state
        .cookies
        .get(headers, CSRF_COOKIE)
        .filter(|t| t.len() >= 32);
    match existing {
        Some(token) => (token.to_owned(), None),
        None => {
            let csrf = session::random_token();
            let cookie = state
                .cookies
                .set(CSRF_COOKIE, &csrf, LOGIN_TTL_SECS * 6, false);
            (csrf, Some(cookie))
        }
    }
}

/// The page a failed password sign-in goes back to: the portal's or the console's.
fn retry_page(
    state: &AppState,
    headers: &HeaderMap,
    target: SignInTarget,
    status: StatusCode,
    error: &str,
) -> Response {
    match target {
        SignInTarget::Portal => sign_in_page(state, headers, status, Some(error)),
        SignInTarget::Console => crate::console::sign_in_page(state, headers, status, Some(error)),
    }
}

/// `?for=admin` on the SSO login routes: the sign-in is for the admin console.
#[derive(Deserialize)]
struct LoginFor {
    #[serde(rename = "for")]
    target: Option<String>,
}

#[derive(Deserialize)]
struct LdapForm {
    csrf: String,
    login: String,
    password: String,
    /// `admin` when posted from the console's sign-in page.
    #[serde(rename = "for")]
    target: Option<String>,
}

async fn ldap_sign_in(
    State(state): State<AppState>,
    Path(name): Path<String>,
    peer: Option<Extension<ConnectInfo<SocketAddr>>>,
    headers: HeaderMap,
    form: Result<Form<LdapForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return page::problem(StatusCode::BAD_REQUEST, "The sign-in form was incomplete.");
    };
    let expected = state.cookies.get(&headers, CSRF_COOKIE).unwrap_or_default();
    if !session::tokens_match(&form.csrf, expected) {
        return page::problem(
            StatusCode::FORBIDDEN,
            "This sign-in form has expired or came from another site. Load the page again.",
        );
    }
    let Some(ConfiguredProvider {
        provider: Provider::Ldap(ldap),
        ..
    }) = state.identity.get(&name)
    else {
        return page::problem(StatusCode::NOT_FOUND, "There is no such directory sign-in.");
    };
    let target = SignInTarget::from_param(form.target.as_deref());
    if form.login.len() > 256 || form.password.len() > 1024 {
        return retry_page(
            &state,
            &headers,
            target,
            StatusCode::UNAUTHORIZED,
            WRONG_PASSWORD,
        );
    }
    let address =
        client_address::client_address(peer.map(|p| p.0.0.ip()), &headers, &state.config.proxies);
    let login = form.login.trim();
    if let Some(wait) = state.sign_in_throttle.blocked(&name, login, address) {
        tracing::warn!(provider = %name, %login, ?address, "LDAP sign-in throttled");
        let minutes = wait.as_secs().div_ceil(60).max(1);
        let message = format!(
            "Too many failed sign-ins. Wait {minutes} minute{} and try again.",
            if minutes == 1 { "" } else { "s" }
        );
        return retry_page(
            &state,
            &headers,
            target,
            StatusCode::TOO_MANY_REQUESTS,
            &message,
        );
    }
    match ldap.authenticate(login, &form.password).await {
        Ok(identity) => {
            state.sign_in_throttle.succeeded(&name, login);
            complete_sign_in(&state, identity, target).await
        }
        Err(IdpError::Refused(reason)) => {
            state.sign_in_throttle.failed(&name, login, address);
            tracing::info!(provider = %name, %reason, "LDAP sign-in refused");
            retry_page(
                &state,
                &headers,
                target,
                StatusCode::UNAUTHORIZED,
                WRONG_PASSWORD,
            )
        }
        Err(e) => provider_failure(target, &name, &e),
    }
}

const WRONG_PASSWORD: &str = "The user name or password is not right.";

async fn oidc_login(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(login_for): Query<LoginFor>,
) -> Response {
    let target = SignInTarget::from_param(login_for.target.as_deref());
    let Some(ConfiguredProvider {
        provider: Provider::Oidc(oidc),
        ..
    }) = state.identity.get(&name)
    else {
        return page::problem(StatusCode::NOT_FOUND, "There is no such sign-in method.");
    };
    match oidc.begin().await {
        Ok((url, pending)) => redirect_with_login(
            &state,
            &url,
            PendingLogin {
                provider: name,
                target,
                oidc: Some(pending),
                saml_request_id: None,
                expires_at: chrono::Utc::now().timestamp() + LOGIN_TTL_SECS,
            },
            false,
        ),
        Err(e) => provider_failure(target, &name, &e),
    }
}

#[derive(Deserialize)]
struct OidcCallback {
    code: Option<String>,
    state: Option<String>,
    error: Option<String>,
    error_description: Option<String>,
}

async fn oidc_callback(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    query: Result<Query<OidcCallback>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return page::problem(StatusCode::BAD_REQUEST, "The sign-in answer was malformed.");
    };
    let Some(ConfiguredProvider {
        provider: Provider::Oidc(oidc),
        ..
    }) = state.identity.get(&name)
    else {
        return page::problem(StatusCode::NOT_FOUND, "There is no such sign-in method.");
    };
    let Some((target, pending)) = session::open_login(&state.master_key, &state.cookies, &headers)
        .filter(|p| p.provider == name)
        .and_then(|p| Some((p.target, p.oidc?)))
    else {
        return page::problem(StatusCode::BAD_REQUEST, EXPIRED_LOGIN);
    };
    if let Some(error) = query.error {
        let detail = query.error_description.unwrap_or_default();
        tracing::info!(provider = %name, %error, %detail, "OpenID provider refused the sign-in");
        return problem_for(
            target,
            StatusCode::UNAUTHORIZED,
            &format!("The sign-in was not completed ({error})."),
        );
    }
    let (Some(code), Some(returned_state)) = (query.code, query.state) else {
        return problem_for(
            target,
            StatusCode::BAD_REQUEST,
            "The sign-in answer was incomplete.",
        );
    };
    match oidc.finish(&pending, &returned_state, &code).await {
        Ok(identity) => complete_sign_in(&state, identity, target).await,
        Err(e) => sign_in_refused(target, &name, &e),
    }
}

const EXPIRED_LOGIN: &str =
    "This sign-in expired or was started in another browser. Start again from the portal.";

async fn saml_login(
    State(state): State<AppState>,
    Path(name): Path<String>,
    Query(login_for): Query<LoginFor>,
) -> Response {
    let target = SignInTarget::from_param(login_for.target.as_deref());
    let Some(ConfiguredProvider {
        provider: Provider::Saml(slot),
        ..
    }) = state.identity.get(&name)
    else {
        return page::problem(StatusCode::NOT_FOUND, "There is no such sign-in method.");
    };
    let begun = match slot.get().await {
        Ok(saml) => saml.begin(&session::random_token()),
        Err(e) => Err(e),
    };
    match begun {
        Ok((url, request_id)) => redirect_with_login(
            &state,
            &url,
            PendingLogin {
                provider: name,
                target,
                oidc: None,
                saml_request_id: Some(request_id),
                expires_at: chrono::Utc::now().timestamp() + LOGIN_TTL_SECS,
            },
            true,
        ),
        Err(e) => provider_failure(target, &name, &e),
    }
}

#[derive(Deserialize)]
struct AcsForm {
    #[serde(rename = "SAMLResponse")]
    saml_response: String,
}

async fn saml_acs(
    State(state): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
    form: Result<Form<AcsForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return page::problem(
            StatusCode::BAD_REQUEST,
            "The sign-in answer had no SAMLResponse.",
        );
    };
    let Some(ConfiguredProvider {
        provider: Provider::Saml(slot),
        ..
    }) = state.identity.get(&name)
    else {
        return page::problem(StatusCode::NOT_FOUND, "There is no such sign-in method.");
    };
    // Absent for an IdP-initiated sign-in, which the provider refuses unless enabled.
    let pending = session::open_login(&state.master_key, &state.cookies, &headers)
        .filter(|p| p.provider == name);
    // An IdP-initiated sign-in (no login in flight) can only be for the portal.
    let target = pending.as_ref().map(|p| p.target).unwrap_or_default();
    let expected = pending.and_then(|p| p.saml_request_id);
    let saml = match slot.get().await {
        Ok(saml) => saml,
        Err(e) => return provider_failure(target, &name, &e),
    };
    // XML parsing and signature checks are CPU work in C libraries: off the async workers.
    let verified =
        tokio::task::spawn_blocking(move || saml.finish(&form.saml_response, expected.as_deref()))
            .await;
    let login = match verified {
        Ok(Ok(login)) => login,
        Ok(Err(e)) => return sign_in_refused(target, &name, &e),
        Err(e) => return page::problem(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    };
    match state
        .store
        .consume_saml_assertion(&name, &login.assertion_id, login.not_on_or_after)
        .await
    {
        Ok(true) => complete_sign_in(&state, login.identity, target).await,
        Ok(false) => sign_in_refused(
            target,
            &name,
            &IdpError::Refused(format!("assertion {} was already used", login.assertion_id)),
        ),
        Err(e) => internal(&e),
    }
}

async fn saml_metadata(State(state): State<AppState>, Path(name): Path<String>) -> Response {
    let Some(ConfiguredProvider {
        provider: Provider::Saml(slot),
        ..
    }) = state.identity.get(&name)
    else {
        return page::problem(StatusCode::NOT_FOUND, "There is no such SAML provider.");
    };
    match slot.get().await.and_then(|saml| saml.metadata_xml()) {
        Ok(xml) => (
            [(
                CONTENT_TYPE,
                HeaderValue::from_static("application/samlmetadata+xml"),
            )],
            xml,
        )
            .into_response(),
        Err(e) => provider_failure(SignInTarget::Portal, &name, &e),
    }
}

/// Hands a verified identity to what the sign-in was for.
async fn complete_sign_in(state: &AppState, identity: Identity, target: SignInTarget) -> Response {
    match target {
        SignInTarget::Portal => complete_portal_sign_in(state, identity).await,
        SignInTarget::Console => crate::console::complete_sign_in(state, identity).await,
    }
}

/// Records the person and their groups, and starts their portal session.
async fn complete_portal_sign_in(state: &AppState, identity: Identity) -> Response {
    let actor = format!("user:{}:{}", identity.provider, identity.subject);
    let allowed = &state.config.portal.allowed_groups;
    if !allowed.is_empty()
        && !identity
            .groups
            .iter()
            .any(|g| allowed.iter().any(|a| *a == g.id || *a == g.name))
    {
        portal_audit(state, &actor, "portal.sign-in", None, OUTCOME_DENIED, None).await;
        return page::problem(
            StatusCode::FORBIDDEN,
            "Your account is not in a group that may enroll devices. Ask your IT team.",
        );
    }
    let user = match state.store.record_sign_in(&identity, "sign-in").await {
        Ok(user) => user,
        Err(e) => return internal(&e),
    };
    // A changed membership was recorded as a reconcile request: serve it now on this node.
    state.reconciler.wake().wake();
    let groups: Vec<&str> = identity.groups.iter().map(|g| g.id.as_str()).collect();
    portal_audit(
        state,
        &actor,
        "portal.sign-in",
        Some(&user.id),
        OUTCOME_SUCCESS,
        Some(json!({"groups": groups})),
    )
    .await;
    let ttl = state.config.portal.session_ttl_secs as i64;
    let session = Session {
        user_id: user.id,
        provider: identity.provider,
        csrf: session::random_token(),
        expires_at: chrono::Utc::now().timestamp() + ttl,
    };
    let mut response = see_other("/enroll");
    let sealed = session::seal_session(&state.master_key, &session);
    let headers = response.headers_mut();
    session::append(
        headers,
        state.cookies.set(SESSION_COOKIE, &sealed, ttl, false),
    );
    session::append(headers, state.cookies.clear(LOGIN_COOKIE));
    response
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

/// A new enrollment for the signed-in person: a profile whose challenge is bound to them.
async fn download_profile(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let Some(session) = session::open_session(&state.master_key, &state.cookies, &headers) else {
        return page::problem(
            StatusCode::UNAUTHORIZED,
            "Your sign-in has expired. Sign in again.",
        );
    };
    let Ok(Form(form)) = form else {
        return page::problem(StatusCode::BAD_REQUEST, "The form was incomplete.");
    };
    if !session::tokens_match(&form.csrf, &session.csrf) {
        return page::problem(StatusCode::FORBIDDEN, "This form came from another site.");
    }
    let user = match state.store.user(&session.user_id).await {
        Ok(Some(user)) => user,
        Ok(None) => return page::problem(StatusCode::UNAUTHORIZED, "Sign in again."),
        Err(e) => return internal(&e),
    };
    let actor = format!("user:{}:{}", user.provider, user.subject);
    // Checked before anything is created, so a refusal costs one query.
    match unredeemed_limit(&state, &user.id, 1).await {
        Ok(None) => {}
        Ok(Some(refusal)) => return refuse_over_limit(&state, &actor, &user.id, refusal).await,
        Err(e) => return internal(&e),
    }
    let for_user = user.email.clone().or(user.login.clone());
    let issued = state
        .profiles
        .issue(
            ChallengeRequest {
                requested_by: actor.clone(),
                for_user,
                for_device: None,
                user_id: Some(user.id.clone()),
            },
            true,
        )
        .await;
    let issued = match issued {
        Ok(issued) => issued,
        Err(e) => {
            portal_audit(
                &state,
                &actor,
                "enrollment-profile.create",
                None,
                OUTCOME_FAILURE,
                None,
            )
            .await;
            return match e {
                ProfileError::NoPushCertificate => {
                    tracing::error!("portal: {e}");
                    page::problem(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "Enrollment is not set up yet (no push certificate). Tell your IT team.",
                    )
                }
                ProfileError::Internal(e) => internal(&e),
            };
        }
    };
    // Checked again now the new one is stored: concurrent downloads may all have passed the
    // first check. Any that finds the person over the limit takes its own profile back, so
    // however they interleave no more than the limit survive (they may all lose: fail closed).
    match unredeemed_limit(&state, &user.id, 0).await {
        Ok(None) => {}
        Ok(Some(refusal)) => {
            if let Err(e) = state
                .store
                .discard_unredeemed_enrollment(&issued.enrollment_id)
                .await
            {
                return internal(&e);
            }
            return refuse_over_limit(&state, &actor, &user.id, refusal).await;
        }
        Err(e) => {
            // Not handed out, so it must not hold one of the person's slots either.
            let _ = state
                .store
                .discard_unredeemed_enrollment(&issued.enrollment_id)
                .await;
            return internal(&e);
        }
    }
    portal_audit(
        &state,
        &actor,
        "enrollment-profile.create",
        Some(&issued.enrollment_id),
        OUTCOME_SUCCESS,
        Some(json!({"user_id": user.id, "expires_at": issued.expires_at})),
    )
    .await;
    let disposition = format!(
        "attachment; filename=\"enroll-{}.mobileconfig\"",
        issued.enrollment_id
    );
    (
        [
            (
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-apple-aspen-config"),
            ),
            (
                CONTENT_DISPOSITION,
                HeaderValue::from_str(&disposition)
                    .unwrap_or_else(|_| HeaderValue::from_static("attachment")),
            ),
        ],
        issued.body,
    )
        .into_response()
}

/// A person at their limit of profiles no device has used yet.
struct OverLimit {
    held: usize,
    /// Until a slot frees by the window passing (using a profile frees one at once).
    wait: chrono::Duration,
}

/// `Some` when the profiles `user_id` downloaded within `enroll.unredeemed_window_secs` that
/// no device has used yet, plus `adding` new ones, are more than `enroll.max_unredeemed_profiles`.
async fn unredeemed_limit(
    state: &AppState,
    user_id: &str,
    adding: usize,
) -> Result<Option<OverLimit>, crate::store::StoreError> {
    let settings = &state.config.portal;
    let window = chrono::Duration::seconds(
        i64::try_from(settings.unredeemed_window_secs).unwrap_or(i64::MAX / 1000),
    );
    let now = crate::store::now();
    let created = state
        .store
        .unredeemed_profiles_since(user_id, now - window)
        .await?;
    let max = usize::try_from(settings.max_unredeemed_profiles).unwrap_or(usize::MAX);
    let total = created.len().saturating_add(adding);
    if total <= max {
        return Ok(None);
    }
    // One more fits once the oldest (total - max) have left the window.
    let wait = created
        .get(total - max - 1)
        .map_or(window, |at| *at + window - now)
        .max(chrono::Duration::seconds(1));
    Ok(Some(OverLimit {
        held: total - 1,
        wait,
    }))
}

async fn refuse_over_limit(
    state: &AppState,
    actor: &str,
    user_id: &str,
    over: OverLimit,
) -> Response {
    portal_audit(
        state,
        actor,
        "enrollment-profile.create",
        None,
        OUTCOME_DENIED,
        Some(json!({"user_id": user_id, "reason": "unredeemed profile limit", "held": over.held})),
    )
    .await;
    let minutes = over.wait.num_seconds().max(1).unsigned_abs().div_ceil(60);
    let message = format!(
        "You have already downloaded {held} enrollment profiles that no device has installed \
         yet. Install one of those (each works once, on one device), or wait {minutes} \
         minute{s} before downloading another.",
        held = over.held,
        s = if minutes == 1 { "" } else { "s" }
    );
    let mut response = page::problem(StatusCode::TOO_MANY_REQUESTS, &message);
    response.headers_mut().insert(
        RETRY_AFTER,
        HeaderValue::from(over.wait.num_seconds().max(1)),
    );
    response
}

async fn sign_out(
    State(state): State<AppState>,
    headers: HeaderMap,
    form: Result<Form<CsrfForm>, FormRejection>,
) -> Response {
    let valid = match (
        session::open_session(&state.master_key, &state.cookies, &headers),
        form,
    ) {
        (Some(session), Ok(Form(form))) => session::tokens_match(&form.csrf, &session.csrf),
        _ => false,
    };
    if !valid {
        return page::problem(StatusCode::FORBIDDEN, "This form came from another site.");
    }
    let mut response = see_other("/enroll");
    session::append(response.headers_mut(), state.cookies.clear(SESSION_COOKIE));
    response
}

fn redirect_with_login(
    state: &AppState,
    url: &str,
    login: PendingLogin,
    cross_site_post: bool,
) -> Response {
    let mut response = see_other(url);
    let sealed = session::seal_login(&state.master_key, &login);
    let cookie = state
        .cookies
        .set(LOGIN_COOKIE, &sealed, LOGIN_TTL_SECS, cross_site_post);
    session::append(response.headers_mut(), cookie);
    response
}

pub(crate) fn see_other(location: &str) -> Response {
    let mut response = StatusCode::SEE_OTHER.into_response();
    if let Ok(value) = HeaderValue::from_str(location) {
        response.headers_mut().insert(LOCATION, value);
    }
    response
}

/// A page saying what went wrong with a sign-in, in the look of what it was for (the portal's
/// page links back to the portal, the console's to its sign-in page).
fn problem_for(target: SignInTarget, status: StatusCode, message: &str) -> Response {
    match target {
        SignInTarget::Portal => page::problem(status, message),
        SignInTarget::Console => crate::console::problem(status, "Sign-in failed", message, false),
    }
}

/// The person's sign-in failed: the reason goes to the log, they get a plain message.
fn sign_in_refused(target: SignInTarget, name: &str, e: &IdpError) -> Response {
    match e {
        IdpError::Refused(reason) => {
            tracing::info!(provider = %name, %reason, "sign-in refused");
            let message = match target {
                SignInTarget::Portal => {
                    "The sign-in could not be verified. Start again from the portal."
                }
                SignInTarget::Console => {
                    "The sign-in could not be verified. Start again from the sign-in page."
                }
            };
            problem_for(target, StatusCode::UNAUTHORIZED, message)
        }
        other => provider_failure(target, name, other),
    }
}

/// The provider is unreachable or misconfigured: the operator's problem, said plainly in the
/// log; the person is told to try later.
fn provider_failure(target: SignInTarget, name: &str, e: &IdpError) -> Response {
    tracing::error!(provider = %name, error = %e, "identity provider failure");
    problem_for(
        target,
        StatusCode::BAD_GATEWAY,
        "The sign-in service is not available right now. Try again later, or tell your IT team.",
    )
}

fn internal(e: &dyn std::fmt::Display) -> Response {
    tracing::error!(error = %e, "portal internal error");
    page::problem(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Something went wrong on our side. Try again later.",
    )
}

async fn portal_audit(
    state: &AppState,
    actor: &str,
    action: &str,
    target: Option<&str>,
    outcome: &str,
    detail: Option<serde_json::Value>,
) {
    audit::record(
        &state.store,
        NewAuditEntry {
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.map(str::to_owned),
            outcome: outcome.to_owned(),
            detail: detail.map(|d| d.to_string()),
            request_id: None,
            source: Some("portal".into()),
        },
    )
    .await;
}
