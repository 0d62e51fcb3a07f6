//! `GET /fhir/metadata`: a CapabilityStatement listing exactly what this
//! server does.

use axum::extract::{RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use std::sync::OnceLock;

use fhirsync_core::index;
use fhirsync_core::resource::RESOURCE_TYPES;
use fhirsync_core::spec::Kind;
use serde_json::{json, Value};

use crate::changes::CANONICAL_BASE;
use crate::http::{base_url, check_accept, fhir_json, query_pairs};
use crate::{ApiError, AppState};

/// The search parameters, includes and revincludes of one type.
fn type_search(rtype: &str) -> (Value, Vec<String>, Vec<String>) {
    let mut params = vec![
        json!({"name": "_id", "type": "token", "definition": "http://hl7.org/fhir/SearchParameter/Resource-id"}),
        json!({"name": "_lastUpdated", "type": "date", "definition": "http://hl7.org/fhir/SearchParameter/Resource-lastUpdated"}),
    ];
    let mut includes = Vec::new();
    for p in index::params(rtype).iter().filter(|p| p.expr.is_some()) {
        params.push(json!({
            "name": p.code,
            "type": p.kind.as_str(),
        }));
        if p.kind == Kind::Reference {
            includes.push(format!("{rtype}:{}", p.code));
        }
    }
    let mut revincludes = Vec::new();
    for t in RESOURCE_TYPES {
        for p in index::params(t) {
            if p.kind == Kind::Reference && p.expr.is_some() && p.targets.contains(&rtype) {
                revincludes.push(format!("{t}:{}", p.code));
            }
        }
    }
    (Value::Array(params), includes, revincludes)
}

/// The `rest.resource` list, built once.
fn resources() -> &'static Value {
    static R: OnceLock<Value> = OnceLock::new();
    R.get_or_init(|| {
        let interactions = json!([
            {"code": "read"}, {"code": "vread"}, {"code": "update"}, {"code": "delete"},
            {"code": "history-instance"}, {"code": "history-type"}, {"code": "create"}, {"code": "search-type"}
        ]);
        Value::Array(
            RESOURCE_TYPES
                .iter()
                .map(|t| {
                    let (params, includes, revincludes) = type_search(t);
                    let mut r = json!({
                        "type": t,
                        "interaction": interactions,
                        "versioning": "versioned-update",
                        "readHistory": true,
                        "updateCreate": true,
                        "conditionalCreate": true,
                        "conditionalRead": "not-supported",
                        "conditionalUpdate": true,
                        "conditionalDelete": "single",
                        "searchInclude": includes,
                        "searchRevInclude": revincludes,
                        "searchParam": params,
                    });
                    if *t == "Patient" {
                        r["operation"] = json!([{
                            "name": "everything",
                            "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything"
                        }]);
                    }
                    r
                })
                .collect(),
        )
    })
}

