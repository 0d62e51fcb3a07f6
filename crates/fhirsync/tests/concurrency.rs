//! Concurrent writers: optimistic locking loses no update, versions are
//! contiguous, and the change log has no gap.

mod common;

use std::collections::HashSet;

use common::*;
use fhirsync_store::ChangesQuery;
use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_clients_with_if_match_lose_no_update() {
    let s = InProcess::start().await;
    put(
        &s,
        "Patient/shared",
        &json!({"resourceType": "Patient", "id": "shared",
                "extension": [{"url": "http://x/edit", "valueString": "start"}]}),
    )
    .await;
    const CLIENTS: usize = 8;
    const EACH: usize = 15;
    let mut tasks = Vec::new();
    for c in 0..CLIENTS {
        let client = s.client.clone();
        let url = s.url("Patient/shared");
        tasks.push(tokio::spawn(async move {
            let mut retries = 0;
            for k in 0..EACH {
                loop {
                    let r = client.get(&url).send().await.unwrap();
                    let etag = r.headers()["etag"].to_str().unwrap().to_owned();
                    let mut p: Value = r.json().await.unwrap();
                    p["extension"]
                        .as_array_mut()
                        .unwrap()
                        .push(json!({"url": "http://x/edit", "valueString": format!("{c}-{k}")}));
                    let r = client
                        .put(&url)
                        .header("content-type", FHIR_JSON)
                        .header("if-match", etag)
                        .body(p.to_string())
                        .send()
                        .await
                        .unwrap();
                    match r.status().as_u16() {
                        200 => break,
                        412 => retries += 1,
                        other => panic!("unexpected {other}"),
                    }
                }
            }
            retries
        }));
    }
    let mut retries = 0;
    for t in tasks {
        retries += t.await.unwrap();
    }
    let (_, p) = status_json(get(&s, "Patient/shared").await).await;
    let edits: HashSet<String> = p["extension"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["valueString"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(edits.len(), CLIENTS * EACH + 1, "an update was lost");
    assert_eq!(p["meta"]["versionId"], (CLIENTS * EACH + 1).to_string());
    assert!(retries > 0, "the test did not exercise conflicts");
    // Versions 1..=N all readable, contiguous.
    for v in 1..=(CLIENTS * EACH + 1) {
        assert_eq!(
            get(&s, &format!("Patient/shared/_history/{v}"))
                .await
                .status(),
            200,
            "version {v}"
        );
    }
    let log = s
        .store
        .changes(ChangesQuery {
            since: 0,
            count: 1000,
            types: vec![],
            ..Default::default()
        })
        .await
        .unwrap();
    let seqs: Vec<u64> = log.iter().map(|v| v.seq).collect();
    assert_eq!(seqs, (1..=(CLIENTS * EACH + 1) as u64).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_creates_share_commits_without_gaps() {
    let s = InProcess::start().await;
    let mut tasks = Vec::new();
    for c in 0..16 {
        let client = s.client.clone();
        let url = s.url("Observation");
        tasks.push(tokio::spawn(async move {
            for k in 0..25 {
                let o = json!({"resourceType": "Observation", "status": "final", "code": {"text": format!("{c}-{k}")}});
                let r = client.post(&url).header("content-type", FHIR_JSON).body(o.to_string()).send().await.unwrap();
                assert_eq!(r.status(), 201);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let log = s
        .store
        .changes(ChangesQuery {
            since: 0,
            count: 1000,
            types: vec![],
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        log.iter().map(|v| v.seq).collect::<Vec<_>>(),
        (1..=400).collect::<Vec<u64>>()
    );
    let ids: HashSet<&str> = log.iter().map(|v| v.id.as_str()).collect();
    assert_eq!(ids.len(), 400);
}
