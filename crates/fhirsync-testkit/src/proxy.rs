//! A real HTTP server on 127.0.0.1 that forwards to a node and can misbehave
//! on purpose: require credentials, answer 429/503 with `Retry-After` to
//! every n-th request, and record what it saw (request ids, concurrency).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::Response;

#[derive(Debug, Clone, Default)]
pub struct ProxyOptions {
    /// Exact `Authorization` header value required (else 401).
    pub require_auth: Option<String>,
    /// Every n-th request fails with `fail_status` before reaching the node.
    pub fail_every: Option<u64>,
    pub fail_status: u16,
    pub retry_after: Option<String>,
    /// Refuse (422) a write whose relative `Type/id` references do not
    /// exist on the node yet, as servers with referential integrity do.
    pub enforce_references: bool,
    /// Track concurrent writes per value of this JSON member of entry
    /// resources (`"id"` of Patients in transaction Bundles).
    pub track_patient_concurrency: bool,
    /// Pass the client's `Host` on, so that the URLs the node makes
    /// (status and file URLs) lead back through the proxy.
    pub forward_host: bool,
    /// Every n-th download of a bulk file (`$bulk-file`) breaks off
    /// after half of its body.
    pub cut_files_every: Option<u64>,
    /// Requests whose path ends with this are refused (403), as a server
    /// that does not let this caller use an operation.
    pub refuse_path: Option<String>,
    /// The pages of a search after its first link `next` back to the first
    /// (as a server whose paging loops); with `forward_host`, so that the
    /// node's links lead through the proxy.
    pub loop_paging: bool,
}

#[derive(Debug, Default)]
pub struct ProxyStats {
    pub requests: AtomicU64,
    pub injected: AtomicU64,
    pub unauthorized: AtomicU64,
    pub request_ids: Mutex<Vec<String>>,
    /// Largest number of requests in flight at once, and per patient key.
    pub max_in_flight: AtomicU64,
    pub max_same_patient: AtomicU64,
    /// Writes refused because a reference target was missing.
    pub dangling: AtomicU64,
    /// Bulk file downloads seen, and those broken off on purpose.
    pub files: AtomicU64,
    pub files_cut: AtomicU64,
    in_flight: Mutex<(u64, std::collections::HashMap<String, u64>)>,
}

struct Ctx {
    target: String,
    opts: ProxyOptions,
    stats: Arc<ProxyStats>,
    client: reqwest::Client,
    /// With `loop_paging`: the first page's URL of each search path.
    first_pages: Mutex<std::collections::HashMap<String, String>>,
}

pub struct Proxy {
    pub base: String,
    pub stats: Arc<ProxyStats>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Proxy {
    /// Forwards `http://127.0.0.1:P/fhir/...` to `target` (a `.../fhir` base).
    pub async fn start(target: &str, opts: ProxyOptions) -> Proxy {
        let stats = Arc::new(ProxyStats::default());
        let ctx = Arc::new(Ctx {
            target: target.trim_end_matches('/').to_owned(),
            opts,
            stats: stats.clone(),
            client: reqwest::Client::new(),
            first_pages: Mutex::default(),
        });
        let app = axum::Router::new().fallback(handle).with_state(ctx);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Proxy {
            base: format!("http://{addr}/fhir"),
            stats,
            task,
        }
    }
}

fn patient_keys(body: &[u8]) -> Vec<String> {
    let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Vec::new();
    };
    let mut keys = Vec::new();
    for e in v["entry"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
        if e["resource"]["resourceType"] == "Patient" {
            if let Some(id) = e["resource"]["id"].as_str() {
                keys.push(id.to_owned());
            }
        }
    }
    keys
}

