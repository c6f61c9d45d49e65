//! Token integrations and their shared app-config tokens: status and how many devices hold
//! each; creating integrations, generating or importing tokens, rotation, revocation,
//! revealing a value (`tokens:reveal`) and issuing app clients. Every action goes through the
//! admin API's audited operations (`admin::tokens::*_as`), so the same rules hold (the last
//! active token is not revoked unless forced) and the same audit records are written, in the
//! admin's name. A secret (a generated token, a revealed one, a client secret) is on the one
//! answer that made or revealed it, which is never cached.

use askama::Template;
use axum::extract::rejection::FormRejection;
use axum::extract::{Path, State};
use axum::http::header::CACHE_CONTROL;
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;
use axum::{Extension, Form};
use serde::Deserialize;
use serde_json::json;

use super::grants::Need;
use super::pages::{Chrome, parse_time, segment, when};
use super::{SignedIn, problem, render};
use crate::admin::scope::Scope;
use crate::admin::tokens::{
    TokenActor, create_client_as, create_integration_as, create_token_as, reveal_as, revoke_as,
    revoke_client_as, rotate_as, token_action,
};
use crate::audit::OUTCOME_FAILURE;
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::store::AppClientRecord;
use crate::tokens::shared::{IntegrationRequest, TokenError, TokenRequest, TokenView};

pub struct IntegrationLine {
    pub href: String,
    pub name: String,
    pub display_name: String,
    pub bundle_id: String,
    pub active_tokens: usize,
    pub active_clients: usize,
}

#[derive(Template)]
#[template(path = "console/tokens.html")]
pub struct TokensPage {
    pub chrome: Chrome,
    pub integrations: Vec<IntegrationLine>,
    /// `tokens:write`: the form that creates an integration.
    pub can_write: bool,
}

impl TokenActor for SignedIn {
    fn actor(&self) -> String {
        SignedIn::actor(self)
    }

    async fn audit(
        &self,
        state: &AppState,
        action: &str,
        target: Option<&str>,
        outcome: &str,
        detail: Option<serde_json::Value>,
    ) {
        SignedIn::audit(self, state, action, target, outcome, detail).await;
    }
}

