//! Several nodes on one database: who this node is, and leases for background work that must
//! run once for the cluster rather than once per node.
//!
//! A lease is a row in the database (no coordinator to run): the node whose timer fires first
//! after the lease ran out takes it and does the work; the holder renews it each time it runs.
//! If the holder dies, its lease runs out and the next node to look takes over. Work done under
//! a lease is idempotent (the reconciler's ledger, the sync's deltas), so the rare overlap a
//! clock jump could cause costs time, never correctness. Request-driven work (reconcile
//! requests, commands) needs no lease: it is claimed row by row.

use std::sync::Arc;
use std::time::Duration;

use crate::store::Store;

/// This node's name in leases and claims: host name, process id and a random part, new at each
/// start, so a restarted node does not inherit a lease it cannot know it had.
#[derive(Clone, Debug)]
pub struct NodeId(Arc<str>);

impl NodeId {
    pub fn generate() -> NodeId {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "node".into());
        // The process id lets an operator find the holder; the random part keeps two runs
        // (or two containers with the same host name and pid) apart.
        let random = uuid::Uuid::new_v4().simple().to_string();
        NodeId(format!("{host}/{}/{}", std::process::id(), &random[..8]).into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One named piece of cluster-wide background work, as seen from this node.
#[derive(Clone, Debug)]
pub struct Lease {
    store: Store,
    name: Arc<str>,
    node: NodeId,
}

impl Lease {
    pub fn new(store: Store, name: impl Into<Arc<str>>, node: NodeId) -> Lease {
        Lease {
            store,
            name: name.into(),
            node,
        }
    }

    /// Whether this node should do the work now: it takes (or renews) the lease for `ttl`.
    /// A database error answers no: the work waits for a node that can reach the database.
    pub async fn take(&self, ttl: Duration) -> bool {
        let now_ms = chrono::Utc::now().timestamp_millis();
        let ttl_ms = i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX);
        match self
            .store
            .try_lease(&self.name, self.node.as_str(), now_ms, ttl_ms)
            .await
        {
            Ok(taken) => {
                if !taken {
                    tracing::debug!(lease = %self.name, "another node holds this work");
                }
                taken
            }
            Err(e) => {
                tracing::warn!(lease = %self.name, error = %e, "could not take the lease; skipping");
                false
            }
        }
    }

    /// Hands the work to the next node at once (at shutdown), rather than after the TTL.
    pub async fn release(&self) {
        if let Err(e) = self
            .store
            .release_lease(&self.name, self.node.as_str())
            .await
        {
            tracing::debug!(lease = %self.name, error = %e, "could not release the lease");
        }
    }
}
