//! Values that cross the [`crate::Store`] boundary.

use std::sync::Arc;

use fhirsync_core::index::{extract, IndexEntry};
use fhirsync_core::meta::{assemble, content_hash, split, Split};
use fhirsync_core::search::SearchQuery;
use fhirsync_core::{Hlc, VersionVector};
use serde_json::{Map, Value};

/// How a version came to be (the `request.method` in history).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Post,
    Put,
    Delete,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Method::Post => "POST",
            Method::Put => "PUT",
            Method::Delete => "DELETE",
        }
    }
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "POST" => Some(Method::Post),
            "PUT" => Some(Method::Put),
            "DELETE" => Some(Method::Delete),
            _ => None,
        }
    }
}

/// One stored version of a resource: an entry of the change log.
#[derive(Debug, Clone)]
pub struct StoredVersion {
    pub seq: u64,
    pub rtype: String,
    pub id: String,
    pub vid: u64,
    pub last_updated_ms: u64,
    pub deleted: bool,
    pub method: Method,
    pub origin: String,
    pub vv: VersionVector,
    pub hlc: Hlc,
    /// The resource JSON as stored (with `meta` set); `None` for tombstones.
    pub body: Option<Arc<str>>,
}

/// A resource ready to be written: checked, serialized once (without the
/// server's fields), hashed and indexed. Built outside the writer so this
/// work runs in parallel.
#[derive(Debug, Clone)]
pub struct Prepared {
    pub rtype: String,
    /// The `id` element of the body, if any.
    pub id: Option<String>,
    pub split: Split,
    pub hash: u128,
    pub index: Vec<IndexEntry>,
}

impl Prepared {
    pub fn new(rtype: String, res: Map<String, Value>) -> Self {
        let split = split(&res);
        let hash = content_hash(&rtype, &split);
        let id = fhirsync_core::resource::body_id(&res).map(str::to_owned);
        let index = extract(&rtype, &Value::Object(res));
        Prepared {
            rtype,
            id,
            split,
            hash,
            index,
        }
    }

    pub fn body_id(&self) -> Option<&str> {
        self.id.as_deref()
    }

    /// The JSON to store for version `vid` of resource `id`.
    pub fn body(&self, id: &str, vid: u64, last_updated: &str) -> String {
        assemble(&self.rtype, id, &vid.to_string(), last_updated, &self.split)
    }
}

/// A write the API asks for.
#[derive(Debug)]
pub enum WriteRequest {
    /// POST: server-assigned id; with `if_none_exist`, a conditional create.
    Create {
        res: Prepared,
        if_none_exist: Option<SearchQuery>,
    },
    /// PUT `Type/id`: update, or create with the client's id.
    Update {
        id: String,
        res: Prepared,
        if_match: Option<u64>,
    },
    /// PUT `Type?query`.
    ConditionalUpdate {
        query: SearchQuery,
        res: Prepared,
        if_match: Option<u64>,
    },
    Delete {
        rtype: String,
        id: String,
        if_match: Option<u64>,
    },
    /// DELETE `Type?query`: deletes the single match, if any.
    ConditionalDelete { query: SearchQuery },
    /// A `transaction` (all or nothing) or `batch` Bundle, planned by
    /// [`crate::bundle::plan`].
    Bundle(crate::bundle::PlannedBundle),
    /// Versions received from a peer.
    Apply(Box<crate::sync::ApplyRequest>),
    /// Replication bookkeeping.
    Sync(crate::sync::SyncWrite),
}

