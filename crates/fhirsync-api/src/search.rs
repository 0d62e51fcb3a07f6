//! Type- and system-level search, returning `searchset` Bundles whose
//! paging links carry a snapshot `seq`, so pages neither skip nor repeat.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use fhirsync_core::resource::is_valid_id;
use fhirsync_core::search::{
    Clause, SearchQuery, Summary, PARAM_CURSOR, PARAM_OFFSET, PARAM_SNAPSHOT, PARAM_SNAPSHOT_TOTAL,
};
use fhirsync_core::spec;
use fhirsync_store::{IncludedCut, SearchPage, StoreError};
use serde_json::{json, Value};

use crate::error::outcome;
use crate::http::{base_url, check_accept, check_type, fhir_json, prefer, query_pairs};
use crate::render::{full_url, BundleBuilder};
use crate::{ApiError, AppState};
use fhirsync_store::sql::search::{INCLUDED_MAX, ITERATE_ROUNDS_MAX};

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
    let base = base_url(state, headers);
    let q =
        SearchQuery::parse_at(rtype.as_deref(), &pairs, Some(&base)).map_err(StoreError::from)?;
    let path = match &q.rtype {
        Some(t) => format!("{base}/{t}"),
        None => base.clone(),
    };
    respond(state, headers, q, &base, &path).await
}

/// Runs a parsed search and renders its page; `path` is where its links
/// point.
async fn respond(
    state: &AppState,
    headers: &HeaderMap,
    q: SearchQuery,
    base: &str,
    path: &str,
) -> Result<Response, ApiError> {
    let warnings = unsupported_check(headers, &q)?;
    let page = state.store.search(q.clone()).await?;
    Ok(fhir_json(searchset(
        base,
        path,
        &q,
        &page,
        warnings.as_deref(),
    )))
}

/// `GET [Compartment]/[id]/[type]` and `[Compartment]/[id]/*`: a search
/// in the resources of a compartment (R4 CompartmentDefinitions);
/// `Patient/[id]/$everything` also.
pub async fn compartment(
    State(state): State<AppState>,
    Path((ctype, id, member)): Path<(String, String, String)>,
    RawQuery(raw): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&ctype)?;
    if spec::compartment_members(&ctype).next().is_none() {
        return Err(ApiError::new(
            404,
            "not-found",
            format!("{ctype} is not a compartment (Patient, Encounter, RelatedPerson, Practitioner, Device)"),
        ));
    }
    if !is_valid_id(&id) {
        return Err(ApiError::new(
            400,
            "value",
            format!("'{id}' is not a valid id"),
        ));
    }
    let mut pairs = query_pairs(raw.as_deref());
    check_accept(&headers, &pairs)?;
    let base = base_url(&state, &headers);
    let everything = member == "$everything";
    if everything && ctype != "Patient" {
        return Err(ApiError::new(
            404,
            "not-supported",
            "$everything is served on Patient",
        ));
    }
    let members: Vec<String> = if everything || member == "*" {
        let types = take_types(&mut pairs, everything)?;
        spec::compartment_members(&ctype)
            .filter(|t| types.as_ref().is_none_or(|x| x.iter().any(|y| y == t)))
            .map(str::to_owned)
            .collect()
    } else {
        check_type(&member)?;
        if spec::compartment_params(&ctype, &member).is_none() {
            return Err(ApiError::new(
                400,
                "not-supported",
                format!("{member} is not in the {ctype} compartment"),
            ));
        }
        vec![member.clone()]
    };
    if everything {
        // `_since` is `_lastUpdated=ge…`.
        for (k, _) in pairs.iter_mut().filter(|(k, _)| k == "_since") {
            *k = "_lastUpdated".into();
        }
        for (k, v) in pairs.iter_mut().filter(|(k, _)| k == "_lastUpdated") {
            if !v.starts_with("ge") && !v.starts_with("gt") && k == "_lastUpdated" {
                *v = format!("ge{v}");
            }
        }
    }
    let single = (members.len() == 1 && !everything).then(|| members[0].clone());
    let mut q =
        SearchQuery::parse_at(single.as_deref(), &pairs, Some(&base)).map_err(StoreError::from)?;
    q.clauses.push(Clause::Compartment {
        target: (ctype.clone(), vec![id.clone()]),
        members: members
            .iter()
            .map(|t| {
                let ps = spec::compartment_params(&ctype, t).unwrap_or(&[]);
                (t.clone(), ps.iter().map(|p| (*p).to_owned()).collect())
            })
            .collect(),
        include_self: everything,
    });
    let path = format!("{base}/{ctype}/{id}/{member}");
    respond(&state, &headers, q, &base, &path).await
}

