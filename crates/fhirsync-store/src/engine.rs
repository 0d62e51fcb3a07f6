//! FHIR write semantics (create, update, conditional forms, delete,
//! `If-Match`, unchanged-content detection) over any backend's transaction.
//! Runs inside the backend's writer; pure apart from the [`WriteTx`] calls.

use fhirsync_core::search::SearchQuery;
use fhirsync_core::{Hlc, ResourceKey, VersionVector};

use crate::sync::{AuditEntry, Conflict, NewDeadLetter};

use crate::types::*;
use crate::StoreError;

/// The current version of a resource as the writer sees it.
#[derive(Debug, Clone)]
pub struct CurrentVersion {
    pub seq: u64,
    pub vid: u64,
    pub deleted: bool,
    pub vv: VersionVector,
    /// Content hash (0 for a tombstone).
    pub hash: u128,
    pub hlc: Hlc,
    pub origin: String,
}

/// Where a new version's vector, origin and HLC come from.
#[derive(Debug, Clone)]
pub enum Stamp {
    /// A local edit: the previous vector bumped for this node, a fresh HLC.
    Local,
    /// Given by replication: a received version (`via` the peer it came
    /// from) or a version that settles a conflict. `hlc: None` ticks the
    /// local clock; a given HLC also advances it.
    Given {
        vv: VersionVector,
        origin: String,
        hlc: Option<Hlc>,
        via: Option<String>,
    },
}

/// A version to append. The backend assigns `seq`, HLC, `lastUpdated`,
/// stamps `meta` and stores it.
#[derive(Debug)]
pub struct NewVersion<'a> {
    pub rtype: &'a str,
    pub id: &'a str,
    /// `None` for a tombstone.
    pub res: Option<Prepared>,
    pub method: Method,
    pub prev: Option<CurrentVersion>,
    pub stamp: Stamp,
}

