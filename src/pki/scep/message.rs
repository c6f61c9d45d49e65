//! Parsing and verifying a PKIMessage: the outer CMS SignedData with the SCEP attributes.

use super::signed_data::{
    Parsed, find_signer, octet_attribute, parse_signed_data, string_attribute, verify,
};
use super::tlv;
use super::{DigestAlgorithm, MessageType, ScepError, oids};

/// A PKIMessage whose outer signature verified against the certificate it carries.
#[derive(Clone, Debug)]
pub struct PkiMessage {
    pub message_type: MessageType,
    pub transaction_id: String,
    pub sender_nonce: Vec<u8>,
    pub digest: DigestAlgorithm,
    /// DER of the certificate whose key signed (self-signed for PKCSReq; one of ours for
    /// RenewalReq). Its key is proven; whether to trust it is the caller's decision.
    pub signer_certificate: Vec<u8>,
    /// The encapsulated content: a DER ContentInfo with the EnvelopedData (pkcsPKIEnvelope),
    /// or, in a CertRep, whatever the reply carries.
    pub enveloped_data: Vec<u8>,
    /// CertRep only.
    pub pki_status: Option<super::PkiStatus>,
    pub fail_info: Option<super::FailInfo>,
    pub recipient_nonce: Option<Vec<u8>>,
}

/// Just enough of a request to address a FAILURE reply to it, read without trusting it.
#[derive(Clone, Debug)]
pub struct RequestHeader {
    pub transaction_id: String,
    pub sender_nonce: Vec<u8>,
    pub digest: DigestAlgorithm,
}

impl PkiMessage {
    pub fn header(&self) -> RequestHeader {
        RequestHeader {
            transaction_id: self.transaction_id.clone(),
            sender_nonce: self.sender_nonce.clone(),
            digest: self.digest,
        }
    }
}

/// Parses a PKIMessage (BER or DER) and verifies its signature and message digest.
pub fn parse_pki_message(body: &[u8]) -> Result<PkiMessage, ScepError> {
    let normalised = tlv::normalise(body)?;
    let parsed = parse_signed_data(&normalised)?;
    if parsed.signer.signed_attrs_der.is_none() {
        return Err(ScepError::Malformed(
            "SCEP messages must carry signed attributes".into(),
        ));
    }
    let signer_certificate = find_signer(&parsed.certificates, &parsed.signer.sid)?;
    verify(&parsed, &signer_certificate, &parsed.econtent)?;
    let header = header_of(&parsed)?;
    let message_type = string_attribute(&parsed.signer, oids::MESSAGE_TYPE)?
        .and_then(|code| MessageType::from_code(&code))
        .ok_or_else(|| ScepError::Malformed("missing or unknown messageType".into()))?;
    let pki_status = string_attribute(&parsed.signer, oids::PKI_STATUS)?
        .map(|code| {
            super::PkiStatus::from_code(&code)
                .ok_or_else(|| ScepError::Malformed("unknown pkiStatus".into()))
        })
        .transpose()?;
    let fail_info = string_attribute(&parsed.signer, oids::FAIL_INFO)?
        .and_then(|code| super::FailInfo::from_code(&code));
    let recipient_nonce = octet_attribute(&parsed.signer, oids::RECIPIENT_NONCE)?;
    Ok(PkiMessage {
        message_type,
        transaction_id: header.transaction_id,
        sender_nonce: header.sender_nonce,
        digest: header.digest,
        signer_certificate,
        enveloped_data: parsed.econtent,
        pki_status,
        fail_info,
        recipient_nonce,
    })
}

/// Reads transactionID, senderNonce and the digest algorithm without verifying anything, so a
/// message that fails verification can still get a FAILURE reply.
pub fn parse_request_header(body: &[u8]) -> Result<RequestHeader, ScepError> {
    let normalised = tlv::normalise(body)?;
    header_of(&parse_signed_data(&normalised)?)
}

fn header_of(parsed: &Parsed<'_>) -> Result<RequestHeader, ScepError> {
    let transaction_id = string_attribute(&parsed.signer, oids::TRANSACTION_ID)?
        .filter(|id| !id.is_empty() && id.len() <= 256)
        .ok_or_else(|| ScepError::Malformed("missing transactionID".into()))?;
    let sender_nonce = octet_attribute(&parsed.signer, oids::SENDER_NONCE)?
        .filter(|n| !n.is_empty() && n.len() <= 64)
        .ok_or_else(|| ScepError::Malformed("missing senderNonce".into()))?;
    Ok(RequestHeader {
        transaction_id,
        sender_nonce,
        digest: parsed.signer.digest,
    })
}
