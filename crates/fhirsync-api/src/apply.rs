//! `POST /fhir/$apply`: a registered child sends a batch of its change
//! records (the same entries `$changes` serves). They are applied in order
//! in one transaction; applying the same batch again changes nothing, so a
//! child may resend whenever it did not see the answer. Each version is
//! validated as the node's `[validation] mode` says; a refused one stops
//! the batch there with a 422, which the child's `on_error` takes. A batch
//! that names its push stream waits for the stream's batch before it
//! ([`crate::push_order`]), so a child may send batches back to back.

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use fhirsync_core::replicate::Policy;
use fhirsync_core::validate::Mode;
use fhirsync_store::{BundleShell, RemoteVersion};
use serde_json::{json, Value};

use crate::http::{fhir_json, read_body};
use crate::peers::Access;
use crate::push_order::{store_push, Batch, BATCH_EXTENSION, ORDER_PARAMETER, STREAM_EXTENSION};
use crate::{ApiError, AppState};

/// Extension of an `$apply` Bundle naming the edge's conflict policy
/// (`valueCode`).
pub const POLICY_EXTENSION: &str = "conflict-policy";

/// Most entries one `$apply` call takes.
pub const APPLY_ENTRIES_MAX: usize = 5_000;

pub async fn apply(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let child = state.children.authenticate(&headers, Access::Push)?.clone();
    let bytes = read_body(&state, &headers, body).await?;
    let validation = state.cfg.validation;
    let parsed = tokio::task::spawn_blocking(move || parse(&bytes, &child.push_types, validation))
        .await
        .map_err(|e| ApiError::new(500, "exception", format!("parser failed: {e}")))??;
    let Parsed {
        policy,
        versions,
        refused,
        stream,
    } = parsed;
    let received = versions.len() + usize::from(refused.is_some());
    let rep = match stream {
        Some((id, n)) => {
            let batch = Batch {
                policy,
                versions,
                refused: refused.clone(),
            };
            state
                .children
                .push_order
                .apply(&state.store, &child.node_id, &id, n, batch)
                .await?
        }
        None => store_push(&state.store, &child.node_id, policy, versions).await?,
    };
    let mut failure = rep
        .failed()
        .map(|(i, status, why)| (i, status, why.to_owned()));
    if failure.is_none() {
        failure = refused.map(|(status, why)| (rep.results.len(), status, why));
    }
    let applied = failure.as_ref().map_or(rep.results.len(), |f| f.0);
    let mut params = vec![
        json!({"name": "node-id", "valueString": state.store.node_id()}),
        json!({"name": "received", "valueInteger": received}),
        json!({"name": "applied", "valueInteger": applied}),
        json!({"name": "stored", "valueInteger": rep.stored}),
        json!({"name": "skipped", "valueInteger": rep.skipped}),
        json!({"name": "conflicts", "valueInteger": rep.conflicts}),
        json!({"name": "last-seq", "valueDecimal": state.store.last_seq()}),
        json!({"name": ORDER_PARAMETER, "valueBoolean": true}),
    ];
    if let Some((i, status, why)) = failure {
        params.push(json!({"name": "failed-index", "valueInteger": i}));
        params.push(json!({"name": "failed-status", "valueInteger": status}));
        params.push(json!({"name": "failed-reason", "valueString": why}));
    }
    Ok(fhir_json(
        json!({"resourceType": "Parameters", "parameter": params}).to_string(),
    ))
}

/// A read `$apply` request.
struct Parsed {
    policy: Policy,
    /// The versions up to the first entry that cannot be applied.
    versions: Vec<RemoteVersion>,
    /// That entry's status and reason.
    refused: Option<(u16, String)>,
    /// The push stream and the batch's number in it, when the child named them.
    stream: Option<(String, u64)>,
}

/// The batch's policy, stream and versions, up to the first entry that
/// cannot be applied (its status and reason come back as the refusal).
fn parse(bytes: &[u8], push_types: &[String], validation: Mode) -> Result<Parsed, ApiError> {
    let b: BundleShell = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("body is not a JSON Bundle: {e}")))?;
    if !b.is_bundle() {
        return Err(ApiError::bad_request(
            "$apply takes a Bundle of change records",
        ));
    }
    let policy = match b.extension(POLICY_EXTENSION) {
        Some(p) => p
            .get("valueCode")
            .and_then(Value::as_str)
            .ok_or_else(|| ApiError::bad_request("the conflict-policy extension has no valueCode"))?
            .parse::<Policy>()
            .map_err(ApiError::bad_request)?,
        None => Policy::Manual,
    };
    let stream =
        match (b.extension(STREAM_EXTENSION), b.extension(BATCH_EXTENSION)) {
            (None, None) => None,
            (Some(s), Some(n)) => match (
                s.get("valueString").and_then(Value::as_str),
                n.get("valueInteger").and_then(Value::as_u64),
            ) {
                (Some(s), Some(n)) => Some((s.to_owned(), n)),
                _ => return Err(ApiError::bad_request(
                    "push-stream takes a valueString and push-batch a valueInteger of 0 or more",
                )),
            },
            _ => {
                return Err(ApiError::bad_request(
                    "push-stream and push-batch come together",
                ))
            }
        };
    let entries: Vec<&[u8]> = b
        .entry
        .iter()
        .flatten()
        .map(|e| e.get().as_bytes())
        .collect();
    if entries.len() > APPLY_ENTRIES_MAX {
        return Err(ApiError::new(
            413,
            "too-costly",
            format!("more than {APPLY_ENTRIES_MAX} entries in one $apply"),
        ));
    }
    let mut versions = Vec::with_capacity(entries.len());
    let mut refused = None;
    for (i, read) in RemoteVersion::from_payloads(&entries, validation)
        .into_iter()
        .enumerate()
    {
        match read {
            Ok(v) if !push_types.is_empty() && !push_types.contains(&v.rtype) => {
                let why = format!("entry {i}: this child may not push {} resources", v.rtype);
                refused = Some((403, why));
                break;
            }
            Ok(v) => versions.push(v),
            Err(why) => {
                refused = Some((422, format!("entry {i}: {why}")));
                break;
            }
        }
    }
    Ok(Parsed {
        policy,
        versions,
        refused,
        stream,
    })
}
