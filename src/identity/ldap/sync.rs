//! The periodic LDAP group sync: brings the memberships and account status of people who signed
//! in through an LDAP provider up to date with the directory, between their sign-ins.
//!
//! One run, on a connection of its own (never a pooled one: a long paged search must not hold a
//! connection a sign-in waits for):
//!
//! 1. one paged search of `user_base` reading only the subject attribute tells which known
//!    people still exist (the others are `deleted`); a second, with `disabled_filter`, which
//!    are `disabled`;
//! 2. for each group — every group of the provider the store knows, and every group a policy
//!    targets even if no member signed in since — the members, by a paged search of `user_base`
//!    for `memberOf=<group DN>` (`groups = "member_of"`) or from the group entry's `member`,
//!    `uniqueMember` and `memberUid` values (`groups = "search"`);
//! 3. the store writes only the differences, each with a reconcile request for the person in
//!    the same transaction, and the reconciler is woken.
//!
//! People the store does not know are never created: a 100,000-member group most of whom never
//! enrolled a device is read, not stored. A search the server cut short (a size or time limit,
//! an error) never counts as complete: a partial member list would make the rest "leave".
//!
//! Limits: with `groups = "search"` only the group entry's `member`/`uniqueMember` (DNs) and
//! `memberUid` (logins) values are read — what the default `group_filter` matches; a custom
//! `group_filter` with other membership rules, nested groups and Active Directory's ranged
//! `member;range=…` retrieval are not mirrored (use `member_of` there). DNs are compared
//! case-insensitively, ignoring spaces around separators, but `\2C` and `\,` differ.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ldap3::adapters::PagedResults;
use ldap3::{Ldap, Scope, SearchResult};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::conn::Entry;
use super::template::rdn_value;
use super::{Attributes, Groups, LdapKeys, LdapProvider, search_error};
use crate::identity::{IdpError, ProviderSettings};
use crate::policy::{ActivePolicies, ReconcileWake};
use crate::store::{AccountStatus, DirectoryDetails, DirectoryUser, Store, StoreError};

/// The `source` of memberships the sync records.
pub const SOURCE: &str = "ldap-sync";
pub const DEFAULT_PAGE_SIZE: u32 = 500;
const MAX_PAGE_SIZE: u32 = 10_000;
const MAX_INTERVAL_SECS: u64 = 7 * 24 * 3600;
const MAX_FILTER_BYTES: usize = 4096;
/// Entries one search may return before the run gives up: far above any real directory's
/// group, low enough that a runaway search cannot exhaust memory.
const MAX_ENTRIES_PER_SEARCH: usize = 5_000_000;
/// Groups one run reads at most.
const MAX_GROUPS: usize = 100_000;

/// The group sync keys of an LDAP provider, checked with the rest of its settings.
#[derive(Clone, Debug)]
pub struct SyncSettings {
    interval: Option<Duration>,
    disabled_filter: Option<String>,
    page_size: i32,
}

impl SyncSettings {
    pub(super) fn check(keys: &LdapKeys) -> Result<SyncSettings, String> {
        let interval = match keys.group_sync_interval_secs {
            0 => None,
            secs @ 1..=MAX_INTERVAL_SECS => Some(Duration::from_secs(secs)),
            secs => {
                return Err(format!(
                    "group_sync_interval_secs must be 0 (off) or 1–{MAX_INTERVAL_SECS}, not {secs}"
                ));
            }
        };
        let disabled_filter = match keys.disabled_filter.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(filter) => {
                if filter.len() > MAX_FILTER_BYTES
                    || !filter.starts_with('(')
                    || ldap3::parse_filter(filter).is_err()
                {
                    return Err(format!(
                        "disabled_filter {filter:?} is not a valid LDAP filter (RFC 4515), e.g. \
                         (pwdAccountLockedTime=*)"
                    ));
                }
                Some(filter.to_string())
            }
        };
        let page_size = match i32::try_from(keys.sync_page_size) {
            Ok(size) if (1..=MAX_PAGE_SIZE).contains(&keys.sync_page_size) => size,
            _ => {
                return Err(format!(
                    "sync_page_size must be 1–{MAX_PAGE_SIZE}, not {}",
                    keys.sync_page_size
                ));
            }
        };
        Ok(SyncSettings {
            interval,
            disabled_filter,
            page_size,
        })
    }
}

