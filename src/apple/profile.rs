//! The enrollment profile (`.mobileconfig`): the CA certificate, a SCEP payload carrying a
//! one-time challenge bound to the enrollment, and the MDM payload that points the device at
//! the check-in and command URLs and names the SCEP identity as its own.

use plist::{Dictionary, Value};
use sha1::Digest;

/// What one enrollment profile says.
pub struct EnrollmentProfile<'a> {
    /// The enrollment record the challenge is bound to; it names the profile and the subject.
    pub enrollment_id: &'a str,
    pub challenge: &'a str,
    /// Base URL devices reach the broker at, without a trailing slash.
    pub public_url: &'a str,
    pub scep_path: &'a str,
    /// The APNs topic of the push certificate.
    pub topic: &'a str,
    pub ca_der: &'a [u8],
    pub organization: &'a str,
    /// Who the device is for, shown in the profile's description.
    pub for_user: Option<&'a str>,
}

/// Everything the device may do under this MDM (Apple's AccessRights bit set 1–4096: 8191).
pub const ACCESS_RIGHTS_ALL: i64 = 8191;

/// Capabilities announced in the MDM payload.
pub const SERVER_CAPABILITIES: [&str; 2] = [
    "com.apple.mdm.per-user-connections",
    "com.apple.mdm.bootstraptoken",
];

impl EnrollmentProfile<'_> {
    /// The profile as a plist value (unsigned).
    pub fn build(&self) -> Value {
        let base = format!("org.trustbroker.enrollment.{}", self.enrollment_id);
        let ca_uuid = payload_uuid();
        let scep_uuid = payload_uuid();
        let mdm_uuid = payload_uuid();

        let mut ca = header(
            "com.apple.security.root",
            &format!("{base}.ca"),
            &ca_uuid,
            &format!("{} device CA", self.organization),
        );
        ca.insert("PayloadCertificateFileName".into(), "ca.cer".into());
        ca.insert("PayloadContent".into(), Value::Data(self.ca_der.to_vec()));

        let mut scep_content = Dictionary::new();
        scep_content.insert(
            "URL".into(),
            format!("{}{}", self.public_url, self.scep_path).into(),
        );
        scep_content.insert("Name".into(), self.organization.into());
        let subject = vec![rdn("O", self.organization), rdn("CN", self.enrollment_id)];
        scep_content.insert("Subject".into(), Value::Array(subject));
        scep_content.insert("Challenge".into(), self.challenge.into());
        scep_content.insert("Keysize".into(), Value::Integer(2048.into()));
        scep_content.insert("Key Type".into(), "RSA".into());
        // digitalSignature (1) + keyEncipherment (4): what the CA certifies.
        scep_content.insert("Key Usage".into(), Value::Integer(5.into()));
        // A selector among GetCACert's answers and a pin; SHA-1 is what devices compare.
        scep_content.insert(
            "CAFingerprint".into(),
            Value::Data(sha1::Sha1::digest(self.ca_der).to_vec()),
        );
        let mut scep = header(
            "com.apple.security.scep",
            &format!("{base}.scep"),
            &scep_uuid,
            "Device identity",
        );
        scep.insert("PayloadContent".into(), Value::Dictionary(scep_content));

        let mut mdm = header(
            "com.apple.mdm",
            &format!("{base}.mdm"),
            &mdm_uuid,
            "Device management",
        );
        mdm.insert("IdentityCertificateUUID".into(), scep_uuid.clone().into());
        mdm.insert("Topic".into(), self.topic.into());
        mdm.insert(
            "ServerURL".into(),
            format!("{}{}", self.public_url, crate::http::mdm::CONNECT_PATH).into(),
        );
        mdm.insert(
            "CheckInURL".into(),
            format!("{}{}", self.public_url, crate::http::mdm::CHECKIN_PATH).into(),
        );
        mdm.insert("SignMessage".into(), Value::Boolean(true));
        mdm.insert(
            "AccessRights".into(),
            Value::Integer(ACCESS_RIGHTS_ALL.into()),
        );
        mdm.insert("CheckOutWhenRemoved".into(), Value::Boolean(true));
        mdm.insert(
            "ServerCapabilities".into(),
            Value::Array(SERVER_CAPABILITIES.iter().map(|c| (*c).into()).collect()),
        );

        let description = match self.for_user {
            Some(user) => format!(
                "Enrolls this device in {} device management for {user}.",
                self.organization
            ),
            None => format!(
                "Enrolls this device in {} device management.",
                self.organization
            ),
        };
        let mut profile = Dictionary::new();
        profile.insert("PayloadType".into(), "Configuration".into());
        profile.insert("PayloadVersion".into(), Value::Integer(1.into()));
        profile.insert("PayloadIdentifier".into(), base.into());
        profile.insert("PayloadUUID".into(), payload_uuid().into());
        profile.insert(
            "PayloadDisplayName".into(),
            format!("{} device management", self.organization).into(),
        );
        profile.insert("PayloadOrganization".into(), self.organization.into());
        profile.insert("PayloadDescription".into(), description.into());
        profile.insert("PayloadScope".into(), "System".into());
        profile.insert(
            "PayloadContent".into(),
            Value::Array(vec![
                Value::Dictionary(ca),
                Value::Dictionary(scep),
                Value::Dictionary(mdm),
            ]),
        );
        Value::Dictionary(profile)
    }
}

fn header(payload_type: &str, identifier: &str, uuid: &str, display_name: &str) -> Dictionary {
    let mut d = Dictionary::new();
    d.insert("PayloadType".into(), payload_type.into());
    d.insert("PayloadVersion".into(), Value::Integer(1.into()));
    d.insert("PayloadIdentifier".into(), identifier.into());
    d.insert("PayloadUUID".into(), uuid.into());
    d.insert("PayloadDisplayName".into(), display_name.into());
    d
}

/// One relative distinguished name as the SCEP payload spells it: `[[ ["CN", "value"] ]]`.
fn rdn(attribute: &str, value: &str) -> Value {
    Value::Array(vec![Value::Array(vec![attribute.into(), value.into()])])
}

fn payload_uuid() -> String {
    uuid::Uuid::new_v4().to_string().to_uppercase()
}
