//! MDM commands: built from JSON with Apple's own key names, or taken as a raw plist, checked
//! against what Apple's schema allows for the typed commands, and wrapped for the wire as
//! `{CommandUUID, Command}`.
//!
//! JSON has no data or date type, so each typed command declares its keys' plist types: a
//! `<data>` key takes base64 text, a `<dictionary>` key (a managed app's `Configuration`) takes
//! any JSON object, converted value by value.

use base64::Engine;
use plist::{Dictionary, Value};
use serde_json::Value as Json;
use sha2::{Digest, Sha256};

/// A plist type, as Apple's schema names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    String,
    Integer,
    Boolean,
    Data,
    Dictionary,
    /// An array whose members are of the given kind.
    ArrayOf(&'static Kind),
}

struct KeySpec {
    key: &'static str,
    kind: Kind,
    required: bool,
}

const fn key(key: &'static str, kind: Kind) -> KeySpec {
    KeySpec {
        key,
        kind,
        required: false,
    }
}

const fn required(key: &'static str, kind: Kind) -> KeySpec {
    KeySpec {
        key,
        kind,
        required: true,
    }
}

const STRINGS: Kind = Kind::ArrayOf(&Kind::String);
const DICTIONARIES: Kind = Kind::ArrayOf(&Kind::Dictionary);

/// The typed commands and their payload keys (from Apple's schema, `mdm/commands/*.yaml`).
const TYPED: &[(&str, &[KeySpec])] = &[
    ("InstallProfile", &[required("Payload", Kind::Data)]),
    ("RemoveProfile", &[required("Identifier", Kind::String)]),
    (
        "DeviceLock",
        &[
            key("Message", Kind::String),
            key("PhoneNumber", Kind::String),
            key("PIN", Kind::String),
        ],
    ),
    (
        "EraseDevice",
        &[
            key("PreserveDataPlan", Kind::Boolean),
            key("DisallowProximitySetup", Kind::Boolean),
            key("PIN", Kind::String),
            key("ObliterationBehavior", Kind::String),
            key("ReturnToService", Kind::Dictionary),
        ],
    ),
    (
        "InstallApplication",
        &[
            key("iTunesStoreID", Kind::Integer),
            key("Identifier", Kind::String),
            key("ManifestURL", Kind::String),
            key("Options", Kind::Dictionary),
            key("ManagementFlags", Kind::Integer),
            key("Configuration", Kind::Dictionary),
            key("Attributes", Kind::Dictionary),
            key("ChangeManagementState", Kind::String),
            key("InstallAsManaged", Kind::Boolean),
            key("iOSApp", Kind::Boolean),
        ],
    ),
    ("Settings", &[required("Settings", DICTIONARIES)]),
    (
        "DeviceInformation",
        &[
            required("Queries", STRINGS),
            key("DeviceAttestationNonce", Kind::Data),
        ],
    ),
    ("ProfileList", &[key("ManagedOnly", Kind::Boolean)]),
    (
        "InstalledApplicationList",
        &[
            key("Identifiers", STRINGS),
            key("ManagedAppsOnly", Kind::Boolean),
            key("Items", STRINGS),
        ],
    ),
    ("SecurityInfo", &[]),
    (
        "RestartDevice",
        &[
            key("RebuildKernelCache", Kind::Boolean),
            key("KextPaths", STRINGS),
            key("NotifyUser", Kind::Boolean),
        ],
    ),
];

/// The request types with typed support.
pub fn typed_request_types() -> impl Iterator<Item = &'static str> {
    TYPED.iter().map(|(name, _)| *name)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CommandError {
    #[error("{0}")]
    Invalid(String),
}

fn invalid(message: impl Into<String>) -> CommandError {
    CommandError::Invalid(message.into())
}

/// A command ready to queue: its `Command` dictionary and what identifies it.
#[derive(Clone, Debug, PartialEq)]
pub struct Command {
    pub request_type: String,
    pub body: Dictionary,
}

impl Command {
    /// SHA-256 of the command's XML: equal for identical commands, whatever their UUIDs.
    pub fn fingerprint(&self) -> String {
        hex::encode(Sha256::digest(super::plist::to_xml(&Value::Dictionary(
            self.body.clone(),
        ))))
    }

    /// The full command plist for the device: `{CommandUUID, Command}`.
    pub fn envelope(&self, uuid: &str) -> Vec<u8> {
        let mut outer = Dictionary::new();
        outer.insert("CommandUUID".into(), Value::String(uuid.to_owned()));
        outer.insert("Command".into(), Value::Dictionary(self.body.clone()));
        super::plist::to_xml(&Value::Dictionary(outer))
    }
}

