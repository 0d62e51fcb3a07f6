//! History at three levels and search, including paging that neither
//! skips nor repeats when many versions share one `lastUpdated` and when
//! writes happen between pages.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use common::*;
use fhirsync_core::clock::ManualClock;
use fhirsync_testkit::server::Options;
use serde_json::json;

/// A server whose clock never moves: every version has the same lastUpdated.
async fn frozen() -> (InProcess, Arc<ManualClock>) {
    let clock = Arc::new(ManualClock::new(1_700_000_000_000));
    let s = InProcess::start_with(Options {
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    (s, clock)
}

#[tokio::test]
async fn history_paging_same_last_updated_no_skip_no_repeat() {
    let (s, _clock) = frozen().await;
    for i in 0..37 {
        put(&s, &format!("Patient/p{}", i % 5), &json!({"resourceType": "Patient", "id": format!("p{}", i % 5), "birthDate": format!("2000-01-{:02}", i % 28 + 1)})).await;
    }
    let (entries, pages) = all_pages(&s, "_history?_count=4").await;
    assert!(pages >= 9);
    let keys: Vec<String> = entries
        .iter()
        .map(|e| e["response"]["etag"].to_string() + e["fullUrl"].as_str().unwrap())
        .collect();
    let uniq: HashSet<&String> = keys.iter().collect();
    assert_eq!(uniq.len(), keys.len(), "an entry repeated");
    let stored = s.store.history(fhirsync_store::HistoryQuery {
        scope: fhirsync_store::HistoryScope::System,
        since_ms: None,
        before: None,
        count: 1000,
    });
    assert_eq!(
        entries.len(),
        stored.await.unwrap().len(),
        "an entry was skipped"
    );
    let lus: HashSet<&str> = entries
        .iter()
        .map(|e| e["response"]["lastModified"].as_str().unwrap())
        .collect();
    assert_eq!(lus.len(), 1, "test premise: one shared lastUpdated");
}

#[tokio::test]
async fn history_levels_and_since() {
    let clock = Arc::new(ManualClock::new(1_000_000_000_000));
    let s = InProcess::start_with(Options {
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    put(&s, "Patient/a", &pat("a")).await;
    clock.set(1_000_000_060_000);
    let mut a2 = pat("a");
    a2["active"] = json!(false);
    put(&s, "Patient/a", &a2).await;
    put(&s, "Observation/o", &json!({"resourceType": "Observation", "id": "o", "status": "final", "code": {"text": "x"}})).await;
    delete(&s, "Patient/a").await;

    let (_, inst) = status_json(get(&s, "Patient/a/_history").await).await;
    assert_eq!(inst["type"], "history");
    let e = inst["entry"].as_array().unwrap();
    assert_eq!(e.len(), 3);
    // Newest first; the delete has no resource.
    assert_eq!(e[0]["request"]["method"], "DELETE");
    assert!(e[0].get("resource").is_none());
    assert_eq!(e[0]["response"]["etag"], "W/\"3\"");
    assert_eq!(e[2]["response"]["status"], "201 Created");

    let (_, ty) = status_json(get(&s, "Patient/_history").await).await;
    assert_eq!(ty["entry"].as_array().unwrap().len(), 3);
    let (_, sys) = status_json(get(&s, "_history").await).await;
    assert_eq!(sys["entry"].as_array().unwrap().len(), 4);
    let (_, since) = status_json(get(&s, "_history?_since=2001-09-09T01:47:00Z").await).await;
    assert_eq!(since["entry"].as_array().unwrap().len(), 3, "{since}");
    expect_outcome(get(&s, "_history?_since=yesterday").await, 400).await;
    expect_outcome(get(&s, "Patient/zz/_history").await, 404).await;
    let r = s
        .client
        .get(s.url("_history?_at=2020"))
        .header("prefer", "handling=strict")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 400).await;
}

#[tokio::test]
async fn search_parameters() {
    let clock = Arc::new(ManualClock::new(1_600_000_000_000)); // 2020-09-13
    let s = InProcess::start_with(Options {
        clock: clock.clone(),
        ..Default::default()
    })
    .await;
    put(&s, "Patient/p1", &json!({"resourceType": "Patient", "id": "p1", "identifier": [{"system": "urn:a", "value": "1"}, {"value": "bare"}]})).await;
    put(&s, "Patient/p2", &json!({"resourceType": "Patient", "id": "p2", "identifier": [{"system": "urn:b", "value": "1"}]})).await;
    clock.set(1_700_000_000_000); // 2023-11-14
    for (id, subj) in [
        ("o1", "Patient/p1"),
        ("o2", "Patient/p2"),
        ("o3", "Group/g1"),
    ] {
        put(&s, &format!("Observation/{id}"), &json!({"resourceType": "Observation", "id": id, "status": "final", "code": {"text": "x"}, "subject": {"reference": subj}})).await;
    }
    put(&s, "AllergyIntolerance/a1", &json!({"resourceType": "AllergyIntolerance", "id": "a1", "patient": {"reference": "http://elsewhere/fhir/Patient/p1"}})).await;

    let check = |q: &'static str, want: &'static [&'static str]| {
        let s = &s;
        async move {
            let (st, b) = status_json(get(s, q).await).await;
            assert_eq!(st, 200, "{q}: {b}");
            let mut got = entry_ids(&b);
            got.sort();
            let mut want: Vec<String> = want.iter().map(|w| w.to_string()).collect();
            want.sort();
            assert_eq!(got, want, "{q}");
            assert_eq!(b["total"], json!(want.len()), "{q}");
        }
    };
    check("Patient?_id=p1", &["Patient/p1"]).await;
    check("Patient?_id=p1,p2", &["Patient/p1", "Patient/p2"]).await;
    check("Patient?identifier=urn:a|1", &["Patient/p1"]).await;
    check("Patient?identifier=1", &["Patient/p1", "Patient/p2"]).await;
    check("Patient?identifier=urn:b|", &["Patient/p2"]).await;
    check("Patient?identifier=|bare", &["Patient/p1"]).await;
    check(
        "Patient?identifier=urn:a|1,urn:b|1",
        &["Patient/p1", "Patient/p2"],
    )
    .await;
    check("Patient?identifier=urn:a|1&identifier=urn:b|1", &[]).await;
    check("Observation?subject=Patient/p1", &["Observation/o1"]).await;
    check("Observation?subject=g1", &["Observation/o3"]).await;
    check("Observation?patient=p2", &["Observation/o2"]).await;
    check("Observation?patient=Patient/p1", &["Observation/o1"]).await;
    // A reference to another server is that server's patient, not ours.
    check("AllergyIntolerance?patient=p1", &[]).await;
    check(
        "AllergyIntolerance?patient=http://elsewhere/fhir/Patient/p1",
        &["AllergyIntolerance/a1"],
    )
    .await;
    check(
        "Patient?_lastUpdated=2020-09-13",
        &["Patient/p1", "Patient/p2"],
    )
    .await;
    check("Patient?_lastUpdated=gt2020-09-13", &[]).await;
    check(
        "Observation?_lastUpdated=ge2023-11-14T22:13:20Z",
        &["Observation/o1", "Observation/o2", "Observation/o3"],
    )
    .await;
    check("Observation?_lastUpdated=lt2023-11-14T22:13:20Z", &[]).await;
    check(
        "Observation?_lastUpdated=le2023-11",
        &["Observation/o1", "Observation/o2", "Observation/o3"],
    )
    .await;
    check(
        "Observation?_lastUpdated=gt2020&_lastUpdated=lt2024",
        &["Observation/o1", "Observation/o2", "Observation/o3"],
    )
    .await;
    check(
        "Patient?_lastUpdated=eq2020-09-13T12:26:40%2B00:00",
        &["Patient/p1", "Patient/p2"],
    )
    .await;
    check(
        "Patient?_lastUpdated=eq2020-09-13T12:26:40+00:00",
        &["Patient/p1", "Patient/p2"],
    )
    .await;
    check("?_id=p1,o1", &["Patient/p1", "Observation/o1"]).await;

    // Deleted resources are not found; updated ones are found once.
    delete(&s, "Observation/o3").await;
    put(&s, "Observation/o1", &json!({"resourceType": "Observation", "id": "o1", "status": "amended", "code": {"text": "x"}, "subject": {"reference": "Patient/p1"}})).await;
    check(
        "Observation?_lastUpdated=gt2000",
        &["Observation/o1", "Observation/o2"],
    )
    .await;

    let (_, b) = status_json(get(&s, "Observation?_summary=count").await).await;
    assert_eq!(b["total"], 2);
    assert!(b
        .get("entry")
        .is_none_or(|e| e.as_array().unwrap().is_empty()));
    let (_, b) = status_json(get(&s, "Observation?_total=none").await).await;
    assert!(b.get("total").is_none());
    let (_, b) = status_json(get(&s, "Observation?_sort=-_lastUpdated").await).await;
    assert_eq!(entry_ids(&b), vec!["Observation/o1", "Observation/o2"]);
    let (_, b) = status_json(get(&s, "Observation?_sort=_lastUpdated").await).await;
    assert_eq!(entry_ids(&b), vec!["Observation/o2", "Observation/o1"]);

    for bad in [
        "Patient?_lastUpdated=xx2020",
        "Patient?_lastUpdated=2020-13-45",
        "Patient?_count=-1",
        "Patient?_id=a_b",
        "Observation?patient=Foo/1",
        "Patient?_total=lots",
    ] {
        expect_outcome(get(&s, bad).await, 400).await;
    }
}

#[tokio::test]
async fn unsupported_parameters_strict_and_lenient() {
    let s = InProcess::start().await;
    put(&s, "Patient/p", &pat("p")).await;
    let (st, b) = status_json(get(&s, "Patient?nonsense=smith&_contained=true").await).await;
    assert_eq!(st, 200);
    let outcome = b["entry"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["search"]["mode"] == "outcome")
        .unwrap();
    assert_eq!(outcome["resource"]["issue"][0]["severity"], "warning");
    let d = outcome["resource"]["issue"][0]["diagnostics"]
        .as_str()
        .unwrap();
    assert!(d.contains("nonsense") && d.contains("_contained"), "{d}");
    assert_eq!(
        entry_ids(&b),
        vec!["Patient/p"],
        "ignored parameters do not filter"
    );
    let r = s
        .client
        .get(s.url("Patient?nonsense=smith"))
        .header("prefer", "handling=strict")
        .send()
        .await
        .unwrap();
    let d = expect_outcome(r, 400).await;
    assert!(d.contains("nonsense"), "{d}");
    let r = s
        .client
        .get(s.url("Patient?code:below=x"))
        .header("prefer", "handling=strict")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 400).await;
}

#[tokio::test]
async fn search_paging_is_stable_under_writes() {
    let (s, _clock) = frozen().await;
    for i in 0..30 {
        put(&s, &format!("Patient/p{i:02}"), &pat(&format!("p{i:02}"))).await;
    }
    // without _total=accurate, a search of several pages is not counted;
    // one whose matches fit on the page is
    let (_, b) = status_json(
        s.client
            .get(s.url("Patient?_count=7"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(b.get("total").is_none(), "{b}");
    let (_, b) = status_json(
        s.client
            .get(s.url("Patient?_count=50"))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(b["total"], 30);
    let mut url = s.url("Patient?_count=7&_total=accurate");
    let mut seen: Vec<String> = Vec::new();
    let mut round = 0;
    loop {
        let (_, b) = status_json(s.client.get(&url).send().await.unwrap()).await;
        assert_eq!(b["total"], 30, "the total is the snapshot's");
        seen.extend(entry_ids(&b));
        // Between pages: update resources already seen and not yet seen,
        // delete one, create new ones.
        let mut upd = pat(&format!("p{:02}", round * 3 % 30));
        upd["active"] = json!(round % 2 == 0);
        put(&s, &format!("Patient/p{:02}", round * 3 % 30), &upd).await;
        put(
            &s,
            &format!("Patient/new{round}"),
            &pat(&format!("new{round}")),
        )
        .await;
        if round == 1 {
            delete(&s, "Patient/p29").await;
        }
        round += 1;
        match next_link(&b) {
            Some(n) => url = n,
            None => break,
        }
    }
    let uniq: HashSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), 30, "{seen:?}");
    assert_eq!(uniq.len(), 30, "a resource repeated: {seen:?}");
    assert!(
        seen.iter().all(|k| k.starts_with("Patient/p")),
        "a page showed a later write: {seen:?}"
    );
}

/// The outcome entries of a searchset that name `limit`.
fn cut_warnings_of(b: &serde_json::Value, limit: &str) -> usize {
    b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["search"]["mode"] == "outcome")
        .filter(|e| {
            e["resource"]["issue"][0]["diagnostics"]
                .as_str()
                .is_some_and(|d| d.contains(limit))
        })
        .count()
}

fn cut_warnings(b: &serde_json::Value) -> usize {
    cut_warnings_of(b, "INCLUDED_MAX")
}

/// `:iterate` goes `ITERATE_ROUNDS_MAX` levels deep; a chain one longer
/// is cut there, with a warning that names the limit.
#[tokio::test]
async fn iterated_includes_cut_at_their_depth_say_so() {
    let s = InProcess::start().await;
    let max = fhirsync_store::sql::search::ITERATE_ROUNDS_MAX;
    // org0 is part of org1, org1 of org2, ...
    let org = |i: usize| {
        json!({"resource": {"resourceType": "Organization", "id": format!("org{i}"),
            "partOf": {"reference": format!("Organization/org{}", i + 1)}},
            "request": {"method": "PUT", "url": format!("Organization/org{i}")}})
    };
    let put = |entries: Vec<serde_json::Value>| json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
    let (st, _) = status_json(post(&s, "", &put((0..=max).map(org).collect())).await).await;
    assert_eq!(st, 200);
    let q = "Organization?_id=org0&_include:iterate=Organization:partof";
    // org0 and the max levels above it; org{max} links to no one stored.
    let (_, page) = status_json(get(&s, q).await).await;
    assert_eq!(entry_ids(&page).len(), 1 + max);
    assert_eq!(cut_warnings_of(&page, "ITERATE_ROUNDS_MAX"), 0);
    // One level more than the limit: left out, and said.
    let (st, _) = status_json(post(&s, "", &put(vec![org(max + 1)])).await).await;
    assert_eq!(st, 200);
    let (_, page) = status_json(get(&s, q).await).await;
    assert_eq!(entry_ids(&page).len(), 1 + max);
    assert_eq!(cut_warnings_of(&page, "ITERATE_ROUNDS_MAX"), 1, "{page}");
}

#[tokio::test]
async fn includes_cut_at_their_limit_say_so() {
    let s = InProcess::start().await;
    let max = fhirsync_store::sql::search::INCLUDED_MAX;
    let obs = |i: usize| {
        json!({"resource": {"resourceType": "Observation", "id": format!("o{i}"), "status": "final",
            "code": {"text": "x"}, "subject": {"reference": "Patient/p"}},
            "request": {"method": "PUT", "url": format!("Observation/o{i}")}})
    };
    let mut entries =
        vec![json!({"resource": pat("p"), "request": {"method": "PUT", "url": "Patient/p"}})];
    entries.extend((0..max).map(obs));
    let b = json!({"resourceType": "Bundle", "type": "batch", "entry": entries});
    let (st, _) = status_json(post(&s, "", &b).await).await;
    assert_eq!(st, 200);
    let q = "Patient?_id=p&_revinclude=Observation:subject";
    // Exactly the limit: everything, and no warning.
    let (_, page) = status_json(get(&s, q).await).await;
    assert_eq!(entry_ids(&page).len(), 1 + max);
    assert_eq!(cut_warnings(&page), 0, "{}", page["entry"][max + 1]);
    // One more than the limit: the first INCLUDED_MAX, and a warning.
    let b = json!({"resourceType": "Bundle", "type": "batch", "entry": [obs(max)]});
    let (st, _) = status_json(post(&s, "", &b).await).await;
    assert_eq!(st, 200);
    let (st, page) = status_json(get(&s, q).await).await;
    assert_eq!(st, 200);
    assert_eq!(entry_ids(&page).len(), 1 + max);
    assert_eq!(cut_warnings(&page), 1);
}
