//! COMPARE between two fhirsync nodes without reading everything: both
//! answer `$summary` by content (live resources, vectors left out), so the
//! run compares fingerprints of id ranges, descends only into ranges that
//! differ, and reads in full (the source's `$current`) only the resources
//! that are missing or different on the target. What the target holds and
//! the source does not is deleted, as in the full COMPARE.

use std::collections::BTreeMap;
use std::sync::Arc;

use fhirsync_core::summary::{item_hash, unhex, Cutter, Fingerprint, KeyRange};
use reqwest::Method;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use crate::client::{status_error, FhirClient};
use crate::options::{BulkRead, SourceSpec, SyncOptions};
use crate::report::Count;
use crate::source::{server_types, Item};
use crate::upload::{Shared, Uploader};
use crate::SyncError;

/// Parts a differing range is cut into.
pub const FANOUT: usize = 16;
/// A range the source holds at most this many resources of is compared
/// item by item.
pub const LEAF: usize = 32;
/// Items the target may list for such a range before it is cut instead
/// (a node lists at most 1,000).
pub const WIDE_LEAF: usize = 1_000;
/// Ranges asked about in one `$summary` call (a node's limit).
pub const RANGES_PER_REQUEST: usize = 256;
/// Resources read per `$current` call (a node takes at most 1,000).
pub const FETCH_BATCH: usize = 500;
/// Deepest descent; about log16(resources / 32) levels are needed, so this
/// only stops a peer whose ranges never narrow.
pub const DEPTH_MAX: u32 = 24;

/// Whether a CapabilityStatement offers the operations this needs.
pub fn offered(cap: &Value) -> bool {
    let ops = cap["rest"][0]["operation"].as_array();
    ["summary", "current"]
        .iter()
        .all(|n| ops.is_some_and(|a| a.iter().any(|o| o["name"] == *n)))
}

/// Whether this COMPARE can go by summaries: a whole server as source, ids
/// kept as they are, both ends fhirsync nodes, and neither `--no-summary`
/// nor `--bulk` asked for another way.
pub fn applies(opts: &SyncOptions, source_cap: &Value, target_cap: &Value) -> bool {
    matches!(opts.source, SourceSpec::Server(_))
        && opts.resource_ids.is_empty()
        && opts.prefix_numeric_ids.is_none()
        && !opts.no_summary
        && opts.bulk != BulkRead::Always
        && offered(source_cap)
        && offered(target_cap)
}

/// One side's answer about a range.
enum Answer {
    Parts(Vec<(Option<String>, Fingerprint)>),
    /// `(id, content hash)` in id order.
    Items(Vec<(String, Vec<u8>)>),
}

fn bad(side: &str, what: &str) -> SyncError {
    SyncError::Options(format!(
        "the {side}'s $summary answer is not understood: {what}"
    ))
}

fn fingerprint(v: &Value, side: &str) -> Result<Fingerprint, SyncError> {
    v["count"]
        .as_u64()
        .zip(v["sum"].as_str())
        .and_then(|(c, s)| Fingerprint::from_parts(c, s))
        .ok_or_else(|| bad(side, "a fingerprint"))
}

fn answer(v: &Value, side: &str) -> Result<Answer, SyncError> {
    if let Some(parts) = v["parts"].as_array() {
        return parts
            .iter()
            .map(|p| Ok((p["upto"].as_str().map(str::to_owned), fingerprint(p, side)?)))
            .collect::<Result<_, _>>()
            .map(Answer::Parts);
    }
    let items = v["items"].as_array().ok_or_else(|| bad(side, "a range"))?;
    items
        .iter()
        .map(|i| {
            let id = i[0].as_str().ok_or_else(|| bad(side, "an item id"))?;
            let hash = i[2]
                .as_str()
                .and_then(unhex)
                .ok_or_else(|| bad(side, "an item hash"))?;
            Ok((id.to_owned(), hash))
        })
        .collect::<Result<_, _>>()
        .map(Answer::Items)
}

fn range_json(r: &KeyRange) -> Value {
    json!({"type": r.rtype, "after": r.after, "upto": r.upto})
}

/// One end of the comparison, counting what it exchanges.
struct Side<'a> {
    client: &'a FhirClient,
    name: &'static str,
}

