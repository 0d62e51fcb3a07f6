//! Search with the R4 SearchParameters: each parameter type and modifier,
//! OR and AND, chains, `_has`, includes, sorting, `:missing`,
//! compartments, `_summary` and `_elements`, on data built for the purpose
//! and with the expected result sets written out.

mod common;

use common::*;
use serde_json::{json, Value};

const LOINC: &str = "http://loinc.org";
const UCUM: &str = "http://unitsofmeasure.org";

fn fixture() -> Vec<Value> {
    let code = |c: &str, d: &str| json!({"coding": [{"system": LOINC, "code": c, "display": d}]});
    vec![
        json!({"resourceType": "Organization", "id": "o2", "name": "County Health"}),
        json!({"resourceType": "Organization", "id": "o1", "name": "Lakeside Clinic",
               "partOf": {"reference": "Organization/o2"}}),
        json!({"resourceType": "Practitioner", "id": "pr1", "name": [{"family": "Mwangi"}]}),
        json!({"resourceType": "Patient", "id": "p1", "gender": "female", "birthDate": "1970-03-02",
               "name": [{"family": "Otieno", "given": ["Amani"]}],
               "identifier": [{"system": "urn:mrn", "value": "111"}],
               "telecom": [{"system": "phone", "value": "555"}],
               "address": [{"city": "Kisumu"}],
               "communication": [{"language": {"text": "Swahili"}}],
               "managingOrganization": {"reference": "Organization/o1"}}),
        json!({"resourceType": "Patient", "id": "p2", "gender": "male", "birthDate": "1985",
               "active": false, "name": [{"family": "Öztürk", "given": ["Joy"]}],
               "identifier": [{"system": "urn:mrn", "value": "222"}]}),
        json!({"resourceType": "Patient", "id": "p3", "gender": "female", "birthDate": "2001-06",
               "name": [{"family": "Otis"}]}),
        json!({"resourceType": "ServiceRequest", "id": "sr1", "status": "active", "intent": "order",
               "subject": {"reference": "Patient/p1"}}),
        json!({"resourceType": "Observation", "id": "ob1", "status": "final",
               "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
               "code": code("8867-4", "Heart rate"), "subject": {"reference": "Patient/p1"},
               "basedOn": [{"reference": "ServiceRequest/sr1"}],
               "performer": [{"reference": "Practitioner/pr1"}],
               "effectiveDateTime": "2020-01-05T10:00:00Z",
               "valueQuantity": {"value": 72, "unit": "beats/minute", "system": UCUM, "code": "/min"}}),
        json!({"resourceType": "Observation", "id": "ob2", "status": "preliminary",
               "code": code("8480-6", "Systolic blood pressure"), "subject": {"reference": "Patient/p2"},
               "effectivePeriod": {"start": "2021-03-01", "end": "2021-03-02"},
               "valueQuantity": {"value": 130, "system": UCUM, "code": "mm[Hg]"}}),
        json!({"resourceType": "Observation", "id": "ob3", "status": "final",
               "code": code("85354-9", "Blood pressure panel"), "subject": {"reference": "Patient/p1"},
               "effectiveDateTime": "2022-07",
               "component": [
                   {"code": code("8480-6", "Systolic"), "valueQuantity": {"value": 120, "system": UCUM, "code": "mm[Hg]"}},
                   {"code": code("8462-4", "Diastolic"), "valueQuantity": {"value": 80, "system": UCUM, "code": "mm[Hg]"}}]}),
        json!({"resourceType": "Observation", "id": "ob4", "status": "final",
               "meta": {"tag": [{"system": "urn:t", "code": "draft"}]},
               "code": {"text": "Free text note"}, "subject": {"reference": "Group/g1"},
               "valueString": "x"}),
        json!({"resourceType": "Condition", "id": "c1", "subject": {"reference": "Patient/p1"},
               "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "problem-list-item"}]}],
               "onsetDateTime": "2019"}),
        json!({"resourceType": "Condition", "id": "c2", "subject": {"reference": "Patient/p2"},
               "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/condition-category", "code": "encounter-diagnosis"}]}]}),
        json!({"resourceType": "Appointment", "id": "a1", "status": "booked", "start": "2026-01-10T09:00:00Z",
               "participant": [{"actor": {"reference": "Patient/p1"}, "status": "accepted"},
                               {"actor": {"reference": "Practitioner/pr1"}, "status": "accepted"}]}),
        json!({"resourceType": "MedicationRequest", "id": "m1", "status": "active", "intent": "order",
               "subject": {"reference": "Patient/p1"}, "authoredOn": "2023-02-01",
               "medicationCodeableConcept": {"text": "Amoxicillin"}}),
        json!({"resourceType": "MedicationRequest", "id": "m2", "status": "stopped", "intent": "order",
               "subject": {"reference": "Patient/p2"}, "medicationCodeableConcept": {"text": "Ibuprofen"}}),
        json!({"resourceType": "Encounter", "id": "e1", "status": "finished",
               "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
               "subject": {"reference": "Patient/p1"}}),
        json!({"resourceType": "Questionnaire", "id": "q1", "status": "active", "url": "http://x.org/q/1"}),
    ]
}

