//! The change feed: gapless, ordered, filtered, with cursors and long-poll.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn feed_is_gapless_and_carries_sync_metadata() {
    let s = InProcess::start().await;
    for i in 0..25 {
        put(&s, &format!("Patient/p{}", i % 7), &json!({"resourceType": "Patient", "id": format!("p{}", i % 7), "birthDate": format!("2001-01-{:02}", i + 1)})).await;
    }
    put(&s, "Observation/o", &json!({"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"}})).await;
    delete(&s, "Patient/p0").await;
    let mut since = 0;
    let mut all = Vec::new();
    loop {
        let (st, b) = status_json(get(&s, &format!("$changes?since={since}&_count=4")).await).await;
        assert_eq!(st, 200, "{b}");
        let got = feed_seqs(&b);
        if got.is_empty() {
            break;
        }
        let next = next_link(&b).unwrap();
        since = *got.last().unwrap();
        assert!(next.contains(&format!("since={since}")), "{next}");
        all.extend(got);
    }
    assert_eq!(all, (1..=27).collect::<Vec<u64>>());
    let (_, b) = status_json(get(&s, "$changes?since=25").await).await;
    let e = b["entry"].as_array().unwrap();
    assert_eq!(e[0]["resource"]["resourceType"], "Observation");
    assert_eq!(e[1]["request"]["method"], "DELETE");
    assert!(e[1].get("resource").is_none());
    let meta = e[1]["extension"][0]["extension"].as_array().unwrap();
    let get_ext = |n: &str| meta.iter().find(|x| x["url"] == n).unwrap().clone();
    assert_eq!(get_ext("origin")["valueString"], "test-node");
    let vv: Value =
        serde_json::from_str(get_ext("vector")["valueString"].as_str().unwrap()).unwrap();
    // p0 had versions at i = 0, 7, 14, 21 and the delete: 5 local edits.
    assert_eq!(vv, json!({"test-node": 5}));
    assert!(get_ext("hlc")["valueString"]
        .as_str()
        .unwrap()
        .contains('.'));
}

#[tokio::test]
async fn type_filter_and_bad_parameters() {
    let s = InProcess::start().await;
    put(&s, "Patient/a", &pat("a")).await;
    put(&s, "Observation/o", &json!({"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"}})).await;
    put(&s, "Patient/b", &pat("b")).await;
    let (_, b) = status_json(get(&s, "$changes?_type=Patient").await).await;
    assert_eq!(feed_seqs(&b), vec![1, 3]);
    let (_, b) = status_json(get(&s, "$changes?_type=Observation,Patient&since=1").await).await;
    assert_eq!(feed_seqs(&b), vec![2, 3]);
    for bad in [
        "$changes?since=-1",
        "$changes?since=x",
        "$changes?_type=Nope",
        "$changes?_count=abc",
        "$changes?wait=soon",
    ] {
        expect_outcome(get(&s, bad).await, 400).await;
    }
}

#[tokio::test]
async fn long_poll_wakes_on_commit_and_times_out() {
    let s = InProcess::start().await;
    put(&s, "Patient/a", &pat("a")).await;
    // Nothing new: waits about the asked time, then answers empty.
    let t = Instant::now();
    let (_, b) = status_json(get(&s, "$changes?since=1&wait=1").await).await;
    assert!(feed_seqs(&b).is_empty());
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    // A write during the wait ends it early with the new entry.
    let url = s.url("$changes?since=1&wait=20");
    let client = s.client.clone();
    let poll = tokio::spawn(async move {
        client
            .get(url)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    put(&s, "Patient/b", &pat("b")).await;
    let b = poll.await.unwrap();
    assert_eq!(feed_seqs(&b), vec![2]);
    assert!(t.elapsed() < Duration::from_secs(5));
    // A write of a filtered-out type does not end a filtered wait.
    let url = s.url("$changes?since=2&wait=2&_type=Observation");
    let client = s.client.clone();
    let poll = tokio::spawn(async move {
        client
            .get(url)
            .send()
            .await
            .unwrap()
            .json::<Value>()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    put(&s, "Patient/c", &pat("c")).await;
    let b = poll.await.unwrap();
    assert!(feed_seqs(&b).is_empty());
}
