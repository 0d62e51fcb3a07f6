//! The admin API under `/admin`: node status, edges, children, conflicts
//! (list, show, resolve, reopen a merge), dead letters (list, retry) and the audit log.
//! Answers are plain JSON; errors are `OperationOutcome`s like the rest.
//! When `admin_token` is set, every call needs it as a bearer token.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, HeaderMap};
use axum::response::Response;
use fhirsync_core::resource::parse_resource;
use fhirsync_store::{
    AuditEntry, ListQuery, Prepared, Resolution, SyncWrite, WriteOutcome, WriteRequest,
};
use serde_json::{json, Value};

use crate::http::{query_pairs, read_body};
use crate::{ApiError, AppState};

/// Rows a list call returns when `_count` is absent, and at most.
pub const LIST_COUNT_DEFAULT: usize = 50;
pub const LIST_COUNT_MAX: usize = 1000;

pub(crate) fn json_response(v: Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

/// The bearer token of a request.
fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

pub fn check_admin(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(want) = &state.cfg.admin_token else {
        if state.cfg.auth.anonymous {
            return Ok(());
        }
        return Err(ApiError::new(
            401,
            "login",
            "the admin API is closed: set admin_token (or enable anonymous access)",
        ));
    };
    if bearer(headers).is_some_and(|t| crate::peers::same(t, want)) {
        Ok(())
    } else {
        Err(ApiError::new(
            401,
            "login",
            "the admin API needs the admin bearer token",
        ))
    }
}

fn list_query(raw: Option<&str>, state_param: &str) -> Result<ListQuery, ApiError> {
    let mut q = ListQuery {
        count: LIST_COUNT_DEFAULT,
        ..ListQuery::default()
    };
    for (k, v) in query_pairs(raw) {
        let num = || {
            v.parse::<u64>().map_err(|_| {
                ApiError::bad_request(format!("{k} '{v}' is not a non-negative integer"))
            })
        };
        match k.as_str() {
            "_count" => q.count = (num()? as usize).clamp(1, LIST_COUNT_MAX),
            "before" => q.before = Some(num()?),
            "edge" => q.edge = Some(v.clone()),
            s if s == state_param => q.state = Some(v.clone()),
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter '{other}' (_count, before, edge, {state_param})"
                )))
            }
        }
    }
    Ok(q)
}

fn id_param(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::not_found(format!("'{s}' is not a record id")))
}

pub async fn status(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let (open, dead) = open_counts(&state).await?;
    let edges = all_edges(&state).await;
    let mut v = json!({
        "nodeId": state.store.node_id(),
        "lastSeq": state.store.last_seq(),
        "edges": edges,
        "children": children_json(&state).await?,
        "openConflicts": open,
        "deadLetters": dead,
    });
    v.as_object_mut()
        .expect("an object")
        .extend(deployment_json(&state).await?);
    Ok(json_response(v))
}

/// The store's backend and database, the processes serving from it and
/// which of them holds the agents' lease (PostgreSQL).
pub async fn deployment_json(state: &AppState) -> Result<serde_json::Map<String, Value>, ApiError> {
    let d = &state.deployment;
    let mut procs = state.store.processes().await?;
    let pg = d.backend == "postgres";
    if !pg {
        procs = vec![d.process.clone()];
    }
    let at = fhirsync_core::instant::format_instant;
    let list: Vec<Value> = procs
        .iter()
        .map(|p| {
            let mut j = json!({
                "id": p.id,
                "host": p.host,
                "pid": p.pid,
                "base": p.base,
                "startedAt": at(p.started_ms),
                "up": p.up,
                "this": p.id == d.process.id,
            });
            if pg {
                j["lastSeen"] = json!(at(p.seen_ms));
                j["leaseHolder"] = json!(p.lease_holder && p.up);
            }
            j
        })
        .collect();
    let mut out = serde_json::Map::new();
    out.insert(
        "storage".into(),
        json!({"backend": d.backend, "database": d.database}),
    );
    out.insert("processes".into(), Value::Array(list));
    if pg {
        let holder = procs.iter().find(|p| p.lease_holder && p.up);
        out.insert("leaseHolder".into(), json!(holder.map(|p| &p.id)));
    }
    Ok(out)
}

/// Open conflicts and dead letters, counted by the store (a busy node's
/// figures are not capped by a page size).
pub async fn open_counts(state: &AppState) -> Result<(u64, u64), ApiError> {
    Ok(state.store.open_counts().await?)
}

pub async fn children_json(state: &AppState) -> Result<Vec<Value>, ApiError> {
    let peers = state.store.peers().await?;
    let last = state.store.last_seq();
    Ok(state
        .children
        .list()
        .iter()
        .map(|c| {
            let p = peers.iter().find(|p| p.node_id == c.node_id);
            let ms = |v: u64| (v > 0).then(|| fhirsync_core::instant::format_instant(v));
            json!({
                "nodeId": c.node_id,
                "pull": c.pull,
                "push": c.push,
                "firstContact": p.and_then(|p| ms(p.first_ms)),
                "lastContact": p.and_then(|p| ms(p.last_ms)),
                "lastSeqReceived": p.map_or(0, |p| p.last_seq_received),
                "lastSeqSent": p.map_or(0, |p| p.last_seq_sent),
                "lagSeq": last.saturating_sub(p.map_or(0, |p| p.last_seq_sent)),
            })
        })
        .collect())
}

