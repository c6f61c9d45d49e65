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
//!
//! The CA's own key may instead be ECDSA P-256 (`ca_key_algorithm = "ecdsa-p256"`, or an
//! imported P-256 CA): it then only signs certificates (ecdsa-with-SHA256, through OpenSSL),
//! and an RSA RA, which it certifies, receives the envelopes and signs the CertReps, since SCEP
//! key transport is RSA. Such a CA without an RA is refused at creation, import and load.

use std::sync::Arc;

use anyhow::{Context, anyhow, bail};
use chrono::{DateTime, Duration, Utc};
use der::{Decode, Encode};
use openssl::bn::BigNumContext;
use openssl::ec::{EcGroup, EcKey, PointConversionForm};
use openssl::hash::MessageDigest;
use openssl::nid::Nid;
use openssl::pkey::{Id, PKey, Private};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rsa::RsaPrivateKey;
use rsa::pkcs8::EncodePrivateKey;
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use x509_cert::Certificate;

use super::scep::{CipherPolicy, CmsSigner, DigestAlgorithm, RsaDecryptionKey, ScepError};
use crate::config::{CaKeyAlgorithm, PkiConfig};
use crate::secrets::MasterKey;
use crate::store::{CaKeyRow, EnrollmentRecord, SigningKeyRow, Store, StoreError};

/// How long a CA created by trustbroker is valid.
const CA_VALIDITY_DAYS: i64 = 3650;
/// Issued certificates start this much in the past, for devices whose clocks run behind.
const BACKDATE_MINUTES: i64 = 5;
/// The smallest RSA key a device certificate may carry.
pub const MIN_RSA_BITS: usize = 2048;

/// What refuses a P-256 CA without an RA, wherever that is found.
const EC_CA_NEEDS_RA: &str = "an ECDSA P-256 CA needs an RSA RA: SCEP clients (Apple devices \
     among them) encrypt their requests to an RSA key, which the RA holds; give the RA's \
     certificate and key too (trustbroker ca import --ra-cert RA.pem --ra-key RA.key)";

/// One RSA key and its certificate, parsed once into what signs and what decrypts.
#[derive(Clone)]
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
        Self::from_key(certificate_der, key)
    }

    fn from_key(certificate_der: Vec<u8>, key: PKey<Private>) -> anyhow::Result<KeyMaterial> {
        let signer = RsaSigner::from_key(key)?;
        check_belongs(&certificate_der, &signer.key)?;
        let rsa = signer.key.rsa().context("the key is not an RSA key")?;
        let decryption_key =
            RsaDecryptionKey::from_rsa(rsa).map_err(|e| anyhow!("the key cannot decrypt: {e}"))?;
        Ok(KeyMaterial {
            certificate_der,
            signer,
            decryption_key,
        })
    }
}

/// Whether `key` is the private half of the public key `certificate_der` carries.
fn check_belongs(certificate_der: &[u8], key: &PKey<Private>) -> anyhow::Result<()> {
    let cert = Certificate::from_der(certificate_der).context("parsing the certificate")?;
    let cert_spki = cert
        .tbs_certificate()
        .subject_public_key_info()
        .to_der()
        .context("encoding the certificate's public key")?;
    let cert_key =
        PKey::public_key_from_der(&cert_spki).context("reading the certificate's public key")?;
    if !cert_key.public_eq(key) {
        bail!("the private key does not belong to the certificate");
    }
    Ok(())
}

/// An RSA private key signing PKCS#1 v1.5 through OpenSSL: CMS (CertReps, profiles) and, as
/// [`CaSigner::Rsa`], the certificates an RSA CA issues.
#[derive(Clone)]
pub struct RsaSigner {
    key: PKey<Private>,
    /// RSAPublicKey (DER): what rcgen takes as an RSA key's public half.
    public_pkcs1: Vec<u8>,
}

impl RsaSigner {
    fn from_key(key: PKey<Private>) -> anyhow::Result<RsaSigner> {
        let rsa = key.rsa().context("the key is not an RSA key")?;
        let bits = rsa.size() * 8;
        if !(2048..=8192).contains(&bits) {
            bail!("an RSA key of {bits} bits: CA and RA keys must have 2048 to 8192");
        }
        rsa.check_key()
            .ok()
            .filter(|ok| *ok)
            .ok_or_else(|| anyhow!("the RSA key is inconsistent"))?;
        let public_pkcs1 = rsa
            .public_key_to_der_pkcs1()
            .context("encoding the RSA public key")?;
        Ok(RsaSigner { key, public_pkcs1 })
    }

