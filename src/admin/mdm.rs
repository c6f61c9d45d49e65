//! Admin API for Apple MDM: enrollments (command channels) and their devices, and the command
//! queue: enqueue for many enrollments at once, inspect history with results, cancel.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderName, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{self, Admin};
use crate::apple::commands;
use crate::apple::enrollment::ProfileError;
use crate::apple::inventory;
use crate::audit::{OUTCOME_FAILURE, OUTCOME_SUCCESS};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::pki::challenge::ChallengeRequest;
use crate::store::{
    AUDIT_RETIRE, ChannelStatus, CommandRecord, CommandStatus, DeviceRecord, EnrollmentSpan,
    MdmEnrollment, NewCommand, PushStatus, Queued, RetireRequest, UserRecord,
};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(create_profile))
        .routes(routes!(show_push_certificate, import_push_certificate))
        .routes(routes!(enqueue))
        .routes(routes!(cancel, show_command))
        .routes(routes!(list_enrollments))
        .routes(routes!(show_enrollment))
        .routes(routes!(enrollment_commands))
        .routes(routes!(retire_enrollment))
        .routes(routes!(show_device))
}

/// Most enrollments one enqueue may address.
const MAX_TARGETS: usize = 10_000;

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct EnqueueBody {
    /// The enrollments to queue the command for (1 to 10,000).
    enrollment_ids: Vec<String>,
    /// A typed command with Apple's key names.
    command: Option<Value>,
    /// Or a raw command plist (XML text).
    command_plist: Option<String>,
    /// Queue even when an identical command is pending for an enrollment.
    #[serde(default)]
    allow_duplicates: bool,
    /// Do not wake the devices over APNs (they get the command at their next check).
    #[serde(default)]
    nopush: bool,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::new(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_request",
        message.into(),
    )
}

/// Queues one command for many enrollments and wakes their devices. Audited.
#[utoipa::path(post, path = "/commands", tag = "mdm", security(("admin_key" = ["commands:write"])),
    request_body = EnqueueBody,
    responses(
        (status = 201, description = "`{request_type, commands: [{enrollment_id, command_uuid | error}]}`", body = Object),
        (status = 422, description = "No or too many targets, or an invalid command.", body = crate::http::openapi::ErrorBody),
    ))]
async fn enqueue(
    admin: Admin<auth::CommandsWrite>,
    State(state): State<AppState>,
    Json(body): Json<EnqueueBody>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let command = match (&body.command, &body.command_plist) {
        (Some(json), None) => commands::from_json(json),
        (None, Some(xml)) => commands::from_plist(xml.as_bytes()),
        _ => {
            return Err(invalid(
                "give exactly one of command (JSON with Apple's keys) or command_plist",
            ));
        }
    }
    .map_err(|e| invalid(e.to_string()))?;
    let mut targets = body.enrollment_ids.clone();
    targets.sort();
    targets.dedup();
    if targets.is_empty() || targets.len() > MAX_TARGETS {
        return Err(invalid(format!(
            "enrollment_ids must name 1 to {MAX_TARGETS} enrollments"
        )));
    }
    let mut unknown = Vec::new();
    // Channels a push can wake: a dead or missing token is not pushed (the command waits for
    // the device's next check-in), and the answer says so.
    let mut wakeable = Vec::new();
    for id in &targets {
        match state.store.mdm_enrollment(id).await? {
            Some(e) if e.status != ChannelStatus::CheckedOut => {
                if e.push_token.is_some() && e.push_status != PushStatus::Unregistered {
                    wakeable.push(id.clone());
                }
            }
            _ => unknown.push(id.clone()),
        }
    }
    if !unknown.is_empty() {
        return Err(invalid(format!(
            "not enrolled (unknown or checked out): {}",
            unknown.join(", ")
        )));
    }
    let fingerprint = command.fingerprint();
    let actor = admin.principal.actor();
    let new: Vec<NewCommand> = targets
        .iter()
        .map(|id| {
            let uuid = uuid::Uuid::new_v4().to_string().to_uppercase();
            NewCommand {
                body: command.envelope(&uuid),
                uuid,
                enrollment_id: id.clone(),
                request_type: command.request_type.clone(),
                fingerprint: fingerprint.clone(),
                created_by: actor.clone(),
            }
        })
        .collect();
    let queued = match state.store.enqueue(&new, !body.allow_duplicates).await {
        Ok(queued) => queued,
        Err(e) => {
            admin
                .audit(
                    &state,
                    "command.enqueue",
                    Some(&command.request_type),
                    OUTCOME_FAILURE,
                    None,
                )
                .await;
            return Err(e.into());
        }
    };
    let push = |id: &String| match (body.nopush, wakeable.contains(id)) {
        (true, _) => "not-requested",
        (false, true) => "requested",
        (false, false) => "no-token",
    };
    let results: Vec<Value> = new
        .iter()
        .zip(&queued)
        .map(|(c, q)| match q {
            Queued::Queued => json!({"enrollment_id": c.enrollment_id, "command_uuid": c.uuid,
                                     "status": CommandStatus::Queued, "push": push(&c.enrollment_id)}),
            Queued::Duplicate(existing) => json!({"enrollment_id": c.enrollment_id,
                "command_uuid": existing, "status": "duplicate", "push": push(&c.enrollment_id)}),
        })
        .collect();
    if !body.nopush && !wakeable.is_empty() {
        state.pusher.wake(wakeable);
    }
    admin
        .audit(
            &state,
            "command.enqueue",
            Some(&command.request_type),
            OUTCOME_SUCCESS,
            Some(json!({"commands": results})),
        )
        .await;
    Ok((
        StatusCode::CREATED,
        Json(json!({"request_type": command.request_type, "commands": results})),
    ))
}

