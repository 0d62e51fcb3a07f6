//! The single writer thread. It owns the write connection, takes requests
//! from a bounded queue, and commits them in groups: every request already
//! waiting joins the open transaction (each in its own savepoint, so one
//! failing request rolls back alone) and all share one fsync. Answers are
//! sent only after the commit.

use std::sync::Arc;

use fhirsync_core::clock::Clock;
use fhirsync_core::search::SearchQuery;
use fhirsync_core::{Hlc, ResourceKey, VersionVector};
use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::{mpsc, oneshot, watch};

use super::index_rows;
use crate::engine::{self, CurrentVersion, NewVersion, WriteTx};
use crate::sql::{custom_params, query, search as search_sql};
use crate::stamp::Stamper;
use crate::types::*;
use crate::StoreError;

pub type Reply = oneshot::Sender<Result<WriteOutcome, StoreError>>;

/// The end of a streamed load: its summary, or why nothing was loaded.
pub type LoadDone = oneshot::Receiver<Result<LoadSummary, StoreError>>;

/// A message of a streamed, all-or-nothing load.
pub enum StreamMsg {
    /// Requests, with their resources' index entries sorted already
    /// ([`index_rows::Presorted::take`]) or left in them.
    Batch(Vec<WriteRequest>, index_rows::Presorted),
    /// Commit everything sent so far and end the stream.
    Commit,
}

/// Counts of what a streamed load did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct LoadSummary {
    pub requests: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub deleted: u64,
    pub first_seq: Option<u64>,
    pub last_seq: u64,
}

pub enum Job {
    Write(Box<WriteRequest>, Reply),
    /// Everything from the receiver in one transaction; rolled back unless
    /// `Commit` arrives.
    Stream(
        mpsc::Receiver<StreamMsg>,
        oneshot::Sender<Result<LoadSummary, StoreError>>,
    ),
    /// Start an additive reindex of every version (unless one runs).
    Reindex(oneshot::Sender<Result<ReindexStatus, StoreError>>),
    /// A cut of the log: see [`crate::Store::mark`].
    Mark(oneshot::Sender<Result<crate::types::LogMark, StoreError>>),
}

pub struct Writer {
    pub conn: Connection,
    pub node_id: String,
    /// Whose counter a local edit bumps: see [`crate::restore`].
    pub vector_id: String,
    pub clock: Arc<dyn Clock>,
    pub stamper: Stamper,
    pub group_max: usize,
    pub seq_tx: watch::Sender<u64>,
    /// The `seq` the next insert gets; `None` after any rollback, when it
    /// is read again from the database.
    pub next_seq: Option<u64>,
    /// A reindex under way, one batch between jobs.
    pub reindex: Option<super::reindex::Reindex>,
    /// During a streamed load: index entries held back to be written
    /// sorted at the end of each batch (and before any search).
    pub pending: Option<index_rows::Pending>,
    /// For each open savepoint, how many entries `pending` held when it
    /// was set: a rollback to it drops those held since.
    pub held_at: Vec<usize>,
    /// Names this store's custom search parameters (its database path).
    pub custom_source: String,
    /// A `SearchParameter` version was written since the last commit: the
    /// custom parameters are read again once it is durable.
    pub custom_dirty: bool,
    /// Progress of the reindex, for readers.
    pub reindex_tx: watch::Sender<ReindexStatus>,
    /// No other connection uses the database: see [`Writer::run_stream`].
    pub offline: bool,
}

