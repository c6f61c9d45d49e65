//! The difference between a device's desired state and its ledger, as decisions: for each item
//! that must change, the transition (checked against the revision seen) and what to send.
//! Pure; the reconciler carries the decisions out and the plan counts them.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use chrono::{DateTime, Utc};
use plist::Dictionary;

use super::desired::{CompiledSet, Content, Desired, DesiredItem};
use crate::apple::commands::Command;
use crate::store::{CommandStatus, DeviceTarget, ItemAction, ItemKind, ManagedItemRow};

/// One change to one item of one device.
#[derive(Clone, Debug)]
pub struct Decision {
    pub key: String,
    pub kind: ItemKind,
    pub policy: String,
    pub group_ref: Option<String>,
    pub wanted: bool,
    pub content_hash: String,
    pub config_hash: Option<String>,
    /// The revision the ledger row had when this was decided (`None`: no row).
    pub expected_revision: Option<i64>,
    pub action: ItemAction,
    pub send: Option<Send>,
    /// A queued (never offered) command of this item that the decision makes pointless.
    pub cancel: Option<String>,
    pub due_at: Option<DateTime<Utc>>,
}

/// A command a decision sends.
#[derive(Clone, Debug)]
pub enum Send {
    InstallProfile {
        identifier: String,
        xml: Arc<Vec<u8>>,
    },
    RemoveProfile {
        identifier: String,
    },
    InstallApp {
        bundle_id: String,
        itunes_store_id: Option<u64>,
        manifest_url: Option<String>,
        configuration: Option<Arc<Dictionary>>,
    },
    ConfigureApp {
        bundle_id: String,
        configuration: Arc<Dictionary>,
    },
    RemoveApp {
        bundle_id: String,
    },
    Run(Command),
    Lock,
    Wipe,
    /// The device's enrollment profile again, with a fresh challenge for its record.
    RenewIdentity,
}

impl Send {
    /// Locks and wipes, which the plan lists apart and apply refuses without consent.
    pub fn is_destructive(&self) -> bool {
        matches!(self, Send::Lock | Send::Wipe)
    }
}

/// The deprovisioning actions a policy may take on leave, as ledger key suffixes.
const LOCK: &str = "lock";
const WIPE: &str = "wipe";

/// What must change on `device` for its ledger to match `desired`. Decisions come in item
/// key order.
pub fn diff(
    set: &CompiledSet,
    device: &DeviceTarget,
    desired: &Desired,
    ledger: &BTreeMap<String, ManagedItemRow>,
    now: DateTime<Utc>,
) -> Vec<Decision> {
    let mut decisions = Vec::new();
    let reported = ReportedProfiles::of(device);
    for item in desired.items.values() {
        if let Some(decision) = bring_in(item, ledger.get(&item.key), &reported) {
            decisions.push(decision);
        }
    }
    // Items the device should no longer have.
    for row in ledger.values() {
        if !row.wanted || desired.items.contains_key(&row.item_key) {
            continue;
        }
        match row.kind {
            ItemKind::Scope => {
                decisions.push(transition(row, false, ItemAction::Leave, None));
                decisions.extend(schedule_deprovisioning(set, row, ledger, now));
            }
            ItemKind::Join => decisions.push(transition(row, false, ItemAction::Leave, None)),
            ItemKind::Profile | ItemKind::App => decisions.push(take_out(set, row)),
            // A renewal no longer due (the device has its new certificate): nothing to undo,
            // and the enrollment profile must never be removed.
            ItemKind::Identity => decisions.push(transition(row, false, ItemAction::Leave, None)),
            // An inventory query answered (or no longer needed) stays as it was: its content
            // hash says which period it asked for.
            ItemKind::Inventory | ItemKind::Deprovision => {}
        }
    }
    // Waiting locks and wipes: called off by a return to scope, carried out when due.
    for row in ledger.values() {
        if row.kind != ItemKind::Deprovision || !row.wanted || row.action != ItemAction::Schedule {
            continue;
        }
        if desired.in_scope.contains_key(&row.policy) {
            decisions.push(transition(row, false, ItemAction::Cancel, None));
        } else if row.due_at.is_some_and(|due| due <= now) {
            let (action, send) = if row.item_key.ends_with(WIPE) {
                (ItemAction::Wipe, Send::Wipe)
            } else {
                (ItemAction::Lock, Send::Lock)
            };
            let mut decision = transition(row, true, action, Some(send));
            decision.due_at = row.due_at;
            decisions.push(decision);
        }
    }
    decisions.sort_by(|a, b| a.key.cmp(&b.key));
    decisions
}

