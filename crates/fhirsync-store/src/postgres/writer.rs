//! The writer of one process on PostgreSQL: like SQLite's, a thread that
//! takes requests from a bounded queue and commits them in groups (each
//! request in its own savepoint), but every group first takes the log's
//! lock ([`super::log::lock_head`]), so the processes sharing the
//! database append one group at a time and the log stays gapless.
//! Index rows are held until the request's savepoint settles, then
//! written one statement per table.

use std::collections::HashMap;
use std::sync::Arc;

use fhirsync_core::clock::Clock;
use fhirsync_core::index::IndexEntry;
use fhirsync_core::search::SearchQuery;
use fhirsync_core::{Hlc, ResourceKey, VersionVector};
use tokio::sync::{mpsc, watch};

use super::bulk::VersionRow;
use super::conn::PgConn;
use super::log::{advance_head, lock_head, Head};
use crate::engine::{self, CurrentVersion, NewVersion, WriteTx};
use crate::sql::{custom_params, first, n, query, search, t, Db, Row, Sql};
use crate::sqlite::reindex::{Reindex, ONLINE_REINDEX_BATCH};
use crate::sqlite::schema::INDEX_VERSION;
use crate::sqlite::writer::{load_batch, take_group, Job, LoadSummary, Reply, StreamMsg};
use crate::stamp::Stamper;
use crate::types::*;
use crate::StoreError;

pub struct PgWriter {
    pub conn: PgConn,
    pub node_id: String,
    /// Whose counter a local edit bumps: see [`crate::restore`].
    pub vector_id: String,
    pub clock: Arc<dyn Clock>,
    pub stamper: Stamper,
    pub group_max: usize,
    pub seq_tx: watch::Sender<u64>,
    /// The head as this transaction found it (the lock is held).
    pub head: Head,
    /// The `seq` the next insert gets; `None` after a rollback, when it is
    /// read again inside the transaction.
    pub next_seq: Option<u64>,
    /// Index rows of versions written but not yet settled.
    pub index: Vec<(u64, IndexEntry)>,
    /// `index.len()` at each open savepoint, innermost last.
    pub marks: Vec<usize>,
    pub custom_source: String,
    pub custom_dirty: bool,
    /// Current versions read ahead for a batch of a load
    /// ([`Self::read_ahead`]); a key leaves it when read or written, so
    /// what is left is never stale.
    pub known: HashMap<(String, String), Option<CurrentVersion>>,
    /// A reindex under way, one batch between jobs.
    pub reindex: Option<Reindex>,
    /// Progress of the reindex, for readers.
    pub reindex_tx: watch::Sender<ReindexStatus>,
}

/// A reindex of every stored version on PostgreSQL, adding to the index
/// in place (searches stay right while it runs), in steps of
/// [`ONLINE_REINDEX_BATCH`] versions between the writer's jobs.
pub fn start_reindex(db: &dyn Db) -> Result<Reindex, StoreError> {
    let (last, total) = first(
        db,
        "SELECT coalesce(max(seq), 0), count(*) FROM versions",
        &[],
        |r| Ok((r.i64(0)? as u64, r.i64(1)? as u64)),
    )?
    .unwrap_or((0, 0));
    Ok(Reindex {
        clear: false,
        batch: ONLINE_REINDEX_BATCH,
        next: 1,
        last,
        done: 0,
        total,
    })
}

/// The index version the database's rows were built with, if recorded.
pub fn index_version(db: &dyn Db) -> Result<Option<i64>, StoreError> {
    Ok(first(
        db,
        "SELECT value FROM node_info WHERE key = 'index_version'",
        &[],
        |r| r.text(0),
    )?
    .and_then(|v| v.parse().ok()))
}

/// The columns [`current_version`] reads.
const CURRENT_COLUMNS: &str = "seq, vid, deleted, vv, hash, hlc, origin";

fn current_version(r: &dyn Row) -> Result<CurrentVersion, StoreError> {
    Ok(CurrentVersion {
        seq: r.i64(0)? as u64,
        vid: r.i64(1)? as u64,
        deleted: r.bool(2)?,
        vv: VersionVector::from_json(&r.text(3)?).unwrap_or_default(),
        hash: r
            .opt_blob(4)?
            .and_then(|h| <[u8; 16]>::try_from(h.as_slice()).ok())
            .map(u128::from_be_bytes)
            .unwrap_or(0),
        hlc: Hlc::from_packed(r.i64(5)? as u64),
        origin: r.text(6)?,
    })
}

