//! A compiled policy set: what the loader makes of the files under `policies/` once they are
//! parsed and checked, and what the reconciler turns into per-device desired state.
//!
//! Templates keep `${...}` variables unresolved; `vars` resolves them per device.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Serialize;

use crate::apple::commands::Command;

/// Every policy of one set, in name order, and a digest of the files they came from.
#[derive(Clone, Debug, Default)]
pub struct PolicySet {
    pub policies: Vec<Policy>,
    /// SHA-256 (hex) over the sorted file paths and contents: equal sets, equal digests.
    pub digest: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Policy {
    pub name: String,
    pub description: Option<String>,
    /// The file it was read from, relative to the policy directory.
    pub file: String,
    /// Members of any of these groups get the policy.
    pub groups: Vec<GroupRef>,
    /// `None`: every platform.
    pub platforms: Option<Vec<Platform>>,
    pub profiles: Vec<ProfileItem>,
    pub apps: Vec<AppItem>,
    /// Sent once each time a device comes into the policy's scope.
    pub commands_on_join: Vec<Command>,
    pub on_leave: OnLeave,
}

/// A group by its provider's stable ID: the configured provider name (`[idp.NAME]`) and the
/// provider's identifier (an LDAP DN, an OIDC or SAML group value, a SCIM group id).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub struct GroupRef {
    pub provider: String,
    pub id: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Platform {
    Ios,
    Ipados,
    Macos,
    Tvos,
    Visionos,
    Watchos,
}

/// A configuration profile the policy installs.
#[derive(Clone, Debug, PartialEq)]
pub struct ProfileItem {
    /// The profile's top-level PayloadIdentifier: what RemoveProfile names and ProfileList
    /// reports.
    pub identifier: String,
    pub display_name: String,
    /// The whole `Configuration` dictionary, variables unresolved.
    pub template: plist::Dictionary,
    /// The variables the template uses.
    pub variables: BTreeSet<Variable>,
}

/// An app the policy installs, with its managed configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct AppItem {
    pub bundle_id: String,
    pub itunes_store_id: Option<u64>,
    /// For in-house apps: the manifest's HTTPS URL.
    pub manifest_url: Option<String>,
    /// Managed app configuration, variables unresolved.
    pub configuration: Option<plist::Dictionary>,
    pub variables: BTreeSet<Variable>,
}

/// What happens on a device whose owner leaves every group that the policy targets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OnLeave {
    /// Remove what the policy installed (and no other policy still wants) [default: true].
    pub remove: bool,
    /// Lock the device after the grace period.
    pub lock: Option<Duration>,
    /// Erase the device after the grace period.
    pub wipe: Option<Duration>,
}

impl Default for OnLeave {
    fn default() -> Self {
        OnLeave {
            remove: true,
            lock: None,
            wipe: None,
        }
    }
}

impl OnLeave {
    pub fn is_destructive(&self) -> bool {
        self.lock.is_some() || self.wipe.is_some()
    }
}

/// A `${...}` a template may use, resolved per device.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Variable {
    UserId,
    UserLogin,
    UserEmail,
    UserDisplayName,
    UserSubject,
    DeviceUdid,
    DeviceSerialNumber,
    DeviceName,
    DeviceModel,
    EnrollmentId,
    /// `${token.<integration>}`: the integration's current shared app-config token.
    Token(String),
    /// `${device_token.<integration>}`: a token the broker signs for this device.
    DeviceToken(String),
}

