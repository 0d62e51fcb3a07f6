//! Health and readiness endpoints, and the HTTP layer's metrics.

mod common;

use common::*;
use fhirsync_testkit::server::InProcess;

fn root(s: &InProcess, path: &str) -> String {
    format!("{}{path}", s.base.trim_end_matches("/fhir"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_readiness_and_request_metrics() {
    let s = InProcess::start().await;
    let (st, live) = status_json(s.client.get(root(&s, "/healthz")).send().await.unwrap()).await;
    assert_eq!((st, live["status"].as_str()), (200, Some("pass")));
    let (st, ready) = status_json(s.client.get(root(&s, "/readyz")).send().await.unwrap()).await;
    assert_eq!(st, 200);
    assert_eq!(ready["nodeId"], "test-node");

    assert_eq!(put(&s, "Patient/a", &pat("a")).await.status().as_u16(), 201);
    assert_eq!(get(&s, "Patient/a").await.status().as_u16(), 200);
    assert_eq!(get(&s, "Patient/nope").await.status().as_u16(), 404);
    assert_eq!(get(&s, "Patient?_id=a").await.status().as_u16(), 200);
    let m = metrics(&s).await;
    for line in [
        "fhirsync_http_requests_total{interaction=\"update\",code=\"2xx\"} 1",
        "fhirsync_http_requests_total{interaction=\"read\",code=\"2xx\"} 1",
        "fhirsync_http_requests_total{interaction=\"read\",code=\"4xx\"} 1",
        "fhirsync_http_requests_total{interaction=\"search-type\",code=\"2xx\"} 1",
        "fhirsync_http_requests_total{interaction=\"health\",code=\"2xx\"} 2",
        "fhirsync_http_request_duration_seconds_count{interaction=\"read\"} 2",
        "fhirsync_http_request_duration_seconds_bucket{interaction=\"read\",le=\"+Inf\"} 2",
        "# TYPE fhirsync_http_request_duration_seconds histogram",
    ] {
        assert!(m.contains(line), "{line} not in\n{m}");
    }
}