/// Cancels a command that no device has fetched yet. Audited.
#[utoipa::path(delete, path = "/commands/{uuid}", tag = "mdm", security(("admin_key" = ["commands:write"])),
    params(("uuid" = String, Path, description = "The command's UUID.")),
    responses(
        (status = 200, description = "`{cancelled: uuid}`", body = Object),
        (status = 404, description = "No pending command with that UUID.", body = crate::http::openapi::ErrorBody),
    ))]
async fn cancel(
    admin: Admin<auth::CommandsWrite>,
    State(state): State<AppState>,
    Path(uuid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if state.store.cancel_command(&uuid).await? {
        admin
            .audit(&state, "command.cancel", Some(&uuid), OUTCOME_SUCCESS, None)
            .await;
        Ok(Json(json!({"cancelled": uuid})))
    } else {
        admin
            .audit(&state, "command.cancel", Some(&uuid), OUTCOME_FAILURE, None)
            .await;
        Err(ApiError::not_found(
            "no pending command with that UUID (unknown, answered or already cancelled)",
        ))
    }
}

/// A command, its state and the device's answer.
#[utoipa::path(get, path = "/commands/{uuid}", tag = "mdm", security(("admin_key" = ["devices:read"])),
    params(("uuid" = String, Path, description = "The command's UUID.")),
    responses(
        (status = 200, description = "The command with its status and result.", body = Object),
        (status = 404, description = "No command with that UUID.", body = crate::http::openapi::ErrorBody),
    ))]
async fn show_command(
    _admin: Admin<auth::DevicesRead>,
    State(state): State<AppState>,
    Path(uuid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let command = state
        .store
        .command(&uuid)
        .await?
        .ok_or_else(|| ApiError::not_found("no command with that UUID"))?;
    Ok(Json(command_view(&command)))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// The previous page's `next_after`.
    after: Option<String>,
    /// Items per page, 1 to 1000 (default 100).
    limit: Option<u32>,
}

/// Enrollments (MDM command channels), a page at a time.
#[utoipa::path(get, path = "/enrollments", tag = "mdm", security(("admin_key" = ["devices:read"])),
    params(ListParams),
    responses((status = 200, description = "`{enrollments: [...], next_after}`", body = Object)))]
