//! `${...}` variables in policy templates: found and checked when a policy is loaded, resolved
//! per device when its desired state is computed.
//!
//! `$${` stands for a literal `${` (and resolves to it); a `$` not followed by `{` is literal.

use std::borrow::Cow;
use std::collections::BTreeSet;

use plist::{Dictionary, Value};

use super::model::{Variable, VariableValues};

/// Longest name accepted between `${` and `}`: the known ones are far shorter, and a longer one
/// is a typo that should not be echoed back in full.
const MAX_NAME: usize = 64;

/// One piece of a template string.
enum Piece<'a> {
    Literal(&'a str),
    Variable(Variable),
}

/// Splits `text` into literal text and variables; calls `each` in order. An unknown variable or
/// an unclosed `${` is an error that names it.
fn scan<'a>(text: &'a str, mut each: impl FnMut(Piece<'a>)) -> Result<(), String> {
    let mut rest = text;
    while let Some(at) = rest.find('$') {
        let (before, from_dollar) = rest.split_at(at);
        if let Some(after) = from_dollar.strip_prefix("$${") {
            // Escaped: the literal is everything up to and including one `$` and the `{`.
            each(Piece::Literal(before));
            each(Piece::Literal("${"));
            rest = after;
        } else if let Some(after) = from_dollar.strip_prefix("${") {
            each(Piece::Literal(before));
            let Some(end) = after.find('}') else {
                return Err(format!(
                    "`${{` without a closing `}}` (write `$${{` for a literal `${{`); {}",
                    known_list()
                ));
            };
            let (name, after_name) = after.split_at(end);
            let variable = Variable::from_name(name.trim()).ok_or_else(|| {
                let shown: String = name.chars().take(MAX_NAME).collect();
                format!("unknown variable `${{{shown}}}`; {}", known_list())
            })?;
            each(Piece::Variable(variable));
            rest = after_name.get(1..).unwrap_or_default();
        } else {
            // A lone `$` (or `$$` not before `{`): literal, up to and including it.
            let (literal, after) = rest.split_at(at + 1);
            each(Piece::Literal(literal));
            rest = after;
        }
    }
    each(Piece::Literal(rest));
    Ok(())
}

fn known_list() -> String {
    let names: Vec<String> = Variable::known_names()
        .iter()
        .map(|name| format!("${{{name}}}"))
        .collect();
    format!("known variables: {}", names.join(", "))
}

/// The variables `text` uses. An unknown name or an unclosed `${` is an error naming it and
/// listing the known ones.
pub fn variables_in(text: &str) -> Result<BTreeSet<Variable>, String> {
    let mut found = BTreeSet::new();
    if !text.contains("${") {
        return Ok(found);
    }
    scan(text, |piece| {
        if let Piece::Variable(v) = piece {
            found.insert(v);
        }
    })?;
    Ok(found)
}

/// The variables used by every string value in `dictionary`, recursively (keys are not
/// templates). The error is the first bad string's message, with the key path in front.
pub fn variables_in_dictionary(dictionary: &Dictionary) -> Result<BTreeSet<Variable>, String> {
    let mut found = BTreeSet::new();
    let mut path = String::new();
    collect_dictionary(dictionary, &mut path, &mut found)?;
    Ok(found)
}

fn collect_dictionary(
    dictionary: &Dictionary,
    path: &mut String,
    found: &mut BTreeSet<Variable>,
) -> Result<(), String> {
    for (key, value) in dictionary {
        let len = path.len();
        if !path.is_empty() {
            path.push('.');
        }
        path.push_str(key);
        collect_value(value, path, found)?;
        path.truncate(len);
    }
    Ok(())
}

fn collect_value(
    value: &Value,
    path: &mut String,
    found: &mut BTreeSet<Variable>,
) -> Result<(), String> {
    match value {
        Value::String(text) => {
            found.extend(variables_in(text).map_err(|e| format!("{path}: {e}"))?);
        }
        Value::Dictionary(d) => collect_dictionary(d, path, found)?,
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                let len = path.len();
                path.push_str(&format!("[{index}]"));
                collect_value(item, path, found)?;
                path.truncate(len);
            }
        }
        _ => {}
    }
    Ok(())
}

