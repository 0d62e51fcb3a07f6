//! The node's background agents (parent edge, NATS transport,
//! subscriptions), and on PostgreSQL the lease that runs them in exactly
//! one of the processes sharing the database: [`Leased`] stands in for
//! them in every process, starts them when its process takes the lease
//! and stops them when it loses it.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use async_trait::async_trait;
use fhirsync_api::agent::{EdgeCounters, SyncAgent, VerifyCounters};
use fhirsync_replica::Replicator;
use fhirsync_store::postgres::lease::Lease;
use fhirsync_store::{DeadLetter, Store};
use serde_json::{json, Value};
use tokio::sync::watch;

use crate::config::Config;

/// The lease of a node's agents.
pub const LEASE_NAME: &str = "fhirsync-agents";

/// Pause before starting the agents again after they failed to start.
const RESTART_PAUSE_S: u64 = 5;

/// The running agents of one process.
pub struct Agents {
    replicator: Option<Arc<Replicator>>,
    nats: Option<Arc<fhirsync_nats::NatsAgent>>,
    subs: Arc<fhirsync_subs::Notifier>,
}

impl Agents {
    /// Starts what the configuration asks for; `base` is the node's own
    /// FHIR base (for subscriptions' notifications).
    pub async fn start(
        cfg: &Config,
        store: Arc<dyn Store>,
        base: String,
    ) -> anyhow::Result<Agents> {
        let validation = cfg.validation_mode()?;
        let mut edges: Vec<fhirsync_replica::EdgeConfig> = cfg
            .parent
            .iter()
            .map(|p| fhirsync_replica::EdgeConfig {
                validation,
                ..p.clone()
            })
            .collect();
        edges.extend(follow_verify_edges(cfg, validation));
        let replicator = if edges.is_empty() {
            None
        } else {
            Some(
                Replicator::start(store.clone(), edges)
                    .map_err(|e| anyhow::anyhow!("parent edge: {e}"))?,
            )
        };
        let nats = match &cfg.nats {
            Some(n) => Some(
                fhirsync_nats::NatsAgent::start(
                    store.clone(),
                    fhirsync_nats::NatsConfig {
                        validation,
                        ..n.clone()
                    },
                )
                .await
                .map_err(|e| anyhow::anyhow!("nats: {e}"))?,
            ),
            None => None,
        };
        let mut sc = cfg.subscriptions.clone();
        if let Some(n) = &cfg.nats {
            sc.nats.push(n.into());
        }
        if let Some(b) = &cfg.base_url {
            sc.base_url.get_or_insert_with(|| b.clone());
        }
        let subs = fhirsync_subs::Notifier::start(store, sc, base)
            .map_err(|e| anyhow::anyhow!("subscriptions: {e}"))?;
        Ok(Agents {
            replicator,
            nats,
            subs,
        })
    }

    pub fn list(&self) -> Vec<Arc<dyn SyncAgent>> {
        let mut v: Vec<Arc<dyn SyncAgent>> = Vec::new();
        if let Some(r) = &self.replicator {
            v.push(r.clone());
        }
        if let Some(n) = &self.nats {
            v.push(n.clone());
        }
        v.push(self.subs.clone());
        v
    }

    /// Stops every agent, each after its work in hand.
    pub async fn shutdown(&self) {
        if let Some(r) = &self.replicator {
            r.shutdown().await;
        }
        if let Some(n) = &self.nats {
            n.shutdown().await;
        }
        self.subs.shutdown().await;
    }
}

/// The anti-entropy edges of the NATS follows that name the followed
/// node's HTTP base (`verify_url`): named `nats:<node>:verify`, pull side only
/// (each node verifies what it follows), no loops (NATS carries the
/// changes), the NATS conflict policy.
fn follow_verify_edges(
    cfg: &Config,
    validation: fhirsync_core::validate::Mode,
) -> Vec<fhirsync_replica::EdgeConfig> {
    let Some(n) = &cfg.nats else {
        return Vec::new();
    };
    n.follow
        .iter()
        .filter_map(|f| {
            let (url, token) = (f.verify_url.as_deref()?, f.verify_token.as_deref()?);
            let mut e = fhirsync_replica::EdgeConfig::new(url, token);
            e.name = format!("{}:verify", fhirsync_nats::edge_name(&f.node));
            e.push = false;
            e.pull_filter.types = f.types.clone();
            e.conflict_policy = n.conflict_policy;
            e.verify_every_s = f.verify_every_s;
            e.validation = validation;
            e.verify_only = true;
            Some(e)
        })
        .collect()
}

