//! Request counts and latency histograms of the HTTP layer, by FHIR
//! interaction, for `/metrics`. Lock-free: a fixed table of atomics.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use axum::extract::{Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use crate::AppState;

/// The interactions requests are counted under.
pub const INTERACTIONS: &[&str] = &[
    "read",
    "vread",
    "update",
    "create",
    "delete",
    "search-type",
    "search-system",
    "history-instance",
    "history-type",
    "history-system",
    "transaction",
    "capabilities",
    "changes",
    "apply",
    "verify",
    "operation",
    "bulk",
    "admin",
    "metrics",
    "health",
    "other",
];

/// Upper bounds of the latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

struct Row {
    /// By status class: 1xx .. 5xx.
    codes: [AtomicU64; 5],
    /// Cumulative counts per bucket are computed when rendering.
    buckets: [AtomicU64; BUCKETS.len()],
    sum_us: AtomicU64,
}

pub struct HttpMetrics {
    rows: Vec<Row>,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        HttpMetrics {
            rows: INTERACTIONS
                .iter()
                .map(|_| Row {
                    codes: Default::default(),
                    buckets: Default::default(),
                    sum_us: AtomicU64::new(0),
                })
                .collect(),
        }
    }
}

/// The interaction a request is, from its method and path.
pub fn classify(method: &Method, path: &str) -> &'static str {
    if path == "/metrics" {
        return "metrics";
    }
    if path == "/healthz" || path == "/readyz" {
        return "health";
    }
    if path.starts_with("/admin") {
        return "admin";
    }
    let Some(rest) = path.strip_prefix("/fhir") else {
        return "other";
    };
    let seg: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
    let m = method.as_str();
    match (seg.as_slice(), m) {
        ([], "POST") => "transaction",
        ([], "GET") => "search-system",
        (["metadata"], _) => "capabilities",
        (["$changes"], _) => "changes",
        (["$apply"], _) => "apply",
        (["$summary" | "$current"], _) => "verify",
        (["$export" | "$import" | "$bulk-status" | "$bulk-file", ..], _)
        | ([_, "$export"], _)
        | ([_, _, "$export"], _) => "bulk",
        (["_history"], _) => "history-system",
        ([_], "GET") | ([_, "_search"], _) => "search-type",
        ([_], "POST") => "create",
        ([_], "PUT") => "update",
        ([_], "DELETE") => "delete",
        ([_, "_history"], _) => "history-type",
        ([_, id], _) if id.starts_with('$') => "operation",
        ([_, _], "GET") => "read",
        ([_, _], "PUT") => "update",
        ([_, _], "DELETE") => "delete",
        ([_, _, "_history"], _) => "history-instance",
        ([_, _, "_history", _], _) => "vread",
        ([_, _, op], _) if op.starts_with('$') => "operation",
        _ => "other",
    }
}

impl HttpMetrics {
    pub fn record(&self, interaction: &str, status: u16, secs: f64) {
        let i = INTERACTIONS
            .iter()
            .position(|x| *x == interaction)
            .unwrap_or(INTERACTIONS.len() - 1);
        let row = &self.rows[i];
        let class = (status / 100).clamp(1, 5) as usize - 1;
        row.codes[class].fetch_add(1, Relaxed);
        if let Some(b) = BUCKETS.iter().position(|b| secs <= *b) {
            row.buckets[b].fetch_add(1, Relaxed);
        }
        row.sum_us.fetch_add((secs * 1e6) as u64, Relaxed);
    }

    /// Appends `fhirsync_http_requests_total` and
    /// `fhirsync_http_request_duration_seconds` in the Prometheus format.
    pub fn render(&self, out: &mut String) {
        out.push_str("# HELP fhirsync_http_requests_total HTTP requests answered, by interaction and status class.\n");
        out.push_str("# TYPE fhirsync_http_requests_total counter\n");
        for (name, row) in INTERACTIONS.iter().zip(&self.rows) {
            for (k, c) in row.codes.iter().enumerate() {
                let n = c.load(Relaxed);
                if n > 0 {
                    out.push_str(&format!(
                        "fhirsync_http_requests_total{{interaction=\"{name}\",code=\"{}xx\"}} {n}\n",
                        k + 1
                    ));
                }
            }
        }
        out.push_str("# HELP fhirsync_http_request_duration_seconds Time from request to response head, by interaction.\n");
        out.push_str("# TYPE fhirsync_http_request_duration_seconds histogram\n");
        for (name, row) in INTERACTIONS.iter().zip(&self.rows) {
            let total: u64 = row.codes.iter().map(|c| c.load(Relaxed)).sum();
            if total == 0 {
                continue;
            }
            let mut cum = 0;
            for (b, c) in BUCKETS.iter().zip(&row.buckets) {
                cum += c.load(Relaxed);
                out.push_str(&format!(
                    "fhirsync_http_request_duration_seconds_bucket{{interaction=\"{name}\",le=\"{b}\"}} {cum}\n"
                ));
            }
            out.push_str(&format!(
                "fhirsync_http_request_duration_seconds_bucket{{interaction=\"{name}\",le=\"+Inf\"}} {total}\n"
            ));
            out.push_str(&format!(
                "fhirsync_http_request_duration_seconds_sum{{interaction=\"{name}\"}} {}\n",
                row.sum_us.load(Relaxed) as f64 / 1e6
            ));
            out.push_str(&format!(
                "fhirsync_http_request_duration_seconds_count{{interaction=\"{name}\"}} {total}\n"
            ));
        }
    }
}

/// The middleware: times every request and counts it.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let what = classify(req.method(), req.uri().path());
    let t = Instant::now();
    let r = next.run(req).await;
    state
        .http_metrics
        .record(what, r.status().as_u16(), t.elapsed().as_secs_f64());
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies() {
        let g = Method::GET;
        assert_eq!(classify(&g, "/fhir/Patient/1"), "read");
        assert_eq!(classify(&g, "/fhir/Patient/1/_history/2"), "vread");
        assert_eq!(classify(&g, "/fhir/Patient"), "search-type");
        assert_eq!(classify(&Method::POST, "/fhir/Patient"), "create");
        assert_eq!(classify(&Method::PUT, "/fhir/Patient/1"), "update");
        assert_eq!(classify(&Method::POST, "/fhir"), "transaction");
        assert_eq!(classify(&g, "/fhir/Subscription/s/$status"), "operation");
        assert_eq!(classify(&g, "/fhir/$changes"), "changes");
        assert_eq!(classify(&Method::POST, "/fhir/$summary"), "verify");
        assert_eq!(classify(&g, "/admin/edges"), "admin");
        assert_eq!(classify(&g, "/nowhere"), "other");
    }

    #[test]
    fn renders_a_histogram() {
        let m = HttpMetrics::default();
        m.record("read", 200, 0.0005);
        m.record("read", 404, 0.02);
        let mut out = String::new();
        m.render(&mut out);
        assert!(out.contains("fhirsync_http_requests_total{interaction=\"read\",code=\"2xx\"} 1"));
        assert!(out.contains("fhirsync_http_requests_total{interaction=\"read\",code=\"4xx\"} 1"));
        assert!(out.contains(
            "fhirsync_http_request_duration_seconds_bucket{interaction=\"read\",le=\"0.001\"} 1"
        ));
        assert!(out.contains(
            "fhirsync_http_request_duration_seconds_bucket{interaction=\"read\",le=\"0.025\"} 2"
        ));
        assert!(
            out.contains("fhirsync_http_request_duration_seconds_count{interaction=\"read\"} 2")
        );
    }
}
