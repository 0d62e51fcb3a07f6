//! The NATS agent: connects (retrying in the background, so a node starts
//! while NATS is down), creates or checks the stream, runs the outbox and
//! one subscriber per followed node, and answers the admin API.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::{self, stream};
use async_trait::async_trait;
use fhirsync_api::agent::EdgeCounters;
use fhirsync_api::SyncAgent;
use fhirsync_replica::edge::DirStats;
use fhirsync_store::{DeadLetter, Store};
use fhirsync_sync::retry::backoff;
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{Mode, NatsConfig};
use crate::outbox::pause;
use crate::outbox::Publisher;
use crate::{edge_name, VIA_NATS};

pub struct NatsAgent {
    cfg: NatsConfig,
    store: Arc<dyn Store>,
    /// Connection state, server errors (auth, permissions) and their count.
    connection: Arc<DirStats>,
    outbox: Arc<DirStats>,
    follows: Vec<(String, Arc<DirStats>)>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl NatsAgent {
    pub async fn start(store: Arc<dyn Store>, cfg: NatsConfig) -> Result<Arc<NatsAgent>, String> {
        cfg.check(Some(store.node_id()))?;
        let connection = Arc::new(DirStats::default());
        let client = connect(&cfg, store.node_id(), connection.clone()).await?;
        let js = jetstream::new(client.clone());
        let (stop, rx) = watch::channel(false);
        let outbox = Arc::new(DirStats::default());
        let follows: Vec<(String, Arc<DirStats>)> = cfg
            .follow
            .iter()
            .map(|f| (f.node.clone(), Arc::new(DirStats::default())))
            .collect();
        let agent = Arc::new(NatsAgent {
            cfg: cfg.clone(),
            store: store.clone(),
            connection,
            outbox: outbox.clone(),
            follows: follows.clone(),
            stop,
            tasks: Mutex::new(Vec::new()),
        });
        let a2 = agent.clone();
        let supervisor = tokio::spawn(async move {
            let mut rx = rx;
            let mut tasks = Vec::new();
            match a2.cfg.mode {
                Mode::Jetstream => {
                    let Some(stream) = ensure_stream(&js, &a2.cfg, &a2.outbox, &mut rx).await
                    else {
                        return;
                    };
                    if a2.cfg.publish {
                        tasks.push(tokio::spawn(crate::outbox::run(
                            a2.store.clone(),
                            Publisher::JetStream(js.clone()),
                            client.clone(),
                            a2.cfg.clone(),
                            a2.outbox.clone(),
                            rx.clone(),
                        )));
                    }
                    for (f, (_, st)) in a2.cfg.follow.iter().zip(&a2.follows) {
                        tasks.push(tokio::spawn(crate::subscriber::run(
                            a2.store.clone(),
                            stream.clone(),
                            a2.cfg.clone(),
                            f.clone(),
                            st.clone(),
                            rx.clone(),
                        )));
                    }
                }
                Mode::Core => {
                    if a2.cfg.publish {
                        tasks.push(tokio::spawn(crate::outbox::run(
                            a2.store.clone(),
                            Publisher::Core(client.clone()),
                            client.clone(),
                            a2.cfg.clone(),
                            a2.outbox.clone(),
                            rx.clone(),
                        )));
                    }
                    for (f, (_, st)) in a2.cfg.follow.iter().zip(&a2.follows) {
                        tasks.push(tokio::spawn(crate::subscriber::run_core(
                            a2.store.clone(),
                            client.clone(),
                            a2.cfg.clone(),
                            f.clone(),
                            st.clone(),
                            rx.clone(),
                        )));
                    }
                }
            }
            if let Ok(mut t) = a2.tasks.lock() {
                t.extend(tasks);
            }
        });
        if let Ok(mut t) = agent.tasks.lock() {
            t.push(supervisor);
        }
        Ok(agent)
    }

    /// Stops the outbox and subscribers and waits for them.
    pub async fn shutdown(&self) {
        let _ = self.stop.send(true);
        loop {
            let tasks: Vec<_> = self
                .tasks
                .lock()
                .map(|mut t| t.drain(..).collect())
                .unwrap_or_default();
            if tasks.is_empty() {
                break;
            }
            for t in tasks {
                let _ = t.await;
            }
        }
    }

    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }
}

/// Connection options from the config: TLS, NKey or credentials, and an
/// event callback that makes server errors (authorization, permission
/// violations) visible in logs, the admin API and metrics.
async fn options(
    cfg: &NatsConfig,
    node: &str,
    conn: Arc<DirStats>,
) -> Result<async_nats::ConnectOptions, String> {
    let o = cfg
        .auth()
        .apply(async_nats::ConnectOptions::new().name(format!("fhirsync-{node}")))
        .await?;
    Ok(o.event_callback(move |ev| {
        let conn = conn.clone();
        async move {
            use async_nats::Event;
            match ev {
                Event::Connected => conn.set_state("connected", None),
                Event::Disconnected => conn.set_state("disconnected", None),
                Event::ServerError(e) => {
                    tracing::error!(error = %e, "NATS server error");
                    conn.errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    conn.set_state("error", Some(format!("server: {e}")));
                }
                Event::ClientError(e) => {
                    tracing::warn!(error = %e, "NATS client error");
                    conn.errors
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    conn.set_state("error", Some(format!("client: {e}")));
                }
                other => tracing::debug!(event = %other, "NATS"),
            }
        }
    }))
}

