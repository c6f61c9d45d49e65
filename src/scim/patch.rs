//! PATCH (RFC 7644 §3.5.2) as Okta and Entra ID send it: `op` in any case (`"Replace"`),
//! `path` absent with an object value, `attr`, `attr.sub`, `urn:…:attr`,
//! `attr[filter]` and `attr[filter].sub`, booleans as strings (`"False"`), and group members
//! added, removed (`members[value eq "id"]`) or replaced in batches.

use std::collections::BTreeSet;

use serde_json::{Map, Value as Json};

use super::error::ScimError;
use super::filter::{self, AttrPath, Filter, Op, get_ci};
use super::resources::{
    self, Attr, ENTERPRISE_ATTRS, ENTERPRISE_SCHEMA, Kind, USER_ATTRS, USER_SCHEMA, clean_value,
};

/// Most operations in one PATCH request.
pub const MAX_OPERATIONS: usize = 1000;
/// Most member references (added, removed or replaced) in one request.
pub const MAX_MEMBERS: usize = 10_000;
/// Longest PATCH path.
const MAX_PATH: usize = 1024;
/// Longest member ID (ours are UUIDs).
const MAX_MEMBER_ID: usize = 128;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PatchOp {
    Add,
    Remove,
    Replace,
}

#[derive(Clone, Debug)]
pub struct Operation {
    pub op: PatchOp,
    pub path: Option<String>,
    pub value: Option<Json>,
}

/// Reads a PatchOp message: its schema and its bounded list of operations.
pub fn parse_request(body: &Json) -> Result<Vec<Operation>, ScimError> {
    let schemas_ok = get_ci(body, "schemas")
        .and_then(Json::as_array)
        .is_none_or(|s| {
            s.iter()
                .any(|s| s.as_str() == Some(resources::PATCH_SCHEMA))
        });
    if !schemas_ok {
        return Err(ScimError::invalid_syntax(format!(
            "a PATCH body's schemas must include {}",
            resources::PATCH_SCHEMA
        )));
    }
    let operations = get_ci(body, "Operations")
        .and_then(Json::as_array)
        .ok_or_else(|| ScimError::invalid_syntax("a PATCH body needs an 'Operations' array"))?;
    if operations.len() > MAX_OPERATIONS {
        return Err(ScimError::too_large(format!(
            "a PATCH request may carry at most {MAX_OPERATIONS} operations"
        )));
    }
    operations
        .iter()
        .map(|operation| {
            let op = match get_ci(operation, "op").and_then(Json::as_str) {
                Some(op) if op.eq_ignore_ascii_case("add") => PatchOp::Add,
                Some(op) if op.eq_ignore_ascii_case("remove") => PatchOp::Remove,
                Some(op) if op.eq_ignore_ascii_case("replace") => PatchOp::Replace,
                other => {
                    return Err(ScimError::invalid_syntax(format!(
                        "unknown PATCH op {other:?}: use add, remove or replace"
                    )));
                }
            };
            let path = match get_ci(operation, "path") {
                None | Some(Json::Null) => None,
                Some(Json::String(p)) if p.trim().is_empty() => None,
                Some(Json::String(p)) if p.len() <= MAX_PATH => Some(p.trim().to_string()),
                Some(_) => return Err(ScimError::invalid_path("'path' must be a short string")),
            };
            let value = get_ci(operation, "value").cloned();
            if path.is_none() && op != PatchOp::Remove && !matches!(value, Some(Json::Object(_))) {
                return Err(ScimError::invalid_syntax(
                    "an operation without a path needs an object value",
                ));
            }
            if path.is_none() && op == PatchOp::Remove {
                return Err(ScimError::new(
                    axum::http::StatusCode::BAD_REQUEST,
                    Some("noTarget"),
                    "a remove operation needs a path",
                ));
            }
            Ok(Operation { op, path, value })
        })
        .collect()
}

/// A PATCH path: `attr[.sub]`, `attr[filter]`, `attr[filter].sub` (with an optional URN).
#[derive(Clone, Debug)]
struct Path {
    attr: AttrPath,
    filter: Option<Filter>,
}

