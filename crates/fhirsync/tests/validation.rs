//! Structural validation of writes: strict refusals with one issue per
//! problem and its path, nothing stored; `$validate`; the modes.

mod common;

use common::*;
use fhirsync_store::Store;
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
