//! The SCIM resources this server keeps: the core User schema with the enterprise extension's
//! common fields, and Group. Input is reduced to the known attributes (unknown ones are
//! ignored, as RFC 7644 §3.3 allows; `password` is never kept), type-checked and bounded;
//! output adds `id`, `schemas` and `meta`.

use serde_json::{Map, Value as Json, json};

use super::error::ScimError;
use super::filter::get_ci;
use crate::store::{ScimGroupRow, ScimUserRow, ScimUserWrite};

pub const USER_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:User";
pub const GROUP_SCHEMA: &str = "urn:ietf:params:scim:schemas:core:2.0:Group";
pub const ENTERPRISE_SCHEMA: &str = "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User";
pub const LIST_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:ListResponse";
pub const PATCH_SCHEMA: &str = "urn:ietf:params:scim:api:messages:2.0:PatchOp";

/// Longest string value kept.
const MAX_STRING: usize = 1024;
/// Most elements of a multi-valued attribute (emails, phone numbers, …) kept.
const MAX_VALUES: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    String,
    Bool,
    /// A single-valued complex attribute with these sub-attributes.
    Complex(&'static [&'static str]),
    /// A multi-valued complex attribute with these sub-attributes.
    Multi(&'static [&'static str]),
}

#[derive(Clone, Copy, Debug)]
pub struct Attr {
    pub name: &'static str,
    pub kind: Kind,
}

const NAME_SUBS: &[&str] = &[
    "formatted",
    "familyName",
    "givenName",
    "middleName",
    "honorificPrefix",
    "honorificSuffix",
];
const VALUE_SUBS: &[&str] = &["value", "display", "type", "primary"];
const ADDRESS_SUBS: &[&str] = &[
    "formatted",
    "streetAddress",
    "locality",
    "region",
    "postalCode",
    "country",
    "type",
    "primary",
];

pub const USER_ATTRS: &[Attr] = &[
    Attr {
        name: "userName",
        kind: Kind::String,
    },
    Attr {
        name: "externalId",
        kind: Kind::String,
    },
    Attr {
        name: "name",
        kind: Kind::Complex(NAME_SUBS),
    },
    Attr {
        name: "displayName",
        kind: Kind::String,
    },
    Attr {
        name: "nickName",
        kind: Kind::String,
    },
    Attr {
        name: "profileUrl",
        kind: Kind::String,
    },
    Attr {
        name: "title",
        kind: Kind::String,
    },
    Attr {
        name: "userType",
        kind: Kind::String,
    },
    Attr {
        name: "preferredLanguage",
        kind: Kind::String,
    },
    Attr {
        name: "locale",
        kind: Kind::String,
    },
    Attr {
        name: "timezone",
        kind: Kind::String,
    },
    Attr {
        name: "active",
        kind: Kind::Bool,
    },
    Attr {
        name: "emails",
        kind: Kind::Multi(VALUE_SUBS),
    },
    Attr {
        name: "phoneNumbers",
        kind: Kind::Multi(VALUE_SUBS),
    },
    Attr {
        name: "addresses",
        kind: Kind::Multi(ADDRESS_SUBS),
    },
    Attr {
        name: "roles",
        kind: Kind::Multi(VALUE_SUBS),
    },
];

pub const ENTERPRISE_ATTRS: &[Attr] = &[
    Attr {
        name: "employeeNumber",
        kind: Kind::String,
    },
    Attr {
        name: "costCenter",
        kind: Kind::String,
    },
    Attr {
        name: "organization",
        kind: Kind::String,
    },
    Attr {
        name: "division",
        kind: Kind::String,
    },
    Attr {
        name: "department",
        kind: Kind::String,
    },
    Attr {
        name: "manager",
        kind: Kind::Complex(&["value", "$ref", "displayName"]),
    },
];

/// Whether `urn` is one of the core schemas (whose attributes sit at the top level).
pub fn is_core_schema(urn: &str) -> bool {
    urn.eq_ignore_ascii_case(USER_SCHEMA) || urn.eq_ignore_ascii_case(GROUP_SCHEMA)
}

/// The attribute called `name` (any case) in `attrs`.
pub fn find_attr(attrs: &[Attr], name: &str) -> Option<Attr> {
    attrs
        .iter()
        .copied()
        .find(|a| a.name.eq_ignore_ascii_case(name))
}

/// The canonical name of sub-attribute `sub` of a complex kind.
pub fn find_sub(kind: Kind, sub: &str) -> Option<&'static str> {
    match kind {
        Kind::Complex(subs) | Kind::Multi(subs) => {
            subs.iter().copied().find(|s| s.eq_ignore_ascii_case(sub))
        }
        _ => None,
    }
}

