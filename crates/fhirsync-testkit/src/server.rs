//! Real servers for tests: [`InProcess`] runs the API in this process on a
//! free port; [`NodeProcess`] runs the `fhirsync` binary and can be killed.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fhirsync_api::{ApiConfig, AppState};
use fhirsync_core::clock::{Clock, SystemClock};
use fhirsync_store::sqlite::{SqliteConfig, SqliteStore};
use fhirsync_store::Store;
use tokio::sync::watch;

/// The API served from this process over real HTTP on 127.0.0.1.
pub struct InProcess {
    pub base: String,
    pub client: reqwest::Client,
    pub store: Arc<dyn Store>,
    pub dir: tempfile::TempDir,
    /// The parent edge's agent, when `Options::parent` was given.
    pub replicator: Option<Arc<fhirsync_replica::Replicator>>,
    /// The NATS agent, when `Options::nats` was given.
    pub nats: Option<Arc<fhirsync_nats::NatsAgent>>,
    /// The subscriptions agent, when `Options::subs` was given.
    pub subs: Option<Arc<fhirsync_subs::Notifier>>,
    /// The console's base URL (`http://127.0.0.1:PORT`), when `Options::console` was given.
    pub console: Option<String>,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
pub struct Options {
    pub api: ApiConfig,
    pub clock: Arc<dyn Clock>,
    pub node_id: Option<String>,
    pub children: Vec<fhirsync_api::ChildConfig>,
    pub parent: Option<fhirsync_replica::EdgeConfig>,
    pub nats: Option<fhirsync_nats::NatsConfig>,
    /// Serve subscriptions (the `[nats]` servers are the default connection).
    pub subs: Option<fhirsync_subs::SubsConfig>,
    /// Serve the web console on its own port (`InProcess::console`).
    pub console: Option<fhirsync_api::console::ConsoleConfig>,
    /// Bulk data; an empty `dir` is `bulk` in the server's temp directory.
    pub bulk: Option<fhirsync_api::bulk::BulkConfig>,
    /// Store on this PostgreSQL database (a URL) instead of SQLite.
    pub postgres: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            api: ApiConfig::default(),
            clock: Arc::new(SystemClock),
            node_id: Some("test-node".into()),
            children: Vec::new(),
            parent: None,
            nats: None,
            subs: None,
            console: None,
            bulk: Some(fhirsync_api::bulk::BulkConfig::new("")),
            postgres: None,
        }
    }
}

