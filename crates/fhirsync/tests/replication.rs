//! Parent/child replication between in-process nodes over real HTTP on
//! 127.0.0.1: pull, push, echo suppression, registration, filters,
//! conflicts under each policy, resolution, dead letters, audit, metrics.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fhirsync_api::ChildConfig;
use fhirsync_core::clock::{Clock, SystemClock};
use fhirsync_core::replicate::Policy;
use fhirsync_replica::{EdgeConfig, OnError};
use fhirsync_store::{ChangesQuery, Store};
use fhirsync_testkit::server::Options;
use serde_json::{json, Value};

fn child_cfg(id: &str) -> ChildConfig {
    ChildConfig {
        node_id: id.into(),
        token: format!("token-of-{id}-0123456789"),
        pull: true,
        push: true,
        push_types: Vec::new(),
    }
}

async fn parent_with(id: &str, children: Vec<ChildConfig>, clock: Arc<dyn Clock>) -> InProcess {
    InProcess::start_with(Options {
        node_id: Some(id.into()),
        children,
        clock,
        ..Options::default()
    })
    .await
}

fn edge_to(parent: &InProcess, child: &str) -> EdgeConfig {
    let mut e = EdgeConfig::new(&parent.base, &format!("token-of-{child}-0123456789"));
    e.long_poll_s = 2;
    e.retry_delay_ms_max = 500;
    e
}

async fn child_with(
    id: &str,
    edge: EdgeConfig,
    children: Vec<ChildConfig>,
    clock: Arc<dyn Clock>,
) -> InProcess {
    InProcess::start_with(Options {
        node_id: Some(id.into()),
        parent: Some(edge),
        children,
        clock,
        ..Options::default()
    })
    .await
}

/// Current (type, id) → content hash (`None`: deleted) of a node.
async fn digest(s: &InProcess) -> BTreeMap<(String, String), Option<u128>> {
    let mut out = BTreeMap::new();
    let mut since = 0;
    loop {
        let rows = s
            .store
            .changes(ChangesQuery {
                since,
                count: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        let Some(last) = rows.last() else { break };
        since = last.seq;
        for v in rows {
            let h = v.body.as_deref().map(|b| {
                let m: serde_json::Map<String, Value> = serde_json::from_str(b).unwrap();
                let sp = fhirsync_core::meta::split(&m);
                fhirsync_core::meta::content_hash(&v.rtype, &sp)
            });
            out.insert((v.rtype.clone(), v.id.clone()), h);
        }
    }
    out
}

async fn eventually<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

async fn has(s: &InProcess, path: &str) -> bool {
    get(s, path).await.status() == 200
}

async fn admin(s: &InProcess, path: &str) -> Value {
    let r = s
        .client
        .get(s.base.replace("/fhir", &format!("/admin/{path}")))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.unwrap()
}

fn obs(id: &str, value: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
           "code": {"text": "weight"}, "valueString": value})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pull_and_push_converge_without_echoes() {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let parent = parent_with("parent", vec![child_cfg("c1")], clock.clone()).await;
    for i in 0..30 {
        assert_eq!(
            put(&parent, &format!("Patient/p{i}"), &pat(&format!("p{i}")))
                .await
                .status(),
            201
        );
    }
    let child = child_with("c1", edge_to(&parent, "c1"), vec![], clock).await;
    eventually("child pulled 30 patients", 20, || async {
        digest(&child).await.len() == 30
    })
    .await;
    assert_eq!(
        put(&child, "Observation/o1", &obs("o1", "70 kg"))
            .await
            .status(),
        201
    );
    eventually("parent got the child's observation", 20, || async {
        has(&parent, "Observation/o1").await
    })
    .await;
    // An edit on the parent of a pulled resource comes back down.
    assert_eq!(
        put(
            &parent,
            "Patient/p3",
            &json!({"resourceType":"Patient","id":"p3","active":false})
        )
        .await
        .status(),
        200
    );
    eventually("edit reached the child", 20, || async {
        let (_, v) = status_json(get(&child, "Patient/p3").await).await;
        v["active"] == false
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(digest(&parent).await, digest(&child).await);
    // No echo: each node stored each version exactly once.
    let plog = parent
        .store
        .changes(ChangesQuery {
            since: 0,
            count: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    let clog = child
        .store
        .changes(ChangesQuery {
            since: 0,
            count: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(plog.len(), 32, "parent log");
    assert_eq!(clog.len(), 32, "child log");
    let st = admin(&child, "status").await;
    assert_eq!(st["edges"][0]["pull"]["state"], "ok", "{st}");
    assert_eq!(st["edges"][0]["parentNodeId"], "parent");
    let ch = admin(&parent, "children").await;
    assert_eq!(ch["items"][0]["nodeId"], "c1", "{ch}");
    assert!(
        ch["items"][0]["lastSeqReceived"].as_u64().unwrap() >= 1,
        "{ch}"
    );
}
