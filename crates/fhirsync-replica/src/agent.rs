//! The node's sync agent: starts the edge loops, stops them, and answers
//! the admin API and `/metrics` about them.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use fhirsync_api::agent::{EdgeCounters, VerifyCounters};
use fhirsync_api::SyncAgent;
use std::time::Duration;

use fhirsync_store::restore::RESTORED_CURSOR;
use fhirsync_store::{DeadLetter, Direction, Store, SyncWrite, WriteRequest};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::EdgeConfig;
use crate::edge::Edge;

pub struct Replicator {
    edges: Vec<Arc<Edge>>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Replicator {
    /// Starts the loops of each edge (pull and push, as enabled).
    pub fn start(store: Arc<dyn Store>, cfgs: Vec<EdgeConfig>) -> Result<Arc<Replicator>, String> {
        let (stop, rx) = watch::channel(false);
        let mut edges = Vec::new();
        let mut tasks = Vec::new();
        for c in cfgs {
            let e = Arc::new(Edge::new(c, store.clone())?);
            if e.cfg.verify_only {
                e.pull.set_state("verify-only", None);
            } else {
                if e.cfg.pull {
                    tasks.push(tokio::spawn(e.clone().run_pull(rx.clone())));
                }
                if e.cfg.push {
                    tasks.push(tokio::spawn(e.clone().run_push(rx.clone())));
                }
            }
            if e.cfg.verify_every_s > 0 {
                tasks.push(tokio::spawn(verify_every(e.clone(), rx.clone())));
            }
            tasks.push(tokio::spawn(after_restore(e.clone(), rx.clone())));
            edges.push(e);
        }
        Ok(Arc::new(Replicator {
            edges,
            stop,
            tasks: Mutex::new(tasks),
        }))
    }

    pub fn edges_ref(&self) -> &[Arc<Edge>] {
        &self.edges
    }

    /// Tells every loop to stop, without waiting.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops every loop and waits for them; in-flight writes finish.
    pub async fn shutdown(&self) {
        self.stop();
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .map(|mut t| t.drain(..).collect())
            .unwrap_or_default();
        for t in tasks {
            let _ = t.await;
        }
    }
}

/// Runs anti-entropy with repair every `verify_every_s` until `stop`;
/// the first run comes one period after the start, when the loops have
/// caught up. A failed run is logged and kept in the edge's status.
async fn verify_every(e: Arc<Edge>, mut stop: watch::Receiver<bool>) {
    let period = std::time::Duration::from_secs(e.cfg.verify_every_s);
    loop {
        tokio::select! {
            _ = tokio::time::sleep(period) => {}
            _ = stop.changed() => return,
        }
        if *stop.borrow() {
            return;
        }
        tokio::select! {
            _ = e.verify(true) => {}
            _ = stop.changed() => return,
        }
    }
}

/// How long a restored node waits for its pull to catch up before the
/// anti-entropy run that follows a restore (what the pull brings need not
/// be repaired; the run is right without the wait, only slower).
pub const RESTORE_CATCH_UP_WAIT: Duration = Duration::from_secs(60);

/// After a restore from a backup (see [`fhirsync_store::restore`]): once
/// the pull has caught up, anti-entropy with repair, retried until a run
/// succeeds, whatever `verify_every_s` says; then the marker is cleared.
async fn after_restore(e: Arc<Edge>, mut stop: watch::Receiver<bool>) {
    match e.store.cursor(RESTORED_CURSOR).await {
        Ok(Some(n)) if n > 0 => {}
        _ => return,
    }
    let edge = e.cfg.name.as_str();
    tracing::warn!(
        edge,
        "this node was restored from a backup: comparing it with its parent"
    );
    let started = tokio::time::Instant::now();
    while e.cfg.pull && !e.cfg.verify_only && started.elapsed() < RESTORE_CATCH_UP_WAIT {
        let pull = e.stats(Direction::Pull);
        let ok = pull.state.lock().map(|s| s.0 == "ok").unwrap_or(false);
        if ok && pull.lag.load(Ordering::Relaxed) == 0 {
            break;
        }
        if !e.pause(Duration::from_millis(200), &mut stop).await {
            return;
        }
    }
    let mut attempt = 0;
    loop {
        let r = tokio::select! {
            r = e.verify(true) => r,
            _ = stop.changed() => return,
        };
        match r {
            Ok(rep) => {
                tracing::info!(
                    edge,
                    differences = rep.differences,
                    pulled = rep.pulled.stored,
                    pushed = rep.pushed.stored,
                    "after the restore: repaired what differed from the parent"
                );
                let w = SyncWrite::SetCursor {
                    key: RESTORED_CURSOR.to_owned(),
                    seq: 0,
                    audit: None,
                };
                match e.store.write(WriteRequest::Sync(w)).await {
                    Ok(_) => return,
                    Err(err) => {
                        tracing::warn!(edge, error = %err, "cannot clear the restore marker")
                    }
                }
            }
            Err((_, why)) => {
                tracing::warn!(edge, error = %why, "after the restore: anti-entropy failed; retrying")
            }
        }
        attempt += 1;
        if !e.pause(e.delay(attempt), &mut stop).await {
            return;
        }
    }
}

#[async_trait]
impl SyncAgent for Replicator {
    async fn edges(&self) -> Vec<Value> {
        self.edges
            .iter()
            .map(|e| {
                json!({
                    "name": e.cfg.name,
                    "parentUrl": e.cfg.url,
                    "parentNodeId": e.parent_id(),
                    "conflictPolicy": e.cfg.conflict_policy.as_str(),
                    "pull": e.pull.to_json("pull", e.cfg.pull),
                    "push": e.push.to_json("push", e.cfg.push),
                    "verify": e.verify.to_json(),
                    "verifyEveryS": e.cfg.verify_every_s,
                })
            })
            .collect()
    }

    fn owns(&self, edge: &str) -> bool {
        self.edges.iter().any(|e| e.cfg.name == edge)
    }

    async fn retry(&self, letter: &DeadLetter) -> Result<(), (u16, String)> {
        let e = self
            .edges
            .iter()
            .find(|e| e.cfg.name == letter.letter.edge)
            .ok_or((
                409,
                format!("edge '{}' is not configured", letter.letter.edge),
            ))?;
        e.retry_dead_letter(letter).await
    }

    async fn verify(
        &self,
        edge: Option<&str>,
        repair: bool,
    ) -> Option<Result<Value, (u16, String)>> {
        let e = match edge {
            Some(name) => self.edges.iter().find(|e| e.cfg.name == name)?,
            None => self.edges.first()?,
        };
        Some(
            e.verify(repair)
                .await
                .map(|r| serde_json::to_value(r).unwrap_or(Value::Null)),
        )
    }

    fn verify_counters(&self) -> Vec<VerifyCounters> {
        self.edges
            .iter()
            .map(|e| VerifyCounters {
                edge: e.cfg.name.clone(),
                runs: e.verify.runs.load(Ordering::Relaxed),
                differences: e.verify.differences.load(Ordering::Relaxed),
                repaired: e.verify.repaired.load(Ordering::Relaxed),
                verified: e.verify.in_sync.lock().ok().and_then(|g| *g),
            })
            .collect()
    }

    fn counters(&self) -> Vec<EdgeCounters> {
        let mut out = Vec::new();
        for e in &self.edges {
            for (dir, s, on) in [("pull", &e.pull, e.cfg.pull), ("push", &e.push, e.cfg.push)] {
                if on {
                    out.push(s.counters(&e.cfg.name, dir));
                }
            }
        }
        out
    }
}
