//! One connection to the directory: TCP, then StartTLS or LDAPS, with timeouts; ldap3's errors
//! sorted into [`IdpError`]s an operator can act on; search entries read without panicking.

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ldap3::asn1::StructureTag;
use ldap3::{Ldap, LdapConnAsync, LdapConnSettings, LdapError, LdapResult, ResultEntry};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{CertificateError, ClientConfig, RootCertStore};

use crate::identity::IdpError;

/// How the connection is protected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transport {
    /// `ldaps://`: TLS from the first byte.
    Ldaps,
    /// `ldap://` upgraded with the StartTLS extended operation before anything else is sent.
    StartTls,
    /// `ldap://` in the clear: only to a loopback address, and only when asked for explicitly.
    Plain,
}

/// Where and how to connect; shared by the pool and the short-lived user-bind connections.
pub struct Endpoint {
    pub url: String,
    pub transport: Transport,
    /// Our own TLS configuration when `ca_file` is set; `None` uses ldap3's (the system's
    /// trusted CAs, through rustls-native-certs, with the process's ring provider).
    pub tls: Option<Arc<ClientConfig>>,
    pub ca_file: Option<String>,
    pub host: String,
    pub connect_timeout: Duration,
    pub timeout: Duration,
}

impl Endpoint {
    /// Opens a connection and runs its driver task. The connect timeout covers TCP, StartTLS
    /// and the TLS handshake together.
    pub async fn connect(&self) -> Result<Ldap, IdpError> {
        let started = std::time::Instant::now();
        let tcp = self.tcp().await?;
        let remaining = self.connect_timeout.saturating_sub(started.elapsed());
        let mut settings = LdapConnSettings::new()
            .set_conn_timeout(remaining.max(Duration::from_millis(1)))
            .set_starttls(self.transport == Transport::StartTls)
            .set_std_stream(ldap3::StdStream::Tcp(tcp));
        if let Some(config) = &self.tls {
            settings = settings.set_config(config.clone());
        }
        let (conn, ldap) = LdapConnAsync::with_settings(settings, &self.url)
            .await
            .map_err(|e| self.connect_error(e))?;
        let url = self.url.clone();
        tokio::spawn(async move {
            if let Err(e) = conn.drive().await {
                tracing::debug!(%url, error = %e, "LDAP connection ended");
            }
        });
        Ok(ldap)
    }

    /// The TCP connection, opened here rather than by ldap3 so that it is NODELAY: LDAP sends a
    /// small request and waits for its answer, and with Nagle's algorithm on, a request written
    /// in two pieces waits for the server's delayed ACK (~40 ms on Linux) — measured as 48 ms
    /// per sign-in instead of 8.
    async fn tcp(&self) -> Result<std::net::TcpStream, IdpError> {
        let url = reqwest::Url::parse(&self.url)
            .map_err(|e| IdpError::Misconfigured(format!("{}: {e}", self.url)))?;
        let port = url.port().unwrap_or(match self.transport {
            Transport::Ldaps => 636,
            _ => 389,
        });
        let host = self.host.trim_start_matches('[').trim_end_matches(']');
        let connect = tokio::net::TcpStream::connect((host, port));
        let stream = match tokio::time::timeout(self.connect_timeout, connect).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                return Err(IdpError::Unreachable(format!(
                    "{}: connecting: {e}",
                    self.url
                )));
            }
            Err(_) => {
                return Err(IdpError::Unreachable(format!(
                    "{}: no connection within {} s",
                    self.url,
                    self.connect_timeout.as_secs()
                )));
            }
        };
        let unreachable = |e: io::Error| IdpError::Unreachable(format!("{}: {e}", self.url));
        stream.set_nodelay(true).map_err(unreachable)?;
        stream.into_std().map_err(unreachable)
    }

    /// What `trustbroker idp test` says about how it connected.
    pub fn describe(&self) -> String {
        let verified = match &self.ca_file {
            Some(file) => format!("the server's certificate verified against ca_file {file}"),
            None => "the server's certificate verified against the system's trusted CAs".into(),
        };
        match self.transport {
            Transport::Ldaps => format!("connected to {} (LDAPS; {verified})", self.url),
            Transport::StartTls => format!("connected to {} (StartTLS; {verified})", self.url),
            Transport::Plain => format!(
                "connected to {} WITHOUT TLS (starttls = false, loopback only)",
                self.url
            ),
        }
    }

    fn connect_error(&self, e: LdapError) -> IdpError {
        match e {
            LdapError::Timeout { .. } => IdpError::Unreachable(format!(
                "{}: no connection within {} s",
                self.url,
                self.connect_timeout.as_secs()
            )),
            // The only operation during connect is StartTLS: a result code here is its refusal.
            LdapError::LdapResult { result } => IdpError::Tls(format!(
                "{} refused StartTLS: {}",
                self.url,
                result_text(&result)
            )),
            other => self.transport_error("connecting", other),
        }
    }

    /// An operation's failure to complete: the connection broke, timed out or spoke nonsense.
    /// (Result codes the server sent are the caller's to read, not errors here.)
    pub fn transport_error(&self, doing: &str, e: LdapError) -> IdpError {
        match e {
            LdapError::Timeout { .. } => IdpError::Unreachable(format!(
                "{}: no answer while {doing} within {} s",
                self.url,
                self.timeout.as_secs()
            )),
            LdapError::Io { source } => match tls_cause(&source) {
                Some(tls) => {
                    IdpError::Tls(format!("{}: {}", self.url, describe_tls(tls, &self.host)))
                }
                None => IdpError::Unreachable(format!("{}: {doing}: {source}", self.url)),
            },
            LdapError::Rustls { source } => IdpError::Tls(format!(
                "{}: {}",
                self.url,
                describe_tls(&source, &self.host)
            )),
            LdapError::DNSName { .. } => IdpError::Tls(format!(
                "{}: {} cannot be checked against a certificate (not a DNS name or IP address)",
                self.url, self.host
            )),
            LdapError::OpSend { .. }
            | LdapError::ResultRecv { .. }
            | LdapError::IdScrubSend { .. }
            | LdapError::MiscSend { .. }
            | LdapError::EndOfStream => {
                IdpError::Unreachable(format!("{}: the connection closed while {doing}", self.url))
            }
            LdapError::UrlParsing { .. } | LdapError::UnknownScheme(_) => {
                IdpError::Misconfigured(format!("{}: {e}", self.url))
            }
            other => IdpError::Protocol(format!("{}: {doing}: {other}", self.url)),
        }
    }
}