async fn list_enrollments(
    _admin: Admin<auth::DevicesRead>,
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    let limit = super::page_limit(params.limit)?;
    let page = state
        .store
        .list_mdm_enrollments(params.after.as_deref(), limit)
        .await?;
    let next_after = (page.len() == limit as usize)
        .then(|| page.last().map(|e| e.id.clone()))
        .flatten();
    let mut enrollments = Vec::with_capacity(page.len());
    for enrollment in page {
        enrollments.push(enrollment_view(&state, enrollment, false).await?);
    }
    Ok(Json(
        json!({"enrollments": enrollments, "next_after": next_after}),
    ))
}

/// One enrollment: its device, owner, push state and history.
#[utoipa::path(get, path = "/enrollments/{id}", tag = "mdm", security(("admin_key" = ["devices:read"])),
    params(("id" = String, Path, description = "The enrollment ID.")),
    responses(
        (status = 200, description = "The enrollment.", body = Object),
        (status = 404, description = "No enrollment with that ID.", body = crate::http::openapi::ErrorBody),
    ))]
async fn show_enrollment(
    _admin: Admin<auth::DevicesRead>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let enrollment = state
        .store
        .mdm_enrollment(&id)
        .await?
        .ok_or_else(|| ApiError::not_found("no enrollment with that ID"))?;
    Ok(Json(enrollment_view(&state, enrollment, true).await?))
}

/// An enrollment's commands, newest first, a page at a time.
#[utoipa::path(get, path = "/enrollments/{id}/commands", tag = "mdm", security(("admin_key" = ["devices:read"])),
    params(("id" = String, Path, description = "The enrollment ID."), ListParams),
    responses(
        (status = 200, description = "`{commands: [...], next_after}`", body = Object),
        (status = 404, description = "No enrollment with that ID.", body = crate::http::openapi::ErrorBody),
    ))]
async fn enrollment_commands(
    _admin: Admin<auth::DevicesRead>,
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(params): Query<ListParams>,
) -> Result<Json<Value>, ApiError> {
    if state.store.mdm_enrollment(&id).await?.is_none() {
        return Err(ApiError::not_found("no enrollment with that ID"));
    }
    let limit = params.limit.unwrap_or(1000).clamp(1, 1000);
    let commands = state.store.commands_for(&id, limit).await?;
    Ok(Json(json!({
        "enrollment_id": id,
        "commands": commands.iter().map(command_view).collect::<Vec<_>>(),
    })))
}

/// An enrollment with its device; `detailed` adds the inventory and installed profiles.
async fn enrollment_view(
    state: &AppState,
    enrollment: MdmEnrollment,
    detailed: bool,
) -> Result<Value, ApiError> {
    let device = state.store.device(&enrollment.udid).await?;
    let mut view = serde_json::to_value(&enrollment).map_err(|e| ApiError::internal(&e))?;
    if let (Some(device), Some(object)) = (device, view.as_object_mut()) {
        let parse = |text: &Option<String>| {
            text.as_deref()
                .and_then(|t| serde_json::from_str::<Value>(t).ok())
        };
        let mut d = json!({
            "udid": device.udid,
            "enrollment_record_id": device.enrollment_id,
            "serial_number": device.serial_number,
            "model": device.model,
            "model_name": device.model_name,
            "product_name": device.product_name,
            "device_name": device.device_name,
            "os_version": device.os_version,
            "build_version": device.build_version,
            "topic": device.topic,
            "authenticated_at": device.authenticated_at,
            "updated_at": device.updated_at,
        });
        let owner = match &device.owner_id {
            Some(id) => state.store.user(id).await?,
            None => None,
        };
        // The person the device was enrolled for (the Apple `user_*` fields are the user
        // channel's macOS account, a different thing).
        object.insert("owner".into(), owner_view(owner, &device));
        if detailed && let Some(d) = d.as_object_mut() {
            let history = state.store.enrollment_history(&device.udid).await?;
            d.insert("enrollments".into(), history_view(state, history).await?);
            d.insert(
                "inventory".into(),
                parse(&device.inventory).unwrap_or(Value::Null),
            );
            d.insert(
                "profiles".into(),
                parse(&device.profiles).unwrap_or(Value::Null),
            );
        }
        object.insert("device".into(), d);
    }
    Ok(view)
}

