//! The certificate authority: its keys (sealed at rest), creating or importing it, and
//! issuing device certificates under the issuance policy.
//!
//! RSA keys are generated with the `rsa` crate (ring cannot generate RSA keys). Every private
//! operation goes through OpenSSL, whose RSA is constant-time and blinded, and on this
//! project's CPUs (AVX-512 IFMA) 2.3× as fast as ring and 6× the `rsa` crate: signatures
//! (certificates through rcgen, CertReps, profiles) and SCEP envelope decryption, which uses
//! OpenSSL's raw RSA with our own implicit-rejection decoding (`pki::scep::RsaDecryptionKey`;
//! the OpenSSL 3.0 shipped by Debian has none) and a random key chosen in constant time when
//! that fails (`pki::scep::envelope`): no padding oracle on the CA key. Keys are parsed once,
//! at load; OpenSSL keeps their Montgomery contexts and blinding factors.

use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, Duration, Utc};
use der::{Decode, Encode};
use openssl::hash::MessageDigest;
use openssl::pkey::{PKey, Private};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rsa::RsaPrivateKey;
use rsa::pkcs8::EncodePrivateKey;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_cert::Certificate;

use super::scep::{CipherPolicy, CmsSigner, DigestAlgorithm, RsaDecryptionKey, ScepError};
use crate::config::PkiConfig;
use crate::secrets::MasterKey;
use crate::store::{CaKeyRow, EnrollmentRecord, SigningKeyRow, Store, StoreError};

/// How long a CA created by trustbroker is valid.
const CA_VALIDITY_DAYS: i64 = 3650;
/// Issued certificates start this much in the past, for devices whose clocks run behind.
const BACKDATE_MINUTES: i64 = 5;
/// The smallest RSA key a device certificate may carry.
pub const MIN_RSA_BITS: usize = 2048;

/// One key and its certificate, parsed once into what signs and what decrypts.
pub struct KeyMaterial {
    pub certificate_der: Vec<u8>,
    /// Signs CMS (CertReps, profiles) and, for the CA, certificates.
    pub signer: RsaSigner,
    /// The same key for envelope decryption.
    pub decryption_key: RsaDecryptionKey,
}

impl KeyMaterial {
    fn from_pkcs8(certificate_der: Vec<u8>, pkcs8: &[u8]) -> anyhow::Result<KeyMaterial> {
        let key = PKey::private_key_from_pkcs8(pkcs8).context("parsing the private key")?;
        let rsa = key.rsa().context("the key is not an RSA key")?;
        let bits = rsa.size() * 8;
        if !(2048..=8192).contains(&bits) {
            bail!("an RSA key of {bits} bits: CA and RA keys must have 2048 to 8192");
        }
        rsa.check_key()
            .ok()
            .filter(|ok| *ok)
            .ok_or_else(|| anyhow!("the RSA key is inconsistent"))?;
        let cert = Certificate::from_der(&certificate_der).context("parsing the certificate")?;
        let cert_spki = cert
            .tbs_certificate()
            .subject_public_key_info()
            .to_der()
            .context("encoding the certificate's public key")?;
        let key_spki = key
            .public_key_to_der()
            .context("encoding the key's public half")?;
        if cert_spki != key_spki {
            bail!("the private key does not belong to the certificate");
        }
        let public_pkcs1 = rsa
            .public_key_to_der_pkcs1()
            .context("encoding the RSA public key")?;
        let decryption_key =
            RsaDecryptionKey::from_rsa(rsa).map_err(|e| anyhow!("the key cannot decrypt: {e}"))?;
        Ok(KeyMaterial {
            certificate_der,
            signer: RsaSigner { key, public_pkcs1 },
            decryption_key,
        })
    }
}

/// An RSA private key signing PKCS#1 v1.5 through OpenSSL. Also rcgen's signer for the
/// certificates the CA issues.
#[derive(Clone)]
pub struct RsaSigner {
    key: PKey<Private>,
    /// RSAPublicKey (DER): what rcgen takes as an RSA key's public half.
    public_pkcs1: Vec<u8>,
}

impl RsaSigner {
    /// RSASSA-PKCS1-v1_5 over `message` with `digest`.
    pub fn sign_with(&self, digest: MessageDigest, message: &[u8]) -> Option<Vec<u8>> {
        let mut signer = openssl::sign::Signer::new(digest, &self.key).ok()?;
        signer.set_rsa_padding(openssl::rsa::Padding::PKCS1).ok()?;
        signer.update(message).ok()?;
        signer.sign_to_vec().ok()
    }
}

