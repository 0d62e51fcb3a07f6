//! The parent side of anti-entropy: `POST /fhir/$summary` answers the
//! fingerprints of this node's current resources over key ranges (every
//! type's, or a range cut into parts of about equal size, or a small
//! range's items), and `POST /fhir/$current` the current versions of named
//! resources as change records, so a child can compare what both hold
//! without sending it and repair what differs through the normal apply
//! path. Both take plain JSON; the callers are the ones `$changes` serves.
//! `$summary` also cuts a range at the asker's bounds (to compare two other
//! nodes, as `fhirsync sync -m COMPARE` does) and summarizes by content
//! alone (`"content": true`).

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use fhirsync_core::resource::is_resource_type;
use fhirsync_core::summary::{hex, KeyRange};
use fhirsync_store::summary::{Basis, SummaryAnswer, SummaryQuery, SUMMARY_FANOUT_MAX};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::auth::Principal;
use crate::changes::{change_bundle, feed_reader};
use crate::http::{base_url, read_body};
use crate::{ApiError, AppState};

/// Most ranges one `$summary` call asks about.
pub const SUMMARY_RANGES_MAX: usize = 256;
/// Most items a range's answer lists instead of cutting it.
pub const SUMMARY_LEAF_MAX: usize = 1_000;
/// Most resources one `$current` call names.
pub const CURRENT_KEYS_MAX: usize = 1_000;
/// Longest id bound a range may carry (FHIR ids have at most 64).
const BOUND_BYTES_MAX: usize = 64;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RangeIn {
    #[serde(rename = "type")]
    rtype: String,
    after: Option<String>,
    upto: Option<String>,
}

/// A range to cut at the asker's bounds (another node's parts).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CutIn {
    #[serde(rename = "type")]
    rtype: String,
    after: Option<String>,
    upto: Option<String>,
    bounds: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SummaryIn {
    #[serde(default)]
    types: bool,
    #[serde(default)]
    split: Vec<RangeIn>,
    #[serde(default)]
    cut: Vec<CutIn>,
    fanout: Option<usize>,
    leaf: Option<usize>,
    /// Compare by content alone (live resources, vectors left out).
    #[serde(default)]
    content: bool,
}

fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| ApiError::bad_request(format!("{what}: {e}")))
}

/// A range as asked, checked: a known type, bounds no longer than an id,
/// `after` below `upto`.
fn range(r: RangeIn) -> Result<KeyRange, ApiError> {
    if !is_resource_type(&r.rtype) {
        return Err(ApiError::bad_request(format!(
            "range type '{}' is not a resource type",
            r.rtype
        )));
    }
    for b in [&r.after, &r.upto].into_iter().flatten() {
        if b.len() > BOUND_BYTES_MAX {
            return Err(ApiError::bad_request(format!(
                "a range bound is longer than {BOUND_BYTES_MAX} bytes"
            )));
        }
    }
    if let (Some(a), Some(u)) = (&r.after, &r.upto) {
        if a >= u {
            return Err(ApiError::bad_request(format!(
                "range after '{a}' is not below upto '{u}'"
            )));
        }
    }
    Ok(KeyRange {
        rtype: r.rtype,
        after: r.after,
        upto: r.upto,
    })
}

/// A cut as asked, checked: a valid range, at most
/// [`SUMMARY_FANOUT_MAX`] bounds, ascending and inside the range.
fn cut(c: CutIn) -> Result<(KeyRange, Vec<String>), ApiError> {
    let range = range(RangeIn {
        rtype: c.rtype,
        after: c.after,
        upto: c.upto,
    })?;
    if c.bounds.len() >= SUMMARY_FANOUT_MAX {
        return Err(ApiError::bad_request(format!(
            "a cut has more than {} bounds",
            SUMMARY_FANOUT_MAX - 1
        )));
    }
    for (i, b) in c.bounds.iter().enumerate() {
        let above_previous = i == 0 || b > &c.bounds[i - 1];
        if b.len() > BOUND_BYTES_MAX || !above_previous || !range.contains(b) {
            return Err(ApiError::bad_request(format!(
                "cut bound '{b}' is not ascending inside {range}"
            )));
        }
    }
    Ok((range, c.bounds))
}

