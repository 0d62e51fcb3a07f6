//! The FHIR R4 REST API of a node (`/fhir`), including the change feed
//! `$changes`. Handlers translate HTTP to [`fhirsync_store::Store`] calls and
//! back; FHIR semantics live in the store's engine, not here.

mod admin;
pub mod agent;
mod apply;
mod bundle;
mod capability;
mod changes;
mod crud;
mod error;
mod health;
mod history;
mod http;
pub mod http_metrics;
pub mod peers;
mod render;
mod search;
mod subs;

use std::sync::Arc;

use axum::routing::{get, post};
use axum::Router;
use fhirsync_store::Store;
use tokio::sync::watch;

pub use agent::SyncAgent;
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
    /// Bearer token the admin API requires; `None`: the admin API is open.
    pub admin_token: Option<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            body_bytes_max: 32 * 1024 * 1024,
            long_poll_s_max: 60,
            base_url: None,
            admin_token: None,
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
}

impl AppState {
    /// A node without children or parent.
    pub fn new(store: Arc<dyn Store>, cfg: ApiConfig, shutdown: watch::Receiver<bool>) -> Self {
        AppState {
            store,
            cfg: Arc::new(cfg),
            shutdown,
            children: Arc::new(Children::default()),
            agents: Vec::new(),
            http_metrics: Arc::default(),
        }
    }
}

/// The whole HTTP application.
pub fn app(state: AppState) -> Router {
    let fhir = Router::new()
        .route("/", post(bundle::process).get(search::system_search))
        .route("/metadata", get(capability::metadata))
        .route("/$changes", get(changes::changes))
        .route("/$apply", post(apply::apply))
        .route("/_history", get(history::system))
        .route(
            "/{rtype}",
            get(search::type_search)
                .post(crud::create)
                .put(crud::conditional_update)
                .delete(crud::conditional_delete),
        )
        .route("/Subscription/{id}/$status", get(subs::status))
        .route("/Subscription/{id}/$events", get(subs::events))
        .route("/{rtype}/_search", post(search::type_search_post))
        .route("/{rtype}/_history", get(history::type_level))
        .route(
            "/{rtype}/{id}",
            get(crud::read).put(crud::update).delete(crud::delete),
        )
        .route("/{rtype}/{id}/_history", get(history::instance))
        .route("/{rtype}/{id}/_history/{vid}", get(crud::vread))
        .method_not_allowed_fallback(error::method_not_allowed);
    let admin = Router::new()
        .route("/status", get(admin::status))
        .route("/edges", get(admin::edges))
        .route("/children", get(admin::children))
        .route("/conflicts", get(admin::conflicts))
        .route("/conflicts/{id}", get(admin::conflict))
        .route("/conflicts/{id}/resolve", post(admin::resolve))
        .route("/deadletters", get(admin::dead_letters))
        .route("/deadletters/retry", post(admin::retry_all))
        .route("/deadletters/{id}", get(admin::dead_letter))
        .route("/deadletters/{id}/retry", post(admin::retry))
        .route("/audit", get(admin::audit))
        .method_not_allowed_fallback(error::method_not_allowed);
    Router::new()
        .nest("/admin", admin)
        .route("/metrics", get(admin::metrics))
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
            http_metrics::track,
        ))
        .layer(tower_http::trace::TraceLayer::new_for_http())
        .with_state(state)
}
