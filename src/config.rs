//! Configuration: command-line flags, then `TRUSTBROKER_*` environment variables, then the TOML
//! file named by `--config`, then built-in defaults; validated once into a runtime [`Config`].
//!
//! Every setting exists in all three forms. clap reads a flag or its environment variable;
//! when neither is given the file's value applies, and only then the default. Unknown keys in
//! the file are an error, so a typo never silently leaves a default in place.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, ValueEnum};
use serde::Deserialize;

use crate::identity::{ProviderSettings, valid_provider_name};
use crate::store::ScimMatch;

pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 9443);
pub const DEFAULT_DATA_DIR: &str = "trustbroker-data";
pub const DEFAULT_MAX_BODY_BYTES: usize = 2 * 1024 * 1024;
pub const DEFAULT_REQUEST_TIMEOUT_SECS: u64 = 30;
pub const DEFAULT_SHUTDOWN_GRACE_SECS: u64 = 20;
/// The pool size for PostgreSQL when none is set.
pub const DEFAULT_POSTGRES_MAX_CONNECTIONS: u32 = 10;

/// The pool size for SQLite when none is set: two connections per core, 4 to 16. Each one runs
/// its queries on a thread of its own with a page cache of its own, and costs ~3.7 MiB with
/// 100,000 enrollments; SQLite writes one at a time, so connections beyond what the cores can
/// run buy nothing (10 → 4 on 2 cores: 22 MiB less, SCEP and Idle rates unchanged).
pub fn default_sqlite_max_connections() -> u32 {
    let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
    u32::try_from(cores.saturating_mul(2)).map_or(16, |n| n.clamp(4, 16))
}

pub const DEFAULT_SCEP_PATH: &str = "/scep";
pub const DEFAULT_APNS_URL: &str = "https://api.push.apple.com";
pub const DEFAULT_CHALLENGE_TTL_SECS: u64 = 3600;
pub const DEFAULT_CERT_VALIDITY_DAYS: u32 = 365;
/// How long a renewed certificate stays good after its renewal: 4 hours. Long enough for a
/// client to install the new identity, reconnect with it, and retry a renewal whose reply was
/// lost (a retry gets the same new certificate, signed by the old one); short enough that a
/// stolen key gains at most these hours from the certificate it renews.
pub const DEFAULT_SCEP_RENEWAL_OVERLAP_SECS: u64 = 4 * 3600;
/// The longest renewal overlap accepted: a week.
const MAX_SCEP_RENEWAL_OVERLAP_SECS: u64 = 7 * 86_400;
pub const DEFAULT_CA_KEY_BITS: usize = 2048;
pub const DEFAULT_CA_COMMON_NAME: &str = "trustbroker device CA";
pub const DEFAULT_ORGANIZATION: &str = "trustbroker";
pub const DEFAULT_PORTAL_SESSION_TTL_SECS: u64 = 900;
pub const DEFAULT_MAX_UNREDEEMED_PROFILES: u32 = 5;
pub const DEFAULT_UNREDEEMED_WINDOW_SECS: u64 = 3600;

/// The key of a CA that trustbroker creates (`ca_key_algorithm`). An existing CA keeps its key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum CaKeyAlgorithm {
    /// RSA of `ca_key_bits` bits.
    #[default]
    Rsa,
    /// ECDSA on P-256, signing with SHA-256. SCEP key transport is RSA, so an RSA RA receives the
    /// envelopes and signs the replies; the CA only signs certificates.
    EcdsaP256,
}

impl CaKeyAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            CaKeyAlgorithm::Rsa => "rsa",
            CaKeyAlgorithm::EcdsaP256 => "ecdsa-p256",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// What an Authenticate from a device already enrolled under another, still active enrollment
/// record may do (`[mdm] reenrollment`). A device whose enrollment an admin retired may always
/// enroll again.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ReenrollmentPolicy {
    /// Apple's semantics: the new enrollment replaces the old one.
    #[default]
    Allow,
    /// Only when the new record was issued to the device's current owner.
    SameOwner,
    /// Never: an admin retires the old enrollment first.
    Deny,
}

impl ReenrollmentPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            ReenrollmentPolicy::Allow => "allow",
            ReenrollmentPolicy::SameOwner => "same-owner",
            ReenrollmentPolicy::Deny => "deny",
        }
    }
}

