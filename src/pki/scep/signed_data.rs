//! CMS SignedData (RFC 5652) as SCEP and Apple devices send it: BER or DER, one RSA signer,
//! signed attributes or none, content attached (a PKIMessage) or detached (an `Mdm-Signature`
//! header over the request body). Parsing and verification are ours: RustCrypto's `cms` reads
//! DER only and does not verify.

use const_oid::ObjectIdentifier;
use der::{Decode, Encode};
use x509_cert::Certificate;

use super::tlv::{self, Tlv};
use super::{DigestAlgorithm, ScepError, oids};

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OCTET_STRING: u8 = 0x04;
const CONTEXT_0: u8 = 0xa0;
const CONTEXT_1: u8 = 0xa1;

/// A detached signature that verified: who signed, and with which digest.
#[derive(Clone, Debug)]
pub struct VerifiedSigner {
    /// DER of the certificate whose key made the signature (carried in the SignedData). Its key
    /// is proven; whether to trust the certificate is the caller's decision.
    pub certificate_der: Vec<u8>,
    pub digest: DigestAlgorithm,
}

/// Verifies a detached CMS signature (BER or DER SignedData without eContent) over `content`.
pub fn verify_detached(signature: &[u8], content: &[u8]) -> Result<VerifiedSigner, ScepError> {
    verify_detached_with(signature, content, &|der| {
        SignerKey::from_certificate(der).ok()
    })
}

/// [`verify_detached`], with what each certificate the message carries offers for verification
/// from `key_of` (`None`: not a certificate), so a caller that sees the same certificates
/// again and again (the MDM channels) reads each once. The signature is verified every time.
pub fn verify_detached_with(
    signature: &[u8],
    content: &[u8],
    key_of: &dyn Fn(&[u8]) -> Option<SignerKey>,
) -> Result<VerifiedSigner, ScepError> {
    let normalised = tlv::normalise(signature)?;
    let parsed = parse_signed_data(&normalised)?;
    if !parsed.econtent.is_empty() {
        return Err(malformed("a detached signature must not carry content"));
    }
    if parsed.econtent_type != oids::DATA {
        return Err(malformed("a detached signature must be over id-data"));
    }
    let (certificate_der, key) = find_signer_key(&parsed.certificates, &parsed.signer.sid, key_of)?;
    verify_with_key(&parsed, key.rsa_public_key(certificate_der)?, content)?;
    Ok(VerifiedSigner {
        certificate_der: certificate_der.to_vec(),
        digest: parsed.signer.digest,
    })
}

/// What verifying a signature needs of a signer's certificate, read from it once: how the
/// SignerInfo may name it, and where its RSA public key lies in its bytes. Small and without
/// allocations (a node keeps one per certificate it sees); only meaningful with the very
/// bytes it was read from.
#[derive(Clone, Debug)]
pub struct SignerKey {
    /// SHA-256 over the issuer Name's DER and the serial without leading zero bytes.
    issuer_and_serial: [u8; 32],
    /// SHA-256 of the subject key identifier, when there is one.
    subject_key_id: Option<[u8; 32]>,
    /// Where the RSAPublicKey DER lies in the certificate, or the algorithm of a key that is
    /// not RSA.
    public_key: Result<(u32, u32), Box<ObjectIdentifier>>,
}

impl SignerKey {
    pub fn from_certificate(certificate_der: &[u8]) -> Result<SignerKey, ScepError> {
        use x509_cert::ext::pkix::SubjectKeyIdentifier;
        let cert = Certificate::from_der(certificate_der)?;
        let tbs = cert.tbs_certificate();
        let issuer = tbs.issuer().to_der()?;
        let subject_key_id = tbs
            .get_extension::<SubjectKeyIdentifier>()
            .ok()
            .flatten()
            .map(|(_, ski)| sha256(ski.0.as_bytes()));
        let spki = tbs.subject_public_key_info();
        let public_key = if spki.algorithm.oid == oids::RSA_ENCRYPTION {
            let key = spki
                .subject_public_key
                .as_bytes()
                .ok_or_else(|| malformed("public key bit string"))?;
            let start = certificate_der
                .windows(key.len().max(1))
                .position(|w| w == key)
                .ok_or_else(|| malformed("public key not found in the certificate"))?;
            let range = u32::try_from(start)
                .ok()
                .zip(u32::try_from(start + key.len()).ok())
                .ok_or_else(|| malformed("certificate too large"))?;
            Ok(range)
        } else {
            Err(Box::new(spki.algorithm.oid))
        };
        Ok(SignerKey {
            issuer_and_serial: issuer_and_serial(&issuer, tbs.serial_number().as_bytes()),
            subject_key_id,
            public_key,
        })
    }

