//! The receiver's HTTP side: senders POST batches (bearer: the site's
//! token); the admin API lists sites and conflicts and resolves them
//! (bearer: the admin token). Errors are FHIR OperationOutcomes.

use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use crate::receiver::{sha256_hex, Keep, Receiver};
use crate::record::Batch;
use crate::DbError;

struct Ctx {
    receiver: Arc<Receiver>,
    admin_token: Option<String>,
}

fn outcome(status: StatusCode, code: &str, text: &str) -> Response {
    let body = json!({
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "error", "code": code, "diagnostics": text}]
    });
    (status, Json(body)).into_response()
}

fn error(e: &DbError) -> Response {
    let (status, code) = match e {
        DbError::UnknownSite(_) => (StatusCode::FORBIDDEN, "forbidden"),
        DbError::BadRecord(_) | DbError::Schema(_) => (StatusCode::UNPROCESSABLE_ENTITY, "invalid"),
        DbError::MissingParent { .. } => (StatusCode::CONFLICT, "conflict"),
        DbError::NoConflict(_) => (StatusCode::NOT_FOUND, "not-found"),
        _ => (StatusCode::SERVICE_UNAVAILABLE, "transient"),
    };
    outcome(status, code, &e.to_string())
}

fn bearer(h: &HeaderMap) -> Option<&str> {
    h.get("authorization")?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

fn admin(ctx: &Ctx, h: &HeaderMap) -> Option<Response> {
    match (&ctx.admin_token, bearer(h)) {
        (None, _) => Some(outcome(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the admin API is off: set admin_token in the receiver's config",
        )),
        // Hashes compared: the time taken says nothing about the token.
        (Some(t), Some(b)) if sha256_hex(t) == sha256_hex(b) => None,
        _ => Some(outcome(
            StatusCode::UNAUTHORIZED,
            "login",
            "the admin token is missing or wrong",
        )),
    }
}

async fn batches(State(ctx): State<Arc<Ctx>>, h: HeaderMap, body: axum::body::Bytes) -> Response {
    let Some(token) = bearer(&h) else {
        return outcome(
            StatusCode::UNAUTHORIZED,
            "login",
            "a site token is needed (Authorization: Bearer)",
        );
    };
    let site = match ctx.receiver.site_for_token(token).await {
        Ok(Some(s)) => s,
        Ok(None) => return outcome(StatusCode::UNAUTHORIZED, "login", "unknown site token"),
        Err(e) => return error(&e),
    };
    let batch: Batch = match serde_json::from_slice(&body) {
        Ok(b) => b,
        Err(e) => {
            return outcome(
                StatusCode::BAD_REQUEST,
                "structure",
                &format!("not a batch: {e}"),
            )
        }
    };
    if batch.site != site {
        return outcome(
            StatusCode::FORBIDDEN,
            "forbidden",
            &format!("the token is site {site}'s, the batch says {}", batch.site),
        );
    }
    match ctx.receiver.apply(&batch).await {
        Ok(a) => Json(a).into_response(),
        Err(e) => {
            tracing::warn!(%site, error = %e, "batch refused");
            ctx.receiver.note_error(&site, &e.to_string()).await;
            error(&e)
        }
    }
}

async fn sites(State(ctx): State<Arc<Ctx>>, h: HeaderMap) -> Response {
    if let Some(r) = admin(&ctx, &h) {
        return r;
    }
    match ctx.receiver.sites().await {
        Ok(s) => Json(s).into_response(),
        Err(e) => error(&e),
    }
}

#[derive(Deserialize)]
struct ConflictQuery {
    #[serde(default)]
    all: bool,
}

async fn conflicts(
    State(ctx): State<Arc<Ctx>>,
    h: HeaderMap,
    Query(q): Query<ConflictQuery>,
) -> Response {
    if let Some(r) = admin(&ctx, &h) {
        return r;
    }
    match ctx.receiver.conflicts(!q.all).await {
        Ok(c) => Json(c).into_response(),
        Err(e) => error(&e),
    }
}

#[derive(Deserialize)]
struct ResolveQuery {
    keep: String,
}

async fn resolve(
    State(ctx): State<Arc<Ctx>>,
    h: HeaderMap,
    Path(id): Path<i64>,
    Query(q): Query<ResolveQuery>,
) -> Response {
    if let Some(r) = admin(&ctx, &h) {
        return r;
    }
    let keep: Keep = match q.keep.parse() {
        Ok(k) => k,
        Err(e) => return outcome(StatusCode::BAD_REQUEST, "value", &e),
    };
    match ctx.receiver.resolve(id, keep, "admin-api").await {
        Ok(()) => Json(json!({"resolved": id, "keep": q.keep})).into_response(),
        Err(e) => error(&e),
    }
}

pub fn router(receiver: Arc<Receiver>, admin_token: Option<String>) -> Router {
    let ctx = Arc::new(Ctx {
        receiver,
        admin_token,
    });
    Router::new()
        .route("/db/batches", post(batches))
        .route("/db/sites", get(sites))
        .route("/db/conflicts", get(conflicts))
        .route("/db/conflicts/{id}/resolve", post(resolve))
        .route("/healthz", get(|| async { "ok" }))
        .layer(axum::extract::DefaultBodyLimit::max(256 << 20))
        .with_state(ctx)
}
