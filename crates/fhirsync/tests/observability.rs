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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_can_require_a_bearer_token() {
    let s = InProcess::start_with(fhirsync_testkit::server::Options {
        api: fhirsync_api::ApiConfig {
            metrics_token: Some("scrape-secret-0123456789".into()),
            admin_token: Some("admin-secret-0123456789".into()),
            ..fhirsync_api::ApiConfig::default()
        },
        ..Default::default()
    })
    .await;
    let scrape = |token: Option<&str>| {
        let mut rb = s.client.get(root(&s, "/metrics"));
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send()
    };
    let (st, oo) = status_json(scrape(None).await.unwrap()).await;
    assert_eq!(st, 401);
    assert!(oo["issue"][0]["diagnostics"]
        .as_str()
        .unwrap()
        .contains("metrics_token"));
    assert_eq!(scrape(Some("wrong")).await.unwrap().status(), 401);
    let r = scrape(Some("scrape-secret-0123456789")).await.unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("fhirsync_last_seq"));
    let r = scrape(Some("admin-secret-0123456789")).await.unwrap();
    assert_eq!(r.status(), 200);
}
