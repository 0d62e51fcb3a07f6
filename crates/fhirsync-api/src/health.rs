//! `/healthz` (the process answers) and `/readyz` (the store answers
//! reads and the node is not shutting down), for load balancers and
//! orchestrators.

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::Response;
use serde_json::{json, Value};

use crate::AppState;

fn answer(status: StatusCode, v: Value) -> Response {
    let mut r = Response::new(v.to_string().into());
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/health+json"),
    );
    r
}

pub async fn live() -> Response {
    answer(StatusCode::OK, json!({"status": "pass"}))
}

pub async fn ready(State(state): State<AppState>) -> Response {
    let fail = |why: String| {
        answer(
            StatusCode::SERVICE_UNAVAILABLE,
            json!({"status": "fail", "reason": why}),
        )
    };
    if *state.shutdown.borrow() {
        return fail("shutting down".into());
    }
    match state.store.cursor("readyz").await {
        Ok(_) => answer(
            StatusCode::OK,
            json!({
                "status": "pass",
                "nodeId": state.store.node_id(),
                "lastSeq": state.store.last_seq(),
            }),
        ),
        Err(e) => fail(format!("store: {e}")),
    }
}