fn parse_path(text: &str) -> Result<Path, ScimError> {
    let bad = || ScimError::invalid_path(format!("'{text}' is not a valid path"));
    match text.find('[') {
        None => Ok(Path {
            attr: filter::parse_attr_path(text).ok_or_else(bad)?,
            filter: None,
        }),
        Some(open) => {
            let close = text.rfind(']').filter(|c| *c > open).ok_or_else(bad)?;
            let head = text.get(..open).ok_or_else(bad)?;
            let inner = text.get(open + 1..close).ok_or_else(bad)?;
            let tail = text.get(close + 1..).ok_or_else(bad)?;
            let mut attr = filter::parse_attr_path(head).ok_or_else(bad)?;
            if attr.sub.is_some() {
                return Err(bad());
            }
            if let Some(sub) = tail.strip_prefix('.') {
                attr.sub = Some(sub.to_string());
                if filter::parse_attr_path(sub)
                    .is_none_or(|p| p.sub.is_some() || p.schema.is_some())
                {
                    return Err(bad());
                }
            } else if !tail.is_empty() {
                return Err(bad());
            }
            let filter = filter::parse(inner).map_err(|e| ScimError::invalid_path(e.detail))?;
            Ok(Path {
                attr,
                filter: Some(filter),
            })
        }
    }
}

/// Applies `operations` to a (cleaned) User resource; the caller cleans the result again.
pub fn apply_to_user(resource: &mut Json, operations: &[Operation]) -> Result<(), ScimError> {
    for operation in operations {
        match &operation.path {
            Some(path) => apply_user_path(resource, operation.op, path, operation.value.as_ref())?,
            None => {
                let Some(Json::Object(values)) = &operation.value else {
                    continue;
                };
                for (key, value) in values {
                    if key.eq_ignore_ascii_case(ENTERPRISE_SCHEMA) {
                        let Json::Object(ext) = value else {
                            return Err(ScimError::invalid_value(
                                "the enterprise extension must be an object",
                            ));
                        };
                        for (name, v) in ext {
                            let path = format!("{ENTERPRISE_SCHEMA}:{name}");
                            apply_user_path(resource, operation.op, &path, Some(v))?;
                        }
                        continue;
                    }
                    // Without a path, unknown or read-only attributes (id, schemas, meta) are
                    // ignored, as in a PUT.
                    if known_user_path(key) {
                        apply_user_path(resource, operation.op, key, Some(value))?;
                    }
                }
            }
        }
    }
    Ok(())
}

fn known_user_path(key: &str) -> bool {
    parse_path(key)
        .ok()
        .and_then(|p| locate(&p.attr).ok())
        .is_some()
}

/// Which attribute table and which container (top level or the extension) a path names.
fn locate(attr: &AttrPath) -> Result<(Attr, bool), ScimError> {
    let in_extension = match &attr.schema {
        None => false,
        Some(s) if s.eq_ignore_ascii_case(USER_SCHEMA) => false,
        Some(s) if s.eq_ignore_ascii_case(ENTERPRISE_SCHEMA) => true,
        Some(s) => return Err(ScimError::invalid_path(format!("unknown schema '{s}'"))),
    };
    let table = if in_extension {
        ENTERPRISE_ATTRS
    } else {
        USER_ATTRS
    };
    let found = resources::find_attr(table, &attr.name)
        .ok_or_else(|| ScimError::invalid_path(format!("unknown attribute '{}'", attr.name)))?;
    if let Some(sub) = &attr.sub
        && resources::find_sub(found.kind, sub).is_none()
    {
        return Err(ScimError::invalid_path(format!(
            "unknown sub-attribute '{}.{sub}'",
            found.name
        )));
    }
    Ok((found, in_extension))
}

fn container(resource: &mut Json, in_extension: bool) -> Result<&mut Map<String, Json>, ScimError> {
    let top = resource
        .as_object_mut()
        .ok_or_else(|| ScimError::internal(&"a stored resource is not an object"))?;
    if !in_extension {
        return Ok(top);
    }
    let ext = top
        .entry(ENTERPRISE_SCHEMA.to_string())
        .or_insert_with(|| Json::Object(Map::new()));
    if !ext.is_object() {
        *ext = Json::Object(Map::new());
    }
    ext.as_object_mut()
        .ok_or_else(|| ScimError::internal(&"the extension is not an object"))
}

