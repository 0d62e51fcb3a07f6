//! `fhirsync serve`: opens the store, serves the API, shuts down cleanly on
//! SIGINT/SIGTERM (in-flight requests finish, long-polls end, the writer
//! drains its queue and checkpoints).

use std::sync::Arc;

use anyhow::Context;
use fhirsync_api::{service, AppState};
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
    let store = tokio::task::block_in_place(|| cfg.open_store())?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let mut state = AppState::new(store.clone(), cfg.api()?, shutdown_rx);
    if let Some(b) = cfg.bulk.config(&cfg.data_dir)? {
        let dir = b.dir.clone();
        state = state
            .with_bulk(b)
            .with_context(|| format!("bulk data: cannot use {}", dir.display()))?;
    }
    state.children = Arc::new(cfg.children());
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
    println!("{}", cfg.auth.summary());
    // The agents: here, or on PostgreSQL in the one process that holds
    // the database's lease.
    let base = format!("{scheme}://{local}/fhir");
    let pg = cfg.postgres()?;
    let me = fhirsync_store::ProcessInfo::this(&base, {
        use fhirsync_core::clock::Clock;
        fhirsync_core::clock::SystemClock.now_ms()
    });
    state.deployment = Arc::new(fhirsync_api::Deployment {
        backend: if pg.is_some() { "postgres" } else { "sqlite" },
        database: match &pg {
            Some(p) => p.redacted_url(),
            None => fhirsync_store::sqlite::SqliteStore::db_path(&cfg.data_dir)
                .display()
                .to_string(),
        },
        process: me.clone(),
    });
    let (agents, leased_task) = match pg {
        Some(pg) => {
            let (leased, task) = crate::agents::Leased::start(
                cfg.clone(),
                &pg,
                store.clone(),
                me,
                shutdown_tx.subscribe(),
            )?;
            state.agents.push(leased);
            (None, Some(task))
        }
        None => {
            let a = crate::agents::Agents::start(&cfg, store.clone(), base).await?;
            state.agents.extend(a.list());
            (Some(a), None)
        }
    };
    let console = start_console(&cfg, &state).await?;
    let auditor = state.auditor.clone();
    let bulk = state.bulk.clone();
    let stop = async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        if let Some(b) = bulk {
            b.halt();
        }
        let _ = shutdown_tx.send(true);
    };
    match &cfg.tls {
        Some(t) => {
            let tls = crate::tls::TlsListener::new(listener, t.server_config()?)?;
            axum::serve(tls, service(state))
                .with_graceful_shutdown(stop)
                .await
        }
        None => {
            axum::serve(listener, service(state))
                .with_graceful_shutdown(stop)
                .await
        }
    }
    .context("server failed")?;
    if let Some(c) = console {
        let _ = c.await;
    }
    // The audit records of the last answers, before the store closes.
    auditor.flush().await;
    if let Some(a) = agents {
        a.shutdown().await;
    }
    if let Some(t) = leased_task {
        let _ = t.await;
    }
    let s = store.clone();
    tokio::task::spawn_blocking(move || s.shutdown()).await?;
    tracing::info!("stopped");
    Ok(())
}

/// The web console on its own listener (HTTPS when `[tls]` is set), until
/// the node shuts down. Says where it listens.
async fn start_console(
    cfg: &Config,
    state: &AppState,
) -> anyhow::Result<Option<tokio::task::JoinHandle<()>>> {
    let tls = cfg.tls.is_some();
    let Some(addr) = cfg.console.addr(tls)? else {
        println!("console: off");
        return Ok(None);
    };
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e)
            if e.kind() == std::io::ErrorKind::AddrInUse
                && cfg.console.listen == crate::console_cfg::DEFAULT_LISTEN =>
        {
            tracing::warn!(%addr, "the console's default address is taken (another node on this machine?); the console is off");
            println!(
                "console: off ({addr} is taken; set [console] listen or --console-listen to another address)"
            );
            return Ok(None);
        }
        Err(e) => return Err(e).with_context(|| format!("console: cannot listen on {addr}")),
    };
    let local = listener.local_addr()?;
    let ccfg = cfg.console.config(&cfg.data_dir, tls);
    let users = fhirsync_api::console::users::load(&ccfg.users_file)?;
    let scheme = if tls { "https" } else { "http" };
    let reach = if local.ip().is_loopback() {
        "loopback only; set [console] listen (with [tls]) to reach it from elsewhere"
    } else {
        "REACHABLE FROM THE NETWORK; keep it behind a firewall"
    };
    println!(
        "console on {scheme}://{local}/ ({reach}); {} user(s) in {}",
        users.len(),
        ccfg.users_file.display()
    );
    if users.is_empty() {
        println!("console: no users yet; add one with: fhirsync user add NAME --role admin");
    }
    let app =
        fhirsync_api::console::router(fhirsync_api::console::Console::start(state.clone(), ccfg));
    let mut stop = state.shutdown.clone();
    let until = async move {
        let _ = stop.wait_for(|v| *v).await;
    };
    let task = match &cfg.tls {
        Some(t) => {
            let l = crate::tls::TlsListener::new(listener, t.server_config()?)?;
            tokio::spawn(async move {
                let _ = axum::serve(l, app).with_graceful_shutdown(until).await;
            })
        }
        None => tokio::spawn(async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(until)
                .await;
        }),
    };
    Ok(Some(task))
}

pub(crate) async fn wait_for_signal() {
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