/// The resource list with the custom search parameters in force added
/// (the R4 list is built once; a copy is made only when there are some).
fn with_custom_params(r: &'static Value) -> std::borrow::Cow<'static, Value> {
    use fhirsync_core::index::custom;
    let extra: Vec<(usize, Vec<Value>)> = RESOURCE_TYPES
        .iter()
        .enumerate()
        .filter_map(|(i, t)| {
            let ps = custom::params(t);
            (!ps.is_empty()).then(|| {
                let list = ps
                    .iter()
                    .map(|p| json!({"name": p.code, "type": p.kind.as_str(), "documentation": "custom (a SearchParameter on this node)"}))
                    .collect();
                (i, list)
            })
        })
        .collect();
    if extra.is_empty() {
        return std::borrow::Cow::Borrowed(r);
    }
    let mut r = r.clone();
    for (i, list) in extra {
        if let Some(Value::Array(a)) = r.get_mut(i).and_then(|t| t.get_mut("searchParam")) {
            a.extend(list);
        }
    }
    std::borrow::Cow::Owned(r)
}

/// The CapabilityStatement of a server implementing bulk data export.
pub const BULK_DATA_IG: &str = "http://hl7.org/fhir/uv/bulkdata/CapabilityStatement/bulk-data";

pub async fn metadata(
    State(state): State<AppState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_accept(&headers, &query_pairs(q.as_deref()))?;
    let base = base_url(&state, &headers);
    let mut body = json!({
        "resourceType": "CapabilityStatement",
        "status": "active",
        // When this node started: the statement is the running process's.
        "date": fhirsync_core::instant::format_instant(state.deployment.process.started_ms),
        "kind": "instance",
        "software": {"name": "fhirsync", "version": env!("CARGO_PKG_VERSION")},
        "implementation": {"description": format!("fhirsync node {}", state.store.node_id()), "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [{
            "mode": "server",
            "resource": with_custom_params(resources()),
            "interaction": [{"code": "transaction"}, {"code": "batch"}, {"code": "history-system"}, {"code": "search-system"}],
            "searchParam": [
                {"name": "_count", "type": "number", "documentation": "page size, at most 1000; 0 gives the total only"},
                {"name": "_sort", "type": "special", "documentation": "any sortable parameter of the type, several keys, - for descending"},
                {"name": "_summary", "type": "special", "documentation": "true, text, data, count or false"},
                {"name": "_elements", "type": "special", "documentation": "top-level elements to keep"},
                {"name": "_include", "type": "special", "documentation": "Type:param[:target], Type:*, with :iterate"},
                {"name": "_revinclude", "type": "special", "documentation": "Type:param[:target], with :iterate"},
                {"name": "_has", "type": "special", "documentation": "_has:Type:param:parameter, nested"},
                {"name": "_total", "type": "special", "documentation": "none, estimate or accurate"}
            ],
            "operation": [
                {
                    "name": "changes",
                    "definition": format!("{CANONICAL_BASE}/OperationDefinition/changes"),
                    "documentation": "the change log: since=SEQ, _count, _type, wait (seconds, long-poll)"
                },
                {
                    "name": "apply",
                    "definition": format!("{CANONICAL_BASE}/OperationDefinition/apply"),
                    "documentation": "a peer's change records, applied in order"
                },
                {
                    "name": "summary",
                    "definition": format!("{CANONICAL_BASE}/OperationDefinition/summary"),
                    "documentation": "anti-entropy: fingerprints of the current resources over id ranges (JSON)"
                },
                {
                    "name": "current",
                    "definition": format!("{CANONICAL_BASE}/OperationDefinition/current"),
                    "documentation": "anti-entropy: the current versions of named resources as change records"
                },
                {
                    "name": "status",
                    "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-status",
                    "documentation": "Subscription/[id]/$status"
                },
                {
                    "name": "events",
                    "definition": "http://hl7.org/fhir/uv/subscriptions-backport/OperationDefinition/backport-subscription-events",
                    "documentation": "Subscription/[id]/$events"
                },
                {
                    "name": "everything",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Patient-everything",
                    "documentation": "Patient/[id]/$everything with _since, _type, _count"
                },
                {
                    "name": "validate",
                    "definition": "http://hl7.org/fhir/OperationDefinition/Resource-validate",
                    "documentation": "[type]/$validate: structural validation against the R4 definitions, nothing stored"
                }
            ]
        }]
    });
    if state.bulk.is_some() {
        body["instantiates"] = json!([BULK_DATA_IG]);
        if let Some(Value::Array(ops)) = body.pointer_mut("/rest/0/operation") {
            for (name, doc) in [
                (
                    "export",
                    "[base]/$export: every type, as NDJSON files (Bulk Data IG 2.0)",
                ),
                (
                    "patient-export",
                    "Patient/$export: the Patient compartments",
                ),
                (
                    "group-export",
                    "Group/[id]/$export: the compartments of a Group's members",
                ),
            ] {
                ops.push(json!({
                    "name": name,
                    "definition": format!("http://hl7.org/fhir/uv/bulkdata/OperationDefinition/{name}"),
                    "documentation": doc
                }));
            }
            ops.push(json!({
                "name": "import",
                "definition": format!("{CANONICAL_BASE}/OperationDefinition/import"),
                "documentation": "[base]/$import: NDJSON files fetched over https, loaded all or nothing (Bulk Data Import proposal)"
            }));
        }
    }
    Ok(fhir_json(body.to_string()))
}
