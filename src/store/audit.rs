//! The audit log: append-only, read newest first with keyset pagination.

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Store, StoreResult, on_pool};

#[derive(Clone, Debug, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub outcome: String,
    /// Free-form JSON text with what else is worth keeping (never a secret).
    pub detail: Option<String>,
    pub request_id: Option<String>,
    pub source: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct NewAuditEntry {
    pub actor: String,
    pub action: String,
    pub target: Option<String>,
    pub outcome: String,
    pub detail: Option<String>,
    pub request_id: Option<String>,
    pub source: Option<String>,
}

/// Filters for reading the log; `before` is the `id` of the last entry of the previous page.
#[derive(Clone, Debug, Default)]
pub struct AuditQuery {
    pub actor: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<String>,
    pub before: Option<i64>,
    pub limit: u32,
}

/// Appends an entry: (at, actor, action, target, outcome, detail, request_id, source). Also run
/// inside other transactions, so that a change and its audit record commit together.
pub(super) const INSERT_AUDIT: &str = "INSERT INTO audit_log \
     (at, actor, action, target, outcome, detail, request_id, source) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)";

impl Store {
    pub async fn append_audit(&self, entry: &NewAuditEntry, at: DateTime<Utc>) -> StoreResult<()> {
        on_pool!(self, |pool| sqlx::query(INSERT_AUDIT)
            .bind(at)
            .bind(&entry.actor)
            .bind(&entry.action)
            .bind(&entry.target)
            .bind(&entry.outcome)
            .bind(&entry.detail)
            .bind(&entry.request_id)
            .bind(&entry.source)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    pub async fn list_audit(&self, query: &AuditQuery) -> StoreResult<Vec<AuditEntry>> {
        // Absent filters bind NULL and match everything, so one statement serves every query.
        let sql = "SELECT id, at, actor, action, target, outcome, detail, request_id, source \
                   FROM audit_log \
                   WHERE ($1 IS NULL OR actor = $1) \
                     AND ($2 IS NULL OR action = $2) \
                     AND ($3 IS NULL OR outcome = $3) \
                     AND ($4 IS NULL OR id < $4) \
                   ORDER BY id DESC LIMIT $5";
        Ok(on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(&query.actor)
            .bind(&query.action)
            .bind(&query.outcome)
            .bind(query.before)
            .bind(i64::from(query.limit))
            .fetch_all(pool)
            .await?))
    }
}
