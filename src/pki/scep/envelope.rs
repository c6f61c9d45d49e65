//! CMS EnvelopedData with key transport (RSA PKCS#1 v1.5): opening the envelopes clients send
//! to the CA, sealing the ones the CA sends back. DES-CBC, DES-EDE3-CBC, AES-128-CBC and
//! AES-256-CBC, because that is what clients in the field send (RustCrypto's `cms` builder has
//! no DES at all and no decryption).

use cbc::cipher::block_padding::Pkcs7;
use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use const_oid::ObjectIdentifier;
use der::{Decode, Encode};
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::{Pkcs1v15Encrypt, RsaPrivateKey, RsaPublicKey};
use x509_cert::Certificate;

use super::tlv::{self, Tlv, build};
use super::{ContentCipher, ScepError, oids};

/// The decrypted content of an envelope, and the cipher it came in (the reply uses the same).
#[derive(Debug)]
pub struct Opened {
    pub content: Vec<u8>,
    pub cipher: ContentCipher,
}

fn malformed(what: &str) -> ScepError {
    ScepError::Malformed(what.to_string())
}

fn oid_of(tlv: &Tlv<'_>) -> Result<ObjectIdentifier, ScepError> {
    tlv.expect(0x06)?;
    ObjectIdentifier::from_bytes(tlv.value).map_err(|_| malformed("bad object identifier"))
}

/// Decrypts a ContentInfo(EnvelopedData) addressed to `recipient_cert_der` with `key`.
///
/// Every failure after the recipient matched is reported as `Undecryptable`, and RSA decryption
/// uses implicit rejection: the answer never tells which step failed (no padding oracle).
pub fn open_envelope(
    enveloped_data: &[u8],
    recipient_cert_der: &[u8],
    key: &RsaPrivateKey,
) -> Result<Opened, ScepError> {
    let normalised = tlv::normalise(enveloped_data)?;
    let content_info = tlv::read_exact(&normalised)?.children_of(0x30)?;
    let [content_type, content] = content_info.as_slice() else {
        return Err(malformed("ContentInfo must have two fields"));
    };
    if oid_of(content_type)? != oids::ENVELOPED_DATA {
        return Err(malformed("not an EnvelopedData"));
    }
    let inner = content.children_of(0xa0)?;
    let [enveloped] = inner.as_slice() else {
        return Err(malformed("[0] must hold one EnvelopedData"));
    };
    let fields = enveloped.children_of(0x30)?;
    let mut fields = fields.iter();
    let _version = fields.next().ok_or_else(|| malformed("no version"))?;
    let mut next = fields
        .next()
        .ok_or_else(|| malformed("no recipientInfos"))?;
    if next.tag == 0xa0 {
        // originatorInfo: not used by SCEP; skipped.
        next = fields
            .next()
            .ok_or_else(|| malformed("no recipientInfos"))?;
    }
    let recipients = next.children_of(0x31)?;
    let encrypted_content_info = fields
        .next()
        .ok_or_else(|| malformed("no encryptedContentInfo"))?
        .children_of(0x30)?;

    let ours = RecipientId::of(recipient_cert_der)?;
    let mut encrypted_key = None;
    for recipient in &recipients {
        // Only key transport (a plain SEQUENCE); [1] KeyAgreement and others are skipped.
        if recipient.tag != 0x30 {
            continue;
        }
        let parts = recipient.children()?;
        let [_version, rid, algorithm, key] = parts.as_slice() else {
            return Err(malformed("KeyTransRecipientInfo must have four fields"));
        };
        if !ours.matches(rid)? {
            continue;
        }
        let algorithm = algorithm.children_of(0x30)?;
        let algorithm = oid_of(algorithm.first().ok_or_else(|| malformed("algorithm"))?)?;
        if algorithm != oids::RSA_ENCRYPTION {
            return Err(ScepError::UnsupportedAlgorithm(format!(
                "key transport {algorithm}"
            )));
        }
        encrypted_key = Some(key.expect(0x04)?.value);
        break;
    }
    let encrypted_key = encrypted_key.ok_or(ScepError::WrongRecipient)?;

    let mut eci = encrypted_content_info.iter();
    let _content_type = eci.next().ok_or_else(|| malformed("no contentType"))?;
    let algorithm = eci
        .next()
        .ok_or_else(|| malformed("no contentEncryptionAlgorithm"))?
        .children_of(0x30)?;
    let cipher_oid = oid_of(algorithm.first().ok_or_else(|| malformed("algorithm"))?)?;
    let cipher = ContentCipher::from_oid(&cipher_oid)
        .ok_or_else(|| ScepError::UnsupportedAlgorithm(format!("content cipher {cipher_oid}")))?;
    let iv = algorithm
        .get(1)
        .ok_or_else(|| malformed("no IV"))?
        .expect(0x04)?
        .value;
    if iv.len() != cipher.block_len() {
        return Err(malformed("IV length does not fit the cipher"));
    }
    let ciphertext = match eci.next() {
        // [0] IMPLICIT OCTET STRING, primitive…
        Some(t) if t.tag == 0x80 => t.value.to_vec(),
        // …or constructed from segments (BER).
        Some(t) if t.tag == 0xa0 => {
            let mut joined = Vec::new();
            for part in t.children()? {
                joined.extend_from_slice(part.expect(0x04)?.value);
            }
            joined
        }
        _ => return Err(malformed("no encryptedContent")),
    };

    let content_key = key
        .decrypt(Pkcs1v15Encrypt, encrypted_key)
        .map_err(|_| ScepError::Undecryptable)?;
    let content = decrypt(cipher, &content_key, iv, &ciphertext)?;
    Ok(Opened { content, cipher })
}

