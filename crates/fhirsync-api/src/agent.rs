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
    /// Counters of each edge direction, for `/metrics`.
    fn counters(&self) -> Vec<EdgeCounters>;
    /// Runs anti-entropy on one of this agent's edges (`None`: its first)
    /// and, with `repair`, repairs what differs; the run's report. `None`
    /// when the agent has no such edge.
    async fn verify(
        &self,
        _edge: Option<&str>,
        _repair: bool,
    ) -> Option<Result<Value, (u16, String)>> {
        None
    }
    /// Anti-entropy counters of each edge, for `/metrics`.
    fn verify_counters(&self) -> Vec<VerifyCounters> {
        Vec::new()
    }
}

/// A snapshot of one edge's anti-entropy counters.
#[derive(Debug, Clone, Default)]
pub struct VerifyCounters {
    pub edge: String,
    pub runs: u64,
    pub differences: u64,
    pub repaired: u64,
    /// The parent's `seq` and the time (ms) of the last run that found
    /// the two ends equal.
    pub verified: Option<(u64, u64)>,
}

/// Writes the anti-entropy families, in the Prometheus text format.
pub fn render_verify(out: &mut String, rows: &[VerifyCounters]) {
    type Pick = fn(&VerifyCounters) -> Option<f64>;
    let families: [(&str, &str, &str, Pick); 5] = [
        (
            "fhirsync_verify_runs_total",
            "counter",
            "Anti-entropy runs finished.",
            |c| Some(c.runs as f64),
        ),
        (
            "fhirsync_verify_differences_total",
            "counter",
            "Resources found to differ from the parent.",
            |c| Some(c.differences as f64),
        ),
        (
            "fhirsync_verify_repaired_total",
            "counter",
            "Versions stored by repairs, at either end.",
            |c| Some(c.repaired as f64),
        ),
        (
            "fhirsync_verify_in_sync_seq",
            "gauge",
            "The parent's seq at the last run that found no difference.",
            |c| c.verified.map(|v| v.0 as f64),
        ),
        (
            "fhirsync_verify_in_sync_timestamp_seconds",
            "gauge",
            "When the last run that found no difference ended.",
            |c| c.verified.map(|v| v.1 as f64 / 1000.0),
        ),
    ];
    if rows.is_empty() {
        return;
    }
    for (name, kind, help, pick) in families {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for r in rows {
            if let Some(v) = pick(r) {
                out.push_str(&format!("{name}{{edge=\"{}\"}} {v}\n", r.edge));
            }
        }
    }
}

/// A snapshot of one edge direction's counters.
#[derive(Debug, Clone, Default)]
pub struct EdgeCounters {
    pub edge: String,
    /// `pull`, `push`, `publish`, ...
    pub direction: String,
    /// Changes not carried yet.
    pub lag: u64,
    pub applied: u64,
    pub skipped: u64,
    pub conflicts: u64,
    pub filtered: u64,
    pub dead_letters: u64,
    pub errors: u64,
}

/// Writes every edge family once, in the Prometheus text format.
pub fn render_counters(out: &mut String, rows: &[EdgeCounters]) {
    type Pick = fn(&EdgeCounters) -> u64;
    let families: [(&str, &str, &str, Pick); 7] = [
        (
            "fhirsync_edge_lag_seq",
            "gauge",
            "Changes the edge has not carried yet.",
            |c| c.lag,
        ),
        (
            "fhirsync_edge_applied_total",
            "counter",
            "Versions stored at the receiving end.",
            |c| c.applied,
        ),
        (
            "fhirsync_edge_skipped_total",
            "counter",
            "Versions the receiver had already seen.",
            |c| c.skipped,
        ),
        (
            "fhirsync_edge_conflicts_total",
            "counter",
            "Concurrent edits met.",
            |c| c.conflicts,
        ),
        (
            "fhirsync_edge_filtered_total",
            "counter",
            "Records left out by the edge's filters.",
            |c| c.filtered,
        ),
        (
            "fhirsync_edge_dead_letters_total",
            "counter",
            "Records set aside after their retries.",
            |c| c.dead_letters,
        ),
        (
            "fhirsync_edge_errors_total",
            "counter",
            "Failed attempts (retried; no data is lost).",
            |c| c.errors,
        ),
    ];
    if rows.is_empty() {
        return;
    }
    for (name, kind, help, pick) in families {
        out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
        for r in rows {
            out.push_str(&format!(
                "{name}{{edge=\"{}\",direction=\"{}\"}} {}\n",
                r.edge,
                r.direction,
                pick(r)
            ));
        }
    }
}