/// The person a device belongs to, and since when.
fn owner_view(owner: Option<UserRecord>, device: &DeviceRecord) -> Value {
    owner.map_or(Value::Null, |u| {
        json!({"id": u.id, "provider": u.provider, "login": u.login, "email": u.email,
               "display_name": u.display_name, "bound_at": device.owner_bound_at})
    })
}

/// A device's enrollments, oldest first, each with the person it was for.
async fn history_view(state: &AppState, history: Vec<EnrollmentSpan>) -> Result<Value, ApiError> {
    let mut out = Vec::with_capacity(history.len());
    for span in history {
        let owner = match &span.owner_id {
            Some(id) => state.store.user(id).await?,
            None => None,
        };
        let mut view = serde_json::to_value(&span).map_err(|e| ApiError::internal(&e))?;
        if let Some(object) = view.as_object_mut() {
            object.remove("owner_id");
            object.insert(
                "owner".into(),
                match (owner, span.owner_id) {
                    (Some(u), _) => json!({"id": u.id, "login": u.login, "email": u.email,
                                           "display_name": u.display_name}),
                    (None, Some(id)) => json!({"id": id}),
                    (None, None) => Value::Null,
                },
            );
        }
        out.push(view);
    }
    Ok(Value::Array(out))
}

/// A device: what it reported, its owner, its channels, and every enrollment it has had.
/// A device by UDID: its inventory, enrollments and owner.
#[utoipa::path(get, path = "/devices/{udid}", tag = "mdm", security(("admin_key" = ["devices:read"])),
    params(("udid" = String, Path, description = "The device's UDID.")),
    responses(
        (status = 200, description = "The device.", body = Object),
        (status = 404, description = "No device with that UDID.", body = crate::http::openapi::ErrorBody),
    ))]
async fn show_device(
    _admin: Admin<auth::DevicesRead>,
    State(state): State<AppState>,
    Path(udid): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let device = state
        .store
        .device(&udid)
        .await?
        .ok_or_else(|| ApiError::not_found("no device with that UDID"))?;
    let owner = match &device.owner_id {
        Some(id) => state.store.user(id).await?,
        None => None,
    };
    let channels = state.store.channels_of(&device.udid).await?;
    let history = state.store.enrollment_history(&device.udid).await?;
    let mut view = serde_json::to_value(&device).map_err(|e| ApiError::internal(&e))?;
    if let Some(object) = view.as_object_mut() {
        let parse = |key: &str| {
            object
                .get(key)
                .and_then(Value::as_str)
                .and_then(|t| serde_json::from_str::<Value>(t).ok())
                .unwrap_or(Value::Null)
        };
        let (inventory, profiles) = (parse("inventory"), parse("profiles"));
        object.insert("inventory".into(), inventory);
        object.insert("profiles".into(), profiles);
        object.remove("owner_id");
        object.remove("owner_bound_at");
        if let Some(record) = object.remove("enrollment_id") {
            object.insert("enrollment_record_id".into(), record);
        }
        object.insert("owner".into(), owner_view(owner, &device));
        object.insert("channels".into(), json!(channels));
        object.insert("enrollments".into(), history_view(&state, history).await?);
    }
    Ok(Json(view))
}

/// Retires an enrollment: every certificate of its record revoked, its device's queue
/// cancelled and push tokens cleared, both MDM channels refusing it from the next request.
/// Idempotent: a second call changes nothing and says `already_retired`.
/// Retires an enrollment: its certificates are revoked, its commands cancelled, the device
/// is told to remove management. Audited.
#[utoipa::path(post, path = "/enrollments/{id}/retire", tag = "mdm", security(("admin_key" = ["certificates:write"])),
    params(("id" = String, Path, description = "The enrollment ID (record or channel).")),
    responses(
        (status = 200, description = "`{retired: {...}}`", body = Object),
        (status = 400, description = "Not a valid enrollment ID.", body = crate::http::openapi::ErrorBody),
        (status = 404, description = "No enrollment with that ID.", body = crate::http::openapi::ErrorBody),
    ))]