/// Settings as given on the command line or in the environment (all optional).
#[derive(Args, Clone, Debug, Default)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, env = "TRUSTBROKER_CONFIG", global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Where the SQLite database, generated keys and certificates live [default: ./trustbroker-data].
    #[arg(long, env = "TRUSTBROKER_DATA_DIR", global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// PostgreSQL URL (postgres://…); without it the embedded SQLite database is used.
    #[arg(long, env = "DATABASE_URL", global = true, value_name = "URL")]
    pub database_url: Option<String>,
    /// Connections in the database pool [default: 10].
    #[arg(
        long,
        env = "TRUSTBROKER_DB_MAX_CONNECTIONS",
        global = true,
        value_name = "N"
    )]
    pub db_max_connections: Option<u32>,
    /// HTTPS listener [default: 127.0.0.1:9443].
    #[arg(
        long,
        env = "TRUSTBROKER_LISTEN",
        global = true,
        value_name = "ADDR:PORT"
    )]
    pub listen: Option<SocketAddr>,
    /// Additional plain-HTTP listener, for deployments behind a TLS-terminating proxy.
    #[arg(
        long,
        env = "TRUSTBROKER_HTTP_LISTEN",
        global = true,
        value_name = "ADDR:PORT"
    )]
    pub http_listen: Option<SocketAddr>,
    /// Base URL that profiles, redirects and metadata use [default: https://<listen>].
    #[arg(
        long,
        env = "TRUSTBROKER_PUBLIC_URL",
        global = true,
        value_name = "URL"
    )]
    pub public_url: Option<String>,
    /// TLS certificate chain (PEM); without it a development certificate is generated.
    #[arg(long, env = "TRUSTBROKER_TLS_CERT", global = true, value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// TLS private key (PEM), with --tls-cert.
    #[arg(long, env = "TRUSTBROKER_TLS_KEY", global = true, value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// Log format [default: human].
    #[arg(long, env = "TRUSTBROKER_LOG_FORMAT", global = true, value_enum)]
    pub log_format: Option<LogFormat>,
    /// Log filter, e.g. "info" or "trustbroker=debug,info" [default: info].
    #[arg(long, env = "TRUSTBROKER_LOG", global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Largest request body accepted, in bytes [default: 2097152].
    #[arg(
        long,
        env = "TRUSTBROKER_MAX_BODY_BYTES",
        global = true,
        value_name = "BYTES"
    )]
    pub max_body_bytes: Option<usize>,
    /// Seconds a request may take before it is answered 408 [default: 30].
    #[arg(
        long,
        env = "TRUSTBROKER_REQUEST_TIMEOUT_SECS",
        global = true,
        value_name = "SECS"
    )]
    pub request_timeout_secs: Option<u64>,
    /// Seconds open connections get to finish after SIGTERM/SIGINT [default: 20].
    #[arg(
        long,
        env = "TRUSTBROKER_SHUTDOWN_GRACE_SECS",
        global = true,
        value_name = "SECS"
    )]
    pub shutdown_grace_secs: Option<u64>,
    /// File holding the master key for secrets at rest [default: <data-dir>/secret.key,
    /// generated]. The key itself may instead be given in TRUSTBROKER_SECRET_KEY.
    #[arg(
        long,
        env = "TRUSTBROKER_SECRET_KEY_FILE",
        global = true,
        value_name = "FILE"
    )]
    pub secret_key_file: Option<PathBuf>,
    /// Path of the SCEP endpoint [default: /scep].
    #[arg(
        long,
        env = "TRUSTBROKER_SCEP_PATH",
        global = true,
        value_name = "PATH"
    )]
    pub scep_path: Option<String>,
    /// Base URL of the APNs provider API [default: https://api.push.apple.com].
    #[arg(long, env = "TRUSTBROKER_APNS_URL", global = true, value_name = "URL")]
    pub apns_url: Option<String>,
    /// An extra CA (PEM) to trust for the APNs endpoint, besides the public roots (a test
    /// stand-in or an egress proxy).
    #[arg(
        long,
        env = "TRUSTBROKER_APNS_CA_FILE",
        global = true,
        value_name = "FILE"
    )]
    pub apns_ca_file: Option<PathBuf>,
    /// Seconds a one-time SCEP challenge stays valid [default: 3600].
    #[arg(
        long,
        env = "TRUSTBROKER_SCEP_CHALLENGE_TTL_SECS",
        global = true,
        value_name = "SECS"
    )]
    pub scep_challenge_ttl_secs: Option<u64>,
    /// Validity of issued device certificates, in days [default: 365].
    #[arg(
        long,
        env = "TRUSTBROKER_CERT_VALIDITY_DAYS",
        global = true,
        value_name = "DAYS"
    )]
    pub cert_validity_days: Option<u32>,
    /// RSA key size of a CA created at first start: 2048, 3072 or 4096 [default: 2048].
    #[arg(
        long,
        env = "TRUSTBROKER_CA_KEY_BITS",
        global = true,
        value_name = "BITS"
    )]
    pub ca_key_bits: Option<usize>,
    /// Key of a CA created at first start: rsa or ecdsa-p256 (needs --scep-ra true: the RA's
    /// RSA key receives SCEP envelopes) [default: rsa]. An existing CA is never changed.
    #[arg(
        long,
        env = "TRUSTBROKER_CA_KEY_ALGORITHM",
        global = true,
        value_enum,
        value_name = "ALGORITHM"
    )]
    pub ca_key_algorithm: Option<CaKeyAlgorithm>,
    /// Common name of a CA created at first start [default: trustbroker device CA].
    #[arg(
        long,
        env = "TRUSTBROKER_CA_COMMON_NAME",
        global = true,
        value_name = "CN"
    )]
    pub ca_common_name: Option<String>,
    /// Organization (O) of the CA and of issued certificates [default: trustbroker].
    #[arg(
        long,
        env = "TRUSTBROKER_ORGANIZATION",
        global = true,
        value_name = "O"
    )]
    pub organization: Option<String>,
    /// Create a separate RA certificate with the CA (GetCACert then returns CA and RA).
    #[arg(long, env = "TRUSTBROKER_SCEP_RA", global = true)]
    pub scep_ra: Option<bool>,
    /// Whether a device enrolled under another active enrollment may enroll again: allow,
    /// same-owner or deny [default: allow] (`[mdm] reenrollment` in the file).
    #[arg(long, env = "TRUSTBROKER_MDM_REENROLLMENT", global = true, value_enum)]
    pub mdm_reenrollment: Option<ReenrollmentPolicy>,
    /// Seconds a certificate stays good after a RenewalReq replaced it [default: 14400].
    #[arg(
        long,
        env = "TRUSTBROKER_SCEP_RENEWAL_OVERLAP_SECS",
        global = true,
        value_name = "SECS"
    )]
    pub scep_renewal_overlap_secs: Option<u64>,
    /// Accept SCEP envelopes encrypted with single DES, for legacy clients (warned at start)
    /// [default: false].
    #[arg(long, env = "TRUSTBROKER_SCEP_ALLOW_SINGLE_DES", global = true)]
    pub scep_allow_single_des: Option<bool>,
    /// A policy directory applied at start when it differs from the applied set (`[policy]
    /// dir` in the file) [default: none: policies come from `policy apply`].
    #[arg(
        long = "policies",
        env = "TRUSTBROKER_POLICIES",
        global = true,
        value_name = "DIR"
    )]
    pub policy_dir: Option<PathBuf>,
    /// Reverse proxies (IPs or CIDR networks, comma-separated) whose report of the client's
    /// address is believed [default: none].
    #[arg(
        long,
        env = "TRUSTBROKER_TRUSTED_PROXIES",
        global = true,
        value_name = "NETS",
        value_delimiter = ','
    )]
    pub trusted_proxies: Option<Vec<String>>,
    /// The header those proxies report the client's address in: x-forwarded-for or forwarded
    /// [default: x-forwarded-for].
    #[arg(
        long,
        env = "TRUSTBROKER_CLIENT_ADDRESS_HEADER",
        global = true,
        value_enum
    )]
    pub client_address_header: Option<ClientAddressHeader>,
}

/// Which header a trusted proxy reports the client's address in. Exactly one is read: a proxy
/// that appends to one passes the other through untouched, so it would be the client's word.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAddressHeader {
    /// `X-Forwarded-For: client, proxy1, …` (nginx `$proxy_add_x_forwarded_for`, HAProxy
    /// `option forwardfor`, most load balancers).
    #[default]
    XForwardedFor,
    /// RFC 7239 `Forwarded: for=client, for=proxy1`.
    Forwarded,
}

/// Who may tell us the client's address, and how (see [`ClientAddressHeader`]).
#[derive(Clone, Debug, Default)]
pub struct ProxyConfig {
    pub trusted: Vec<ipnet::IpNet>,
    pub header: ClientAddressHeader,
}

