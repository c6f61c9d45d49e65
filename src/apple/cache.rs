//! Per-node caches of the MDM request path, so that a signed Idle with nothing queued reads no
//! database row (docs/architecture.md, "MDM request caches"):
//!
//! * **Certificate standing**, keyed by the SHA-256 of the presented certificate: that it is
//!   ours, these very bytes, valid, unrevoked, and which device and channels it speaks for. The
//!   signature over each body is still verified on every request; only what the store said
//!   about the certificate is remembered. Dates are checked again on every use.
//! * **Known idle channels**: channels whose queue was read empty.
//! * **Signer keys**, keyed the same way: what verifying an `Mdm-Signature` needs of the
//!   certificate it carries (how a SignerInfo names it, its public key), read from the
//!   certificate once instead of on every request; from a certificate's second request on, its
//!   RSA key is kept ready for verification too (for at most [`PREPARED_CAPACITY`] of them).
//!   A fact of the bytes alone: never stale.
//!
//! Each entry carries the stamp it was read under: the store's generation (bumped by triggers
//! in the transaction of every relevant change, whoever makes it; polled four times a second)
//! and this node's count of its own changes (bumped after each commits, so this node follows
//! at once). An entry is used only while both are unchanged and the generation was confirmed
//! within the last second, so a revocation, retirement, re-enrollment or check-out made on
//! any node holds here within a second, and a command queued anywhere is seen by the next
//! request after the poll that notices it. The stamp is taken *before* the read that fills an
//! entry: a change racing the read moves the generation past it, so a missed race costs an
//! extra read, never a stale answer. Only answers that let a request through are cached; a
//! cached standing that would refuse a request is read again before the refusal.
//!
//! Must not: speak HTTP, or decide anything the store has not said.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::identity::Standing;
use crate::pki::scep::SignerKey;
use crate::store::Store;

/// How often each node reads the generations.
const POLL: Duration = Duration::from_millis(250);
/// Entries are not used when the generations were not confirmed for this long (a stalled
/// poller or an unreachable database): changes on other nodes must hold within a second.
const MAX_STALENESS: Duration = Duration::from_millis(1000);
/// Entries per map before it is emptied (each standing is a few hundred bytes: ~40 MiB at
/// this size). A fleet larger than this works, with some requests going to the database.
const DEFAULT_CAPACITY: usize = 100_000;
/// Signer keys kept before that map is emptied: they spare a certificate parse, not a database
/// read; at 100,000 they cost ~19 MiB and saved no CPU in a fleet cycled uniformly, so fewer
/// (~2 MiB at most) serve the devices that speak often.
const SIGNER_CAPACITY: usize = 16_384;
/// Signer keys whose RSA key is kept ready for verification (`SignerKey::prepare`: ~1.5 KB
/// each, ~1.5 MiB at most), until the signer keys are emptied. Only certificates seen twice get
/// one, so that a large fleet cycled through does not spend them on devices heard from once.
pub const PREPARED_CAPACITY: usize = 1_024;

/// The key of a certificate: the SHA-256 of its DER bytes.
pub type CertificateKey = [u8; 32];

pub fn certificate_key(der: &[u8]) -> CertificateKey {
    let digest = ring::digest::digest(&ring::digest::SHA256, der);
    let mut key = [0u8; 32];
    key.copy_from_slice(digest.as_ref());
    key
}

/// What [`MdmCache::signer_key`] answers: what a certificate offers for verification, and the
/// certificate's key (so that the request does not hash it again).
#[derive(Clone, Debug)]
pub struct Signer {
    pub certificate: CertificateKey,
    pub key: SignerKey,
}

impl std::borrow::Borrow<SignerKey> for Signer {
    fn borrow(&self) -> &SignerKey {
        &self.key
    }
}

/// The signer keys, and how many of them are prepared.
#[derive(Default)]
struct Signers {
    map: HashMap<CertificateKey, SignerKey>,
    prepared: usize,
}

/// What an entry was read under: the store's generation as this node last confirmed it, and
/// this node's own changes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stamp {
    db: i64,
    local: u64,
}

#[derive(Clone)]
pub struct MdmCache {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    epoch: Instant,
    /// When (ms since `epoch`) a read of the generations last started that then succeeded.
    confirmed_ms: AtomicU64,
    identity_generation: AtomicI64,
    queue_generation: AtomicI64,
    standings: RwLock<HashMap<CertificateKey, (Stamp, Arc<Standing>)>>,
    idle: RwLock<HashMap<Box<str>, Stamp>>,
    signers: RwLock<Signers>,
    capacity: usize,
    /// At most this many signer keys are prepared ([`PREPARED_CAPACITY`]).
    prepared_capacity: usize,
}

impl MdmCache {
    pub fn new(store: Store) -> MdmCache {
        MdmCache::with_capacity(store, DEFAULT_CAPACITY)
    }