/// A boolean as IdPs send it: `true`, or Entra's `"True"`/`"False"`.
pub fn as_bool(value: &Json) -> Option<bool> {
    match value {
        Json::Bool(b) => Some(*b),
        Json::String(s) if s.eq_ignore_ascii_case("true") => Some(true),
        Json::String(s) if s.eq_ignore_ascii_case("false") => Some(false),
        _ => None,
    }
}

fn clean_string(name: &str, value: &Json) -> Result<Json, ScimError> {
    match value {
        Json::String(s) if s.len() <= MAX_STRING => Ok(Json::String(s.clone())),
        Json::String(_) => Err(ScimError::invalid_value(format!(
            "'{name}' is longer than {MAX_STRING} bytes"
        ))),
        _ => Err(ScimError::invalid_value(format!(
            "'{name}' must be a string"
        ))),
    }
}

fn clean_complex(name: &str, subs: &[&'static str], value: &Json) -> Result<Json, ScimError> {
    let Json::Object(map) = value else {
        return Err(ScimError::invalid_value(format!(
            "'{name}' must be an object"
        )));
    };
    let mut out = Map::new();
    for (key, v) in map {
        let Some(sub) = subs.iter().copied().find(|s| s.eq_ignore_ascii_case(key)) else {
            continue;
        };
        if v.is_null() {
            continue;
        }
        let cleaned = if sub == "primary" {
            Json::Bool(as_bool(v).ok_or_else(|| {
                ScimError::invalid_value(format!("'{name}.primary' must be a boolean"))
            })?)
        } else {
            clean_string(&format!("{name}.{sub}"), v)?
        };
        out.insert(sub.to_string(), cleaned);
    }
    Ok(Json::Object(out))
}

/// `value` checked and reduced for attribute `attr`; `Null` removes it.
pub fn clean_value(attr: Attr, value: &Json) -> Result<Json, ScimError> {
    if value.is_null() {
        return Ok(Json::Null);
    }
    match attr.kind {
        Kind::String => clean_string(attr.name, value),
        Kind::Bool => as_bool(value)
            .map(Json::Bool)
            .ok_or_else(|| ScimError::invalid_value(format!("'{}' must be a boolean", attr.name))),
        Kind::Complex(subs) => clean_complex(attr.name, subs, value),
        Kind::Multi(subs) => {
            let items: Vec<&Json> = match value {
                Json::Array(items) => items.iter().collect(),
                one => vec![one],
            };
            if items.len() > MAX_VALUES {
                return Err(ScimError::invalid_value(format!(
                    "'{}' has more than {MAX_VALUES} values",
                    attr.name
                )));
            }
            items
                .into_iter()
                .map(|item| clean_complex(attr.name, subs, item))
                .collect::<Result<Vec<_>, _>>()
                .map(Json::Array)
        }
    }
}

/// Reduces `object` to the attributes of `attrs` (canonical names, checked values).
fn clean_object(
    attrs: &[Attr],
    object: &Map<String, Json>,
) -> Result<Map<String, Json>, ScimError> {
    let mut out = Map::new();
    for (key, value) in object {
        if let Some(attr) = find_attr(attrs, key) {
            let cleaned = clean_value(attr, value)?;
            if !cleaned.is_null() {
                out.insert(attr.name.to_string(), cleaned);
            }
        }
    }
    Ok(out)
}

/// A User as the client sent it, reduced to what is kept (POST and PUT bodies; PATCH results).
pub fn clean_user(body: &Json) -> Result<Json, ScimError> {
    let Json::Object(map) = body else {
        return Err(ScimError::invalid_syntax("the body must be a JSON object"));
    };
    let mut out = clean_object(USER_ATTRS, map)?;
    if let Some(Json::Object(ext)) = get_ci(body, ENTERPRISE_SCHEMA) {
        let ext = clean_object(ENTERPRISE_ATTRS, ext)?;
        if !ext.is_empty() {
            out.insert(ENTERPRISE_SCHEMA.to_string(), Json::Object(ext));
        }
    }
    Ok(Json::Object(out))
}

/// What the store makes of a cleaned User: `subject` is the externalId (the IdP's ID of the
/// person, what its sign-ins carry as the subject) or, without one, the userName.
pub fn user_write(resource: &Json) -> Result<ScimUserWrite, ScimError> {
    let user_name = resource
        .get("userName")
        .and_then(Json::as_str)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| ScimError::invalid_value("'userName' is required"))?
        .to_string();
    let external_id = resource
        .get("externalId")
        .and_then(Json::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string);
    let active = resource
        .get("active")
        .and_then(Json::as_bool)
        .unwrap_or(true);
    let emails = resource.get("emails").and_then(Json::as_array);
    let email_where = |test: &dyn Fn(&Json) -> bool| {
        emails
            .and_then(|list| list.iter().find(|e| test(e)))
            .and_then(|e| e.get("value"))
            .and_then(Json::as_str)
            .map(str::to_string)
    };
    let email = email_where(&|e| e.get("primary") == Some(&Json::Bool(true)))
        .or_else(|| email_where(&|e| e.get("type").and_then(Json::as_str) == Some("work")))
        .or_else(|| email_where(&|_| true));
    let name = resource.get("name");
    let display_name = resource
        .get("displayName")
        .and_then(Json::as_str)
        .map(str::to_string)
        .or_else(|| {
            name.and_then(|n| n.get("formatted"))
                .and_then(Json::as_str)
                .map(str::to_string)
        })
        .or_else(|| {
            let part = |k: &str| name.and_then(|n| n.get(k)).and_then(Json::as_str);
            match (part("givenName"), part("familyName")) {
                (Some(g), Some(f)) => Some(format!("{g} {f}")),
                (g, f) => g.or(f).map(str::to_string),
            }
        });
    // The stored resource carries the userName as the store keys it (trimmed), so a filter
    // on the returned resource and the store's search key agree.
    let mut resource = resource.clone();
    if let Some(map) = resource.as_object_mut() {
        map.insert("userName".into(), Json::from(user_name.clone()));
    }
    let display_name_key = resource
        .get("displayName")
        .and_then(Json::as_str)
        .map(str::to_lowercase)
        .unwrap_or_default();
    let mut emails_key = String::from("\n");
    let email_items: Vec<&Json> = match resource.get("emails") {
        Some(Json::Array(items)) => items.iter().collect(),
        Some(other) => vec![other],
        None => Vec::new(),
    };
    for value in email_items
        .into_iter()
        .filter_map(|e| get_ci(e, "value"))
        .filter_map(Json::as_str)
    {
        emails_key.push_str(&value.to_lowercase());
        emails_key.push('\n');
    }
    Ok(ScimUserWrite {
        display_name_key,
        emails_key,
        user_name,
        external_id,
        active,
        email,
        display_name,
        resource: resource.to_string(),
    })
}

