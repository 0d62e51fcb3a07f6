//! `transaction` and `batch` Bundles. A transaction is all or nothing and
//! runs in the specification's order (DELETE, POST, PUT, GET); `urn:uuid:`
//! full URLs become server ids and every reference to them is rewritten
//! before anything is stored; conditional create, update, delete and
//! conditional references are resolved inside the same transaction.

use std::collections::{HashMap, HashSet};

use fhirsync_core::refs::rewrite_references;
use fhirsync_core::resource::{check_resource, is_resource_type, is_valid_id};
use fhirsync_core::search::SearchQuery;
use fhirsync_core::{ResourceKey, ValidationError};
use serde_json::{Map, Value};

use crate::engine::{self, atomically, single_match, NewVersion, Stamp, WriteTx};
use crate::types::*;
use crate::StoreError;

/// Most entries of one transaction or batch Bundle.
pub const BUNDLE_ENTRIES_MAX: usize = 20_000;

/// One request entry, parsed and checked.
#[derive(Debug, Clone)]
enum Op {
    Read {
        rtype: String,
        id: String,
    },
    VRead {
        rtype: String,
        id: String,
        vid: u64,
    },
    Search(SearchQuery),
    Create {
        res: Map<String, Value>,
        rtype: String,
        if_none_exist: Option<SearchQuery>,
    },
    Update {
        rtype: String,
        id: String,
        res: Map<String, Value>,
        if_match: Option<u64>,
    },
    CondUpdate {
        rtype: String,
        query: SearchQuery,
        res: Map<String, Value>,
        if_match: Option<u64>,
    },
    Delete {
        rtype: String,
        id: String,
        if_match: Option<u64>,
    },
    CondDelete {
        query: SearchQuery,
    },
}

/// One entry, parsed and checked.
#[derive(Debug, Clone)]
struct Planned {
    full_url: Option<String>,
    op: Op,
    /// A batch entry's resource, prepared (serialized, hashed, indexed)
    /// before the Bundle reaches the writer; the op's own `res` is then
    /// left empty. `None` for transactions (their references name ids the
    /// writer assigns) and for entries with conditional references (their
    /// searches run in the writer).
    ready: Option<Prepared>,
}

/// A Bundle parsed, checked and planned before the writer (see [`plan`]):
/// the writer only resolves and stores.
#[derive(Debug)]
pub struct PlannedBundle {
    pub kind: BundleKind,
    entries: Vec<Result<Planned, StoreError>>,
}

/// Checks a `transaction` or `batch` Bundle and plans its entries. Meant
/// to run before the writer, off the async runtime: a batch's resources
/// are prepared here, in parallel, so the writer's thread is left with
/// its SQL (preparing them there was a sixth of its time in a COPY).
pub fn plan(mut bundle: Map<String, Value>) -> Result<PlannedBundle, StoreError> {
    use rayon::prelude::*;
    if bundle.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
        return Err(StoreError::BadRequest(
            "POST to the base URL takes a Bundle".into(),
        ));
    }
    let kind = match bundle.get("type").and_then(Value::as_str) {
        Some("transaction") => BundleKind::Transaction,
        Some("batch") => BundleKind::Batch,
        other => {
            return Err(StoreError::BadRequest(format!(
                "Bundle.type must be transaction or batch, not {}",
                other.unwrap_or("absent")
            )))
        }
    };
    let entries = match bundle.remove("entry") {
        None => Vec::new(),
        Some(Value::Array(a)) if a.len() > BUNDLE_ENTRIES_MAX => {
            return Err(StoreError::Unprocessable(format!(
                "the Bundle has {} entries, more than {BUNDLE_ENTRIES_MAX} (BUNDLE_ENTRIES_MAX): split it",
                a.len()
            )))
        }
        Some(Value::Array(a)) => a,
        Some(_) => {
            return Err(StoreError::BadRequest(
                "Bundle.entry must be an array".into(),
            ))
        }
    };
    let entries = match kind {
        BundleKind::Transaction => entries.into_iter().map(plan_entry).collect(),
        BundleKind::Batch => entries
            .into_par_iter()
            .map(|e| plan_entry(e).and_then(prepare_batch_entry))
            .collect(),
    };
    Ok(PlannedBundle { kind, entries })
}

