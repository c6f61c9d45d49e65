//! Admin API for the CA: one-time SCEP challenges, the certificate inventory, revocation.

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use utoipa::{IntoParams, ToSchema};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::auth::{self, Admin};
use crate::audit::{OUTCOME_FAILURE, OUTCOME_SUCCESS};
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::pki::challenge::{self, ChallengeRequest};
use crate::store::{CertificateQuery, CertificateRecord, CertificateStatus, StoreError};

pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::default()
        .routes(routes!(create_challenge))
        .routes(routes!(list_certificates))
        .routes(routes!(show_certificate))
        .routes(routes!(revoke_certificate))
}

/// Who a new enrollment is for: the body of challenge and profile requests.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(super) struct ChallengeBody {
    /// The person the enrollment is for (1 to 128 printable characters).
    pub for_user: Option<String>,
    /// The device the enrollment is for (1 to 128 printable characters).
    pub for_device: Option<String>,
}

impl ChallengeBody {
    /// The hints end up in certificate subjects and profiles: short and printable.
    pub(super) fn validate(&self) -> Result<(), ApiError> {
        for hint in [&self.for_user, &self.for_device].into_iter().flatten() {
            if hint.is_empty() || hint.len() > MAX_HINT_LEN || hint.chars().any(char::is_control) {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "invalid_request",
                    format!(
                        "for_user and for_device must be 1 to {MAX_HINT_LEN} printable characters"
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Longest user or device hint accepted (they end up in certificate subjects).
const MAX_HINT_LEN: usize = 128;

/// A one-time SCEP challenge and the enrollment record it belongs to. Audited.
#[utoipa::path(post, path = "/scep/challenges", tag = "pki", security(("admin_key" = ["scep:challenge"])),
    request_body(content = Option<ChallengeBody>, description = "Optional: who the enrollment is for."),
    responses(
        (status = 201, description = "`{challenge, enrollment_id, expires_at}`; the challenge is shown once.", body = Object),
        (status = 422, description = "A hint is empty, too long or not printable.", body = crate::http::openapi::ErrorBody),
    ))]
async fn create_challenge(
    admin: Admin<auth::ScepChallenge>,
    State(state): State<AppState>,
    body: Option<Json<ChallengeBody>>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    body.validate()?;
    let issued = challenge::create(
        &state.store,
        state.config.pki.challenge_ttl,
        ChallengeRequest {
            requested_by: admin.principal.actor(),
            for_user: body.for_user.clone(),
            for_device: body.for_device.clone(),
            user_id: None,
        },
    )
    .await;
    match issued {
        Ok(issued) => {
            // The challenge itself is a secret: the audit record names only the enrollment.
            let detail = json!({"for_user": body.for_user, "for_device": body.for_device,
                                "expires_at": issued.expires_at});
            admin
                .audit(
                    &state,
                    "scep-challenge.create",
                    Some(&issued.enrollment_id),
                    OUTCOME_SUCCESS,
                    Some(detail),
                )
                .await;
            Ok((
                StatusCode::CREATED,
                Json(json!({
                    "challenge": issued.challenge,
                    "expires_at": issued.expires_at,
                    "enrollment_id": issued.enrollment_id,
                })),
            ))
        }
        Err(e) => {
            admin
                .audit(&state, "scep-challenge.create", None, OUTCOME_FAILURE, None)
                .await;
            Err(e.into())
        }
    }
}

/// A certificate as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
#[schema(as = Certificate)]
struct CertificateView {
    serial: String,
    subject: String,
    enrollment_id: Option<String>,
    /// The stored status, or `expired`.
    status: &'static str,
    not_before: DateTime<Utc>,
    not_after: DateTime<Utc>,
    issued_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
    revocation_reason: Option<String>,
    renewed_from: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pem: Option<String>,
}

impl CertificateView {
    fn of(record: CertificateRecord, with_pem: bool) -> Self {
        // A certificate past its end is reported as expired, whatever its stored status.
        let status = if record.status == CertificateStatus::Valid && record.not_after <= Utc::now()
        {
            "expired"
        } else {
            record.status.as_str()
        };
        CertificateView {
            pem: with_pem.then(|| crate::pki::pem("CERTIFICATE", &record.der)),
            serial: record.serial,
            subject: record.subject,
            enrollment_id: record.enrollment_id,
            status,
            not_before: record.not_before,
            not_after: record.not_after,
            issued_at: record.issued_at,
            revoked_at: record.revoked_at,
            revocation_reason: record.revocation_reason,
            renewed_from: record.renewed_from,
        }
    }
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
struct ListParams {
    /// Only this enrollment's certificates.
    enrollment_id: Option<String>,
    /// `valid` or `revoked`.
    status: Option<String>,
    /// The previous page's `next_after` (a serial).
    after: Option<String>,
    /// Certificates per page, 1 to 1000 (default 100).
    limit: Option<u32>,
}

/// Issued certificates, by serial, a page at a time (without PEM).
#[utoipa::path(get, path = "/certificates", tag = "pki", security(("admin_key" = ["certificates:read"])),
    params(ListParams),
    responses((status = 200, description = "A page of certificates.", body = CertificatePage)))]
async fn list_certificates(
    _admin: Admin<auth::CertificatesRead>,
    State(state): State<AppState>,
    Query(params): Query<ListParams>,
) -> Result<Json<CertificatePage>, ApiError> {
    let limit = super::page_limit(params.limit)?;
    let status = match params
        .status
        .as_deref()
        .map(str::parse::<CertificateStatus>)
    {
        None => None,
        Some(Ok(status)) => Some(status),
        Some(Err(_)) => return Err(ApiError::bad_request("status must be 'valid' or 'revoked'")),
    };
    let records = state
        .store
        .list_certificates(&CertificateQuery {
            enrollment_id: params.enrollment_id,
            status,
            after: params.after.map(|s| s.to_ascii_lowercase()),
            limit,
        })
        .await?;
    let next_after = (records.len() == limit as usize)
        .then(|| records.last().map(|r| r.serial.clone()))
        .flatten();
    let certificates: Vec<_> = records
        .into_iter()
        .map(|r| CertificateView::of(r, false))
        .collect();
    Ok(Json(CertificatePage {
        certificates,
        next_after,
    }))
}

/// A page of the certificate inventory.
#[derive(Serialize, ToSchema)]
struct CertificatePage {
    /// Without their PEM.
    certificates: Vec<CertificateView>,
    /// The `after` of the next page; null on the last one.
    next_after: Option<String>,
}

/// One certificate, with its PEM.
#[utoipa::path(get, path = "/certificates/{serial}", tag = "pki", security(("admin_key" = ["certificates:read"])),
    params(("serial" = String, Path, description = "The serial, in hex (any case).")),
    responses(
        (status = 200, description = "The certificate.", body = CertificateView),
        (status = 404, description = "No certificate with that serial.", body = crate::http::openapi::ErrorBody),
    ))]
