//! SCEP (RFC 8894) on the wire: PKIMessages, their CMS envelopes and signatures, CertRep
//! replies; and the CMS SignedData verification that Apple's `Mdm-Signature` shares with them. Pure functions over bytes: no I/O, no async, no storage. Strict and bounded, because
//! every byte here comes from the network and is opened with the CA key.
//!
//! RustCrypto's `cms` provides the ASN.1 types used to build replies; verification, decryption,
//! DES/3DES and BER handling are ours (no crate does them), in `message`, `envelope` and `tlv`.

pub mod client;
mod csr;
mod envelope;
mod key_transport;
mod message;
mod reply;
mod signed_data;
mod tlv;

#[cfg(test)]
mod tests;

pub use csr::{CertificationRequest, parse_csr};
pub use envelope::{
    CipherPolicy, Opened, open_envelope, open_envelope_with, seal_envelope, seal_envelope_unpadded,
};
pub use key_transport::RsaDecryptionKey;
pub use message::{PkiMessage, RequestHeader, parse_pki_message, parse_request_header};
pub use reply::{
    cert_rep_failure, cert_rep_success, degenerate_certificates, parse_degenerate_certificates,
    parse_issuer_and_serial, parse_issuer_and_subject, sign_attached, sign_detached,
};
pub use signed_data::{SignerKey, VerifiedSigner, verify_detached, verify_detached_with};

use const_oid::ObjectIdentifier;

/// SCEP messageType values (RFC 8894 §3.2.1.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MessageType {
    CertRep,
    RenewalReq,
    PkcsReq,
    /// GetCertInitial.
    CertPoll,
    GetCert,
    GetCrl,
}

impl MessageType {
    pub fn code(self) -> &'static str {
        match self {
            MessageType::CertRep => "3",
            MessageType::RenewalReq => "17",
            MessageType::PkcsReq => "19",
            MessageType::CertPoll => "20",
            MessageType::GetCert => "21",
            MessageType::GetCrl => "22",
        }
    }

    fn from_code(code: &str) -> Option<Self> {
        Some(match code {
            "3" => MessageType::CertRep,
            "17" => MessageType::RenewalReq,
            "19" => MessageType::PkcsReq,
            "20" => MessageType::CertPoll,
            "21" => MessageType::GetCert,
            "22" => MessageType::GetCrl,
            _ => return None,
        })
    }
}

/// pkiStatus values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PkiStatus {
    Success,
    Failure,
    Pending,
}

impl PkiStatus {
    fn code(self) -> &'static str {
        match self {
            PkiStatus::Success => "0",
            PkiStatus::Failure => "2",
            PkiStatus::Pending => "3",
        }
    }

    fn from_code(code: &str) -> Option<Self> {
        Some(match code {
            "0" => PkiStatus::Success,
            "2" => PkiStatus::Failure,
            "3" => PkiStatus::Pending,
            _ => return None,
        })
    }
}

/// failInfo values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailInfo {
    BadAlg,
    BadMessageCheck,
    BadRequest,
    BadTime,
    BadCertId,
}

impl FailInfo {
    fn code(self) -> &'static str {
        match self {
            FailInfo::BadAlg => "0",
            FailInfo::BadMessageCheck => "1",
            FailInfo::BadRequest => "2",
            FailInfo::BadTime => "3",
            FailInfo::BadCertId => "4",
        }
    }

    fn from_code(code: &str) -> Option<Self> {
        Some(match code {
            "0" => FailInfo::BadAlg,
            "1" => FailInfo::BadMessageCheck,
            "2" => FailInfo::BadRequest,
            "3" => FailInfo::BadTime,
            "4" => FailInfo::BadCertId,
            _ => return None,
        })
    }
}

/// Message digests, weakest first (so `max` picks the stronger).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum DigestAlgorithm {
    Sha1,
    Sha256,
    Sha512,
}

impl DigestAlgorithm {
    fn oid(self) -> ObjectIdentifier {
        match self {
            DigestAlgorithm::Sha1 => oids::SHA1,
            DigestAlgorithm::Sha256 => oids::SHA256,
            DigestAlgorithm::Sha512 => oids::SHA512,
        }
    }

    fn from_oid(oid: &ObjectIdentifier) -> Option<Self> {
        [
            DigestAlgorithm::Sha1,
            DigestAlgorithm::Sha256,
            DigestAlgorithm::Sha512,
        ]
        .into_iter()
        .find(|d| d.oid() == *oid)
    }

    /// The `sha*WithRSAEncryption` signature algorithm of this digest.
    fn from_rsa_signature_oid(oid: &ObjectIdentifier) -> Option<Self> {
        match *oid {
            oids::SHA1_WITH_RSA => Some(DigestAlgorithm::Sha1),
            oids::SHA256_WITH_RSA => Some(DigestAlgorithm::Sha256),
            oids::SHA512_WITH_RSA => Some(DigestAlgorithm::Sha512),
            _ => None,
        }
    }

    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        let algorithm = match self {
            DigestAlgorithm::Sha1 => &ring::digest::SHA1_FOR_LEGACY_USE_ONLY,
            DigestAlgorithm::Sha256 => &ring::digest::SHA256,
            DigestAlgorithm::Sha512 => &ring::digest::SHA512,
        };
        ring::digest::digest(algorithm, data).as_ref().to_vec()
    }

    /// Verifies an RSA PKCS#1 v1.5 signature over `message` with this digest.
    fn verify_rsa(
        self,
        public_key_der: &[u8],
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), ScepError> {
        let algorithm: &dyn ring::signature::VerificationAlgorithm = match self {
            DigestAlgorithm::Sha1 => &ring::signature::RSA_PKCS1_2048_8192_SHA1_FOR_LEGACY_USE_ONLY,
            DigestAlgorithm::Sha256 => &ring::signature::RSA_PKCS1_2048_8192_SHA256,
            DigestAlgorithm::Sha512 => &ring::signature::RSA_PKCS1_2048_8192_SHA512,
        };
        ring::signature::UnparsedPublicKey::new(algorithm, public_key_der)
            .verify(message, signature)
            .map_err(|_| ScepError::BadSignature)
    }
}