    /// RSASSA-PKCS1-v1_5 over `message` with `digest`.
    pub fn sign_with(&self, digest: MessageDigest, message: &[u8]) -> Option<Vec<u8>> {
        let mut signer = openssl::sign::Signer::new(digest, &self.key).ok()?;
        signer.set_rsa_padding(openssl::rsa::Padding::PKCS1).ok()?;
        signer.update(message).ok()?;
        signer.sign_to_vec().ok()
    }
}

/// An ECDSA P-256 private key signing with SHA-256 through OpenSSL (constant-time P-256; the
/// signature DER-encoded as ECDSA-Sig-Value, as X.509 wants). Only ever rcgen's signer for the
/// certificates a P-256 CA issues: it signs no CMS.
#[derive(Clone)]
pub struct EcdsaP256Signer {
    key: PKey<Private>,
    /// The uncompressed point: what rcgen takes as an EC key's public half.
    public_point: Vec<u8>,
}

impl EcdsaP256Signer {
    fn from_key(key: PKey<Private>) -> anyhow::Result<EcdsaP256Signer> {
        let ec = key.ec_key().context("the key is not an EC key")?;
        let group = ec.group();
        match group.curve_name() {
            Some(Nid::X9_62_PRIME256V1) => {}
            Some(nid) => bail!(
                "an EC key on {}: an ECDSA CA key must be on P-256 (prime256v1, secp256r1)",
                nid.long_name().unwrap_or("another curve")
            ),
            None => bail!(
                "an EC key with explicit curve parameters: an ECDSA CA key must name the curve \
                 P-256 (prime256v1)"
            ),
        }
        ec.check_key().context("the EC key is inconsistent")?;
        let mut ctx = BigNumContext::new().context("an OpenSSL context")?;
        let public_point = ec
            .public_key()
            .to_bytes(group, PointConversionForm::UNCOMPRESSED, &mut ctx)
            .context("encoding the EC public key")?;
        Ok(EcdsaP256Signer { key, public_point })
    }

    /// ECDSA with SHA-256 over `message`, DER-encoded.
    pub fn sign(&self, message: &[u8]) -> Option<Vec<u8>> {
        let mut signer = openssl::sign::Signer::new(MessageDigest::sha256(), &self.key).ok()?;
        signer.update(message).ok()?;
        signer.sign_to_vec().ok()
    }
}

/// The key that signs the certificates a CA issues: RSA (PKCS#1 v1.5, SHA-256) or P-256.
#[derive(Clone)]
pub enum CaSigner {
    Rsa(RsaSigner),
    EcdsaP256(EcdsaP256Signer),
}

impl CaSigner {
    /// An RSA key (2048 to 8192 bits) or a P-256 key; nothing else can be a CA key.
    fn from_key(key: PKey<Private>) -> anyhow::Result<CaSigner> {
        match key.id() {
            Id::RSA => Ok(CaSigner::Rsa(RsaSigner::from_key(key)?)),
            Id::EC => Ok(CaSigner::EcdsaP256(EcdsaP256Signer::from_key(key)?)),
            _ => bail!("the CA key must be RSA or ECDSA P-256"),
        }
    }

    fn from_pkcs8(pkcs8: &[u8]) -> anyhow::Result<CaSigner> {
        CaSigner::from_key(PKey::private_key_from_pkcs8(pkcs8).context("parsing the private key")?)
    }

    pub fn algorithm(&self) -> CaKeyAlgorithm {
        match self {
            CaSigner::Rsa(_) => CaKeyAlgorithm::Rsa,
            CaSigner::EcdsaP256(_) => CaKeyAlgorithm::EcdsaP256,
        }
    }

    fn private_key(&self) -> &PKey<Private> {
        match self {
            CaSigner::Rsa(k) => &k.key,
            CaSigner::EcdsaP256(k) => &k.key,
        }
    }
}

impl rcgen::PublicKeyData for CaSigner {
    fn der_bytes(&self) -> &[u8] {
        match self {
            CaSigner::Rsa(k) => &k.public_pkcs1,
            CaSigner::EcdsaP256(k) => &k.public_point,
        }
    }

