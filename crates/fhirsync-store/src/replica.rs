//! Applying versions received from a peer, and settling conflicts, over any
//! backend's [`WriteTx`]. The decisions themselves are the pure functions
//! of [`fhirsync_core::replicate`]; this module carries them out: store,
//! skip, queue a conflict, or store the winner with a vector that has seen
//! both sides.

use fhirsync_core::replicate::{self, Decision, Policy, Side, Winner};
use fhirsync_core::{Causality, VersionVector};

use crate::engine::{CurrentVersion, NewVersion, Stamp, WriteTx};
use crate::sync::*;
use crate::types::*;
use crate::StoreError;

/// Local versions searched for the common ancestor of a conflict.
pub const ANCESTOR_SEARCH_MAX: usize = 64;

pub fn apply(tx: &mut dyn WriteTx, req: ApplyRequest) -> Result<ApplyReport, StoreError> {
    let mut rep = ApplyReport::default();
    let total = req.versions.len();
    let (applied, failed) = apply_prefix(tx, &req)?;
    let last_ok = applied.len().checked_sub(1).map(|i| req.versions[i].seq);
    for a in applied {
        match &a {
            Applied::Stored => rep.stored += 1,
            Applied::Skipped => rep.skipped += 1,
            Applied::Conflict { .. } => rep.conflicts += 1,
            Applied::Failed { .. } => {}
        }
        rep.results.push(a);
    }
    if let Some((i, e)) = failed {
        let v = &req.versions[i];
        tracing::warn!(edge = %req.edge, rtype = %v.rtype, id = %v.id, error = %e, "version not applied");
        rep.results.push(Applied::Failed {
            status: e.status(),
            reason: e.to_string(),
        });
    }
    let complete = rep.results.len() == total && rep.failed().is_none();
    for l in &req.dead_letters {
        tx.add_dead_letter(l)?;
    }
    if let Some(c) = req.cursor {
        // Only as far as what was stored: a failed version is fetched again.
        let to = if complete { Some(c) } else { last_ok };
        if let Some(to) = to {
            tx.put_cursor(&cursor_key(&req.edge, req.direction), to)?;
            rep.cursor = Some(to);
        }
    }
    if req.record_peer {
        tx.put_peer(&req.peer, last_ok, None)?;
    }
    if total > 0 || !req.dead_letters.is_empty() {
        let mut a = AuditEntry::new(
            &req.edge,
            req.direction.as_str(),
            if complete { "ok" } else { "partial" },
            rep.stored,
            format!(
                "from {}: {} stored, {} skipped, {} conflicts, {} dead letters{}",
                req.peer,
                rep.stored,
                rep.skipped,
                rep.conflicts,
                req.dead_letters.len(),
                rep.failed()
                    .map(|(i, _, why)| format!("; stopped at entry {i}: {why}"))
                    .unwrap_or_default()
            ),
        );
        a.first_seq = req.versions.first().map(|v| v.seq);
        a.last_seq = last_ok;
        tx.add_audit(&a)?;
    }
    Ok(rep)
}

/// The index of the version that failed, and why.
type Failure = (usize, StoreError);

/// Applies the request's versions in order inside one savepoint and keeps
/// the longest prefix that applies: when version `i` fails, everything is
/// rolled back and the versions before `i` are applied again, so exactly
/// those are kept and `i`'s error is returned with them. One savepoint per
/// version would cost more than the version itself (SQLite walks its
/// in-memory statement journal on every release; PostgreSQL pays two round
/// trips), and failures are rare.
fn apply_prefix(
    tx: &mut dyn WriteTx,
    req: &ApplyRequest,
) -> Result<(Vec<Applied>, Option<Failure>), StoreError> {
    let mut upto = req.versions.len();
    let mut failed = None;
    loop {
        tx.savepoint()?;
        let mut applied = Vec::with_capacity(upto);
        let mut error = None;
        for (i, v) in req.versions[..upto].iter().enumerate() {
            match apply_one(tx, req, v) {
                Ok(a) => applied.push(a),
                Err(e) => {
                    error = Some((i, e));
                    break;
                }
            }
        }
        match error {
            None => {
                tx.release()?;
                return Ok((applied, failed));
            }
            // Applying again is deterministic; should an earlier version
            // fail this time, it is the one reported.
            Some((i, e)) => {
                tx.rollback()?;
                upto = i;
                failed = Some((i, e));
            }
        }
    }
}

