//! The MDM protocol's server side: check-in messages and the command channel, on top of an
//! authenticated device identity. HTTP handlers parse the transport and call in here; the store
//! holds devices, channels and the queue.

use std::sync::Arc;

use plist::Value;

use der::Decode;

use super::identity::DeviceIdentity;
use super::messages::{CheckIn, Report, ReportStatus};
use crate::config::ReenrollmentPolicy;
use crate::secrets::MasterKey;
use crate::store::{
    BindRefusal, Bound, CommandOutcome, ConnectingChannel, DeviceFacts, MdmEnrollment, Store,
    TokenUpdateRecord,
};

#[derive(Debug, thiserror::Error)]
pub enum MdmError {
    /// The body is not a message we can read: 400.
    #[error("{0}")]
    BadRequest(String),
    /// Not this device's identity, or not enrolled: 401 (a device unenrolls on it).
    #[error("{0}")]
    Unauthorized(String),
    /// A message Apple defines that the broker deliberately does not handle (UserAuthenticate):
    /// 410, which Apple documents as "not supported".
    #[error("{0}")]
    Gone(String),
    /// Defined by Apple, not implemented yet: 501.
    #[error("{0}")]
    NotImplemented(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl From<crate::store::StoreError> for MdmError {
    fn from(e: crate::store::StoreError) -> Self {
        MdmError::Internal(e.to_string())
    }
}

impl From<super::plist::PlistError> for MdmError {
    fn from(e: super::plist::PlistError) -> Self {
        MdmError::BadRequest(e.to_string())
    }
}

/// What to send back on a channel: an empty 200, or a plist.
#[derive(Debug, PartialEq, Eq)]
pub enum MdmReply {
    Empty,
    Plist(Vec<u8>),
}

/// How often `last_seen_at` is written for a busy channel: a write per connect would make every
/// Idle a write transaction.
const SEEN_RESOLUTION: chrono::Duration = chrono::Duration::seconds(60);

/// What a device is told when its certificate may not speak for it, whatever the reason: the
/// same words whether or not the UDID is enrolled already, so that a caller with a certificate
/// cannot probe which devices are managed. The precise reason goes to the log.
pub const NOT_ENROLLED_HERE: &str = "this device is not enrolled with this certificate";

#[derive(Clone)]
pub struct MdmService {
    store: Store,
    master_key: Arc<MasterKey>,
    reenrollment: ReenrollmentPolicy,
}

impl MdmService {
    pub fn new(store: Store, master_key: Arc<MasterKey>) -> Self {
        MdmService {
            store,
            master_key,
            reenrollment: ReenrollmentPolicy::default(),
        }
    }

    /// Whether a device enrolled under another active enrollment may enroll again.
    pub fn with_reenrollment(mut self, policy: ReenrollmentPolicy) -> Self {
        self.reenrollment = policy;
        self
    }

    /// A check-in message (CheckInURL).
    pub async fn check_in(
        &self,
        identity: &DeviceIdentity,
        body: &[u8],
    ) -> Result<MdmReply, MdmError> {
        let message = CheckIn::from_plist(body)?;
        let channel = message.channel();
        let device_id = channel
            .device_id()
            .ok_or_else(|| MdmError::BadRequest("no valid UDID or EnrollmentID".into()))?
            .to_owned();
        match &message {
            CheckIn::Authenticate(auth) => {
                self.check_topic(&auth.topic).await?;
                let facts = DeviceFacts {
                    serial_number: auth.serial_number.clone(),
                    model: auth.model.clone(),
                    model_name: auth.model_name.clone(),
                    product_name: auth.product_name.clone(),
                    device_name: auth.device_name.clone(),
                    os_version: auth.os_version.clone(),
                    build_version: auth.build_version.clone(),
                };
                let bound = self
                    .store
                    .authenticate_device(
                        &device_id,
                        &identity.enrollment_id,
                        &auth.topic,
                        &facts,
                        self.reenrollment,
                    )
                    .await?;
                match bound {
                    Ok(Bound::Reenrolled { previous }) => {
                        tracing::info!(device = %device_id, enrollment = %identity.enrollment_id,
                            previous = %previous, serial = %identity.certificate.serial,
                            "MDM: Authenticate: re-enrolled, the previous enrollment is retired");
                        Ok(MdmReply::Empty)
                    }
                    Ok(_) => {
                        tracing::info!(device = %device_id, enrollment = %identity.enrollment_id,
                            serial = %identity.certificate.serial, "MDM: Authenticate");
                        Ok(MdmReply::Empty)
                    }
                    Err(refusal) => {
                        self.refuse_authenticate(identity, &device_id, &refusal)
                            .await;
                        Err(MdmError::Unauthorized(NOT_ENROLLED_HERE.into()))
                    }
                }
            }
            other => {
                self.bound_device(identity, &device_id).await?;
                self.handle_check_in(other, &device_id).await
            }
        }
    }

    async fn handle_check_in(
        &self,
        message: &CheckIn,
        device_id: &str,
    ) -> Result<MdmReply, MdmError> {
        let channel = message.channel();
        match message {
            CheckIn::TokenUpdate(update) => {
                self.check_topic(&update.topic).await?;
                let enrollment_id = channel
                    .enrollment_id()
                    .ok_or_else(|| MdmError::BadRequest("no valid enrollment ID".into()))?;
                let token: &[u8] = &update.token;
                if token.is_empty() || token.len() > 256 || update.push_magic.is_empty() {
                    return Err(MdmError::BadRequest(
                        "TokenUpdate needs a Token and a PushMagic".into(),
                    ));
                }
                let unlock_token = match &update.unlock_token {
                    Some(data) => Some(self.seal("unlock-token", device_id, data)?),
                    None => None,
                };
                let user = channel.user().map(str::to_owned);
                self.store
                    .token_update(&TokenUpdateRecord {
                        enrollment_id,
                        udid: device_id.to_owned(),
                        channel: if user.is_some() { "user" } else { "device" },
                        user_id: user,
                        user_short_name: channel.user_short_name.clone(),
                        user_long_name: channel.user_long_name.clone(),
                        push_token: hex::encode(token),
                        push_magic: update.push_magic.clone(),
                        unlock_token,
                    })
                    .await?;
                Ok(MdmReply::Empty)
            }
            CheckIn::CheckOut(_) => {
                self.store.check_out(device_id).await?;
                tracing::info!(device = %device_id, "MDM: CheckOut");
                Ok(MdmReply::Empty)
            }
            CheckIn::SetBootstrapToken(set) => {
                let sealed = match &set.bootstrap_token {
                    Some(token) if !token.is_empty() => {
                        Some(self.seal("bootstrap-token", device_id, token)?)
                    }
                    _ => None,
                };
                self.store
                    .set_bootstrap_token(device_id, sealed.as_deref())
                    .await?;
                Ok(MdmReply::Empty)
            }
            CheckIn::GetBootstrapToken(_) => {
                let device = self.store.device(device_id).await?;
                let mut reply = plist::Dictionary::new();
                if let Some(sealed) = device.and_then(|d| d.bootstrap_token) {
                    let token = self
                        .master_key
                        .open(&purpose("bootstrap-token", device_id), &sealed)
                        .map_err(|e| MdmError::Internal(format!("bootstrap token: {e}")))?;
                    reply.insert("BootstrapToken".into(), Value::Data(token));
                }
                Ok(MdmReply::Plist(super::plist::to_xml(&Value::Dictionary(
                    reply,
                ))))
            }
            CheckIn::UserAuthenticate(_) => Err(MdmError::Gone(
                "user authentication is not supported by this server".into(),
            )),
            CheckIn::DeclarativeManagement(_) => Err(MdmError::NotImplemented(
                "declarative device management is not supported yet".into(),
            )),
            CheckIn::GetToken(_) => Err(MdmError::NotImplemented(
                "GetToken is not supported yet".into(),
            )),
            // Handled before the device is known (it is what makes it known).
            CheckIn::Authenticate(_) => Err(MdmError::Internal(
                "Authenticate reached the enrolled-device path".into(),
            )),
        }
    }

    /// The hot path of a command-channel request: one read proves the presented certificate
    /// (ours, valid now, unrevoked, the one bound to this device) and gets the channel and its
    /// queue state. `Ok(None)` when that read proves nothing: the caller then takes the full
    /// path ([`identify`](super::identity::identify), then [`Self::connect`]),
    /// which says precisely why a request is refused.
    pub async fn connect_presented(
        &self,
        certificate_der: &[u8],
        body: &[u8],
    ) -> Result<Option<MdmReply>, MdmError> {
        let report = Report::from_plist(body)?;
        let (device_id, enrollment_id) = channel_ids(&report)?;
        let Ok(certificate) = x509_cert::Certificate::from_der(certificate_der) else {
            return Ok(None);
        };
        let serial =
            crate::pki::ca::serial_hex(certificate.tbs_certificate().serial_number().as_bytes());
        let channel = self
            .store
            .connecting_channel_for_certificate(
                &enrollment_id,
                &device_id,
                &serial,
                certificate_der,
            )
            .await?
            .filter(|c| c.enrollment.status != "checked-out");
        match channel {
            Some(channel) => self
                .serve_connect(channel, &report, &device_id, &enrollment_id, body)
                .await
                .map(Some),
            None => Ok(None),
        }
    }

    /// A command-channel request (ServerURL): records a result, then offers the next command.
    pub async fn connect(
        &self,
        identity: &DeviceIdentity,
        body: &[u8],
    ) -> Result<MdmReply, MdmError> {
        let report = Report::from_plist(body)?;
        let (device_id, enrollment_id) = channel_ids(&report)?;
        let channel = self
            .store
            .connecting_channel(&enrollment_id, &device_id)
            .await?
            .filter(|c| c.enrollment.status != "checked-out")
            .ok_or_else(|| {
                MdmError::Unauthorized(
                    "this channel is not enrolled (no Authenticate and TokenUpdate)".into(),
                )
            })?;
        if channel.device_record_id != identity.enrollment_id {
            return Err(MdmError::Unauthorized(
                "the signing certificate belongs to another device".into(),
            ));
        }
        self.serve_connect(channel, &report, &device_id, &enrollment_id, body)
            .await
    }

    /// The rest of a connect, once the channel and the device's right to it are established.
    async fn serve_connect(
        &self,
        channel: ConnectingChannel,
        report: &Report,
        device_id: &str,
        enrollment_id: &str,
        body: &[u8],
    ) -> Result<MdmReply, MdmError> {
        self.note_seen(&channel.enrollment).await;

        let include_not_now = match report.status {
            ReportStatus::Idle => true,
            status => {
                let uuid = report.command_uuid.as_deref().ok_or_else(|| {
                    MdmError::BadRequest(format!("a {status:?} report needs a CommandUUID"))
                })?;
                let outcome = match status {
                    ReportStatus::Acknowledged => CommandOutcome::Acknowledged,
                    ReportStatus::Error => CommandOutcome::Error,
                    ReportStatus::CommandFormatError => CommandOutcome::FormatError,
                    _ => CommandOutcome::NotNow,
                };
                let error_chain = error_chain_json(body);
                let recorded = self
                    .store
                    .record_result(enrollment_id, uuid, outcome, body, error_chain.as_deref())
                    .await?;
                match recorded {
                    Some(command) if outcome == CommandOutcome::Acknowledged => {
                        super::inventory::absorb(&self.store, device_id, &command, body).await?;
                    }
                    Some(_) => {}
                    None => {
                        tracing::debug!(command = %uuid, "MDM: result for an unknown or finished command");
                    }
                }
                // After NotNow the device is busy: offer only what it has not deferred.
                status != ReportStatus::NotNow
            }
        };
        // Without work at the read above, there is none to send: a command queued since then
        // is not lost, its push wakes the device for another connect.
        let next = if channel.has_work {
            self.store
                .next_command(enrollment_id, include_not_now)
                .await?
        } else {
            None
        };
        // The queue stores each command as sent on the wire, {CommandUUID, Command}.
        Ok(match next {
            Some(command) => MdmReply::Plist(command.body),
            None => MdmReply::Empty,
        })
    }

    /// The device must be bound to the enrollment record of the certificate that signed. An
    /// unknown device and another device's certificate get the same answer.
    async fn bound_device(
        &self,
        identity: &DeviceIdentity,
        device_id: &str,
    ) -> Result<(), MdmError> {
        let reason = match self.store.device(device_id).await? {
            Some(device) if device.enrollment_id == identity.enrollment_id => return Ok(()),
            Some(_) => "the signing certificate belongs to another device",
            None => "unknown device: it has not sent Authenticate",
        };
        tracing::info!(device = %device_id, enrollment = %identity.enrollment_id,
            serial = %identity.certificate.serial, reason, "MDM: check-in refused");
        Err(MdmError::Unauthorized(NOT_ENROLLED_HERE.into()))
    }

    /// Logs why an Authenticate was refused; a refusal by the re-enrollment policy is audited
    /// too, so that the help desk can see why a device cannot enroll.
    async fn refuse_authenticate(
        &self,
        identity: &DeviceIdentity,
        device_id: &str,
        refusal: &BindRefusal,
    ) {
        tracing::warn!(device = %device_id, enrollment = %identity.enrollment_id,
            serial = %identity.certificate.serial, reason = %refusal,
            "MDM: Authenticate refused");
        if let BindRefusal::DeviceBoundElsewhere(policy) = refusal {
            let entry = crate::store::NewAuditEntry {
                actor: format!("device:{device_id}"),
                action: crate::store::AUDIT_REENROLL.into(),
                target: Some(device_id.to_owned()),
                outcome: crate::audit::OUTCOME_DENIED.into(),
                detail: Some(
                    serde_json::json!({"enrollment": identity.enrollment_id,
                                       "policy": policy.as_str()})
                    .to_string(),
                ),
                ..Default::default()
            };
            crate::audit::record(&self.store, entry).await;
        }
    }

    /// Once a push certificate is imported, devices must use its topic: a device under
    /// another topic could never be woken. Read per check-in (rare), so an import applies at
    /// once on every node.
    async fn check_topic(&self, topic: &str) -> Result<(), MdmError> {
        match self.store.push_certificate().await? {
            Some(push) if push.topic != topic => Err(MdmError::BadRequest(format!(
                "topic {topic} is not this server's push topic"
            ))),
            _ => Ok(()),
        }
    }

    fn seal(&self, what: &str, device_id: &str, secret: &[u8]) -> Result<String, MdmError> {
        Ok(self.master_key.seal(&purpose(what, device_id), secret))
    }

    async fn note_seen(&self, enrollment: &MdmEnrollment) {
        let now = crate::store::now();
        if enrollment
            .last_seen_at
            .is_none_or(|seen| now - seen >= SEEN_RESOLUTION)
            && let Err(e) = self.store.touch_enrollment(&enrollment.id, now).await
        {
            tracing::warn!(error = %e, "MDM: could not record last_seen_at");
        }
    }
}

/// The device (UDID or EnrollmentID) and channel a report is for.
fn channel_ids(report: &Report) -> Result<(String, String), MdmError> {
    let device_id = report
        .channel
        .device_id()
        .ok_or_else(|| MdmError::BadRequest("no valid UDID or EnrollmentID".into()))?
        .to_owned();
    let enrollment_id = report
        .channel
        .enrollment_id()
        .ok_or_else(|| MdmError::BadRequest("no valid enrollment ID".into()))?;
    Ok((device_id, enrollment_id))
}

/// What a sealed device secret is bound to: it cannot be moved to another device or role.
fn purpose(what: &str, device_id: &str) -> String {
    format!("mdm:{what}:{device_id}")
}

/// The ErrorChain of an Error report, as JSON, for the queue's history.
fn error_chain_json(body: &[u8]) -> Option<String> {
    let value = super::plist::parse_value(body).ok()?;
    let chain = value.as_dictionary()?.get("ErrorChain")?;
    serde_json::to_string(&super::inventory::to_json(chain)).ok()
}
