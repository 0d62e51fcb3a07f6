//! Values of replication that cross the [`crate::Store`] boundary: versions
//! received from a peer, the apply request that stores them, and the
//! bookkeeping rows (cursors, conflicts, dead letters, audit, peers). Also
//! the wire form of a change record (a Bundle entry with the
//! `sync-metadata` extension), shared by the change feed and the apply
//! endpoint so both speak exactly one format.

use std::sync::Arc;

use fhirsync_core::replicate::Policy;
use fhirsync_core::resource::{check_resource, is_resource_type};
use fhirsync_core::validate::{summary, Mode};
use fhirsync_core::{Hlc, VersionVector};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};

use crate::types::{Prepared, StoredVersion};

/// Canonical base of the extensions fhirsync writes.
pub const EXTENSION_BASE: &str = "https://fhirsync.dev/fhir/StructureDefinition";

/// Which way data moves on an edge, seen from the child.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Parent → child.
    Pull,
    /// Child → parent.
    Push,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Pull => "pull",
            Direction::Push => "push",
        }
    }
    pub fn parse(s: &str) -> Option<Direction> {
        match s {
            "pull" => Some(Direction::Pull),
            "push" => Some(Direction::Push),
            _ => None,
        }
    }
}

/// A version as another node stored it, to be applied here.
#[derive(Debug, Clone)]
pub struct RemoteVersion {
    pub rtype: String,
    pub id: String,
    /// `None` for a tombstone.
    pub res: Option<Prepared>,
    /// The resource JSON as received (kept in conflict and dead-letter records).
    pub raw: Option<Arc<str>>,
    pub origin: String,
    pub vv: VersionVector,
    pub hlc: Hlc,
    /// Position in the sender's change log.
    pub seq: u64,
}

/// The `sync-metadata` extension of a change-log entry.
pub fn sync_extension(v: &StoredVersion) -> Value {
    json!([{
        "url": format!("{EXTENSION_BASE}/sync-metadata"),
        "extension": [
            {"url": "seq", "valueDecimal": v.seq},
            {"url": "origin", "valueString": v.origin},
            {"url": "vector", "valueString": v.vv.to_json()},
            {"url": "hlc", "valueString": v.hlc.to_string()},
        ]
    }])
}

/// One change record as a Bundle entry for `$apply` (the resource is
/// spliced in as stored, never re-serialized).
pub fn change_entry_text(base: Option<&str>, v: &StoredVersion) -> String {
    let method = if v.deleted { "DELETE" } else { "PUT" };
    let mut out = String::with_capacity(v.body.as_ref().map_or(0, |b| b.len()) + 400);
    out.push_str("{\"extension\":");
    out.push_str(&sync_extension(v).to_string());
    if let Some(base) = base {
        out.push_str(",\"fullUrl\":");
        out.push_str(&Value::String(format!("{base}/{}/{}", v.rtype, v.id)).to_string());
    }
    if let Some(b) = &v.body {
        out.push_str(",\"resource\":");
        out.push_str(b);
    }
    out.push_str(",\"request\":");
    out.push_str(&json!({"method": method, "url": format!("{}/{}", v.rtype, v.id)}).to_string());
    out.push('}');
    out
}

/// The fhirsync extension `name` (its URL is `EXTENSION_BASE/name`) in an
/// `extension` array.
pub fn find_extension<'a>(extension: Option<&'a Value>, name: &str) -> Option<&'a Value> {
    let url = format!("{EXTENSION_BASE}/{name}");
    extension?
        .as_array()?
        .iter()
        .find(|x| x.get("url").and_then(Value::as_str) == Some(&url))
}

/// The members of the `sync-metadata` extension among an entry's
/// `extension` array.
fn sync_metadata(extension: Option<&Value>) -> Option<&Vec<Value>> {
    find_extension(extension, "sync-metadata")?
        .get("extension")?
        .as_array()
}