/// The key under which an edge direction's cursor is stored.
pub fn cursor_key(edge: &str, dir: Direction) -> String {
    format!("{edge}:{}", dir.as_str())
}

fn local_side(c: &CurrentVersion) -> Side<'_> {
    Side {
        vv: &c.vv,
        hlc: c.hlc,
        origin: &c.origin,
        hash: (!c.deleted).then_some(c.hash),
    }
}

fn incoming_side(v: &RemoteVersion) -> Side<'_> {
    Side {
        vv: &v.vv,
        hlc: v.hlc,
        origin: &v.origin,
        hash: v.hash(),
    }
}

fn apply_one(
    tx: &mut dyn WriteTx,
    req: &ApplyRequest,
    v: &RemoteVersion,
) -> Result<Applied, StoreError> {
    let cur = tx.current(&v.rtype, &v.id)?;
    match replicate::decide(cur.as_ref().map(local_side), incoming_side(v)) {
        Decision::Skip => Ok(Applied::Skipped),
        Decision::FastForward => {
            store(
                tx,
                v,
                cur,
                Stamp::Given {
                    vv: v.vv.clone(),
                    origin: v.origin.clone(),
                    hlc: Some(v.hlc),
                    via: Some(req.peer.clone()),
                },
            )?;
            Ok(Applied::Stored)
        }
        Decision::Divergent => {
            let Some(c) = cur else {
                return Ok(Applied::Skipped);
            };
            let w = replicate::lww_winner(local_side(&c), incoming_side(v));
            settle(tx, req, v, c, w, "divergent")
        }
        Decision::Conflict => {
            let Some(c) = cur else {
                return Ok(Applied::Skipped);
            };
            if req.policy.merges() {
                match merged(tx, v, &c)? {
                    Ok((winner, how, sides)) => {
                        let policy = req.policy.as_str();
                        return settle_with(tx, req, v, c, winner, how, policy, Some(sides));
                    }
                    Err(why) => {
                        tracing::debug!(rtype = %v.rtype, id = %v.id, why, "not merged; the fallback policy decides")
                    }
                }
            }
            match replicate::winner(
                req.policy,
                req.direction == Direction::Pull,
                local_side(&c),
                incoming_side(v),
            ) {
                Some(w) => settle(tx, req, v, c, w, req.policy.as_str()),
                None => queue(tx, req, v, &c),
            }
        }
    }
}

/// Stores `v`'s content (or tombstone) on top of `cur`.
fn store(
    tx: &mut dyn WriteTx,
    v: &RemoteVersion,
    cur: Option<CurrentVersion>,
    stamp: Stamp,
) -> Result<StoredVersion, StoreError> {
    let vv = match &stamp {
        Stamp::Given { vv, .. } => vv.clone(),
        Stamp::Local => VersionVector::new(),
    };
    let stored = tx.insert(NewVersion {
        rtype: &v.rtype,
        id: &v.id,
        res: v.res.clone(),
        method: if v.res.is_some() {
            Method::Put
        } else {
            Method::Delete
        },
        prev: cur,
        stamp,
    })?;
    supersede(tx, &v.rtype, &v.id, &vv)?;
    Ok(stored)
}

/// Closes an open conflict of this resource once a version that has seen
/// both of its sides is stored (it was resolved elsewhere).
fn supersede(
    tx: &mut dyn WriteTx,
    rtype: &str,
    id: &str,
    vv: &VersionVector,
) -> Result<(), StoreError> {
    for mut c in tx.open_conflicts(rtype, id)? {
        let dominates =
            |o: &VersionVector| matches!(vv.compare(o), Causality::After | Causality::Equal);
        if dominates(&c.local.vv) && dominates(&c.remote.vv) {
            c.state = ConflictState::Superseded;
            c.closed_ms = Some(tx.now_ms());
            tx.put_conflict(&c)?;
        }
    }
    Ok(())
}