/// Encrypts `content` to the holder of `recipient_cert_der` with `cipher`; returns the DER of
/// a ContentInfo(EnvelopedData).
pub fn seal_envelope(
    content: &[u8],
    recipient_cert_der: &[u8],
    cipher: ContentCipher,
) -> Result<Vec<u8>, ScepError> {
    let recipient = Certificate::from_der(recipient_cert_der)?;
    let tbs = recipient.tbs_certificate();
    let public_key =
        RsaPublicKey::from_pkcs1_der(&super::signed_data::rsa_public_key(recipient_cert_der)?)
            .map_err(|_| malformed("recipient RSA key"))?;
    let mut content_key = vec![0u8; cipher.key_len()];
    fill_random(&mut content_key);
    let mut iv = vec![0u8; cipher.block_len()];
    fill_random(&mut iv);
    let ciphertext = encrypt(cipher, &content_key, &iv, content)?;
    let mut rng = rsa::rand_core::UnwrapErr(getrandom::SysRng);
    let encrypted_key = public_key
        .encrypt(&mut rng, Pkcs1v15Encrypt, &content_key)
        .map_err(|e| ScepError::Internal(format!("RSA encryption: {e}")))?;

    let issuer_and_serial =
        build::sequence(&[&tbs.issuer().to_der()?, &tbs.serial_number().to_der()?]);
    let recipient_info = build::sequence(&[
        &build::small_integer(0),
        &issuer_and_serial,
        &build::algorithm_null(&oids::RSA_ENCRYPTION),
        &build::octet_string(&encrypted_key),
    ]);
    let encrypted_content_info = build::sequence(&[
        &build::oid(&oids::DATA),
        &build::sequence(&[&build::oid(&cipher.oid()), &build::octet_string(&iv)]),
        &build::element(0x80, &ciphertext),
    ]);
    let enveloped = build::sequence(&[
        &build::small_integer(0),
        &build::set_of(vec![recipient_info]),
        &encrypted_content_info,
    ]);
    Ok(build::sequence(&[
        &build::oid(&oids::ENVELOPED_DATA),
        &build::explicit(0, &enveloped),
    ]))
}

fn fill_random(buf: &mut [u8]) {
    getrandom::fill(buf).expect("the operating system's random number generator failed");
}

