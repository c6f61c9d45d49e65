//! CMS EnvelopedData with key transport (RSA PKCS#1 v1.5): opening the envelopes clients send
//! to the CA, sealing the ones the CA sends back. DES-CBC, DES-EDE3-CBC, AES-128-CBC and
//! AES-256-CBC, because that is what clients in the field send (RustCrypto's `cms` builder has
//! no DES at all and no decryption).

use cbc::cipher::block_padding::NoPadding;
use cbc::cipher::{BlockModeDecrypt, BlockModeEncrypt, KeyIvInit};
use const_oid::ObjectIdentifier;
use der::{Decode, Encode};
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq, ConstantTimeGreater};
use x509_cert::Certificate;

use super::key_transport::RsaDecryptionKey;
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

/// Which content ciphers a recipient accepts. Single DES (56-bit keys) only when legacy clients
/// are explicitly allowed; 3DES and AES always.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CipherPolicy {
    pub allow_single_des: bool,
}

impl CipherPolicy {
    /// Every cipher this module implements (the client side, reading the CA's replies).
    pub const ANY: CipherPolicy = CipherPolicy {
        allow_single_des: true,
    };

    pub fn accepts(self, cipher: ContentCipher) -> bool {
        cipher != ContentCipher::DesCbc || self.allow_single_des
    }
}

/// Decrypts a ContentInfo(EnvelopedData) addressed to `recipient_cert_der` with `key`.
/// No check that the content means anything: see [`open_envelope_with`].
pub fn open_envelope(
    enveloped_data: &[u8],
    recipient_cert_der: &[u8],
    key: &RsaDecryptionKey,
    policy: CipherPolicy,
) -> Result<Opened, ScepError> {
    let (content, cipher) =
        open_envelope_with(enveloped_data, recipient_cert_der, key, policy, |content| {
            Ok(content.to_vec())
        })?;
    Ok(Opened { content, cipher })
}

/// Decrypts a ContentInfo(EnvelopedData) addressed to `recipient_cert_der` with `key` and hands
/// the plaintext to `read`, which decides whether it is what the envelope should hold.
///
/// What is public (the structure, the recipient, the algorithms) may fail early, with its own
/// error. From the RSA key transport on there is one path and one error, `Undecryptable`,
/// whatever went wrong, decided only after all the work was done (no padding oracle):
/// - RSA PKCS#1 v1.5 uses implicit rejection ([`RsaDecryptionKey`]: OpenSSL's blinded,
///   constant-time RSA and the decoding of draft-irtf-cfrg-rsa-guidance), and a key that failed
///   or has the wrong length is replaced by a random one chosen in constant time, as TLS does
///   against Bleichenbacher: decryption then goes on as if it had succeeded;
/// - the CBC padding is checked in constant time and `read` runs whether it was valid or not,
///   on the content as the last byte delimits it, so a bad padding and a good padding around
///   content `read` refuses take the same steps over the same bytes.
pub fn open_envelope_with<T>(
    enveloped_data: &[u8],
    recipient_cert_der: &[u8],
    key: &RsaDecryptionKey,
    policy: CipherPolicy,
    read: impl FnOnce(&[u8]) -> Result<T, ScepError>,
) -> Result<(T, ContentCipher), ScepError> {
    let normalised = tlv::normalise(enveloped_data)?;
    let sealed = parse_envelope(&normalised, recipient_cert_der)?;
    let cipher = sealed.cipher;
    if !policy.accepts(cipher) {
        return Err(ScepError::UnsupportedAlgorithm(
            "single DES (allow it for legacy clients with scep_allow_single_des)".into(),
        ));
    }
    let content_key = transport_key(key, sealed.encrypted_key, cipher.key_len());
    let plain = decrypt_unpadded(cipher, &content_key, sealed.iv, &sealed.ciphertext)?;
    let (length, padding_ok) = pkcs7_length(&plain, cipher.block_len());
    let content = read(plain.get(..length).unwrap_or_default());
    match (bool::from(padding_ok), content) {
        (true, Ok(content)) => Ok((content, cipher)),
        _ => Err(ScepError::Undecryptable),
    }
}