/// A Bundle of change records (an `$apply` body, a `$changes` page) with
/// its entries left as text, so each is read on its own, in parallel, by
/// [`RemoteVersion::from_payloads`].
#[derive(serde::Deserialize)]
pub struct BundleShell<'a> {
    #[serde(rename = "resourceType", default)]
    pub resource_type: Option<Value>,
    #[serde(default)]
    pub extension: Option<Value>,
    #[serde(default, borrow)]
    pub entry: Option<Vec<&'a RawValue>>,
}

impl BundleShell<'_> {
    /// Whether `resourceType` is `Bundle`.
    pub fn is_bundle(&self) -> bool {
        self.resource_type.as_ref().and_then(Value::as_str) == Some("Bundle")
    }

    /// The Bundle-level fhirsync extension `name`.
    pub fn extension(&self, name: &str) -> Option<&Value> {
        find_extension(self.extension.as_ref(), name)
    }
}

/// The `seq` member of a `sync-metadata` extension, if it is a
/// non-negative integer.
fn metadata_seq(meta: &[Value]) -> Option<u64> {
    meta.iter()
        .find(|x| x.get("url").and_then(Value::as_str) == Some("seq"))?
        .get("valueDecimal")?
        .to_string()
        .parse()
        .ok()
}

/// The sender's `seq` of a change record, if it can be read.
pub fn entry_seq(e: &Value) -> Option<u64> {
    metadata_seq(sync_metadata(e.get("extension"))?)
}

/// Entries one parallel task of [`RemoteVersion::from_payloads`] reads.
const ENTRIES_PER_TASK: usize = 64;

/// The members of a change record's entry that are read, with its
/// resource left as text until the entry is read (so a batch's entries
/// are parsed in parallel, and the text is kept as received without
/// writing it again).
#[derive(serde::Deserialize)]
struct EntryText<'a> {
    #[serde(default)]
    extension: Option<Value>,
    #[serde(default)]
    request: Option<Value>,
    #[serde(default, borrow)]
    resource: Option<&'a RawValue>,
}