/// What a backend's open write transaction offers the engine.
pub trait WriteTx {
    fn node_id(&self) -> &str;
    /// Whose counter this node's edits bump in a vector (see [`crate::restore`]).
    fn vector_id(&self) -> &str;
    fn current(&mut self, rtype: &str, id: &str) -> Result<Option<CurrentVersion>, StoreError>;
    fn read(&mut self, rtype: &str, id: &str) -> Result<Option<StoredVersion>, StoreError>;
    fn vread(
        &mut self,
        rtype: &str,
        id: &str,
        vid: u64,
    ) -> Result<Option<StoredVersion>, StoreError>;
    fn search(&mut self, q: &SearchQuery) -> Result<SearchPage, StoreError>;
    /// Keys of at most `limit` current resources matching `q`.
    fn matches(&mut self, q: &SearchQuery, limit: usize) -> Result<Vec<ResourceKey>, StoreError>;
    fn insert(&mut self, v: NewVersion<'_>) -> Result<StoredVersion, StoreError>;
    /// A fresh server-assigned id, unique across nodes.
    fn new_id(&mut self) -> String;
    fn savepoint(&mut self) -> Result<(), StoreError>;
    fn release(&mut self) -> Result<(), StoreError>;
    fn rollback(&mut self) -> Result<(), StoreError>;

    /// Wall-clock milliseconds (bookkeeping timestamps).
    fn now_ms(&self) -> u64;
    /// Up to `limit` versions of a resource, newest first.
    fn lineage(
        &mut self,
        rtype: &str,
        id: &str,
        limit: usize,
    ) -> Result<Vec<StoredVersion>, StoreError>;
    /// A resource's open conflicts, oldest first.
    fn open_conflicts(&mut self, rtype: &str, id: &str) -> Result<Vec<Conflict>, StoreError>;
    fn conflict(&mut self, id: u64) -> Result<Option<Conflict>, StoreError>;
    /// Inserts (`id == 0`) or updates; returns the id.
    fn put_conflict(&mut self, c: &Conflict) -> Result<u64, StoreError>;
    fn put_cursor(&mut self, key: &str, seq: u64) -> Result<(), StoreError>;
    fn put_peer(
        &mut self,
        node_id: &str,
        received: Option<u64>,
        sent: Option<u64>,
    ) -> Result<(), StoreError>;
    fn add_dead_letter(&mut self, l: &NewDeadLetter) -> Result<u64, StoreError>;
    fn drop_dead_letter(&mut self, id: u64) -> Result<bool, StoreError>;
    fn add_audit(&mut self, a: &AuditEntry) -> Result<(), StoreError>;
    fn add_sub_event(&mut self, e: &crate::sync::SubEvent) -> Result<(), StoreError>;
    fn add_audit_events(
        &mut self,
        records: &[fhirsync_core::audit::AuditRecord],
    ) -> Result<(), StoreError>;
    /// `false` when `key` is already marked used.
    fn claim_once(&mut self, key: &str, until_ms: u64) -> Result<bool, StoreError>;
    /// Writes what the store holds back (index rows written sorted), so
    /// that it is part of the savepoint about to be released.
    fn settle(&mut self) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Runs `f` inside a savepoint: its writes stay only if it succeeds.
pub fn atomically<T>(
    tx: &mut dyn WriteTx,
    f: impl FnOnce(&mut dyn WriteTx) -> Result<T, StoreError>,
) -> Result<T, StoreError> {
    tx.savepoint()?;
    match f(tx) {
        Ok(v) => {
            tx.release()?;
            Ok(v)
        }
        Err(e) => {
            tx.rollback()?;
            Err(e)
        }
    }
}

/// Runs one write request (inside the caller's savepoint).
pub fn execute(tx: &mut dyn WriteTx, req: WriteRequest) -> Result<WriteOutcome, StoreError> {
    match req {
        WriteRequest::Create { res, if_none_exist } => create(tx, res, if_none_exist.as_ref()),
        WriteRequest::Update { id, res, if_match } => update(tx, &id, res, if_match),
        WriteRequest::ConditionalUpdate {
            query,
            res,
            if_match,
        } => conditional_update(tx, &query, res, if_match),
        WriteRequest::Delete {
            rtype,
            id,
            if_match,
        } => delete(tx, &rtype, &id, if_match),
        WriteRequest::ConditionalDelete { query } => match single_match(tx, &query)? {
            Some(k) => delete(tx, &k.rtype, &k.id, None),
            None => Ok(WriteOutcome::Deleted { version: None }),
        },
        WriteRequest::Bundle(b) => crate::bundle::execute(tx, b).map(WriteOutcome::Bundle),
        WriteRequest::Apply(r) => crate::replica::apply(tx, *r).map(WriteOutcome::Applied),
        WriteRequest::Sync(w) => crate::replica::sync_write(tx, w),
    }
}

/// The single match of a conditional query, if any; more than one is 412.
pub fn single_match(
    tx: &mut dyn WriteTx,
    q: &SearchQuery,
) -> Result<Option<ResourceKey>, StoreError> {
    if q.clauses.is_empty() {
        return Err(StoreError::BadRequest(
            "a conditional request needs at least one supported search parameter".into(),
        ));
    }
    if let Some(u) = q.unsupported.first() {
        return Err(StoreError::BadRequest(format!(
            "unsupported search parameter '{u}' in a conditional request"
        )));
    }
    let mut m = tx.matches(q, 2)?;
    match m.len() {
        0 => Ok(None),
        1 => Ok(m.pop()),
        _ => Err(StoreError::MultipleMatches(
            "the condition matches more than one resource".into(),
        )),
    }
}

pub fn create(
    tx: &mut dyn WriteTx,
    res: Prepared,
    if_none_exist: Option<&SearchQuery>,
) -> Result<WriteOutcome, StoreError> {
    if let Some(q) = if_none_exist {
        if let Some(k) = single_match(tx, q)? {
            let version = tx
                .read(&k.rtype, &k.id)?
                .ok_or_else(|| StoreError::Backend(format!("{k} matched but cannot be read")))?;
            return Ok(WriteOutcome::Existing { version });
        }
    }
    let id = tx.new_id();
    let rtype = res.rtype.clone();
    let version = tx.insert(NewVersion {
        rtype: &rtype,
        id: &id,
        res: Some(res),
        method: Method::Post,
        prev: None,
        stamp: Stamp::Local,
    })?;
    Ok(WriteOutcome::Written {
        version,
        created: true,
    })
}

pub fn update(
    tx: &mut dyn WriteTx,
    id: &str,
    res: Prepared,
    if_match: Option<u64>,
) -> Result<WriteOutcome, StoreError> {
    let rtype = res.rtype.clone();
    let cur = tx.current(&rtype, id)?;
    check_if_match(&rtype, id, cur.as_ref(), if_match)?;
    if let Some(c) = &cur {
        if !c.deleted && c.hash == res.hash {
            let version = tx
                .read(&rtype, id)?
                .ok_or_else(|| StoreError::Backend(format!("{rtype}/{id} vanished")))?;
            return Ok(WriteOutcome::Unchanged { version });
        }
    }
    let created = cur.as_ref().is_none_or(|c| c.deleted);
    let version = tx.insert(NewVersion {
        rtype: &rtype,
        id,
        res: Some(res),
        method: Method::Put,
        prev: cur,
        stamp: Stamp::Local,
    })?;
    Ok(WriteOutcome::Written { version, created })
}

pub fn conditional_update(
    tx: &mut dyn WriteTx,
    q: &SearchQuery,
    res: Prepared,
    if_match: Option<u64>,
) -> Result<WriteOutcome, StoreError> {
    match single_match(tx, q)? {
        Some(k) => {
            if let Some(body) = res.body_id() {
                if body != k.id {
                    return Err(id_not_matched(body, &k));
                }
            }
            update(tx, &k.id, res, if_match)
        }
        None => match res.body_id().map(str::to_owned) {
            Some(id) => update(tx, &id, res, if_match),
            None => create(tx, res, None),
        },
    }
}

/// Conditional update found `k`, but the body names another id (400 per
/// the specification).
pub fn id_not_matched(body: &str, k: &ResourceKey) -> StoreError {
    StoreError::BadRequest(format!(
        "resource id '{body}' is not the id of the resource the condition found ({k})"
    ))
}

pub fn delete(
    tx: &mut dyn WriteTx,
    rtype: &str,
    id: &str,
    if_match: Option<u64>,
) -> Result<WriteOutcome, StoreError> {
    let cur = tx.current(rtype, id)?;
    check_if_match(rtype, id, cur.as_ref(), if_match)?;
    match cur {
        Some(c) if !c.deleted => {
            let version = tx.insert(NewVersion {
                rtype,
                id,
                res: None,
                method: Method::Delete,
                prev: Some(c),
                stamp: Stamp::Local,
            })?;
            Ok(WriteOutcome::Deleted {
                version: Some(version),
            })
        }
        _ => Ok(WriteOutcome::Deleted { version: None }),
    }
}

fn check_if_match(
    rtype: &str,
    id: &str,
    cur: Option<&CurrentVersion>,
    if_match: Option<u64>,
) -> Result<(), StoreError> {
    let Some(want) = if_match else {
        return Ok(());
    };
    match cur {
        Some(c) if c.vid == want => Ok(()),
        Some(c) => Err(StoreError::VersionConflict(format!(
            "{rtype}/{id} is at version {}, not {want} as If-Match expects",
            c.vid
        ))),
        None => Err(StoreError::VersionConflict(format!(
            "{rtype}/{id} does not exist, so If-Match version {want} cannot match"
        ))),
    }
}
