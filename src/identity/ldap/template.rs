//! Search filters built from the operator's templates, and group names read from DNs. Pure
//! string work: no I/O, no ldap3 connection types.

use std::fmt;

/// A placeholder a filter template may contain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Placeholder {
    /// `{login}`: a login name (as typed, or the directory's value of `login_attribute`).
    Login,
    /// `{dn}`: the signed-in person's DN.
    Dn,
}

impl Placeholder {
    fn token(self) -> &'static str {
        match self {
            Placeholder::Login => "{login}",
            Placeholder::Dn => "{dn}",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Text(String),
    Value(Placeholder),
}

/// A filter such as `(&(objectClass=inetOrgPerson)(uid={login}))`, split once into text and
/// placeholders, so that rendering is a single pass: a value is escaped with
/// [`ldap3::ldap_escape`] and can never add a filter operator or a placeholder of its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FilterTemplate {
    pieces: Vec<Piece>,
}

impl FilterTemplate {
    /// Parses `text`, accepting only the placeholders in `allowed` and requiring at least one:
    /// a filter without one would match the same entries whoever signs in. A `{` that starts no
    /// allowed placeholder is refused (it is almost always a misspelt one), and the filter must
    /// parse once filled in.
    pub fn parse(text: &str, allowed: &[Placeholder]) -> Result<FilterTemplate, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(start) = rest.find('{') {
            let (before, at) = rest.split_at(start);
            let Some(placeholder) = allowed.iter().find(|p| at.starts_with(p.token())) else {
                let shown = at.split_inclusive('}').next().unwrap_or(at);
                let known: Vec<_> = allowed.iter().map(|p| p.token()).collect();
                return Err(format!(
                    "unknown placeholder {shown} (allowed: {})",
                    known.join(", ")
                ));
            };
            if !before.is_empty() {
                pieces.push(Piece::Text(before.to_string()));
            }
            pieces.push(Piece::Value(*placeholder));
            rest = &at[placeholder.token().len()..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Text(rest.to_string()));
        }
        if !pieces.iter().any(|p| matches!(p, Piece::Value(_))) {
            let known: Vec<_> = allowed.iter().map(|p| p.token()).collect();
            return Err(format!("it uses none of {}", known.join(", ")));
        }
        let template = FilterTemplate { pieces };
        let sample = template.render("sample", "uid=sample,dc=example,dc=org");
        if !sample.starts_with('(') || ldap3::parse_filter(&sample).is_err() {
            return Err("it is not a valid LDAP filter (RFC 4515), e.g. (uid={login})".into());
        }
        Ok(template)
    }

    /// The filter with every placeholder replaced by its escaped value.
    pub fn render(&self, login: &str, dn: &str) -> String {
        self.fill(|p| match p {
            Placeholder::Login => ldap3::ldap_escape(login).into_owned(),
            Placeholder::Dn => ldap3::ldap_escape(dn).into_owned(),
        })
    }

    /// The filter with every placeholder replaced by `*` (a presence or substring match):
    /// what `trustbroker idp test` counts to show the filter finds anyone at all.
    pub fn render_any(&self) -> String {
        self.fill(|_| "*".to_string())
    }

    fn fill(&self, value: impl Fn(Placeholder) -> String) -> String {
        let mut out = String::new();
        for piece in &self.pieces {
            match piece {
                Piece::Text(text) => out.push_str(text),
                Piece::Value(p) => out.push_str(&value(*p)),
            }
        }
        out
    }
}

impl fmt::Display for FilterTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.fill(|p| p.token().to_string()))
    }
}

