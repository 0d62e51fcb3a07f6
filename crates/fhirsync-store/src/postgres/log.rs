//! The change log across processes: gapless and in commit order for every
//! reader, and a wake-up on every commit.
//!
//! Every transaction that appends to the log first locks the one row of
//! `log_head` ([`lock_head`]) and holds the lock until it commits or rolls
//! back. Its `seq`s are the head's plus one, two, …; at the end it moves
//! the head past them ([`advance_head`]). So transactions that append run
//! one at a time across every process on the database, a rolled-back one
//! hands its numbers to the next, and PostgreSQL makes a commit visible
//! before it releases the row lock: the next appender, and so every later
//! `seq`, commits after it. A reader that sees `seq` N+1 therefore sees
//! every `seq` up to N (ARCHITECTURE invariant 23). Each process groups
//! its waiting writes into one transaction, so the lock is taken once per
//! group, not per write.
//!
//! The head also carries the last HLC, so that the processes of one node
//! stamp versions with one clock that never goes back. [`Listener`]
//! follows the head through `LISTEN`/`NOTIFY`: [`advance_head`] notifies,
//! and PostgreSQL delivers the notification only at commit.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use postgres::GenericClient;
use tokio::sync::watch;

use super::PgConfig;
use crate::sql::raise;
use crate::StoreError;

/// The channel commits are announced on (payload: the new head `seq`).
pub const CHANNEL: &str = "fhirsync_log";

/// How often the listener looks up from waiting (to stop, or to notice a
/// dead connection).
const LISTEN_TICK_MS: u64 = 250;

/// Longest pause between reconnects of a listener that lost its database.
const RECONNECT_MAX_MS: u64 = 5_000;

/// The last `seq` and HLC of the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    pub seq: u64,
    pub hlc: u64,
}

/// Takes the log's lock for the rest of the transaction `tx` and reads the
/// head. Call it before anything else the transaction reads for its writes.
pub fn lock_head(tx: &mut impl GenericClient) -> Result<Head, StoreError> {
    let row = tx.query_one("SELECT seq, hlc FROM log_head FOR UPDATE", &[])?;
    Ok(Head {
        seq: row.get::<_, i64>(0) as u64,
        hlc: row.get::<_, i64>(1) as u64,
    })
}

/// Moves the head to `h` (the transaction holds the lock and appended up
/// to `h.seq`) and announces it when the transaction commits.
pub fn advance_head(tx: &mut impl GenericClient, h: Head) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE log_head SET seq = $1, hlc = $2",
        &[&(h.seq as i64), &(h.hlc as i64)],
    )?;
    tx.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &h.seq.to_string()])?;
    Ok(())
}

/// The committed head, without waiting for any lock.
pub fn read_head(client: &mut impl GenericClient) -> Result<Head, StoreError> {
    let row = client.query_one("SELECT seq, hlc FROM log_head", &[])?;
    Ok(Head {
        seq: row.get::<_, i64>(0) as u64,
        hlc: row.get::<_, i64>(1) as u64,
    })
}

/// Follows the commits of every process on the database: its thread keeps
/// a connection that `LISTEN`s on [`CHANNEL`] and raises the watched `seq`
/// to each announced head (never lowers it). On a lost connection it
/// reconnects with backoff and reads the head, so a missed announcement
/// is made up for. Stopped on drop.
pub struct Listener {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Connects (failing now if the database cannot be reached), then
    /// follows on a thread of its own.
    pub fn start(cfg: &PgConfig, seq_tx: watch::Sender<u64>) -> Result<Listener, StoreError> {
        let first = Self::subscribe(cfg, &seq_tx)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (cfg, flag) = (cfg.clone(), stop.clone());
        let thread = std::thread::Builder::new()
            .name("fhirsync-pg-listen".into())
            .spawn(move || Self::run(cfg, seq_tx, flag, first))
            .map_err(|e| StoreError::Backend(format!("cannot start the listener: {e}")))?;
        Ok(Listener {
            stop,
            thread: Some(thread),
        })
    }

    /// A connection listening on the channel, the head read after.
    fn subscribe(
        cfg: &PgConfig,
        seq_tx: &watch::Sender<u64>,
    ) -> Result<postgres::Client, StoreError> {
        let mut c = super::connect(cfg)?;
        c.batch_execute(&format!("LISTEN {CHANNEL}"))?;
        raise(seq_tx, read_head(&mut c)?.seq);
        Ok(c)
    }

    fn run(
        cfg: PgConfig,
        seq_tx: watch::Sender<u64>,
        stop: Arc<AtomicBool>,
        first: postgres::Client,
    ) {
        let mut conn = Some(first);
        let mut pause_ms = 100;
        while !stop.load(Ordering::Relaxed) {
            let Some(c) = conn.as_mut() else {
                std::thread::sleep(Duration::from_millis(pause_ms));
                match Self::subscribe(&cfg, &seq_tx) {
                    Ok(c) => {
                        tracing::info!("log listener reconnected");
                        conn = Some(c);
                        pause_ms = 100;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "log listener cannot reconnect");
                        pause_ms = (pause_ms * 2).min(RECONNECT_MAX_MS);
                    }
                }
                continue;
            };
            if let Err(e) = Self::drain(c, &seq_tx) {
                tracing::warn!(error = %super::describe(&e), "log listener lost its connection");
                conn = None;
            } else if c.is_closed() {
                conn = None;
            }
        }
    }

    /// Raises the watched `seq` to what was announced within one tick.
    fn drain(c: &mut postgres::Client, seq_tx: &watch::Sender<u64>) -> Result<(), postgres::Error> {
        use postgres::fallible_iterator::FallibleIterator;
        let mut n = c.notifications();
        let tick = Duration::from_millis(LISTEN_TICK_MS);
        let end = std::time::Instant::now() + tick;
        let mut it = n.timeout_iter(tick);
        while let Some(note) = it.next()? {
            if let Ok(seq) = note.payload().parse::<u64>() {
                raise(seq_tx, seq);
            }
            if std::time::Instant::now() > end {
                break;
            }
        }
        Ok(())
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
