//! Building PKIMessages: the CA's CertRep replies, degenerate certificate bundles, and (for
//! the client side in `client`) signed requests. All DER, built by hand from `tlv::build`.

use const_oid::ObjectIdentifier;
use der::{Decode, Encode};
use x509_cert::Certificate;

use super::message::{PkiMessage, RequestHeader};
use super::tlv::{self, build};
use super::{CmsSigner, ContentCipher, DigestAlgorithm, FailInfo, PkiStatus, ScepError, oids};

/// Signs `econtent` as a SCEP PKIMessage: SignedData over id-data content, with the SCEP
/// attributes `scep_attributes` (each an attribute type and the DER of its one value) besides
/// contentType and messageDigest. The signer's certificate travels in the message.
pub(crate) fn sign_pki_message(
    econtent: &[u8],
    scep_attributes: &[(ObjectIdentifier, Vec<u8>)],
    digest: DigestAlgorithm,
    signer: &dyn CmsSigner,
) -> Result<Vec<u8>, ScepError> {
    sign_cms(econtent, true, scep_attributes, digest, signer)
}

/// SignedData over `content`, carried inside (a signed configuration profile).
pub fn sign_attached(
    content: &[u8],
    digest: DigestAlgorithm,
    signer: &dyn CmsSigner,
) -> Result<Vec<u8>, ScepError> {
    sign_cms(content, true, &[], digest, signer)
}

/// A detached signature over `content`: what an Apple device sends as `Mdm-Signature`.
pub fn sign_detached(
    content: &[u8],
    digest: DigestAlgorithm,
    signer: &dyn CmsSigner,
) -> Result<Vec<u8>, ScepError> {
    sign_cms(content, false, &[], digest, signer)
}

fn sign_cms(
    econtent: &[u8],
    attached: bool,
    scep_attributes: &[(ObjectIdentifier, Vec<u8>)],
    digest: DigestAlgorithm,
    signer: &dyn CmsSigner,
) -> Result<Vec<u8>, ScepError> {
    let mut attributes = vec![
        build::attribute(&oids::CONTENT_TYPE, &build::oid(&oids::DATA)),
        build::attribute(
            &oids::MESSAGE_DIGEST,
            &build::octet_string(&digest.digest(econtent)),
        ),
    ];
    for (kind, value) in scep_attributes {
        attributes.push(build::attribute(kind, value));
    }
    // The signature covers the DER SET; the SignerInfo carries the same bytes tagged [0].
    let signed_attributes = build::set_of(attributes);
    let signature = signer.sign(digest, &signed_attributes)?;
    let mut implicit = signed_attributes;
    if let Some(tag) = implicit.first_mut() {
        *tag = 0xa0;
    }
    let certificate = Certificate::from_der(signer.certificate_der())?;
    let tbs = certificate.tbs_certificate();
    let digest_algorithm = build::sequence(&[&build::oid(&digest.oid())]);
    let signer_info = build::sequence(&[
        &build::small_integer(1),
        &build::sequence(&[&tbs.issuer().to_der()?, &tbs.serial_number().to_der()?]),
        &digest_algorithm,
        &implicit,
        &build::algorithm_null(&oids::RSA_ENCRYPTION),
        &build::octet_string(&signature),
    ]);
    let signed_data = build::sequence(&[
        &build::small_integer(1),
        &build::set_of(vec![digest_algorithm.clone()]),
        &if attached {
            build::sequence(&[
                &build::oid(&oids::DATA),
                &build::explicit(0, &build::octet_string(econtent)),
            ])
        } else {
            build::sequence(&[&build::oid(&oids::DATA)])
        },
        &build::element(0xa0, signer.certificate_der()),
        &build::set_of(vec![signer_info]),
    ]);
    Ok(build::sequence(&[
        &build::oid(&oids::SIGNED_DATA),
        &build::explicit(0, &signed_data),
    ]))
}

