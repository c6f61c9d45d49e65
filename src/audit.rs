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

/// Longest text an unauthenticated caller can put into one field of an audit record.
pub const MAX_UNAUTHENTICATED_FIELD: usize = 256;

/// `text` cut to at most `max` bytes at a character boundary, marked with `…` when cut.
pub fn truncated(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max.saturating_sub('…'.len_utf8());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", text.get(..end).unwrap_or_default())
}

/// How many audit records callers who proved nothing (refused admin keys) may cause: per
/// minute in all and per source address. Past either, records are counted in a metric and
/// not written, so a flood of bad keys cannot grow the database without bound; the first
/// records of each minute, and every source's first few, are still kept.
pub struct UnauthenticatedBudget {
    per_minute: u32,
    per_source: u32,
    window: std::sync::Mutex<Window>,
}

struct Window {
    started: std::time::Instant,
    total: u32,
    by_source: std::collections::HashMap<String, u32>,
    suppressed: u64,
}

impl UnauthenticatedBudget {
    pub fn new(per_minute: u32, per_source: u32) -> UnauthenticatedBudget {
        UnauthenticatedBudget {
            per_minute,
            per_source,
            window: std::sync::Mutex::new(Window {
                started: std::time::Instant::now(),
                total: 0,
                by_source: std::collections::HashMap::new(),
                suppressed: 0,
            }),
        }
    }

    /// Whether one more record from `source` may be written now.
    fn allow(&self, source: Option<&str>) -> bool {
        let Ok(mut window) = self.window.lock() else {
            return false;
        };
        if window.started.elapsed() >= std::time::Duration::from_secs(60) {
            if window.suppressed > 0 {
                tracing::warn!(
                    suppressed = window.suppressed,
                    "audit records of refused admin keys over the budget were not written \
                     in the last minute"
                );
            }
            window.started = std::time::Instant::now();
            window.total = 0;
            window.by_source.clear();
            window.suppressed = 0;
        }
        let source = source.unwrap_or("unknown");
        let from_source = window.by_source.get(source).copied().unwrap_or(0);
        if window.total >= self.per_minute || from_source >= self.per_source {
            window.suppressed += 1;
            return false;
        }
        window.total += 1;
        // At most `per_minute` sources are ever in the map: it stays small.
        window.by_source.insert(source.to_string(), from_source + 1);
        true
    }
}

/// Records what a caller who proved nothing caused, bounded: each field it chose is cut to
/// [`MAX_UNAUTHENTICATED_FIELD`] bytes, and records over `budget` are only counted.
pub async fn record_unauthenticated(
    store: &Store,
    budget: &UnauthenticatedBudget,
    entry: NewAuditEntry,
) {
    let cut = |field: Option<String>| field.map(|f| truncated(&f, MAX_UNAUTHENTICATED_FIELD));
    let entry = NewAuditEntry {
        actor: truncated(&entry.actor, MAX_UNAUTHENTICATED_FIELD),
        action: truncated(&entry.action, MAX_UNAUTHENTICATED_FIELD),
        target: cut(entry.target),
        outcome: entry.outcome,
        detail: cut(entry.detail),
        request_id: cut(entry.request_id),
        source: cut(entry.source),
    };
    if !budget.allow(entry.source.as_deref()) {
        metrics::counter!("trustbroker_audit_unauthenticated_suppressed_total").increment(1);
        return;
    }
    record(store, entry).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_whole_characters() {
        assert_eq!(truncated("short", 10), "short");
        let long = "é".repeat(300);
        let cut = truncated(&long, 256);
        assert!(cut.len() <= 256, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn the_budget_caps_each_source_and_the_total() {
        let budget = UnauthenticatedBudget::new(5, 2);
        assert!(budget.allow(Some("10.0.0.1")));
        assert!(budget.allow(Some("10.0.0.1")));
        assert!(!budget.allow(Some("10.0.0.1")), "per source");
        assert!(budget.allow(Some("10.0.0.2")));
        assert!(budget.allow(Some("10.0.0.3")));
        assert!(budget.allow(Some("10.0.0.4")));
        assert!(!budget.allow(Some("10.0.0.5")), "in all");
    }
}