fn sub_value(attr: Attr, sub: &str, value: Option<&Json>) -> Result<Json, ScimError> {
    let value = value
        .ok_or_else(|| ScimError::invalid_value(format!("'{}.{sub}' needs a value", attr.name)))?;
    if sub == "primary" {
        return resources::as_bool(value).map(Json::Bool).ok_or_else(|| {
            ScimError::invalid_value(format!("'{}.primary' must be a boolean", attr.name))
        });
    }
    match value {
        Json::String(s) => Ok(Json::String(s.clone())),
        _ => Err(ScimError::invalid_value(format!(
            "'{}.{sub}' must be a string",
            attr.name
        ))),
    }
}

/// The value of a simple `type eq "work"` filter: lets an add or replace through such a path
/// create the element when there is none (Entra's `emails[type eq "work"].value`).
fn simple_type(filter: &Filter) -> Option<(String, String)> {
    match filter {
        Filter::Compare(path, Op::Eq, Json::String(value))
            if path.sub.is_none() && path.schema.is_none() =>
        {
            Some((path.name.clone(), value.clone()))
        }
        _ => None,
    }
}

fn apply_user_path(
    resource: &mut Json,
    op: PatchOp,
    text: &str,
    value: Option<&Json>,
) -> Result<(), ScimError> {
    // The extension itself as the path, with an object of its attributes.
    if text.eq_ignore_ascii_case(ENTERPRISE_SCHEMA) {
        if op == PatchOp::Remove {
            if let Some(map) = resource.as_object_mut() {
                map.remove(ENTERPRISE_SCHEMA);
            }
            return Ok(());
        }
        let Some(Json::Object(ext)) = value else {
            return Err(ScimError::invalid_value(
                "the enterprise extension must be an object",
            ));
        };
        for (name, v) in ext {
            apply_user_path(
                resource,
                op,
                &format!("{ENTERPRISE_SCHEMA}:{name}"),
                Some(v),
            )?;
        }
        return Ok(());
    }
    let path = parse_path(text)?;
    let (attr, in_extension) = locate(&path.attr)?;
    let sub = path
        .attr
        .sub
        .as_deref()
        .and_then(|s| resources::find_sub(attr.kind, s));
    let map = container(resource, in_extension)?;
    match (&path.filter, sub) {
        (None, None) => match op {
            PatchOp::Remove => {
                match (attr.kind, value, map.get_mut(attr.name)) {
                    // Remove with a value on a multi-valued attribute: those values only.
                    (Kind::Multi(_), Some(v), Some(Json::Array(items))) => {
                        let gone = clean_value(attr, v)?;
                        let gone: Vec<Json> = gone.as_array().cloned().unwrap_or_default();
                        items.retain(|item| !gone.contains(item));
                    }
                    _ => {
                        map.remove(attr.name);
                    }
                }
            }
            PatchOp::Add | PatchOp::Replace => {
                let value = value.ok_or_else(|| {
                    ScimError::invalid_value(format!("'{}' needs a value", attr.name))
                })?;
                let cleaned = clean_value(attr, value)?;
                match (attr.kind, op, map.get_mut(attr.name), cleaned) {
                    (_, _, _, Json::Null) => {
                        map.remove(attr.name);
                    }
                    (Kind::Multi(_), PatchOp::Add, Some(Json::Array(items)), Json::Array(new)) => {
                        for item in new {
                            if !items.contains(&item) {
                                items.push(item);
                            }
                        }
                    }
                    (Kind::Complex(_), _, Some(Json::Object(old)), Json::Object(new)) => {
                        old.extend(new);
                    }
                    (_, _, _, cleaned) => {
                        map.insert(attr.name.to_string(), cleaned);
                    }
                }
            }
        },
        (None, Some(sub)) => {
            let entry = map.entry(attr.name.to_string());
            match attr.kind {
                Kind::Complex(_) => {
                    let object = entry.or_insert_with(|| Json::Object(Map::new()));
                    if let Some(object) = object.as_object_mut() {
                        if op == PatchOp::Remove {
                            object.remove(sub);
                        } else {
                            object.insert(sub.to_string(), sub_value(attr, sub, value)?);
                        }
                    }
                }
                _ => {
                    // `emails.value`: every element; an add or replace on none creates one.
                    let list = entry.or_insert_with(|| Json::Array(Vec::new()));
                    if let Some(items) = list.as_array_mut() {
                        if op != PatchOp::Remove && items.is_empty() {
                            items.push(Json::Object(Map::new()));
                        }
                        for item in items.iter_mut().filter_map(Json::as_object_mut) {
                            if op == PatchOp::Remove {
                                item.remove(sub);
                            } else {
                                item.insert(sub.to_string(), sub_value(attr, sub, value)?);
                            }
                        }
                    }
                }
            }
        }
        (Some(filter), sub) => {
            if !matches!(attr.kind, Kind::Multi(_)) {
                return Err(ScimError::invalid_path(format!(
                    "'{}' is not multi-valued: no filter applies",
                    attr.name
                )));
            }
            let list = map
                .entry(attr.name.to_string())
                .or_insert_with(|| Json::Array(Vec::new()));
            let Some(items) = list.as_array_mut() else {
                return Err(ScimError::internal(
                    &"a multi-valued attribute is not a list",
                ));
            };
            let matched = items.iter().filter(|i| filter.matches(i)).count();
            match (op, sub) {
                (PatchOp::Remove, None) => items.retain(|i| !filter.matches(i)),
                (PatchOp::Remove, Some(sub)) => {
                    for item in items.iter_mut().filter(|i| filter.matches(i)) {
                        if let Some(object) = item.as_object_mut() {
                            object.remove(sub);
                        }
                    }
                }
                (_, Some(sub)) => {
                    let new = sub_value(attr, sub, value)?;
                    if matched == 0 {
                        let (key, wanted) = simple_type(filter).ok_or_else(|| {
                            ScimError::new(
                                axum::http::StatusCode::BAD_REQUEST,
                                Some("noTarget"),
                                format!("no value of '{}' matches the filter", attr.name),
                            )
                        })?;
                        let key = resources::find_sub(attr.kind, &key).ok_or_else(|| {
                            ScimError::invalid_path(format!("unknown sub-attribute '{key}'"))
                        })?;
                        let mut element = Map::new();
                        element.insert(key.to_string(), Json::String(wanted));
                        element.insert(sub.to_string(), new);
                        items.push(Json::Object(element));
                    } else {
                        for item in items.iter_mut().filter(|i| filter.matches(i)) {
                            if let Some(object) = item.as_object_mut() {
                                object.insert(sub.to_string(), new.clone());
                            }
                        }
                    }
                }
                (_, None) => {
                    let value = value.ok_or_else(|| {
                        ScimError::invalid_value(format!("'{}' needs a value", attr.name))
                    })?;
                    let cleaned = clean_value(attr, value)?;
                    let replacement = cleaned
                        .as_array()
                        .and_then(|a| a.first())
                        .cloned()
                        .ok_or_else(|| ScimError::invalid_value("an empty value"))?;
                    if matched == 0 {
                        return Err(ScimError::new(
                            axum::http::StatusCode::BAD_REQUEST,
                            Some("noTarget"),
                            format!("no value of '{}' matches the filter", attr.name),
                        ));
                    }
                    for item in items.iter_mut().filter(|i| filter.matches(i)) {
                        if let (Some(old), Some(new)) =
                            (item.as_object_mut(), replacement.as_object())
                        {
                            old.extend(new.clone());
                        }
                    }
                }
            }
        }
    }
    Ok(())
}