fn meta(
    kind: &str,
    id: &str,
    created: &chrono::DateTime<chrono::Utc>,
    modified: &chrono::DateTime<chrono::Utc>,
    version: i64,
    base: &str,
) -> Json {
    json!({
        "resourceType": kind,
        "created": created.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "lastModified": modified.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        "location": format!("{base}/scim/v2/{kind}s/{id}"),
        "version": etag(version),
    })
}

/// The ETag of a version: weak, as a resource's representation may vary with `attributes`.
pub fn etag(version: i64) -> String {
    format!("W/\"{version}\"")
}

/// A stored User as it is returned.
pub fn render_user(row: &ScimUserRow, base: &str) -> Json {
    let mut resource = match serde_json::from_str::<Json>(&row.resource) {
        Ok(Json::Object(map)) => map,
        _ => Map::new(),
    };
    let mut schemas = vec![Json::from(USER_SCHEMA)];
    if resource.contains_key(ENTERPRISE_SCHEMA) {
        schemas.push(Json::from(ENTERPRISE_SCHEMA));
    }
    resource.insert("schemas".into(), Json::Array(schemas));
    resource.insert("id".into(), Json::from(row.user_id.clone()));
    resource.insert("active".into(), Json::Bool(row.active));
    resource.insert(
        "meta".into(),
        meta(
            "User",
            &row.user_id,
            &row.created_at,
            &row.updated_at,
            row.version,
            base,
        ),
    );
    Json::Object(resource)
}

/// A stored Group, with its members, as it is returned.
pub fn render_group(row: &ScimGroupRow, members: &[(String, Option<String>)], base: &str) -> Json {
    let mut resource = json!({
        "schemas": [GROUP_SCHEMA],
        "id": row.group_id,
        "displayName": row.display_name,
        "members": members.iter().map(|(id, display)| {
            let mut member = json!({"value": id, "$ref": format!("{base}/scim/v2/Users/{id}"), "type": "User"});
            if let (Some(display), Some(map)) = (display, member.as_object_mut()) {
                map.insert("display".into(), Json::from(display.clone()));
            }
            member
        }).collect::<Vec<_>>(),
        "meta": meta("Group", &row.group_id, &row.created_at, &row.updated_at, row.version, base),
    });
    if let (Some(external_id), Some(map)) = (&row.external_id, resource.as_object_mut()) {
        map.insert("externalId".into(), Json::from(external_id.clone()));
    }
    resource
}

