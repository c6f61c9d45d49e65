//! Whether to negotiate TLS with a PostgreSQL on this host.
//!
//! sqlx, like libpq, defaults to `sslmode=prefer`: it negotiates TLS whenever the server offers
//! it, and Debian's PostgreSQL does. Over loopback or a Unix socket the bytes never leave the
//! kernel, and whoever can read them (root) can read the broker's memory too, so TLS there buys
//! nothing and costs both processes CPU on every statement (SCEP issuance on PostgreSQL with the
//! RSA CA: 954–1,034/s with TLS, 1,058–1,101/s without, on a 2-core machine where PostgreSQL
//! shares the cores; docs/benchmarks.md). So when neither the URL nor the environment says
//! anything about TLS and the host is this one, the broker connects in the clear first, and
//! falls back to the default only if the server refuses an unencrypted connection
//! (`hostssl`-only pg_hba rules). Any TLS setting the operator gives (a mode, a root
//! certificate, a client certificate for `cert` authentication) leaves sqlx's behaviour as is.

use std::net::IpAddr;

use sqlx::postgres::{PgConnectOptions, PgSslMode};

/// libpq's environment variables for TLS, which sqlx reads too.
const TLS_VARIABLES: [&str; 4] = ["PGSSLMODE", "PGSSLROOTCERT", "PGSSLCERT", "PGSSLKEY"];

/// The options to try first for `url`: `options` without TLS when the database is on this host
/// and nothing was said about TLS; `None` when `options` stand as they are.
pub(super) fn plain_first(url: &str, options: &PgConnectOptions) -> Option<PgConnectOptions> {
    let tls_configured =
        TLS_VARIABLES.iter().any(|v| std::env::var_os(v).is_some()) || url_configures_tls(url);
    if tls_configured || !on_this_host(options) {
        return None;
    }
    Some(options.clone().ssl_mode(PgSslMode::Disable))
}

/// Whether a failed plain connection should be retried with the operator's options: the server
/// turned it away at authentication (SQLSTATE 28000, which pg_hba answers when only `hostssl`
/// rules match). Any other failure would fail the same way with TLS.
pub(super) fn refused_in_the_clear(error: &sqlx::Error) -> bool {
    error
        .as_database_error()
        .and_then(|e| e.code())
        .is_some_and(|code| code == "28000")
}

/// Whether the query string has a TLS parameter: `sslmode`, `sslrootcert`, `sslcert`, `sslkey`
/// (or sqlx's spellings, `ssl-mode`, `ssl-ca`, …), all of which begin with `ssl`.
fn url_configures_tls(url: &str) -> bool {
    let Some((_, query)) = url.split_once('?') else {
        return false;
    };
    query
        .split('&')
        .map(|pair| pair.split_once('=').map_or(pair, |(key, _)| key))
        .any(|key| key.get(..3).is_some_and(|p| p.eq_ignore_ascii_case("ssl")))
}

/// A Unix socket, `localhost`, or a loopback address.
fn on_this_host(options: &PgConnectOptions) -> bool {
    if options.get_socket().is_some() {
        return true;
    }
    let host = options.get_host();
    host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use std::str::FromStr;

    use super::*;

    /// The mode tried first, if the options are changed at all.
    fn first(url: &str) -> Option<String> {
        let options = PgConnectOptions::from_str(url).unwrap();
        plain_first(url, &options).map(|o| format!("{:?}", o.get_ssl_mode()))
    }

    #[test]
    fn loopback_without_a_stated_mode_goes_plain_first() {
        if TLS_VARIABLES.iter().any(|v| std::env::var_os(v).is_some()) {
            return; // the environment configures TLS: nothing is decided for it
        }
        for url in [
            "postgres://u@127.0.0.1:5432/test",
            "postgres://u@127.8.0.1/test",
            "postgres://u@[::1]:5432/test",
            "postgres://u@localhost/test",
            "postgres://u@LOCALHOST/test?application_name=x",
            "postgres:///test?host=/var/run/postgresql",
        ] {
            assert_eq!(first(url).as_deref(), Some("Disable"), "{url}");
        }
    }

    #[test]
    fn a_tls_setting_or_another_host_is_left_alone() {
        for url in [
            "postgres://u@127.0.0.1/test?sslmode=prefer",
            "postgres://u@127.0.0.1/test?application_name=x&sslmode=require",
            "postgres://u@127.0.0.1/test?ssl-mode=verify-full",
            "postgres://u@127.0.0.1/test?sslcert=/etc/c.pem&sslkey=/etc/k.pem",
            "postgres://u@localhost/test?ssl-root-cert=/etc/ca.pem",
            "postgres://u@db.example.internal/test",
            "postgres://u@10.0.0.5/test",
            "postgres://u@[2001:db8::1]/test",
        ] {
            assert_eq!(first(url), None, "{url}");
        }
    }

    #[test]
    fn only_an_authentication_refusal_is_retried_with_tls() {
        let io = sqlx::Error::Io(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert!(!refused_in_the_clear(&io));
        assert!(!refused_in_the_clear(&sqlx::Error::PoolTimedOut));
    }
}