/// Prepares a batch entry's resource unless a conditional reference in it
/// is left for the writer to resolve; a `urn:` reference (it can name no
/// entry of a batch) fails the entry.
fn prepare_batch_entry(mut p: Planned) -> Result<Planned, StoreError> {
    if let Op::Create { res, rtype, .. }
    | Op::Update { res, rtype, .. }
    | Op::CondUpdate { res, rtype, .. } = &mut p.op
    {
        let wanted = rewrite_local(res, &HashMap::new())?;
        if wanted.is_empty() {
            p.ready = Some(Prepared::new(rtype.clone(), std::mem::take(res)));
        }
    }
    Ok(p)
}

pub fn execute(tx: &mut dyn WriteTx, bundle: PlannedBundle) -> Result<BundleOutcome, StoreError> {
    let PlannedBundle { kind, entries } = bundle;
    let entries = match kind {
        BundleKind::Transaction => {
            let mut ok = Vec::with_capacity(entries.len());
            for (index, p) in entries.into_iter().enumerate() {
                ok.push(p.map_err(|e| entry_err(index, e))?);
            }
            transaction(tx, ok)?
        }
        BundleKind::Batch => batch(tx, entries),
    };
    Ok(BundleOutcome { kind, entries })
}

/// A batch's entries, each on its own: a failing entry changes nothing and
/// the others still apply. They first run together in one savepoint (a
/// savepoint per entry makes SQLite copy every page each entry touches into
/// its statement journal, which dominated a batch's cost); only when one of
/// them fails is that undone and every entry run in its own savepoint.
fn batch(tx: &mut dyn WriteTx, planned: Vec<Result<Planned, StoreError>>) -> Vec<EntryResult> {
    let runnable: Vec<Planned> = planned
        .iter()
        .filter_map(|p| p.as_ref().ok().cloned())
        .collect();
    if runnable.len() > 1 {
        let together = atomically(tx, |tx| {
            runnable
                .into_iter()
                .map(|p| run_alone(tx, p))
                .collect::<Result<Vec<_>, _>>()
        });
        if let Ok(done) = together {
            let mut done = done.into_iter();
            return planned
                .into_iter()
                .map(|p| match (p, &mut done) {
                    (Ok(_), done) => done.next().unwrap_or_else(|| {
                        EntryResult::Failed(StoreError::Backend(
                            "a batch entry has no result".into(),
                        ))
                    }),
                    (Err(e), _) => EntryResult::Failed(e),
                })
                .collect();
        }
    }
    planned
        .into_iter()
        .map(|p| match p {
            Ok(p) => match atomically(tx, |tx| run_alone(tx, p)) {
                Ok(r) => r,
                Err(e) => EntryResult::Failed(e),
            },
            Err(e) => EntryResult::Failed(e),
        })
        .collect()
}

fn entry_err(index: usize, e: StoreError) -> StoreError {
    match e {
        e @ StoreError::Entry { .. } => e,
        e => StoreError::Entry {
            index,
            source: Box::new(e),
        },
    }
}

