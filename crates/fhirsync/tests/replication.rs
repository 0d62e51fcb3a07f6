//! Parent/child replication between in-process nodes over real HTTP on
//! 127.0.0.1: pull, push, echo suppression, registration, filters,
//! conflicts under each policy, resolution, dead letters, audit, metrics.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use fhirsync_api::ChildConfig;
use fhirsync_core::clock::{Clock, SystemClock};
use fhirsync_core::replicate::Policy;
use fhirsync_replica::{EdgeConfig, OnError};
use fhirsync_store::ChangesQuery;
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

/// A parent that takes only Patients from its child `c1`.
async fn patients_only_parent() -> InProcess {
    parent_with(
        "parent",
        vec![ChildConfig {
            push_types: vec!["Patient".into()],
            ..child_cfg("c1")
        }],
        Arc::new(SystemClock),
    )
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
async fn digest(s: &InProcess) -> Digest {
    store_digest(s.store.as_ref()).await.0
}

/// How many Patients a search by an index row (`active`) finds: every
/// stored one, when each version's rows were written with its `seq`.
async fn found_active(s: &InProcess) -> u64 {
    let b: Value = get(s, "Patient?active=true&_summary=count")
        .await
        .json()
        .await
        .unwrap();
    b["total"].as_u64().unwrap()
}

async fn has(s: &InProcess, path: &str) -> bool {
    get(s, path).await.status() == 200
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

/// A parent and a child whose edge runs through a TCP proxy, with the
/// given policy and clocks.
struct Pair {
    parent: InProcess,
    child: InProcess,
    link: fhirsync_testkit::TcpProxy,
}

async fn pair(policy: Policy, parent_clock: Arc<dyn Clock>, child_clock: Arc<dyn Clock>) -> Pair {
    let parent = parent_with("parent", vec![child_cfg("c1")], parent_clock).await;
    let link = fhirsync_testkit::TcpProxy::start(
        parent
            .base
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap(),
    )
    .await;
    let mut e = edge_to(&parent, "c1");
    e.url = link.url_for(&parent.base);
    e.conflict_policy = policy;
    let child = child_with("c1", e, vec![], child_clock).await;
    Pair {
        parent,
        child,
        link,
    }
}

/// Both nodes hold `Patient/x`; then, cut off from each other, both edit it.
async fn concurrent_edit(p: &Pair) {
    assert_eq!(put(&p.parent, "Patient/x", &pat("x")).await.status(), 201);
    eventually("child has x", 20, || async {
        has(&p.child, "Patient/x").await
    })
    .await;
    p.link.set(fhirsync_testkit::Link::Down);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let at_parent = json!({"resourceType":"Patient","id":"x","gender":"female"});
    let at_child = json!({"resourceType":"Patient","id":"x","gender":"male"});
    assert_eq!(put(&p.parent, "Patient/x", &at_parent).await.status(), 200);
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert_eq!(put(&p.child, "Patient/x", &at_child).await.status(), 200);
    p.link.set(fhirsync_testkit::Link::Up);
}

async fn conflicts_of(s: &InProcess, state: &str) -> Vec<Value> {
    admin(s, &format!("conflicts?state={state}")).await["items"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn manual_conflict_is_the_same_on_both_sides_and_resolution_replicates() {
    let p = pair(Policy::Manual, Arc::new(SystemClock), Arc::new(SystemClock)).await;
    concurrent_edit(&p).await;
    eventually("a conflict on both nodes", 30, || async {
        conflicts_of(&p.parent, "open").await.len() == 1
            && conflicts_of(&p.child, "open").await.len() == 1
    })
    .await;
    let (pc, cc) = (
        conflicts_of(&p.parent, "open").await.remove(0),
        conflicts_of(&p.child, "open").await.remove(0),
    );
    // The same pair of versions, seen from each side, with their ancestor.
    assert_eq!(pc["local"]["vector"], cc["remote"]["vector"], "{pc}\n{cc}");
    assert_eq!(pc["remote"]["vector"], cc["local"]["vector"]);
    assert_eq!(pc["local"]["resource"]["gender"], "female");
    assert_eq!(cc["local"]["resource"]["gender"], "male");
    assert_eq!(pc["ancestor"]["vector"], cc["ancestor"]["vector"]);
    assert!(pc["ancestor"]["resource"]["gender"].is_null());
    // Each keeps its own version meanwhile.
    let (_, v) = status_json(get(&p.parent, "Patient/x").await).await;
    assert_eq!(v["gender"], "female");
    // Resolve on the child with a merged resource: it replicates and
    // closes the parent's conflict.
    let id = cc["id"].as_u64().unwrap();
    let r = p
        .child
        .client
        .post(
            p.child
                .base
                .replace("/fhir", &format!("/admin/conflicts/{id}/resolve")),
        )
        .json(&json!({"resource": {"resourceType":"Patient","id":"x","gender":"other"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    eventually("resolution reached the parent", 30, || async {
        let (_, v) = status_json(get(&p.parent, "Patient/x").await).await;
        v["gender"] == "other"
    })
    .await;
    eventually("the parent's conflict closed", 10, || async {
        conflicts_of(&p.parent, "superseded").await.len() == 1
    })
    .await;
    assert!(conflicts_of(&p.parent, "open").await.is_empty());
    assert_eq!(conflicts_of(&p.child, "resolved").await.len(), 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(digest(&p.parent).await, digest(&p.child).await);
    // Resolving twice is refused and changes nothing.
    let r = p
        .child
        .client
        .post(
            p.child
                .base
                .replace("/fhir", &format!("/admin/conflicts/{id}/resolve")),
        )
        .json(&json!({"keep": "local"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 409);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hlc_lww_picks_the_same_winner_everywhere_with_skewed_clocks() {
    use fhirsync_testkit::clock::SkewedClock;
    // The parent's clock runs 5 minutes ahead: its edit, made first in real
    // time, has the later HLC and wins on both nodes.
    let p = pair(
        Policy::HlcLww,
        Arc::new(SkewedClock { offset_ms: 300_000 }),
        Arc::new(SkewedClock {
            offset_ms: -120_000,
        }),
    )
    .await;
    concurrent_edit(&p).await;
    eventually("both hold the parent's edit", 30, || async {
        let (_, a) = status_json(get(&p.parent, "Patient/x").await).await;
        let (_, b) = status_json(get(&p.child, "Patient/x").await).await;
        a["gender"] == "female" && b["gender"] == "female"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(digest(&p.parent).await, digest(&p.child).await);
    let pv = p.parent.store.read("Patient", "x").await.unwrap().unwrap();
    let cv = p.child.store.read("Patient", "x").await.unwrap().unwrap();
    assert_eq!(pv.vv, cv.vv, "the same vector on both");
    assert_eq!(pv.hlc, cv.hlc);
    // The loser is kept in a conflict record on each node.
    for s in [&p.parent, &p.child] {
        let auto = conflicts_of(s, "auto").await;
        assert!(!auto.is_empty());
        assert!(auto.iter().all(|c| c["policy"] == "hlc-lww"));
    }
    assert!(conflicts_of(&p.parent, "open").await.is_empty());
}

/// `merge`: two nurses change different elements of one patient while the
/// sites are apart; both ends store the same merged version (content,
/// vector, HLC) and record it; a change of one element to two values is a
/// manual conflict at both ends; an admin undoes the merge into a manual
/// conflict and keeps the local side, which replicates.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn merge_keeps_both_sides_changes_and_can_be_undone() {
    let p = pair(Policy::Merge, Arc::new(SystemClock), Arc::new(SystemClock)).await;
    let base = json!({"resourceType": "Patient", "id": "x",
        "name": [{"family": "Otieno", "given": ["Akinyi"]}],
        "telecom": [{"system": "phone", "value": "0700"}]});
    let y = json!({"resourceType": "Patient", "id": "y", "gender": "unknown"});
    assert_eq!(put(&p.parent, "Patient/x", &base).await.status(), 201);
    assert_eq!(put(&p.parent, "Patient/y", &y).await.status(), 201);
    eventually("child has x and y", 20, || async {
        has(&p.child, "Patient/y").await
    })
    .await;
    p.link.set(fhirsync_testkit::Link::Down);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut at_parent = base.clone();
    at_parent["birthDate"] = json!("1990-04-01");
    at_parent["telecom"] = json!([{"system": "phone", "value": "0700"}, {"system": "email", "value": "a@example.org"}]);
    let mut at_child = base.clone();
    at_child["gender"] = json!("female");
    at_child["name"] = json!([{"family": "Otieno", "given": ["Akinyi", "Grace"]}]);
    assert_eq!(put(&p.parent, "Patient/x", &at_parent).await.status(), 200);
    assert_eq!(put(&p.child, "Patient/x", &at_child).await.status(), 200);
    let (ym, yf) = (
        json!({"resourceType": "Patient", "id": "y", "gender": "male"}),
        json!({"resourceType": "Patient", "id": "y", "gender": "female"}),
    );
    assert_eq!(put(&p.parent, "Patient/y", &ym).await.status(), 200);
    assert_eq!(put(&p.child, "Patient/y", &yf).await.status(), 200);
    p.link.set(fhirsync_testkit::Link::Up);
    eventually("both hold the merged x", 30, || async {
        let (_, a) = status_json(get(&p.parent, "Patient/x").await).await;
        let (_, b) = status_json(get(&p.child, "Patient/x").await).await;
        [a, b]
            .iter()
            .all(|r| r["gender"] == "female" && r["birthDate"] == "1990-04-01")
    })
    .await;
    eventually("y is an open conflict at both ends", 30, || async {
        conflicts_of(&p.parent, "open").await.len() == 1
            && conflicts_of(&p.child, "open").await.len() == 1
    })
    .await;
    let pv = p.parent.store.read("Patient", "x").await.unwrap().unwrap();
    let cv = p.child.store.read("Patient", "x").await.unwrap().unwrap();
    assert_eq!(
        (&pv.vv, pv.hlc),
        (&cv.vv, cv.hlc),
        "the same vector and HLC"
    );
    let strip = |b: &str| {
        let mut v: Value = serde_json::from_str(b).unwrap();
        v["meta"].as_object_mut().unwrap().remove("lastUpdated");
        v["meta"].as_object_mut().unwrap().remove("versionId");
        v.to_string()
    };
    assert_eq!(
        strip(pv.body.as_deref().unwrap()),
        strip(cv.body.as_deref().unwrap())
    );
    let merged: Value = serde_json::from_str(pv.body.as_deref().unwrap()).unwrap();
    assert_eq!(merged["name"][0]["given"], json!(["Akinyi", "Grace"]));
    assert_eq!(merged["telecom"].as_array().unwrap().len(), 2);
    for s in [&p.parent, &p.child] {
        let open = conflicts_of(s, "open").await;
        assert_eq!(open[0]["resourceId"], "y");
        let auto = conflicts_of(s, "auto").await;
        assert_eq!(auto.len(), 1, "{auto:?}");
        assert_eq!(auto[0]["policy"], "merge");
        let how = auto[0]["resolution"].as_str().unwrap();
        assert!(how.starts_with("merged: local changed"), "{how}");
    }
    // Undo at the child: the merge becomes an open conflict; keeping the
    // local side brings back the child's own edit, everywhere.
    let id = conflicts_of(&p.child, "auto").await[0]["id"]
        .as_u64()
        .unwrap();
    let reopen = p
        .child
        .base
        .replace("/fhir", &format!("/admin/conflicts/{id}/reopen"));
    let http = reqwest::Client::new();
    let r = http.post(&reopen).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(http.post(&reopen).send().await.unwrap().status(), 409);
    assert_eq!(conflicts_of(&p.child, "open").await.len(), 2);
    let r = http
        .post(
            p.child
                .base
                .replace("/fhir", &format!("/admin/conflicts/{id}/resolve")),
        )
        .json(&json!({"keep": "local"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    eventually("the child's own edit everywhere", 30, || async {
        let (_, a) = status_json(get(&p.parent, "Patient/x").await).await;
        let (_, b) = status_json(get(&p.child, "Patient/x").await).await;
        [a, b]
            .iter()
            .all(|r| r["gender"] == "female" && r.get("birthDate").is_none())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn source_wins_keeps_the_parents_version_on_both() {
    let p = pair(
        Policy::SourceWins,
        Arc::new(SystemClock),
        Arc::new(SystemClock),
    )
    .await;
    concurrent_edit(&p).await;
    eventually("both hold the parent's edit", 30, || async {
        let (_, a) = status_json(get(&p.parent, "Patient/x").await).await;
        let (_, b) = status_json(get(&p.child, "Patient/x").await).await;
        a["gender"] == "female" && b["gender"] == "female"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(digest(&p.parent).await, digest(&p.child).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_registered_children_with_their_token() {
    let parent = parent_with(
        "parent",
        vec![
            child_cfg("c1"),
            ChildConfig {
                push: false,
                ..child_cfg("c2")
            },
        ],
        Arc::new(SystemClock),
    )
    .await;
    let changes = parent.url("$changes");
    let call = |token: Option<&str>, node: &str| {
        let mut rb = parent.client.get(&changes).header("x-fhirsync-node", node);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        rb.send()
    };
    assert_eq!(call(None, "c1").await.unwrap().status(), 401);
    assert_eq!(
        call(Some("wrong-token-0123456789"), "c1")
            .await
            .unwrap()
            .status(),
        401
    );
    assert_eq!(
        call(Some("token-of-c1-0123456789"), "c2")
            .await
            .unwrap()
            .status(),
        403
    );
    assert_eq!(
        call(Some("token-of-c1-0123456789"), "c1")
            .await
            .unwrap()
            .status(),
        200
    );
    // c2 may pull but not push.
    let r = apply_as(
        &parent,
        "c2",
        "token-of-c2-0123456789",
        r#"{"resourceType":"Bundle","type":"collection"}"#.into(),
    )
    .await;
    assert_eq!(r.status(), 403);
    let r = expect_outcome(
        apply_as(&parent, "c1", "token-of-c1-0123456789", "[]".into()).await,
        400,
    )
    .await;
    assert!(r.contains("Bundle"), "{r}");
    // A push stream is named with its batch number, each of the right kind.
    let base = fhirsync_store::EXTENSION_BASE;
    let entry = json!({"resource": pat("p1"), "request": {"method": "PUT", "url": "Patient/p1"}});
    for (ext, why) in [
        (
            json!([{"url": format!("{base}/push-stream"), "valueString": "s"}]),
            "come together",
        ),
        (
            json!([{"url": format!("{base}/push-stream"), "valueString": "s"},
                   {"url": format!("{base}/push-batch"), "valueInteger": -1}]),
            "valueInteger",
        ),
        (
            json!([{"url": format!("{base}/push-stream"), "valueString": "s".repeat(65)},
                   {"url": format!("{base}/push-batch"), "valueInteger": 0}]),
            "characters",
        ),
        (
            json!([{"url": format!("{base}/conflict-policy")}]),
            "valueCode",
        ),
    ] {
        let body = json!({"resourceType": "Bundle", "type": "collection", "extension": ext, "entry": [entry]});
        let r = expect_outcome(
            apply_as(&parent, "c1", "token-of-c1-0123456789", body.to_string()).await,
            400,
        )
        .await;
        assert!(r.contains(why), "{r}");
    }
    assert_eq!(parent.store.last_seq(), 0, "refused calls change nothing");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn refused_records_become_dead_letters_and_retry() {
    // The parent takes only Patients from c1: the child's Observation is
    // refused, retried, then set aside; the Patient after it still goes.
    let parent = patients_only_parent().await;
    let mut e = edge_to(&parent, "c1");
    e.on_error = OnError::DeadLetter;
    e.retry_max = 3;
    e.retry_delay_ms_max = 100;
    let child = child_with("c1", e, vec![], Arc::new(SystemClock)).await;
    assert_eq!(
        put(&child, "Observation/o1", &obs("o1", "1"))
            .await
            .status(),
        201
    );
    assert_eq!(
        put(&child, "Patient/after", &pat("after")).await.status(),
        201
    );
    eventually("the Patient after it reached the parent", 30, || async {
        has(&parent, "Patient/after").await
    })
    .await;
    assert!(!has(&parent, "Observation/o1").await);
    let dl = admin(&child, "deadletters").await["items"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(dl.len(), 1, "{dl:?}");
    let pulls = admin(&child, "deadletters?direction=pull").await;
    assert!(pulls["items"].as_array().unwrap().is_empty(), "{pulls}");
    assert_eq!(dl[0]["resourceType"], "Observation");
    assert_eq!(dl[0]["attempts"], 3);
    assert!(dl[0]["error"].as_str().unwrap().contains("403"), "{dl:?}");
    // Retrying while the parent still refuses keeps the letter.
    let id = dl[0]["id"].as_u64().unwrap();
    let url = child
        .base
        .replace("/fhir", &format!("/admin/deadletters/{id}/retry"));
    let r = child.client.post(&url).send().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(
        admin(&child, "deadletters").await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let audit = admin(&child, "audit?action=dead-letter").await;
    assert_eq!(audit["items"].as_array().unwrap().len(), 1, "{audit}");
    let (ok, out, _) = cli(&["deadletters", "--url", &child.base, "list"]).await;
    assert!(
        ok && out.contains("push Observation/o1") && out.contains("after 3 attempts"),
        "{out}"
    );
    // The global options go after the subcommand too, as users type them.
    let (ok, out, err) = cli(&["deadletters", "list", "--url", &child.base, "--json"]).await;
    assert!(ok, "{err}");
    let listed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(listed["items"][0]["resourceType"], "Observation", "{out}");
    let m = metrics(&child).await;
    assert!(
        m.contains("fhirsync_edge_dead_letters_total{edge=\"parent\",direction=\"push\"} 1"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn filters_and_pull_only_edges() {
    let parent = parent_with("parent", vec![child_cfg("c1")], Arc::new(SystemClock)).await;
    let mut e = edge_to(&parent, "c1");
    e.push = false;
    e.pull_filter = fhirsync_replica::FilterConfig {
        types: vec!["Patient".into()],
        fhirpath: Some("gender = 'female'".into()),
    };
    let child = child_with("c1", e, vec![], Arc::new(SystemClock)).await;
    put(
        &parent,
        "Patient/f",
        &json!({"resourceType":"Patient","id":"f","gender":"female"}),
    )
    .await;
    put(
        &parent,
        "Patient/m",
        &json!({"resourceType":"Patient","id":"m","gender":"male"}),
    )
    .await;
    put(&parent, "Observation/o", &obs("o", "x")).await;
    put(
        &parent,
        "Patient/last",
        &json!({"resourceType":"Patient","id":"last","gender":"female"}),
    )
    .await;
    eventually("filtered pull", 20, || async {
        has(&child, "Patient/last").await
    })
    .await;
    assert!(has(&child, "Patient/f").await);
    assert!(!has(&child, "Patient/m").await);
    assert!(!has(&child, "Observation/o").await);
    // A pull-only edge never pushes.
    put(&child, "Patient/local", &pat("local")).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!has(&parent, "Patient/local").await);
    let st = admin(&child, "status").await;
    assert_eq!(st["edges"][0]["push"]["state"], "off", "{st}");
    assert_eq!(st["edges"][0]["pull"]["lagSeq"], 0, "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn admin_cli_lists_shows_and_resolves_conflicts() {
    let p = pair(Policy::Manual, Arc::new(SystemClock), Arc::new(SystemClock)).await;
    concurrent_edit(&p).await;
    eventually("a conflict at the parent", 30, || async {
        conflicts_of(&p.parent, "open").await.len() == 1
    })
    .await;
    let url = p.parent.base.clone();
    let (ok, out, err) = cli(&["status", "--url", &url]).await;
    assert!(ok, "{err}");
    assert!(
        out.contains("node parent") && out.contains("open conflicts 1"),
        "{out}"
    );
    assert!(out.contains("child c1"), "{out}");
    let (ok, out, _) = cli(&["status", "--url", &p.child.base]).await;
    assert!(ok && out.contains("edge parent → parent"), "{out}");
    let (ok, out, _) = cli(&["conflicts", "--url", &url, "list"]).await;
    assert!(
        ok && out.contains("Patient/x") && out.contains("open"),
        "{out}"
    );
    let (ok, out, err) = cli(&[
        "conflicts",
        "list",
        "--url",
        &url,
        "--admin-token",
        "unused",
    ])
    .await;
    assert!(
        ok && out.contains("Patient/x") && out.contains("open"),
        "{out}{err}"
    );
    let id = conflicts_of(&p.parent, "open").await[0]["id"]
        .as_u64()
        .unwrap()
        .to_string();
    let (ok, out, _) = cli(&["conflicts", "--url", &url, "show", &id]).await;
    assert!(
        ok && out.contains("local") && out.contains("remote") && out.contains("ancestor"),
        "{out}"
    );
    // Bad input: a one-line reason, a non-zero exit, nothing changed.
    let (ok, _, err) = cli(&[
        "conflicts",
        "--url",
        &url,
        "resolve",
        &id,
        "--keep",
        "sideways",
    ])
    .await;
    assert!(
        !ok && err.lines().count() == 1 && err.contains("local or remote"),
        "{err}"
    );
    let (ok, _, err) = cli(&[
        "conflicts",
        "--url",
        &url,
        "resolve",
        "999",
        "--keep",
        "local",
    ])
    .await;
    assert!(!ok && err.contains("404"), "{err}");
    assert_eq!(conflicts_of(&p.parent, "open").await.len(), 1);
    let (ok, out, err) = cli(&[
        "conflicts",
        "--url",
        &url,
        "resolve",
        &id,
        "--keep",
        "remote",
    ])
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("resolved: Patient/x/_history/"), "{out}");
    eventually("the child took the resolution", 30, || async {
        let a = p.parent.store.read("Patient", "x").await.unwrap().unwrap();
        let b = p.child.store.read("Patient", "x").await.unwrap().unwrap();
        a.vv == b.vv && conflicts_of(&p.child, "open").await.is_empty()
    })
    .await;
    let (_, v) = status_json(get(&p.child, "Patient/x").await).await;
    assert_eq!(v["gender"], "male");
    let (ok, out, _) = cli(&["deadletters", "--url", &p.child.base, "list"]).await;
    assert!(ok && out.contains("no dead letters"), "{out}");
    let (ok, _, err) = cli(&["deadletters", "--url", &p.child.base, "retry", "5"]).await;
    assert!(!ok && err.contains("404"), "{err}");
    // The audit log tells what happened, and metrics count it.
    let audit = admin(&p.parent, "audit").await;
    let actions: Vec<&str> = audit["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["action"].as_str().unwrap())
        .collect();
    for a in ["push", "conflict", "resolve"] {
        assert!(actions.contains(&a), "{a} not in {actions:?}");
    }
    let child_audit = admin(&p.child, "audit?action=pull").await;
    assert!(!child_audit["items"].as_array().unwrap().is_empty());
    let m = metrics(&p.child).await;
    for name in [
        "fhirsync_edge_lag_seq{edge=\"parent\",direction=\"pull\"}",
        "fhirsync_edge_applied_total{edge=\"parent\",direction=\"push\"}",
        "fhirsync_edge_skipped_total",
        "fhirsync_edge_conflicts_total{edge=\"parent\",direction=\"push\"} 1",
        "fhirsync_edge_dead_letters_total",
        "fhirsync_edge_errors_total",
    ] {
        assert!(m.contains(name), "{name} missing in\n{m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn demo_runs_and_converges() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, out, err) = cli(&[
        "demo",
        "--patients",
        "5",
        "--dir",
        dir.path().to_str().unwrap(),
    ])
    .await;
    assert!(ok, "{err}\n{out}");
    assert!(
        out.contains("clinic-a → district → clinic-b: all 3 nodes hold the same 10 resources"),
        "{out}"
    );
    assert!(
        out.contains("conflict") && out.contains("resolution replicated"),
        "{out}"
    );
    // A clean demo ends cleanly: no errors from its own shutdown.
    assert!(!err.contains("ERROR") && !err.contains("WARN"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_letters_go_through_once_the_parent_takes_them() {
    let strict = patients_only_parent().await;
    let link = fhirsync_testkit::TcpProxy::start(
        strict
            .base
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap(),
    )
    .await;
    let mut e = edge_to(&strict, "c1");
    e.url = link.url_for(&strict.base);
    e.on_error = OnError::DeadLetter;
    e.retry_max = 2;
    e.retry_delay_ms_max = 100;
    let child = child_with("c1", e, vec![], Arc::new(SystemClock)).await;
    for i in 0..3 {
        put(
            &child,
            &format!("Observation/o{i}"),
            &obs(&format!("o{i}"), "1"),
        )
        .await;
    }
    eventually("three dead letters", 30, || async {
        admin(&child, "deadletters").await["items"]
            .as_array()
            .unwrap()
            .len()
            == 3
    })
    .await;
    // The parent is replaced by one that takes every type (same node id).
    let open = parent_with("parent", vec![child_cfg("c1")], Arc::new(SystemClock)).await;
    link.retarget(
        open.base
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap(),
    );
    let (ok, out, err) = cli(&["deadletters", "--url", &child.base, "retry", "--all"]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("3 went through, 0 still failing"), "{out}");
    for i in 0..3 {
        assert!(has(&open, &format!("Observation/o{i}")).await);
    }
    assert!(admin(&child, "deadletters").await["items"]
        .as_array()
        .unwrap()
        .is_empty());
    assert_eq!(
        admin(&child, "audit?action=retry").await["items"]
            .as_array()
            .unwrap()
            .len(),
        3
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_parent_config_is_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let deep = format!("{}true{}", "(".repeat(2000), ")".repeat(2000));
    let deep_filter =
        format!("[parent]\nurl = \"http://x/fhir\"\ntoken = \"t\"\n[parent.pull_filter]\nfhirpath = \"{deep}\"\n");
    let long_filter = format!(
        "[parent]\nurl = \"http://x/fhir\"\ntoken = \"t\"\n[parent.push_filter]\nfhirpath = \"{}\"\n",
        vec!["active"; 5000].join(" or ")
    );
    for (toml, want) in [
        (deep_filter.as_str(), "NEST_MAX"),
        (long_filter.as_str(), "EXPRESSION_BYTES_MAX"),
        ("[parent]\nurl = \"http://x/fhir\"\ntoken = \"t\"\nconflict_policy = \"newest\"\n", "unknown conflict policy 'newest'"),
        ("[parent]\nurl = \"http://x/fhir\"\ntoken = \"t\"\npul = true\n", "unknown field"),
        ("[parent]\nurl = \"x\"\ntoken = \"t\"\n", "not an http(s) URL"),
        ("[parent]\nurl = \"http://x/fhir\"\ntoken = \"t\"\n[parent.pull_filter]\nfhirpath = \"name.frobnicate()\"\n", "unknown function 'frobnicate'"),
        ("[[children]]\nnode_id = \"c1\"\ntoken = \"short\"\n", "shorter than 16"),
    ] {
        let cfg = dir.path().join("bad.toml");
        std::fs::write(&cfg, toml).unwrap();
        let data = dir.path().join("data");
        let (ok, _, err) = cli(&["serve", "--config", cfg.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]).await;
        assert!(!ok, "{toml}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(err.contains(want), "{want} not in {err}");
        assert!(!data.exists(), "a refused config must not create the store");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_record_that_keeps_failing_blocks_the_edge_when_so_configured() {
    let parent = patients_only_parent().await;
    let mut e = edge_to(&parent, "c1");
    e.on_error = OnError::Block;
    e.retry_max = 2;
    e.retry_delay_ms_max = 100;
    let child = child_with("c1", e, vec![], Arc::new(SystemClock)).await;
    put(&child, "Patient/before", &pat("before")).await;
    eventually("the first Patient went up", 20, || async {
        has(&parent, "Patient/before").await
    })
    .await;
    put(&child, "Observation/stuck", &obs("stuck", "1")).await;
    put(&child, "Patient/behind", &pat("behind")).await;
    eventually("the push is blocked", 20, || async {
        admin(&child, "status").await["edges"][0]["push"]["state"] == "blocked"
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let st = admin(&child, "status").await;
    assert!(
        st["edges"][0]["push"]["lastError"]
            .as_str()
            .unwrap()
            .contains("Observation/stuck"),
        "{st}"
    );
    assert!(
        !has(&parent, "Patient/behind").await,
        "nothing passes a blocked record"
    );
    assert!(admin(&child, "deadletters").await["items"]
        .as_array()
        .unwrap()
        .is_empty());
    // Pull is not blocked by a stuck push.
    put(&parent, "Patient/down", &pat("down")).await;
    eventually("pull still works", 20, || async {
        has(&child, "Patient/down").await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn apply_is_idempotent() {
    let source = InProcess::start_with(Options {
        node_id: Some("c1".into()),
        ..Options::default()
    })
    .await;
    put(&source, "Patient/a", &pat("a")).await;
    put(
        &source,
        "Patient/a",
        &json!({"resourceType":"Patient","id":"a","active":false}),
    )
    .await;
    delete(&source, "Patient/a").await;
    let log = source
        .store
        .changes(ChangesQuery {
            since: 0,
            count: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let entries: Vec<String> = log
        .iter()
        .map(|v| fhirsync_store::change_entry_text(None, v))
        .collect();
    let bundle = format!(
        r#"{{"resourceType":"Bundle","type":"collection","entry":[{}]}}"#,
        entries.join(",")
    );
    let parent = parent_with("parent", vec![child_cfg("c1")], Arc::new(SystemClock)).await;
    let send = || apply_as(&parent, "c1", "token-of-c1-0123456789", bundle.clone());
    let param = |v: &Value, n: &str| {
        v["parameter"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == n)
            .unwrap()["valueInteger"]
            .as_u64()
            .unwrap()
    };
    for (round, stored, skipped) in [(1, 3, 0), (2, 0, 3)] {
        let (s, v) = status_json(send().await).await;
        assert_eq!(s, 200, "{v}");
        assert_eq!(param(&v, "stored"), stored, "round {round}: {v}");
        assert_eq!(param(&v, "skipped"), skipped, "round {round}: {v}");
        assert_eq!(param(&v, "applied"), 3);
    }
    assert_eq!(parent.store.last_seq(), 3, "three versions, once");
    assert_eq!(get(&parent, "Patient/a").await.status(), 410);
    let v = parent.store.read("Patient", "a").await.unwrap().unwrap();
    assert_eq!(v.origin, "c1");
    assert_eq!(v.vv, log[2].vv);
    assert_eq!(v.hlc, log[2].hlc);
    // Out of order: the older versions after the newest are skipped.
    let other = parent_with("parent2", vec![child_cfg("c1")], Arc::new(SystemClock)).await;
    let reversed = format!(
        r#"{{"resourceType":"Bundle","type":"collection","entry":[{}]}}"#,
        entries.iter().rev().cloned().collect::<Vec<_>>().join(",")
    );
    let r = apply_as(&other, "c1", "token-of-c1-0123456789", reversed).await;
    let (_, v) = status_json(r).await;
    assert_eq!(param(&v, "stored"), 1, "{v}");
    assert_eq!(param(&v, "skipped"), 2, "{v}");
    assert_eq!(get(&other, "Patient/a").await.status(), 410);
}

#[tokio::test]
async fn status_counts_every_dead_letter_beyond_one_page() {
    use fhirsync_store::{Direction, NewDeadLetter, SyncWrite, WriteRequest};
    let node = InProcess::start().await;
    let letters = (0..1005)
        .map(|i| NewDeadLetter {
            edge: "parent".into(),
            direction: Direction::Push,
            rtype: "Patient".into(),
            rid: format!("p{i}"),
            seq: i + 1,
            record: "{}".into(),
            error: "422: refused".into(),
            attempts: 3,
        })
        .collect();
    node.store
        .write(WriteRequest::Sync(SyncWrite::DeadLetters {
            letters,
            cursor: None,
        }))
        .await
        .unwrap();
    let st = admin(&node, "status").await;
    assert_eq!(st["deadLetters"], 1005, "{st}");
    assert_eq!(st["openConflicts"], 0, "{st}");
}

#[tokio::test(flavor = "multi_thread")]
async fn push_lag_counts_waiting_records_before_the_parent_was_ever_reached() {
    let parent = parent_with("parent", vec![child_cfg("c1")], Arc::new(SystemClock)).await;
    let mut e = EdgeConfig::new(&parent.base, "not-the-token-of-c1-at-all");
    e.retry_delay_ms_max = 200;
    let child = child_with("c1", e, vec![], Arc::new(SystemClock)).await;
    for i in 0..3 {
        let r = put(&child, &format!("Patient/w{i}"), &pat(&format!("w{i}"))).await;
        assert_eq!(r.status(), 201);
    }
    let push = || async {
        let edges = admin(&child, "status").await;
        edges["edges"][0]["push"].clone()
    };
    eventually("push retrying with lag 3", 10, || async {
        let p = push().await;
        p["state"] == "retrying" && p["lagSeq"] == 3
    })
    .await;
    let p = push().await;
    assert!(p["lastError"].as_str().unwrap_or("").contains("401"), "{p}");
    assert_eq!(p["cursor"], 0, "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn versions_that_fail_validation_follow_on_error_in_both_directions() {
    let bad = |id: &str| json!({"resourceType": "Patient", "id": id, "notAnElement": true});
    // Push: a lenient child holds an invalid Patient; the strict parent
    // refuses it (422 with the path), the child sets it aside and goes on.
    let parent = parent_with("parent", vec![child_cfg("c1")], Arc::new(SystemClock)).await;
    let mut e = edge_to(&parent, "c1");
    e.on_error = OnError::DeadLetter;
    e.retry_max = 2;
    e.retry_delay_ms_max = 100;
    let child = InProcess::start_with(Options {
        node_id: Some("c1".into()),
        parent: Some(e),
        api: lenient_api(),
        ..Options::default()
    })
    .await;
    let r = put(&child, "Patient/bad", &bad("bad")).await;
    assert_eq!(r.status(), 201);
    let warning = r.headers()[fhirsync_api::validation::WARNING_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(warning.contains("Patient.notAnElement"), "{warning}");
    assert_eq!(
        put(&child, "Patient/good", &pat("good")).await.status(),
        201
    );
    eventually(
        "the valid Patient after it reached the parent",
        30,
        || async { has(&parent, "Patient/good").await },
    )
    .await;
    assert!(!has(&parent, "Patient/bad").await);
    let dl = admin(&child, "deadletters?direction=push").await;
    let items = dl["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{dl}");
    let why = items[0]["error"].as_str().unwrap();
    assert!(
        why.contains("422") && why.contains("Patient.notAnElement"),
        "{why}"
    );

    // Pull: a lenient parent holds an invalid Patient; the strict child
    // with `block` stops at it and says why, storing nothing of it.
    let parent = InProcess::start_with(Options {
        node_id: Some("p2".into()),
        children: vec![child_cfg("c2")],
        api: lenient_api(),
        ..Options::default()
    })
    .await;
    assert_eq!(put(&parent, "Patient/bad", &bad("bad")).await.status(), 201);
    let mut e = edge_to(&parent, "c2");
    e.push = false;
    e.retry_max = 2;
    e.retry_delay_ms_max = 100;
    let child = child_with("c2", e, vec![], Arc::new(SystemClock)).await;
    eventually("the pull direction blocked", 30, || async {
        admin(&child, "status")
            .await
            .to_string()
            .contains("blocked")
    })
    .await;
    let status = admin(&child, "status").await.to_string();
    assert!(
        status.contains("fails validation") && status.contains("Patient.notAnElement"),
        "{status}"
    );
    assert!(!has(&child, "Patient/bad").await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pages_pulled_ahead_are_stored_once_in_order_and_stop_at_a_bad_entry() {
    // Small pages, so that the child fetches many ahead and stores those
    // that arrived together in one transaction; one version in the
    // middle fails the child's validation.
    let parent = InProcess::start_with(Options {
        node_id: Some("p3".into()),
        children: vec![child_cfg("c3")],
        api: lenient_api(),
        ..Options::default()
    })
    .await;
    let bad = json!({"resourceType": "Patient", "id": "p060", "notAnElement": true});
    for i in 0..120 {
        let id = format!("p{i:03}");
        let body = if i == 60 { bad.clone() } else { pat(&id) };
        let path = format!("Patient/{id}");
        assert_eq!(put(&parent, &path, &body).await.status(), 201);
    }
    let mut e = edge_to(&parent, "c3");
    e.push = false;
    e.batch_size_max = 7;
    e.on_error = OnError::DeadLetter;
    e.retry_max = 1;
    e.retry_delay_ms_max = 50;
    let child = child_with("c3", e, vec![], Arc::new(SystemClock)).await;
    eventually("the last Patient pulled", 30, || async {
        has(&child, "Patient/p119").await
    })
    .await;
    let got = digest(&child).await;
    assert_eq!(got.len(), 119, "{got:?}");
    assert!(!has(&child, "Patient/p060").await);
    assert_eq!(
        found_active(&child).await,
        119,
        "searched by their index rows"
    );
    let history = get(&child, "_history?_count=1000").await;
    let history: Value = history.json().await.unwrap();
    let entries = history["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 119, "each version stored once");
    let dl = admin(&child, "deadletters?direction=pull").await;
    let items = dl["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{dl}");
    assert!(dl.to_string().contains("Patient/p060"), "{dl}");
}

/// A push-only child `c1` of `parent`, sending batches of `batch`, that
/// gives up on a record after two attempts as `on_error` says.
async fn pushing_child(parent: &InProcess, batch: usize, on_error: OnError) -> InProcess {
    let mut e = edge_to(parent, "c1");
    e.pull = false;
    e.batch_size_max = batch;
    e.on_error = on_error;
    e.retry_max = 2;
    e.retry_delay_ms_max = 50;
    child_with("c1", e, vec![], Arc::new(SystemClock)).await
}

/// Commits `count` records in one transaction at `node`: Patients
/// `p000`, `p001`, … with the Observation `o{at}` in place `at`.
async fn patients_around_an_observation(node: &InProcess, count: usize, at: usize) {
    let entries: Vec<Value> = (0..count)
        .map(|i| {
            let (path, res) = if i == at {
                (
                    format!("Observation/o{i:03}"),
                    obs(&format!("o{i:03}"), "1"),
                )
            } else {
                (format!("Patient/p{i:03}"), pat(&format!("p{i:03}")))
            };
            json!({"resource": res, "request": {"method": "PUT", "url": path}})
        })
        .collect();
    let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": entries});
    let r = node
        .client
        .post(&node.base)
        .json(&bundle)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn pipelined_push_batches_stop_at_a_blocked_entry_with_nothing_after_it() {
    // 300 records in one commit at the child, pushed in batches of 5 with
    // several on their way at once; the parent refuses the Observation at
    // 200 and the edge blocks there. The parent must hold the 200 Patients
    // before it and none after it, though later batches were already sent.
    let parent = patients_only_parent().await;
    let child = pushing_child(&parent, 5, OnError::Block).await;
    patients_around_an_observation(&child, 300, 200).await;
    eventually("the push blocked", 30, || async {
        admin(&child, "status").await["edges"][0]["push"]["state"] == "blocked"
    })
    .await;
    for _ in 0..2 {
        let got = digest(&parent).await;
        assert_eq!(got.len(), 200, "Patients at the parent");
        assert_eq!(
            found_active(&parent).await,
            200,
            "searched by their index rows"
        );
        assert!(has(&parent, "Patient/p199").await);
        assert!(!has(&parent, "Patient/p201").await);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn full_push_batches_are_sent_once_in_order_and_stop_at_a_refused_entry() {
    // 120 records in one commit at the child, pushed in full batches of 7.
    // The parent refuses the Observation in the middle: the records before
    // it in its batch are kept, those after it are sent again, once.
    let parent = patients_only_parent().await;
    let child = pushing_child(&parent, 7, OnError::DeadLetter).await;
    patients_around_an_observation(&child, 120, 60).await;
    eventually("the last Patient pushed", 30, || async {
        has(&parent, "Patient/p119").await
    })
    .await;
    let got = digest(&parent).await;
    assert_eq!(got.len(), 119, "{got:?}");
    assert!(!has(&parent, "Observation/o060").await);
    assert_eq!(
        found_active(&parent).await,
        119,
        "searched by their index rows"
    );
    let history: Value = get(&parent, "_history?_count=1000")
        .await
        .json()
        .await
        .unwrap();
    let n = history["entry"].as_array().map_or(0, Vec::len);
    assert_eq!(n, 119, "each version stored once at the parent");
    let dl = admin(&child, "deadletters?direction=push").await;
    let items = dl["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{dl}");
    assert_eq!(items[0]["resourceId"], "o060", "{dl}");
}
