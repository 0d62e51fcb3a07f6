//! `fhirsync db-sender` and `fhirsync db-receiver`: database sync from a
//! MySQL/MariaDB binlog into a central database.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use clap::Subcommand;
use fhirsync_db::config::{ReceiverConfig, SenderConfig};
use fhirsync_db::receiver::{Keep, Receiver};
use fhirsync_db::sender::Sender;
use tokio::sync::watch;

use crate::serve::{init_logging, wait_for_signal};
use crate::tls::{TlsListener, TlsSection};

#[derive(clap::Args)]
pub struct SenderArgs {
    /// The sender's TOML file.
    #[arg(long)]
    config: PathBuf,
    /// Copy the tables again before following the binlog (after a purged
    /// position, say).
    #[arg(long)]
    snapshot: bool,
    #[command(subcommand)]
    cmd: Option<SenderCmd>,
}

#[derive(Subcommand)]
enum SenderCmd {
    /// What the sender is doing: its state, position, counters and last
    /// error (from its status file, kept while it runs).
    Status {
        /// Print the status file's JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
pub struct ReceiverArgs {
    /// The receiver's TOML file.
    #[arg(long)]
    config: PathBuf,
    #[command(subcommand)]
    cmd: Option<ReceiverCmd>,
}

#[derive(Subcommand)]
enum ReceiverCmd {
    /// Register, re-key or remove a sending site.
    Site {
        #[command(subcommand)]
        cmd: SiteCmd,
    },
    /// Each site's position, last batch, record count, open conflicts.
    Status,
    /// Open conflicts (with --all, resolved ones too).
    Conflicts {
        #[arg(long)]
        all: bool,
    },
    /// End a conflict, keeping the incoming or the local row.
    Resolve {
        id: i64,
        #[arg(long)]
        keep: Keep,
    },
}

#[derive(Subcommand)]
enum SiteCmd {
    /// Register a site; prints its token once.
    Add { site: String },
    /// A new token for a site; the old one stops working.
    Rotate { site: String },
    /// Forget a site and its cursor (its rows and conflicts stay).
    Remove { site: String },
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn stop_on_signal() -> watch::Receiver<bool> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        let _ = tx.send(true);
    });
    rx
}

pub fn sender(a: SenderArgs) -> anyhow::Result<()> {
    let cfg = SenderConfig::load(&a.config)?;
    if let Some(SenderCmd::Status { json }) = a.cmd {
        return sender_status(&cfg, json);
    }
    init_logging("info");
    runtime()?.block_on(async {
        let listener = match &cfg.status_listen {
            Some(addr) => {
                let l = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("status_listen: cannot listen on {addr}"))?;
                if !l.local_addr()?.ip().is_loopback() {
                    anyhow::bail!("status_listen {addr}: a loopback address only (the status names tables and errors)");
                }
                Some(l)
            }
            None => None,
        };
        let s = Sender::open(cfg).await?;
        if let Some(l) = listener {
            tracing::info!(addr = %l.local_addr()?, "db-sender status on /status and /metrics");
            let app = status_router(s.progress.clone());
            tokio::spawn(async move { axum::serve(l, app).await });
        }
        s.run(a.snapshot, stop_on_signal()).await?;
        Ok(())
    })
}

/// `GET /status` (JSON) and `GET /metrics` (Prometheus) of a running sender.
fn status_router(p: Arc<fhirsync_db::status::Progress>) -> axum::Router {
    use axum::routing::get;
    let q = p.clone();
    axum::Router::new()
        .route(
            "/status",
            get(move || {
                let p = p.clone();
                async move { axum::Json(p.to_json()) }
            }),
        )
        .route(
            "/metrics",
            get(move || {
                let q = q.clone();
                async move {
                    (
                        [(
                            axum::http::header::CONTENT_TYPE,
                            "text/plain; version=0.0.4",
                        )],
                        q.metrics(),
                    )
                }
            }),
        )
}

/// `fhirsync db-sender --config F status`.
fn sender_status(cfg: &SenderConfig, json: bool) -> anyhow::Result<()> {
    let path = fhirsync_db::status::status_file(&cfg.state_dir);
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("no status at {} (has this sender run yet?)", path.display()))?;
    if json {
        println!("{text}");
        return Ok(());
    }
    let v: serde_json::Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let t = |k: &str| match &v[k] {
        serde_json::Value::Null => "-".to_string(),
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    println!(
        "site {} {} at {} · {} batches, {} changes · {} refused, {} delivery errors · updated {}",
        t("site"),
        t("state"),
        t("position"),
        t("batches"),
        t("changes"),
        t("refused"),
        t("deliveryErrors"),
        t("updated")
    );
    if v["lastError"].is_string() {
        println!(
            "  failing since {} ({} attempts): {}",
            t("failingSince"),
            t("attempts"),
            t("lastError")
        );
    }
    Ok(())
}

async fn open_receiver(path: &Path) -> anyhow::Result<(ReceiverConfig, Receiver)> {
    let cfg = ReceiverConfig::load(path)?;
    let r = Receiver::open(
        &cfg.target,
        &cfg.database,
        cfg.zone()?,
        cfg.change_columns.clone(),
    )
    .await?;
    Ok((cfg, r))
}

