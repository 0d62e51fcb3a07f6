//! `_history` at instance, type and system level. Pages go backwards by
//! `seq`, so versions sharing one `lastUpdated` are neither skipped nor
//! repeated, and writes made while a client pages do not shift its pages.

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use fhirsync_core::instant::parse_range;
use fhirsync_core::search::{COUNT_DEFAULT, COUNT_MAX};
use fhirsync_store::{HistoryQuery, HistoryScope};
use serde_json::Value;

use crate::http::{base_url, check_accept, check_type, fhir_json, prefer, query_pairs};
use crate::render::{full_url, history_rest, BundleBuilder};
use crate::{ApiError, AppState};

/// Internal paging parameter: return versions with `seq` below this.
const PARAM_BEFORE: &str = "_before";

pub async fn system(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    run(&state, &headers, HistoryScope::System, q).await
}

pub async fn type_level(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    run(&state, &headers, HistoryScope::Type(rtype), q).await
}

pub async fn instance(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    if state.store.read(&rtype, &id).await?.is_none() {
        return Err(ApiError::not_found(format!("{rtype}/{id} is not known")));
    }
    run(&state, &headers, HistoryScope::Instance(rtype, id), q).await
}

async fn run(
    state: &AppState,
    headers: &HeaderMap,
    scope: HistoryScope,
    raw: Option<String>,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(raw.as_deref());
    check_accept(headers, &pairs)?;
    let mut q = HistoryQuery {
        scope: scope.clone(),
        since_ms: None,
        before: None,
        count: COUNT_DEFAULT,
    };
    let mut since_raw = None;
    let mut unsupported = Vec::new();
    for (k, v) in &pairs {
        match k.as_str() {
            "_since" => {
                let (start, _) = parse_range(&v.replace(' ', "+")).ok_or_else(|| {
                    ApiError::bad_request(format!("_since '{v}' is not a FHIR instant"))
                })?;
                q.since_ms = Some(start);
                since_raw = Some(v.clone());
            }
            "_count" => {
                let n: usize = v.parse().map_err(|_| {
                    ApiError::bad_request(format!("_count '{v}' is not a non-negative integer"))
                })?;
                q.count = n.clamp(1, COUNT_MAX);
            }
            PARAM_BEFORE => {
                q.before = Some(v.parse().map_err(|_| {
                    ApiError::bad_request(format!("{PARAM_BEFORE} '{v}' is not a paging position"))
                })?)
            }
            "_format" | "_pretty" => {}
            other => unsupported.push(other.to_owned()),
        }
    }
    if !unsupported.is_empty() {
        if prefer(headers).strict {
            return Err(ApiError::new(
                400,
                "not-supported",
                format!("unsupported history parameters: {}", unsupported.join(", ")),
            ));
        }
        tracing::debug!(?unsupported, "history parameters ignored");
    }
    let page_size = q.count;
    q.count += 1;
    let mut versions = state.store.history(q.clone()).await?;
    let more = versions.len() > page_size;
    versions.truncate(page_size);

    let base = base_url(state, headers);
    let path = match &scope {
        HistoryScope::System => format!("{base}/_history"),
        HistoryScope::Type(t) => format!("{base}/{t}/_history"),
        HistoryScope::Instance(t, id) => format!("{base}/{t}/{id}/_history"),
    };
    let mut qs = form_urlencoded::Serializer::new(String::new());
    if let Some(s) = &since_raw {
        qs.append_pair("_since", s);
    }
    qs.append_pair("_count", &page_size.to_string());
    let qs = qs.finish();
    let mut self_url = format!("{path}?{qs}");
    if let Some(b) = q.before {
        self_url.push_str(&format!("&{PARAM_BEFORE}={b}"));
    }
    let mut links = vec![("self", self_url)];
    if more {
        if let Some(last) = versions.last() {
            links.push(("next", format!("{path}?{qs}&{PARAM_BEFORE}={}", last.seq)));
        }
    }
    let mut b = BundleBuilder::new("history", None, &links, Value::Null);
    for v in &versions {
        b.entry(
            None,
            Some(&full_url(&base, v)),
            v.body.as_deref(),
            history_rest(v),
        );
    }
    Ok(fhir_json(b.finish()))
}
