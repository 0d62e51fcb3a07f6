//! Anti-entropy on a parent edge: the child compares what it holds with
//! what its parent holds without sending either (fingerprints of id ranges,
//! descending only into ranges that differ; `fhirsync_core::summary`), and
//! repairs what differs through the normal apply path in the direction the
//! edge carries: the parent's version is fetched and applied here as a
//! pull, this node's is sent to the parent's `$apply` as a push. Vectors
//! decide as for any replicated version, so a repair never overwrites a
//! newer version and concurrent ones become conflicts under the edge's
//! policy.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use fhirsync_core::summary::{unhex, Fingerprint, KeyRange};
use fhirsync_core::{Causality, VersionVector};
use fhirsync_store::summary::{
    Basis, Part, SummaryAnswer, SummaryItem, SummaryQuery, SUMMARY_FANOUT_MAX, SUMMARY_ITEMS_MAX,
};
use fhirsync_store::{
    change_entry_text, ApplyRequest, Direction, RemoteVersion, WriteOutcome, WriteRequest,
};
use serde::Serialize;
use serde_json::{json, Value};

use crate::edge::{Edge, Failure};

/// Parts a differing range is cut into.
pub const VERIFY_FANOUT: usize = 16;
/// A range holding at most this many resources at the parent is compared
/// item by item.
pub const VERIFY_LEAF: usize = 32;
/// Ranges asked about in one `$summary` call (the parent's limit).
pub const VERIFY_RANGES_PER_REQUEST: usize = 256;
/// Deepest descent into a range; an honest parent needs about
/// log16(resources / 32) levels, so this only stops one that never narrows.
pub const VERIFY_DEPTH_MAX: u32 = 24;
/// Resources fetched from, or sent to, the parent per repair request.
pub const REPAIR_BATCH: usize = 500;
/// Differences a report lists by name (all are counted).
pub const VERIFY_EXAMPLES_MAX: usize = 20;

/// How the two ends differ on one resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiffKind {
    /// The parent holds it, this node does not.
    MissingHere,
    /// This node holds it, the parent does not.
    MissingAtParent,
    /// The parent's version is newer.
    OlderHere,
    /// This node's version is newer.
    OlderAtParent,
    /// Neither version has seen the other.
    Concurrent,
    /// Equal vectors, different content (a store changed outside sync).
    SameVectorOtherContent,
}

impl DiffKind {
    fn needs_pull(self) -> bool {
        !matches!(self, DiffKind::MissingAtParent | DiffKind::OlderAtParent)
    }

    fn needs_push(self) -> bool {
        !matches!(self, DiffKind::MissingHere | DiffKind::OlderHere)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Difference {
    #[serde(rename = "type")]
    pub rtype: String,
    pub id: String,
    pub kind: DiffKind,
}

/// What a repair did in one direction.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Repaired {
    pub stored: u64,
    pub skipped: u64,
    pub conflicts: u64,
    /// Left out by the edge's FHIRPath filter.
    pub filtered: u64,
    pub failed: u64,
}

/// One run of anti-entropy.
#[derive(Debug, Clone, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyReport {
    pub edge: String,
    pub parent_node_id: String,
    /// When the run started (ms since the epoch) and how long it took.
    pub started_ms: u64,
    pub took_ms: u64,
    /// The parent's last `seq` when it summarized everything.
    pub parent_seq: u64,
    /// This node's last `seq` then.
    pub local_seq: u64,
    /// Current resources (tombstones included) compared at this node.
    pub resources: u64,
    pub requests: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub differences: u64,
    pub by_kind: BTreeMap<DiffKind, u64>,
    pub examples: Vec<Difference>,
    pub repair: bool,
    pub pulled: Repaired,
    pub pushed: Repaired,
    /// No differences were found.
    pub in_sync: bool,
}

/// The edge's anti-entropy state, for status and metrics.
#[derive(Debug, Default)]
pub struct VerifyState {
    running: AtomicBool,
    pub runs: AtomicU64,
    pub differences: AtomicU64,
    pub repaired: AtomicU64,
    pub last: Mutex<Option<VerifyReport>>,
    /// The last run that found nothing: the parent's `seq` and when.
    pub in_sync: Mutex<Option<(u64, u64)>>,
    pub last_error: Mutex<Option<String>>,
}

