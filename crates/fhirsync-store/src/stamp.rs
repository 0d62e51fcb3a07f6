//! Stamping a new version, the same on every backend: its vector, origin
//! and HLC (local edit or given by replication), `lastUpdated`, `vid` and
//! the stored JSON. The backend adds `seq` and writes it.

use std::sync::Arc;

use fhirsync_core::index::IndexEntry;
use fhirsync_core::instant::format_instant;
use fhirsync_core::{Hlc, VersionVector};

use crate::engine::{NewVersion, Stamp};
use crate::types::{Method, StoredVersion};

/// How far ahead of the wall clock a received HLC may pull this node's
/// clock (a peer with a clock off by more is not followed; its versions
/// keep their HLC).
pub const HLC_DRIFT_MS_MAX: u64 = 60 * 60 * 1000;

/// The node's clock as a writer keeps it.
#[derive(Debug, Default)]
pub struct Stamper {
    pub hlc: Hlc,
    /// The last formatted `lastUpdated`: many versions share a millisecond.
    lu_text: (u64, String),
}

/// A version ready to store, but for its `seq`.
#[derive(Debug)]
pub struct Stamped {
    pub vid: u64,
    pub lu_ms: u64,
    pub vv: VersionVector,
    pub origin: String,
    pub hlc: Hlc,
    pub via: Option<String>,
    /// `None` for a tombstone.
    pub body: Option<String>,
    /// The content hash, big-endian (`None` for a tombstone).
    pub hash: Option<Vec<u8>>,
    pub index: Vec<IndexEntry>,
    pub method: Method,
}

impl Stamper {
    pub fn new(hlc: Hlc) -> Stamper {
        Stamper {
            hlc,
            lu_text: (0, String::new()),
        }
    }

    /// Moves the clock to at least `at` (another process's stamps, a mark).
    pub fn observe(&mut self, at: Hlc) {
        if self.hlc < at {
            self.hlc = at;
        }
    }

    /// Stamps `v` at wall-clock time `now`, advancing the clock. A local
    /// edit counts in the vector under `vector_id` (the node id, or the
    /// identity a restore from a backup gave it: see [`crate::restore`]).
    pub fn stamp(
        &mut self,
        node_id: &str,
        vector_id: &str,
        now: u64,
        v: NewVersion<'_>,
    ) -> Stamped {
        let (vv, origin, hlc, via) = match v.stamp {
            Stamp::Local => {
                self.hlc = self.hlc.tick(now);
                let vv = v
                    .prev
                    .as_ref()
                    .map_or_else(VersionVector::new, |p| p.vv.clone())
                    .bumped(vector_id);
                (vv, node_id.to_owned(), self.hlc, None)
            }
            Stamp::Given {
                vv,
                origin,
                hlc,
                via,
            } => {
                self.hlc = match hlc {
                    Some(h) => {
                        let next = self.hlc.receive_bounded(h, now, HLC_DRIFT_MS_MAX);
                        if next < h {
                            tracing::warn!(origin = %origin, hlc = %h, "a received HLC is more than {HLC_DRIFT_MS_MAX} ms ahead of this clock; not following it");
                        }
                        next
                    }
                    None => self.hlc.tick(now),
                };
                (vv, origin, hlc.unwrap_or(self.hlc), via)
            }
        };
        let lu_ms = self.hlc.wall_ms();
        let vid = v.prev.as_ref().map_or(1, |p| p.vid + 1);
        let (body, hash, index) = match v.res {
            Some(p) => {
                if self.lu_text.0 != lu_ms || self.lu_text.1.is_empty() {
                    self.lu_text = (lu_ms, format_instant(lu_ms));
                }
                let body = p.body(v.id, vid, &self.lu_text.1);
                (Some(body), Some(p.hash.to_be_bytes().to_vec()), p.index)
            }
            None => (None, None, Vec::new()),
        };
        Stamped {
            vid,
            lu_ms,
            vv,
            origin,
            hlc,
            via,
            body,
            hash,
            index,
            method: v.method,
        }
    }
}

impl Stamped {
    /// The stored version, once it has its `seq` (the index entries stay).
    pub fn stored(&mut self, seq: u64, rtype: &str, id: &str) -> StoredVersion {
        StoredVersion {
            seq,
            rtype: rtype.to_owned(),
            id: id.to_owned(),
            vid: self.vid,
            last_updated_ms: self.lu_ms,
            deleted: self.body.is_none(),
            method: self.method,
            origin: std::mem::take(&mut self.origin),
            vv: std::mem::take(&mut self.vv),
            hlc: self.hlc,
            body: self.body.take().map(Arc::from),
        }
    }
}
