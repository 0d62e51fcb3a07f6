//! Counts per resource type, failures with the server's OperationOutcome,
//! and the JSON report of `--report`.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

/// Failures listed in full; past this only the count grows.
pub const FAILURES_LISTED_MAX: usize = 1000;

#[derive(Debug, Default, Clone, Serialize, PartialEq, Eq)]
pub struct TypeCounts {
    pub read: u64,
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    pub deleted: u64,
    pub failed: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Failure {
    /// `Type/id`, a file position, or a Bundle's origin.
    pub resource: String,
    pub status: u16,
    pub message: String,
    #[serde(skip_serializing_if = "Value::is_null")]
    pub outcome: Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: crate::Mode,
    pub source: String,
    pub targets: Vec<String>,
    pub dry_run: bool,
    pub seconds: f64,
    pub types: BTreeMap<String, TypeCounts>,
    pub failures: Vec<Failure>,
    pub failures_not_listed: u64,
    /// Notes on what the run decided (skipped deletes, cursor saved, ...).
    pub notes: Vec<String>,
    /// Resources the source will give, when known up front (directories).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected: Option<u64>,
}

#[derive(Debug, Clone, Copy)]
pub enum Count {
    Read,
    Created,
    Updated,
    Unchanged,
    Deleted,
    Failed,
}

impl Report {
    pub fn new(mode: crate::Mode, source: String, targets: Vec<String>, dry_run: bool) -> Self {
        Report {
            mode,
            source,
            targets,
            dry_run,
            seconds: 0.0,
            types: BTreeMap::new(),
            failures: Vec::new(),
            failures_not_listed: 0,
            notes: Vec::new(),
            expected: None,
        }
    }

    pub fn count(&mut self, rtype: &str, what: Count) {
        self.count_n(rtype, what, 1);
    }

    pub fn count_n(&mut self, rtype: &str, what: Count, n: u64) {
        if n == 0 {
            return;
        }
        let c = self.types.entry(rtype.to_owned()).or_default();
        match what {
            Count::Read => c.read += n,
            Count::Created => c.created += n,
            Count::Updated => c.updated += n,
            Count::Unchanged => c.unchanged += n,
            Count::Deleted => c.deleted += n,
            Count::Failed => c.failed += n,
        }
    }

    pub fn fail(&mut self, rtype: &str, f: Failure) {
        self.count(rtype, Count::Failed);
        if self.failures.len() < FAILURES_LISTED_MAX {
            self.failures.push(f);
        } else {
            self.failures_not_listed += 1;
        }
    }

    pub fn totals(&self) -> TypeCounts {
        let mut t = TypeCounts::default();
        for c in self.types.values() {
            t.read += c.read;
            t.created += c.created;
            t.updated += c.updated;
            t.unchanged += c.unchanged;
            t.deleted += c.deleted;
            t.failed += c.failed;
        }
        t
    }

    /// The summary table printed at the end.
    pub fn summary(&self) -> String {
        let mut s = format!(
            "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}\n",
            "type", "read", "created", "updated", "unchanged", "deleted", "failed"
        );
        let row = |s: &mut String, name: &str, c: &TypeCounts| {
            s.push_str(&format!(
                "{:<28} {:>9} {:>9} {:>9} {:>9} {:>9} {:>7}\n",
                name, c.read, c.created, c.updated, c.unchanged, c.deleted, c.failed
            ))
        };
        for (t, c) in &self.types {
            row(&mut s, t, c);
        }
        row(&mut s, "total", &self.totals());
        for f in &self.failures {
            s.push_str(&format!(
                "failed: {} ({}): {}\n",
                f.resource, f.status, f.message
            ));
        }
        if self.failures_not_listed > 0 {
            s.push_str(&format!(
                "... and {} more failures\n",
                self.failures_not_listed
            ));
        }
        for n in &self.notes {
            s.push_str(&format!("note: {n}\n"));
        }
        s
    }
}