pub async fn children(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    Ok(json_response(
        json!({"items": children_json(&state).await?}),
    ))
}

pub async fn edges(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let edges = all_edges(&state).await;
    Ok(json_response(json!({"items": edges})))
}

pub async fn conflicts(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let q = list_query(raw.as_deref(), "state")?;
    if let Some(s) = &q.state {
        if fhirsync_store::ConflictState::parse(s).is_none() {
            return Err(ApiError::bad_request(format!(
                "state '{s}' is not one of open, resolved, superseded, auto"
            )));
        }
    }
    let rows = state.store.conflicts(q).await?;
    Ok(json_response(
        json!({"items": rows.iter().map(|c| c.to_json()).collect::<Vec<_>>()}),
    ))
}

pub async fn conflict(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    conflict_json(&state, id_param(&id)?).await
}

/// One conflict as JSON, or 404.
async fn conflict_json(state: &AppState, id: u64) -> Result<Response, ApiError> {
    match state.store.conflict(id).await? {
        Some(c) => Ok(json_response(c.to_json())),
        None => Err(ApiError::not_found(format!("conflict {id} is not known"))),
    }
}

/// Body: `{"keep": "local"}`, `{"keep": "remote"}` or `{"resource": {...}}`.
pub async fn resolve(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let id = id_param(&id)?;
    let bytes = read_body(&state, &headers, body).await?;
    let b: Value = serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("body is not JSON: {e}")))?;
    let how = match (b.get("keep").and_then(Value::as_str), b.get("resource")) {
        (Some("local"), None) => Resolution::KeepLocal,
        (Some("remote"), None) => Resolution::TakeRemote,
        (None, Some(r)) => {
            let map = parse_resource(r.to_string().as_bytes())
                .map_err(|e| ApiError::from(fhirsync_store::StoreError::from(e)))?;
            let rtype = fhirsync_core::resource::check_resource(&map, None)
                .map_err(|e| ApiError::from(fhirsync_store::StoreError::from(e)))?;
            Resolution::Merged(Prepared::new(rtype, map))
        }
        _ => {
            return Err(ApiError::bad_request(
                "send {\"keep\": \"local\"}, {\"keep\": \"remote\"} or {\"resource\": {...}}",
            ))
        }
    };
    let out = state
        .store
        .write(WriteRequest::Sync(SyncWrite::Resolve { conflict: id, how }))
        .await?;
    let WriteOutcome::Written { version, .. } = out else {
        return Err(ApiError::new(500, "exception", "unexpected write outcome"));
    };
    Ok(json_response(json!({
        "conflict": id,
        "resolved": format!("{}/{}/_history/{}", version.rtype, version.id, version.vid),
        "vector": serde_json::to_value(&version.vv).unwrap_or(Value::Null),
        "seq": version.seq,
    })))
}

/// Undoes an automatic settlement (a merge) into an open conflict.
pub async fn reopen(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let id = id_param(&id)?;
    state
        .store
        .write(WriteRequest::Sync(SyncWrite::Reopen { conflict: id }))
        .await?;
    conflict_json(&state, id).await
}

pub async fn dead_letters(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let q = list_query(raw.as_deref(), "direction")?;
    let rows = state.store.dead_letters(q).await?;
    Ok(json_response(
        json!({"items": rows.iter().map(|d| d.to_json()).collect::<Vec<_>>()}),
    ))
}

pub async fn dead_letter(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let id = id_param(&id)?;
    match state.store.dead_letter(id).await? {
        Some(d) => {
            let mut v = d.to_json();
            v["record"] = serde_json::from_str(&d.letter.record).unwrap_or(Value::Null);
            Ok(json_response(v))
        }
        None => Err(ApiError::not_found(format!(
            "dead letter {id} is not known"
        ))),
    }
}

pub async fn all_edges(state: &AppState) -> Vec<Value> {
    let mut out = Vec::new();
    for a in &state.agents {
        out.extend(a.edges().await);
    }
    out
}

/// `POST /admin/verify?edge=NAME&repair=true`: compares this node with
/// its parent now (anti-entropy) and, with `repair`, repairs what
/// differs; answers the run's report.
pub async fn verify(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let q: std::collections::HashMap<String, String> =
        query_pairs(raw.as_deref()).into_iter().collect();
    let repair = match q.get("repair").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => {
            return Err(ApiError::bad_request(format!(
                "repair '{v}' must be true or false"
            )))
        }
    };
    if let Some(k) = q.keys().find(|k| !matches!(k.as_str(), "edge" | "repair")) {
        return Err(ApiError::bad_request(format!(
            "unknown parameter '{k}': verify takes edge and repair"
        )));
    }
    let edge = q.get("edge").map(String::as_str);
    for a in &state.agents {
        if let Some(r) = a.verify(edge, repair).await {
            return r.map(json_response).map_err(|(status, why)| {
                ApiError::new(status, crate::error::issue_code(status), why)
            });
        }
    }
    Err(ApiError::new(
        409,
        "conflict",
        match edge {
            Some(e) => {
                format!("edge '{e}' is not configured on this node (or runs in another process)")
            }
            None => "this node has no parent edge to verify (or another process runs it)".into(),
        },
    ))
}

