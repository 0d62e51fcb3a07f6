//! Structural validation of writes: strict refusals with one issue per
//! problem and its path, nothing stored; `$validate`; the modes.

mod common;

use common::*;
use serde_json::{json, Value};

fn issues(oo: &Value) -> Vec<String> {
    oo["issue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["expression"][0].as_str().unwrap_or("").to_owned())
        .collect()
}

#[tokio::test]
async fn strict_refuses_with_every_problem_and_stores_nothing() {
    let s = InProcess::start().await;
    let seq = s.store.last_seq();
    let cases = [
        (
            json!({"resourceType": "Patient", "notAnElement": true}),
            vec!["Patient.notAnElement"],
        ),
        (
            json!({"resourceType": "Patient", "birthDate": "1970-02-30x", "active": "yes"}),
            vec!["Patient.active", "Patient.birthDate"],
        ),
        (
            json!({"resourceType": "Patient", "name": {"family": "X"}}),
            vec!["Patient.name"],
        ),
        (
            json!({"resourceType": "Patient", "gender": ["male"]}),
            vec!["Patient.gender"],
        ),
        (
            json!({"resourceType": "Observation", "code": {"text": "x"}}),
            vec!["Observation.status"],
        ),
        (
            json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueWrong": 1}),
            vec!["Observation.valueWrong"],
        ),
        (
            json!({"resourceType": "Patient", "contained": [{"resourceType": "Patient", "bad": 1}]}),
            vec!["Patient.contained[0].bad"],
        ),
        (
            json!({"resourceType": "Patient", "link": [{"other": {"reference": "Nope/1"}, "type": "seealso"}]}),
            vec!["Patient.link[0].other.reference"],
        ),
    ];
    for (res, want) in cases {
        let (st, oo) =
            status_json(post(&s, res["resourceType"].as_str().unwrap(), &res).await).await;
        assert_eq!(st, 422, "{res}: {oo}");
        assert_eq!(oo["resourceType"], "OperationOutcome");
        let mut got = issues(&oo);
        got.sort();
        assert_eq!(got, want, "{res}: {oo}");
    }
    // A transaction with one bad entry is refused whole.
    let b = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": pat("ok"), "request": {"method": "PUT", "url": "Patient/ok"}},
        {"resource": {"resourceType": "Patient", "id": "bad", "x": 1}, "request": {"method": "PUT", "url": "Patient/bad"}}]});
    let (st, oo) = status_json(post(&s, "", &b).await).await;
    assert_eq!(st, 422, "{oo}");
    assert_eq!(issues(&oo), ["Bundle.entry[1].resource.x"]);
    assert_eq!(s.store.last_seq(), seq, "a refused write stored something");
    // A valid resource is taken.
    assert_eq!(post(&s, "Patient", &pat("fine")).await.status(), 201);
}

#[tokio::test]
async fn validate_operation_answers_without_storing() {
    let s = InProcess::start().await;
    let seq = s.store.last_seq();
    let (st, oo) = status_json(
        post(
            &s,
            "Patient/$validate",
            &json!({"resourceType": "Patient", "active": 1}),
        )
        .await,
    )
    .await;
    assert_eq!(st, 200, "{oo}");
    assert_eq!(issues(&oo), ["Patient.active"]);
    assert_eq!(oo["issue"][0]["severity"], "error");
    let (st, oo) = status_json(post(&s, "Patient/$validate", &pat("x")).await).await;
    assert_eq!(st, 200);
    assert_eq!(oo["issue"][0]["severity"], "information", "{oo}");
    // The resource may come in a Parameters.
    let p = json!({"resourceType": "Parameters", "parameter": [{"name": "resource", "resource": {"resourceType": "Patient", "nope": 1}}]});
    let (_, oo) = status_json(post(&s, "Patient/$validate", &p).await).await;
    assert_eq!(issues(&oo), ["Patient.nope"]);
    // The wrong type for the URL is refused.
    expect_outcome(post(&s, "Observation/$validate", &pat("x")).await, 400).await;
    assert_eq!(s.store.last_seq(), seq);
}

