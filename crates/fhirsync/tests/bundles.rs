//! Transaction and batch Bundles: order, `urn:uuid:` resolution,
//! conditional entries, all-or-nothing, and a Synthea-sized patient.

mod common;

use common::*;
use fhirsync_testkit::gen::{synthea_like_bundle, Rng};
use serde_json::{json, Value};

fn tx(entries: Value) -> Value {
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

#[tokio::test]
async fn transaction_resolves_urn_uuids_everywhere() {
    let s = InProcess::start().await;
    let b = tx(json!([
        {"fullUrl": "urn:uuid:61ebe359-bfdc-4613-8bf2-c5e300945f0a",
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"},
                      "subject": {"reference": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059"},
                      "hasMember": [{"reference": "urn:uuid:00000000-0000-4000-8000-000000000003"}]},
         "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "urn:uuid:88f151c0-a954-468a-88bd-5ae15c08e059",
         "resource": {"resourceType": "Patient", "active": true,
                      "generalPractitioner": [{"reference": "urn:uuid:00000000-0000-4000-8000-000000000004"}]},
         "request": {"method": "POST", "url": "Patient"}},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000003",
         "resource": {"resourceType": "Observation", "status": "final", "code": {"text": "member"}},
         "request": {"method": "POST", "url": "Observation"}},
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000004",
         "resource": {"resourceType": "Practitioner", "id": "dr1"},
         "request": {"method": "PUT", "url": "Practitioner/dr1"}}
    ]));
    let (st, resp) = status_json(post(&s, "", &b).await).await;
    assert_eq!(st, 200, "{resp}");
    assert_eq!(resp["type"], "transaction-response");
    let e = resp["entry"].as_array().unwrap();
    assert_eq!(e.len(), 4);
    let loc = |i: usize| e[i]["response"]["location"].as_str().unwrap().to_owned();
    assert_eq!(e[0]["response"]["status"], "201 Created");
    assert_eq!(e[3]["response"]["status"], "201 Created");
    assert!(loc(3).starts_with("Practitioner/dr1/_history/1"));
    let obs_path = loc(0).split("/_history").next().unwrap().to_owned();
    let pat_path = loc(1).split("/_history").next().unwrap().to_owned();
    let member_path = loc(2).split("/_history").next().unwrap().to_owned();
    let (_, obs) = status_json(get(&s, &obs_path).await).await;
    assert_eq!(obs["subject"]["reference"], pat_path);
    assert_eq!(obs["hasMember"][0]["reference"], member_path);
    let (_, p) = status_json(get(&s, &pat_path).await).await;
    assert_eq!(p["generalPractitioner"][0]["reference"], "Practitioner/dr1");
    // Search by the rewritten reference works.
    let (_, found) = status_json(get(&s, &format!("Observation?subject={pat_path}")).await).await;
    assert_eq!(found["total"], 1);
}

