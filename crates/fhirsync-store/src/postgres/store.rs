//! [`PgStore`]: the [`Store`] on PostgreSQL. Reads run on a pool of
//! connections (blocking, off the async runtime); writes go to this
//! process's writer thread; the last committed `seq` follows every
//! process's commits through the log listener.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use fhirsync_core::clock::{Clock, SystemClock};
use fhirsync_core::Hlc;
use tokio::sync::{mpsc, oneshot, watch};

use super::conn::PgConn;
use super::log::{read_head, Listener};
use super::writer::{self, PgWriter};
use super::{connect, schema, PgConfig};
use crate::sql::{custom_params, Db};
use crate::sqlite::schema::INDEX_VERSION;
use crate::sqlite::writer::{Job, LoadDone, StreamMsg};
use crate::stamp::Stamper;
use crate::types::*;
use crate::{Store, StoreError};

/// Connections for reads: at most `max` open, idle ones kept.
struct Pool {
    cfg: PgConfig,
    idle: Mutex<(Vec<PgConn>, usize)>,
    freed: Condvar,
    max: usize,
}

impl Pool {
    fn with<R>(&self, f: impl FnOnce(&dyn Db) -> Result<R, StoreError>) -> Result<R, StoreError> {
        let conn = {
            let mut g = self.idle.lock().map_err(|_| poisoned())?;
            loop {
                if let Some(c) = g.0.pop() {
                    break Some(c);
                }
                if g.1 < self.max {
                    g.1 += 1;
                    break None;
                }
                g = self.freed.wait(g).map_err(|_| poisoned())?;
            }
        };
        let conn = match conn {
            Some(c) => c,
            None => match connect(&self.cfg) {
                Ok(c) => PgConn::new(c),
                Err(e) => {
                    self.give_back(None);
                    return Err(e);
                }
            },
        };
        let r = f(&conn);
        self.give_back((!conn.is_closed()).then_some(conn));
        r
    }

    fn give_back(&self, conn: Option<PgConn>) {
        if let Ok(mut g) = self.idle.lock() {
            match conn {
                Some(c) => g.0.push(c),
                None => g.1 = g.1.saturating_sub(1),
            }
        }
        self.freed.notify_one();
    }
}

impl Drop for Pool {
    /// The blocking client's drop blocks on its own runtime, which must
    /// not happen on an async runtime's thread: the idle connections are
    /// closed on a thread of their own.
    fn drop(&mut self) {
        let idle = match self.idle.get_mut() {
            Ok(g) => std::mem::take(&mut g.0),
            Err(_) => return,
        };
        if !idle.is_empty() {
            let _ = std::thread::Builder::new()
                .name("fhirsync-pg-close".into())
                .spawn(move || drop(idle));
        }
    }
}

fn poisoned() -> StoreError {
    StoreError::Backend("connection pool lock poisoned".into())
}

/// The store on PostgreSQL. Cheap to share behind an `Arc`.
pub struct PgStore {
    node_id: String,
    jobs: Mutex<Option<mpsc::Sender<Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    pool: Arc<Pool>,
    seq_rx: watch::Receiver<u64>,
    reindex_rx: watch::Receiver<ReindexStatus>,
    custom_source: String,
    _listener: Listener,
}

/// Settings of a node process on PostgreSQL besides the connection's.
#[derive(Debug, Clone)]
pub struct PgNode {
    /// The node id to use; must match the one stored. `None`: the stored
    /// one, or a new one for a new database.
    pub node_id: Option<String>,
    /// Most write requests that share one commit.
    pub group_commit_max: usize,
    /// Write requests that may wait for the writer before callers wait.
    pub write_queue_max: usize,
}

impl Default for PgNode {
    fn default() -> Self {
        PgNode {
            node_id: None,
            group_commit_max: 256,
            write_queue_max: 4096,
        }
    }
}

impl PgStore {
    pub fn open(cfg: PgConfig, node: PgNode) -> Result<PgStore, StoreError> {
        Self::open_with_clock(cfg, node, Arc::new(SystemClock))
    }

