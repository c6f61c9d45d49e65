//! SCIM filters (RFC 7644 §3.4.2.2), parsed strictly and within bounds, and evaluated on a
//! resource's JSON. A filter's text never reaches SQL: from the parsed filter, [`Filter::narrowing`]
//! derives a condition the store tests with parameters (`eq`/`sw`/`co` on a few attributes,
//! `active`), implied by the filter, and the filter itself is then matched here on what the
//! store returns. So the store only ever narrows; what matches is decided here.

use serde_json::Value as Json;

use super::error::ScimError;
use crate::store::{ScimColumn, ScimNarrowing, TextMatch};

/// Longest filter accepted, in bytes.
pub const MAX_FILTER_LEN: usize = 1024;
/// Most comparisons (`eq`, `pr`, …) in one filter.
pub const MAX_TERMS: usize = 16;
/// Deepest nesting of parentheses, `not` and `[...]`.
pub const MAX_DEPTH: usize = 6;

/// `[urn:…:]name[.sub]`; names compare without case, as the RFC says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttrPath {
    /// The schema URN when the path was fully qualified (an extension's attributes live under it).
    pub schema: Option<String>,
    pub name: String,
    pub sub: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Eq,
    Ne,
    Co,
    Sw,
    Ew,
    Gt,
    Ge,
    Lt,
    Le,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Filter {
    And(Box<Filter>, Box<Filter>),
    Or(Box<Filter>, Box<Filter>),
    Not(Box<Filter>),
    Present(AttrPath),
    Compare(AttrPath, Op, Json),
    /// `emails[type eq "work"]`, optionally followed by `.value op "x"` (or `.value pr`): some
    /// element matches the inner filter (and its sub-attribute the comparison).
    ValuePath(AttrPath, Box<Filter>, Option<(String, Option<(Op, Json)>)>),
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Open,
    Close,
    OpenBracket,
    CloseBracket,
    /// A quoted string, unescaped.
    Str(String),
    Word(String),
}

fn tokenize(text: &str) -> Result<Vec<Token>, ScimError> {
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().peekable();
    while let Some(&(start, c)) = chars.peek() {
        match c {
            c if c.is_whitespace() => {
                chars.next();
            }
            '(' | ')' | '[' | ']' => {
                chars.next();
                tokens.push(match c {
                    '(' => Token::Open,
                    ')' => Token::Close,
                    '[' => Token::OpenBracket,
                    _ => Token::CloseBracket,
                });
            }
            '"' => {
                chars.next();
                let mut end = None;
                let mut escaped = false;
                for (i, c) in chars.by_ref() {
                    if escaped {
                        escaped = false;
                    } else if c == '\\' {
                        escaped = true;
                    } else if c == '"' {
                        end = Some(i);
                        break;
                    }
                }
                let end = end.ok_or_else(|| ScimError::invalid_filter("unterminated string"))?;
                let literal = text.get(start..=end).unwrap_or_default();
                let value: String = serde_json::from_str(literal)
                    .map_err(|_| ScimError::invalid_filter("invalid escape in a string"))?;
                tokens.push(Token::Str(value));
            }
            _ => {
                let mut end = start;
                while let Some(&(i, c)) = chars.peek() {
                    if c.is_whitespace() || matches!(c, '(' | ')' | '[' | ']' | '"') {
                        break;
                    }
                    end = i + c.len_utf8();
                    chars.next();
                }
                tokens.push(Token::Word(
                    text.get(start..end).unwrap_or_default().to_string(),
                ));
            }
        }
    }
    Ok(tokens)
}

fn is_name(s: &str) -> bool {
    let mut bytes = s.bytes();
    bytes
        .next()
        .is_some_and(|b| b.is_ascii_alphabetic() || b == b'$')
        && bytes.all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'$'))
}

