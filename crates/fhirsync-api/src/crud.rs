//! Instance-level interactions: create, read, vread, update, delete and
//! their conditional forms.

use axum::body::Body;
use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use fhirsync_core::resource::{check_resource, is_valid_id, parse_client_resource};
use fhirsync_core::search::SearchQuery;
use fhirsync_core::validate::Issue;
use fhirsync_core::ValidationError;
use fhirsync_store::{Prepared, StoreError, WriteOutcome, WriteRequest};

use crate::http::{
    base_url, check_accept, check_type, if_match, prefer, query_pairs, read_body, with_status,
    Return,
};
use crate::render::{resource_response, set_version_headers};
use crate::{ApiError, AppState};

/// Parses and checks a body against the URL type; with it, the problems
/// lenient validation lets through.
async fn prepared_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    rtype: &str,
) -> Result<(Prepared, Vec<Issue>), ApiError> {
    let bytes = read_body(state, headers, body).await?;
    let res = parse_client_resource(&bytes).map_err(StoreError::from)?;
    let t = check_resource(&res, Some(rtype)).map_err(StoreError::from)?;
    let warnings = crate::validation::check(state, &res)?;
    Ok((Prepared::new(t, res), warnings))
}

/// [`write_response`] with lenient validation's warnings: in a header, and
/// as the OperationOutcome when the client asked for one.
fn written(
    state: &AppState,
    headers: &HeaderMap,
    out: WriteOutcome,
    warnings: &[Issue],
) -> Response {
    let mut r = write_response(state, headers, out);
    if !warnings.is_empty() && prefer(headers).ret == Return::OperationOutcome {
        let (mut parts, _) = r.into_parts();
        parts.headers.remove(axum::http::header::CONTENT_LENGTH);
        let body = crate::validation::outcome(warnings, "warning").to_string();
        r = Response::from_parts(parts, Body::from(body));
    }
    crate::validation::warn(&mut r, warnings);
    r
}

/// A condition from `If-None-Exist` or a conditional URL.
fn condition(rtype: &str, qs: &str) -> Result<SearchQuery, ApiError> {
    let qs = qs.trim_start_matches('?');
    let qs = qs.strip_prefix(&format!("{rtype}?")).unwrap_or(qs);
    SearchQuery::parse_query_string(Some(rtype), qs)
        .map_err(|e| ApiError::from(StoreError::from(e)))
}

fn write_response(state: &AppState, headers: &HeaderMap, out: WriteOutcome) -> Response {
    let base = base_url(state, headers);
    let ret = prefer(headers).ret;
    match out {
        WriteOutcome::Written { version, created } => {
            let (status, info) = if created {
                (201, "created")
            } else {
                (200, "updated")
            };
            resource_response(&version, status, &base, true, ret, info)
        }
        WriteOutcome::Unchanged { version } => resource_response(
            &version,
            200,
            &base,
            true,
            ret,
            "unchanged: same content as the current version",
        ),
        WriteOutcome::Existing { version } => resource_response(
            &version,
            200,
            &base,
            true,
            ret,
            "not created: If-None-Exist matched this resource",
        ),
        WriteOutcome::Deleted { version } => {
            let mut r = with_status(Response::new(Body::empty()), 204);
            if let Some(v) = version {
                set_version_headers(&mut r, &v);
            }
            r
        }
        WriteOutcome::Bundle(_) | WriteOutcome::Applied(_) | WriteOutcome::Done => {
            ApiError::new(500, "exception", "unexpected write outcome").into_response()
        }
    }
}

pub async fn create(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let (res, warnings) = prepared_body(&state, &headers, body, &rtype).await?;
    let if_none_exist = match headers.get("if-none-exist") {
        Some(v) => Some(condition(&rtype, v.to_str().unwrap_or(""))?),
        None => None,
    };
    let out = state
        .store
        .write(WriteRequest::Create { res, if_none_exist })
        .await?;
    Ok(written(&state, &headers, out, &warnings))
}

