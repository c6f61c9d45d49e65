//! The SCEP service: what the CA does with each PKIOperation, between the wire format
//! (`pki::scep`) and the store. Every refusal becomes a signed CertRep FAILURE with the right
//! failInfo when the request could be addressed at all; nothing is issued on any failure path.

use std::sync::Arc;

use subtle::ConstantTimeEq;
use x509_cert::Certificate;

use super::ca::{CertificateAuthority, IssuedCertificate, MIN_RSA_BITS};
use super::challenge;
use super::scep::{
    self, ContentCipher, DigestAlgorithm, FailInfo, MessageType, PkiMessage, RequestHeader,
    ScepError,
};
use super::validity::Unusable;
use crate::config::Secret;
use crate::store::{
    CertificateRecord, CertificateStatus, EnrollmentRecord, EnrollmentStatus, Recorded,
    RequestedCertificate, Store, StoreError,
};

/// What the HTTP layer sends back for a PKIOperation.
pub enum PkiReply {
    /// A CertRep (SUCCESS or FAILURE), `application/x-pki-message`.
    CertRep(Vec<u8>),
    /// Not even a failure CertRep could be addressed (no transaction id, no signer): 400.
    Unaddressable(String),
}

/// How many RSA tasks may run at once per core (see [`ScepService::cpu`]).
const RSA_TASKS_PER_CORE: usize = 2;

#[derive(Clone)]
pub struct ScepService {
    store: Store,
    ca: Arc<CertificateAuthority>,
    static_challenge: Option<Secret>,
    /// Two permits per core for RSA work: one per core leaves a core idle while a finished
    /// task waits to be picked up and the next one to be woken on the blocking pool (SCEP at
    /// concurrency 32: 4–37% more issuances per second with two); unlimited only interleaves
    /// requests on the same cores, so every request finishes later and the slowest much later.
    cpu: Arc<tokio::sync::Semaphore>,
}

/// A refusal on the way to a certificate, with the failInfo the requester gets.
struct Refusal {
    fail_info: FailInfo,
    reason: String,
}

impl Refusal {
    fn new(fail_info: FailInfo, reason: impl Into<String>) -> Self {
        Refusal {
            fail_info,
            reason: reason.into(),
        }
    }
}

impl From<ScepError> for Refusal {
    fn from(e: ScepError) -> Self {
        Refusal::new(e.fail_info(), e.to_string())
    }
}

impl From<StoreError> for Refusal {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "SCEP: store failure");
        Refusal::new(FailInfo::BadRequest, "internal error")
    }
}

impl From<anyhow::Error> for Refusal {
    fn from(e: anyhow::Error) -> Self {
        tracing::error!(error = %e, "SCEP: issuance failure");
        Refusal::new(FailInfo::BadRequest, "internal error")
    }
}

