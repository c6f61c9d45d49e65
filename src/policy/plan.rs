//! Plan and apply. A plan runs the reconciler's decisions for every managed device against a
//! candidate policy set without writing anything, and counts them per policy: devices coming
//! into and going out of scope, and the commands that would be queued, destructive ones
//! (locks and wipes) listed apart. Apply records the set as a new version when its plan has no
//! destructive actions or the caller consents, and wakes the reconcilers.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;

use super::OnLeave;
use super::desired::CompiledSet;
use super::diff::{self, Decision, Send};
use super::model::{Diagnostic, PolicySet};
use super::reconcile::{PAGE, ReconcileError, Reconciler, encode_files, read_page_state};
use crate::store::{ChannelStatus, DeviceTarget, ItemAction, ItemKind, Store, TargetScope};

/// How many of each command a plan would queue.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub install_profile: usize,
    pub update_profile: usize,
    pub remove_profile: usize,
    pub install_app: usize,
    pub update_app: usize,
    pub configure_app: usize,
    pub remove_app: usize,
    pub run_command: usize,
    pub lock: usize,
    pub wipe: usize,
    /// Locks and wipes that would start their grace period.
    pub scheduled_deprovisioning: usize,
    /// Items a device cannot have yet: a variable has no value for it.
    pub waiting_for_variables: usize,
}

impl Counts {
    pub fn commands(&self) -> usize {
        self.install_profile
            + self.update_profile
            + self.remove_profile
            + self.install_app
            + self.update_app
            + self.configure_app
            + self.remove_app
            + self.run_command
            + self.lock
            + self.wipe
    }

    fn add(&mut self, o: &Counts) {
        self.install_profile += o.install_profile;
        self.update_profile += o.update_profile;
        self.remove_profile += o.remove_profile;
        self.install_app += o.install_app;
        self.update_app += o.update_app;
        self.configure_app += o.configure_app;
        self.remove_app += o.remove_app;
        self.run_command += o.run_command;
        self.lock += o.lock;
        self.wipe += o.wipe;
        self.scheduled_deprovisioning += o.scheduled_deprovisioning;
        self.waiting_for_variables += o.waiting_for_variables;
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct PolicyPlan {
    pub name: String,
    pub file: String,
    /// new, changed, unchanged or removed, compared with the set in force.
    pub status: &'static str,
    pub devices_in_scope: usize,
    pub entering: usize,
    pub leaving: usize,
    pub commands: Counts,
}

/// A lock or wipe the set would make possible or start.
#[derive(Clone, Debug, Serialize)]
pub struct Destructive {
    pub policy: String,
    /// lock or wipe.
    pub action: &'static str,
    /// The grace period, in seconds.
    pub after_secs: u64,
    /// Devices whose grace period the apply would start now, or that would be locked or
    /// wiped at once.
    pub devices: usize,
    /// `armed`: the policy adds or changes the action (it will act on future leavers).
    pub armed: bool,
}

#[derive(Clone, Debug, Serialize)]
pub struct Plan {
    pub digest: String,
    /// The version in force that the plan compares with (0: none).
    pub current_version: i64,
    pub unchanged: bool,
    pub devices: usize,
    /// Managed devices without an active command channel yet: counted in scope, sent
    /// nothing until their TokenUpdate.
    pub devices_not_checked_in: usize,
    pub policies: Vec<PolicyPlan>,
    pub totals: Counts,
    pub destructive: Vec<Destructive>,
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("the policy set has {} problem(s)", .0.len())]
    Invalid(Vec<Diagnostic>),
    #[error(
        "the plan contains destructive actions (locks or wipes); apply with allow_destructive \
         (--allow-destructive) to consent"
    )]
    Destructive(Box<Plan>),
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
}

impl From<crate::store::StoreError> for ApplyError {
    fn from(e: crate::store::StoreError) -> Self {
        ApplyError::Reconcile(ReconcileError::Store(e))
    }
}

/// What `candidate` would do on every managed device, compared with the set in force.
pub async fn plan(
    store: &Store,
    reconciler: &Reconciler,
    candidate: &PolicySet,
) -> Result<Plan, ReconcileError> {
    plan_observed(store, reconciler, candidate, |_, _| {}).await
}