/// A rustls client configuration trusting exactly the certificates in `path` (PEM).
pub fn tls_config(path: &Path) -> Result<Arc<ClientConfig>, IdpError> {
    let shown = path.display();
    let bad = |what: String| IdpError::Misconfigured(format!("ca_file {shown}: {what}"));
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(path)
        .map_err(|e| bad(e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("holds no PEM certificate".into()));
    }
    let mut roots = RootCertStore::empty();
    for cert in certs {
        roots.add(cert).map_err(|e| bad(e.to_string()))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// tokio-rustls reports handshake failures as an I/O error wrapping the rustls error.
fn tls_cause(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref()?.downcast_ref::<rustls::Error>()
}

/// A TLS failure as the operator needs to read it: which check failed and what to do.
pub fn describe_tls(e: &rustls::Error, host: &str) -> String {
    match e {
        rustls::Error::InvalidCertificate(cert) => match cert {
            CertificateError::UnknownIssuer => "the server's certificate is signed by an unknown \
                CA (set ca_file to the CA that issued it)"
                .into(),
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. } => {
                format!("the server's certificate is not valid for the host name {host}")
            }
            CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
                "the server's certificate has expired".into()
            }
            other => format!("the server's certificate was refused: {other:?}"),
        },
        rustls::Error::AlertReceived(alert) => {
            format!("the server ended the TLS handshake ({alert:?})")
        }
        other => format!("TLS handshake failed: {other} (is this the right port for the scheme?)"),
    }
}

/// An LDAP result code with its name and the server's text.
pub fn result_text(result: &LdapResult) -> String {
    let name = match result.rc {
        1 => "operationsError",
        2 => "protocolError",
        3 => "timeLimitExceeded",
        4 => "sizeLimitExceeded",
        7 => "authMethodNotSupported",
        8 => "strongerAuthRequired",
        10 => "referral",
        13 => "confidentialityRequired",
        19 => "constraintViolation",
        32 => "noSuchObject",
        34 => "invalidDNSyntax",
        48 => "inappropriateAuthentication",
        49 => "invalidCredentials",
        50 => "insufficientAccessRights",
        51 => "busy",
        52 => "unavailable",
        53 => "unwillingToPerform",
        _ => "",
    };
    let mut text = format!("result code {}", result.rc);
    if !name.is_empty() {
        text.push_str(&format!(" ({name})"));
    }
    if !result.text.is_empty() {
        text.push_str(&format!(": {}", result.text));
    }
    text
}