/// An entry's resource: a parsed tree, or its text.
enum Resource<'a> {
    Tree(&'a Value),
    Text(&'a RawValue),
}

impl RemoteVersion {
    /// Reads a change record from a Bundle entry of `$changes` or `$apply`;
    /// its resource is validated as `validation` says (a refusal is the
    /// record's error, which the receiver's retry and dead-letter rules take).
    pub fn from_entry(e: &Value, validation: Mode) -> Result<RemoteVersion, String> {
        Self::read(
            e.get("extension"),
            e.get("request"),
            e.get("resource").map(Resource::Tree),
            validation,
        )
    }

    /// [`Self::from_entry`] of an entry's JSON text.
    pub fn from_entry_text(text: &[u8], validation: Mode) -> Result<RemoteVersion, String> {
        let e: EntryText = serde_json::from_slice(text)
            .map_err(|e| format!("entry is not a change record: {e}"))?;
        Self::read(
            e.extension.as_ref(),
            e.request.as_ref(),
            e.resource.map(Resource::Text),
            validation,
        )
    }

    fn read(
        extension: Option<&Value>,
        request: Option<&Value>,
        resource: Option<Resource>,
        validation: Mode,
    ) -> Result<RemoteVersion, String> {
        let meta = sync_metadata(extension).ok_or("entry has no sync-metadata extension")?;
        let field = |name: &str, kind: &str| {
            meta.iter()
                .find(|x| x.get("url").and_then(Value::as_str) == Some(name))
                .and_then(|x| x.get(kind))
                .ok_or_else(|| format!("sync-metadata has no '{name}'"))
        };
        field("seq", "valueDecimal")?;
        let seq = metadata_seq(meta).ok_or("sync-metadata 'seq' is not a non-negative integer")?;
        let origin = field("origin", "valueString")?
            .as_str()
            .ok_or("sync-metadata 'origin' is not a string")?
            .to_owned();
        let vv = field("vector", "valueString")?
            .as_str()
            .and_then(|s| VersionVector::from_json(s).ok())
            .ok_or("sync-metadata 'vector' is not a version vector")?;
        let hlc = field("hlc", "valueString")?
            .as_str()
            .and_then(Hlc::parse)
            .ok_or("sync-metadata 'hlc' is not an HLC timestamp")?;
        let url = request
            .and_then(|r| r.get("url"))
            .and_then(Value::as_str)
            .ok_or("entry has no request.url")?;
        let (rtype, id) = url
            .split_once('/')
            .filter(|(t, i)| is_resource_type(t) && !i.is_empty() && !i.contains('/'))
            .ok_or_else(|| format!("request.url '{url}' is not Type/id"))?;
        let deleted = request
            .and_then(|r| r.get("method"))
            .and_then(Value::as_str)
            == Some("DELETE");
        let (res, raw) = if deleted {
            (None, None)
        } else {
            let not_object = || "resource is not a JSON object".to_owned();
            let (map, raw): (Map<String, Value>, Arc<str>) =
                match resource.ok_or("entry has no resource")? {
                    Resource::Tree(r) => {
                        let map = r.as_object().ok_or_else(not_object)?.clone();
                        (map, Arc::from(r.to_string()))
                    }
                    // The entry's parse only skipped over the resource.
                    Resource::Text(t) => (
                        serde_json::from_str(t.get()).map_err(|e| {
                            if e.is_data() {
                                not_object()
                            } else {
                                format!("resource cannot be read: {e}")
                            }
                        })?,
                        Arc::from(t.get()),
                    ),
                };
            check_resource(&map, Some(rtype)).map_err(|err| err.to_string())?;
            if fhirsync_core::resource::body_id(&map) != Some(id) {
                return Err(format!("resource id is not '{id}'"));
            }
            let issues = validation
                .check_object(&map)
                .map_err(|i| format!("{url} fails validation: {}", summary(&i)))?;
            if !issues.is_empty() {
                tracing::warn!(resource = %url, problems = %summary(&issues), "received a version that fails validation (lenient mode)");
            }
            (Some(Prepared::new(rtype.to_owned(), map)), Some(raw))
        };
        Ok(RemoteVersion {
            rtype: rtype.to_owned(),
            id: id.to_owned(),
            res,
            raw,
            origin,
            vv,
            hlc,
            seq,
        })
    }

    /// Change records from texts that each hold one entry as JSON (a NATS
    /// message's, or an entry of a `$changes` page or an `$apply` Bundle
    /// read as text), parsed and read in parallel (a page of a thousand is
    /// validated and indexed on every core).
    pub fn from_payloads<P: AsRef<[u8]> + Sync>(
        payloads: &[P],
        validation: Mode,
    ) -> Vec<Result<RemoteVersion, String>> {
        use rayon::prelude::*;
        payloads
            .par_iter()
            .with_min_len(ENTRIES_PER_TASK)
            .map(|p| RemoteVersion::from_entry_text(p.as_ref(), validation))
            .collect()
    }

    /// The content hash (`None` for a tombstone).
    pub fn hash(&self) -> Option<u128> {
        self.res.as_ref().map(|r| r.hash)
    }
}

/// Store versions received from a peer, in one transaction with the
/// cursor that covers them.
#[derive(Debug)]
pub struct ApplyRequest {
    /// Edge name, for conflicts, dead letters and the audit log.
    pub edge: String,
    pub direction: Direction,
    /// The node the versions came from.
    pub peer: String,
    pub policy: Policy,
    /// In sender log order. Application stops at the first failure.
    pub versions: Vec<RemoteVersion>,
    /// Pull: the edge's cursor after this batch (moved only as far as the
    /// versions that were stored).
    pub cursor: Option<u64>,
    /// Records given up on, stored in the same transaction.
    pub dead_letters: Vec<NewDeadLetter>,
    /// Recorded as the last `seq` received from `peer` (parent side of a push).
    pub record_peer: bool,
}

/// What happened to one incoming version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    Stored,
    Skipped,
    /// A conflict: queued (`manual`) or settled by the policy.
    Conflict {
        id: u64,
        settled: bool,
    },
    Failed {
        status: u16,
        reason: String,
    },
}

