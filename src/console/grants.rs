//! What a console admin may do: the admin API's scopes, granted through group membership by
//! `[admin.groups]`, plus one grant the API folds into `commands:write`: `devices:lock`, so a
//! help desk can lock a lost device without being able to wipe it.

use std::collections::BTreeMap;

use crate::admin::scope::Scope;
use crate::identity::Group;

/// One grant as configured: an API scope (`*` is `admin`, every scope) or `devices:lock`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Grant {
    Scope(Scope),
    /// Queue DeviceLock (implied by `commands:write`).
    DevicesLock,
}

impl Grant {
    pub fn parse(text: &str) -> Result<Grant, String> {
        match text {
            "*" => Ok(Grant::Scope(Scope::Admin)),
            "devices:lock" => Ok(Grant::DevicesLock),
            other => other.parse().map(Grant::Scope).map_err(|e| {
                format!("{e}; the console also knows '*' (every scope) and 'devices:lock'")
            }),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Grant::Scope(scope) => scope.as_str(),
            Grant::DevicesLock => "devices:lock",
        }
    }
}

/// What an action on a console page needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    Scope(Scope),
    /// Locking a device: `devices:lock` or `commands:write`.
    Lock,
}

impl Need {
    pub fn as_str(self) -> &'static str {
        match self {
            Need::Scope(scope) => scope.as_str(),
            Need::Lock => "devices:lock",
        }
    }
}

/// The grants of one signed-in admin.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants(Vec<Grant>);

impl Grants {
    /// The union of the grants of every configured group the person is in (by the group's id
    /// at the provider, or its name).
    pub fn for_groups(configured: &BTreeMap<String, Vec<String>>, groups: &[Group]) -> Grants {
        let mut grants: Vec<Grant> = configured
            .iter()
            .filter(|(key, _)| groups.iter().any(|g| g.id == **key || g.name == **key))
            .flat_map(|(_, names)| names.iter().filter_map(|n| Grant::parse(n).ok()))
            .collect();
        grants.sort();
        grants.dedup();
        Grants(grants)
    }

    /// From the names kept in a session (unknown names are dropped).
    pub fn from_names(names: &[String]) -> Grants {
        Grants(names.iter().filter_map(|n| Grant::parse(n).ok()).collect())
    }

    pub fn names(&self) -> Vec<String> {
        self.0.iter().map(|g| g.as_str().to_owned()).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn scopes(&self) -> Vec<Scope> {
        self.0
            .iter()
            .filter_map(|g| match g {
                Grant::Scope(s) => Some(*s),
                Grant::DevicesLock => None,
            })
            .collect()
    }

    pub fn allows(&self, need: Need) -> bool {
        let scopes = self.scopes();
        match need {
            Need::Scope(scope) => scope.is_granted_by(&scopes),
            Need::Lock => {
                self.0.contains(&Grant::DevicesLock) || Scope::CommandsWrite.is_granted_by(&scopes)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn group(name: &str) -> Group {
        Group {
            id: format!("cn={name},ou=groups"),
            name: name.into(),
        }
    }

    #[test]
    fn groups_map_to_the_union_of_their_grants() {
        let mut configured = BTreeMap::new();
        configured.insert("cn=it,ou=groups".to_owned(), vec!["*".to_owned()]);
        configured.insert(
            "helpdesk".to_owned(),
            vec!["devices:read".to_owned(), "devices:lock".to_owned()],
        );
        let helpdesk = Grants::for_groups(&configured, &[group("helpdesk"), group("staff")]);
        assert!(helpdesk.allows(Need::Scope(Scope::DevicesRead)));
        assert!(helpdesk.allows(Need::Lock));
        assert!(!helpdesk.allows(Need::Scope(Scope::CommandsWrite)));
        assert!(!helpdesk.allows(Need::Scope(Scope::AuditRead)));
        let it = Grants::for_groups(&configured, &[group("it")]);
        assert!(it.allows(Need::Scope(Scope::CommandsWrite)) && it.allows(Need::Lock));
        assert!(Grants::for_groups(&configured, &[group("staff")]).is_empty());
        assert_eq!(Grants::from_names(&helpdesk.names()), helpdesk);
    }

    #[test]
    fn unknown_grants_are_refused_with_the_known_ones() {
        assert_eq!(Grant::parse("*"), Ok(Grant::Scope(Scope::Admin)));
        let err = Grant::parse("devices:wipe").unwrap_err();
        assert!(
            err.contains("devices:lock") && err.contains("commands:write"),
            "{err}"
        );
    }
}