async fn loaded() -> InProcess {
    let s = InProcess::start().await;
    let entries: Vec<Value> = fixture()
        .into_iter()
        .map(|r| {
            let url = format!(
                "{}/{}",
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap()
            );
            json!({"resource": r, "request": {"method": "PUT", "url": url}})
        })
        .collect();
    commit(&s, entries).await;
    s
}

/// Posts `entries` as one transaction Bundle, which must succeed.
async fn commit(s: &InProcess, entries: Vec<Value>) {
    let r = post(
        s,
        "",
        &json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
}

/// The matches of a search (`Type/id`), in the server's order, and the
/// included resources.
async fn search(s: &InProcess, q: &str) -> (Vec<String>, Vec<String>) {
    let (st, b) = status_json(get(s, q).await).await;
    assert_eq!(st, 200, "{q}: {b}");
    let mut matched = Vec::new();
    let mut included = Vec::new();
    for e in b["entry"].as_array().cloned().unwrap_or_default() {
        let r = &e["resource"];
        let key = format!(
            "{}/{}",
            r["resourceType"].as_str().unwrap(),
            r["id"].as_str().unwrap_or("")
        );
        match e["search"]["mode"].as_str() {
            Some("match") => matched.push(key),
            Some("include") => included.push(key),
            _ => {}
        }
    }
    (matched, included)
}

/// The sorted included resources of a search.
async fn included(s: &InProcess, q: &str) -> Vec<String> {
    let mut i = search(s, q).await.1;
    i.sort();
    i
}

/// The sorted matches of a search.
async fn ids(s: &InProcess, q: &str) -> Vec<String> {
    let mut m = search(s, q).await.0;
    m.sort();
    m
}

fn set(v: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = v.iter().map(|s| s.to_string()).collect();
    v.sort();
    v
}

#[tokio::test]
async fn every_parameter_type_and_modifier() {
    let s = loaded().await;
    let cases: &[(&str, &[&str])] = &[
        // string: prefix, case and accents folded; :exact; :contains
        ("Patient?name=oti", &["Patient/p1", "Patient/p3"]),
        ("Patient?name=%C3%96ZT", &["Patient/p2"]),
        ("Patient?family=ozturk", &["Patient/p2"]),
        ("Patient?name:exact=Otis", &["Patient/p3"]),
        ("Patient?name:exact=otis", &[]),
        ("Patient?name:contains=tie", &["Patient/p1"]),
        ("Patient?address-city=kis", &["Patient/p1"]),
        ("Organization?name=lake", &["Organization/o1"]),
        // token: code, system|code, |code, :not, :text, boolean, ContactPoint
        ("Patient?gender=female", &["Patient/p1", "Patient/p3"]),
        ("Patient?gender:not=female", &["Patient/p2"]),
        ("Patient?identifier=urn:mrn%7C111", &["Patient/p1"]),
        ("Patient?identifier=%7C111", &[]),
        ("Patient?identifier=222", &["Patient/p2"]),
        (
            "Patient?identifier=urn:mrn%7C",
            &["Patient/p1", "Patient/p2"],
        ),
        ("Patient?active=false", &["Patient/p2"]),
        ("Patient?phone=555", &["Patient/p1"]),
        (
            "Observation?code=http://loinc.org%7C8867-4",
            &["Observation/ob1"],
        ),
        ("Observation?code=8480-6", &["Observation/ob2"]),
        ("Observation?code:text=heart", &["Observation/ob1"]),
        ("Observation?code:text=free", &["Observation/ob4"]),
        ("Condition?category=problem-list-item", &["Condition/c1"]),
        ("MedicationRequest?status=active", &["MedicationRequest/m1"]),
        (
            "MedicationRequest?status=active,stopped",
            &["MedicationRequest/m1", "MedicationRequest/m2"],
        ),
        ("MedicationRequest?status=active&subject=Patient/p2", &[]),
        (
            "MedicationRequest?code:text=amox",
            &["MedicationRequest/m1"],
        ),
        // date: partial dates as ranges, every prefix, Period
        ("Patient?birthdate=1970", &["Patient/p1"]),
        ("Patient?birthdate=lt1980", &["Patient/p1"]),
        ("Patient?birthdate=ge1985", &["Patient/p2", "Patient/p3"]),
        ("Patient?birthdate=2001-06", &["Patient/p3"]),
        ("Patient?birthdate=eq2001-06-15", &[]),
        ("Patient?birthdate=ne1985", &["Patient/p1", "Patient/p3"]),
        ("Patient?birthdate=sa1985", &["Patient/p3"]),
        ("Patient?birthdate=eb1985", &["Patient/p1"]),
        ("Patient?birthdate=ap1970-03-01", &["Patient/p1"]),
        ("Observation?date=2020-01-05", &["Observation/ob1"]),
        (
            "Observation?date=ge2021",
            &["Observation/ob2", "Observation/ob3"],
        ),
        ("Observation?date=2021-03-01", &[]),
        ("Observation?date=2021-03", &["Observation/ob2"]),
        ("Observation?date=gt2020&date=lt2022", &["Observation/ob2"]),
        ("Appointment?date=2026-01-10", &["Appointment/a1"]),
        (
            "MedicationRequest?authoredon=le2023-02-01",
            &["MedicationRequest/m1"],
        ),
        // quantity: prefixes, value|system|code, value||unit
        ("Observation?value-quantity=72", &["Observation/ob1"]),
        ("Observation?value-quantity=gt100", &["Observation/ob2"]),
        (
            "Observation?value-quantity=lt100%7C%7C/min",
            &["Observation/ob1"],
        ),
        (
            "Observation?value-quantity=lt100%7C%7Cbeats/minute",
            &["Observation/ob1"],
        ),
        (
            "Observation?value-quantity=130%7Chttp://unitsofmeasure.org%7Cmm%5BHg%5D",
            &["Observation/ob2"],
        ),
        (
            "Observation?value-quantity=130%7Chttp://unitsofmeasure.org%7Cmg",
            &[],
        ),
        ("Observation?value-quantity=ap75", &["Observation/ob1"]),
        // composite
        (
            "Observation?component-code-value-quantity=http://loinc.org%7C8480-6$gt110",
            &["Observation/ob3"],
        ),
        (
            "Observation?component-code-value-quantity=8480-6$lt110",
            &[],
        ),
        // reference: Type/id, id, :Type, absolute, chains of several links
        (
            "Observation?subject=Patient/p1",
            &["Observation/ob1", "Observation/ob3"],
        ),
        (
            "Observation?patient=p1",
            &["Observation/ob1", "Observation/ob3"],
        ),
        (
            "Observation?subject=p1",
            &["Observation/ob1", "Observation/ob3"],
        ),
        ("Observation?subject:Group=g1", &["Observation/ob4"]),
        ("Observation?patient=Group/g1", &[]),
        ("Observation?patient:missing=true", &["Observation/ob4"]),
        (
            "Observation?patient.family=otieno",
            &["Observation/ob1", "Observation/ob3"],
        ),
        // parameters stored as others: combo-* as the code and component
        // parameters, phonetic as name
        (
            "Observation?combo-code=8480-6",
            &["Observation/ob2", "Observation/ob3"],
        ),
        (
            "Observation?combo-code:text=systolic",
            &["Observation/ob2", "Observation/ob3"],
        ),
        (
            "Observation?combo-code:not=8480-6",
            &["Observation/ob1", "Observation/ob4"],
        ),
        (
            "Observation?combo-value-quantity=lt100",
            &["Observation/ob1", "Observation/ob3"],
        ),
        ("Observation?combo-code:missing=true", &["Observation/ob4"]), // a text without codes
        ("Patient?phonetic=otie", &["Patient/p1"]),
        (
            "Observation?based-on=ServiceRequest/sr1",
            &["Observation/ob1"],
        ),
        (
            "Observation?performer=Practitioner/pr1",
            &["Observation/ob1"],
        ),
        ("Appointment?actor=Patient/p1", &["Appointment/a1"]),
        ("Appointment?actor=Practitioner/pr1", &["Appointment/a1"]),
        ("Appointment?patient=p2", &[]),
        (
            "Observation?subject:Patient.name=otieno",
            &["Observation/ob1", "Observation/ob3"],
        ),
        ("Observation?subject.gender=male", &["Observation/ob2"]),
        (
            "Observation?patient.organization.name=lakeside",
            &["Observation/ob1", "Observation/ob3"],
        ),
        (
            "Observation?patient.organization.partof.name=county",
            &["Observation/ob1", "Observation/ob3"],
        ),
        ("Observation?patient.organization.name=county", &[]),
        // reverse chains
        (
            "Patient?_has:Observation:patient:code=8480-6",
            &["Patient/p2"],
        ),
        (
            "Patient?_has:Condition:subject:category=problem-list-item",
            &["Patient/p1"],
        ),
        (
            "Organization?_has:Patient:organization:_has:Observation:patient:code=8867-4",
            &["Organization/o1"],
        ),
        (
            "Organization?_has:Patient:organization:_has:Observation:patient:code=8480-6",
            &[],
        ),
        // uri
        ("Questionnaire?url=http://x.org/q/1", &["Questionnaire/q1"]),
        ("Questionnaire?url=http://x.org/q", &[]),
        (
            "Questionnaire?url:below=http://x.org/q",
            &["Questionnaire/q1"],
        ),
        (
            "Questionnaire?url:above=http://x.org/q/1/sub",
            &["Questionnaire/q1"],
        ),
        // :missing
        (
            "Observation?value-quantity:missing=true",
            &["Observation/ob3", "Observation/ob4"],
        ),
        ("Observation?category:missing=false", &["Observation/ob1"]),
        // common parameters
        ("Observation?_id=ob1,ob2&status=final", &["Observation/ob1"]),
        ("Observation?_tag=urn:t%7Cdraft", &["Observation/ob4"]),
        ("?_tag=draft", &["Observation/ob4"]),
    ];
    let mut failed = Vec::new();
    for (q, want) in cases {
        let got = ids(&s, q).await;
        if got != set(want) {
            failed.push(format!("{q}: got {got:?}, want {want:?}"));
        }
    }
    assert!(
        failed.is_empty(),
        "{} of {} searches differ:\n{}",
        failed.len(),
        cases.len(),
        failed.join("\n")
    );
    // Absolute references to this server read as local ones.
    let q = format!("Observation?subject={}", s.url("Patient/p1"));
    assert_eq!(
        ids(&s, &q).await,
        set(&["Observation/ob1", "Observation/ob3"])
    );
}

#[tokio::test]
async fn includes_sorting_and_paging() {
    let s = loaded().await;
    let (m, inc) = search(&s, "Observation?code=8867-4&_include=Observation:subject").await;
    assert_eq!((m, inc), (set(&["Observation/ob1"]), set(&["Patient/p1"])));
    let inc = included(&s, "Observation?_id=ob1&_include=Observation:*").await;
    assert_eq!(
        inc,
        set(&["Patient/p1", "Practitioner/pr1", "ServiceRequest/sr1"])
    );
    let (_, inc) = search(&s, "Observation?_id=ob1&_include=Observation:subject:Group").await;
    assert!(inc.is_empty());
    let inc = included(
        &s,
        "Patient?_id=p1&_revinclude=Condition:subject&_revinclude=Observation:patient",
    )
    .await;
    assert_eq!(
        inc,
        set(&["Condition/c1", "Observation/ob1", "Observation/ob3"])
    );
    // :iterate follows what was included.
    let inc = included(&s, "Observation?_id=ob1&_include=Observation:subject&_include:iterate=Patient:organization&_include:iterate=Organization:partof").await;
    assert_eq!(
        inc,
        set(&["Organization/o1", "Organization/o2", "Patient/p1"])
    );
    // Without :iterate, one level only.
    let inc = included(
        &s,
        "Observation?_id=ob1&_include=Observation:subject&_include=Patient:organization",
    )
    .await;
    assert_eq!(inc, set(&["Patient/p1"]));

    // _sort on any sortable parameter, several keys, missing values last.
    assert_eq!(
        search(&s, "Patient?_sort=birthdate").await.0,
        ["Patient/p1", "Patient/p2", "Patient/p3"]
    );
    assert_eq!(
        search(&s, "Patient?_sort=-birthdate").await.0,
        ["Patient/p3", "Patient/p2", "Patient/p1"]
    );
    assert_eq!(
        search(&s, "Patient?_sort=family").await.0,
        ["Patient/p1", "Patient/p3", "Patient/p2"]
    );
    assert_eq!(
        search(&s, "Patient?_sort=gender,-birthdate").await.0,
        ["Patient/p3", "Patient/p1", "Patient/p2"]
    );
    assert_eq!(
        search(&s, "Observation?_sort=value-quantity&status=final")
            .await
            .0,
        ["Observation/ob1", "Observation/ob3", "Observation/ob4"]
    );
    // Sorted pages follow each other at the first page's snapshot.
    let mut url = s.url("Patient?_sort=family&_count=1");
    let mut seen = Vec::new();
    let mut first = true;
    loop {
        let (st, b) = status_json(s.client.get(&url).send().await.unwrap()).await;
        assert_eq!(st, 200, "{b}");
        seen.extend(entry_ids(&b));
        if first {
            // A new patient after the first page is not on later pages.
            let r = put(
                &s,
                "Patient/p0",
                &json!({"resourceType": "Patient", "id": "p0", "name": [{"family": "Aaron"}]}),
            )
            .await;
            assert_eq!(r.status(), 201);
            first = false;
        }
        match next_link(&b) {
            Some(n) => url = n,
            None => break,
        }
    }
    assert_eq!(seen, ["Patient/p1", "Patient/p3", "Patient/p2"]);
    assert_eq!(
        search(&s, "Patient?_sort=family&_count=1").await.0,
        ["Patient/p0"]
    );
}

#[tokio::test]
async fn compartments_everything_summary_and_elements() {
    let s = loaded().await;
    assert_eq!(
        ids(&s, "Patient/p1/Observation").await,
        set(&["Observation/ob1", "Observation/ob3"])
    );
    assert_eq!(
        ids(&s, "Patient/p1/Observation?code=8867-4").await,
        set(&["Observation/ob1"])
    );
    let all = set(&[
        "Appointment/a1",
        "Condition/c1",
        "Encounter/e1",
        "MedicationRequest/m1",
        "Observation/ob1",
        "Observation/ob3",
        "ServiceRequest/sr1",
    ]);
    assert_eq!(ids(&s, "Patient/p1/*").await, all);
    let mut every = all.clone();
    every.push("Patient/p1".into());
    every.sort();
    assert_eq!(ids(&s, "Patient/p1/$everything").await, every);
    assert_eq!(
        ids(&s, "Patient/p1/$everything?_type=Condition,Encounter").await,
        set(&["Condition/c1", "Encounter/e1", "Patient/p1"])
    );
    assert_eq!(
        ids(&s, "Patient/p1/$everything?_since=2100-01-01").await,
        Vec::<String>::new()
    );
    // Paging through $everything yields each resource once.
    let mut url = s.url("Patient/p1/$everything?_count=3");
    let mut seen = Vec::new();
    loop {
        let (st, b) = status_json(s.client.get(&url).send().await.unwrap()).await;
        assert_eq!(st, 200, "{b}");
        seen.extend(entry_ids(&b));
        match next_link(&b) {
            Some(n) => url = n,
            None => break,
        }
    }
    seen.sort();
    assert_eq!(seen, every);
    assert_eq!(
        ids(&s, "Practitioner/pr1/Appointment").await,
        set(&["Appointment/a1"])
    );
    expect_outcome(get(&s, "Patient/p1/Organization").await, 400).await;
    expect_outcome(get(&s, "Organization/o1/Patient").await, 404).await;

    // _summary and _elements
    let (_, b) = status_json(get(&s, "Patient?_summary=count").await).await;
    assert_eq!(b["total"], 3);
    assert!(b
        .get("entry")
        .is_none_or(|e| e.as_array().unwrap().is_empty()));
    let (_, b) = status_json(get(&s, "Patient?_id=p1&_summary=true").await).await;
    let p = &b["entry"][0]["resource"];
    assert!(
        p.get("name").is_some() && p.get("communication").is_none(),
        "{p}"
    );
    assert!(p["meta"]["tag"]
        .as_array()
        .unwrap()
        .iter()
        .any(|t| t["code"] == "SUBSETTED"));
    let (_, b) = status_json(get(&s, "Patient?_id=p1&_elements=gender").await).await;
    let p = b["entry"][0]["resource"].as_object().unwrap();
    let mut keys: Vec<&str> = p.keys().map(String::as_str).collect();
    keys.sort();
    assert_eq!(keys, ["gender", "id", "meta", "resourceType"]);
    let (_, b) = status_json(get(&s, "Observation?_id=ob1&_elements=valueQuantity").await).await;
    assert!(b["entry"][0]["resource"].get("valueQuantity").is_some());
}

#[tokio::test]
async fn what_changes_or_is_bad_is_seen_as_such() {
    let s = loaded().await;
    // The index follows the current version, and deletes.
    let mut ob1 = fixture().into_iter().find(|r| r["id"] == "ob1").unwrap();
    ob1["status"] = json!("amended");
    assert_eq!(put(&s, "Observation/ob1", &ob1).await.status(), 200);
    assert_eq!(
        ids(&s, "Observation?status=final").await,
        set(&["Observation/ob3", "Observation/ob4"])
    );
    assert_eq!(
        ids(&s, "Observation?status=amended").await,
        set(&["Observation/ob1"])
    );
    assert!(delete(&s, "Patient/p3").await.status().is_success());
    assert_eq!(ids(&s, "Patient?gender=female").await, set(&["Patient/p1"]));

    // Unknown parameters: a warning, or 400 under strict handling.
    let (st, b) = status_json(get(&s, "Patient?nonsense=1").await).await;
    assert_eq!(st, 200);
    assert!(b.to_string().contains("nonsense"), "{b}");
    let r = s
        .client
        .get(s.url("Patient?nonsense=1"))
        .header("prefer", "handling=strict")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 400).await;
    // Malformed values and modifiers a parameter does not have are 400.
    for q in [
        "Patient?birthdate=notadate",
        "Patient?gender:exact=female",
        "Observation?value-quantity=abc",
        "Observation?subject=Nope/1",
        "Patient?_sort=nonsense",
        "Observation?_include=Observation:status",
        "Patient?_has:Observation:code:code=1",
        "Observation?component-code-value-quantity=8480-6",
    ] {
        let why = expect_outcome(get(&s, q).await, 400).await;
        assert!(!why.is_empty(), "{q}");
    }
}