/// [`plan`], also handing each checked-in device and its decisions (what it would be sent,
/// item by item) to `observe`, for a per-device view such as the console's. Writes nothing.
pub async fn plan_observed(
    store: &Store,
    reconciler: &Reconciler,
    candidate: &PolicySet,
    mut observe: impl FnMut(&DeviceTarget, &[Decision]),
) -> Result<Plan, ReconcileError> {
    reconciler.refresh().await?;
    let active = reconciler.active().get();
    let current = reconciler.compiled();
    let next = CompiledSet::new(candidate);
    let mut per_policy: BTreeMap<String, PolicyPlan> = BTreeMap::new();
    for policy in candidate.policies.iter() {
        let status = match active.set.policies.iter().find(|p| p.name == policy.name) {
            None => "new",
            Some(old) if old == policy => "unchanged",
            Some(_) => "changed",
        };
        per_policy.insert(
            policy.name.clone(),
            empty_plan(&policy.name, &policy.file, status),
        );
    }
    for policy in &active.set.policies {
        per_policy
            .entry(policy.name.clone())
            .or_insert_with(|| empty_plan(&policy.name, &policy.file, "removed"));
    }
    let mut leaving_deprovision: BTreeMap<(String, &'static str), usize> = BTreeMap::new();
    let mut devices = 0;
    let mut not_checked_in = 0;
    let mut after: Option<String> = None;
    loop {
        let targets = store
            .reconcile_targets(
                TargetScope::All {
                    after: after.as_deref(),
                },
                PAGE,
            )
            .await?;
        let full = targets.len() as i64 == PAGE;
        after = targets.last().map(|t| t.udid.clone());
        let (groups, ledgers) = read_page_state(store, &targets).await?;
        let now = crate::store::now();
        let no_groups = BTreeSet::new();
        let no_ledger = BTreeMap::new();
        for target in &targets {
            devices += 1;
            let owner_groups = target
                .owner_id
                .as_ref()
                .and_then(|id| groups.get(id))
                .unwrap_or(&no_groups);
            let before = current.desired_for(target, owner_groups);
            let wanted = next.desired_for(target, owner_groups);
            for (name, plan) in per_policy.iter_mut() {
                let (was, is) = (
                    before.in_scope.contains_key(name),
                    wanted.in_scope.contains_key(name),
                );
                plan.devices_in_scope += usize::from(is);
                plan.entering += usize::from(is && !was);
                plan.leaving += usize::from(was && !is);
            }
            for waiting in &wanted.waiting {
                if let Some(plan) = per_policy.get_mut(&waiting.policy) {
                    plan.commands.waiting_for_variables += 1;
                }
            }
            if target.channel_status != Some(ChannelStatus::Active) {
                not_checked_in += 1;
                continue;
            }
            let ledger = ledgers.get(&target.enrollment_id).unwrap_or(&no_ledger);
            let decisions = diff::diff(&next, target, &wanted, ledger, now);
            observe(target, &decisions);
            for decision in decisions {
                let Some(plan) = per_policy.get_mut(&decision.policy) else {
                    continue;
                };
                count(
                    &mut plan.commands,
                    decision.kind,
                    decision.action,
                    decision.send.as_ref(),
                );
                if decision.action == ItemAction::Schedule {
                    let what = if decision.key.ends_with("wipe") {
                        "wipe"
                    } else {
                        "lock"
                    };
                    *leaving_deprovision
                        .entry((decision.policy.clone(), what))
                        .or_default() += 1;
                }
            }
        }
        if !full {
            break;
        }
    }
    let mut totals = Counts::default();
    for plan in per_policy.values() {
        totals.add(&plan.commands);
    }
    let destructive =
        destructive_actions(&active.set, candidate, &per_policy, &leaving_deprovision);
    Ok(Plan {
        digest: candidate.digest.clone(),
        current_version: active.version,
        unchanged: candidate.digest == active.set.digest && active.version > 0,
        devices,
        devices_not_checked_in: not_checked_in,
        policies: per_policy.into_values().collect(),
        totals,
        destructive,
    })
}

fn empty_plan(name: &str, file: &str, status: &'static str) -> PolicyPlan {
    PolicyPlan {
        name: name.to_owned(),
        file: file.to_owned(),
        status,
        devices_in_scope: 0,
        entering: 0,
        leaving: 0,
        commands: Counts::default(),
    }
}

fn count(counts: &mut Counts, kind: ItemKind, action: ItemAction, send: Option<&Send>) {
    match (kind, action, send) {
        (ItemKind::Profile, ItemAction::Update, Some(_)) => counts.update_profile += 1,
        (ItemKind::App, ItemAction::Update, Some(_)) => counts.update_app += 1,
        (_, _, Some(Send::InstallProfile { .. })) => counts.install_profile += 1,
        (_, _, Some(Send::RemoveProfile { .. })) => counts.remove_profile += 1,
        (_, _, Some(Send::InstallApp { .. })) => counts.install_app += 1,
        (_, _, Some(Send::ConfigureApp { .. })) => counts.configure_app += 1,
        (_, _, Some(Send::RemoveApp { .. })) => counts.remove_app += 1,
        (_, _, Some(Send::Run(_))) => counts.run_command += 1,
        (_, _, Some(Send::Lock)) => counts.lock += 1,
        (_, _, Some(Send::Wipe)) => counts.wipe += 1,
        (ItemKind::Deprovision, ItemAction::Schedule, None) => counts.scheduled_deprovisioning += 1,
        _ => {}
    }
}

/// Locks and wipes: those the candidate adds or changes (armed), and those it would start
/// or carry out on devices now.
fn destructive_actions(
    current: &PolicySet,
    candidate: &PolicySet,
    per_policy: &BTreeMap<String, PolicyPlan>,
    leaving: &BTreeMap<(String, &'static str), usize>,
) -> Vec<Destructive> {
    let mut out = Vec::new();
    for policy in &candidate.policies {
        let before = current
            .policies
            .iter()
            .find(|p| p.name == policy.name)
            .map(|p| p.on_leave.clone())
            .unwrap_or(OnLeave {
                remove: true,
                lock: None,
                wipe: None,
            });
        let immediate = per_policy.get(&policy.name).map(|p| &p.commands);
        for (action, grace, old) in [
            ("lock", policy.on_leave.lock, before.lock),
            ("wipe", policy.on_leave.wipe, before.wipe),
        ] {
            let Some(grace) = grace else { continue };
            let now = leaving
                .get(&(policy.name.clone(), action))
                .copied()
                .unwrap_or(0)
                + immediate.map_or(0, |c| if action == "lock" { c.lock } else { c.wipe });
            let armed = old != Some(grace);
            if armed || now > 0 {
                out.push(Destructive {
                    policy: policy.name.clone(),
                    action,
                    after_secs: grace.as_secs(),
                    devices: now,
                    armed,
                });
            }
        }
    }
    out
}

/// An applied set.
#[derive(Clone, Debug, Serialize)]
pub struct Applied {
    pub version: i64,
    /// The files were those of the set in force: nothing was recorded.
    pub unchanged: bool,
    pub plan: Plan,
}

/// Plans `files` and, unless the plan is destructive without consent, records them as the
/// next version and wakes this node's reconciler (other nodes see the version at their next
/// poll).
pub async fn apply(
    store: &Store,
    reconciler: &Reconciler,
    files: &BTreeMap<String, Vec<u8>>,
    applied_by: &str,
    git_commit: Option<&str>,
    allow_destructive: bool,
) -> Result<Applied, ApplyError> {
    let set = super::load::load_files(files).map_err(ApplyError::Invalid)?;
    let plan = plan(store, reconciler, &set).await?;
    if plan.unchanged {
        return Ok(Applied {
            version: plan.current_version,
            unchanged: true,
            plan,
        });
    }
    if !plan.destructive.is_empty() && !allow_destructive {
        return Err(ApplyError::Destructive(Box::new(plan)));
    }
    let summary = serde_json::json!({
        "totals": plan.totals,
        "destructive": plan.destructive,
        "devices": plan.devices,
    });
    let version = store
        .record_policy_version(
            applied_by,
            git_commit,
            &set.digest,
            &encode_files(files),
            &summary.to_string(),
        )
        .await?;
    reconciler.refresh().await?;
    reconciler.wake().wake();
    Ok(Applied {
        version,
        unchanged: false,
        plan,
    })
}
