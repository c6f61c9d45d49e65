//! What devices send: check-in messages (by `MessageType`) and command-channel reports (by
//! `Status`), with Apple's key names. Unknown keys are ignored (devices add keys with every OS
//! release); an unknown MessageType or Status, or a known key of the wrong type, is an error.
//!
//! Read from a `plist::Value` by hand rather than with serde derive: the `plist` crate encodes
//! optional values inside flattened or tagged structures as `{Some: …}` dictionaries, which
//! devices never send.

use plist::{Dictionary, Value};

use super::plist::PlistError;

/// Who a request speaks for. A device channel is identified by its UDID (or, for a User
/// Enrollment, its EnrollmentID); a user channel adds the user (macOS users, shared iPad).
#[derive(Clone, Debug, Default)]
pub struct Channel {
    pub udid: Option<String>,
    pub enrollment_id: Option<String>,
    pub user_id: Option<String>,
    pub enrollment_user_id: Option<String>,
    pub user_short_name: Option<String>,
    pub user_long_name: Option<String>,
}

/// The longest identifier accepted from a device (UDIDs are 25–40 characters).
const MAX_ID_LEN: usize = 128;

impl Channel {
    /// The device this channel belongs to: its UDID, or its EnrollmentID for a User Enrollment.
    pub fn device_id(&self) -> Option<&str> {
        self.udid
            .as_deref()
            .or(self.enrollment_id.as_deref())
            .filter(|id| valid_id(id))
    }

    /// The user on this channel, if it is a user channel.
    pub fn user(&self) -> Option<&str> {
        self.user_id
            .as_deref()
            .or(self.enrollment_user_id.as_deref())
            .filter(|id| valid_id(id))
    }

    /// The enrollment (command channel) ID: the device ID, or `device:user` for a user channel.
    pub fn enrollment_id(&self) -> Option<String> {
        let device = self.device_id()?;
        Some(match self.user() {
            Some(user) => format!("{device}:{user}"),
            None => device.to_owned(),
        })
    }
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

#[derive(Debug)]
pub enum CheckIn {
    Authenticate(Authenticate),
    TokenUpdate(TokenUpdate),
    CheckOut(Plain),
    UserAuthenticate(Plain),
    SetBootstrapToken(SetBootstrapToken),
    GetBootstrapToken(Plain),
    DeclarativeManagement(Plain),
    GetToken(Plain),
}

impl CheckIn {
    pub fn channel(&self) -> &Channel {
        match self {
            CheckIn::Authenticate(m) => &m.channel,
            CheckIn::TokenUpdate(m) => &m.channel,
            CheckIn::SetBootstrapToken(m) => &m.channel,
            CheckIn::CheckOut(m)
            | CheckIn::UserAuthenticate(m)
            | CheckIn::GetBootstrapToken(m)
            | CheckIn::DeclarativeManagement(m)
            | CheckIn::GetToken(m) => &m.channel,
        }
    }

    pub fn message_type(&self) -> &'static str {
        match self {
            CheckIn::Authenticate(_) => "Authenticate",
            CheckIn::TokenUpdate(_) => "TokenUpdate",
            CheckIn::CheckOut(_) => "CheckOut",
            CheckIn::UserAuthenticate(_) => "UserAuthenticate",
            CheckIn::SetBootstrapToken(_) => "SetBootstrapToken",
            CheckIn::GetBootstrapToken(_) => "GetBootstrapToken",
            CheckIn::DeclarativeManagement(_) => "DeclarativeManagement",
            CheckIn::GetToken(_) => "GetToken",
        }
    }
}

/// A message whose content the broker does not use beyond its channel.
#[derive(Debug)]
pub struct Plain {
    pub channel: Channel,
}

/// Authenticate: the device (re)enrolls; earlier tokens are void until the next TokenUpdate.
#[derive(Debug)]
pub struct Authenticate {
    pub channel: Channel,
    pub topic: String,
    pub serial_number: Option<String>,
    pub model: Option<String>,
    pub model_name: Option<String>,
    pub product_name: Option<String>,
    pub device_name: Option<String>,
    pub os_version: Option<String>,
    pub build_version: Option<String>,
    pub imei: Option<String>,
    pub meid: Option<String>,
}

/// TokenUpdate: where and how to wake this channel over APNs.
#[derive(Debug)]
pub struct TokenUpdate {
    pub channel: Channel,
    pub topic: String,
    pub token: Vec<u8>,
    pub push_magic: String,
    pub unlock_token: Option<Vec<u8>>,
    pub awaiting_configuration: bool,
}

#[derive(Debug)]
pub struct SetBootstrapToken {
    pub channel: Channel,
    /// Absent when the device clears its escrowed token.
    pub bootstrap_token: Option<Vec<u8>>,
}