/// Applies `attributes` (only these, plus `id` and `schemas`) or `excludedAttributes` (all
/// but these) to a rendered resource. Paths are `name` or `name.sub`, any case.
pub fn project(resource: Json, attributes: &[String], excluded: &[String]) -> Json {
    let Json::Object(map) = resource else {
        return resource;
    };
    let split = |p: &String| -> (String, Option<String>) {
        // A fully qualified core path: keep the attribute part.
        let p = match p.rsplit_once(':') {
            Some((urn, rest)) if is_core_schema(urn) => rest.to_string(),
            _ => p.clone(),
        };
        match p.split_once('.') {
            Some((a, b)) if !a.contains(':') => {
                (a.to_ascii_lowercase(), Some(b.to_ascii_lowercase()))
            }
            _ => (p.to_ascii_lowercase(), None),
        }
    };
    let always = ["id", "schemas"];
    let mut out = Map::new();
    for (key, value) in map {
        let lower = key.to_ascii_lowercase();
        if always.contains(&key.as_str()) {
            out.insert(key, value);
            continue;
        }
        if !attributes.is_empty() {
            let wanted: Vec<(String, Option<String>)> = attributes.iter().map(split).collect();
            let whole = wanted.iter().any(|(a, s)| *a == lower && s.is_none());
            let subs: Vec<&String> = wanted
                .iter()
                .filter(|(a, _)| *a == lower)
                .filter_map(|(_, s)| s.as_ref())
                .collect();
            if whole {
                out.insert(key, value);
            } else if !subs.is_empty() {
                out.insert(key, keep_subs(value, &subs));
            }
        } else {
            let dropped: Vec<(String, Option<String>)> = excluded.iter().map(split).collect();
            if !dropped.iter().any(|(a, s)| *a == lower && s.is_none()) {
                out.insert(key, value);
            }
        }
    }
    Json::Object(out)
}

fn keep_subs(value: Json, subs: &[&String]) -> Json {
    let keep = |v: Json| match v {
        Json::Object(m) => Json::Object(
            m.into_iter()
                .filter(|(k, _)| subs.iter().any(|s| k.eq_ignore_ascii_case(s)))
                .collect(),
        ),
        other => other,
    };
    match value {
        Json::Array(items) => Json::Array(items.into_iter().map(keep).collect()),
        other => keep(other),
    }
}

/// `/ServiceProviderConfig` (RFC 7643 §5): what this server supports.
pub fn service_provider_config(base: &str, max_results: usize, max_payload: usize) -> Json {
    json!({
        "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ServiceProviderConfig"],
        "documentationUri": "https://github.com/trustbroker/trustbroker/blob/main/docs/scim.md",
        "patch": {"supported": true},
        "bulk": {"supported": false, "maxOperations": 0, "maxPayloadSize": max_payload},
        "filter": {"supported": true, "maxResults": max_results},
        "changePassword": {"supported": false},
        "sort": {"supported": false},
        "etag": {"supported": true},
        "authenticationSchemes": [{
            "type": "oauthbearertoken",
            "name": "OAuth Bearer Token",
            "description": "A SCIM client token: trustbroker scim-client create --provider NAME",
            "primary": true
        }],
        "meta": {"resourceType": "ServiceProviderConfig",
                 "location": format!("{base}/scim/v2/ServiceProviderConfig")}
    })
}

pub fn resource_types(base: &str) -> Vec<Json> {
    vec![
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
            "id": "User", "name": "User", "endpoint": "/Users",
            "description": "A person of the identity provider the client is bound to",
            "schema": USER_SCHEMA,
            "schemaExtensions": [{"schema": ENTERPRISE_SCHEMA, "required": false}],
            "meta": {"resourceType": "ResourceType", "location": format!("{base}/scim/v2/ResourceTypes/User")}
        }),
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:ResourceType"],
            "id": "Group", "name": "Group", "endpoint": "/Groups",
            "description": "A group: the stable ID that policies target",
            "schema": GROUP_SCHEMA,
            "meta": {"resourceType": "ResourceType", "location": format!("{base}/scim/v2/ResourceTypes/Group")}
        }),
    ]
}

