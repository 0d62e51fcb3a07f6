//! The lease that lets exactly one of the processes sharing a database run
//! the node's background agents (parent edge, NATS, subscriptions). It is
//! a PostgreSQL session advisory lock, held by a connection of its own:
//! the database frees it the moment that connection ends, so a process
//! that dies (or loses the database) hands it on without any clock. Each
//! process tries for it every [`LEASE_TICK_MS`]; the holder checks its
//! connection as often and gives the lease up (its agents stop) when the
//! check fails. A takeover therefore happens within about two ticks of the
//! holder's connection ending; for the short time two processes might both
//! think they hold it, the agents' at-least-once rules (cursors moved with
//! the data, vectors and message ids that skip repeats) keep the data
//! right.
//!
//! The same thread writes the process's heartbeat into `processes` each
//! tick (whether it holds the lease, on the database's clock), for
//! `fhirsync status`; a row not renewed for [`PROCESS_STALE_MS`] shows as
//! down and is removed after [`PROCESS_FORGET_MS`].

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use super::{connect, PgConfig};
use crate::sql::{all, Db};
use crate::{ProcessInfo, StoreError};

/// How often a process tries for the lease, and the holder checks it.
pub const LEASE_TICK_MS: u64 = 1_000;

/// A process whose heartbeat is older than this shows as down.
pub const PROCESS_STALE_MS: u64 = 3 * LEASE_TICK_MS;

/// A process not heard from for this long leaves `processes`.
pub const PROCESS_FORGET_MS: u64 = 10 * 60 * 1_000;

/// The database's clock in ms, in SQL.
const DB_NOW_MS: &str = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint";

/// The processes on the database, oldest first.
pub fn processes(db: &dyn Db) -> Result<Vec<ProcessInfo>, StoreError> {
    all(
        db,
        &format!(
            "SELECT id, host, pid, base, started_ms, seen_ms, lease_holder,
                    seen_ms >= {DB_NOW_MS} - {PROCESS_STALE_MS}
             FROM processes ORDER BY started_ms, id"
        ),
        &[],
        |r| {
            Ok(ProcessInfo {
                id: r.text(0)?,
                host: r.text(1)?,
                pid: r.i64(2)? as u32,
                base: r.text(3)?,
                started_ms: r.i64(4)? as u64,
                seen_ms: r.i64(5)? as u64,
                lease_holder: r.bool(6)?,
                up: r.bool(7)?,
            })
        },
    )
}

/// Renews `me`'s row and forgets processes long gone.
fn heartbeat(
    c: &mut postgres::Client,
    me: &ProcessInfo,
    held: bool,
) -> Result<(), postgres::Error> {
    let forget = PROCESS_FORGET_MS as i64;
    c.execute(
        &format!(
            "INSERT INTO processes (id, host, pid, base, started_ms, seen_ms, lease_holder)
             VALUES ($1, $2, $3, $4, $5, {DB_NOW_MS}, $6)
             ON CONFLICT (id) DO UPDATE SET seen_ms = EXCLUDED.seen_ms, lease_holder = EXCLUDED.lease_holder"
        ),
        &[&me.id, &me.host, &i64::from(me.pid), &me.base, &(me.started_ms as i64), &held],
    )?;
    c.execute(
        &format!("DELETE FROM processes WHERE seen_ms < {DB_NOW_MS} - $1"),
        &[&forget],
    )?;
    Ok(())
}

/// The advisory lock key of a lease name.
fn key(name: &str) -> i64 {
    // FNV-1a, stable across builds and processes
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in name.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h as i64
}

/// A process's claim on a lease: `held()` says whether it holds it now.
/// Released on drop.
pub struct Lease {
    held: watch::Receiver<bool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Lease {
    /// Starts trying for the lease `name` on the database of `cfg`.
    /// `me` is this process, whose heartbeat the same thread writes.
    pub fn start(cfg: &PgConfig, name: &str, me: ProcessInfo) -> Result<Lease, StoreError> {
        let (tx, held) = watch::channel(false);
        let stop = Arc::new(AtomicBool::new(false));
        let (cfg, flag, k) = (cfg.clone(), stop.clone(), key(name));
        let name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name("fhirsync-lease".into())
            .spawn(move || run(cfg, k, &name, &me, tx, flag))
            .map_err(|e| StoreError::Backend(format!("cannot start the lease thread: {e}")))?;
        Ok(Lease {
            held,
            stop,
            thread: Some(thread),
        })
    }

    pub fn held(&self) -> bool {
        *self.held.borrow()
    }

    /// Notified when the lease is taken or lost.
    pub fn watch(&self) -> watch::Receiver<bool> {
        self.held.clone()
    }
}

fn run(
    cfg: PgConfig,
    k: i64,
    name: &str,
    me: &ProcessInfo,
    tx: watch::Sender<bool>,
    stop: Arc<AtomicBool>,
) {
    let tick = Duration::from_millis(LEASE_TICK_MS);
    let mut conn: Option<postgres::Client> = None;
    while !stop.load(Ordering::Relaxed) {
        let held = *tx.borrow();
        let c = match conn.as_mut() {
            Some(c) => c,
            None => match connect(&cfg) {
                Ok(c) => conn.insert(c),
                Err(e) => {
                    tracing::warn!(error = %e, lease = name, "cannot reach the database for the lease");
                    sleep(tick, &stop);
                    continue;
                }
            },
        };
        let r = if held {
            c.query_one("SELECT 1", &[]).map(|_| true)
        } else {
            c.query_one("SELECT pg_try_advisory_lock($1)", &[&k])
                .map(|r| r.get::<_, bool>(0))
        };
        match r {
            Ok(now) => {
                if now != held {
                    tracing::info!(lease = name, "lease taken: this process runs the agents");
                    tx.send_replace(now);
                }
                if let Err(e) = heartbeat(c, me, now) {
                    tracing::warn!(error = %super::describe(&e), "cannot write this process's heartbeat");
                }
            }
            Err(e) => {
                if held {
                    tracing::warn!(lease = name, error = %super::describe(&e), "lease lost: its connection failed");
                    tx.send_replace(false);
                }
                conn = None;
            }
        }
        sleep(tick, &stop);
    }
    tx.send_replace(false);
    if let Some(c) = conn.as_mut() {
        let _ = c.execute("DELETE FROM processes WHERE id = $1", &[&me.id]);
    }
    // the connection's end frees the lock
    drop(conn);
}

/// Sleeps `d`, waking early to stop.
fn sleep(d: Duration, stop: &AtomicBool) {
    let step = Duration::from_millis(50);
    let mut left = d;
    while !left.is_zero() && !stop.load(Ordering::Relaxed) {
        let s = left.min(step);
        std::thread::sleep(s);
        left -= s;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
