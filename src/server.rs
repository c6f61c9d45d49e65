//! Starting and stopping the server: data directory, database, TLS, listeners.
//!
//! Connections are accepted by hand (tokio + hyper-util) rather than through `axum::serve`, so
//! that the TLS handshake runs off the accept loop with its own timeout, each request learns
//! its peer address, and shutdown drains open connections for a bounded grace period.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::apple::apns::Pusher;
use crate::apple::enrollment::{ProfileService, ProfileSettings};
use crate::apple::identity::MigratedCas;
use crate::apple::service::MdmService;
use crate::config::{Config, Database, SecretKeySource, ServerSettings};
use crate::connections::{Activity, ListenerGate, connections_within_fd_limit, supervise};
use crate::enroll::session::CookiePolicy;
use crate::http::TlsClientCertificate;
use crate::http::{self, AppContext, AppState};
use crate::identity::IdentityProviders;
use crate::pki::ca::CertificateAuthority;
use crate::pki::service::ScepService;
use crate::policy::reconcile::Reconciler;
use crate::policy::{ActivePolicies, ReconcileWake};
use crate::secrets::MasterKey;
use crate::store::Store;
use crate::tokens::device::DeviceTokens;
use crate::{telemetry, tls};
use rustls::pki_types::CertificateDer;

/// A running server. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    pub https_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub public_url: String,
    pub tls_fingerprint: String,
    pub tls_cert_path: std::path::PathBuf,
    pub tls_generated: bool,
    pub store: Store,
    /// This node's policy reconciler (tests drive passes through it).
    pub reconciler: Reconciler,
    /// Shared app-config tokens (what the reconciler delivers, what apps validate against).
    pub tokens: crate::tokens::shared::TokenService,
    /// Per-device signed tokens (tests issue and revoke through it).
    pub device_tokens: DeviceTokens,
    /// This node's name in cluster leases.
    pub node: crate::cluster::NodeId,
    /// Every route as served (the OpenAPI coverage test walks its route table).
    pub router: axum::Router,
    stop: watch::Sender<bool>,
    listeners: JoinSet<()>,
    /// Tasks that stop with the server (the reconciler, group syncs).
    background: Vec<tokio::task::JoinHandle<()>>,
}

impl RunningServer {
    /// Stops accepting, lets open connections finish (within the grace period), closes the pool.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.listeners.join_next().await.is_some() {}
        for task in self.background {
            let _ = task.await;
        }
        self.store.close().await;
    }
}

/// Opens the configured database and brings its schema up to date.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
    let store = connect_store(config).await?;
    let applied = store.migrate().await.context("running migrations")?;
    if applied > 0 {
        tracing::info!(
            applied,
            backend = store.backend().as_str(),
            "database migrated"
        );
    }
    Ok(store)
}

/// Opens the configured database without touching its schema (`migrate --check`, `backup`).
pub async fn connect_store(config: &Config) -> anyhow::Result<Store> {
    let store = match &config.database {
        Database::Sqlite { path } => {
            crate::fsutil::create_private_dir(&config.data_dir)?;
            Store::open_sqlite(path, config.db_max_connections)
                .await
                .with_context(|| format!("opening SQLite database {}", path.display()))?
        }
        Database::Postgres { url } => Store::open_postgres(url, config.db_max_connections)
            .await
            .with_context(|| {
                format!(
                    "connecting to PostgreSQL at {}",
                    crate::config::redact_url(url)
                )
            })?,
    };
    Ok(store)
}

/// The master key for secrets at rest, from configuration or the (generated) key file.
pub fn load_master_key(config: &Config) -> anyhow::Result<MasterKey> {
    match &config.secret_key {
        SecretKeySource::Value(secret) => {
            MasterKey::parse(&secret.0).context("TRUSTBROKER_SECRET_KEY")
        }
        SecretKeySource::File(path) => {
            if let Some(dir) = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty() && !d.exists())
            {
                crate::fsutil::create_private_dir(dir)?;
            }
            MasterKey::load_or_create(path)
        }
    }
}

