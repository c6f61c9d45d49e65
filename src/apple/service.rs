//! The MDM protocol's server side: check-in messages and the command channel, on top of an
//! authenticated device identity. HTTP handlers parse the transport and call in here; the store
//! holds devices, channels and the queue.

use std::sync::Arc;

use bytes::Bytes;
use plist::Value;
use tokio::sync::Semaphore;

use std::borrow::Cow;

use super::cache::MdmCache;
use super::identity::{Channel, IdentityError, VerifiedDevice};
use super::messages::{CheckIn, Report, ReportStatus};
use super::plist::{Limits, PlistError};
use crate::config::ReenrollmentPolicy;
use crate::secrets::MasterKey;
use crate::store::{
    BindRefusal, Bound, ChannelStatus, ChannelType, CommandOutcome, DeviceFacts, Store,
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
    /// Too many large messages are being read at once: 503 with Retry-After.
    #[error("the server is busy reading other large messages; retry shortly")]
    Busy,
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
    /// Reads of messages too large to read on an async worker, at most one per core.
    large_reads: Arc<Semaphore>,
    reenrollment: ReenrollmentPolicy,
    /// Wakes the policy reconciler after a device became reachable or reported drift.
    reconcile_wake: crate::policy::ReconcileWake,
    /// Certificate standings and idle channels, so that most connects read no row.
    cache: MdmCache,
}

