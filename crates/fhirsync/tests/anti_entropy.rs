//! Anti-entropy on a parent edge: the parent's `$summary` and `$current`
//! refuse what they should, a scheduled run repairs a divergence until the
//! two ends are equal and says so in status and metrics, and `fhirsync
//! verify` reports and repairs from the command line. (The exact count of
//! differences and their repair, on both backends, is in
//! `store_contract.rs`.)

mod common;

use common::*;
use fhirsync_api::ChildConfig;
use fhirsync_core::replicate::Policy;
use fhirsync_replica::EdgeConfig;
use fhirsync_testkit::server::Options;
use serde_json::{json, Value};

const TOKEN: &str = "token-of-c1-0123456789";

async fn parent() -> InProcess {
    InProcess::start_with(Options {
        node_id: Some("parent".into()),
        children: vec![ChildConfig {
            node_id: "c1".into(),
            token: TOKEN.into(),
            pull: true,
            push: true,
            push_types: Vec::new(),
        }],
        ..Options::default()
    })
    .await
}

async fn child(parent: &InProcess, policy: Policy, verify_every_s: u64) -> InProcess {
    let mut e = EdgeConfig::new(&parent.base, TOKEN);
    e.long_poll_s = 2;
    e.retry_delay_ms_max = 300;
    e.conflict_policy = policy;
    e.verify_every_s = verify_every_s;
    InProcess::start_with(Options {
        node_id: Some("c1".into()),
        parent: Some(e),
        ..Options::default()
    })
    .await
}

async fn ghost(id: &str) -> InProcess {
    InProcess::start_with(Options {
        node_id: Some(id.into()),
        ..Options::default()
    })
    .await
}

fn keys(prefix: &str, n: usize) -> Vec<(&'static str, String)> {
    (0..n)
        .map(|i| ("Patient", format!("{prefix}{i}")))
        .collect()
}

/// A parent with `n` patients and a child that pulled them.
async fn pair(policy: Policy, verify_every_s: u64, n: usize) -> (InProcess, InProcess) {
    let p = parent().await;
    for i in 0..n {
        put(&p, &format!("Patient/p{i}"), &pat(&format!("p{i}"))).await;
    }
    let c = child(&p, policy, verify_every_s).await;
    eventually("the child pulled the parent's patients", 30, || async {
        store_digest(c.store.as_ref()).await.0.len() == n
    })
    .await;
    (p, c)
}

/// `missing` resources at the parent only, `extra` at the child only and
/// `concurrent` edits of `p0..` made at each end, none of which the edge
/// carries.
async fn diverge(p: &InProcess, c: &InProcess, missing: usize, extra: usize, concurrent: usize) {
    let (g1, g2) = (ghost("g1").await, ghost("g2").await);
    for (t, id) in keys("g", missing).into_iter().chain(keys("h", extra)) {
        put(&g1, &format!("{t}/{id}"), &pat(&id)).await;
    }
    plant(p, &g1, "parent", &keys("p", concurrent)).await;
    plant(p, &g2, "parent", &keys("p", concurrent)).await;
    for i in 0..concurrent {
        let mut x = pat(&format!("p{i}"));
        x["gender"] = json!("female");
        put(&g1, &format!("Patient/p{i}"), &x).await;
        x["gender"] = json!("male");
        put(&g2, &format!("Patient/p{i}"), &x).await;
    }
    plant(&g1, p, "c1", &keys("g", missing)).await;
    plant(&g1, p, "c1", &keys("p", concurrent)).await;
    plant(&g1, c, "parent", &keys("h", extra)).await;
    plant(&g2, c, "parent", &keys("p", concurrent)).await;
}

async fn summary_as(p: &InProcess, token: Option<&str>, body: &str) -> reqwest::Response {
    let mut rb = p
        .client
        .post(p.url("$summary"))
        .header("x-fhirsync-node", "c1")
        .header("content-type", "application/json")
        .body(body.to_owned());
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    rb.send().await.unwrap()
}

