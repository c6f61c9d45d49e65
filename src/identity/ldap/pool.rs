//! A small bounded pool of connections bound as the service account, reused across sign-ins
//! for searches. Only service-bound connections ever enter it: a person's password is checked on
//! a separate short-lived connection (see `LdapProvider::authenticate`), so a pooled connection
//! never carries a person's identity into someone else's sign-in.

use std::sync::Mutex;
use std::time::Duration;

use ldap3::Ldap;
use tokio::sync::{Semaphore, SemaphorePermit};

pub struct Pool {
    idle: Mutex<Vec<Ldap>>,
    /// One permit per connection that may exist at once (idle or leased).
    slots: Semaphore,
    size: usize,
}

/// A slot in the pool, with the idle connection it came with (if any). Dropping it without
/// [`Lease::release`] discards the connection: only one known to be healthy goes back.
pub struct Lease<'a> {
    pool: &'a Pool,
    _slot: SemaphorePermit<'a>,
    pub ldap: Option<Ldap>,
}

impl Pool {
    pub fn new(size: usize) -> Pool {
        Pool {
            idle: Mutex::new(Vec::with_capacity(size)),
            slots: Semaphore::new(size),
            size,
        }
    }

    pub fn size(&self) -> usize {
        self.size
    }

    /// Waits up to `wait` for a free slot; `None` when every connection stayed busy.
    pub async fn lease(&self, wait: Duration) -> Option<Lease<'_>> {
        let slot = tokio::time::timeout(wait, self.slots.acquire())
            .await
            .ok()?
            .ok()?;
        let mut ldap = None;
        while let Some(mut candidate) = self.take_idle() {
            // The server may have closed it while idle (idle timeout, restart).
            if !candidate.is_closed() {
                ldap = Some(candidate);
                break;
            }
        }
        Some(Lease {
            pool: self,
            _slot: slot,
            ldap,
        })
    }

    pub fn idle(&self) -> usize {
        self.idle.lock().map(|idle| idle.len()).unwrap_or(0)
    }

    /// Drops every idle connection (after one turned out stale).
    pub fn clear_idle(&self) {
        if let Ok(mut idle) = self.idle.lock() {
            idle.clear();
        }
    }

    fn take_idle(&self) -> Option<Ldap> {
        self.idle.lock().ok()?.pop()
    }
}

impl Lease<'_> {
    /// Returns a healthy connection to the pool.
    pub fn release(self, ldap: Ldap) {
        if let Ok(mut idle) = self.pool.idle.lock() {
            idle.push(ldap);
        }
    }
}
