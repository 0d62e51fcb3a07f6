//! Commits audit records in batches: one store write per batch, at most
//! `LINGER` after the first record of a batch, or as soon as
//! `BATCH_MAX` records wait. In `wait` mode a request's answer waits for
//! its record's commit; otherwise the answer goes at once and the record
//! follows within `LINGER`. `flush` makes every record sent so far
//! readable (the trail's searches and shutdown call it).

use std::sync::Arc;
use std::time::Duration;

use fhirsync_core::audit::AuditRecord;
use fhirsync_store::{Store, SyncWrite, WriteRequest};
use tokio::sync::{mpsc, oneshot};

/// Longest time a record waits for its batch. Every commit costs the
/// writer, and each reader its page cache: under load, 100 ms read about
/// 8 % faster than 10 ms (`docs/benchmarks.md`); 50 ms keeps records
/// closer to their answers.
pub const LINGER: Duration = Duration::from_millis(50);
/// Most records in one commit.
const BATCH_MAX: usize = 2048;
/// Records queued before senders wait (back-pressure).
const QUEUE_MAX: usize = 16_384;

enum Msg {
    Record(Box<AuditRecord>, Option<oneshot::Sender<bool>>),
    Flush(oneshot::Sender<bool>),
}

#[derive(Clone)]
pub struct Auditor {
    tx: mpsc::Sender<Msg>,
    /// Answers wait for their record's commit.
    pub wait: bool,
}

impl Auditor {
    /// Starts the batching task (it ends when every `Auditor` is dropped).
    pub fn start(store: Arc<dyn Store>, wait: bool) -> Auditor {
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        tokio::spawn(run(store, rx, wait));
        Auditor { tx, wait }
    }

    /// Records `r`; `false` when it could not be stored (only known in
    /// `wait` mode, where this returns after the commit).
    pub async fn record(&self, r: AuditRecord) -> bool {
        if !self.wait {
            return self.tx.send(Msg::Record(Box::new(r), None)).await.is_ok();
        }
        let (done, rx) = oneshot::channel();
        if self
            .tx
            .send(Msg::Record(Box::new(r), Some(done)))
            .await
            .is_err()
        {
            return false;
        }
        rx.await.unwrap_or(false)
    }

    /// Returns once every record sent before the call is committed.
    pub async fn flush(&self) -> bool {
        let (done, rx) = oneshot::channel();
        if self.tx.send(Msg::Flush(done)).await.is_err() {
            return false;
        }
        rx.await.unwrap_or(false)
    }
}

async fn run(store: Arc<dyn Store>, mut rx: mpsc::Receiver<Msg>, wait: bool) {
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::new();
        let mut waiters = Vec::new();
        let mut take = |m: Msg, batch: &mut Vec<AuditRecord>| match m {
            Msg::Record(r, w) => {
                batch.push(*r);
                waiters.extend(w);
                false
            }
            Msg::Flush(w) => {
                waiters.push(w);
                true
            }
        };
        let mut flush = take(first, &mut batch);
        // In wait mode callers are blocked: take what is queued and go.
        // Otherwise linger a little to make the batch worth its commit.
        let deadline = tokio::time::Instant::now() + if wait { Duration::ZERO } else { LINGER };
        while batch.len() < BATCH_MAX && !flush {
            let m = match rx.try_recv() {
                Ok(m) => m,
                Err(_) if wait => break,
                Err(_) => match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(m)) => m,
                    _ => break,
                },
            };
            flush = take(m, &mut batch);
        }
        let ok = batch.is_empty()
            || match store
                .write(WriteRequest::Sync(SyncWrite::AuditEvents(batch)))
                .await
            {
                Ok(_) => true,
                Err(e) => {
                    tracing::error!(error = %e, "audit records could not be stored");
                    false
                }
            };
        for w in waiters {
            let _ = w.send(ok);
        }
    }
}