impl InProcess {
    pub async fn start() -> InProcess {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> InProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let store: Arc<dyn Store> = match &opts.postgres {
            Some(url) => {
                let node = fhirsync_store::postgres::PgNode {
                    node_id: opts.node_id.clone(),
                    ..Default::default()
                };
                let cfg = fhirsync_store::postgres::PgConfig::new(url.clone());
                let s = tokio::task::block_in_place(|| {
                    fhirsync_store::postgres::PgStore::open_with_clock(
                        cfg,
                        node,
                        opts.clock.clone(),
                    )
                });
                Arc::new(s.expect("open the PostgreSQL store"))
            }
            None => {
                let mut cfg = SqliteConfig::new(SqliteStore::db_path(dir.path()));
                cfg.node_id = opts.node_id.clone();
                Arc::new(SqliteStore::open_with_clock(cfg, opts.clock.clone()).expect("open store"))
            }
        };
        let (shutdown, rx) = watch::channel(false);
        let mut state = AppState::new(store.clone(), opts.api.clone(), rx);
        state.children = Arc::new(fhirsync_api::Children::new(opts.children.clone()));
        if let Some(mut b) = opts.bulk.clone() {
            if b.dir.as_os_str().is_empty() {
                b.dir = dir.path().join("bulk");
            }
            state = state.with_bulk(b).expect("bulk jobs directory");
        }
        let replicator = match &opts.parent {
            Some(p) => {
                let p = fhirsync_replica::EdgeConfig {
                    validation: opts.api.validation,
                    ..p.clone()
                };
                let r = fhirsync_replica::Replicator::start(store.clone(), vec![p])
                    .expect("start the parent edge");
                state.agents.push(r.clone());
                Some(r)
            }
            None => None,
        };
        let nats = match &opts.nats {
            Some(n) => {
                let n = fhirsync_nats::NatsConfig {
                    validation: opts.api.validation,
                    ..n.clone()
                };
                let a = fhirsync_nats::NatsAgent::start(store.clone(), n)
                    .await
                    .expect("start the NATS agent");
                state.agents.push(a.clone());
                Some(a)
            }
            None => None,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let subs = match &opts.subs {
            Some(c) => {
                let mut c = c.clone();
                if let Some(n) = &opts.nats {
                    c.nats.push(n.into());
                }
                let s =
                    fhirsync_subs::Notifier::start(store.clone(), c, format!("http://{addr}/fhir"))
                        .expect("start subscriptions");
                state.agents.push(s.clone());
                Some(s)
            }
            None => None,
        };
        let console = match opts.console.clone() {
            Some(cc) => {
                let l = tokio::net::TcpListener::bind("127.0.0.1:0")
                    .await
                    .expect("bind");
                let caddr = l.local_addr().expect("addr");
                let app = fhirsync_api::console::router(fhirsync_api::console::Console::start(
                    state.clone(),
                    cc,
                ));
                let mut stop = shutdown.subscribe();
                tokio::spawn(async move {
                    let _ = axum::serve(l, app)
                        .with_graceful_shutdown(async move {
                            let _ = stop.wait_for(|v| *v).await;
                        })
                        .await;
                });
                Some(format!("http://{caddr}"))
            }
            None => None,
        };
        let mut stop = shutdown.subscribe();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, fhirsync_api::service(state))
                .with_graceful_shutdown(async move {
                    let _ = stop.wait_for(|v| *v).await;
                })
                .await;
        });
        InProcess {
            base: format!("http://{addr}/fhir"),
            client: reqwest::Client::new(),
            store,
            dir,
            replicator,
            nats,
            subs,
            console,
            shutdown,
            task,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }
}

impl Drop for InProcess {
    fn drop(&mut self) {
        if let Some(r) = &self.replicator {
            r.stop();
        }
        if let Some(n) = &self.nats {
            n.stop();
        }
        if let Some(s) = &self.subs {
            s.stop();
        }
        let _ = self.shutdown.send(true);
        self.task.abort();
    }
}

/// A `fhirsync serve` child process on a free port, killed on drop.
pub struct NodeProcess {
    pub base: String,
    pub data_dir: PathBuf,
    child: Child,
}

impl NodeProcess {
    /// Starts `bin serve --listen 127.0.0.1:0 --data-dir DIR` plus `extra`
    /// and waits until it listens.
    pub fn spawn(bin: &Path, data_dir: &Path, extra: &[&str]) -> anyhow::Result<NodeProcess> {
        Self::spawn_at(bin, data_dir, "127.0.0.1:0", extra)
    }

    /// Like [`NodeProcess::spawn`] on a given address (a restart that keeps its port).
    pub fn spawn_at(
        bin: &Path,
        data_dir: &Path,
        listen: &str,
        extra: &[&str],
    ) -> anyhow::Result<NodeProcess> {
        let mut child = Command::new(bin)
            .arg("serve")
            .args(["--listen", listen, "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .env("RUST_LOG", "warn")
            // Tests of the API's authentication configure it themselves.
            .env("FHIRSYNC_ANONYMOUS", "true")
            .env("FHIRSYNC_CONSOLE_LISTEN", "127.0.0.1:0")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| anyhow::anyhow!("no stdout"))?;
        let mut lines = BufReader::new(stdout).lines();
        let base = loop {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(i) = l.find("http://").or_else(|| l.find("https://")) {
                        break l[i..].trim().to_owned();
                    }
                }
                _ => {
                    let _ = child.kill();
                    let status = child.wait()?;
                    anyhow::bail!("fhirsync serve exited before listening ({status})");
                }
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(NodeProcess {
            base,
            data_dir: data_dir.to_owned(),
            child,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}/{}", self.base, path.trim_start_matches('/'))
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no shutdown code runs.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits up to `timeout` for a clean exit.
    pub fn terminate(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if std::time::Instant::now() > deadline {
                self.kill();
                anyhow::bail!("did not stop within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for NodeProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
