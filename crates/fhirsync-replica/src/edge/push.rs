//! The push loop: this node's change log sent to the parent's `$apply`.
//! To a parent that keeps the order of push streams, up to
//! [`PUSH_IN_FLIGHT`] batches are on their way at once, each numbered in
//! the loop's stream; the parent applies batch `n` only after batch `n - 1`
//! was applied in full. An answer that is not a whole success drops the
//! batches after it (the parent refuses them, or already applied them, and
//! applying again changes nothing) and the loop goes on from its cursor
//! under a new stream.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fhirsync_store::replica::cursor_key;
use fhirsync_store::{
    change_entry_text, AuditEntry, ChangesQuery, Direction, StoreError, StoredVersion, SyncWrite,
    WriteRequest,
};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::{ApplyAnswer, Edge, Failing, Failure};

/// Most `$apply` batches on their way to the parent at once (to a parent
/// that keeps the order of push streams; otherwise one).
pub const PUSH_IN_FLIGHT: usize = 12;

/// A push cursor being stored.
type CursorWrite = JoinHandle<Result<(), StoreError>>;

/// The parent's answer to one batch; dropping it drops the request.
struct Answer(JoinHandle<Result<ApplyAnswer, Failure>>);

impl Drop for Answer {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A batch of the log: sent, or only scanned when the filter left nothing.
struct Batch {
    /// Its number in the push stream.
    n: u64,
    /// The log was read up to here.
    scanned: u64,
    /// `seq`, type and id of each record sent.
    sent: Vec<(u64, String, String)>,
    /// Each record's entry text, as sent.
    texts: Vec<String>,
    /// `None` for a batch with nothing to send.
    answer: Option<Answer>,
}

/// The batches on their way, and where the next one starts.
struct Ahead {
    flight: VecDeque<Batch>,
    stream: Stream,
    /// Where the next read of the log starts.
    since: u64,
    /// The last read reached the log's end.
    caught_up: bool,
    /// One batch at a time until a whole success: at a stream's start (the
    /// parent learns of a stream from its batch 0, and refuses a later
    /// batch of one it does not know), and after a failure (a blocked
    /// record is not sent again with batches behind it).
    careful: bool,
}

impl Ahead {
    fn new(cursor: u64) -> Self {
        Ahead {
            flight: VecDeque::new(),
            stream: Stream::new(),
            since: cursor,
            caught_up: false,
            careful: true,
        }
    }

    /// Drops the batches on their way (the parent refuses them, or already
    /// applied them, and applying again changes nothing); the next read
    /// starts at `cursor` under a new stream.
    fn restart(&mut self, cursor: u64) {
        self.flight.clear();
        self.stream = Stream::new();
        self.since = cursor;
        self.caught_up = false;
        self.careful = true;
    }
}

/// The loop's push stream: a fresh id per start and after each stop.
struct Stream {
    id: String,
    next: u64,
}

impl Stream {
    fn new() -> Self {
        static MADE: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        Stream {
            id: format!("{nanos:x}-{:x}", MADE.fetch_add(1, Ordering::Relaxed)),
            next: 0,
        }
    }
}

impl Edge {
    /// The push cursor and its lag: this node's log past the cursor.
    fn note_push_lag(&self, cursor: u64) {
        self.push.cursor.store(cursor, Ordering::Relaxed);
        self.push.lag.store(
            self.store.last_seq().saturating_sub(cursor),
            Ordering::Relaxed,
        );
    }

    /// [`Self::pause`] for the push loop: the lag follows new local writes
    /// while the loop waits to try again.
    async fn pause_noting_lag(
        &self,
        d: Duration,
        cursor: u64,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        let mut seq_rx = self.store.watch_seq();
        let until = tokio::time::sleep(d);
        tokio::pin!(until);
        loop {
            if *stop.borrow() {
                return false;
            }
            self.note_push_lag(cursor);
            tokio::select! {
                _ = &mut until => return true,
                _ = stop.changed() => return false,
                r = seq_rx.changed() => if r.is_err() { return !*stop.borrow() },
            }
        }
    }