pub async fn start(config: Config) -> anyhow::Result<RunningServer> {
    crate::fsutil::create_private_dir(&config.data_dir)?;
    let store = open_store(&config).await?;
    let master = load_master_key(&config)?;
    let ca = CertificateAuthority::load_or_create(&store, &master, &config.pki).await?;
    if config.pki.static_challenge.is_some() {
        tracing::warn!(
            "a static SCEP challenge is configured: anyone who has it can enroll any number of \
             devices; prefer one-time challenges (POST /api/v1/scep/challenges)"
        );
    }
    let migrated_cas = MigratedCas::load(&config.mdm_identity.migrated_ca_files)?;
    let device_roots = if config.mdm_identity.tls_client_auth {
        let mut roots = vec![CertificateDer::from(ca.ca.certificate_der.clone())];
        roots.extend(migrated_cas.roots().iter().cloned());
        roots
    } else {
        Vec::new()
    };
    let tls = tls::load(&config, &device_roots)?;
    let grace = config.shutdown_grace;
    let server_settings = Arc::new(config.server.clone());
    let backlog = server_settings.listen_backlog;
    let https_listener =
        bind(config.listen, backlog).with_context(|| format!("listening on {}", config.listen))?;
    let https_addr = https_listener.local_addr()?;
    let http_listener = match config.http_listen {
        Some(addr) => Some(bind(addr, backlog).with_context(|| format!("listening on {addr}"))?),
        None => None,
    };
    let http_addr = http_listener
        .as_ref()
        .map(TcpListener::local_addr)
        .transpose()?;
    let public_url = config.public_url_for(https_addr);
    let scep = ScepService::new(
        store.clone(),
        ca.clone(),
        config.pki.static_challenge.clone(),
    );
    let master = Arc::new(master);
    let device_tokens = DeviceTokens::new(
        store.clone(),
        master.clone(),
        public_url.clone(),
        crate::tokens::device::DEFAULT_LIFETIME,
    );
    let policies = ActivePolicies::default();
    let reconcile_wake = ReconcileWake::default();
    let tokens = crate::tokens::shared::TokenService::start(
        store.clone(),
        master.clone(),
        Some(reconcile_wake.clone()),
        crate::tokens::shared::ValidationLimits {
            per_second: config.tokens.validations_per_client_per_second,
            burst: config.tokens.validation_burst,
        },
    )
    .await
    .context("app-config tokens")?;
    let mdm = MdmService::new(store.clone(), master.clone())
        .with_reenrollment(config.mdm_reenrollment)
        .with_reconcile_wake(reconcile_wake.clone());
    let mdm_cache = mdm.cache().clone();
    let pusher = Pusher::new(store.clone(), master.clone(), config.apns.clone());
    let profiles = ProfileService::new(
        store.clone(),
        ca.clone(),
        master.clone(),
        ProfileSettings {
            public_url: public_url.clone(),
            scep_path: config.pki.scep_path.clone(),
            organization: config.pki.organization.clone(),
            challenge_ttl: config.pki.challenge_ttl,
        },
    );
    let node = crate::cluster::NodeId::generate();
    tracing::info!(node = node.as_str(), "cluster node name");
    let reconciler = Reconciler::new(
        store.clone(),
        profiles.clone(),
        pusher.clone(),
        policies.clone(),
        reconcile_wake.clone(),
        config.policy.clone(),
    )
    .with_tokens(tokens.clone(), device_tokens.clone())
    .on_node(node.clone());
    if let Some(dir) = &config.policy.dir {
        apply_policy_dir(&store, &reconciler, dir, config.policy.allow_destructive).await?;
    }
    let identity = IdentityProviders::from_config(&config.identity_providers, &public_url)
        .context("identity providers")?;
    let group_syncs = crate::identity::ldap::sync::configured(&config.identity_providers)
        .context("LDAP group sync")?;
    let cookies = CookiePolicy {
        secure: public_url.starts_with("https://"),
    };
    let audit_budget = Arc::new(crate::audit::UnauthenticatedBudget::new(
        config.limits.unauthenticated_audit_per_minute,
        config.limits.unauthenticated_audit_per_source_per_minute,
    ));
    let state = AppState::new(AppContext {
        config: Arc::new(config),
        store: store.clone(),
        metrics: telemetry::metrics_handle(),
        scep,
        mdm,
        profiles,
        pusher,
        master_key: master,
        ca,
        identity: Arc::new(identity),
        cookies,
        migrated_cas: Arc::new(migrated_cas),
        sign_in_throttle: Arc::default(),
        audit_budget,
        reconciler: reconciler.clone(),
        tokens: tokens.clone(),
        device_tokens: device_tokens.clone(),
    });
    // The admin console brings its own middleware (see `console::router`); one outage breaker
    // serves both.
    let outage = http::outage::OutageGuard::new(store.clone());
    let repusher = state.pusher.clone();
    let app = crate::console::router(state.clone(), &outage).merge(http::router(state, outage));
    let (stop, stopped) = watch::channel(false);
    let lease = |name: &str| crate::cluster::Lease::new(store.clone(), name, node.clone());
    let mut background = vec![
        reconciler
            .clone()
            .spawn(lease("reconcile:full-pass"), stopped.clone()),
    ];
    background.push(tokens.clone().spawn(stopped.clone()));
    background.push(mdm_cache.spawn(stopped.clone()));
    background.push(device_tokens.spawn_purge(lease("device-tokens:purge"), stopped.clone()));
    background.extend(crate::apple::repush::spawn(
        repusher,
        store.clone(),
        lease("apns:repush"),
        stopped.clone(),
    ));
    background.extend(crate::identity::ldap::sync::spawn_all(
        group_syncs,
        &node,
        &store,
        &policies,
        &reconcile_wake,
        &stopped,
    ));
    let mut listeners = JoinSet::new();
    let acceptor = TlsAcceptor::from(tls.server_config.clone());
    let max_connections = connections_within_fd_limit(
        server_settings.max_connections,
        1 + usize::from(http_listener.is_some()),
    );
    listeners.spawn(accept_loop(
        https_listener,
        Some(acceptor),
        app.clone(),
        server_settings.clone(),
        ListenerGate::new("https", max_connections),
        stopped.clone(),
        grace,
    ));
    if let Some(listener) = http_listener {
        listeners.spawn(accept_loop(
            listener,
            None,
            app.clone(),
            server_settings,
            ListenerGate::new("http", max_connections),
            stopped,
            grace,
        ));
    }
    Ok(RunningServer {
        https_addr,
        http_addr,
        public_url,
        tls_fingerprint: tls.fingerprint_sha256,
        tls_cert_path: tls.cert_path,
        tls_generated: tls.generated,
        store,
        reconciler,
        device_tokens,
        tokens,
        node,
        router: app,
        stop,
        listeners,
        background,
    })
}