impl ScepService {
    pub fn new(
        store: Store,
        ca: Arc<CertificateAuthority>,
        static_challenge: Option<Secret>,
    ) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        if ca.scep.ciphers.allow_single_des {
            tracing::warn!(
                "SCEP accepts envelopes in single DES (scep_allow_single_des): a 56-bit key \
                 protects the challenge in transit; turn it off once legacy clients are gone"
            );
        }
        ScepService {
            store,
            ca,
            static_challenge,
            cpu: Arc::new(tokio::sync::Semaphore::new(cores * RSA_TASKS_PER_CORE)),
        }
    }

    /// Runs CPU-bound work with the CA key on the blocking pool, at most [`RSA_TASKS_PER_CORE`] tasks per core.
    async fn cpu_bound<T: Send + 'static>(
        &self,
        work: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, tokio::task::JoinError> {
        // The semaphore is never closed, so acquiring only waits.
        let _permit = self.cpu.acquire().await.ok();
        tokio::task::spawn_blocking(work).await
    }

    /// GetCACert: the CA alone (DER), or CA and RA as a degenerate PKCS#7.
    pub fn ca_certificates(&self) -> Result<(&'static str, Vec<u8>), ScepError> {
        match &self.ca.ra {
            None => Ok((
                "application/x-x509-ca-cert",
                self.ca.ca.certificate_der.clone(),
            )),
            Some(ra) => Ok((
                "application/x-x509-ca-ra-cert",
                scep::degenerate_certificates(&[
                    self.ca.ca.certificate_der.clone(),
                    ra.certificate_der.clone(),
                ])?,
            )),
        }
    }

    pub async fn pki_operation(&self, body: Vec<u8>) -> PkiReply {
        let ca = self.ca.clone();
        // Parsing, verification and decryption are CPU work with the CA key: off the reactor.
        let opened = self
            .cpu_bound(move || {
                let message = scep::parse_pki_message(&body);
                (body, message.map(|m| open(&ca, m)))
            })
            .await;
        let (body, message) = match opened {
            Ok(result) => result,
            Err(e) => return PkiReply::Unaddressable(format!("internal error: {e}")),
        };
        let (message, opened) = match message {
            Ok((message, Ok(opened))) => (message, opened),
            Ok((message, Err(error))) => {
                let header = message.header();
                return self.failure(header, Refusal::from(error)).await;
            }
            Err(error) => {
                // The message did not verify: answer FAILURE if it can be addressed at all.
                return match scep::parse_request_header(&body) {
                    Ok(header) => self.failure(header, Refusal::from(error)).await,
                    Err(_) => PkiReply::Unaddressable(format!("not a SCEP PKIMessage: {error}")),
                };
            }
        };
        let header = message.header();
        match self.handle(&message, opened.content, opened.cipher).await {
            Ok(Answer::Reply(body)) => PkiReply::CertRep(body),
            Ok(Answer::Certificate(der)) => self.success(message, der, opened.cipher).await,
            Err(refusal) => self.failure(header, refusal).await,
        }
    }

    async fn handle(
        &self,
        message: &PkiMessage,
        content: Content,
        cipher: ContentCipher,
    ) -> Result<Answer, Refusal> {
        let requester = Requester::of(&message.signer_certificate)?;
        match (message.message_type, content) {
            (MessageType::PkcsReq, Content::Csr(csr)) => {
                self.enroll(message, &requester, csr, cipher).await
            }
            (MessageType::RenewalReq, Content::Csr(csr)) => {
                self.renew(message, &requester, csr, cipher).await
            }
            (MessageType::CertPoll, Content::Poll) => {
                // We never answer PENDING, so a poll can only ask for what was already issued,
                // and only its requester gets it.
                let earlier = self
                    .store
                    .transaction_certificates(&message.transaction_id)
                    .await?;
                earlier
                    .into_iter()
                    .find(|c| requester.asked_for(c))
                    .map(|c| Answer::Certificate(c.certificate.der))
                    .ok_or_else(|| Refusal::new(FailInfo::BadCertId, "unknown transaction"))
            }
            (MessageType::GetCert, Content::Serial(serial)) => {
                // Its requester, or the holder of the certified key: anyone else is told that
                // there is no such certificate.
                self.store
                    .requested_certificate(&super::ca::serial_hex(&serial))
                    .await?
                    .filter(|c| requester.asked_for(c) || requester.holds(&c.certificate))
                    .map(|c| Answer::Certificate(c.certificate.der))
                    .ok_or_else(|| Refusal::new(FailInfo::BadCertId, "unknown certificate"))
            }
            _ => Err(Refusal::new(
                FailInfo::BadRequest,
                "unsupported message type",
            )),
        }
    }

    /// PKCSReq: a one-time challenge (or the static one) redeems for exactly one certificate.
    ///
    /// The signer may be any certificate (RFC 8894 §2.3 allows an existing or a throwaway
    /// one): the challenge authenticates the request, the CSR's own signature proves possession
    /// of the key to certify, and the reply is encrypted to the signer's key. The signer key is
    /// recorded so that only it can fetch the certificate again.
    async fn enroll(
        &self,
        message: &PkiMessage,
        requester: &Requester,
        csr: scep::CertificationRequest,
        cipher: ContentCipher,
    ) -> Result<Answer, Refusal> {
        check_key(&csr)?;
        let Some(challenge) = csr.challenge_password.as_deref() else {
            return match self.replay(message, requester, None).await? {
                Some(earlier) => Ok(Answer::Certificate(earlier)),
                None => Err(Refusal::new(FailInfo::BadRequest, "no challenge password")),
            };
        };
        if let Some(fixed) = &self.static_challenge
            && bool::from(fixed.0.as_bytes().ct_eq(challenge.as_bytes()))
        {
            if let Some(earlier) = self.replay(message, requester, None).await? {
                return Ok(Answer::Certificate(earlier));
            }
            return self
                .enroll_with_static_challenge(message, requester, &csr, cipher)
                .await;
        }
        let hash = challenge::hash(challenge);
        let now = crate::store::now();
        // Whether this is a retry, and what the challenge redeems for: one query.
        let lookup = self
            .store
            .scep_redemption(&hash, now, &message.transaction_id)
            .await?;
        if lookup.transaction_seen
            && let Some(earlier) = self.replay(message, requester, None).await?
        {
            return Ok(Answer::Certificate(earlier));
        }
        let enrollment = lookup.enrollment.ok_or_else(|| {
            Refusal::new(FailInfo::BadRequest, "challenge unknown, used or expired")
        })?;
        let enrollment_id = enrollment.id.clone();
        let (issued, reply) = self
            .issue(csr.public_key_der.clone(), enrollment, message, cipher)
            .await?;
        let record = certificate_record(&issued, message, Some(enrollment_id.clone()), None);
        match self
            .store
            .redeem_challenge_and_record(&hash, &enrollment_id, now, &record, &requester.key)
            .await?
        {
            Ok(Recorded::Issued) => {
                tracing::info!(serial = %issued.serial, enrollment = %enrollment_id, "SCEP: issued");
                Ok(reply)
            }
            Ok(Recorded::Duplicate) => self
                .replayed(message, requester, None)
                .await
                .map(Answer::Certificate),
            Err(_) => Err(Refusal::new(
                FailInfo::BadRequest,
                "challenge unknown, used or expired",
            )),
        }
    }

    async fn enroll_with_static_challenge(
        &self,
        message: &PkiMessage,
        requester: &Requester,
        csr: &scep::CertificationRequest,
        cipher: ContentCipher,
    ) -> Result<Answer, Refusal> {
        let enrollment = EnrollmentRecord {
            id: uuid::Uuid::new_v4().to_string(),
            for_user: None,
            for_device: None,
            user_id: None,
            requested_by: "scep:static-challenge".into(),
            created_at: crate::store::now(),
            status: EnrollmentStatus::Pending,
        };
        self.store.insert_enrollment(&enrollment).await?;
        let enrollment_id = enrollment.id.clone();
        let (issued, reply) = self
            .issue(csr.public_key_der.clone(), enrollment, message, cipher)
            .await?;
        let record = certificate_record(&issued, message, Some(enrollment_id), None);
        match self
            .store
            .record_certificate(&record, &requester.key)
            .await?
        {
            Recorded::Issued => {
                tracing::info!(serial = %issued.serial, "SCEP: issued");
                Ok(reply)
            }
            Recorded::Duplicate => self
                .replayed(message, requester, None)
                .await
                .map(Answer::Certificate),
        }
    }

    /// RenewalReq: signed by a currently valid certificate of ours that was not renewed before;
    /// no challenge needed. The new certificate belongs to the same enrollment, and the old one
    /// is retired after the overlap (its not_after cut), in the same transaction.
    async fn renew(
        &self,
        message: &PkiMessage,
        requester: &Requester,
        csr: scep::CertificationRequest,
        cipher: ContentCipher,
    ) -> Result<Answer, Refusal> {
        check_key(&csr)?;
        let signer = Certificate::from_der_bytes(&message.signer_certificate)?;
        let serial = super::ca::serial_hex(signer.tbs_certificate().serial_number().as_bytes());
        let old = self
            .store
            .requested_certificate(&serial)
            .await?
            .filter(|c| c.certificate.der == message.signer_certificate)
            .ok_or_else(|| {
                Refusal::new(
                    FailInfo::BadCertId,
                    "renewal not signed by a certificate of this CA",
                )
            })?;
        let certificate = &old.certificate;
        let now = crate::store::now();
        match super::validity::usable_at(certificate, now) {
            Ok(()) => {}
            Err(Unusable::Revoked) => {
                return Err(Refusal::new(
                    FailInfo::BadCertId,
                    "the certificate is revoked",
                ));
            }
            Err(Unusable::NotYetValid | Unusable::Expired) => {
                return Err(Refusal::new(
                    FailInfo::BadTime,
                    "the certificate is not valid now",
                ));
            }
        }
        // A retry of this very renewal gets what it got, even though the certificate that
        // signs it is superseded by now.
        if let Some(earlier) = self
            .replay(message, requester, Some(&certificate.serial))
            .await?
        {
            return Ok(Answer::Certificate(earlier));
        }
        if old.superseded_by.is_some() {
            return Err(already_renewed());
        }
        let enrollment_id = certificate
            .enrollment_id
            .clone()
            .ok_or_else(|| Refusal::new(FailInfo::BadRequest, "certificate has no enrollment"))?;
        let enrollment = self.enrollment(&enrollment_id).await?;
        let (issued, reply) = self
            .issue(csr.public_key_der.clone(), enrollment, message, cipher)
            .await?;
        let record = certificate_record(
            &issued,
            message,
            Some(enrollment_id),
            Some(certificate.serial.clone()),
        );
        let retire_at = certificate
            .not_after
            .min(crate::store::now() + self.ca.scep.renewal_overlap);
        match self
            .store
            .record_renewal(&record, &requester.key, &certificate.serial, retire_at)
            .await?
        {
            Ok(Recorded::Issued) => {
                tracing::info!(
                    serial = %issued.serial,
                    renewed = %certificate.serial,
                    retire_at = %retire_at,
                    "SCEP: renewed"
                );
                Ok(reply)
            }
            // A concurrent renewal won: if it was this same request, answer with its result.
            Ok(Recorded::Duplicate) | Err(_) => self
                .replay(message, requester, Some(&certificate.serial))
                .await?
                .map(Answer::Certificate)
                .ok_or_else(already_renewed),
        }
    }

    /// A request seen before under the same transaction ID (and, for a renewal, renewing the
    /// same certificate): the same signer key gets the certificate it got then; any other key
    /// is refused, never handed someone else's certificate.
    async fn replay(
        &self,
        message: &PkiMessage,
        requester: &Requester,
        renewed: Option<&str>,
    ) -> Result<Option<Vec<u8>>, Refusal> {
        let earlier: Vec<RequestedCertificate> = self
            .store
            .transaction_certificates(&message.transaction_id)
            .await?
            .into_iter()
            .filter(|c| c.certificate.renewed_from.as_deref() == renewed)
            .collect();
        if earlier.is_empty() {
            return Ok(None);
        }
        earlier
            .into_iter()
            .find(|c| requester.asked_for(c))
            .map(|c| Some(c.certificate.der))
            .ok_or_else(|| {
                Refusal::new(
                    FailInfo::BadRequest,
                    "the transaction ID belongs to another requester",
                )
            })
    }

    /// After a concurrent insert of the same transaction: what it recorded, if it is ours.
    async fn replayed(
        &self,
        message: &PkiMessage,
        requester: &Requester,
        renewed: Option<&str>,
    ) -> Result<Vec<u8>, Refusal> {
        self.replay(message, requester, renewed)
            .await?
            .ok_or_else(|| {
                Refusal::new(
                    FailInfo::BadRequest,
                    "the certificate could not be recorded",
                )
            })
    }

    async fn enrollment(&self, id: &str) -> Result<EnrollmentRecord, Refusal> {
        self.store
            .enrollment(id)
            .await?
            .ok_or_else(|| Refusal::new(FailInfo::BadRequest, "enrollment record missing"))
    }

    /// Signs the certificate and, in the same task on the blocking pool, the CertRep SUCCESS
    /// that carries it: one hand-off between threads instead of two. The reply is sent only
    /// once the certificate is recorded; otherwise it is dropped.
    async fn issue(
        &self,
        spki: Vec<u8>,
        enrollment: EnrollmentRecord,
        message: &PkiMessage,
        cipher: ContentCipher,
    ) -> Result<(IssuedCertificate, Answer), Refusal> {
        let ca = self.ca.clone();
        let mut message = message.clone();
        message.digest = reply_digest(message.digest);
        let (issued, reply) = self
            .cpu_bound(move || -> anyhow::Result<(IssuedCertificate, Vec<u8>)> {
                let issued = ca.issue(&spki, &enrollment)?;
                let chain = [issued.der.clone(), ca.ca.certificate_der.clone()];
                let reply = scep::cert_rep_success(&message, &chain, cipher, ca.scep_recipient())
                    .map_err(|e| anyhow::anyhow!("building the reply: {e}"))?;
                Ok((issued, reply))
            })
            .await
            .map_err(|e| anyhow::anyhow!("issuing task: {e}"))??;
        Ok((issued, Answer::Reply(reply)))
    }

    async fn success(
        &self,
        mut message: PkiMessage,
        issued_der: Vec<u8>,
        cipher: ContentCipher,
    ) -> PkiReply {
        let ca = self.ca.clone();
        message.digest = reply_digest(message.digest);
        let built = self
            .cpu_bound(move || {
                let signer = ca.scep_recipient();
                let chain = [issued_der, ca.ca.certificate_der.clone()];
                scep::cert_rep_success(&message, &chain, cipher, signer)
            })
            .await;
        match built {
            Ok(Ok(body)) => PkiReply::CertRep(body),
            Ok(Err(e)) => PkiReply::Unaddressable(format!("cannot build the reply: {e}")),
            Err(e) => PkiReply::Unaddressable(format!("internal error: {e}")),
        }
    }

    async fn failure(&self, mut header: RequestHeader, refusal: Refusal) -> PkiReply {
        tracing::info!(
            transaction = %header.transaction_id,
            fail_info = ?refusal.fail_info,
            reason = %refusal.reason,
            "SCEP: refused"
        );
        metrics::counter!("trustbroker_scep_failures_total",
            "fail_info" => format!("{:?}", refusal.fail_info))
        .increment(1);
        let ca = self.ca.clone();
        header.digest = reply_digest(header.digest);
        let built = self
            .cpu_bound(move || {
                scep::cert_rep_failure(&header, refusal.fail_info, ca.scep_recipient())
            })
            .await;
        match built {
            Ok(Ok(body)) => PkiReply::CertRep(body),
            Ok(Err(e)) => PkiReply::Unaddressable(format!("cannot build the reply: {e}")),
            Err(e) => PkiReply::Unaddressable(format!("internal error: {e}")),
        }
    }
}