impl rcgen::PublicKeyData for RsaSigner {
    fn der_bytes(&self) -> &[u8] {
        &self.public_pkcs1
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        &rcgen::PKCS_RSA_SHA256
    }
}

impl rcgen::SigningKey for RsaSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        self.sign_with(MessageDigest::sha256(), message)
            .ok_or(rcgen::Error::RemoteKeyError)
    }
}

/// CMS signatures (CertReps, profiles) with this key.
impl CmsSigner for KeyMaterial {
    fn certificate_der(&self) -> &[u8] {
        &self.certificate_der
    }

    fn sign(&self, digest: DigestAlgorithm, message: &[u8]) -> Result<Vec<u8>, ScepError> {
        let digest = match digest {
            DigestAlgorithm::Sha256 => MessageDigest::sha256(),
            DigestAlgorithm::Sha512 => MessageDigest::sha512(),
            DigestAlgorithm::Sha1 => {
                return Err(ScepError::Internal(
                    "the CA does not sign with SHA-1".into(),
                ));
            }
        };
        self.signer
            .sign_with(digest, message)
            .ok_or_else(|| ScepError::Internal("RSA signing failed".into()))
    }
}

/// A certificate just signed, not yet recorded.
pub struct IssuedCertificate {
    pub der: Vec<u8>,
    /// Lower-case hex of the serial number, without leading zero bytes.
    pub serial: String,
    pub subject: String,
    pub not_before: DateTime<Utc>,
    pub not_after: DateTime<Utc>,
}

pub struct CertificateAuthority {
    pub ca: KeyMaterial,
    /// A separate registration authority, when configured: it receives the envelopes and signs
    /// the replies; the CA only signs certificates.
    pub ra: Option<KeyMaterial>,
    issuer: Issuer<'static, RsaSigner>,
    organization: String,
    validity: Duration,
    pub imported: bool,
    /// How SCEP requests to this CA are treated; configuration that travels with the keys.
    pub scep: ScepSettings,
}

/// The SCEP settings of a CA.
#[derive(Clone, Copy, Debug)]
pub struct ScepSettings {
    /// How long a certificate stays good after a RenewalReq replaced it.
    pub renewal_overlap: Duration,
    /// Which envelope ciphers are accepted (single DES only when allowed).
    pub ciphers: CipherPolicy,
}

impl ScepSettings {
    fn of(config: &PkiConfig) -> ScepSettings {
        ScepSettings {
            renewal_overlap: Duration::from_std(config.renewal_overlap)
                .unwrap_or_else(|_| Duration::hours(4)),
            ciphers: CipherPolicy {
                allow_single_des: config.allow_single_des,
            },
        }
    }
}

impl CertificateAuthority {
    /// Loads the CA from the database, creating it first if there is none.
    pub async fn load_or_create(
        store: &Store,
        master: &MasterKey,
        config: &PkiConfig,
    ) -> anyhow::Result<Arc<CertificateAuthority>> {
        if let Some(ca) = Self::load(store, master, config).await? {
            return Ok(ca);
        }
        let rows = tokio::task::spawn_blocking({
            let master = master.clone();
            let config = config.clone();
            move || generate(&master, &config)
        })
        .await
        .context("CA generation task")??;
        match store.insert_ca_keys(&rows).await {
            Ok(()) => tracing::info!(bits = config.ca_key_bits, "created the CA"),
            // Another node created one first: use theirs.
            Err(StoreError::Conflict(_)) => {}
            Err(e) => return Err(e.into()),
        }
        Self::load(store, master, config)
            .await?
            .ok_or_else(|| anyhow!("the CA vanished right after it was stored"))
    }