/// A typed command from JSON: `{"RequestType": "DeviceLock", "Message": "…"}`.
pub fn from_json(json: &Json) -> Result<Command, CommandError> {
    let object = json
        .as_object()
        .ok_or_else(|| invalid("a command is a JSON object"))?;
    let request_type = object
        .get("RequestType")
        .and_then(Json::as_str)
        .ok_or_else(|| invalid("the command needs a RequestType"))?;
    let specs = TYPED
        .iter()
        .find(|(name, _)| *name == request_type)
        .map(|(_, specs)| *specs)
        .ok_or_else(|| {
            invalid(format!(
                "RequestType {request_type} has no typed support; send it as a raw plist \
                 (\"command_plist\") or use one of: {}",
                typed_request_types().collect::<Vec<_>>().join(", ")
            ))
        })?;
    let mut body = Dictionary::new();
    body.insert("RequestType".into(), Value::String(request_type.to_owned()));
    for (name, value) in object {
        if name == "RequestType" {
            continue;
        }
        let spec = specs.iter().find(|s| s.key == name).ok_or_else(|| {
            invalid(format!(
                "{request_type} has no key {name} (known: {})",
                specs.iter().map(|s| s.key).collect::<Vec<_>>().join(", ")
            ))
        })?;
        body.insert(name.clone(), convert(value, spec.kind, name)?);
    }
    for spec in specs.iter().filter(|s| s.required) {
        if !body.contains_key(spec.key) {
            return Err(invalid(format!("{request_type} needs {}", spec.key)));
        }
    }
    check_semantics(request_type, &body)?;
    Ok(Command {
        request_type: request_type.to_owned(),
        body,
    })
}

/// Rules the key table cannot express.
fn check_semantics(request_type: &str, body: &Dictionary) -> Result<(), CommandError> {
    match request_type {
        "InstallApplication"
            if !["iTunesStoreID", "Identifier", "ManifestURL"]
                .iter()
                .any(|k| body.contains_key(k)) =>
        {
            return Err(invalid(
                "InstallApplication needs iTunesStoreID, Identifier or ManifestURL",
            ));
        }
        "Settings" => {
            let items = body
                .get("Settings")
                .and_then(Value::as_array)
                .map(Vec::as_slice)
                .unwrap_or_default();
            if items.is_empty() {
                return Err(invalid("Settings needs at least one item"));
            }
            for item in items {
                let item = item
                    .as_dictionary()
                    .ok_or_else(|| invalid("a setting is a dictionary"))?;
                let kind = item
                    .get("Item")
                    .and_then(Value::as_string)
                    .ok_or_else(|| invalid("every setting needs an Item"))?;
                if kind == "ApplicationConfiguration"
                    && (item.get("Identifier").and_then(Value::as_string).is_none()
                        || item
                            .get("Configuration")
                            .and_then(Value::as_dictionary)
                            .is_none())
                {
                    return Err(invalid(
                        "an ApplicationConfiguration setting needs Identifier and Configuration",
                    ));
                }
            }
        }
        "DeviceInformation" => {
            let queries = body.get("Queries").and_then(Value::as_array);
            if queries.is_none_or(|q| q.is_empty()) {
                return Err(invalid("DeviceInformation needs at least one query"));
            }
        }
        _ => {}
    }
    Ok(())
}

fn convert(value: &Json, kind: Kind, name: &str) -> Result<Value, CommandError> {
    let wrong = |expected: &str| invalid(format!("{name} must be {expected}"));
    Ok(match kind {
        Kind::String => Value::String(value.as_str().ok_or_else(|| wrong("a string"))?.to_owned()),
        Kind::Integer => {
            let n = value.as_i64().ok_or_else(|| wrong("an integer"))?;
            Value::Integer(n.into())
        }
        Kind::Boolean => Value::Boolean(value.as_bool().ok_or_else(|| wrong("true or false"))?),
        Kind::Data => {
            let text = value.as_str().ok_or_else(|| wrong("base64 text"))?;
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|_| wrong("base64 text"))?;
            Value::Data(bytes)
        }
        Kind::Dictionary => {
            if !value.is_object() {
                return Err(wrong("an object"));
            }
            free_form(value, name, 0)?
        }
        Kind::ArrayOf(member) => {
            let items = value.as_array().ok_or_else(|| wrong("an array"))?;
            Value::Array(
                items
                    .iter()
                    .map(|item| convert(item, *member, name))
                    .collect::<Result<_, _>>()?,
            )
        }
    })
}

/// Deepest nesting of a free-form dictionary (a managed app configuration).
const MAX_FREE_FORM_DEPTH: usize = 16;

