//! Cluster leases (see `crate::cluster`): one upsert that succeeds only for the holder or once
//! the previous holder's lease ran out, so two nodes can never both take it.

use super::{Store, StoreResult, on_pool};

/// Who holds a lease and until when (Unix milliseconds).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseRow {
    pub holder: String,
    pub expires_at_ms: i64,
}

impl Store {
    /// Takes or renews the lease `name` for `holder` until `now_ms + ttl_ms`. True when
    /// `holder` has it now: it held it already, or nobody did, or the last holder's ran out.
    pub async fn try_lease(
        &self,
        name: &str,
        holder: &str,
        now_ms: i64,
        ttl_ms: i64,
    ) -> StoreResult<bool> {
        let sql = "INSERT INTO leases (name, holder, acquired_at, expires_at) VALUES ($1, $2, $3, $4) \
                   ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
                   acquired_at = CASE WHEN leases.holder = excluded.holder THEN leases.acquired_at \
                                      ELSE excluded.acquired_at END, \
                   expires_at = excluded.expires_at \
                   WHERE leases.holder = excluded.holder OR leases.expires_at <= $3";
        let expires = now_ms.saturating_add(ttl_ms);
        let taken = on_pool!(self, |pool| sqlx::query(sql)
            .bind(name)
            .bind(holder)
            .bind(now_ms)
            .bind(expires)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(taken == 1)
    }

    /// Gives the lease up at once (a node shutting down), if `holder` has it.
    pub async fn release_lease(&self, name: &str, holder: &str) -> StoreResult<()> {
        let sql = "DELETE FROM leases WHERE name = $1 AND holder = $2";
        on_pool!(self, |pool| sqlx::query(sql)
            .bind(name)
            .bind(holder)
            .execute(pool)
            .await?
            .rows_affected());
        Ok(())
    }

    /// The lease's holder, if anyone has taken it (expired or not).
    pub async fn lease(&self, name: &str) -> StoreResult<Option<LeaseRow>> {
        let sql = "SELECT holder, expires_at FROM leases WHERE name = $1";
        let row: Option<(String, i64)> = on_pool!(self, |pool| sqlx::query_as(sql)
            .bind(name)
            .fetch_optional(pool)
            .await?);
        Ok(row.map(|(holder, expires_at_ms)| LeaseRow {
            holder,
            expires_at_ms,
        }))
    }
}