fn fp_json(count: u64, sum: String) -> Value {
    json!({"count": count, "sum": sum})
}

/// The answer to one question, as JSON.
pub fn answer_json(a: &SummaryAnswer) -> Value {
    match a {
        SummaryAnswer::Types(ts) => Value::Array(
            ts.iter()
                .map(|(t, f)| json!({"type": t, "count": f.count, "sum": f.sum_hex()}))
                .collect(),
        ),
        SummaryAnswer::Parts(ps) => json!({"parts": ps.iter().map(|p| {
            let mut v = fp_json(p.fp.count, p.fp.sum_hex());
            v["upto"] = json!(p.upto);
            v
        }).collect::<Vec<_>>()}),
        SummaryAnswer::Items(is) => json!({"items": is.iter().map(|i| json!([
            i.id,
            i.vv,
            i.content.as_deref().map(hex),
        ])).collect::<Vec<_>>()}),
    }
}

pub async fn summary(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    feed_reader(&state, principal.as_deref(), &headers)?;
    let bytes = read_body(&state, &headers, body).await?;
    let q: SummaryIn = json_body(
        &bytes,
        "$summary takes {\"types\": true}, {\"split\": [ranges]} or {\"cut\": [ranges with bounds]}",
    )?;
    if q.split.len() + q.cut.len() > SUMMARY_RANGES_MAX {
        return Err(ApiError::new(
            413,
            "too-costly",
            format!("more than {SUMMARY_RANGES_MAX} ranges in one $summary"),
        ));
    }
    let fanout = q.fanout.unwrap_or(16);
    if !(2..=SUMMARY_FANOUT_MAX).contains(&fanout) {
        return Err(ApiError::bad_request(format!(
            "fanout {fanout} is outside 2..={SUMMARY_FANOUT_MAX}"
        )));
    }
    let leaf = q.leaf.unwrap_or(32);
    if !(1..=SUMMARY_LEAF_MAX).contains(&leaf) {
        return Err(ApiError::bad_request(format!(
            "leaf {leaf} is outside 1..={SUMMARY_LEAF_MAX}"
        )));
    }
    let ranges = q
        .split
        .into_iter()
        .map(range)
        .collect::<Result<Vec<_>, _>>()?;
    let cuts = q.cut.into_iter().map(cut).collect::<Result<Vec<_>, _>>()?;
    let basis = if q.content {
        Basis::Content
    } else {
        Basis::Versions
    };
    let last_seq = state.store.last_seq();
    let mut out = json!({"nodeId": state.store.node_id(), "lastSeq": last_seq});
    if q.types {
        let a = state.store.summary(SummaryQuery::Types, basis).await?;
        out["types"] = answer_json(&a);
    }
    let mut answers = Vec::with_capacity(ranges.len());
    for range in ranges {
        let q = SummaryQuery::Split {
            range,
            fanout,
            leaf,
        };
        answers.push(answer_json(&state.store.summary(q, basis).await?));
    }
    out["ranges"] = Value::Array(answers);
    if !cuts.is_empty() {
        let mut answers = Vec::with_capacity(cuts.len());
        for (range, bounds) in cuts {
            let q = SummaryQuery::Cut { range, bounds };
            answers.push(answer_json(&state.store.summary(q, basis).await?));
        }
        out["cuts"] = Value::Array(answers);
    }
    Ok(crate::admin::json_response(out))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CurrentIn {
    keys: Vec<(String, String)>,
}

pub async fn current(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    feed_reader(&state, principal.as_deref(), &headers)?;
    let bytes = read_body(&state, &headers, body).await?;
    let q: CurrentIn = json_body(&bytes, "$current takes {\"keys\": [[type, id], ...]}")?;
    if q.keys.len() > CURRENT_KEYS_MAX {
        return Err(ApiError::new(
            413,
            "too-costly",
            format!("more than {CURRENT_KEYS_MAX} resources in one $current"),
        ));
    }
    if let Some((t, _)) = q.keys.iter().find(|(t, _)| !is_resource_type(t)) {
        return Err(ApiError::bad_request(format!(
            "'{t}' is not a resource type"
        )));
    }
    let rows = state.store.current_many(q.keys).await?;
    let base = base_url(&state, &headers);
    Ok(change_bundle(&state, &base, &[], Vec::new(), &rows))
}
