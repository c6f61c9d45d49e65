//! A fleet written straight into the broker's database, as an MDM path needs it: for each
//! device an enrollment record, the device bound to it, its active device channel and an
//! identity certificate in the inventory (these very bytes). Enrolling 100,000 devices over
//! SCEP takes over 20 minutes on a small machine; this takes well under one. Every device
//! shares one RSA key (its certificate is its own); the certificates are issued by a
//! throwaway P-256 key, not the broker's CA: the broker recognises its certificates by the
//! inventory's bytes, serial and dates, never by re-checking its own signature on them.

use std::sync::Arc;

use openssl::asn1::Asn1Time;
use openssl::bn::BigNum;
use openssl::ec::{EcGroup, EcKey};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{PKey, Private};
use openssl::x509::{X509, X509Name};
use trustbroker::pki::scep::{CmsSigner, DigestAlgorithm, ScepError};

use crate::bench_db::{Db, insert};
use crate::on_db;

/// Devices per multi-row INSERT, and per transaction.
const ROWS_PER_INSERT: usize = 500;
const DEVICES_PER_TX: usize = 5_000;
const TOPIC: &str = "com.apple.mgmt.External.bench";

/// A device's identity: the shared key and its own certificate.
pub struct FleetIdentity {
    key: Arc<PKey<Private>>,
    certificate_der: Vec<u8>,
}

impl CmsSigner for FleetIdentity {
    fn certificate_der(&self) -> &[u8] {
        &self.certificate_der
    }

    fn sign(&self, digest: DigestAlgorithm, message: &[u8]) -> Result<Vec<u8>, ScepError> {
        let md = match digest {
            DigestAlgorithm::Sha1 => MessageDigest::sha1(),
            DigestAlgorithm::Sha256 => MessageDigest::sha256(),
            DigestAlgorithm::Sha512 => MessageDigest::sha512(),
        };
        let sign = || -> Result<Vec<u8>, openssl::error::ErrorStack> {
            let mut signer = openssl::sign::Signer::new(md, &self.key)?;
            signer.update(message)?;
            signer.sign_to_vec()
        };
        sign().map_err(|e| ScepError::Internal(e.to_string()))
    }
}

/// One generated device.
pub struct FleetDevice {
    pub udid: String,
    pub identity: FleetIdentity,
    serial: String,
    enrollment_id: String,
}

/// Makes `count` devices (certificates issued in memory, on every core).
pub fn make(count: usize) -> anyhow::Result<Vec<FleetDevice>> {
    let key = Arc::new(PKey::from_rsa(openssl::rsa::Rsa::generate(2048)?)?);
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1)?;
    let issuer_key = PKey::from_ec_key(EcKey::generate(&group)?)?;
    let mut issuer = X509Name::builder()?;
    issuer.append_entry_by_nid(Nid::COMMONNAME, "bench fleet issuer")?;
    let issuer = issuer.build();
    let prefix: u32 = u32::from_be_bytes(trustbroker::random::bytes::<4>()) | 0x1000_0000;
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let per_thread = count.div_ceil(threads.max(1)).max(1);
    let chunks: Vec<(usize, usize)> = (0..count)
        .step_by(per_thread)
        .map(|start| (start, (start + per_thread).min(count)))
        .collect();
    std::thread::scope(|scope| {
        let handles: Vec<_> = chunks
            .iter()
            .map(|&(start, end)| {
                let (key, issuer_key, issuer) = (&key, &issuer_key, &issuer);
                scope.spawn(move || -> anyhow::Result<Vec<FleetDevice>> {
                    (start..end)
                        .map(|i| device(i, prefix, key, issuer_key, issuer))
                        .collect()
                })
            })
            .collect();
        let mut devices = Vec::with_capacity(count);
        for handle in handles {
            let mut part = handle
                .join()
                .map_err(|_| anyhow::anyhow!("a certificate thread panicked"))??;
            devices.append(&mut part);
        }
        Ok(devices)
    })
}

