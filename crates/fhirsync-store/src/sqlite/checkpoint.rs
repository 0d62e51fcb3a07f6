//! Copies the WAL back into the database file on a thread and connection
//! of its own, so that a commit never waits for a checkpoint.
//!
//! SQLite's automatic checkpoint runs inside the commit that crosses its
//! threshold, on the writer thread: during a replicated pull it took a
//! quarter of the writer's time. Here the writer's own threshold is only a
//! backstop ([`WRITER_BACKSTOP_PAGES`]), and this thread runs a `PASSIVE`
//! checkpoint (it never blocks the writer or readers) at most every
//! [`CHECKPOINT_EVERY`] after a commit. Once a checkpoint has copied every
//! frame, SQLite starts the WAL over at the next commit, so it stays small.

use std::path::Path;
use std::thread::JoinHandle;
use std::time::Duration;

use rusqlite::Connection;
use tokio::sync::watch;

use super::schema::{self, SyncMode};
use crate::StoreError;

/// Longest time committed pages wait before they are copied.
pub const CHECKPOINT_EVERY: Duration = Duration::from_millis(1000);
/// WAL pages after which the writer checkpoints by itself (64 MB of 4 KB
/// pages): only reached when this thread falls behind.
pub const WRITER_BACKSTOP_PAGES: i64 = 16_384;

/// Starts the checkpoint thread for the database at `path`; it ends once
/// the writer (the sender of `seq`) is gone and the thread is unparked or
/// its interval passes.
pub fn start(
    path: &Path,
    sync: SyncMode,
    mut seq: watch::Receiver<u64>,
) -> Result<JoinHandle<()>, StoreError> {
    let conn = Connection::open(path)?;
    schema::configure_checkpointer(&conn, sync)?;
    std::thread::Builder::new()
        .name("fhirsync-ckpt".into())
        .spawn(move || loop {
            // Parked, not asleep: a closing store unparks it, so that
            // closing never waits out the interval.
            std::thread::park_timeout(CHECKPOINT_EVERY);
            match seq.has_changed() {
                Err(_) => break,
                Ok(false) => continue,
                Ok(true) => {
                    seq.borrow_and_update();
                }
            }
            if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
                tracing::warn!(error = %e, "background checkpoint failed");
            }
        })
        .map_err(|e| StoreError::Backend(format!("cannot start the checkpointer: {e}")))
}

#[cfg(test)]
mod tests {
    use super::CHECKPOINT_EVERY;
    use crate::sqlite::{SqliteConfig, SqliteStore};
    use crate::Store;

    /// Closing a store just opened (its checkpoint thread has just begun
    /// its first wait) does not wait out the interval.
    #[test]
    fn closing_does_not_wait_for_the_checkpoint_interval() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteConfig::new(dir.path().join("fhirsync.db"))).unwrap();
        let t = std::time::Instant::now();
        store.shutdown();
        let took = t.elapsed();
        assert!(took < CHECKPOINT_EVERY / 2, "closing took {took:?}");
    }
}