/// An answer that may carry a secret: never cached (the console's answers are `no-store`
/// anyway; this one says so whatever the layers do).
fn no_store(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// A refused or failed token operation as a page (the API's status and message; the audited
/// operation already recorded it).
fn not_done(title: &str, err: ApiError) -> Response {
    problem(err.status, title, &err.message, true)
}

fn incomplete() -> Response {
    problem(
        StatusCode::BAD_REQUEST,
        "Form incomplete",
        "The form was incomplete or too large.",
        true,
    )
}

/// The form's CSRF token and then the scope `need`, both audited when refused as `action`.
async fn check(
    state: &AppState,
    admin: &SignedIn,
    csrf: &str,
    need: Scope,
    action: &str,
    target: &str,
) -> Result<(), Response> {
    admin.check_csrf(state, csrf, action, Some(target)).await?;
    admin
        .require(state, Need::Scope(need), action, Some(target))
        .await
}

/// A token service failure as a page: the API's status and message (internal causes logged,
/// the person told something went wrong).
fn token_problem(err: TokenError) -> Response {
    let err = ApiError::from(err);
    problem(err.status, "Not done", &err.message, true)
}

pub async fn integrations(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
) -> Response {
    if let Err(refused) = admin
        .require(
            &state,
            Need::Scope(Scope::TokensRead),
            "console.tokens",
            None,
        )
        .await
    {
        return refused;
    }
    let list = match state.tokens.integrations().await {
        Ok(list) => list,
        Err(e) => return token_problem(e),
    };
    render(
        StatusCode::OK,
        &TokensPage {
            chrome: Chrome::of(&admin, "tokens"),
            can_write: admin.allows(Need::Scope(Scope::TokensWrite)),
            integrations: list
                .into_iter()
                .map(|i| IntegrationLine {
                    href: format!("/admin/tokens/{}", segment(&i.integration.name)),
                    name: i.integration.name,
                    display_name: i.integration.display_name,
                    bundle_id: i.integration.bundle_id,
                    active_tokens: i.active_tokens,
                    active_clients: i.active_clients,
                })
                .collect(),
        },
    )
}

pub struct TokenLine {
    pub id: String,
    pub label: String,
    pub source: &'static str,
    pub last4: String,
    pub status: &'static str,
    pub current: bool,
    pub not_before: String,
    pub expires: String,
    pub created_by: String,
    pub delivered: i64,
    pub acknowledged: i64,
    pub revocable: bool,
    pub revoke_href: String,
    pub reveal_href: String,
}

pub struct ClientLine {
    pub revoke_href: String,
    pub id: String,
    pub name: String,
    pub created_by: String,
    pub created_at: String,
    pub last_used: String,
    pub status: &'static str,
}

/// A secret on this answer only: what it is, its value, and what to do with it.
pub struct Shown {
    /// The element's id (`new-token`, `revealed-token`, `client-secret`).
    pub id: &'static str,
    pub heading: String,
    pub value: String,
    pub note: &'static str,
}

#[derive(Template)]
#[template(path = "console/integration.html")]
pub struct IntegrationPage {
    pub chrome: Chrome,
    pub name: String,
    pub href: String,
    pub facts: Vec<(&'static str, String)>,
    pub tokens: Vec<TokenLine>,
    pub clients: Vec<ClientLine>,
    pub can_write: bool,
    /// `tokens:reveal`: a reveal button on each token not revoked.
    pub can_reveal: bool,
    /// A value made or revealed by this request: shown this once.
    pub shown: Option<Shown>,
}

fn token_line(name: &str, t: &TokenView) -> TokenLine {
    let href = format!("/admin/tokens/{}/tokens/{}", segment(name), segment(&t.id));
    TokenLine {
        revoke_href: format!("{href}/revoke"),
        reveal_href: format!("{href}/reveal"),
        id: t.id.clone(),
        label: t.label.clone(),
        source: t.source.as_str(),
        last4: t.last4.clone(),
        status: t.status.as_str(),
        current: t.current,
        not_before: when(&t.not_before),
        expires: t
            .expires_at
            .as_ref()
            .map(when)
            .unwrap_or_else(|| "—".into()),
        created_by: t.created_by.clone(),
        delivered: t.delivered,
        acknowledged: t.acknowledged,
        revocable: t.revoked_at.is_none(),
    }
}

fn client_line(c: &AppClientRecord) -> ClientLine {
    ClientLine {
        revoke_href: format!(
            "/admin/tokens/{}/clients/{}/revoke",
            segment(&c.integration),
            segment(&c.id)
        ),
        id: c.id.clone(),
        name: c.name.clone(),
        created_by: c.created_by.clone(),
        created_at: when(&c.created_at),
        last_used: c
            .last_used_at
            .as_ref()
            .map(when)
            .unwrap_or_else(|| "never".into()),
        status: if c.revoked_at.is_some() {
            "revoked"
        } else {
            "active"
        },
    }
}

async fn integration_page(
    state: &AppState,
    admin: &SignedIn,
    name: &str,
    shown: Option<Shown>,
) -> Response {
    let (integration, tokens, clients) = match (
        state.tokens.integration(name).await,
        state.tokens.tokens(name).await,
        state.tokens.clients(name).await,
    ) {
        (Ok(i), Ok(t), Ok(c)) => (i, t, c),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return token_problem(e),
    };
    let record = &integration.integration;
    let page = IntegrationPage {
        chrome: Chrome::of(admin, "tokens"),
        href: format!("/admin/tokens/{}", segment(name)),
        name: record.display_name.clone(),
        facts: vec![
            ("Name", record.name.clone()),
            ("App (bundle id)", record.bundle_id.clone()),
            ("Configuration key", record.config_key.clone()),
            (
                "Per-device tokens",
                if record.device_tokens { "yes" } else { "no" }.into(),
            ),
            ("Overlap on rotation", format!("{} s", record.overlap_secs)),
            ("Active app clients", integration.active_clients.to_string()),
        ],
        tokens: tokens.iter().map(|t| token_line(name, t)).collect(),
        clients: clients.iter().map(client_line).collect(),
        can_write: admin.allows(Need::Scope(Scope::TokensWrite)),
        can_reveal: admin.allows(Need::Scope(Scope::TokensReveal)),
        shown,
    };
    no_store(render(StatusCode::OK, &page))
}

pub async fn integration(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    Path(name): Path<String>,
) -> Response {
    if let Err(refused) = admin
        .require(
            &state,
            Need::Scope(Scope::TokensRead),
            "console.tokens",
            Some(&name),
        )
        .await
    {
        return refused;
    }
    integration_page(&state, &admin, &name, None).await
}

#[derive(Debug, Deserialize)]
pub struct IntegrationForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    display_name: String,
    #[serde(default)]
    bundle_id: String,
    #[serde(default)]
    config_key: String,
    #[serde(default)]
    device_tokens: Option<String>,
    #[serde(default)]
    overlap_secs: String,
}

/// Creates an integration, as `POST /api/v1/token-integrations` does.
pub async fn create_integration(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    form: Result<Form<IntegrationForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return incomplete();
    };
    let name = form.name.trim().to_owned();
    let target = crate::audit::truncated(&name, 128);
    let action = "token-integration.create";
    if let Err(refused) = check(
        &state,
        &admin,
        &form.csrf,
        Scope::TokensWrite,
        action,
        &target,
    )
    .await
    {
        return refused;
    }
    let overlap_secs = match form.overlap_secs.trim() {
        "" => None,
        text => match text.parse::<i64>() {
            Ok(secs) => Some(secs),
            Err(_) => {
                return problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Not created",
                    "The overlap is a whole number of seconds (or leave it empty).",
                    true,
                );
            }
        },
    };
    let display_name = Some(form.display_name.trim().to_owned()).filter(|d| !d.is_empty());
    let request = IntegrationRequest {
        name: name.clone(),
        display_name,
        bundle_id: form.bundle_id.trim().to_owned(),
        config_key: form.config_key.trim().to_owned(),
        device_tokens: form.device_tokens.is_some(),
        overlap_secs,
    };
    match create_integration_as(&admin, &state, request).await {
        Ok(_) => crate::enroll::see_other(&format!("/admin/tokens/{}", segment(&name))),
        Err(e) => not_done("Not created", e),
    }
}