/// A code without its system is narrowed to the one system its rows have
/// (a planning shortcut); with a second system, both are found again.
#[tokio::test]
async fn a_code_without_system_finds_every_system() {
    let s = InProcess::start().await;
    let obs = |id: &str, system: &str| {
        json!({"resourceType": "Observation", "id": id, "status": "final",
               "code": {"coding": [{"system": system, "code": "x1"}]}})
    };
    put(&s, "Observation/a", &obs("a", "urn:a")).await;
    assert_eq!(
        ids(&s, "Observation?code=x1").await,
        set(&["Observation/a"])
    );
    assert_eq!(
        ids(&s, "Observation?code=x1&status=final").await,
        set(&["Observation/a"])
    );
    put(&s, "Observation/b", &obs("b", "urn:b")).await;
    put(
        &s,
        "Observation/c",
        &json!({"resourceType": "Observation", "id": "c", "status": "final",
        "code": {"coding": [{"code": "x1"}]}}),
    )
    .await;
    assert_eq!(
        ids(&s, "Observation?code=x1").await,
        set(&["Observation/a", "Observation/b", "Observation/c"])
    );
    assert_eq!(
        ids(&s, "Observation?code=x1&status=final&_total=accurate")
            .await
            .len(),
        3
    );
    assert_eq!(
        ids(&s, "Observation?code=urn:b|x1").await,
        set(&["Observation/b"])
    );
    assert_eq!(
        ids(&s, "Observation?code=|x1").await,
        set(&["Observation/c"])
    );
}