fn plan_entry(entry: Value) -> Result<Planned, StoreError> {
    let Value::Object(mut entry) = entry else {
        return Err(StoreError::BadRequest("entry must be an object".into()));
    };
    let mut resource = entry.remove("resource");
    let full_url = entry
        .get("fullUrl")
        .and_then(Value::as_str)
        .map(str::to_owned);
    let request = entry
        .get("request")
        .and_then(Value::as_object)
        .ok_or_else(|| StoreError::BadRequest("entry.request is required".into()))?;
    let method = request.get("method").and_then(Value::as_str).unwrap_or("");
    let url = request
        .get("url")
        .and_then(Value::as_str)
        .ok_or_else(|| StoreError::BadRequest("entry.request.url is required".into()))?;
    let if_match = match request.get("ifMatch").and_then(Value::as_str) {
        Some(s) => Some(
            parse_etag(s).ok_or_else(|| StoreError::BadRequest(format!("bad ifMatch '{s}'")))?,
        ),
        None => None,
    };
    let (path, query) = split_url(url)?;
    let seg: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let if_none_exist = match request.get("ifNoneExist").and_then(Value::as_str) {
        Some(s) => Some(parse_condition(seg.first().copied(), s)?),
        None => None,
    };
    let method = method.to_owned();
    let mut take_resource = |expected: &str| -> Result<Map<String, Value>, StoreError> {
        match resource.take() {
            Some(Value::Object(m)) => {
                check_resource(&m, Some(expected))?;
                Ok(m)
            }
            Some(_) => Err(ValidationError::NotAnObject.into()),
            None => Err(StoreError::BadRequest(format!(
                "{method} entry needs a resource"
            ))),
        }
    };
    let op = match (method.as_str(), seg.as_slice(), query) {
        ("GET" | "HEAD", [t], q) => {
            Op::Search(SearchQuery::parse_query_string(Some(t), q.unwrap_or(""))?)
        }
        ("GET" | "HEAD", [t, id], None) => Op::Read {
            rtype: t.to_string(),
            id: id.to_string(),
        },
        ("GET" | "HEAD", [t, id, "_history", v], None) => Op::VRead {
            rtype: t.to_string(),
            id: id.to_string(),
            vid: v
                .parse()
                .map_err(|_| StoreError::NotFound(format!("{t}/{id}/_history/{v}")))?,
        },
        ("POST", [t], None) => Op::Create {
            res: take_resource(t)?,
            rtype: t.to_string(),
            if_none_exist,
        },
        ("PUT", [t, id], None) => {
            let res = take_resource(t)?;
            match fhirsync_core::resource::body_id(&res) {
                Some(b) if b != *id => {
                    return Err(ValidationError::IdMismatch {
                        url: id.to_string(),
                        body: b.into(),
                    }
                    .into())
                }
                None => return Err(ValidationError::MissingId.into()),
                _ => {}
            }
            Op::Update {
                rtype: t.to_string(),
                id: id.to_string(),
                res,
                if_match,
            }
        }
        ("PUT", [t], Some(q)) => Op::CondUpdate {
            res: take_resource(t)?,
            rtype: t.to_string(),
            query: parse_condition(Some(t), q)?,
            if_match,
        },
        ("DELETE", [t, id], None) => Op::Delete {
            rtype: t.to_string(),
            id: id.to_string(),
            if_match,
        },
        ("DELETE", [t], Some(q)) => Op::CondDelete {
            query: parse_condition(Some(t), q)?,
        },
        ("GET" | "HEAD" | "POST" | "PUT" | "DELETE", _, _) => {
            return Err(StoreError::BadRequest(format!(
                "unsupported request.url '{url}' for {method}"
            )))
        }
        _ => {
            return Err(StoreError::BadRequest(format!(
                "unsupported request.method '{method}'"
            )))
        }
    };
    Ok(Planned {
        full_url,
        op,
        ready: None,
    })
}

/// Splits an entry URL (relative, or absolute to this server) into path
/// and query; checks the type segment.
fn split_url(url: &str) -> Result<(&str, Option<&str>), StoreError> {
    let (path, query) = match url.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (url, None),
    };
    let path = if path.contains("://") {
        // Absolute: keep from the first segment that names a resource type.
        let mut start = None;
        let mut off = 0;
        for s in path.split('/') {
            if is_resource_type(s) {
                start = Some(off);
                break;
            }
            off += s.len() + 1;
        }
        &path[start
            .ok_or_else(|| StoreError::BadRequest(format!("no resource type in url '{url}'")))?..]
    } else {
        path
    };
    let t = path.trim_start_matches('/').split('/').next().unwrap_or("");
    if !is_resource_type(t) {
        return Err(StoreError::BadRequest(format!(
            "unknown resource type '{t}' in url '{url}'"
        )));
    }
    if let Some(id) = path.trim_start_matches('/').split('/').nth(1) {
        if id != "_history" && !is_valid_id(id) {
            return Err(ValidationError::BadId(id.into()).into());
        }
    }
    Ok((path, query))
}

