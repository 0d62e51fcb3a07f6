//! Storage of versioned FHIR resources and the node's change log.
//!
//! The [`Store`] trait is what the API layer sees; [`engine`] and
//! [`bundle`] hold the FHIR write semantics once, written against the small
//! [`engine::WriteTx`] trait that each backend implements ([`sqlite`] today,
//! PostgreSQL later) so no backend repeats them.

pub mod bundle;
pub mod engine;
pub mod error;
pub mod load;
pub mod postgres;
pub mod replica;
pub mod restore;
pub mod sql;
pub mod sqlite;
pub mod stamp;
pub mod summary;
pub mod sync;
pub mod types;

pub use error::StoreError;
pub use sqlite::{LoadDone, LoadSummary, StreamMsg};
pub use sync::*;
pub use types::*;

use async_trait::async_trait;
use fhirsync_core::search::SearchQuery;
use tokio::sync::watch;

/// A node's resource store. Every successful write has been committed
/// durably (per the configured sync mode) before the call returns.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// This node's stable id.
    fn node_id(&self) -> &str;

    /// Runs one write request atomically.
    async fn write(&self, req: WriteRequest) -> Result<WriteOutcome, StoreError>;

    /// The current version of a resource, tombstones included.
    async fn read(&self, rtype: &str, id: &str) -> Result<Option<StoredVersion>, StoreError>;

    /// One version of a resource.
    async fn vread(
        &self,
        rtype: &str,
        id: &str,
        vid: u64,
    ) -> Result<Option<StoredVersion>, StoreError>;

    /// Versions newest first, for `_history`.
    async fn history(&self, q: HistoryQuery) -> Result<Vec<StoredVersion>, StoreError>;

    /// Current resources matching a search, one page.
    async fn search(&self, q: SearchQuery) -> Result<SearchPage, StoreError>;

    /// Whether the version written at `seq` satisfies the search's
    /// conditions as the store stood right after it was written (chains
    /// and `_has` read that same moment); a deletion never does.
    async fn version_matches(&self, q: SearchQuery, seq: u64) -> Result<bool, StoreError>;

    /// The change log after `since`, in `seq` order.
    async fn changes(&self, q: ChangesQuery) -> Result<Vec<StoredVersion>, StoreError>;

    /// Conflicts, newest first.
    async fn conflicts(&self, q: ListQuery) -> Result<Vec<Conflict>, StoreError>;
    async fn conflict(&self, id: u64) -> Result<Option<Conflict>, StoreError>;
    /// Dead letters, newest first.
    async fn dead_letters(&self, q: ListQuery) -> Result<Vec<DeadLetter>, StoreError>;
    async fn dead_letter(&self, id: u64) -> Result<Option<DeadLetter>, StoreError>;
    /// How many conflicts are open and how many dead letters wait, counted
    /// (not listed), however many there are.
    async fn open_counts(&self) -> Result<(u64, u64), StoreError>;
    /// The audit log of sync operations, newest first.
    async fn audit(&self, q: ListQuery) -> Result<Vec<AuditEntry>, StoreError>;
    /// `AuditEvent`s matching a query, newest first (`count == 0`: none),
    /// and how many match in all.
    async fn audit_events(
        &self,
        q: AuditQuery,
    ) -> Result<(Vec<serde_json::Value>, u64), StoreError>;
    /// A replication cursor.
    async fn cursor(&self, key: &str) -> Result<Option<u64>, StoreError>;
    /// Every replication cursor: key, seq, when it last moved (ms).
    async fn cursors(&self) -> Result<Vec<(String, u64, u64)>, StoreError>;
    /// Children (and other peers) this node has heard from.
    async fn peers(&self) -> Result<Vec<PeerInfo>, StoreError>;
    /// Events of a subscription numbered `from..=until`, at most `limit`.
    async fn sub_events(
        &self,
        sub: &str,
        from: u64,
        until: u64,
        limit: usize,
    ) -> Result<Vec<SubEvent>, StoreError>;

    /// The node processes sharing the store's database, as their
    /// heartbeats say (none on SQLite: one process owns its file).
    async fn processes(&self) -> Result<Vec<ProcessInfo>, StoreError> {
        Ok(Vec::new())
    }

    /// Highest committed `seq`; every `seq` up to it is readable.
    fn last_seq(&self) -> u64;

    /// Notified with the highest committed `seq` after each commit.
    fn watch_seq(&self) -> watch::Receiver<u64>;

    /// Starts indexing every stored version again while the node serves
    /// (unless a reindex is already under way), so that search parameters
    /// defined since find what was stored before; returns its progress.
    async fn reindex(&self) -> Result<ReindexStatus, StoreError>;

    /// Progress of the reindex under way or of the last one.
    fn reindex_status(&self) -> ReindexStatus;

    /// A cut of the change log between two writes (see [`LogMark`]).
    async fn mark(&self) -> Result<LogMark, StoreError>;

    /// Resources deleted as of a snapshot (see [`DeletedQuery`]).
    async fn deleted(&self, q: DeletedQuery) -> Result<Vec<(String, String, u64)>, StoreError>;

    /// Anti-entropy: the fingerprints or items of the current resources
    /// over key ranges (see [`summary`]), on the given basis.
    async fn summary(
        &self,
        q: summary::SummaryQuery,
        basis: summary::Basis,
    ) -> Result<summary::SummaryAnswer, StoreError>;

    /// The current versions (tombstones included) of the given resources;
    /// those the store does not hold are left out.
    async fn current_many(
        &self,
        keys: Vec<(String, String)>,
    ) -> Result<Vec<StoredVersion>, StoreError>;

    /// Stops the writer after the writes queued and waits for it (a
    /// blocking call); later writes get [`StoreError::ShuttingDown`].
    fn shutdown(&self);

    /// Loads everything sent on the returned channel in one transaction,
    /// which commits only when [`StreamMsg::Commit`] is sent (all or
    /// nothing, as `fhirsync import`). Call outside the async runtime's
    /// threads: it waits for the writer to take the load.
    fn load_stream(
        &self,
        depth: usize,
    ) -> Result<(tokio::sync::mpsc::Sender<StreamMsg>, LoadDone), StoreError>;
}