/// The TOML file: the same settings under the same names (snake_case).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub data_dir: Option<PathBuf>,
    pub database_url: Option<String>,
    pub db_max_connections: Option<u32>,
    pub listen: Option<SocketAddr>,
    pub http_listen: Option<SocketAddr>,
    pub public_url: Option<String>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub log_format: Option<LogFormat>,
    pub log_level: Option<String>,
    pub max_body_bytes: Option<usize>,
    pub request_timeout_secs: Option<u64>,
    pub shutdown_grace_secs: Option<u64>,
    pub secret_key_file: Option<PathBuf>,
    pub scep_path: Option<String>,
    pub scep_challenge_ttl_secs: Option<u64>,
    pub apns_url: Option<String>,
    pub apns_ca_file: Option<PathBuf>,
    /// Seconds a device with commands waiting may stay silent before it is pushed again
    /// (0: never) [default: 900].
    pub apns_repush_after_secs: Option<u64>,
    pub cert_validity_days: Option<u32>,
    pub ca_key_bits: Option<usize>,
    pub ca_key_algorithm: Option<CaKeyAlgorithm>,
    pub ca_common_name: Option<String>,
    pub organization: Option<String>,
    pub scep_ra: Option<bool>,
    pub scep_renewal_overlap_secs: Option<u64>,
    pub scep_allow_single_des: Option<bool>,
    /// Reverse proxies whose `client_address_header` is believed (the portal's throttle keys
    /// on the address they report). Not `mdm.trusted_proxies`, which may vouch for devices.
    pub trusted_proxies: Option<Vec<String>>,
    pub client_address_header: Option<ClientAddressHeader>,
    /// A fixed SCEP challenge accepted besides the one-time ones (discouraged; warned at start).
    /// File or TRUSTBROKER_SCEP_STATIC_CHALLENGE only: never on a command line.
    pub scep_static_challenge: Option<String>,
    /// Other ways a device may prove its identity than `Mdm-Signature`, `[mdm]`.
    #[serde(default)]
    pub mdm: MdmIdentitySettings,
    /// Identity providers, `[idp.NAME]`, each with `type = "ldap" | "oidc" | "saml"`.
    #[serde(default)]
    pub idp: BTreeMap<String, IdpTable>,
    /// The enrollment portal, `[enroll]`.
    #[serde(default)]
    pub enroll: PortalSettings,
    /// Connection limits and timeouts of both listeners, `[server]`.
    #[serde(default)]
    pub server: ServerSettings,
    /// Caps on concurrent expensive requests and on unauthenticated audit writes, `[limits]`.
    #[serde(default)]
    pub limits: LimitSettings,
    /// Group-driven policy and its reconciler, `[policy]`.
    #[serde(default)]
    pub policy: PolicySettings,
    /// App-config tokens and their validation, `[tokens]`.
    #[serde(default)]
    pub tokens: TokenSettings,
    /// The admin console at `/admin`: who may sign in and with which scopes, `[admin]`.
    #[serde(default)]
    pub admin: crate::console::ConsoleSettings,
}

/// App-config tokens, `[tokens]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TokenSettings {
    /// Validations (`POST /validate/v1/tokens`) each app client may make per second, on each
    /// node; past it, 429 with Retry-After.
    pub validations_per_client_per_second: u32,
    /// How many a client may make at once above that rate (the token bucket's size).
    pub validation_burst: u32,
}

impl Default for TokenSettings {
    fn default() -> TokenSettings {
        TokenSettings {
            validations_per_client_per_second: 1000,
            validation_burst: 2000,
        }
    }
}

impl TokenSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=10_000_000).contains(&self.validations_per_client_per_second)
            || !(1..=10_000_000).contains(&self.validation_burst)
        {
            return Err(ConfigError::Invalid(
                "tokens.validations_per_client_per_second and tokens.validation_burst must be \
                 between 1 and 10000000"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// What a person whose account the directory disabled or deleted keeps on their devices.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AccountDisabledAction {
    /// Remove what policies installed (as if they left every group).
    #[default]
    Remove,
    /// Leave everything in place.
    Keep,
}

/// Group-driven policy, `[policy]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicySettings {
    /// A policy directory applied at start when it differs from the applied set.
    pub dir: Option<PathBuf>,
    /// Whether that start-time apply may contain locks and wipes (else it is refused and the
    /// last applied set stays in force).
    pub allow_destructive: bool,
    /// Seconds between full passes over every device (the safety net under the triggers).
    pub full_pass_interval_secs: u64,
    /// Milliseconds between looks for reconcile requests other nodes recorded.
    pub poll_interval_ms: u64,
    /// What a disabled or deleted account's devices keep.
    pub on_account_disabled: AccountDisabledAction,
    /// Days before its identity certificate expires that a device is sent a new one.
    pub identity_renewal_days: u32,
    /// Seconds after which a device's report of its profiles and managed apps is stale and is
    /// asked for again (ProfileList, ManagedApplicationList), to find drift.
    pub inventory_max_age_secs: u64,
}

impl Default for PolicySettings {
    fn default() -> PolicySettings {
        PolicySettings {
            dir: None,
            allow_destructive: false,
            full_pass_interval_secs: 900,
            poll_interval_ms: 1000,
            on_account_disabled: AccountDisabledAction::Remove,
            identity_renewal_days: 30,
            inventory_max_age_secs: 86_400,
        }
    }
}

/// How devices may identify themselves besides a `Mdm-Signature` by a certificate of our CA.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MdmIdentitySettings {
    /// Ask for a TLS client certificate on the HTTPS listener (devices whose profile has
    /// `SignMessage` false present their identity there). Optional for every other client.
    pub tls_client_auth: Option<bool>,
    /// Addresses (IPs or CIDR networks) of TLS-terminating proxies whose certificate header is
    /// believed. Empty: the header is never read.
    pub trusted_proxies: Vec<String>,
    /// The header such a proxy puts the device's certificate in: URL-encoded PEM (nginx's
    /// `$ssl_client_escaped_cert`), PEM, or base64 DER.
    pub client_cert_header: Option<String>,
    /// CA certificates (PEM files) of another MDM whose devices are migrating here: certificates
    /// they issued are accepted as device identities (and recorded on first sight).
    pub migrated_ca_files: Vec<PathBuf>,
    /// Whether a device enrolled under another active enrollment may enroll again.
    pub reenrollment: Option<ReenrollmentPolicy>,
}

/// The validated form of [`MdmIdentitySettings`].
#[derive(Clone, Debug)]
pub struct MdmIdentityConfig {
    pub tls_client_auth: bool,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub client_cert_header: Option<axum::http::HeaderName>,
    pub migrated_ca_files: Vec<PathBuf>,
}

/// The enrollment portal's settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PortalSettings {
    /// When not empty, only members of one of these groups (by id or name) may enroll.
    pub allowed_groups: Vec<String>,
    /// How long a portal sign-in lasts, in seconds.
    pub session_ttl_secs: u64,
    /// Profiles a person may hold that no device has used yet, downloaded within
    /// `unredeemed_window_secs`; past it, downloads get 429.
    pub max_unredeemed_profiles: u32,
    pub unredeemed_window_secs: u64,
}

impl Default for PortalSettings {
    fn default() -> PortalSettings {
        PortalSettings {
            allowed_groups: Vec::new(),
            session_ttl_secs: DEFAULT_PORTAL_SESSION_TTL_SECS,
            max_unredeemed_profiles: DEFAULT_MAX_UNREDEEMED_PROFILES,
            unredeemed_window_secs: DEFAULT_UNREDEEMED_WINDOW_SECS,
        }
    }
}

/// How connections are bounded, on each listener (HTTPS and plain HTTP alike).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerSettings {
    /// Connections open at once per listener; more are accepted and closed at once.
    pub max_connections: usize,
    /// Seconds a client gets to finish the TLS handshake.
    pub handshake_timeout_secs: u64,
    /// Seconds from the end of the handshake (or from accept, without TLS) until the first
    /// request's headers are in: covers the HTTP/1-vs-HTTP/2 preface too.
    pub first_request_timeout_secs: u64,
    /// Seconds a connection may stay open with no request in flight (HTTP/1 keep-alive and
    /// HTTP/2 alike); also bounds the time to read one request's headers.
    pub idle_timeout_secs: u64,
    /// Seconds between HTTP/2 PINGs the server sends to check that the peer is alive.
    pub http2_keep_alive_interval_secs: u64,
    /// Seconds to wait for a PING's answer before closing the connection.
    pub http2_keep_alive_timeout_secs: u64,
    /// Concurrent streams (requests) per HTTP/2 connection.
    pub http2_max_concurrent_streams: u32,
    /// Largest request head (request line and headers; HTTP/2's decoded header list).
    pub max_header_bytes: usize,
    /// Connections the kernel queues for each listener before they are accepted (capped by
    /// the system's `net.core.somaxconn`).
    pub listen_backlog: u32,
}

pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;

impl Default for ServerSettings {
    fn default() -> ServerSettings {
        ServerSettings {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout_secs: 10,
            first_request_timeout_secs: 10,
            idle_timeout_secs: 60,
            http2_keep_alive_interval_secs: 20,
            http2_keep_alive_timeout_secs: 10,
            http2_max_concurrent_streams: 100,
            max_header_bytes: 32 * 1024,
            listen_backlog: 1024,
        }
    }
}

impl ServerSettings {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
    pub fn first_request_timeout(&self) -> Duration {
        Duration::from_secs(self.first_request_timeout_secs)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: &str| Err(ConfigError::Invalid(format!("server.{m}")));
        if !(1..=1_000_000).contains(&self.max_connections) {
            return invalid("max_connections must be between 1 and 1000000");
        }
        for (name, value) in [
            ("handshake_timeout_secs", self.handshake_timeout_secs),
            (
                "first_request_timeout_secs",
                self.first_request_timeout_secs,
            ),
            ("idle_timeout_secs", self.idle_timeout_secs),
            (
                "http2_keep_alive_interval_secs",
                self.http2_keep_alive_interval_secs,
            ),
            (
                "http2_keep_alive_timeout_secs",
                self.http2_keep_alive_timeout_secs,
            ),
        ] {
            if !(1..=3600).contains(&value) {
                return invalid(&format!("{name} must be between 1 and 3600"));
            }
        }
        if !(1..=10_000).contains(&self.http2_max_concurrent_streams) {
            return invalid("http2_max_concurrent_streams must be between 1 and 10000");
        }
        if !(1..=65_535).contains(&self.listen_backlog) {
            return invalid("listen_backlog must be between 1 and 65535");
        }
        // hyper's HTTP/1 read buffer cannot be smaller than 8 KiB.
        if !(8192..=1024 * 1024).contains(&self.max_header_bytes) {
            return invalid("max_header_bytes must be between 8192 and 1048576");
        }
        Ok(())
    }
}

/// Caps on expensive work an unauthenticated caller can start, `[limits]`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitSettings {
    /// SCEP PKIOperations in flight (GET and POST); GetCACert/GetCACaps are not counted.
    pub scep: usize,
    /// MDM check-in and command-channel requests in flight, together.
    pub mdm: usize,
    /// SAML Responses being verified (POST /auth/saml/NAME/acs).
    pub saml_acs: usize,
    /// OIDC callbacks in flight (each a token request to the provider).
    pub oidc_callback: usize,
    /// Portal LDAP password sign-ins in flight (each binds to the directory).
    pub ldap_sign_in: usize,
    /// How long a request over its cap waits for a permit before the 503, in milliseconds
    /// (0: refused at once).
    pub wait_ms: u64,
    /// `Retry-After` of the 503 a request over its cap gets, in seconds.
    pub retry_after_secs: u64,
    /// Audit records of refused admin keys written per minute, in all.
    pub unauthenticated_audit_per_minute: u32,
    /// The same, per source address.
    pub unauthenticated_audit_per_source_per_minute: u32,
}

impl Default for LimitSettings {
    fn default() -> LimitSettings {
        LimitSettings {
            scep: 64,
            mdm: 128,
            saml_acs: 16,
            oidc_callback: 32,
            ldap_sign_in: 16,
            wait_ms: 250,
            retry_after_secs: 5,
            unauthenticated_audit_per_minute: 120,
            unauthenticated_audit_per_source_per_minute: 20,
        }
    }
}

impl LimitSettings {
    fn validate(&self) -> Result<(), ConfigError> {
        for (name, value) in [
            ("scep", self.scep),
            ("mdm", self.mdm),
            ("saml_acs", self.saml_acs),
            ("oidc_callback", self.oidc_callback),
            ("ldap_sign_in", self.ldap_sign_in),
        ] {
            if !(1..=100_000).contains(&value) {
                return Err(ConfigError::Invalid(format!(
                    "limits.{name} must be between 1 and 100000"
                )));
            }
        }
        if self.wait_ms > 10_000 {
            return Err(ConfigError::Invalid(
                "limits.wait_ms must be between 0 and 10000".into(),
            ));
        }
        if !(1..=3600).contains(&self.retry_after_secs) {
            return Err(ConfigError::Invalid(
                "limits.retry_after_secs must be between 1 and 3600".into(),
            ));
        }
        if self.unauthenticated_audit_per_source_per_minute > self.unauthenticated_audit_per_minute
        {
            return Err(ConfigError::Invalid(
                "limits.unauthenticated_audit_per_source_per_minute cannot exceed \
                 limits.unauthenticated_audit_per_minute"
                    .into(),
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
}

/// Where the database lives.
#[derive(Clone)]
pub enum Database {
    Sqlite { path: PathBuf },
    Postgres { url: String },
}

impl fmt::Debug for Database {
    // The URL may carry a password: show only what identifies the server.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Database::Sqlite { path } => write!(f, "sqlite:{}", path.display()),
            Database::Postgres { url } => write!(f, "{}", redact_url(url)),
        }
    }
}

/// Where the HTTPS certificate comes from.
#[derive(Clone, Debug)]
pub enum TlsSource {
    /// Operator-supplied PEM files.
    Files { cert: PathBuf, key: PathBuf },
    /// A development certificate generated (once) into the data directory.
    Generated,
}

/// A secret from configuration: never printed.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(****)")
    }
}

/// Where the master key for secrets at rest comes from.
#[derive(Clone, Debug)]
pub enum SecretKeySource {
    /// The key itself, from TRUSTBROKER_SECRET_KEY.
    Value(Secret),
    /// A key file (generated when missing).
    File(PathBuf),
}

/// The CA and SCEP settings.
#[derive(Clone, Debug)]
pub struct PkiConfig {
    pub scep_path: String,
    pub challenge_ttl: Duration,
    pub static_challenge: Option<Secret>,
    pub cert_validity_days: u32,
    pub ca_key_bits: usize,
    /// The key of a CA created at first start (an existing CA keeps its own).
    pub ca_key_algorithm: CaKeyAlgorithm,
    pub ca_common_name: String,
    pub organization: String,
    pub with_ra: bool,
    /// How long a certificate stays good after a renewal replaced it.
    pub renewal_overlap: Duration,
    /// Whether SCEP envelopes in single DES are accepted.
    pub allow_single_des: bool,
}

/// Where APNs pushes go.
#[derive(Clone, Debug)]
pub struct ApnsConfig {
    /// Without a trailing slash.
    pub url: String,
    pub ca_file: Option<PathBuf>,
    /// A device with commands waiting that has not been heard from for this long is pushed
    /// again (then after twice as long, up to a day); `None`: never.
    pub repush_after: Option<Duration>,
}