/// The agents behind the lease: empty while another process holds it.
pub struct Leased {
    running: Mutex<Option<Arc<Agents>>>,
    held: watch::Receiver<bool>,
    _lease: Lease,
}

impl Leased {
    /// Tries for the lease; the returned task starts and stops the agents
    /// as the lease comes and goes, until `shutdown`, then stops them.
    pub fn start(
        cfg: Config,
        pg: &fhirsync_store::postgres::PgConfig,
        store: Arc<dyn Store>,
        me: fhirsync_store::ProcessInfo,
        mut shutdown: watch::Receiver<bool>,
    ) -> anyhow::Result<(Arc<Leased>, tokio::task::JoinHandle<()>)> {
        let base = me.base.clone();
        let lease = Lease::start(pg, LEASE_NAME, me).context("the agents' lease")?;
        let leased = Arc::new(Leased {
            running: Mutex::new(None),
            held: lease.watch(),
            _lease: lease,
        });
        let me = leased.clone();
        let task = tokio::spawn(async move {
            let mut held = me.held.clone();
            loop {
                tokio::select! {
                    _ = held.wait_for(|h| *h) => {}
                    _ = shutdown.wait_for(|s| *s) => break,
                }
                let agents = match Agents::start(&cfg, store.clone(), base.clone()).await {
                    Ok(a) => Arc::new(a),
                    Err(e) => {
                        tracing::error!(error = %e, "the agents cannot start; trying again");
                        tokio::time::sleep(Duration::from_secs(RESTART_PAUSE_S)).await;
                        continue;
                    }
                };
                if let Ok(mut r) = me.running.lock() {
                    *r = Some(agents.clone());
                }
                tracing::info!("this process runs the node's agents");
                tokio::select! {
                    _ = held.wait_for(|h| !*h) => {
                        tracing::warn!("the lease is lost: the agents stop here");
                    }
                    _ = shutdown.wait_for(|s| *s) => {}
                }
                if let Ok(mut r) = me.running.lock() {
                    r.take();
                }
                agents.shutdown().await;
                if *shutdown.borrow() {
                    break;
                }
            }
        });
        Ok((leased, task))
    }

    fn agents(&self) -> Vec<Arc<dyn SyncAgent>> {
        self.running
            .lock()
            .ok()
            .and_then(|r| r.as_ref().map(|a| a.list()))
            .unwrap_or_default()
    }
}

#[async_trait]
impl SyncAgent for Leased {
    async fn edges(&self) -> Vec<Value> {
        let agents = self.agents();
        let holder = !agents.is_empty();
        let mut out = vec![json!({
            "name": "lease",
            "state": if holder { "holder" } else { "standby" },
            "detail": if holder {
                "this process runs the node's agents"
            } else {
                "another process on the database runs the node's agents"
            },
        })];
        for a in agents {
            out.extend(a.edges().await);
        }
        out
    }

    fn owns(&self, edge: &str) -> bool {
        self.agents().iter().any(|a| a.owns(edge))
    }

    async fn retry(&self, letter: &DeadLetter) -> Result<(), (u16, String)> {
        match self
            .agents()
            .into_iter()
            .find(|a| a.owns(&letter.letter.edge))
        {
            Some(a) => a.retry(letter).await,
            None => Err((
                503,
                "another process runs the node's agents: retry through it".into(),
            )),
        }
    }

    fn counters(&self) -> Vec<EdgeCounters> {
        self.agents().iter().flat_map(|a| a.counters()).collect()
    }

    async fn verify(
        &self,
        edge: Option<&str>,
        repair: bool,
    ) -> Option<Result<Value, (u16, String)>> {
        for a in self.agents() {
            if let Some(r) = a.verify(edge, repair).await {
                return Some(r);
            }
        }
        None
    }

    fn verify_counters(&self) -> Vec<VerifyCounters> {
        self.agents()
            .iter()
            .flat_map(|a| a.verify_counters())
            .collect()
    }
}
