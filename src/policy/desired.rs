//! What one device should have: the items of every policy whose groups include one of its
//! owner's groups (and whose platforms include the device's), variables resolved for that
//! device and person. Pure: no store, no I/O; the reconciler and the plan both call it.
//!
//! A [`CompiledSet`] resolves once what does not depend on the device (templates without
//! variables), so that a pass over 100,000 devices hashes each shared profile once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use plist::{Dictionary, Value};
use sha2::{Digest, Sha256};

use super::model::VariableValues;
use super::model::{AppItem, GroupRef, Platform, Policy, PolicySet, ProfileItem, Variable};
use crate::apple::commands::Command;
use crate::store::{AccountStatus, DeviceTarget, ItemKind};

/// An item a device should have.
#[derive(Clone, Debug)]
pub struct DesiredItem {
    /// The ledger key: `profile:<identifier>`, `app:<bundle id>`, `join:<policy>:<n>` or
    /// `scope:<policy>`.
    pub key: String,
    pub kind: ItemKind,
    /// The policy (first by name) that wants it, and the group that put the device in it.
    pub policy: String,
    pub group: GroupRef,
    /// SHA-256 of what would be installed: a new hash means a new version to send.
    pub content_hash: String,
    /// Apps: SHA-256 of the managed configuration alone, so that a configuration change is
    /// sent as Settings instead of a reinstall.
    pub config_hash: Option<String>,
    pub content: Content,
}

#[derive(Clone, Debug)]
pub enum Content {
    /// A configuration profile: its identifier and unsigned XML.
    Profile {
        identifier: String,
        xml: Arc<Vec<u8>>,
    },
    App {
        bundle_id: String,
        itunes_store_id: Option<u64>,
        manifest_url: Option<String>,
        configuration: Option<Arc<Dictionary>>,
        /// The integrations whose shared token the configuration carries.
        shared_tokens: Vec<String>,
        /// The integrations whose per-device token the configuration carries.
        device_tokens: Vec<String>,
    },
    /// A command sent when the device comes into the policy's scope.
    Join(Command),
    /// The device is in the policy's scope.
    Scope,
    /// A new identity certificate for the device: its enrollment profile again, with a fresh
    /// one-time challenge for its enrollment record (built when it is sent).
    Identity,
    /// A question about what the device has (ProfileList, ManagedApplicationList).
    Inventory(Command),
}

/// The ledger keys of the inventory queries, and what each asks about.
const INVENTORY: [(&str, ItemKind, &str); 2] = [
    ("inventory:profiles", ItemKind::Profile, "ProfileList"),
    ("inventory:apps", ItemKind::App, "ManagedApplicationList"),
];

/// The ledger key of a device's identity renewal.
pub const IDENTITY_KEY: &str = "identity:renewal";

impl Desired {
    /// Adds a ProfileList (ManagedApplicationList) query when the device's last report of its
    /// profiles (apps) is older than `max_age`, or older than the newest install of one the
    /// device acknowledged. The reference time is the query's content hash, so a device that
    /// never answers is asked again only when the reference moves on (the next period, a new
    /// install).
    pub fn query_stale_inventory(
        &mut self,
        device: &DeviceTarget,
        ledger: &BTreeMap<String, crate::store::ManagedItemRow>,
        now: chrono::DateTime<chrono::Utc>,
        max_age: chrono::Duration,
    ) {
        let period = max_age.num_seconds().max(60);
        let period_start = now.timestamp() - now.timestamp().rem_euclid(period);
        for (key, kind, request_type) in INVENTORY {
            let newest_install = ledger
                .values()
                .filter(|r| r.kind == kind && r.wanted && self.items.contains_key(&r.item_key))
                .filter(|r| r.command_status == Some(crate::store::CommandStatus::Acknowledged))
                .filter_map(|r| r.command_answered_at)
                .max();
            let Some(newest_install) = newest_install else {
                continue;
            };
            let reported = match kind {
                ItemKind::Profile => device.profiles_reported_at,
                _ => device.apps_reported_at,
            };
            let reference = newest_install.timestamp().max(period_start);
            if reported.is_some_and(|at| at.timestamp() >= reference) {
                continue;
            }
            let mut body = Dictionary::new();
            body.insert("RequestType".into(), request_type.into());
            if kind == ItemKind::Profile {
                body.insert("ManagedOnly".into(), Value::Boolean(true));
            }
            self.items.insert(
                key.to_owned(),
                DesiredItem {
                    key: key.to_owned(),
                    kind: ItemKind::Inventory,
                    policy: "inventory".to_owned(),
                    group: GroupRef {
                        provider: "broker".to_owned(),
                        id: "inventory".to_owned(),
                    },
                    content_hash: reference.to_string(),
                    config_hash: None,
                    content: Content::Inventory(Command {
                        request_type: request_type.to_owned(),
                        body,
                    }),
                },
            );
        }
    }