    /// Loads the CA from the database; `None` when there is none yet.
    pub async fn load(
        store: &Store,
        master: &MasterKey,
        config: &PkiConfig,
    ) -> anyhow::Result<Option<Arc<CertificateAuthority>>> {
        let rows = store.ca_keys().await?;
        let Some(ca_row) = rows.iter().find(|r| r.role == "ca") else {
            return Ok(None);
        };
        let open = |row: &CaKeyRow| -> anyhow::Result<KeyMaterial> {
            let pkcs8 = master
                .open(&purpose(&row.role), &row.sealed_key)
                .with_context(|| format!("opening the {} key", row.role))?;
            KeyMaterial::from_pkcs8(row.certificate.clone(), &pkcs8)
                .with_context(|| format!("loading the {} key", row.role))
        };
        let ca = open(ca_row)?;
        let ra = rows.iter().find(|r| r.role == "ra").map(open).transpose()?;
        let issuer =
            Issuer::from_ca_cert_der(&ca.certificate_der.clone().into(), ca.signer.clone())
                .map_err(|e| anyhow!("the CA certificate cannot issue: {e}"))?;
        Ok(Some(Arc::new(CertificateAuthority {
            ca,
            ra,
            issuer,
            organization: config.organization.clone(),
            validity: Duration::days(i64::from(config.cert_validity_days)),
            imported: ca_row.imported,
            scep: ScepSettings::of(config),
        })))
    }

    /// The key that SCEP clients encrypt to and that signs replies: the RA if there is one.
    pub fn scep_recipient(&self) -> &KeyMaterial {
        self.ra.as_ref().unwrap_or(&self.ca)
    }

    /// Signs a device certificate for `enrollment` over the public key `spki_der`. The subject
    /// and names come from the enrollment record, never from the request.
    pub fn issue(
        &self,
        spki_der: &[u8],
        enrollment: &EnrollmentRecord,
    ) -> anyhow::Result<IssuedCertificate> {
        let public_key = rcgen::SubjectPublicKeyInfo::from_der(spki_der)
            .map_err(|e| anyhow!("unusable public key: {e}"))?;
        let now = crate::store::now();
        let not_before = now - Duration::minutes(BACKDATE_MINUTES);
        let not_after = now + self.validity;
        let serial_bytes = crate::random::bytes::<16>();
        let mut params = CertificateParams::default();
        params.serial_number = Some(SerialNumber::from_slice(&serial_bytes));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, enrollment.id.clone());
        dn.push(DnType::OrganizationName, self.organization.clone());
        if let Some(user) = &enrollment.for_user {
            dn.push(DnType::OrganizationalUnitName, user.clone());
        }
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(
            format!("urn:trustbroker:enrollment:{}", enrollment.id)
                .try_into()
                .map_err(|e| anyhow!("enrollment URI: {e}"))?,
        )];
        params.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_time(not_before)?;
        params.not_after = to_time(not_after)?;
        let certificate = params
            .signed_by(&public_key, &self.issuer)
            .map_err(|e| anyhow!("signing the certificate: {e}"))?;
        let subject = match &enrollment.for_user {
            Some(user) => format!("CN={},O={},OU={user}", enrollment.id, self.organization),
            None => format!("CN={},O={}", enrollment.id, self.organization),
        };
        Ok(IssuedCertificate {
            der: certificate.der().to_vec(),
            serial: serial_hex(&serial_bytes),
            subject,
            not_before,
            not_after,
        })
    }
}

impl CertificateAuthority {
    /// The key that signs configuration profiles: created at first use (RSA-2048, certified
    /// by this CA for digital signatures only) and kept sealed like the CA's.
    pub async fn profile_signer(
        &self,
        store: &Store,
        master: &MasterKey,
    ) -> anyhow::Result<KeyMaterial> {
        const PURPOSE: &str = "profile-signer";
        if store.signing_key(PURPOSE).await?.is_none() {
            let pkcs8 = tokio::task::spawn_blocking(|| generate_rsa_pkcs8(2048))
                .await
                .context("key generation task")??;
            let certificate = self.issue_signing_certificate(&pkcs8, "Profile Signing")?;
            store
                .insert_signing_key(&SigningKeyRow {
                    purpose: PURPOSE.into(),
                    certificate,
                    sealed_key: master.seal(&purpose(PURPOSE), &pkcs8),
                    created_at: crate::store::now(),
                })
                .await?;
        }
        // Whichever node stored its key first, everyone uses that one.
        let row = store
            .signing_key(PURPOSE)
            .await?
            .ok_or_else(|| anyhow!("the profile signing key vanished"))?;
        let pkcs8 = master.open(&purpose(PURPOSE), &row.sealed_key)?;
        KeyMaterial::from_pkcs8(row.certificate, &pkcs8)
    }