/// A command-channel request: a status, and the result of a command when there is one.
#[derive(Debug)]
pub struct Report {
    pub channel: Channel,
    pub status: ReportStatus,
    pub command_uuid: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportStatus {
    Idle,
    Acknowledged,
    Error,
    CommandFormatError,
    NotNow,
}

fn shape(message: String) -> PlistError {
    PlistError::Shape(message)
}

/// The dictionary at the top of a device's message.
fn top(value: &Value) -> Result<&Dictionary, PlistError> {
    value
        .as_dictionary()
        .ok_or_else(|| shape("the message is not a dictionary".into()))
}

fn string(d: &Dictionary, key: &str) -> Result<Option<String>, PlistError> {
    match d.get(key) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(shape(format!("{key} must be a string"))),
    }
}

fn required_string(d: &Dictionary, key: &str) -> Result<String, PlistError> {
    string(d, key)?.ok_or_else(|| shape(format!("{key} is missing")))
}

fn data(d: &Dictionary, key: &str) -> Result<Option<Vec<u8>>, PlistError> {
    match d.get(key) {
        None => Ok(None),
        Some(Value::Data(bytes)) => Ok(Some(bytes.clone())),
        Some(_) => Err(shape(format!("{key} must be data"))),
    }
}

fn boolean(d: &Dictionary, key: &str) -> Result<bool, PlistError> {
    match d.get(key) {
        None => Ok(false),
        Some(Value::Boolean(b)) => Ok(*b),
        Some(_) => Err(shape(format!("{key} must be a boolean"))),
    }
}

impl Channel {
    fn read(d: &Dictionary) -> Result<Channel, PlistError> {
        Ok(Channel {
            udid: string(d, "UDID")?,
            enrollment_id: string(d, "EnrollmentID")?,
            user_id: string(d, "UserID")?,
            enrollment_user_id: string(d, "EnrollmentUserID")?,
            user_short_name: string(d, "UserShortName")?,
            user_long_name: string(d, "UserLongName")?,
        })
    }
}

impl CheckIn {
    /// Reads a check-in message (XML or binary plist).
    pub fn from_plist(body: &[u8]) -> Result<CheckIn, PlistError> {
        Self::from_value(&super::plist::parse_value(body)?)
    }

    /// Reads a check-in message from a plist already read within limits.
    pub fn from_value(value: &Value) -> Result<CheckIn, PlistError> {
        let d = top(value)?;
        let channel = Channel::read(d)?;
        let message_type = required_string(d, "MessageType")?;
        Ok(match message_type.as_str() {
            "Authenticate" => CheckIn::Authenticate(Authenticate {
                topic: required_string(d, "Topic")?,
                serial_number: string(d, "SerialNumber")?,
                model: string(d, "Model")?,
                model_name: string(d, "ModelName")?,
                product_name: string(d, "ProductName")?,
                device_name: string(d, "DeviceName")?,
                os_version: string(d, "OSVersion")?,
                build_version: string(d, "BuildVersion")?,
                imei: string(d, "IMEI")?,
                meid: string(d, "MEID")?,
                channel,
            }),
            "TokenUpdate" => CheckIn::TokenUpdate(TokenUpdate {
                topic: required_string(d, "Topic")?,
                token: data(d, "Token")?.ok_or_else(|| shape("Token is missing".into()))?,
                push_magic: required_string(d, "PushMagic")?,
                unlock_token: data(d, "UnlockToken")?,
                awaiting_configuration: boolean(d, "AwaitingConfiguration")?,
                channel,
            }),
            "SetBootstrapToken" => CheckIn::SetBootstrapToken(SetBootstrapToken {
                bootstrap_token: data(d, "BootstrapToken")?,
                channel,
            }),
            "CheckOut" => CheckIn::CheckOut(Plain { channel }),
            "UserAuthenticate" => CheckIn::UserAuthenticate(Plain { channel }),
            "GetBootstrapToken" => CheckIn::GetBootstrapToken(Plain { channel }),
            "DeclarativeManagement" => CheckIn::DeclarativeManagement(Plain { channel }),
            "GetToken" => CheckIn::GetToken(Plain { channel }),
            other => return Err(shape(format!("unknown MessageType {other}"))),
        })
    }
}

impl Report {
    /// Reads a command-channel report (XML or binary plist).
    pub fn from_plist(body: &[u8]) -> Result<Report, PlistError> {
        Self::from_value(&super::plist::parse_value(body)?)
    }

    /// Reads a command-channel report from a plist already read within limits.
    pub fn from_value(value: &Value) -> Result<Report, PlistError> {
        let d = top(value)?;
        let status = match required_string(d, "Status")?.as_str() {
            "Idle" => ReportStatus::Idle,
            "Acknowledged" => ReportStatus::Acknowledged,
            "Error" => ReportStatus::Error,
            "CommandFormatError" => ReportStatus::CommandFormatError,
            "NotNow" => ReportStatus::NotNow,
            other => return Err(shape(format!("unknown Status {other}"))),
        };
        Ok(Report {
            channel: Channel::read(d)?,
            status,
            command_uuid: string(d, "CommandUUID")?,
        })
    }
}