    /// Adds the renewal of the device's identity certificate when it expires within `lead`:
    /// one renewal per certificate (the serial is the content hash).
    pub fn renew_identity_within(
        &mut self,
        device: &DeviceTarget,
        now: chrono::DateTime<chrono::Utc>,
        lead: chrono::Duration,
    ) {
        let (Some(serial), Some(not_after)) = (&device.identity_serial, device.identity_not_after)
        else {
            return;
        };
        if not_after - now > lead {
            return;
        }
        self.items.insert(
            IDENTITY_KEY.to_owned(),
            DesiredItem {
                key: IDENTITY_KEY.to_owned(),
                kind: ItemKind::Identity,
                policy: "device-identity".to_owned(),
                group: GroupRef {
                    provider: "broker".to_owned(),
                    id: "identity-renewal".to_owned(),
                },
                content_hash: serial.clone(),
                config_hash: None,
                content: Content::Identity,
            },
        );
    }
}

/// App-config tokens for one device: each integration's current shared token, and the
/// device's own signed tokens.
#[derive(Clone, Debug, Default)]
pub struct TokenValues {
    pub shared: BTreeMap<String, String>,
    pub device: BTreeMap<String, String>,
}

/// An item that cannot be resolved yet: the device or person lacks a variable's value.
#[derive(Clone, Debug)]
pub struct Waiting {
    pub key: String,
    pub policy: String,
    pub variable: Variable,
}

/// A device's desired state.
#[derive(Clone, Debug, Default)]
pub struct Desired {
    pub items: BTreeMap<String, DesiredItem>,
    pub waiting: Vec<Waiting>,
    /// The policies the device is in, with the group that put it there.
    pub in_scope: BTreeMap<String, GroupRef>,
}

/// A policy set prepared for many devices.
#[derive(Debug, Default)]
pub struct CompiledSet {
    policies: Vec<CompiledPolicy>,
}

#[derive(Debug)]
struct CompiledPolicy {
    policy: Policy,
    groups: BTreeSet<GroupRef>,
    /// Per profile, its resolved XML and hash when it uses no variables.
    static_profiles: Vec<Option<(Arc<Vec<u8>>, String)>>,
    /// Per app, its configuration and hashes when it uses no variables.
    static_apps: Vec<Option<ResolvedApp>>,
}

#[derive(Clone, Debug)]
struct ResolvedApp {
    configuration: Option<Arc<Dictionary>>,
    content_hash: String,
    config_hash: String,
}

impl CompiledSet {
    pub fn new(set: &PolicySet) -> CompiledSet {
        let no_values = VariableValues::default();
        let policies = set
            .policies
            .iter()
            .map(|policy| CompiledPolicy {
                groups: policy.groups.iter().cloned().collect(),
                static_profiles: policy
                    .profiles
                    .iter()
                    .map(|p| {
                        p.variables
                            .is_empty()
                            .then(|| resolve_profile(p, &no_values).ok())
                            .flatten()
                    })
                    .collect(),
                static_apps: policy
                    .apps
                    .iter()
                    .map(|a| {
                        a.variables
                            .is_empty()
                            .then(|| resolve_app(a, &no_values).ok())
                            .flatten()
                    })
                    .collect(),
                policy: policy.clone(),
            })
            .collect();
        CompiledSet { policies }
    }

    pub fn policy(&self, name: &str) -> Option<&Policy> {
        self.policies
            .iter()
            .map(|c| &c.policy)
            .find(|p| p.name == name)
    }