    /// The RSAPublicKey DER in `certificate_der` (the bytes this was read from).
    fn rsa_public_key<'a>(&self, certificate_der: &'a [u8]) -> Result<&'a [u8], ScepError> {
        let (start, end) = self
            .public_key
            .as_ref()
            .map_err(|oid| ScepError::UnsupportedAlgorithm(format!("public key {oid}")))?;
        certificate_der
            .get(*start as usize..*end as usize)
            .ok_or_else(|| malformed("public key not in the certificate"))
    }

    /// Whether a SignerIdentifier names this certificate.
    fn named_by(&self, sid: &Tlv<'_>) -> Result<bool, ScepError> {
        Ok(match sid.tag {
            SEQUENCE => {
                let parts = sid.children()?;
                let [issuer, serial] = parts.as_slice() else {
                    return Err(malformed("IssuerAndSerialNumber"));
                };
                issuer_and_serial(issuer.raw, serial.value) == self.issuer_and_serial
            }
            // [0] SubjectKeyIdentifier.
            0x80 => self.subject_key_id == Some(sha256(sid.value)),
            _ => return Err(malformed("unknown SignerIdentifier")),
        })
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref());
    out
}

fn issuer_and_serial(issuer_der: &[u8], serial: &[u8]) -> [u8; 32] {
    let mut hash = ring::digest::Context::new(&ring::digest::SHA256);
    hash.update(&(issuer_der.len() as u64).to_be_bytes());
    hash.update(issuer_der);
    hash.update(trim_integer(serial));
    let mut out = [0u8; 32];
    out.copy_from_slice(hash.finish().as_ref());
    out
}

/// [`find_signer`] through `key_of`: the named certificate and what it offers.
fn find_signer_key<'a>(
    certificates: &[Tlv<'a>],
    sid: &Tlv<'_>,
    key_of: &dyn Fn(&[u8]) -> Option<SignerKey>,
) -> Result<(&'a [u8], SignerKey), ScepError> {
    for candidate in certificates {
        let Some(key) = key_of(candidate.raw) else {
            continue;
        };
        if key.named_by(sid)? {
            return Ok((candidate.raw, key));
        }
    }
    Err(ScepError::Malformed(
        "the signer's certificate is not in the message".into(),
    ))
}

/// The parts of a SignedData the broker uses, borrowed from the normalised input.
pub(super) struct Parsed<'a> {
    pub(super) econtent_type: ObjectIdentifier,
    pub(super) econtent: Vec<u8>,
    pub(super) certificates: Vec<Tlv<'a>>,
    pub(super) signer: SignerInfo<'a>,
}

pub(super) struct SignerInfo<'a> {
    pub(super) sid: Tlv<'a>,
    pub(super) digest: DigestAlgorithm,
    /// The signed attributes as received, re-tagged as a SET: the bytes the signature covers
    /// when present. Without them the signature covers the content itself.
    pub(super) signed_attrs_der: Option<Vec<u8>>,
    pub(super) attributes: Vec<(ObjectIdentifier, Vec<Tlv<'a>>)>,
    pub(super) signature_algorithm: ObjectIdentifier,
    pub(super) signature: &'a [u8],
}

pub(super) fn oid_of(tlv: &Tlv<'_>) -> Result<ObjectIdentifier, ScepError> {
    tlv.expect(OID)?;
    ObjectIdentifier::from_bytes(tlv.value)
        .map_err(|_| ScepError::Malformed("bad object identifier".into()))
}

/// The algorithm OID of an AlgorithmIdentifier SEQUENCE.
pub(super) fn algorithm_of(tlv: &Tlv<'_>) -> Result<ObjectIdentifier, ScepError> {
    let parts = tlv.children_of(SEQUENCE)?;
    oid_of(
        parts
            .first()
            .ok_or_else(|| malformed("empty AlgorithmIdentifier"))?,
    )
}

pub(super) fn malformed(what: &str) -> ScepError {
    ScepError::Malformed(what.to_string())
}