/// Parses `[urn:…:]name[.sub]` (also a PATCH path's attribute part).
pub fn parse_attr_path(text: &str) -> Option<AttrPath> {
    let (schema, rest) = if text.len() > 4 && text.get(..4)?.eq_ignore_ascii_case("urn:") {
        let (schema, rest) = text.rsplit_once(':')?;
        (Some(schema.to_string()), rest)
    } else {
        (None, text)
    };
    let (name, sub) = match rest.split_once('.') {
        Some((name, sub)) => (name, Some(sub)),
        None => (rest, None),
    };
    if !is_name(name) || sub.is_some_and(|s| !is_name(s)) {
        return None;
    }
    Some(AttrPath {
        schema,
        name: name.to_string(),
        sub: sub.map(str::to_string),
    })
}

fn parse_op(word: &str) -> Option<Op> {
    Some(match word.to_ascii_lowercase().as_str() {
        "eq" => Op::Eq,
        "ne" => Op::Ne,
        "co" => Op::Co,
        "sw" => Op::Sw,
        "ew" => Op::Ew,
        "gt" => Op::Gt,
        "ge" => Op::Ge,
        "lt" => Op::Lt,
        "le" => Op::Le,
        _ => return None,
    })
}

struct Parser {
    tokens: Vec<Token>,
    at: usize,
    terms: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.at).cloned();
        self.at += 1;
        token
    }

    fn peek_keyword(&self, keyword: &str) -> bool {
        matches!(self.peek(), Some(Token::Word(w)) if w.eq_ignore_ascii_case(keyword))
    }

    fn or(&mut self, depth: usize) -> Result<Filter, ScimError> {
        if depth > MAX_DEPTH {
            return Err(ScimError::invalid_filter(format!(
                "the filter nests deeper than {MAX_DEPTH} levels"
            )));
        }
        let mut left = self.and(depth)?;
        while self.peek_keyword("or") {
            self.next();
            let right = self.and(depth)?;
            left = Filter::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<Filter, ScimError> {
        let mut left = self.unary(depth)?;
        while self.peek_keyword("and") {
            self.next();
            let right = self.unary(depth)?;
            left = Filter::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn unary(&mut self, depth: usize) -> Result<Filter, ScimError> {
        if self.peek_keyword("not") {
            self.next();
            if self.next() != Some(Token::Open) {
                return Err(ScimError::invalid_filter("'not' must be followed by '('"));
            }
            let inner = self.or(depth + 1)?;
            self.expect(Token::Close, "')'")?;
            return Ok(Filter::Not(Box::new(inner)));
        }
        if self.peek() == Some(&Token::Open) {
            self.next();
            let inner = self.or(depth + 1)?;
            self.expect(Token::Close, "')'")?;
            return Ok(inner);
        }
        self.term(depth)
    }

    fn expect(&mut self, token: Token, what: &str) -> Result<(), ScimError> {
        if self.next() == Some(token) {
            Ok(())
        } else {
            Err(ScimError::invalid_filter(format!("expected {what}")))
        }
    }

    fn count_term(&mut self) -> Result<(), ScimError> {
        self.terms += 1;
        if self.terms > MAX_TERMS {
            return Err(ScimError::invalid_filter(format!(
                "the filter has more than {MAX_TERMS} comparisons"
            )));
        }
        Ok(())
    }

    fn term(&mut self, depth: usize) -> Result<Filter, ScimError> {
        let Some(Token::Word(word)) = self.next() else {
            return Err(ScimError::invalid_filter("expected an attribute name"));
        };
        let path = parse_attr_path(&word)
            .ok_or_else(|| ScimError::invalid_filter(format!("'{word}' is not an attribute")))?;
        if self.peek() == Some(&Token::OpenBracket) {
            self.next();
            if path.sub.is_some() {
                return Err(ScimError::invalid_filter(
                    "a '[' filter follows an attribute, not a sub-attribute",
                ));
            }
            let inner = self.or(depth + 1)?;
            self.expect(Token::CloseBracket, "']'")?;
            // `emails[type eq "work"].value eq "x"`: a sub-attribute after the brackets.
            let after = match self.peek() {
                Some(Token::Word(w)) if w.starts_with('.') => {
                    let sub = w.trim_start_matches('.').to_string();
                    if !is_name(&sub) {
                        return Err(ScimError::invalid_filter(format!(
                            "'{w}' is not a sub-attribute"
                        )));
                    }
                    self.next();
                    Some((sub, self.comparison()?))
                }
                _ => None,
            };
            return Ok(Filter::ValuePath(path, Box::new(inner), after));
        }
        match self.comparison()? {
            None => Ok(Filter::Present(path)),
            Some((op, value)) => Ok(Filter::Compare(path, op, value)),
        }
    }

    /// `pr` (None) or `op value`.
    fn comparison(&mut self) -> Result<Option<(Op, Json)>, ScimError> {
        self.count_term()?;
        let Some(Token::Word(op)) = self.next() else {
            return Err(ScimError::invalid_filter(
                "expected an operator (eq, co, sw, pr, …)",
            ));
        };
        if op.eq_ignore_ascii_case("pr") {
            return Ok(None);
        }
        let op = parse_op(&op)
            .ok_or_else(|| ScimError::invalid_filter(format!("unknown operator '{op}'")))?;
        let value = match self.next() {
            Some(Token::Str(s)) => Json::String(s),
            Some(Token::Word(w)) => match w.to_ascii_lowercase().as_str() {
                "true" => Json::Bool(true),
                "false" => Json::Bool(false),
                "null" => Json::Null,
                _ => w
                    .parse::<f64>()
                    .ok()
                    .and_then(serde_json::Number::from_f64)
                    .map(Json::Number)
                    .ok_or_else(|| ScimError::invalid_filter(format!("'{w}' is not a value")))?,
            },
            _ => {
                return Err(ScimError::invalid_filter(
                    "expected a value after the operator",
                ));
            }
        };
        Ok(Some((op, value)))
    }
}

/// Parses a filter, refusing anything longer, deeper or with more terms than the bounds.
pub fn parse(text: &str) -> Result<Filter, ScimError> {
    if text.len() > MAX_FILTER_LEN {
        return Err(ScimError::invalid_filter(format!(
            "the filter is longer than {MAX_FILTER_LEN} bytes"
        )));
    }
    let mut parser = Parser {
        tokens: tokenize(text)?,
        at: 0,
        terms: 0,
    };
    let filter = parser.or(0)?;
    if parser.peek().is_some() {
        return Err(ScimError::invalid_filter(
            "unexpected text after the filter",
        ));
    }
    Ok(filter)
}

/// The member of `object` called `name`, compared without case.
pub fn get_ci<'a>(object: &'a Json, name: &str) -> Option<&'a Json> {
    object
        .as_object()?
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v)
}