async fn retire_enrollment(
    admin: Admin<auth::CertificatesWrite>,
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if !crate::apple::lifecycle::valid_id(&id) {
        return Err(ApiError::bad_request(
            "an enrollment ID is 1 to 256 printable characters",
        ));
    }
    let by = RetireRequest {
        actor: admin.principal.actor(),
        request_id: admin.origin.request_id.clone(),
        source: admin.origin.source.clone(),
    };
    match crate::apple::lifecycle::retire(&state.store, &id, &by).await? {
        Some(retired) => Ok(Json(json!({"retired": retired}))),
        None => {
            admin
                .audit(&state, AUDIT_RETIRE, Some(&id), OUTCOME_FAILURE, None)
                .await;
            Err(ApiError::not_found(
                "no enrollment record or enrollment (channel) with that ID",
            ))
        }
    }
}

fn command_view(command: &CommandRecord) -> Value {
    let mut view = serde_json::to_value(command).unwrap_or_else(|_| json!({}));
    if let Some(object) = view.as_object_mut() {
        let result = command
            .result
            .as_deref()
            .and_then(|raw| crate::apple::plist::parse_value(raw).ok())
            .map(|v| inventory::to_json(&v));
        object.insert("result".into(), result.unwrap_or(Value::Null));
        if let Some(chain) = command
            .error_chain
            .as_deref()
            .and_then(|t| serde_json::from_str::<Value>(t).ok())
        {
            object.insert("error_chain".into(), chain);
        }
        let sent = crate::apple::plist::parse_value(&command.body)
            .ok()
            .and_then(|v| v.into_dictionary())
            .and_then(|mut d| d.remove("Command"))
            .map(|c| inventory::to_json(&c));
        object.insert("command".into(), sent.unwrap_or(Value::Null));
    }
    view
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ProfileParams {
    /// Sign the profile with the broker's certificate (default true).
    signed: Option<bool>,
}

/// A new enrollment (record and one-time challenge) packaged as a `.mobileconfig`.
#[utoipa::path(post, path = "/enrollment-profiles", tag = "mdm", security(("admin_key" = ["scep:challenge"])),
    params(ProfileParams),
    request_body(content = Option<crate::admin::pki::ChallengeBody>, description = "Optional: who the enrollment is for."),
    responses(
        (status = 201, description = "The profile; `X-Enrollment-Id` and `X-Challenge-Expires-At` name the enrollment and the challenge's expiry.",
         content_type = "application/x-apple-aspen-config", body = Vec<u8>),
        (status = 409, description = "No push certificate is imported (`no_push_certificate`).", body = crate::http::openapi::ErrorBody),
        (status = 422, description = "A hint is empty, too long or not printable.", body = crate::http::openapi::ErrorBody),
    ))]
async fn create_profile(
    admin: Admin<auth::ScepChallenge>,
    State(state): State<AppState>,
    Query(params): Query<ProfileParams>,
    body: Option<Json<super::pki::ChallengeBody>>,
) -> Result<Response, ApiError> {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    body.validate()?;
    let signed = params.signed.unwrap_or(true);
    let issued = state
        .profiles
        .issue(
            ChallengeRequest {
                requested_by: admin.principal.actor(),
                for_user: body.for_user.clone(),
                for_device: body.for_device.clone(),
                user_id: None,
            },
            signed,
        )
        .await;
    let issued = match issued {
        Ok(issued) => issued,
        Err(e) => {
            admin
                .audit(
                    &state,
                    "enrollment-profile.create",
                    None,
                    OUTCOME_FAILURE,
                    None,
                )
                .await;
            return Err(match e {
                ProfileError::NoPushCertificate => {
                    ApiError::new(StatusCode::CONFLICT, "no_push_certificate", e.to_string())
                }
                ProfileError::Internal(e) => ApiError::internal(&e),
            });
        }
    };
    admin
        .audit(
            &state,
            "enrollment-profile.create",
            Some(&issued.enrollment_id),
            OUTCOME_SUCCESS,
            Some(
                json!({"for_user": body.for_user, "for_device": body.for_device,
                        "signed": signed, "expires_at": issued.expires_at}),
            ),
        )
        .await;
    let disposition = format!(
        "attachment; filename=\"enroll-{}.mobileconfig\"",
        issued.enrollment_id
    );
    Ok((
        StatusCode::CREATED,
        [
            (
                header::CONTENT_TYPE,
                "application/x-apple-aspen-config".to_owned(),
            ),
            (header::CONTENT_DISPOSITION, disposition),
            (
                HeaderName::from_static("x-enrollment-id"),
                issued.enrollment_id.clone(),
            ),
            (
                HeaderName::from_static("x-challenge-expires-at"),
                issued.expires_at.to_rfc3339(),
            ),
        ],
        issued.body,
    )
        .into_response())
}