/// What a Group PATCH asks for.
#[derive(Clone, Debug, Default)]
pub struct GroupPatch {
    pub display_name: Option<String>,
    pub external_id: Option<String>,
    pub members: Vec<MemberOp>,
}

#[derive(Clone, Debug)]
pub enum MemberOp {
    Add(Vec<String>),
    Remove(Vec<String>),
    /// `members[filter]` other than `value eq "…"`: matched against the current members.
    RemoveWhere(Filter),
    Replace(Vec<String>),
}

/// The member IDs of a `members` value: `[{"value": "id"}, …]` (or one such object).
pub fn member_ids(value: Option<&Json>) -> Result<Vec<String>, ScimError> {
    let items: Vec<&Json> = match value {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::Array(items)) => items.iter().collect(),
        Some(one) => vec![one],
    };
    if items.len() > MAX_MEMBERS {
        return Err(ScimError::too_large(format!(
            "at most {MAX_MEMBERS} members may be given in one request"
        )));
    }
    items
        .into_iter()
        .map(|item| match get_ci(item, "value") {
            Some(Json::String(id)) if !id.is_empty() && id.len() <= MAX_MEMBER_ID => Ok(id.clone()),
            _ => Err(ScimError::invalid_value(
                "each member must be an object with a 'value' (the user's id)",
            )),
        })
        .collect()
}