/// Content encryption algorithms of the envelope, weakest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum ContentCipher {
    DesCbc,
    DesEde3Cbc,
    Aes128Cbc,
    Aes256Cbc,
}

impl ContentCipher {
    pub const ALL: [ContentCipher; 4] = [
        ContentCipher::DesCbc,
        ContentCipher::DesEde3Cbc,
        ContentCipher::Aes128Cbc,
        ContentCipher::Aes256Cbc,
    ];

    fn oid(self) -> ObjectIdentifier {
        match self {
            ContentCipher::DesCbc => oids::DES_CBC,
            ContentCipher::DesEde3Cbc => oids::DES_EDE3_CBC,
            ContentCipher::Aes128Cbc => oids::AES128_CBC,
            ContentCipher::Aes256Cbc => oids::AES256_CBC,
        }
    }

    fn from_oid(oid: &ObjectIdentifier) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.oid() == *oid)
    }

    fn key_len(self) -> usize {
        match self {
            ContentCipher::DesCbc => 8,
            ContentCipher::DesEde3Cbc => 24,
            ContentCipher::Aes128Cbc => 16,
            ContentCipher::Aes256Cbc => 32,
        }
    }

    fn block_len(self) -> usize {
        match self {
            ContentCipher::DesCbc | ContentCipher::DesEde3Cbc => 8,
            ContentCipher::Aes128Cbc | ContentCipher::Aes256Cbc => 16,
        }
    }
}

/// Signs CMS SignedData on behalf of the CA, RA or a client.
pub trait CmsSigner {
    /// DER of the signing certificate.
    fn certificate_der(&self) -> &[u8];
    /// RSA PKCS#1 v1.5 signature over `message` (the DER SET of signed attributes).
    fn sign(&self, digest: DigestAlgorithm, message: &[u8]) -> Result<Vec<u8>, ScepError>;
}

/// What went wrong with a message, sorted by fault.
#[derive(Debug, thiserror::Error)]
pub enum ScepError {
    /// Not well-formed: bad encoding, missing parts.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// Well-formed, but the signature or the message digest does not verify.
    #[error("the signature does not verify")]
    BadSignature,
    /// The envelope is for a certificate other than ours.
    #[error("the envelope is encrypted to another recipient")]
    WrongRecipient,
    /// The envelope does not decrypt (wrong key, corrupted, tampered).
    #[error("the envelope does not decrypt")]
    Undecryptable,
    /// Well-formed and authentic, but refused by policy (a key too small, say).
    #[error("refused: {0}")]
    Rejected(String),
    /// An algorithm we do not implement.
    #[error("unsupported algorithm: {0}")]
    UnsupportedAlgorithm(String),
    /// Our own fault (a key that cannot sign, an encoder error).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ScepError {
    /// The failInfo a requester gets for this error.
    pub fn fail_info(&self) -> FailInfo {
        match self {
            ScepError::UnsupportedAlgorithm(_) => FailInfo::BadAlg,
            ScepError::BadSignature | ScepError::WrongRecipient | ScepError::Undecryptable => {
                FailInfo::BadMessageCheck
            }
            ScepError::Malformed(_) | ScepError::Rejected(_) | ScepError::Internal(_) => {
                FailInfo::BadRequest
            }
        }
    }
}

impl From<der::Error> for ScepError {
    fn from(e: der::Error) -> Self {
        ScepError::Malformed(e.to_string())
    }
}

/// Object identifiers used by SCEP and CMS.
pub(crate) mod oids {
    use const_oid::ObjectIdentifier as Oid;

    pub const DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.1");
    pub const SIGNED_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.2");
    pub const ENVELOPED_DATA: Oid = Oid::new_unwrap("1.2.840.113549.1.7.3");
    pub const CONTENT_TYPE: Oid = Oid::new_unwrap("1.2.840.113549.1.9.3");
    pub const MESSAGE_DIGEST: Oid = Oid::new_unwrap("1.2.840.113549.1.9.4");
    pub const CHALLENGE_PASSWORD: Oid = Oid::new_unwrap("1.2.840.113549.1.9.7");
    pub const RSA_ENCRYPTION: Oid = Oid::new_unwrap("1.2.840.113549.1.1.1");
    pub const SHA1_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.5");
    pub const SHA256_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.11");
    pub const SHA512_WITH_RSA: Oid = Oid::new_unwrap("1.2.840.113549.1.1.13");
    pub const SHA1: Oid = Oid::new_unwrap("1.3.14.3.2.26");
    pub const SHA256: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.1");
    pub const SHA512: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.2.3");
    pub const DES_CBC: Oid = Oid::new_unwrap("1.3.14.3.2.7");
    pub const DES_EDE3_CBC: Oid = Oid::new_unwrap("1.2.840.113549.3.7");
    pub const AES128_CBC: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.1.2");
    pub const AES256_CBC: Oid = Oid::new_unwrap("2.16.840.1.101.3.4.1.42");
    // SCEP attributes (Verisign arc, RFC 8894 §3.2.1).
    pub const MESSAGE_TYPE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.2");
    pub const PKI_STATUS: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.3");
    pub const FAIL_INFO: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.4");
    pub const SENDER_NONCE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.5");
    pub const RECIPIENT_NONCE: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.6");
    pub const TRANSACTION_ID: Oid = Oid::new_unwrap("2.16.840.1.113733.1.9.7");
}
