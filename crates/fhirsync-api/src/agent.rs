//! What the admin API and `/metrics` need from the node's sync agent (the
//! replicator driving this node's edges). The agent lives in another crate
//! and is optional: a node without a parent has none.

use async_trait::async_trait;
use serde_json::Value;

#[async_trait]
pub trait SyncAgent: Send + Sync + 'static {
    /// Each edge with its state, cursors, lag and counters.
    async fn edges(&self) -> Vec<Value>;
    /// Applies (pull) or sends (push) a dead letter again; on success it is
    /// removed. Errors carry an HTTP status and a reason.
    async fn retry_dead_letter(&self, id: u64) -> Result<(), (u16, String)>;
    /// Appends Prometheus text lines for the edges.
    fn metrics(&self, out: &mut String);
}