#[derive(Debug, Default)]
pub struct ApplyReport {
    /// One per version, up to and including the first failure.
    pub results: Vec<Applied>,
    pub stored: u64,
    pub skipped: u64,
    pub conflicts: u64,
    /// The cursor as committed (pull).
    pub cursor: Option<u64>,
}

impl ApplyReport {
    pub fn failed(&self) -> Option<(usize, u16, &str)> {
        self.results.iter().enumerate().find_map(|(i, r)| match r {
            Applied::Failed { status, reason } => Some((i, *status, reason.as_str())),
            _ => None,
        })
    }
}

/// One side of a conflict.
#[derive(Debug, Clone, PartialEq)]
pub struct ConflictSide {
    pub vv: VersionVector,
    pub hlc: Hlc,
    pub origin: String,
    /// The resource JSON; `None` for a tombstone.
    pub body: Option<String>,
}

impl ConflictSide {
    pub fn to_json(&self) -> Value {
        let body = self
            .body
            .as_deref()
            .and_then(|b| serde_json::from_str::<Value>(b).ok());
        json!({
            "vector": serde_json::to_value(&self.vv).unwrap_or(Value::Null),
            "hlc": self.hlc.to_string(),
            "origin": self.origin,
            "deleted": self.body.is_none(),
            "resource": body,
        })
    }
    /// [`Self::to_json`] as text, the body spliced in as it is (checked,
    /// not parsed into a tree): what a conflict row stores.
    pub fn to_json_text(&self) -> String {
        #[derive(serde::Serialize)]
        struct Text<'a> {
            vector: &'a VersionVector,
            hlc: String,
            origin: &'a str,
            deleted: bool,
            resource: Option<Box<serde_json::value::RawValue>>,
        }
        let resource = self
            .body
            .as_deref()
            .and_then(|b| serde_json::value::RawValue::from_string(b.to_owned()).ok());
        serde_json::to_string(&Text {
            vector: &self.vv,
            hlc: self.hlc.to_string(),
            origin: &self.origin,
            deleted: self.body.is_none(),
            resource,
        })
        .unwrap_or_else(|_| self.to_json().to_string())
    }
    pub fn from_json(v: &Value) -> Option<ConflictSide> {
        Some(ConflictSide {
            vv: serde_json::from_value(v.get("vector")?.clone()).ok()?,
            hlc: Hlc::parse(v.get("hlc")?.as_str()?)?,
            origin: v.get("origin")?.as_str()?.to_owned(),
            body: v
                .get("resource")
                .filter(|r| !r.is_null())
                .map(|r| r.to_string()),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConflictState {
    /// Waiting for a person (`manual`).
    Open,
    /// Settled by a person on this node.
    Resolved,
    /// A version that has seen both sides arrived (resolved elsewhere).
    Superseded,
    /// Settled by the edge's automatic policy; the loser is kept here.
    Auto,
}

impl ConflictState {
    pub fn as_str(self) -> &'static str {
        match self {
            ConflictState::Open => "open",
            ConflictState::Resolved => "resolved",
            ConflictState::Superseded => "superseded",
            ConflictState::Auto => "auto",
        }
    }
    pub fn parse(s: &str) -> Option<ConflictState> {
        match s {
            "open" => Some(ConflictState::Open),
            "resolved" => Some(ConflictState::Resolved),
            "superseded" => Some(ConflictState::Superseded),
            "auto" => Some(ConflictState::Auto),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Conflict {
    pub id: u64,
    pub rtype: String,
    pub rid: String,
    pub state: ConflictState,
    pub edge: String,
    pub policy: String,
    pub created_ms: u64,
    pub closed_ms: Option<u64>,
    /// `local`, `remote`, `merged`, or for automatic policies the winner.
    pub resolution: Option<String>,
    pub local: ConflictSide,
    pub remote: ConflictSide,
    /// The newest local version both sides descend from, when known.
    pub ancestor: Option<ConflictSide>,
}

impl Conflict {
    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "resourceType": self.rtype,
            "resourceId": self.rid,
            "state": self.state.as_str(),
            "edge": self.edge,
            "policy": self.policy,
            "created": fhirsync_core::instant::format_instant(self.created_ms),
            "closed": self.closed_ms.map(fhirsync_core::instant::format_instant),
            "resolution": self.resolution,
            "local": self.local.to_json(),
            "remote": self.remote.to_json(),
            "ancestor": self.ancestor.as_ref().map(ConflictSide::to_json),
        })
    }
}

/// How a person settles a conflict.
#[derive(Debug, Clone)]
pub enum Resolution {
    KeepLocal,
    TakeRemote,
    /// A merged resource (same type and id).
    Merged(Prepared),
}

/// A record given up on after its retries.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub edge: String,
    pub direction: Direction,
    pub rtype: String,
    pub rid: String,
    /// Position in the sender's log.
    pub seq: u64,
    /// The change record (a Bundle entry), as JSON text.
    pub record: String,
    pub error: String,
    pub attempts: u32,
}

#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub id: u64,
    pub created_ms: u64,
    pub letter: NewDeadLetter,
}

