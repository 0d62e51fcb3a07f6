//! `fhirsync serve`: opens the store, serves the API, shuts down cleanly on
//! SIGINT/SIGTERM (in-flight requests finish, long-polls end, the writer
//! drains its queue and checkpoints).

use std::sync::Arc;

use anyhow::Context;
use fhirsync_api::{app, AppState};
use fhirsync_replica::Replicator;
use fhirsync_store::sqlite::SqliteStore;
use fhirsync_store::Store;
use tokio::sync::watch;

use crate::config::Config;
use crate::lock::lock_data_dir;

pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

pub fn run(cfg: Config) -> anyhow::Result<()> {
    init_logging(&cfg.log);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(serve(cfg))
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    let addr = cfg.listen_addr()?;
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let store = Arc::new(SqliteStore::open(cfg.sqlite()?).context("cannot open the store")?);
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let replicator = match &cfg.parent {
        Some(p) => Some(
            Replicator::start(store.clone(), vec![p.clone()])
                .map_err(|e| anyhow::anyhow!("parent edge: {e}"))?,
        ),
        None => None,
    };
    let mut state = AppState::new(store.clone(), cfg.api(), shutdown_rx);
    state.children = Arc::new(cfg.children());
    if let Some(r) = &replicator {
        state.agents.push(r.clone());
    }
    let nats = match &cfg.nats {
        Some(n) => Some(
            fhirsync_nats::NatsAgent::start(store.clone(), n.clone())
                .await
                .map_err(|e| anyhow::anyhow!("nats: {e}"))?,
        ),
        None => None,
    };
    if let Some(n) = &nats {
        state.agents.push(n.clone());
    }
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    let local = listener.local_addr()?;
    let scheme = if cfg.tls.is_some() { "https" } else { "http" };
    tracing::info!(
        node_id = store.node_id(),
        "listening on {scheme}://{local}/fhir"
    );
    // Scripts and tests read this line to find the port of `--listen 127.0.0.1:0`.
    println!(
        "fhirsync node {} listening on {scheme}://{local}/fhir",
        store.node_id()
    );
    let subs = start_subscriptions(&cfg, store.clone(), format!("{scheme}://{local}/fhir"))?;
    state.agents.push(subs.clone());
    let stop = async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = shutdown_tx.send(true);
    };
    match &cfg.tls {
        Some(t) => {
            let tls = crate::tls::TlsListener::new(listener, t.server_config()?)?;
            axum::serve(tls, app(state))
                .with_graceful_shutdown(stop)
                .await
        }
        None => {
            axum::serve(listener, app(state))
                .with_graceful_shutdown(stop)
                .await
        }
    }
    .context("server failed")?;
    if let Some(r) = replicator {
        r.shutdown().await;
    }
    if let Some(n) = nats {
        n.shutdown().await;
    }
    subs.shutdown().await;
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.shutdown()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// The subscriptions agent, with the node's `[nats]` servers as the
/// default connection of NATS channels.
fn start_subscriptions(
    cfg: &Config,
    store: Arc<SqliteStore>,
    base: String,
) -> anyhow::Result<Arc<fhirsync_subs::Notifier>> {
    let mut sc = cfg.subscriptions.clone();
    if let Some(n) = &cfg.nats {
        sc.nats.push(n.into());
    }
    if let Some(b) = &cfg.base_url {
        sc.base_url.get_or_insert_with(|| b.clone());
    }
    fhirsync_subs::Notifier::start(store, sc, base)
        .map_err(|e| anyhow::anyhow!("subscriptions: {e}"))
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => {
            tokio::select! {
                _ = t.recv() => {},
                _ = i.recv() => {},
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
