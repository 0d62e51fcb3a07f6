//! The FHIR R4 REST API of a node (`/fhir`), including the change feed
//! `$changes`. Handlers translate HTTP to [`fhirsync_store::Store`] calls and
//! back; FHIR semantics live in the store's engine, not here.

pub mod admin;
pub mod agent;
mod apply;
mod audit;
pub mod auditor;
pub mod auth;
pub mod bulk;
mod bundle;
mod capability;
mod changes;
pub mod console;
mod crud;
mod error;
mod health;
mod history;
mod http;
pub mod http_metrics;
pub mod peers;
pub mod push_order;
mod render;
mod search;
mod subs;
pub mod validation;
pub mod verify;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use fhirsync_store::Store;
use tokio::sync::watch;

pub use agent::SyncAgent;
pub use apply::POLICY_EXTENSION;
pub use error::ApiError;
pub use peers::{ChildConfig, Children};

/// Limits and settings of the API.
#[derive(Debug, Clone)]
pub struct ApiConfig {
    /// Largest request body accepted, in bytes.
    pub body_bytes_max: usize,
    /// Longest `wait` a `$changes` long-poll may ask for, in seconds.
    pub long_poll_s_max: u64,
    /// Public base URL (`http://host:port/fhir`); from the `Host` header when unset.
    pub base_url: Option<String>,
    /// Bearer token the admin API requires; `None`: the admin API is open
    /// only when anonymous access is enabled.
    pub admin_token: Option<String>,
    /// Bearer token `/metrics` requires (the admin token opens it too);
    /// `None`: open.
    pub metrics_token: Option<String>,
    /// Who may call the FHIR API.
    pub auth: Arc<auth::Auth>,
    /// The server speaks HTTPS (for base URLs derived from `Host`).
    pub https: bool,
    /// Each answer waits until its AuditEvent is committed (otherwise the
    /// record follows within [`auditor::LINGER`]).
    pub audit_wait: bool,
    /// What happens to a client's write that fails structural validation.
    pub validation: validation::Mode,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            body_bytes_max: 32 * 1024 * 1024,
            long_poll_s_max: 60,
            base_url: None,
            admin_token: None,
            metrics_token: None,
            auth: Arc::default(),
            https: false,
            audit_wait: false,
            validation: validation::Mode::Strict,
        }
    }
}

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub cfg: Arc<ApiConfig>,
    /// Becomes `true` when the server shuts down (ends long-polls early).
    pub shutdown: watch::Receiver<bool>,
    /// Children registered with this node.
    pub children: Arc<Children>,
    /// The node's sync agents (parent edge, NATS transport).
    pub agents: Vec<Arc<dyn SyncAgent>>,
    /// Request counts and latencies for `/metrics`.
    pub http_metrics: Arc<http_metrics::HttpMetrics>,
    /// Commits the audit trail's records in batches.
    pub auditor: auditor::Auditor,
    /// Bulk data jobs (`$export`, `$import`); `None`: bulk data is off.
    pub bulk: Option<Arc<bulk::Jobs>>,
    /// Where the store lives and which process this is (`/admin/status`).
    pub deployment: Arc<Deployment>,
}

/// Where a node process keeps its store, and the process itself.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// `sqlite` or `postgres`.
    pub backend: &'static str,
    /// The SQLite file, or the PostgreSQL URL without its password.
    pub database: String,
    pub process: fhirsync_store::ProcessInfo,
}

impl AppState {
    /// A node without children or parent.
    /// Starts the auditor task: call inside a Tokio runtime.
    pub fn new(store: Arc<dyn Store>, cfg: ApiConfig, shutdown: watch::Receiver<bool>) -> Self {
        AppState {
            auditor: auditor::Auditor::start(store.clone(), cfg.audit_wait),
            store,
            cfg: Arc::new(cfg),
            shutdown,
            children: Arc::new(Children::default()),
            agents: Vec::new(),
            http_metrics: Arc::default(),
            bulk: None,
            deployment: Arc::new(Deployment {
                backend: "sqlite",
                database: String::new(),
                process: fhirsync_store::ProcessInfo::this(
                    "",
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_millis() as u64),
                ),
            }),
        }
    }

    /// Turns bulk data on, its jobs kept under `cfg.dir` (jobs that were
    /// running when the node last stopped fail now).
    pub fn with_bulk(mut self, cfg: bulk::BulkConfig) -> std::io::Result<Self> {
        self.bulk = Some(bulk::Jobs::open(cfg, self.store.clone())?);
        Ok(self)
    }
}

