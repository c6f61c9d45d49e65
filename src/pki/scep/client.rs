//! The client side of SCEP: what a device does. Used by the tests and the load generator,
//! never by the server. Supports every digest and cipher the server accepts, SHA-1 and DES
//! included, so the tests can play old clients too.

use der::Encode;
use rsa::pkcs8::{DecodePrivateKey, EncodePublicKey};
use rsa::{Pkcs1v15Sign, RsaPrivateKey};

use super::key_transport::RsaDecryptionKey;
use super::reply::sign_pki_message;
use super::tlv::build;
use super::{
    CipherPolicy, CmsSigner, ContentCipher, DigestAlgorithm, FailInfo, MessageType, PkiStatus,
    ScepError, oids,
};

/// A requester's key and the self-signed certificate it signs requests with.
pub struct ClientIdentity {
    pub key: RsaPrivateKey,
    /// The same key, for opening the CA's replies.
    pub decryption_key: RsaDecryptionKey,
    pub pkcs8: Vec<u8>,
    pub certificate_der: Vec<u8>,
}

impl ClientIdentity {
    /// A fresh RSA key of `bits` and a self-signed signer certificate for it.
    pub fn generate(bits: usize) -> Result<ClientIdentity, ScepError> {
        let pkcs8 = crate::pki::ca::generate_rsa_pkcs8(bits)
            .map_err(|e| ScepError::Internal(e.to_string()))?;
        Self::from_pkcs8(&pkcs8)
    }

    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<ClientIdentity, ScepError> {
        let key =
            RsaPrivateKey::from_pkcs8_der(pkcs8).map_err(|e| ScepError::Internal(e.to_string()))?;
        let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls::pki_types::PrivatePkcs8KeyDer::from(pkcs8.to_vec()),
            &rcgen::PKCS_RSA_SHA256,
        )
        .map_err(|e| ScepError::Internal(e.to_string()))?;
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "SCEP SIGNER");
        let certificate = params
            .self_signed(&key_pair)
            .map_err(|e| ScepError::Internal(e.to_string()))?;
        Ok(ClientIdentity {
            key,
            decryption_key: RsaDecryptionKey::from_pkcs8(pkcs8)?,
            pkcs8: pkcs8.to_vec(),
            certificate_der: certificate.der().to_vec(),
        })
    }

    /// SubjectPublicKeyInfo (DER).
    pub fn public_key_der(&self) -> Result<Vec<u8>, ScepError> {
        self.key
            .to_public_key()
            .to_public_key_der()
            .map(|d| d.as_bytes().to_vec())
            .map_err(|e| ScepError::Internal(e.to_string()))
    }

    /// The same key, signing with another certificate (a renewal signs with the issued one).
    pub fn with_certificate(&self, certificate_der: Vec<u8>) -> ClientIdentity {
        ClientIdentity {
            key: self.key.clone(),
            decryption_key: self.decryption_key.clone(),
            pkcs8: self.pkcs8.clone(),
            certificate_der,
        }
    }

    /// A PKCS#10 request for this key with CN `common_name` and an optional challengePassword,
    /// self-signed with `digest`.
    pub fn csr(
        &self,
        common_name: &str,
        challenge: Option<&str>,
        digest: DigestAlgorithm,
    ) -> Result<Vec<u8>, ScepError> {
        let cn = const_oid::db::rfc4519::CN;
        let subject = build::sequence(&[&build::set_of(vec![build::sequence(&[
            &build::oid(&cn),
            &build::element(0x0c, common_name.as_bytes()),
        ])])]);
        let attributes = match challenge {
            Some(challenge) => build::element(
                0xa0,
                &build::attribute(
                    &oids::CHALLENGE_PASSWORD,
                    &build::printable_string(challenge),
                ),
            ),
            None => build::element(0xa0, &[]),
        };
        let info = build::sequence(&[
            &build::small_integer(0),
            &subject,
            &self.public_key_der()?,
            &attributes,
        ]);
        let signature = self.sign(digest, &info)?;
        let algorithm = match digest {
            DigestAlgorithm::Sha1 => oids::SHA1_WITH_RSA,
            DigestAlgorithm::Sha256 => oids::SHA256_WITH_RSA,
            DigestAlgorithm::Sha512 => oids::SHA512_WITH_RSA,
        };
        let mut bits = vec![0u8];
        bits.extend_from_slice(&signature);
        Ok(build::sequence(&[
            &info,
            &build::algorithm_null(&algorithm),
            &build::element(0x03, &bits),
        ]))
    }
}

impl CmsSigner for ClientIdentity {
    fn certificate_der(&self) -> &[u8] {
        &self.certificate_der
    }