async fn current_as(p: &InProcess, body: &Value) -> reqwest::Response {
    p.client
        .post(p.url("$current"))
        .bearer_auth(TOKEN)
        .header("x-fhirsync-node", "c1")
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn summaries_refuse_strangers_and_bad_questions() {
    let p = parent().await;
    for i in 0..5 {
        put(&p, &format!("Patient/p{i}"), &pat(&format!("p{i}"))).await;
    }
    let types = r#"{"types": true}"#;
    expect_outcome(summary_as(&p, None, types).await, 401).await;
    expect_outcome(
        summary_as(&p, Some("not-the-token-0123456789"), types).await,
        401,
    )
    .await;
    let (status, v) = status_json(summary_as(&p, Some(TOKEN), types).await).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["nodeId"], "parent");
    assert_eq!(v["types"][0]["type"], "Patient");
    assert_eq!(v["types"][0]["count"], 5);
    let split = r#"{"split": [{"type": "Patient"}], "fanout": 2, "leaf": 2}"#;
    let (_, v) = status_json(summary_as(&p, Some(TOKEN), split).await).await;
    let parts = v["ranges"][0]["parts"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{v}");
    assert_eq!(parts[0]["upto"], "p2");
    assert_eq!(parts[1]["upto"], Value::Null);
    let counts: u64 = parts.iter().map(|x| x["count"].as_u64().unwrap()).sum();
    assert_eq!(counts, 5);
    let leaf = r#"{"split": [{"type": "Patient", "after": "p0", "upto": "p2"}]}"#;
    let (_, v) = status_json(summary_as(&p, Some(TOKEN), leaf).await).await;
    let items = v["ranges"][0]["items"].as_array().unwrap();
    assert_eq!(items.len(), 2, "{v}");
    assert_eq!(items[0][0], "p1");
    assert_eq!(
        items[0][2].as_str().unwrap().len(),
        32,
        "the content hash in hex"
    );

    // A cut at the asker's bounds; by content, a tombstone is left out and
    // items carry no vector.
    let cut = r#"{"cut": [{"type": "Patient", "bounds": ["p1", "p3"]}]}"#;
    let (_, v) = status_json(summary_as(&p, Some(TOKEN), cut).await).await;
    let counts: Vec<u64> = v["cuts"][0]["parts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x["count"].as_u64().unwrap())
        .collect();
    assert_eq!(counts, vec![2, 2, 1], "{v}");
    delete(&p, "Patient/p4").await;
    let (_, by_version) = status_json(summary_as(&p, Some(TOKEN), leaf).await).await;
    let content = r#"{"types": true, "content": true, "split": [{"type": "Patient", "after": "p0", "upto": "p2"}]}"#;
    let (_, v) = status_json(summary_as(&p, Some(TOKEN), content).await).await;
    assert_eq!(v["types"][0]["count"], 4, "the tombstone is left out: {v}");
    let items = v["ranges"][0]["items"].as_array().unwrap();
    assert_eq!(items[0][1], "", "{v}");
    assert_ne!(by_version["ranges"][0]["items"][0][1], "");
    assert_eq!(items[0][2], by_version["ranges"][0]["items"][0][2]);

    let many = json!({"split": vec![json!({"type": "Patient"}); 257]}).to_string();
    let many_cuts = json!({"split": vec![json!({"type": "Patient"}); 200], "cut": vec![json!({"type": "Patient", "bounds": []}); 57]}).to_string();
    let wide_cut = json!({"cut": [{"type": "Patient", "bounds": (0..64).map(|i| format!("p{i:02}")).collect::<Vec<_>>()}]}).to_string();
    for (body, status, why) in [
        ("not json", 400, "$summary takes"),
        (r#"{"types": true, "extra": 1}"#, 400, "unknown field"),
        (many.as_str(), 413, "more than 256 ranges"),
        (many_cuts.as_str(), 413, "more than 256 ranges"),
        (wide_cut.as_str(), 400, "more than 63 bounds"),
        (
            r#"{"cut": [{"type": "Patient", "bounds": ["p3", "p1"]}]}"#,
            400,
            "not ascending",
        ),
        (
            r#"{"cut": [{"type": "Patient", "after": "p2", "bounds": ["p1"]}]}"#,
            400,
            "not ascending",
        ),
        (
            r#"{"cut": [{"type": "Patient", "upto": "p2", "bounds": ["p3"]}]}"#,
            400,
            "not ascending",
        ),
        (r#"{"split": [], "fanout": 1}"#, 400, "fanout 1"),
        (r#"{"split": [], "fanout": 65}"#, 400, "fanout 65"),
        (r#"{"split": [], "leaf": 0}"#, 400, "leaf 0"),
        (r#"{"split": [], "leaf": 1001}"#, 400, "leaf 1001"),
        (
            r#"{"split": [{"type": "Nope"}]}"#,
            400,
            "not a resource type",
        ),
        (
            r#"{"split": [{"type": "Patient", "after": "b", "upto": "a"}]}"#,
            400,
            "is not below",
        ),
        (
            &format!(
                r#"{{"split": [{{"type": "Patient", "upto": "{}"}}]}}"#,
                "x".repeat(65)
            ),
            400,
            "longer than 64",
        ),
    ] {
        let why_got = expect_outcome(summary_as(&p, Some(TOKEN), body).await, status).await;
        assert!(why_got.contains(why), "{body}: {why_got}");
    }

    let r = current_as(
        &p,
        &json!({"keys": [["Patient", "p1"], ["Patient", "nobody"]]}),
    )
    .await;
    let (status, b) = status_json(r).await;
    assert_eq!(status, 200, "{b}");
    let entries = b["entry"].as_array().unwrap();
    assert_eq!(entries.len(), 1, "what the parent lacks is left out: {b}");
    assert_eq!(entries[0]["resource"]["id"], "p1");
    let too_many = json!({"keys": vec![json!(["Patient", "x"]); 1001]});
    expect_outcome(current_as(&p, &too_many).await, 413).await;
    expect_outcome(current_as(&p, &json!({"keys": [["Nope", "x"]]})).await, 400).await;
    expect_outcome(current_as(&p, &json!({"keys": "all"})).await, 400).await;

    // The admin call of a node without a parent, and its parameters.
    let (status, _) = verify(&p, "").await;
    assert_eq!(status, 409);
    let (status, v) = verify(&p, "repair=maybe").await;
    assert_eq!(status, 400, "{v}");
    let (status, v) = verify(&p, "everything=true").await;
    assert_eq!(status, 400, "{v}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_scheduled_run_repairs_until_both_ends_are_equal() {
    let (p, c) = pair(Policy::HlcLww, 1, 50).await;
    diverge(&p, &c, 5, 4, 3).await;
    eventually("a scheduled run found the ends equal again", 60, || async {
        let s = admin(&c, "status").await;
        let v = &s["edges"][0]["verify"];
        v["last"]["inSync"] == true && v["differencesTotal"].as_u64() >= Some(12)
    })
    .await;
    let (pd, _) = store_digest(p.store.as_ref()).await;
    let (cd, _) = store_digest(c.store.as_ref()).await;
    assert_eq!(pd, cd, "both ends hold the same resources and content");
    assert_eq!(pd.len(), 59);
    assert_eq!(
        c.store.open_counts().await.unwrap().0,
        0,
        "hlc-lww settled each concurrent pair"
    );
    let m = metrics(&c).await;
    assert!(
        m.contains("fhirsync_verify_in_sync_seq{edge=\"parent\"}"),
        "{m}"
    );
    assert!(
        m.contains("fhirsync_verify_runs_total{edge=\"parent\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_verify_command_reports_and_repairs() {
    let (p, c) = pair(Policy::Manual, 0, 20).await;
    let url = c.base.clone();
    let (ok, out, err) = cli(&["verify", "--url", &url]).await;
    assert!(ok, "{out}{err}");
    assert!(out.contains("0 differences"), "{out}");
    diverge(&p, &c, 2, 1, 0).await;
    let (ok, out, err) = cli(&["verify", "--url", &url]).await;
    assert!(!ok, "differences are a failure without --repair");
    assert!(
        out.contains("3 differences") && out.contains("missing-here: 2"),
        "{out}"
    );
    assert!(err.contains("3 differences"), "{err}");
    let (ok, out, err) = cli(&["verify", "--url", &url, "--repair", "--edge", "parent"]).await;
    assert!(ok, "{out}{err}");
    assert!(
        out.contains("pulled: 2 stored") && out.contains("pushed: 1 stored"),
        "{out}"
    );
    let (ok, out, err) = cli(&["verify", "--url", &url, "--json"]).await;
    assert!(ok, "{out}{err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["differences"], 0);
    let (ok, _, err) = cli(&["verify", "--url", &url, "--edge", "nope"]).await;
    assert!(
        !ok && err.contains("edge 'nope' is not configured"),
        "{err}"
    );
}