    fn issue_signing_certificate(&self, pkcs8: &[u8], role: &str) -> anyhow::Result<Vec<u8>> {
        let key = rcgen_key(pkcs8)?;
        let now = crate::store::now();
        let mut params = CertificateParams::default();
        params.serial_number = Some(SerialNumber::from_slice(&crate::random::bytes::<16>()));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{} {role}", self.organization));
        dn.push(DnType::OrganizationName, self.organization.clone());
        params.distinguished_name = dn;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.is_ca = IsCa::ExplicitNoCa;
        params.use_authority_key_identifier_extension = true;
        params.not_before = to_time(now - Duration::minutes(BACKDATE_MINUTES))?;
        params.not_after = to_time(now + Duration::days(CA_VALIDITY_DAYS / 2))?;
        let certificate = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| anyhow!("signing the {role} certificate: {e}"))?;
        Ok(certificate.der().to_vec())
    }
}

/// Creates, checks and stores an existing CA (or an intermediate under an enterprise root),
/// with an optional RA. Refuses when a CA exists: replacing one strands every issued device.
pub async fn import(
    store: &Store,
    master: &MasterKey,
    ca_cert_pem: &str,
    ca_key_pem: &str,
    ra: Option<(&str, &str)>,
) -> anyhow::Result<()> {
    if store.ca_keys().await?.iter().any(|r| r.role == "ca") {
        bail!(
            "a CA already exists in this database; importing another would strand every device \
             it issued to"
        );
    }
    let (ca_der, ca_pkcs8) = parse_pem_pair(ca_cert_pem, ca_key_pem).context("the CA")?;
    check_is_ca(&ca_der)?;
    let mut rows = vec![row("ca", ca_der, &ca_pkcs8, master, true)?];
    if let Some((cert_pem, key_pem)) = ra {
        let (ra_der, ra_pkcs8) = parse_pem_pair(cert_pem, key_pem).context("the RA")?;
        rows.push(row("ra", ra_der, &ra_pkcs8, master, true)?);
    }
    store.insert_ca_keys(&rows).await?;
    Ok(())
}

/// A PEM certificate and its RSA key (PKCS#8 or PKCS#1): the certificate's DER and the key as
/// PKCS#8, after checking that the key belongs to the certificate.
pub fn parse_pem_pair(cert_pem: &str, key_pem: &str) -> anyhow::Result<(Vec<u8>, Vec<u8>)> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .context("reading the certificate PEM")?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("reading the key PEM")?;
    // Normalise PKCS#1 ("BEGIN RSA PRIVATE KEY") to PKCS#8, which the key store keeps.
    let pkcs8 = match &key {
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        PrivateKeyDer::Pkcs1(k) => {
            use rsa::pkcs1::DecodeRsaPrivateKey;
            RsaPrivateKey::from_pkcs1_der(k.secret_pkcs1_der())
                .context("parsing the PKCS#1 RSA key")?
                .to_pkcs8_der()
                .context("re-encoding the key")?
                .as_bytes()
                .to_vec()
        }
        _ => bail!("the key must be RSA (PKCS#8 or PKCS#1 PEM)"),
    };
    KeyMaterial::from_pkcs8(cert.to_vec(), &pkcs8)?;
    Ok((cert.to_vec(), pkcs8))
}

fn check_is_ca(der: &[u8]) -> anyhow::Result<()> {
    use x509_cert::ext::pkix::{BasicConstraints as Bc, KeyUsage};
    let cert = Certificate::from_der(der)?;
    let basic: Option<Bc> = cert
        .tbs_certificate()
        .get_extension::<Bc>()
        .ok()
        .flatten()
        .map(|(_, bc)| bc);
    if !basic.is_some_and(|bc| bc.ca) {
        bail!("the certificate is not a CA (basicConstraints cA is not true)");
    }
    let usage: Option<KeyUsage> = cert
        .tbs_certificate()
        .get_extension::<KeyUsage>()
        .ok()
        .flatten()
        .map(|(_, ku)| ku);
    if usage.is_some_and(|ku| !ku.key_cert_sign()) {
        bail!("the CA certificate's key usage does not allow keyCertSign");
    }
    Ok(())
}