fn side_of_current(
    tx: &mut dyn WriteTx,
    c: &CurrentVersion,
    rtype: &str,
    id: &str,
) -> Result<ConflictSide, StoreError> {
    let body = tx
        .read(rtype, id)?
        .and_then(|s| s.body)
        .map(|b| b.to_string());
    Ok(ConflictSide {
        vv: c.vv.clone(),
        hlc: c.hlc,
        origin: c.origin.clone(),
        body,
    })
}

fn remote_side(v: &RemoteVersion) -> ConflictSide {
    ConflictSide {
        vv: v.vv.clone(),
        hlc: v.hlc,
        origin: v.origin.clone(),
        body: v.raw.as_deref().map(str::to_owned),
    }
}

/// The newest local version that both sides descend from.
fn ancestor(
    tx: &mut dyn WriteTx,
    rtype: &str,
    id: &str,
    remote: &VersionVector,
) -> Result<Option<ConflictSide>, StoreError> {
    for s in tx.lineage(rtype, id, ANCESTOR_SEARCH_MAX)? {
        if matches!(s.vv.compare(remote), Causality::Before | Causality::Equal) {
            return Ok(Some(ConflictSide {
                vv: s.vv,
                hlc: s.hlc,
                origin: s.origin,
                body: s.body.map(|b| b.to_string()),
            }));
        }
    }
    Ok(None)
}

/// `manual`: keep the local version and queue both sides. One open
/// conflict per remote branch of a resource: a newer version of a queued
/// branch replaces its side; a version concurrent with every queued remote
/// side (another branch, come through another edge) gets its own record,
/// so that no branch drops out of sight.
fn queue(
    tx: &mut dyn WriteTx,
    req: &ApplyRequest,
    v: &RemoteVersion,
    cur: &CurrentVersion,
) -> Result<Applied, StoreError> {
    let local = side_of_current(tx, cur, &v.rtype, &v.id)?;
    let incoming = remote_side(v);
    let existing = tx
        .open_conflicts(&v.rtype, &v.id)?
        .into_iter()
        .find(|e| e.remote.vv.compare(&incoming.vv) != Causality::Concurrent);
    let mut remote = incoming;
    let mut edge = req.edge.clone();
    if let Some(e) = &existing {
        let older = matches!(
            e.remote.vv.compare(&remote.vv),
            Causality::After | Causality::Equal
        );
        if older && e.local.vv == local.vv {
            // Delivered again, or an older side of this branch: nothing new.
            return Ok(Applied::Conflict {
                id: e.id,
                settled: false,
            });
        }
        if older {
            remote = e.remote.clone();
            edge = e.edge.clone();
        }
    }
    let anc = ancestor(tx, &v.rtype, &v.id, &remote.vv)?;
    let c = Conflict {
        id: existing.as_ref().map_or(0, |e| e.id),
        rtype: v.rtype.clone(),
        rid: v.id.clone(),
        state: ConflictState::Open,
        edge,
        policy: Policy::Manual.as_str().into(),
        created_ms: existing
            .as_ref()
            .map_or_else(|| tx.now_ms(), |e| e.created_ms),
        closed_ms: None,
        resolution: None,
        local,
        remote,
        ancestor: anc,
    };
    let id = tx.put_conflict(&c)?;
    if existing.is_none() {
        let mut a = AuditEntry::new(
            &req.edge,
            "conflict",
            "queued",
            1,
            format!(
                "{}/{} local {} vs remote {} from {}",
                v.rtype,
                v.id,
                c.local.vv.to_json(),
                c.remote.vv.to_json(),
                v.origin
            ),
        );
        a.first_seq = Some(v.seq);
        a.last_seq = Some(v.seq);
        tx.add_audit(&a)?;
    }
    Ok(Applied::Conflict { id, settled: false })
}

