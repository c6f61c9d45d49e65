//! Groups drive policy: policy files (YAML under `policies/`), compiled into a [`PolicySet`];
//! the reconciler that turns a person's groups into the commands that bring each of their
//! devices to what the set says; plan and apply.
//!
//! `model` is the compiled form; `load` reads and checks files (`apple_schema` knows Apple's
//! payload keys, `vars` the `${...}` variables); `desired` computes a device's desired items;
//! `reconcile` compares them with the ledger and queues commands; `plan` previews a set.

pub mod apple_schema;
pub mod cli;
pub mod desired;
pub mod diff;
pub mod load;
pub mod model;
pub mod plan;
pub mod reconcile;
pub mod state;
pub mod vars;

use std::sync::{Arc, RwLock};

use tokio::sync::Notify;

pub use model::{
    AppItem, Diagnostic, GroupRef, OnLeave, Platform, Policy, PolicySet, ProfileItem, Variable,
    VariableValues,
};

/// The policy set in force on this node, shared by the reconciler, the admin API and the
/// group sync (which syncs every group a policy targets).
#[derive(Clone, Default)]
pub struct ActivePolicies {
    current: Arc<RwLock<Arc<Active>>>,
}

/// A policy set and the version it was applied as (0: none applied yet).
#[derive(Debug, Default)]
pub struct Active {
    pub version: i64,
    pub set: PolicySet,
}

impl ActivePolicies {
    pub fn get(&self) -> Arc<Active> {
        match self.current.read() {
            Ok(guard) => guard.clone(),
            // A writer panicked mid-swap: the Arc it would have stored is whole either way.
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    pub fn replace(&self, active: Active) {
        let new = Arc::new(active);
        match self.current.write() {
            Ok(mut guard) => *guard = new,
            Err(poisoned) => *poisoned.into_inner() = new,
        }
    }

    /// The IDs of the groups at `provider` that some policy targets.
    pub fn targeted_groups(&self, provider: &str) -> Vec<String> {
        let active = self.get();
        let mut ids: Vec<String> = active
            .set
            .policies
            .iter()
            .flat_map(|p| p.groups.iter())
            .filter(|g| g.provider == provider)
            .map(|g| g.id.clone())
            .collect();
        ids.sort();
        ids.dedup();
        ids
    }
}

/// Wakes this node's reconciler at once after something recorded a reconcile request (other
/// nodes find the request at their next poll, within a second).
#[derive(Clone, Default)]
pub struct ReconcileWake(Arc<Notify>);

impl ReconcileWake {
    pub fn wake(&self) {
        self.0.notify_one();
    }

    pub async fn woken(&self) {
        self.0.notified().await;
    }
}