impl PgWriter {
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
            if self.conn.is_closed() {
                self.reconnect_note();
            }
            // one step per job, so that a reindex ends under a steady load
            if self.reindex.is_some() {
                self.reindex_step();
            }
            match job {
                Job::Reindex(reply) => {
                    let r = match &self.reindex {
                        Some(r) => Ok(r.status()),
                        None => start_reindex(&self.conn).map(|r| {
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
                    self.reload_custom();
                    let _ = done.send(r);
                }
                Job::Write(req, reply) => {
                    let group = take_group((*req, reply), &mut rx, self.group_max, &mut pending);
                    self.run_group(group);
                }
            }
        }
        tracing::debug!("writer stopped");
    }

    fn reconnect_note(&self) {
        tracing::error!("the writer's database connection is closed; writes fail until restart");
    }

    /// Opens a transaction that holds the log's lock.
    fn begin(&mut self) -> Result<(), StoreError> {
        self.conn.batch("BEGIN")?;
        match lock_head(&mut *self.conn.client()) {
            Ok(h) => {
                self.head = h;
                self.next_seq = Some(h.seq + 1);
                self.stamper.observe(Hlc::from_packed(h.hlc));
                self.index.clear();
                self.marks.clear();
                Ok(())
            }
            Err(e) => {
                let _ = self.conn.batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Moves the head past what this transaction appended and commits.
    fn commit(&mut self) -> Result<(), StoreError> {
        self.flush_index()?;
        let last = query::last_seq(&self.conn)?;
        let head = Head {
            seq: last.max(self.head.seq),
            hlc: self.stamper.hlc.packed().max(self.head.hlc),
        };
        if head != self.head {
            advance_head(&mut *self.conn.client(), head)?;
        }
        self.conn.batch("COMMIT")?;
        self.head = head;
        self.seq_tx.send_if_modified(|v| {
            let up = head.seq > *v;
            if up {
                *v = head.seq;
            }
            up
        });
        Ok(())
    }

    fn abort(&mut self) {
        self.next_seq = None;
        self.index.clear();
        self.marks.clear();
        self.known.clear();
        if let Err(e) = self.conn.batch("ROLLBACK") {
            tracing::error!(error = %e, "rollback failed");
        }
    }

    /// The last `seq` and an instant after every version stamped so far by
    /// any process; the head's HLC moves there, so every later version, in
    /// any process, is stamped at or after it.
    fn mark(&mut self) -> Result<LogMark, StoreError> {
        self.begin()?;
        let at_ms = self.stamper.hlc.wall_ms() + 1;
        self.stamper.observe(Hlc::new(at_ms, 0));
        let seq = self.head.seq;
        match self.commit() {
            Ok(()) => Ok(LogMark { seq, at_ms }),
            Err(e) => {
                self.abort();
                Err(e)
            }
        }
    }

    /// Indexes the next step's versions again (adding what is
    /// missing; each table's rows in one statement, which commits on its
    /// own); after the last, records the index version.
    fn reindex_step(&mut self) {
        let Some(mut r) = self.reindex.take() else {
            return;
        };
        match self.reindex_batch(&mut r) {
            Ok(()) if r.finished() => {
                tracing::info!(versions = r.total, "reindex done");
            }
            Ok(()) => {
                tracing::debug!(done = r.done, total = r.total, "reindexing");
                self.reindex = Some(r.clone());
            }
            Err(e) => {
                tracing::error!(error = %e, "reindex failed; it starts again at the next open");
            }
        }
        let mut s = r.status();
        s.running = self.reindex.is_some();
        self.reindex_tx.send_replace(s);
    }

    fn reindex_batch(&mut self, r: &mut Reindex) -> Result<(), StoreError> {
        if !r.finished() {
            let to = (r.next + r.batch - 1).min(r.last);
            let rows = crate::sql::all(
                &self.conn,
                "SELECT seq, type, body FROM versions WHERE seq BETWEEN ?1 AND ?2 AND body IS NOT NULL",
                &[n(r.next), n(to)],
                |row| Ok((row.i64(0)?, row.text(1)?, row.text(2)?)),
            )?;
            let mut entries = Vec::new();
            for (seq, rtype, body) in rows {
                let Ok(v) = serde_json::from_str::<serde_json::Value>(&body) else {
                    tracing::warn!(seq, "a stored body is not JSON; not indexed");
                    continue;
                };
                let keys = fhirsync_core::index::extract(&rtype, &v);
                entries.extend(keys.into_iter().map(|e| (seq as u64, e)));
            }
            super::index::write(
                &mut self.conn.client(),
                entries.iter().map(|(s, e)| (*s, e)),
            )?;
            r.done = (r.done + to + 1 - r.next).min(r.total);
            r.next = to + 1;
        }
        if r.finished() {
            self.conn.exec(
                "INSERT INTO node_info (key, value) VALUES ('index_version', ?1)
                 ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value",
                &[Sql::Text(INDEX_VERSION.to_string())],
            )?;
        }
        Ok(())
    }

    fn run_group(&mut self, group: Vec<(WriteRequest, Reply)>) {
        if let Err(e) = self.begin() {
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
        match self.commit() {
            Ok(()) => {
                self.reload_custom();
                for (reply, r) in results {
                    let _ = reply.send(r);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "group commit failed");
                self.abort();
                for (reply, _) in results {
                    let _ = reply.send(Err(StoreError::Backend(format!("commit failed: {e}"))));
                }
            }
        }
    }

    fn run_stream(&mut self, mut rx: mpsc::Receiver<StreamMsg>) -> Result<LoadSummary, StoreError> {
        self.begin()?;
        let mut sum = LoadSummary::default();
        let r = (|| loop {
            match rx.blocking_recv() {
                Some(StreamMsg::Batch(reqs, presorted)) => {
                    self.read_ahead(&reqs)?;
                    let seqs = load_batch(self, reqs, &mut sum);
                    self.known.clear();
                    let seqs = seqs?;
                    self.flush_index()?;
                    super::index::write_new(&mut self.conn.client(), presorted.rows(&seqs))?;
                }
                Some(StreamMsg::Commit) => return Ok(()),
                None => return Err(StoreError::BadRequest("load ended without commit".into())),
            }
        })();
        match r.and_then(|()| self.commit()) {
            Ok(()) => {
                sum.last_seq = self.head.seq;
                Ok(sum)
            }
            Err(e) => {
                self.abort();
                Err(e)
            }
        }
    }

    /// Runs one request in its savepoint; a panic in it (a bug) rolls it
    /// back and becomes an error.
    fn execute_guarded(&mut self, req: WriteRequest) -> Result<WriteOutcome, StoreError> {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            engine::atomically(self, |tx| {
                let out = engine::execute(tx, req)?;
                tx.settle()?;
                Ok(out)
            })
        }));
        r.unwrap_or_else(|_| {
            tracing::error!("a write request panicked; it was rolled back");
            let _ = self.rollback();
            Err(StoreError::Backend("internal error while writing".into()))
        })
    }

    /// Reads the current versions of the resources `reqs` update by id,
    /// in one query, for [`WriteTx::current`] to answer from.
    fn read_ahead(&mut self, reqs: &[WriteRequest]) -> Result<(), StoreError> {
        let (mut types, mut ids) = (Vec::new(), Vec::new());
        for r in reqs {
            if let WriteRequest::Update { id, res, .. } = r {
                types.push(res.rtype.as_str());
                ids.push(id.as_str());
            }
        }
        if types.is_empty() {
            return Ok(());
        }
        self.conn.flush()?;
        for (ty, id) in types.iter().zip(&ids) {
            self.known.insert((ty.to_string(), id.to_string()), None);
        }
        // One index probe per key. The planner would scan the table
        // instead: in the middle of a load its statistics still say the
        // table is small (it was analyzed before the load began).
        let sql = format!(
            "SELECT k.type, k.id, v.* FROM unnest($1::text[], $2::text[]) AS k(type, id)
             CROSS JOIN LATERAL (SELECT {CURRENT_COLUMNS} FROM versions
                 WHERE type = k.type AND id = k.id AND superseded IS NULL LIMIT 1) v"
        );
        self.conn.batch("SET LOCAL enable_seqscan = off")?;
        let rows = self.conn.client().query(&sql, &[&types, &ids]);
        let reset = self.conn.batch("SET LOCAL enable_seqscan = on");
        let rows = rows?;
        reset?;
        for row in &rows {
            let key: (String, String) = (row.try_get(0)?, row.try_get(1)?);
            let cur = current_version(&super::conn::Shifted(row, 2))?;
            self.known.insert(key, Some(cur));
        }
        Ok(())
    }

    fn flush_index(&mut self) -> Result<(), StoreError> {
        self.conn.flush()?;
        if self.index.is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.index);
        super::index::write_new(&mut self.conn.client(), rows.iter().map(|(s, e)| (*s, e)))?;
        // what is written belongs to the savepoints open now
        for m in &mut self.marks {
            *m = 0;
        }
        Ok(())
    }

    fn reload_custom(&mut self) {
        if std::mem::take(&mut self.custom_dirty) {
            custom_params::load(&self.conn, &self.custom_source);
        }
    }
}

impl WriteTx for PgWriter {
    crate::sql::write_tx_rows!();