impl Variable {
    /// The variables with a fixed name (the token ones are named per integration).
    pub const ALL: &'static [Variable] = &[
        Variable::UserId,
        Variable::UserLogin,
        Variable::UserEmail,
        Variable::UserDisplayName,
        Variable::UserSubject,
        Variable::DeviceUdid,
        Variable::DeviceSerialNumber,
        Variable::DeviceName,
        Variable::DeviceModel,
        Variable::EnrollmentId,
    ];

    /// The name inside `${...}`.
    pub fn name(&self) -> String {
        match self {
            Variable::Token(integration) => format!("token.{integration}"),
            Variable::DeviceToken(integration) => format!("device_token.{integration}"),
            fixed => fixed.fixed_name().to_owned(),
        }
    }

    fn fixed_name(&self) -> &'static str {
        match self {
            Variable::UserId => "user.id",
            Variable::UserLogin => "user.login",
            Variable::UserEmail => "user.email",
            Variable::UserDisplayName => "user.display_name",
            Variable::UserSubject => "user.subject",
            Variable::DeviceUdid => "device.udid",
            Variable::DeviceSerialNumber => "device.serial_number",
            Variable::DeviceName => "device.name",
            Variable::DeviceModel => "device.model",
            Variable::EnrollmentId => "enrollment.id",
            Variable::Token(_) => "token.<integration>",
            Variable::DeviceToken(_) => "device_token.<integration>",
        }
    }

    pub fn from_name(name: &str) -> Option<Variable> {
        if let Some(integration) = name.strip_prefix("token.") {
            return valid_integration(integration).then(|| Variable::Token(integration.into()));
        }
        if let Some(integration) = name.strip_prefix("device_token.") {
            return valid_integration(integration)
                .then(|| Variable::DeviceToken(integration.into()));
        }
        Variable::ALL
            .iter()
            .find(|v| v.fixed_name() == name)
            .cloned()
    }

    /// The names of every variable, for messages (`token.<integration>` as a pattern).
    pub fn known_names() -> Vec<&'static str> {
        let mut names: Vec<&'static str> = Variable::ALL.iter().map(Variable::fixed_name).collect();
        names.push("token.<integration>");
        names.push("device_token.<integration>");
        names
    }
}

/// An integration's name, as token integrations allow it: 1–64 of a-z 0-9 - _.
pub fn valid_integration(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// The values of the variables for one device. A value the device or person does not have
/// (no email, serial number not reported yet, no active token) is `None`: an item that needs
/// it waits.
#[derive(Clone, Debug, Default)]
pub struct VariableValues {
    pub user_id: Option<String>,
    pub user_login: Option<String>,
    pub user_email: Option<String>,
    pub user_display_name: Option<String>,
    pub user_subject: Option<String>,
    pub device_udid: Option<String>,
    pub device_serial_number: Option<String>,
    pub device_name: Option<String>,
    pub device_model: Option<String>,
    pub enrollment_id: Option<String>,
    /// Integration → its current shared token.
    pub tokens: std::collections::BTreeMap<String, String>,
    /// Integration → this device's signed token.
    pub device_tokens: std::collections::BTreeMap<String, String>,
}

impl VariableValues {
    pub fn get(&self, variable: &Variable) -> Option<&str> {
        match variable {
            Variable::UserId => self.user_id.as_deref(),
            Variable::UserLogin => self.user_login.as_deref(),
            Variable::UserEmail => self.user_email.as_deref(),
            Variable::UserDisplayName => self.user_display_name.as_deref(),
            Variable::UserSubject => self.user_subject.as_deref(),
            Variable::DeviceUdid => self.device_udid.as_deref(),
            Variable::DeviceSerialNumber => self.device_serial_number.as_deref(),
            Variable::DeviceName => self.device_name.as_deref(),
            Variable::DeviceModel => self.device_model.as_deref(),
            Variable::EnrollmentId => self.enrollment_id.as_deref(),
            Variable::Token(integration) => self.tokens.get(integration).map(String::as_str),
            Variable::DeviceToken(integration) => {
                self.device_tokens.get(integration).map(String::as_str)
            }
        }
    }
}

/// One problem in the policy files, where it is.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Diagnostic {
    /// Relative to the policy directory.
    pub file: String,
    /// 1-based; 0 when the problem has no position (a missing file, a conflict between files).
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl std::fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.line > 0 {
            write!(
                f,
                "{}:{}:{}: {}",
                self.file, self.line, self.column, self.message
            )
        } else {
            write!(f, "{}: {}", self.file, self.message)
        }
    }
}