/// The three-way merge of `v` with the local version `cur` against their
/// common ancestor, as the version that settles them: its origin and HLC
/// are those of the side [`replicate::lww_winner`] picks, so that every
/// node merging the pair stores the same version. `Err`: why it cannot
/// be merged (a tombstone, no ancestor, a clash).
fn merged(
    tx: &mut dyn WriteTx,
    v: &RemoteVersion,
    cur: &CurrentVersion,
) -> Result<Result<(RemoteVersion, String, Sides), String>, StoreError> {
    let (Some(remote), false) = (v.raw.as_deref(), cur.deleted) else {
        return Ok(Err("a delete against an edit".into()));
    };
    // The common ancestor both ends find: the version whose vector is the
    // meet of the two sides' (every node merging the pair merges against
    // the same content, or, lacking it, none merges). The lineage starts
    // with the current version: the local side.
    let meet = cur.vv.meet(&v.vv);
    let mut lineage = tx
        .lineage(&v.rtype, &v.id, ANCESTOR_SEARCH_MAX)?
        .into_iter();
    let local = match lineage.next() {
        Some(s) if s.vid == cur.vid => ConflictSide {
            vv: cur.vv.clone(),
            hlc: cur.hlc,
            origin: cur.origin.clone(),
            body: s.body.map(|b| b.to_string()),
        },
        _ => {
            return Err(StoreError::Backend(format!(
                "{}/{} changed while merging",
                v.rtype, v.id
            )))
        }
    };
    let anc = lineage.find(|s| s.vv == meet).map(|s| ConflictSide {
        vv: s.vv,
        hlc: s.hlc,
        origin: s.origin,
        body: s.body.map(|b| b.to_string()),
    });
    let (Some(l), Some(o)) = (
        local.body.as_deref(),
        anc.as_ref().and_then(|a| a.body.as_deref()),
    ) else {
        return Ok(Err("no common ancestor with content".into()));
    };
    let parse = |b: &str| serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(b);
    let (Ok(o), Ok(l), Ok(r)) = (parse(o), parse(l), parse(remote)) else {
        return Ok(Err("a side is not a JSON object".into()));
    };
    let m = match fhirsync_core::merge::merge3(o, l, r) {
        Ok(m) => m,
        Err(clash) => return Ok(Err(clash.to_string())),
    };
    fhirsync_core::resource::check_resource(&m.resource, Some(&v.rtype))?;
    let res = Prepared::new(v.rtype.clone(), m.resource);
    let (origin, hlc) = match replicate::lww_winner(local_side(cur), incoming_side(v)) {
        Winner::Local => (cur.origin.clone(), cur.hlc),
        Winner::Incoming => (v.origin.clone(), v.hlc),
    };
    let how = format!(
        "merged: local changed {}; remote changed {}",
        list(&m.from_a),
        list(&m.from_b)
    );
    let winner = RemoteVersion {
        rtype: v.rtype.clone(),
        id: v.id.clone(),
        res: Some(res),
        raw: None,
        origin,
        vv: replicate::settled_vector(&cur.vv, &v.vv),
        hlc,
        seq: v.seq,
    };
    Ok(Ok((
        winner,
        how,
        Sides {
            local,
            ancestor: anc,
        },
    )))
}

/// The local side and the common ancestor of a conflict, when already read.
struct Sides {
    local: ConflictSide,
    ancestor: Option<ConflictSide>,
}

/// Element names for a record, at most [`MERGE_NAMES_MAX`] of them.
fn list(names: &[String]) -> String {
    match names.len() {
        0 => "nothing".into(),
        n if n > MERGE_NAMES_MAX => format!(
            "{} and {} more",
            names[..MERGE_NAMES_MAX].join(", "),
            n - MERGE_NAMES_MAX
        ),
        _ => names.join(", "),
    }
}

/// Element names a merge's record lists per side.
pub const MERGE_NAMES_MAX: usize = 12;

/// An automatic policy picked `w`: store its content with a vector that
/// has seen both sides (every node settling this pair stores the same
/// vector, content, origin and HLC), and keep the loser in a record.
fn settle(
    tx: &mut dyn WriteTx,
    req: &ApplyRequest,
    v: &RemoteVersion,
    cur: CurrentVersion,
    w: Winner,
    policy: &str,
) -> Result<Applied, StoreError> {
    if w == Winner::Local && replicate::settled_vector(&cur.vv, &v.vv) == cur.vv {
        // Nothing to store; only the record.
        return record_settled(tx, req, v, &cur, w.as_str().to_owned(), policy);
    }
    let winner = match w {
        Winner::Incoming => v.clone(),
        Winner::Local => RemoteVersion {
            rtype: v.rtype.clone(),
            id: v.id.clone(),
            res: tx
                .read(&v.rtype, &v.id)?
                .and_then(|s| s.body)
                .map(|b| prepare(&v.rtype, &b))
                .transpose()?,
            raw: None,
            origin: cur.origin.clone(),
            vv: cur.vv.clone(),
            hlc: cur.hlc,
            seq: v.seq,
        },
    };
    settle_with(tx, req, v, cur, winner, w.as_str().to_owned(), policy, None)
}

