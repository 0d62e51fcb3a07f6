//! The change feed `GET /fhir/$changes`: the node's change log after a
//! cursor, oldest first, each entry with its sync metadata (seq, origin,
//! version vector, HLC); with `wait` it long-polls.

use std::time::Duration;

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use fhirsync_core::audit::Who;
use fhirsync_core::resource::is_resource_type;
use fhirsync_store::{
    sync_extension, ChangesQuery, StoredVersion, SyncWrite, WriteRequest, EXTENSION_BASE,
};
use serde_json::{json, Value};

use crate::auth::Principal;
use crate::http::{base_url, check_accept, fhir_json, prefer, query_pairs};
use crate::peers::Access;
use crate::render::{full_url, history_rest, BundleBuilder};
use crate::{ApiError, AppState};

/// Canonical base of fhirsync's own definitions.
pub const CANONICAL_BASE: &str = "https://fhirsync.dev/fhir";
/// Entries returned when `_count` is absent.
pub const CHANGES_COUNT_DEFAULT: usize = 100;
/// Most entries one call returns.
pub const CHANGES_COUNT_MAX: usize = 1000;

/// Who may read the feed (and the summaries of anti-entropy): a node
/// with registered children serves it to them and to readers, a bearer
/// token or SMART client whose system read scope covers every type passed
/// the guard (`fhirsync sync -m INCREMENTAL`); a reader gets everything,
/// keeps no cursor here and is no child. On a node without children the
/// feed stays open (credentials a proxy in front of it checked are not the
/// node's business). `Some(child)` when the caller is a child.
pub fn feed_reader(
    state: &AppState,
    principal: Option<&Principal>,
    headers: &HeaderMap,
) -> Result<Option<String>, ApiError> {
    let reader = principal.is_some_and(|p| matches!(p.who, Who::Token(_) | Who::Client(_)));
    if state.children.is_empty() || reader {
        return Ok(None);
    }
    Ok(Some(
        state
            .children
            .authenticate(headers, Access::Pull)?
            .node_id
            .clone(),
    ))
}

pub async fn changes(
    State(state): State<AppState>,
    principal: Option<Extension<Principal>>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let child = feed_reader(&state, principal.as_deref(), &headers)?;
    let pairs = query_pairs(raw.as_deref());
    check_accept(&headers, &pairs)?;
    let mut q = ChangesQuery {
        since: 0,
        count: CHANGES_COUNT_DEFAULT,
        types: Vec::new(),
        // A child has the versions it sent: no echoes.
        exclude_via: child.clone(),
    };
    let mut wait_s = 0u64;
    let mut unsupported = Vec::new();
    for (k, v) in &pairs {
        let num = |what: &str| -> Result<u64, ApiError> {
            v.parse().map_err(|_| {
                ApiError::bad_request(format!("{what} '{v}' is not a non-negative integer"))
            })
        };
        match k.as_str() {
            "since" => q.since = num("since")?,
            "_count" => q.count = (num("_count")? as usize).clamp(1, CHANGES_COUNT_MAX),
            "wait" => wait_s = num("wait")?.min(state.cfg.long_poll_s_max),
            "_type" => {
                for t in v.split(',').filter(|t| !t.is_empty()) {
                    if !is_resource_type(t) {
                        return Err(ApiError::bad_request(format!(
                            "_type '{t}' is not a resource type"
                        )));
                    }
                    q.types.push(t.to_owned());
                }
            }
            "_format" | "_pretty" => {}
            other => unsupported.push(other.to_owned()),
        }
    }
    if !unsupported.is_empty() && prefer(&headers).strict {
        return Err(ApiError::new(
            400,
            "not-supported",
            format!(
                "unsupported $changes parameters: {}",
                unsupported.join(", ")
            ),
        ));
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait_s);
    let mut seq_rx = state.store.watch_seq();
    let mut shutdown = state.shutdown.clone();
    let (rows, upper) = loop {
        // Every seq up to `upper` is committed, so a short page has seen
        // all matching rows below it and the cursor may pass filtered ones.
        let upper = *seq_rx.borrow_and_update();
        let rows = state.store.changes(q.clone()).await?;
        if !rows.is_empty() || wait_s == 0 || *shutdown.borrow() {
            break (rows, upper);
        }
        tokio::select! {
            r = seq_rx.changed() => if r.is_err() { break (rows, upper) },
            _ = tokio::time::sleep_until(deadline) => break (rows, upper),
            _ = shutdown.changed() => break (rows, upper),
        }
    };

    let base = base_url(&state, &headers);
    let last_row = rows.last().map_or(q.since, |v| v.seq);
    let next_since = if rows.len() < q.count {
        last_row.max(upper.max(q.since))
    } else {
        last_row
    };
    if let Some(node_id) = child {
        if state.children.contact_due(&node_id) {
            let store = state.store.clone();
            tokio::spawn(async move {
                let w = SyncWrite::PeerContact {
                    node_id,
                    sent: Some(next_since),
                };
                if let Err(e) = store.write(WriteRequest::Sync(w)).await {
                    tracing::warn!(error = %e, "cannot record a child's contact");
                }
            });
        }
    }
    let link = |since: u64| {
        let mut s = form_urlencoded::Serializer::new(String::new());
        s.append_pair("since", &since.to_string());
        s.append_pair("_count", &q.count.to_string());
        if !q.types.is_empty() {
            s.append_pair("_type", &q.types.join(","));
        }
        format!("{base}/$changes?{}", s.finish())
    };
    let links = [("self", link(q.since)), ("next", link(next_since))];
    let ext = vec![
        json!({"url": format!("{EXTENSION_BASE}/changes-next-since"), "valueDecimal": next_since}),
        json!({"url": format!("{EXTENSION_BASE}/changes-last-seq"), "valueDecimal": state.store.last_seq()}),
    ];
    Ok(change_bundle(&state, &base, &links, ext, &rows))
}

/// A "history" Bundle of change entries (each with its sync extension), as
/// `$changes` and `$current` answer; `ext` gains the node's id.
pub(crate) fn change_bundle(
    state: &AppState,
    base: &str,
    links: &[(&str, String)],
    mut ext: Vec<Value>,
    rows: &[StoredVersion],
) -> Response {
    ext.push(
        json!({"url": format!("{EXTENSION_BASE}/node-id"), "valueString": state.store.node_id()}),
    );
    let mut b = BundleBuilder::new("history", None, links, Value::Array(ext));
    for v in rows {
        b.entry(
            Some(sync_extension(v)),
            Some(&full_url(base, v)),
            v.body.as_deref(),
            history_rest(v),
        );
    }
    fhir_json(b.finish())
}
