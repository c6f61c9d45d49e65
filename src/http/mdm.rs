//! The device-facing MDM endpoints: check-in (CheckInURL) and the command channel (ServerURL).
//! Thin: [`SignedRequest`] proves who is speaking before anything of the body but its
//! signature is read; then the service reads the message within limits and handles it.

use std::net::SocketAddr;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};

use super::error::ApiError;
use super::{AppState, TlsClientCertificate};
use crate::apple::cache::CertificateKey;
use crate::apple::identity::{self, Credentials, IdentityError, VerifiedDevice};
use crate::apple::service::{MdmError, MdmReply};

pub const CHECKIN_PATH: &str = "/mdm/checkin";
pub const CONNECT_PATH: &str = "/mdm/connect";

const SIGNATURE_HEADER: &str = "mdm-signature";

/// Where a request came from and what certificate its TLS connection presented.
type Transport = (
    Option<Extension<ConnectInfo<SocketAddr>>>,
    Option<Extension<TlsClientCertificate>>,
);

/// A device request whose sender is proven: the certificate it presents is ours (or a
/// migrated CA's), may speak now, and (when it signs) signed this very body.
pub struct SignedRequest {
    pub device: VerifiedDevice,
    pub body: Bytes,
}

impl FromRequest<AppState> for SignedRequest {
    type Rejection = Response;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, Response> {
        let (mut parts, body) = request.into_parts();
        let transport =
            <Transport as FromRequestParts<AppState>>::from_request_parts(&mut parts, state)
                .await?;
        // Bytes reads the body alone: the headers are moved out, not copied.
        let headers = std::mem::take(&mut parts.headers);
        let body = Bytes::from_request(Request::from_parts(parts, body), state)
            .await
            .map_err(IntoResponse::into_response)?;
        let (certificate, key) = presented(state, transport, &headers, &body).map_err(refusal)?;
        let device = identity::verify_cached(
            state.mdm.cache(),
            &state.store,
            &state.migrated_cas,
            certificate,
            key,
        )
        .await
        .map_err(refusal)?;
        Ok(SignedRequest { device, body })
    }
}

pub async fn check_in(State(state): State<AppState>, request: SignedRequest) -> Response {
    let SignedRequest { device, body } = request;
    let outcome = match state.mdm.read(&device, body).await {
        Ok(message) => state.mdm.check_in(&device, &message).await,
        Err(e) => Err(e),
    };
    respond(outcome, "checkin")
}

pub async fn connect(State(state): State<AppState>, request: SignedRequest) -> Response {
    let SignedRequest { device, body } = request;
    let outcome = match state.mdm.read(&device, body.clone()).await {
        Ok(message) => state.mdm.connect(&device, &message, &body).await,
        Err(e) => Err(e),
    };
    respond(outcome, "connect")
}

/// The certificate the request presents (signature, TLS or trusted proxy), signature checked.
fn presented(
    state: &AppState,
    (peer, tls_certificate): Transport,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(Vec<u8>, Option<CertificateKey>), IdentityError> {
    let signature = match headers.get(SIGNATURE_HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(value)) => Some(value),
        Some(Err(_)) => {
            return Err(IdentityError::Malformed(
                "the Mdm-Signature header is not text".into(),
            ));
        }
    };
    let proxy_certificate =
        proxy_certificate(state, peer.map(|p| p.0.0), headers).map_err(IdentityError::Malformed)?;
    let credentials = Credentials {
        signature_header: signature,
        tls_client_certificate: tls_certificate.as_ref().map(|c| c.0.0.as_slice()),
        proxy_certificate,
    };
    identity::presented_certificate(state.mdm.cache(), credentials, body)
}

fn refusal(e: IdentityError) -> Response {
    let (status, code) = match &e {
        IdentityError::Malformed(_) => (StatusCode::BAD_REQUEST, "bad_request"),
        IdentityError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
        IdentityError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
    };
    tracing::info!(error = %e, "MDM: request refused");
    ApiError::new(status, code, e.to_string()).into_response()
}

/// The certificate in the trusted proxy's header, when the request came from such a proxy.
/// The header from anyone else is ignored (and logged): it is trivially forged.
fn proxy_certificate(
    state: &AppState,
    peer: Option<SocketAddr>,
    headers: &HeaderMap,
) -> Result<Option<Vec<u8>>, String> {
    let settings = &state.config.mdm_identity;
    let Some(name) = &settings.client_cert_header else {
        return Ok(None);
    };
    let Some(value) = headers.get(name) else {
        return Ok(None);
    };
    let trusted =
        peer.is_some_and(|p| settings.trusted_proxies.iter().any(|n| n.contains(&p.ip())));
    if !trusted {
        tracing::warn!(?peer, header = %name, "certificate header from an untrusted address ignored");
        return Ok(None);
    }
    let text = value
        .to_str()
        .map_err(|_| format!("the {name} header is not text"))?;
    decode_certificate_header(text).map(Some).ok_or_else(|| {
        format!("the {name} header holds no certificate (URL-encoded PEM, PEM or base64 DER)")
    })
}

/// nginx's `$ssl_client_escaped_cert` is URL-encoded PEM; others send PEM or base64 DER.
fn decode_certificate_header(text: &str) -> Option<Vec<u8>> {
    let text = text.trim();
    if text.is_empty() || text.len() > 64 * 1024 {
        return None;
    }
    let decoded = percent_encoding::percent_decode_str(text)
        .decode_utf8()
        .ok()?;
    if decoded.contains("-----BEGIN CERTIFICATE-----") {
        use rustls::pki_types::pem::PemObject;
        return rustls::pki_types::CertificateDer::from_pem_slice(decoded.as_bytes())
            .ok()
            .map(|c| c.to_vec());
    }
    base64::Engine::decode(
        &base64::engine::general_purpose::STANDARD,
        decoded.as_bytes(),
    )
    .ok()
}

fn respond(outcome: Result<MdmReply, MdmError>, channel: &'static str) -> Response {
    match outcome {
        Ok(MdmReply::Empty) => StatusCode::OK.into_response(),
        Ok(MdmReply::Plist(body)) => (
            [(header::CONTENT_TYPE, "application/xml; charset=utf-8")],
            body,
        )
            .into_response(),
        Err(e) => {
            let (status, code) = match &e {
                MdmError::BadRequest(_) => (StatusCode::BAD_REQUEST, "bad_request"),
                MdmError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
                MdmError::Gone(_) => (StatusCode::GONE, "not_supported"),
                MdmError::NotImplemented(_) => (StatusCode::NOT_IMPLEMENTED, "not_implemented"),
                MdmError::Busy => (StatusCode::SERVICE_UNAVAILABLE, "busy"),
                MdmError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            };
            if status.is_server_error() {
                tracing::error!(error = %e, channel, "MDM: request failed");
            } else {
                tracing::info!(error = %e, channel, "MDM: request refused");
            }
            let message = match &e {
                MdmError::Internal(_) => "internal error".to_owned(),
                other => other.to_string(),
            };
            let mut response = ApiError::new(status, code, message).into_response();
            if status == StatusCode::SERVICE_UNAVAILABLE {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            response
        }
    }
}