async fn show_certificate(
    _admin: Admin<auth::CertificatesRead>,
    State(state): State<AppState>,
    Path(serial): Path<String>,
) -> Result<Json<CertificateView>, ApiError> {
    let record = state
        .store
        .certificate(&serial.to_ascii_lowercase())
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no certificate with serial {serial}")))?;
    Ok(Json(CertificateView::of(record, true)))
}

#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(as = RevokeCertificate)]
struct RevokeBody {
    /// Why (at most 256 characters; `unspecified` when absent).
    reason: Option<String>,
}

/// Revokes a valid certificate. Audited.
#[utoipa::path(post, path = "/certificates/{serial}/revoke", tag = "pki", security(("admin_key" = ["certificates:write"])),
    params(("serial" = String, Path, description = "The serial, in hex (any case).")),
    request_body(content = Option<RevokeBody>),
    responses(
        (status = 200, description = "`{revoked: {serial, reason}}`", body = Object),
        (status = 404, description = "No valid certificate with that serial.", body = crate::http::openapi::ErrorBody),
    ))]
async fn revoke_certificate(
    admin: Admin<auth::CertificatesWrite>,
    State(state): State<AppState>,
    Path(serial): Path<String>,
    body: Option<Json<RevokeBody>>,
) -> Result<Json<Value>, ApiError> {
    let serial = serial.to_ascii_lowercase();
    let reason = body
        .and_then(|Json(b)| b.reason)
        .unwrap_or_else(|| "unspecified".into());
    if reason.len() > 256 {
        return Err(ApiError::bad_request("reason is limited to 256 characters"));
    }
    let action = "certificate.revoke";
    let detail = json!({"reason": reason});
    match state
        .store
        .revoke_certificate(&serial, &reason, crate::store::now())
        .await
    {
        Ok(()) => {
            admin
                .audit(&state, action, Some(&serial), OUTCOME_SUCCESS, Some(detail))
                .await;
            Ok(Json(
                json!({"revoked": {"serial": serial, "reason": reason}}),
            ))
        }
        Err(StoreError::NotFound) => {
            admin
                .audit(&state, action, Some(&serial), OUTCOME_FAILURE, Some(detail))
                .await;
            Err(ApiError::not_found(format!(
                "no valid certificate with serial {serial}"
            )))
        }
        Err(e) => Err(e.into()),
    }
}
