//! Checks plists the broker emits against Apple's device-management schema (YAML, copied into
//! tests/fixtures/apple-schemas): every key must be declared with the type the broker gives it,
//! and every required key must be there.

use plist::{Dictionary, Value};
use serde_norway::Value as Yaml;

fn fixtures() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/apple-schemas")
}

pub fn load(relative: &str) -> Yaml {
    let text = std::fs::read_to_string(fixtures().join(relative)).unwrap();
    serde_norway::from_str(&text).unwrap()
}

/// The `payloadkeys` of a schema file.
pub fn payload_keys(schema: &Yaml) -> Vec<Yaml> {
    schema["payloadkeys"]
        .as_sequence()
        .cloned()
        .unwrap_or_default()
}

/// Problems with `dict` against `keys` (each `{key, type, presence, subkeys}`); `extra` are
/// keys declared elsewhere (the common payload keys).
pub fn check(dict: &Dictionary, keys: &[Yaml], extra: &[Yaml], path: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let all: Vec<&Yaml> = keys.iter().chain(extra).collect();
    // A subkey named ANY stands for any key (free-form dictionaries), with its type.
    let any = all.iter().find(|k| k["key"].as_str() == Some("ANY"));
    for (name, value) in dict {
        match all.iter().find(|k| k["key"].as_str() == Some(name)).or(any) {
            None => problems.push(format!("{path}.{name}: not in Apple's schema")),
            Some(spec) => problems.extend(check_value(value, spec, &format!("{path}.{name}"))),
        }
    }
    for spec in keys {
        let name = spec["key"].as_str().unwrap_or_default();
        if name != "ANY"
            && spec["presence"].as_str() == Some("required")
            && !dict.contains_key(name)
        {
            problems.push(format!("{path}.{name}: required but missing"));
        }
    }
    problems
}

fn check_value(value: &Value, spec: &Yaml, path: &str) -> Vec<String> {
    let expected = spec["type"].as_str().unwrap_or_default();
    let actual = match value {
        Value::String(_) => "<string>",
        Value::Integer(_) => "<integer>",
        Value::Boolean(_) => "<boolean>",
        Value::Data(_) => "<data>",
        Value::Dictionary(_) => "<dictionary>",
        Value::Array(_) => "<array>",
        Value::Real(_) => "<real>",
        Value::Date(_) => "<date>",
        _ => "<other>",
    };
    if expected == "<any>" {
        return Vec::new();
    }
    if expected != actual {
        return vec![format!("{path}: {actual}, Apple's schema says {expected}")];
    }
    let subkeys: Vec<Yaml> = spec["subkeys"].as_sequence().cloned().unwrap_or_default();
    match value {
        Value::Dictionary(inner) if !subkeys.is_empty() => check(inner, &subkeys, &[], path),
        // An array's one subkey describes its members.
        Value::Array(items) if subkeys.len() == 1 => items
            .iter()
            .enumerate()
            .flat_map(|(i, item)| check_value(item, &subkeys[0], &format!("{path}[{i}]")))
            .collect(),
        _ => Vec::new(),
    }
}
