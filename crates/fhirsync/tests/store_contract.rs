//! The store contract, run on both backends: every test here runs once on
//! SQLite and once on PostgreSQL (a server the harness starts, a database
//! per node), through the node's REST API and the `Store` trait. What the
//! node does must not depend on where it stores.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use fhirsync_api::ChildConfig;
use fhirsync_core::audit::{AuditRecord, Who};
use fhirsync_replica::EdgeConfig;
use fhirsync_store::{
    AuditQuery, ChangesQuery, HistoryQuery, HistoryScope, ListQuery, SyncWrite, WriteRequest,
};
use fhirsync_testkit::postgres::Postgres;
use fhirsync_testkit::server::Options;
use serde_json::{json, Value};

/// Where a test's nodes store.
enum Backend {
    Sqlite,
    Postgres(Arc<Postgres>, AtomicUsize),
}

impl Backend {
    fn postgres() -> Backend {
        Backend::Postgres(
            Arc::new(Postgres::start().expect("a PostgreSQL server")),
            AtomicUsize::new(0),
        )
    }

    /// A node on this backend (a database of its own on PostgreSQL).
    async fn node(&self, opts: Options) -> InProcess {
        // the node's errors in the test's output (shown when it fails)
        let _ = tracing_subscriber::fmt()
            .with_env_filter("warn")
            .with_test_writer()
            .try_init();
        let postgres = match self {
            Backend::Sqlite => None,
            Backend::Postgres(pg, n) => {
                let i = n.fetch_add(1, Ordering::Relaxed);
                Some(pg.create_db(&format!("node{i}")))
            }
        };
        InProcess::start_with(Options { postgres, ..opts }).await
    }
}