/// Stores `winner`'s content as the version that settles `v` against
/// `cur` (the vector has seen both), and records how.
#[allow(clippy::too_many_arguments)]
fn settle_with(
    tx: &mut dyn WriteTx,
    req: &ApplyRequest,
    v: &RemoteVersion,
    cur: CurrentVersion,
    winner: RemoteVersion,
    how: String,
    policy: &str,
    sides: Option<Sides>,
) -> Result<Applied, StoreError> {
    let sides = match sides {
        Some(s) => s,
        None => Sides {
            local: side_of_current(tx, &cur, &v.rtype, &v.id)?,
            ancestor: ancestor(tx, &v.rtype, &v.id, &v.vv)?,
        },
    };
    let vv = replicate::settled_vector(&cur.vv, &v.vv);
    store(
        tx,
        &winner,
        Some(cur),
        Stamp::Given {
            vv,
            origin: winner.origin.clone(),
            hlc: Some(winner.hlc),
            via: None,
        },
    )?;
    record(tx, req, v, sides, how, policy)
}

fn record_settled(
    tx: &mut dyn WriteTx,
    req: &ApplyRequest,
    v: &RemoteVersion,
    cur: &CurrentVersion,
    how: String,
    policy: &str,
) -> Result<Applied, StoreError> {
    let sides = Sides {
        local: side_of_current(tx, cur, &v.rtype, &v.id)?,
        ancestor: ancestor(tx, &v.rtype, &v.id, &v.vv)?,
    };
    record(tx, req, v, sides, how, policy)
}

/// The record of an automatically settled conflict (state `auto`). The
/// sides were read before the settling version was stored (the ancestor
/// is the same either way: that version is newer than both sides).
fn record(
    tx: &mut dyn WriteTx,
    req: &ApplyRequest,
    v: &RemoteVersion,
    sides: Sides,
    how: String,
    policy: &str,
) -> Result<Applied, StoreError> {
    let now = tx.now_ms();
    let c = Conflict {
        id: 0,
        rtype: v.rtype.clone(),
        rid: v.id.clone(),
        state: ConflictState::Auto,
        edge: req.edge.clone(),
        policy: policy.to_owned(),
        created_ms: now,
        closed_ms: Some(now),
        resolution: Some(how),
        local: sides.local,
        remote: remote_side(v),
        ancestor: sides.ancestor,
    };
    let id = tx.put_conflict(&c)?;
    Ok(Applied::Conflict { id, settled: true })
}

fn prepare(rtype: &str, body: &str) -> Result<Prepared, StoreError> {
    let map = fhirsync_core::resource::parse_resource(body.as_bytes())?;
    fhirsync_core::resource::check_resource(&map, Some(rtype))?;
    Ok(Prepared::new(rtype.to_owned(), map))
}