/// The validated runtime configuration.
#[derive(Clone, Debug)]
pub struct Config {
    pub data_dir: PathBuf,
    pub database: Database,
    pub db_max_connections: u32,
    pub listen: SocketAddr,
    pub http_listen: Option<SocketAddr>,
    /// Without a trailing slash; `None` means "the HTTPS listener's address", which is only
    /// known once it is bound (see [`Config::public_url_for`]).
    pub public_url: Option<String>,
    pub tls: TlsSource,
    pub log_format: LogFormat,
    pub log_level: String,
    pub max_body_bytes: usize,
    pub request_timeout: Duration,
    pub shutdown_grace: Duration,
    pub secret_key: SecretKeySource,
    pub pki: PkiConfig,
    pub apns: ApnsConfig,
    pub mdm_identity: MdmIdentityConfig,
    pub mdm_reenrollment: ReenrollmentPolicy,
    /// Reverse proxies whose report of the client address is believed.
    pub proxies: ProxyConfig,
    /// The identity providers, by name, in name order.
    pub identity_providers: Vec<(String, ProviderSettings)>,
    /// How each provider's SCIM users are matched to its sign-ins (`scim_match`).
    pub scim_match: BTreeMap<String, ScimMatch>,
    pub portal: PortalSettings,
    pub server: ServerSettings,
    pub limits: LimitSettings,
    pub policy: PolicySettings,
    pub tokens: TokenSettings,
    /// The admin console (`[admin]`): group → scopes, session lifetimes.
    pub console: crate::console::ConsoleSettings,
}

/// One `[idp.NAME]` table: the provider's own settings (by `type`), plus how its SCIM users
/// are matched to its sign-ins (`scim_match = "external_id" | "user_name" | "email"`, default
/// `external_id`; see docs/scim.md).
#[derive(Clone, Debug, Deserialize)]
pub struct IdpTable {
    #[serde(default)]
    pub scim_match: ScimMatch,
    #[serde(flatten)]
    pub settings: ProviderSettings,
}

impl Config {
    /// How `provider`'s SCIM users are matched to its sign-ins (the default for a provider
    /// that is not configured, as a SCIM client made directly in the store may name).
    pub fn scim_match(&self, provider: &str) -> ScimMatch {
        self.scim_match.get(provider).copied().unwrap_or_default()
    }

