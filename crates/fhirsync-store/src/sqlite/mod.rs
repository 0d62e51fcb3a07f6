//! The embedded SQLite backend: one writer thread with group commit, a pool
//! of read connections, WAL mode.

mod checkpoint;
mod index_rows;
pub mod reindex;
pub(crate) mod schema;
pub(crate) mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use fhirsync_core::clock::{Clock, SystemClock};
use fhirsync_core::Hlc;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use tokio::sync::{mpsc, oneshot, watch};

pub use crate::sql::search::{DENSE_ROWS, NARROW_CONDS_MAX};
pub use index_rows::Presorted;
pub use schema::SyncMode;
pub use writer::{LoadDone, LoadSummary, StreamMsg};

use crate::sql::{custom_params, query};
use crate::types::*;
use crate::{Store, StoreError};

/// Settings of the SQLite backend; every limit has a default.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// The database file.
    pub path: PathBuf,
    /// The node id to use; must match the one stored in an existing database.
    /// `None`: use the stored one, or mint one for a new database.
    pub node_id: Option<String>,
    pub sync: SyncMode,
    /// Most write requests that share one commit.
    pub group_commit_max: usize,
    /// Write requests that may wait for the writer before callers wait.
    pub write_queue_max: usize,
    /// Read connections kept open.
    pub readers_max: usize,
    /// This process alone uses the store (`fhirsync import`, under the data
    /// directory's lock): there is no checkpoint thread, and a load stream
    /// writes through a rollback journal instead of the WAL (see
    /// [`writer`]'s `run_stream`).
    pub offline: bool,
}

impl SqliteConfig {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteConfig {
            path: path.into(),
            node_id: None,
            sync: SyncMode::Full,
            group_commit_max: 256,
            write_queue_max: 4096,
            readers_max: 16,
            offline: false,
        }
    }
}

struct Readers {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
    max: usize,
}

impl Readers {
    fn with<R>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError>,
    ) -> Result<R, StoreError> {
        let conn = self.idle.lock().map_err(|_| poisoned())?.pop();
        let conn = match conn {
            Some(c) => c,
            None => {
                let c = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_ONLY
                        | OpenFlags::SQLITE_OPEN_NO_MUTEX
                        | OpenFlags::SQLITE_OPEN_URI,
                )?;
                schema::configure_reader(&c)?;
                c
            }
        };
        let r = f(&conn);
        let mut idle = self.idle.lock().map_err(|_| poisoned())?;
        if idle.len() < self.max {
            idle.push(conn);
        }
        r
    }
}

fn poisoned() -> StoreError {
    StoreError::Backend("reader pool lock poisoned".into())
}

/// The SQLite store. Cheap to share behind an `Arc`.
pub struct SqliteStore {
    node_id: String,
    jobs: Mutex<Option<mpsc::Sender<writer::Job>>>,
    writer: Mutex<Option<JoinHandle<()>>>,
    /// See [`checkpoint`]; joined after the writer.
    checkpointer: Mutex<Option<JoinHandle<()>>>,
    readers: Arc<Readers>,
    seq_rx: watch::Receiver<u64>,
    reindex_rx: watch::Receiver<ReindexStatus>,
    /// Names this store's custom search parameters in the process.
    custom_source: String,
}

/// Characters allowed in a node id (it becomes part of NATS subjects later).
pub fn is_valid_node_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

impl SqliteStore {
    pub fn open(cfg: SqliteConfig) -> Result<Self, StoreError> {
        Self::open_with_clock(cfg, Arc::new(SystemClock))
    }

    /// Rebuilds the whole search index of the store at `cfg.path`, which no
    /// process may have open, reporting progress; returns the versions
    /// reindexed.
    pub fn reindex_offline(
        cfg: &SqliteConfig,
        progress: reindex::Progress<'_>,
    ) -> Result<u64, StoreError> {
        if !cfg.path.exists() {
            return Err(StoreError::NotFound(format!(
                "no store at {}",
                cfg.path.display()
            )));
        }
        let (conn, _) = Self::connect(cfg)?;
        reindex::reindex(&conn, 0, progress)
    }