fn parse_condition(rtype: Option<&str>, q: &str) -> Result<SearchQuery, StoreError> {
    let q = q.strip_prefix('?').unwrap_or(q);
    // `ifNoneExist` may carry a `Type?` prefix.
    let (t, q) = match q.split_once('?') {
        Some((t, rest)) if is_resource_type(t) => (Some(t), rest),
        _ => (rtype, q),
    };
    Ok(SearchQuery::parse_query_string(t, q)?)
}

/// `W/"3"`, `"3"` or `3`.
pub fn parse_etag(s: &str) -> Option<u64> {
    let s = s.trim();
    let s = s.strip_prefix("W/").unwrap_or(s);
    s.trim_matches('"').parse().ok()
}

/// Runs one batch entry on its own.
fn run_alone(tx: &mut dyn WriteTx, p: Planned) -> Result<EntryResult, StoreError> {
    let Planned { op, ready, .. } = p;
    match op {
        Op::Create {
            res,
            rtype,
            if_none_exist,
        } => {
            let res = prepared(tx, ready, rtype, res)?;
            let out = engine::create(tx, res, if_none_exist.as_ref())?;
            Ok(write_result(out))
        }
        Op::Update {
            id,
            res,
            rtype,
            if_match,
        } => {
            let res = prepared(tx, ready, rtype, res)?;
            Ok(write_result(engine::update(tx, &id, res, if_match)?))
        }
        Op::CondUpdate {
            rtype,
            query,
            res,
            if_match,
        } => {
            let res = prepared(tx, ready, rtype, res)?;
            Ok(write_result(engine::conditional_update(
                tx, &query, res, if_match,
            )?))
        }
        Op::Delete {
            rtype,
            id,
            if_match,
        } => Ok(write_result(engine::delete(tx, &rtype, &id, if_match)?)),
        Op::CondDelete { query } => cond_delete(tx, &query),
        op => read_op(tx, op),
    }
}

/// A batch entry's resource: as [`plan`] prepared it, or prepared here
/// after its conditional references are resolved.
fn prepared(
    tx: &mut dyn WriteTx,
    ready: Option<Prepared>,
    rtype: String,
    mut res: Map<String, Value>,
) -> Result<Prepared, StoreError> {
    if let Some(r) = ready {
        return Ok(r);
    }
    let wanted = rewrite_local(&mut res, &HashMap::new())?;
    resolve_conditional(tx, &mut res, wanted)?;
    Ok(Prepared::new(rtype, res))
}

fn cond_delete(tx: &mut dyn WriteTx, q: &SearchQuery) -> Result<EntryResult, StoreError> {
    match single_match(tx, q)? {
        Some(k) => Ok(write_result(engine::delete(tx, &k.rtype, &k.id, None)?)),
        None => Ok(EntryResult::Write {
            status: 204,
            version: None,
        }),
    }
}

fn read_op(tx: &mut dyn WriteTx, op: Op) -> Result<EntryResult, StoreError> {
    match op {
        Op::Read { rtype, id } => match tx.read(&rtype, &id)? {
            Some(v) if v.deleted => Err(StoreError::Gone(format!("{rtype}/{id}"))),
            Some(v) => Ok(EntryResult::Read(v)),
            None => Err(StoreError::NotFound(format!("{rtype}/{id}"))),
        },
        Op::VRead { rtype, id, vid } => match tx.vread(&rtype, &id, vid)? {
            Some(v) if v.deleted => Err(StoreError::Gone(format!("{rtype}/{id}/_history/{vid}"))),
            Some(v) => Ok(EntryResult::Read(v)),
            None => Err(StoreError::NotFound(format!("{rtype}/{id}/_history/{vid}"))),
        },
        Op::Search(q) => {
            let page = tx.search(&q)?;
            Ok(EntryResult::Search(Box::new((q, page))))
        }
        _ => Err(StoreError::Backend("not a read operation".into())),
    }
}