/// What a request is answered with: a CertRep SUCCESS built when the certificate was signed,
/// or a certificate issued earlier (a replay, a poll, GetCert) still to be wrapped in one.
enum Answer {
    Reply(Vec<u8>),
    Certificate(Vec<u8>),
}

/// What a verified request's envelope held, read in the step that decrypted it.
enum Content {
    /// PKCSReq, RenewalReq: a CSR whose self-signature verified.
    Csr(scep::CertificationRequest),
    /// GetCert: the serial number asked for.
    Serial(Vec<u8>),
    /// GetCertInitial: an IssuerAndSubject (the transaction ID says what is polled).
    Poll,
    /// Message types we refuse whatever they carry.
    Nothing,
}

struct Opened {
    content: Content,
    cipher: ContentCipher,
}

/// Decrypts the envelope of a verified message with the SCEP recipient key and reads what it
/// must hold. A bad padding and a well-padded envelope without a valid content are one error
/// (`Undecryptable`, failInfo badMessageCheck) from one path (see `open_envelope_with`).
#[allow(clippy::result_large_err)]
fn open(ca: &CertificateAuthority, message: PkiMessage) -> (PkiMessage, Result<Opened, ScepError>) {
    let recipient = ca.scep_recipient();
    let message_type = message.message_type;
    let opened = scep::open_envelope_with(
        &message.enveloped_data,
        &recipient.certificate_der,
        &recipient.decryption_key,
        ca.scep.ciphers,
        |content| match message_type {
            MessageType::PkcsReq | MessageType::RenewalReq => {
                scep::parse_csr(content).map(Content::Csr)
            }
            MessageType::GetCert => scep::parse_issuer_and_serial(content).map(Content::Serial),
            MessageType::CertPoll => {
                scep::parse_issuer_and_subject(content).map(|()| Content::Poll)
            }
            MessageType::GetCrl | MessageType::CertRep => Ok(Content::Nothing),
        },
    )
    .map(|(content, cipher)| Opened { content, cipher });
    (message, opened)
}