/// `value eq "a" or value eq "b"`: the IDs, when the filter is only that.
fn eq_values(filter: &Filter, out: &mut Vec<String>) -> bool {
    match filter {
        Filter::Compare(path, Op::Eq, Json::String(id))
            if path.schema.is_none()
                && path.sub.is_none()
                && path.name.eq_ignore_ascii_case("value") =>
        {
            out.push(id.clone());
            true
        }
        Filter::Or(a, b) => eq_values(a, out) && eq_values(b, out),
        _ => false,
    }
}

fn group_path(
    patch: &mut GroupPatch,
    op: PatchOp,
    text: &str,
    value: Option<&Json>,
) -> Result<(), ScimError> {
    let path = parse_path(text)?;
    let qualified_ok = path
        .attr
        .schema
        .as_deref()
        .is_none_or(|s| s.eq_ignore_ascii_case(resources::GROUP_SCHEMA));
    if !qualified_ok {
        return Err(ScimError::invalid_path(format!(
            "'{text}' is not a Group attribute"
        )));
    }
    let name = path.attr.name.to_ascii_lowercase();
    match (name.as_str(), &path.filter, path.attr.sub.as_deref()) {
        ("members", None, None) => {
            let ids = member_ids(value)?;
            patch.members.push(match op {
                PatchOp::Add => MemberOp::Add(ids),
                PatchOp::Replace => MemberOp::Replace(ids),
                // Remove without a value: every member.
                PatchOp::Remove if value.is_none() => MemberOp::Replace(Vec::new()),
                PatchOp::Remove => MemberOp::Remove(ids),
            });
        }
        ("members", Some(filter), None) if op == PatchOp::Remove => {
            let mut ids = Vec::new();
            patch.members.push(if eq_values(filter, &mut ids) {
                MemberOp::Remove(ids)
            } else {
                MemberOp::RemoveWhere(filter.clone())
            });
        }
        ("displayname", None, None) if op != PatchOp::Remove => match value {
            Some(Json::String(name)) if !name.trim().is_empty() && name.len() <= 1024 => {
                patch.display_name = Some(name.clone());
            }
            _ => {
                return Err(ScimError::invalid_value(
                    "'displayName' must be a non-empty string",
                ));
            }
        },
        ("externalid", None, None) if op != PatchOp::Remove => match value {
            Some(Json::String(id)) => patch.external_id = Some(id.clone()),
            _ => return Err(ScimError::invalid_value("'externalId' must be a string")),
        },
        ("id" | "meta" | "schemas", _, _) => {
            return Err(ScimError::new(
                axum::http::StatusCode::BAD_REQUEST,
                Some("mutability"),
                format!("'{text}' cannot be changed"),
            ));
        }
        _ => {
            return Err(ScimError::invalid_path(format!(
                "'{text}' is not a path this server can {op:?} on a Group"
            )));
        }
    }
    Ok(())
}

/// Reads the operations of a Group PATCH.
pub fn group_patch(operations: &[Operation]) -> Result<GroupPatch, ScimError> {
    let mut patch = GroupPatch::default();
    for operation in operations {
        match &operation.path {
            Some(path) => group_path(&mut patch, operation.op, path, operation.value.as_ref())?,
            None => {
                let Some(Json::Object(values)) = &operation.value else {
                    continue;
                };
                for (key, value) in values {
                    let lower = key.to_ascii_lowercase();
                    // Okta's rename carries the id along; read-only keys are ignored here.
                    if matches!(lower.as_str(), "id" | "schemas" | "meta") {
                        continue;
                    }
                    group_path(&mut patch, operation.op, key, Some(value))?;
                }
            }
        }
        let referenced: usize = patch
            .members
            .iter()
            .map(|m| match m {
                MemberOp::Add(ids) | MemberOp::Remove(ids) | MemberOp::Replace(ids) => ids.len(),
                MemberOp::RemoveWhere(_) => 0,
            })
            .sum();
        if referenced > MAX_MEMBERS {
            return Err(ScimError::too_large(format!(
                "at most {MAX_MEMBERS} members may be given in one request"
            )));
        }
    }
    Ok(patch)
}