fn device(
    i: usize,
    prefix: u32,
    key: &Arc<PKey<Private>>,
    issuer_key: &PKey<Private>,
    issuer: &X509Name,
) -> anyhow::Result<FleetDevice> {
    let serial_hex = format!("{prefix:08x}{i:016x}");
    let serial = BigNum::from_hex_str(&serial_hex)?;
    let udid = format!("FLEET-{prefix:08X}-{i:012}");
    let mut subject = X509Name::builder()?;
    subject.append_entry_by_nid(Nid::COMMONNAME, &udid)?;
    let subject = subject.build();
    let mut builder = X509::builder()?;
    builder.set_version(2)?;
    let serial_number = serial.to_asn1_integer()?;
    builder.set_serial_number(&serial_number)?;
    builder.set_issuer_name(issuer)?;
    builder.set_subject_name(&subject)?;
    builder.set_pubkey(key)?;
    // The same dates as the inventory row (see `write`).
    let (not_before, not_after) = (Asn1Time::days_from_now(0)?, Asn1Time::days_from_now(365)?);
    builder.set_not_before(&not_before)?;
    builder.set_not_after(&not_after)?;
    builder.sign(issuer_key, MessageDigest::sha256())?;
    let certificate_der = builder.build().to_der()?;
    Ok(FleetDevice {
        enrollment_id: format!("fleet-{prefix:08x}-{i}"),
        udid,
        identity: FleetIdentity {
            key: key.clone(),
            certificate_der,
        },
        serial: serial_hex.trim_start_matches('0').to_owned(),
    })
}

/// Writes the fleet into the broker's database: enrollment records, devices, active device
/// channels (push tokens, last seen now) and the certificates.
pub async fn write(db: &Db, devices: &[FleetDevice]) -> anyhow::Result<()> {
    let now = trustbroker::store::now();
    let not_before = now - chrono::Duration::minutes(5);
    let not_after = now + chrono::Duration::days(364);
    for batch in devices.chunks(DEVICES_PER_TX) {
        on_db!(db, |pool| {
            let mut tx = pool.begin().await?;
            for chunk in batch.chunks(ROWS_PER_INSERT) {
                let n = chunk.len();
                let sql = insert(
                    "enrollments (id, requested_by, created_at, status, udid, bound_at)",
                    n,
                    1,
                    2,
                    "(#0, 'bench', $1, 'active', #1, $1)",
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
                for d in chunk {
                    q = q.bind(&d.enrollment_id).bind(&d.udid);
                }
                q.execute(&mut *tx).await?;

                let sql = insert(
                    "mdm_devices (udid, enrollment_id, product_name, topic, authenticated_at, \
                     updated_at)",
                    n,
                    2,
                    2,
                    "(#0, #1, 'iPhone15,2', $2, $1, $1)",
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now).bind(TOPIC);
                for d in chunk {
                    q = q.bind(&d.udid).bind(&d.enrollment_id);
                }
                q.execute(&mut *tx).await?;

                let sql = insert(
                    "mdm_enrollments (id, udid, channel, push_token, push_magic, status, \
                     push_status, created_at, updated_at, last_seen_at)",
                    n,
                    1,
                    1,
                    "(#0, #0, 'device', 'bench-token', 'bench-magic', 'active', 'unknown', \
                     $1, $1, $1)",
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now);
                for d in chunk {
                    q = q.bind(&d.udid);
                }
                q.execute(&mut *tx).await?;

                let sql = insert(
                    "certificates (serial, enrollment_id, subject, not_before, not_after, \
                     status, transaction_id, sender_nonce, der, issued_at)",
                    n,
                    3,
                    4,
                    "(#0, #1, #2, $2, $3, 'valid', #1, 'bench', #3, $1)",
                );
                let mut q = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(now)
                    .bind(not_before)
                    .bind(not_after);
                for d in chunk {
                    q = q
                        .bind(&d.serial)
                        .bind(&d.enrollment_id)
                        .bind(format!("CN={}", d.udid))
                        .bind(&d.identity.certificate_der);
                }
                q.execute(&mut *tx).await?;
            }
            tx.commit().await?;
        });
    }
    Ok(())
}
