//! APNs wake-ups: `{"mdm": PushMagic}` to a channel's push token over HTTP/2, authenticated
//! with the imported push certificate. reqwest rather than `a2`, because `a2` hard-codes
//! Apple's hosts (tests and egress proxies need another base URL) and pulls a second rustls.
//!
//! Pushes are concurrency-limited, retried with backoff on 429, 5xx and transport errors, and a
//! `410 Unregistered` (or `BadDeviceToken`) marks the token dead so it is not pushed again
//! until the device sends a new one.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Mutex, Semaphore};

use crate::config::ApnsConfig;
use crate::secrets::MasterKey;
use crate::store::{ChannelStatus, MdmEnrollment, PushStatus, Store};

/// Concurrent pushes in flight at most (APNs multiplexes them over few connections).
const MAX_IN_FLIGHT: usize = 64;
/// Attempts per push, and the first backoff (doubling after each failure).
const ATTEMPTS: u32 = 4;
const FIRST_BACKOFF: Duration = Duration::from_millis(200);

/// What became of one push.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PushOutcome {
    Sent,
    /// APNs says the token is dead: the device was wiped or unenrolled.
    Unregistered,
    /// The channel has no push token yet, or its token is known dead.
    NoToken,
    /// No push certificate is imported.
    NoCertificate,
    Failed(String),
}

impl PushOutcome {
    fn label(&self) -> &'static str {
        match self {
            PushOutcome::Sent => "sent",
            PushOutcome::Unregistered => "unregistered",
            PushOutcome::NoToken => "no_token",
            PushOutcome::NoCertificate => "no_certificate",
            PushOutcome::Failed(_) => "failed",
        }
    }
}

/// The HTTP/2 client for the current push certificate.
struct Connection {
    /// When the certificate it was built for was imported: a new import rebuilds it.
    imported_at: chrono::DateTime<chrono::Utc>,
    topic: String,
    client: reqwest::Client,
}

#[derive(Clone)]
pub struct Pusher {
    store: Store,
    master: Arc<MasterKey>,
    config: Arc<ApnsConfig>,
    connection: Arc<Mutex<Option<Arc<Connection>>>>,
    in_flight: Arc<Semaphore>,
}