/// Past `NARROW_CONDS_MAX` token values without a system the plan stops
/// probing; the search still finds every match.
#[tokio::test]
async fn many_codes_without_system_still_find_every_match() {
    let s = InProcess::start().await;
    for (id, sys) in [("a", "urn:a"), ("b", "urn:b")] {
        put(
            &s,
            &format!("Observation/{id}"),
            &json!({"resourceType": "Observation", "id": id,
            "status": "final", "code": {"coding": [{"system": sys, "code": format!("c-{id}")}]}}),
        )
        .await;
    }
    let n = fhirsync_store::sqlite::NARROW_CONDS_MAX + 10;
    let mut codes: Vec<String> = (0..n).map(|i| format!("none{i}")).collect();
    codes.push("c-a".into());
    codes.push("c-b".into());
    let q = format!("Observation?code={}&status=final", codes.join(","));
    assert_eq!(ids(&s, &q).await, set(&["Observation/a", "Observation/b"]));
}

/// Date and number ranges matching more rows than `DENSE_ROWS` are checked
/// version by version through their tables' `seq` index: every page of
/// each search holds exactly the expected matches, in order, alone, with
/// another dense range and behind a selective clause.
#[tokio::test]
async fn dense_ranges_find_every_match_on_every_page() {
    let s = InProcess::start().await;
    let n = fhirsync_store::sqlite::DENSE_ROWS + 600;
    // (year, month, day) and value of observation i
    let at = |i: usize| (2000 + i % 20, 1 + (i / 20) % 12, 1 + i % 28);
    let value = |i: usize| i % 100;
    let entries: Vec<Value> = (0..n)
        .map(|i| {
            let (y, m, d) = at(i);
            json!({"resource": {"resourceType": "Observation", "id": format!("o{i}"), "status": "final",
                "code": {"coding": [{"system": LOINC, "code": "8310-5"}]},
                "subject": {"reference": format!("Patient/p{}", i % 10)},
                "effectiveDateTime": format!("{y}-{m:02}-{d:02}"),
                "valueQuantity": {"value": value(i), "system": UCUM, "code": "Cel"}},
                "request": {"method": "PUT", "url": format!("Observation/o{i}")}})
        })
        .collect();
    commit(&s, entries).await;
    type Pred = Box<dyn Fn(usize) -> bool>;
    let cases: Vec<(&str, Pred)> = vec![
        ("date=ge2003-01-01", Box::new(move |i| at(i).0 >= 2003)),
        ("date=lt2018", Box::new(move |i| at(i).0 < 2018)),
        ("value-quantity=gt10", Box::new(move |i| value(i) > 10)),
        ("value-quantity=le89", Box::new(move |i| value(i) <= 89)),
        (
            "date=ge2003-01-01&value-quantity=gt10",
            Box::new(move |i| at(i).0 >= 2003 && value(i) > 10),
        ),
        (
            "subject=Patient/p3&date=ge2003-01-01&value-quantity=lt95",
            Box::new(move |i| i % 10 == 3 && at(i).0 >= 2003 && value(i) < 95),
        ),
        // sparse: listed, as before
        ("date=lt2002-01-01", Box::new(move |i| at(i).0 < 2002)),
    ];
    for (q, pred) in cases {
        assert_every_page(&s, q, (0..n).filter(|k| pred(*k))).await;
    }
}