/// A reconciler for the command line (`policy plan|apply` without `--server`): the same
/// database and policy set as the server's, without listeners; it queues nothing itself (the
/// servers' reconcilers pick up what an apply records).
pub async fn offline_reconciler(config: &Config) -> anyhow::Result<(Store, Reconciler)> {
    let store = open_store(config).await?;
    let master = Arc::new(load_master_key(config)?);
    let ca = CertificateAuthority::load_or_create(&store, &master, &config.pki).await?;
    let public_url = config.public_url_for(config.listen);
    let profiles = ProfileService::new(
        store.clone(),
        ca,
        master.clone(),
        ProfileSettings {
            public_url,
            scep_path: config.pki.scep_path.clone(),
            organization: config.pki.organization.clone(),
            challenge_ttl: config.pki.challenge_ttl,
        },
    );
    let pusher = Pusher::new(store.clone(), master, config.apns.clone());
    let reconciler = Reconciler::new(
        store.clone(),
        profiles,
        pusher,
        ActivePolicies::default(),
        ReconcileWake::default(),
        config.policy.clone(),
    );
    Ok((store, reconciler))
}

/// Applies the policy directory named in the configuration when it differs from the set in
/// force (GitOps: the directory is the truth). Invalid files stop the start; a destructive
/// plan without `allow_destructive` is refused and the last applied set stays in force.
async fn apply_policy_dir(
    store: &Store,
    reconciler: &Reconciler,
    dir: &std::path::Path,
    allow_destructive: bool,
) -> anyhow::Result<()> {
    let files = crate::policy::load::read_dir_files(dir).map_err(|d| policy_problems(dir, &d))?;
    let actor = format!("startup:{}", dir.display());
    match crate::policy::plan::apply(store, reconciler, &files, &actor, None, allow_destructive)
        .await
    {
        Ok(applied) if applied.unchanged => {
            tracing::info!(dir = %dir.display(), version = applied.version,
                "policy: the directory is the set in force");
        }
        Ok(applied) => {
            tracing::info!(dir = %dir.display(), version = applied.version,
                commands = applied.plan.totals.commands(), "policy: applied the directory");
        }
        Err(crate::policy::plan::ApplyError::Invalid(d)) => return Err(policy_problems(dir, &d)),
        Err(crate::policy::plan::ApplyError::Destructive(plan)) => {
            tracing::error!(dir = %dir.display(), destructive = ?plan.destructive,
                "policy: the directory's plan locks or wipes devices; not applied (set                  [policy] allow_destructive = true, or use `trustbroker policy apply                  --allow-destructive`)");
        }
        Err(crate::policy::plan::ApplyError::Reconcile(e)) => {
            return Err(anyhow::anyhow!("applying {}: {e}", dir.display()));
        }
    }
    Ok(())
}