    /// The writer's connection, with the schema current.
    fn connect(cfg: &SqliteConfig) -> Result<(Connection, String), StoreError> {
        if let Some(dir) = cfg.path.parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir).map_err(|e| {
                    StoreError::Backend(format!("cannot create {}: {e}", dir.display()))
                })?;
            }
        }
        let conn = Connection::open(&cfg.path)?;
        schema::configure_writer(&conn, cfg.sync)?;
        conn.execute_batch(schema::SCHEMA)?;
        let node_id = init_node(&conn, cfg.node_id.as_deref())?;
        Ok((conn, node_id))
    }

    pub fn open_with_clock(cfg: SqliteConfig, clock: Arc<dyn Clock>) -> Result<Self, StoreError> {
        let (conn, node_id) = Self::connect(&cfg)?;
        let hlc: i64 = conn.query_row("SELECT coalesce(max(hlc), 0) FROM versions", [], |r| {
            r.get(0)
        })?;
        let last = query::last_seq(&conn)?;
        // An index of an older version is rebuilt by the writer between
        // writes: the node serves meanwhile (searches see the old index of
        // versions not yet reached).
        let reindex = if reindex::index_version(&conn)? == Some(schema::INDEX_VERSION) {
            None
        } else {
            if last > 0 {
                tracing::info!(
                    versions = last,
                    "search index out of date: reindexing in the background"
                );
            }
            Some(reindex::Reindex::start(&conn, 0)?)
        };
        let (reindex_tx, reindex_rx) =
            watch::channel(reindex.as_ref().map(|r| r.status()).unwrap_or_default());
        let custom_source = cfg.path.display().to_string();
        custom_params::load(&conn, &custom_source);
        let (seq_tx, seq_rx) = watch::channel(last);
        let (jobs_tx, jobs_rx) = mpsc::channel(cfg.write_queue_max.max(1));
        let vector_id = crate::restore::vector_id(&conn, &node_id)?;
        let w = writer::Writer {
            conn,
            vector_id,
            node_id: node_id.clone(),
            clock,
            stamper: crate::stamp::Stamper::new(Hlc::from_packed(hlc as u64)),
            group_max: cfg.group_commit_max.max(1),
            seq_tx,
            next_seq: None,
            reindex,
            pending: None,
            held_at: Vec::new(),
            custom_source: custom_source.clone(),
            custom_dirty: false,
            reindex_tx,
            offline: cfg.offline,
        };
        // Offline, the checkpoint thread's connection would also keep the
        // writer from leaving WAL mode for a load.
        let checkpointer = match cfg.offline {
            true => None,
            false => Some(checkpoint::start(&cfg.path, cfg.sync, seq_rx.clone())?),
        };
        let handle = std::thread::Builder::new()
            .name("fhirsync-writer".into())
            .spawn(move || w.run(jobs_rx))
            .map_err(|e| StoreError::Backend(format!("cannot start writer: {e}")))?;
        tracing::info!(path = %cfg.path.display(), node_id, last_seq = last, "store open");
        Ok(SqliteStore {
            node_id,
            jobs: Mutex::new(Some(jobs_tx)),
            writer: Mutex::new(Some(handle)),
            checkpointer: Mutex::new(checkpointer),
            readers: Arc::new(Readers {
                path: cfg.path,
                idle: Mutex::new(Vec::new()),
                max: cfg.readers_max.max(1),
            }),
            seq_rx,
            reindex_rx,
            custom_source,
        })
    }

    /// The database file of a data directory.
    pub fn db_path(data_dir: &Path) -> PathBuf {
        data_dir.join("fhirsync.db")
    }

    fn sender(&self) -> Result<mpsc::Sender<writer::Job>, StoreError> {
        self.jobs
            .lock()
            .map_err(|_| poisoned())?
            .clone()
            .ok_or(StoreError::ShuttingDown)
    }

    async fn read_with<R: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<R, StoreError> + Send + 'static,
    ) -> Result<R, StoreError> {
        let readers = self.readers.clone();
        tokio::task::spawn_blocking(move || readers.with(f))
            .await
            .map_err(|e| StoreError::Backend(format!("reader task failed: {e}")))?
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn init_node(conn: &Connection, wanted: Option<&str>) -> Result<String, StoreError> {
    let stored: Option<String> = conn
        .query_row(
            "SELECT value FROM node_info WHERE key = 'node_id'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    let version: Option<String> = conn
        .query_row(
            "SELECT value FROM node_info WHERE key = 'schema_version'",
            [],
            |r| r.get(0),
        )
        .optional()?;
    if matches!(version.as_deref(), Some("1" | "2")) {
        if version.as_deref() == Some("1") {
            conn.execute_batch(schema::MIGRATE_1_TO_2)?;
        }
        // 2 to 3: the index tables, which SCHEMA has created; filling them
        // is the reindex that follows.
        conn.execute(
            "UPDATE node_info SET value = ?1 WHERE key = 'schema_version'",
            [schema::SCHEMA_VERSION.to_string()],
        )?;
        tracing::info!(
            from = version.as_deref(),
            to = schema::SCHEMA_VERSION,
            "store schema migrated"
        );
    } else if let Some(v) = version {
        if v != schema::SCHEMA_VERSION.to_string() {
            return Err(StoreError::Backend(format!(
                "database schema version {v} is not the supported {}",
                schema::SCHEMA_VERSION
            )));
        }
    }
    if let Some(w) = wanted {
        if !is_valid_node_id(w) {
            return Err(StoreError::BadRequest(format!(
                "invalid node id '{w}' (1 to 64 of A-Z a-z 0-9 - _)"
            )));
        }
    }
    let id = match (stored, wanted) {
        (Some(s), Some(w)) if s != w => {
            return Err(StoreError::BadRequest(format!(
                "this data directory belongs to node '{s}', not '{w}'; a node id cannot change"
            )))
        }
        (Some(s), _) => s,
        (None, Some(w)) => w.to_owned(),
        (None, None) => format!("node-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]),
    };
    conn.execute(
        "INSERT OR IGNORE INTO node_info (key, value) VALUES ('node_id', ?1), ('schema_version', ?2)",
        rusqlite::params![id, schema::SCHEMA_VERSION.to_string()],
    )?;
    Ok(id)
}

crate::sql::store_impl! {
    SqliteStore;
    fn node_id(&self) -> &str {
        &self.node_id
    }

    async fn write(&self, req: WriteRequest) -> Result<WriteOutcome, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(writer::Job::Write(Box::new(req), tx))
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        rx.await.map_err(|_| StoreError::ShuttingDown)?
    }

    fn last_seq(&self) -> u64 {
        *self.seq_rx.borrow()
    }

    fn watch_seq(&self) -> watch::Receiver<u64> {
        self.seq_rx.clone()
    }

    async fn reindex(&self) -> Result<ReindexStatus, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(writer::Job::Reindex(tx))
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        rx.await.map_err(|_| StoreError::ShuttingDown)?
    }

    fn reindex_status(&self) -> ReindexStatus {
        *self.reindex_rx.borrow()
    }

    async fn mark(&self) -> Result<LogMark, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.sender()?
            .send(writer::Job::Mark(tx))
            .await
            .map_err(|_| StoreError::ShuttingDown)?;
        rx.await.map_err(|_| StoreError::ShuttingDown)?
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
        let handle = self.checkpointer.lock().ok().and_then(|mut h| h.take());
        if let Some(h) = handle {
            h.thread().unpark();
            let _ = h.join();
        }
    }

    fn load_stream(
        &self,
        depth: usize,
    ) -> Result<(mpsc::Sender<StreamMsg>, writer::LoadDone), StoreError> {
        let (tx, rx) = mpsc::channel(depth.max(1));
        let (done_tx, done_rx) = oneshot::channel();
        self.sender()?
            .blocking_send(writer::Job::Stream(rx, done_tx))
            .map_err(|_| StoreError::ShuttingDown)?;
        Ok((tx, done_rx))
    }
}