pub async fn retry_one(state: &AppState, id: u64) -> Result<(), ApiError> {
    let d = state
        .store
        .dead_letter(id)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("dead letter {id} is not known")))?;
    let Some(agent) = state.agents.iter().find(|a| a.owns(&d.letter.edge)) else {
        return Err(ApiError::new(
            409,
            "conflict",
            format!(
                "edge '{}' of dead letter {id} is not configured on this node",
                d.letter.edge
            ),
        ));
    };
    agent
        .retry(&d)
        .await
        .map_err(|(status, why)| ApiError::new(status, crate::error::issue_code(status), why))
}

pub async fn retry(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let id = id_param(&id)?;
    retry_one(&state, id).await?;
    Ok(json_response(json!({"retried": [id], "failed": []})))
}

/// Retries every dead letter, oldest first; reports which stayed.
pub async fn retry_all(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let mut rows = state
        .store
        .dead_letters(ListQuery {
            count: LIST_COUNT_MAX,
            ..ListQuery::default()
        })
        .await?;
    rows.reverse();
    let (mut ok, mut failed) = (Vec::new(), Vec::new());
    for d in rows {
        match retry_one(&state, d.id).await {
            Ok(()) => ok.push(json!(d.id)),
            Err(e) => failed.push(json!({"id": d.id, "error": e.diagnostics})),
        }
    }
    Ok(json_response(json!({"retried": ok, "failed": failed})))
}

pub async fn audit(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let q = list_query(raw.as_deref(), "action")?;
    let rows = state.store.audit(q).await?;
    Ok(json_response(
        json!({"items": rows.iter().map(AuditEntry::to_json).collect::<Vec<_>>()}),
    ))
}

/// 401 unless `/metrics` is open or the caller sent the metrics (or the
/// admin) token.
fn check_metrics(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(want) = &state.cfg.metrics_token else {
        return Ok(());
    };
    let admin = state.cfg.admin_token.as_deref();
    let ok = bearer(headers).is_some_and(|t| {
        crate::peers::same(t, want) || admin.is_some_and(|a| crate::peers::same(t, a))
    });
    if ok {
        return Ok(());
    }
    Err(ApiError::new(
        401,
        "login",
        "/metrics needs the metrics bearer token (metrics_token)",
    ))
}

/// `/metrics` in the Prometheus text format.
pub async fn metrics(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_metrics(&state, &headers)?;
    let mut out = String::new();
    out.push_str("# HELP fhirsync_last_seq Highest committed change-log position.\n");
    out.push_str("# TYPE fhirsync_last_seq gauge\n");
    out.push_str(&format!("fhirsync_last_seq {}\n", state.store.last_seq()));
    let peers = state.store.peers().await?;
    if !state.children.is_empty() {
        out.push_str("# HELP fhirsync_child_lag_seq Own changes not yet sent to a child.\n");
        out.push_str("# TYPE fhirsync_child_lag_seq gauge\n");
        for c in state.children.list() {
            let sent = peers
                .iter()
                .find(|p| p.node_id == c.node_id)
                .map_or(0, |p| p.last_seq_sent);
            out.push_str(&format!(
                "fhirsync_child_lag_seq{{child=\"{}\"}} {}\n",
                c.node_id,
                state.store.last_seq().saturating_sub(sent)
            ));
        }
    }
    let rows: Vec<_> = state.agents.iter().flat_map(|a| a.counters()).collect();
    crate::agent::render_counters(&mut out, &rows);
    let rows: Vec<_> = state
        .agents
        .iter()
        .flat_map(|a| a.verify_counters())
        .collect();
    crate::agent::render_verify(&mut out, &rows);
    state.http_metrics.render(&mut out);
    let mut r = Response::new(Body::from(out));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; version=0.0.4"),
    );
    Ok(r)
}

fn reindex_json(s: fhirsync_store::ReindexStatus) -> Value {
    json!({"running": s.running, "done": s.done, "total": s.total})
}

/// `POST /admin/reindex`: every stored version indexed again while the
/// node serves (after a `SearchParameter` was defined, so that it finds
/// what was stored before); answers 202 with the progress.
pub async fn reindex(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    let s = state.store.reindex().await?;
    let mut r = json_response(reindex_json(s));
    *r.status_mut() = axum::http::StatusCode::ACCEPTED;
    Ok(r)
}

/// `GET /admin/reindex`: progress of the reindex under way or the last.
pub async fn reindex_status(
    State(state): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_admin(&state, &headers)?;
    Ok(json_response(reindex_json(state.store.reindex_status())))
}
