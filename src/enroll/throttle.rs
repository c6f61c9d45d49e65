//! Failed password sign-ins, counted per login and per client address in a sliding window:
//! past the limit, further attempts are refused without asking the directory, so the portal
//! cannot be used to guess passwords (or to lock people out of the directory by its own
//! lockout policy) at network speed. Counts live in this process: behind a load balancer each
//! instance counts on its own, which bounds guessing at (instances × limit) per window.
//!
//! The address is the client's as `client_address` determines it (behind a trusted proxy, the
//! one it reports). An IPv6 client is counted by its /64: one host is routinely given a whole
//! /64, so counting single addresses would give an attacker 2^64 fresh ones.

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
        keys.push((format!("address:{}", address_group(address)), PER_ADDRESS));
    }
    keys
}

/// The unit an address is counted in: an IPv4 address, or the /64 an IPv6 address is in.
fn address_group(address: IpAddr) -> String {
    match address.to_canonical() {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            format!("{}/64", std::net::Ipv6Addr::from(prefix))
        }
    }
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

    #[test]
    fn ipv6_clients_are_counted_by_their_64() {
        let throttle = SignInThrottle::default();
        let address = |text: &str| Some(text.parse::<IpAddr>().unwrap());
        // Each failure from another address of the same /64.
        for i in 0..PER_ADDRESS {
            throttle.failed(
                "ldap",
                &format!("user{i}"),
                address(&format!("2001:db8:1:2::{i:x}")),
            );
        }
        let same_64 = address("2001:db8:1:2:ffff:ffff:ffff:ffff");
        assert!(throttle.blocked("ldap", "someone-new", same_64).is_some());
        let next_64 = address("2001:db8:1:3::1");
        assert!(throttle.blocked("ldap", "someone-new", next_64).is_none());
        // An IPv4-mapped address is its IPv4 address, counted alone.
        assert_eq!(
            address_group("::ffff:192.0.2.1".parse().unwrap()),
            "192.0.2.1"
        );
        assert_eq!(
            address_group("2001:db8:1:2:3:4:5:6".parse().unwrap()),
            "2001:db8:1:2::/64"
        );
    }
}