/// A search result entry: ldap3's `SearchEntry::construct` panics on malformed input and on
/// referrals, so entries are read here, skipping what is not an entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub dn: String,
    attrs: Vec<(String, Vec<Vec<u8>>)>,
}

impl Entry {
    /// `None` for referrals, intermediate responses and anything malformed.
    pub fn read(entry: ResultEntry) -> Option<Entry> {
        if entry.is_ref() || entry.is_intermediate() {
            return None;
        }
        Self::from_tag(entry.0)
    }

    fn from_tag(tag: StructureTag) -> Option<Entry> {
        let mut parts = tag.match_id(4)?.expect_constructed()?.into_iter();
        let dn = String::from_utf8(parts.next()?.expect_primitive()?).ok()?;
        let mut attrs = Vec::new();
        for attr in parts.next()?.expect_constructed()? {
            let mut attr = attr.expect_constructed()?.into_iter();
            let name = String::from_utf8(attr.next()?.expect_primitive()?).ok()?;
            let values = attr
                .next()?
                .expect_constructed()?
                .into_iter()
                .map(|v| v.expect_primitive())
                .collect::<Option<Vec<_>>>()?;
            attrs.push((name, values));
        }
        Some(Entry { dn, attrs })
    }

    #[cfg(test)]
    pub fn new(dn: &str, attrs: &[(&str, &[&[u8]])]) -> Entry {
        Entry {
            dn: dn.into(),
            attrs: attrs
                .iter()
                .map(|(n, vs)| (n.to_string(), vs.iter().map(|v| v.to_vec()).collect()))
                .collect(),
        }
    }

    /// The values of an attribute; names compare case-insensitively, as LDAP's do.
    pub fn values(&self, name: &str) -> impl Iterator<Item = &[u8]> {
        self.attrs
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .flat_map(|(_, vs)| vs.iter().map(Vec::as_slice))
    }

    /// The first value that is UTF-8 text and not blank.
    pub fn text(&self, name: &str) -> Option<String> {
        self.texts(name).into_iter().next()
    }

    /// The values that are UTF-8 text and not blank.
    pub fn texts(&self, name: &str) -> Vec<String> {
        self.values(name)
            .filter_map(|v| std::str::from_utf8(v).ok())
            .filter(|v| !v.trim().is_empty())
            .map(str::to_string)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_failures_say_which_check_failed() {
        let unknown = rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer);
        assert_eq!(
            describe_tls(&unknown, "ldap.example.org"),
            "the server's certificate is signed by an unknown CA (set ca_file to the CA that issued it)"
        );
        let name = rustls::Error::InvalidCertificate(CertificateError::NotValidForName);
        assert_eq!(
            describe_tls(&name, "ldap.example.org"),
            "the server's certificate is not valid for the host name ldap.example.org"
        );
        let expired = rustls::Error::InvalidCertificate(CertificateError::Expired);
        assert_eq!(
            describe_tls(&expired, "h"),
            "the server's certificate has expired"
        );
        // tokio-rustls wraps the rustls error in an io::Error; it is found there.
        let wrapped = io::Error::new(io::ErrorKind::InvalidData, unknown.clone());
        assert_eq!(tls_cause(&wrapped), Some(&unknown));
        assert_eq!(
            tls_cause(&io::Error::from(io::ErrorKind::ConnectionRefused)),
            None
        );
    }

    #[test]
    fn attribute_names_compare_case_insensitively() {
        let e = Entry::new(
            "uid=bob,ou=people",
            &[
                ("memberOf", &[b"cn=a", b"cn=b"]),
                ("mail", &[b"  ", b"bob@example.org"]),
                ("objectGUID", &[&[0xff, 0x00]]),
            ],
        );
        assert_eq!(e.texts("MEMBEROF"), ["cn=a", "cn=b"]);
        assert_eq!(e.text("mail").as_deref(), Some("bob@example.org"));
        assert_eq!(e.text("objectguid"), None);
        assert_eq!(e.values("objectguid").next(), Some(&[0xff, 0x00][..]));
        assert_eq!(e.text("absent"), None);
    }

    #[test]
    fn result_codes_are_named() {
        let r = LdapResult {
            rc: 49,
            matched: String::new(),
            text: String::new(),
            refs: vec![],
            ctrls: vec![],
        };
        assert_eq!(result_text(&r), "result code 49 (invalidCredentials)");
    }
}