fn policy_problems(
    dir: &std::path::Path,
    diagnostics: &[crate::policy::Diagnostic],
) -> anyhow::Error {
    let lines: Vec<String> = diagnostics.iter().map(ToString::to_string).collect();
    anyhow::anyhow!(
        "the policy directory {} has {} problem(s):\n{}",
        dir.display(),
        lines.len(),
        lines.join("\n")
    )
}

/// A listener with room for `backlog` connections not yet accepted (tokio's default, 128,
/// overflows when many devices reconnect at once, and the excess then waits for SYN
/// retransmissions, seconds apart).
fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(backlog)
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    settings: Arc<ServerSettings>,
    gate: ListenerGate,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    // Over the limit: closed at once, before any TLS or HTTP work.
                    let Some(slot) = gate.admit() else {
                        drop(tcp);
                        continue;
                    };
                    let connection = Connection {
                        tls: tls.clone(),
                        app: app.clone(),
                        settings: settings.clone(),
                        stop: stop.clone(),
                    };
                    tokio::spawn(async move {
                        connection.serve(tcp, peer).await;
                        drop(slot);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stop.changed() => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(grace, gate.drained()).await.is_err() {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "connections still open after the grace period; closing them"
        );
    }
}

/// What serving one connection needs.
struct Connection {
    tls: Option<TlsAcceptor>,
    app: Router,
    settings: Arc<ServerSettings>,
    stop: watch::Receiver<bool>,
}

impl Connection {
    async fn serve(self, tcp: TcpStream, peer: SocketAddr) {
        let _ = tcp.set_nodelay(true);
        let Some(tls) = self.tls.clone() else {
            return self.run(TokioIo::new(tcp), peer, None).await;
        };
        let mut stop = self.stop.clone();
        let handshake = tokio::time::timeout(self.settings.handshake_timeout(), tls.accept(tcp));
        let stream = tokio::select! {
            done = handshake => match done {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            },
            _ = stop.changed() => return,
        };
        let client_certificate = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|leaf| TlsClientCertificate(Arc::new(leaf.to_vec())));
        self.run(TokioIo::new(stream), peer, client_certificate)
            .await;
    }

    /// HTTP over an established connection; the first-request deadline runs from here.
    async fn run<I>(self, io: I, peer: SocketAddr, client_certificate: Option<TlsClientCertificate>)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let activity = Activity::new();
        let counted = activity.clone();
        // Every request carries the peer address and, on TLS, the client certificate if one
        // was presented (devices that do not sign their messages identify themselves that
        // way), and counts as in flight until it has been answered.
        let service = TowerToHyperService::new(
            self.app
                .map_request(move |mut request: hyper::Request<hyper::body::Incoming>| {
                    request.extensions_mut().insert(ConnectInfo(peer));
                    if let Some(certificate) = &client_certificate {
                        request.extensions_mut().insert(certificate.clone());
                    }
                    request
                })
                .map_future(move |future| {
                    let in_flight = counted.begin();
                    async move {
                        let response = future.await;
                        drop(in_flight);
                        response
                    }
                }),
        );
        let builder = http_builder(&self.settings);
        let connection = builder.serve_connection(io, service);
        tokio::pin!(connection);
        let result = supervise(
            connection.as_mut(),
            |c| c.graceful_shutdown(),
            &activity,
            &self.settings,
            self.stop,
        )
        .await;
        if let Err(e) = result {
            tracing::debug!(%peer, error = %e, "connection ended with an error");
        }
    }
}

/// HTTP/1 and HTTP/2 settings from `[server]`.
fn http_builder(settings: &ServerSettings) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // Runs while waiting for a request's head, also between kept-alive requests.
        .header_read_timeout(settings.idle_timeout())
        .max_buf_size(settings.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(Duration::from_secs(settings.http2_keep_alive_interval_secs))
        .keep_alive_timeout(Duration::from_secs(settings.http2_keep_alive_timeout_secs))
        .max_concurrent_streams(settings.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX));
    builder
}
