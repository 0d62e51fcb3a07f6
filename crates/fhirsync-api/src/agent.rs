//! What the admin API and `/metrics` need from the node's sync agents (the
//! HTTP parent edge, the NATS transport). Agents live in other crates and
//! are optional: a node without a parent or NATS has none.

use async_trait::async_trait;
use fhirsync_store::DeadLetter;
use serde_json::Value;

#[async_trait]
pub trait SyncAgent: Send + Sync + 'static {
    /// Each edge with its state, cursors, lag and counters.
    async fn edges(&self) -> Vec<Value>;
    /// Whether dead letters of this edge name are this agent's.
    fn owns(&self, edge: &str) -> bool;
    /// Applies or sends a dead letter again; on success it is removed.
    /// Errors carry an HTTP status and a reason.
    async fn retry(&self, letter: &DeadLetter) -> Result<(), (u16, String)>;
    /// Appends Prometheus text lines.
    fn metrics(&self, out: &mut String);
}