/// Who signed a request: the SHA-256 (hex) of the signer certificate's public key.
struct Requester {
    key: String,
}

impl Requester {
    fn of(signer_certificate: &[u8]) -> Result<Requester, Refusal> {
        Ok(Requester {
            key: key_fingerprint(&signer_public_key(signer_certificate)?),
        })
    }

    /// Whether this signer is the one that asked for `certificate`. Certificates recorded
    /// before requesters were kept were always requested with the certified key itself.
    fn asked_for(&self, certificate: &RequestedCertificate) -> bool {
        match &certificate.signer_key_sha256 {
            Some(signer) => bool::from(signer.as_bytes().ct_eq(self.key.as_bytes())),
            None => self.holds(&certificate.certificate),
        }
    }

    /// Whether this signer holds the key `certificate` certifies.
    fn holds(&self, certificate: &CertificateRecord) -> bool {
        signer_public_key(&certificate.der)
            .map(|spki| bool::from(key_fingerprint(&spki).as_bytes().ct_eq(self.key.as_bytes())))
            .unwrap_or(false)
    }
}

fn key_fingerprint(spki_der: &[u8]) -> String {
    hex::encode(DigestAlgorithm::Sha256.digest(spki_der))
}

fn already_renewed() -> Refusal {
    Refusal::new(
        FailInfo::BadRequest,
        "the certificate was renewed already: renew from the newest one",
    )
}

