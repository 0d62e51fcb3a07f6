//! The audit trail of the REST API: every request under `/fhir` (but the
//! CapabilityStatement and SMART discovery) and every token request becomes
//! one `AuditEvent`, refused ones included, committed in batches by the
//! [`crate::auditor::Auditor`] (before the answer with `audit_wait`, else
//! within `LINGER`, 50 ms, of it); with `audit_wait`, a read whose record
//! cannot be stored is answered 503, not with the data. `GET /fhir/AuditEvent` searches the trail, which
//! deletes of patient data never touch.

use axum::body::{to_bytes, Body};
use axum::extract::{ConnectInfo, Path, RawQuery, Request, State};
use axum::http::{header, HeaderMap};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use fhirsync_core::audit::{AuditKind, AuditRecord, Who};
use fhirsync_core::resource::is_trail_id;
use fhirsync_store::AuditQuery;
use serde_json::{json, Value};

use crate::auth::Principal;
use crate::http::{base_url, fhir_json, query_pairs};
use crate::{ApiError, AppState};

const TYPE: &str = "AuditEvent";

/// Interactions whose request body names the resources written.
fn writes(interaction: &str) -> bool {
    matches!(interaction, "create" | "update" | "transaction")
}

/// Interactions whose response body is parsed for resources and patients.
fn reads(interaction: &str) -> bool {
    matches!(
        interaction,
        "read"
            | "vread"
            | "search-type"
            | "search-system"
            | "history-instance"
            | "history-type"
            | "history-system"
            | "operation"
    )
}

/// The middleware: records the request once its response is known.
pub async fn record(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if crate::auth::is_public(&path) {
        return next.run(req).await;
    }
    let token_call = path == "/auth/token";
    if !token_call && !path.starts_with("/fhir") {
        return next.run(req).await;
    }
    let interaction = if token_call {
        "token"
    } else {
        crate::http_metrics::classify(req.method(), &path)
    };
    let query = req.uri().query().map(str::to_owned);
    let address = req
        .extensions()
        .get::<ConnectInfo<crate::PeerAddr>>()
        .map(|c| c.0 .0.ip().to_string());
    // Keep the body of writes to name their resources afterwards.
    let (req, sent) = if writes(interaction) {
        let (parts, body) = req.into_parts();
        match to_bytes(body, state.cfg.body_bytes_max).await {
            Ok(b) => (Request::from_parts(parts, Body::from(b.clone())), Some(b)),
            Err(_) => {
                return ApiError::new(413, "too-costly", "the request body is too large")
                    .into_response()
            }
        }
    } else {
        (req, None)
    };
    let resp = next.run(req).await;
    let status = resp.status().as_u16();
    let who = resp
        .extensions()
        .get::<Principal>()
        .map(|p| p.who.clone())
        .unwrap_or(Who::Anonymous);
    let mut rec = AuditRecord::rest(
        state.cfg.auth.clock.now_ms(),
        interaction,
        status,
        who,
        state.store.node_id(),
    );
    if token_call {
        rec.kind = AuditKind::Login;
        rec.action = 'E';
    }
    rec.address = address;
    rec.query = query.filter(|q| !q.is_empty());
    if status >= 400 {
        rec.outcome_desc = Some(format!("HTTP {status}"));
    }
    name_from_path(&mut rec, &path);
    let resp = if status < 300 && (reads(interaction) || interaction == "transaction") {
        let (parts, body) = resp.into_parts();
        let bytes = to_bytes(body, usize::MAX).await.unwrap_or_default();
        // A transaction's answer names what each entry became.
        rec.touch_json(&bytes);
        Response::from_parts(parts, Body::from(bytes))
    } else {
        resp
    };
    if status < 300 {
        if let Some(b) = sent {
            rec.touch_json(&b);
        }
        if let Some(loc) = resp
            .headers()
            .get(header::LOCATION)
            .and_then(|l| l.to_str().ok())
        {
            rec.touch_location(loc);
        }
    }
    let read = rec.action == 'R' && status < 300;
    match state.auditor.record(rec).await {
        true => resp,
        false => {
            tracing::error!(%path, "cannot record the audit event");
            if read {
                ApiError::new(
                    503,
                    "transient",
                    "the read could not be audited, so it is not answered",
                )
                .into_response()
            } else {
                resp
            }
        }
    }
}

