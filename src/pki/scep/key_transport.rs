//! RSA key transport (PKCS#1 v1.5, RFC 8017 §7.2) for the envelopes the CA opens, without a
//! padding oracle: the raw RSA private operation through OpenSSL, then decoding with implicit
//! rejection as draft-irtf-cfrg-rsa-guidance §7 specifies it.
//!
//! Why by hand: OpenSSL's RSA private operation is constant-time (CRT with
//! `BN_FLG_CONSTTIME`), blinded, keeps its Montgomery contexts and blinding factors with the
//! key, and on CPUs with AVX-512 IFMA is about six times as fast as the `rsa` crate; but the
//! OpenSSL this runs against (3.0, Debian bookworm) answers a bad PKCS#1 v1.5 padding with an
//! error, which is Bleichenbacher's oracle, and gained implicit rejection only in 3.2. So
//! OpenSSL does the arithmetic (`RSA_NO_PADDING`) and this module the decoding: a bad padding
//! yields a synthetic message derived from the private key and the ciphertext (the same
//! construction as OpenSSL 3.2 and the `rsa` crate, checked against the draft's vectors),
//! chosen with no branch or memory access that depends on the padding.

use openssl::pkey::Private;
use openssl::rsa::{Padding, Rsa};
use ring::hmac;
use subtle::{Choice, ConditionallySelectable, ConstantTimeEq, ConstantTimeGreater};

use super::ScepError;

/// How many candidate lengths the synthetic message's length is chosen from (§7.2 step 3.2).
const LENGTH_CANDIDATES: usize = 128;

/// An RSA private key ready to open key transports: parsed once, its implicit-rejection key
/// derived once.
#[derive(Clone)]
pub struct RsaDecryptionKey {
    rsa: Rsa<Private>,
    /// k, the length of the modulus in bytes.
    size: usize,
    /// HMAC-SHA256 keyed with SHA256(I2OSP(d, k)) (§7.2 step 3.1): derives the key-derivation
    /// key of each ciphertext.
    rejection: hmac::Key,
}

impl std::fmt::Debug for RsaDecryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RsaDecryptionKey")
            .field("bits", &(self.size * 8))
            .finish_non_exhaustive()
    }
}

impl RsaDecryptionKey {
    /// The key in a PKCS#8 PrivateKeyInfo (DER).
    pub fn from_pkcs8(pkcs8: &[u8]) -> Result<Self, ScepError> {
        let key = openssl::pkey::PKey::private_key_from_pkcs8(pkcs8)
            .map_err(|_| ScepError::Internal("unreadable PKCS#8 key".into()))?;
        let rsa = key
            .rsa()
            .map_err(|_| ScepError::Internal("not an RSA key".into()))?;
        Self::from_rsa(rsa)
    }

    pub fn from_rsa(rsa: Rsa<Private>) -> Result<Self, ScepError> {
        let size = usize::try_from(rsa.size()).unwrap_or(0);
        // PKCS#1 v1.5 needs k ≥ 11; the PRF encodes bit lengths in 16 bits.
        if !(11..=8191).contains(&size) {
            return Err(ScepError::Internal(format!(
                "an RSA key of {size} bytes cannot decrypt"
            )));
        }
        let d = rsa
            .d()
            .to_vec_padded(i32::try_from(size).unwrap_or(i32::MAX))
            .map_err(|_| ScepError::Internal("private exponent wider than the modulus".into()))?;
        let d_hash = ring::digest::digest(&ring::digest::SHA256, &d);
        Ok(RsaDecryptionKey {
            rsa,
            size,
            rejection: hmac::Key::new(hmac::HMAC_SHA256, d_hash.as_ref()),
        })
    }

    /// k, the modulus length in bytes: the length of every ciphertext.
    pub fn size(&self) -> usize {
        self.size
    }

