//! `Subscription/{id}/$status` and `$events` (R4 Subscriptions Backport):
//! read from the stored subscription, its event count and its events.

use axum::extract::{Path, RawQuery, State};
use axum::http::HeaderMap;
use axum::response::Response;
use fhirsync_core::subscription::{
    notification_bundle, status_parameters, Event, NoteKind, Payload, Status, Subscription,
};
use fhirsync_store::sub_events_key;
use serde_json::{json, Value};

use crate::http::{base_url, check_accept, fhir_json, query_pairs};
use crate::{ApiError, AppState};

/// Events one `$events` call returns at most.
const EVENTS_MAX: u64 = 1000;

async fn load(state: &AppState, id: &str) -> Result<(Subscription, Value, u64), ApiError> {
    let v = state
        .store
        .read("Subscription", id)
        .await?
        .filter(|v| !v.deleted)
        .ok_or_else(|| ApiError::not_found(format!("Subscription/{id} is not known")))?;
    let body: Value = v
        .body
        .as_deref()
        .and_then(|b| serde_json::from_str(b).ok())
        .ok_or_else(|| ApiError::not_found(format!("Subscription/{id} is not known")))?;
    let sub = Subscription::parse(&body).map_err(ApiError::bad_request)?;
    let n = state.store.cursor(&sub_events_key(id)).await?.unwrap_or(0);
    Ok((sub, body, n))
}

pub async fn status(
    State(state): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    check_accept(&headers, &query_pairs(q.as_deref()))?;
    let (sub, body, n) = load(&state, &id).await?;
    let base = base_url(&state, &headers);
    let params = status_parameters(
        &Status {
            base: &base,
            sub_id: &id,
            topic: &sub.topic,
            status: &sub.status,
            kind: NoteKind::QueryStatus,
            events_since_start: n,
            error: body["error"].as_str(),
        },
        &[],
        sub.payload,
    );
    Ok(fhir_json(
        json!({
            "resourceType": "Bundle",
            "type": "searchset",
            "total": 1,
            "entry": [{"fullUrl": format!("{base}/Subscription/{id}/$status"), "resource": params, "search": {"mode": "match"}}],
        })
        .to_string(),
    ))
}

fn number(pairs: &[(String, String)], name: &str) -> Result<Option<u64>, ApiError> {
    match pairs.iter().find(|(k, _)| k == name) {
        None => Ok(None),
        Some((_, v)) => v.parse::<u64>().map(Some).map_err(|_| {
            ApiError::bad_request(format!("{name} must be an event number, not '{v}'"))
        }),
    }
}

pub async fn events(
    State(state): State<AppState>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let pairs = query_pairs(q.as_deref());
    check_accept(&headers, &pairs)?;
    let (sub, body, n) = load(&state, &id).await?;
    let from = number(&pairs, "eventsSinceNumber")?.unwrap_or(1).max(1);
    let until = number(&pairs, "eventsUntilNumber")?.unwrap_or(n).min(n);
    if from > until.max(from) {
        return Err(ApiError::bad_request(
            "eventsSinceNumber is after eventsUntilNumber",
        ));
    }
    let payload = match pairs.iter().find(|(k, _)| k == "content") {
        None => sub.payload,
        Some((_, c)) => Payload::parse(c).ok_or_else(|| {
            ApiError::bad_request(format!("content '{c}' is not empty|id-only|full-resource"))
        })?,
    };
    let until = until.min(from.saturating_add(EVENTS_MAX - 1));
    let rows = if from <= until {
        state
            .store
            .sub_events(&id, from, until, EVENTS_MAX as usize)
            .await?
    } else {
        Vec::new()
    };
    let mut evs = Vec::with_capacity(rows.len());
    for e in rows {
        let body = if payload == Payload::Full && !e.deleted {
            state
                .store
                .vread(&e.rtype, &e.rid, e.vid)
                .await?
                .and_then(|v| v.body.as_deref().and_then(|b| serde_json::from_str(b).ok()))
        } else {
            None
        };
        evs.push(Event {
            num: e.num,
            at_ms: e.at_ms,
            rtype: e.rtype,
            id: e.rid,
            vid: e.vid,
            deleted: e.deleted,
            body,
        });
    }
    let base = base_url(&state, &headers);
    let status = Status {
        base: &base,
        sub_id: &id,
        topic: &sub.topic,
        status: &sub.status,
        kind: NoteKind::QueryEvent,
        events_since_start: n,
        error: body["error"].as_str(),
    };
    let now = fhirsync_core::clock::Clock::now_ms(&fhirsync_core::clock::SystemClock);
    Ok(fhir_json(
        notification_bundle(&status, &evs, payload, now).to_string(),
    ))
}
