//! Admin API for group-driven policy: the set in force (`GET /policies`, `/policies/{name}`),
//! its versions, plan and apply of a set sent as files (what `trustbroker policy plan|apply
//! --server` sends), and a device's policy state (`GET /enrollments/{id}/state`).

use std::collections::BTreeMap;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use base64::Engine;
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{self, Admin};
use crate::audit::{OUTCOME_FAILURE, OUTCOME_SUCCESS};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::policy::plan::{self, ApplyError};
use crate::policy::reconcile::ReconcileError;
use crate::policy::{Diagnostic, Policy};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(list_policies))
        .routes(routes!(list_versions))
        .routes(routes!(plan_set))
        .routes(routes!(apply_set))
        .routes(routes!(show_policy))
        .routes(routes!(device_state))
}

/// A policy set as files: relative path → base64 content.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct SetBody {
    /// Relative path (`policies/….yaml`) → the file's content in base64.
    files: BTreeMap<String, String>,
    /// The commit of the policy repository the files come from.
    git_commit: Option<String>,
    /// Consent to a plan that locks or wipes devices.
    #[serde(default)]
    allow_destructive: bool,
}

impl SetBody {
    fn decode(&self) -> Result<BTreeMap<String, Vec<u8>>, ApiError> {
        self.files
            .iter()
            .map(|(path, b64)| {
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map(|bytes| (path.clone(), bytes))
                    .map_err(|_| invalid(format!("files.{path} is not base64")))
            })
            .collect()
    }

    fn git_commit(&self) -> Result<Option<&str>, ApiError> {
        match self.git_commit.as_deref() {
            Some(c)
                if c.is_empty() || c.len() > 64 || !c.bytes().all(|b| b.is_ascii_hexdigit()) =>
            {
                Err(invalid("git_commit is a hexadecimal commit ID"))
            }
            other => Ok(other),
        }
    }
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
        message.into(),
    )
}

/// 422 with every problem, each with its file, line and column.
fn invalid_set(diagnostics: &[Diagnostic]) -> (StatusCode, Json<Value>) {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({
            "error": "invalid_policy_set",
            "message": format!("the policy set has {} problem(s)", diagnostics.len()),
            "diagnostics": diagnostics,
        })),
    )
}

fn reconcile_error(e: ReconcileError) -> ApiError {
    match e {
        ReconcileError::Store(e) => e.into(),
        other => ApiError::internal(&other),
    }
}

/// What applying this policy set would change (nothing is written).
#[utoipa::path(post, path = "/policies/plan", tag = "policies", security(("admin_key" = ["policies:read"])),
    request_body = SetBody,
    responses(
        (status = 200, description = "The plan: per policy and device, what would be installed, removed, locked or wiped.", body = Object),
        (status = 422, description = "A file is not base64, or the set is invalid: `{error: \"invalid_policy_set\", message, diagnostics: [{file, line, column, message}]}`.", body = Object),
    ))]
async fn plan_set(
    _admin: Admin<auth::PoliciesRead>,
    State(state): State<AppState>,
    Json(body): Json<SetBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let files = body.decode()?;
    let set = match crate::policy::load::load_files(&files) {
        Ok(set) => set,
        Err(diagnostics) => return Ok(invalid_set(&diagnostics)),
    };
    let plan = plan::plan(&state.store, &state.reconciler, &set)
        .await
        .map_err(reconcile_error)?;
    Ok((StatusCode::OK, Json(json!(plan))))
}

/// Applies a policy set: a new version, and the reconciler queues what it implies. Audited.
#[utoipa::path(post, path = "/policies/apply", tag = "policies", security(("admin_key" = ["policies:write"])),
    request_body = SetBody,
    responses(
        (status = 201, description = "Applied as a new version.", body = Object),
        (status = 200, description = "The set is the one in force already (`unchanged: true`).", body = Object),
        (status = 409, description = "The plan locks or wipes devices and `allow_destructive` was not given: `{error: \"destructive_plan\", message, plan}`.", body = Object),
        (status = 422, description = "Invalid set (`invalid_policy_set` with `diagnostics`) or an invalid `git_commit`.", body = Object),
    ))]
async fn apply_set(
    admin: Admin<auth::PoliciesWrite>,
    State(state): State<AppState>,
    Json(body): Json<SetBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let files = body.decode()?;
    let git_commit = body.git_commit()?;
    let applied = plan::apply(
        &state.store,
        &state.reconciler,
        &files,
        &admin.principal.actor(),
        git_commit,
        body.allow_destructive,
    )
    .await;
    match applied {
        Ok(applied) => {
            if !applied.unchanged {
                admin
                    .audit(
                        &state,
                        "policy.apply",
                        Some(&format!("v{}", applied.version)),
                        OUTCOME_SUCCESS,
                        Some(
                            json!({"digest": applied.plan.digest, "git_commit": git_commit,
                                    "totals": applied.plan.totals,
                                    "destructive": applied.plan.destructive,
                                    "allow_destructive": body.allow_destructive}),
                        ),
                    )
                    .await;
            }
            let status = if applied.unchanged {
                StatusCode::OK
            } else {
                StatusCode::CREATED
            };
            Ok((status, Json(json!(applied))))
        }
        Err(ApplyError::Invalid(diagnostics)) => Ok(invalid_set(&diagnostics)),
        Err(ApplyError::Destructive(plan)) => {
            admin
                .audit(
                    &state,
                    "policy.apply",
                    None,
                    OUTCOME_FAILURE,
                    Some(
                        json!({"digest": plan.digest, "refused": "destructive without consent",
                                "destructive": plan.destructive}),
                    ),
                )
                .await;
            Ok((
                StatusCode::CONFLICT,
                Json(json!({
                    "error": "destructive_plan",
                    "message": "the plan contains locks or wipes: review them and apply again \
                                with allow_destructive (--allow-destructive) to consent",
                    "plan": plan,
                })),
            ))
        }
        Err(ApplyError::Reconcile(e)) => Err(reconcile_error(e)),
    }
}

