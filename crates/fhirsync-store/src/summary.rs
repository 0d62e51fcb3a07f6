//! What a store answers to anti-entropy: the fingerprints of its current
//! resources over key ranges, cut where the asker says or into parts of
//! about equal size, and the items themselves for small ranges (see
//! `fhirsync_core::summary`). The SQL is in `sql::summary`.

use fhirsync_core::summary::{item_hash, Fingerprint, KeyRange};

/// Most parts one range is cut into.
pub const SUMMARY_FANOUT_MAX: usize = 64;
/// Most items one range's answer lists.
pub const SUMMARY_ITEMS_MAX: usize = 10_000;

/// What an item stands for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Basis {
    /// Every current version, tombstones included, with its vector: two
    /// replicas of one history compare equal (anti-entropy on an edge).
    #[default]
    Versions,
    /// Only live resources, by content alone (the vector left out): two
    /// nodes written apart, as `fhirsync sync` copies, compare equal when
    /// they hold the same resources with the same content.
    Content,
}

/// A question about the store's current resources.
#[derive(Debug, Clone)]
pub enum SummaryQuery {
    /// The fingerprint of every type that holds a resource or tombstone.
    Types,
    /// The range's items when it holds at most `leaf`; otherwise the range
    /// cut into `fanout` parts of about equal count.
    Split {
        range: KeyRange,
        fanout: usize,
        leaf: usize,
    },
    /// The range cut at `bounds` (ascending; see `summary::Cutter`).
    Cut {
        range: KeyRange,
        bounds: Vec<String>,
    },
    /// Up to `limit` items of the range, in id order.
    Items { range: KeyRange, limit: usize },
}

/// One current resource as a summary item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummaryItem {
    pub id: String,
    /// The version vector as stored (canonical JSON).
    pub vv: String,
    /// The content hash; `None` for a tombstone.
    pub content: Option<Vec<u8>>,
}

impl SummaryItem {
    pub fn hash(&self, rtype: &str) -> u128 {
        item_hash(rtype, &self.id, &self.vv, self.content.as_deref())
    }
}

/// A range's part: its upper bound (inclusive; `None`: to the end of the
/// range) and fingerprint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    pub upto: Option<String>,
    pub fp: Fingerprint,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SummaryAnswer {
    Types(Vec<(String, Fingerprint)>),
    Parts(Vec<Part>),
    Items(Vec<SummaryItem>),
}