impl Writer {
    pub fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        let mut pending: Option<Job> = None;
        loop {
            let job = match pending.take() {
                Some(j) => j,
                None if self.reindex.is_some() => match rx.try_recv() {
                    Ok(j) => j,
                    Err(mpsc::error::TryRecvError::Empty) => {
                        self.reindex_step();
                        continue;
                    }
                    Err(mpsc::error::TryRecvError::Disconnected) => break,
                },
                None => match rx.blocking_recv() {
                    Some(j) => j,
                    None => break,
                },
            };
            // A reindex under way advances one batch per job, so that it
            // ends even under a steady load.
            if self.reindex.is_some() {
                self.reindex_step();
            }
            match job {
                Job::Reindex(reply) => {
                    let r = match &self.reindex {
                        Some(r) => Ok(r.status()),
                        None => super::reindex::Reindex::additive(&self.conn, 0).map(|r| {
                            tracing::info!(versions = r.total, "reindex asked for");
                            let s = r.status();
                            self.reindex = Some(r);
                            s
                        }),
                    };
                    if let Ok(s) = &r {
                        self.reindex_tx.send_replace(*s);
                    }
                    let _ = reply.send(r);
                }
                Job::Mark(reply) => {
                    let _ = reply.send(self.mark());
                }
                Job::Stream(srx, done) => {
                    let r = self.run_stream(srx);
                    self.publish_seq();
                    self.reload_custom();
                    let _ = done.send(r);
                }
                Job::Write(req, reply) => {
                    let group = take_group((*req, reply), &mut rx, self.group_max, &mut pending);
                    self.run_group(group);
                }
            }
        }
        if let Err(e) = self.conn.execute_batch("PRAGMA wal_checkpoint(TRUNCATE);") {
            tracing::warn!(error = %e, "checkpoint at shutdown failed");
        }
        tracing::debug!("writer stopped");
    }

    /// The last committed `seq` and an instant after every committed
    /// version's `lastUpdated` and at or before every later one's: the HLC
    /// moves to that instant, so whatever is written next is stamped with
    /// it or later, even when the wall clock lags.
    fn mark(&mut self) -> Result<crate::types::LogMark, StoreError> {
        let seq = query::last_seq(&self.conn)?;
        let at_ms = self.stamper.hlc.wall_ms() + 1;
        self.stamper.observe(Hlc::new(at_ms, 0));
        Ok(crate::types::LogMark { seq, at_ms })
    }

    /// Writes the index entries held back, if any.
    fn flush_index(&mut self) -> Result<(), StoreError> {
        match self.pending.as_mut() {
            Some(p) => p.flush(&self.conn),
            None => Ok(()),
        }
    }

    fn reindex_step(&mut self) {
        let Some(r) = self.reindex.as_mut() else {
            return;
        };
        let stepped = r.step(&self.conn);
        self.reindex_tx.send_replace(r.status());
        match stepped {
            Ok(()) if r.finished() => {
                tracing::info!(versions = r.total, "reindex done");
                self.reindex = None;
            }
            Ok(()) => tracing::info!(done = r.done, total = r.total, "reindexing"),
            Err(e) => {
                tracing::error!(error = %e, "reindex failed; it starts again at the next open");
                self.reindex_tx.send_modify(|s| s.running = false);
                self.reindex = None;
            }
        }
    }

    fn run_group(&mut self, group: Vec<(WriteRequest, Reply)>) {
        if let Err(e) = self.conn.execute_batch("BEGIN IMMEDIATE") {
            for (_, reply) in group {
                let _ = reply.send(Err(StoreError::Backend(e.to_string())));
            }
            return;
        }
        let mut results = Vec::with_capacity(group.len());
        for (req, reply) in group {
            let r = self.execute_guarded(req);
            results.push((reply, r));
        }
        match self.conn.execute_batch("COMMIT") {
            Ok(()) => {
                self.publish_seq();
                self.reload_custom();
                for (reply, r) in results {
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed");
                let _ = self.conn.execute_batch("ROLLBACK");
                self.next_seq = None;
                for (reply, _) in results {
                    let _ = reply.send(Err(StoreError::Backend(format!("commit failed: {e}"))));
                }
            }
        }
    }

    /// Applies a load as one transaction. Offline, the load goes through a
    /// rollback journal rather than the WAL: each page is written once,
    /// into the database file (through a WAL it is written there again by
    /// the checkpoint after), pages read back are not looked up among the
    /// WAL's frames (which grow with the load), and a load killed midway
    /// is still undone at the next open (its journal is hot). WAL mode is
    /// put back when the load ends.
    fn run_stream(&mut self, rx: mpsc::Receiver<StreamMsg>) -> Result<LoadSummary, StoreError> {
        let journaled = self.offline && set_journal_mode(&self.conn, "delete");
        let r = self.load(rx);
        if journaled && !set_journal_mode(&self.conn, "wal") {
            // The next open of the store puts it back.
            tracing::warn!("the store stays out of WAL mode until it is opened again");
        }
        r
    }

    fn load(&mut self, mut rx: mpsc::Receiver<StreamMsg>) -> Result<LoadSummary, StoreError> {
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        self.pending = Some(index_rows::Pending::default());
        let mut sum = LoadSummary::default();
        let r = (|| loop {
            match rx.blocking_recv() {
                Some(StreamMsg::Batch(reqs, presorted)) => {
                    let seqs = load_batch(self, reqs, &mut sum)?;
                    presorted.write(&self.conn, &seqs)?;
                    self.flush_index()?;
                }
                Some(StreamMsg::Commit) => return self.flush_index(),
                None => return Err(StoreError::BadRequest("load ended without commit".into())),
            }
        })();
        self.pending = None;
        match r {
            Ok(()) => {
                self.conn.execute_batch("COMMIT")?;
                sum.last_seq = query::last_seq(&self.conn)?;
                Ok(sum)
            }
            Err(e) => {
                self.next_seq = None;
                self.conn.execute_batch("ROLLBACK")?;
                Err(e)
            }
        }
    }

    /// Runs one request in its savepoint. A panic in it (a bug) rolls that
    /// request back and becomes an error; the writer, and the node, go on.
    ///
    /// The index rows of a Bundle and of a page of received
    /// versions are held back and written sorted at the request's end (or
    /// before a search in it); a rollback to a savepoint drops the rows
    /// held since it was set.
    fn execute_guarded(&mut self, req: WriteRequest) -> Result<WriteOutcome, StoreError> {
        let hold = self.pending.is_none()
            && matches!(req, WriteRequest::Bundle(_) | WriteRequest::Apply(_));
        if hold {
            self.pending = Some(index_rows::Pending::default());
        }
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine::atomically(self, |tx| {
                let out = engine::execute(tx, req)?;
                tx.settle()?;
                Ok(out)
            })
        }));
        if hold {
            self.pending = None;
        }
        r.unwrap_or_else(|_| {
            tracing::error!("a write request panicked; it was rolled back");
            self.next_seq = None;
            self.held_at.clear();
            let _ = self.conn.execute_batch("ROLLBACK TO sp; RELEASE sp");
            Err(StoreError::Backend("internal error while writing".into()))
        })
    }

    /// Puts the store's active `SearchParameter`s in force again after one
    /// was written (before the writer answers, so a client that defined a
    /// parameter finds it in force at its next request).
    fn reload_custom(&mut self) {
        if std::mem::take(&mut self.custom_dirty) {
            custom_params::load(&self.conn, &self.custom_source);
        }
    }

    /// Tells the change log's listeners the last `seq`; only a commit that
    /// moved it wakes them (the trail's and other commits without new
    /// versions do not).
    fn publish_seq(&self) {
        match query::last_seq(&self.conn) {
            Ok(s) => crate::sql::raise(&self.seq_tx, s),
            Err(e) => tracing::error!(error = %e, "cannot read last seq"),
        }
    }
}

