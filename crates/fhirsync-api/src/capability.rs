//! `GET /fhir/metadata`: a CapabilityStatement listing exactly what this
//! server does.

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use fhirsync_core::resource::RESOURCE_TYPES;
use serde_json::{json, Value};

use crate::changes::CANONICAL_BASE;
use crate::http::{base_url, check_accept, fhir_json, query_pairs};
use crate::{ApiError, AppState};

fn search_params() -> Value {
    json!([
        {"name": "_id", "type": "token", "documentation": "logical id; comma-separated ids are OR"},
        {"name": "_lastUpdated", "type": "date", "documentation": "prefixes eq, gt, ge, lt, le; partial dates cover their range"},
        {"name": "identifier", "type": "token", "documentation": "system|value, |value, system| or value"},
        {"name": "patient", "type": "reference", "documentation": "the Patient in patient, subject or beneficiary"},
        {"name": "subject", "type": "reference", "documentation": "Type/id or id"}
    ])
}

pub async fn metadata(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_accept(&headers, &query_pairs(q.as_deref()))?;
    let base = base_url(&state, &headers);
    let interactions = json!([
        {"code": "read"}, {"code": "vread"}, {"code": "update"}, {"code": "delete"},
        {"code": "history-instance"}, {"code": "history-type"}, {"code": "create"}, {"code": "search-type"}
    ]);
    let resources: Vec<Value> = RESOURCE_TYPES
        .iter()
        .map(|t| {
            json!({
                "type": t,
                "interaction": interactions,
                "versioning": "versioned-update",
                "readHistory": true,
                "updateCreate": true,
                "conditionalCreate": true,
                "conditionalRead": "not-supported",
                "conditionalUpdate": true,
                "conditionalDelete": "single",
                "searchParam": search_params(),
            })
        })
        .collect();
    let body = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": "2026-11-22",
        "kind": "instance",
        "software": {"name": "fhirsync", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": format!("fhirsync node {}", state.store.node_id()), "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "resource": resources,
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}, {"code": "search-system"}],
            "searchParam": [
                {"name": "_count", "type": "number", "documentation": "page size, at most 1000; 0 gives the total only"},
                {"name": "_sort", "type": "special", "documentation": "_lastUpdated or -_lastUpdated"},
                {"name": "_summary", "type": "special", "documentation": "count"},
                {"name": "_total", "type": "special", "documentation": "none, estimate or accurate"}
            ],
            "operation": [{
                "name": "changes",
                "definition": format!("{CANONICAL_BASE}/OperationDefinition/changes"),
                "documentation": "the change log: since=SEQ, _count, _type, wait (seconds, long-poll)"
            }]
        }]
    });
    Ok(fhir_json(body.to_string()))
}