    /// Waits for a push cursor's write; a failure is said, not retried.
    async fn stored_cursor(&self, w: CursorWrite) {
        match w.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(edge = %self.cfg.name, error = %e, "cannot store the push cursor");
                self.push.set_state(
                    "retrying",
                    Some(format!("cannot store the push cursor: {e}")),
                );
            }
            Err(e) => tracing::warn!(edge = %self.cfg.name, error = %e, "push cursor task failed"),
        }
    }

    /// A request to the parent failed: counts it, says why and waits out
    /// the backoff; `false` when the edge is stopping.
    async fn retry_push(
        &self,
        reason: String,
        attempt: &mut u32,
        cursor: u64,
        stop: &mut watch::Receiver<bool>,
    ) -> bool {
        self.push.errors.fetch_add(1, Ordering::Relaxed);
        self.push.set_state("retrying", Some(reason));
        let go = self
            .pause_noting_lag(self.delay(*attempt), cursor, stop)
            .await;
        *attempt += 1;
        go
    }

    /// Pushes this node's change log to the parent until `stop`.
    pub async fn run_push(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let key = cursor_key(&self.cfg.name, Direction::Push);
        self.push.set_state("starting", None);
        let mut attempt = 0u32;
        // The cursor first, so lag is true before the parent was ever
        // reached (a wrong token, a parent that is down).
        let mut cursor = match self.store.cursor(&key).await {
            Ok(c) => c.unwrap_or(0),
            Err(e) => {
                self.push.set_state("blocked", Some(e.to_string()));
                return;
            }
        };
        self.note_push_lag(cursor);
        // The parent's node id next: its own versions are never sent back.
        let hello = loop {
            let hello = tokio::select! {
                r = self.post_apply(&[]) => r,
                _ = stop.changed() => return,
            };
            match hello {
                Ok(a) => break a,
                Err(f) => {
                    if !self
                        .retry_push(f.reason, &mut attempt, cursor, &mut stop)
                        .await
                    {
                        return;
                    }
                }
            }
        };
        let parent = hello.node_id;
        let mut ordered = hello.ordered;
        self.learn_parent(&parent);
        let mut seq_rx = self.store.watch_seq();
        let mut failing: Option<Failing> = None;
        let mut cursor_write: Option<CursorWrite> = None;
        let mut ahead = Ahead::new(cursor);
        attempt = 0;
        self.push.set_state("ok", None);
        while !*stop.borrow() {
            if ahead.caught_up && seq_rx.has_changed().unwrap_or(false) {
                ahead.caught_up = false;
            }
            let depth = if ordered && !ahead.careful {
                PUSH_IN_FLIGHT
            } else {
                1
            };
            if !ahead.caught_up && ahead.flight.len() < depth {
                let upper = *seq_rx.borrow_and_update();
                let rows = match self
                    .store
                    .changes(ChangesQuery {
                        since: ahead.since,
                        count: self.cfg.batch_size_max,
                        types: self.push_filter.types.clone(),
                        exclude_via: Some(parent.clone()),
                    })
                    .await
                {
                    Ok(r) => r,
                    Err(e) => {
                        ahead.restart(cursor);
                        self.push.set_state("retrying", Some(e.to_string()));
                        if !self
                            .pause_noting_lag(self.delay(attempt), cursor, &mut stop)
                            .await
                        {
                            break;
                        }
                        attempt += 1;
                        continue;
                    }
                };
                let scanned = match rows.last() {
                    Some(v) if rows.len() >= self.cfg.batch_size_max => v.seq,
                    Some(v) => v.seq.max(upper),
                    None => upper.max(ahead.since),
                };
                ahead.caught_up = rows.is_empty() || scanned == upper;
                ahead.since = scanned;
                let batch = self.batch(&rows, scanned, ordered.then_some(&mut ahead.stream));
                if batch.answer.is_none() && ahead.flight.is_empty() {
                    // Nothing to send up to `scanned`: remember it in memory
                    // only (a restart scans those rows again, harmlessly).
                    cursor = scanned;
                    self.note_push_lag(cursor);
                } else {
                    ahead.flight.push_back(batch);
                }
                continue;
            }
            let Some(mut head) = ahead.flight.pop_front() else {
                // Caught up, nothing on its way: wait for new writes.
                tokio::select! {
                    r = seq_rx.changed() => if r.is_err() { break },
                    _ = stop.changed() => break,
                }
                ahead.caught_up = false;
                continue;
            };
            let Some(mut answer) = head.answer.take() else {
                cursor = head.scanned;
                self.note_push_lag(cursor);
                continue;
            };
            let sent = tokio::select! {
                r = &mut answer.0 => r.unwrap_or_else(|e| Err(Failure {
                    status: None,
                    reason: format!("the push request's task failed: {e}"),
                })),
                _ = stop.changed() => break,
            };
            let ans = match sent {
                Ok(a) => {
                    attempt = 0;
                    ordered = a.ordered;
                    a
                }
                Err(f) => {
                    ahead.restart(cursor);
                    if f.status == Some(409) && head.n > 0 {
                        // The parent no longer knows the stream (it
                        // restarted): a new one starts from the cursor.
                        tracing::debug!(edge = %self.cfg.name, reason = %f.reason, "push stream restarted");
                        continue;
                    }
                    if !self
                        .retry_push(f.reason, &mut attempt, cursor, &mut stop)
                        .await
                    {
                        break;
                    }
                    continue;
                }
            };
            self.push.stored.fetch_add(ans.stored, Ordering::Relaxed);
            self.push.skipped.fetch_add(ans.skipped, Ordering::Relaxed);
            self.push
                .conflicts
                .fetch_add(ans.conflicts, Ordering::Relaxed);
            let (to, outcome) = match &ans.failed {
                None => (head.scanned, "ok"),
                Some((i, _, _)) => (
                    head.sent
                        .get(*i)
                        .map_or(cursor, |v| v.0.saturating_sub(1))
                        .max(cursor),
                    "partial",
                ),
            };
            let mut audit = AuditEntry::new(
                &self.cfg.name,
                "push",
                outcome,
                ans.stored,
                format!(
                    "to {parent}: {} sent, {} stored, {} skipped, {} conflicts",
                    ans.applied, ans.stored, ans.skipped, ans.conflicts
                ),
            );
            audit.first_seq = head.sent.first().map(|v| v.0);
            audit.last_seq = Some(to);
            let w = SyncWrite::SetCursor {
                key: key.clone(),
                seq: to,
                audit: Some(audit),
            };
            // The cursor is stored while the next batch goes out (the one
            // before is waited for first, so cursors are stored in order).
            // Should it fail, the parent has the records: a restart sends
            // them again, harmlessly.
            if let Some(prev) = cursor_write.take() {
                self.stored_cursor(prev).await;
            }
            let store = self.store.clone();
            cursor_write = Some(tokio::spawn(async move {
                store.write(WriteRequest::Sync(w)).await.map(|_| ())
            }));
            cursor = to;
            self.note_push_lag(cursor);
            match ans.failed {
                None => {
                    failing = None;
                    ahead.careful = false;
                    self.push.set_state("ok", None);
                }
                Some((i, status, why)) => {
                    // The batches after this one are not applied: they go
                    // again, from the cursor, under a new stream.
                    ahead.restart(cursor);
                    // The dead letter's own cursor must come after it.
                    if let Some(w) = cursor_write.take() {
                        self.stored_cursor(w).await;
                    }
                    let Some((seq, rtype, id)) = head.sent.get(i) else {
                        continue;
                    };
                    let l = self.letter(
                        Direction::Push,
                        rtype,
                        id,
                        *seq,
                        std::mem::take(&mut head.texts[i]),
                        format!("{status}: {why}"),
                    );
                    let wait = self.record_failed(Direction::Push, &mut failing, l).await;
                    if failing.is_none() {
                        cursor = *seq;
                        ahead.since = cursor;
                    }
                    if !self.pause_noting_lag(wait, cursor, &mut stop).await {
                        break;
                    }
                }
            }
        }
        ahead.flight.clear();
        if let Some(w) = cursor_write.take() {
            self.stored_cursor(w).await;
        }
        tracing::debug!(edge = %self.cfg.name, "push stopped");
    }

    /// The records of `rows` that pass the push filter, sent to the parent
    /// as the next batch of `stream` (as a lone batch without one).
    fn batch(
        self: &Arc<Self>,
        rows: &[StoredVersion],
        scanned: u64,
        stream: Option<&mut Stream>,
    ) -> Batch {
        let mut sent = Vec::new();
        let mut texts = Vec::new();
        for v in rows {
            let body = if self.push_filter.has_expr() {
                v.body
                    .as_deref()
                    .and_then(|b| serde_json::from_str::<serde_json::Value>(b).ok())
            } else {
                None
            };
            if self.push_filter.passes(&v.rtype, body.as_ref()) {
                sent.push((v.seq, v.rtype.clone(), v.id.clone()));
                texts.push(change_entry_text(None, v));
            } else {
                self.push.filtered.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut n = 0;
        let answer = (!texts.is_empty()).then(|| {
            let body = self.apply_body(
                &texts,
                stream.map(|s| {
                    n = s.next;
                    s.next += 1;
                    (s.id.as_str(), n)
                }),
            );
            let edge = self.clone();
            Answer(tokio::spawn(
                async move { edge.post_apply_body(body).await },
            ))
        });
        Batch {
            n,
            scanned,
            sent,
            texts,
            answer,
        }
    }
}
