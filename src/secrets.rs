//! Secrets at rest: a 256-bit master key seals private keys and other secrets (AES-256-GCM)
//! before they reach the database.
//!
//! The master key comes from configuration (`secret_key`, base64 or hex of 32 bytes), or from
//! a key file, generated at first start as `<data-dir>/secret.key` (mode 0600). Every node of a
//! PostgreSQL deployment needs the same key; a node with another key fails at start with a
//! message saying so, instead of failing later on a device's request.
//!
//! Sealed values read `tbs1.<base64url(nonce ‖ ciphertext ‖ tag)>`. The purpose of a value
//! (e.g. `ca-key:ca`) is bound as associated data, so a sealed value moved to another column
//! or row does not open.

use std::fmt;
use std::io::Write;
use std::path::Path;

use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};

const PREFIX: &str = "tbs1.";

#[derive(Debug, thiserror::Error)]
pub enum SealError {
    #[error("sealed value is malformed")]
    Malformed,
    /// Wrong master key, wrong purpose, or tampered data: AES-GCM cannot tell which.
    #[error(
        "sealed value does not open with this master key (is secret_key the same on every node?)"
    )]
    WrongKey,
}

/// The master key. Clone-able handle; never printed.
#[derive(Clone)]
pub struct MasterKey {
    key: std::sync::Arc<LessSafeKey>,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    pub fn from_bytes(bytes: &[u8; 32]) -> MasterKey {
        // The only failure is a key of the wrong length, which the type rules out.
        #[allow(clippy::expect_used)]
        let unbound = UnboundKey::new(&AES_256_GCM, bytes).expect("AES-256 takes 32-byte keys");
        MasterKey {
            key: std::sync::Arc::new(LessSafeKey::new(unbound)),
        }
    }

    /// Parses 32 bytes given as base64 (standard or URL-safe) or 64 hex digits.
    pub fn parse(text: &str) -> anyhow::Result<MasterKey> {
        let text = text.trim();
        let bytes = if text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).ok()
        } else {
            STANDARD
                .decode(text)
                .or_else(|_| URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')))
                .ok()
        };
        match bytes.as_deref().map(<[u8; 32]>::try_from) {
            Some(Ok(key)) => Ok(MasterKey::from_bytes(&key)),
            _ => bail!("the secret key must be 32 bytes, as base64 or 64 hex digits"),
        }
    }

    /// Reads the key file at `path`, creating it with a fresh random key if it does not exist.
    pub fn load_or_create(path: &Path) -> anyhow::Result<MasterKey> {
        match std::fs::read_to_string(path) {
            Ok(text) => {
                MasterKey::parse(&text).with_context(|| format!("reading {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = crate::random::bytes::<32>();
                let mut file = crate::fsutil::create_with_mode(path, 0o600)?;
                writeln!(file, "{}", STANDARD.encode(key))?;
                file.sync_all()?;
                tracing::info!(path = %path.display(), "generated the master key for secrets at rest");
                Ok(MasterKey::from_bytes(&key))
            }
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Encrypts `plaintext` for storage, bound to `purpose`.
    pub fn seal(&self, purpose: &str, plaintext: &[u8]) -> String {
        let nonce_bytes = crate::random::bytes::<NONCE_LEN>();
        let mut buffer = plaintext.to_vec();
        // ring fails only for inputs past AES-GCM's 64 GiB limit, far beyond anything sealed.
        #[allow(clippy::expect_used)]
        self.key
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce_bytes),
                Aad::from(purpose.as_bytes()),
                &mut buffer,
            )
            .expect("AES-GCM sealing of an in-memory buffer does not fail");
        let mut out = nonce_bytes.to_vec();
        out.extend_from_slice(&buffer);
        format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(out))
    }

    /// Decrypts a value made by [`MasterKey::seal`] with the same `purpose`.
    pub fn open(&self, purpose: &str, sealed: &str) -> Result<Vec<u8>, SealError> {
        let encoded = sealed.strip_prefix(PREFIX).ok_or(SealError::Malformed)?;
        let raw = URL_SAFE_NO_PAD
            .decode(encoded)
            .map_err(|_| SealError::Malformed)?;
        if raw.len() < NONCE_LEN {
            return Err(SealError::Malformed);
        }
        let (nonce, ciphertext) = raw.split_at(NONCE_LEN);
        let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| SealError::Malformed)?;
        let mut buffer = ciphertext.to_vec();
        let plaintext = self
            .key
            .open_in_place(nonce, Aad::from(purpose.as_bytes()), &mut buffer)
            .map_err(|_| SealError::WrongKey)?;
        Ok(plaintext.to_vec())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_values_open_only_with_the_same_key_and_purpose() {
        let key = MasterKey::from_bytes(&[7; 32]);
        let sealed = key.seal("ca-key:ca", b"private");
        assert!(sealed.starts_with(PREFIX));
        assert_eq!(key.open("ca-key:ca", &sealed).unwrap(), b"private");
        assert!(matches!(
            key.open("ca-key:ra", &sealed),
            Err(SealError::WrongKey)
        ));
        let other = MasterKey::from_bytes(&[8; 32]);
        assert!(matches!(
            other.open("ca-key:ca", &sealed),
            Err(SealError::WrongKey)
        ));
        let mut tampered = sealed.clone();
        tampered.push('A');
        assert!(key.open("ca-key:ca", &tampered).is_err());
        assert!(matches!(
            key.open("ca-key:ca", "plain"),
            Err(SealError::Malformed)
        ));
    }

    #[test]
    fn keys_parse_from_base64_and_hex() {
        assert!(MasterKey::parse(&"ab".repeat(32)).is_ok());
        assert!(MasterKey::parse(&STANDARD.encode([1u8; 32])).is_ok());
        assert!(MasterKey::parse("too short").is_err());
        assert!(MasterKey::parse(&STANDARD.encode([1u8; 31])).is_err());
    }

    #[test]
    fn a_key_file_is_created_once_and_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret.key");
        let first = MasterKey::load_or_create(&path).unwrap();
        let sealed = first.seal("p", b"x");
        let again = MasterKey::load_or_create(&path).unwrap();
        assert_eq!(again.open("p", &sealed).unwrap(), b"x");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }
}