impl Side<'_> {
    async fn post(&self, stats: &mut Stats, op: &str, body: Value) -> Result<Value, SyncError> {
        let text = body.to_string();
        stats.requests += 1;
        stats.bytes += text.len() as u64;
        let r = self.client.send(Method::POST, op, Some(&text)).await?;
        if r.status != 200 {
            return Err(status_error(
                &format!("{} {op}", self.name),
                r.status,
                &r.body,
            ));
        }
        stats.bytes += r.body.to_string().len() as u64;
        Ok(r.body)
    }

    async fn types(&self, stats: &mut Stats) -> Result<BTreeMap<String, Fingerprint>, SyncError> {
        let v = self
            .post(stats, "$summary", json!({"types": true, "content": true}))
            .await?;
        let mut out = BTreeMap::new();
        for t in v["types"]
            .as_array()
            .ok_or_else(|| bad(self.name, "types"))?
        {
            let name = t["type"].as_str().ok_or_else(|| bad(self.name, "a type"))?;
            out.insert(name.to_owned(), fingerprint(t, self.name)?);
        }
        Ok(out)
    }
}

#[derive(Default)]
struct Stats {
    requests: u64,
    bytes: u64,
}

/// What one type's descent found.
#[derive(Default)]
struct TypeDiff {
    unchanged: u64,
    write: Vec<String>,
    delete: Vec<String>,
}

impl TypeDiff {
    /// Compares two ranges' items (both in id order).
    fn items(&mut self, src: &[(String, Vec<u8>)], tgt: &[(String, Vec<u8>)]) {
        let (mut i, mut j) = (0, 0);
        while i < src.len() || j < tgt.len() {
            match (src.get(i), tgt.get(j)) {
                (Some(s), Some(t)) if s.0 == t.0 => {
                    if s.1 == t.1 {
                        self.unchanged += 1;
                    } else {
                        self.write.push(s.0.clone());
                    }
                    i += 1;
                    j += 1;
                }
                (Some(s), t) if t.is_none_or(|t| s.0 < t.0) => {
                    self.write.push(s.0.clone());
                    i += 1;
                }
                (_, Some(t)) => {
                    self.delete.push(t.0.clone());
                    j += 1;
                }
                _ => break,
            }
        }
    }

    /// Pairs up the parts of both sides cut at the same bounds: equal ones
    /// are counted, differing ones are returned to descend into.
    fn parts(
        &mut self,
        range: &KeyRange,
        src: &[(Option<String>, Fingerprint)],
        tgt: &[(Option<String>, Fingerprint)],
        side: &str,
    ) -> Result<Vec<KeyRange>, SyncError> {
        if src.len() != tgt.len() {
            return Err(bad(side, "a cut with another number of parts"));
        }
        let mut after = range.after.clone();
        let mut out = Vec::new();
        for ((upto, s), (_, t)) in src.iter().zip(tgt) {
            if s == t {
                self.unchanged += s.count;
            } else {
                out.push(range.sub(after.clone(), upto.clone()));
            }
            after = upto.clone();
        }
        Ok(out)
    }
}

/// Where `items` fall between `bounds`, as fingerprints.
fn cut_items(rtype: &str, items: &[(String, Vec<u8>)], bounds: &[String]) -> Vec<Fingerprint> {
    let mut cut = Cutter::new(bounds);
    for (id, hash) in items {
        cut.add(id, item_hash(rtype, id, "", Some(hash)));
    }
    cut.parts
}