fn write_result(out: WriteOutcome) -> EntryResult {
    match out {
        WriteOutcome::Written { version, created } => EntryResult::Write {
            status: if created { 201 } else { 200 },
            version: Some(version),
        },
        WriteOutcome::Unchanged { version } | WriteOutcome::Existing { version } => {
            EntryResult::Write {
                status: 200,
                version: Some(version),
            }
        }
        WriteOutcome::Deleted { version } => EntryResult::Write {
            status: 204,
            version,
        },
        WriteOutcome::Bundle(_) => {
            EntryResult::Failed(StoreError::BadRequest("nested bundles are not run".into()))
        }
        WriteOutcome::Applied(_) | WriteOutcome::Done => EntryResult::Failed(
            StoreError::BadRequest("replication requests are not bundle entries".into()),
        ),
    }
}

/// Rewrites references through `ids` (full URL → `Type/id`) and resolves
/// conditional references; an unresolvable `urn:` reference is an error.
/// Rewrites the references of `res` to entries of the bundle (`ids`) and
/// returns the conditional references (`Type?query`) left to resolve.
fn rewrite_local(
    res: &mut Map<String, Value>,
    ids: &HashMap<String, String>,
) -> Result<Vec<String>, StoreError> {
    let mut wanted: Vec<String> = Vec::new();
    let mut v = Value::Object(std::mem::take(res));
    rewrite_references(&mut v, &mut |r| {
        if let Some(new) = ids.get(r) {
            return Some(new.clone());
        }
        if r.starts_with("urn:") || (r.contains('?') && !r.starts_with('#')) {
            wanted.push(r.to_owned());
        }
        None
    });
    if let Value::Object(m) = v {
        *res = m;
    }
    if let Some(r) = wanted.iter().find(|r| r.starts_with("urn:")) {
        return Err(StoreError::BadRequest(format!(
            "reference '{r}' points to no entry of this bundle"
        )));
    }
    Ok(wanted)
}

/// Resolves the conditional references of `res` (from [`rewrite_local`])
/// by searching, inside the transaction.
fn resolve_conditional(
    tx: &mut dyn WriteTx,
    res: &mut Map<String, Value>,
    wanted: Vec<String>,
) -> Result<(), StoreError> {
    let mut resolved: HashMap<String, String> = HashMap::new();
    for r in wanted {
        if resolved.contains_key(&r) {
            continue;
        }
        let (t, q) = r.split_once('?').unwrap_or((&r, ""));
        if !is_resource_type(t) {
            return Err(StoreError::BadRequest(format!(
                "conditional reference '{r}' has no resource type"
            )));
        }
        let query = SearchQuery::parse_query_string(Some(t), q)?;
        match single_match(tx, &query)? {
            Some(k) => {
                resolved.insert(r.clone(), k.to_string());
            }
            None => {
                return Err(StoreError::MultipleMatches(format!(
                    "conditional reference '{r}' matches no resource"
                )))
            }
        }
    }
    if !resolved.is_empty() {
        let mut v = Value::Object(std::mem::take(res));
        rewrite_references(&mut v, &mut |r| resolved.get(r).cloned());
        if let Value::Object(m) = v {
            *res = m;
        }
    }
    Ok(())
}

/// Resources of a transaction's writes, ready to store, in entry order.
/// Without conditional references (the usual bulk bundle) they are
/// prepared (serialized, hashed, indexed) in parallel before the writes;
/// a conditional reference's search must see the entries written before
/// it, so with one they are prepared one by one as the writes go.
struct Writes<T> {
    items: Vec<Write<T>>,
}

/// One entry's write: its index, what it writes to (`T`: the id, and the
/// version an update expects), type, resource and the conditional
/// references left to resolve in it.
type Write<T> = (usize, T, String, Map<String, Value>, Vec<String>);

impl<T: Send> Writes<T> {
    fn new(
        items: Vec<(usize, T, String, Map<String, Value>)>,
        ids: &HashMap<String, String>,
    ) -> Result<Writes<T>, StoreError> {
        let mut out = Vec::with_capacity(items.len());
        for (i, target, rtype, mut res) in items {
            let wanted = rewrite_local(&mut res, ids).map_err(|e| entry_err(i, e))?;
            out.push((i, target, rtype, res, wanted));
        }
        Ok(Writes { items: out })
    }