impl DeadLetter {
    pub fn to_json(&self) -> Value {
        let l = &self.letter;
        json!({
            "id": self.id,
            "created": fhirsync_core::instant::format_instant(self.created_ms),
            "edge": l.edge,
            "direction": l.direction.as_str(),
            "resourceType": l.rtype,
            "resourceId": l.rid,
            "seq": l.seq,
            "error": l.error,
            "attempts": l.attempts,
        })
    }
}

/// One line of the audit log of sync operations.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub id: u64,
    pub at_ms: u64,
    pub edge: String,
    /// `pull`, `push`, `conflict`, `dead-letter`, `resolve`, `retry`, `contact`.
    pub action: String,
    /// `ok`, `partial`, `failed`, ...
    pub outcome: String,
    pub count: u64,
    pub first_seq: Option<u64>,
    pub last_seq: Option<u64>,
    pub detail: String,
}

impl AuditEntry {
    pub fn new(edge: &str, action: &str, outcome: &str, count: u64, detail: String) -> Self {
        AuditEntry {
            id: 0,
            at_ms: 0,
            edge: edge.to_owned(),
            action: action.to_owned(),
            outcome: outcome.to_owned(),
            count,
            first_seq: None,
            last_seq: None,
            detail,
        }
    }

    /// The `AuditEvent` form of this sync operation, recorded by `observer`.
    pub fn to_record(&self, at_ms: u64, observer: &str) -> fhirsync_core::audit::AuditRecord {
        use fhirsync_core::audit::{AuditKind, AuditRecord, Who};
        let seqs = match (self.first_seq, self.last_seq) {
            (Some(a), Some(b)) => format!(" seq {a}..{b}"),
            _ => String::new(),
        };
        AuditRecord {
            at_ms,
            kind: AuditKind::Sync,
            subtype: self.action.clone(),
            action: 'E',
            outcome: match self.outcome.as_str() {
                "partial" => 4,
                "failed" | "error" => 8,
                _ => 0,
            },
            outcome_desc: Some(format!(
                "edge {}: {} {}, {} records{seqs}: {}",
                self.edge, self.action, self.outcome, self.count, self.detail
            )),
            who: Who::System,
            address: None,
            observer: observer.to_owned(),
            entities: Vec::new(),
            patients: Vec::new(),
            query: None,
        }
    }

    pub fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "at": fhirsync_core::instant::format_instant(self.at_ms),
            "edge": self.edge,
            "action": self.action,
            "outcome": self.outcome,
            "count": self.count,
            "firstSeq": self.first_seq,
            "lastSeq": self.last_seq,
            "detail": self.detail,
        })
    }
}

/// What a parent knows about one child.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeerInfo {
    pub node_id: String,
    pub first_ms: u64,
    pub last_ms: u64,
    /// Highest child `seq` received by push.
    pub last_seq_received: u64,
    /// Highest own `seq` sent to the child by pull.
    pub last_seq_sent: u64,
}