/// A person settles an open conflict: the chosen content becomes a new
/// local version whose vector dominates both sides, so it replicates and
/// closes the same conflict on every node it reaches.
pub fn resolve(
    tx: &mut dyn WriteTx,
    conflict: u64,
    how: Resolution,
) -> Result<StoredVersion, StoreError> {
    let mut c = tx
        .conflict(conflict)?
        .ok_or_else(|| StoreError::NotFound(format!("conflict {conflict}")))?;
    if c.state != ConflictState::Open {
        return Err(StoreError::State(format!(
            "conflict {conflict} is {}, not open",
            c.state.as_str()
        )));
    }
    let cur = tx.current(&c.rtype, &c.rid)?.ok_or_else(|| {
        StoreError::Backend(format!(
            "{}/{} of conflict {conflict} vanished",
            c.rtype, c.rid
        ))
    })?;
    let (res, label) = match how {
        // A queued conflict's local side is the current version; a
        // reopened settlement's is the side before it was settled.
        Resolution::KeepLocal if c.policy != Policy::Manual.as_str() => (
            c.local
                .body
                .as_deref()
                .map(|b| prepare(&c.rtype, b))
                .transpose()?,
            "local",
        ),
        Resolution::KeepLocal => (
            tx.read(&c.rtype, &c.rid)?
                .and_then(|s| s.body)
                .map(|b| prepare(&c.rtype, &b))
                .transpose()?,
            "local",
        ),
        Resolution::TakeRemote => (
            c.remote
                .body
                .as_deref()
                .map(|b| prepare(&c.rtype, b))
                .transpose()?,
            "remote",
        ),
        Resolution::Merged(p) => {
            if p.rtype != c.rtype || p.body_id() != Some(c.rid.as_str()) {
                return Err(StoreError::Unprocessable(format!(
                    "a merged resource must be {}/{}",
                    c.rtype, c.rid
                )));
            }
            (Some(p), "merged")
        }
    };
    let vv = cur.vv.merged(&c.remote.vv).bumped(tx.vector_id());
    let node = tx.node_id().to_owned();
    let rtype = c.rtype.clone();
    let rid = c.rid.clone();
    let method = if res.is_some() {
        Method::Put
    } else {
        Method::Delete
    };
    let version = tx.insert(NewVersion {
        rtype: &rtype,
        id: &rid,
        res,
        method,
        prev: Some(cur),
        stamp: Stamp::Given {
            vv,
            origin: node,
            hlc: None,
            via: None,
        },
    })?;
    c.state = ConflictState::Resolved;
    c.closed_ms = Some(tx.now_ms());
    c.resolution = Some(label.to_owned());
    tx.put_conflict(&c)?;
    let mut a = AuditEntry::new(
        &c.edge,
        "resolve",
        "ok",
        1,
        format!(
            "conflict {conflict} on {rtype}/{rid}: {label}, version {}",
            version.vid
        ),
    );
    a.last_seq = Some(version.seq);
    tx.add_audit(&a)?;
    Ok(version)
}

/// An automatically settled conflict becomes open again: its settled
/// version stays current until a person resolves it (keeping the local
/// side then means the side before the settlement).
fn reopen(tx: &mut dyn WriteTx, conflict: u64) -> Result<(), StoreError> {
    let mut c = tx
        .conflict(conflict)?
        .ok_or_else(|| StoreError::NotFound(format!("conflict {conflict}")))?;
    if c.state != ConflictState::Auto {
        return Err(StoreError::State(format!(
            "conflict {conflict} is {}; only an automatic settlement can be reopened",
            c.state.as_str()
        )));
    }
    if let Some(o) = tx.open_conflicts(&c.rtype, &c.rid)?.first() {
        return Err(StoreError::State(format!(
            "{}/{} has an open conflict already ({})",
            c.rtype, c.rid, o.id
        )));
    }
    let was = c.resolution.take().unwrap_or_default();
    c.state = ConflictState::Open;
    c.closed_ms = None;
    tx.put_conflict(&c)?;
    tx.add_audit(&AuditEntry::new(
        &c.edge,
        "reopen",
        "ok",
        1,
        format!(
            "conflict {conflict} on {}/{} ({}: {was}) reopened",
            c.rtype, c.rid, c.policy
        ),
    ))
}