/// Connects. Credentials the server refuses, or a TLS set-up that cannot
/// work, fail the start with a clear reason; a server that is down is
/// retried in the background (the outbox publishes when it is back).
async fn connect(
    cfg: &NatsConfig,
    node: &str,
    conn: Arc<DirStats>,
) -> Result<async_nats::Client, String> {
    use async_nats::ConnectErrorKind as K;
    let first = options(cfg, node, conn.clone())
        .await?
        .connect(cfg.servers.clone())
        .await;
    match first {
        Ok(c) => {
            conn.set_state("connected", None);
            Ok(c)
        }
        Err(e) if matches!(e.kind(), K::Authentication | K::AuthorizationViolation) => {
            Err(format!("NATS refused this node (authorization): {e}"))
        }
        // A TLS alert from the server (no or an unknown client certificate)
        // comes as an I/O error; it will not pass by retrying.
        Err(e) if e.kind() == K::Tls || tls_refusal(&e.to_string()) => {
            Err(format!("NATS refused this node (TLS): {e}"))
        }
        Err(e) => {
            tracing::warn!(error = %e, "NATS is not reachable yet; retrying in the background");
            conn.set_state("disconnected", Some(e.to_string()));
            options(cfg, node, conn)
                .await?
                .retry_on_initial_connect()
                .connect(cfg.servers.clone())
                .await
                .map_err(|e| format!("cannot connect to NATS: {e}"))
        }
    }
}

/// Whether an I/O error text is a TLS handshake refusal.
fn tls_refusal(msg: &str) -> bool {
    let m = msg.to_ascii_lowercase();
    m.contains("alert") || m.contains("certificate") || m.contains("handshake")
}

/// Creates the stream, or checks that an existing one takes our subjects.
async fn ensure_stream(
    js: &jetstream::Context,
    cfg: &NatsConfig,
    stats: &DirStats,
    stop: &mut watch::Receiver<bool>,
) -> Option<stream::Stream> {
    let subjects = format!("{}.>", cfg.subject_prefix);
    let mut attempt = 0;
    loop {
        let r = js
            .get_or_create_stream(stream::Config {
                name: cfg.stream.clone(),
                subjects: vec![subjects.clone()],
                storage: stream::StorageType::File,
                max_age: Duration::from_secs(cfg.stream_max_age_s),
                max_bytes: cfg.stream_max_bytes,
                duplicate_window: Duration::from_secs(cfg.duplicate_window_s),
                num_replicas: cfg.replicas,
                ..Default::default()
            })
            .await;
        let why = match r {
            Ok(mut s) => match s.info().await {
                Ok(info)
                    if info
                        .config
                        .subjects
                        .iter()
                        .any(|x| x == &subjects || x == ">") =>
                {
                    return Some(s)
                }
                Ok(info) => format!(
                    "stream {} exists with subjects {:?}, which do not include {subjects}",
                    cfg.stream, info.config.subjects
                ),
                Err(e) => format!("stream {}: {e}", cfg.stream),
            },
            Err(e) => format!("cannot create or read stream {}: {e}", cfg.stream),
        };
        tracing::warn!("{why}");
        stats
            .errors
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        stats.set_state("retrying", Some(why));
        if pause(backoff(attempt, 0.5), stop).await {
            return None;
        }
        attempt += 1;
    }
}

#[async_trait]
impl SyncAgent for NatsAgent {
    async fn edges(&self) -> Vec<Value> {
        let mut out = vec![json!({
            "name": "nats",
            "servers": self.cfg.servers,
            "stream": self.cfg.stream,
            "subject": self.cfg.subject(self.store.node_id(), "<Type>"),
            "connection": self.connection.to_json("connection", true),
            "publish": self.outbox.to_json("publish", self.cfg.publish),
        })];
        for (node, st) in &self.follows {
            out.push(json!({
                "name": edge_name(node),
                "conflictPolicy": self.cfg.conflict_policy.as_str(),
                "pull": st.to_json("pull", true),
            }));
        }
        out
    }

    fn owns(&self, edge: &str) -> bool {
        self.follows.iter().any(|(n, _)| edge_name(n) == edge)
    }

    async fn retry(&self, d: &DeadLetter) -> Result<(), (u16, String)> {
        fhirsync_replica::edge::apply_again(
            &self.store,
            d,
            VIA_NATS,
            self.cfg.conflict_policy,
            self.cfg.validation,
        )
        .await?;
        fhirsync_replica::edge::drop_dead_letter(&self.store, d).await
    }

    fn counters(&self) -> Vec<EdgeCounters> {
        let mut out = vec![self.connection.counters("nats", "connection")];
        if self.cfg.publish {
            out.push(self.outbox.counters("nats", "publish"));
        }
        for (node, st) in &self.follows {
            out.push(st.counters(&edge_name(node), "pull"));
        }
        out
    }
}