/// Sets the journal mode; `false` (logged) when SQLite would not, for
/// instance while another connection has the database open.
fn set_journal_mode(conn: &Connection, mode: &str) -> bool {
    let r = conn.query_row(&format!("PRAGMA journal_mode = {mode}"), [], |r| {
        r.get::<_, String>(0)
    });
    match r {
        Ok(m) if m.eq_ignore_ascii_case(mode) => true,
        other => {
            tracing::debug!(mode, now = ?other, "journal mode unchanged");
            false
        }
    }
}

/// A group commit's requests: `first` and the writes already waiting, up
/// to `max`; another job met on the way waits in `pending`.
pub(crate) fn take_group(
    first: (WriteRequest, Reply),
    rx: &mut mpsc::Receiver<Job>,
    max: usize,
    pending: &mut Option<Job>,
) -> Vec<(WriteRequest, Reply)> {
    let mut group = vec![first];
    while group.len() < max {
        match rx.try_recv() {
            Ok(Job::Write(r, s)) => group.push((*r, s)),
            Ok(other) => {
                *pending = Some(other);
                break;
            }
            Err(_) => break,
        }
    }
    group
}

/// Runs the requests of one batch of a streamed load; the first that
/// fails (a failed batch entry included) fails the load. Returns the
/// `seq` each request wrote, if any.
pub(crate) fn load_batch(
    tx: &mut dyn WriteTx,
    reqs: Vec<WriteRequest>,
    sum: &mut LoadSummary,
) -> Result<Vec<Option<u64>>, StoreError> {
    let mut seqs = Vec::with_capacity(reqs.len());
    for req in reqs {
        let index = sum.requests as usize;
        sum.requests += 1;
        let entry = |e| StoreError::Entry {
            index,
            source: Box::new(e),
        };
        let mut out = engine::execute(tx, req).map_err(entry)?;
        // A batch entry that failed fails the load: it is all or nothing.
        if let WriteOutcome::Bundle(b) = &mut out {
            if let Some(pos) = b
                .entries
                .iter()
                .position(|e| matches!(e, EntryResult::Failed(_)))
            {
                if let EntryResult::Failed(e) = b.entries.swap_remove(pos) {
                    return Err(entry(StoreError::Entry {
                        index: pos,
                        source: Box::new(e),
                    }));
                }
            }
        }
        count(sum, &out);
        seqs.push(match &out {
            WriteOutcome::Written { version, .. } => Some(version.seq),
            _ => None,
        });
    }
    Ok(seqs)
}