/// How member operations change a group, given (only when a `RemoveWhere` needs them) its
/// current members: either a delta or a whole new list.
pub fn plan_members(
    ops: &[MemberOp],
    current: Option<&BTreeSet<String>>,
) -> crate::store::MemberChange {
    let mut replace: Option<BTreeSet<String>> = None;
    let mut add: BTreeSet<String> = BTreeSet::new();
    let mut remove: BTreeSet<String> = BTreeSet::new();
    for op in ops {
        match op {
            MemberOp::Replace(ids) => {
                replace = Some(ids.iter().cloned().collect());
                add.clear();
                remove.clear();
            }
            MemberOp::Add(ids) => {
                for id in ids {
                    match &mut replace {
                        Some(set) => {
                            set.insert(id.clone());
                        }
                        None => {
                            remove.remove(id);
                            add.insert(id.clone());
                        }
                    }
                }
            }
            MemberOp::Remove(ids) => {
                for id in ids {
                    match &mut replace {
                        Some(set) => {
                            set.remove(id);
                        }
                        None => {
                            add.remove(id);
                            remove.insert(id.clone());
                        }
                    }
                }
            }
            MemberOp::RemoveWhere(filter) => {
                let now: BTreeSet<String> = match &replace {
                    Some(set) => set.clone(),
                    None => current
                        .map(|c| {
                            c.union(&add)
                                .filter(|id| !remove.contains(*id))
                                .cloned()
                                .collect()
                        })
                        .unwrap_or_default(),
                };
                let gone: Vec<String> = now
                    .into_iter()
                    .filter(|id| filter.matches(&serde_json::json!({"value": id})))
                    .collect();
                for id in gone {
                    match &mut replace {
                        Some(set) => {
                            set.remove(&id);
                        }
                        None => {
                            add.remove(&id);
                            remove.insert(id);
                        }
                    }
                }
            }
        }
    }
    match replace {
        Some(set) => crate::store::MemberChange::Replace(set.into_iter().collect()),
        None => crate::store::MemberChange::Delta {
            add: add.into_iter().collect(),
            remove: remove.into_iter().collect(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemberChange;
    use serde_json::json;

    fn ops(body: Json) -> Vec<Operation> {
        parse_request(&body).unwrap()
    }

    fn patched(user: Json, body: Json) -> Result<Json, ScimError> {
        let mut user = resources::clean_user(&user).unwrap();
        apply_to_user(&mut user, &parse_request(&body)?)?;
        resources::clean_user(&user)
    }

    #[test]
    fn okta_and_entra_user_patches_apply() {
        let user = json!({"userName": "a@x", "active": true, "name": {"givenName": "A", "familyName": "B"},
                          "emails": [{"value": "a@x", "type": "work", "primary": true}]});
        // Okta: replace without a path.
        let okta = json!({"schemas": [resources::PATCH_SCHEMA],
                          "Operations": [{"op": "replace", "value": {"active": false}}]});
        assert_eq!(patched(user.clone(), okta).unwrap()["active"], false);
        // Entra: capitalised op, a path, a boolean as a string.
        let entra = json!({"schemas": [resources::PATCH_SCHEMA], "Operations": [
            {"op": "Replace", "path": "active", "value": "False"},
            {"op": "Replace", "path": "emails[type eq \"work\"].value", "value": "new@x"},
            {"op": "Add", "path": "phoneNumbers[type eq \"mobile\"].value", "value": "+1 555"},
            {"op": "Replace", "path": "name.givenName", "value": "Ann"},
            {"op": "Add", "path": "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department", "value": "R&D"},
            {"op": "Remove", "path": "title"},
            {"op": "Replace", "value": {"displayName": "Ann B", "name.familyName": "Bee", "id": "x"}}
        ]});
        let out = patched(user.clone(), entra).unwrap();
        assert_eq!(out["active"], false);
        assert_eq!(out["emails"][0]["value"], "new@x");
        assert_eq!(
            out["phoneNumbers"],
            json!([{"type": "mobile", "value": "+1 555"}])
        );
        assert_eq!(
            out["name"],
            json!({"givenName": "Ann", "familyName": "Bee"})
        );
        assert_eq!(out["displayName"], "Ann B");
        assert_eq!(out[ENTERPRISE_SCHEMA]["department"], "R&D");
        let removed = patched(
            user,
            json!({"Operations": [{"op": "remove", "path": "emails[type eq \"work\"]"}]}),
        )
        .unwrap();
        assert_eq!(removed["emails"], json!([]));
    }

    #[test]
    fn invalid_user_patches_are_refused() {
        let user = json!({"userName": "a@x"});
        for (body, scim_type) in [
            (
                json!({"Operations": [{"op": "replace", "path": "favouriteColour", "value": "x"}]}),
                "invalidPath",
            ),
            (
                json!({"Operations": [{"op": "replace", "path": "name.shoeSize", "value": "x"}]}),
                "invalidPath",
            ),
            (
                json!({"Operations": [{"op": "replace", "path": "emails[type eq ", "value": "x"}]}),
                "invalidPath",
            ),
            (
                json!({"Operations": [{"op": "replace", "path": "urn:evil:Thing:x", "value": "x"}]}),
                "invalidPath",
            ),
            (
                json!({"Operations": [{"op": "replace", "path": "userName[value eq \"a\"]", "value": "x"}]}),
                "invalidPath",
            ),
            (
                json!({"Operations": [{"op": "replace", "path": "active", "value": "maybe"}]}),
                "invalidValue",
            ),
            (json!({"Operations": [{"op": "remove"}]}), "noTarget"),
            (
                json!({"Operations": [{"op": "move", "path": "title"}]}),
                "invalidSyntax",
            ),
            (
                json!({"Operations": [{"op": "replace", "value": "x"}]}),
                "invalidSyntax",
            ),
            (json!({"operations": "x"}), "invalidSyntax"),
        ] {
            let err = patched(user.clone(), body.clone()).unwrap_err();
            assert_eq!(err.scim_type, Some(scim_type), "{body}");
        }
    }

    #[test]
    fn group_patches_plan_deltas() {
        let entra = ops(json!({"Operations": [
            {"op": "Add", "path": "members", "value": [{"value": "u1"}, {"value": "u2"}]},
            {"op": "Remove", "path": "members[value eq \"u3\"]"},
            {"op": "Replace", "path": "displayName", "value": "Eng"}
        ]}));
        let patch = group_patch(&entra).unwrap();
        assert_eq!(patch.display_name.as_deref(), Some("Eng"));
        match plan_members(&patch.members, None) {
            MemberChange::Delta { add, remove } => {
                assert_eq!(add, ["u1", "u2"]);
                assert_eq!(remove, ["u3"]);
            }
            other => panic!("{other:?}"),
        }
        // Okta: replace the members, and rename with the id along.
        let okta = ops(json!({"Operations": [
            {"op": "replace", "value": {"id": "g1", "displayName": "Eng 2"}},
            {"op": "replace", "path": "members", "value": [{"value": "u9"}]},
            {"op": "add", "path": "members", "value": [{"value": "u8"}]}
        ]}));
        let patch = group_patch(&okta).unwrap();
        assert_eq!(patch.display_name.as_deref(), Some("Eng 2"));
        match plan_members(&patch.members, None) {
            MemberChange::Replace(ids) => assert_eq!(ids, ["u8", "u9"]),
            other => panic!("{other:?}"),
        }
        let filtered = group_patch(&ops(json!({"Operations": [
            {"op": "remove", "path": "members[value sw \"u1\"]"}]})))
        .unwrap();
        let current: BTreeSet<String> = ["u1", "u10", "u2"].iter().map(|s| s.to_string()).collect();
        match plan_members(&filtered.members, Some(&current)) {
            MemberChange::Delta { add, remove } => {
                assert!(add.is_empty());
                assert_eq!(remove, ["u1", "u10"]);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn group_patch_bounds_and_paths() {
        let many: Vec<Json> = (0..=MAX_MEMBERS)
            .map(|i| json!({"value": format!("u{i}")}))
            .collect();
        let err = group_patch(&ops(
            json!({"Operations": [{"op": "add", "path": "members", "value": many}]}),
        ))
        .unwrap_err();
        assert_eq!(err.status, axum::http::StatusCode::PAYLOAD_TOO_LARGE);
        let err = group_patch(&ops(
            json!({"Operations": [{"op": "add", "path": "owners", "value": []}]}),
        ))
        .unwrap_err();
        assert_eq!(err.scim_type, Some("invalidPath"));
        let err = group_patch(&ops(
            json!({"Operations": [{"op": "add", "path": "members", "value": [{"display": "x"}]}]}),
        ))
        .unwrap_err();
        assert_eq!(err.scim_type, Some("invalidValue"));
    }
}
