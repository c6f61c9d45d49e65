//! LDAP sign-in: find the person with the service account, check their password by binding as
//! them, and read their attributes and groups. Owns the `[idp.NAME]` settings of `type = "ldap"`
//! and all LDAP traffic; it knows nothing of HTTP or sessions, and only `sync` touches the store
//! (through its directory methods, never SQL).
//!
//! `conn` opens one connection (TLS, timeouts, error sorting), `pool` keeps service-bound
//! connections, `template` builds escaped search filters, `sync` is the periodic group sync.

mod conn;
mod pool;
pub mod sync;
mod template;

use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ldap3::{Ldap, LdapResult, Scope, SearchOptions, SearchResult};
use serde::Deserialize;

use self::conn::{Endpoint, Entry, Transport, result_text};
use self::pool::Pool;
use self::template::{FilterTemplate, Placeholder, rdn_value};
use super::{Group, Identity, IdpError};
use crate::config::Secret;

pub const DEFAULT_USER_FILTER: &str = "(&(objectClass=inetOrgPerson)(uid={login}))";
pub const DEFAULT_GROUP_FILTER: &str = "(|(&(objectClass=groupOfNames)(member={dn}))\
(&(objectClass=groupOfUniqueNames)(uniqueMember={dn}))\
(&(objectClass=posixGroup)(memberUid={login})))";
pub const DEFAULT_TIMEOUT_SECS: u64 = 5;
pub const DEFAULT_POOL_SIZE: usize = 4;

/// What a person is told for a wrong password, an unknown login, an ambiguous one or a refused
/// account alike, so that sign-in never reveals who exists.
const REFUSED: &str = "wrong login or password";
/// Longer logins are refused without asking the directory.
const MAX_LOGIN_BYTES: usize = 256;
/// How many entries `idp test` counts before it says "or more".
const CHECK_COUNT_LIMIT: i32 = 1000;

/// An `[idp.NAME]` table with `type = "ldap"`: its keys are those of [`LdapKeys`], reached
/// through `Deref`. Boxed because it is by far the largest provider's settings and
/// `ProviderSettings` would otherwise be as large in every variant (clippy::large_enum_variant).
#[derive(Clone, Debug, Deserialize)]
#[serde(transparent)]
pub struct LdapSettings(pub Box<LdapKeys>);

impl std::ops::Deref for LdapSettings {
    type Target = LdapKeys;
    fn deref(&self) -> &LdapKeys {
        &self.0
    }
}

impl std::ops::DerefMut for LdapSettings {
    fn deref_mut(&mut self) -> &mut LdapKeys {
        &mut self.0
    }
}