fn count(sum: &mut LoadSummary, out: &WriteOutcome) {
    let mut note = |v: &StoredVersion| {
        sum.first_seq.get_or_insert(v.seq);
    };
    match out {
        WriteOutcome::Written { version, created } => {
            note(version);
            if *created {
                sum.created += 1
            } else {
                sum.updated += 1
            }
        }
        WriteOutcome::Unchanged { .. } | WriteOutcome::Existing { .. } => sum.unchanged += 1,
        WriteOutcome::Deleted { version } => {
            if let Some(v) = version {
                note(v);
                sum.deleted += 1;
            }
        }
        WriteOutcome::Applied(_) | WriteOutcome::Done => {}
        WriteOutcome::Bundle(b) => {
            for e in &b.entries {
                match e {
                    EntryResult::Write {
                        status: 201,
                        version: Some(v),
                    } => {
                        note(v);
                        sum.created += 1
                    }
                    EntryResult::Write {
                        status: 204,
                        version: Some(v),
                    } => {
                        note(v);
                        sum.deleted += 1
                    }
                    EntryResult::Write {
                        version: Some(v), ..
                    } => {
                        note(v);
                        sum.updated += 1
                    }
                    _ => {}
                }
            }
        }
    }
}

impl WriteTx for Writer {
    crate::sql::write_tx_rows!();

    fn settle(&mut self) -> Result<(), StoreError> {
        self.flush_index()
    }