/// Descends into one type whose fingerprints differ.
async fn diff_type(
    rtype: &str,
    src: &Side<'_>,
    tgt: &Side<'_>,
    stats: &mut Stats,
) -> Result<TypeDiff, SyncError> {
    let mut d = TypeDiff::default();
    let mut frontier = vec![KeyRange::whole(rtype)];
    let mut depth = 0;
    while !frontier.is_empty() {
        depth += 1;
        if depth > DEPTH_MAX {
            return Err(bad(
                "source",
                &format!("{rtype} ranges still differ after {DEPTH_MAX} levels"),
            ));
        }
        let mut next = Vec::new();
        for chunk in frontier.chunks(RANGES_PER_REQUEST) {
            let ranges: Vec<Value> = chunk.iter().map(range_json).collect();
            let s = src
                .post(
                    stats,
                    "$summary",
                    json!({"split": ranges, "fanout": FANOUT, "leaf": LEAF, "content": true}),
                )
                .await?;
            let s_answers = s["ranges"]
                .as_array()
                .ok_or_else(|| bad("source", "ranges"))?;
            if s_answers.len() != chunk.len() {
                return Err(bad("source", "another number of ranges"));
            }
            // What to ask the target: a cut at the source's bounds, or the
            // items of a range the source lists.
            let (mut cuts, mut splits) = (Vec::new(), Vec::new());
            let mut s_parsed = Vec::with_capacity(chunk.len());
            for (range, a) in chunk.iter().zip(s_answers) {
                let a = answer(a, "source")?;
                match &a {
                    Answer::Parts(p) => {
                        let mut c = range_json(range);
                        c["bounds"] = json!(p[..p.len().saturating_sub(1)]
                            .iter()
                            .filter_map(|(u, _)| u.clone())
                            .collect::<Vec<_>>());
                        cuts.push(c);
                    }
                    Answer::Items(_) => splits.push(range_json(range)),
                }
                s_parsed.push(a);
            }
            let t = tgt
                .post(
                    stats,
                    "$summary",
                    json!({"cut": cuts, "split": splits, "fanout": FANOUT, "leaf": WIDE_LEAF, "content": true}),
                )
                .await?;
            let empty = Vec::new();
            let mut t_cuts = t["cuts"].as_array().unwrap_or(&empty).iter();
            let mut t_splits = t["ranges"].as_array().unwrap_or(&empty).iter();
            for (range, sa) in chunk.iter().zip(s_parsed) {
                match sa {
                    Answer::Parts(sp) => {
                        let tv = t_cuts.next().ok_or_else(|| bad("target", "too few cuts"))?;
                        let Answer::Parts(tp) = answer(tv, "target")? else {
                            return Err(bad("target", "items for a cut"));
                        };
                        next.extend(d.parts(range, &sp, &tp, "target")?);
                    }
                    Answer::Items(si) => {
                        let tv = t_splits
                            .next()
                            .ok_or_else(|| bad("target", "too few ranges"))?;
                        match answer(tv, "target")? {
                            Answer::Items(ti) => d.items(&si, &ti),
                            Answer::Parts(tp) => {
                                // The target holds many more here: cut the
                                // source's few items at the target's bounds.
                                let bounds: Vec<String> = tp[..tp.len().saturating_sub(1)]
                                    .iter()
                                    .filter_map(|(u, _)| u.clone())
                                    .collect();
                                let sp: Vec<(Option<String>, Fingerprint)> = tp
                                    .iter()
                                    .map(|(u, _)| u.clone())
                                    .zip(cut_items(rtype, &si, &bounds))
                                    .collect();
                                next.extend(d.parts(range, &sp, &tp, "target")?);
                            }
                        }
                    }
                }
            }
        }
        frontier = next;
    }
    Ok(d)
}