/// The decision (if any) that brings `item` onto the device, given its ledger row.
fn bring_in(
    item: &DesiredItem,
    row: Option<&ManagedItemRow>,
    reported: &ReportedProfiles,
) -> Option<Decision> {
    let present = row.filter(|r| r.wanted);
    let (action, send) = match (&item.content, present) {
        (Content::Scope, None) => (ItemAction::Enter, None),
        (Content::Scope, Some(_)) => return None,
        (Content::Join(command), None) => (ItemAction::Run, Some(Send::Run(command.clone()))),
        (Content::Join(_), Some(_)) => return None,
        (Content::Identity, Some(r)) if r.content_hash == item.content_hash && !needs_resend(r) => {
            return None;
        }
        (Content::Identity, _) => (ItemAction::Install, Some(Send::RenewIdentity)),
        (Content::Inventory(_), Some(r)) if r.content_hash == item.content_hash => return None,
        (Content::Inventory(command), _) => (ItemAction::Run, Some(Send::Run(command.clone()))),
        (Content::Profile { identifier, xml }, present) => {
            let install = Send::InstallProfile {
                identifier: identifier.clone(),
                xml: xml.clone(),
            };
            match present {
                None => (ItemAction::Install, Some(install)),
                Some(r) if r.content_hash != item.content_hash => {
                    (ItemAction::Update, Some(install))
                }
                Some(r) if needs_resend(r) || reported.drifted(r, identifier) => {
                    (ItemAction::Install, Some(install))
                }
                Some(_) => return None,
            }
        }
        (
            Content::App {
                bundle_id,
                itunes_store_id,
                manifest_url,
                configuration,
                ..
            },
            present,
        ) => {
            let install = Send::InstallApp {
                bundle_id: bundle_id.clone(),
                itunes_store_id: *itunes_store_id,
                manifest_url: manifest_url.clone(),
                configuration: configuration.clone(),
            };
            match present {
                None => (ItemAction::Install, Some(install)),
                Some(r) if r.content_hash != item.content_hash || needs_resend(r) => {
                    (ItemAction::Update, Some(install))
                }
                Some(r) if reported.app_drifted(r, bundle_id) => {
                    (ItemAction::Install, Some(install))
                }
                Some(r) if r.config_hash != item.config_hash => {
                    let configuration = configuration.clone().unwrap_or_default();
                    (
                        ItemAction::Configure,
                        Some(Send::ConfigureApp {
                            bundle_id: bundle_id.clone(),
                            configuration,
                        }),
                    )
                }
                Some(_) => return None,
            }
        }
    };
    Some(Decision {
        key: item.key.clone(),
        kind: item.kind,
        policy: item.policy.clone(),
        group_ref: Some(group_label(&item.group)),
        wanted: true,
        content_hash: item.content_hash.clone(),
        config_hash: item.config_hash.clone(),
        expected_revision: row.map(|r| r.revision),
        action,
        send,
        cancel: None,
        due_at: None,
    })
}

/// An install whose command was cancelled (by an admin, or a retirement) is sent again.
fn needs_resend(row: &ManagedItemRow) -> bool {
    row.command_status == Some(CommandStatus::Cancelled)
}