fn decrypt(
    cipher: ContentCipher,
    key: &[u8],
    iv: &[u8],
    ciphertext: &[u8],
) -> Result<Vec<u8>, ScepError> {
    fn run<C: BlockModeDecrypt + KeyIvInit>(
        key: &[u8],
        iv: &[u8],
        data: &[u8],
    ) -> Result<Vec<u8>, ScepError> {
        C::new_from_slices(key, iv)
            .map_err(|_| ScepError::Undecryptable)?
            .decrypt_padded_vec::<Pkcs7>(data)
            .map_err(|_| ScepError::Undecryptable)
    }
    if ciphertext.is_empty() || !ciphertext.len().is_multiple_of(cipher.block_len()) {
        return Err(ScepError::Undecryptable);
    }
    match cipher {
        ContentCipher::DesCbc => run::<cbc::Decryptor<des::Des>>(key, iv, ciphertext),
        ContentCipher::DesEde3Cbc => run::<cbc::Decryptor<des::TdesEde3>>(key, iv, ciphertext),
        ContentCipher::Aes128Cbc => run::<cbc::Decryptor<aes::Aes128>>(key, iv, ciphertext),
        ContentCipher::Aes256Cbc => run::<cbc::Decryptor<aes::Aes256>>(key, iv, ciphertext),
    }
}

fn encrypt(
    cipher: ContentCipher,
    key: &[u8],
    iv: &[u8],
    plaintext: &[u8],
) -> Result<Vec<u8>, ScepError> {
    fn run<C: BlockModeEncrypt + KeyIvInit>(
        key: &[u8],
        iv: &[u8],
        data: &[u8],
    ) -> Result<Vec<u8>, ScepError> {
        Ok(C::new_from_slices(key, iv)
            .map_err(|_| ScepError::Internal("content key length".into()))?
            .encrypt_padded_vec::<Pkcs7>(data))
    }
    match cipher {
        ContentCipher::DesCbc => run::<cbc::Encryptor<des::Des>>(key, iv, plaintext),
        ContentCipher::DesEde3Cbc => run::<cbc::Encryptor<des::TdesEde3>>(key, iv, plaintext),
        ContentCipher::Aes128Cbc => run::<cbc::Encryptor<aes::Aes128>>(key, iv, plaintext),
        ContentCipher::Aes256Cbc => run::<cbc::Encryptor<aes::Aes256>>(key, iv, plaintext),
    }
}

/// How a certificate is named in a RecipientInfo.
struct RecipientId {
    issuer: Vec<u8>,
    serial: Vec<u8>,
    subject_key_id: Option<Vec<u8>>,
}

impl RecipientId {
    fn of(certificate_der: &[u8]) -> Result<Self, ScepError> {
        use x509_cert::ext::pkix::SubjectKeyIdentifier;
        let cert = Certificate::from_der(certificate_der)?;
        let tbs = cert.tbs_certificate();
        Ok(RecipientId {
            issuer: tbs.issuer().to_der()?,
            serial: trim(tbs.serial_number().as_bytes()).to_vec(),
            subject_key_id: tbs
                .get_extension::<SubjectKeyIdentifier>()
                .ok()
                .flatten()
                .map(|(_, ski)| ski.0.as_bytes().to_vec()),
        })
    }

    fn matches(&self, rid: &Tlv<'_>) -> Result<bool, ScepError> {
        match rid.tag {
            0x30 => {
                let parts = rid.children()?;
                let [issuer, serial] = parts.as_slice() else {
                    return Err(malformed("IssuerAndSerialNumber"));
                };
                Ok(issuer.raw == self.issuer.as_slice() && trim(serial.value) == self.serial)
            }
            0x80 => Ok(self.subject_key_id.as_deref() == Some(rid.value)),
            _ => Ok(false),
        }
    }
}

fn trim(bytes: &[u8]) -> &[u8] {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    bytes.get(start..).unwrap_or_default()
}
