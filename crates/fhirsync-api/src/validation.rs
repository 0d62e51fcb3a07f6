//! Structural validation of what clients write (`[validation] mode`), and
//! `POST [type]/$validate`, which answers the same OperationOutcome
//! without storing anything.

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use fhirsync_core::resource::{check_resource, parse_client_resource};
use fhirsync_core::validate::{validate, Issue};
use fhirsync_store::StoreError;
use serde_json::{json, Map, Value};

use crate::http::{check_type, fhir_json, read_body};
use crate::{ApiError, AppState};

/// What the node does with a write that fails validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Refused with 422 and the problems.
    #[default]
    Strict,
    /// Stored; the problems are logged as a warning.
    Lenient,
    /// Not validated.
    Off,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "strict" => Some(Mode::Strict),
            "lenient" => Some(Mode::Lenient),
            "off" => Some(Mode::Off),
            _ => None,
        }
    }
}

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
/// error in strict mode, the issues to log in lenient mode.
pub fn check(state: &AppState, res: &Map<String, Value>) -> Result<(), ApiError> {
    if state.cfg.validation == Mode::Off {
        return Ok(());
    }
    let v = Value::Object(res.clone());
    let issues = validate(&v);
    if issues.is_empty() {
        return Ok(());
    }
    if state.cfg.validation == Mode::Lenient {
        tracing::warn!(
            issues = issues.len(),
            first = %issues[0].expression,
            "stored a resource that fails validation (lenient mode)"
        );
        return Ok(());
    }
    let mut e = ApiError::new(
        422,
        "structure",
        format!(
            "{} problem(s), the first at {}: {}",
            issues.len(),
            issues[0].expression,
            issues[0].message
        ),
    );
    e.outcome = Some(outcome(&issues, "error"));
    Err(e)
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
    let issues = validate(&Value::Object(res));
    Ok(fhir_json(outcome(&issues, "error").to_string()))
}
