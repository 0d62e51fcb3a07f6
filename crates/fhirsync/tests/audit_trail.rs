//! The audit trail against a real server: one AuditEvent per audited
//! request (refused ones too) under concurrent load, BALP content (who,
//! what, patient, outcome, address), kept when the patient's data is
//! deleted, append-only, and sync operations recorded on both nodes.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use fhirsync_api::auth::{token_hash, Auth, Scopes, TokenEntry};
use fhirsync_api::{ApiConfig, ChildConfig};
use fhirsync_replica::EdgeConfig;
use fhirsync_testkit::server::Options;
use serde_json::{json, Value};

fn tok(name: &str, scopes: &str) -> TokenEntry {
    TokenEntry {
        name: name.into(),
        sha256: token_hash(name),
        scopes: Scopes::parse(scopes).unwrap(),
    }
}

async fn server() -> InProcess {
    InProcess::start_with(Options {
        api: ApiConfig {
            auth: Arc::new(Auth::new(
                false,
                vec![
                    tok("ehr", "system/*.cruds"),
                    tok("reader", "system/Patient.rs"),
                    tok("auditor", "system/AuditEvent.rs"),
                ],
                Vec::new(),
            )),
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await
}

async fn audit_query(s: &InProcess, q: &str) -> Value {
    let r = s
        .client
        .get(s.url(&format!("AuditEvent?{q}")))
        .bearer_auth("auditor")
        .send()
        .await
        .unwrap();
    let (st, v) = status_json(r).await;
    assert_eq!(st, 200, "{v}");
    v
}

#[tokio::test]
async fn every_request_is_one_audit_event_under_concurrent_load() {
    let s = Arc::new(server().await);
    const WORKERS: usize = 8;
    const ROUNDS: usize = 25;
    let mut tasks = Vec::new();
    for w in 0..WORKERS {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            let mut refused = 0u64;
            for i in 0..ROUNDS {
                let id = format!("w{w}-{i}");
                let p = json!({"resourceType": "Patient", "id": id, "active": true});
                let o = json!({"resourceType": "Observation", "id": format!("o-{id}"), "status": "final",
                               "code": {"text": "hr"}, "subject": {"reference": format!("Patient/{id}")}});
                let c = &s.client;
                let reqs = vec![
                    with_body(c.put(s.url(&format!("Patient/{id}"))), &p).bearer_auth("ehr"),
                    with_body(c.put(s.url(&format!("Observation/o-{id}"))), &o).bearer_auth("ehr"),
                    c.get(s.url(&format!("Observation/o-{id}"))).bearer_auth("ehr"),
                    c.get(s.url(&format!("Patient?_id={id}"))).bearer_auth("reader"),
                    // Refused: wrong scope, then no token.
                    c.get(s.url(&format!("Observation/o-{id}"))).bearer_auth("reader"),
                    c.get(s.url(&format!("Patient/{id}"))),
                    c.delete(s.url(&format!("Observation/o-{id}"))).bearer_auth("ehr"),
                ];
                for rb in reqs {
                    let st = rb.send().await.unwrap().status().as_u16();
                    sent += 1;
                    if st >= 400 {
                        refused += 1;
                    }
                }
            }
            (sent, refused)
        }));
    }
    let (mut sent, mut refused) = (0, 0);
    for t in tasks {
        let (a, b) = t.await.unwrap();
        sent += a;
        refused += b;
    }
    assert_eq!(sent, (WORKERS * ROUNDS * 7) as u64);
    assert_eq!(refused, (WORKERS * ROUNDS * 2) as u64);
    // Every request has its event before its response: no waiting needed.
    let all = audit_query(&s, "_summary=count").await;
    assert_eq!(all["total"], json!(sent), "{all}");
    // The count query itself was audited after it answered.
    let all = audit_query(&s, "_summary=count").await;
    assert_eq!(all["total"], json!(sent + 1));
    let failed = audit_query(&s, "outcome=4&_summary=count").await;
    assert_eq!(failed["total"], json!(refused));
    let anon = audit_query(&s, "agent=anonymous&_summary=count").await;
    assert_eq!(anon["total"], json!((WORKERS * ROUNDS) as u64));

    // One read, in BALP shape.
    let v = audit_query(&s, "entity=Observation/o-w3-7&subtype=read&agent=token:ehr").await;
    assert_eq!(v["total"], 1, "{v}");
    let e = &v["entry"][0]["resource"];
    assert_eq!(e["resourceType"], "AuditEvent");
    assert_eq!(e["type"]["code"], "rest");
    assert_eq!(e["action"], "R");
    assert_eq!(e["outcome"], "0");
    assert_eq!(e["agent"][0]["who"]["display"], "token:ehr");
    assert_eq!(e["agent"][0]["network"]["address"], "127.0.0.1");
    assert_eq!(e["source"]["observer"]["display"], "test-node");
    let refs: Vec<&str> = e["entity"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|x| x["what"]["reference"].as_str())
        .collect();
    assert!(refs.contains(&"Patient/w3-7"), "{refs:?}");
    assert!(
        refs.iter().any(|r| r.starts_with("Observation/o-w3-7")),
        "{refs:?}"
    );
    let id = e["id"].as_str().unwrap();
    let r = s
        .client
        .get(s.url(&format!("AuditEvent/{id}")))
        .bearer_auth("auditor")
        .send()
        .await
        .unwrap();
    let (st, one) = status_json(r).await;
    assert_eq!((st, &one), (200, e));

    // Everything done to one patient: their PUT, the observation's PUT,
    // GET, search, DELETE name them (the refused reads did not see data).
    let v = audit_query(&s, "patient=Patient/w5-3&_count=100").await;
    let subtypes: Vec<&str> = v["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["resource"]["subtype"][0]["code"].as_str().unwrap())
        .collect();
    assert!(
        subtypes.contains(&"update")
            && subtypes.contains(&"read")
            && subtypes.contains(&"search-type"),
        "{subtypes:?}"
    );
    let before = v["total"].as_u64().unwrap();

    // Deleting the patient keeps their trail, and adds the delete.
    let r = s
        .client
        .delete(s.url("Patient/w5-3"))
        .bearer_auth("ehr")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let v = audit_query(&s, "patient=Patient/w5-3&_summary=count").await;
    assert_eq!(v["total"], json!(before + 1));

    // The trail's own records (ids of digits only) cannot be changed or
    // deleted, nor can a client take such an id.
    let fake = json!({"resourceType": "AuditEvent", "id": "1"});
    for (rb, want) in [
        (s.client.put(s.url("AuditEvent/1")), 405),
        (s.client.delete(s.url("AuditEvent/1")), 405),
        (s.client.post(s.url("AuditEvent")), 422),
    ] {
        let r = with_body(rb, &fake)
            .bearer_auth("ehr")
            .send()
            .await
            .unwrap();
        assert!(expect_outcome(r, want).await.contains("audit trail"));
    }
    let v = audit_query(&s, "_summary=count").await;
    let trail_before = v["total"].as_u64().unwrap();
    // An EHR's own AuditEvent is stored as an ordinary, versioned resource,
    // told apart from the node's records by its id and its observer.
    let theirs = json!({"resourceType": "AuditEvent", "id": "ehr-login-7",
        "type": {"system": "http://dicom.nema.org/resources/ontology/DCM", "code": "110114"},
        "recorded": "2026-01-02T03:04:05Z",
        "agent": [{"who": {"display": "dr-otieno"}, "requestor": true}],
        "source": {"observer": {"display": "district-ehr"}}});
    let r = with_body(s.client.put(s.url("AuditEvent/ehr-login-7")), &theirs)
        .bearer_auth("ehr")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let r = s
        .client
        .get(s.url("AuditEvent/ehr-login-7"))
        .bearer_auth("auditor")
        .send()
        .await
        .unwrap();
    let (st, back) = status_json(r).await;
    assert_eq!(st, 200);
    assert_eq!(back["source"]["observer"]["display"], "district-ehr");
    assert_eq!(back["meta"]["versionId"], "1");
    // It is in the change log like any resource (and so replicates).
    let feed = fhirsync_store::Store::changes(
        s.store.as_ref(),
        fhirsync_store::ChangesQuery {
            since: 0,
            count: 1000,
            types: vec!["AuditEvent".into()],
            exclude_via: None,
        },
    );
    assert_eq!(feed.await.unwrap().len(), 1);
    // The node recorded that write in its own trail (one more record),
    // which still answers the trail's searches.
    let v = audit_query(&s, "_summary=count").await;
    assert!(v["total"].as_u64().unwrap() > trail_before, "{v}");
    // Reading it needs its own scope; bad parameters get 400.
    let r = s
        .client
        .get(s.url("AuditEvent"))
        .bearer_auth("reader")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 403).await;
    let r = s
        .client
        .get(s.url("AuditEvent?date=yesterday"))
        .bearer_auth("auditor")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 400).await;
    let r = s
        .client
        .get(s.url("AuditEvent?color=red"))
        .bearer_auth("auditor")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 400).await;
    // Paging newest first, with a next link.
    let v = audit_query(&s, "_count=5").await;
    assert_eq!(v["entry"].as_array().unwrap().len(), 5);
    let next = v["link"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["relation"] == "next")
        .unwrap();
    let r = s
        .client
        .get(next["url"].as_str().unwrap())
        .bearer_auth("auditor")
        .send()
        .await
        .unwrap();
    let (_, p2) = status_json(r).await;
    let last1: u64 = v["entry"][4]["resource"]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let first2: u64 = p2["entry"][0]["resource"]["id"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(first2 < last1);
}