fn policy_view(policy: &Policy, detailed: bool) -> Value {
    let mut view = json!({
        "name": policy.name,
        "description": policy.description,
        "file": policy.file,
        "groups": policy.groups,
        "platforms": policy.platforms,
        "profiles": policy.profiles.iter().map(|p| json!({
            "identifier": p.identifier, "display_name": p.display_name,
        })).collect::<Vec<_>>(),
        "apps": policy.apps.iter().map(|a| json!({
            "bundle_id": a.bundle_id, "itunes_store_id": a.itunes_store_id,
            "manifest_url": a.manifest_url,
        })).collect::<Vec<_>>(),
        "commands_on_join": policy.commands_on_join.iter().map(|c| &c.request_type)
            .collect::<Vec<_>>(),
        "on_leave": {
            "remove": policy.on_leave.remove,
            "lock_after_secs": policy.on_leave.lock.map(|d| d.as_secs()),
            "wipe_after_secs": policy.on_leave.wipe.map(|d| d.as_secs()),
        },
    });
    if detailed && let Some(object) = view.as_object_mut() {
        let to_json = |d: &plist::Dictionary| {
            crate::apple::inventory::to_json(&plist::Value::Dictionary(d.clone()))
        };
        object.insert(
            "profile_templates".into(),
            policy
                .profiles
                .iter()
                .map(|p| (p.identifier.clone(), to_json(&p.template)))
                .collect::<serde_json::Map<_, _>>()
                .into(),
        );
        object.insert(
            "app_configurations".into(),
            policy
                .apps
                .iter()
                .map(|a| {
                    (
                        a.bundle_id.clone(),
                        a.configuration.as_ref().map_or(Value::Null, to_json),
                    )
                })
                .collect::<serde_json::Map<_, _>>()
                .into(),
        );
    }
    view
}

/// The policy set in force.
#[utoipa::path(get, path = "/policies", tag = "policies", security(("admin_key" = ["policies:read"])),
    responses((status = 200, description = "`{version, digest, applied, policies: [...]}`", body = Object)))]
async fn list_policies(
    _admin: Admin<auth::PoliciesRead>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    state.reconciler.refresh().await.map_err(reconcile_error)?;
    let active = state.reconciler.active().get();
    let version = state.store.policy_versions(1).await?.into_iter().next();
    Ok(Json(json!({
        "version": active.version,
        "digest": active.set.digest,
        "applied": version,
        "policies": active.set.policies.iter().map(|p| policy_view(p, false)).collect::<Vec<_>>(),
    })))
}

/// One policy of the set in force, in detail.
#[utoipa::path(get, path = "/policies/{name}", tag = "policies", security(("admin_key" = ["policies:read"])),
    params(("name" = String, Path, description = "The policy's name.")),
    responses(
        (status = 200, description = "The policy.", body = Object),
        (status = 404, description = "No policy with that name in the set in force.", body = crate::http::openapi::ErrorBody),
    ))]
async fn show_policy(
    _admin: Admin<auth::PoliciesRead>,
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    state.reconciler.refresh().await.map_err(reconcile_error)?;
    let active = state.reconciler.active().get();
    let policy = active
        .set
        .policies
        .iter()
        .find(|p| p.name == name)
        .ok_or_else(|| ApiError::not_found("no policy with that name in the set in force"))?;
    let mut view = policy_view(policy, true);
    if let Some(object) = view.as_object_mut() {
        object.insert("version".into(), json!(active.version));
    }
    Ok(Json(view))
}

/// The last 100 applied versions, newest first.
#[utoipa::path(get, path = "/policies/versions", tag = "policies", security(("admin_key" = ["policies:read"])),
    responses((status = 200, description = "`{versions: [...]}`", body = Object)))]
async fn list_versions(
    _admin: Admin<auth::PoliciesRead>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let versions = state.store.policy_versions(100).await?;
    Ok(Json(json!({ "versions": versions })))
}

/// A device's policy state: what the set in force wants on it, and what it reported.
/// `{id}`: a device channel ID (the UDID), as `/enrollments/{id}` takes it.
#[utoipa::path(get, path = "/enrollments/{id}/state", tag = "policies", security(("admin_key" = ["policies:read"])),
    params(("id" = String, Path, description = "The enrollment (channel) ID or UDID.")),
    responses(
        (status = 200, description = "Desired and reported state per policy.", body = Object),
        (status = 404, description = "No managed device with that ID.", body = crate::http::openapi::ErrorBody),
    ))]
async fn device_state(
    _admin: Admin<auth::PoliciesRead>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let udid = match state.store.mdm_enrollment(&id).await? {
        Some(channel) => channel.udid,
        None => id,
    };
    state.reconciler.refresh().await.map_err(reconcile_error)?;
    let active = state.reconciler.active().get();
    let lead = chrono::Duration::days(i64::from(state.config.policy.identity_renewal_days));
    let shared: std::collections::BTreeMap<String, String> = state
        .tokens
        .current_values()
        .into_iter()
        .map(|(integration, token)| (integration, token.value))
        .collect();
    let device = crate::policy::state::device_state(
        &state.store,
        &state.reconciler.compiled(),
        active.version,
        &udid,
        lead,
        &shared,
    )
    .await?
    .ok_or_else(|| ApiError::not_found("no managed device with that enrollment ID"))?;
    Ok(Json(json!(device)))
}