    /// RSAES-PKCS1-v1_5 decryption with implicit rejection: the message when the padding is
    /// valid, otherwise a synthetic message that only the holder of the key can predict, with
    /// nothing in the timing or the result to tell the two apart. The only errors are for
    /// public conditions: a ciphertext that is not k bytes, or not below the modulus.
    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Vec<u8>, ScepError> {
        let k = self.size;
        if ciphertext.len() != k {
            return Err(ScepError::Undecryptable);
        }
        // Step 2: EM = I2OSP(RSADP(K, c), k); OpenSSL refuses c ≥ n, which is public.
        let mut em = vec![0u8; k];
        let written = self
            .rsa
            .private_decrypt(ciphertext, &mut em, Padding::NONE)
            .map_err(|_| ScepError::Undecryptable)?;
        if written != k {
            return Err(ScepError::Undecryptable);
        }
        // Step 3: the alternative message AM and its length AL, whatever the padding.
        let (alternative, alternative_len) = self.alternative(ciphertext);
        // Step 4: check the padding; L is the length after the first zero separator.
        let (valid, len) = decode(&em);
        // Step 5: select in place, every byte of both buffers read either way.
        let length = u32::conditional_select(&u32::from(alternative_len), &len, valid);
        let invalid = !valid;
        for (byte, alternative) in em.iter_mut().zip(&alternative) {
            byte.conditional_assign(alternative, invalid);
        }
        // The length of the result may be public (§7.2 step 5): it no longer says which.
        let start = k.saturating_sub(usize::try_from(length).unwrap_or(k));
        Ok(em.get(start..).unwrap_or_default().to_vec())
    }

    /// AM = IRPRF(KDK, "message", k) and AL, from KDK = HMAC(DH, C) (§7.2 step 3).
    fn alternative(&self, ciphertext: &[u8]) -> (Vec<u8>, u16) {
        let kdk = hmac::sign(&self.rejection, ciphertext);
        let kdk = hmac::Key::new(hmac::HMAC_SHA256, kdk.as_ref());
        let mut message = vec![0u8; self.size];
        irprf(&kdk, b"message", &mut message);
        let mut candidates = [0u8; 2 * LENGTH_CANDIDATES];
        irprf(&kdk, b"length", &mut candidates);
        // k ≤ 8191 (checked when the key was made).
        let max_len = u16::try_from(self.size - 11).unwrap_or(0);
        (message, select_length(&candidates, max_len))
    }
}

/// IRPRF(KDK, label, length) of draft-irtf-cfrg-rsa-guidance §7.1: HMAC-SHA256 in counter mode
/// over I2OSP(i, 2) ‖ label ‖ I2OSP(8·length, 2), filling `out`.
fn irprf(kdk: &hmac::Key, label: &[u8], out: &mut [u8]) {
    // Callers pass at most 8191 bytes.
    let bits = u16::try_from(out.len() * 8).unwrap_or(0).to_be_bytes();
    for (i, chunk) in (0u16..).zip(out.chunks_mut(32)) {
        let mut context = hmac::Context::with_key(kdk);
        context.update(&i.to_be_bytes());
        context.update(label);
        context.update(&bits);
        let block = context.sign();
        for (byte, value) in chunk.iter_mut().zip(block.as_ref()) {
            *byte = *value;
        }
    }
}

/// AL (§7.2 step 3.3): of 128 big-endian 16-bit candidates, masked to the bit length of the
/// largest admissible length k − 11, the last that does not exceed it, or 0 when none does;
/// every candidate is looked at.
fn select_length(candidates: &[u8], max_len: u16) -> u16 {
    let mut mask = max_len;
    mask |= mask >> 1;
    mask |= mask >> 2;
    mask |= mask >> 4;
    mask |= mask >> 8;
    candidates.chunks_exact(2).fold(0u16, |chosen, pair| {
        let candidate = match pair {
            [high, low] => u16::from_be_bytes([*high, *low]) & mask,
            _ => 0,
        };
        u16::conditional_select(&chosen, &candidate, !candidate.ct_gt(&max_len))
    })
}