#[tokio::test]
async fn sync_operations_are_audit_events_on_both_nodes() {
    let parent = InProcess::start_with(Options {
        node_id: Some("district".into()),
        children: vec![ChildConfig {
            node_id: "clinic".into(),
            token: "edge".into(),
            pull: true,
            push: true,
            push_types: Vec::new(),
        }],
        ..Options::default()
    })
    .await;
    let mut edge = EdgeConfig::new(&parent.base, "edge");
    edge.long_poll_s = 1;
    let child = InProcess::start_with(Options {
        node_id: Some("clinic".into()),
        parent: Some(edge),
        ..Options::default()
    })
    .await;
    let p = json!({"resourceType": "Patient", "id": "s1", "active": true});
    assert_eq!(put(&child, "Patient/s1", &p).await.status(), 201);
    for _ in 0..200 {
        if get(&parent, "Patient/s1").await.status() == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The parent: the child's pushes ($apply by node:clinic) and the
    // stored batch (a sync event).
    let mut ok = false;
    for _ in 0..100 {
        let (_, applied) =
            status_json(get(&parent, "AuditEvent?subtype=apply&agent=node:clinic").await).await;
        let (_, stored) =
            status_json(get(&parent, "AuditEvent?type=110106&subtype=push").await).await;
        let (_, pushed) =
            status_json(get(&child, "AuditEvent?type=110106&subtype=push").await).await;
        if applied["total"].as_u64() >= Some(1)
            && stored["total"].as_u64() >= Some(1)
            && pushed["total"].as_u64() >= Some(1)
        {
            let d = stored["entry"][0]["resource"]["outcomeDesc"]
                .as_str()
                .unwrap();
            assert!(d.contains("from clinic"), "{d}");
            assert_eq!(
                stored["entry"][0]["resource"]["source"]["observer"]["display"],
                "district"
            );
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ok, "sync operations were not audited");
}

/// With `audit_wait`, an answer means its record is committed: the store
/// holds every record the moment the responses are in, with no flush.
#[tokio::test]
async fn audit_wait_commits_before_the_answer() {
    let s = Arc::new(
        InProcess::start_with(Options {
            api: ApiConfig {
                audit_wait: true,
                ..ApiConfig::default()
            },
            ..Options::default()
        })
        .await,
    );
    let mut tasks = Vec::new();
    for i in 0..40 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let p = json!({"resourceType": "Patient", "id": format!("p{i}")});
            assert_eq!(put(&s, &format!("Patient/p{i}"), &p).await.status(), 201);
            assert_eq!(get(&s, &format!("Patient/p{i}")).await.status(), 200);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, n) = fhirsync_store::Store::audit_events(
        s.store.as_ref(),
        fhirsync_store::AuditQuery::default(),
    )
    .await
    .unwrap();
    assert_eq!(n, 80);
}

/// A node stopped with SIGTERM commits the records of its last answers:
/// after a restart the trail counts every request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_stop_keeps_every_record() {
    let bin = std::path::Path::new(env!("CARGO_BIN_EXE_fhirsync"));
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let mut node = fhirsync_testkit::NodeProcess::spawn(bin, &data, &[]).unwrap();
    let http = reqwest::Client::new();
    for i in 0..150 {
        let r = http
            .put(node.url(&format!("Patient/p{i}")))
            .header("content-type", FHIR_JSON)
            .body(json!({"resourceType": "Patient", "id": format!("p{i}")}).to_string())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
    }
    let st = node.terminate(Duration::from_secs(20)).unwrap();
    assert!(st.success(), "{st}");
    let node = fhirsync_testkit::NodeProcess::spawn(bin, &data, &[]).unwrap();
    let v: Value = http
        .get(node.url("AuditEvent?_summary=count&subtype=update"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["total"], 150, "{v}");
}

/// The trail's commits add no version, so they wake no change-log listener
/// (long polls, the subscription matcher, the edges); a write does.
#[tokio::test]
async fn audit_commits_do_not_wake_change_listeners() {
    let s = InProcess::start_with(Options {
        api: ApiConfig {
            audit_wait: true,
            ..ApiConfig::default()
        },
        ..Options::default()
    })
    .await;
    let p = json!({"resourceType": "Patient", "id": "w"});
    assert_eq!(put(&s, "Patient/w", &p).await.status(), 201);
    let mut rx = fhirsync_store::Store::watch_seq(s.store.as_ref());
    rx.borrow_and_update();
    for _ in 0..5 {
        // Each read's record is committed before its answer (audit_wait).
        assert_eq!(get(&s, "Patient/w").await.status(), 200);
    }
    assert!(
        !rx.has_changed().unwrap(),
        "an audit commit woke the listeners"
    );
    let p = json!({"resourceType": "Patient", "id": "w", "active": true});
    assert_eq!(put(&s, "Patient/w", &p).await.status(), 200);
    assert!(rx.has_changed().unwrap());
}