/// Bookkeeping writes that are not resource versions.
#[derive(Debug)]
pub enum SyncWrite {
    /// Moves an edge's cursor (push: after the parent confirmed), with its audit line.
    SetCursor {
        key: String,
        seq: u64,
        audit: Option<AuditEntry>,
    },
    /// A child was in contact; `sent`: the highest `seq` it was sent.
    PeerContact {
        node_id: String,
        sent: Option<u64>,
    },
    Resolve {
        conflict: u64,
        how: Resolution,
    },
    /// Undoes an automatic settlement (a merge, or a winner a policy
    /// picked) into an open conflict for a person.
    Reopen {
        conflict: u64,
    },
    /// Adds dead letters (and moves the cursor past them, when given).
    DeadLetters {
        letters: Vec<NewDeadLetter>,
        cursor: Option<(String, u64)>,
    },
    /// Removes a dead letter after its retry succeeded.
    DropDeadLetter {
        id: u64,
        audit: AuditEntry,
    },
    Audit(AuditEntry),
    /// Audit records of REST requests (committed together, in order).
    AuditEvents(Vec<fhirsync_core::audit::AuditRecord>),
    /// Marks a key (an assertion's `jti`) used until a time; fails with
    /// [`crate::StoreError::State`] when it already is.
    ClaimOnce {
        key: String,
        until_ms: u64,
    },
    /// Subscription events found in the change log, with the cursors that
    /// cover them (the matcher's position, each subscription's count).
    SubEvents {
        events: Vec<SubEvent>,
        cursors: Vec<(String, u64)>,
    },
}

/// Cursor key of the number of events a subscription has had.
pub fn sub_events_key(sub: &str) -> String {
    format!("sub:{sub}:events")
}

/// Cursor key of the last event number delivered to a subscription.
pub fn sub_sent_key(sub: &str) -> String {
    format!("sub:{sub}:sent")
}

/// Cursor key of the subscription matcher's position in the change log.
pub const SUB_MATCHED_KEY: &str = "subs:matched";

/// One event of a subscription: a change that matched its topic and
/// filters, numbered from 1 per subscription.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubEvent {
    pub sub: String,
    pub num: u64,
    pub seq: u64,
    pub rtype: String,
    pub rid: String,
    pub vid: u64,
    pub deleted: bool,
    pub at_ms: u64,
}

/// Which rows a list call returns: newest first, `before` an id cursor.
/// A search of the node's `AuditEvent`s; every field narrows it.
#[derive(Debug, Clone, Default)]
pub struct AuditQuery {
    /// `rest`, `sync` or `login`.
    pub kind: Option<String>,
    pub subtype: Option<String>,
    pub action: Option<String>,
    pub outcome: Option<u8>,
    /// The agent's name (`token:NAME`, `client:ID`, `user:NAME`, ...).
    pub agent: Option<String>,
    /// `Patient/id`.
    pub patient: Option<String>,
    /// `Type/id`.
    pub entity: Option<String>,
    pub from_ms: Option<u64>,
    pub until_ms: Option<u64>,
    /// Events with ids below this one (paging).
    pub before: Option<u64>,
    pub count: usize,
}