#[tokio::test]
async fn transaction_is_all_or_nothing() {
    let s = InProcess::start().await;
    put(&s, "Patient/keep", &pat("keep")).await;
    let seq = s.store.last_seq();
    let failing = [
        // A PUT with a stale If-Match after a good create.
        tx(json!([
            {"resource": pat("x1"), "request": {"method": "PUT", "url": "Patient/x1"}},
            {"resource": {"resourceType": "Patient", "id": "keep"}, "request": {"method": "PUT", "url": "Patient/keep", "ifMatch": "W/\"9\""}}
        ])),
        // An invalid resource.
        tx(json!([
            {"resource": pat("x2"), "request": {"method": "PUT", "url": "Patient/x2"}},
            {"resource": {"resourceType": "Patient", "id": "bad_id"}, "request": {"method": "PUT", "url": "Patient/bad_id"}}
        ])),
        // A reference to an entry that is not there.
        tx(json!([
            {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "urn:uuid:00000000-0000-4000-8000-00000000dead"}},
             "request": {"method": "POST", "url": "Observation"}}
        ])),
        // A GET of something missing, and a delete that ran first.
        tx(json!([
            {"request": {"method": "GET", "url": "Patient/missing"}},
            {"request": {"method": "DELETE", "url": "Patient/keep"}}
        ])),
        // Two entries writing the same resource.
        tx(json!([
            {"resource": pat("dup"), "request": {"method": "PUT", "url": "Patient/dup"}},
            {"resource": pat("dup"), "request": {"method": "PUT", "url": "Patient/dup"}}
        ])),
    ];
    let statuses = [412, 422, 400, 404, 400];
    for (b, want) in failing.iter().zip(statuses) {
        let d = expect_outcome(post(&s, "", b).await, want).await;
        assert!(d.contains("bundle entry"), "{d}");
    }
    assert_eq!(
        s.store.last_seq(),
        seq,
        "a failed transaction left writes behind"
    );
    assert_eq!(get(&s, "Patient/keep").await.status(), 200);
    for bad in [
        json!({"resourceType": "Bundle", "type": "collection"}),
        json!({"resourceType": "Patient"}),
        json!({"resourceType": "Bundle", "type": "transaction", "entry": {}}),
    ] {
        expect_outcome(post(&s, "", &bad).await, 400).await;
    }
}

#[tokio::test]
async fn transaction_order_and_conditionals() {
    let s = InProcess::start().await;
    put(&s, "Patient/old", &pat("old")).await;
    put(&s, "Patient/m", &json!({"resourceType": "Patient", "id": "m", "identifier": [{"system": "urn:mrn", "value": "m"}]})).await;
    let b = tx(json!([
        // GET runs last: it sees the PUT below.
        {"request": {"method": "GET", "url": "Patient/new"}},
        {"request": {"method": "GET", "url": "Patient?identifier=urn:mrn|m"}},
        {"resource": pat("new"), "request": {"method": "PUT", "url": "Patient/new"}},
        // Conditional create that matches: nothing created, the reference goes to Patient/m.
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-0000000000a1",
         "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "m"}]},
         "request": {"method": "POST", "url": "Patient", "ifNoneExist": "identifier=urn:mrn|m"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "urn:uuid:00000000-0000-4000-8000-0000000000a1"},
                      "performer": [{"reference": "Patient?identifier=urn:mrn|m"}]},
         "request": {"method": "POST", "url": "Observation"}},
        // Conditional update with no match creates.
        {"fullUrl": "urn:uuid:00000000-0000-4000-8000-0000000000a2",
         "resource": {"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "z"}]},
         "request": {"method": "PUT", "url": "Patient?identifier=urn:mrn|z"}},
        {"request": {"method": "DELETE", "url": "Patient/old"}}
    ]));
    let (st, r) = status_json(post(&s, "", &b).await).await;
    assert_eq!(st, 200, "{r}");
    let e = r["entry"].as_array().unwrap();
    assert_eq!(e[0]["resource"]["id"], "new");
    assert_eq!(e[1]["resource"]["type"], "searchset");
    assert_eq!(e[1]["resource"]["total"], 1);
    assert_eq!(e[3]["response"]["status"], "200 OK");
    assert!(e[3]["response"]["location"]
        .as_str()
        .unwrap()
        .starts_with("Patient/m/"));
    assert_eq!(e[5]["response"]["status"], "201 Created");
    assert_eq!(e[6]["response"]["status"], "204 No Content");
    let obs = e[4]["response"]["location"]
        .as_str()
        .unwrap()
        .split("/_history")
        .next()
        .unwrap()
        .to_owned();
    let (_, o) = status_json(get(&s, &obs).await).await;
    assert_eq!(o["subject"]["reference"], "Patient/m");
    assert_eq!(o["performer"][0]["reference"], "Patient/m");
    expect_outcome(get(&s, "Patient/old").await, 410).await;
    // Transaction response with resources when asked.
    let r = with_body(
        s.client.post(s.url("")),
        &tx(json!([{"resource": pat("rep"), "request": {"method": "PUT", "url": "Patient/rep"}}])),
    )
    .header("prefer", "return=representation")
    .send()
    .await
    .unwrap();
    let (_, r) = status_json(r).await;
    assert_eq!(r["entry"][0]["resource"]["id"], "rep");
}