/// Any JSON value as plist: objects → dictionaries, integers → integer, other numbers → real.
/// Plist has no null, so null is refused rather than dropped.
fn free_form(value: &Json, name: &str, depth: usize) -> Result<Value, CommandError> {
    if depth > MAX_FREE_FORM_DEPTH {
        return Err(invalid(format!("{name} nests too deeply")));
    }
    Ok(match value {
        Json::Null => return Err(invalid(format!("{name}: plist has no null"))),
        Json::Bool(b) => Value::Boolean(*b),
        Json::Number(n) => match (n.as_i64(), n.as_u64(), n.as_f64()) {
            (Some(i), _, _) => Value::Integer(i.into()),
            (None, Some(u), _) => Value::Integer(u.into()),
            (_, _, Some(f)) => Value::Real(f),
            _ => return Err(invalid(format!("{name}: unrepresentable number"))),
        },
        Json::String(s) => Value::String(s.clone()),
        Json::Array(items) => Value::Array(
            items
                .iter()
                .map(|v| free_form(v, name, depth + 1))
                .collect::<Result<_, _>>()?,
        ),
        Json::Object(map) => {
            let mut dict = Dictionary::new();
            for (k, v) in map {
                dict.insert(k.clone(), free_form(v, name, depth + 1)?);
            }
            Value::Dictionary(dict)
        }
    })
}

/// A raw command plist: either `{Command: {...}}` (any CommandUUID in it is replaced) or the
/// bare command dictionary. Only `RequestType` is required; the device is the judge of the rest.
pub fn from_plist(bytes: &[u8]) -> Result<Command, CommandError> {
    let value = super::plist::parse_value(bytes).map_err(|e| invalid(e.to_string()))?;
    let mut dict = value
        .into_dictionary()
        .ok_or_else(|| invalid("a command plist is a dictionary"))?;
    let body = match dict.remove("Command") {
        Some(Value::Dictionary(inner)) => inner,
        Some(_) => return Err(invalid("Command must be a dictionary")),
        None => dict,
    };
    let request_type = body
        .get("RequestType")
        .and_then(Value::as_string)
        .filter(|t| !t.is_empty() && t.len() <= 128)
        .ok_or_else(|| invalid("the command needs a RequestType"))?
        .to_owned();
    Ok(Command { request_type, body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn typed_commands_convert_by_declared_type() {
        let c =
            from_json(&json!({"RequestType": "InstallProfile", "Payload": "PD94bWw="})).unwrap();
        assert_eq!(c.body["Payload"], Value::Data(b"<?xml".to_vec()));
        let c = from_json(&json!({
            "RequestType": "InstallApplication", "iTunesStoreID": 361309726,
            "Configuration": {"token": "abc", "port": 8443, "ratio": 0.5, "flags": [true]}
        }))
        .unwrap();
        let config = c.body["Configuration"].as_dictionary().unwrap();
        assert_eq!(config["port"], Value::Integer(8443.into()));
        assert_eq!(config["ratio"], Value::Real(0.5));
    }

    #[test]
    fn bad_commands_say_what_is_wrong() {
        let err = |v| from_json(&v).unwrap_err().to_string();
        assert!(err(json!({"RequestType": "DeviceLock", "Pin": "1"})).contains("no key Pin"));
        assert!(err(json!({"RequestType": "RemoveProfile"})).contains("needs Identifier"));
        assert!(err(json!({"RequestType": "InstallProfile", "Payload": "%%"})).contains("base64"));
        assert!(err(json!({"RequestType": "InstallApplication"})).contains("iTunesStoreID"));
        assert!(err(json!({"RequestType": "Bogus"})).contains("no typed support"));
        assert!(err(json!({"Queries": []})).contains("RequestType"));
        assert!(err(json!({"RequestType": "DeviceInformation", "Queries": []})).contains("query"));
        let settings =
            json!({"RequestType": "Settings", "Settings": [{"Item": "ApplicationConfiguration"}]});
        assert!(err(settings).contains("Identifier and Configuration"));
        let null = json!({"RequestType": "InstallApplication", "Identifier": "a", "Configuration": {"x": null}});
        assert!(err(null).contains("no null"));
    }

    #[test]
    fn fingerprints_ignore_the_uuid_and_envelopes_carry_it() {
        let a = from_json(&json!({"RequestType": "ProfileList"})).unwrap();
        let b = from_json(&json!({"RequestType": "ProfileList"})).unwrap();
        assert_eq!(a.fingerprint(), b.fingerprint());
        let wire = super::super::plist::parse_value(&a.envelope("u-1")).unwrap();
        let wire = wire.as_dictionary().unwrap();
        assert_eq!(wire["CommandUUID"], Value::String("u-1".into()));
        let raw = from_plist(&a.envelope("old")).unwrap();
        assert_eq!(raw.fingerprint(), a.fingerprint());
    }
}