    /// Reads the file named in `args` (if any) and merges it under `args`.
    pub fn load(args: &ConfigArgs) -> Result<Config, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let mut config = Config::merge(args.clone(), file)?;
        // Secrets are read from the environment directly: a flag would show them to `ps`.
        if let Ok(key) = std::env::var("TRUSTBROKER_SECRET_KEY")
            && !key.trim().is_empty()
        {
            config.secret_key = SecretKeySource::Value(Secret(key));
        }
        if let Ok(challenge) = std::env::var("TRUSTBROKER_SCEP_STATIC_CHALLENGE")
            && !challenge.is_empty()
        {
            config.pki.static_challenge = Some(Secret(challenge));
        }
        Ok(config)
    }

    pub fn merge(args: ConfigArgs, file: FileConfig) -> Result<Config, ConfigError> {
        let data_dir = args
            .data_dir
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let database = match args.database_url.or(file.database_url) {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                Database::Postgres { url }
            }
            Some(url) if url.starts_with("sqlite:") => Database::Sqlite {
                path: PathBuf::from(
                    url.trim_start_matches("sqlite://")
                        .trim_start_matches("sqlite:"),
                ),
            },
            Some(url) => {
                return Err(ConfigError::Invalid(format!(
                    "database_url must start with postgres:// or sqlite: (got '{}')",
                    redact_url(&url)
                )));
            }
            None => Database::Sqlite {
                path: data_dir.join("trustbroker.db"),
            },
        };
        let listen = args.listen.or(file.listen).unwrap_or(DEFAULT_LISTEN);
        let http_listen = args.http_listen.or(file.http_listen);
        let public_url = args
            .public_url
            .or(file.public_url)
            .map(|url| validate_public_url(&url))
            .transpose()?;
        let tls = match (
            args.tls_cert.or(file.tls_cert),
            args.tls_key.or(file.tls_key),
        ) {
            (Some(cert), Some(key)) => TlsSource::Files { cert, key },
            (None, None) => TlsSource::Generated,
            _ => {
                return Err(ConfigError::Invalid(
                    "tls_cert and tls_key must be given together".into(),
                ));
            }
        };
        let max_body_bytes = args
            .max_body_bytes
            .or(file.max_body_bytes)
            .unwrap_or(DEFAULT_MAX_BODY_BYTES);
        if max_body_bytes < 1024 {
            return Err(ConfigError::Invalid(
                "max_body_bytes must be at least 1024".into(),
            ));
        }
        let request_timeout_secs = args
            .request_timeout_secs
            .or(file.request_timeout_secs)
            .unwrap_or(DEFAULT_REQUEST_TIMEOUT_SECS);
        if request_timeout_secs == 0 {
            return Err(ConfigError::Invalid(
                "request_timeout_secs must be at least 1".into(),
            ));
        }
        let pki = PkiConfig {
            scep_path: validate_route_path(
                &args
                    .scep_path
                    .or(file.scep_path)
                    .unwrap_or_else(|| DEFAULT_SCEP_PATH.into()),
            )?,
            challenge_ttl: Duration::from_secs(
                args.scep_challenge_ttl_secs
                    .or(file.scep_challenge_ttl_secs)
                    .unwrap_or(DEFAULT_CHALLENGE_TTL_SECS)
                    .max(1),
            ),
            static_challenge: file.scep_static_challenge.map(Secret),
            cert_validity_days: args
                .cert_validity_days
                .or(file.cert_validity_days)
                .unwrap_or(DEFAULT_CERT_VALIDITY_DAYS),
            ca_key_bits: args
                .ca_key_bits
                .or(file.ca_key_bits)
                .unwrap_or(DEFAULT_CA_KEY_BITS),
            ca_key_algorithm: args
                .ca_key_algorithm
                .or(file.ca_key_algorithm)
                .unwrap_or_default(),
            ca_common_name: args
                .ca_common_name
                .or(file.ca_common_name)
                .unwrap_or_else(|| DEFAULT_CA_COMMON_NAME.into()),
            organization: args
                .organization
                .or(file.organization)
                .unwrap_or_else(|| DEFAULT_ORGANIZATION.into()),
            with_ra: args.scep_ra.or(file.scep_ra).unwrap_or(false),
            renewal_overlap: Duration::from_secs(
                args.scep_renewal_overlap_secs
                    .or(file.scep_renewal_overlap_secs)
                    .unwrap_or(DEFAULT_SCEP_RENEWAL_OVERLAP_SECS),
            ),
            allow_single_des: args
                .scep_allow_single_des
                .or(file.scep_allow_single_des)
                .unwrap_or(false),
        };
        let apns = ApnsConfig {
            url: validate_apns_url(
                &args
                    .apns_url
                    .or(file.apns_url)
                    .unwrap_or_else(|| DEFAULT_APNS_URL.into()),
            )?,
            ca_file: args.apns_ca_file.or(file.apns_ca_file),
            repush_after: match file.apns_repush_after_secs.unwrap_or(900) {
                0 => None,
                secs => Some(Duration::from_secs(secs)),
            },
        };
        if ![2048, 3072, 4096].contains(&pki.ca_key_bits) {
            return Err(ConfigError::Invalid(format!(
                "ca_key_bits must be 2048, 3072 or 4096 (got {})",
                pki.ca_key_bits
            )));
        }
        if pki.ca_key_algorithm == CaKeyAlgorithm::EcdsaP256 && !pki.with_ra {
            return Err(ConfigError::Invalid(
                "ca_key_algorithm = \"ecdsa-p256\" needs scep_ra = true (--scep-ra true, \
                 TRUSTBROKER_SCEP_RA=true): SCEP clients encrypt their requests to an RSA key, \
                 which the RA holds (the P-256 CA only signs certificates)"
                    .into(),
            ));
        }
        if !(1..=MAX_SCEP_RENEWAL_OVERLAP_SECS).contains(&pki.renewal_overlap.as_secs()) {
            return Err(ConfigError::Invalid(format!(
                "scep_renewal_overlap_secs must be between 1 and {MAX_SCEP_RENEWAL_OVERLAP_SECS}"
            )));
        }
        if !(1..=3650).contains(&pki.cert_validity_days) {
            return Err(ConfigError::Invalid(
                "cert_validity_days must be between 1 and 3650".into(),
            ));
        }
        let mdm_identity = validate_mdm_identity(&file.mdm)?;
        for name in file.idp.keys() {
            if !valid_provider_name(name) {
                return Err(ConfigError::Invalid(format!(
                    "identity provider name '{name}' may only use a-z, 0-9, '-' and '_' \
                     (it becomes part of the sign-in URLs)"
                )));
            }
        }
        if file.enroll.session_ttl_secs == 0 || file.enroll.session_ttl_secs > 86_400 {
            return Err(ConfigError::Invalid(
                "enroll.session_ttl_secs must be between 1 and 86400".into(),
            ));
        }
        file.server.validate()?;
        file.limits.validate()?;
        file.tokens.validate()?;
        file.admin.validate().map_err(ConfigError::Invalid)?;
        if !(1..=1000).contains(&file.enroll.max_unredeemed_profiles) {
            return Err(ConfigError::Invalid(
                "enroll.max_unredeemed_profiles must be between 1 and 1000".into(),
            ));
        }
        if !(60..=604_800).contains(&file.enroll.unredeemed_window_secs) {
            return Err(ConfigError::Invalid(
                "enroll.unredeemed_window_secs must be between 60 and 604800 (a week)".into(),
            ));
        }
        let proxies = ProxyConfig {
            trusted: parse_networks(
                "trusted_proxies",
                &args
                    .trusted_proxies
                    .or(file.trusted_proxies)
                    .unwrap_or_default(),
            )?,
            header: args
                .client_address_header
                .or(file.client_address_header)
                .unwrap_or_default(),
        };
        let secret_key = SecretKeySource::File(
            args.secret_key_file
                .or(file.secret_key_file)
                .unwrap_or_else(|| data_dir.join("secret.key")),
        );
        let db_max_connections = args
            .db_max_connections
            .or(file.db_max_connections)
            .unwrap_or_else(|| match &database {
                Database::Sqlite { .. } => default_sqlite_max_connections(),
                Database::Postgres { .. } => DEFAULT_POSTGRES_MAX_CONNECTIONS,
            });
        Ok(Config {
            data_dir,
            database,
            db_max_connections,
            listen,
            http_listen,
            public_url,
            tls,
            log_format: args
                .log_format
                .or(file.log_format)
                .unwrap_or(LogFormat::Human),
            log_level: args
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            max_body_bytes,
            request_timeout: Duration::from_secs(request_timeout_secs),
            shutdown_grace: Duration::from_secs(
                args.shutdown_grace_secs
                    .or(file.shutdown_grace_secs)
                    .unwrap_or(DEFAULT_SHUTDOWN_GRACE_SECS),
            ),
            secret_key,
            pki,
            apns,
            mdm_reenrollment: args
                .mdm_reenrollment
                .or(file.mdm.reenrollment)
                .unwrap_or_default(),
            mdm_identity,
            proxies,
            scim_match: file
                .idp
                .iter()
                .map(|(name, table)| (name.clone(), table.scim_match))
                .collect(),
            identity_providers: file
                .idp
                .into_iter()
                .map(|(name, table)| (name, table.settings))
                .collect(),
            portal: file.enroll,
            server: file.server,
            limits: file.limits,
            policy: PolicySettings {
                dir: args.policy_dir.or(file.policy.dir.clone()),
                ..file.policy
            },
            tokens: file.tokens,
            console: file.admin,
        })
    }

    /// The public URL, given the address the HTTPS listener was bound to.
    pub fn public_url_for(&self, https_addr: SocketAddr) -> String {
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("https://{}", host_port_for(https_addr)))
    }

    /// The host name of a configured public URL (for the development certificate's SANs).
    pub fn public_host(&self) -> Option<String> {
        let uri: axum::http::Uri = self.public_url.as_deref()?.parse().ok()?;
        uri.host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']').to_string())
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// A route path such as `/scep`: absolute, no trailing slash, no query, no parameters.
fn validate_route_path(path: &str) -> Result<String, ConfigError> {
    let ok = path.starts_with('/')
        && path.len() > 1
        && !path.ends_with('/')
        && path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.'));
    if ok {
        Ok(path.to_string())
    } else {
        Err(ConfigError::Invalid(format!(
            "'{path}' is not a route path: use something like /scep"
        )))
    }
}

/// `host:port` for a listener address; an unspecified address (0.0.0.0, ::) becomes `localhost`.
fn host_port_for(addr: SocketAddr) -> String {
    match addr.ip() {
        ip if ip.is_unspecified() => format!("localhost:{}", addr.port()),
        IpAddr::V6(ip) => format!("[{ip}]:{}", addr.port()),
        IpAddr::V4(ip) => format!("{ip}:{}", addr.port()),
    }
}

/// IP addresses or CIDR networks (`10.0.0.5`, `10.0.0.0/8`, `fd00::/8`), named in errors by
/// the setting they came from.
fn parse_networks(setting: &str, texts: &[String]) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    texts
        .iter()
        .map(|text| text.trim())
        .filter(|text| !text.is_empty())
        .map(|text| {
            text.parse::<ipnet::IpNet>()
                .map(|net| net.trunc())
                .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    ConfigError::Invalid(format!(
                        "{setting}: '{text}' is not an IP address or CIDR network"
                    ))
                })
        })
        .collect()
}