impl LdapProvider {
    /// How often the group sync runs; `None` when it is off.
    pub fn group_sync_interval(&self) -> Option<Duration> {
        self.sync.interval
    }
}

/// Why a run stopped. Failures of single groups do not stop it (see
/// [`SyncReport::failed_groups`]).
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Directory(#[from] IdpError),
    #[error("the group sync could not write to the store: {0}")]
    Store(#[from] StoreError),
}

/// What one run saw and changed.
#[derive(Clone, Debug, Default)]
pub struct SyncReport {
    /// Groups read.
    pub groups: usize,
    /// Members the directory listed, over all groups, known to the store or not.
    pub members_seen: usize,
    /// Entries the search of `user_base` found.
    pub accounts_seen: usize,
    pub joined: usize,
    pub left: usize,
    /// Accounts that became disabled, deleted, or active again in this run.
    pub disabled: usize,
    pub deleted: usize,
    pub reactivated: usize,
    /// People whose login, e-mail address or display name changed.
    pub details_changed: usize,
    /// Reconcile requests recorded.
    pub requests: usize,
    /// Groups that could not be read completely, with why; their memberships were left alone.
    pub failed_groups: Vec<(String, String)>,
    /// Why account status was not checked (the search of `user_base` found nobody at all).
    pub status_skipped: Option<String>,
    pub duration: Duration,
}

/// The group sync of one LDAP provider.
pub struct GroupSync {
    provider: Arc<LdapProvider>,
}

/// A group as `groups = "search"` reads it: its entry's member values.
struct ListedGroup {
    dn: String,
    name: String,
    /// Normalized (see [`normalize_dn`]).
    member_dns: Vec<String>,
    /// Lower-case.
    member_logins: Vec<String>,
}

impl GroupSync {
    pub fn new(provider: Arc<LdapProvider>) -> GroupSync {
        GroupSync { provider }
    }

    pub fn provider(&self) -> &str {
        &self.provider.name
    }

    /// The groups a run reads: every group of this provider the store knows, and every group a
    /// policy targets (synced even when none of its members has signed in since).
    pub async fn groups_to_sync(
        &self,
        store: &Store,
        policies: &ActivePolicies,
    ) -> Result<Vec<String>, StoreError> {
        let mut groups: BTreeSet<String> = store
            .directory_groups(self.provider())
            .await?
            .into_iter()
            .collect();
        groups.extend(policies.targeted_groups(self.provider()));
        Ok(groups.into_iter().collect())
    }

    /// One sync of `groups` (DNs) and of the status of every person of this provider the store
    /// knows. Only differences are written.
    pub async fn run_once(
        &self,
        store: &Store,
        groups: &[String],
    ) -> Result<SyncReport, SyncError> {
        let started = Instant::now();
        let groups: BTreeSet<&String> = groups.iter().collect();
        if groups.len() > MAX_GROUPS {
            return Err(IdpError::Misconfigured(format!(
                "{} groups to sync; at most {MAX_GROUPS} are read per run",
                groups.len()
            ))
            .into());
        }
        let known: HashMap<String, DirectoryUser> = store
            .directory_users(self.provider())
            .await?
            .into_iter()
            .map(|user| (user.subject.clone(), user))
            .collect();
        let mut report = SyncReport {
            groups: groups.len(),
            ..SyncReport::default()
        };
        // Nobody signed in through this provider yet: nothing the directory says could change
        // the store, so it is not asked.
        if known.is_empty() {
            report.duration = started.elapsed();
            return Ok(report);
        }
        let mut ldap = self.provider.service_connection().await?;
        let outcome = self
            .sync_on(&mut ldap, store, &known, &groups, &mut report)
            .await;
        let _ = ldap.unbind().await;
        outcome?;
        report.duration = started.elapsed();
        Ok(report)
    }

    async fn sync_on(
        &self,
        ldap: &mut Ldap,
        store: &Store,
        known: &HashMap<String, DirectoryUser>,
        groups: &BTreeSet<&String>,
        report: &mut SyncReport,
    ) -> Result<(), SyncError> {
        let p = &*self.provider;
        let people = self.person_filter();

        // With group searches, the member DNs and logins come first, so that the search of
        // user_base below keeps only the DNs and logins some group lists.
        let mut listed = Vec::new();
        let mut wanted_dns = HashSet::new();
        let mut wanted_logins = HashSet::new();
        if let Groups::Search { name_attribute, .. } = &p.groups {
            for dn in groups {
                match self.read_group(ldap, dn, name_attribute).await {
                    Ok(group) => {
                        wanted_dns.extend(group.member_dns.iter().cloned());
                        wanted_logins.extend(group.member_logins.iter().cloned());
                        listed.push(group);
                    }
                    Err(e) => report.failed_groups.push(((*dn).clone(), e.to_string())),
                }
            }
        }
        let by_member_dn = !listed.is_empty();

        // Who still exists (and, with group searches, their DNs and logins).
        let mut present = HashSet::new();
        let mut subject_by_dn = HashMap::new();
        let mut subject_by_login = HashMap::new();
        let mut attrs = vec![p.attributes.subject.as_str()];
        if by_member_dn {
            attrs.push(&p.attributes.login);
        }
        report.accounts_seen = self
            .paged(ldap, &people, &attrs, |entry| {
                let subject = p.subject_of(&entry);
                if !known.contains_key(&subject) {
                    return;
                }
                if by_member_dn {
                    let dn = normalize_dn(&entry.dn);
                    if wanted_dns.contains(&dn) {
                        subject_by_dn.insert(dn, subject.clone());
                    }
                    if let Some(login) = entry.text(&p.attributes.login) {
                        let login = login.to_lowercase();
                        if wanted_logins.contains(&login) {
                            subject_by_login.insert(login, subject.clone());
                        }
                    }
                }
                present.insert(subject);
            })
            .await?;
        let mut disabled = HashSet::new();
        if let Some(filter) = &p.sync.disabled_filter {
            self.paged(ldap, filter, &[&p.attributes.subject], |entry| {
                let subject = p.subject_of(&entry);
                if known.contains_key(&subject) {
                    disabled.insert(subject);
                }
            })
            .await?;
        }

        let mut details = HashMap::new();
        match &p.groups {
            Groups::MemberOf { attribute } => {
                let attrs = [
                    p.attributes.subject.as_str(),
                    &p.attributes.login,
                    &p.attributes.mail,
                    &p.attributes.display_name,
                ];
                for dn in groups {
                    let filter = format!("(&{people}({attribute}={}))", ldap3::ldap_escape(*dn));
                    let mut members = Vec::new();
                    let seen = self
                        .paged(ldap, &filter, &attrs, |entry| {
                            let subject = p.subject_of(&entry);
                            let Some(user) = known.get(&subject) else {
                                return;
                            };
                            if let Some(changed) = changed_details(user, &entry, &p.attributes) {
                                details.insert(subject.clone(), changed);
                            }
                            members.push(subject);
                        })
                        .await;
                    match seen {
                        Ok(seen) => {
                            report.members_seen += seen;
                            let name = rdn_value(dn).unwrap_or_else(|| (*dn).clone());
                            self.write_group(store, dn, &name, &members, report).await?;
                        }
                        Err(e) => report.failed_groups.push(((*dn).clone(), e.to_string())),
                    }
                }
            }
            Groups::Search { .. } => {
                for group in listed {
                    report.members_seen += group.member_dns.len() + group.member_logins.len();
                    let members: BTreeSet<String> = group
                        .member_dns
                        .iter()
                        .filter_map(|dn| subject_by_dn.get(dn))
                        .chain(
                            group
                                .member_logins
                                .iter()
                                .filter_map(|login| subject_by_login.get(login)),
                        )
                        .cloned()
                        .collect();
                    let members: Vec<String> = members.into_iter().collect();
                    self.write_group(store, &group.dn, &group.name, &members, report)
                        .await?;
                }
            }
            Groups::Disabled => {}
        }

        self.write_statuses(store, known, &present, &disabled, report)
            .await?;
        let details: Vec<DirectoryDetails> = details.into_values().collect();
        let updated = store
            .update_directory_details(self.provider(), &details)
            .await?;
        report.details_changed = updated.len();
        report.requests += updated.len();
        Ok(())
    }

    /// Who is a person here: what `user_filter` matches for any login, or — so that an account
    /// the user filter leaves out once disabled counts as disabled, not deleted — what
    /// `disabled_filter` matches.
    fn person_filter(&self) -> String {
        let any = self.provider.user_filter.render_any();
        match &self.provider.sync.disabled_filter {
            Some(disabled) => format!("(|{any}{disabled})"),
            None => any,
        }
    }

    async fn write_group(
        &self,
        store: &Store,
        dn: &str,
        name: &str,
        members: &[String],
        report: &mut SyncReport,
    ) -> Result<(), StoreError> {
        let delta = store
            .sync_group_members(self.provider(), dn, name, members, SOURCE)
            .await?;
        report.joined += delta.joined.len();
        report.left += delta.left.len();
        report.requests += delta.joined.len() + delta.left.len();
        Ok(())
    }

    async fn write_statuses(
        &self,
        store: &Store,
        known: &HashMap<String, DirectoryUser>,
        present: &HashSet<String>,
        disabled: &HashSet<String>,
        report: &mut SyncReport,
    ) -> Result<(), StoreError> {
        // A search that finds nobody at all is far likelier a changed ACL or base than a
        // directory emptied overnight: marking everyone deleted would strip every device.
        if report.accounts_seen == 0 && !known.is_empty() {
            let why = format!(
                "the search of user_base {} found no one; the status of {} known people was \
                 left alone",
                self.provider.user_base,
                known.len()
            );
            tracing::warn!(provider = %self.provider(), "LDAP group sync: {why}");
            report.status_skipped = Some(why);
            return Ok(());
        }
        let wanted: Vec<(String, AccountStatus)> = known
            .values()
            .filter_map(|user| {
                let status = if !present.contains(&user.subject) {
                    AccountStatus::Deleted
                } else if disabled.contains(&user.subject) {
                    AccountStatus::Disabled
                } else {
                    AccountStatus::Active
                };
                (status != user.status).then(|| (user.subject.clone(), status))
            })
            .collect();
        if wanted.is_empty() {
            return Ok(());
        }
        for change in store.set_account_status(self.provider(), &wanted).await? {
            report.requests += 1;
            match change.to {
                AccountStatus::Active => report.reactivated += 1,
                AccountStatus::Disabled => report.disabled += 1,
                AccountStatus::Deleted => report.deleted += 1,
            }
        }
        Ok(())
    }

    /// A paged search (RFC 2696) of `user_base`, handing each entry to `each`; the number of
    /// entries. Anything but a complete result is an error.
    async fn paged(
        &self,
        ldap: &mut Ldap,
        filter: &str,
        attrs: &[&str],
        mut each: impl FnMut(Entry),
    ) -> Result<usize, IdpError> {
        let p = &*self.provider;
        let base = p.user_base.as_str();
        let attrs: Vec<String> = attrs.iter().map(|a| (*a).to_string()).collect();
        let mut stream = ldap
            .with_timeout(p.endpoint.timeout)
            .streaming_search_with(
                PagedResults::new(p.sync.page_size),
                base,
                Scope::Subtree,
                filter,
                attrs,
            )
            .await
            .map_err(|e| p.endpoint.transport_error("searching (paged)", e))?;
        let mut seen = 0usize;
        loop {
            match stream.next().await {
                Ok(Some(raw)) => {
                    // Referrals and intermediate messages are not entries.
                    let Some(entry) = Entry::read(raw) else {
                        continue;
                    };
                    seen += 1;
                    if seen > MAX_ENTRIES_PER_SEARCH {
                        let _ = stream.finish().await;
                        return Err(IdpError::Protocol(format!(
                            "the search of user_base {base} for {filter} returned more than \
                             {MAX_ENTRIES_PER_SEARCH} entries"
                        )));
                    }
                    each(entry);
                }
                Ok(None) => break,
                Err(e) => {
                    let _ = stream.finish().await;
                    return Err(p.endpoint.transport_error("searching (paged)", e));
                }
            }
        }
        let result = stream.finish().await;
        match result.rc {
            0 => Ok(seen),
            // OpenLDAP's default limits also cap the total of a paged search (size.prtotal).
            4 => Err(IdpError::Protocol(format!(
                "the search of user_base {base} for {filter} stopped at the server's size limit \
                 after {seen} entries: let the service account {} read past it (OpenLDAP: \
                 limits dn.exact=\"{}\" size.prtotal=unlimited)",
                p.bind_dn, p.bind_dn
            ))),
            _ => Err(search_error("user_base", base, &result)),
        }
    }

    /// A group entry's members, for `groups = "search"`. A group that does not exist (any
    /// more) has none.
    async fn read_group(
        &self,
        ldap: &mut Ldap,
        dn: &str,
        name_attribute: &str,
    ) -> Result<ListedGroup, IdpError> {
        let p = &*self.provider;
        let attrs = vec!["member", "uniqueMember", "memberUid", name_attribute];
        let SearchResult(entries, result) = ldap
            .with_timeout(p.endpoint.timeout)
            .search(dn, Scope::Base, "(objectClass=*)", attrs)
            .await
            .map_err(|e| p.endpoint.transport_error("reading a group", e))?;
        let fallback_name = || rdn_value(dn).unwrap_or_else(|| dn.to_string());
        let entry = match result.rc {
            0 => entries.into_iter().find_map(Entry::read),
            32 => None,
            _ => return Err(search_error("group", dn, &result)),
        };
        let Some(entry) = entry else {
            return Ok(ListedGroup {
                dn: dn.to_string(),
                name: fallback_name(),
                member_dns: Vec::new(),
                member_logins: Vec::new(),
            });
        };
        let member_dns = entry
            .texts("member")
            .iter()
            .chain(entry.texts("uniqueMember").iter())
            .map(|value| normalize_dn(without_unique_id(value)))
            .collect();
        let member_logins = entry
            .texts("memberUid")
            .iter()
            .map(|login| login.to_lowercase())
            .collect();
        Ok(ListedGroup {
            dn: dn.to_string(),
            name: entry.text(name_attribute).unwrap_or_else(fallback_name),
            member_dns,
            member_logins,
        })
    }

    /// One run as the loop makes it: the groups to sync, the sync, a log line, metrics, and a
    /// wake-up for the reconciler when something changed.
    async fn run_and_report(&self, store: &Store, policies: &ActivePolicies, wake: &ReconcileWake) {
        let started = Instant::now();
        let provider = self.provider().to_string();
        let outcome = match self.groups_to_sync(store, policies).await {
            Ok(groups) => self.run_once(store, &groups).await,
            Err(e) => Err(e.into()),
        };
        metrics::histogram!("trustbroker_ldap_sync_duration_seconds",
            "provider" => provider.clone())
        .record(started.elapsed().as_secs_f64());
        match outcome {
            Ok(report) => {
                record_metrics(&provider, &report);
                log_summary(&provider, &report);
                if report.requests > 0 {
                    wake.wake();
                }
            }
            Err(e) => {
                metrics::counter!("trustbroker_ldap_sync_runs_total",
                    "provider" => provider.clone(), "outcome" => "error")
                .increment(1);
                tracing::warn!(%provider, error = %e,
                    "LDAP group sync failed; trying again at the next interval");
                // Groups written before a store failure have committed their requests.
                wake.wake();
            }
        }
    }
}

fn record_metrics(provider: &str, report: &SyncReport) {
    let provider = provider.to_string();
    let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
    metrics::counter!("trustbroker_ldap_sync_runs_total",
        "provider" => provider.clone(), "outcome" => "ok")
    .increment(1);
    for (change, n) in [("joined", report.joined), ("left", report.left)] {
        metrics::counter!("trustbroker_ldap_sync_membership_changes_total",
            "provider" => provider.clone(), "change" => change)
        .increment(count(n));
    }
    for (status, n) in [
        ("active", report.reactivated),
        ("disabled", report.disabled),
        ("deleted", report.deleted),
    ] {
        metrics::counter!("trustbroker_ldap_sync_account_changes_total",
            "provider" => provider.clone(), "status" => status)
        .increment(count(n));
    }
    metrics::counter!("trustbroker_ldap_sync_group_failures_total", "provider" => provider.clone())
        .increment(count(report.failed_groups.len()));
    metrics::gauge!("trustbroker_ldap_sync_groups", "provider" => provider.clone())
        .set(report.groups as f64);
    metrics::gauge!("trustbroker_ldap_sync_members_seen", "provider" => provider.clone())
        .set(report.members_seen as f64);
    metrics::gauge!("trustbroker_ldap_sync_last_success_timestamp_seconds", "provider" => provider)
        .set(chrono::Utc::now().timestamp() as f64);
}

/// The one-line summary of a run, at `$level`.
macro_rules! summary {
    ($level:ident, $provider:expr, $report:expr) => {
        tracing::$level!(
            provider = %$provider,
            groups = $report.groups,
            members_seen = $report.members_seen,
            accounts_seen = $report.accounts_seen,
            joined = $report.joined,
            left = $report.left,
            disabled = $report.disabled,
            deleted = $report.deleted,
            reactivated = $report.reactivated,
            details_changed = $report.details_changed,
            failed_groups = $report.failed_groups.len(),
            duration_ms = $report.duration.as_millis(),
            "LDAP group sync"
        )
    };
}

/// A line per run that changed something (info); quiet runs only at debug level, so that a
/// short interval does not flood the log.
fn log_summary(provider: &str, report: &SyncReport) {
    for (dn, why) in &report.failed_groups {
        tracing::warn!(%provider, group = %dn, error = %why,
            "LDAP group sync could not read a group; its memberships were left alone");
    }
    if report.requests > 0 || !report.failed_groups.is_empty() {
        summary!(info, provider, report);
    } else {
        summary!(debug, provider, report);
    }
}

/// The person's details when the directory's differ from the store's (a value the directory
/// does not have is not a difference: sign-in keeps what was typed then).
fn changed_details(
    user: &DirectoryUser,
    entry: &Entry,
    attributes: &Attributes,
) -> Option<DirectoryDetails> {
    let login = entry.text(&attributes.login);
    let email = entry.text(&attributes.mail);
    let display_name = entry.text(&attributes.display_name);
    let differs = |now: &Option<String>, stored: &Option<String>| now.is_some() && now != stored;
    let changed = differs(&login, &user.login)
        || differs(&email, &user.email)
        || differs(&display_name, &user.display_name);
    changed.then(|| DirectoryDetails {
        subject: user.subject.clone(),
        login,
        email,
        display_name,
    })
}

/// A DN in a form two spellings of it share: lower case, without the spaces RFC 4514 allows
/// around `,`, `+` and `=`. Escaped characters are kept as written.
fn normalize_dn(dn: &str) -> String {
    let mut out = String::with_capacity(dn.len());
    // Spaces held back until it is clear they are inside a value, not before a separator.
    let mut spaces = 0usize;
    let mut after_separator = true;
    let mut chars = dn.chars();
    while let Some(c) = chars.next() {
        match c {
            ',' | '+' | '=' => {
                spaces = 0;
                out.push(c);
                after_separator = true;
            }
            ' ' if after_separator => {}
            ' ' => spaces += 1,
            _ => {
                out.extend(std::iter::repeat_n(' ', spaces));
                spaces = 0;
                after_separator = false;
                out.extend(c.to_lowercase());
                if c == '\\'
                    && let Some(escaped) = chars.next()
                {
                    out.extend(escaped.to_lowercase());
                }
            }
        }
    }
    out
}

/// A `uniqueMember` value without its optional unique identifier (`dn#'0101'B`, RFC 4517
/// NameAndOptionalUID).
fn without_unique_id(value: &str) -> &str {
    match value.rsplit_once("#'") {
        Some((dn, uid)) if uid.ends_with("'B") => dn,
        _ => value,
    }
}

/// The LDAP providers in `settings` whose group sync is on, each as an instance of its own (its
/// own connections, apart from the sign-in pool).
pub fn configured(
    settings: &[(String, ProviderSettings)],
) -> Result<Vec<Arc<LdapProvider>>, IdpError> {
    let mut providers = Vec::new();
    for (name, setting) in settings {
        if let ProviderSettings::Ldap(ldap) = setting
            && ldap.group_sync_interval_secs > 0
        {
            providers.push(Arc::new(LdapProvider::new(name, ldap)?));
        }
    }
    Ok(providers)
}

/// Starts the sync loop of each provider in `providers` (see [`configured`]); the server keeps
/// the handles to wait for them at shutdown.
pub fn spawn_all(
    providers: Vec<Arc<LdapProvider>>,
    node: &crate::cluster::NodeId,
    store: &Store,
    policies: &ActivePolicies,
    wake: &ReconcileWake,
    shutdown: &watch::Receiver<bool>,
) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    for provider in providers {
        let Some(interval) = provider.group_sync_interval() else {
            continue;
        };
        tracing::info!(provider = %provider.name, interval_secs = interval.as_secs(),
            "LDAP group sync on");
        let lease = crate::cluster::Lease::new(
            store.clone(),
            format!("ldap-sync:{}", provider.name),
            node.clone(),
        );
        tasks.push(spawn(
            provider,
            lease,
            store.clone(),
            policies.clone(),
            wake.clone(),
            interval,
            shutdown.clone(),
        ));
    }
    tasks
}

