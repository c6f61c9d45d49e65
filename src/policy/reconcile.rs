//! The reconciler: for each device in scope of a trigger, desired state (from the policy set in
//! force and the owner's groups) against the ledger, and the commands that close the gap,
//! queued through the ledger's compare-and-set so that each is queued exactly once whatever
//! the number of nodes, passes or restarts. Pushes go out after the commands commit.
//!
//! Triggers reach it as reconcile requests in the database (a membership change, a device's
//! TokenUpdate, an inventory report, a policy apply), claimed by whichever node looks first;
//! a full pass runs every `full_pass_interval_secs` as the net under them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use plist::{Dictionary, Value};
use tokio::sync::watch;

use super::desired::{CompiledSet, Content, Desired, TokenValues};
use super::diff::{self, Decision, Send};
use super::model::Variable;
use super::{Active, ActivePolicies, GroupRef, ReconcileWake};
use crate::apple::apns::Pusher;
use crate::apple::commands::Command;
use crate::apple::enrollment::ProfileService;
use crate::audit::OUTCOME_SUCCESS;
use crate::cluster::{Lease, NodeId};
use crate::config::{AccountDisabledAction, PolicySettings};
use crate::store::{
    AccountStatus, ChannelStatus, DeviceTarget, ItemChange, ItemKind, ManagedItemRow,
    NewAuditEntry, NewCommand, ReconcileRequest, Store, StoreError, TargetScope,
};
use crate::tokens::device::{DeviceTokenRequest, DeviceTokens};
use crate::tokens::shared::TokenService;

/// Devices read, decided and written together: one transaction each, and the memory bound of
/// a pass (no fleet is ever held whole).
pub const PAGE: i64 = 500;
/// How many people's devices one request-driven pass reads at a time.
const USERS_PER_BATCH: usize = 200;

/// Requests claimed at a time.
const CLAIM: i64 = 200;

/// How long claimed requests stay this node's without renewal: a node killed while serving
/// them leaves them to another node this long after its last renewal.
const CLAIM_HOLD: Duration = Duration::from_secs(30);

/// How long a renewal's challenge stays redeemable: a device may be offline for days.
const RENEWAL_CHALLENGE_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// How long before its expiry a device's signed token is replaced by a new one (tokens live a
/// week by default; a full pass runs every 15 minutes).
const DEVICE_TOKEN_REFRESH_BEFORE: Duration = Duration::from_secs(2 * 24 * 3600);

/// Signed profiles kept for reuse within and across passes (by content hash).
const SIGNED_CACHE: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error("signing a profile: {0}")]
    Signing(String),
    #[error("the applied policy set (version {version}) does not load: {problems}")]
    BadVersion { version: i64, problems: String },
}

/// What one pass did.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct PassReport {
    pub devices: usize,
    /// Ledger transitions made.
    pub changes: usize,
    pub commands: usize,
    /// Transitions another node or an earlier pass made first.
    pub already_done: usize,
    pub pushes: usize,
    /// Items whose command could not be built this pass.
    pub failed: usize,
}

impl PassReport {
    fn add(&mut self, other: &PassReport) {
        self.devices += other.devices;
        self.changes += other.changes;
        self.commands += other.commands;
        self.already_done += other.already_done;
        self.pushes += other.pushes;
        self.failed += other.failed;
    }
}

#[derive(Clone)]
pub struct Reconciler {
    inner: Arc<Inner>,
}

struct Inner {
    store: Store,
    profiles: ProfileService,
    pusher: Pusher,
    active: ActivePolicies,
    wake: ReconcileWake,
    settings: PolicySettings,
    compiled: Mutex<(i64, Arc<CompiledSet>)>,
    signed: Mutex<HashMap<String, Arc<Vec<u8>>>>,
    /// App-config tokens that configurations carry (`${token.…}`, `${device_token.…}`).
    tokens: Option<TokenService>,
    device_tokens: Option<DeviceTokens>,
    /// Whose claims on reconcile requests this node's are.
    node: NodeId,
}

