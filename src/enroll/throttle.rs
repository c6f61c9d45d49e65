//! Failed password sign-ins, counted per login and per client address in a sliding window:
//! past the limit, further attempts are refused without asking the directory, so the portal
//! cannot be used to guess passwords (or to lock people out of the directory by its own
//! lockout policy) at network speed. Counts live in this process: behind a load balancer each
//! instance counts on its own, which bounds guessing at (instances × limit) per window.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Failed attempts allowed per login within [`WINDOW`].
pub const PER_LOGIN: u32 = 5;
/// Failed attempts allowed per client address within [`WINDOW`] (many people may share one).
pub const PER_ADDRESS: u32 = 30;
pub const WINDOW: Duration = Duration::from_secs(300);
/// Above this many tracked keys, expired ones are dropped before a new one is added.
const PRUNE_ABOVE: usize = 10_000;

#[derive(Default)]
pub struct SignInThrottle {
    failures: Mutex<HashMap<String, (u32, Instant)>>,
}

impl SignInThrottle {
    /// `Some(wait)` when `login` (at `provider`) or `address` is over its limit.
    pub fn blocked(
        &self,
        provider: &str,
        login: &str,
        address: Option<IpAddr>,
    ) -> Option<Duration> {
        let now = Instant::now();
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        keys(provider, login, address)
            .into_iter()
            .filter_map(|(key, limit)| {
                let (count, since) = failures.get(&key)?;
                let left = WINDOW.checked_sub(now.duration_since(*since))?;
                (*count >= limit).then_some(left)
            })
            .max()
    }

    pub fn failed(&self, provider: &str, login: &str, address: Option<IpAddr>) {
        let now = Instant::now();
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() > PRUNE_ABOVE {
            failures.retain(|_, (_, since)| now.duration_since(*since) < WINDOW);
        }
        for (key, _) in keys(provider, login, address) {
            let entry = failures.entry(key).or_insert((0, now));
            if now.duration_since(entry.1) >= WINDOW {
                *entry = (0, now);
            }
            entry.0 += 1;
        }
    }

    /// A successful sign-in clears its login's count (not its address's).
    pub fn succeeded(&self, provider: &str, login: &str) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(&login_key(provider, login));
    }
}

fn login_key(provider: &str, login: &str) -> String {
    format!("login:{provider}:{}", login.trim().to_lowercase())
}

fn keys(provider: &str, login: &str, address: Option<IpAddr>) -> Vec<(String, u32)> {
    let mut keys = vec![(login_key(provider, login), PER_LOGIN)];
    if let Some(address) = address {
        keys.push((format!("address:{address}"), PER_ADDRESS));
    }
    keys
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_login_is_blocked_after_its_limit_and_cleared_by_success() {
        let throttle = SignInThrottle::default();
        let here = Some(IpAddr::from([127, 0, 0, 1]));
        for _ in 0..PER_LOGIN {
            assert!(throttle.blocked("ldap", "Bob", here).is_none());
            throttle.failed("ldap", "bob", here);
        }
        // Case and spaces do not make a new login.
        assert!(throttle.blocked("ldap", " BOB ", here).is_some());
        assert!(throttle.blocked("other", "bob", here).is_none());
        assert!(throttle.blocked("ldap", "carol", here).is_none());
        throttle.succeeded("ldap", "bob");
        assert!(throttle.blocked("ldap", "bob", here).is_none());
    }

    #[test]
    fn an_address_is_blocked_after_its_limit_whatever_the_login() {
        let throttle = SignInThrottle::default();
        let here = Some(IpAddr::from([10, 0, 0, 1]));
        for i in 0..PER_ADDRESS {
            throttle.failed("ldap", &format!("user{i}"), here);
        }
        let wait = throttle
            .blocked("ldap", "someone-new", here)
            .expect("blocked");
        assert!(wait <= WINDOW);
        assert!(
            throttle
                .blocked("ldap", "someone-new", Some(IpAddr::from([10, 0, 0, 2])))
                .is_none()
        );
    }
}