/// Runs the sync of `provider` every `interval` (the first at once) until `shutdown` turns
/// true or its sender is dropped. A failed run is logged and retried at the next interval.
/// Only the node holding `lease` runs it: one sync per provider for the cluster.
pub fn spawn(
    provider: Arc<LdapProvider>,
    lease: crate::cluster::Lease,
    store: Store,
    policies: ActivePolicies,
    wake: ReconcileWake,
    interval: Duration,
    shutdown: watch::Receiver<bool>,
) -> JoinHandle<()> {
    tokio::spawn(sync_loop(
        provider, lease, store, policies, wake, interval, shutdown,
    ))
}

/// The loop [`spawn`] runs.
pub async fn sync_loop(
    provider: Arc<LdapProvider>,
    lease: crate::cluster::Lease,
    store: Store,
    policies: ActivePolicies,
    wake: ReconcileWake,
    interval: Duration,
    mut shutdown: watch::Receiver<bool>,
) {
    let sync = GroupSync::new(provider);
    let mut ticker = tokio::time::interval(interval);
    // A run longer than the interval delays the next one instead of starting runs back to back.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if *shutdown.borrow() {
            break;
        }
        tokio::select! {
            _ = ticker.tick() => {}
            _ = shutdown.changed() => continue,
        }
        if !lease.take(interval).await {
            continue;
        }
        // Shutdown abandons a run midway: each group's write is one transaction, so what
        // committed is whole and the rest is done at the next start.
        tokio::select! {
            () = sync.run_and_report(&store, &policies, &wake) => {}
            _ = shutdown.changed() => continue,
        }
    }
    lease.release().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::ldap::LdapSettings;

    fn keys(extra: &str) -> LdapSettings {
        toml::from_str(&format!(
            "url = \"ldap://127.0.0.1\"\nstarttls = false\nbind_dn = \"cn=b\"\n\
             bind_password = \"p\"\nuser_base = \"ou=people\"\n{extra}"
        ))
        .unwrap()
    }

    fn error(extra: &str) -> String {
        match LdapProvider::new("corp", &keys(extra)) {
            Ok(_) => panic!("accepted: {extra}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn sync_is_off_by_default_and_settings_are_bounded() {
        let provider = LdapProvider::new("corp", &keys("")).unwrap();
        assert_eq!(provider.group_sync_interval(), None);
        assert_eq!(provider.sync.page_size, 500);
        assert_eq!(provider.sync.disabled_filter, None);
        let on = LdapProvider::new(
            "corp",
            &keys(
                "group_sync_interval_secs = 60\nsync_page_size = 1000\n\
                 disabled_filter = \"(pwdAccountLockedTime=*)\"",
            ),
        )
        .unwrap();
        assert_eq!(on.group_sync_interval(), Some(Duration::from_secs(60)));
        assert_eq!(on.sync.page_size, 1000);
        assert!(
            error("sync_page_size = 0").contains("sync_page_size must be 1–10000, not 0"),
            "{}",
            error("sync_page_size = 0")
        );
        assert!(error("sync_page_size = 10001").contains("not 10001"));
        assert!(error("group_sync_interval_secs = 604801").contains("group_sync_interval_secs"));
        assert!(error("disabled_filter = \"description=x\"").contains("not a valid LDAP filter"));
        assert!(error("disabled_filter = \"(description=x\"").contains("not a valid LDAP filter"));
    }

    #[test]
    fn people_include_accounts_the_user_filter_drops_once_disabled() {
        let sync = |extra: &str| {
            GroupSync::new(Arc::new(LdapProvider::new("corp", &keys(extra)).unwrap()))
        };
        assert_eq!(
            sync("").person_filter(),
            "(&(objectClass=inetOrgPerson)(uid=*))"
        );
        assert_eq!(
            sync("disabled_filter = \"(description=disabled)\"").person_filter(),
            "(|(&(objectClass=inetOrgPerson)(uid=*))(description=disabled))"
        );
    }

    #[test]
    fn dns_compare_without_case_or_spaces_around_separators() {
        assert_eq!(
            normalize_dn("UID=Alice , OU=People,dc=Example, dc=org"),
            "uid=alice,ou=people,dc=example,dc=org"
        );
        assert_eq!(
            normalize_dn("cn=Smith\\, John ,ou=x"),
            "cn=smith\\, john,ou=x"
        );
        assert_eq!(normalize_dn("cn=a b,ou=x "), "cn=a b,ou=x");
        assert_eq!(without_unique_id("uid=a,ou=x#'0101'B"), "uid=a,ou=x");
        assert_eq!(without_unique_id("uid=a#b,ou=x"), "uid=a#b,ou=x");
    }

    #[test]
    fn details_differ_only_where_the_directory_has_a_value() {
        let user = DirectoryUser {
            id: "u1".into(),
            subject: "s1".into(),
            login: Some("dana".into()),
            email: Some("dana@example.org".into()),
            display_name: Some("Dana".into()),
            status: AccountStatus::Active,
        };
        let attributes = Attributes {
            login: "uid".into(),
            mail: "mail".into(),
            display_name: "cn".into(),
            subject: "entryUUID".into(),
        };
        let same = Entry::new(
            "uid=dana,ou=people",
            &[("uid", &[b"dana"]), ("mail", &[b"dana@example.org"])],
        );
        assert_eq!(changed_details(&user, &same, &attributes), None);
        let moved = Entry::new(
            "uid=dana,ou=people",
            &[("uid", &[b"dana"]), ("mail", &[b"dana@new.example.org"])],
        );
        assert_eq!(
            changed_details(&user, &moved, &attributes),
            Some(DirectoryDetails {
                subject: "s1".into(),
                login: Some("dana".into()),
                email: Some("dana@new.example.org".into()),
                display_name: None,
            })
        );
    }
}