/// Either `certificate_pem` and `key_pem`, or `pkcs12_base64` (and its `password`).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
struct PushCertificateBody {
    /// The APNs push certificate (PEM).
    certificate_pem: Option<String>,
    /// Its private key (PEM).
    key_pem: Option<String>,
    /// A PKCS#12 bundle (base64), instead of the two PEMs.
    pkcs12_base64: Option<String>,
    password: Option<String>,
}

/// Imports (replaces) the APNs push certificate; its topic applies to the next check-ins and
/// profiles on every node. Audited.
#[utoipa::path(put, path = "/push-certificate", tag = "mdm", security(("admin_key" = ["push-cert:write"])),
    request_body = PushCertificateBody,
    responses(
        (status = 200, description = "`{topic, not_after}`", body = Object),
        (status = 422, description = "Not a usable push certificate and key.", body = crate::http::openapi::ErrorBody),
    ))]
async fn import_push_certificate(
    admin: Admin<auth::PushCertWrite>,
    State(state): State<AppState>,
    Json(body): Json<PushCertificateBody>,
) -> Result<Json<Value>, ApiError> {
    let (cert_pem, key_pem) = match body {
        PushCertificateBody {
            certificate_pem: Some(cert),
            key_pem: Some(key),
            pkcs12_base64: None,
            password: None,
        } => (cert, key),
        PushCertificateBody {
            certificate_pem: None,
            key_pem: None,
            pkcs12_base64: Some(p12),
            password,
        } => {
            use base64::Engine;
            let compact: String = p12.chars().filter(|c| !c.is_whitespace()).collect();
            let der = base64::engine::general_purpose::STANDARD
                .decode(compact)
                .map_err(|_| invalid("pkcs12_base64 is not base64"))?;
            crate::apple::push_cert::pkcs12_to_pem(&der, password.as_deref().unwrap_or(""))
                .map_err(|e| invalid(format!("{e:#}")))?
        }
        _ => {
            return Err(invalid(
                "give certificate_pem and key_pem, or pkcs12_base64 (and its password)",
            ));
        }
    };
    let imported =
        crate::apple::push_cert::import(&state.store, &state.master_key, &cert_pem, &key_pem).await;
    match imported {
        Ok(imported) => {
            admin
                .audit(
                    &state,
                    "push-cert.import",
                    Some(&imported.topic),
                    OUTCOME_SUCCESS,
                    None,
                )
                .await;
            Ok(Json(
                json!({"topic": imported.topic, "not_after": imported.not_after}),
            ))
        }
        Err(e) => {
            admin
                .audit(&state, "push-cert.import", None, OUTCOME_FAILURE, None)
                .await;
            Err(invalid(format!("{e:#}")))
        }
    }
}

/// The APNs push certificate in use: its topic and expiry.
#[utoipa::path(get, path = "/push-certificate", tag = "mdm", security(("admin_key" = ["devices:read"])),
    responses(
        (status = 200, description = "`{topic, not_after, imported_at}`", body = Object),
        (status = 404, description = "No push certificate imported.", body = crate::http::openapi::ErrorBody),
    ))]
async fn show_push_certificate(
    _admin: Admin<auth::DevicesRead>,
    State(state): State<AppState>,
) -> Result<Json<Value>, ApiError> {
    let push = state
        .store
        .push_certificate()
        .await?
        .ok_or_else(|| ApiError::not_found("no push certificate imported"))?;
    Ok(Json(
        json!({"topic": push.topic, "not_after": push.not_after,
                   "imported_at": push.imported_at}),
    ))
}
