//! HTTP: router assembly, shared state, middleware and the one error → response mapping.
//! Handlers stay thin (parse, call a service, map the result); no SQL or protocol code here.

pub mod error;
pub mod jwks;
pub mod limit;
pub mod mdm;
pub mod observe;
pub mod openapi;
pub mod ops;
pub mod outage;
pub mod scep;
pub mod validate;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Request, StatusCode};
use axum::middleware;
use axum::routing::{get, put};
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::request_id::{PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::TimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::apple::apns::Pusher;
use crate::apple::enrollment::ProfileService;
use crate::apple::identity::MigratedCas;
use crate::apple::service::MdmService;
use crate::config::Config;
use crate::enroll::session::CookiePolicy;
use crate::identity::IdentityProviders;
use crate::pki::ca::CertificateAuthority;
use crate::pki::service::ScepService;
use crate::secrets::MasterKey;
use crate::store::Store;

/// What every handler may reach, behind one reference count: axum clones a route's state for
/// every request, and cloning a dozen reference counts shared by every core is measurable on
/// the cheap routes (docs/benchmarks.md). Fields are reached through `Deref`.
#[derive(Clone)]
pub struct AppState(Arc<AppContext>);

impl AppState {
    pub fn new(context: AppContext) -> AppState {
        AppState(Arc::new(context))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppContext;
    fn deref(&self) -> &AppContext {
        &self.0
    }
}

/// The application state's contents (see [`AppState`]).
pub struct AppContext {
    pub config: Arc<Config>,
    pub store: Store,
    pub metrics: PrometheusHandle,
    pub ca: Arc<CertificateAuthority>,
    pub scep: ScepService,
    pub mdm: MdmService,
    pub profiles: ProfileService,
    pub pusher: Pusher,
    /// Seals secrets at rest (and the portal's cookies).
    pub master_key: Arc<MasterKey>,
    pub identity: Arc<IdentityProviders>,
    pub cookies: CookiePolicy,
    /// Other MDMs' CAs whose device certificates are accepted (devices migrating here).
    pub migrated_cas: Arc<MigratedCas>,
    /// Failed password sign-ins at the portal, per login and address.
    pub sign_in_throttle: Arc<crate::enroll::throttle::SignInThrottle>,
    /// How many audit records refused admin keys may cause.
    pub audit_budget: Arc<crate::audit::UnauthenticatedBudget>,
    /// Group-driven policy: the set in force, plan and apply, the reconciler's wake-up.
    pub reconciler: crate::policy::reconcile::Reconciler,
    /// Shared app-config tokens: integrations, tokens, app clients, validation.
    pub tokens: crate::tokens::shared::TokenService,
    /// Per-device signed tokens: issuing, the JWKS, introspection.
    pub device_tokens: crate::tokens::device::DeviceTokens,
}

/// The certificate a client presented in the TLS handshake with our own listener (a request
/// extension, set by the accept loop).
#[derive(Clone, Debug)]
pub struct TlsClientCertificate(pub Arc<Vec<u8>>);

/// The whole application but the console: every route, wrapped in the common middleware.
/// `outage` is the database-outage breaker, shared with the console's router.
pub fn router(state: AppState, outage: outage::OutageGuard) -> Router {
    let config = state.config.clone();
    let caps = limit::RouteCaps::new(&config.limits);
    let capped = |cap: &limit::Cap| middleware::from_fn_with_state(cap.clone(), limit::guard);
    Router::new()
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route("/metrics", get(ops::metrics))
        .route(
            &config.pki.scep_path,
            get(scep::get).post(scep::post).layer(capped(&caps.scep)),
        )
        .route(
            mdm::CHECKIN_PATH,
            put(mdm::check_in).layer(capped(&caps.mdm)),
        )
        .route(
            mdm::CONNECT_PATH,
            put(mdm::connect).layer(capped(&caps.mdm)),
        )
        // /api/v1, /scim/v2 and the validation routes, with their OpenAPI document.
        .merge(openapi::documented_routes(&state))
        .merge(crate::enroll::router(&caps))
        .fallback(error::not_found)
        .with_state(state)
        .layer(middleware::from_fn_with_state(
            outage,
            outage::database_outage_is_503,
        ))
        .layer(middleware::from_fn_with_state(
            observe::RouteMetrics::default(),
            observe::record_metrics,
        ))
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .layer(RequestBodyLimitLayer::new(config.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            config.request_timeout,
        ))
        // Everything inside answers errors in the API's JSON shape.
        .layer(middleware::map_response(error::json_error_bodies))
        .layer(
            // Fields as borrowed text: nothing is formatted or copied when the span is off.
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                tracing::info_span!(
                    "request",
                    method = request.method().as_str(),
                    path = request.uri().path(),
                    request_id = observe::request_id_str(request),
                )
            }),
        )
        // Outermost: the id exists before anything else runs, and goes back on the response.
        .layer(PropagateRequestIdLayer::new(
            observe::REQUEST_ID_HEADER.clone(),
        ))
        .layer(SetRequestIdLayer::new(
            observe::REQUEST_ID_HEADER.clone(),
            observe::MakeRequestUuid,
        ))
}
