//! Who the client is, by network address, for the sign-in throttle.
//!
//! The socket peer is the client unless it is one of the configured `trusted_proxies`; then the
//! proxy's report is read from the one configured header (`X-Forwarded-For` or RFC 7239
//! `Forwarded`), walking from the right: each trusted proxy appends the address it saw, so the
//! right-most address that is not itself a trusted proxy is the client as the outermost proxy
//! saw it. Everything left of it was written by the client and is never believed.

use std::net::{IpAddr, SocketAddr};

use axum::http::HeaderMap;
use axum::http::header::FORWARDED;

use crate::config::{ClientAddressHeader, ProxyConfig};

const X_FORWARDED_FOR: &str = "x-forwarded-for";

/// The client's address: `peer` itself, or what trusted proxies in front of it report.
pub fn client_address(
    peer: Option<IpAddr>,
    headers: &HeaderMap,
    proxies: &ProxyConfig,
) -> Option<IpAddr> {
    let peer = peer.map(|ip| ip.to_canonical())?;
    if !is_trusted(peer, proxies) {
        return Some(peer);
    }
    let hops = match proxies.header {
        ClientAddressHeader::XForwardedFor => hops(headers, X_FORWARDED_FOR, parse_xff_entry),
        ClientAddressHeader::Forwarded => hops(headers, FORWARDED.as_str(), parse_forwarded_entry),
    };
    // `nearest` is the last address known to be reported truthfully: at first the proxy
    // itself, then each trusted proxy the chain passed through.
    let mut nearest = peer;
    for hop in hops.iter().rev() {
        match hop {
            Some(ip) if is_trusted(*ip, proxies) => nearest = *ip,
            Some(ip) => return Some(*ip),
            // A trusted proxy wrote something that is not an address (`unknown`, an obfuscated
            // identifier): the client is somewhere behind `nearest`, so count them all as it.
            None => return Some(nearest),
        }
    }
    Some(nearest)
}

fn is_trusted(ip: IpAddr, proxies: &ProxyConfig) -> bool {
    proxies.trusted.iter().any(|net| net.contains(&ip))
}

/// Every entry of every instance of header `name`, in order (repeated headers are one list).
fn hops(headers: &HeaderMap, name: &str, parse: fn(&str) -> Option<IpAddr>) -> Vec<Option<IpAddr>> {
    headers
        .get_all(name)
        .iter()
        .flat_map(|value| value.to_str().unwrap_or("").split(','))
        .map(str::trim)
        .filter(|entry| !entry.is_empty())
        .map(|entry| parse(entry).map(|ip| ip.to_canonical()))
        .collect()
}

/// `203.0.113.5`, `2001:db8::1`, and the forms with a port some proxies write
/// (`203.0.113.5:4711`, `[2001:db8::1]:4711`).
fn parse_xff_entry(entry: &str) -> Option<IpAddr> {
    entry
        .parse::<IpAddr>()
        .ok()
        .or_else(|| entry.parse::<SocketAddr>().ok().map(|s| s.ip()))
        .or_else(|| {
            entry
                .strip_prefix('[')
                .and_then(|e| e.strip_suffix(']'))?
                .parse()
                .ok()
        })
}

/// One `Forwarded` element (`for=192.0.2.60;proto=https;by=…`): its `for` node.
fn parse_forwarded_entry(element: &str) -> Option<IpAddr> {
    let node = element.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        key.trim()
            .eq_ignore_ascii_case("for")
            .then_some(value.trim())
    })?;
    let node = node
        .strip_prefix('"')
        .and_then(|n| n.strip_suffix('"'))
        .unwrap_or(node);
    parse_xff_entry(node)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn proxies(nets: &[&str], header: ClientAddressHeader) -> ProxyConfig {
        ProxyConfig {
            trusted: nets.iter().map(|n| n.parse().unwrap()).collect(),
            header,
        }
    }

    fn with(name: &str, values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(
                axum::http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                v.parse().unwrap(),
            );
        }
        headers
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn the_header_counts_only_from_a_trusted_proxy() {
        let xff = ClientAddressHeader::XForwardedFor;
        let headers = with("x-forwarded-for", &["198.51.100.7"]);
        let none = proxies(&[], xff);
        assert_eq!(
            client_address(ip("203.0.113.9"), &headers, &none),
            ip("203.0.113.9")
        );
        let other = proxies(&["10.0.0.0/8"], xff);
        assert_eq!(
            client_address(ip("203.0.113.9"), &headers, &other),
            ip("203.0.113.9")
        );
        assert_eq!(
            client_address(ip("10.1.2.3"), &headers, &other),
            ip("198.51.100.7")
        );
        // From a trusted proxy that sent no header: the proxy is all we know.
        assert_eq!(
            client_address(ip("10.1.2.3"), &HeaderMap::new(), &other),
            ip("10.1.2.3")
        );
        assert_eq!(client_address(None, &headers, &other), None);
    }

    #[test]
    fn the_right_most_untrusted_address_wins_over_what_the_client_wrote() {
        let chain = proxies(
            &["10.0.0.0/8", "fd00::/8"],
            ClientAddressHeader::XForwardedFor,
        );
        // The client claims 1.2.3.4; the outer proxy saw 198.51.100.7; an inner proxy 10.0.0.2.
        let headers = with("x-forwarded-for", &["1.2.3.4, 198.51.100.7", "10.0.0.2"]);
        assert_eq!(
            client_address(ip("10.0.0.1"), &headers, &chain),
            ip("198.51.100.7")
        );
        // Ports and brackets, as some proxies write them.
        let headers = with("x-forwarded-for", &["[2001:db8::5]:4711, 10.0.0.2:80"]);
        assert_eq!(
            client_address(ip("fd00::1"), &headers, &chain),
            ip("2001:db8::5")
        );
        // Garbage written by a trusted hop: the nearest trusted address, not the garbage's left.
        let headers = with("x-forwarded-for", &["1.2.3.4, unknown, 10.0.0.2"]);
        assert_eq!(
            client_address(ip("10.0.0.1"), &headers, &chain),
            ip("10.0.0.2")
        );
        // A client inside the trusted networks: the left-most address.
        let headers = with("x-forwarded-for", &["10.9.9.9, 10.0.0.2"]);
        assert_eq!(
            client_address(ip("10.0.0.1"), &headers, &chain),
            ip("10.9.9.9")
        );
        // An IPv4-mapped peer is the IPv4 address it maps.
        assert_eq!(
            client_address(
                ip("::ffff:10.0.0.1"),
                &with("x-forwarded-for", &["192.0.2.1"]),
                &chain
            ),
            ip("192.0.2.1")
        );
    }

    #[test]
    fn forwarded_is_read_instead_when_configured() {
        let fwd = proxies(&["10.0.0.0/8"], ClientAddressHeader::Forwarded);
        let headers = with(
            "forwarded",
            &["for=1.2.3.4, For=\"[2001:db8:cafe::17]:4711\";proto=https;by=10.0.0.1"],
        );
        assert_eq!(
            client_address(ip("10.0.0.1"), &headers, &fwd),
            ip("2001:db8:cafe::17")
        );
        // The other header is the client's word then.
        let spoofed = with("x-forwarded-for", &["1.2.3.4"]);
        assert_eq!(
            client_address(ip("10.0.0.1"), &spoofed, &fwd),
            ip("10.0.0.1")
        );
        let hidden = with("forwarded", &["for=_hidden;proto=https"]);
        assert_eq!(
            client_address(ip("10.0.0.1"), &hidden, &fwd),
            ip("10.0.0.1")
        );
    }
}