/// What a write did.
#[derive(Debug)]
pub enum WriteOutcome {
    /// A new version was stored; `created` when there was no live resource.
    Written {
        version: StoredVersion,
        created: bool,
    },
    /// The content equals the current version: nothing stored.
    Unchanged {
        version: StoredVersion,
    },
    /// Conditional create matched this existing resource.
    Existing {
        version: StoredVersion,
    },
    /// Delete: the tombstone, or `None` when nothing live existed.
    Deleted {
        version: Option<StoredVersion>,
    },
    Bundle(BundleOutcome),
    Applied(crate::sync::ApplyReport),
    /// A bookkeeping write was done.
    Done,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BundleKind {
    Transaction,
    Batch,
}

#[derive(Debug)]
pub struct BundleOutcome {
    pub kind: BundleKind,
    /// One result per request entry, in request order.
    pub entries: Vec<EntryResult>,
}

#[derive(Debug)]
pub enum EntryResult {
    /// A write; `status` is the HTTP status; `version` is absent for a
    /// delete of nothing.
    Write {
        status: u16,
        version: Option<StoredVersion>,
    },
    Read(StoredVersion),
    Search(Box<(SearchQuery, SearchPage)>),
    Failed(crate::StoreError),
}

/// The limit that left resources out of a page's `_include`s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncludedCut {
    /// `INCLUDED_MAX` resources were added.
    Count,
    /// `:iterate` went `ITERATE_ROUNDS_MAX` rounds deep, and a further
    /// round would have added more.
    Rounds,
}

/// One page of search results, evaluated at `snapshot` (a `seq`).
#[derive(Debug)]
pub struct SearchPage {
    pub snapshot: u64,
    pub total: Option<u64>,
    pub items: Vec<StoredVersion>,
    /// What `_include` and `_revinclude` added (`search.mode` include).
    pub included: Vec<StoredVersion>,
    /// Why `included` stopped with more to add, if it did.
    pub included_cut: Option<IncludedCut>,
    /// Position to continue from, when more results exist: the last `seq`
    /// returned in change-log order, the matches returned when sorted.
    pub next_cursor: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HistoryScope {
    System,
    Type(String),
    Instance(String, String),
}

/// `_history`: newest first; `before` is the paging cursor (a `seq`).
#[derive(Debug, Clone)]
pub struct HistoryQuery {
    pub scope: HistoryScope,
    pub since_ms: Option<i64>,
    pub before: Option<u64>,
    pub count: usize,
}

/// `$changes`: after `since`, oldest first.
#[derive(Debug, Clone, Default)]
pub struct ChangesQuery {
    pub since: u64,
    pub count: usize,
    pub types: Vec<String>,
    /// Leaves out versions received from this node (it has them already).
    pub exclude_via: Option<String>,
}

/// Progress of a rebuild of the search index (at open after an upgrade,
/// or asked for while the node serves).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ReindexStatus {
    pub running: bool,
    /// Versions reindexed so far, of `total`.
    pub done: u64,
    pub total: u64,
}

/// A cut of the change log (a bulk export's `transactionTime`): every
/// version up to `seq` has a `lastUpdated` before `at_ms`, every later one
/// at or after it, so `_since = at_ms` picks up exactly what follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogMark {
    pub seq: u64,
    pub at_ms: u64,
}

/// Resources deleted as of `snapshot` (their current version at that
/// `seq` is a tombstone) whose deletion is at or after `since_ms`, in
/// change-log order after `after`.
#[derive(Debug, Clone, Default)]
pub struct DeletedQuery {
    pub rtype: String,
    pub snapshot: u64,
    pub since_ms: u64,
    pub after: u64,
    pub count: usize,
    /// Only those whose last live version satisfied this clause (the
    /// compartment a bulk export of patients searches with).
    pub compartment: Option<fhirsync_core::search::Clause>,
}

/// A node process on the store's database, as its heartbeat last said
/// (PostgreSQL; see `postgres::lease`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcessInfo {
    /// `host/pid/started_ms`: unique among the processes ever started.
    pub id: String,
    pub host: String,
    pub pid: u32,
    /// Where it serves FHIR.
    pub base: String,
    pub started_ms: u64,
    pub seen_ms: u64,
    /// Whether it held the agents' lease at its last heartbeat.
    pub lease_holder: bool,
    /// Whether that heartbeat is recent (see `postgres::lease`).
    pub up: bool,
}

impl ProcessInfo {
    /// This process, serving at `base`, started now.
    pub fn this(base: &str, now_ms: u64) -> ProcessInfo {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".into());
        let pid = std::process::id();
        ProcessInfo {
            id: format!("{host}/{pid}/{now_ms}"),
            host,
            pid,
            base: base.to_owned(),
            started_ms: now_ms,
            seen_ms: now_ms,
            lease_holder: false,
            up: true,
        }
    }
}