/// A caller's address, from any listener whose peers have socket
/// addresses (plain TCP or TLS).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Listeners whose callers' addresses the audit trail records.
pub trait PeerListener: axum::serve::Listener<Addr = std::net::SocketAddr> {}

impl PeerListener for tokio::net::TcpListener {}

impl<L: PeerListener> axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, L>>
    for PeerAddr
{
    fn connect_info(s: axum::serve::IncomingStream<'_, L>) -> Self {
        PeerAddr(*s.remote_addr())
    }
}

/// The application as a service that knows each caller's address (for
/// the audit trail).
pub fn service(
    state: AppState,
) -> axum::extract::connect_info::IntoMakeServiceWithConnectInfo<Router, PeerAddr> {
    app(state).into_make_service_with_connect_info::<PeerAddr>()
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let fhir = Router::new()
        .route("/", post(bundle::process).get(search::system_search))
        .route("/metadata", get(capability::metadata))
        .route("/$changes", get(changes::changes))
        .route("/$apply", post(apply::apply))
        .route("/$summary", post(verify::summary))
        .route("/$current", post(verify::current))
        .route(
            "/$export",
            get(bulk::export::system).post(bulk::export::system),
        )
        .route("/$import", post(bulk::import::kick_off))
        .route("/$bulk-status/{id}", get(bulk::status).delete(bulk::cancel))
        .route("/$bulk-file/{id}/{name}", get(bulk::file))
        .route(
            "/Patient/$export",
            get(bulk::export::patients).post(bulk::export::patients),
        )
        .route(
            "/Group/{id}/$export",
            get(bulk::export::group).post(bulk::export::group),
        )
        .route("/_history", get(history::system))
        .route(
            "/{rtype}",
            get(search::type_search)
                .post(crud::create)
                .put(crud::conditional_update)
                .delete(crud::conditional_delete),
        )
        .route(
            "/.well-known/smart-configuration",
            get(auth::smart_configuration),
        )
        .route(
            "/AuditEvent",
            get(audit::search)
                .post(audit::create)
                .put(audit::conditional_update)
                .delete(audit::conditional_delete),
        )
        .route(
            "/AuditEvent/{id}",
            get(audit::read).put(audit::update).delete(audit::delete),
        )
        .route("/Subscription/{id}/$status", get(subs::status))
        .route("/Subscription/{id}/$events", get(subs::events))
        .route("/{rtype}/_search", post(search::type_search_post))
        .route("/{rtype}/$validate", post(validation::validate_op))
        .route("/{rtype}/_history", get(history::type_level))
        .route(
            "/{rtype}/{id}",
            get(crud::read).put(crud::update).delete(crud::delete),
        )
        .route("/{rtype}/{id}/_history", get(history::instance))
        .route("/{rtype}/{id}/{member}", get(search::compartment))
        .route("/{rtype}/{id}/_history/{vid}", get(crud::vread))
        .method_not_allowed_fallback(error::method_not_allowed);
    let admin = Router::new()
        .route("/status", get(admin::status))
        .route("/edges", get(admin::edges))
        .route("/children", get(admin::children))
        .route("/conflicts", get(admin::conflicts))
        .route("/conflicts/{id}", get(admin::conflict))
        .route("/conflicts/{id}/resolve", post(admin::resolve))
        .route("/conflicts/{id}/reopen", post(admin::reopen))
        .route("/deadletters", get(admin::dead_letters))
        .route("/deadletters/retry", post(admin::retry_all))
        .route("/deadletters/{id}", get(admin::dead_letter))
        .route("/deadletters/{id}/retry", post(admin::retry))
        .route("/audit", get(admin::audit))
        .route("/reindex", get(admin::reindex_status).post(admin::reindex))
        .route("/verify", post(admin::verify))
        .method_not_allowed_fallback(error::method_not_allowed);
    Router::new()
        .nest("/admin", admin)
        .route("/metrics", get(admin::metrics))
        .route("/auth/token", post(auth::token))
        .route("/healthz", get(health::live))
        .route("/readyz", get(health::ready))
        // Clients POST transactions to the base with and without a trailing slash.
        .route("/fhir/", post(bundle::process).get(search::system_search))
        .nest("/fhir", fhir)
        .fallback(error::not_found)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(
            error::panic_response,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::guard,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::record,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            http_metrics::track,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}