fn schema_attrs(attrs: &[Attr]) -> Vec<Json> {
    attrs
        .iter()
        .map(|a| {
            let (kind, multi, subs) = match a.kind {
                Kind::String => ("string", false, &[][..]),
                Kind::Bool => ("boolean", false, &[][..]),
                Kind::Complex(s) => ("complex", false, s),
                Kind::Multi(s) => ("complex", true, s),
            };
            let mut attr = json!({
                "name": a.name, "type": kind, "multiValued": multi, "required": a.name == "userName",
                "caseExact": a.name == "externalId", "mutability": "readWrite", "returned": "default",
                "uniqueness": if a.name == "userName" { "server" } else { "none" },
            });
            if !subs.is_empty()
                && let Some(map) = attr.as_object_mut()
            {
                let subs: Vec<Json> = subs
                    .iter()
                    .map(|s| json!({"name": s, "type": if *s == "primary" { "boolean" } else { "string" },
                                    "multiValued": false, "required": false, "mutability": "readWrite",
                                    "returned": "default"}))
                    .collect();
                map.insert("subAttributes".into(), Json::Array(subs));
            }
            attr
        })
        .collect()
}

pub fn schemas(base: &str) -> Vec<Json> {
    let schema = |id: &str, name: &str, attributes: Vec<Json>| {
        json!({
            "schemas": ["urn:ietf:params:scim:schemas:core:2.0:Schema"],
            "id": id, "name": name, "attributes": attributes,
            "meta": {"resourceType": "Schema", "location": format!("{base}/scim/v2/Schemas/{id}")}
        })
    };
    let group_attrs = vec![
        json!({"name": "displayName", "type": "string", "multiValued": false, "required": true,
               "mutability": "readWrite", "returned": "default", "uniqueness": "none"}),
        json!({"name": "members", "type": "complex", "multiValued": true, "required": false,
               "mutability": "readWrite", "returned": "default",
               "subAttributes": [
                   {"name": "value", "type": "string", "multiValued": false, "required": false,
                    "caseExact": true, "mutability": "immutable", "returned": "default"},
                   {"name": "$ref", "type": "reference", "referenceTypes": ["User"],
                    "multiValued": false, "required": false, "mutability": "immutable",
                    "returned": "default"},
                   {"name": "type", "type": "string", "canonicalValues": ["User"],
                    "multiValued": false, "required": false, "mutability": "immutable",
                    "returned": "default"},
                   {"name": "display", "type": "string", "multiValued": false, "required": false,
                    "mutability": "readOnly", "returned": "default"}]}),
    ];
    vec![
        schema(USER_SCHEMA, "User", schema_attrs(USER_ATTRS)),
        schema(
            ENTERPRISE_SCHEMA,
            "EnterpriseUser",
            schema_attrs(ENTERPRISE_ATTRS),
        ),
        schema(GROUP_SCHEMA, "Group", group_attrs),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_attributes_are_dropped_and_values_checked() {
        let cleaned = clean_user(&json!({
            "schemas": [USER_SCHEMA], "USERNAME": "a@example.org", "password": "hunter2",
            "favouriteColour": "blue", "active": "False",
            "emails": [{"value": "a@example.org", "type": "work", "primary": "true", "x": 1}],
            ENTERPRISE_SCHEMA: {"department": "R&D", "shoeSize": "9"}
        }))
        .unwrap();
        assert_eq!(
            cleaned,
            json!({"userName": "a@example.org", "active": false,
                   "emails": [{"value": "a@example.org", "type": "work", "primary": true}],
                   ENTERPRISE_SCHEMA: {"department": "R&D"}})
        );
        let write = user_write(&cleaned).unwrap();
        assert_eq!(
            crate::store::ScimMatch::ExternalId.key(&write).as_deref(),
            Some("a@example.org")
        );
        assert_eq!(write.email.as_deref(), Some("a@example.org"));
        assert!(!write.active);
        assert!(clean_user(&json!({"userName": 7})).is_err());
        assert!(clean_user(&json!({"userName": "x".repeat(MAX_STRING + 1)})).is_err());
        assert!(user_write(&clean_user(&json!({"displayName": "x"})).unwrap()).is_err());
    }

    #[test]
    fn projection_keeps_id_and_the_named_attributes() {
        let user = json!({"id": "1", "schemas": [], "userName": "a", "displayName": "A",
                          "emails": [{"value": "a@x", "type": "work"}]});
        assert_eq!(
            project(
                user.clone(),
                &["userName".into(), "emails.value".into()],
                &[]
            ),
            json!({"id": "1", "schemas": [], "userName": "a", "emails": [{"value": "a@x"}]})
        );
        assert_eq!(
            project(user, &[], &["emails".into(), "displayname".into()]),
            json!({"id": "1", "schemas": [], "userName": "a"})
        );
    }
}