/// Takes `_type` (comma-separated types) out of `pairs`.
fn take_types(
    pairs: &mut Vec<(String, String)>,
    allowed: bool,
) -> Result<Option<Vec<String>>, ApiError> {
    let mut out: Option<Vec<String>> = None;
    let mut rest = Vec::new();
    for (k, v) in pairs.drain(..) {
        if k == "_type" && allowed {
            for t in v.split(',') {
                check_type(t)?;
                out.get_or_insert_with(Vec::new).push(t.to_owned());
            }
        } else {
            rest.push((k, v));
        }
    }
    *pairs = rest;
    Ok(out)
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

/// The `searchset` Bundle of one page; its links point at `path`.
pub fn searchset(
    base: &str,
    path: &str,
    q: &SearchQuery,
    page: &SearchPage,
    warning: Option<&str>,
) -> String {
    let qs = q.to_query_string();
    let carried = page
        .total
        .map(|t| format!("&{PARAM_SNAPSHOT_TOTAL}={t}"))
        .unwrap_or_default();
    let position = |at: u64| {
        let name = if q.by_seq() {
            PARAM_CURSOR
        } else {
            PARAM_OFFSET
        };
        format!("&{PARAM_SNAPSHOT}={}&{name}={at}", page.snapshot)
    };
    let mut self_url = format!("{path}?{qs}");
    if let Some(c) = q.cursor.or(q.offset) {
        self_url.push_str(&position(c));
    }
    let mut links = vec![("self", self_url)];
    if let Some(c) = page.next_cursor {
        links.push(("next", format!("{path}?{qs}{}{carried}", position(c))));
    }
    let mut b = BundleBuilder::new("searchset", page.total, &links, Value::Null);
    for (items, mode) in [(&page.items, "match"), (&page.included, "include")] {
        for v in items {
            let body = v.body.as_deref().map(|s| shape(s, q));
            b.entry(
                None,
                Some(&full_url(base, v)),
                body.as_deref(),
                json!({"search": {"mode": mode}}),
            );
        }
    }
    let cut = page.included_cut.map(|cut| match cut {
        IncludedCut::Count => format!(
            "_include and _revinclude added only the first {INCLUDED_MAX} resources (INCLUDED_MAX) to this page; ask for a smaller _count to get the rest"
        ),
        IncludedCut::Rounds => format!(
            ":iterate followed what was included {ITERATE_ROUNDS_MAX} levels deep (ITERATE_ROUNDS_MAX) and left the rest out"
        ),
    });
    for (code, w) in [("not-supported", warning), ("incomplete", cut.as_deref())] {
        if let Some(w) = w {
            let oo = outcome("warning", code, w).to_string();
            b.entry(
                None,
                None,
                Some(&oo),
                json!({"search": {"mode": "outcome"}}),
            );
        }
    }
    b.finish()
}

/// A resource as `_summary` and `_elements` ask for it: the kept elements,
/// and the `SUBSETTED` tag when something was left out.
pub fn shape<'a>(body: &'a str, q: &SearchQuery) -> std::borrow::Cow<'a, str> {
    use std::borrow::Cow;
    if matches!(q.summary, Summary::False | Summary::Count) && q.elements.is_empty() {
        return Cow::Borrowed(body);
    }
    let Ok(Value::Object(mut m)) = serde_json::from_str::<Value>(body) else {
        return Cow::Borrowed(body);
    };
    let rtype = m
        .get("resourceType")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let summary = spec::summary_elements(&rtype);
    let named = |list: &[&str], k: &str| {
        list.iter().any(|e| {
            *e == k
                || e.strip_suffix("[x]").is_some_and(|stem| {
                    k.strip_prefix(stem)
                        .is_some_and(|rest| rest.starts_with(|c: char| c.is_ascii_uppercase()))
                })
        })
    };
    let elements: Vec<&str> = q.elements.iter().map(String::as_str).collect();
    let keep = |k: &str| -> bool {
        if matches!(k, "resourceType" | "id" | "meta") {
            return true;
        }
        if !elements.is_empty() {
            return named(&elements, k);
        }
        match q.summary {
            Summary::True => named(summary, k),
            Summary::Text => k == "text",
            Summary::Data => k != "text",
            Summary::False | Summary::Count => true,
        }
    };
    let before = m.len();
    m.retain(|k, _| keep(k));
    if m.len() == before {
        return Cow::Borrowed(body);
    }
    if let Some(meta) = m.entry("meta").or_insert_with(|| json!({})).as_object_mut() {
        if let Value::Array(a) = meta.entry("tag").or_insert_with(|| json!([])) {
            a.push(json!({
                "system": "http://terminology.hl7.org/CodeSystem/v3-ObservationValue",
                "code": "SUBSETTED"
            }));
        }
    }
    Cow::Owned(Value::Object(m).to_string())
}
