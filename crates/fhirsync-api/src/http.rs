//! HTTP details shared by handlers: content negotiation, `Prefer`,
//! `If-Match`, body limits, base URL.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use fhirsync_core::resource::is_resource_type;

use crate::{ApiError, AppState};

pub const FHIR_JSON: &str = "application/fhir+json; charset=utf-8";

/// A 200 response with a FHIR JSON body.
pub fn fhir_json(body: impl Into<Body>) -> Response {
    let mut r = Response::new(body.into());
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(FHIR_JSON));
    r
}

pub fn with_status(mut r: Response, status: u16) -> Response {
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    r
}

/// The server's FHIR base URL as clients see it.
pub fn base_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(b) = &state.cfg.base_url {
        return b.trim_end_matches('/').to_owned();
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| !h.is_empty() && h.bytes().all(|b| b.is_ascii_graphic()))
        .unwrap_or("localhost");
    let scheme = if state.cfg.https { "https" } else { "http" };
    format!("{scheme}://{host}/fhir")
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Return {
    Minimal,
    Representation,
    OperationOutcome,
}

#[derive(Debug, Clone, Copy)]
pub struct Prefer {
    pub ret: Return,
    /// `handling=strict`: unknown search parameters are errors.
    pub strict: bool,
    /// `respond-async`: the client takes a status URL (bulk data).
    pub respond_async: bool,
}

pub fn prefer(headers: &HeaderMap) -> Prefer {
    let mut p = Prefer {
        ret: Return::Representation,
        strict: false,
        respond_async: false,
    };
    for v in headers.get_all("prefer") {
        let Ok(v) = v.to_str() else { continue };
        for part in v.split([',', ';']) {
            match part.trim().replace('"', "").as_str() {
                "return=minimal" => p.ret = Return::Minimal,
                "return=representation" => p.ret = Return::Representation,
                "return=OperationOutcome" => p.ret = Return::OperationOutcome,
                "handling=strict" => p.strict = true,
                "handling=lenient" => p.strict = false,
                "respond-async" => p.respond_async = true,
                _ => {}
            }
        }
    }
    p
}

/// `If-Match: W/"3"`.
pub fn if_match(headers: &HeaderMap) -> Result<Option<u64>, ApiError> {
    match headers.get(header::IF_MATCH) {
        None => Ok(None),
        Some(v) => {
            let s = v.to_str().unwrap_or("");
            fhirsync_store::bundle::parse_etag(s)
                .map(Some)
                .ok_or_else(|| {
                    ApiError::bad_request(format!(
                        "If-Match '{s}' is not a version ETag like W/\"3\""
                    ))
                })
        }
    }
}

/// Refuses requests that only accept a format other than JSON.
pub fn check_accept(headers: &HeaderMap, query: &[(String, String)]) -> Result<(), ApiError> {
    if let Some((_, f)) = query.iter().find(|(k, _)| k == "_format") {
        if !f.contains("json") {
            return Err(ApiError::new(
                406,
                "not-supported",
                format!("_format={f}: only JSON is served"),
            ));
        }
        return Ok(());
    }
    if let Some(a) = headers.get(header::ACCEPT).and_then(|a| a.to_str().ok()) {
        let ok = a.split(',').any(|t| {
            let t = t.split(';').next().unwrap_or("").trim();
            t.is_empty() || t.contains("json") || t == "*/*" || t == "application/*"
        });
        if !ok {
            return Err(ApiError::new(
                406,
                "not-supported",
                format!("Accept '{a}': only JSON is served"),
            ));
        }
    }
    Ok(())
}

/// Reads a request body within the configured limit; checks it is JSON.
pub async fn read_body(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
) -> Result<Bytes, ApiError> {
    if let Some(ct) = headers
        .get(header::CONTENT_TYPE)
        .and_then(|c| c.to_str().ok())
    {
        let t = ct.split(';').next().unwrap_or("").trim();
        if !t.contains("json") {
            return Err(ApiError::new(
                415,
                "not-supported",
                format!("Content-Type '{ct}': send application/fhir+json"),
            ));
        }
    }
    let max = state.cfg.body_bytes_max;
    let too_large = || {
        ApiError::new(
            413,
            "too-costly",
            format!("request body is larger than {max} bytes"),
        )
    };
    if let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok())
    {
        if len > max {
            return Err(too_large());
        }
    }
    axum::body::to_bytes(body, max).await.map_err(|e| {
        let mut src: Option<&(dyn std::error::Error + 'static)> = Some(&e);
        while let Some(s) = src {
            if s.to_string().contains("length limit") {
                return too_large();
            }
            src = s.source();
        }
        ApiError::bad_request(format!("cannot read request body: {e}"))
    })
}

/// Decoded query pairs, in order.
pub fn query_pairs(raw: Option<&str>) -> Vec<(String, String)> {
    raw.map(fhirsync_core::search::query_pairs)
        .unwrap_or_default()
}

/// 404 for a path naming no resource type.
pub fn check_type(rtype: &str) -> Result<(), ApiError> {
    if is_resource_type(rtype) {
        Ok(())
    } else {
        Err(ApiError::not_found(format!(
            "unknown resource type '{rtype}'"
        )))
    }
}

pub fn status_text(status: u16) -> String {
    let reason = StatusCode::from_u16(status)
        .ok()
        .and_then(|s| s.canonical_reason())
        .unwrap_or("");
    format!("{status} {reason}").trim_end().to_owned()
}