    fn algorithm(&self) -> &'static rcgen::SignatureAlgorithm {
        match self {
            CaSigner::Rsa(_) => &rcgen::PKCS_RSA_SHA256,
            CaSigner::EcdsaP256(_) => &rcgen::PKCS_ECDSA_P256_SHA256,
        }
    }
}

impl rcgen::SigningKey for CaSigner {
    fn sign(&self, message: &[u8]) -> Result<Vec<u8>, rcgen::Error> {
        match self {
            CaSigner::Rsa(k) => k.sign_with(MessageDigest::sha256(), message),
            CaSigner::EcdsaP256(k) => k.sign(message),
        }
        .ok_or(rcgen::Error::RemoteKeyError)
    }
}

/// The CA's certificate and the key that signs what it issues.
pub struct CaKey {
    pub certificate_der: Vec<u8>,
    pub signer: CaSigner,
}

impl CaKey {
    pub fn algorithm(&self) -> CaKeyAlgorithm {
        self.signer.algorithm()
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
    pub ca: CaKey,
    /// A separate registration authority, when configured (always, for a P-256 CA): it receives
    /// the envelopes and signs the replies; the CA only signs certificates.
    pub ra: Option<KeyMaterial>,
    /// Whom SCEP clients encrypt to and who signs the replies: the RA, or an RSA CA without one.
    recipient: KeyMaterial,
    issuer: Issuer<'static, CaSigner>,
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
            if ca.ca.algorithm() != config.ca_key_algorithm {
                tracing::warn!(
                    stored = ca.ca.algorithm().as_str(),
                    configured = config.ca_key_algorithm.as_str(),
                    "the CA in the database keeps its key: ca_key_algorithm applies only when a \
                     CA is created"
                );
            }
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
            Ok(()) => tracing::info!(
                algorithm = config.ca_key_algorithm.as_str(),
                rsa_bits = config.ca_key_bits,
                "created the CA"
            ),
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
        Ok(Self::from_rows(&rows, master, config)?.map(Arc::new))
    }

    /// The CA from its stored rows (`ca`, and `ra` when there is one); `None` without a CA.
    fn from_rows(
        rows: &[CaKeyRow],
        master: &MasterKey,
        config: &PkiConfig,
    ) -> anyhow::Result<Option<CertificateAuthority>> {
        let Some(ca_row) = rows.iter().find(|r| r.role == "ca") else {
            return Ok(None);
        };
        let open = |row: &CaKeyRow| -> anyhow::Result<Vec<u8>> {
            master
                .open(&purpose(&row.role), &row.sealed_key)
                .with_context(|| format!("opening the {} key", row.role))
        };
        let (ca, ca_material) = load_ca_key(ca_row.certificate.clone(), &open(ca_row)?)
            .context("loading the ca key")?;
        let ra = rows
            .iter()
            .find(|r| r.role == "ra")
            .map(|row| {
                KeyMaterial::from_pkcs8(row.certificate.clone(), &open(row)?)
                    .context("loading the ra key (an RA key must be RSA)")
            })
            .transpose()?;
        let recipient = match (&ra, ca_material) {
            (Some(ra), _) => ra.clone(),
            (None, Some(ca)) => ca,
            (None, None) => bail!("the CA in the database cannot serve SCEP: {EC_CA_NEEDS_RA}"),
        };
        let issuer =
            Issuer::from_ca_cert_der(&ca.certificate_der.clone().into(), ca.signer.clone())
                .map_err(|e| anyhow!("the CA certificate cannot issue: {e}"))?;
        Ok(Some(CertificateAuthority {
            ca,
            ra,
            recipient,
            issuer,
            organization: config.organization.clone(),
            validity: Duration::days(i64::from(config.cert_validity_days)),
            imported: ca_row.imported,
            scep: ScepSettings::of(config),
        }))
    }

