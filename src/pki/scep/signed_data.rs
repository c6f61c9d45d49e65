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
    .map(|(signer, _)| signer)
}

/// [`verify_detached`], with what each certificate the message carries offers for verification
/// from `key_of` (`None`: not a certificate), so a caller that sees the same certificates
/// again and again (the MDM channels) reads each once; returns, besides the signer, what
/// `key_of` said of its certificate. The signature is verified every time.
pub fn verify_detached_with<K: std::borrow::Borrow<SignerKey>>(
    signature: &[u8],
    content: &[u8],
    key_of: &dyn Fn(&[u8]) -> Option<K>,
) -> Result<(VerifiedSigner, K), ScepError> {
    // DER (what most signers write) is read in place; BER is rewritten first.
    let normalised: std::borrow::Cow<'_, [u8]> = if already_normal(signature) {
        signature.into()
    } else {
        tlv::normalise(signature)?.into()
    };
    let parsed = parse_signed_data(&normalised)?;
    if !parsed.econtent.is_empty() {
        return Err(malformed("a detached signature must not carry content"));
    }
    if parsed.econtent_type != oids::DATA {
        return Err(malformed("a detached signature must be over id-data"));
    }
    let (certificate_der, found) =
        find_signer_key(&parsed.certificates, &parsed.signer.sid, key_of)?;
    let key: &SignerKey = found.borrow();
    match &key.prepared {
        Some(prepared) => verify_with_prepared(&parsed, prepared, content)?,
        None => verify_with_key(&parsed, key.rsa_public_key(certificate_der)?, content)?,
    }
    Ok((
        VerifiedSigner {
            certificate_der: certificate_der.to_vec(),
            digest: parsed.signer.digest,
        },
        found,
    ))
}

/// Deepest nesting [`already_normal`] walks (as deep as `tlv::normalise` accepts).
const MAX_NORMAL_DEPTH: usize = 48;

/// Whether `input` is one element that `tlv::normalise` would return unchanged: definite,
/// minimally encoded lengths throughout, no constructed OCTET STRING, no end-of-contents tag,
/// nothing after it. Anything else (BER, or not an encoding at all) goes through `normalise`,
/// which rewrites it or says what is wrong.
fn already_normal(input: &[u8]) -> bool {
    match tlv::read(input) {
        Ok((element, rest)) => rest.is_empty() && element_normal(&element, 0),
        Err(_) => false,
    }
}

fn element_normal(element: &Tlv<'_>, depth: usize) -> bool {
    if depth > MAX_NORMAL_DEPTH || element.tag == 0 {
        return false;
    }
    // The length as DER writes it: short form below 128, else the fewest bytes.
    let length = element.value.len();
    let minimal_header = if length < 0x80 {
        2
    } else {
        2 + (usize::BITS - length.leading_zeros()).div_ceil(8) as usize
    };
    if element.raw.len() != minimal_header + length {
        return false;
    }
    if !element.is_constructed() {
        return true;
    }
    if element.tag == OCTET_STRING | 0x20 {
        return false;
    }
    let mut inner = element.value;
    while !inner.is_empty() {
        match tlv::read(inner) {
            Ok((child, rest)) if element_normal(&child, depth + 1) => inner = rest,
            _ => return false,
        }
    }
    true
}

