//! Errors at the HTTP edge: every failure becomes an `OperationOutcome`
//! with the right status; internals are logged, never sent.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use fhirsync_store::StoreError;
use serde_json::json;

use crate::http::fhir_json;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    /// FHIR `IssueType` code.
    pub code: &'static str,
    pub diagnostics: String,
    /// A whole OperationOutcome to send instead of one made of `code` and
    /// `diagnostics` (validation reports one issue per problem).
    pub outcome: Option<serde_json::Value>,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, diagnostics: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            code,
            diagnostics: diagnostics.into(),
            outcome: None,
        }
    }
    pub fn bad_request(d: impl Into<String>) -> Self {
        Self::new(400, "invalid", d)
    }
    pub fn not_found(d: impl Into<String>) -> Self {
        Self::new(404, "not-found", d)
    }
}

/// The default issue code of a status.
pub fn issue_code(status: u16) -> &'static str {
    match status {
        400 => "invalid",
        404 => "not-found",
        410 => "deleted",
        412 | 409 => "conflict",
        413 => "too-costly",
        422 => "processing",
        406 | 415 | 405 => "not-supported",
        503 => "transient",
        _ => "exception",
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = e.status();
        if status >= 500 {
            tracing::error!(error = %e, "request failed in storage");
            let d = match e {
                StoreError::ShuttingDown => "the server is shutting down".to_string(),
                _ => "internal error; the cause is in the server log".to_string(),
            };
            return ApiError::new(status, issue_code(status), d);
        }
        ApiError::new(status, issue_code(status), e.to_string())
    }
}

pub fn outcome(severity: &str, code: &str, diagnostics: &str) -> serde_json::Value {
    json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]
    })
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self
            .outcome
            .unwrap_or_else(|| outcome("error", self.code, &self.diagnostics));
        let mut r = fhir_json(body.to_string());
        *r.status_mut() = self.status;
        r
    }
}

pub async fn not_found() -> ApiError {
    ApiError::not_found("no such endpoint; the FHIR API is under /fhir")
}

pub async fn method_not_allowed() -> ApiError {
    ApiError::new(405, "not-supported", "method not allowed on this endpoint")
}

pub fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("handler panicked");
    ApiError::new(
        500,
        "exception",
        "internal error; the cause is in the server log",
    )
    .into_response()
}