async fn handle(State(ctx): State<Arc<Ctx>>, req: Request) -> Response {
    let n = ctx.stats.requests.fetch_add(1, Ordering::SeqCst) + 1;
    let (parts, body) = req.into_parts();
    if let Some(id) = parts
        .headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
    {
        if let Ok(mut ids) = ctx.stats.request_ids.lock() {
            ids.push(id.to_owned());
        }
    }
    if let Some(want) = &ctx.opts.require_auth {
        let got = parts
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        if got != Some(want.as_str()) {
            ctx.stats.unauthorized.fetch_add(1, Ordering::SeqCst);
            return status(
                401,
                r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"login","diagnostics":"authentication required"}]}"#,
                None,
            );
        }
    }
    if let Some(p) = &ctx.opts.refuse_path {
        if parts.uri.path().ends_with(p.as_str()) {
            return status(
                403,
                r#"{"resourceType":"OperationOutcome","issue":[{"severity":"error","code":"forbidden","diagnostics":"not allowed"}]}"#,
                None,
            );
        }
    }
    if let Some(k) = ctx.opts.fail_every {
        if n % k == 0 {
            ctx.stats.injected.fetch_add(1, Ordering::SeqCst);
            return status(ctx.opts.fail_status, "", ctx.opts.retry_after.as_deref());
        }
    }
    let bytes = to_bytes(body, 256 << 20).await.unwrap_or_default();
    if ctx.opts.enforce_references && (parts.method == "PUT" || parts.method == "POST") {
        if let Some(missing) = missing_reference(&ctx, &bytes).await {
            ctx.stats.dangling.fetch_add(1, Ordering::SeqCst);
            let oo = format!(
                r#"{{"resourceType":"OperationOutcome","issue":[{{"severity":"error","code":"processing","diagnostics":"reference target {missing} not found"}}]}}"#
            );
            let mut r = Response::new(Body::from(oo));
            *r.status_mut() = StatusCode::UNPROCESSABLE_ENTITY;
            return r;
        }
    }
    let keys = if ctx.opts.track_patient_concurrency {
        patient_keys(&bytes)
    } else {
        Vec::new()
    };
    {
        let mut g = ctx.stats.in_flight.lock().expect("lock");
        g.0 += 1;
        ctx.stats.max_in_flight.fetch_max(g.0, Ordering::SeqCst);
        for k in &keys {
            let c = g.1.entry(k.clone()).or_insert(0);
            *c += 1;
            ctx.stats.max_same_patient.fetch_max(*c, Ordering::SeqCst);
        }
    }
    // Hold writes a moment so that overlaps, if any, are seen.
    if !keys.is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let path = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let rest = path.strip_prefix("/fhir").unwrap_or(path);
    let mut rb = ctx
        .client
        .request(parts.method.clone(), format!("{}{rest}", ctx.target))
        .body(bytes);
    for (k, v) in &parts.headers {
        // Pages to rewrite are asked for uncompressed.
        let keep = match k.as_str() {
            "host" => ctx.opts.forward_host,
            "content-length" => false,
            "accept-encoding" => !ctx.opts.loop_paging,
            _ => true,
        };
        if keep {
            rb = rb.header(k, v);
        }
    }
    let resp = rb.send().await;
    {
        let mut g = ctx.stats.in_flight.lock().expect("lock");
        g.0 -= 1;
        for k in &keys {
            if let Some(c) = g.1.get_mut(k) {
                *c -= 1;
            }
        }
    }
    match resp {
        Ok(r) => {
            let code = r.status().as_u16();
            let headers = r.headers().clone();
            let mut body = r.bytes().await.unwrap_or_default();
            if ctx.opts.loop_paging && parts.method == "GET" {
                let host = parts.headers.get("host").and_then(|h| h.to_str().ok());
                let url = format!("http://{}{path}", host.unwrap_or_default());
                if let Some(looped) = loop_next(&ctx, parts.uri.path(), &url, &body) {
                    body = looped.into();
                }
            }
            let cut = path.contains("$bulk-file")
                && ctx
                    .opts
                    .cut_files_every
                    .is_some_and(|k| ctx.stats.files.fetch_add(1, Ordering::SeqCst) % k == 0);
            let mut out = if cut && body.len() > 1 {
                ctx.stats.files_cut.fetch_add(1, Ordering::SeqCst);
                let half = body.slice(..body.len() / 2);
                let parts: Vec<Result<axum::body::Bytes, std::io::Error>> = vec![
                    Ok(half),
                    Err(std::io::Error::other("connection dropped on purpose")),
                ];
                Response::new(Body::from_stream(futures::stream::iter(parts)))
            } else {
                Response::new(Body::from(body))
            };
            *out.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY);
            for (k, v) in &headers {
                if k != "content-length" && k != "transfer-encoding" {
                    out.headers_mut().insert(k, v.clone());
                }
            }
            out
        }
        Err(_) => status(502, "", None),
    }
}

/// A search page at `url` (not its search's first) with its `next` link
/// turned back to the first page of its search path.
fn loop_next(ctx: &Ctx, path: &str, url: &str, body: &[u8]) -> Option<Vec<u8>> {
    let mut b: serde_json::Value = serde_json::from_slice(body).ok()?;
    let next = b["link"]
        .as_array_mut()?
        .iter_mut()
        .find(|l| l["relation"] == "next")?;
    let mut firsts = ctx.first_pages.lock().ok()?;
    let first = firsts
        .entry(path.to_owned())
        .or_insert_with(|| url.to_owned());
    if first == url {
        return None;
    }
    next["url"] = serde_json::Value::String(first.clone());
    serde_json::to_vec(&b).ok()
}

fn status(code: u16, body: &'static str, retry_after: Option<&str>) -> Response {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        "content-type",
        HeaderValue::from_static("application/fhir+json"),
    );
    if let Some(ra) = retry_after.and_then(|v| HeaderValue::from_str(v).ok()) {
        r.headers_mut().insert("retry-after", ra);
    }
    r
}

/// The first relative `Type/id` reference in a body (or its Bundle entries)
/// that the node does not have.
async fn missing_reference(ctx: &Ctx, body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    let mut refs = Vec::new();
    collect_refs(&v, &mut refs);
    for r in refs {
        let mut it = r.split('/');
        let (Some(t), Some(id), None) = (it.next(), it.next(), it.next()) else {
            continue;
        };
        if !t.chars().next().is_some_and(|c| c.is_ascii_uppercase()) {
            continue;
        }
        let url = format!("{}/{t}/{id}", ctx.target);
        let ok = ctx
            .client
            .get(&url)
            .send()
            .await
            .map(|r| r.status().is_success())
            .unwrap_or(false);
        if !ok {
            return Some(r);
        }
    }
    None
}

fn collect_refs(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, x) in m {
                match (k.as_str(), x) {
                    ("reference", serde_json::Value::String(s)) => out.push(s.clone()),
                    _ => collect_refs(x, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| collect_refs(x, out)),
        _ => {}
    }
}