/// Generates a CA (and RA when configured): RSA keys, self-signed CA certificate.
fn generate(master: &MasterKey, config: &PkiConfig) -> anyhow::Result<Vec<CaKeyRow>> {
    let ca_pkcs8 = generate_rsa_pkcs8(config.ca_key_bits)?;
    let ca_key = rcgen_key(&ca_pkcs8)?;
    let now = crate::store::now();
    let mut params = CertificateParams::default();
    params.serial_number = Some(SerialNumber::from_slice(&crate::random::bytes::<16>()));
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, config.ca_common_name.clone());
    dn.push(DnType::OrganizationName, config.organization.clone());
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = to_time(now - Duration::minutes(BACKDATE_MINUTES))?;
    params.not_after = to_time(now + Duration::days(CA_VALIDITY_DAYS))?;
    let ca_cert = params
        .self_signed(&ca_key)
        .map_err(|e| anyhow!("signing the CA certificate: {e}"))?;
    let mut rows = vec![row("ca", ca_cert.der().to_vec(), &ca_pkcs8, master, false)?];
    if config.with_ra {
        let ra_pkcs8 = generate_rsa_pkcs8(config.ca_key_bits)?;
        let ra_key = rcgen_key(&ra_pkcs8)?;
        let issuer = Issuer::new(params, ca_key);
        let mut ra = CertificateParams::default();
        ra.serial_number = Some(SerialNumber::from_slice(&crate::random::bytes::<16>()));
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("{} RA", config.ca_common_name));
        dn.push(DnType::OrganizationName, config.organization.clone());
        ra.distinguished_name = dn;
        ra.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        ra.is_ca = IsCa::ExplicitNoCa;
        ra.use_authority_key_identifier_extension = true;
        ra.not_before = to_time(now - Duration::minutes(BACKDATE_MINUTES))?;
        ra.not_after = to_time(now + Duration::days(CA_VALIDITY_DAYS))?;
        let ra_cert = ra
            .signed_by(&ra_key, &issuer)
            .map_err(|e| anyhow!("signing the RA certificate: {e}"))?;
        rows.push(row("ra", ra_cert.der().to_vec(), &ra_pkcs8, master, false)?);
    }
    Ok(rows)
}

fn row(
    role: &str,
    certificate: Vec<u8>,
    pkcs8: &[u8],
    master: &MasterKey,
    imported: bool,
) -> anyhow::Result<CaKeyRow> {
    Ok(CaKeyRow {
        role: role.to_string(),
        certificate,
        sealed_key: master.seal(&purpose(role), pkcs8),
        imported,
        created_at: crate::store::now(),
    })
}

/// The associated data a sealed key is bound to.
fn purpose(role: &str) -> String {
    format!("ca-key:{role}")
}

pub fn generate_rsa_pkcs8(bits: usize) -> anyhow::Result<Vec<u8>> {
    let mut rng = rsa::rand_core::UnwrapErr(getrandom::SysRng);
    let key = RsaPrivateKey::new(&mut rng, bits).context("generating an RSA key")?;
    Ok(key
        .to_pkcs8_der()
        .context("encoding the RSA key")?
        .as_bytes()
        .to_vec())
}

fn rcgen_key(pkcs8: &[u8]) -> anyhow::Result<KeyPair> {
    KeyPair::from_pkcs8_der_and_sign_algo(
        &PrivatePkcs8KeyDer::from(pkcs8.to_vec()),
        &rcgen::PKCS_RSA_SHA256,
    )
    .map_err(|e| anyhow!("the RSA key cannot sign: {e}"))
}

fn to_time(at: DateTime<Utc>) -> anyhow::Result<time::OffsetDateTime> {
    time::OffsetDateTime::from_unix_timestamp(at.timestamp()).context("time out of range")
}

/// Lower-case hex of a serial number's integer value (no leading zero bytes).
pub fn serial_hex(bytes: &[u8]) -> String {
    let start = bytes.iter().position(|b| *b != 0).unwrap_or(bytes.len());
    let trimmed = bytes.get(start..).unwrap_or_default();
    if trimmed.is_empty() {
        "00".into()
    } else {
        hex::encode(trimmed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_are_normalised() {
        assert_eq!(serial_hex(&[0, 0, 0x1a, 0xff]), "1aff");
        assert_eq!(serial_hex(&[0x80, 1]), "8001");
        assert_eq!(serial_hex(&[0, 0]), "00");
    }
}