#[derive(Debug, Deserialize)]
pub struct TokenForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    label: String,
    /// The vendor's value to import; empty: generate one.
    #[serde(default)]
    value: String,
    /// `YYYY-MM-DDTHH:MM` (UTC), optional.
    #[serde(default)]
    not_before: String,
    #[serde(default)]
    expires_at: String,
}

/// Generates or imports a token, as `POST /api/v1/token-integrations/{name}/tokens` does. A
/// generated value is shown on this answer, once; an imported one is never shown back.
pub async fn create_token(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    Path(name): Path<String>,
    form: Result<Form<TokenForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return incomplete();
    };
    let value = Some(form.value.trim().to_owned()).filter(|v| !v.is_empty());
    let mut request = TokenRequest {
        label: Some(form.label.trim().to_owned()).filter(|l| !l.is_empty()),
        value,
        not_before: None,
        expires_at: None,
    };
    let action = token_action(&request);
    if let Err(refused) = check(
        &state,
        &admin,
        &form.csrf,
        Scope::TokensWrite,
        action,
        &name,
    )
    .await
    {
        return refused;
    }
    let times = parse_time(&form.not_before).and_then(|n| Ok((n, parse_time(&form.expires_at)?)));
    let (not_before, expires_at) = match times {
        Ok(times) => times,
        Err(message) => {
            admin
                .audit(
                    &state,
                    action,
                    Some(&name),
                    OUTCOME_FAILURE,
                    Some(json!({"error": message})),
                )
                .await;
            return problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Not created",
                &message,
                true,
            );
        }
    };
    request.not_before = not_before;
    request.expires_at = expires_at;
    match create_token_as(&admin, &state, &name, request).await {
        Ok(created) => {
            let shown = created.value.map(|value| Shown {
                id: "new-token",
                heading: format!("The new token …{}, shown this once:", created.token.last4),
                value,
                note: "Copy it now if the vendor needs it: it is not shown again (only a \
                       reveal, audited, shows it later).",
            });
            integration_page(&state, &admin, &name, shown).await
        }
        Err(e) => not_done("Not created", e),
    }
}

#[derive(Debug, Deserialize)]
pub struct RotateForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    label: String,
}

/// A new generated token becomes current; the previous one keeps working for the overlap.
/// The new value is on the page this answer renders, once (the API shows it once too).
pub async fn rotate(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    Path(name): Path<String>,
    form: Result<Form<RotateForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return incomplete();
    };
    if let Err(refused) = check(
        &state,
        &admin,
        &form.csrf,
        Scope::TokensWrite,
        "token.rotate",
        &name,
    )
    .await
    {
        return refused;
    }
    let label = Some(form.label.trim().to_owned()).filter(|l| !l.is_empty());
    match rotate_as(&admin, &state, &name, label, None).await {
        Ok(rotation) => {
            let shown = rotation.created.value.map(|value| Shown {
                id: "new-token",
                heading: "The new token, shown this once:".into(),
                value,
                note: "Devices receive it with their next app configuration; the previous \
                       token keeps working for the overlap.",
            });
            integration_page(&state, &admin, &name, shown).await
        }
        Err(e) => not_done("Not rotated", e),
    }
}

#[derive(Debug, Deserialize)]
pub struct RevokeForm {
    #[serde(default)]
    csrf: String,
    /// The integration's name, typed to confirm.
    #[serde(default)]
    confirm: String,
    /// Revoke even the last active token (apps lose their configuration's token).
    #[serde(default)]
    force: Option<String>,
}