    fn settle(&mut self) -> Result<(), StoreError> {
        self.flush_index()
    }

    fn current(&mut self, rtype: &str, id: &str) -> Result<Option<CurrentVersion>, StoreError> {
        if let Some(known) = self.known.remove(&(rtype.to_owned(), id.to_owned())) {
            return Ok(known);
        }
        first(
            &self.conn,
            &format!("SELECT {CURRENT_COLUMNS} FROM versions WHERE type = ?1 AND id = ?2 AND superseded IS NULL"),
            &[t(rtype), t(id)],
            current_version,
        )
    }

    fn search(&mut self, q: &SearchQuery) -> Result<SearchPage, StoreError> {
        self.flush_index()?;
        search::search(&self.conn, q)
    }

    fn matches(&mut self, q: &SearchQuery, limit: usize) -> Result<Vec<ResourceKey>, StoreError> {
        self.flush_index()?;
        search::matches(&self.conn, q, limit)
    }

    fn insert(&mut self, v: NewVersion<'_>) -> Result<StoredVersion, StoreError> {
        let seq = match self.next_seq.take() {
            Some(s) => s,
            None => query::last_seq(&self.conn)?.max(self.head.seq) + 1,
        };
        if v.rtype == "SearchParameter" {
            self.custom_dirty = true;
        }
        let (rtype, id, prev) = (v.rtype, v.id, v.prev.as_ref().map(|p| (p.seq, p.vid)));
        let mut s = self
            .stamper
            .stamp(&self.node_id, &self.vector_id, self.clock.now_ms(), v);
        if let Some((prev_seq, prev_vid)) = prev {
            let changed = self.conn.exec(
                "UPDATE versions SET superseded = ?1 WHERE seq = ?2 AND superseded IS NULL",
                &[n(seq), n(prev_seq)],
            )?;
            if changed != 1 {
                return Err(StoreError::Backend(format!(
                    "{rtype}/{id} version {prev_vid} is not current any more"
                )));
            }
        }
        self.known.remove(&(rtype.to_owned(), id.to_owned()));
        self.conn.append(VersionRow {
            seq: seq as i64,
            rtype: rtype.to_owned(),
            id: id.to_owned(),
            vid: s.vid as i64,
            lu_ms: s.lu_ms as i64,
            deleted: s.body.is_none() as i16,
            method: s.method.as_str(),
            origin: s.origin.clone(),
            vv: s.vv.to_json(),
            hlc: s.hlc.packed() as i64,
            hash: s.hash.clone(),
            body: s.body.clone(),
            via: s.via.clone(),
        });
        let index = std::mem::take(&mut s.index);
        self.index.extend(index.into_iter().map(|e| (seq, e)));
        self.next_seq = Some(seq + 1);
        Ok(s.stored(seq, rtype, id))
    }

    fn savepoint(&mut self) -> Result<(), StoreError> {
        self.conn.batch("SAVEPOINT sp")?;
        self.marks.push(self.index.len());
        Ok(())
    }

    fn release(&mut self) -> Result<(), StoreError> {
        self.marks.pop();
        self.conn.batch("RELEASE SAVEPOINT sp")
    }

    fn rollback(&mut self) -> Result<(), StoreError> {
        self.next_seq = None;
        let keep = self.marks.pop().unwrap_or(0);
        self.index.truncate(keep);
        self.conn
            .batch("ROLLBACK TO SAVEPOINT sp; RELEASE SAVEPOINT sp")
    }
}