impl Reconciler {
    pub fn new(
        store: Store,
        profiles: ProfileService,
        pusher: Pusher,
        active: ActivePolicies,
        wake: ReconcileWake,
        settings: PolicySettings,
    ) -> Reconciler {
        Reconciler {
            inner: Arc::new(Inner {
                store,
                profiles,
                pusher,
                active,
                wake,
                settings,
                compiled: Mutex::new((-1, Arc::new(CompiledSet::default()))),
                signed: Mutex::new(HashMap::new()),
                tokens: None,
                device_tokens: None,
                node: NodeId::generate(),
            }),
        }
    }

    /// The token services whose values app configurations carry. Call before the reconciler
    /// is cloned or spawned.
    pub fn with_tokens(mut self, tokens: TokenService, device_tokens: DeviceTokens) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.tokens = Some(tokens);
            inner.device_tokens = Some(device_tokens);
        }
        self
    }

    /// The cluster node this reconciler claims requests as. Call before it is cloned.
    pub fn on_node(mut self, node: NodeId) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.node = node;
        }
        self
    }

    pub fn active(&self) -> &ActivePolicies {
        &self.inner.active
    }

    pub fn wake(&self) -> &ReconcileWake {
        &self.inner.wake
    }

    /// Makes the newest applied version the one in force on this node, if it is not already.
    /// True when it changed.
    pub async fn refresh(&self) -> Result<bool, ReconcileError> {
        let store = &self.inner.store;
        let newest = store.latest_policy_version_number().await?;
        if newest == self.inner.active.get().version {
            return Ok(false);
        }
        let Some(record) = store.latest_policy_version().await? else {
            return Ok(false);
        };
        let files = decode_files(&record.files).map_err(|problems| ReconcileError::BadVersion {
            version: record.version,
            problems,
        })?;
        let set =
            super::load::load_files(&files).map_err(|diagnostics| ReconcileError::BadVersion {
                version: record.version,
                problems: diagnostics
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join("; "),
            })?;
        tracing::info!(version = record.version, digest = %record.digest,
            policies = set.policies.len(), "policy: set in force");
        self.inner.active.replace(Active {
            version: record.version,
            set,
        });
        Ok(true)
    }

    /// The policy set in force, compiled (once per version).
    pub(crate) fn compiled(&self) -> Arc<CompiledSet> {
        let active = self.inner.active.get();
        let mut slot = match self.inner.compiled.lock() {
            Ok(slot) => slot,
            Err(poisoned) => poisoned.into_inner(),
        };
        if slot.0 != active.version {
            *slot = (active.version, Arc::new(CompiledSet::new(&active.set)));
        }
        slot.1.clone()
    }

    /// Brings the devices in `scope` to their desired state.
    pub async fn reconcile(&self, scope: TargetScope<'_>) -> Result<PassReport, ReconcileError> {
        let set = self.compiled();
        let mut report = PassReport::default();
        let mut after: Option<String> = None;
        loop {
            let page_scope = match scope {
                TargetScope::All { .. } => TargetScope::All {
                    after: after.as_deref(),
                },
                TargetScope::Users { user_ids, .. } => TargetScope::Users {
                    user_ids,
                    after: after.as_deref(),
                },
                other => other,
            };
            let targets = self.inner.store.reconcile_targets(page_scope, PAGE).await?;
            let full = targets.len() as i64 == PAGE;
            after = targets.last().map(|t| t.udid.clone());
            report.add(&self.reconcile_page(&set, targets).await?);
            let paged = matches!(scope, TargetScope::All { .. } | TargetScope::Users { .. });
            if !full || !paged {
                break;
            }
        }
        Ok(report)
    }

    async fn reconcile_page(
        &self,
        set: &CompiledSet,
        targets: Vec<DeviceTarget>,
    ) -> Result<PassReport, ReconcileError> {
        let store = &self.inner.store;
        let mut report = PassReport::default();
        let targets: Vec<DeviceTarget> = targets
            .into_iter()
            .filter(|t| t.channel_status == Some(ChannelStatus::Active))
            .filter(|t| !self.keeps_everything(t))
            .collect();
        if targets.is_empty() {
            return Ok(report);
        }
        let (groups, ledgers) = read_page_state(store, &targets).await?;
        let now = crate::store::now();
        let settings = &self.inner.settings;
        let renewal_lead = chrono::Duration::days(i64::from(settings.identity_renewal_days));
        // At most ten years: chrono's durations have a range, and a longer age means never.
        let inventory_max_age = chrono::Duration::seconds(
            i64::try_from(settings.inventory_max_age_secs.min(10 * 365 * 86_400)).unwrap_or(0),
        );
        let shared_tokens = self.shared_tokens().await;
        let shared_values: BTreeMap<String, String> = shared_tokens
            .iter()
            .map(|(integration, token)| (integration.clone(), token.value.clone()))
            .collect();
        let mut changes = Vec::new();
        // Per change made with a command: the integrations whose shared token it carries.
        let mut carries: HashMap<(String, String), Vec<String>> = HashMap::new();
        let mut wakeable = BTreeSet::new();
        let no_groups = BTreeSet::new();
        let no_ledger = BTreeMap::new();
        for target in &targets {
            report.devices += 1;
            let owner_groups = target
                .owner_id
                .as_ref()
                .and_then(|id| groups.get(id))
                .unwrap_or(&no_groups);
            let ledger = ledgers.get(&target.enrollment_id).unwrap_or(&no_ledger);
            let mut desired = self
                .desired_with_tokens(set, target, owner_groups, &shared_values)
                .await;
            desired.renew_identity_within(target, now, renewal_lead);
            desired.query_stale_inventory(target, ledger, now, inventory_max_age);
            let decisions = diff::diff(set, target, &desired, ledger, now);
            self.revoke_unneeded_device_tokens(set, target, &desired, &decisions)
                .await;
            for decision in decisions {
                if decision.send.is_some()
                    && let Some(DesiredItemTokens(integrations)) =
                        carried_tokens(&desired, &decision.key)
                {
                    carries.insert((target.udid.clone(), decision.key.clone()), integrations);
                }
                let sends = decision.send.is_some();
                let key = decision.key.clone();
                // One item that cannot be built (no push certificate for a renewal, say)
                // waits for the next pass; it does not hold up the rest of the page.
                match self.change_for(target, decision).await {
                    Ok(change) => changes.push(change),
                    Err(e) => {
                        report.failed += 1;
                        tracing::warn!(device = %target.udid, item = %key, error = %e,
                            "policy: an item could not be sent; retried at the next pass");
                        continue;
                    }
                }
                if target.wakeable && sends {
                    wakeable.insert(target.udid.clone());
                }
            }
        }
        if changes.is_empty() {
            return Ok(report);
        }
        changes.sort_by(|a, b| (&a.udid, &a.item_key).cmp(&(&b.udid, &b.item_key)));
        let made = store.apply_item_changes(&changes).await?;
        let mut woken = BTreeSet::new();
        for (change, made) in changes.iter().zip(&made) {
            if !made {
                report.already_done += 1;
                continue;
            }
            report.changes += 1;
            if let Some(command) = &change.command {
                report.commands += 1;
                if wakeable.contains(&change.udid) {
                    woken.insert(change.udid.clone());
                }
                if let Some(integrations) =
                    carries.get(&(change.udid.clone(), change.item_key.clone()))
                {
                    self.record_deliveries(&shared_tokens, integrations, change, &command.uuid)
                        .await;
                }
            }
            self.audit_deprovisioning(change).await;
        }
        report.pushes = woken.len();
        if !woken.is_empty() {
            // Device channels are named by the UDID.
            self.inner.pusher.wake(woken.into_iter().collect());
        }
        Ok(report)
    }

    /// Each integration's current shared token (none without the token service, or when it
    /// cannot be read: items that need one wait for the next pass).
    async fn shared_tokens(&self) -> HashMap<String, crate::tokens::shared::CurrentToken> {
        let Some(tokens) = &self.inner.tokens else {
            return HashMap::new();
        };
        match tokens.fresh_current_values().await {
            Ok(values) => values,
            Err(e) => {
                tracing::warn!(error = %e, "policy: app-config tokens unreadable; using the cache");
                tokens.current_values()
            }
        }
    }

    /// A device's desired state with its app-config tokens: the shared ones, and the device's
    /// own signed token for each integration a configuration in scope asks for (issued or
    /// reused: the same string comes back while it is fresh, so passes do not churn it).
    async fn desired_with_tokens(
        &self,
        set: &CompiledSet,
        target: &DeviceTarget,
        groups: &BTreeSet<GroupRef>,
        shared: &BTreeMap<String, String>,
    ) -> Desired {
        let mut tokens = TokenValues {
            shared: shared.clone(),
            device: BTreeMap::new(),
        };
        let desired = set.desired_with_tokens(target, groups, &tokens);
        let wanted: BTreeSet<&str> = desired
            .waiting
            .iter()
            .filter_map(|w| match &w.variable {
                Variable::DeviceToken(integration) => Some(integration.as_str()),
                _ => None,
            })
            .collect();
        let Some(device_tokens) = self
            .inner
            .device_tokens
            .as_ref()
            .filter(|_| !wanted.is_empty())
        else {
            return desired;
        };
        let groups_in_scope: Vec<String> =
            desired.in_scope.values().map(diff::group_label).collect();
        for integration in wanted {
            let request = DeviceTokenRequest {
                integration,
                enrollment_id: &target.enrollment_id,
                udid: &target.udid,
                owner_id: target.owner_id.as_deref(),
                owner_email: target.owner_email.as_deref(),
                groups: &groups_in_scope,
                lifetime: None,
            };
            match device_tokens
                .current_or_issue(request, DEVICE_TOKEN_REFRESH_BEFORE)
                .await
            {
                Ok(issued) => {
                    tokens.device.insert(integration.to_owned(), issued.jwt);
                }
                Err(e) => tracing::warn!(device = %target.udid, integration, error = %e,
                    "policy: no device token; the item waits"),
            }
        }
        set.desired_with_tokens(target, groups, &tokens)
    }

    /// When an app leaves a device (or its owner leaves every scope), the device's signed
    /// tokens for integrations its configurations no longer carry are revoked at once, so
    /// introspection answers inactive even before the device removes the app.
    async fn revoke_unneeded_device_tokens(
        &self,
        set: &CompiledSet,
        target: &DeviceTarget,
        desired: &Desired,
        decisions: &[diff::Decision],
    ) {
        let Some(device_tokens) = &self.inner.device_tokens else {
            return;
        };
        let app_left = decisions
            .iter()
            .any(|d| d.kind == ItemKind::App && !d.wanted);
        if !app_left {
            return;
        }
        let still: BTreeSet<String> = desired
            .items
            .values()
            .filter_map(|item| match &item.content {
                Content::App { device_tokens, .. } => Some(device_tokens.clone()),
                _ => None,
            })
            .flatten()
            .collect();
        for integration in set.device_token_integrations() {
            if still.contains(&integration) {
                continue;
            }
            if let Err(e) = device_tokens
                .revoke_for(
                    &target.enrollment_id,
                    Some(&integration),
                    "the device left the policies that deliver it",
                )
                .await
            {
                tracing::warn!(device = %target.udid, %integration, error = %e,
                    "policy: could not revoke a device token");
            }
        }
    }

    /// Records which shared tokens a command's configuration carries, for the per-token
    /// delivered and acknowledged counts.
    async fn record_deliveries(
        &self,
        current: &HashMap<String, crate::tokens::shared::CurrentToken>,
        integrations: &[String],
        change: &ItemChange,
        command_uuid: &str,
    ) {
        for integration in integrations {
            let Some(token) = current.get(integration) else {
                continue;
            };
            if let Err(e) = self
                .inner
                .store
                .record_token_delivery(
                    &token.token_id,
                    &change.enrollment_id,
                    &change.udid,
                    &change.item_key,
                    command_uuid,
                )
                .await
            {
                tracing::warn!(error = %e, "policy: could not record a token delivery");
            }
        }
    }

    /// A disabled or deleted person's devices are left alone when so configured.
    fn keeps_everything(&self, target: &DeviceTarget) -> bool {
        self.inner.settings.on_account_disabled == AccountDisabledAction::Keep
            && target
                .owner_status
                .is_some_and(|s| s != AccountStatus::Active)
    }

    /// The ledger change (and command) for a decision.
    async fn change_for(
        &self,
        target: &DeviceTarget,
        decision: Decision,
    ) -> Result<ItemChange, ReconcileError> {
        let command = match &decision.send {
            Some(send) => Some(self.command_for(target, &decision, send).await?),
            None => None,
        };
        Ok(ItemChange {
            enrollment_id: target.enrollment_id.clone(),
            udid: target.udid.clone(),
            item_key: decision.key,
            kind: decision.kind,
            wanted: decision.wanted,
            content_hash: decision.content_hash,
            config_hash: decision.config_hash,
            policy: decision.policy,
            group_ref: decision.group_ref,
            expected_revision: decision.expected_revision,
            action: decision.action,
            command,
            cancel_command: decision.cancel,
            due_at: decision.due_at,
        })
    }

    async fn command_for(
        &self,
        target: &DeviceTarget,
        decision: &Decision,
        send: &Send,
    ) -> Result<NewCommand, ReconcileError> {
        let command = match send {
            Send::InstallProfile { xml, .. } => {
                let signed = self.signed(&decision.content_hash, xml).await?;
                build(
                    "InstallProfile",
                    [("Payload", Value::Data(signed.to_vec()))],
                )
            }
            Send::RemoveProfile { identifier } => build(
                "RemoveProfile",
                [("Identifier", identifier.as_str().into())],
            ),
            Send::InstallApp {
                bundle_id,
                itunes_store_id,
                manifest_url,
                configuration,
            } => install_application(bundle_id, *itunes_store_id, manifest_url, configuration),
            Send::ConfigureApp {
                bundle_id,
                configuration,
            } => {
                let mut item = Dictionary::new();
                item.insert("Item".into(), "ApplicationConfiguration".into());
                item.insert("Identifier".into(), bundle_id.as_str().into());
                item.insert(
                    "Configuration".into(),
                    Value::Dictionary((**configuration).clone()),
                );
                build(
                    "Settings",
                    [("Settings", Value::Array(vec![Value::Dictionary(item)]))],
                )
            }
            Send::RemoveApp { bundle_id } => build(
                "RemoveApplication",
                [("Identifier", bundle_id.as_str().into())],
            ),
            Send::Run(command) => command.clone(),
            Send::Lock => build(
                "DeviceLock",
                [(
                    "Message",
                    format!("This device was locked by policy {}.", decision.policy).into(),
                )],
            ),
            Send::Wipe => build("EraseDevice", []),
            Send::RenewIdentity => {
                let profile = self
                    .inner
                    .profiles
                    .renewal(&target.enrollment_id, RENEWAL_CHALLENGE_TTL)
                    .await
                    .map_err(|e| ReconcileError::Signing(e.to_string()))?;
                build("InstallProfile", [("Payload", Value::Data(profile))])
            }
        };
        let uuid = uuid::Uuid::new_v4().to_string().to_uppercase();
        Ok(NewCommand {
            body: command.envelope(&uuid),
            fingerprint: command.fingerprint(),
            uuid,
            enrollment_id: target.udid.clone(),
            request_type: command.request_type,
            created_by: format!("policy:{}", decision.policy),
        })
    }

    /// The signed form of a profile, signed once per content.
    async fn signed(&self, hash: &str, xml: &[u8]) -> Result<Arc<Vec<u8>>, ReconcileError> {
        if let Some(hit) = self.lock_signed().get(hash) {
            return Ok(hit.clone());
        }
        let signed = Arc::new(
            self.inner
                .profiles
                .sign(xml)
                .await
                .map_err(|e| ReconcileError::Signing(e.to_string()))?,
        );
        let mut cache = self.lock_signed();
        if cache.len() >= SIGNED_CACHE {
            cache.clear();
        }
        cache.insert(hash.to_owned(), signed.clone());
        Ok(signed)
    }

    fn lock_signed(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<Vec<u8>>>> {
        match self.inner.signed.lock() {
            Ok(cache) => cache,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Locks and wipes are audited when scheduled, called off and sent, with the membership
    /// change (the group the device was in) that caused them.
    async fn audit_deprovisioning(&self, change: &ItemChange) {
        if change.kind != ItemKind::Deprovision {
            return;
        }
        let detail = serde_json::json!({
            "udid": change.udid,
            "enrollment_record_id": change.enrollment_id,
            "policy": change.policy,
            "left_group": change.group_ref,
            "due_at": change.due_at,
            "command_uuid": change.command.as_ref().map(|c| &c.uuid),
        });
        let entry = NewAuditEntry {
            actor: format!("policy:{}", change.policy),
            action: format!("deprovision.{}", change.action),
            target: Some(change.udid.clone()),
            outcome: OUTCOME_SUCCESS.into(),
            detail: Some(detail.to_string()),
            request_id: None,
            source: None,
        };
        if let Err(e) = self
            .inner
            .store
            .append_audit(&entry, crate::store::now())
            .await
        {
            tracing::error!(error = %e, "audit: could not record a deprovisioning action");
        }
    }

    /// Claims and serves reconcile requests until none are left; returns how many it served.
    /// A request is deleted only once served: if this node dies (or a pass fails), its claims
    /// run out and another node, or this one later, serves them again.
    pub async fn serve_requests(&self) -> Result<usize, ReconcileError> {
        let mut served = 0;
        loop {
            let now_ms = chrono::Utc::now().timestamp_millis();
            let requests = self
                .inner
                .store
                .claim_reconcile_requests(
                    CLAIM,
                    self.inner.node.as_str(),
                    now_ms,
                    claim_until(now_ms),
                )
                .await?;
            if requests.is_empty() {
                return Ok(served);
            }
            served += requests.len();
            let ids: Vec<i64> = requests.iter().map(|r| r.id).collect();
            let renewal = self.keep_claimed(ids.clone());
            let outcome = self.serve(requests).await;
            drop(renewal);
            outcome?;
            self.inner.store.finish_reconcile_requests(&ids).await?;
        }
    }

    /// Renews this node's claim on `ids` every third of the hold until the guard is dropped.
    fn keep_claimed(&self, ids: Vec<i64>) -> AbortOnDrop {
        let inner = self.inner.clone();
        AbortOnDrop(tokio::spawn(async move {
            loop {
                tokio::time::sleep(CLAIM_HOLD / 3).await;
                let until = claim_until(chrono::Utc::now().timestamp_millis());
                if let Err(e) = inner
                    .store
                    .renew_reconcile_claims(&ids, inner.node.as_str(), until)
                    .await
                {
                    tracing::warn!(error = %e, "policy: could not renew reconcile claims");
                }
            }
        }))
    }

    /// One claimed batch: the set in force, then the people, devices or fleet it names.
    async fn serve(&self, requests: Vec<ReconcileRequest>) -> Result<(), ReconcileError> {
        // The set in force is read after the claim: an apply records its version and its
        // request in one transaction, so a request claimed here (or on another node) before
        // this node's poller saw the version must still be served with that version.
        self.refresh().await?;
        let mut full = false;
        let mut users = BTreeSet::new();
        let mut devices = BTreeSet::new();
        for request in requests {
            match (request.user_id, request.udid) {
                (Some(user), _) => {
                    users.insert(user);
                }
                (None, Some(udid)) => {
                    devices.insert(udid);
                }
                (None, None) => full = true,
            }
        }
        let started = Instant::now();
        let mut report = PassReport::default();
        if full {
            report.add(&self.reconcile(TargetScope::All { after: None }).await?);
        } else {
            // People in batches: one query and one write per page of their devices.
            let users: Vec<String> = users.into_iter().collect();
            for batch in users.chunks(USERS_PER_BATCH) {
                let scope = TargetScope::Users {
                    user_ids: batch,
                    after: None,
                };
                report.add(&self.reconcile(scope).await?);
            }
            for udid in &devices {
                report.add(&self.reconcile(TargetScope::Device(udid)).await?);
            }
        }
        record_pass(
            &report,
            started.elapsed(),
            if full { "full" } else { "request" },
        );
        Ok(())
    }

    /// Logs (and exports as a gauge) a push certificate within 30 days of expiry.
    async fn warn_push_certificate_expiry(&self) {
        match crate::apple::push_cert::expiry_status(&self.inner.store).await {
            Ok(Some(status)) => {
                if let Some(warning) = status.warning {
                    tracing::warn!(topic = %status.topic, not_after = %status.not_after, "{warning}");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "could not read the push certificate"),
        }
    }

    /// Runs the reconciler until `shutdown` turns true: requests as they come (woken at once
    /// on this node, polled for other nodes'), and a full pass every interval.
    /// The periodic full pass runs on the node holding `full_pass` (once for the cluster);
    /// requests are served by every node, each claimed once.
    pub fn spawn(
        self,
        full_pass: Lease,
        mut shutdown: watch::Receiver<bool>,
    ) -> tokio::task::JoinHandle<()> {
        tokio::spawn(async move {
            let poll = Duration::from_millis(self.inner.settings.poll_interval_ms.max(50));
            let full_every =
                Duration::from_secs(self.inner.settings.full_pass_interval_secs.max(1));
            // The first full pass runs at start: whatever changed while no node ran.
            let mut last_full = Instant::now()
                .checked_sub(full_every)
                .unwrap_or_else(Instant::now);
            loop {
                if let Err(e) = self.refresh().await {
                    tracing::error!(error = %e, "policy: keeping the set in force");
                }
                if let Err(e) = self.serve_requests().await {
                    tracing::error!(error = %e, "policy: reconciling requests failed; retrying");
                }
                // Once per interval for the cluster: the node holding the lease runs it.
                if last_full.elapsed() >= full_every {
                    last_full = Instant::now();
                    if full_pass.take(full_every).await {
                        self.warn_push_certificate_expiry().await;
                        let started = Instant::now();
                        match self.reconcile(TargetScope::All { after: None }).await {
                            Ok(report) => record_pass(&report, started.elapsed(), "periodic"),
                            Err(e) => tracing::error!(error = %e, "policy: full pass failed"),
                        }
                    }
                }
                tokio::select! {
                    _ = self.inner.wake.woken() => {}
                    _ = tokio::time::sleep(poll) => {}
                    _ = shutdown.changed() => {}
                }
                if *shutdown.borrow() {
                    full_pass.release().await;
                    return;
                }
            }
        })
    }
}

/// When a claim made or renewed at `now_ms` (Unix milliseconds) runs out.
fn claim_until(now_ms: i64) -> i64 {
    now_ms.saturating_add(i64::try_from(CLAIM_HOLD.as_millis()).unwrap_or(i64::MAX))
}

/// A background task that stops when its guard is dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// The owners' groups and the devices' ledgers for one page of devices, each in one read.
pub(crate) async fn read_page_state(
    store: &Store,
    targets: &[DeviceTarget],
) -> Result<
    (
        HashMap<String, BTreeSet<GroupRef>>,
        HashMap<String, BTreeMap<String, ManagedItemRow>>,
    ),
    ReconcileError,
> {
    let owners: Vec<String> = targets
        .iter()
        .filter_map(|t| t.owner_id.clone())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut groups: HashMap<String, BTreeSet<GroupRef>> = HashMap::new();
    for (user, provider, id) in store.groups_of_users(&owners).await? {
        groups
            .entry(user)
            .or_default()
            .insert(GroupRef { provider, id });
    }
    let records: Vec<String> = targets.iter().map(|t| t.enrollment_id.clone()).collect();
    let mut ledgers: HashMap<String, BTreeMap<String, ManagedItemRow>> = HashMap::new();
    for row in store.managed_items(&records).await? {
        ledgers
            .entry(row.enrollment_id.clone())
            .or_default()
            .insert(row.item_key.clone(), row);
    }
    Ok((groups, ledgers))
}

/// The shared-token integrations an app item's configuration carries.
struct DesiredItemTokens(Vec<String>);

fn carried_tokens(desired: &Desired, key: &str) -> Option<DesiredItemTokens> {
    match &desired.items.get(key)?.content {
        Content::App { shared_tokens, .. } if !shared_tokens.is_empty() => {
            Some(DesiredItemTokens(shared_tokens.clone()))
        }
        _ => None,
    }
}

fn record_pass(report: &PassReport, took: Duration, kind: &'static str) {
    metrics::histogram!("trustbroker_reconcile_pass_seconds", "kind" => kind)
        .record(took.as_secs_f64());
    metrics::counter!("trustbroker_reconcile_commands_total").increment(report.commands as u64);
    if report.changes > 0 || report.already_done > 0 {
        tracing::info!(
            kind,
            devices = report.devices,
            changes = report.changes,
            commands = report.commands,
            already_done = report.already_done,
            pushes = report.pushes,
            ms = took.as_millis() as u64,
            "policy: reconciled"
        );
    }
}

fn build<const N: usize>(request_type: &str, keys: [(&str, Value); N]) -> Command {
    let mut body = Dictionary::new();
    body.insert("RequestType".into(), request_type.into());
    for (key, value) in keys {
        body.insert(key.into(), value);
    }
    Command {
        request_type: request_type.to_owned(),
        body,
    }
}

/// InstallApplication for an App Store app (by its store ID) or an in-house one (by its
/// manifest), managed, removed with the MDM profile, with its managed configuration.
fn install_application(
    bundle_id: &str,
    itunes_store_id: Option<u64>,
    manifest_url: &Option<String>,
    configuration: &Option<Arc<Dictionary>>,
) -> Command {
    let mut body = Dictionary::new();
    body.insert("RequestType".into(), "InstallApplication".into());
    match (itunes_store_id, manifest_url) {
        (Some(id), _) => {
            body.insert("iTunesStoreID".into(), Value::Integer(id.into()));
        }
        (None, Some(url)) => {
            body.insert("ManifestURL".into(), url.as_str().into());
        }
        (None, None) => {
            body.insert("Identifier".into(), bundle_id.into());
        }
    }
    // 1: remove the app when the MDM profile is removed.
    body.insert("ManagementFlags".into(), Value::Integer(1.into()));
    body.insert("InstallAsManaged".into(), Value::Boolean(true));
    body.insert("ChangeManagementState".into(), "Managed".into());
    if let Some(configuration) = configuration {
        body.insert(
            "Configuration".into(),
            Value::Dictionary((**configuration).clone()),
        );
    }
    Command {
        request_type: "InstallApplication".into(),
        body,
    }
}

/// The files of an applied version, from their stored JSON `{path: base64}`.
pub fn decode_files(json: &str) -> Result<BTreeMap<String, Vec<u8>>, String> {
    let map: BTreeMap<String, String> =
        serde_json::from_str(json).map_err(|e| format!("stored files: {e}"))?;
    map.into_iter()
        .map(|(path, b64)| {
            base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(|bytes| (path.clone(), bytes))
                .map_err(|_| format!("stored file {path} is not base64"))
        })
        .collect()
}

/// The stored JSON form of a policy set's files.
pub fn encode_files(files: &BTreeMap<String, Vec<u8>>) -> String {
    let map: BTreeMap<&String, String> = files
        .iter()
        .map(|(path, bytes)| {
            (
                path,
                base64::engine::general_purpose::STANDARD.encode(bytes),
            )
        })
        .collect();
    serde_json::to_string(&map).unwrap_or_default()
}