pub async fn revoke(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    Path((name, id)): Path<(String, String)>,
    form: Result<Form<RevokeForm>, FormRejection>,
) -> Response {
    let target = format!("{name}/{id}");
    let Ok(Form(form)) = form else {
        return incomplete();
    };
    if let Err(refused) = check(
        &state,
        &admin,
        &form.csrf,
        Scope::TokensWrite,
        "token.revoke",
        &target,
    )
    .await
    {
        return refused;
    }
    let force = form.force.is_some();
    if form.confirm.trim() != name {
        admin
            .audit(
                &state,
                "token.revoke",
                Some(&target),
                OUTCOME_FAILURE,
                Some(json!({"reason": "integration name not confirmed"})),
            )
            .await;
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not confirmed",
            &format!("Nothing was revoked: type the integration's name (\"{name}\") to confirm."),
            true,
        );
    }
    match revoke_as(&admin, &state, &name, &id, force).await {
        Ok(_) => integration_page(&state, &admin, &name, None).await,
        Err(e) => not_done("Not revoked", e),
    }
}

#[derive(Debug, Deserialize)]
pub struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

/// A token's value (`tokens:reveal`), audited as `token.reveal` like the API's, on this
/// answer only. A POST: it writes an audit record and must not be prefetched or replayed
/// from history.
pub async fn reveal(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    Path((name, id)): Path<(String, String)>,
    form: Result<Form<CsrfOnly>, FormRejection>,
) -> Response {
    let target = format!("{name}/{id}");
    let Ok(Form(form)) = form else {
        return incomplete();
    };
    if let Err(refused) = check(
        &state,
        &admin,
        &form.csrf,
        Scope::TokensReveal,
        "token.reveal",
        &target,
    )
    .await
    {
        return refused;
    }
    match reveal_as(&admin, &state, &name, &id).await {
        Ok(value) => {
            let shown = Shown {
                id: "revealed-token",
                heading: format!("Token {id}:"),
                value,
                note: "This reveal is in the audit log under your name.",
            };
            integration_page(&state, &admin, &name, Some(shown)).await
        }
        Err(e) => not_done("Not revealed", e),
    }
}

#[derive(Debug, Deserialize)]
pub struct ClientForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
}

/// Issues an app client for the vendor's back end, as
/// `POST /api/v1/token-integrations/{name}/clients` does; its secret is shown once.
pub async fn create_client(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    Path(name): Path<String>,
    form: Result<Form<ClientForm>, FormRejection>,
) -> Response {
    let Ok(Form(form)) = form else {
        return incomplete();
    };
    if let Err(refused) = check(
        &state,
        &admin,
        &form.csrf,
        Scope::TokensWrite,
        "app-client.create",
        &name,
    )
    .await
    {
        return refused;
    }
    let client_name = Some(form.name.trim().to_owned()).filter(|n| !n.is_empty());
    match create_client_as(&admin, &state, &name, client_name).await {
        Ok(issued) => {
            let shown = Shown {
                id: "client-secret",
                heading: format!(
                    "App client {} (id {}): its secret, shown this once:",
                    issued.client.name, issued.client.id
                ),
                value: issued.client_secret,
                note: "Give the id and this secret to the vendor's back end; it is never shown \
                       again (issue a new client if it is lost).",
            };
            integration_page(&state, &admin, &name, Some(shown)).await
        }
        Err(e) => not_done("Not issued", e),
    }
}

#[derive(Debug, Deserialize)]
pub struct RevokeClientForm {
    #[serde(default)]
    csrf: String,
    /// The client's name, typed to confirm.
    #[serde(default)]
    confirm: String,
}

/// Revokes an app client, as `POST /api/v1/token-integrations/{name}/clients/{id}/revoke`
/// does: the vendor's back end can no longer validate tokens with it. The client's name is
/// typed to confirm.
pub async fn revoke_client(
    State(state): State<AppState>,
    Extension(admin): Extension<SignedIn>,
    Path((name, id)): Path<(String, String)>,
    form: Result<Form<RevokeClientForm>, FormRejection>,
) -> Response {
    let target = format!("{name}/{id}");
    let Ok(Form(form)) = form else {
        return incomplete();
    };
    let action = "app-client.revoke";
    if let Err(refused) = check(
        &state,
        &admin,
        &form.csrf,
        Scope::TokensWrite,
        action,
        &target,
    )
    .await
    {
        return refused;
    }
    let client = match state.tokens.clients(&name).await {
        Ok(clients) => clients.into_iter().find(|c| c.id == id),
        Err(e) => return token_problem(e),
    };
    if let Some(client) = &client
        && form.confirm.trim() != client.name
    {
        admin
            .audit(
                &state,
                action,
                Some(&target),
                OUTCOME_FAILURE,
                Some(json!({"reason": "client name not confirmed"})),
            )
            .await;
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Not confirmed",
            &format!(
                "Nothing was revoked: type the app client's name (\"{}\") to confirm.",
                client.name
            ),
            true,
        );
    }
    // An unknown client: the API's answer (404), audited as its failure.
    match revoke_client_as(&admin, &state, &name, &id).await {
        Ok(_) => integration_page(&state, &admin, &name, None).await,
        Err(e) => not_done("Not revoked", e),
    }
}