/// The public parts of an EnvelopedData, once our RecipientInfo is found.
struct Sealed<'a> {
    encrypted_key: &'a [u8],
    cipher: ContentCipher,
    iv: &'a [u8],
    ciphertext: Vec<u8>,
}

fn parse_envelope<'a>(
    normalised: &'a [u8],
    recipient_cert_der: &[u8],
) -> Result<Sealed<'a>, ScepError> {
    let content_info = tlv::read_exact(normalised)?.children_of(0x30)?;
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
    // The length is public: refusing a ragged ciphertext here tells nothing about the key.
    if ciphertext.is_empty() || !ciphertext.len().is_multiple_of(cipher.block_len()) {
        return Err(ScepError::Undecryptable);
    }
    Ok(Sealed {
        encrypted_key,
        cipher,
        iv,
        ciphertext,
    })
}

/// The content-encryption key from the RSA key transport, or, when that fails in any way, a
/// random key of the same length, chosen without a branch on the outcome (RFC 5246 §7.4.7.1).
/// Implicit rejection already answers a bad padding with a synthetic message (the errors are
/// for public conditions only: a ciphertext of the wrong size, or not below the modulus); what
/// is left to hide is whether that message had the length the cipher needs.
fn transport_key(key: &RsaDecryptionKey, encrypted_key: &[u8], key_len: usize) -> Vec<u8> {
    let mut chosen = vec![0u8; key_len];
    fill_random(&mut chosen);
    let decrypted = key.decrypt(encrypted_key).unwrap_or_default();
    let fits = (decrypted.len() as u64).ct_eq(&(key_len as u64));
    for (i, byte) in chosen.iter_mut().enumerate() {
        let candidate = decrypted.get(i).copied().unwrap_or(0);
        byte.conditional_assign(&candidate, fits);
    }
    chosen
}

/// CBC decryption of whole blocks, the padding left in place.
fn decrypt_unpadded(
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
        // Lengths were checked against the cipher: neither step can fail.
        C::new_from_slices(key, iv)
            .map_err(|_| ScepError::Undecryptable)?
            .decrypt_padded_vec::<NoPadding>(data)
            .map_err(|_| ScepError::Undecryptable)
    }
    match cipher {
        ContentCipher::DesCbc => run::<cbc::Decryptor<des::Des>>(key, iv, ciphertext),
        ContentCipher::DesEde3Cbc => run::<cbc::Decryptor<des::TdesEde3>>(key, iv, ciphertext),
        ContentCipher::Aes128Cbc => run::<cbc::Decryptor<aes::Aes128>>(key, iv, ciphertext),
        ContentCipher::Aes256Cbc => run::<cbc::Decryptor<aes::Aes256>>(key, iv, ciphertext),
    }
}

/// The length of `plain` without its PKCS#7 padding, and whether the padding is valid, with
/// no branch and no memory access that depends on the bytes. When the padding is invalid the
/// length is still the one its last byte names (1 when that is out of range), so that what is
/// done with the content next does not depend on the validity either.
fn pkcs7_length(plain: &[u8], block_len: usize) -> (usize, Choice) {
    let last = plain.last().copied().unwrap_or(0);
    let block = u8::try_from(block_len).unwrap_or(u8::MAX);
    let in_range = !last.ct_eq(&0) & !last.ct_gt(&block);
    let mut valid = in_range & Choice::from(u8::from(plain.len() >= block_len));
    for i in 1..=block {
        let byte = plain
            .len()
            .checked_sub(usize::from(i))
            .and_then(|at| plain.get(at))
            .copied()
            .unwrap_or(0);
        let covered = !i.ct_gt(&last);
        valid &= !covered | byte.ct_eq(&last);
    }
    let padding = u8::conditional_select(&1, &last, in_range);
    (plain.len().saturating_sub(usize::from(padding)), valid)
}