/// Removes an item no policy wants any more, as the policy that installed it says: removal
/// (the default), or leaving it in place. An install still waiting in the queue is cancelled
/// instead of being followed by a removal.
fn take_out(set: &CompiledSet, row: &ManagedItemRow) -> Decision {
    let remove = set
        .policy(&row.policy)
        .is_none_or(|policy| policy.on_leave.remove);
    if !remove {
        return transition(row, false, ItemAction::Remove, None);
    }
    let never_offered = row.command_status == Some(CommandStatus::Queued)
        && matches!(row.action, ItemAction::Install | ItemAction::Update);
    if never_offered {
        let mut decision = transition(row, false, ItemAction::Remove, None);
        decision.cancel = row.command_uuid.clone();
        return decision;
    }
    let identifier = row
        .item_key
        .split_once(':')
        .map_or(row.item_key.as_str(), |(_, id)| id)
        .to_owned();
    let send = match row.kind {
        ItemKind::App => Send::RemoveApp {
            bundle_id: identifier,
        },
        _ => Send::RemoveProfile { identifier },
    };
    transition(row, false, ItemAction::Remove, Some(send))
}

/// The lock or wipe the policy a device just left does after its grace period, as ledger rows
/// waiting for their time (or none, if one is already waiting).
fn schedule_deprovisioning(
    set: &CompiledSet,
    scope_row: &ManagedItemRow,
    ledger: &BTreeMap<String, ManagedItemRow>,
    now: DateTime<Utc>,
) -> Vec<Decision> {
    let Some(policy) = set.policy(&scope_row.policy) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (suffix, grace) in [(LOCK, policy.on_leave.lock), (WIPE, policy.on_leave.wipe)] {
        let Some(grace) = grace else { continue };
        let key = format!("leave:{}:{suffix}", policy.name);
        let existing = ledger.get(&key);
        if existing.is_some_and(|r| r.wanted && r.action == ItemAction::Schedule) {
            continue;
        }
        let due = chrono::Duration::from_std(grace)
            .ok()
            .and_then(|g| now.checked_add_signed(g))
            .unwrap_or(now);
        out.push(Decision {
            key,
            kind: ItemKind::Deprovision,
            policy: policy.name.clone(),
            group_ref: scope_row.group_ref.clone(),
            wanted: true,
            content_hash: due.to_rfc3339(),
            config_hash: None,
            expected_revision: existing.map(|r| r.revision),
            action: ItemAction::Schedule,
            send: None,
            cancel: None,
            due_at: Some(due),
        });
    }
    out
}

fn transition(
    row: &ManagedItemRow,
    wanted: bool,
    action: ItemAction,
    send: Option<Send>,
) -> Decision {
    Decision {
        key: row.item_key.clone(),
        kind: row.kind,
        policy: row.policy.clone(),
        group_ref: row.group_ref.clone(),
        wanted,
        content_hash: row.content_hash.clone(),
        config_hash: row.config_hash.clone(),
        expected_revision: Some(row.revision),
        action,
        send,
        cancel: None,
        due_at: None,
    }
}

/// How a group is named in the ledger and the state API.
pub fn group_label(group: &super::GroupRef) -> String {
    format!("{}:{}", group.provider, group.id)
}

/// What a device last reported: its profile identifiers and managed apps, and when.
pub(crate) struct ReportedProfiles {
    at: Option<DateTime<Utc>>,
    identifiers: BTreeSet<String>,
    apps_at: Option<DateTime<Utc>>,
    /// Bundle ID → status (ManagedApplicationList).
    apps: BTreeMap<String, String>,
}