/// ContentInfo { signedData, [0] SignedData } → the parts we use.
pub(super) fn parse_signed_data(der: &[u8]) -> Result<Parsed<'_>, ScepError> {
    let content_info = tlv::read_exact(der)?.children_of(SEQUENCE)?;
    let [content_type, content] = content_info.as_slice() else {
        return Err(malformed("ContentInfo must have two fields"));
    };
    if oid_of(content_type)? != oids::SIGNED_DATA {
        return Err(malformed("not a SignedData"));
    }
    let signed_data = content.children_of(CONTEXT_0)?;
    let [signed_data] = signed_data.as_slice() else {
        return Err(malformed("[0] must hold one SignedData"));
    };
    let fields = signed_data.children_of(SEQUENCE)?;
    let mut fields = fields.iter();
    let _version = fields.next().ok_or_else(|| malformed("no version"))?;
    let _digest_algorithms = fields
        .next()
        .ok_or_else(|| malformed("no digestAlgorithms"))?
        .expect(SET)?;
    let encap = fields
        .next()
        .ok_or_else(|| malformed("no encapContentInfo"))?
        .children_of(SEQUENCE)?;
    let econtent_type = oid_of(encap.first().ok_or_else(|| malformed("no eContentType"))?)?;
    let econtent = match encap.get(1) {
        Some(explicit) => {
            let inner = explicit.children_of(CONTEXT_0)?;
            let [octets] = inner.as_slice() else {
                return Err(malformed("eContent must be one OCTET STRING"));
            };
            octets.expect(OCTET_STRING)?.value.to_vec()
        }
        None => Vec::new(),
    };
    let mut certificates = Vec::new();
    let mut next = fields.next();
    if let Some(set) = next.filter(|t| t.tag == CONTEXT_0) {
        certificates = set.children()?;
        next = fields.next();
    }
    if next.is_some_and(|t| t.tag == CONTEXT_1) {
        next = fields.next();
    }
    let signer_infos = next
        .ok_or_else(|| malformed("no signerInfos"))?
        .children_of(SET)?;
    // SCEP messages carry exactly one signer.
    let [signer_info] = signer_infos.as_slice() else {
        return Err(malformed("expected exactly one SignerInfo"));
    };
    Ok(Parsed {
        econtent_type,
        econtent,
        certificates,
        signer: parse_signer_info(signer_info)?,
    })
}

fn parse_signer_info<'a>(tlv: &Tlv<'a>) -> Result<SignerInfo<'a>, ScepError> {
    let fields = tlv.children_of(SEQUENCE)?;
    let mut fields = fields.into_iter();
    let _version = fields.next().ok_or_else(|| malformed("no version"))?;
    let sid = fields.next().ok_or_else(|| malformed("no sid"))?;
    let digest_oid = algorithm_of(&fields.next().ok_or_else(|| malformed("no digest"))?)?;
    let digest = DigestAlgorithm::from_oid(&digest_oid)
        .ok_or_else(|| ScepError::UnsupportedAlgorithm(format!("digest {digest_oid}")))?;
    let mut next = fields.next().ok_or_else(|| malformed("no signature"))?;
    let (signed_attrs_der, attributes) = if next.tag == CONTEXT_0 {
        // [0] IMPLICIT SET OF Attribute: the signature covers it with the SET tag.
        let mut as_set = next.raw.to_vec();
        if let Some(first) = as_set.first_mut() {
            *first = SET;
        }
        let mut attributes = Vec::new();
        for attribute in next.children()? {
            let parts = attribute.children_of(SEQUENCE)?;
            let [kind, values] = parts.as_slice() else {
                return Err(malformed("Attribute must have a type and values"));
            };
            attributes.push((oid_of(kind)?, values.children_of(SET)?));
        }
        next = fields
            .next()
            .ok_or_else(|| malformed("no signatureAlgorithm"))?;
        (Some(as_set), attributes)
    } else {
        (None, Vec::new())
    };
    let signature_algorithm = algorithm_of(&next)?;
    let signature = fields
        .next()
        .ok_or_else(|| malformed("no signature value"))?
        .expect(OCTET_STRING)?
        .value;
    Ok(SignerInfo {
        sid,
        digest,
        signed_attrs_der,
        attributes,
        signature_algorithm,
        signature,
    })
}

/// The single value of attribute `oid`, if present; more than one value is malformed.
pub(super) fn attribute<'a>(
    signer: &'a SignerInfo<'_>,
    oid: ObjectIdentifier,
) -> Result<Option<&'a Tlv<'a>>, ScepError> {
    let mut found = signer.attributes.iter().filter(|(kind, _)| *kind == oid);
    let Some((_, values)) = found.next() else {
        return Ok(None);
    };
    if found.next().is_some() {
        return Err(ScepError::Malformed(format!(
            "attribute {oid} appears twice"
        )));
    }
    match values.as_slice() {
        [value] => Ok(Some(value)),
        _ => Err(ScepError::Malformed(format!(
            "attribute {oid} needs one value"
        ))),
    }
}

pub(super) fn string_attribute(
    signer: &SignerInfo<'_>,
    oid: ObjectIdentifier,
) -> Result<Option<String>, ScepError> {
    let Some(value) = attribute(signer, oid)? else {
        return Ok(None);
    };
    // PrintableString per RFC 8894; UTF8String and IA5String are seen in the field.
    if ![0x13, 0x0c, 0x16].contains(&value.tag) {
        return Err(ScepError::Malformed(format!(
            "attribute {oid} is not a string"
        )));
    }
    String::from_utf8(value.value.to_vec())
        .map(Some)
        .map_err(|_| ScepError::Malformed(format!("attribute {oid} is not text")))
}