    pub fn open_with_clock(
        cfg: PgConfig,
        node: PgNode,
        clock: Arc<dyn Clock>,
    ) -> Result<PgStore, StoreError> {
        let mut client = connect(&cfg)?;
        schema::migrate(&mut client)?;
        let node_id = init_node(&mut client, node.node_id.as_deref())?;
        let head = read_head(&mut client)?;
        let conn = PgConn::new(client);
        let custom_source = format!("postgres:{}", cfg.redacted_url());
        custom_params::load(&conn, &custom_source);
        let (seq_tx, seq_rx) = watch::channel(head.seq);
        let listener = Listener::start(&cfg, seq_tx.clone())?;
        // an index built by an older extraction is completed in the
        // background (each process that opens it so far does: additive,
        // so the work is repeated, never wrong)
        let reindex = if writer::index_version(&conn)? == Some(INDEX_VERSION) {
            None
        } else {
            tracing::warn!("search index out of date: reindexing in the background");
            Some(writer::start_reindex(&conn)?)
        };
        let (reindex_tx, reindex_rx) =
            watch::channel(reindex.as_ref().map(|r| r.status()).unwrap_or_default());
        let (jobs_tx, jobs_rx) = mpsc::channel(node.write_queue_max.max(1));
        let w = PgWriter {
            conn,
            node_id: node_id.clone(),
            // `fhirsync restore` is for SQLite nodes (a PostgreSQL one is
            // restored with its own tools; see docs/replication.md).
            vector_id: node_id.clone(),
            clock,
            stamper: Stamper::new(Hlc::from_packed(head.hlc)),
            group_max: node.group_commit_max.max(1),
            seq_tx,
            head,
            next_seq: None,
            index: Vec::new(),
            marks: Vec::new(),
            custom_source: custom_source.clone(),
            custom_dirty: false,
            known: Default::default(),
            reindex,
            reindex_tx,
        };
        let handle = std::thread::Builder::new()
            .name("fhirsync-pg-writer".into())
            .spawn(move || w.run(jobs_rx))
            .map_err(|e| StoreError::Backend(format!("cannot start writer: {e}")))?;
        tracing::info!(database = %cfg.redacted_url(), node_id, last_seq = head.seq, "store open");
        Ok(PgStore {
            node_id,
            jobs: Mutex::new(Some(jobs_tx)),
            writer: Mutex::new(Some(handle)),
            pool: Arc::new(Pool {
                max: cfg.pool_max.max(1),
                cfg,
                idle: Mutex::new((Vec::new(), 0)),
                freed: Condvar::new(),
            }),
            seq_rx,
            reindex_rx,
            custom_source,
            _listener: listener,
        })
    }

    fn sender(&self) -> Result<mpsc::Sender<Job>, StoreError> {
        self.jobs
            .lock()
            .map_err(|_| poisoned())?
            .clone()
            .ok_or(StoreError::ShuttingDown)
    }

    async fn read_with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Db) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let pool = self.pool.clone();
        tokio::task::spawn_blocking(move || pool.with(f))
            .await
            .map_err(|e| StoreError::Backend(format!("reader task failed: {e}")))?
    }

    async fn job<R>(&self, make: impl FnOnce(oneshot::Sender<R>) -> Job) -> Result<R, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(make(tx))
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        rx.await.map_err(|_| StoreError::ShuttingDown)
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The node id of the database: the stored one (which `wanted` must
/// match), else `wanted` or a new one, stored now. Processes that start
/// together on a new database agree: the first insert wins.
fn init_node(client: &mut postgres::Client, wanted: Option<&str>) -> Result<String, StoreError> {
    if let Some(w) = wanted {
        if !crate::sqlite::is_valid_node_id(w) {
            return Err(StoreError::BadRequest(format!(
                "invalid node id '{w}' (1 to 64 of A-Z a-z 0-9 - _)"
            )));
        }
    }
    let minted = wanted
        .map(str::to_owned)
        .unwrap_or_else(|| format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]));
    client.execute(
        "INSERT INTO node_info (key, value) VALUES ('node_id', $1) ON CONFLICT DO NOTHING",
        &[&minted],
    )?;
    let stored: String = client
        .query_one("SELECT value FROM node_info WHERE key = 'node_id'", &[])?
        .get(0);
    match wanted {
        Some(w) if w != stored => Err(StoreError::BadRequest(format!(
            "this database belongs to node '{stored}', not '{w}'; a node id cannot change"
        ))),
        _ => Ok(stored),
    }
}

crate::sql::store_impl! {
    PgStore;
    fn node_id(&self) -> &str {
        &self.node_id
    }

    async fn write(&self, req: WriteRequest) -> Result<WriteOutcome, StoreError> {
        self.job(|tx| Job::Write(Box::new(req), tx)).await?
    }

    async fn processes(&self) -> Result<Vec<ProcessInfo>, StoreError> {
        self.read_with(super::lease::processes).await
    }

    fn last_seq(&self) -> u64 {
        *self.seq_rx.borrow()
    }

    fn watch_seq(&self) -> watch::Receiver<u64> {
        self.seq_rx.clone()
    }

    async fn reindex(&self) -> Result<ReindexStatus, StoreError> {
        self.job(Job::Reindex).await?
    }

    fn reindex_status(&self) -> ReindexStatus {
        *self.reindex_rx.borrow()
    }

    async fn mark(&self) -> Result<LogMark, StoreError> {
        self.job(Job::Mark).await?
    }

    fn shutdown(&self) {
        if let Ok(mut j) = self.jobs.lock() {
            j.take();
        }
        let handle = self.writer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            let _ = h.join();
            custom_params::forget(&self.custom_source);
        }
    }

    fn load_stream(&self, depth: usize) -> Result<(mpsc::Sender<StreamMsg>, LoadDone), StoreError> {
        let (tx, rx) = mpsc::channel(depth.max(1));
        let (done_tx, done_rx) = oneshot::channel();
        self.sender()?
            .blocking_send(Job::Stream(rx, done_tx))
            .map_err(|_| StoreError::ShuttingDown)?;
        Ok((tx, done_rx))
    }
}