/// EME-PKCS1-v1_5 decoding (§7.2 step 4) in constant time: whether EM = 0x00 ‖ 0x02 ‖ PS ‖
/// 0x00 ‖ M with at least eight bytes of PS, and the length of M after the first zero byte
/// (0 when there is none). Every byte is read and no branch depends on any.
fn decode(em: &[u8]) -> (Choice, u32) {
    let first = em.first().copied().unwrap_or(1);
    let second = em.get(1).copied().unwrap_or(0);
    let mut valid = first.ct_eq(&0) & second.ct_eq(&2);
    let mut looking = Choice::from(1);
    let mut separator = 0u32;
    for (i, byte) in (0u32..).zip(em).skip(2) {
        let zero = byte.ct_eq(&0);
        separator.conditional_assign(&i, looking & zero);
        looking &= !zero;
    }
    // The separator at index ≥ 10: PS is at least eight bytes.
    valid &= !looking & separator.ct_gt(&9);
    let k = u32::try_from(em.len()).unwrap_or(0);
    let after = k.saturating_sub(separator).saturating_sub(1);
    (valid, u32::conditional_select(&0, &after, !looking))
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY_PEM: &str = include_str!("../../../tests/fixtures/scep/rsa-guidance-k2048.pem");
    const VECTORS: &str = include_str!("../../../tests/fixtures/scep/rsa-guidance-vectors.json");

    fn key() -> RsaDecryptionKey {
        RsaDecryptionKey::from_rsa(Rsa::private_key_from_pem(KEY_PEM.as_bytes()).unwrap()).unwrap()
    }

    /// Appendix B.1 of draft-irtf-cfrg-rsa-guidance (2048-bit key): valid ciphertexts decrypt
    /// to their message, every malformed one to the synthetic message the draft gives.
    #[test]
    fn the_drafts_vectors_decrypt_as_specified() {
        let vectors: serde_json::Value = serde_json::from_str(VECTORS).unwrap();
        let key = key();
        let cases = vectors["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 12);
        let mut synthetic = 0;
        for case in cases {
            let id = case["id"].as_str().unwrap();
            let ciphertext = hex::decode(case["ciphertext_hex"].as_str().unwrap()).unwrap();
            let expect = &case["expect"];
            let expected = if expect["empty"].as_bool() == Some(true) {
                Vec::new()
            } else if let Some(ascii) = expect["ascii"].as_str() {
                ascii.as_bytes().to_vec()
            } else {
                hex::decode(expect["hex"].as_str().unwrap()).unwrap()
            };
            // The raw decryption says whether the padding was valid; the API must not.
            let mut em = vec![0u8; key.size()];
            key.rsa
                .private_decrypt(&ciphertext, &mut em, Padding::NONE)
                .unwrap();
            let (valid, _) = decode(&em);
            assert_eq!(bool::from(valid), case["valid"].as_bool().unwrap(), "{id}");
            if !bool::from(valid) {
                synthetic += 1;
            }
            assert_eq!(key.decrypt(&ciphertext).unwrap(), expected, "{id}");
            // Deterministic: the same ciphertext always gives the same answer (blinding
            // changes nothing).
            assert_eq!(key.decrypt(&ciphertext).unwrap(), expected, "{id}");
        }
        assert_eq!(synthetic, 9);
    }

    /// Builds EM by hand and encrypts it raw, so that every kind of malformed padding can be
    /// produced: each one must come out as the synthetic message of its ciphertext, the one
    /// `alternative` derives, through the same path as a valid one.
    #[test]
    fn every_malformed_padding_gives_the_synthetic_message() {
        let key = key();
        let k = key.size();
        let message = b"a 32-byte content-encryption key";
        let valid_em = |ps_len: usize| {
            let mut em = vec![0x00, 0x02];
            em.extend(std::iter::repeat_n(0x5au8, ps_len));
            em.push(0);
            em.extend(std::iter::repeat_n(0x33u8, k - 3 - ps_len));
            em
        };
        let encrypt = |em: &[u8]| {
            assert_eq!(em.len(), k);
            let mut out = vec![0u8; k];
            key.rsa.public_encrypt(em, &mut out, Padding::NONE).unwrap();
            out
        };
        // Valid: the shortest PS allowed (8 bytes) and a usual one.
        let mut usual = vec![0x00, 0x02];
        usual.extend(std::iter::repeat_n(0x5au8, k - 3 - message.len()));
        usual.push(0);
        usual.extend_from_slice(message);
        let c = encrypt(&usual);
        assert_eq!(key.decrypt(&c).unwrap(), message);
        let shortest = valid_em(8);
        assert_eq!(key.decrypt(&encrypt(&shortest)).unwrap(), &shortest[11..]);
        // An empty message (the separator is the last byte) is valid too.
        let mut empty = vec![0x00, 0x02];
        empty.extend(std::iter::repeat_n(0x5au8, k - 3));
        empty.push(0);
        assert_eq!(key.decrypt(&encrypt(&empty)).unwrap(), Vec::<u8>::new());

        let mut malformed: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut m = usual.clone();
        m[0] = 1;
        malformed.push(("first byte not 0", m));
        let mut m = usual.clone();
        m[1] = 1;
        malformed.push(("block type 1", m));
        let mut m = usual.clone();
        m[1] = 0;
        malformed.push(("block type 0", m));
        let mut m = usual.clone();
        m[1] = 3;
        malformed.push(("block type 3", m));
        for ps_len in 0..8 {
            malformed.push(("PS shorter than 8 bytes", {
                let mut m = usual.clone();
                m[2 + ps_len] = 0;
                m
            }));
        }
        let mut m = usual.clone();
        for b in m.iter_mut().skip(2) {
            if *b == 0 {
                *b = 0x11;
            }
        }
        malformed.push(("no separator", m));
        for (what, em) in malformed {
            let c = encrypt(&em);
            let (alternative, alternative_len) = key.alternative(&c);
            let expected = &alternative[k - usize::from(alternative_len)..];
            let got = key.decrypt(&c).unwrap();
            assert_eq!(got, expected, "{what}");
            assert!(got.len() <= k - 11, "{what}");
            assert_ne!(got, message, "{what}");
        }
    }

    #[test]
    fn public_conditions_are_errors() {
        let key = key();
        let k = key.size();
        assert!(key.decrypt(&[]).is_err());
        assert!(key.decrypt(&vec![1u8; k - 1]).is_err());
        assert!(key.decrypt(&vec![1u8; k + 1]).is_err());
        // Not below the modulus.
        assert!(key.decrypt(&vec![0xffu8; k]).is_err());
    }

    #[test]
    fn decoding_agrees_with_the_obvious_way() {
        const K: usize = 32;
        for header in [[0u8, 2], [1, 2], [0, 1], [0, 0], [2, 0]] {
            for separator in 2..=K {
                for later_zero in [false, true] {
                    let mut em = [0x42u8; K];
                    em[..2].copy_from_slice(&header);
                    if separator < K {
                        em[separator] = 0;
                        if later_zero {
                            em[K - 1] = 0;
                        }
                    }
                    let (valid, len) = decode(&em);
                    let expected_valid = header == [0, 2] && (10..K).contains(&separator);
                    let expected_len = if separator < K { K - separator - 1 } else { 0 };
                    assert_eq!(bool::from(valid), expected_valid, "{header:?} {separator}");
                    assert_eq!(len as usize, expected_len, "{header:?} {separator}");
                }
            }
        }
    }

    #[test]
    fn the_synthetic_length_is_the_last_admissible_candidate() {
        let mut candidates = [0xffu8; 256];
        candidates[..2].copy_from_slice(&5u16.to_be_bytes());
        candidates[252..254].copy_from_slice(&20u16.to_be_bytes());
        assert_eq!(select_length(&candidates, 20), 20);
        // Masked to the bit length of the bound: 0x0105 & 0x1f = 5.
        candidates[252..254].copy_from_slice(&0x0105u16.to_be_bytes());
        assert_eq!(select_length(&candidates, 20), 5);
        candidates[..2].fill(0xff);
        candidates[252..254].fill(0xff);
        assert_eq!(select_length(&candidates, 20), 0);
        // k = 256: the largest admissible length is 245, the mask 0xff.
        let mut candidates = [0xffu8; 256];
        candidates[100..102].copy_from_slice(&0xabf5u16.to_be_bytes());
        assert_eq!(select_length(&candidates, 245), 245);
        candidates[100..102].copy_from_slice(&0xabf6u16.to_be_bytes());
        assert_eq!(select_length(&candidates, 245), 0);
    }
}
