//! Type- and system-level search, returning `searchset` Bundles whose
//! paging links carry a snapshot `seq`, so pages neither skip nor repeat.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use fhirsync_core::search::{SearchQuery, PARAM_CURSOR, PARAM_SNAPSHOT, PARAM_SNAPSHOT_TOTAL};
use fhirsync_store::{SearchPage, StoreError};
use serde_json::{json, Value};

use crate::error::outcome;
use crate::http::{base_url, check_accept, check_type, fhir_json, prefer, query_pairs};
use crate::render::{full_url, BundleBuilder};
use crate::{ApiError, AppState};

pub async fn type_search(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    run(&state, &headers, Some(rtype), query_pairs(q.as_deref())).await
}

/// `POST Type/_search` with a form body; URL and body parameters combine.
pub async fn type_search_post(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    let ct = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
        .unwrap_or("");
    if !ct.starts_with("application/x-www-form-urlencoded") {
        return Err(ApiError::new(
            415,
            "not-supported",
            "POST _search takes application/x-www-form-urlencoded",
        ));
    }
    let max = state.cfg.body_bytes_max;
    let bytes = axum::body::to_bytes(body, max).await.map_err(|_| {
        ApiError::new(
            413,
            "too-costly",
            format!("request body is larger than {max} bytes"),
        )
    })?;
    let mut pairs = query_pairs(q.as_deref());
    pairs.extend(query_pairs(Some(&String::from_utf8_lossy(&bytes))));
    run(&state, &headers, Some(rtype), pairs).await
}

pub async fn system_search(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    run(&state, &headers, None, query_pairs(q.as_deref())).await
}

async fn run(
    state: &AppState,
    headers: &HeaderMap,
    rtype: Option<String>,
    pairs: Vec<(String, String)>,
) -> Result<Response, ApiError> {
    check_accept(headers, &pairs)?;
    let q = SearchQuery::parse(rtype.as_deref(), &pairs).map_err(StoreError::from)?;
    let warnings = unsupported_check(headers, &q)?;
    let page = state.store.search(q.clone()).await?;
    let base = base_url(state, headers);
    Ok(fhir_json(searchset(&base, &q, &page, warnings.as_deref())))
}

/// Under `Prefer: handling=strict` unsupported parameters are an error;
/// otherwise they are ignored and reported.
pub fn unsupported_check(headers: &HeaderMap, q: &SearchQuery) -> Result<Option<String>, ApiError> {
    if q.unsupported.is_empty() {
        return Ok(None);
    }
    let msg = format!(
        "unsupported search parameters ignored: {}",
        q.unsupported.join(", ")
    );
    if prefer(headers).strict {
        return Err(ApiError::new(
            400,
            "not-supported",
            format!(
                "unsupported search parameters: {}",
                q.unsupported.join(", ")
            ),
        ));
    }
    Ok(Some(msg))
}

/// The `searchset` Bundle of one page.
pub fn searchset(base: &str, q: &SearchQuery, page: &SearchPage, warning: Option<&str>) -> String {
    let path = match &q.rtype {
        Some(t) => format!("{base}/{t}"),
        None => base.to_owned(),
    };
    let qs = q.to_query_string();
    let carried = page
        .total
        .map(|t| format!("&{PARAM_SNAPSHOT_TOTAL}={t}"))
        .unwrap_or_default();
    let mut self_url = format!("{path}?{qs}");
    if let Some(c) = q.cursor {
        self_url.push_str(&format!(
            "&{PARAM_SNAPSHOT}={}&{PARAM_CURSOR}={c}",
            page.snapshot
        ));
    }
    let mut links = vec![("self", self_url)];
    if let Some(c) = page.next_cursor {
        links.push((
            "next",
            format!(
                "{path}?{qs}&{PARAM_SNAPSHOT}={}&{PARAM_CURSOR}={c}{carried}",
                page.snapshot
            ),
        ));
    }
    let mut b = BundleBuilder::new("searchset", page.total, &links, Value::Null);
    for v in &page.items {
        b.entry(
            None,
            Some(&full_url(base, v)),
            v.body.as_deref(),
            json!({"search": {"mode": "match"}}),
        );
    }
    if let Some(w) = warning {
        let oo = outcome("warning", "not-supported", w).to_string();
        b.entry(
            None,
            None,
            Some(&oo),
            json!({"search": {"mode": "outcome"}}),
        );
    }
    b.finish()
}
