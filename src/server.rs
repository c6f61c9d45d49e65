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
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::apple::apns::Pusher;
use crate::apple::enrollment::{ProfileService, ProfileSettings};
use crate::apple::identity::MigratedCas;
use crate::apple::service::MdmService;
use crate::config::{Config, Database, SecretKeySource};
use crate::enroll::session::CookiePolicy;
use crate::http::TlsClientCertificate;
use crate::http::{self, AppState};
use crate::identity::IdentityProviders;
use crate::pki::ca::CertificateAuthority;
use crate::pki::service::ScepService;
use crate::secrets::MasterKey;
use crate::store::Store;
use crate::{telemetry, tls};
use rustls::pki_types::CertificateDer;

/// How long a client gets to finish the TLS handshake, and to send a request's headers.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A running server. Dropping it does not stop it; call [`RunningServer::shutdown`].
pub struct RunningServer {
    pub https_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    pub public_url: String,
    pub tls_fingerprint: String,
    pub tls_cert_path: std::path::PathBuf,
    pub tls_generated: bool,
    pub store: Store,
    stop: watch::Sender<bool>,
    listeners: JoinSet<()>,
}

impl RunningServer {
    /// Stops accepting, lets open connections finish (within the grace period), closes the pool.
    pub async fn shutdown(mut self) {
        let _ = self.stop.send(true);
        while self.listeners.join_next().await.is_some() {}
        self.store.close().await;
    }
}

/// Opens the configured database and brings its schema up to date.
pub async fn open_store(config: &Config) -> anyhow::Result<Store> {
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
    let https_listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let https_addr = https_listener.local_addr()?;
    let http_listener = match config.http_listen {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .with_context(|| format!("listening on {addr}"))?,
        ),
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
    let mdm =
        MdmService::new(store.clone(), master.clone()).with_reenrollment(config.mdm_reenrollment);
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
    let identity = IdentityProviders::from_config(&config.identity_providers, &public_url)
        .context("identity providers")?;
    let cookies = CookiePolicy {
        secure: public_url.starts_with("https://"),
    };
    let state = AppState {
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
    };
    let app = http::router(state);
    let (stop, stopped) = watch::channel(false);
    let mut listeners = JoinSet::new();
    let acceptor = TlsAcceptor::from(tls.server_config.clone());
    listeners.spawn(accept_loop(
        https_listener,
        Some(acceptor),
        app.clone(),
        stopped.clone(),
        grace,
    ));
    if let Some(listener) = http_listener {
        listeners.spawn(accept_loop(listener, None, app, stopped, grace));
    }
    Ok(RunningServer {
        https_addr,
        http_addr,
        public_url,
        tls_fingerprint: tls.fingerprint_sha256,
        tls_cert_path: tls.cert_path,
        tls_generated: tls.generated,
        store,
        stop,
        listeners,
    })
}

async fn accept_loop(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    app: Router,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let watcher = graceful.watcher();
                    let app = app.clone();
                    let tls = tls.clone();
                    tokio::spawn(async move {
                        serve_connection(tcp, peer, tls, app, watcher).await;
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
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            grace_secs = grace.as_secs(),
            "connections still open after the grace period; closing them"
        );
    }
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Option<TlsAcceptor>,
    app: Router,
    watcher: hyper_util::server::graceful::Watcher,
) {
    let _ = tcp.set_nodelay(true);
    // Every request carries its peer address and, on TLS, the client certificate if one was
    // presented (devices that do not sign their messages identify themselves that way).
    let service = |client_certificate: Option<TlsClientCertificate>| {
        TowerToHyperService::new(app.map_request(
            move |mut request: hyper::Request<hyper::body::Incoming>| {
                request.extensions_mut().insert(ConnectInfo(peer));
                if let Some(certificate) = &client_certificate {
                    request.extensions_mut().insert(certificate.clone());
                }
                request
            },
        ))
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT);
    builder.http2().timer(TokioTimer::new());
    let result = match tls {
        Some(acceptor) => {
            let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(e)) => {
                    tracing::debug!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "TLS handshake timed out");
                    return;
                }
            };
            let client_certificate = stream
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .map(|leaf| TlsClientCertificate(Arc::new(leaf.to_vec())));
            let connection =
                builder.serve_connection(TokioIo::new(stream), service(client_certificate));
            watcher.watch(connection).await
        }
        None => {
            let connection = builder.serve_connection(TokioIo::new(tcp), service(None));
            watcher.watch(connection).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
}
