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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::sync::watch;

use super::{connect, PgConfig};
use crate::StoreError;

/// How often a process tries for the lease, and the holder checks it.
pub const LEASE_TICK_MS: u64 = 1_000;

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
    pub fn start(cfg: &PgConfig, name: &str) -> Result<Lease, StoreError> {
        let (tx, held) = watch::channel(false);
        let stop = Arc::new(AtomicBool::new(false));
        let (cfg, flag, k) = (cfg.clone(), stop.clone(), key(name));
        let name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name("fhirsync-lease".into())
            .spawn(move || run(cfg, k, &name, tx, flag))
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

fn run(cfg: PgConfig, k: i64, name: &str, tx: watch::Sender<bool>, stop: Arc<AtomicBool>) {
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