/// ring signs RSA with SHA-256 or SHA-512 only; a SHA-1 request gets a SHA-256 reply, which is
/// stronger and which every SCEP client that speaks SHA-1 also verifies.
fn reply_digest(requested: DigestAlgorithm) -> DigestAlgorithm {
    match requested {
        DigestAlgorithm::Sha1 => DigestAlgorithm::Sha256,
        other => other,
    }
}

fn check_key(csr: &scep::CertificationRequest) -> Result<(), Refusal> {
    match csr.rsa_key_bits {
        Some(bits) if bits >= MIN_RSA_BITS => Ok(()),
        Some(bits) => Err(Refusal::new(
            FailInfo::BadRequest,
            format!("RSA key of {bits} bits; at least {MIN_RSA_BITS} are required"),
        )),
        None => Err(Refusal::new(
            FailInfo::BadAlg,
            "only RSA keys are issued certificates",
        )),
    }
}

fn signer_public_key(certificate_der: &[u8]) -> Result<Vec<u8>, Refusal> {
    use der::Encode;
    let cert = Certificate::from_der_bytes(certificate_der)?;
    cert.tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .map_err(|_| Refusal::new(FailInfo::BadRequest, "unreadable signer certificate"))
}

fn nonce_hex(message: &PkiMessage) -> String {
    hex::encode(&message.sender_nonce)
}

fn certificate_record(
    issued: &IssuedCertificate,
    message: &PkiMessage,
    enrollment_id: Option<String>,
    renewed_from: Option<String>,
) -> CertificateRecord {
    CertificateRecord {
        serial: issued.serial.clone(),
        enrollment_id,
        subject: issued.subject.clone(),
        not_before: issued.not_before,
        not_after: issued.not_after,
        status: CertificateStatus::Valid,
        revoked_at: None,
        revocation_reason: None,
        renewed_from,
        transaction_id: message.transaction_id.clone(),
        sender_nonce: nonce_hex(message),
        der: issued.der.clone(),
        issued_at: crate::store::now(),
    }
}

/// `Certificate::from_der` with the error mapped to a SCEP refusal.
trait FromDerBytes: Sized {
    fn from_der_bytes(der: &[u8]) -> Result<Self, Refusal>;
}

impl FromDerBytes for Certificate {
    fn from_der_bytes(der: &[u8]) -> Result<Self, Refusal> {
        use der::Decode;
        Certificate::from_der(der)
            .map_err(|_| Refusal::new(FailInfo::BadRequest, "unreadable signer certificate"))
    }
}