/// `Type/id` (and `/_history/v`) from the request path.
fn name_from_path(rec: &mut AuditRecord, path: &str) {
    let seg: Vec<&str> = path
        .trim_start_matches("/fhir")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    if seg.len() < 2
        || !fhirsync_core::resource::is_resource_type(seg[0])
        || seg[1].starts_with('$')
        || seg[1].starts_with('_')
    {
        return;
    }
    let r = match seg.as_slice() {
        [t, id, "_history", v, ..] => format!("{t}/{id}/_history/{v}"),
        [t, id, ..] => format!("{t}/{id}"),
        _ => return,
    };
    if seg[0] == "Patient" {
        rec.patients.push(format!("Patient/{}", seg[1]));
    }
    rec.entities.push(r);
}

const COUNT_DEFAULT: usize = 50;
const COUNT_MAX: usize = 1000;

fn parse_query(raw: Option<&str>) -> Result<(AuditQuery, bool), ApiError> {
    let mut q = AuditQuery {
        count: COUNT_DEFAULT,
        ..AuditQuery::default()
    };
    let mut summary_count = false;
    for (k, v) in query_pairs(raw) {
        let text = || Some(v.clone());
        match k.as_str() {
            "_count" => {
                q.count = v
                    .parse::<usize>()
                    .map_err(|_| ApiError::bad_request(format!("_count '{v}' is not a number")))?
                    .min(COUNT_MAX)
            }
            "_summary" if v == "count" => summary_count = true,
            "_before" => {
                q.before = Some(v.parse().map_err(|_| {
                    ApiError::bad_request(format!("_before '{v}' is not an AuditEvent id"))
                })?)
            }
            "patient" => {
                q.patient = Some(if v.contains('/') {
                    v.clone()
                } else {
                    format!("Patient/{v}")
                })
            }
            "entity" => q.entity = text(),
            "agent" => q.agent = text(),
            "action" => q.action = text(),
            "subtype" => q.subtype = text(),
            "type" => {
                q.kind = Some(
                    match v.rsplit('|').next().unwrap_or("") {
                        "rest" => "rest",
                        "110106" | "sync" => "sync",
                        "110114" | "login" => "login",
                        other => {
                            return Err(ApiError::bad_request(format!(
                                "type '{other}': rest, 110106 (sync) or 110114 (login)"
                            )))
                        }
                    }
                    .to_owned(),
                )
            }
            "outcome" => {
                q.outcome = Some(match v.as_str() {
                    "0" => 0,
                    "4" => 4,
                    "8" => 8,
                    "12" => 12,
                    _ => return Err(ApiError::bad_request(format!("outcome '{v}': 0, 4, 8 or 12"))),
                })
            }
            "date" => {
                let (prefix, value) = match v.get(..2) {
                    Some(p @ ("ge" | "gt" | "le" | "lt" | "eq")) => (p, &v[2..]),
                    _ => ("eq", v.as_str()),
                };
                let (start, end) = fhirsync_core::instant::parse_range(value).ok_or_else(|| {
                    ApiError::bad_request(format!("date '{value}' is not a FHIR date or instant"))
                })?;
                let (start, end) = (start.max(0) as u64, end.max(0) as u64);
                match prefix {
                    "ge" => q.from_ms = Some(start),
                    "gt" => q.from_ms = Some(end),
                    "le" => q.until_ms = Some(end),
                    "lt" => q.until_ms = Some(start),
                    _ => {
                        q.from_ms = Some(start);
                        q.until_ms = Some(end);
                    }
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "AuditEvent has no search parameter '{other}' (date, patient, entity, agent, action, subtype, type, outcome, _count, _summary)"
                )))
            }
        }
    }
    Ok((q, summary_count))
}