/// The attribute `path` names in `resource`, before any sub-attribute: an extension's
/// attributes live in an object under its schema URN.
fn attribute<'a>(resource: &'a Json, path: &AttrPath) -> Option<&'a Json> {
    match &path.schema {
        Some(schema) if !super::resources::is_core_schema(schema) => {
            get_ci(get_ci(resource, schema)?, &path.name)
        }
        _ => get_ci(resource, &path.name),
    }
}

/// Every value `path` reaches, arrays flattened.
fn values<'a>(resource: &'a Json, path: &AttrPath) -> Vec<&'a Json> {
    let Some(top) = attribute(resource, path) else {
        return Vec::new();
    };
    let elements: Vec<&Json> = match top {
        Json::Array(items) => items.iter().collect(),
        other => vec![other],
    };
    match &path.sub {
        None => elements,
        Some(sub) => elements
            .into_iter()
            .filter_map(|e| get_ci(e, sub))
            .flat_map(|v| match v {
                Json::Array(items) => items.iter().collect(),
                other => vec![other],
            })
            .collect(),
    }
}

fn present(value: &Json) -> bool {
    match value {
        Json::Null => false,
        Json::String(s) => !s.is_empty(),
        Json::Array(a) => !a.is_empty(),
        _ => true,
    }
}

/// Attributes whose values compare with case (RFC 7643: `caseExact`).
fn case_exact(path: &AttrPath) -> bool {
    path.sub.is_none()
        && (path.name.eq_ignore_ascii_case("id") || path.name.eq_ignore_ascii_case("externalId"))
}