pub(super) fn octet_attribute(
    signer: &SignerInfo<'_>,
    oid: ObjectIdentifier,
) -> Result<Option<Vec<u8>>, ScepError> {
    attribute(signer, oid)?
        .map(|value| Ok(value.expect(OCTET_STRING)?.value.to_vec()))
        .transpose()
}

/// Finds the certificate the SignerInfo names, by issuer and serial number (or by subject key
/// identifier), among the certificates the message carries.
pub(super) fn find_signer(certificates: &[Tlv<'_>], sid: &Tlv<'_>) -> Result<Vec<u8>, ScepError> {
    for candidate in certificates {
        let Ok(cert) = Certificate::from_der(candidate.raw) else {
            continue;
        };
        let tbs = cert.tbs_certificate();
        let matches = match sid.tag {
            SEQUENCE => {
                let parts = sid.children()?;
                let [issuer, serial] = parts.as_slice() else {
                    return Err(malformed("IssuerAndSerialNumber"));
                };
                let cert_issuer = tbs.issuer().to_der()?;
                issuer.raw == cert_issuer.as_slice()
                    && trim_integer(serial.value) == trim_integer(tbs.serial_number().as_bytes())
            }
            0x80 => {
                // [0] SubjectKeyIdentifier.
                use x509_cert::ext::pkix::SubjectKeyIdentifier;
                tbs.get_extension::<SubjectKeyIdentifier>()
                    .ok()
                    .flatten()
                    .is_some_and(|(_, ski)| ski.0.as_bytes() == sid.value)
            }
            _ => return Err(malformed("unknown SignerIdentifier")),
        };
        if matches {
            return Ok(candidate.raw.to_vec());
        }
    }
    Err(ScepError::Malformed(
        "the signer's certificate is not in the message".into(),
    ))
}

/// An INTEGER's content without leading zero bytes (serials compare by value).
fn trim_integer(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes.get(start..).unwrap_or_default()
}

/// Checks the signature of `parsed` over `content` (its own eContent, or the detached content):
/// with signed attributes, their contentType and messageDigest and the RSA signature over them;
/// without, the RSA signature over the content itself.
pub(super) fn verify(
    parsed: &Parsed<'_>,
    signer_certificate: &[u8],
    content: &[u8],
) -> Result<(), ScepError> {
    let public_key = rsa_public_key(signer_certificate)?;
    verify_with_key(parsed, &public_key, content)
}

/// [`verify`] with the signer's RSAPublicKey DER.
fn verify_with_key(
    parsed: &Parsed<'_>,
    public_key: &[u8],
    content: &[u8],
) -> Result<(), ScepError> {
    let signer = &parsed.signer;
    match signer.signature_algorithm {
        oids::RSA_ENCRYPTION => {}
        ref oid => match DigestAlgorithm::from_rsa_signature_oid(oid) {
            Some(d) if d == signer.digest => {}
            Some(_) => return Err(malformed("signature and digest algorithms disagree")),
            None => {
                return Err(ScepError::UnsupportedAlgorithm(format!("signature {oid}")));
            }
        },
    }
    let Some(signed_attrs_der) = &signer.signed_attrs_der else {
        return signer
            .digest
            .verify_rsa(public_key, content, signer.signature);
    };
    let content_type = attribute(signer, oids::CONTENT_TYPE)?
        .ok_or_else(|| malformed("missing contentType attribute"))?;
    if oid_of(content_type)? != parsed.econtent_type {
        return Err(ScepError::BadSignature);
    }
    let digest = attribute(signer, oids::MESSAGE_DIGEST)?
        .ok_or_else(|| malformed("missing messageDigest attribute"))?
        .expect(OCTET_STRING)?
        .value;
    let expected = signer.digest.digest(content);
    if !bool::from(subtle::ConstantTimeEq::ct_eq(expected.as_slice(), digest)) {
        return Err(ScepError::BadSignature);
    }
    signer
        .digest
        .verify_rsa(public_key, signed_attrs_der, signer.signature)
}

/// The RSAPublicKey DER inside a certificate's SubjectPublicKeyInfo.
pub(crate) fn rsa_public_key(certificate_der: &[u8]) -> Result<Vec<u8>, ScepError> {
    let cert = Certificate::from_der(certificate_der)?;
    let spki = cert.tbs_certificate().subject_public_key_info();
    if spki.algorithm.oid != oids::RSA_ENCRYPTION {
        return Err(ScepError::UnsupportedAlgorithm(format!(
            "public key {}",
            spki.algorithm.oid
        )));
    }
    spki.subject_public_key
        .as_bytes()
        .map(<[u8]>::to_vec)
        .ok_or_else(|| malformed("public key bit string"))
}