impl VerifyState {
    pub fn to_json(&self) -> Value {
        let last = self.last.lock().ok().and_then(|g| g.clone());
        let in_sync = self.in_sync.lock().ok().and_then(|g| *g);
        json!({
            "running": self.running.load(Ordering::Relaxed),
            "runs": self.runs.load(Ordering::Relaxed),
            "differencesTotal": self.differences.load(Ordering::Relaxed),
            "repairedTotal": self.repaired.load(Ordering::Relaxed),
            "verifiedSeq": in_sync.map(|s| s.0),
            "verifiedMs": in_sync.map(|s| s.1),
            "lastError": self.last_error.lock().ok().and_then(|g| g.clone()),
            "last": last,
        })
    }
}

/// A refusal of a run: an HTTP status for the admin API and a reason.
pub type VerifyError = (u16, String);

fn failure(f: Failure) -> VerifyError {
    (502, f.reason)
}

fn bad_answer(why: impl Into<String>) -> VerifyError {
    (
        502,
        format!("the parent's summary is malformed: {}", why.into()),
    )
}

fn store_err(e: fhirsync_store::StoreError) -> VerifyError {
    (500, format!("cannot read this node's store: {e}"))
}

fn fingerprint(v: &Value) -> Result<Fingerprint, VerifyError> {
    let count = v["count"]
        .as_u64()
        .ok_or_else(|| bad_answer("a count is missing"))?;
    let sum = v["sum"]
        .as_str()
        .ok_or_else(|| bad_answer("a sum is missing"))?;
    Fingerprint::from_parts(count, sum).ok_or_else(|| bad_answer(format!("sum '{sum}'")))
}

fn range_json(r: &KeyRange) -> Value {
    json!({"type": r.rtype, "after": r.after, "upto": r.upto})
}

/// The parent's parts of `range`: at most the fanout, each bound inside
/// the range and above the one before, the last ending where the range
/// does.
fn parts(range: &KeyRange, v: &[Value]) -> Result<Vec<Part>, VerifyError> {
    if v.is_empty() || v.len() > SUMMARY_FANOUT_MAX {
        return Err(bad_answer(format!("{} parts for {range}", v.len())));
    }
    let mut out: Vec<Part> = Vec::with_capacity(v.len());
    for (i, p) in v.iter().enumerate() {
        let upto = p["upto"].as_str().map(str::to_owned);
        let last = i + 1 == v.len();
        let ok = if last {
            upto == range.upto
        } else {
            upto.as_deref().is_some_and(|u| {
                range.contains(u) && out.last().is_none_or(|q| q.upto.as_deref() < Some(u))
            })
        };
        if !ok {
            return Err(bad_answer(format!("part bounds of {range}")));
        }
        out.push(Part {
            upto,
            fp: fingerprint(p)?,
        });
    }
    Ok(out)
}

/// The parent's items of `range`, ascending and inside it.
fn items(range: &KeyRange, v: &[Value]) -> Result<Vec<SummaryItem>, VerifyError> {
    let mut out: Vec<SummaryItem> = Vec::with_capacity(v.len());
    for i in v {
        let (Some(id), Some(vv)) = (i[0].as_str(), i[1].as_str()) else {
            return Err(bad_answer(format!("an item of {range}")));
        };
        let content = match &i[2] {
            Value::Null => None,
            Value::String(h) => Some(unhex(h).ok_or_else(|| bad_answer(format!("hash '{h}'")))?),
            _ => return Err(bad_answer(format!("an item of {range}"))),
        };
        if !range.contains(id) || out.last().is_some_and(|p| p.id.as_str() >= id) {
            return Err(bad_answer(format!("item '{id}' of {range} out of order")));
        }
        out.push(SummaryItem {
            id: id.to_owned(),
            vv: vv.to_owned(),
            content,
        });
    }
    Ok(out)
}

/// How the parent's and this node's versions of one resource differ.
fn compare(parent: &SummaryItem, local: &SummaryItem) -> Result<Option<DiffKind>, VerifyError> {
    if parent.vv == local.vv && parent.content == local.content {
        return Ok(None);
    }
    let pv = VersionVector::from_json(&parent.vv)
        .map_err(|e| bad_answer(format!("vector of '{}': {e}", parent.id)))?;
    let lv = VersionVector::from_json(&local.vv).unwrap_or_default();
    Ok(Some(match pv.compare(&lv) {
        Causality::After => DiffKind::OlderHere,
        Causality::Before => DiffKind::OlderAtParent,
        Causality::Concurrent => DiffKind::Concurrent,
        Causality::Equal if parent.content == local.content => return Ok(None),
        Causality::Equal => DiffKind::SameVectorOtherContent,
    }))
}