fn compare(value: &Json, op: Op, wanted: &Json, exact: bool) -> bool {
    match (value, wanted) {
        (Json::String(have), Json::String(want)) => {
            let (have, want) = if exact {
                (have.clone(), want.clone())
            } else {
                (have.to_lowercase(), want.to_lowercase())
            };
            match op {
                Op::Eq => have == want,
                Op::Ne => have != want,
                Op::Co => have.contains(&want),
                Op::Sw => have.starts_with(&want),
                Op::Ew => have.ends_with(&want),
                Op::Gt => have > want,
                Op::Ge => have >= want,
                Op::Lt => have < want,
                Op::Le => have <= want,
            }
        }
        // IdPs send booleans as strings too ("False").
        (Json::Bool(have), Json::String(want)) | (Json::String(want), Json::Bool(have)) => {
            match want.to_ascii_lowercase().as_str() {
                "true" => compare(&Json::Bool(*have), op, &Json::Bool(true), exact),
                "false" => compare(&Json::Bool(*have), op, &Json::Bool(false), exact),
                _ => false,
            }
        }
        (Json::Bool(have), Json::Bool(want)) => match op {
            Op::Eq => have == want,
            Op::Ne => have != want,
            _ => false,
        },
        (Json::Number(have), Json::Number(want)) => {
            let (Some(have), Some(want)) = (have.as_f64(), want.as_f64()) else {
                return false;
            };
            match op {
                Op::Eq => have == want,
                Op::Ne => have != want,
                Op::Gt => have > want,
                Op::Ge => have >= want,
                Op::Lt => have < want,
                Op::Le => have <= want,
                Op::Co | Op::Sw | Op::Ew => false,
            }
        }
        _ => false,
    }
}

impl Filter {
    /// Whether `resource` (a SCIM resource's JSON, as it would be returned) matches.
    pub fn matches(&self, resource: &Json) -> bool {
        match self {
            Filter::And(a, b) => a.matches(resource) && b.matches(resource),
            Filter::Or(a, b) => a.matches(resource) || b.matches(resource),
            Filter::Not(inner) => !inner.matches(resource),
            Filter::Present(path) => values(resource, path).into_iter().any(present),
            Filter::Compare(path, op, wanted) => {
                let found = values(resource, path);
                let exact = case_exact(path);
                match op {
                    // `ne`: no value equals (an absent attribute is not equal).
                    Op::Ne => !found.iter().any(|v| compare(v, Op::Eq, wanted, exact)),
                    Op::Eq if wanted.is_null() => !found.into_iter().any(present),
                    _ => found.iter().any(|v| compare(v, *op, wanted, exact)),
                }
            }
            Filter::ValuePath(path, inner, after) => {
                let top = AttrPath {
                    sub: None,
                    ..path.clone()
                };
                values(resource, &top).into_iter().any(|element| {
                    inner.matches(element)
                        && match after {
                            None => true,
                            Some((sub, comparison)) => {
                                let sub_path = AttrPath {
                                    schema: None,
                                    name: sub.clone(),
                                    sub: None,
                                };
                                match comparison {
                                    None => Filter::Present(sub_path).matches(element),
                                    Some((op, wanted)) => {
                                        Filter::Compare(sub_path, *op, wanted.clone())
                                            .matches(element)
                                    }
                                }
                            }
                        }
                })
            }
        }
    }

    /// A condition the store can test in SQL that every resource this filter matches meets
    /// (`None`: none worth testing). It may let more through, never fewer: `and` keeps what
    /// either side gives, `or` needs both, `not` and anything else give nothing.
    pub fn narrowing(&self, resource: Resource) -> Option<ScimNarrowing> {
        match self {
            Filter::And(a, b) => match (a.narrowing(resource), b.narrowing(resource)) {
                (Some(a), Some(b)) => Some(ScimNarrowing::All(vec![a, b])),
                (a, b) => a.or(b),
            },
            Filter::Or(a, b) => Some(ScimNarrowing::Any(vec![
                a.narrowing(resource)?,
                b.narrowing(resource)?,
            ])),
            Filter::Compare(path, op, wanted) => narrow_compare(path, *op, wanted, resource),
            // `emails[type eq "work"].value eq "x"`: some e-mail's value is "x".
            Filter::ValuePath(path, _, Some((sub, Some((op, wanted))))) => {
                let flat = AttrPath {
                    sub: Some(sub.clone()),
                    ..path.clone()
                };
                narrow_compare(&flat, *op, wanted, resource)
            }
            _ => None,
        }
    }
}