/// Bookkeeping writes.
pub fn sync_write(tx: &mut dyn WriteTx, w: SyncWrite) -> Result<WriteOutcome, StoreError> {
    match w {
        SyncWrite::SetCursor { key, seq, audit } => {
            tx.put_cursor(&key, seq)?;
            if let Some(a) = audit {
                tx.add_audit(&a)?;
            }
        }
        SyncWrite::PeerContact { node_id, sent } => tx.put_peer(&node_id, None, sent)?,
        SyncWrite::Resolve { conflict, how } => {
            let version = resolve(tx, conflict, how)?;
            return Ok(WriteOutcome::Written {
                version,
                created: false,
            });
        }
        SyncWrite::Reopen { conflict } => reopen(tx, conflict)?,
        SyncWrite::DeadLetters { letters, cursor } => {
            for l in &letters {
                tx.add_dead_letter(l)?;
                tx.add_audit(&AuditEntry::new(
                    &l.edge,
                    "dead-letter",
                    "stored",
                    1,
                    format!(
                        "{} {}/{} seq {}: {}",
                        l.direction.as_str(),
                        l.rtype,
                        l.rid,
                        l.seq,
                        l.error
                    ),
                ))?;
            }
            if let Some((key, seq)) = cursor {
                tx.put_cursor(&key, seq)?;
            }
        }
        SyncWrite::DropDeadLetter { id, audit } => {
            if !tx.drop_dead_letter(id)? {
                return Err(StoreError::NotFound(format!("dead letter {id}")));
            }
            tx.add_audit(&audit)?;
        }
        SyncWrite::Audit(a) => tx.add_audit(&a)?,
        SyncWrite::AuditEvents(records) => tx.add_audit_events(&records)?,
        SyncWrite::ClaimOnce { key, until_ms } => {
            if !tx.claim_once(&key, until_ms)? {
                return Err(StoreError::State(format!("'{key}' has been used before")));
            }
        }
        SyncWrite::SubEvents { events, cursors } => {
            for e in &events {
                tx.add_sub_event(e)?;
            }
            for (key, seq) in cursors {
                tx.put_cursor(&key, seq)?;
            }
        }
    }
    Ok(WriteOutcome::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sqlite::{SqliteConfig, SqliteStore};
    use crate::{Store, WriteOutcome, WriteRequest};

    fn page(ids: &[&str]) -> ApplyRequest {
        let versions = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let body = serde_json::json!({"resourceType": "Patient", "id": id});
                RemoteVersion {
                    rtype: "Patient".into(),
                    id: (*id).into(),
                    res: Some(Prepared::new(
                        "Patient".into(),
                        body.as_object().cloned().unwrap_or_default(),
                    )),
                    raw: Some(body.to_string().into()),
                    origin: "p".into(),
                    vv: VersionVector::new().bumped("p").bumped("p"),
                    hlc: fhirsync_core::Hlc::new(1_700_000_000_000 + i as u64, 0),
                    seq: i as u64 + 1,
                }
            })
            .collect();
        ApplyRequest {
            edge: "e".into(),
            direction: Direction::Pull,
            peer: "p".into(),
            policy: Policy::Manual,
            versions,
            cursor: Some(99),
            dead_letters: Vec::new(),
            record_peer: false,
        }
    }

    async fn apply(store: &SqliteStore, req: ApplyRequest) -> ApplyReport {
        match store.write(WriteRequest::Apply(Box::new(req))).await {
            Ok(WriteOutcome::Applied(rep)) => rep,
            o => panic!("not applied: {o:?}"),
        }
    }

    /// A version that fails keeps exactly the versions before it (applied
    /// once, though the page is applied again after the failure), and the
    /// cursor stops there; delivered again, the page completes.
    #[tokio::test]
    async fn a_failed_version_keeps_exactly_the_ones_before_it() {
        let d = tempfile::tempdir().unwrap();
        let path = SqliteStore::db_path(d.path());
        let mut cfg = SqliteConfig::new(path.clone());
        cfg.node_id = Some("here".into());
        let store = SqliteStore::open(cfg).unwrap();
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TRIGGER refuse BEFORE INSERT ON versions WHEN NEW.id = 'bad'
             BEGIN SELECT RAISE(ABORT, 'refused by the test'); END;",
        )
        .unwrap();
        let rep = apply(&store, page(&["a", "b", "bad", "c"])).await;
        assert_eq!((rep.stored, rep.results.len()), (2, 3));
        let (i, _, why) = rep.failed().expect("the third version failed");
        assert_eq!(i, 2);
        assert!(why.contains("refused by the test"), "{why}");
        assert_eq!(rep.cursor, Some(2), "the cursor stops before the failure");
        let count = |sql: &str| conn.query_row(sql, [], |r| r.get::<_, i64>(0)).unwrap();
        assert_eq!(
            count("SELECT count(*) FROM versions"),
            2,
            "a and b, once each"
        );
        assert_eq!(count("SELECT count(*) FROM versions WHERE id = 'c'"), 0);
        conn.execute_batch("DROP TRIGGER refuse").unwrap();
        let rep = apply(&store, page(&["a", "b", "bad", "c"])).await;
        assert_eq!((rep.skipped, rep.stored, rep.cursor), (2, 2, Some(99)));
        assert_eq!(count("SELECT count(*) FROM versions"), 4);
        store.shutdown();
    }
}