#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub state: Option<String>,
    pub edge: Option<String>,
    pub before: Option<u64>,
    pub count: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::Method;

    fn stored(seq: u64, body: Option<&str>) -> StoredVersion {
        StoredVersion {
            seq,
            rtype: "Patient".into(),
            id: "p1".into(),
            vid: 2,
            last_updated_ms: 1_700_000_000_000,
            deleted: body.is_none(),
            method: if body.is_some() {
                Method::Put
            } else {
                Method::Delete
            },
            origin: "clinic-a".into(),
            vv: VersionVector::new().bumped("clinic-a").bumped("clinic-a"),
            hlc: Hlc::new(1_700_000_000_000, 3),
            body: body.map(Arc::from),
        }
    }

    /// An entry read from its text is the entry read from its tree: the
    /// same record, index and hash; the text keeps the resource as it
    /// came, the tree writes it again.
    #[test]
    fn an_entry_read_as_text_is_the_entry_read_as_a_tree() {
        let body = r#"{"resourceType":"Patient","id":"p1","name":[{"family":"Odhiambo","given":["Amani"]}],"birthDate":"1990-01-02","gender":"female"}"#;
        for v in [stored(7, Some(body)), stored(8, None)] {
            let text = change_entry_text(Some("https://a.example/fhir"), &v);
            let tree: Value = serde_json::from_str(&text).unwrap();
            let a = RemoteVersion::from_entry_text(text.as_bytes(), Mode::Strict).unwrap();
            let b = RemoteVersion::from_entry(&tree, Mode::Strict).unwrap();
            assert_eq!(
                (a.seq, &a.rtype, &a.id, &a.origin),
                (v.seq, &v.rtype, &v.id, &v.origin)
            );
            assert_eq!((a.vv.to_json(), a.hlc), (v.vv.to_json(), v.hlc));
            assert_eq!(a.hash(), b.hash());
            assert_eq!(a.raw, b.raw);
            assert_eq!(
                a.res.as_ref().map(|p| format!("{:?}", p.index)),
                b.res.as_ref().map(|p| format!("{:?}", p.index))
            );
            assert_eq!(a.res.is_none(), v.deleted);
        }
        // spaces in the resource's text are kept as received
        let spaced = change_entry_text(None, &stored(9, Some(body)))
            .replace(r#""id":"p1","#, r#""id" : "p1" ,"#);
        let a = RemoteVersion::from_entry_text(spaced.as_bytes(), Mode::Strict).unwrap();
        assert!(a.raw.as_deref().unwrap().contains(r#""id" : "p1" ,"#));
    }

    /// What a tree refuses, the text refuses, with the same reason.
    #[test]
    fn a_bad_entry_text_is_refused_with_its_reason() {
        let good = change_entry_text(
            None,
            &stored(3, Some(r#"{"resourceType":"Patient","id":"p1"}"#)),
        );
        let cases = [
            (
                good.replace(r#""id":"p1""#, r#""id":"p2""#),
                "resource id is not 'p1'",
            ),
            (
                good.replace(
                    r#""resource":{"resourceType":"Patient","id":"p1"}"#,
                    r#""resource":[1]"#,
                ),
                "resource is not a JSON object",
            ),
            (
                good.replace(r#""url":"Patient/p1""#, r#""url":"Patient""#),
                "is not Type/id",
            ),
            (good.replace("sync-metadata", "other"), "no sync-metadata"),
            (
                good.replace(r#","resource":{"resourceType":"Patient","id":"p1"}"#, ""),
                "entry has no resource",
            ),
        ];
        for (text, why) in cases {
            let tree: Value = serde_json::from_str(&text).unwrap();
            let a = RemoteVersion::from_entry_text(text.as_bytes(), Mode::Strict).unwrap_err();
            let b = RemoteVersion::from_entry(&tree, Mode::Strict).unwrap_err();
            assert!(a.contains(why), "{a} for {text}");
            assert_eq!(a, b);
        }
        let deep = good.replace(
            r#""id":"p1"}"#,
            &format!(r#""id":"p1","x":{}{}}}"#, "[".repeat(200), "]".repeat(200)),
        );
        let why = RemoteVersion::from_entry_text(deep.as_bytes(), Mode::Strict).unwrap_err();
        assert!(
            why.starts_with("resource cannot be read: recursion limit"),
            "{why}"
        );
        for text in ["{", "7", r#"{"resource":{},"resource":{}}"#] {
            let e = RemoteVersion::from_entry_text(text.as_bytes(), Mode::Strict).unwrap_err();
            assert!(e.starts_with("entry is not a change record"), "{e}");
        }
        assert!(RemoteVersion::from_entry_text(b"[]", Mode::Strict).is_err());
    }
}
