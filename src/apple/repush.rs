//! Pushing silent devices again. A push is a hint APNs may drop (the device was off, out of
//! coverage, or APNs coalesced it), and a device answers NotNow when it is locked: either way
//! commands would wait until something else woke the device. Once for the cluster (the node
//! holding the `apns:repush` lease), devices with commands waiting that have not been heard
//! from for `apns_repush_after_secs` are pushed again; each silent device's wait then doubles
//! after every push, up to a day, and starts over once it is heard from.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use super::apns::Pusher;
use crate::cluster::Lease;
use crate::store::{Store, StoreError};

/// Channels read per query.
const PAGE: i64 = 1_000;
/// Pushes per sweep, at most; the rest are due at the next sweep.
const PER_SWEEP: usize = 10_000;
/// The longest wait between two pushes to a device that stays silent.
const LONGEST_WAIT: Duration = Duration::from_secs(24 * 3600);

/// The lease holder's memory of whom it pushed again: lost when the lease moves, which costs
/// at most one early push per device.
#[derive(Default)]
struct Backoff {
    /// Channel → (when it was last pushed again, how many times in a row).
    pushed: HashMap<String, (Instant, u32)>,
}

impl Backoff {
    fn is_due(&self, id: &str, after: Duration, now: Instant) -> bool {
        match self.pushed.get(id) {
            None => true,
            Some(&(at, times)) => {
                let wait = after
                    .saturating_mul(2u32.saturating_pow(times.min(16)))
                    .min(LONGEST_WAIT);
                now.duration_since(at) >= wait
            }
        }
    }

    fn record(&mut self, id: &str, now: Instant) {
        let entry = self.pushed.entry(id.to_owned()).or_insert((now, 0));
        *entry = (now, entry.1.saturating_add(1));
    }

    /// Forgets devices no longer silent: heard from, or their commands done.
    fn keep_only(&mut self, silent: &HashSet<String>) {
        self.pushed.retain(|id, _| silent.contains(id));
    }
}

/// Runs the sweep until `stopped`; `None` when re-pushing is off.
pub fn spawn(
    pusher: Pusher,
    store: Store,
    lease: Lease,
    mut stopped: watch::Receiver<bool>,
) -> Option<tokio::task::JoinHandle<()>> {
    let after = pusher.repush_after()?;
    let every = (after / 3).clamp(Duration::from_secs(1), Duration::from_secs(300));
    Some(tokio::spawn(async move {
        let mut backoff = Backoff::default();
        loop {
            tokio::select! {
                _ = tokio::time::sleep(every) => {}
                _ = stopped.changed() => {}
            }
            if *stopped.borrow() {
                lease.release().await;
                return;
            }
            if !lease.take(every.saturating_mul(3)).await {
                // Another node sweeps; its memory, not ours, counts.
                backoff = Backoff::default();
                continue;
            }
            match sweep(&pusher, &store, after, &mut backoff).await {
                Ok(0) => {}
                Ok(pushed) => {
                    tracing::info!(
                        devices = pushed,
                        "APNs: silent devices with commands waiting pushed again"
                    );
                }
                Err(e) => tracing::warn!(error = %e, "APNs: finding silent devices failed"),
            }
        }
    }))
}

/// One sweep: finds the silent channels, pushes those due, and returns how many.
async fn sweep(
    pusher: &Pusher,
    store: &Store,
    after: Duration,
    backoff: &mut Backoff,
) -> Result<usize, StoreError> {
    let cutoff =
        chrono::Utc::now() - chrono::Duration::from_std(after).unwrap_or(chrono::Duration::days(1));
    let now = Instant::now();
    let mut silent = HashSet::new();
    let mut due = Vec::new();
    let mut last = String::new();
    loop {
        let page = store.silent_channels_with_work(cutoff, &last, PAGE).await?;
        let Some(end) = page.last().cloned() else {
            break;
        };
        for id in page {
            if due.len() < PER_SWEEP && backoff.is_due(&id, after, now) {
                due.push(id.clone());
            }
            silent.insert(id);
        }
        last = end;
    }
    backoff.keep_only(&silent);
    for id in &due {
        backoff.record(id, now);
    }
    let pushed = due.len();
    metrics::counter!("trustbroker_apns_repushes_total").increment(pushed as u64);
    if pushed > 0 {
        pusher.wake(due);
    }
    Ok(pushed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_wait_doubles_after_each_push_and_is_capped_at_a_day() {
        let after = Duration::from_secs(900);
        let start = Instant::now();
        let mut backoff = Backoff::default();
        assert!(backoff.is_due("a", after, start));
        backoff.record("a", start);
        // Pushed once: next after twice the base.
        assert!(!backoff.is_due("a", after, start + Duration::from_secs(1799)));
        assert!(backoff.is_due("a", after, start + Duration::from_secs(1800)));
        backoff.record("a", start);
        assert!(!backoff.is_due("a", after, start + Duration::from_secs(3599)));
        assert!(backoff.is_due("a", after, start + Duration::from_secs(3600)));
        for _ in 0..40 {
            backoff.record("a", start);
        }
        assert!(backoff.is_due("a", after, start + LONGEST_WAIT));
    }

    #[test]
    fn a_device_heard_from_starts_over() {
        let after = Duration::from_secs(60);
        let now = Instant::now();
        let mut backoff = Backoff::default();
        backoff.record("a", now);
        backoff.record("b", now);
        backoff.keep_only(&HashSet::from(["b".to_owned()]));
        assert!(backoff.is_due("a", after, now));
        assert!(!backoff.is_due("b", after, now));
    }
}