    fn sign(&self, digest: DigestAlgorithm, message: &[u8]) -> Result<Vec<u8>, ScepError> {
        let hashed = digest.digest(message);
        let scheme = match digest {
            DigestAlgorithm::Sha1 => Pkcs1v15Sign::new::<sha1::Sha1>(),
            DigestAlgorithm::Sha256 => Pkcs1v15Sign::new::<sha2::Sha256>(),
            DigestAlgorithm::Sha512 => Pkcs1v15Sign::new::<sha2::Sha512>(),
        };
        self.key
            .sign(scheme, &hashed)
            .map_err(|e| ScepError::Internal(format!("RSA signing: {e}")))
    }
}

/// One request, as a client sends it.
pub struct Request<'a> {
    pub message_type: MessageType,
    /// The envelope's content: a CSR for PKCSReq and RenewalReq.
    pub content: &'a [u8],
    /// Who to encrypt to: the CA, or the RA when the CA has one.
    pub recipient_der: &'a [u8],
    pub cipher: ContentCipher,
    pub digest: DigestAlgorithm,
    pub transaction_id: &'a str,
    pub sender_nonce: &'a [u8],
}

/// Builds a signed and enveloped PKIMessage.
pub fn build_request(
    identity: &ClientIdentity,
    request: &Request<'_>,
) -> Result<Vec<u8>, ScepError> {
    let envelope = super::seal_envelope(request.content, request.recipient_der, request.cipher)?;
    build_request_around(identity, request, &envelope)
}

/// Signs a PKIMessage around an envelope made elsewhere (`request.content`, `recipient_der`
/// and `cipher` are not used): a tampered or badly padded one, in tests.
pub fn build_request_around(
    identity: &ClientIdentity,
    request: &Request<'_>,
    envelope: &[u8],
) -> Result<Vec<u8>, ScepError> {
    sign_pki_message(
        envelope,
        &[
            (
                oids::MESSAGE_TYPE,
                build::printable_string(request.message_type.code()),
            ),
            (
                oids::TRANSACTION_ID,
                build::printable_string(request.transaction_id),
            ),
            (
                oids::SENDER_NONCE,
                build::octet_string(request.sender_nonce),
            ),
        ],
        request.digest,
        identity,
    )
}

/// What a CertRep said.
#[derive(Debug)]
pub struct CertRepOutcome {
    pub status: PkiStatus,
    pub fail_info: Option<FailInfo>,
    /// The issued certificate first, then the chain, when SUCCESS.
    pub certificates: Vec<Vec<u8>>,
    pub transaction_id: String,
    pub recipient_nonce: Option<Vec<u8>>,
    pub digest: DigestAlgorithm,
}

/// Verifies a CertRep from `server_der` (the CA or RA) and opens its envelope with `identity`.
pub fn open_cert_rep(
    body: &[u8],
    identity: &ClientIdentity,
    server_der: &[u8],
) -> Result<CertRepOutcome, ScepError> {
    let message = super::parse_pki_message(body)?;
    if message.signer_certificate != server_der {
        return Err(ScepError::BadSignature);
    }
    if message.message_type != MessageType::CertRep {
        return Err(ScepError::Malformed("not a CertRep".into()));
    }
    let status = message
        .pki_status
        .ok_or_else(|| ScepError::Malformed("CertRep without pkiStatus".into()))?;
    let certificates = if status == PkiStatus::Success {
        let (certificates, _) = super::open_envelope_with(
            &message.enveloped_data,
            &identity.certificate_der,
            &identity.decryption_key,
            CipherPolicy::ANY,
            super::parse_degenerate_certificates,
        )?;
        certificates
    } else {
        Vec::new()
    };
    Ok(CertRepOutcome {
        status,
        fail_info: message.fail_info,
        certificates,
        transaction_id: message.transaction_id,
        recipient_nonce: message.recipient_nonce,
        digest: message.digest,
    })
}

/// An IssuerAndSerialNumber for GetCert.
pub fn issuer_and_serial(certificate_der: &[u8]) -> Result<Vec<u8>, ScepError> {
    use der::Decode;
    let certificate = x509_cert::Certificate::from_der(certificate_der)?;
    let tbs = certificate.tbs_certificate();
    Ok(build::sequence(&[
        &tbs.issuer().to_der()?,
        &tbs.serial_number().to_der()?,
    ]))
}

/// An IssuerAndSubject for GetCertInitial: the CA's name and the subject (DER Name) the
/// request asked for.
pub fn issuer_and_subject(ca_der: &[u8], subject_der: &[u8]) -> Result<Vec<u8>, ScepError> {
    use der::Decode;
    let ca = x509_cert::Certificate::from_der(ca_der)?;
    Ok(build::sequence(&[
        &ca.tbs_certificate().subject().to_der()?,
        subject_der,
    ]))
}