/// What verifying a signature needs of a signer's certificate, read from it once: how the
/// SignerInfo may name it, and where its RSA public key lies in its bytes. Small and without
/// allocations (a node keeps one per certificate it sees); only meaningful with the very
/// bytes it was read from. [`SignerKey::prepare`] adds the key made ready for repeated
/// verification (~1.5 KB more: for the certificates seen often).
#[derive(Clone, Debug)]
pub struct SignerKey {
    /// SHA-256 over the issuer Name's DER and the serial without leading zero bytes.
    issuer_and_serial: [u8; 32],
    /// SHA-256 of the subject key identifier, when there is one.
    subject_key_id: Option<[u8; 32]>,
    /// Where the RSAPublicKey DER lies in the certificate, or the algorithm of a key that is
    /// not RSA.
    public_key: Result<(u32, u32), Box<ObjectIdentifier>>,
    /// The public key ready for verification, once prepared.
    prepared: Option<std::sync::Arc<PreparedRsaKey>>,
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
            prepared: None,
        })
    }

    /// Makes the RSA public key ready for repeated verification (its Montgomery form, which
    /// `ring` computes again for every signature, is kept), so that each signature costs only
    /// the exponentiation. `certificate_der` must be the bytes this was read from. Returns
    /// whether it was prepared: a key that verification would refuse anyway (not RSA, not 2048
    /// to 8192 bits, an unusable exponent) is not, and is then refused as before.
    pub fn prepare(&mut self, certificate_der: &[u8]) -> bool {
        if self.prepared.is_none() {
            self.prepared = self
                .rsa_public_key(certificate_der)
                .ok()
                .and_then(PreparedRsaKey::new)
                .map(std::sync::Arc::new);
        }
        self.prepared.is_some()
    }

    /// Whether [`SignerKey::prepare`] made the key ready.
    pub fn is_prepared(&self) -> bool {
        self.prepared.is_some()
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
fn find_signer_key<'a, K: std::borrow::Borrow<SignerKey>>(
    certificates: &[Tlv<'a>],
    sid: &Tlv<'_>,
    key_of: &dyn Fn(&[u8]) -> Option<K>,
) -> Result<(&'a [u8], K), ScepError> {
    for candidate in certificates {
        let Some(key) = key_of(candidate.raw) else {
            continue;
        };
        if key.borrow().named_by(sid)? {
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
    let signed = signed_bytes(parsed, content)?;
    signer
        .digest
        .verify_rsa(public_key, signed, signer.signature)
}

/// [`verify_with_key`] with a prepared key: the same checks, the same answers.
fn verify_with_prepared(
    parsed: &Parsed<'_>,
    key: &PreparedRsaKey,
    content: &[u8],
) -> Result<(), ScepError> {
    let signer = &parsed.signer;
    let signed = signed_bytes(parsed, content)?;
    key.verify(signer.digest, signed, signer.signature)
}

/// What the RSA signature of `parsed` covers, once the algorithms agree and (with signed
/// attributes) their contentType and messageDigest match `content`.
fn signed_bytes<'a>(parsed: &'a Parsed<'_>, content: &'a [u8]) -> Result<&'a [u8], ScepError> {
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
        return Ok(content);
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
    Ok(signed_attrs_der)
}

/// An RSA public key ready for PKCS#1 v1.5 verification: OpenSSL's, which keeps the modulus's
/// Montgomery form after the first use (`ring` takes only unparsed keys and computes it for
/// every signature: a third of a verification). Made only for the keys `ring`'s
/// `RSA_PKCS1_2048_8192_*` accept: the same checks, so that nothing verifies here that would
/// not verify there.
pub(super) struct PreparedRsaKey {
    rsa: openssl::rsa::Rsa<openssl::pkey::Public>,
    /// The modulus in bytes: a signature must be exactly this long.
    modulus_len: usize,
}

impl std::fmt::Debug for PreparedRsaKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PreparedRsaKey({} bytes)", self.modulus_len)
    }
}

/// The DigestInfo before the hash in an EMSA-PKCS1-v1_5 encoding (RFC 8017 §9.2, note 1),
/// with the NULL parameters `ring` requires.
fn digest_info_prefix(digest: DigestAlgorithm) -> &'static [u8] {
    match digest {
        DigestAlgorithm::Sha1 => &[
            0x30, 0x21, 0x30, 0x09, 0x06, 0x05, 0x2b, 0x0e, 0x03, 0x02, 0x1a, 0x05, 0x00, 0x04,
            0x14,
        ],
        DigestAlgorithm::Sha256 => &[
            0x30, 0x31, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x05, 0x00, 0x04, 0x20,
        ],
        DigestAlgorithm::Sha512 => &[
            0x30, 0x51, 0x30, 0x0d, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x03, 0x05, 0x00, 0x04, 0x40,
        ],
    }
}

impl PreparedRsaKey {
    /// From an RSAPublicKey (DER); `None` for a key `ring` would refuse.
    fn new(rsa_public_key_der: &[u8]) -> Option<PreparedRsaKey> {
        let (n, e) = rsa_public_key_parts(rsa_public_key_der)?;
        // As ring's `PublicModulus` and `PublicExponent` check them: the modulus at least
        // 2048 bits rounded up to whole bytes, at most 8192 bits, odd; the exponent odd, at
        // least 3, at most 2^33 - 1.
        let n_bits = n.len() * 8 - n.first()?.leading_zeros() as usize;
        if n.len() < 2048 / 8 || n_bits > 8192 || n.last()? & 1 == 0 {
            return None;
        }
        if e.len() > 5 {
            return None;
        }
        let e_value = e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
        if !(3..=(1 << 33) - 1).contains(&e_value) || e_value & 1 == 0 {
            return None;
        }
        let rsa = openssl::rsa::Rsa::from_public_components(
            openssl::bn::BigNum::from_slice(n).ok()?,
            openssl::bn::BigNum::from_slice(e).ok()?,
        )
        .ok()?;
        Some(PreparedRsaKey {
            rsa,
            modulus_len: n.len(),
        })
    }

