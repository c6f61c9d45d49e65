//! Issuing enrollment profiles: a new enrollment record with a one-time challenge, built into
//! a `.mobileconfig` and signed by the profile-signing certificate.

use std::sync::Arc;

use tokio::sync::OnceCell;

use super::profile::EnrollmentProfile;
use crate::pki::ca::{CertificateAuthority, KeyMaterial};
use crate::pki::challenge::{self, ChallengeRequest};
use crate::pki::scep::{self, DigestAlgorithm};
use crate::secrets::MasterKey;
use crate::store::Store;

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error(
        "no APNs push certificate: import one with `trustbroker push-cert import` (its topic \
         goes into the profile)"
    )]
    NoPushCertificate,
    #[error("internal error: {0}")]
    Internal(#[from] anyhow::Error),
}

impl From<crate::store::StoreError> for ProfileError {
    fn from(e: crate::store::StoreError) -> Self {
        ProfileError::Internal(e.into())
    }
}

/// A profile just issued.
pub struct IssuedProfile {
    /// The `.mobileconfig`: CMS SignedData, or the plain XML plist when unsigned.
    pub body: Vec<u8>,
    pub enrollment_id: String,
    pub expires_at: chrono::DateTime<chrono::Utc>,
}

/// Where devices reach the broker and what the profiles say about the organisation.
#[derive(Clone)]
pub struct ProfileSettings {
    pub public_url: String,
    pub scep_path: String,
    pub organization: String,
    pub challenge_ttl: std::time::Duration,
}

#[derive(Clone)]
pub struct ProfileService {
    store: Store,
    ca: Arc<CertificateAuthority>,
    master: Arc<MasterKey>,
    settings: Arc<ProfileSettings>,
    signer: Arc<OnceCell<KeyMaterial>>,
}

impl ProfileService {
    pub fn new(
        store: Store,
        ca: Arc<CertificateAuthority>,
        master: Arc<MasterKey>,
        settings: ProfileSettings,
    ) -> Self {
        ProfileService {
            store,
            ca,
            master,
            settings: Arc::new(settings),
            signer: Arc::new(OnceCell::new()),
        }
    }

    /// Creates an enrollment record and its one-time challenge, and the profile carrying it.
    pub async fn issue(
        &self,
        request: ChallengeRequest,
        signed: bool,
    ) -> Result<IssuedProfile, ProfileError> {
        let push = self
            .store
            .push_certificate()
            .await?
            .ok_or(ProfileError::NoPushCertificate)?;
        let for_user = request.for_user.clone();
        let issued = challenge::create(&self.store, self.settings.challenge_ttl, request).await?;
        let profile = EnrollmentProfile {
            enrollment_id: &issued.enrollment_id,
            challenge: &issued.challenge,
            public_url: self.settings.public_url.trim_end_matches('/'),
            scep_path: &self.settings.scep_path,
            topic: &push.topic,
            ca_der: &self.ca.ca.certificate_der,
            organization: &self.settings.organization,
            for_user: for_user.as_deref(),
        }
        .build();
        let xml = super::plist::to_xml(&profile);
        let body = if signed { self.sign(&xml).await? } else { xml };
        Ok(IssuedProfile {
            body,
            enrollment_id: issued.enrollment_id,
            expires_at: issued.expires_at,
        })
    }

    /// The enrollment profile of an existing record again, with a fresh challenge for that
    /// record, signed: sent with InstallProfile it replaces the installed enrollment profile
    /// (same PayloadIdentifier, same MDM settings) and the device enrolls a new identity
    /// certificate over SCEP before the old one expires.
    pub async fn renewal(
        &self,
        enrollment_id: &str,
        challenge_ttl: std::time::Duration,
    ) -> Result<Vec<u8>, ProfileError> {
        let push = self
            .store
            .push_certificate()
            .await?
            .ok_or(ProfileError::NoPushCertificate)?;
        let issued =
            challenge::create_for_record(&self.store, enrollment_id, challenge_ttl).await?;
        let profile = EnrollmentProfile {
            enrollment_id,
            challenge: &issued.challenge,
            public_url: self.settings.public_url.trim_end_matches('/'),
            scep_path: &self.settings.scep_path,
            topic: &push.topic,
            ca_der: &self.ca.ca.certificate_der,
            organization: &self.settings.organization,
            for_user: None,
        }
        .build();
        self.sign(&super::plist::to_xml(&profile)).await
    }

    /// Signs a configuration profile (CMS SignedData, SHA-256) with the profile-signing
    /// certificate, which devices show as verified.
    pub async fn sign(&self, xml: &[u8]) -> Result<Vec<u8>, ProfileError> {
        let signer = self
            .signer
            .get_or_try_init(|| self.ca.profile_signer(&self.store, &self.master))
            .await?;
        Ok(scep::sign_attached(xml, DigestAlgorithm::Sha256, signer)
            .map_err(|e| anyhow::anyhow!("signing the profile: {e}"))?)
    }
}