/// `text` with its variables replaced by `values`. Text without `${` is borrowed as is.
/// `Err`: the first variable that has no value. An unknown name (which loading refuses) is
/// left as written.
pub fn resolve_str<'a>(text: &'a str, values: &VariableValues) -> Result<Cow<'a, str>, Variable> {
    if !text.contains("${") {
        return Ok(Cow::Borrowed(text));
    }
    let mut out = String::with_capacity(text.len());
    let mut missing = None;
    let scanned = scan(text, |piece| match piece {
        Piece::Literal(literal) => out.push_str(literal),
        Piece::Variable(v) => match values.get(&v) {
            Some(value) => out.push_str(value),
            None => {
                missing.get_or_insert(v);
            }
        },
    });
    if let Some(v) = missing {
        return Err(v);
    }
    if scanned.is_err() {
        return Ok(Cow::Borrowed(text));
    }
    Ok(Cow::Owned(out))
}

/// `template` with every string value resolved, recursively (keys are not templates).
/// `Err`: the first variable that has no value for this device.
pub fn resolve_dictionary(
    template: &Dictionary,
    values: &VariableValues,
) -> Result<Dictionary, Variable> {
    let mut out = Dictionary::new();
    for (key, value) in template {
        out.insert(key.clone(), resolve_value(value, values)?);
    }
    Ok(out)
}

/// One value resolved as [`resolve_dictionary`] does.
pub fn resolve_value(value: &Value, values: &VariableValues) -> Result<Value, Variable> {
    Ok(match value {
        Value::String(text) => Value::String(resolve_str(text, values)?.into_owned()),
        Value::Dictionary(d) => Value::Dictionary(resolve_dictionary(d, values)?),
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| resolve_value(item, values))
                .collect::<Result<_, _>>()?,
        ),
        other => other.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values() -> VariableValues {
        VariableValues {
            user_email: Some("carol@example.org".into()),
            user_login: Some("carol".into()),
            device_serial_number: Some("C02XYZ".into()),
            ..VariableValues::default()
        }
    }

    #[test]
    fn finds_known_variables() {
        let found =
            variables_in("${user.email} on ${device.serial_number}, ${ user.email }").unwrap();
        assert_eq!(
            found.into_iter().collect::<Vec<_>>(),
            vec![Variable::UserEmail, Variable::DeviceSerialNumber]
        );
        assert!(
            variables_in("no variables, $5, $$ and $${user.email}")
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn unknown_variable_is_named_with_the_known_ones() {
        let err = variables_in("hello ${user.mail}").unwrap_err();
        assert!(err.contains("unknown variable `${user.mail}`"), "{err}");
        assert!(err.contains("${user.email}"), "{err}");
        let err = variables_in("hello ${user.email").unwrap_err();
        assert!(err.contains("without a closing"), "{err}");
    }

    #[test]
    fn resolves_strings_and_escapes() {
        let v = values();
        assert_eq!(resolve_str("${user.login}@corp", &v).unwrap(), "carol@corp");
        assert_eq!(
            resolve_str("cost $5 $${user.login}", &v).unwrap(),
            "cost $5 ${user.login}"
        );
        assert!(matches!(
            resolve_str("plain", &v).unwrap(),
            Cow::Borrowed("plain")
        ));
        assert_eq!(
            resolve_str("${device.udid}", &v).unwrap_err(),
            Variable::DeviceUdid
        );
        // A value is inserted as is, never read as a template itself.
        let tricky = VariableValues {
            user_login: Some("${user.email}".into()),
            ..values()
        };
        assert_eq!(
            resolve_str("${user.login}", &tricky).unwrap(),
            "${user.email}"
        );
    }

    #[test]
    fn resolves_dictionaries_recursively_values_only() {
        let mut inner = Dictionary::new();
        inner.insert(
            "${user.login}".into(),
            Value::String("${user.email}".into()),
        );
        inner.insert("n".into(), Value::Integer(3.into()));
        let mut template = Dictionary::new();
        template.insert("inner".into(), Value::Dictionary(inner));
        template.insert(
            "list".into(),
            Value::Array(vec![Value::String("${device.serial_number}".into())]),
        );
        let resolved = resolve_dictionary(&template, &values()).unwrap();
        let inner = resolved["inner"].as_dictionary().unwrap();
        assert_eq!(
            inner["${user.login}"].as_string(),
            Some("carol@example.org")
        );
        assert_eq!(inner["n"].as_signed_integer(), Some(3));
        assert_eq!(
            resolved["list"].as_array().unwrap()[0].as_string(),
            Some("C02XYZ")
        );
        assert_eq!(
            variables_in_dictionary(&template).unwrap(),
            BTreeSet::from([Variable::UserEmail, Variable::DeviceSerialNumber])
        );

        let mut missing = Dictionary::new();
        missing.insert("udid".into(), Value::String("${device.udid}".into()));
        assert_eq!(
            resolve_dictionary(&missing, &values()).unwrap_err(),
            Variable::DeviceUdid
        );
    }
}
