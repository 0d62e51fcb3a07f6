//! What a sender delivers: a batch of row changes of one site, the binlog
//! position after them, and the zone its DATETIME values are in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::binlog::Position;

/// One row change as it travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Change {
    pub table: String,
    /// `c`, `u` or `d`.
    pub op: String,
    /// The row's `uuid`, or its primary key for a table without one.
    pub key: String,
    /// The row after the change (before it, for a delete), by column.
    pub row: Map<String, Json>,
    /// For each foreign-key column whose parent table has a `uuid`: the
    /// parent's uuid (integer ids differ from site to site).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub refs: BTreeMap<String, String>,
    /// Binlog position after this change's transaction: a sender that
    /// restarts may cut its batches elsewhere, and the receiver skips the
    /// changes its cursor already covers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<String>,
}

/// Row changes of whole transactions, in binlog order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Batch {
    pub site: String,
    /// Zone of the sender's DATETIME values.
    pub time_zone: String,
    /// Binlog position after the last transaction in the batch; for a
    /// snapshot, the position the snapshot was taken at.
    pub end: String,
    /// A part of the initial snapshot: applied whatever the site's cursor.
    #[serde(default, skip_serializing_if = "is_false")]
    pub snapshot: bool,
    /// The snapshot's last part: the site's cursor becomes `end`.
    #[serde(default, skip_serializing_if = "is_false")]
    pub snapshot_done: bool,
    pub changes: Vec<Change>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

impl Batch {
    pub fn end_position(&self) -> Option<Position> {
        Position::parse(&self.end)
    }

    /// Identifies the batch for de-duplication by a broker.
    pub fn message_id(&self) -> String {
        match (self.snapshot, self.changes.first()) {
            (true, Some(c)) => format!("{}:snapshot:{}:{}:{}", self.site, self.end, c.table, c.key),
            (true, None) => format!("{}:snapshot:{}:done", self.site, self.end),
            _ => format!("{}:{}", self.site, self.end),
        }
    }
}

impl Position {
    /// `file:pos`.
    pub fn parse(s: &str) -> Option<Position> {
        let (file, pos) = s.rsplit_once(':')?;
        Some(Position {
            file: file.to_string(),
            pos: pos.parse().ok()?,
        })
    }
}