/// The keys of an LDAP provider. Only `url`, `bind_dn`, `bind_password` and `user_base` have
/// no default; they are checked by [`LdapProvider::new`] (not while the file is read) so that a
/// configuration naming providers loads before they are complete.
///
/// ```toml
/// [idp.corp]
/// type = "ldap"
/// url = "ldap://ldap.example.org"            # StartTLS; or ldaps://ldap.example.org
/// ca_file = "/etc/trustbroker/ldap-ca.pem"
/// bind_dn = "cn=broker,ou=services,dc=example,dc=org"
/// bind_password = "…"
/// user_base = "ou=people,dc=example,dc=org"
/// ```
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LdapKeys {
    /// What the sign-in page shows [default: the provider's name].
    pub label: Option<String>,
    /// `ldap://host[:port]` (port 389, upgraded with StartTLS) or `ldaps://host[:port]` (636).
    /// No DN, filter or credentials in the URL.
    pub url: String,
    /// For `ldap://` only: upgrade with StartTLS before anything else is sent [default: true].
    /// `false` sends passwords in the clear, so it is accepted only when set explicitly AND the
    /// host is a loopback address (`127.0.0.0/8`, `::1`, `localhost`), e.g. a local proxy or
    /// test directory; anywhere else it is refused. Must not be `true` with `ldaps://`.
    pub starttls: Option<bool>,
    /// PEM file of the CA(s) that issued the server's certificate; only these are trusted then
    /// [default: the system's trusted CAs]. The certificate must name the URL's host.
    pub ca_file: Option<PathBuf>,
    /// DN of the read-only service account that searches for people and groups (required).
    /// Anonymous search is not supported.
    pub bind_dn: Option<String>,
    /// Its password (required; never logged).
    pub bind_password: Option<Secret>,
    /// Where people are searched, with subtree scope (required).
    pub user_base: Option<String>,
    /// The filter that finds a person by what they type; `{login}` is replaced, escaped
    /// (RFC 4515), by that [default: `(&(objectClass=inetOrgPerson)(uid={login}))`]. It must
    /// match exactly one entry: none or several refuse the sign-in.
    #[serde(default = "default_user_filter")]
    pub user_filter: String,
    /// Attribute holding the login name reported for the person [default: `uid`]; what they
    /// typed when the entry has none. (`sAMAccountName` on Active Directory.)
    #[serde(default = "default_login_attribute")]
    pub login_attribute: String,
    /// Attribute holding the e-mail address [default: `mail`].
    #[serde(default = "default_mail_attribute")]
    pub mail_attribute: String,
    /// Attribute holding the name shown to people [default: `cn`].
    #[serde(default = "default_display_name_attribute")]
    pub display_name_attribute: String,
    /// A stable, unique attribute identifying the person across renames [default: `entryUUID`;
    /// `objectGUID` on Active Directory, whose binary value becomes lower-case hex]. The entry's
    /// DN when the entry has no value.
    #[serde(default = "default_subject_attribute")]
    pub subject_attribute: String,
    /// Where groups come from [default: `member_of`]: `member_of` reads `member_of_attribute`
    /// from the person's entry; `search` searches `group_base` with `group_filter`; `none`.
    #[serde(default)]
    pub groups: GroupSource,
    /// With `groups = "member_of"`: the attribute listing the person's group DNs
    /// [default: `memberOf`]. Operational on OpenLDAP (memberof overlay); requested by name.
    #[serde(default = "default_member_of_attribute")]
    pub member_of_attribute: String,
    /// With `groups = "search"`: where groups are searched, with subtree scope (required then).
    pub group_base: Option<String>,
    /// With `groups = "search"`: the filter finding a person's groups. `{dn}` is replaced by the
    /// person's DN and `{login}` by their `login_attribute` value, both escaped [default: any of
    /// groupOfNames `member={dn}`, groupOfUniqueNames `uniqueMember={dn}`, posixGroup
    /// `memberUid={login}`].
    #[serde(default = "default_group_filter")]
    pub group_filter: String,
    /// With `groups = "search"`: the attribute naming a group [default: `cn`]; the value of the
    /// group DN's first RDN when the entry has none. (With `member_of`, always that RDN value.)
    #[serde(default = "default_group_name_attribute")]
    pub group_name_attribute: String,
    /// Seconds to connect, including StartTLS and the TLS handshake [default: 5; 1–300].
    #[serde(default = "default_timeout_secs")]
    pub connect_timeout_secs: u64,
    /// Seconds each operation (bind, search) may take, and a sign-in may wait for a free pooled
    /// connection [default: 5; 1–300].
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// Service-bound connections kept open and reused for searches [default: 4; 1–64].
    #[serde(default = "default_pool_size")]
    pub pool_size: usize,
    /// Seconds between group syncs [default: 0, off; 1–604800]. Each sync reads from the
    /// directory every group of this provider the store knows and every group a policy targets,
    /// brings the memberships of people who signed in before up to date (deltas only; nobody
    /// is created), and marks accounts gone from `user_base` `deleted` and those matching
    /// `disabled_filter` `disabled` (see [`sync`]).
    #[serde(default)]
    pub group_sync_interval_secs: u64,
    /// An LDAP filter matching disabled accounts, checked by the group sync [default: none, no
    /// disabled detection]: `(pwdAccountLockedTime=*)` for OpenLDAP's ppolicy,
    /// `(userAccountControl:1.2.840.113556.1.4.803:=2)` for Active Directory.
    pub disabled_filter: Option<String>,
    /// Entries per page of the group sync's paged searches (RFC 2696) [default: 500; 1–10000].
    /// The server's own page limit applies too (Active Directory's MaxPageSize is 1000).
    #[serde(default = "default_sync_page_size")]
    pub sync_page_size: u32,
}