/// The value of a DN's first RDN (`cn=mdm-users,ou=groups,…` → `mdm-users`), unescaped as
/// RFC 4514 says; `None` when the DN is malformed or the value is BER-encoded (`#…`).
pub fn rdn_value(dn: &str) -> Option<String> {
    let (_, rest) = dn.split_once('=')?;
    if rest.starts_with('#') {
        return None;
    }
    let mut out = Vec::new();
    let mut bytes = rest.bytes();
    while let Some(b) = bytes.next() {
        match b {
            // The end of the RDN, or of its first value in a multi-valued RDN.
            b',' | b'+' => break,
            b'\\' => {
                let first = bytes.next()?;
                if first.is_ascii_hexdigit() {
                    let second = bytes.next()?;
                    let pair = [first, second];
                    let hex = std::str::from_utf8(&pair).ok()?;
                    out.push(u8::from_str_radix(hex, 16).ok()?);
                } else {
                    out.push(first);
                }
            }
            _ => out.push(b),
        }
    }
    let value = String::from_utf8(out).ok()?;
    (!value.is_empty()).then_some(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    const USER: &[Placeholder] = &[Placeholder::Login];
    const GROUP: &[Placeholder] = &[Placeholder::Login, Placeholder::Dn];

    #[test]
    fn login_is_escaped_into_the_user_filter() {
        let t = FilterTemplate::parse("(&(objectClass=inetOrgPerson)(uid={login}))", USER).unwrap();
        assert_eq!(
            t.render("bob", ""),
            "(&(objectClass=inetOrgPerson)(uid=bob))"
        );
        assert_eq!(
            t.render("*", ""),
            "(&(objectClass=inetOrgPerson)(uid=\\2a))"
        );
        assert_eq!(
            t.render("bob)(uid=*", ""),
            "(&(objectClass=inetOrgPerson)(uid=bob\\29\\28uid=\\2a))"
        );
        assert_eq!(
            t.render("*)(|(uid=*", ""),
            "(&(objectClass=inetOrgPerson)(uid=\\2a\\29\\28|\\28uid=\\2a))"
        );
        assert_eq!(
            t.render("a\\b\0c", ""),
            "(&(objectClass=inetOrgPerson)(uid=a\\5cb\\00c))"
        );
        assert_eq!(t.render_any(), "(&(objectClass=inetOrgPerson)(uid=*))");
        assert_eq!(t.to_string(), "(&(objectClass=inetOrgPerson)(uid={login}))");
    }

    #[test]
    fn a_value_cannot_introduce_a_placeholder() {
        let t = FilterTemplate::parse("(|(member={dn})(memberUid={login}))", GROUP).unwrap();
        assert_eq!(
            t.render("{dn}", "cn=x\\,y,dc=org"),
            "(|(member=cn=x\\5c,y,dc=org)(memberUid={dn}))"
        );
    }

    #[test]
    fn every_placeholder_occurrence_is_filled() {
        let t = FilterTemplate::parse("(|(uid={login})(mail={login}))", USER).unwrap();
        assert_eq!(t.render("b*", ""), "(|(uid=b\\2a)(mail=b\\2a))");
    }

    #[test]
    fn templates_are_checked() {
        let err = |text: &str, allowed| FilterTemplate::parse(text, allowed).unwrap_err();
        assert_eq!(
            err("(uid={user})", USER),
            "unknown placeholder {user} (allowed: {login})"
        );
        assert_eq!(
            err("(member={dn})", USER),
            "unknown placeholder {dn} (allowed: {login})"
        );
        assert_eq!(err("(objectClass=person)", USER), "it uses none of {login}");
        assert_eq!(
            err("(uid={login}", USER),
            "it is not a valid LDAP filter (RFC 4515), e.g. (uid={login})"
        );
        assert_eq!(
            err("uid={login}", USER),
            "it is not a valid LDAP filter (RFC 4515), e.g. (uid={login})"
        );
        assert_eq!(
            err("(uid={login", USER),
            "unknown placeholder {login (allowed: {login})"
        );
        assert!(FilterTemplate::parse("(member={dn})", GROUP).is_ok());
    }

    #[test]
    fn rdn_values_are_unescaped() {
        assert_eq!(
            rdn_value("cn=mdm-users,ou=groups,dc=example,dc=org").as_deref(),
            Some("mdm-users")
        );
        assert_eq!(
            rdn_value("cn=Smith\\, John,ou=people").as_deref(),
            Some("Smith, John")
        );
        assert_eq!(rdn_value("cn=caf\\C3\\A9,ou=g").as_deref(), Some("café"));
        assert_eq!(rdn_value("cn=a+uid=b,ou=g").as_deref(), Some("a"));
        assert_eq!(rdn_value("cn=solo").as_deref(), Some("solo"));
        assert_eq!(rdn_value("cn=#04024869,ou=g"), None);
        assert_eq!(rdn_value("no-equals-sign"), None);
        assert_eq!(rdn_value("cn=,ou=g"), None);
        assert_eq!(rdn_value("cn=bad\\"), None);
        assert_eq!(rdn_value("cn=bad\\F"), None);
        assert_eq!(rdn_value("cn=bad\\FF"), None);
    }
}
