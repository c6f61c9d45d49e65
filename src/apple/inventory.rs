//! What devices report about themselves: DeviceInformation answers update the device's facts
//! and inventory, ProfileList and ManagedApplicationList answers its installed profiles and
//! managed apps (which the policy reconciler compares with what it installed).

use base64::Engine;
use plist::Value;
use serde_json::Value as Json;

use super::service::MdmError;
use crate::store::{CommandRecord, DeviceFacts, Store};

/// Updates the device from an Acknowledged result of `command`.
pub async fn absorb(
    store: &Store,
    device_id: &str,
    command: &CommandRecord,
    report: &Value,
) -> Result<(), MdmError> {
    let Some(result) = report.as_dictionary() else {
        return Ok(());
    };
    match command.request_type.as_str() {
        "DeviceInformation" => {
            let Some(responses) = result.get("QueryResponses").and_then(Value::as_dictionary)
            else {
                return Ok(());
            };
            let text = |key: &str| {
                responses
                    .get(key)
                    .and_then(Value::as_string)
                    .map(str::to_owned)
            };
            let facts = DeviceFacts {
                serial_number: text("SerialNumber"),
                model: text("Model"),
                model_name: text("ModelName"),
                product_name: text("ProductName"),
                device_name: text("DeviceName"),
                os_version: text("OSVersion"),
                build_version: text("BuildVersion"),
            };
            let inventory = to_json(&Value::Dictionary(responses.clone())).to_string();
            store
                .update_inventory(device_id, Some(&inventory), None, &facts)
                .await?;
        }
        "ProfileList" => {
            let Some(list) = result.get("ProfileList").and_then(Value::as_array) else {
                return Ok(());
            };
            let profiles = Json::Array(list.iter().map(to_json).collect()).to_string();
            store
                .update_inventory(device_id, None, Some(&profiles), &DeviceFacts::default())
                .await?;
        }
        "ManagedApplicationList" => {
            let Some(apps) = result
                .get("ManagedApplicationList")
                .and_then(Value::as_dictionary)
            else {
                return Ok(());
            };
            let apps = to_json(&Value::Dictionary(apps.clone())).to_string();
            store.update_managed_apps(device_id, &apps).await?;
        }
        _ => {}
    }
    Ok(())
}

/// A plist value as JSON: data becomes base64 text, dates RFC 3339 text.
pub fn to_json(value: &Value) -> Json {
    match value {
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Dictionary(dict) => {
            Json::Object(dict.iter().map(|(k, v)| (k.clone(), to_json(v))).collect())
        }
        Value::Boolean(b) => Json::Bool(*b),
        Value::Data(bytes) => Json::String(base64::engine::general_purpose::STANDARD.encode(bytes)),
        Value::Date(date) => Json::String(date.to_xml_format()),
        Value::Real(f) => serde_json::Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::Integer(i) => i
            .as_signed()
            .map(Json::from)
            .or_else(|| i.as_unsigned().map(Json::from))
            .unwrap_or(Json::Null),
        Value::String(s) => Json::String(s.clone()),
        Value::Uid(uid) => Json::from(uid.get()),
        _ => Json::Null,
    }
}
