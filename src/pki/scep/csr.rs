//! PKCS#10 certification requests as SCEP clients send them: self-signature checked (SHA-1,
//! SHA-256 or SHA-512 with RSA; rcgen cannot read SHA-1 requests), challengePassword read.

use const_oid::ObjectIdentifier;

use super::tlv::{self, Tlv};
use super::{DigestAlgorithm, ScepError, oids};

/// The smallest RSA modulus whose request is even verified (policy may ask for more).
const MIN_VERIFIABLE_BITS: usize = 2048;

#[derive(Clone, Debug)]
pub struct CertificationRequest {
    pub der: Vec<u8>,
    /// The subject Name (DER), for logs only: issuance takes names from the enrollment.
    pub subject_der: Vec<u8>,
    /// SubjectPublicKeyInfo (DER).
    pub public_key_der: Vec<u8>,
    /// Modulus size, when the key is RSA.
    pub rsa_key_bits: Option<usize>,
    pub challenge_password: Option<String>,
}

fn malformed(what: &str) -> ScepError {
    ScepError::Malformed(format!("certification request: {what}"))
}

fn oid_of(tlv: &Tlv<'_>) -> Result<ObjectIdentifier, ScepError> {
    tlv.expect(0x06)?;
    ObjectIdentifier::from_bytes(tlv.value).map_err(|_| malformed("bad object identifier"))
}

/// Parses a DER PKCS#10 request and verifies its self-signature.
pub fn parse_csr(der: &[u8]) -> Result<CertificationRequest, ScepError> {
    let request = tlv::read_exact(der)?.children_of(0x30)?;
    let [info, algorithm, signature] = request.as_slice() else {
        return Err(malformed("must have three fields"));
    };
    let info_fields = info.children_of(0x30)?;
    let [_version, subject, spki, rest @ ..] = info_fields.as_slice() else {
        return Err(malformed("CertificationRequestInfo is incomplete"));
    };
    subject.expect(0x30)?;
    let spki_fields = spki.children_of(0x30)?;
    let [key_algorithm, key_bits] = spki_fields.as_slice() else {
        return Err(malformed("SubjectPublicKeyInfo"));
    };
    let key_algorithm = oid_of(
        key_algorithm
            .children_of(0x30)?
            .first()
            .ok_or_else(|| malformed("key algorithm"))?,
    )?;
    let public_key = bit_string(key_bits)?;
    let rsa_key_bits = if key_algorithm == oids::RSA_ENCRYPTION {
        Some(modulus_bits(public_key)?)
    } else {
        None
    };

    let signature_oid = oid_of(
        algorithm
            .children_of(0x30)?
            .first()
            .ok_or_else(|| malformed("signature algorithm"))?,
    )?;
    let digest = DigestAlgorithm::from_rsa_signature_oid(&signature_oid)
        .ok_or_else(|| ScepError::UnsupportedAlgorithm(format!("CSR signature {signature_oid}")))?;
    match rsa_key_bits {
        Some(bits) if bits >= MIN_VERIFIABLE_BITS => {}
        Some(bits) => {
            return Err(ScepError::Rejected(format!(
                "RSA key of {bits} bits; at least {MIN_VERIFIABLE_BITS} are required"
            )));
        }
        None => {
            return Err(ScepError::UnsupportedAlgorithm(format!(
                "key {key_algorithm}"
            )));
        }
    }
    digest.verify_rsa(public_key, info.raw, bit_string(signature)?)?;

    let mut challenge_password = None;
    if let Some(attributes) = rest.first() {
        for attribute in attributes.children_of(0xa0)? {
            let parts = attribute.children_of(0x30)?;
            let [kind, values] = parts.as_slice() else {
                return Err(malformed("attribute"));
            };
            if oid_of(kind)? != oids::CHALLENGE_PASSWORD {
                continue;
            }
            let values = values.children_of(0x31)?;
            let [value] = values.as_slice() else {
                return Err(malformed("challengePassword needs one value"));
            };
            // DirectoryString: PrintableString, UTF8String, IA5String or TeletexString.
            if ![0x13, 0x0c, 0x16, 0x14].contains(&value.tag) {
                return Err(malformed("challengePassword is not a string"));
            }
            let text = String::from_utf8(value.value.to_vec())
                .map_err(|_| malformed("challengePassword is not text"))?;
            challenge_password = Some(text);
        }
    }
    Ok(CertificationRequest {
        der: der.to_vec(),
        subject_der: subject.raw.to_vec(),
        public_key_der: spki.raw.to_vec(),
        rsa_key_bits,
        challenge_password,
    })
}

/// The bytes of a BIT STRING with no unused bits.
fn bit_string<'a>(tlv: &Tlv<'a>) -> Result<&'a [u8], ScepError> {
    match tlv.expect(0x03)?.value.split_first() {
        Some((0, bits)) => Ok(bits),
        _ => Err(malformed("BIT STRING with unused bits")),
    }
}

/// The size in bits of the modulus of an RSAPublicKey.
fn modulus_bits(rsa_public_key: &[u8]) -> Result<usize, ScepError> {
    let parts = tlv::read_exact(rsa_public_key)?.children_of(0x30)?;
    let modulus = parts
        .first()
        .ok_or_else(|| malformed("RSA modulus"))?
        .expect(0x02)?
        .value;
    let start = modulus
        .iter()
        .position(|b| *b != 0)
        .unwrap_or(modulus.len());
    let significant = modulus.get(start..).unwrap_or_default();
    Ok(match significant.first() {
        Some(first) => (significant.len() - 1) * 8 + (8 - first.leading_zeros() as usize),
        None => 0,
    })
}