    /// The key that SCEP clients encrypt to and that signs replies: the RA if there is one.
    pub fn scep_recipient(&self) -> &KeyMaterial {
        &self.recipient
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
    let (ca_der, ca_pkcs8, algorithm) =
        parse_ca_pem_pair(ca_cert_pem, ca_key_pem).context("the CA")?;
    check_is_ca(&ca_der)?;
    if algorithm == CaKeyAlgorithm::EcdsaP256 && ra.is_none() {
        bail!("{EC_CA_NEEDS_RA}");
    }
    let mut rows = vec![row("ca", ca_der, &ca_pkcs8, master, true)?];
    if let Some((cert_pem, key_pem)) = ra {
        let (ra_der, ra_pkcs8) = parse_pem_pair(cert_pem, key_pem)
            .context("the RA (its key must be RSA: SCEP clients encrypt to it)")?;
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

/// A PEM CA certificate and its key: RSA (PKCS#8 or PKCS#1) or ECDSA P-256 (PKCS#8 or SEC1
/// "EC PRIVATE KEY"). The certificate's DER, the key as PKCS#8 and which kind it is, after
/// checking that the key belongs to the certificate.
pub fn parse_ca_pem_pair(
    cert_pem: &str,
    key_pem: &str,
) -> anyhow::Result<(Vec<u8>, Vec<u8>, CaKeyAlgorithm)> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("reading the key PEM")?;
    let pkcs8 = match &key {
        PrivateKeyDer::Sec1(k) => {
            let ec = EcKey::private_key_from_der(k.secret_sec1_der())
                .context("parsing the SEC1 EC key")?;
            PKey::from_ec_key(ec)
                .and_then(|k| k.private_key_to_pkcs8())
                .context("re-encoding the EC key")?
        }
        PrivateKeyDer::Pkcs8(k) => k.secret_pkcs8_der().to_vec(),
        _ => {
            // RSA keys (PKCS#1 too) go the way every RSA key pair goes.
            let (der, pkcs8) = parse_pem_pair(cert_pem, key_pem)?;
            return Ok((der, pkcs8, CaKeyAlgorithm::Rsa));
        }
    };
    let cert = CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .context("reading the certificate PEM")?;
    let (ca, _) = load_ca_key(cert.to_vec(), &pkcs8)?;
    Ok((cert.to_vec(), pkcs8, ca.algorithm()))
}

/// A CA's certificate and key (PKCS#8) read into its signer, and for an RSA CA also what
/// receives envelopes and signs CertReps when there is no RA.
fn load_ca_key(
    certificate_der: Vec<u8>,
    pkcs8: &[u8],
) -> anyhow::Result<(CaKey, Option<KeyMaterial>)> {
    let key = PKey::private_key_from_pkcs8(pkcs8).context("parsing the private key")?;
    if key.id() == Id::RSA {
        let material = KeyMaterial::from_key(certificate_der.clone(), key)?;
        let ca = CaKey {
            certificate_der,
            signer: CaSigner::Rsa(material.signer.clone()),
        };
        return Ok((ca, Some(material)));
    }
    let signer = CaSigner::from_key(key)?;
    check_belongs(&certificate_der, signer.private_key())?;
    Ok((
        CaKey {
            certificate_der,
            signer,
        },
        None,
    ))
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

/// Generates a CA (and RA when configured, always for a P-256 CA): an RSA or P-256 CA key with
/// a self-signed certificate, an RSA RA key certified by it.
fn generate(master: &MasterKey, config: &PkiConfig) -> anyhow::Result<Vec<CaKeyRow>> {
    let ca_pkcs8 = match config.ca_key_algorithm {
        CaKeyAlgorithm::Rsa => generate_rsa_pkcs8(config.ca_key_bits)?,
        CaKeyAlgorithm::EcdsaP256 => generate_p256_pkcs8()?,
    };
    let ca_key = CaSigner::from_pkcs8(&ca_pkcs8)?;
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
    if config.with_ra || config.ca_key_algorithm == CaKeyAlgorithm::EcdsaP256 {
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

/// A new P-256 key as PKCS#8 (the curve named, the point uncompressed).
pub fn generate_p256_pkcs8() -> anyhow::Result<Vec<u8>> {
    let group = EcGroup::from_curve_name(Nid::X9_62_PRIME256V1).context("the P-256 group")?;
    let key = EcKey::generate(&group).context("generating a P-256 key")?;
    PKey::from_ec_key(key)
        .and_then(|k| k.private_key_to_pkcs8())
        .context("encoding the P-256 key")
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
    use crate::config::{Config, ConfigArgs, FileConfig};
    use openssl::x509::X509;

    const ECDSA_WITH_SHA256: &str = "1.2.840.10045.4.3.2";
    const SHA256_WITH_RSA: &str = "1.2.840.113549.1.1.11";

    fn config(algorithm: CaKeyAlgorithm, with_ra: bool) -> PkiConfig {
        let mut pki = Config::merge(ConfigArgs::default(), FileConfig::default())
            .unwrap()
            .pki;
        pki.ca_key_algorithm = algorithm;
        pki.with_ra = with_ra;
        pki
    }

    fn master() -> MasterKey {
        MasterKey::from_bytes(&[7; 32])
    }

    fn enrollment() -> EnrollmentRecord {
        EnrollmentRecord {
            id: "enr-1".into(),
            for_user: Some("bob@example.org".into()),
            for_device: None,
            user_id: None,
            requested_by: "test".into(),
            created_at: crate::store::now(),
            status: crate::store::EnrollmentStatus::Pending,
        }
    }

    fn signature_oid(der: &[u8]) -> String {
        Certificate::from_der(der)
            .unwrap()
            .signature_algorithm()
            .oid
            .to_string()
    }

    /// A device's RSA public key (SPKI DER).
    fn device_spki() -> Vec<u8> {
        let pkcs8 = generate_rsa_pkcs8(2048).unwrap();
        PKey::private_key_from_pkcs8(&pkcs8)
            .unwrap()
            .public_key_to_der()
            .unwrap()
    }

    fn verifies(der: &[u8], issuer_der: &[u8]) -> bool {
        let issuer = X509::from_der(issuer_der).unwrap().public_key().unwrap();
        X509::from_der(der).unwrap().verify(&issuer).unwrap()
    }

    #[test]
    fn a_p256_ca_issues_with_ecdsa_and_an_rsa_ra_receives_the_envelopes() {
        let master = master();
        let config = config(CaKeyAlgorithm::EcdsaP256, true);
        let rows = generate(&master, &config).unwrap();
        assert_eq!(rows.len(), 2, "a P-256 CA always comes with an RA");
        let ca = CertificateAuthority::from_rows(&rows, &master, &config)
            .unwrap()
            .unwrap();
        assert_eq!(ca.ca.algorithm(), CaKeyAlgorithm::EcdsaP256);
        // Self-signed with ecdsa-with-SHA256 over a P-256 key.
        assert_eq!(signature_oid(&ca.ca.certificate_der), ECDSA_WITH_SHA256);
        assert!(verifies(&ca.ca.certificate_der, &ca.ca.certificate_der));
        let ca_x509 = X509::from_der(&ca.ca.certificate_der).unwrap();
        let ca_key = ca_x509.public_key().unwrap();
        assert_eq!(
            ca_key.ec_key().unwrap().group().curve_name(),
            Some(Nid::X9_62_PRIME256V1)
        );
        // The RA: RSA, certified by the CA, for signatures and key encipherment; it is what
        // SCEP clients encrypt to.
        let ra = ca.ra.as_ref().unwrap();
        assert_eq!(signature_oid(&ra.certificate_der), ECDSA_WITH_SHA256);
        assert!(verifies(&ra.certificate_der, &ca.ca.certificate_der));
        let ra_x509 = X509::from_der(&ra.certificate_der).unwrap();
        assert_eq!(ra_x509.public_key().unwrap().id(), Id::RSA);
        assert_eq!(
            ra_x509.public_key().unwrap().bits(),
            u32::try_from(config.ca_key_bits).unwrap()
        );
        let ra_text = String::from_utf8(ra_x509.to_text().unwrap()).unwrap();
        assert!(
            ra_text.contains("Digital Signature, Key Encipherment"),
            "{ra_text}"
        );
        assert_eq!(ca.scep_recipient().certificate_der, ra.certificate_der);
        // A device certificate: ecdsa-with-SHA256, verifying under the CA's key.
        let issued = ca.issue(&device_spki(), &enrollment()).unwrap();
        assert_eq!(signature_oid(&issued.der), ECDSA_WITH_SHA256);
        assert!(verifies(&issued.der, &ca.ca.certificate_der));
        // Its authority key identifier is the CA's subject key identifier.
        let leaf = X509::from_der(&issued.der).unwrap();
        assert_eq!(
            leaf.authority_key_id().unwrap().as_slice(),
            ca_x509.subject_key_id().unwrap().as_slice()
        );
        // The profile signer's certificate too.
        let signer_pkcs8 = generate_rsa_pkcs8(2048).unwrap();
        let signer_der = ca
            .issue_signing_certificate(&signer_pkcs8, "Profile Signing")
            .unwrap();
        assert!(verifies(&signer_der, &ca.ca.certificate_der));
        assert!(KeyMaterial::from_pkcs8(signer_der, &signer_pkcs8).is_ok());
    }

    #[test]
    fn a_p256_ca_without_an_ra_is_refused_at_load() {
        let master = master();
        let config = config(CaKeyAlgorithm::EcdsaP256, true);
        let rows = generate(&master, &config).unwrap();
        let ca_only: Vec<CaKeyRow> = rows.into_iter().filter(|r| r.role == "ca").collect();
        let err = CertificateAuthority::from_rows(&ca_only, &master, &config)
            .err()
            .unwrap();
        assert!(format!("{err:#}").contains("needs an RSA RA"), "{err:#}");
    }

    #[test]
    fn the_default_ca_is_rsa_and_receives_the_envelopes_itself() {
        let master = master();
        let config = config(CaKeyAlgorithm::Rsa, false);
        let rows = generate(&master, &config).unwrap();
        assert_eq!(rows.len(), 1);
        let ca = CertificateAuthority::from_rows(&rows, &master, &config)
            .unwrap()
            .unwrap();
        assert_eq!(ca.ca.algorithm(), CaKeyAlgorithm::Rsa);
        assert_eq!(signature_oid(&ca.ca.certificate_der), SHA256_WITH_RSA);
        assert_eq!(ca.scep_recipient().certificate_der, ca.ca.certificate_der);
        let issued = ca.issue(&device_spki(), &enrollment()).unwrap();
        assert_eq!(signature_oid(&issued.der), SHA256_WITH_RSA);
        assert!(verifies(&issued.der, &ca.ca.certificate_der));
    }

    /// A self-signed CA certificate (PEM) and its key (PEM, as `key_pem` writes it).
    fn openssl_ca(key: &PKey<Private>, digest: MessageDigest) -> String {
        use openssl::x509::extension::BasicConstraints as Bc;
        let mut name = openssl::x509::X509NameBuilder::new().unwrap();
        name.append_entry_by_text("CN", "Enterprise EC CA").unwrap();
        let name = name.build();
        let mut builder = X509::builder().unwrap();
        builder.set_version(2).unwrap();
        builder.set_subject_name(&name).unwrap();
        builder.set_issuer_name(&name).unwrap();
        builder.set_pubkey(key).unwrap();
        builder
            .set_not_before(&openssl::asn1::Asn1Time::days_from_now(0).unwrap())
            .unwrap();
        builder
            .set_not_after(&openssl::asn1::Asn1Time::days_from_now(30).unwrap())
            .unwrap();
        builder
            .append_extension(Bc::new().critical().ca().build().unwrap())
            .unwrap();
        builder.sign(key, digest).unwrap();
        String::from_utf8(builder.build().to_pem().unwrap()).unwrap()
    }

    fn ec_key(nid: Nid) -> PKey<Private> {
        let group = EcGroup::from_curve_name(nid).unwrap();
        PKey::from_ec_key(EcKey::generate(&group).unwrap()).unwrap()
    }

    #[test]
    fn p256_ca_keys_are_read_from_pkcs8_and_sec1_and_other_curves_are_refused() {
        let key = ec_key(Nid::X9_62_PRIME256V1);
        let cert = openssl_ca(&key, MessageDigest::sha256());
        let pkcs8 = String::from_utf8(key.private_key_to_pem_pkcs8().unwrap()).unwrap();
        let sec1 = String::from_utf8(key.ec_key().unwrap().private_key_to_pem().unwrap()).unwrap();
        assert!(sec1.contains("BEGIN EC PRIVATE KEY"), "{sec1}");
        for pem in [&pkcs8, &sec1] {
            let (_, stored, algorithm) = parse_ca_pem_pair(&cert, pem).unwrap();
            assert_eq!(algorithm, CaKeyAlgorithm::EcdsaP256);
            // Stored as PKCS#8, which loads.
            assert!(CaSigner::from_pkcs8(&stored).is_ok());
        }
        // Another P-256 key is not the certificate's.
        let other = String::from_utf8(
            ec_key(Nid::X9_62_PRIME256V1)
                .private_key_to_pem_pkcs8()
                .unwrap(),
        )
        .unwrap();
        let err = parse_ca_pem_pair(&cert, &other).unwrap_err();
        assert!(format!("{err:#}").contains("does not belong"), "{err:#}");
        // P-384 is refused, naming the curve and what is wanted.
        let p384 = ec_key(Nid::SECP384R1);
        let cert = openssl_ca(&p384, MessageDigest::sha384());
        let pem = String::from_utf8(p384.private_key_to_pem_pkcs8().unwrap()).unwrap();
        let err = parse_ca_pem_pair(&cert, &pem).unwrap_err();
        let message = format!("{err:#}");
        assert!(message.contains("secp384r1"), "{message}");
        assert!(message.contains("must be on P-256"), "{message}");
        // An RA (and a push certificate) stays RSA-only.
        let err = parse_pem_pair(&openssl_ca(&key, MessageDigest::sha256()), &pkcs8).unwrap_err();
        assert!(format!("{err:#}").contains("not an RSA key"), "{err:#}");
    }

    /// CPU per certificate signature through the CA's signer, RSA-2048 against P-256 (what
    /// `issue` spends on the signature), then per `issue`. Prints; asserts no timing. Run with
    /// `cargo test --lib ca_signature_cost -- --ignored --nocapture` (the signatures are
    /// OpenSSL's, as fast in a debug build). `CA_SIGNATURE_COST_ROUNDS=N` runs every loop N
    /// times after 5 warm-up signatures, for callgrind: each signer then signs 2N+7 times
    /// (the CA and RA certificates of `generate` included), e.g.
    /// `valgrind --tool=callgrind --collect-atstart=no --toggle-collect='*EcdsaP256Signer*sign*'`.
    #[test]
    #[ignore = "a measurement: prints the cost of one certificate signature per algorithm"]
    fn ca_signature_cost() {
        use rcgen::SigningKey;
        let tbs = vec![0x5a_u8; 700];
        let rsa = CaSigner::from_pkcs8(&generate_rsa_pkcs8(2048).unwrap()).unwrap();
        let ec = CaSigner::from_pkcs8(&generate_p256_pkcs8().unwrap()).unwrap();
        let fixed: Option<u32> = std::env::var("CA_SIGNATURE_COST_ROUNDS")
            .ok()
            .and_then(|v| v.parse().ok());
        // About a second each: the CPU clock ticks in 10 ms.
        for (name, signer, rounds) in [("RSA-2048", &rsa, 3000), ("ECDSA P-256", &ec, 30_000)] {
            let rounds = fixed.unwrap_or(rounds);
            for _ in 0..5 {
                signer.sign(&tbs).unwrap();
            }
            let cpu = cpu_time();
            let wall = std::time::Instant::now();
            for _ in 0..rounds {
                std::hint::black_box(signer.sign(&tbs).unwrap());
            }
            let cpu = cpu_time() - cpu;
            println!(
                "{name}: {:.1} us CPU, {:.1} us wall per signature ({rounds} signatures)",
                cpu.as_secs_f64() * 1e6 / f64::from(rounds),
                wall.elapsed().as_secs_f64() * 1e6 / f64::from(rounds),
            );
        }
        // And the whole of `issue` (parameters, encoding, signature) for each kind of CA.
        let master = master();
        let spki = device_spki();
        for algorithm in [CaKeyAlgorithm::Rsa, CaKeyAlgorithm::EcdsaP256] {
            let config = config(algorithm, true);
            let rows = generate(&master, &config).unwrap();
            let ca = CertificateAuthority::from_rows(&rows, &master, &config)
                .unwrap()
                .unwrap();
            let rounds = fixed.unwrap_or(match algorithm {
                CaKeyAlgorithm::Rsa => 2000,
                CaKeyAlgorithm::EcdsaP256 => 10_000,
            });
            let cpu = cpu_time();
            for _ in 0..rounds {
                std::hint::black_box(ca.issue(&spki, &enrollment()).unwrap());
            }
            let cpu = cpu_time() - cpu;
            println!(
                "issue(), {} CA: {:.1} us CPU per certificate",
                algorithm.as_str(),
                cpu.as_secs_f64() * 1e6 / f64::from(rounds)
            );
        }
    }

    /// This thread's CPU time.
    fn cpu_time() -> std::time::Duration {
        let text = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
        // utime and stime, in clock ticks, are fields 14 and 15 (after the parenthesised name).
        let rest = text.rsplit_once(')').unwrap().1;
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        std::time::Duration::from_millis(ticks * 10)
    }

    #[test]
    fn serials_are_normalised() {
        assert_eq!(serial_hex(&[0, 0, 0x1a, 0xff]), "1aff");
        assert_eq!(serial_hex(&[0x80, 1]), "8001");
        assert_eq!(serial_hex(&[0, 0]), "00");
    }
}
