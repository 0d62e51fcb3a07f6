//! `POST /fhir` with a `transaction` or `batch` Bundle.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use fhirsync_core::resource::{check_resource, parse_client_resource};
use fhirsync_core::validate::Issue;
use fhirsync_store::{BundleKind, EntryResult, StoreError, WriteOutcome, WriteRequest};
use serde_json::{json, Value};

use crate::error::{issue_code, outcome};
use crate::http::{base_url, fhir_json, prefer, read_body, status_text, Return};
use crate::render::{etag, full_url, BundleBuilder};
use crate::search::searchset;
use crate::{ApiError, AppState};

pub async fn process(
    State(state): State<AppState>,
    principal: Option<axum::Extension<crate::auth::Principal>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let bytes = read_body(&state, &headers, body).await?;
    let mut res = parse_client_resource(&bytes).map_err(StoreError::from)?;
    check_resource(&res, Some("Bundle")).map_err(StoreError::from)?;
    let mut refused = refuse_invalid_batch_entries(&state, &mut res);
    let warnings = crate::validation::check(&state, &res)?;
    if let Some(axum::Extension(p)) = principal {
        crate::auth::check_bundle(&p, &res)?;
    }
    let planned = tokio::task::spawn_blocking(move || fhirsync_store::bundle::plan(res))
        .await
        .map_err(|e| StoreError::Backend(format!("planning the Bundle failed: {e}")))??;
    let out = state.store.write(WriteRequest::Bundle(planned)).await?;
    let WriteOutcome::Bundle(out) = out else {
        return Err(ApiError::new(
            500,
            "exception",
            "unexpected outcome for a bundle",
        ));
    };
    let base = base_url(&state, &headers);
    let with_resource =
        prefer(&headers).ret == Return::Representation && headers.get("prefer").is_some();
    let btype = match out.kind {
        BundleKind::Transaction => "transaction-response",
        BundleKind::Batch => "batch-response",
    };
    let mut b = BundleBuilder::new(btype, None, &[], Value::Null);
    let mut results = out.entries.into_iter();
    for i in 0.. {
        if refused.first().is_some_and(|(at, _)| *at == i) {
            let (_, issues) = refused.remove(0);
            let response = json!({
                "status": status_text(422),
                "outcome": crate::validation::outcome(&issues, "error"),
            });
            b.entry(None, None, None, json!({ "response": response }));
            continue;
        }
        let Some(e) = results.next() else { break };
        match e {
            EntryResult::Write { status, version } => {
                let mut response = json!({"status": status_text(status)});
                if let Some(v) = &version {
                    if status != 204 {
                        response["location"] =
                            json!(format!("{}/{}/_history/{}", v.rtype, v.id, v.vid));
                    }
                    response["etag"] = json!(etag(v));
                    response["lastModified"] =
                        json!(fhirsync_core::instant::format_instant(v.last_updated_ms));
                }
                let fu = version
                    .as_ref()
                    .filter(|v| !v.deleted)
                    .map(|v| full_url(&base, v));
                let body = version
                    .as_ref()
                    .filter(|_| with_resource)
                    .and_then(|v| v.body.as_deref());
                b.entry(None, fu.as_deref(), body, json!({"response": response}));
            }
            EntryResult::Read(v) => {
                let response = json!({
                    "status": status_text(200),
                    "etag": etag(&v),
                    "lastModified": fhirsync_core::instant::format_instant(v.last_updated_ms),
                });
                b.entry(
                    None,
                    Some(&full_url(&base, &v)),
                    v.body.as_deref(),
                    json!({"response": response}),
                );
            }
            EntryResult::Search(s) => {
                let (q, page) = *s;
                let path = match &q.rtype {
                    Some(t) => format!("{base}/{t}"),
                    None => base.clone(),
                };
                let set = searchset(&base, &path, &q, &page, None);
                b.entry(
                    None,
                    None,
                    Some(&set),
                    json!({"response": {"status": status_text(200)}}),
                );
            }
            EntryResult::Failed(err) => {
                let status = err.status();
                let msg = if status >= 500 {
                    tracing::error!(error = %err, "batch entry failed in storage");
                    "internal error; the cause is in the server log".to_string()
                } else {
                    err.to_string()
                };
                b.entry(
                    None,
                    None,
                    None,
                    json!({"response": {"status": status_text(status), "outcome": outcome("error", issue_code(status), &msg)}}),
                );
            }
        }
    }
    let mut r = fhir_json(b.finish());
    crate::validation::warn(&mut r, &warnings);
    Ok(r)
}

/// In strict mode, a `batch` entry whose resource fails validation is
/// taken out before the store sees the Bundle and answered on its own
/// with a 422 (the others go on, as a batch's entries do). Returns the
/// refused entries' positions and problems, in order.
fn refuse_invalid_batch_entries(
    state: &AppState,
    bundle: &mut serde_json::Map<String, Value>,
) -> Vec<(usize, Vec<Issue>)> {
    let mode = state.cfg.validation;
    if !mode.refuses() || bundle.get("type").and_then(Value::as_str) != Some("batch") {
        return Vec::new();
    }
    let Some(Value::Array(entries)) = bundle.get_mut("entry") else {
        return Vec::new();
    };
    let mut refused = Vec::new();
    let mut kept = Vec::with_capacity(entries.len());
    for (i, e) in entries.drain(..).enumerate() {
        let issues = e
            .get("resource")
            .map(|r| mode.issues(r))
            .unwrap_or_default();
        if issues.is_empty() {
            kept.push(e);
        } else {
            refused.push((i, issues));
        }
    }
    if kept.is_empty() {
        bundle.remove("entry");
    } else {
        *entries = kept;
    }
    refused
}