/// Encrypts `content` (PKCS#7-padded) to the holder of `recipient_cert_der` with `cipher`; returns the DER of
/// a ContentInfo(EnvelopedData).
pub fn seal_envelope(
    content: &[u8],
    recipient_cert_der: &[u8],
    cipher: ContentCipher,
) -> Result<Vec<u8>, ScepError> {
    let block = cipher.block_len();
    let padding = block - content.len() % block;
    let mut padded = content.to_vec();
    padded.resize(content.len() + padding, u8::try_from(padding).unwrap_or(0));
    seal_envelope_unpadded(&padded, recipient_cert_der, cipher)
}

/// Like [`seal_envelope`], but `blocks` (whole cipher blocks) are encrypted as they are, with no
/// padding added: what a client with a broken padding sends. For tests.
pub fn seal_envelope_unpadded(
    blocks: &[u8],
    recipient_cert_der: &[u8],
    cipher: ContentCipher,
) -> Result<Vec<u8>, ScepError> {
    if blocks.is_empty() || !blocks.len().is_multiple_of(cipher.block_len()) {
        return Err(ScepError::Internal(
            "unpadded content must be whole blocks".into(),
        ));
    }
    let content = blocks;
    let recipient = Certificate::from_der(recipient_cert_der)?;
    let tbs = recipient.tbs_certificate();
    // OpenSSL's RSA encryption (PKCS#1 v1.5 padding from its CSPRNG): 28 µs with parsing the
    // key, against 69 µs for the `rsa` crate.
    let public_key = openssl::rsa::Rsa::public_key_from_der_pkcs1(
        &super::signed_data::rsa_public_key(recipient_cert_der)?,
    )
    .map_err(|_| malformed("recipient RSA key"))?;
    let mut content_key = vec![0u8; cipher.key_len()];
    fill_random(&mut content_key);
    let mut iv = vec![0u8; cipher.block_len()];
    fill_random(&mut iv);
    let ciphertext = encrypt(cipher, &content_key, &iv, content)?;
    let mut encrypted_key = vec![0u8; usize::try_from(public_key.size()).unwrap_or(0)];
    let written = public_key
        .public_encrypt(
            &content_key,
            &mut encrypted_key,
            openssl::rsa::Padding::PKCS1,
        )
        .map_err(|e| ScepError::Internal(format!("RSA encryption: {e}")))?;
    encrypted_key.truncate(written);

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
    crate::random::fill(buf);
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
            .encrypt_padded_vec::<NoPadding>(data))
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

#[cfg(test)]
mod tests {
    use super::pkcs7_length;

    /// The obvious, branching PKCS#7 check the constant-time one must agree with.
    fn reference(plain: &[u8], block: usize) -> Option<usize> {
        let last = usize::from(*plain.last()?);
        if last == 0 || last > block || last > plain.len() {
            return None;
        }
        plain[plain.len() - last..]
            .iter()
            .all(|b| usize::from(*b) == last)
            .then(|| plain.len() - last)
    }

    #[test]
    fn padding_is_checked_like_the_obvious_way() {
        for block in [8usize, 16] {
            for last in 0..=255u8 {
                for corrupt in 0..=block {
                    // Two blocks, the last `last` bytes set to `last`, one byte spoiled.
                    let mut plain = vec![0xa5u8; 2 * block];
                    let n = plain.len();
                    for b in plain.iter_mut().skip(n.saturating_sub(usize::from(last))) {
                        *b = last;
                    }
                    if corrupt > 0 {
                        plain[n - corrupt] ^= 0x40;
                    }
                    let (length, valid) = pkcs7_length(&plain, block);
                    match reference(&plain, block) {
                        Some(expected) => {
                            assert!(bool::from(valid), "{block} {last} {corrupt}");
                            assert_eq!(length, expected);
                        }
                        None => assert!(!bool::from(valid), "{block} {last} {corrupt}"),
                    }
                    // Valid or not, the length is the one the last byte names (1 when it
                    // names none), so what reads the content next does the same work.
                    let named = usize::from(plain[n - 1]);
                    let named = if (1..=block).contains(&named) {
                        named
                    } else {
                        1
                    };
                    assert_eq!(length, n - named);
                }
            }
        }
    }
}