    fn current(&mut self, rtype: &str, id: &str) -> Result<Option<CurrentVersion>, StoreError> {
        let mut st = self.conn.prepare_cached(
            "SELECT seq, vid, deleted, vv, hash, hlc, origin FROM versions WHERE type = ?1 AND id = ?2 AND superseded IS NULL",
        )?;
        let row = st
            .query_row(params![rtype, id], |r| {
                let vv: String = r.get(3)?;
                let hash: Option<Vec<u8>> = r.get(4)?;
                Ok(CurrentVersion {
                    seq: r.get::<_, i64>(0)? as u64,
                    vid: r.get::<_, i64>(1)? as u64,
                    deleted: r.get::<_, i64>(2)? != 0,
                    vv: VersionVector::from_json(&vv).unwrap_or_default(),
                    hash: hash
                        .and_then(|h| <[u8; 16]>::try_from(h.as_slice()).ok())
                        .map(u128::from_be_bytes)
                        .unwrap_or(0),
                    hlc: Hlc::from_packed(r.get::<_, i64>(5)? as u64),
                    origin: r.get(6)?,
                })
            })
            .optional()?;
        Ok(row)
    }

    fn search(&mut self, q: &SearchQuery) -> Result<SearchPage, StoreError> {
        self.flush_index()?;
        search_sql::search(&self.conn, q)
    }

    fn matches(&mut self, q: &SearchQuery, limit: usize) -> Result<Vec<ResourceKey>, StoreError> {
        self.flush_index()?;
        search_sql::matches(&self.conn, q, limit)
    }

    fn insert(&mut self, v: NewVersion<'_>) -> Result<StoredVersion, StoreError> {
        let seq = match self.next_seq.take() {
            Some(s) => s,
            None => query::last_seq(&self.conn)? + 1,
        };
        if v.rtype == "SearchParameter" {
            self.custom_dirty = true;
        }
        let (rtype, id, prev) = (v.rtype, v.id, v.prev.as_ref().map(|p| (p.seq, p.vid)));
        let mut s = self
            .stamper
            .stamp(&self.node_id, &self.vector_id, self.clock.now_ms(), v);
        if let Some((prev_seq, prev_vid)) = prev {
            let n = self
                .conn
                .prepare_cached(
                    "UPDATE versions SET superseded = ?1 WHERE seq = ?2 AND superseded IS NULL",
                )?
                .execute(params![seq as i64, prev_seq as i64])?;
            if n != 1 {
                return Err(StoreError::Backend(format!(
                    "{rtype}/{id} version {prev_vid} is not current any more"
                )));
            }
        }
        self.conn
            .prepare_cached(
                "INSERT INTO versions (seq, type, id, vid, lu_ms, deleted, method, origin, vv, hlc, hash, body, via)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13)",
            )?
            .execute(params![
                seq as i64,
                rtype,
                id,
                s.vid as i64,
                s.lu_ms as i64,
                s.body.is_none() as i64,
                s.method.as_str(),
                s.origin,
                s.vv.to_json(),
                s.hlc.packed() as i64,
                s.hash,
                s.body,
                s.via,
            ])?;
        let index = std::mem::take(&mut s.index);
        match self.pending.as_mut() {
            Some(p) => p.add(seq, index),
            None => index_rows::insert(&self.conn, seq, &index)?,
        }
        self.next_seq = Some(seq + 1);
        Ok(s.stored(seq, rtype, id))
    }

    fn savepoint(&mut self) -> Result<(), StoreError> {
        self.conn.execute_batch("SAVEPOINT sp")?;
        self.held_at
            .push(self.pending.as_ref().map_or(0, index_rows::Pending::len));
        Ok(())
    }

    fn release(&mut self) -> Result<(), StoreError> {
        self.held_at.pop();
        Ok(self.conn.execute_batch("RELEASE sp")?)
    }

    fn rollback(&mut self) -> Result<(), StoreError> {
        self.next_seq = None;
        let held = self.held_at.pop().unwrap_or(0);
        if let Some(p) = self.pending.as_mut() {
            p.truncate(held);
        }
        Ok(self.conn.execute_batch("ROLLBACK TO sp; RELEASE sp")?)
    }
}
