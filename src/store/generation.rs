//! What the MDM request caches depend on (see `apple::cache`): the two counters of
//! `mdm_cache_state`, bumped by triggers in the transaction of each change whoever makes it,
//! and this node's own count of the changes it made, bumped after each commits so that its
//! caches follow at once instead of at the next poll.

use std::sync::atomic::{AtomicU64, Ordering};

use super::{Store, StoreResult, on_pool};

/// The database's counters at one moment.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Generations {
    pub identity: i64,
    pub queue: i64,
}

/// Changes this node made (counted after their transactions commit).
#[derive(Debug, Default)]
pub struct LocalChanges {
    identity: AtomicU64,
    queue: AtomicU64,
}

impl LocalChanges {
    pub fn identity(&self) -> u64 {
        self.identity.load(Ordering::Acquire)
    }

    pub fn queue(&self) -> u64 {
        self.queue.load(Ordering::Acquire)
    }

    /// A certificate, a device's binding or a channel changed here.
    pub fn identity_changed(&self) {
        self.identity.fetch_add(1, Ordering::AcqRel);
    }

    /// Commands were queued here.
    pub fn queue_changed(&self) {
        self.queue.fetch_add(1, Ordering::AcqRel);
    }
}

impl Store {
    /// The changes this node made, for its caches.
    pub fn local_changes(&self) -> &LocalChanges {
        &self.changes
    }

    /// One read of `mdm_cache_state`.
    pub async fn mdm_generations(&self) -> StoreResult<Generations> {
        let sql = "SELECT identity_generation, queue_generation FROM mdm_cache_state WHERE id = 1";
        let row: Option<(i64, i64)> = on_pool!(self, |pool| sqlx::query_as(sql)
            .fetch_optional(pool)
            .await?);
        Ok(
            row.map_or_else(Generations::default, |(identity, queue)| Generations {
                identity,
                queue,
            }),
        )
    }
}