/// Reads `ids` from the source's `$current` and hands them to `tx`.
async fn fetch(
    src: &Side<'_>,
    rtype: &str,
    ids: &[String],
    tx: &mpsc::Sender<Item>,
    shared: &Shared,
    stats: &mut Stats,
) -> Result<(), SyncError> {
    for chunk in ids.chunks(FETCH_BATCH) {
        let keys: Vec<[&str; 2]> = chunk.iter().map(|id| [rtype, id.as_str()]).collect();
        let b = src.post(stats, "$current", json!({"keys": keys})).await?;
        for e in b["entry"].as_array().into_iter().flatten() {
            // A resource deleted since it was summarized is left for the
            // next run.
            let Some(res) = e["resource"].as_object() else {
                continue;
            };
            let id = res.get("id").and_then(Value::as_str).map(str::to_owned);
            shared.count(rtype, Count::Read);
            let item = Item::Resource {
                rtype: rtype.to_owned(),
                origin: format!("{rtype}/{}", id.as_deref().unwrap_or("")),
                id,
                res: res.clone(),
            };
            if tx.send(item).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Runs COMPARE by summaries. `Ok(false)`: a side refused `$summary` before
/// anything was written, so the caller compares by reading everything.
pub async fn compare(
    opts: &SyncOptions,
    source: &FhirClient,
    target: &FhirClient,
    up: &Arc<Uploader>,
    shared: &Arc<Shared>,
) -> Result<bool, SyncError> {
    let (src, tgt) = (
        Side {
            client: source,
            name: "source",
        },
        Side {
            client: target,
            name: "target",
        },
    );
    let mut stats = Stats::default();
    let (s_types, t_types) = match (src.types(&mut stats).await, tgt.types(&mut stats).await) {
        (Ok(s), Ok(t)) => (s, t),
        (Err(e), _) | (_, Err(e)) => {
            shared.note(format!(
                "compared by reading every resource: summaries are not available ({e})"
            ));
            return Ok(false);
        }
    };
    let types = server_types(source, &opts.resource_types).await?;
    let n = opts.thread_count;
    let mut deletes: Vec<(String, Vec<String>)> = Vec::new();
    let (mut same, mut read) = (0u64, 0u64);
    for rtype in &types {
        if shared.aborted() {
            return Ok(true);
        }
        let zero = Fingerprint::default();
        let (s, t) = (
            s_types.get(rtype).unwrap_or(&zero),
            t_types.get(rtype).unwrap_or(&zero),
        );
        if s == t {
            shared.count_n(rtype, Count::Unchanged, s.count);
            same += s.count;
            continue;
        }
        let d = diff_type(rtype, &src, &tgt, &mut stats).await?;
        shared.count_n(rtype, Count::Unchanged, d.unchanged);
        same += d.unchanged;
        read += d.write.len() as u64;
        if !d.write.is_empty() {
            let (tx, rx) = mpsc::channel::<Item>(crate::upload::queue_depth(n));
            let writers = up.drain(rx, n, shared, true);
            let reader = async {
                let r = fetch(&src, rtype, &d.write, &tx, shared, &mut stats).await;
                drop(tx);
                r
            };
            let (r, ()) = tokio::join!(reader, writers);
            r?;
        }
        if !d.delete.is_empty() {
            deletes.push((rtype.clone(), d.delete));
        }
    }
    up.retry_deferred(n, shared).await;
    shared.note(format!(
        "compared by summaries: {same} resources equal, {read} read in full, {} requests and {} bytes of summaries and reads",
        stats.requests, stats.bytes
    ));
    if opts.no_delete {
        if !deletes.is_empty() {
            shared.note(
                "--no-delete: resources missing on the source were kept on the target".into(),
            );
        }
        return Ok(true);
    }
    let (tx, rx) = mpsc::channel::<Item>(crate::upload::queue_depth(n));
    let feeder = async move {
        for (rtype, ids) in deletes {
            for id in ids {
                let origin = format!("{rtype}/{id}");
                let item = Item::Delete {
                    rtype: rtype.clone(),
                    id,
                    origin,
                };
                if tx.send(item).await.is_err() {
                    return;
                }
            }
        }
    };
    tokio::join!(feeder, up.drain(rx, n, shared, false));
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(v: &[(&str, u8)]) -> Vec<(String, Vec<u8>)> {
        v.iter().map(|(i, h)| (i.to_string(), vec![*h])).collect()
    }

    #[test]
    fn items_sort_into_equal_write_and_delete() {
        let mut d = TypeDiff::default();
        d.items(
            &items(&[("a", 1), ("b", 2), ("d", 4), ("f", 6)]),
            &items(&[("a", 1), ("b", 9), ("c", 3), ("f", 6), ("g", 7)]),
        );
        assert_eq!(d.unchanged, 2);
        assert_eq!(d.write, vec!["b", "d"]);
        assert_eq!(d.delete, vec!["c", "g"]);
    }

    #[test]
    fn parts_that_differ_become_sub_ranges_between_their_bounds() {
        let fp = |c, s| Fingerprint { count: c, sum: s };
        let mut d = TypeDiff::default();
        let r = KeyRange::whole("Patient");
        let src = vec![
            (Some("k".to_owned()), fp(3, 1)),
            (Some("t".to_owned()), fp(2, 2)),
            (None, fp(4, 3)),
        ];
        let tgt = vec![
            (Some("k".to_owned()), fp(3, 1)),
            (Some("t".to_owned()), fp(2, 5)),
            (None, fp(5, 3)),
        ];
        let next = d.parts(&r, &src, &tgt, "target").unwrap();
        assert_eq!(d.unchanged, 3);
        assert_eq!(
            next,
            vec![
                r.sub(Some("k".into()), Some("t".into())),
                r.sub(Some("t".into()), None)
            ]
        );
        assert!(d.parts(&r, &src, &tgt[..2], "target").is_err());
    }

    #[test]
    fn a_capability_statement_offers_summaries_only_with_both_operations() {
        let cap = |ops: &[&str]| json!({"rest": [{"operation": ops.iter().map(|o| json!({"name": o})).collect::<Vec<_>>()}]});
        assert!(offered(&cap(&["changes", "summary", "current"])));
        assert!(!offered(&cap(&["summary"])));
        assert!(!offered(&json!({})));
    }
}