/// Where a person's groups are read from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupSource {
    /// The person's `member_of_attribute` values.
    #[default]
    MemberOf,
    /// A search of `group_base` with `group_filter`.
    Search,
    /// No groups.
    #[serde(rename = "none")]
    Disabled,
}

fn default_user_filter() -> String {
    DEFAULT_USER_FILTER.into()
}
fn default_login_attribute() -> String {
    "uid".into()
}
fn default_mail_attribute() -> String {
    "mail".into()
}
fn default_display_name_attribute() -> String {
    "cn".into()
}
fn default_subject_attribute() -> String {
    "entryUUID".into()
}
fn default_member_of_attribute() -> String {
    "memberOf".into()
}
fn default_group_filter() -> String {
    DEFAULT_GROUP_FILTER.into()
}
fn default_group_name_attribute() -> String {
    "cn".into()
}
fn default_timeout_secs() -> u64 {
    DEFAULT_TIMEOUT_SECS
}
fn default_pool_size() -> usize {
    DEFAULT_POOL_SIZE
}
fn default_sync_page_size() -> u32 {
    sync::DEFAULT_PAGE_SIZE
}

enum Groups {
    MemberOf {
        attribute: String,
    },
    Search {
        base: String,
        filter: FilterTemplate,
        name_attribute: String,
    },
    Disabled,
}

struct Attributes {
    login: String,
    mail: String,
    display_name: String,
    subject: String,
}

pub struct LdapProvider {
    name: String,
    endpoint: Endpoint,
    bind_dn: String,
    bind_password: Secret,
    user_base: String,
    user_filter: FilterTemplate,
    attributes: Attributes,
    groups: Groups,
    pool: Pool,
    sync: sync::SyncSettings,
}

impl fmt::Debug for LdapProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LdapProvider")
            .field("name", &self.name)
            .field("url", &self.endpoint.url)
            .field("bind_dn", &self.bind_dn)
            .field("user_base", &self.user_base)
            .finish_non_exhaustive()
    }
}