    /// Checks an RSASSA-PKCS1-v1_5 signature over `message`: the signature, raised to the
    /// public exponent, must be exactly the encoding of the message's digest (RFC 8017
    /// §8.2.2: encode and compare, nothing parsed).
    fn verify(
        &self,
        digest: DigestAlgorithm,
        message: &[u8],
        signature: &[u8],
    ) -> Result<(), ScepError> {
        if signature.len() != self.modulus_len {
            return Err(ScepError::BadSignature);
        }
        let mut decoded = [0u8; 1024];
        let decoded = decoded
            .get_mut(..self.modulus_len)
            .ok_or(ScepError::BadSignature)?;
        // Refuses a signature not below the modulus.
        let written = self
            .rsa
            .public_decrypt(signature, decoded, openssl::rsa::Padding::NONE)
            .map_err(|_| ScepError::BadSignature)?;
        if written != self.modulus_len {
            return Err(ScepError::BadSignature);
        }
        let hash = digest.digest(message);
        let prefix = digest_info_prefix(digest);
        // 00 01 FF…FF 00 DigestInfo: at least eight FF bytes.
        let padding = self
            .modulus_len
            .checked_sub(3 + prefix.len() + hash.len())
            .filter(|p| *p >= 8)
            .ok_or(ScepError::BadSignature)?;
        let (head, rest) = decoded.split_at(2 + padding + 1);
        let (got_prefix, got_hash) = rest.split_at(prefix.len());
        let head_ok = head.first() == Some(&0)
            && head.get(1) == Some(&1)
            && head
                .get(2..2 + padding)
                .is_some_and(|ff| ff.iter().all(|b| *b == 0xff))
            && head.last() == Some(&0);
        if head_ok && got_prefix == prefix && got_hash == hash.as_slice() {
            Ok(())
        } else {
            Err(ScepError::BadSignature)
        }
    }
}

/// The modulus and exponent of an RSAPublicKey (DER), each without leading zero bytes; `None`
/// unless it is exactly a SEQUENCE of two positive, minimally encoded INTEGERs.
fn rsa_public_key_parts(der: &[u8]) -> Option<(&[u8], &[u8])> {
    let parts = tlv::read_exact(der).ok()?.children_of(SEQUENCE).ok()?;
    let [n, e] = parts.as_slice() else {
        return None;
    };
    Some((positive_integer(n)?, positive_integer(e)?))
}

/// A positive, minimally encoded INTEGER's value without its sign byte.
fn positive_integer<'a>(int: &Tlv<'a>) -> Option<&'a [u8]> {
    let value = match int.expect(0x02).ok()?.value {
        [] => return None,
        [first, ..] if *first & 0x80 != 0 => return None,
        [0, second, ..] if *second & 0x80 == 0 => return None,
        [0, rest @ ..] => rest,
        value => value,
    };
    (!value.is_empty()).then_some(value)
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

#[cfg(test)]
mod prepared_tests {
    use std::sync::OnceLock;

    use base64::Engine;
    use openssl::bn::BigNum;
    use openssl::rsa::{Padding, Rsa};

    use super::super::client::ClientIdentity;
    use super::super::sign_detached;
    use super::*;