pub async fn update(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    if !is_valid_id(&id) {
        return Err(StoreError::from(ValidationError::BadId(id)).into());
    }
    let (res, warnings) = prepared_body(&state, &headers, body, &rtype).await?;
    match res.body_id() {
        None => return Err(StoreError::from(ValidationError::MissingId).into()),
        Some(b) if b != id => {
            let e = ValidationError::IdMismatch {
                url: id,
                body: b.to_owned(),
            };
            return Err(StoreError::from(e).into());
        }
        _ => {}
    }
    let if_match = if_match(&headers)?;
    let out = state
        .store
        .write(WriteRequest::Update { id, res, if_match })
        .await?;
    Ok(written(&state, &headers, out, &warnings))
}

pub async fn conditional_update(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let Some(q) = q.filter(|q| !q.is_empty()) else {
        return Err(ApiError::new(
            405,
            "not-supported",
            "PUT needs Type/id or a search condition (Type?param=value)",
        ));
    };
    let query = condition(&rtype, &q)?;
    let (res, warnings) = prepared_body(&state, &headers, body, &rtype).await?;
    let if_match = if_match(&headers)?;
    let out = state
        .store
        .write(WriteRequest::ConditionalUpdate {
            query,
            res,
            if_match,
        })
        .await?;
    Ok(written(&state, &headers, out, &warnings))
}

pub async fn conditional_delete(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    let Some(q) = q.filter(|q| !q.is_empty()) else {
        return Err(ApiError::new(
            405,
            "not-supported",
            "DELETE needs Type/id or a search condition",
        ));
    };
    let query = condition(&rtype, &q)?;
    let out = state
        .store
        .write(WriteRequest::ConditionalDelete { query })
        .await?;
    Ok(write_response(&state, &headers, out))
}

pub async fn delete(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    if !is_valid_id(&id) {
        return Err(ApiError::not_found(format!(
            "{rtype}/{id} is not a valid id"
        )));
    }
    let if_match = if_match(&headers)?;
    let out = state
        .store
        .write(WriteRequest::Delete {
            rtype,
            id,
            if_match,
        })
        .await?;
    Ok(write_response(&state, &headers, out))
}

pub async fn read(
    State(state): State<AppState>,
    Path((rtype, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    check_accept(&headers, &query_pairs(q.as_deref()))?;
    if !is_valid_id(&id) {
        return Err(ApiError::not_found(format!("{rtype}/{id} is not known")));
    }
    match state.store.read(&rtype, &id).await? {
        None => Err(ApiError::not_found(format!("{rtype}/{id} is not known"))),
        Some(v) if v.deleted => {
            let mut r = ApiError::new(410, "deleted", format!("{rtype}/{id} has been deleted"))
                .into_response();
            set_version_headers(&mut r, &v);
            Ok(r)
        }
        Some(v) => Ok(not_modified_or(&headers, &v)),
    }
}

pub async fn vread(
    State(state): State<AppState>,
    Path((rtype, id, vid)): Path<(String, String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    check_accept(&headers, &query_pairs(q.as_deref()))?;
    let missing = || ApiError::not_found(format!("{rtype}/{id}/_history/{vid} is not known"));
    let n: u64 = vid.parse().map_err(|_| missing())?;
    match state.store.vread(&rtype, &id, n).await? {
        None => Err(missing()),
        Some(v) if v.deleted => {
            let mut r = ApiError::new(
                410,
                "deleted",
                format!("{rtype}/{id}/_history/{vid} is a deletion"),
            )
            .into_response();
            set_version_headers(&mut r, &v);
            Ok(r)
        }
        Some(v) => Ok(not_modified_or(&headers, &v)),
    }
}

/// The resource, or 304 when `If-None-Match` names its current version.
fn not_modified_or(headers: &HeaderMap, v: &fhirsync_store::StoredVersion) -> Response {
    let etag = crate::render::etag(v);
    let unchanged = headers
        .get(axum::http::header::IF_NONE_MATCH)
        .and_then(|h| h.to_str().ok())
        .is_some_and(|h| h.split(',').any(|t| t.trim() == etag || t.trim() == "*"));
    if unchanged {
        let mut r = with_status(Response::new(Body::empty()), 304);
        set_version_headers(&mut r, v);
        return r;
    }
    resource_response(v, 200, "", false, crate::http::Return::Representation, "")
}