    fn conditional(&self) -> bool {
        self.items.iter().any(|(.., w)| !w.is_empty())
    }

    /// Runs `write` on each entry's prepared resource, in entry order.
    fn run(
        self,
        tx: &mut dyn WriteTx,
        mut write: impl FnMut(&mut dyn WriteTx, usize, T, Prepared) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        use rayon::prelude::*;
        if self.conditional() {
            for (i, target, rtype, mut res, wanted) in self.items {
                resolve_conditional(tx, &mut res, wanted).map_err(|e| entry_err(i, e))?;
                write(tx, i, target, Prepared::new(rtype, res))?;
            }
            return Ok(());
        }
        let prepared: Vec<(usize, T, Prepared)> = self
            .items
            .into_par_iter()
            .map(|(i, target, rtype, res, _)| (i, target, Prepared::new(rtype, res)))
            .collect();
        for (i, target, p) in prepared {
            write(tx, i, target, p)?;
        }
        Ok(())
    }
}

fn transaction(
    tx: &mut dyn WriteTx,
    planned: Vec<Planned>,
) -> Result<Vec<EntryResult>, StoreError> {
    let n = planned.len();
    let mut results: Vec<Option<EntryResult>> = (0..n).map(|_| None).collect();

    // No two entries may write the same resource.
    let mut seen = HashSet::new();
    for (i, p) in planned.iter().enumerate() {
        let key = match &p.op {
            Op::Update { rtype, id, .. } | Op::Delete { rtype, id, .. } => {
                Some(ResourceKey::new(rtype, id))
            }
            _ => None,
        };
        if let Some(k) = key {
            if !seen.insert(k.clone()) {
                return Err(entry_err(
                    i,
                    StoreError::BadRequest(format!("{k} is written by more than one entry")),
                ));
            }
        }
    }

    let mut deletes = Vec::new();
    let mut posts = Vec::new();
    let mut puts = Vec::new();
    let mut gets = Vec::new();
    for (i, p) in planned.into_iter().enumerate() {
        match &p.op {
            Op::Delete { .. } | Op::CondDelete { .. } => deletes.push((i, p)),
            Op::Create { .. } => posts.push((i, p)),
            Op::Update { .. } | Op::CondUpdate { .. } => puts.push((i, p)),
            _ => gets.push((i, p)),
        }
    }

    for (i, p) in deletes {
        let r = match p.op {
            Op::Delete {
                rtype,
                id,
                if_match,
            } => engine::delete(tx, &rtype, &id, if_match).map(write_result),
            Op::CondDelete { query } => cond_delete(tx, &query),
            _ => unreachable_op(),
        };
        results[i] = Some(r.map_err(|e| entry_err(i, e))?);
    }

    // Identities of everything that will be written, before any reference is rewritten.
    let mut ids: HashMap<String, String> = HashMap::new();
    let mut post_targets: Vec<Option<String>> = Vec::with_capacity(posts.len());
    for (i, p) in &posts {
        let Op::Create {
            rtype,
            if_none_exist,
            ..
        } = &p.op
        else {
            continue;
        };
        let existing = match if_none_exist {
            Some(q) => single_match(tx, q).map_err(|e| entry_err(*i, e))?,
            None => None,
        };
        let (key, new_id) = match existing {
            Some(k) => (k, None),
            None => {
                let id = tx.new_id();
                (ResourceKey::new(rtype, &id), Some(id))
            }
        };
        if let Some(fu) = &p.full_url {
            ids.insert(fu.clone(), key.to_string());
        }
        post_targets.push(new_id);
        if post_targets.last().is_some_and(Option::is_none) {
            results[*i] = Some(EntryResult::Write {
                status: 200,
                version: tx.read(&key.rtype, &key.id).map_err(|e| entry_err(*i, e))?,
            });
        }
    }
    let mut put_targets: Vec<String> = Vec::with_capacity(puts.len());
    for (i, p) in &puts {
        let (rtype, id) = match &p.op {
            Op::Update { rtype, id, .. } => (rtype.clone(), id.clone()),
            Op::CondUpdate {
                rtype, query, res, ..
            } => {
                let id = match single_match(tx, query).map_err(|e| entry_err(*i, e))? {
                    Some(k) => {
                        if let Some(b) = fhirsync_core::resource::body_id(res) {
                            if b != k.id {
                                let e = ValidationError::IdMismatch {
                                    url: k.id,
                                    body: b.into(),
                                };
                                return Err(entry_err(*i, e.into()));
                            }
                        }
                        k.id
                    }
                    None => match fhirsync_core::resource::body_id(res) {
                        Some(b) => b.to_owned(),
                        None => tx.new_id(),
                    },
                };
                (rtype.clone(), id)
            }
            _ => unreachable_op()?,
        };
        // Plain updates were checked above; a conditional one is known only now.
        if matches!(p.op, Op::CondUpdate { .. }) && !seen.insert(ResourceKey::new(&rtype, &id)) {
            return Err(entry_err(
                *i,
                StoreError::BadRequest(format!("{rtype}/{id} is written by more than one entry")),
            ));
        }
        if let Some(fu) = &p.full_url {
            ids.insert(fu.clone(), format!("{rtype}/{id}"));
        }
        put_targets.push(id);
    }

    let mut creates = Vec::new();
    for ((i, p), new_id) in posts.into_iter().zip(post_targets) {
        let Some(id) = new_id else { continue };
        let Op::Create { res, rtype, .. } = p.op else {
            continue;
        };
        creates.push((i, id, rtype, res));
    }
    Writes::new(creates, &ids)?.run(tx, |tx, i, id, res| {
        let rtype = res.rtype.clone();
        let version = tx
            .insert(NewVersion {
                rtype: &rtype,
                id: &id,
                res: Some(res),
                method: Method::Post,
                prev: None,
                stamp: Stamp::Local,
            })
            .map_err(|e| entry_err(i, e))?;
        results[i] = Some(EntryResult::Write {
            status: 201,
            version: Some(version),
        });
        Ok(())
    })?;
    let mut updates = Vec::new();
    for ((i, p), id) in puts.into_iter().zip(put_targets) {
        let (rtype, res, if_match) = match p.op {
            Op::Update {
                rtype,
                res,
                if_match,
                ..
            }
            | Op::CondUpdate {
                rtype,
                res,
                if_match,
                ..
            } => (rtype, res, if_match),
            _ => continue,
        };
        updates.push((i, (id, if_match), rtype, res));
    }
    Writes::new(updates, &ids)?.run(tx, |tx, i, (id, if_match), res| {
        let out = engine::update(tx, &id, res, if_match).map_err(|e| entry_err(i, e))?;
        results[i] = Some(write_result(out));
        Ok(())
    })?;
    for (i, p) in gets {
        results[i] = Some(read_op(tx, p.op).map_err(|e| entry_err(i, e))?);
    }
    Ok(results
        .into_iter()
        .map(|r| {
            r.unwrap_or_else(|| EntryResult::Failed(StoreError::Backend("entry not run".into())))
        })
        .collect())
}

fn unreachable_op<T>() -> Result<T, StoreError> {
    Err(StoreError::Backend(
        "bundle entry in the wrong phase".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn etags() {
        assert_eq!(parse_etag("W/\"3\""), Some(3));
        assert_eq!(parse_etag("\"12\""), Some(12));
        assert_eq!(parse_etag("7"), Some(7));
        assert_eq!(parse_etag("W/\"x\""), None);
    }

    #[test]
    fn urls() {
        assert_eq!(split_url("Patient/1").unwrap(), ("Patient/1", None));
        assert_eq!(
            split_url("http://h/fhir/Patient/1").unwrap(),
            ("Patient/1", None)
        );
        assert_eq!(
            split_url("Patient?identifier=a|b").unwrap(),
            ("Patient", Some("identifier=a|b"))
        );
        assert!(split_url("Nope/1").is_err());
        assert!(split_url("Patient/a_b").is_err());
    }
}
