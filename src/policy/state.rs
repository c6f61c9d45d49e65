//! A device's policy state, as the admin API shows it: every item it should have or that the
//! broker manages on it, with its status (pending, queued, installed, failed with the device's
//! error, drifted, removing, removed, scheduled) and the policy and group that put it there.

use std::collections::{BTreeMap, BTreeSet};

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::GroupRef;
use super::desired::{CompiledSet, TokenValues};
use super::diff::{ReportedProfiles, group_label};
use super::model::Variable;
use crate::store::{
    ChannelStatus, CommandStatus, DeviceTarget, HeldToken, ItemAction, ItemKind, ManagedItemRow,
    Store, StoreResult, TargetScope,
};

#[derive(Clone, Debug, Serialize)]
pub struct ItemState {
    pub item: String,
    pub kind: ItemKind,
    pub status: &'static str,
    pub policy: String,
    pub group: Option<String>,
    /// Why it is pending, or the device's error chain when it failed.
    pub detail: Option<serde_json::Value>,
    pub command_uuid: Option<String>,
    pub due_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
    /// Apps: the shared app-config tokens sent in the app's configuration, newest first, and
    /// whether the device acknowledged each; the first acknowledged one is what it holds.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<HeldToken>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DeviceState {
    pub udid: String,
    pub enrollment_record_id: String,
    pub policy_version: i64,
    /// The policies the device is in, with the group that put it there.
    pub policies: BTreeMap<String, String>,
    pub items: Vec<ItemState>,
}

/// The state of device `udid` under `set` (version `version`); `None` when no managed device
/// has that UDID.
pub async fn device_state(
    store: &Store,
    compiled: &CompiledSet,
    version: i64,
    udid: &str,
    renewal_lead: chrono::Duration,
    shared_tokens: &BTreeMap<String, String>,
) -> StoreResult<Option<DeviceState>> {
    let Some(target) = store
        .reconcile_targets(TargetScope::Device(udid), 1)
        .await?
        .into_iter()
        .next()
    else {
        return Ok(None);
    };
    let groups: BTreeSet<GroupRef> = match &target.owner_id {
        Some(owner) => store
            .groups_of_users(std::slice::from_ref(owner))
            .await?
            .into_iter()
            .map(|(_, provider, id)| GroupRef { provider, id })
            .collect(),
        None => BTreeSet::new(),
    };
    let tokens = TokenValues {
        shared: shared_tokens.clone(),
        device: BTreeMap::new(),
    };
    let mut desired = compiled.desired_with_tokens(&target, &groups, &tokens);
    desired.renew_identity_within(&target, crate::store::now(), renewal_lead);
    let ledger: BTreeMap<String, ManagedItemRow> = store
        .managed_items(std::slice::from_ref(&target.enrollment_id))
        .await?
        .into_iter()
        .map(|row| (row.item_key.clone(), row))
        .collect();
    let reported = ReportedProfiles::of(&target);
    let mut items = Vec::new();
    for item in desired.items.values() {
        if matches!(item.kind, ItemKind::Scope | ItemKind::Inventory) {
            continue;
        }
        let row = ledger.get(&item.key).filter(|r| r.wanted);
        let (status, detail) = match row {
            None => ("pending", Some(pending_reason(&target))),
            Some(r) if r.content_hash != item.content_hash || r.config_hash != item.config_hash => {
                (
                    "pending",
                    Some(serde_json::json!("a new version is to be sent")),
                )
            }
            Some(r) => present_status(r, &reported),
        };
        items.push(ItemState {
            item: item.key.clone(),
            kind: item.kind,
            status,
            policy: item.policy.clone(),
            group: Some(group_label(&item.group)),
            detail,
            command_uuid: row.and_then(|r| r.command_uuid.clone()),
            due_at: None,
            updated_at: row.map(|r| r.updated_at),
            tokens: Vec::new(),
        });
    }
    for waiting in &desired.waiting {
        // A device's own token is issued when an item is sent, not to show the state: an
        // item waiting only for one is as its ledger row says.
        if matches!(waiting.variable, Variable::DeviceToken(_))
            && let Some(row) = ledger.get(&waiting.key).filter(|r| r.wanted)
        {
            let (status, detail) = present_status(row, &reported);
            items.push(row_state(row, status, detail));
            continue;
        }
        items.push(ItemState {
            item: waiting.key.clone(),
            kind: if waiting.key.starts_with("app:") {
                ItemKind::App
            } else {
                ItemKind::Profile
            },
            status: "pending",
            policy: waiting.policy.clone(),
            group: desired.in_scope.get(&waiting.policy).map(group_label),
            detail: Some(serde_json::json!(format!(
                "waiting for ${{{}}}, which has no value for this device",
                waiting.variable.name()
            ))),
            command_uuid: None,
            due_at: None,
            updated_at: None,
            tokens: Vec::new(),
        });
    }
    for row in ledger.values() {
        if matches!(row.kind, ItemKind::Scope | ItemKind::Inventory)
            || desired.items.contains_key(&row.item_key)
            || desired.waiting.iter().any(|w| w.key == row.item_key)
        {
            continue;
        }
        if row.wanted && row.kind != ItemKind::Deprovision {
            // Still to be taken out (the next pass will).
            items.push(row_state(row, "removing", None));
            continue;
        }
        let (status, detail) = match (row.kind, row.action, row.command_status) {
            (ItemKind::Deprovision, ItemAction::Schedule, _) if row.wanted => ("scheduled", None),
            (ItemKind::Deprovision, ItemAction::Cancel, _) => ("cancelled", None),
            (_, ItemAction::Remove, None) => (
                "removed",
                Some(serde_json::json!("left in place or never sent")),
            ),
            (_, _, Some(s)) if CommandStatus::PENDING.contains(&s) => ("removing", None),
            (_, _, Some(CommandStatus::Error | CommandStatus::FormatError)) => {
                ("failed", error_detail(row))
            }
            (ItemKind::Deprovision, _, Some(CommandStatus::Acknowledged)) => ("done", None),
            _ => ("removed", None),
        };
        items.push(row_state(row, status, detail));
    }
    let held = store.held_tokens(&target.enrollment_id).await?;
    for item in items.iter_mut().filter(|i| i.kind == ItemKind::App) {
        item.tokens = held
            .iter()
            .filter(|t| t.item_key == item.item)
            .cloned()
            .collect();
    }
    items.sort_by(|a, b| a.item.cmp(&b.item));
    Ok(Some(DeviceState {
        udid: target.udid.clone(),
        enrollment_record_id: target.enrollment_id.clone(),
        policy_version: version,
        policies: desired
            .in_scope
            .iter()
            .map(|(name, group)| (name.clone(), group_label(group)))
            .collect(),
        items,
    }))
}