/// A chain with more than `DENSE_ROWS` references to matching targets
/// looks up each version's reference instead of listing all of them:
/// every page holds exactly the expected matches, in order, alone and
/// with another clause; a target that no longer matches (updated) or is
/// gone (deleted) brings nothing, and a sparse chain still lists.
#[tokio::test]
async fn dense_chains_find_every_match_on_every_page() {
    let s = InProcess::start().await;
    let n = fhirsync_store::sqlite::DENSE_ROWS + 500;
    let family = |i: usize| {
        if i.is_multiple_of(7) {
            "Kamau"
        } else {
            "Otieno"
        }
    };
    let status = |j: usize| {
        if j.is_multiple_of(3) {
            "preliminary"
        } else {
            "final"
        }
    };
    let mut entries: Vec<Value> = (0..n)
        .map(|i| {
            json!({"resource": {"resourceType": "Patient", "id": format!("p{i}"),
                "name": [{"family": family(i)}]},
                "request": {"method": "PUT", "url": format!("Patient/p{i}")}})
        })
        .collect();
    // observation j is about patient (j * 13) % n: not in the patients' order
    let subject = move |j: usize| (j * 13) % n;
    entries.extend((0..n).map(|j| {
        json!({"resource": {"resourceType": "Observation", "id": format!("o{j}"), "status": status(j),
            "code": {"coding": [{"system": LOINC, "code": "8310-5"}]},
            "subject": {"reference": format!("Patient/p{}", subject(j))}},
            "request": {"method": "PUT", "url": format!("Observation/o{j}")}})
    }));
    // a reference to a Group with a matching patient's id is no Patient
    entries.push(
        json!({"resource": {"resourceType": "Observation", "id": "g", "status": "final",
        "code": {"coding": [{"system": LOINC, "code": "8310-5"}]},
        "subject": {"reference": "Group/p3"}},
        "request": {"method": "PUT", "url": "Observation/g"}}),
    );
    commit(&s, entries).await;
    // p1 no longer matches, p2 is gone
    put(
        &s,
        "Patient/p1",
        &json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Kamau"}]}),
    )
    .await;
    assert_eq!(delete(&s, "Patient/p2").await.status(), 204);
    let otieno = move |i: usize| family(i) == "Otieno" && i != 1 && i != 2;
    assert!((0..n).filter(|i| otieno(*i)).count() >= fhirsync_store::sqlite::DENSE_ROWS);
    type Pred = Box<dyn Fn(usize) -> bool>;
    let cases: Vec<(&str, Pred)> = vec![
        (
            "subject:Patient.family=otieno",
            Box::new(move |j| otieno(subject(j))),
        ),
        (
            "subject:Patient.family=otieno&status=final",
            Box::new(move |j| otieno(subject(j)) && status(j) == "final"),
        ),
        (
            "subject:Patient.family=otieno&_id=o7,o8,o9,o10",
            Box::new(move |j| otieno(subject(j)) && (7..=10).contains(&j)),
        ),
        // sparse: its references listed
        (
            "subject:Patient.family=kamau",
            Box::new(move |j| {
                subject(j) != 2 && (family(subject(j)) == "Kamau" || subject(j) == 1)
            }),
        ),
    ];
    for (q, pred) in cases {
        assert_every_page(&s, q, (0..n).filter(|k| pred(*k))).await;
    }
    // the included subjects are the matches' own
    let inc = included(
        &s,
        "Observation?subject:Patient.family=otieno&_id=o7,o8&_include=Observation:subject",
    )
    .await;
    assert!(!otieno(subject(7)) && otieno(subject(8)));
    assert_eq!(inc, vec![format!("Patient/p{}", subject(8))]);
}

/// Every page of `Observation?{q}` (400 a page) holds exactly the
/// observations `o{k}` for `want`, in order, and `_total=accurate` counts
/// them.
async fn assert_every_page(s: &InProcess, q: &str, want: impl Iterator<Item = usize>) {
    let want: Vec<String> = want.map(|k| format!("o{k}")).collect();
    let (entries, _) = all_pages(s, &format!("Observation?{q}&_count=400")).await;
    let got: Vec<String> = entries
        .iter()
        .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(got.len(), want.len(), "{q}");
    assert_eq!(got, want, "{q}");
    let (_, b) = status_json(get(s, &format!("Observation?{q}&_total=accurate")).await).await;
    assert_eq!(b["total"], want.len(), "{q}");
}