impl Pusher {
    pub fn new(store: Store, master: Arc<MasterKey>, config: ApnsConfig) -> Self {
        Pusher {
            store,
            master,
            config: Arc::new(config),
            connection: Arc::new(Mutex::new(None)),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    /// How long a device with commands waiting may stay silent before it is pushed again.
    pub fn repush_after(&self) -> Option<Duration> {
        self.config.repush_after
    }

    /// Wakes each enrollment in the background; returns at once.
    pub fn wake(&self, enrollment_ids: Vec<String>) {
        let pusher = self.clone();
        tokio::spawn(async move {
            for id in enrollment_ids {
                let pusher = pusher.clone();
                tokio::spawn(async move {
                    let outcome = pusher.push_enrollment(&id).await;
                    if let PushOutcome::Failed(reason) = &outcome {
                        tracing::warn!(enrollment = %id, %reason, "APNs: push failed");
                    }
                });
            }
        });
    }

    /// Pushes one enrollment now.
    pub async fn push_enrollment(&self, enrollment_id: &str) -> PushOutcome {
        let outcome = match self.store.mdm_enrollment(enrollment_id).await {
            Ok(Some(enrollment)) => self.push(&enrollment).await,
            Ok(None) => PushOutcome::NoToken,
            Err(e) => PushOutcome::Failed(e.to_string()),
        };
        metrics::counter!("trustbroker_apns_pushes_total", "outcome" => outcome.label())
            .increment(1);
        outcome
    }

    async fn push(&self, enrollment: &MdmEnrollment) -> PushOutcome {
        let (Some(token), Some(magic)) = (&enrollment.push_token, &enrollment.push_magic) else {
            return PushOutcome::NoToken;
        };
        if enrollment.push_status == PushStatus::Unregistered
            || enrollment.status == ChannelStatus::CheckedOut
        {
            return PushOutcome::NoToken;
        }
        let connection = match self.connection().await {
            Ok(Some(connection)) => connection,
            Ok(None) => return PushOutcome::NoCertificate,
            Err(e) => return PushOutcome::Failed(format!("{e:#}")),
        };
        let _permit = self.in_flight.acquire().await.ok();
        let url = format!("{}/3/device/{token}", self.config.url);
        let body = serde_json::json!({ "mdm": magic }).to_string();
        let mut backoff = FIRST_BACKOFF;
        let mut last_error = String::new();
        for attempt in 1..=ATTEMPTS {
            let sent = connection
                .client
                .post(&url)
                .header("apns-topic", &connection.topic)
                .header("apns-push-type", "mdm")
                .header("apns-priority", "10")
                .header("content-type", "application/json")
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(response) if response.status().is_success() => {
                    self.set_push_status(&enrollment.id, PushStatus::Ok).await;
                    return PushOutcome::Sent;
                }
                Ok(response) => {
                    let status = response.status();
                    let reason = apns_reason(response).await;
                    if status == reqwest::StatusCode::GONE
                        || (status == reqwest::StatusCode::BAD_REQUEST
                            && reason == "BadDeviceToken")
                    {
                        self.set_push_status(&enrollment.id, PushStatus::Unregistered)
                            .await;
                        tracing::info!(enrollment = %enrollment.id, %reason,
                            "APNs: the push token is dead");
                        return PushOutcome::Unregistered;
                    }
                    last_error = format!("HTTP {status} {reason}");
                    // Only throttling and server trouble get better by waiting.
                    if !(status == reqwest::StatusCode::TOO_MANY_REQUESTS
                        || status.is_server_error())
                    {
                        return PushOutcome::Failed(last_error);
                    }
                }
                Err(e) => last_error = format!("transport: {e}"),
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        PushOutcome::Failed(last_error)
    }

    async fn set_push_status(&self, enrollment_id: &str, status: PushStatus) {
        if let Err(e) = self.store.set_push_status(enrollment_id, status).await {
            tracing::warn!(error = %e, "APNs: could not record the push status");
        }
    }

    /// The client for the current push certificate, rebuilt when another is imported.
    async fn connection(&self) -> anyhow::Result<Option<Arc<Connection>>> {
        let Some(row) = self.store.push_certificate().await? else {
            return Ok(None);
        };
        let mut current = self.connection.lock().await;
        if let Some(connection) = current.as_ref()
            && connection.imported_at == row.imported_at
            && connection.topic == row.topic
        {
            return Ok(Some(connection.clone()));
        }
        let pkcs8 = self
            .master
            .open(super::push_cert::SEAL_PURPOSE, &row.sealed_key)?;
        let mut identity_pem = crate::pki::pem("CERTIFICATE", &row.certificate);
        identity_pem.push_str(&crate::pki::pem("PRIVATE KEY", &pkcs8));
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .identity(reqwest::Identity::from_pem(identity_pem.as_bytes())?)
            .http2_prior_knowledge()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(30))
            .pool_idle_timeout(Duration::from_secs(600));
        if let Some(path) = &self.config.ca_file {
            let pem = std::fs::read(path)?;
            builder = builder.add_root_certificate(reqwest::Certificate::from_pem(&pem)?);
        }
        let connection = Arc::new(Connection {
            imported_at: row.imported_at,
            topic: row.topic,
            client: builder.build()?,
        });
        *current = Some(connection.clone());
        Ok(Some(connection))
    }
}

/// The `reason` of an APNs error body (`{"reason": "Unregistered"}`).
async fn apns_reason(response: reqwest::Response) -> String {
    response
        .json::<serde_json::Value>()
        .await
        .ok()
        .and_then(|v| v.get("reason")?.as_str().map(str::to_owned))
        .unwrap_or_default()
}
