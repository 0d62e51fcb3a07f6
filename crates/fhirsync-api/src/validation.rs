//! Structural validation of what clients write (`[validation] mode`), and
//! `POST [type]/$validate`, which answers the same OperationOutcome
//! without storing anything.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use fhirsync_core::index::custom::Definition;
use fhirsync_core::resource::{check_resource, parse_client_resource};
use fhirsync_core::validate::{summary, validate_object, Issue};
use fhirsync_store::StoreError;
use serde_json::{json, Map, Value};

use crate::http::{check_type, fhir_json, read_body};
use crate::{ApiError, AppState};

pub use fhirsync_core::validate::Mode;

/// An OperationOutcome with one issue per problem, each with its path.
pub fn outcome(issues: &[Issue], severity: &str) -> Value {
    let list: Vec<Value> = issues
        .iter()
        .map(|i| {
            json!({
                "severity": severity,
                "code": "structure",
                "diagnostics": i.message,
                "expression": [i.expression],
            })
        })
        .collect();
    let list = if list.is_empty() {
        vec![
            json!({"severity": "information", "code": "informational", "diagnostics": "no problems found"}),
        ]
    } else {
        list
    };
    json!({"resourceType": "OperationOutcome", "issue": list})
}

/// Validates a resource a client writes, as the node's mode says: an
/// error in strict mode; in lenient mode the problems, which the answer
/// carries as warnings (empty when there are none).
pub fn check(state: &AppState, res: &Map<String, Value>) -> Result<Vec<Issue>, ApiError> {
    check_search_parameters(res)?;
    let mode = state.cfg.validation;
    if mode == Mode::Off {
        return Ok(Vec::new());
    }
    match mode.check_object(res) {
        Ok(issues) => {
            if !issues.is_empty() {
                tracing::warn!(problems = %summary(&issues), "stored a resource that fails validation (lenient mode)");
            }
            Ok(issues)
        }
        Err(issues) => {
            let mut e = ApiError::new(422, "structure", summary(&issues));
            e.outcome = Some(outcome(&issues, "error"));
            Err(e)
        }
    }
}

/// Refuses an active `SearchParameter` (written alone or in a Bundle) that
/// the node cannot serve, whatever the mode: the client would otherwise
/// believe it in force.
fn check_search_parameters(res: &Map<String, Value>) -> Result<(), ApiError> {
    let is_sp =
        |r: &Value| r.get("resourceType").and_then(Value::as_str) == Some("SearchParameter");
    let refuse = |r: &Value| {
        Definition::from_resource(r).map_err(|why| ApiError::new(422, "not-supported", why))
    };
    if res.get("resourceType").and_then(Value::as_str) == Some("SearchParameter") {
        refuse(&Value::Object(res.clone()))?;
    }
    let entries = res.get("entry").and_then(Value::as_array);
    for r in entries
        .into_iter()
        .flatten()
        .filter_map(|e| e.get("resource"))
    {
        if is_sp(r) {
            refuse(r)?;
        }
    }
    Ok(())
}

/// Header of a write answer in lenient mode: the problems in one line
/// (all of them, as an OperationOutcome, with `Prefer: return=OperationOutcome`).
pub const WARNING_HEADER: &str = "x-validation-warning";

/// Longest `x-validation-warning` line: a client names the elements, so
/// without a cap one header could be megabytes long.
pub const WARNING_CHARS_MAX: usize = 1_000;

/// Adds the lenient-mode warnings to an answer.
pub fn warn(r: &mut Response, issues: &[Issue]) {
    if issues.is_empty() {
        return;
    }
    let line: String = summary(issues)
        .chars()
        .take(WARNING_CHARS_MAX)
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect();
    if let Ok(v) = axum::http::HeaderValue::from_str(&line) {
        r.headers_mut().insert(WARNING_HEADER, v);
    }
}

/// `POST [type]/$validate`: the resource (or a Parameters with a
/// `resource` part) checked, nothing stored.
pub async fn validate_op(
    State(state): State<AppState>,
    Path(rtype): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    check_type(&rtype)?;
    let bytes = read_body(&state, &headers, body).await?;
    let mut res = parse_client_resource(&bytes).map_err(StoreError::from)?;
    if rtype != "Parameters"
        && res.get("resourceType").and_then(Value::as_str) == Some("Parameters")
    {
        let inner = res
            .get("parameter")
            .and_then(Value::as_array)
            .and_then(|ps| ps.iter().find(|p| p["name"] == "resource"))
            .and_then(|p| p.get("resource"))
            .and_then(Value::as_object)
            .cloned()
            .ok_or_else(|| ApiError::bad_request("Parameters without a 'resource' part"))?;
        res = inner;
    }
    check_resource(&res, Some(&rtype)).map_err(StoreError::from)?;
    let issues = validate_object(&res);
    Ok(fhir_json(outcome(&issues, "error").to_string()))
}