impl ReportedProfiles {
    pub(crate) fn of(device: &DeviceTarget) -> ReportedProfiles {
        let identifiers = device
            .profiles
            .as_deref()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
            .and_then(|list| list.as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|p| p.get("PayloadIdentifier")?.as_str().map(str::to_owned))
            .collect();
        let apps = device
            .apps
            .as_deref()
            .and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok())
            .and_then(|map| map.as_object().cloned())
            .unwrap_or_default()
            .into_iter()
            .map(|(bundle, entry)| {
                let status = entry
                    .get("Status")
                    .and_then(|s| s.as_str())
                    .unwrap_or_default()
                    .to_owned();
                (bundle, status)
            })
            .collect();
        ReportedProfiles {
            at: device.profiles_reported_at,
            identifiers,
            apps_at: device.apps_reported_at,
            apps,
        }
    }

    /// The device acknowledged the app's install, then reported its managed apps without it,
    /// or with it uninstalled. (Transient statuses are reported once and then left out, so
    /// only a report that lists some app counts.)
    pub(crate) fn app_drifted(&self, row: &ManagedItemRow, bundle_id: &str) -> bool {
        match (self.apps_at, row.command_answered_at) {
            (Some(reported), Some(answered)) => {
                row.command_status == Some(CommandStatus::Acknowledged)
                    && reported > answered
                    && !self.apps.is_empty()
                    && self
                        .apps
                        .get(bundle_id)
                        .is_none_or(|status| status == "ManagedButUninstalled")
            }
            _ => false,
        }
    }

    /// The device acknowledged the install, then reported its profiles without it.
    pub(crate) fn drifted(&self, row: &ManagedItemRow, identifier: &str) -> bool {
        match (self.at, row.command_answered_at) {
            (Some(reported), Some(answered)) => {
                row.command_status == Some(CommandStatus::Acknowledged)
                    && reported > answered
                    && !self.identifiers.contains(identifier)
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::time::Duration;

    use chrono::TimeZone;

    use super::*;
    use crate::policy::model::{AppItem, GroupRef, OnLeave, Policy, PolicySet, ProfileItem};
    use crate::store::{ChannelStatus, ItemAction};

    fn group() -> GroupRef {
        GroupRef {
            provider: "corp".into(),
            id: "eng".into(),
        }
    }

    fn policy(name: &str, min_length: i64, on_leave: OnLeave) -> Policy {
        let mut payload = Dictionary::new();
        payload.insert(
            "PayloadType".into(),
            "com.apple.mobiledevice.passwordpolicy".into(),
        );
        payload.insert("minLength".into(), plist::Value::Integer(min_length.into()));
        let mut template = Dictionary::new();
        template.insert("PayloadIdentifier".into(), format!("p.{name}").into());
        template.insert(
            "PayloadContent".into(),
            plist::Value::Array(vec![plist::Value::Dictionary(payload)]),
        );
        let mut configuration = Dictionary::new();
        configuration.insert("user_email".into(), "${user.email}".into());
        Policy {
            name: name.into(),
            description: None,
            file: format!("{name}.yaml"),
            groups: vec![group()],
            platforms: None,
            profiles: vec![ProfileItem {
                identifier: format!("p.{name}"),
                display_name: name.into(),
                template,
                variables: BTreeSet::new(),
            }],
            apps: vec![AppItem {
                bundle_id: "com.example.app".into(),
                itunes_store_id: Some(1),
                manifest_url: None,
                configuration: Some(configuration),
                variables: [crate::policy::Variable::UserEmail].into(),
            }],
            commands_on_join: Vec::new(),
            on_leave,
        }
    }

    fn set(policies: Vec<Policy>) -> CompiledSet {
        CompiledSet::new(&PolicySet {
            policies,
            digest: String::new(),
        })
    }

    fn device(email: &str) -> DeviceTarget {
        DeviceTarget {
            udid: "UDID-1".into(),
            enrollment_id: "rec-1".into(),
            owner_id: Some("u1".into()),
            serial_number: Some("C02".into()),
            device_name: None,
            model: Some("iPhone15,2".into()),
            model_name: None,
            product_name: Some("iPhone15,2".into()),
            profiles: None,
            profiles_reported_at: None,
            apps: None,
            apps_reported_at: None,
            owner_login: Some("alice".into()),
            owner_email: Some(email.into()),
            owner_display_name: None,
            owner_subject: None,
            owner_status: None,
            channel_status: Some(ChannelStatus::Active),
            wakeable: true,
            identity_serial: Some("01".into()),
            identity_not_after: Some(at(400 * 86_400)),
        }
    }

    fn at(secs: i64) -> DateTime<Utc> {
        Utc.timestamp_opt(1_800_000_000 + secs, 0)
            .single()
            .unwrap_or_default()
    }

    /// The ledger after carrying `decisions` out, each command acknowledged at `now`.
    fn carry_out(
        mut ledger: BTreeMap<String, ManagedItemRow>,
        decisions: &[Decision],
        now: DateTime<Utc>,
    ) -> BTreeMap<String, ManagedItemRow> {
        for d in decisions {
            let revision = d.expected_revision.map_or(1, |r| r + 1);
            ledger.insert(
                d.key.clone(),
                ManagedItemRow {
                    enrollment_id: "rec-1".into(),
                    udid: "UDID-1".into(),
                    item_key: d.key.clone(),
                    kind: d.kind,
                    wanted: d.wanted,
                    content_hash: d.content_hash.clone(),
                    config_hash: d.config_hash.clone(),
                    policy: d.policy.clone(),
                    group_ref: d.group_ref.clone(),
                    revision,
                    action: d.action,
                    command_uuid: d.send.as_ref().map(|_| format!("cmd-{revision}")),
                    due_at: d.due_at,
                    updated_at: now,
                    command_status: d.send.as_ref().map(|_| CommandStatus::Acknowledged),
                    command_answered_at: d.send.as_ref().map(|_| now),
                    command_error: None,
                },
            );
        }
        ledger
    }

    fn actions(decisions: &[Decision]) -> Vec<(String, ItemAction)> {
        decisions
            .iter()
            .map(|d| (d.key.clone(), d.action))
            .collect()
    }

    #[test]
    fn joining_installs_once_and_a_second_pass_does_nothing() {
        let set = set(vec![policy("eng", 8, OnLeave::default())]);
        let device = device("alice@example.org");
        let groups = [group()].into();
        let desired = set.desired_for(&device, &groups);
        let first = diff(&set, &device, &desired, &BTreeMap::new(), at(0));
        assert_eq!(
            actions(&first),
            [
                ("app:com.example.app".into(), ItemAction::Install),
                ("profile:p.eng".into(), ItemAction::Install),
                ("scope:eng".into(), ItemAction::Enter),
            ]
        );
        let ledger = carry_out(BTreeMap::new(), &first, at(0));
        assert!(diff(&set, &device, &desired, &ledger, at(1)).is_empty());
    }

    #[test]
    fn a_changed_payload_updates_and_a_changed_configuration_configures() {
        let device = device("alice@example.org");
        let groups = [group()].into();
        let before = set(vec![policy("eng", 8, OnLeave::default())]);
        let desired = before.desired_for(&device, &groups);
        let ledger = carry_out(
            BTreeMap::new(),
            &diff(&before, &device, &desired, &BTreeMap::new(), at(0)),
            at(0),
        );
        let after = set(vec![policy("eng", 10, OnLeave::default())]);
        let desired = after.desired_for(&device, &groups);
        let update = diff(&after, &device, &desired, &ledger, at(1));
        assert_eq!(
            actions(&update),
            [("profile:p.eng".into(), ItemAction::Update)]
        );
        // The person's email changed: only the app's configuration is sent again.
        let renamed = self::device("alice@new.example.org");
        let desired = before.desired_for(&renamed, &groups);
        let configure = diff(&before, &renamed, &desired, &ledger, at(1));
        assert_eq!(
            actions(&configure),
            [("app:com.example.app".into(), ItemAction::Configure)]
        );
        assert!(matches!(configure[0].send, Some(Send::ConfigureApp { .. })));
    }

    #[test]
    fn leaving_removes_and_a_never_offered_install_is_cancelled_instead() {
        let set = set(vec![policy("eng", 8, OnLeave::default())]);
        let device = device("alice@example.org");
        let groups = [group()].into();
        let desired = set.desired_for(&device, &groups);
        let installs = diff(&set, &device, &desired, &BTreeMap::new(), at(0));
        let mut ledger = carry_out(BTreeMap::new(), &installs, at(0));
        // The app's install was never offered.
        if let Some(row) = ledger.get_mut("app:com.example.app") {
            row.command_status = Some(CommandStatus::Queued);
        }
        let nothing = set.desired_for(&device, &BTreeSet::new());
        let leave = diff(&set, &device, &nothing, &ledger, at(1));
        let app = leave
            .iter()
            .find(|d| d.key == "app:com.example.app")
            .unwrap();
        assert!(app.send.is_none() && app.cancel.is_some(), "{app:?}");
        let profile = leave.iter().find(|d| d.key == "profile:p.eng").unwrap();
        assert!(
            matches!(&profile.send, Some(Send::RemoveProfile { identifier }) if identifier == "p.eng")
        );
        let scope = leave.iter().find(|d| d.key == "scope:eng").unwrap();
        assert_eq!(scope.action, ItemAction::Leave);
    }

    #[test]
    fn an_item_another_policy_still_wants_stays() {
        let mut other = policy("ops", 8, OnLeave::default());
        other.groups = vec![GroupRef {
            provider: "corp".into(),
            id: "ops".into(),
        }];
        // Same profile identifier and content in both policies.
        other.profiles = policy("eng", 8, OnLeave::default()).profiles;
        other.apps.clear();
        let set = set(vec![policy("eng", 8, OnLeave::default()), other]);
        let device = device("alice@example.org");
        let both: BTreeSet<GroupRef> = [
            group(),
            GroupRef {
                provider: "corp".into(),
                id: "ops".into(),
            },
        ]
        .into();
        let desired = set.desired_for(&device, &both);
        let ledger = carry_out(
            BTreeMap::new(),
            &diff(&set, &device, &desired, &BTreeMap::new(), at(0)),
            at(0),
        );
        let only_ops: BTreeSet<GroupRef> = [GroupRef {
            provider: "corp".into(),
            id: "ops".into(),
        }]
        .into();
        let desired = set.desired_for(&device, &only_ops);
        let leave = diff(&set, &device, &desired, &ledger, at(1));
        assert!(
            leave.iter().all(|d| d.key != "profile:p.eng"),
            "{:?}",
            actions(&leave)
        );
        assert!(
            leave
                .iter()
                .any(|d| d.key == "app:com.example.app" && d.action == ItemAction::Remove)
        );
    }

    #[test]
    fn a_wipe_waits_for_its_grace_and_rejoining_cancels_it() {
        let on_leave = OnLeave {
            remove: true,
            lock: None,
            wipe: Some(Duration::from_secs(3600)),
        };
        let set = set(vec![policy("eng", 8, on_leave)]);
        let device = device("alice@example.org");
        let groups = [group()].into();
        let desired = set.desired_for(&device, &groups);
        let ledger = carry_out(
            BTreeMap::new(),
            &diff(&set, &device, &desired, &BTreeMap::new(), at(0)),
            at(0),
        );
        let nothing = set.desired_for(&device, &BTreeSet::new());
        let leave = diff(&set, &device, &nothing, &ledger, at(10));
        let wipe = leave.iter().find(|d| d.key == "leave:eng:wipe").unwrap();
        assert_eq!(wipe.action, ItemAction::Schedule);
        assert!(wipe.send.is_none());
        assert_eq!(wipe.due_at, Some(at(3610)));
        let ledger = carry_out(ledger, &leave, at(10));
        // Within the grace period: nothing more.
        assert!(diff(&set, &device, &nothing, &ledger, at(100)).is_empty());
        // Due: the wipe is sent, once.
        let due = diff(&set, &device, &nothing, &ledger, at(3700));
        assert_eq!(actions(&due), [("leave:eng:wipe".into(), ItemAction::Wipe)]);
        assert!(due[0].send.as_ref().is_some_and(Send::is_destructive));
        let done = carry_out(ledger.clone(), &due, at(3700));
        assert!(diff(&set, &device, &nothing, &done, at(4000)).is_empty());
        // Rejoining before it is due calls it off.
        let back = diff(&set, &device, &desired, &ledger, at(100));
        assert!(
            back.iter()
                .any(|d| d.key == "leave:eng:wipe" && d.action == ItemAction::Cancel)
        );
    }

    #[test]
    fn drift_reinstalls_and_a_missing_variable_waits() {
        let set = set(vec![policy("eng", 8, OnLeave::default())]);
        let mut device = device("alice@example.org");
        let groups = [group()].into();
        let desired = set.desired_for(&device, &groups);
        let ledger = carry_out(
            BTreeMap::new(),
            &diff(&set, &device, &desired, &BTreeMap::new(), at(0)),
            at(0),
        );
        device.profiles = Some("[]".into());
        device.profiles_reported_at = Some(at(60));
        let drift = diff(&set, &device, &desired, &ledger, at(61));
        assert_eq!(
            actions(&drift),
            [("profile:p.eng".into(), ItemAction::Install)]
        );
        device.owner_email = None;
        let waiting = set.desired_for(&device, &groups);
        assert_eq!(waiting.waiting.len(), 1);
        assert_eq!(
            waiting.waiting[0].variable,
            crate::policy::Variable::UserEmail
        );
    }

    #[test]
    fn stale_reports_are_asked_for_once_per_period_and_an_uninstalled_app_drifts() {
        let set = set(vec![policy("eng", 8, OnLeave::default())]);
        let mut device = device("alice@example.org");
        let groups = [group()].into();
        let max_age = chrono::Duration::hours(24);
        let desired = set.desired_for(&device, &groups);
        let ledger = carry_out(
            BTreeMap::new(),
            &diff(&set, &device, &desired, &BTreeMap::new(), at(0)),
            at(0),
        );
        // Installed and acknowledged, never reported: both lists are asked for.
        let mut asking = set.desired_for(&device, &groups);
        asking.query_stale_inventory(&device, &ledger, at(10), max_age);
        let queries = diff(&set, &device, &asking, &ledger, at(10));
        assert_eq!(
            actions(&queries),
            [
                ("inventory:apps".into(), ItemAction::Run),
                ("inventory:profiles".into(), ItemAction::Run),
            ]
        );
        let ledger = carry_out(ledger, &queries, at(10));
        // Unanswered: not asked again within the period.
        let mut again = set.desired_for(&device, &groups);
        again.query_stale_inventory(&device, &ledger, at(20), max_age);
        assert!(diff(&set, &device, &again, &ledger, at(20)).is_empty());
        // Answered: the app was uninstalled on the device, so it is installed again.
        device.profiles = Some(r#"[{"PayloadIdentifier": "p.eng"}]"#.into());
        device.profiles_reported_at = Some(at(30));
        device.apps = Some(r#"{"com.example.app": {"Status": "ManagedButUninstalled"}, "x": {"Status": "Managed"}}"#.into());
        device.apps_reported_at = Some(at(30));
        let mut fresh = set.desired_for(&device, &groups);
        fresh.query_stale_inventory(&device, &ledger, at(40), max_age);
        let drift = diff(&set, &device, &fresh, &ledger, at(40));
        assert_eq!(
            actions(&drift),
            [("app:com.example.app".into(), ItemAction::Install)]
        );
    }
}