    /// The integrations some app configuration of the set carries a device token of.
    pub fn device_token_integrations(&self) -> BTreeSet<String> {
        self.policies()
            .flat_map(|p| p.apps.iter())
            .flat_map(|a| a.variables.iter())
            .filter_map(|v| match v {
                Variable::DeviceToken(integration) => Some(integration.clone()),
                _ => None,
            })
            .collect()
    }

    pub fn policies(&self) -> impl Iterator<Item = &Policy> {
        self.policies.iter().map(|c| &c.policy)
    }

    /// The desired state of `device`, whose owner is in `groups`.
    pub fn desired_for(&self, device: &DeviceTarget, groups: &BTreeSet<GroupRef>) -> Desired {
        self.desired_with_tokens(device, groups, &TokenValues::default())
    }

    /// The desired state of `device`, with the app-config tokens its configurations may use.
    /// An item using a token that `tokens` lacks waits (see [`Desired::waiting`]): the caller
    /// may issue the device tokens named there and ask again.
    pub fn desired_with_tokens(
        &self,
        device: &DeviceTarget,
        groups: &BTreeSet<GroupRef>,
        tokens: &TokenValues,
    ) -> Desired {
        let mut desired = Desired::default();
        // A person the directory disabled or deleted gets nothing: what policies installed is
        // removed (never more: a wipe needs a policy's own on_leave).
        let account_active = device
            .owner_status
            .is_none_or(|s| s == AccountStatus::Active);
        if !account_active {
            return desired;
        }
        let platform = platform_of(device);
        let mut values = values_for(device);
        values.tokens = tokens.shared.clone();
        values.device_tokens = tokens.device.clone();
        for compiled in &self.policies {
            let policy = &compiled.policy;
            let Some(group) = groups.iter().find(|g| compiled.groups.contains(*g)) else {
                continue;
            };
            if let Some(platforms) = &policy.platforms {
                // A device that has not said what it is matches only unrestricted policies.
                if !platform.is_some_and(|p| platforms.contains(&p)) {
                    continue;
                }
            }
            desired.in_scope.insert(policy.name.clone(), group.clone());
            let mut add = |item: DesiredItem| {
                desired.items.entry(item.key.clone()).or_insert(item);
            };
            add(DesiredItem {
                key: format!("scope:{}", policy.name),
                kind: ItemKind::Scope,
                policy: policy.name.clone(),
                group: group.clone(),
                content_hash: String::new(),
                config_hash: None,
                content: Content::Scope,
            });
            for (index, command) in policy.commands_on_join.iter().enumerate() {
                add(DesiredItem {
                    key: format!("join:{}:{index}", policy.name),
                    kind: ItemKind::Join,
                    policy: policy.name.clone(),
                    group: group.clone(),
                    content_hash: command.fingerprint(),
                    config_hash: None,
                    content: Content::Join(command.clone()),
                });
            }
            for (profile, cached) in policy.profiles.iter().zip(&compiled.static_profiles) {
                let key = format!("profile:{}", profile.identifier);
                let resolved = match cached {
                    Some(done) => Ok(done.clone()),
                    None => resolve_profile(profile, &values),
                };
                match resolved {
                    Ok((xml, content_hash)) => add(DesiredItem {
                        key,
                        kind: ItemKind::Profile,
                        policy: policy.name.clone(),
                        group: group.clone(),
                        content_hash,
                        config_hash: None,
                        content: Content::Profile {
                            identifier: profile.identifier.clone(),
                            xml,
                        },
                    }),
                    Err(variable) => desired.waiting.push(Waiting {
                        key,
                        policy: policy.name.clone(),
                        variable,
                    }),
                }
            }
            for (app, cached) in policy.apps.iter().zip(&compiled.static_apps) {
                let key = format!("app:{}", app.bundle_id);
                let resolved = match cached {
                    Some(done) => Ok(done.clone()),
                    None => resolve_app(app, &values),
                };
                match resolved {
                    Ok(resolved) => add(DesiredItem {
                        key,
                        kind: ItemKind::App,
                        policy: policy.name.clone(),
                        group: group.clone(),
                        content_hash: resolved.content_hash,
                        config_hash: Some(resolved.config_hash),
                        content: Content::App {
                            bundle_id: app.bundle_id.clone(),
                            itunes_store_id: app.itunes_store_id,
                            manifest_url: app.manifest_url.clone(),
                            configuration: resolved.configuration,
                            shared_tokens: app
                                .variables
                                .iter()
                                .filter_map(|v| match v {
                                    Variable::Token(integration) => Some(integration.clone()),
                                    _ => None,
                                })
                                .collect(),
                            device_tokens: app
                                .variables
                                .iter()
                                .filter_map(|v| match v {
                                    Variable::DeviceToken(integration) => Some(integration.clone()),
                                    _ => None,
                                })
                                .collect(),
                        },
                    }),
                    Err(variable) => desired.waiting.push(Waiting {
                        key,
                        policy: policy.name.clone(),
                        variable,
                    }),
                }
            }
        }
        desired
    }
}