#[tokio::test]
async fn batch_entries_succeed_or_fail_alone() {
    let s = InProcess::start().await;
    let b = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": pat("b1"), "request": {"method": "PUT", "url": "Patient/b1"}},
        {"resource": {"resourceType": "Patient", "id": "zz"}, "request": {"method": "PUT", "url": "Patient/b2"}},
        {"request": {"method": "GET", "url": "Patient/nothere"}},
        {"resource": pat("b3"), "request": {"method": "PUT", "url": "Patient/b3", "ifMatch": "W/\"4\""}},
        {"request": {"method": "PATCH", "url": "Patient/b1"}},
        {"request": {"method": "GET", "url": "Patient/b1"}}
    ]});
    let (st, r) = status_json(post(&s, "", &b).await).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(r["type"], "batch-response");
    let status: Vec<&str> = entry_statuses(&r);
    assert_eq!(
        status,
        [
            "201 Created",
            "422 Unprocessable Entity",
            "404 Not Found",
            "412 Precondition Failed",
            "400 Bad Request",
            "200 OK"
        ]
    );
    assert_eq!(
        r["entry"][1]["response"]["outcome"]["resourceType"],
        "OperationOutcome"
    );
    assert_eq!(s.store.last_seq(), 1);
}

#[tokio::test]
async fn batch_entries_that_all_succeed_see_each_other_in_order() {
    // No entry fails: the entries run together (one savepoint), still in
    // order and each as if alone.
    let s = InProcess::start().await;
    let mut second = pat("c1");
    second["active"] = json!(false);
    let b = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": pat("c1"), "request": {"method": "PUT", "url": "Patient/c1"}},
        {"resource": second, "request": {"method": "PUT", "url": "Patient/c1"}},
        {"request": {"method": "GET", "url": "Patient/c1"}},
        {"resource": pat("c2"), "request": {"method": "POST", "url": "Patient"}},
        {"request": {"method": "DELETE", "url": "Patient/c1"}}
    ]});
    let (st, r) = status_json(post(&s, "", &b).await).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        entry_statuses(&r),
        [
            "201 Created",
            "200 OK",
            "200 OK",
            "201 Created",
            "204 No Content"
        ]
    );
    assert_eq!(r["entry"][2]["resource"]["meta"]["versionId"], "2");
    assert_eq!(r["entry"][2]["resource"]["active"], false);
    assert_eq!(s.store.last_seq(), 4);
}

#[tokio::test]
async fn batch_entries_prepared_before_the_writer_are_found_by_later_entries() {
    // Entries without conditional references are prepared (hashed,
    // indexed) before the writer, and their index rows are written sorted
    // when the Bundle ends: a search in a later entry, and a conditional
    // reference resolved by the writer, must still find them, and a
    // `urn:` reference (it names no entry of a batch) fails its entry only.
    let s = InProcess::start().await;
    let patient = json!({"resourceType": "Patient", "id": "d1",
                         "identifier": [{"system": "urn:mrn", "value": "d1"}]});
    let obs = |subject: &str| {
        json!({"resourceType": "Observation", "status": "final",
               "code": {"text": "x"}, "subject": {"reference": subject}})
    };
    let b = json!({"resourceType": "Bundle", "type": "batch", "entry": [
        {"resource": patient, "request": {"method": "PUT", "url": "Patient/d1"}},
        {"request": {"method": "GET", "url": "Patient?identifier=urn:mrn|d1"}},
        {"resource": obs("Patient?identifier=urn:mrn|d1"), "request": {"method": "POST", "url": "Observation"}},
        {"resource": obs("urn:uuid:00000000-0000-4000-8000-00000000beef"), "request": {"method": "POST", "url": "Observation"}},
        {"resource": obs("Patient/d1"), "request": {"method": "POST", "url": "Observation"}}
    ]});
    let (st, r) = status_json(post(&s, "", &b).await).await;
    assert_eq!(st, 200, "{r}");
    assert_eq!(
        entry_statuses(&r),
        [
            "201 Created",
            "200 OK",
            "201 Created",
            "400 Bad Request",
            "201 Created"
        ]
    );
    assert_eq!(r["entry"][1]["resource"]["total"], 1, "{r}");
    let (st, found) = status_json(get(&s, "Observation?subject=Patient/d1").await).await;
    assert_eq!(st, 200, "{found}");
    assert_eq!(entry_ids(&found).len(), 2, "{found}");
    assert_eq!(s.store.last_seq(), 3);
}