pub fn receiver(a: ReceiverArgs) -> anyhow::Result<()> {
    init_logging("info");
    runtime()?.block_on(async {
        let (cfg, r) = open_receiver(&a.config).await?;
        match a.cmd {
            None => serve(cfg, r).await,
            Some(ReceiverCmd::Site { cmd }) => match cmd {
                SiteCmd::Add { site } => {
                    let token = r.add_site(&site).await?;
                    println!("site {site} registered; its token (shown once, give it to the sender's [http] token):");
                    println!("{token}");
                    Ok(())
                }
                SiteCmd::Rotate { site } => {
                    let token = r.rotate_token(&site).await?;
                    println!("site {site} has a new token (shown once; the old one no longer works):");
                    println!("{token}");
                    Ok(())
                }
                SiteCmd::Remove { site } => {
                    r.remove_site(&site).await?;
                    println!("site {site} removed; its rows and conflicts stay");
                    Ok(())
                }
            },
            Some(ReceiverCmd::Status) => {
                println!("{:<16} {:<28} {:<28} {:>10} {:>9} {:>9}", "SITE", "POSITION", "LAST BATCH (UTC)", "RECORDS", "BATCHES", "CONFLICTS");
                for s in r.sites().await? {
                    println!(
                        "{:<16} {:<28} {:<28} {:>10} {:>9} {:>9}",
                        s.site,
                        s.position.as_deref().unwrap_or("-"),
                        s.last_received_at.as_deref().unwrap_or("never"),
                        s.records,
                        s.batches,
                        s.open_conflicts
                    );
                    if let Some(e) = s.last_error {
                        println!("  last error: {e}");
                    }
                }
                Ok(())
            }
            Some(ReceiverCmd::Conflicts { all }) => {
                println!("(times in {}, the receiver's zone)", r.zone);
                for c in r.conflicts(!all).await? {
                    println!(
                        "{} {} {} {} held={} {}{}",
                        c.id,
                        c.site,
                        c.table,
                        c.key,
                        c.held,
                        c.created_at,
                        c.resolution.map(|r| format!(" resolved: {r}")).unwrap_or_default()
                    );
                    println!("  incoming: {}", c.incoming["change"]["row"]);
                    println!("  local:    {}", c.local);
                }
                Ok(())
            }
            Some(ReceiverCmd::Resolve { id, keep }) => {
                let by = std::env::var("USER").unwrap_or_else(|_| "cli".into());
                r.resolve(id, keep, &by).await?;
                println!("conflict {id} resolved");
                Ok(())
            }
        }
    })
}

async fn serve(cfg: ReceiverConfig, r: Receiver) -> anyhow::Result<()> {
    if cfg.listen.is_none() && cfg.nats.is_none() {
        anyhow::bail!("the receiver needs listen (HTTP) or [nats] to receive anything");
    }
    let r = Arc::new(r);
    let stop = stop_on_signal();
    let mut tasks = tokio::task::JoinSet::new();
    if let Some(listen) = &cfg.listen {
        let tls = match (&cfg.tls_cert_file, &cfg.tls_key_file) {
            (Some(cert_file), Some(key_file)) => Some(
                TlsSection {
                    cert_file: cert_file.clone(),
                    key_file: key_file.clone(),
                    client_ca_file: None,
                }
                .server_config()?,
            ),
            (None, None) => None,
            _ => anyhow::bail!("tls_cert_file and tls_key_file go together"),
        };
        let l = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("cannot listen on {listen}"))?;
        let addr = l.local_addr()?;
        if tls.is_none() && !addr.ip().is_loopback() {
            anyhow::bail!(
                "listen {addr} is not a loopback address: site tokens and patient rows would cross the network in clear; set tls_cert_file and tls_key_file (or listen on 127.0.0.1 behind a TLS proxy)"
            );
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        tracing::info!(%addr, zone = %r.zone, database = %r.schema().database, "db-receiver listening on {scheme}://{addr}");
        let app = fhirsync_db::server::router(r.clone(), cfg.admin_token.clone());
        let mut s = stop.clone();
        let until_stop = async move {
            let _ = s.wait_for(|v| *v).await;
        };
        tasks.spawn(async move {
            match tls {
                Some(t) => axum::serve(TlsListener::new(l, t)?, app)
                    .with_graceful_shutdown(until_stop)
                    .await
                    .map_err(anyhow::Error::from),
                None => axum::serve(l, app)
                    .with_graceful_shutdown(until_stop)
                    .await
                    .map_err(anyhow::Error::from),
            }
        });
    }
    if let Some(link) = cfg.nats.clone() {
        let (r, s) = (r.clone(), stop.clone());
        tasks.spawn(async move {
            fhirsync_db::nats::receive(r, link, s)
                .await
                .map_err(anyhow::Error::from)
        });
    }
    // The first task to end (on a signal, or an error) ends the receiver.
    let first = tasks.join_next().await;
    tasks.abort_all();
    match first {
        Some(Ok(r)) => r,
        Some(Err(e)) => Err(e.into()),
        None => Ok(()),
    }
}