/// One run's state.
struct Run<'a> {
    edge: &'a Edge,
    report: VerifyReport,
    pull_keys: Vec<(String, String)>,
    push_keys: Vec<(String, String)>,
}

impl Run<'_> {
    async fn post(&mut self, op: &str, body: Value) -> Result<Value, VerifyError> {
        let text = body.to_string();
        self.report.requests += 1;
        self.report.bytes_sent += text.len() as u64;
        let (v, got) = self.edge.post_json(op, text).await.map_err(failure)?;
        self.report.bytes_received += got as u64;
        Ok(v)
    }

    /// Whether differences of this type are this edge's business, by
    /// direction.
    fn scope(&self, rtype: &str) -> (bool, bool) {
        let pass = |types: &[String]| types.is_empty() || types.iter().any(|t| t == rtype);
        (
            self.edge.cfg.pull && pass(&self.edge.pull_filter.types),
            self.edge.cfg.push && pass(&self.edge.push_filter.types),
        )
    }

    async fn differ(&mut self, rtype: &str, id: &str, kind: DiffKind) -> Result<(), VerifyError> {
        let (pull, push) = self.scope(rtype);
        let pull = pull && kind.needs_pull();
        let push = push && kind.needs_push();
        if !pull && !push {
            return Ok(());
        }
        self.report.differences += 1;
        *self.report.by_kind.entry(kind).or_default() += 1;
        if self.report.examples.len() < VERIFY_EXAMPLES_MAX {
            self.report.examples.push(Difference {
                rtype: rtype.to_owned(),
                id: id.to_owned(),
                kind,
            });
        }
        if self.report.repair {
            let key = (rtype.to_owned(), id.to_owned());
            if pull {
                self.pull_keys.push(key.clone());
            }
            if push {
                self.push_keys.push(key);
            }
            self.flush(false).await?;
        }
        Ok(())
    }

    /// This node's items of `range` from `after` on, a page at a time.
    async fn local_page(&self, range: &KeyRange) -> Result<Vec<SummaryItem>, VerifyError> {
        match self
            .edge
            .store
            .summary(
                SummaryQuery::Items {
                    range: range.clone(),
                    limit: SUMMARY_ITEMS_MAX,
                },
                Basis::Versions,
            )
            .await
            .map_err(store_err)?
        {
            SummaryAnswer::Items(i) => Ok(i),
            _ => Err((500, "the store answered items with something else".into())),
        }
    }

    /// Everything this node holds in a range the parent holds nothing of.
    async fn local_only(&mut self, range: &KeyRange) -> Result<(), VerifyError> {
        self.merge(range, Vec::new()).await
    }

    /// Compares the parent's items of a range with this node's, read a
    /// page at a time.
    async fn merge(
        &mut self,
        range: &KeyRange,
        parent: Vec<SummaryItem>,
    ) -> Result<(), VerifyError> {
        let mut parent = parent.into_iter().peekable();
        let mut from = range.clone();
        loop {
            let page = self.local_page(&from).await?;
            let full = page.len() >= SUMMARY_ITEMS_MAX;
            from.after = page.last().map(|i| i.id.clone()).or(from.after);
            for l in page {
                while let Some(p) = parent.next_if(|p| p.id < l.id) {
                    self.differ(&range.rtype, &p.id, DiffKind::MissingHere)
                        .await?;
                }
                match parent.next_if(|p| p.id == l.id) {
                    Some(p) => {
                        if let Some(k) = compare(&p, &l)? {
                            self.differ(&range.rtype, &l.id, k).await?;
                        }
                    }
                    None => {
                        self.differ(&range.rtype, &l.id, DiffKind::MissingAtParent)
                            .await?
                    }
                }
            }
            if !full {
                break;
            }
        }
        for p in parent {
            self.differ(&range.rtype, &p.id, DiffKind::MissingHere)
                .await?;
        }
        Ok(())
    }

    /// Repairs what was collected, once a batch is full or at the end.
    async fn flush(&mut self, all: bool) -> Result<(), VerifyError> {
        while self.pull_keys.len() >= REPAIR_BATCH || (all && !self.pull_keys.is_empty()) {
            let n = self.pull_keys.len().min(REPAIR_BATCH);
            let keys: Vec<_> = self.pull_keys.drain(..n).collect();
            self.repair_pull(keys).await?;
        }
        while self.push_keys.len() >= REPAIR_BATCH || (all && !self.push_keys.is_empty()) {
            let n = self.push_keys.len().min(REPAIR_BATCH);
            let keys: Vec<_> = self.push_keys.drain(..n).collect();
            self.repair_push(keys).await?;
        }
        Ok(())
    }

    /// Fetches the parent's current versions and applies them as a pull.
    async fn repair_pull(&mut self, keys: Vec<(String, String)>) -> Result<(), VerifyError> {
        let b = self.post("$current", json!({ "keys": keys })).await?;
        let entries = b["entry"].as_array().map_or(&[][..], |v| v);
        let mut versions = Vec::with_capacity(entries.len());
        for e in entries {
            match RemoteVersion::from_entry(e, self.edge.cfg.validation) {
                Ok(v) if self.edge.pull_filter.passes(&v.rtype, e.get("resource")) => {
                    versions.push(v)
                }
                Ok(_) => self.report.pulled.filtered += 1,
                Err(why) => {
                    tracing::warn!(edge = %self.edge.cfg.name, %why, "a repair version was refused");
                    self.report.pulled.failed += 1;
                }
            }
        }
        let total = versions.len();
        let out = self
            .edge
            .store
            .write(WriteRequest::Apply(Box::new(ApplyRequest {
                edge: self.edge.cfg.name.clone(),
                direction: Direction::Pull,
                peer: self.report.parent_node_id.clone(),
                policy: self.edge.cfg.conflict_policy,
                versions,
                cursor: None,
                dead_letters: Vec::new(),
                record_peer: false,
            })))
            .await
            .map_err(|e| (500, format!("cannot store repaired versions: {e}")))?;
        let WriteOutcome::Applied(rep) = out else {
            return Err((500, "unexpected write outcome".into()));
        };
        let r = &mut self.report.pulled;
        r.stored += rep.stored;
        r.skipped += rep.skipped;
        r.conflicts += rep.conflicts;
        r.failed += (total - rep.results.len()) as u64 + u64::from(rep.failed().is_some());
        Ok(())
    }

    /// Sends this node's current versions to the parent's `$apply`.
    async fn repair_push(&mut self, keys: Vec<(String, String)>) -> Result<(), VerifyError> {
        let rows = self
            .edge
            .store
            .current_many(keys)
            .await
            .map_err(store_err)?;
        let mut entries = Vec::with_capacity(rows.len());
        for v in &rows {
            let body: Option<Value> = v.body.as_deref().and_then(|b| serde_json::from_str(b).ok());
            if self.edge.push_filter.passes(&v.rtype, body.as_ref()) {
                entries.push(change_entry_text(None, v));
            } else {
                self.report.pushed.filtered += 1;
            }
        }
        if entries.is_empty() {
            return Ok(());
        }
        self.report.requests += 1;
        self.report.bytes_sent += entries.iter().map(|e| e.len() as u64).sum::<u64>();
        let a = self.edge.post_apply(&entries).await.map_err(failure)?;
        let r = &mut self.report.pushed;
        r.stored += a.stored;
        r.skipped += a.skipped;
        r.conflicts += a.conflicts;
        r.failed += (entries.len() - a.applied) as u64;
        Ok(())
    }
}