#[tokio::test]
async fn synthea_sized_patient_in_one_transaction() {
    let s = InProcess::start().await;
    let b = synthea_like_bundle(&mut Rng::new(42), 50, 16);
    let text = b.to_string();
    let n = b["entry"].as_array().unwrap().len();
    assert!(
        text.len() > 900_000 && n > 500,
        "{} bytes, {n} entries",
        text.len()
    );
    let r = s
        .client
        .post(s.url(""))
        .header("content-type", FHIR_JSON)
        .body(text)
        .send()
        .await
        .unwrap();
    let (st, resp) = status_json(r).await;
    assert_eq!(st, 200);
    let created = resp["entry"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["response"]["status"] == "201 Created")
        .count();
    assert_eq!(created, n);
    assert_eq!(s.store.last_seq(), n as u64, "one version per entry");
    // Every reference points at a stored resource: nothing dangles.
    let (_, obs) = status_json(get(&s, "Observation?_count=1000").await).await;
    for e in obs["entry"].as_array().unwrap() {
        for r in ["subject", "encounter"] {
            let target = e["resource"][r]["reference"].as_str().unwrap();
            assert!(!target.starts_with("urn:"), "{target}");
            assert_eq!(get(&s, target).await.status(), 200, "{target}");
        }
    }
    // The second patient reuses Organization/Practitioner by condition only if equal; a
    // repeated bundle creates new patients but no new org when identifiers match.
    let again = synthea_like_bundle(&mut Rng::new(42), 1, 1);
    let (st, resp) = status_json(post(&s, "", &again).await).await;
    assert_eq!(st, 200);
    assert_eq!(
        resp["entry"][0]["response"]["status"], "200 OK",
        "conditional Organization matched"
    );
}

#[tokio::test]
async fn urn_uuid_references_in_a_cycle_resolve_once_each() {
    // Three entries that refer to each other in a ring, one to itself: no
    // graph is walked, each full URL becomes one id and every reference is
    // rewritten once.
    let s = InProcess::start().await;
    let u = |n: u8| format!("urn:uuid:00000000-0000-4000-8000-00000000000{n}");
    let obs = |me: u8, next: u8| {
        json!({"fullUrl": u(me),
               "resource": {"resourceType": "Observation", "status": "final", "code": {"text": format!("o{me}")},
                            "hasMember": [{"reference": u(next)}, {"reference": u(me)}]},
               "request": {"method": "POST", "url": "Observation"}})
    };
    let b = tx(json!([obs(1, 2), obs(2, 3), obs(3, 1)]));
    let (st, resp) = status_json(post(&s, "", &b).await).await;
    assert_eq!(st, 200, "{resp}");
    let paths: Vec<String> = resp["entry"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            let l = e["response"]["location"].as_str().unwrap();
            l.split("/_history").next().unwrap().to_owned()
        })
        .collect();
    for (i, p) in paths.iter().enumerate() {
        let (_, o) = status_json(get(&s, p).await).await;
        assert_eq!(o["hasMember"][0]["reference"], paths[(i + 1) % 3], "{o}");
        assert_eq!(o["hasMember"][1]["reference"], *p, "{o}");
    }
}