fn reply_attributes(
    header: &RequestHeader,
    status: PkiStatus,
    fail_info: Option<FailInfo>,
) -> Vec<(ObjectIdentifier, Vec<u8>)> {
    let mut attributes = vec![
        (
            oids::MESSAGE_TYPE,
            build::printable_string(super::MessageType::CertRep.code()),
        ),
        (oids::PKI_STATUS, build::printable_string(status.code())),
        (
            oids::TRANSACTION_ID,
            build::printable_string(&header.transaction_id),
        ),
        (
            oids::SENDER_NONCE,
            build::octet_string(&crate::random::bytes::<16>()),
        ),
        (
            oids::RECIPIENT_NONCE,
            build::octet_string(&header.sender_nonce),
        ),
    ];
    if let Some(fail_info) = fail_info {
        attributes.push((oids::FAIL_INFO, build::printable_string(fail_info.code())));
    }
    attributes
}

/// CertRep SUCCESS: `issued` (leaf first, then its chain) in a degenerate SignedData, enveloped
/// to the request's signer certificate with `cipher`, signed with the request's digest.
pub fn cert_rep_success(
    request: &PkiMessage,
    issued: &[Vec<u8>],
    cipher: ContentCipher,
    signer: &dyn CmsSigner,
) -> Result<Vec<u8>, ScepError> {
    let bundle = degenerate_certificates(issued)?;
    let envelope = super::seal_envelope(&bundle, &request.signer_certificate, cipher)?;
    sign_pki_message(
        &envelope,
        &reply_attributes(&request.header(), PkiStatus::Success, None),
        request.digest,
        signer,
    )
}

/// CertRep FAILURE with `fail_info`; it carries no envelope.
pub fn cert_rep_failure(
    request: &RequestHeader,
    fail_info: FailInfo,
    signer: &dyn CmsSigner,
) -> Result<Vec<u8>, ScepError> {
    sign_pki_message(
        &[],
        &reply_attributes(request, PkiStatus::Failure, Some(fail_info)),
        request.digest,
        signer,
    )
}

/// A degenerate ("certs-only") SignedData: no content, no signers, just `certificates`.
pub fn degenerate_certificates(certificates: &[Vec<u8>]) -> Result<Vec<u8>, ScepError> {
    for certificate in certificates {
        Certificate::from_der(certificate)?;
    }
    let signed_data = build::sequence(&[
        &build::small_integer(1),
        &build::set_of(Vec::new()),
        &build::sequence(&[&build::oid(&oids::DATA)]),
        &build::element(0xa0, &certificates.concat()),
        &build::set_of(Vec::new()),
    ]);
    Ok(build::sequence(&[
        &build::oid(&oids::SIGNED_DATA),
        &build::explicit(0, &signed_data),
    ]))
}

/// The certificates of a degenerate SignedData, in the order they appear.
pub fn parse_degenerate_certificates(der: &[u8]) -> Result<Vec<Vec<u8>>, ScepError> {
    let normalised = tlv::normalise(der)?;
    let content_info = tlv::read_exact(&normalised)?.children_of(0x30)?;
    let [_, content] = content_info.as_slice() else {
        return Err(ScepError::Malformed("ContentInfo".into()));
    };
    let inner = content.children_of(0xa0)?;
    let [signed_data] = inner.as_slice() else {
        return Err(ScepError::Malformed("SignedData".into()));
    };
    let fields = signed_data.children_of(0x30)?;
    let certificates = fields
        .iter()
        .find(|f| f.tag == 0xa0)
        .ok_or_else(|| ScepError::Malformed("no certificates".into()))?;
    Ok(certificates
        .children()?
        .iter()
        .map(|c| c.raw.to_vec())
        .collect())
}

/// The serial number (big-endian bytes) of an IssuerAndSerialNumber, the content of GetCert.
pub fn parse_issuer_and_serial(der: &[u8]) -> Result<Vec<u8>, ScepError> {
    let parts = tlv::read_exact(der)?.children_of(0x30)?;
    let [issuer, serial] = parts.as_slice() else {
        return Err(ScepError::Malformed("IssuerAndSerialNumber".into()));
    };
    issuer.expect(0x30)?;
    Ok(serial.expect(0x02)?.value.to_vec())
}

/// An IssuerAndSubject, the content of GetCertInitial: checked for shape only (the transaction
/// ID says which request is polled).
pub fn parse_issuer_and_subject(der: &[u8]) -> Result<(), ScepError> {
    let parts = tlv::read_exact(der)?.children_of(0x30)?;
    let [issuer, subject] = parts.as_slice() else {
        return Err(ScepError::Malformed("IssuerAndSubject".into()));
    };
    issuer.expect(0x30)?;
    subject.expect(0x30)?;
    Ok(())
}