/// `GET /fhir/AuditEvent`: newest first.
pub async fn search(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawQuery(raw): RawQuery,
) -> Result<Response, ApiError> {
    let (mut q, summary_count) = parse_query(raw.as_deref())?;
    // Every request answered so far is in the trail before it is searched.
    state.auditor.flush().await;
    if summary_count {
        q.count = 0;
    }
    let (page, total) = state.store.audit_events(q.clone()).await?;
    let base = base_url(&state, &headers);
    let mut links = vec![
        json!({"relation": "self", "url": format!("{base}/AuditEvent?{}", raw.clone().unwrap_or_default())}),
    ];
    if page.len() == q.count && q.count > 0 {
        if let Some(last) = page.last().and_then(|v| v["id"].as_str()) {
            let keep: Vec<String> = query_pairs(raw.as_deref())
                .into_iter()
                .filter(|(k, _)| k != "_before")
                .map(|(k, v)| {
                    form_urlencoded::Serializer::new(String::new())
                        .append_pair(&k, &v)
                        .finish()
                })
                .collect();
            links.push(json!({"relation": "next", "url": format!("{base}/AuditEvent?{}&_before={last}", keep.join("&"))}));
        }
    }
    let entries: Vec<Value> = page
        .into_iter()
        .map(|r| {
            json!({
                "fullUrl": format!("{base}/AuditEvent/{}", r["id"].as_str().unwrap_or("")),
                "resource": r,
                "search": {"mode": "match"},
            })
        })
        .collect();
    let mut b = json!({
        "resourceType": "Bundle",
        "type": "searchset",
        "total": total,
        "link": links,
    });
    if !entries.is_empty() {
        b["entry"] = Value::Array(entries);
    }
    Ok(fhir_json(b.to_string()))
}

/// `GET /fhir/AuditEvent/{id}`: a record of the node's trail (digits
/// only), else an AuditEvent a client or peer stored.
pub async fn read(
    State(state): State<AppState>,
    Path(id): Path<String>,
    raw: RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if !is_trail_id(&id) {
        return crate::crud::read(State(state), Path((TYPE.into(), id)), raw, headers).await;
    }
    let n: u64 = id
        .parse()
        .map_err(|_| ApiError::not_found(format!("AuditEvent/{id} is not known")))?;
    let (page, _) = state
        .store
        .audit_events(AuditQuery {
            before: Some(n + 1),
            count: 1,
            ..AuditQuery::default()
        })
        .await?;
    match page.into_iter().next() {
        Some(v) if v["id"] == Value::String(id.clone()) => Ok(fhir_json(v.to_string())),
        _ => Err(ApiError::not_found(format!("AuditEvent/{id} is not known"))),
    }
}

/// A write to a record of the node's trail: it is append-only and
/// written by the node itself.
pub async fn refuse() -> ApiError {
    ApiError::new(
        405,
        "not-supported",
        "AuditEvents with ids of digits only are this node's own audit trail: they cannot be changed or deleted",
    )
}

/// `POST /fhir/AuditEvent`: an AuditEvent from a client (an EHR's own
/// records, a copy from another server), stored as an ordinary resource.
pub async fn create(
    state: State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    crate::crud::create(state, Path(TYPE.into()), headers, body).await
}

/// `PUT /fhir/AuditEvent/{id}`: a client's AuditEvent; the trail's own
/// records are refused.
pub async fn update(
    state: State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if is_trail_id(&id) {
        return Err(refuse().await);
    }
    crate::crud::update(state, Path((TYPE.into(), id)), headers, body).await
}

/// `DELETE /fhir/AuditEvent/{id}`: a client's AuditEvent only.
pub async fn delete(
    state: State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    if is_trail_id(&id) {
        return Err(refuse().await);
    }
    crate::crud::delete(state, Path((TYPE.into(), id)), headers).await
}

/// `PUT /fhir/AuditEvent?query` (conditional): clients' AuditEvents only.
pub async fn conditional_update(
    state: State<AppState>,
    raw: RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    crate::crud::conditional_update(state, Path(TYPE.into()), raw, headers, body).await
}

/// `DELETE /fhir/AuditEvent?query` (conditional): clients' AuditEvents only.
pub async fn conditional_delete(
    state: State<AppState>,
    raw: RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    crate::crud::conditional_delete(state, Path(TYPE.into()), raw, headers).await
}