#[tokio::test]
async fn a_bad_mode_is_refused_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.toml");
    std::fs::write(&cfg, "[validation]\nmode = \"sometimes\"\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fhirsync"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("[validation] mode 'sometimes'"), "{err}");
}

#[tokio::test]
async fn a_batch_refuses_only_its_invalid_entries() {
    let s = InProcess::start().await;
    let b = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": pat("b1"), "request": {"method": "PUT", "url": "Patient/b1"}},
        {"resource": {"resourceType": "Patient", "id": "b2", "x": 1}, "request": {"method": "PUT", "url": "Patient/b2"}},
        {"resource": pat("b3"), "request": {"method": "PUT", "url": "Patient/b3"}},
        {"resource": {"resourceType": "Patient", "id": "b4", "active": "no"}, "request": {"method": "PUT", "url": "Patient/b4"}}]});
    let (st, out) = status_json(post(&s, "", &b).await).await;
    assert_eq!(st, 200, "{out}");
    let statuses: Vec<&str> = entry_statuses(&out);
    assert_eq!(
        statuses,
        [
            "201 Created",
            "422 Unprocessable Entity",
            "201 Created",
            "422 Unprocessable Entity"
        ],
        "{out}"
    );
    assert_eq!(
        issues(&out["entry"][1]["response"]["outcome"]),
        ["Patient.x"]
    );
    assert_eq!(
        issues(&out["entry"][3]["response"]["outcome"]),
        ["Patient.active"]
    );
    assert_eq!(get(&s, "Patient/b1").await.status(), 200);
    assert_eq!(get(&s, "Patient/b2").await.status(), 404);
    assert_eq!(get(&s, "Patient/b3").await.status(), 200);
    // A batch of nothing but invalid entries stores nothing.
    let seq = s.store.last_seq();
    let b = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "id": "b5", "x": 1}, "request": {"method": "PUT", "url": "Patient/b5"}}]});
    let (st, out) = status_json(post(&s, "", &b).await).await;
    assert_eq!(st, 200, "{out}");
    assert_eq!(
        out["entry"][0]["response"]["status"],
        "422 Unprocessable Entity"
    );
    assert_eq!(s.store.last_seq(), seq);
}

#[tokio::test]
async fn lenient_mode_stores_and_answers_with_the_problems() {
    let s = lenient_node().await;
    let bad = json!({"resourceType": "Patient", "id": "l1", "notAnElement": true, "active": "yes"});
    let r = put(&s, "Patient/l1", &bad).await;
    assert_eq!(r.status(), 201);
    let w = r.headers()[fhirsync_api::validation::WARNING_HEADER]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(w.starts_with("2 problem(s)"), "{w}");
    // A client names the elements: the line is cut at its limit.
    let mut long = pat("l3");
    long["x".repeat(5_000)] = json!(1);
    let r = put(&s, "Patient/l3", &long).await;
    assert_eq!(r.status(), 201);
    let w = &r.headers()[fhirsync_api::validation::WARNING_HEADER];
    assert_eq!(w.len(), fhirsync_api::validation::WARNING_CHARS_MAX);
    // Asked for an OperationOutcome, the answer lists every problem as a warning.
    let r = s
        .client
        .put(format!("{}/Patient/l1", s.base))
        .header("content-type", "application/fhir+json")
        .header("prefer", "return=OperationOutcome")
        .body(json!({"resourceType": "Patient", "id": "l1", "notAnElement": false}).to_string())
        .send()
        .await
        .unwrap();
    let (st, oo) = status_json(r).await;
    assert_eq!(st, 200, "{oo}");
    assert_eq!(issues(&oo), ["Patient.notAnElement"]);
    assert_eq!(oo["issue"][0]["severity"], "warning");
    // A valid write carries no warning.
    let r = put(&s, "Patient/l2", &pat("l2")).await;
    assert!(r
        .headers()
        .get(fhirsync_api::validation::WARNING_HEADER)
        .is_none());
    assert_eq!(get(&s, "Patient/l1/_history").await.status(), 200);
}