/// Each named test on both backends: `name::sqlite` and `name::postgres`.
macro_rules! contract {
    ($($name:ident),* $(,)?) => {$(
        mod $name {
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn sqlite() {
                super::$name(super::Backend::Sqlite).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn postgres() {
                super::$name(super::Backend::postgres()).await
            }
        }
    )*};
}

contract!(
    crud_history_and_the_change_log,
    transactions_are_all_or_nothing,
    search_reads_every_kind_of_index,
    replication_both_ways_with_a_conflict,
    custom_search_parameters_and_export,
    a_load_in_bulk_keeps_every_version_and_index_row,
    anti_entropy_finds_exactly_the_differences_and_repairs_them,
    audit_events_are_found_by_patient_entity_and_time,
);

fn obs(id: &str, patient: &str, code: &str, value: f64, when: &str) -> Value {
    json!({"resourceType": "Observation", "id": id, "status": "final",
           "code": {"coding": [{"system": "http://loinc.org", "code": code}], "text": "vital"},
           "subject": {"reference": format!("Patient/{patient}")},
           "effectiveDateTime": when,
           "valueQuantity": {"value": value, "unit": "kg", "system": "http://unitsofmeasure.org", "code": "kg"}})
}

async fn crud_history_and_the_change_log(b: Backend) {
    let s = b.node(Options::default()).await;
    assert_eq!(put(&s, "Patient/a", &pat("a")).await.status(), 201);
    let r = put(
        &s,
        "Patient/a",
        &json!({"resourceType":"Patient","id":"a","active":false}),
    )
    .await;
    assert_eq!(r.status(), 200);
    // The same content again makes no version.
    let r = put(
        &s,
        "Patient/a",
        &json!({"resourceType":"Patient","id":"a","active":false}),
    )
    .await;
    assert_eq!(r.status(), 200);
    let (st, v) = status_json(get(&s, "Patient/a").await).await;
    assert_eq!((st, v["meta"]["versionId"].as_str()), (200, Some("2")));
    let (st, v1) = status_json(get(&s, "Patient/a/_history/1").await).await;
    assert_eq!((st, v1["active"].as_bool()), (200, Some(true)));
    // If-Match on a stale version is refused and changes nothing.
    let r = with_body(s.client.put(s.url("Patient/a")), &pat("a"))
        .header("if-match", "W/\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 412);
    // Conditional create finds the existing one.
    let r = with_body(s.client.post(s.url("Patient")), &pat("x"))
        .header("if-none-exist", "_id=a")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = post(
        &s,
        "Patient",
        &json!({"resourceType":"Patient","gender":"female"}),
    )
    .await;
    assert_eq!(r.status(), 201);
    assert_eq!(delete(&s, "Patient/a").await.status(), 204);
    assert_eq!(get(&s, "Patient/a").await.status(), 410);
    let h = s
        .store
        .history(HistoryQuery {
            scope: HistoryScope::Instance("Patient".into(), "a".into()),
            before: None,
            since_ms: None,
            count: 10,
        })
        .await
        .unwrap();
    assert_eq!(h.iter().map(|v| v.vid).collect::<Vec<_>>(), vec![3, 2, 1]);
    assert!(h[0].deleted);
    // The change log: every version once, in order, gapless.
    let log = s
        .store
        .changes(ChangesQuery {
            since: 0,
            count: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let seqs: Vec<u64> = log.iter().map(|v| v.seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 4]);
    assert_eq!(s.store.last_seq(), 4);
    assert!(log.windows(2).all(|w| w[0].hlc < w[1].hlc));
    let (st, feed) = status_json(get(&s, "$changes?since=2").await).await;
    assert_eq!(st, 200);
    assert_eq!(feed["entry"].as_array().unwrap().len(), 2, "{feed}");
}

async fn transactions_are_all_or_nothing(b: Backend) {
    let s = b.node(Options::default()).await;
    let tx = json!({"resourceType":"Bundle","type":"transaction","entry":[
        {"fullUrl":"urn:uuid:p","resource":{"resourceType":"Patient","name":[{"family":"Otieno"}]},
         "request":{"method":"POST","url":"Patient"}},
        {"resource":{"resourceType":"Observation","status":"final","code":{"text":"t"},
                     "subject":{"reference":"urn:uuid:p"}},
         "request":{"method":"POST","url":"Observation"}}]});
    let (st, out) = status_json(post(&s, "", &tx).await).await;
    assert_eq!(st, 200, "{out}");
    let before = s.store.last_seq();
    assert_eq!(before, 2);
    let (_, obs_list) = status_json(
        get(
            &s,
            "Observation?subject:Patient.family=Otieno&_total=accurate",
        )
        .await,
    )
    .await;
    assert_eq!(obs_list["total"], 1, "{obs_list}");
    // One bad entry: nothing of the transaction stays.
    let bad = json!({"resourceType":"Bundle","type":"transaction","entry":[
        {"resource":{"resourceType":"Patient","id":"t1"},"request":{"method":"PUT","url":"Patient/t1"}},
        {"request":{"method":"DELETE","url":"Patient/t1"}},
        {"resource":{"resourceType":"Patient","id":"t2"},"request":{"method":"PUT","url":"Patient/t2"},
         "_bad": true},
        {"request":{"method":"PUT","url":"Patient/t3"},
         "resource":{"resourceType":"Observation","id":"t3"}}]});
    let r = post(&s, "", &bad).await;
    assert!(r.status().is_client_error(), "{}", r.status());
    assert_eq!(s.store.last_seq(), before);
    assert_eq!(get(&s, "Patient/t1").await.status(), 404);
    // A batch keeps what succeeded.
    let batch = json!({"resourceType":"Bundle","type":"batch","entry":[
        {"resource":{"resourceType":"Patient","id":"b1"},"request":{"method":"PUT","url":"Patient/b1"}},
        {"resource":{"resourceType":"Observation","id":"b2"},"request":{"method":"PUT","url":"Observation/b2"}},
        {"resource":{"resourceType":"Patient","id":"b3"},"request":{"method":"PUT","url":"Patient/b3"}}]});
    let (st, out) = status_json(post(&s, "", &batch).await).await;
    assert_eq!(st, 200);
    let statuses: Vec<&str> = entry_statuses(&out);
    assert!(
        statuses[0].starts_with("201") && statuses[2].starts_with("201"),
        "{statuses:?}"
    );
    assert!(!statuses[1].starts_with('2'), "{statuses:?}");
    assert_eq!(s.store.last_seq(), before + 2);
    let log = s
        .store
        .changes(ChangesQuery {
            since: 0,
            count: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(log.len() as u64, before + 2, "a rolled-back seq left a gap");
}

async fn search_reads_every_kind_of_index(b: Backend) {
    let s = b.node(Options::default()).await;
    let mut entries = Vec::new();
    for (id, family, birth) in [
        ("p1", "Otieno", "1980-05-01"),
        ("p2", "Wanjiru", "1992-11-30"),
    ] {
        entries.push(
            json!({"resource":{"resourceType":"Patient","id":id,"gender":"female",
            "name":[{"family":family,"given":["Amani"]}],"birthDate":birth},
            "request":{"method":"PUT","url":format!("Patient/{id}")}}),
        );
    }
    for i in 0..12 {
        let (p, code) = if i % 3 == 0 {
            ("p2", "29463-7")
        } else {
            ("p1", "8867-4")
        };
        let when = format!("2024-01-{:02}", i + 1);
        entries.push(
            json!({"resource": obs(&format!("o{i}"), p, code, 50.0 + i as f64, &when),
            "request":{"method":"PUT","url":format!("Observation/o{i}")}}),
        );
    }
    let tx = json!({"resourceType":"Bundle","type":"transaction","entry":entries});
    let (st, out) = status_json(post(&s, "", &tx).await).await;
    assert_eq!(st, 200, "{out}");
    let count = |q: &'static str| {
        let s = &s;
        async move {
            let (st, b) = status_json(get(s, &format!("{q}&_total=accurate")).await).await;
            assert_eq!(st, 200, "{q}: {b}");
            b["total"]
                .as_u64()
                .unwrap_or_else(|| panic!("{q}: no total in {b}"))
        }
    };
    assert_eq!(count("Observation?code=http://loinc.org|29463-7").await, 4);
    assert_eq!(count("Observation?code=8867-4").await, 8);
    assert_eq!(count("Patient?name=otie").await, 1);
    assert_eq!(count("Patient?family:exact=Wanjiru").await, 1);
    assert_eq!(count("Patient?birthdate=lt1990").await, 1);
    assert_eq!(
        count("Observation?date=ge2024-01-06&date=le2024-01-08").await,
        3
    );
    assert_eq!(count("Observation?value-quantity=gt58").await, 3);
    assert_eq!(count("Observation?subject:Patient.name=Wanjiru").await, 4);
    assert_eq!(
        count("Patient?_has:Observation:subject:code=29463-7").await,
        1
    );
    assert_eq!(count("Observation?subject=Patient/p1&code=8867-4").await, 8);
    assert_eq!(count("Observation?_id=o1,o2,o3").await, 3);
    assert_eq!(count("Patient?gender:missing=true").await, 0);
    assert_eq!(count("Patient/p2/Observation?code=29463-7").await, 4);
    // Sorting and paging.
    let (_, b1) = status_json(get(&s, "Observation?_sort=-date&_count=5").await).await;
    assert_eq!(
        entry_ids(&b1),
        ["o11", "o10", "o9", "o8", "o7"].map(|i| format!("Observation/{i}"))
    );
    let (all, pages) = all_pages(&s, "Observation?_count=5").await;
    assert_eq!((all.len(), pages), (12, 3));
    // Includes.
    let (_, inc) =
        status_json(get(&s, "Observation?_id=o0&_include=Observation:subject").await).await;
    assert_eq!(entry_ids(&inc), vec!["Observation/o0", "Patient/p2"]);
    let (_, rev) =
        status_json(get(&s, "Patient?_id=p2&_revinclude=Observation:subject").await).await;
    assert_eq!(entry_ids(&rev).len(), 5);
    // A conditional update finds its match through the index.
    let r = with_body(
        s.client.put(s.url("Patient?family=Wanjiru")),
        &json!({"resourceType":"Patient","id":"p2","gender":"female","active":true}),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(count("Patient?active=true").await, 1);
}

fn child_cfg(id: &str) -> ChildConfig {
    ChildConfig {
        node_id: id.into(),
        token: format!("token-of-{id}-0123456789"),
        pull: true,
        push: true,
        push_types: Vec::new(),
    }
}

/// A parent with `n` patients and a child `c1` that has pulled them all;
/// `edit` adjusts the child's edge first.
async fn replicating_pair(
    b: &Backend,
    n: usize,
    edit: impl FnOnce(&mut EdgeConfig),
) -> (InProcess, InProcess) {
    let parent = b
        .node(Options {
            node_id: Some("parent".into()),
            children: vec![child_cfg("c1")],
            ..Options::default()
        })
        .await;
    for i in 0..n {
        put(&parent, &format!("Patient/p{i}"), &pat(&format!("p{i}"))).await;
    }
    let mut edge = EdgeConfig::new(&parent.base, "token-of-c1-0123456789");
    edge.long_poll_s = 2;
    edge.retry_delay_ms_max = 300;
    edit(&mut edge);
    let child = b
        .node(Options {
            node_id: Some("c1".into()),
            parent: Some(edge),
            ..Options::default()
        })
        .await;
    eventually(&format!("the child pulled {n} patients"), 30, || async {
        store_digest(child.store.as_ref()).await.0.len() == n
    })
    .await;
    (parent, child)
}

async fn replication_both_ways_with_a_conflict(b: Backend) {
    let (parent, child) = replicating_pair(&b, 20, |_| {}).await;
    put(
        &child,
        "Observation/x",
        &obs("x", "p1", "8867-4", 70.0, "2024-02-01"),
    )
    .await;
    eventually("the parent got the child's write", 30, || async {
        get(&parent, "Observation/x").await.status() == 200
    })
    .await;
    // A version made elsewhere, concurrent with the parent's: a conflict.
    let other = b
        .node(Options {
            node_id: Some("c1".into()),
            ..Options::default()
        })
        .await;
    put(
        &other,
        "Patient/p5",
        &json!({"resourceType":"Patient","id":"p5","gender":"male"}),
    )
    .await;
    let log = other
        .store
        .changes(ChangesQuery {
            since: 0,
            count: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let bundle = format!(
        r#"{{"resourceType":"Bundle","type":"collection","entry":[{}]}}"#,
        fhirsync_store::change_entry_text(None, &log[0])
    );
    let r = apply_as(&parent, "c1", "token-of-c1-0123456789", bundle).await;
    assert_eq!(r.status(), 200);
    let (open, letters) = parent.store.open_counts().await.unwrap();
    assert_eq!((open, letters), (1, 0));
    let conflicts = parent.store.conflicts(ListQuery::default()).await.unwrap();
    assert_eq!(conflicts.len(), 1);
    assert_eq!(conflicts[0].rid, "p5");
    let again = parent
        .store
        .conflict(conflicts[0].id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.remote.vv, log[0].vv);
    let peers = parent.store.peers().await.unwrap();
    assert!(peers.iter().any(|p| p.node_id == "c1"), "{peers:?}");
    let cursors = child.store.cursors().await.unwrap();
    assert!(!cursors.is_empty(), "{cursors:?}");
    let audit = parent.store.audit(ListQuery::default()).await.unwrap();
    assert!(!audit.is_empty());
}

async fn custom_search_parameters_and_export(b: Backend) {
    let s = b.node(Options::default()).await;
    for i in 0..5 {
        put(
            &s,
            &format!("Patient/p{i}"),
            &json!({"resourceType":"Patient","id":format!("p{i}"),
                    "extension":[{"url":"http://example.org/clinic","valueString":format!("clinic-{}", i % 2)}]}),
        )
        .await;
    }
    let sp = json!({"resourceType":"SearchParameter","id":"clinic","url":"http://example.org/sp/clinic",
        "name":"clinic","status":"active","code":"clinic","base":["Patient"],"type":"string",
        "expression":"Patient.extension.where(url='http://example.org/clinic').value",
        "description":"clinic"});
    assert_eq!(put(&s, "SearchParameter/clinic", &sp).await.status(), 201);
    s.store.reindex().await.unwrap();
    eventually("the reindex is done", 30, || async {
        !s.store.reindex_status().running
    })
    .await;
    let (st, b1) = status_json(get(&s, "Patient?clinic=clinic-1&_total=accurate").await).await;
    assert_eq!(st, 200, "{b1}");
    assert_eq!(b1["total"], 2, "{b1}");
    // A bulk export reads one cut of the log.
    let r = s
        .client
        .get(s.url("$export?_type=Patient"))
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let status_url = r.headers()["content-location"].to_str().unwrap().to_owned();
    let deadline = Instant::now() + Duration::from_secs(30);
    let manifest: Value = loop {
        let r = s.client.get(&status_url).send().await.unwrap();
        if r.status() == 200 {
            break r.json().await.unwrap();
        }
        assert_eq!(r.status(), 202);
        assert!(Instant::now() < deadline, "the export did not end");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let counts: u64 = manifest["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["count"].as_u64().unwrap())
        .sum();
    assert_eq!(counts, 5, "{manifest}");
}

/// An Observation whose index rows could repeat within the version: the
/// same coding twice, and component values `0` and `-0`.
fn repeating_obs(id: &str, code: &str) -> Value {
    let coding = json!({"system": "http://loinc.org", "code": code});
    let comp = |v: f64| {
        json!({"code": {"coding": [coding.clone()]},
        "valueQuantity": {"value": v, "system": "http://unitsofmeasure.org", "code": "mm[Hg]"}})
    };
    json!({"resourceType": "Observation", "id": id, "status": "final",
           "code": {"coding": [coding.clone(), coding.clone()]},
           "subject": {"reference": "Patient/p"},
           "component": [comp(0.0), comp(-0.0)]})
}

/// A streamed load of 1,200 resources in three batches (PostgreSQL sends
/// them by `COPY`): ten of them existed before and are updated, and one
/// of those is updated twice more in the last batch. Every version is
/// kept once, in order, and search finds each resource by its newest
/// content only.
async fn a_load_in_bulk_keeps_every_version_and_index_row(b: Backend) {
    use fhirsync_store::load::{resource_request, Checker};
    use fhirsync_store::sqlite::Presorted;
    use fhirsync_store::StreamMsg;
    let s = b.node(Options::default()).await;
    for i in 0..10 {
        let id = format!("o-{i}");
        let r = put(
            &s,
            &format!("Observation/{id}"),
            &repeating_obs(&id, "before"),
        )
        .await;
        assert_eq!(r.status(), 201);
    }
    let store = s.store.clone();
    let summary = tokio::task::spawn_blocking(move || {
        let checker = Checker::new(fhirsync_core::validate::Mode::Off);
        let req = |id: String, code: &str| {
            let Value::Object(m) = repeating_obs(&id, code) else {
                unreachable!()
            };
            resource_request(m, &checker).unwrap()
        };
        let (tx, done) = store.load_stream(2).unwrap();
        for batch in 0..3 {
            let mut reqs: Vec<_> = (batch * 400..(batch + 1) * 400)
                .map(|i| req(format!("o-{i}"), &format!("c-{}", i % 7)))
                .collect();
            // o-5 again: twice in the last batch
            if batch == 2 {
                reqs.push(req("o-5".into(), "again"));
                reqs.push(req("o-5".into(), "once more"));
            }
            let index = Presorted::take(&mut reqs);
            tx.blocking_send(StreamMsg::Batch(reqs, index)).unwrap();
        }
        tx.blocking_send(StreamMsg::Commit).unwrap();
        done.blocking_recv().unwrap()
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(
        (summary.created, summary.updated),
        (1190, 12),
        "{summary:?}"
    );
    assert_eq!(s.store.last_seq(), 10 + 1202);
    let log = s
        .store
        .changes(ChangesQuery {
            since: 0,
            count: 2000,
            ..Default::default()
        })
        .await
        .unwrap();
    let seqs: Vec<u64> = log.iter().map(|v| v.seq).collect();
    assert_eq!(seqs, (1..=1212).collect::<Vec<u64>>());
    let vids: Vec<u64> = s
        .store
        .history(HistoryQuery {
            scope: HistoryScope::Instance("Observation".into(), "o-5".into()),
            before: None,
            since_ms: None,
            count: 10,
        })
        .await
        .unwrap()
        .iter()
        .map(|v| v.vid)
        .collect();
    assert_eq!(vids, vec![4, 3, 2, 1]);
    let total = |q: &'static str| {
        let s = &s;
        async move {
            let (st, v) =
                status_json(get(s, &format!("Observation?{q}&_summary=count")).await).await;
            assert_eq!(st, 200, "{v}");
            v["total"].as_u64().unwrap()
        }
    };
    // every version's rows once, the replaced versions' rows not found
    assert_eq!(total("code=http://loinc.org|c-3").await, 171);
    assert_eq!(total("code=before").await, 0);
    assert_eq!(total("code=http://loinc.org|once%20more").await, 1);
    assert_eq!(total("code=http://loinc.org|again").await, 0);
    assert_eq!(total("component-value-quantity=0").await, 1200);
    assert_eq!(total("_id=o-5&code=http://loinc.org|once%20more").await, 1);
}

fn keys(prefix: &str, n: usize) -> Vec<(&'static str, String)> {
    (0..n)
        .map(|i| ("Patient", format!("{prefix}{i}")))
        .collect()
}

/// A parent and child that replicate, then 100 differences the protocol
/// did not cause (versions stored at one end only, as a hand-copied store
/// or a deleted dead letter would leave them): anti-entropy finds exactly
/// those 100 without changing anything, repairs them through the apply
/// path (the concurrent ones become conflicts at both ends, as the edge's
/// manual policy says), and then finds only those conflicts.
async fn anti_entropy_finds_exactly_the_differences_and_repairs_them(b: Backend) {
    let (parent, child) = replicating_pair(&b, 200, |e| e.verify_every_s = 0).await;
    let (status, same) = verify(&child, "").await;
    assert_eq!(status, 200, "{same}");
    assert_eq!(same["differences"], 0, "{same}");
    assert_eq!(same["inSync"], true);
    assert_eq!(same["resources"], 200);

    // Two nodes outside the tree make the versions.
    let g1 = b
        .node(Options {
            node_id: Some("g1".into()),
            ..Options::default()
        })
        .await;
    let g2 = b
        .node(Options {
            node_id: Some("g2".into()),
            ..Options::default()
        })
        .await;
    for (t, id) in keys("g", 40).into_iter().chain(keys("h", 30)) {
        put(&g1, &format!("{t}/{id}"), &pat(&id)).await;
    }
    plant(&parent, &g1, "parent", &keys("p", 30)).await;
    plant(&parent, &g2, "parent", &keys("p", 30)).await;
    for i in 0..30 {
        let mut p = pat(&format!("p{i}"));
        p["gender"] = json!("female");
        put(&g1, &format!("Patient/p{i}"), &p).await;
        if i >= 20 {
            p["gender"] = json!("male");
            put(&g2, &format!("Patient/p{i}"), &p).await;
        }
    }
    let range = |k: Vec<(&'static str, String)>, from: usize| k[from..].to_vec();
    // At the parent only, as if the child had pushed them: never fed back.
    plant(&g1, &parent, "c1", &keys("g", 40)).await;
    plant(&g1, &parent, "c1", &range(keys("p", 30), 20)).await;
    // At the child only, as if pulled: never pushed.
    plant(&g1, &child, "parent", &keys("h", 30)).await;
    plant(&g1, &child, "parent", &keys("p", 20)).await;
    plant(&g2, &child, "parent", &range(keys("p", 30), 20)).await;
    let before = store_digest(child.store.as_ref()).await.0;
    let parent_before = store_digest(parent.store.as_ref()).await.0;

    let (status, found) = verify(&child, "repair=false").await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["differences"], 100, "{found}");
    assert_eq!(
        found["byKind"],
        json!({"missing-here": 40, "missing-at-parent": 30, "older-at-parent": 20, "concurrent": 10}),
    );
    assert_eq!(found["inSync"], false);
    assert_eq!(found["parentNodeId"], "parent");
    assert_eq!(
        store_digest(child.store.as_ref()).await.0,
        before,
        "a verify changes nothing"
    );
    assert_eq!(store_digest(parent.store.as_ref()).await.0, parent_before);

    let (status, fixed) = verify(&child, "repair=true").await;
    assert_eq!(status, 200, "{fixed}");
    assert_eq!(fixed["differences"], 100, "{fixed}");
    assert_eq!(fixed["pulled"]["stored"], 40, "{fixed}");
    assert_eq!(fixed["pulled"]["conflicts"], 10, "{fixed}");
    assert_eq!(fixed["pushed"]["stored"], 50, "{fixed}");
    assert_eq!(fixed["pushed"]["conflicts"], 10, "{fixed}");
    assert_eq!(fixed["pulled"]["failed"], 0);
    assert_eq!(fixed["pushed"]["failed"], 0);

    let (_, after) = verify(&child, "").await;
    assert_eq!(
        after["differences"], 10,
        "only the conflicts remain: {after}"
    );
    assert_eq!(after["byKind"], json!({"concurrent": 10}));
    assert_eq!(child.store.open_counts().await.unwrap().0, 10);
    assert_eq!(parent.store.open_counts().await.unwrap().0, 10);
    let (pd, pn) = store_digest(parent.store.as_ref()).await;
    let (cd, _) = store_digest(child.store.as_ref()).await;
    let conflicted: Vec<_> = range(keys("p", 30), 20)
        .into_iter()
        .map(|(t, id)| (t.to_owned(), id))
        .collect();
    let strip = |d: &Digest| {
        let mut d = d.clone();
        conflicted.iter().for_each(|k| {
            d.remove(k);
        });
        d
    };
    assert_eq!(
        strip(&pd),
        strip(&cd),
        "both ends hold the same, conflicts aside"
    );
    assert_eq!(pd.len(), 270);
    assert!(pn.values().all(|n| *n <= 2), "no version stored twice");
    let status = admin(&child, "status").await;
    let v = &status["edges"][0]["verify"];
    assert_eq!(v["runs"], 4, "{v}");
    assert_eq!(v["differencesTotal"], 210, "{v}");
    assert!(
        v["verifiedSeq"].is_u64(),
        "the first run found the ends equal: {v}"
    );
    assert!(metrics(&child)
        .await
        .contains("fhirsync_verify_differences_total{edge=\"parent\"} 210"));
}

/// The trail's reference rows: a resource that is a record's patient and
/// one of its entities (a Patient read) is found both ways, a patient named
/// only as the subject of what was read is not found as an entity, and
/// repeats within a record count once.
async fn audit_events_are_found_by_patient_entity_and_time(b: Backend) {
    let node = b.node(Options::default()).await;
    let rec = |at_ms: u64, interaction: &str, entities: &[&str], patients: &[&str]| {
        let mut r = AuditRecord::rest(at_ms, interaction, 200, Who::Anonymous, "n");
        r.entities = entities.iter().map(|s| s.to_string()).collect();
        r.patients = patients.iter().map(|s| s.to_string()).collect();
        r
    };
    let records = vec![
        rec(1_000, "read", &["Patient/a/_history/1"], &["Patient/a"]),
        rec(
            2_000,
            "read",
            &["Observation/o1/_history/2"],
            &["Patient/a"],
        ),
        rec(
            3_000,
            "search-type",
            &[
                "Patient/a/_history/1",
                "Patient/b/_history/1",
                "Patient/a/_history/1",
            ],
            &["Patient/b", "Patient/a", "Patient/a"],
        ),
        rec(
            4_000,
            "read",
            &["Observation/o1/_history/2"],
            &["Patient/b"],
        ),
        rec(5_000, "create", &["Patient/c/_history/1"], &[]),
    ];
    node.store
        .write(WriteRequest::Sync(SyncWrite::AuditEvents(records)))
        .await
        .unwrap();
    let found = |q: AuditQuery| {
        let store = node.store.clone();
        async move {
            let (page, total) = store
                .audit_events(AuditQuery { count: 100, ..q })
                .await
                .unwrap();
            let mut at: Vec<String> = page
                .iter()
                .map(|e| e["recorded"].as_str().unwrap()[17..19].to_owned())
                .collect();
            at.sort();
            assert_eq!(total as usize, at.len());
            at
        }
    };
    let patient = |p: &str| AuditQuery {
        patient: Some(p.into()),
        ..Default::default()
    };
    let entity = |e: &str| AuditQuery {
        entity: Some(e.into()),
        ..Default::default()
    };
    // seconds of `recorded`: which records matched
    assert_eq!(found(patient("Patient/a")).await, ["01", "02", "03"]);
    assert_eq!(found(entity("Patient/a")).await, ["01", "03"]);
    assert_eq!(found(patient("Patient/b")).await, ["03", "04"]);
    assert_eq!(found(entity("Patient/b")).await, ["03"]);
    assert_eq!(found(entity("Observation/o1")).await, ["02", "04"]);
    assert_eq!(found(entity("Patient/c")).await, ["05"]);
    assert!(found(patient("Patient/c")).await.is_empty());
    let both = AuditQuery {
        patient: Some("Patient/a".into()),
        entity: Some("Patient/b".into()),
        ..Default::default()
    };
    assert_eq!(found(both).await, ["03"]);
    let window = AuditQuery {
        patient: Some("Patient/a".into()),
        from_ms: Some(2_000),
        until_ms: Some(3_000),
        ..Default::default()
    };
    assert_eq!(found(window).await, ["02"]);
}
