//! A device's enrollments over its life, for admins: retiring one (from the API and the command
//! line alike) and reading a device's history. Re-enrollment itself happens at Authenticate
//! (`service`); the store does each change in one transaction with its audit record.

use crate::store::{AUDIT_RETIRE, RetireRequest, Retirement, Store, StoreResult};

/// Longest enrollment ID accepted (record IDs are UUIDs, channel IDs UDIDs or UDID:UserID).
const MAX_ID_LEN: usize = 256;

/// Whether `id` can name an enrollment at all; anything else is refused before the store.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_LEN && !id.chars().any(char::is_control)
}

/// Retires enrollment `id` (an enrollment record, or a channel: its device's current record).
/// `None`: no such enrollment. See [`Store::retire_enrollment`].
pub async fn retire(
    store: &Store,
    id: &str,
    by: &RetireRequest,
) -> StoreResult<Option<Retirement>> {
    let retired = store.retire_enrollment(id, by).await?;
    if let Some(r) = &retired {
        // The audit row is already in the database; this mirrors it to the `audit` log target.
        tracing::info!(
            target: "audit",
            actor = %by.actor,
            action = AUDIT_RETIRE,
            target_id = %r.enrollment_id,
            outcome = crate::audit::OUTCOME_SUCCESS,
            request_id = by.request_id.as_deref().unwrap_or(""),
            already_retired = r.already_retired,
            certificates_revoked = r.certificates_revoked,
            commands_cancelled = r.commands_cancelled,
            "admin action"
        );
    }
    Ok(retired)
}