impl Edge {
    /// Compares this node with the parent and, with `repair`, repairs
    /// what differs. One run at a time per edge (409 otherwise).
    pub async fn verify(&self, repair: bool) -> Result<VerifyReport, VerifyError> {
        if self.verify.running.swap(true, Ordering::SeqCst) {
            return Err((
                409,
                format!("a verify of edge '{}' is under way", self.cfg.name),
            ));
        }
        // Cleared however the run ends, dropped mid-way included.
        struct Running<'a>(&'a AtomicBool);
        impl Drop for Running<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let _running = Running(&self.verify.running);
        let r = self.verify_run(repair).await;
        let v = &self.verify;
        v.runs.fetch_add(1, Ordering::Relaxed);
        match &r {
            Ok(rep) => {
                v.differences.fetch_add(rep.differences, Ordering::Relaxed);
                v.repaired
                    .fetch_add(rep.pulled.stored + rep.pushed.stored, Ordering::Relaxed);
                if rep.in_sync {
                    if let Ok(mut g) = v.in_sync.lock() {
                        *g = Some((rep.parent_seq, rep.started_ms + rep.took_ms));
                    }
                }
                if let Ok(mut g) = v.last.lock() {
                    *g = Some(rep.clone());
                }
                if let Ok(mut g) = v.last_error.lock() {
                    *g = None;
                }
                tracing::info!(
                    edge = %self.cfg.name,
                    differences = rep.differences,
                    repaired = rep.pulled.stored + rep.pushed.stored,
                    took_ms = rep.took_ms,
                    "anti-entropy run done"
                );
            }
            Err((_, why)) => {
                tracing::warn!(edge = %self.cfg.name, error = %why, "anti-entropy run failed");
                if let Ok(mut g) = v.last_error.lock() {
                    *g = Some(why.clone());
                }
            }
        }
        r
    }

    async fn verify_run(&self, repair: bool) -> Result<VerifyReport, VerifyError> {
        let t0 = Instant::now();
        let started_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut run = Run {
            edge: self,
            report: VerifyReport {
                edge: self.cfg.name.clone(),
                started_ms,
                repair,
                local_seq: self.store.last_seq(),
                ..VerifyReport::default()
            },
            pull_keys: Vec::new(),
            push_keys: Vec::new(),
        };
        // Both ends summarize every type at once.
        let store = self.store.clone();
        let local =
            tokio::spawn(async move { store.summary(SummaryQuery::Types, Basis::Versions).await });
        let remote = run.post("$summary", json!({"types": true})).await;
        let local = local
            .await
            .map_err(|e| (500, format!("summary task failed: {e}")))?
            .map_err(store_err)?;
        let remote = remote?;
        let parent = remote["nodeId"]
            .as_str()
            .ok_or_else(|| bad_answer("no nodeId"))?
            .to_owned();
        if parent == self.store.node_id() {
            return Err((409, "the parent has this node's own id".into()));
        }
        self.learn_parent(&parent);
        run.report.parent_node_id = parent;
        run.report.parent_seq = remote["lastSeq"].as_u64().unwrap_or(0);
        let SummaryAnswer::Types(local) = local else {
            return Err((500, "the store answered types with something else".into()));
        };
        run.report.resources = local.iter().map(|(_, f)| f.count).sum();
        let local: BTreeMap<String, Fingerprint> = local.into_iter().collect();
        let mut theirs = BTreeMap::new();
        for t in remote["types"].as_array().map_or(&[][..], |v| v) {
            let name = t["type"]
                .as_str()
                .ok_or_else(|| bad_answer("a type without name"))?;
            theirs.insert(name.to_owned(), fingerprint(t)?);
        }
        let mut queue: VecDeque<(KeyRange, u32)> = VecDeque::new();
        let names: BTreeSet<&String> = local.keys().chain(theirs.keys()).collect();
        for t in names {
            let (pull, push) = run.scope(t);
            if !pull && !push {
                continue;
            }
            match (theirs.get(t), local.get(t)) {
                (Some(p), Some(l)) if p == l => {}
                (None, Some(_)) => run.local_only(&KeyRange::whole(t)).await?,
                _ => queue.push_back((KeyRange::whole(t), 0)),
            }
        }
        while !queue.is_empty() {
            let n = queue.len().min(VERIFY_RANGES_PER_REQUEST);
            let batch: Vec<(KeyRange, u32)> = queue.drain(..n).collect();
            let body = json!({
                "split": batch.iter().map(|(r, _)| range_json(r)).collect::<Vec<_>>(),
                "fanout": VERIFY_FANOUT,
                "leaf": VERIFY_LEAF,
            });
            let answer = run.post("$summary", body).await?;
            let ranges = answer["ranges"].as_array().map_or(&[][..], |v| v);
            if ranges.len() != batch.len() {
                return Err(bad_answer(format!(
                    "{} answers to {} ranges",
                    ranges.len(),
                    batch.len()
                )));
            }
            for ((range, depth), a) in batch.into_iter().zip(ranges) {
                if let Some(p) = a["parts"].as_array() {
                    if depth >= VERIFY_DEPTH_MAX {
                        return Err(bad_answer(format!("{range} is still cut at depth {depth}")));
                    }
                    let theirs = parts(&range, p)?;
                    let bounds: Vec<String> = theirs[..theirs.len() - 1]
                        .iter()
                        .filter_map(|p| p.upto.clone())
                        .collect();
                    let ours = match self
                        .store
                        .summary(
                            SummaryQuery::Cut {
                                range: range.clone(),
                                bounds,
                            },
                            Basis::Versions,
                        )
                        .await
                        .map_err(store_err)?
                    {
                        SummaryAnswer::Parts(p) => p,
                        _ => {
                            return Err((
                                500,
                                "the store answered parts with something else".into(),
                            ))
                        }
                    };
                    let mut after = range.after.clone();
                    for (p, o) in theirs.into_iter().zip(ours) {
                        let sub = range.sub(after.clone(), p.upto.clone());
                        if p.fp != o.fp {
                            if p.fp.count == 0 {
                                run.local_only(&sub).await?;
                            } else {
                                queue.push_back((sub, depth + 1));
                            }
                        }
                        after = p.upto;
                    }
                } else if let Some(i) = a["items"].as_array() {
                    let theirs = items(&range, i)?;
                    run.merge(&range, theirs).await?;
                } else {
                    return Err(bad_answer(format!("no parts or items for {range}")));
                }
            }
        }
        run.flush(true).await?;
        let mut report = run.report;
        report.in_sync = report.differences == 0;
        report.took_ms = t0.elapsed().as_millis() as u64;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, vv: &str, c: Option<&[u8]>) -> SummaryItem {
        SummaryItem {
            id: id.into(),
            vv: vv.into(),
            content: c.map(<[u8]>::to_vec),
        }
    }

    #[test]
    fn differences_are_named_by_the_vectors() {
        let p = item("a", r#"{"p":2}"#, Some(b"x"));
        assert_eq!(compare(&p, &p.clone()).unwrap(), None);
        let older = item("a", r#"{"p":1}"#, Some(b"w"));
        assert_eq!(compare(&p, &older).unwrap(), Some(DiffKind::OlderHere));
        assert_eq!(compare(&older, &p).unwrap(), Some(DiffKind::OlderAtParent));
        let other = item("a", r#"{"c":1}"#, Some(b"y"));
        assert_eq!(compare(&p, &other).unwrap(), Some(DiffKind::Concurrent));
        let same_vv = item("a", r#"{"p":2}"#, Some(b"z"));
        assert_eq!(
            compare(&p, &same_vv).unwrap(),
            Some(DiffKind::SameVectorOtherContent)
        );
        let bad = item("a", "not json", None);
        assert!(compare(&bad, &p).is_err());
    }

    #[test]
    fn a_parents_malformed_parts_and_items_are_refused() {
        let r = KeyRange::whole("Patient");
        let fp = |upto: Value| json!({"upto": upto, "count": 1, "sum": "0".repeat(32)});
        assert!(parts(&r, &[fp(json!("b")), fp(Value::Null)]).is_ok());
        // The last part must end where the range does; bounds ascend.
        assert!(parts(&r, &[fp(json!("b")), fp(json!("c"))]).is_err());
        assert!(parts(&r, &[fp(json!("c")), fp(json!("b")), fp(Value::Null)]).is_err());
        assert!(parts(&r, &[]).is_err());
        let many: Vec<Value> = (0..=SUMMARY_FANOUT_MAX)
            .map(|i| fp(json!(format!("{i:03}"))))
            .collect();
        assert!(parts(&r, &many).is_err());
        let inner = KeyRange {
            rtype: "Patient".into(),
            after: Some("m".into()),
            upto: Some("t".into()),
        };
        assert!(parts(&inner, &[fp(json!("a")), fp(json!("t"))]).is_err());
        assert!(items(
            &inner,
            &[json!(["n", "{}", null]), json!(["o", "{}", "00ff"])]
        )
        .is_ok());
        assert!(items(
            &inner,
            &[json!(["o", "{}", null]), json!(["n", "{}", null])]
        )
        .is_err());
        assert!(items(&inner, &[json!(["z", "{}", null])]).is_err());
        assert!(items(&inner, &[json!(["n", "{}", "xyz"])]).is_err());
        assert!(items(&inner, &[json!(["n"])]).is_err());
    }
}