    pub fn with_capacity(store: Store, capacity: usize) -> MdmCache {
        MdmCache::with_capacities(store, capacity, PREPARED_CAPACITY)
    }

    fn with_capacities(store: Store, capacity: usize, prepared: usize) -> MdmCache {
        MdmCache {
            inner: Arc::new(Inner {
                store,
                epoch: Instant::now(),
                confirmed_ms: AtomicU64::new(0),
                identity_generation: AtomicI64::new(i64::MIN),
                queue_generation: AtomicI64::new(i64::MIN),
                standings: RwLock::new(HashMap::new()),
                idle: RwLock::new(HashMap::new()),
                signers: RwLock::new(Signers::default()),
                capacity: capacity.max(1),
                prepared_capacity: prepared,
            }),
        }
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn confirmed(&self) -> bool {
        let confirmed = self.inner.confirmed_ms.load(Ordering::Acquire);
        confirmed != 0
            && self.now_ms().saturating_sub(confirmed) <= MAX_STALENESS.as_millis() as u64
    }

    /// The stamp a certificate's standing read now would carry; `None` when the cache may not
    /// be used (generations not confirmed lately).
    pub fn identity_stamp(&self) -> Option<Stamp> {
        self.confirmed().then(|| Stamp {
            db: self.inner.identity_generation.load(Ordering::Acquire),
            local: self.inner.store.local_changes().identity(),
        })
    }

    /// The stamp a queue read now would carry (see [`MdmCache::identity_stamp`]).
    pub fn queue_stamp(&self) -> Option<Stamp> {
        self.confirmed().then(|| Stamp {
            db: self.inner.queue_generation.load(Ordering::Acquire),
            local: self.inner.store.local_changes().queue(),
        })
    }

    /// The standing remembered for `key`, if it is still current.
    pub fn standing(&self, key: &CertificateKey) -> Option<Arc<Standing>> {
        let stamp = self.identity_stamp()?;
        let map = self.inner.standings.read().ok()?;
        match map.get(key) {
            Some((at, standing)) if *at == stamp => Some(standing.clone()),
            _ => None,
        }
    }

    /// Remembers what the store said about a certificate, read under `stamp`.
    pub fn remember_standing(&self, key: CertificateKey, stamp: Stamp, standing: Arc<Standing>) {
        if let Ok(mut map) = self.inner.standings.write() {
            if map.len() >= self.inner.capacity && !map.contains_key(&key) {
                map.clear();
            }
            map.insert(key, (stamp, standing));
        }
    }

    /// Whether channel `id`'s queue is known to be empty now.
    pub fn known_idle(&self, id: &str) -> bool {
        let Some(stamp) = self.queue_stamp() else {
            return false;
        };
        self.inner
            .idle
            .read()
            .is_ok_and(|map| map.get(id) == Some(&stamp))
    }

    /// Channel `id`'s queue was read empty under `stamp`.
    pub fn note_idle(&self, id: &str, stamp: Stamp) {
        if let Ok(mut map) = self.inner.idle.write() {
            if let Some(at) = map.get_mut(id) {
                *at = stamp;
                return;
            }
            if map.len() >= self.inner.capacity {
                map.clear();
            }
            map.insert(id.into(), stamp);
        }
    }

    /// What a certificate offers for verifying signatures: remembered, or read from it now
    /// and remembered (`None`: not a certificate; never remembered). At its second sighting
    /// its key is prepared, while fewer than [`PREPARED_CAPACITY`] are.
    pub fn signer_key(&self, der: &[u8]) -> Option<Signer> {
        let certificate = certificate_key(der);
        let (found, may_prepare) = match self.inner.signers.read() {
            Ok(signers) => (
                signers.map.get(&certificate).cloned(),
                signers.prepared < self.inner.prepared_capacity,
            ),
            Err(_) => (None, false),
        };
        let key = match found {
            Some(key) if key.is_prepared() || !may_prepare => key,
            Some(mut key) => {
                if key.prepare(der)
                    && let Ok(mut signers) = self.inner.signers.write()
                    && signers.prepared < self.inner.prepared_capacity
                    && let Some(entry) = signers.map.get_mut(&certificate)
                    && !entry.is_prepared()
                {
                    *entry = key.clone();
                    signers.prepared += 1;
                }
                key
            }
            None => {
                let key = SignerKey::from_certificate(der).ok()?;
                if let Ok(mut signers) = self.inner.signers.write() {
                    let capacity = self.inner.capacity.min(SIGNER_CAPACITY);
                    if signers.map.len() >= capacity && !signers.map.contains_key(&certificate) {
                        signers.map.clear();
                        signers.prepared = 0;
                    }
                    signers
                        .map
                        .entry(certificate)
                        .or_insert_with(|| key.clone());
                }
                key
            }
        };
        Some(Signer { certificate, key })
    }

    /// How many signer keys are prepared (for the tests).
    pub fn prepared_signers(&self) -> usize {
        self.inner.signers.read().map_or(0, |s| s.prepared)
    }

    /// Entries in each map: standings, idle channels, signer keys (for the benchmarks and
    /// tests).
    pub fn sizes(&self) -> (usize, usize, usize) {
        (
            self.inner.standings.read().map_or(0, |m| m.len()),
            self.inner.idle.read().map_or(0, |m| m.len()),
            self.inner.signers.read().map_or(0, |s| s.map.len()),
        )
    }

    /// Reads the generations; what an older one stamped is dropped. Either way they are then
    /// confirmed as of the moment the read started.
    pub async fn refresh(&self) -> Result<(), crate::store::StoreError> {
        let started = self.now_ms().max(1);
        let generations = self.inner.store.mdm_generations().await?;
        let inner = &self.inner;
        let before = inner
            .identity_generation
            .fetch_max(generations.identity, Ordering::AcqRel);
        if before < generations.identity
            && let Ok(mut map) = inner.standings.write()
        {
            map.clear();
        }
        let before = inner
            .queue_generation
            .fetch_max(generations.queue, Ordering::AcqRel);
        if before < generations.queue
            && let Ok(mut map) = inner.idle.write()
        {
            map.clear();
        }
        inner.confirmed_ms.fetch_max(started, Ordering::AcqRel);
        Ok(())
    }

    /// Keeps the generations current until `stopped` turns true.
    pub fn spawn(self, mut stopped: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            loop {
                if let Err(e) = self.refresh().await {
                    tracing::warn!(error = %e, "MDM cache: could not read the generations; \
                        requests go to the database until it answers");
                }
                tokio::select! {
                    _ = tokio::time::sleep(POLL) => {}
                    _ = stopped.changed() => {}
                }
                if *stopped.borrow() {
                    return;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::scep::client::ClientIdentity;
    use crate::pki::scep::{DigestAlgorithm, ScepError, sign_detached, verify_detached_with};

    /// `count` certificates of one RSA key (key generation is the slow part), each its own.
    fn identities(count: usize) -> Vec<ClientIdentity> {
        let base = ClientIdentity::generate(2048).unwrap();
        let key_pair = rcgen::KeyPair::from_pkcs8_der_and_sign_algo(
            &rustls::pki_types::PrivatePkcs8KeyDer::from(base.pkcs8.clone()),
            &rcgen::PKCS_RSA_SHA256,
        )
        .unwrap();
        (0..count)
            .map(|i| {
                let mut params = rcgen::CertificateParams::default();
                params
                    .distinguished_name
                    .push(rcgen::DnType::CommonName, format!("device {i}"));
                let certificate = params.self_signed(&key_pair).unwrap();
                base.with_certificate(certificate.der().to_vec())
            })
            .collect()
    }

    /// A certificate's key is prepared at its second sighting, for at most the bound's worth
    /// of certificates; prepared or not, every body's signature is still verified; the answer
    /// carries the certificate's key.
    #[tokio::test]
    async fn signer_keys_are_prepared_from_the_second_sighting_within_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("t.db"), 1)
            .await
            .unwrap();
        let cache = MdmCache::with_capacities(store, 8, 2);
        let ids = identities(3);
        let body = b"<plist><dict/></plist>";
        let sighting = |id: &ClientIdentity| {
            let signer = cache.signer_key(&id.certificate_der).unwrap();
            assert_eq!(signer.certificate, certificate_key(&id.certificate_der));
            let signature = sign_detached(body, DigestAlgorithm::Sha256, id).unwrap();
            let lookup = |der: &[u8]| cache.signer_key(der);
            let (verified, used) = verify_detached_with(&signature, body, &lookup).unwrap();
            assert_eq!(verified.certificate_der, id.certificate_der);
            let err = verify_detached_with(&signature, b"<plist/>", &lookup).unwrap_err();
            assert!(matches!(err, ScepError::BadSignature), "{err}");
            (signer.key.is_prepared(), used.key.is_prepared())
        };
        // First sighting (then two more lookups in the same call): prepared from the second.
        assert_eq!(sighting(&ids[0]), (false, true));
        assert_eq!(cache.prepared_signers(), 1);
        assert_eq!(sighting(&ids[0]), (true, true));
        assert_eq!(cache.prepared_signers(), 1);
        assert_eq!(sighting(&ids[1]), (false, true));
        assert_eq!(cache.prepared_signers(), 2);
        // The bound is reached: the third certificate is verified without.
        assert_eq!(sighting(&ids[2]), (false, false));
        assert_eq!(sighting(&ids[2]), (false, false));
        assert_eq!(cache.prepared_signers(), 2);
        assert_eq!(cache.sizes().2, 3);
        // Not a certificate: no key, nothing remembered.
        assert!(cache.signer_key(b"not a certificate").is_none());
        assert_eq!(cache.sizes().2, 3);
    }
}