fn resolve_profile(
    profile: &ProfileItem,
    values: &VariableValues,
) -> Result<(Arc<Vec<u8>>, String), Variable> {
    let resolved = if profile.variables.is_empty() {
        profile.template.clone()
    } else {
        super::vars::resolve_dictionary(&profile.template, values)?
    };
    let xml = crate::apple::plist::to_xml(&Value::Dictionary(resolved));
    let hash = hex::encode(Sha256::digest(&xml));
    Ok((Arc::new(xml), hash))
}

fn resolve_app(app: &AppItem, values: &VariableValues) -> Result<ResolvedApp, Variable> {
    let configuration = match &app.configuration {
        Some(template) if !app.variables.is_empty() => {
            Some(super::vars::resolve_dictionary(template, values)?)
        }
        other => other.clone(),
    };
    let config_xml = configuration
        .as_ref()
        .map(|c| crate::apple::plist::to_xml(&Value::Dictionary(c.clone())))
        .unwrap_or_default();
    let config_hash = hex::encode(Sha256::digest(&config_xml));
    // What installs the app: a change here is a reinstall, not a new configuration.
    let mut install = Sha256::new();
    install.update(app.bundle_id.as_bytes());
    install.update([0]);
    install.update(app.itunes_store_id.unwrap_or(0).to_be_bytes());
    install.update(app.manifest_url.as_deref().unwrap_or("").as_bytes());
    Ok(ResolvedApp {
        configuration: configuration.map(Arc::new),
        content_hash: hex::encode(install.finalize()),
        config_hash,
    })
}

/// What the device is, from the product name or model it reported (`iPhone15,2`,
/// `iPad13,4`, `MacBookPro18,3`, `AppleTV11,1`, `Watch6,1`, `RealityDevice14,1`).
pub fn platform_of(device: &DeviceTarget) -> Option<Platform> {
    let product = device
        .product_name
        .as_deref()
        .or(device.model.as_deref())
        .or(device.model_name.as_deref())?;
    let starts = |prefix: &str| product.starts_with(prefix);
    Some(if starts("iPhone") || starts("iPod") {
        Platform::Ios
    } else if starts("iPad") {
        Platform::Ipados
    } else if starts("AppleTV") {
        Platform::Tvos
    } else if starts("Watch") {
        Platform::Watchos
    } else if starts("RealityDevice") {
        Platform::Visionos
    } else if ["Mac", "iMac", "VirtualMac"].iter().any(|p| starts(p)) {
        Platform::Macos
    } else {
        return None;
    })
}

/// The variables' values for a device and its owner.
pub fn values_for(device: &DeviceTarget) -> VariableValues {
    VariableValues {
        user_id: device.owner_id.clone(),
        user_login: device.owner_login.clone(),
        user_email: device.owner_email.clone(),
        user_display_name: device.owner_display_name.clone(),
        user_subject: device.owner_subject.clone(),
        device_udid: Some(device.udid.clone()),
        device_serial_number: device.serial_number.clone(),
        device_name: device.device_name.clone(),
        device_model: device.model_name.clone().or_else(|| device.model.clone()),
        enrollment_id: Some(device.enrollment_id.clone()),
        tokens: Default::default(),
        device_tokens: Default::default(),
    }
}