fn present_status(
    row: &ManagedItemRow,
    reported: &ReportedProfiles,
) -> (&'static str, Option<serde_json::Value>) {
    match row.command_status {
        Some(CommandStatus::Queued | CommandStatus::Sent | CommandStatus::NotNow) => {
            ("queued", None)
        }
        Some(CommandStatus::Acknowledged) => {
            let identifier = row.item_key.strip_prefix("profile:");
            if row.kind == ItemKind::Profile
                && identifier.is_some_and(|id| reported.drifted(row, id))
            {
                (
                    "drifted",
                    Some(serde_json::json!("the device's last ProfileList lacks it")),
                )
            } else {
                ("installed", None)
            }
        }
        Some(CommandStatus::Error | CommandStatus::FormatError) => ("failed", error_detail(row)),
        Some(CommandStatus::Cancelled) => (
            "pending",
            Some(serde_json::json!(
                "its command was cancelled; it is sent again"
            )),
        ),
        // Join commands answered, scope rows: in place.
        None => ("installed", None),
    }
}

fn pending_reason(target: &DeviceTarget) -> serde_json::Value {
    if target.channel_status == Some(ChannelStatus::Active) {
        serde_json::json!("not reconciled yet")
    } else {
        serde_json::json!("the device has not checked in (no TokenUpdate)")
    }
}

fn error_detail(row: &ManagedItemRow) -> Option<serde_json::Value> {
    row.command_error
        .as_deref()
        .and_then(|text| serde_json::from_str(text).ok())
        .or_else(|| Some(serde_json::json!("the device answered with an error")))
}

fn row_state(
    row: &ManagedItemRow,
    status: &'static str,
    detail: Option<serde_json::Value>,
) -> ItemState {
    ItemState {
        item: row.item_key.clone(),
        kind: row.kind,
        status,
        policy: row.policy.clone(),
        group: row.group_ref.clone(),
        detail,
        command_uuid: row.command_uuid.clone(),
        due_at: row.due_at,
        updated_at: Some(row.updated_at),
        tokens: Vec::new(),
    }
}