impl LdapProvider {
    /// Checks the settings and reads `ca_file`; no network traffic (connections are opened on
    /// first use). Every problem is `Misconfigured`, naming the key.
    pub fn new(name: &str, settings: &LdapSettings) -> Result<LdapProvider, IdpError> {
        build(name, settings).map_err(|e| IdpError::Misconfigured(format!("idp.{name}: {e}")))
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Connections idle in the pool (for metrics and tests).
    pub fn idle_connections(&self) -> usize {
        self.pool.idle()
    }

    /// Signs a person in with what they typed. A wrong password, an unknown or ambiguous login,
    /// a refused account and an empty password are all `Refused` with the same message.
    pub async fn authenticate(&self, login: &str, password: &str) -> Result<Identity, IdpError> {
        // An empty password makes the bind below an unauthenticated bind, which many servers
        // answer with success.
        if password.is_empty() || !plausible_login(login) {
            return Err(refused());
        }
        let user = match self.find_user(login).await {
            Ok(user) => user,
            Err(refusal @ IdpError::Refused(_)) => {
                // Unknown or ambiguous: a password bind still happens (as no one), so that the
                // answer takes as long as a wrong password's and timing does not tell who
                // exists. The result is refused whatever the server says.
                let decoy = format!(
                    "cn=trustbroker-decoy-{},{}",
                    hex::encode(crate::random::bytes::<8>()),
                    self.user_base
                );
                let _ = self.check_password(&decoy, password).await;
                return Err(refusal);
            }
            Err(e) => return Err(e),
        };
        self.check_password(&user.dn, password).await?;
        let login_value = user
            .text(&self.attributes.login)
            .unwrap_or_else(|| login.to_string());
        let groups = self.groups_of(&user, &login_value).await?;
        Ok(Identity {
            provider: self.name.clone(),
            subject: self.subject_of(&user),
            login: Some(login_value),
            email: user.text(&self.attributes.mail),
            display_name: user.text(&self.attributes.display_name),
            groups,
        })
    }

    /// What `trustbroker idp test NAME` runs, on a connection of its own: connect (with TLS),
    /// bind as the service account, find the user base (and group base). Returns a line per step
    /// that passed, or the first failure.
    pub async fn check(&self) -> Result<Vec<String>, IdpError> {
        let mut lines = Vec::new();
        let mut ldap = self.endpoint.connect().await?;
        lines.push(self.endpoint.describe());
        self.service_bind(&mut ldap).await?;
        lines.push(format!("service bind as {} accepted", self.bind_dn));
        let users = self
            .count(&mut ldap, "user_base", &self.user_base, &self.user_filter)
            .await?;
        lines.push(format!(
            "user base {} found; user_filter {} matches {users}",
            self.user_base, self.user_filter
        ));
        if let Groups::Search { base, filter, .. } = &self.groups {
            let groups = self.count(&mut ldap, "group_base", base, filter).await?;
            lines.push(format!(
                "group base {base} found; group_filter matches {groups}"
            ));
        }
        let _ = ldap.unbind().await;
        Ok(lines)
    }

    /// How many entries under `base` match `filter` with its placeholders as `*`.
    async fn count(
        &self,
        ldap: &mut Ldap,
        key: &str,
        base: &str,
        filter: &FilterTemplate,
    ) -> Result<String, IdpError> {
        let SearchResult(entries, result) = ldap
            .with_timeout(self.endpoint.timeout)
            .with_search_options(SearchOptions::new().sizelimit(CHECK_COUNT_LIMIT))
            .search(base, Scope::Subtree, &filter.render_any(), vec!["1.1"])
            .await
            .map_err(|e| self.endpoint.transport_error("searching", e))?;
        let found = entries.iter().filter(|e| !e.is_ref()).count();
        let noun = if found == 1 { "entry" } else { "entries" };
        match result.rc {
            0 | 10 => Ok(format!("{found} {noun}")),
            4 => Ok(format!("{found} {noun} or more")),
            _ => Err(search_error(key, base, &result)),
        }
    }

    /// The one entry the user filter finds for `login`.
    async fn find_user(&self, login: &str) -> Result<Entry, IdpError> {
        let filter = self.user_filter.render(login, "");
        let mut attrs = vec![
            self.attributes.login.as_str(),
            &self.attributes.mail,
            &self.attributes.display_name,
            &self.attributes.subject,
        ];
        if let Groups::MemberOf { attribute } = &self.groups {
            attrs.push(attribute);
        }
        // Two are enough to tell "exactly one" from "several".
        let (mut entries, result) = self
            .service_search(&self.user_base, &filter, &attrs, 2)
            .await?;
        match result.rc {
            // 4 (sizeLimitExceeded) means more than fit: several, whatever arrived.
            0 | 4 | 10 => {}
            _ => return Err(search_error("user_base", &self.user_base, &result)),
        }
        if result.rc == 4 || entries.len() > 1 {
            let dns: Vec<_> = entries.iter().map(|e| e.dn.as_str()).collect();
            tracing::warn!(
                provider = %self.name,
                %filter,
                ?dns,
                "LDAP user_filter matched several entries; sign-in refused"
            );
            return Err(refused());
        }
        entries.pop().ok_or_else(|| {
            tracing::debug!(provider = %self.name, %filter, "LDAP: no such user");
            refused()
        })
    }

    /// Binds as the person to check their password.
    ///
    /// This happens on a connection of its own, closed right after, never on a pooled one: a
    /// pooled connection bound as the person would act as them until rebound, and one failed
    /// or forgotten rebind would hand their rights to the next sign-in. A sign-in costs one
    /// extra connection; sign-ins are rare next to the searches the pool serves.
    async fn check_password(&self, dn: &str, password: &str) -> Result<(), IdpError> {
        let mut ldap = self.endpoint.connect().await?;
        let result = ldap
            .with_timeout(self.endpoint.timeout)
            .simple_bind(dn, password)
            .await
            .map_err(|e| self.endpoint.transport_error("checking the password", e));
        let _ = ldap.unbind().await;
        let result = result?;
        match result.rc {
            0 => Ok(()),
            49 => Err(refused()),
            // A locked, expired or policy-refused account: the person's matter, told alike.
            19 | 48 | 50 | 53 => {
                tracing::info!(
                    provider = %self.name,
                    %dn,
                    result = %result_text(&result),
                    "LDAP refused the password bind"
                );
                Err(refused())
            }
            _ => Err(IdpError::Protocol(format!(
                "the password bind as {dn} failed: {}",
                result_text(&result)
            ))),
        }
    }

    async fn groups_of(&self, user: &Entry, login: &str) -> Result<Vec<Group>, IdpError> {
        let mut groups: Vec<Group> = match &self.groups {
            Groups::Disabled => Vec::new(),
            Groups::MemberOf { attribute } => user
                .texts(attribute)
                .into_iter()
                .map(|dn| Group {
                    name: rdn_value(&dn).unwrap_or_else(|| dn.clone()),
                    id: dn,
                })
                .collect(),
            Groups::Search {
                base,
                filter,
                name_attribute,
            } => {
                let filter = filter.render(login, &user.dn);
                let (entries, result) = self
                    .service_search(base, &filter, &[name_attribute.as_str()], 0)
                    .await?;
                match result.rc {
                    0 | 10 => {}
                    // Part of the groups could grant or lift the wrong policy: refuse instead.
                    4 => {
                        return Err(IdpError::Protocol(format!(
                            "the group search under {base} hit the server's size limit"
                        )));
                    }
                    _ => return Err(search_error("group_base", base, &result)),
                }
                entries
                    .into_iter()
                    .map(|e| Group {
                        name: e
                            .text(name_attribute)
                            .or_else(|| rdn_value(&e.dn))
                            .unwrap_or_else(|| e.dn.clone()),
                        id: e.dn,
                    })
                    .collect()
            }
        };
        groups.sort();
        groups.dedup_by(|a, b| a.id == b.id);
        Ok(groups)
    }

    fn subject_of(&self, user: &Entry) -> String {
        if let Some(text) = user.text(&self.attributes.subject) {
            return text;
        }
        match user
            .values(&self.attributes.subject)
            .find(|v| !v.is_empty())
        {
            Some(binary) => hex::encode(binary),
            None => user.dn.clone(),
        }
    }

    /// A search as the service account, on a pooled connection (opened and bound if none is
    /// idle). Result codes are the caller's to read; transport failures are errors.
    async fn service_search(
        &self,
        base: &str,
        filter: &str,
        attrs: &[&str],
        size_limit: i32,
    ) -> Result<(Vec<Entry>, LdapResult), IdpError> {
        let mut retried = false;
        loop {
            let mut lease = self
                .pool
                .lease(self.endpoint.timeout)
                .await
                .ok_or_else(|| {
                    IdpError::Unreachable(format!(
                        "{}: all {} pooled connections stayed busy for {} s",
                        self.endpoint.url,
                        self.pool.size(),
                        self.endpoint.timeout.as_secs()
                    ))
                })?;
            let (mut ldap, reused) = match lease.ldap.take() {
                Some(ldap) => (ldap, true),
                None => (self.service_connection().await?, false),
            };
            let outcome = ldap
                .with_timeout(self.endpoint.timeout)
                .with_search_options(SearchOptions::new().sizelimit(size_limit))
                .search(base, Scope::Subtree, filter, attrs.to_vec())
                .await;
            match outcome {
                Ok(SearchResult(entries, result)) => {
                    lease.release(ldap);
                    let entries = entries.into_iter().filter_map(Entry::read).collect();
                    return Ok((entries, result));
                }
                // An idle connection the server closed (idle timeout, restart): the others
                // are likely gone too; try once more on a fresh one.
                Err(e) if reused && !retried && !matches!(e, ldap3::LdapError::Timeout { .. }) => {
                    tracing::debug!(provider = %self.name, error = %e, "stale pooled LDAP connection");
                    self.pool.clear_idle();
                    retried = true;
                }
                Err(e) => return Err(self.endpoint.transport_error("searching", e)),
            }
        }
    }

    async fn service_connection(&self) -> Result<Ldap, IdpError> {
        let mut ldap = self.endpoint.connect().await?;
        self.service_bind(&mut ldap).await?;
        Ok(ldap)
    }

    async fn service_bind(&self, ldap: &mut Ldap) -> Result<(), IdpError> {
        let result = ldap
            .with_timeout(self.endpoint.timeout)
            .simple_bind(&self.bind_dn, &self.bind_password.0)
            .await
            .map_err(|e| {
                self.endpoint
                    .transport_error("binding as the service account", e)
            })?;
        match result.rc {
            0 => Ok(()),
            49 => Err(IdpError::Misconfigured(format!(
                "the service bind as {} was refused: wrong bind_dn or bind_password \
                 (invalidCredentials)",
                self.bind_dn
            ))),
            _ => Err(IdpError::Misconfigured(format!(
                "the service bind as {} failed: {}",
                self.bind_dn,
                result_text(&result)
            ))),
        }
    }
}

fn refused() -> IdpError {
    IdpError::Refused(REFUSED.into())
}

/// A failed search of a configured base, as the operator needs to read it.
fn search_error(key: &str, base: &str, result: &LdapResult) -> IdpError {
    match result.rc {
        32 => IdpError::Misconfigured(format!("{key} {base} does not exist (noSuchObject)")),
        34 => IdpError::Misconfigured(format!("{key} {base} is not a valid DN")),
        50 => IdpError::Misconfigured(format!(
            "the service account may not search {key} {base} (insufficientAccessRights)"
        )),
        _ => IdpError::Protocol(format!("searching {key} {base}: {}", result_text(result))),
    }
}

/// Logins worth asking the directory about: not blank, not absurdly long, no control characters
/// (NUL would end the string in some servers' C code).
fn plausible_login(login: &str) -> bool {
    !login.trim().is_empty()
        && login.len() <= MAX_LOGIN_BYTES
        && !login.chars().any(char::is_control)
}

fn build(name: &str, s: &LdapSettings) -> Result<LdapProvider, String> {
    // reqwest re-exports the url crate, which ldap3 parses with too.
    let url = reqwest::Url::parse(&s.url).map_err(|e| format!("url {:?}: {e}", s.url))?;
    let ldaps = match url.scheme() {
        "ldap" => false,
        "ldaps" => true,
        _ => {
            return Err(format!(
                "url {:?} must start with ldap:// or ldaps://",
                s.url
            ));
        }
    };
    if !url.username().is_empty() || url.password().is_some() {
        return Err("url must not hold credentials: use bind_dn and bind_password".into());
    }
    if !matches!(url.path(), "" | "/") || url.query().is_some() || url.fragment().is_some() {
        return Err(format!(
            "url {:?} must be scheme://host[:port] only: the base and filter are user_base \
             and user_filter",
            s.url
        ));
    }
    // Host names compare case-insensitively; the url crate leaves them as written for ldap://.
    let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
    if host.is_empty() {
        return Err(format!("url {:?} names no host", s.url));
    }
    let transport = match (ldaps, s.starttls) {
        (true, Some(true)) => {
            return Err("starttls = true does not apply to ldaps:// (TLS from the start)".into());
        }
        (true, _) => Transport::Ldaps,
        (false, None | Some(true)) => Transport::StartTls,
        (false, Some(false)) if is_loopback(&host) => Transport::Plain,
        (false, Some(false)) => {
            return Err(format!(
                "starttls = false would send passwords in the clear to {host}: it is allowed \
                 only for a loopback address; use StartTLS or ldaps://"
            ));
        }
    };
    let tls = match (&s.ca_file, transport) {
        (Some(_), Transport::Plain) => {
            return Err("ca_file has no use with starttls = false".into());
        }
        (Some(path), _) => Some(conn::tls_config(path).map_err(|e| match e {
            IdpError::Misconfigured(m) => m,
            other => other.to_string(),
        })?),
        (None, _) => None,
    };
    if transport == Transport::Plain {
        tracing::warn!(provider = name, url = %s.url, "LDAP without TLS (starttls = false, loopback)");
    }
    let required = |key: &str, value: &Option<String>| match value.as_deref().map(str::trim) {
        Some(v) if !v.is_empty() => Ok(v.to_string()),
        _ => Err(format!("{key} is required")),
    };
    let bind_dn = required("bind_dn", &s.bind_dn)?;
    let bind_password = match &s.bind_password {
        Some(p) if !p.0.is_empty() => p.clone(),
        // An empty password would make the service bind unauthenticated.
        _ => return Err("bind_password is required".into()),
    };
    let user_base = required("user_base", &s.user_base)?;
    let user_filter = FilterTemplate::parse(&s.user_filter, &[Placeholder::Login])
        .map_err(|e| format!("user_filter {:?}: {e}", s.user_filter))?;
    let attribute = |key: &str, value: &str| {
        let ok = !value.is_empty()
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b';'));
        if ok {
            Ok(value.to_string())
        } else {
            Err(format!("{key} {value:?} is not an attribute name"))
        }
    };
    let attributes = Attributes {
        login: attribute("login_attribute", &s.login_attribute)?,
        mail: attribute("mail_attribute", &s.mail_attribute)?,
        display_name: attribute("display_name_attribute", &s.display_name_attribute)?,
        subject: attribute("subject_attribute", &s.subject_attribute)?,
    };
    let groups = match s.groups {
        GroupSource::Disabled => Groups::Disabled,
        GroupSource::MemberOf => Groups::MemberOf {
            attribute: attribute("member_of_attribute", &s.member_of_attribute)?,
        },
        GroupSource::Search => Groups::Search {
            base: required("group_base (with groups = \"search\")", &s.group_base)?,
            filter: FilterTemplate::parse(&s.group_filter, &[Placeholder::Dn, Placeholder::Login])
                .map_err(|e| format!("group_filter {:?}: {e}", s.group_filter))?,
            name_attribute: attribute("group_name_attribute", &s.group_name_attribute)?,
        },
    };
    let seconds = |key: &str, value: u64| {
        if (1..=300).contains(&value) {
            Ok(Duration::from_secs(value))
        } else {
            Err(format!("{key} must be 1–300 seconds, not {value}"))
        }
    };
    let connect_timeout = seconds("connect_timeout_secs", s.connect_timeout_secs)?;
    let timeout = seconds("timeout_secs", s.timeout_secs)?;
    if !(1..=64).contains(&s.pool_size) {
        return Err(format!("pool_size must be 1–64, not {}", s.pool_size));
    }
    let sync = sync::SyncSettings::check(s)?;
    let port = url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let scheme = if ldaps { "ldaps" } else { "ldap" };
    Ok(LdapProvider {
        name: name.to_string(),
        endpoint: Endpoint {
            url: format!("{scheme}://{host}{port}"),
            transport,
            tls,
            ca_file: s.ca_file.as_ref().map(|p| p.display().to_string()),
            host: host.clone(),
            connect_timeout,
            timeout,
        },
        bind_dn,
        bind_password,
        user_base,
        user_filter,
        attributes,
        groups,
        pool: Pool::new(s.pool_size),
        sync,
    })
}

/// `localhost`, or an IP address (`[::1]` as URLs write it) in a loopback range.
fn is_loopback(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || bare.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests;