/// The kind of resource a list filters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Resource {
    User,
    Group,
}

/// The store's condition for one comparison, when it has a column for it.
fn narrow_compare(
    path: &AttrPath,
    op: Op,
    wanted: &Json,
    resource: Resource,
) -> Option<ScimNarrowing> {
    if path
        .schema
        .as_deref()
        .is_some_and(|s| !super::resources::is_core_schema(s))
    {
        return None;
    }
    let named = |name: &str| path.name.eq_ignore_ascii_case(name);
    let sub_is = |name: Option<&str>| match (&path.sub, name) {
        (None, None) => true,
        (Some(sub), Some(name)) => sub.eq_ignore_ascii_case(name),
        _ => false,
    };
    if resource == Resource::User && named("active") && sub_is(None) && op == Op::Eq {
        return match wanted {
            Json::Bool(b) => Some(ScimNarrowing::Active(*b)),
            Json::String(s) if s.eq_ignore_ascii_case("true") => Some(ScimNarrowing::Active(true)),
            Json::String(s) if s.eq_ignore_ascii_case("false") => {
                Some(ScimNarrowing::Active(false))
            }
            _ => None,
        };
    }
    let Json::String(value) = wanted else {
        return None;
    };
    let op = match op {
        Op::Eq => TextMatch::Eq,
        Op::Sw => TextMatch::StartsWith,
        Op::Co => TextMatch::Contains,
        _ => return None,
    };
    let column = match resource {
        Resource::User if named("userName") && sub_is(None) => ScimColumn::UserName,
        Resource::User if named("emails") && sub_is(Some("value")) => ScimColumn::Emails,
        _ if named("externalId") && sub_is(None) => ScimColumn::ExternalId,
        _ if named("displayName") && sub_is(None) => ScimColumn::DisplayName,
        _ => return None,
    };
    // As the evaluator compares: externalId with case, the others without.
    let value = match column {
        ScimColumn::ExternalId => value.clone(),
        _ => value.to_lowercase(),
    };
    // The e-mail key separates values with newlines.
    if column == ScimColumn::Emails && value.contains('\n') {
        return None;
    }
    Some(ScimNarrowing::Text { column, op, value })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user() -> Json {
        json!({
            "id": "u1", "userName": "Alice@Example.org", "externalId": "00uA",
            "displayName": "Alice Liddell", "active": true,
            "emails": [{"value": "alice@example.org", "type": "work", "primary": true},
                       {"value": "alice@home.example", "type": "home"}],
            "urn:ietf:params:scim:schemas:extension:enterprise:2.0:User": {"department": "R&D"}
        })
    }

    fn matches(filter: &str) -> bool {
        parse(filter).unwrap().matches(&user())
    }

    #[test]
    fn the_filters_idps_send_match() {
        assert!(matches(r#"userName eq "alice@example.org""#));
        assert!(matches(r#"USERNAME Eq "ALICE@example.org""#));
        assert!(
            !matches(r#"externalId eq "00ua""#),
            "externalId is case-exact"
        );
        assert!(matches(r#"externalId eq "00uA""#));
        assert!(matches(r#"emails.value eq "alice@home.example""#));
        assert!(matches(
            r#"emails[type eq "work"].value eq "alice@example.org""#
        ));
        assert!(!matches(
            r#"emails[type eq "work"].value eq "alice@home.example""#
        ));
        assert!(matches(
            r#"emails[type eq "work" and value co "example.org"]"#
        ));
        assert!(matches(r#"displayName sw "Alice" and active eq true"#));
        assert!(matches(r#"active eq "True""#));
        assert!(matches(
            r#"userName co "nope" or (displayName ew "liddell")"#
        ));
        assert!(matches(r#"not (active eq false)"#));
        assert!(matches("title pr or externalId pr"));
        assert!(!matches("title pr"));
        assert!(matches(
            r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department eq "r&d""#
        ));
        assert!(matches(
            r#"urn:ietf:params:scim:schemas:core:2.0:User:userName sw "alice""#
        ));
        assert!(matches(r#"userName eq "a\"b" or id eq "u1""#));
    }

    #[test]
    fn hostile_and_malformed_filters_are_refused() {
        let long = format!(r#"userName eq "{}""#, "a".repeat(MAX_FILTER_LEN));
        let many = vec![r#"userName eq "x""#; MAX_TERMS + 1].join(" or ");
        let deep = format!(
            "{}userName pr{}",
            "(".repeat(MAX_DEPTH + 2),
            ")".repeat(MAX_DEPTH + 2)
        );
        for bad in [
            "",
            "userName",
            r#"userName eq"#,
            r#"userName xx "a""#,
            r#"userName eq "unterminated"#,
            r#"userName eq "a" or"#,
            r#"userName eq "a"; DROP TABLE users"#,
            r#"userName eq "a" ) "#,
            r#"(userName eq "a""#,
            r#"1abc eq "a""#,
            r#"emails[type eq "work""#,
            "userName eq bareword",
            &long,
            &many,
            &deep,
        ] {
            let err = parse(bad).unwrap_err();
            assert_eq!(err.scim_type, Some("invalidFilter"), "{bad}");
        }
    }

    #[test]
    fn the_store_narrows_by_what_the_filter_implies() {
        let narrow = |f: &str, r: Resource| parse(f).unwrap().narrowing(r);
        let text = |column, op, value: &str| ScimNarrowing::Text {
            column,
            op,
            value: value.into(),
        };
        assert_eq!(
            narrow(r#"userName eq "Bob" and active eq "False""#, Resource::User),
            Some(ScimNarrowing::All(vec![
                text(ScimColumn::UserName, TextMatch::Eq, "bob"),
                ScimNarrowing::Active(false),
            ]))
        );
        // externalId compares with case; the others are lower-cased.
        assert_eq!(
            narrow(r#"externalId sw "00uA""#, Resource::User),
            Some(text(ScimColumn::ExternalId, TextMatch::StartsWith, "00uA"))
        );
        assert_eq!(
            narrow(
                r#"emails[type eq "work"].value co "@Example""#,
                Resource::User
            ),
            Some(text(ScimColumn::Emails, TextMatch::Contains, "@example"))
        );
        assert_eq!(
            narrow(
                r#"displayName eq "Eng" or externalId eq "x""#,
                Resource::Group
            ),
            Some(ScimNarrowing::Any(vec![
                text(ScimColumn::DisplayName, TextMatch::Eq, "eng"),
                text(ScimColumn::ExternalId, TextMatch::Eq, "x"),
            ]))
        );
        // An `and` keeps what one side gives; an `or` needs both; `not`, `ne`, `ew`, `pr` and
        // attributes without a column give nothing (the evaluator alone decides).
        assert_eq!(
            narrow(r#"title eq "x" and userName sw "a""#, Resource::User),
            Some(text(ScimColumn::UserName, TextMatch::StartsWith, "a"))
        );
        for none in [
            r#"userName eq "a" or title eq "x""#,
            r#"not (userName eq "a")"#,
            r#"userName ne "a""#,
            r#"userName ew "a""#,
            r#"userName pr"#,
            r#"userName eq null"#,
            r#"urn:ietf:params:scim:schemas:extension:enterprise:2.0:User:department eq "R&D""#,
        ] {
            assert_eq!(narrow(none, Resource::User), None, "{none}");
        }
        assert_eq!(narrow(r#"userName eq "a""#, Resource::Group), None);
        assert_eq!(narrow(r#"active eq true"#, Resource::Group), None);
    }
}
