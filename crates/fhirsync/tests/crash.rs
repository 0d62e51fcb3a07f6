//! SIGKILL during a heavy write load: after a restart every write that got
//! a 2xx answer is there, and the change log has no gap.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fhirsync_testkit::NodeProcess;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_fhirsync");

/// Acknowledged writes: (`Type/id`, versionId).
type Acks = Arc<Mutex<Vec<(String, u64)>>>;

async fn load(base: String, worker: usize, acks: Acks, stop: Arc<AtomicBool>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut k = 0u64;
    while !stop.load(Ordering::Relaxed) {
        k += 1;
        let (method, url, body) = match k % 3 {
            // Creates with server ids.
            0 => (
                "POST",
                format!("{base}/Observation"),
                json!({"resourceType": "Observation", "status": "final", "code": {"text": format!("w{worker}-{k}")}}),
            ),
            // Updates of a few hot resources.
            1 => {
                let id = format!("hot{}", k % 4);
                (
                    "PUT",
                    format!("{base}/Patient/{id}"),
                    json!({"resourceType": "Patient", "id": id, "birthDate": format!("19{:02}-01-01", k % 100), "name": [{"text": format!("{worker}-{k}")}]}),
                )
            }
            // A small transaction.
            _ => (
                "POST",
                format!("{base}/"),
                json!({"resourceType": "Bundle", "type": "transaction", "entry": [
                    {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000001", "resource": {"resourceType": "Patient", "active": true}, "request": {"method": "POST", "url": "Patient"}},
                    {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "t"}, "subject": {"reference": "urn:uuid:00000000-0000-4000-8000-000000000001"}}, "request": {"method": "POST", "url": "Observation"}}
                ]}),
            ),
        };
        let rb = if method == "POST" {
            client.post(&url)
        } else {
            client.put(&url)
        };
        let Ok(r) = rb
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
            .await
        else {
            continue;
        };
        if !r.status().is_success() {
            continue;
        }
        let Ok(v) = r.json::<Value>().await else {
            continue;
        };
        let mut got = acks.lock().unwrap();
        if v["resourceType"] == "Bundle" {
            for e in v["entry"].as_array().unwrap() {
                let loc = e["response"]["location"].as_str().unwrap();
                let mut parts = loc.split('/');
                let (t, id, _, vid) = (
                    parts.next().unwrap(),
                    parts.next().unwrap(),
                    parts.next(),
                    parts.next().unwrap(),
                );
                got.push((format!("{t}/{id}"), vid.parse().unwrap()));
            }
        } else {
            let key = format!(
                "{}/{}",
                v["resourceType"].as_str().unwrap(),
                v["id"].as_str().unwrap()
            );
            got.push((
                key,
                v["meta"]["versionId"].as_str().unwrap().parse().unwrap(),
            ));
        }
    }
}

async fn check(node: &NodeProcess, acks: &[(String, u64)]) -> u64 {
    let client = reqwest::Client::new();
    for (key, vid) in acks {
        let r = client
            .get(node.url(&format!("{key}/_history/{vid}")))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "acknowledged {key} version {vid} was lost");
    }
    // The change log: 1..=last without a gap.
    let mut since = 0u64;
    let mut seen = HashSet::new();
    loop {
        let b: Value = client
            .get(node.url(&format!("$changes?since={since}&_count=1000")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let entries = b["entry"].as_array().cloned().unwrap_or_default();
        if entries.is_empty() {
            break;
        }
        for e in &entries {
            let seq = e["extension"][0]["extension"][0]["valueDecimal"]
                .as_u64()
                .unwrap();
            assert_eq!(seq, since + 1, "gap in the change log after {since}");
            since = seq;
            let key = e["fullUrl"]
                .as_str()
                .unwrap()
                .rsplitn(3, '/')
                .take(2)
                .collect::<Vec<_>>();
            let vid = e["response"]["etag"]
                .as_str()
                .unwrap()
                .trim_start_matches("W/")
                .trim_matches('"')
                .to_owned();
            assert!(
                seen.insert(format!("{}/{}/{vid}", key[1], key[0])),
                "a version appears twice in the log"
            );
        }
    }
    since
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_writes_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().unwrap();
    let acks: Acks = Arc::new(Mutex::new(Vec::new()));
    let mut last_seq = 0;
    for round in 0..3 {
        let mut node =
            NodeProcess::spawn(BIN.as_ref(), dir.path(), &["--node-id", "crashy"]).unwrap();
        // What survived the previous kill is still there.
        let before = acks.lock().unwrap().clone();
        let seq = check(&node, &before).await;
        assert!(
            seq >= last_seq,
            "round {round}: the log shrank from {last_seq} to {seq}"
        );
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for w in 0..8 {
            tasks.push(tokio::spawn(load(
                node.base.clone(),
                w,
                acks.clone(),
                stop.clone(),
            )));
        }
        tokio::time::sleep(Duration::from_millis(1500)).await;
        node.kill();
        stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
        let n = acks.lock().unwrap().len();
        assert!(
            n > before.len() + 50,
            "round {round}: too little load ({n} acknowledged)"
        );
        last_seq = seq;
    }
    let node = NodeProcess::spawn(BIN.as_ref(), dir.path(), &["--node-id", "crashy"]).unwrap();
    let all = acks.lock().unwrap().clone();
    let seq = check(&node, &all).await;
    assert!(
        seq as usize >= all.len(),
        "log has {seq} entries for {} acknowledged versions",
        all.len()
    );
}
