//! What an admin key may do. A key carries a set of scopes; `admin` implies every other one.

use std::fmt;
use std::str::FromStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Everything, including creating further keys.
    Admin,
    AuditRead,
    AdminKeysRead,
    AdminKeysWrite,
    ScepChallenge,
    CertificatesRead,
    CertificatesWrite,
    DevicesRead,
    CommandsWrite,
    PushCertWrite,
    /// People who signed in at the portal, their groups and devices.
    UsersRead,
    /// The policy set in force, plans, and devices' policy state.
    PoliciesRead,
    /// Applying policy sets.
    PoliciesWrite,
    /// Token integrations, tokens (their last four characters) and app clients.
    TokensRead,
    /// Creating, importing, rotating and revoking tokens; integrations and app clients.
    TokensWrite,
    /// Reading a token's full value after its creation (audited).
    TokensReveal,
    /// SCIM clients (identity providers' credentials for /scim/v2): list, create, revoke.
    ScimAdmin,
}

impl Scope {
    pub const ALL: &'static [Scope] = &[
        Scope::Admin,
        Scope::AuditRead,
        Scope::AdminKeysRead,
        Scope::AdminKeysWrite,
        Scope::ScepChallenge,
        Scope::CertificatesRead,
        Scope::CertificatesWrite,
        Scope::DevicesRead,
        Scope::CommandsWrite,
        Scope::PushCertWrite,
        Scope::UsersRead,
        Scope::PoliciesRead,
        Scope::PoliciesWrite,
        Scope::TokensRead,
        Scope::TokensWrite,
        Scope::TokensReveal,
        Scope::ScimAdmin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::AuditRead => "audit:read",
            Scope::AdminKeysRead => "admin-keys:read",
            Scope::AdminKeysWrite => "admin-keys:write",
            Scope::ScepChallenge => "scep:challenge",
            Scope::CertificatesRead => "certificates:read",
            Scope::CertificatesWrite => "certificates:write",
            Scope::DevicesRead => "devices:read",
            Scope::CommandsWrite => "commands:write",
            Scope::PushCertWrite => "push-cert:write",
            Scope::UsersRead => "users:read",
            Scope::PoliciesRead => "policies:read",
            Scope::PoliciesWrite => "policies:write",
            Scope::TokensRead => "tokens:read",
            Scope::TokensWrite => "tokens:write",
            Scope::TokensReveal => "tokens:reveal",
            Scope::ScimAdmin => "scim:admin",
        }
    }

    /// Whether a key holding `granted` may act where `self` is required.
    pub fn is_granted_by(self, granted: &[Scope]) -> bool {
        granted.iter().any(|g| *g == Scope::Admin || *g == self)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown scope '{0}' (known scopes: {known})", known = known_scopes())]
pub struct UnknownScope(pub String);

fn known_scopes() -> String {
    Scope::ALL
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

impl FromStr for Scope {
    type Err = UnknownScope;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .iter()
            .copied()
            .find(|scope| scope.as_str() == s)
            .ok_or_else(|| UnknownScope(s.to_string()))
    }
}

/// Parses the space-separated form kept in the database, skipping names this version does not
/// know (a key written by a newer version keeps working for the scopes both know).
pub fn parse_stored(stored: &str) -> Vec<Scope> {
    stored
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect()
}

pub fn to_stored(scopes: &[Scope]) -> String {
    scopes
        .iter()
        .map(|s| s.as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_implies_everything_and_others_only_themselves() {
        for scope in Scope::ALL {
            assert!(scope.is_granted_by(&[Scope::Admin]));
        }
        assert!(Scope::AuditRead.is_granted_by(&[Scope::AuditRead]));
        assert!(!Scope::AdminKeysWrite.is_granted_by(&[Scope::AdminKeysRead]));
        assert!(!Scope::Admin.is_granted_by(&[Scope::AuditRead, Scope::AdminKeysWrite]));
    }

    #[test]
    fn names_round_trip() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>().unwrap(), *scope);
        }
        assert!("audit:write".parse::<Scope>().is_err());
        assert_eq!(
            parse_stored(&to_stored(&[Scope::AuditRead, Scope::Admin])),
            vec![Scope::AuditRead, Scope::Admin]
        );
    }
}
