//! Audit records of admin actions, from the API and the command line alike.

use crate::store::{NewAuditEntry, Store};

pub const OUTCOME_SUCCESS: &str = "success";
pub const OUTCOME_DENIED: &str = "denied";
pub const OUTCOME_FAILURE: &str = "failure";

/// Appends `entry` to the audit log and mirrors it to the `audit` log target. A failed write is
/// logged at error level: the action it describes has already happened and cannot be undone.
pub async fn record(store: &Store, entry: NewAuditEntry) {
    tracing::info!(
        target: "audit",
        actor = %entry.actor,
        action = %entry.action,
        target_id = entry.target.as_deref().unwrap_or(""),
        outcome = %entry.outcome,
        request_id = entry.request_id.as_deref().unwrap_or(""),
        "admin action"
    );
    if let Err(e) = store.append_audit(&entry, crate::store::now()).await {
        tracing::error!(error = %e, action = %entry.action, "could not write audit record");
    }
}

/// The actor name for command-line actions: `cli:<login>`.
pub fn cli_actor() -> String {
    let user = std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into());
    format!("cli:{user}")
}