fn validate_mdm_identity(settings: &MdmIdentitySettings) -> Result<MdmIdentityConfig, ConfigError> {
    let trusted_proxies = settings
        .trusted_proxies
        .iter()
        .map(|text| {
            text.parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    ConfigError::Invalid(format!(
                        "mdm.trusted_proxies: '{text}' is not an IP address or CIDR network"
                    ))
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let client_cert_header = settings
        .client_cert_header
        .as_deref()
        .map(|name| {
            axum::http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| {
                ConfigError::Invalid(format!(
                    "mdm.client_cert_header: '{name}' is not a header name"
                ))
            })
        })
        .transpose()?;
    if client_cert_header.is_some() == trusted_proxies.is_empty() {
        return Err(ConfigError::Invalid(
            "mdm.client_cert_header and mdm.trusted_proxies go together: the header is only \
             believed from those proxies"
                .into(),
        ));
    }
    Ok(MdmIdentityConfig {
        tls_client_auth: settings.tls_client_auth.unwrap_or(true),
        trusted_proxies,
        client_cert_header,
        migrated_ca_files: settings.migrated_ca_files.clone(),
    })
}

fn validate_apns_url(url: &str) -> Result<String, ConfigError> {
    let trimmed = url.trim_end_matches('/');
    let uri: axum::http::Uri = trimmed
        .parse()
        .map_err(|e| ConfigError::Invalid(format!("apns_url '{url}' is not a URL: {e}")))?;
    if uri.scheme_str() != Some("https") || uri.host().is_none_or(str::is_empty) {
        return Err(ConfigError::Invalid(format!(
            "apns_url '{url}' must be https://host[:port]"
        )));
    }
    if !matches!(uri.path(), "" | "/") {
        return Err(ConfigError::Invalid(format!(
            "apns_url '{url}' must not have a path"
        )));
    }
    Ok(trimmed.to_owned())
}

fn validate_public_url(url: &str) -> Result<String, ConfigError> {
    let trimmed = url.trim_end_matches('/');
    let uri: axum::http::Uri = trimmed
        .parse()
        .map_err(|e| ConfigError::Invalid(format!("public_url '{url}' is not a URL: {e}")))?;
    match uri.scheme_str() {
        Some("https") | Some("http") => {}
        _ => {
            return Err(ConfigError::Invalid(format!(
                "public_url '{url}' must start with https:// or http://"
            )));
        }
    }
    if uri.host().is_none_or(str::is_empty) {
        return Err(ConfigError::Invalid(format!(
            "public_url '{url}' has no host"
        )));
    }
    if uri.query().is_some() {
        return Err(ConfigError::Invalid(format!(
            "public_url '{url}' must not carry a query"
        )));
    }
    Ok(trimmed.to_string())
}

/// `scheme://user:****@host/…`: a URL safe to log.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:****{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_key_algorithm_from_file_and_flag_and_needs_an_ra() {
        let default = Config::merge(ConfigArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(default.pki.ca_key_algorithm, CaKeyAlgorithm::Rsa);
        let file: FileConfig =
            toml::from_str("ca_key_algorithm = \"ecdsa-p256\"\nscep_ra = true").unwrap();
        let config = Config::merge(ConfigArgs::default(), file).unwrap();
        assert_eq!(config.pki.ca_key_algorithm, CaKeyAlgorithm::EcdsaP256);
        let file: FileConfig =
            toml::from_str("ca_key_algorithm = \"ecdsa-p256\"\nscep_ra = true").unwrap();
        let args = ConfigArgs {
            ca_key_algorithm: Some(CaKeyAlgorithm::Rsa),
            ..Default::default()
        };
        assert_eq!(
            Config::merge(args, file).unwrap().pki.ca_key_algorithm,
            CaKeyAlgorithm::Rsa
        );
        let file: FileConfig = toml::from_str("ca_key_algorithm = \"ecdsa-p256\"").unwrap();
        let err = Config::merge(ConfigArgs::default(), file).unwrap_err();
        assert!(err.to_string().contains("needs scep_ra = true"), "{err}");
        assert!(toml::from_str::<FileConfig>("ca_key_algorithm = \"ecdsa-p384\"").is_err());
    }

    #[test]
    fn reenrollment_policy_from_file_and_flag() {
        let file: FileConfig = toml::from_str("[mdm]\nreenrollment = \"same-owner\"").unwrap();
        let config = Config::merge(ConfigArgs::default(), file).unwrap();
        assert_eq!(config.mdm_reenrollment, ReenrollmentPolicy::SameOwner);
        let file: FileConfig = toml::from_str("[mdm]\nreenrollment = \"deny\"").unwrap();
        let args = ConfigArgs {
            mdm_reenrollment: Some(ReenrollmentPolicy::Allow),
            ..Default::default()
        };
        assert_eq!(
            Config::merge(args, file).unwrap().mdm_reenrollment,
            ReenrollmentPolicy::Allow
        );
        let default = Config::merge(ConfigArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(default.mdm_reenrollment, ReenrollmentPolicy::Allow);
        assert!(toml::from_str::<FileConfig>("[mdm]\nreenrollment = \"sometimes\"").is_err());
    }

    #[test]
    fn flags_override_file_and_file_overrides_defaults() {
        let file: FileConfig = toml::from_str(
            "listen = \"127.0.0.1:1000\"\nmax_body_bytes = 4096\npublic_url = \"https://mdm.example.org/\"",
        )
        .unwrap();
        let args = ConfigArgs {
            listen: Some("127.0.0.1:2000".parse().unwrap()),
            ..Default::default()
        };
        let config = Config::merge(args, file).unwrap();
        assert_eq!(config.listen.port(), 2000);
        assert_eq!(config.max_body_bytes, 4096);
        assert_eq!(
            config.public_url.as_deref(),
            Some("https://mdm.example.org")
        );
        assert_eq!(config.request_timeout, Duration::from_secs(30));
    }

    #[test]
    fn unknown_file_keys_are_refused() {
        let err = toml::from_str::<FileConfig>("lisen = \"127.0.0.1:1\"").unwrap_err();
        assert!(err.to_string().contains("unknown field"), "{err}");
    }

    #[test]
    fn public_url_defaults_to_the_https_listener() {
        let args = ConfigArgs {
            listen: Some("0.0.0.0:8443".parse().unwrap()),
            ..Default::default()
        };
        let config = Config::merge(args, FileConfig::default()).unwrap();
        assert_eq!(
            config.public_url_for("0.0.0.0:8443".parse().unwrap()),
            "https://localhost:8443"
        );
        assert_eq!(
            config.public_url_for("127.0.0.1:40000".parse().unwrap()),
            "https://127.0.0.1:40000"
        );
    }

    #[test]
    fn bad_settings_are_named_in_the_error() {
        for (args, needle) in [
            (
                ConfigArgs {
                    public_url: Some("ftp://x".into()),
                    ..Default::default()
                },
                "public_url",
            ),
            (
                ConfigArgs {
                    tls_cert: Some("c.pem".into()),
                    ..Default::default()
                },
                "tls_key",
            ),
            (
                ConfigArgs {
                    database_url: Some("mysql://x".into()),
                    ..Default::default()
                },
                "database_url",
            ),
            (
                ConfigArgs {
                    scep_renewal_overlap_secs: Some(0),
                    ..Default::default()
                },
                "scep_renewal_overlap_secs",
            ),
        ] {
            let err = Config::merge(args, FileConfig::default()).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
    }

    #[test]
    fn the_pool_size_defaults_by_database_and_can_be_set() {
        let sqlite = Config::merge(ConfigArgs::default(), FileConfig::default()).unwrap();
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get()) as u32;
        assert_eq!(sqlite.db_max_connections, (2 * cores).clamp(4, 16));
        let postgres: FileConfig =
            toml::from_str("database_url = \"postgres://db.example/trustbroker\"").unwrap();
        let postgres = Config::merge(ConfigArgs::default(), postgres).unwrap();
        assert_eq!(
            postgres.db_max_connections,
            DEFAULT_POSTGRES_MAX_CONNECTIONS
        );
        let set: FileConfig = toml::from_str("db_max_connections = 7").unwrap();
        assert_eq!(
            Config::merge(ConfigArgs::default(), set)
                .unwrap()
                .db_max_connections,
            7
        );
    }

    #[test]
    fn scep_settings_default_to_safe_values_and_read_from_the_file() {
        let config = Config::merge(ConfigArgs::default(), FileConfig::default()).unwrap();
        assert!(!config.pki.allow_single_des);
        assert_eq!(config.pki.renewal_overlap, Duration::from_secs(4 * 3600));
        let file: FileConfig =
            toml::from_str("scep_allow_single_des = true\nscep_renewal_overlap_secs = 600")
                .unwrap();
        let config = Config::merge(ConfigArgs::default(), file).unwrap();
        assert!(config.pki.allow_single_des);
        assert_eq!(config.pki.renewal_overlap, Duration::from_secs(600));
    }

    #[test]
    fn server_and_limits_tables_have_defaults_and_are_checked() {
        let config = Config::merge(ConfigArgs::default(), FileConfig::default()).unwrap();
        assert_eq!(config.server.max_connections, DEFAULT_MAX_CONNECTIONS);
        assert_eq!(
            config.server.first_request_timeout(),
            Duration::from_secs(10)
        );
        assert_eq!(config.limits.scep, 64);
        let file: FileConfig = toml::from_str(
            "[server]\nmax_connections = 50\nidle_timeout_secs = 5\n[limits]\nscep = 2\n",
        )
        .unwrap();
        let config = Config::merge(ConfigArgs::default(), file).unwrap();
        assert_eq!(config.server.max_connections, 50);
        assert_eq!(config.server.idle_timeout(), Duration::from_secs(5));
        assert_eq!(config.limits.scep, 2);
        for (text, needle) in [
            ("[server]\nmax_connections = 0\n", "server.max_connections"),
            (
                "[server]\nfirst_request_timeout_secs = 0\n",
                "first_request_timeout_secs",
            ),
            ("[server]\nmax_header_bytes = 100\n", "max_header_bytes"),
            ("[limits]\nmdm = 0\n", "limits.mdm"),
            ("[limits]\nwait_ms = 10001\n", "limits.wait_ms"),
            (
                "[limits]\nunauthenticated_audit_per_minute = 1\n",
                "per_source_per_minute",
            ),
        ] {
            let file: FileConfig = toml::from_str(text).unwrap();
            let err = Config::merge(ConfigArgs::default(), file).unwrap_err();
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
        assert!(toml::from_str::<FileConfig>("[server]\nmax_conections = 5\n").is_err());
    }

    #[test]
    fn database_passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://tb:secret@db:5432/tb"),
            "postgres://tb:****@db:5432/tb"
        );
        assert_eq!(redact_url("postgres://db/tb"), "postgres://db/tb");
    }

    #[test]
    fn trusted_proxies_and_portal_limits_are_read_and_checked() {
        let file: FileConfig = toml::from_str(
            "trusted_proxies = [\"10.0.0.5\", \"fd00::/8\"]\nclient_address_header = \"forwarded\"\n\
             [enroll]\nmax_unredeemed_profiles = 3\nunredeemed_window_secs = 600\n",
        )
        .unwrap();
        let config = Config::merge(ConfigArgs::default(), file).unwrap();
        assert_eq!(config.proxies.trusted.len(), 2);
        assert!(config.proxies.trusted[1].contains(&"fd00::1".parse::<IpAddr>().unwrap()));
        assert_eq!(config.proxies.header, ClientAddressHeader::Forwarded);
        assert_eq!(config.portal.max_unredeemed_profiles, 3);
        // Defaults: nobody trusted, X-Forwarded-For, 5 per hour.
        let config = Config::merge(ConfigArgs::default(), FileConfig::default()).unwrap();
        assert!(config.proxies.trusted.is_empty());
        assert_eq!(config.proxies.header, ClientAddressHeader::XForwardedFor);
        assert_eq!(config.portal.max_unredeemed_profiles, 5);
        assert_eq!(config.portal.unredeemed_window_secs, 3600);

        let args = ConfigArgs {
            trusted_proxies: Some(vec!["proxy.example.org".into()]),
            ..Default::default()
        };
        let err = Config::merge(args, FileConfig::default()).unwrap_err();
        assert!(err.to_string().contains("trusted_proxies"), "{err}");
        let file: FileConfig = toml::from_str("[enroll]\nmax_unredeemed_profiles = 0\n").unwrap();
        let err = Config::merge(ConfigArgs::default(), file).unwrap_err();
        assert!(err.to_string().contains("max_unredeemed_profiles"), "{err}");
    }

    #[test]
    fn scim_match_is_read_per_provider() {
        let file: FileConfig = toml::from_str(
            "[idp.okta]\ntype = \"oidc\"\nissuer = \"http://x\"\nclient_id = \"c\"\n\
             scim_match = \"user_name\"\n[idp.entra]\ntype = \"oidc\"\n\
             issuer = \"http://y\"\nclient_id = \"c\"\n",
        )
        .unwrap();
        let config = Config::merge(ConfigArgs::default(), file).unwrap();
        assert_eq!(config.scim_match("okta"), ScimMatch::UserName);
        assert_eq!(config.scim_match("entra"), ScimMatch::ExternalId);
        assert_eq!(config.scim_match("unconfigured"), ScimMatch::ExternalId);
        let wrong = toml::from_str::<FileConfig>(
            "[idp.x]\ntype = \"oidc\"\nissuer = \"http://x\"\nclient_id = \"c\"\n\
             scim_match = \"login\"\n",
        );
        assert!(wrong.is_err(), "an unknown scim_match is refused");
    }

    #[test]
    fn identity_providers_are_read_by_name_and_type() {
        let file: FileConfig = toml::from_str(
            r#"
            [idp.corp-ldap]
            type = "ldap"
            url = "ldap://127.0.0.1:3389"
            [idp.oidc]
            type = "oidc"
            issuer = "http://127.0.0.1:4444"
            client_id = "mdm-broker"
            "#,
        )
        .unwrap();
        let config = Config::merge(ConfigArgs::default(), file).unwrap();
        let kinds: Vec<_> = config
            .identity_providers
            .iter()
            .map(|(name, p)| (name.as_str(), p.kind()))
            .collect();
        assert_eq!(kinds, [("corp-ldap", "ldap"), ("oidc", "oidc")]);

        let unknown_type = toml::from_str::<FileConfig>("[idp.x]\ntype = \"kerberos\"\n");
        assert!(unknown_type.is_err());
        let misspelt = toml::from_str::<FileConfig>(
            "[idp.x]\ntype = \"oidc\"\nissuer = \"http://x\"\nclient_id = \"c\"\nclient_secrte = \"s\"\n",
        );
        assert!(misspelt.is_err(), "a misspelt provider key must be refused");
        let bad_name: FileConfig = toml::from_str(
            "[idp.\"Bad Name\"]\ntype = \"oidc\"\nissuer = \"http://x\"\nclient_id = \"c\"\n",
        )
        .unwrap();
        let err = Config::merge(ConfigArgs::default(), bad_name).unwrap_err();
        assert!(err.to_string().contains("Bad Name"), "{err}");
    }
}