    /// One RSA-2048 identity and its OpenSSL private key, made once.
    fn identity() -> &'static (ClientIdentity, Rsa<openssl::pkey::Private>) {
        static ID: OnceLock<(ClientIdentity, Rsa<openssl::pkey::Private>)> = OnceLock::new();
        ID.get_or_init(|| {
            let id = ClientIdentity::generate(2048).unwrap();
            let rsa = openssl::pkey::PKey::private_key_from_pkcs8(&id.pkcs8)
                .unwrap()
                .rsa()
                .unwrap();
            (id, rsa)
        })
    }

    fn public_der(rsa: &Rsa<impl openssl::pkey::HasPublic>) -> Vec<u8> {
        rsa.public_key_to_der_pkcs1().unwrap()
    }

    /// The EMSA-PKCS1-v1_5 encoding of `message` under `digest`, 256 bytes.
    fn encoding(digest: DigestAlgorithm, message: &[u8]) -> Vec<u8> {
        let t = [digest_info_prefix(digest), &digest.digest(message)].concat();
        let mut em = vec![0x00, 0x01];
        em.resize(256 - t.len() - 1, 0xff);
        em.push(0x00);
        em.extend_from_slice(&t);
        em
    }

    fn raw_sign(em: &[u8]) -> Vec<u8> {
        let (_, rsa) = identity();
        let mut out = vec![0u8; 256];
        rsa.private_encrypt(em, &mut out, Padding::NONE).unwrap();
        out
    }

    /// The prepared key accepts exactly the encodings ring accepts: the right one, and none of
    /// the near misses (padding, block type, digest, DigestInfo without NULL, length, ≥ n).
    #[test]
    fn a_prepared_key_verifies_exactly_what_ring_verifies() {
        let (_, rsa) = identity();
        let der = public_der(rsa);
        let prepared = PreparedRsaKey::new(&der).expect("a 2048-bit key is prepared");
        let message = b"the signed attributes";
        let agree = |digest: DigestAlgorithm, signature: &[u8]| {
            let ours = prepared.verify(digest, message, signature).is_ok();
            let ring = digest.verify_rsa(&der, message, signature).is_ok();
            assert_eq!(ours, ring, "prepared and ring disagree");
            ours
        };
        for digest in [
            DigestAlgorithm::Sha1,
            DigestAlgorithm::Sha256,
            DigestAlgorithm::Sha512,
        ] {
            let good = encoding(digest, message);
            assert!(agree(digest, &raw_sign(&good)), "{digest:?}");
            // Signed, but another message or another digest.
            assert!(!agree(digest, &raw_sign(&encoding(digest, b"another"))));
            let other = match digest {
                DigestAlgorithm::Sha256 => DigestAlgorithm::Sha512,
                _ => DigestAlgorithm::Sha256,
            };
            assert!(!agree(digest, &raw_sign(&encoding(other, message))));
            // Each part of the encoding broken in turn.
            for (index, value) in [(1, 0x02), (2, 0x00), (100, 0xfe), (255, good[255] ^ 1)] {
                let mut bad = good.clone();
                bad[index] = value;
                assert!(!agree(digest, &raw_sign(&bad)), "byte {index}");
            }
            // The separator moved into the padding: too short a hash.
            let mut shifted = good.clone();
            shifted.remove(2);
            shifted.push(0);
            assert!(!agree(digest, &raw_sign(&shifted)));
            // A tampered signature, a short one, one not below the modulus.
            let mut tampered = raw_sign(&good);
            tampered[128] ^= 0x40;
            assert!(!agree(digest, &tampered));
            assert!(!agree(digest, &raw_sign(&good)[1..]));
            assert!(!agree(digest, &rsa.n().to_vec()));
            assert!(!agree(digest, &[0xff; 256]));
        }
        // SHA-256 DigestInfo without the NULL parameters (ring refuses it).
        let hash = DigestAlgorithm::Sha256.digest(message);
        let mut t = vec![
            0x30, 0x2f, 0x30, 0x0b, 0x06, 0x09, 0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02,
            0x01, 0x04, 0x20,
        ];
        t.extend_from_slice(&hash);
        let mut em = vec![0x00, 0x01];
        em.resize(256 - t.len() - 1, 0xff);
        em.push(0);
        em.extend_from_slice(&t);
        assert!(!agree(DigestAlgorithm::Sha256, &raw_sign(&em)));
    }

    /// Keys ring refuses are not prepared (they are then refused by ring as before).
    #[test]
    fn keys_ring_refuses_are_not_prepared() {
        let key = |n: &[u8], e: &[u8]| {
            tlv::build::sequence(&[&tlv::build::element(0x02, n), &tlv::build::element(0x02, e)])
        };
        let (_, rsa) = identity();
        let n = [&[0u8][..], &rsa.n().to_vec()].concat();
        assert!(PreparedRsaKey::new(&key(&n, &[1, 0, 1])).is_some());
        assert!(PreparedRsaKey::new(&key(&n, &[3])).is_some());
        for e in [
            &[1u8][..],
            &[2],
            &[0x01, 0x00, 0x00],
            &[0x02, 0, 0, 0, 1],
            &[0, 3],
        ] {
            assert!(PreparedRsaKey::new(&key(&n, e)).is_none(), "e = {e:?}");
        }
        // Not minimal, negative, even, 2040 bits, over 8192 bits.
        assert!(PreparedRsaKey::new(&key(&[&[0u8][..], &n].concat(), &[3])).is_none());
        assert!(PreparedRsaKey::new(&key(&n[1..], &[3])).is_none());
        let mut even = n.clone();
        *even.last_mut().unwrap() &= 0xfe;
        assert!(PreparedRsaKey::new(&key(&even, &[3])).is_none());
        let small = [&[0u8][..], &[0xff; 255][..]].concat();
        assert!(PreparedRsaKey::new(&key(&small, &[3])).is_none());
        let large = [&[0u8][..], &[0xff; 1025][..]].concat();
        assert!(PreparedRsaKey::new(&key(&large, &[3])).is_none());
        // Trailing bytes, a third integer.
        let mut trailing = key(&n, &[3]);
        trailing.push(0);
        assert!(PreparedRsaKey::new(&trailing).is_none());
        // What ring says of the same small key.
        let small_rsa = Rsa::generate(1024).unwrap();
        assert!(PreparedRsaKey::new(&public_der(&small_rsa)).is_none());
        let e3 = Rsa::generate_with_e(2048, &BigNum::from_u32(3).unwrap()).unwrap();
        assert!(PreparedRsaKey::new(&public_der(&e3)).is_some());
    }

    /// Through the whole detached verification: prepared or not, the same answers for the
    /// right body, another body and a tampered signature.
    #[test]
    fn detached_signatures_verify_the_same_with_a_prepared_key() {
        let (id, _) = identity();
        let body = b"<plist><dict><key>Status</key><string>Idle</string></dict></plist>";
        let plain = SignerKey::from_certificate(&id.certificate_der).unwrap();
        let mut prepared = plain.clone();
        assert!(prepared.prepare(&id.certificate_der));
        assert!(!plain.is_prepared());
        for digest in [DigestAlgorithm::Sha1, DigestAlgorithm::Sha256] {
            let signature = sign_detached(body, digest, id).unwrap();
            for key in [&plain, &prepared] {
                let (signer, _) =
                    verify_detached_with(&signature, body, &|_| Some(key.clone())).unwrap();
                assert_eq!(signer.certificate_der, id.certificate_der);
                let err = verify_detached_with(&signature, b"<plist/>", &|_| Some(key.clone()))
                    .unwrap_err();
                assert!(matches!(err, ScepError::BadSignature), "{err}");
                // The last byte of the DER is the signature value's.
                let mut tampered = signature.clone();
                *tampered.last_mut().unwrap() ^= 1;
                let err =
                    verify_detached_with(&tampered, body, &|_| Some(key.clone())).unwrap_err();
                assert!(matches!(err, ScepError::BadSignature), "{err}");
            }
        }
    }

    /// The DER fast path is taken only where normalising would change nothing: DER as signed,
    /// not the BER devices send, not a non-minimal length, and no mutation of either that
    /// `normalise` would rewrite.
    #[test]
    fn only_what_normalise_leaves_unchanged_skips_it() {
        let (id, _) = identity();
        let der = sign_detached(b"body", DigestAlgorithm::Sha256, id).unwrap();
        assert!(already_normal(&der));
        assert_eq!(tlv::normalise(&der).unwrap(), der);
        let ber = base64::engine::general_purpose::STANDARD
            .decode(
                include_str!("../../../tests/fixtures/apple-mdm/mdm-signature/header2.b64").trim(),
            )
            .unwrap();
        assert!(!already_normal(&ber));
        assert!(already_normal(&tlv::normalise(&ber).unwrap()));
        // A length in the long form where the short one fits.
        assert!(already_normal(&[0x04, 0x01, 0xaa]));
        assert!(!already_normal(&[0x04, 0x81, 0x01, 0xaa]));
        assert!(!already_normal(&[0x24, 0x03, 0x04, 0x01, 0xaa]));
        assert!(!already_normal(&[0x04, 0x01, 0xaa, 0x00]));
        // Every single-byte change and truncation of both: the fast path never disagrees.
        for input in [&der, &ber] {
            for mutated in tlv::single_byte_mutations(input) {
                if already_normal(&mutated) {
                    assert_eq!(tlv::normalise(&mutated).ok().as_ref(), Some(&mutated));
                }
            }
        }
    }
}