impl MdmService {
    pub fn new(store: Store, master_key: Arc<MasterKey>) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, usize::from);
        MdmService {
            master_key,
            large_reads: Arc::new(Semaphore::new(cores)),
            reenrollment: ReenrollmentPolicy::default(),
            reconcile_wake: crate::policy::ReconcileWake::default(),
            cache: MdmCache::new(store.clone()),
            store,
        }
    }

    /// The node's MDM request caches (its poller is started with the server).
    pub fn cache(&self) -> &MdmCache {
        &self.cache
    }

    /// `identity`, or, when it came from the cache and `admits` says no, its standing read
    /// again: the cache may be a second behind, and only the store may refuse a device.
    async fn confirmed<'a>(
        &self,
        identity: &'a VerifiedDevice,
        admits: impl Fn(&VerifiedDevice) -> bool,
    ) -> Result<Cow<'a, VerifiedDevice>, MdmError> {
        if admits(identity) {
            return Ok(Cow::Borrowed(identity));
        }
        match super::identity::reread(&self.cache, &self.store, identity).await {
            Ok(Some(fresh)) => Ok(Cow::Owned(fresh)),
            Ok(None) => Ok(Cow::Borrowed(identity)),
            Err(IdentityError::Unauthenticated(reason)) => {
                tracing::info!(serial = %identity.serial(), reason = %reason,
                    "MDM: request refused");
                Err(MdmError::Unauthorized(NOT_ENROLLED_HERE.into()))
            }
            Err(IdentityError::Malformed(e)) => Err(MdmError::BadRequest(e)),
            Err(IdentityError::Internal(e)) => Err(MdmError::Internal(e)),
        }
    }

    /// The reconciler to wake when a device can take commands or reports its profiles.
    pub fn with_reconcile_wake(mut self, wake: crate::policy::ReconcileWake) -> Self {
        self.reconcile_wake = wake;
        self
    }

    /// Asks the reconciler to look at a device now.
    async fn request_reconcile(&self, device_id: &str, reason: &str) -> Result<(), MdmError> {
        self.store
            .request_reconcile(None, Some(device_id), reason)
            .await?;
        self.reconcile_wake.wake();
        Ok(())
    }

    /// Whether a device enrolled under another active enrollment may enroll again.
    pub fn with_reenrollment(mut self, policy: ReenrollmentPolicy) -> Self {
        self.reenrollment = policy;
        self
    }

    /// Reads what a verified device sent. Almost every message is small and read at once;
    /// one over [`Limits::INLINE`] is read again on the blocking pool within
    /// [`Limits::DEVICE`], a core at most each, and refused with [`MdmError::Busy`] when every
    /// core is already at it, so that no message stalls the async workers or queues up.
    pub async fn read(&self, _device: &VerifiedDevice, body: Bytes) -> Result<Value, MdmError> {
        match super::plist::parse_value_within(&body, &Limits::INLINE) {
            Err(PlistError::TooLarge(_)) => {}
            other => return Ok(other?),
        }
        let permit = self
            .large_reads
            .clone()
            .try_acquire_owned()
            .map_err(|_| MdmError::Busy)?;
        let read = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            super::plist::parse_value(&body)
        });
        match read.await {
            Ok(value) => Ok(value?),
            Err(e) => Err(MdmError::Internal(format!("reading a message: {e}"))),
        }
    }

    /// A check-in message (CheckInURL).
    pub async fn check_in(
        &self,
        identity: &VerifiedDevice,
        message: &Value,
    ) -> Result<MdmReply, MdmError> {
        let message = CheckIn::from_value(message)?;
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
                        identity.enrollment_id(),
                        &auth.topic,
                        &facts,
                        self.reenrollment,
                    )
                    .await?;
                match bound {
                    Ok(Bound::Reenrolled { previous }) => {
                        tracing::info!(device = %device_id, enrollment = %identity.enrollment_id(),
                            previous = %previous, serial = %identity.serial(),
                            "MDM: Authenticate: re-enrolled, the previous enrollment is retired");
                        Ok(MdmReply::Empty)
                    }
                    Ok(_) => {
                        tracing::info!(device = %device_id, enrollment = %identity.enrollment_id(),
                            serial = %identity.serial(), "MDM: Authenticate");
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
                let identity = self
                    .confirmed(identity, |i| i.bound_device() == Some(device_id.as_str()))
                    .await?;
                bound_device(&identity, &device_id)?;
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
                        channel: if user.is_some() {
                            ChannelType::User
                        } else {
                            ChannelType::Device
                        },
                        user_id: user,
                        user_short_name: channel.user_short_name.clone(),
                        user_long_name: channel.user_long_name.clone(),
                        push_token: hex::encode(token),
                        push_magic: update.push_magic.clone(),
                        unlock_token,
                    })
                    .await?;
                // The device channel can take commands now: policy may have some for it.
                if channel.user().is_none() {
                    self.request_reconcile(device_id, "TokenUpdate").await?;
                }
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

    /// A command-channel request (ServerURL): records a result, then offers the next command.
    /// The channel and its queue state came with the device's verification, in the same read.
    pub async fn connect(
        &self,
        identity: &VerifiedDevice,
        message: &Value,
        body: &[u8],
    ) -> Result<MdmReply, MdmError> {
        let report = Report::from_value(message)?;
        let (device_id, enrollment_id) = channel_ids(&report)?;
        let open = |i: &VerifiedDevice| {
            i.channel(&enrollment_id, &device_id)
                .is_some_and(|(_, c)| c.status != ChannelStatus::CheckedOut)
        };
        let identity = self.confirmed(identity, open).await?;
        bound_device(&identity, &device_id)?;
        let (index, channel) = identity
            .channel(&enrollment_id, &device_id)
            .filter(|(_, c)| c.status != ChannelStatus::CheckedOut)
            .ok_or_else(|| {
                tracing::info!(device = %device_id, channel = %enrollment_id,
                    "MDM: connect refused: the channel has no TokenUpdate or checked out");
                MdmError::Unauthorized(NOT_ENROLLED_HERE.into())
            })?;
        // Whether anything may be queued: as this request read it, or the cache's idle view.
        let may_have_work = match identity.work_read(index) {
            Some(work) => {
                if let (false, Some(stamp)) = (work, identity.queue_stamp()) {
                    self.cache.note_idle(&channel.id, stamp);
                }
                work
            }
            None => !self.cache.known_idle(&channel.id),
        };
        self.serve_connect(
            channel,
            may_have_work,
            &report,
            &device_id,
            &enrollment_id,
            message,
            body,
        )
        .await
    }

    /// The rest of a connect, once the channel and the device's right to it are established.
    #[allow(clippy::too_many_arguments)]
    async fn serve_connect(
        &self,
        channel: &Channel,
        may_have_work: bool,
        report: &Report,
        device_id: &str,
        enrollment_id: &str,
        message: &Value,
        body: &[u8],
    ) -> Result<MdmReply, MdmError> {
        self.note_seen(channel).await;

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
                let error_chain = error_chain_json(message);
                let recorded = self
                    .store
                    .record_result(enrollment_id, uuid, outcome, body, error_chain.as_deref())
                    .await?;
                if let Some(command) = &recorded {
                    count_result(&command.request_type, outcome);
                }
                match recorded {
                    Some(command) if outcome == CommandOutcome::Acknowledged => {
                        super::inventory::absorb(&self.store, device_id, &command, message).await?;
                        // A new report of profiles or managed apps may show drift.
                        if matches!(
                            command.request_type.as_str(),
                            "ProfileList" | "ManagedApplicationList"
                        ) {
                            self.request_reconcile(device_id, "inventory reported")
                                .await?;
                        }
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
        // Without work at the read above (or in the idle view), there is none to send: a
        // command queued since then moved the queue generation, so the next connect reads the
        // queue, and its push wakes the device for that connect.
        let next = if may_have_work {
            let stamp = self.cache.queue_stamp();
            let next = self
                .store
                .next_command(enrollment_id, include_not_now)
                .await?;
            // Read empty, NotNow commands included: idle until the queue moves.
            if next.is_none()
                && include_not_now
                && let Some(stamp) = stamp
            {
                self.cache.note_idle(&channel.id, stamp);
            }
            next
        } else {
            None
        };
        // The queue stores each command as sent on the wire, {CommandUUID, Command}.
        Ok(match next {
            Some(command) => MdmReply::Plist(command.body),
            None => MdmReply::Empty,
        })
    }

    /// Logs why an Authenticate was refused; a refusal by the re-enrollment policy is audited
    /// too, so that the help desk can see why a device cannot enroll.
    async fn refuse_authenticate(
        &self,
        identity: &VerifiedDevice,
        device_id: &str,
        refusal: &BindRefusal,
    ) {
        tracing::warn!(device = %device_id, enrollment = %identity.enrollment_id(),
            serial = %identity.serial(), reason = %refusal,
            "MDM: Authenticate refused");
        if let BindRefusal::DeviceBoundElsewhere(policy) = refusal {
            let entry = crate::store::NewAuditEntry {
                actor: format!("device:{device_id}"),
                action: crate::store::AUDIT_REENROLL.into(),
                target: Some(device_id.to_owned()),
                outcome: crate::audit::OUTCOME_DENIED.into(),
                detail: Some(
                    serde_json::json!({"enrollment": identity.enrollment_id(),
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

    async fn note_seen(&self, channel: &Channel) {
        let now = crate::store::now();
        if channel.claim_seen(now, SEEN_RESOLUTION)
            && let Err(e) = self.store.touch_enrollment(&channel.id, now).await
        {
            tracing::warn!(error = %e, "MDM: could not record last_seen_at");
        }
    }
}

/// The device must be the one bound to the enrollment record of the certificate that signed.
/// An unknown device and another device's certificate get the same answer; the log says which.
/// Counts a device's answer by request type (our own queue's types, a bounded set) and status,
/// as the command history spells it.
fn count_result(request_type: &str, outcome: CommandOutcome) {
    let status = match outcome {
        CommandOutcome::Acknowledged => "acknowledged",
        CommandOutcome::Error => "error",
        CommandOutcome::FormatError => "format-error",
        CommandOutcome::NotNow => "not-now",
    };
    metrics::counter!(
        "trustbroker_mdm_command_results_total",
        "request_type" => request_type.to_string(),
        "status" => status
    )
    .increment(1);
}

fn bound_device(identity: &VerifiedDevice, device_id: &str) -> Result<(), MdmError> {
    let reason = match identity.bound_device() {
        Some(bound) if bound == device_id => return Ok(()),
        Some(_) => "the signing certificate belongs to another device",
        None => "the certificate's enrollment has no device: no Authenticate yet",
    };
    tracing::info!(device = %device_id, enrollment = %identity.enrollment_id(),
        serial = %identity.serial(), reason, "MDM: request refused");
    Err(MdmError::Unauthorized(NOT_ENROLLED_HERE.into()))
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
fn error_chain_json(message: &Value) -> Option<String> {
    let chain = message.as_dictionary()?.get("ErrorChain")?;
    serde_json::to_string(&super::inventory::to_json(chain)).ok()
}
