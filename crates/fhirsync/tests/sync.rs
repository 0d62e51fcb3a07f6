//! `fhirsync sync` between two real nodes on 127.0.0.1 (and a directory),
//! run as the real binary: every mode, the options, retries, credentials,
//! and bad input.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use common::*;
use fhirsync_testkit::gen::{synthea_like_bundle, Rng};
use fhirsync_testkit::{Proxy, ProxyOptions};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_fhirsync");

struct Run {
    ok: bool,
    stderr: String,
}

async fn sync(args: &[&str]) -> Run {
    let o = tokio::process::Command::new(BIN)
        .arg("sync")
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    Run {
        ok: o.status.success(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// Loads resources into a node in one batch.
async fn load(s: &InProcess, resources: &[Value]) {
    let entries: Vec<Value> = resources
        .iter()
        .map(|r| json!({"resource": r, "request": {"method": "PUT", "url": format!("{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap())}}))
        .collect();
    let (st, b) = status_json(
        post(
            s,
            "",
            &json!({"resourceType": "Bundle", "type": "batch", "entry": entries}),
        )
        .await,
    )
    .await;
    assert_eq!(st, 200, "{b}");
}

/// Every current resource of the given types, without server-set meta.
async fn content(s: &InProcess, types: &[&str]) -> BTreeMap<String, Value> {
    let mut out = BTreeMap::new();
    for t in types {
        let mut url = s.url(&format!("{t}?_count=1000"));
        loop {
            let b: Value = s
                .client
                .get(&url)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            for e in b["entry"].as_array().cloned().unwrap_or_default() {
                let mut r = e["resource"].clone();
                if let Some(m) = r["meta"].as_object_mut() {
                    m.remove("versionId");
                    m.remove("lastUpdated");
                    if m.is_empty() {
                        r.as_object_mut().unwrap().remove("meta");
                    }
                }
                out.insert(format!("{t}/{}", r["id"].as_str().unwrap()), r);
            }
            match next_link(&b) {
                Some(n) => url = n,
                None => break,
            }
        }
    }
    out
}

fn people(n: usize) -> Vec<Value> {
    let mut v = Vec::new();
    for i in 0..n {
        v.push(json!({"resourceType": "Patient", "id": format!("p{i}"), "identifier": [{"system": "urn:mrn", "value": format!("{}", i % 3)}], "birthDate": "1990-01-01"}));
        v.push(json!({"resourceType": "Observation", "id": format!("o{i}"), "status": "final", "code": {"text": "hr"}, "subject": {"reference": format!("Patient/p{i}")}, "valueQuantity": {"value": 72.50}}));
    }
    v
}

/// A proxy in front of `base` that demands this `Authorization` header.
async fn auth_proxy(base: &str, header: &str) -> Proxy {
    Proxy::start(
        base,
        ProxyOptions {
            require_auth: Some(header.into()),
            ..Default::default()
        },
    )
    .await
}

fn report(path: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn copy_then_compare_converge_and_second_compare_uploads_nothing() {
    let (a, b) = (InProcess::start().await, InProcess::start().await);
    load(&a, &people(60)).await;
    let dir = tempfile::tempdir().unwrap();
    let rep = dir.path().join("r.json");
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &b.base,
        "-m",
        "COPY",
        "--report",
        rep.to_str().unwrap(),
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(total(&report(&rep), "created"), 120);
    let types = ["Patient", "Observation"];
    assert_eq!(content(&a, &types).await, content(&b, &types).await);

    // Change both sides: the source edits, deletes and creates; the target drifts.
    let mut p = people(60)[0].clone();
    p["birthDate"] = json!("1991-02-02");
    load(&a, &[p, json!({"resourceType": "Patient", "id": "new1"})]).await;
    delete(&a, "Observation/o5").await;
    load(
        &b,
        &[
            json!({"resourceType": "Patient", "id": "p7", "gender": "other"}),
            json!({"resourceType": "Patient", "id": "only-on-target"}),
        ],
    )
    .await;
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &b.base,
        "-m",
        "COMPARE",
        "--report",
        rep.to_str().unwrap(),
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    let rp = report(&rep);
    assert_eq!(total(&rp, "created") + total(&rp, "updated"), 3, "{rp}");
    assert_eq!(total(&rp, "deleted"), 2, "{rp}");
    assert_eq!(total(&rp, "unchanged"), 117, "{rp}");
    assert_eq!(content(&a, &types).await, content(&b, &types).await);

    // Right after: nothing to do.
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &b.base,
        "-m",
        "COMPARE",
        "--report",
        rep.to_str().unwrap(),
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    let rp = report(&rep);
    assert_eq!(
        total(&rp, "created") + total(&rp, "updated") + total(&rp, "deleted"),
        0,
        "{rp}"
    );

    // --no-delete keeps target-only resources; --dry-run writes nothing.
    load(&b, &[json!({"resourceType": "Patient", "id": "keep-me"})]).await;
    let seq = fhirsync_store::Store::last_seq(&*b.store);
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &b.base,
        "-m",
        "COMPARE",
        "--dry-run",
        "--report",
        rep.to_str().unwrap(),
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        total(&report(&rep), "deleted"),
        1,
        "dry run counts what it would delete"
    );
    assert_eq!(
        fhirsync_store::Store::last_seq(&*b.store),
        seq,
        "dry run wrote"
    );
    let r = sync(&["-s", &a.base, "-t", &b.base, "-m", "COMPARE", "--no-delete"]).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(get(&b, "Patient/keep-me").await.status(), 200);
}

fn notes(rp: &Value) -> String {
    rp["notes"].to_string()
}

/// `fhirsync sync ARGS --report FILE`, which must succeed; the report.
async fn sync_report(args: &[&str], rep: &std::path::Path) -> Value {
    let mut all = args.to_vec();
    all.extend(["--report", rep.to_str().unwrap()]);
    let r = sync(&all).await;
    assert!(r.ok, "{}", r.stderr);
    report(rep)
}

/// Resources created, updated and deleted by a run.
fn written(rp: &Value) -> u64 {
    total(rp, "created") + total(rp, "updated") + total(rp, "deleted")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compare_between_two_nodes_reads_only_what_differs() {
    let (a, b) = (InProcess::start().await, InProcess::start().await);
    load(&a, &people(1500)).await;
    let dir = tempfile::tempdir().unwrap();
    let rep = dir.path().join("r.json");
    let r = sync(&["-s", &a.base, "-t", &b.base, "-m", "COPY"]).await;
    assert!(r.ok, "{}", r.stderr);
    let compare = ["-s", &a.base, "-t", &b.base, "-m", "COMPARE"];

    // Identical: the summaries say so, nothing is read in full.
    let rp = sync_report(&compare, &rep).await;
    assert!(notes(&rp).contains("compared by summaries"), "{rp}");
    assert_eq!(total(&rp, "read"), 0, "{rp}");
    assert_eq!(total(&rp, "unchanged"), 3000, "{rp}");

    // Differences scattered over both types and both sides, one at each end
    // of the id order.
    let mut edits = Vec::new();
    for i in [0usize, 777, 1499] {
        let mut p = people(1500)[2 * i].clone();
        p["birthDate"] = json!("1970-07-07");
        edits.push(p);
    }
    edits.push(json!({"resourceType": "Observation", "id": "zz-new", "status": "final", "code": {"text": "t"}}));
    load(&a, &edits).await;
    delete(&a, "Observation/o42").await;
    load(
        &b,
        &[
            json!({"resourceType": "Patient", "id": "p900", "gender": "other"}),
            json!({"resourceType": "Patient", "id": "0-only-on-target"}),
            json!({"resourceType": "Encounter", "id": "e-only-on-target", "status": "finished", "class": {"code": "AMB"}}),
        ],
    )
    .await;
    let rp = sync_report(&compare, &rep).await;
    assert!(notes(&rp).contains("compared by summaries"), "{rp}");
    // Read in full and written: the three edits, the new one, and p900
    // changed on the target; deleted: o42 (gone from the source) and the
    // two target-only ones.
    assert_eq!(total(&rp, "read"), 5, "{rp}");
    assert_eq!(written(&rp), 5 + 3, "{rp}");
    assert_eq!(total(&rp, "deleted"), 3, "{rp}");
    assert_eq!(total(&rp, "unchanged"), 3000 - 5, "{rp}");
    let types = ["Patient", "Observation", "Encounter"];
    assert_eq!(content(&a, &types).await, content(&b, &types).await);

    // --no-summary reads everything and finds nothing left to do.
    let rp = sync_report(&[&compare[..], &["--no-summary"]].concat(), &rep).await;
    assert!(!notes(&rp).contains("compared by summaries"), "{rp}");
    assert_eq!((total(&rp, "read"), written(&rp)), (3000, 0), "{rp}");

    // Differences found the long way too: both sides read as text and
    // walked together in key order.
    let mut edits = Vec::new();
    for i in [1usize, 500, 1498] {
        let mut p = people(1500)[2 * i].clone();
        p["birthDate"] = json!("1981-08-08");
        edits.push(p);
    }
    edits.push(json!({"resourceType": "Observation", "id": "zz-new-2", "status": "final", "code": {"text": "t"}}));
    load(&a, &edits).await;
    delete(&a, "Observation/o43").await;
    load(
        &b,
        &[
            json!({"resourceType": "Patient", "id": "0-only-on-target-2"}),
            json!({"resourceType": "Encounter", "id": "e-only-on-target-2", "status": "finished", "class": {"code": "AMB"}}),
        ],
    )
    .await;
    let rp = sync_report(&[&compare[..], &["--no-summary"]].concat(), &rep).await;
    assert_eq!(total(&rp, "read"), 3000, "{rp}");
    assert_eq!(
        [
            total(&rp, "created"),
            total(&rp, "updated"),
            total(&rp, "deleted"),
            total(&rp, "unchanged")
        ],
        [1, 3, 3, 2996],
        "{rp}"
    );
    assert_eq!(content(&a, &types).await, content(&b, &types).await);

    // A target that refuses summaries to this caller: compared the long way.
    let proxy = Proxy::start(
        &b.base,
        ProxyOptions {
            refuse_path: Some("$summary".into()),
            ..Default::default()
        },
    )
    .await;
    let rp = sync_report(&["-s", &a.base, "-t", &proxy.base, "-m", "COMPARE"], &rep).await;
    assert!(notes(&rp).contains("summaries are not available"), "{rp}");
    assert_eq!((total(&rp, "read"), written(&rp)), (3000, 0), "{rp}");
}

/// A source whose paging loops (a later page's `next` leads back to the
/// first) fails the run with the reason, and nothing is deleted: ending
/// the read quietly would pass a part of the source for all of it, and
/// COMPARE would delete the rest on the target.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_source_whose_paging_loops_fails_the_run_and_deletes_nothing() {
    let (a, b) = (InProcess::start().await, InProcess::start().await);
    // Three pages of each type: the second's link is turned back.
    load(&a, &people(2100)).await;
    let r = sync(&["-s", &a.base, "-t", &b.base, "-m", "COPY"]).await;
    assert!(r.ok, "{}", r.stderr);
    let proxy = Proxy::start(
        &a.base,
        ProxyOptions {
            loop_paging: true,
            forward_host: true,
            ..Default::default()
        },
    )
    .await;
    let from_proxy = ["-s", &proxy.base, "-t", &b.base, "--no-bulk", "-m"];
    for mode in [&["COMPARE", "--no-summary"][..], &["COPY"]] {
        let r = sync(&[&from_proxy[..], mode].concat()).await;
        assert!(!r.ok, "{mode:?} ended: {}", r.stderr);
        assert!(
            r.stderr.contains("the server's paging loops"),
            "{}",
            r.stderr
        );
    }
    let types = ["Patient", "Observation"];
    assert_eq!(content(&b, &types).await.len(), 4200);
    assert_eq!(content(&a, &types).await, content(&b, &types).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn directory_in_reverse_reference_order_with_bundles_and_ndjson() {
    let b = InProcess::start().await;
    let dir = tempfile::tempdir().unwrap();
    // Observations first (file names sort before patients), patients last.
    let ppl = people(30);
    let obs: Vec<String> = ppl
        .iter()
        .filter(|r| r["resourceType"] == "Observation")
        .map(|r| r.to_string())
        .collect();
    std::fs::write(dir.path().join("a-observations.ndjson"), obs.join("\n")).unwrap();
    let coll = json!({"resourceType": "Bundle", "type": "collection", "entry": ppl.iter().filter(|r| r["resourceType"] == "Patient").map(|r| json!({"resource": r})).collect::<Vec<_>>()});
    std::fs::write(dir.path().join("z-patients.json"), coll.to_string()).unwrap();
    std::fs::write(
        dir.path().join("m-org.json"),
        json!({"resourceType": "Organization", "id": "org1", "name": "Clinic"}).to_string(),
    )
    .unwrap();
    let src = format!("file:{}", dir.path().display());
    // The target refuses what points to something it does not have yet.
    let strict = Proxy::start(
        &b.base,
        ProxyOptions {
            enforce_references: true,
            ..Default::default()
        },
    )
    .await;
    let r = sync(&["-s", &src, "-t", &strict.base]).await;
    assert!(r.ok, "{}", r.stderr);
    assert!(
        strict.stats.dangling.load(Ordering::SeqCst) > 0,
        "the test did not meet a missing reference"
    );
    assert_eq!(content(&b, &["Patient"]).await.len(), 30);
    assert_eq!(content(&b, &["Observation"]).await.len(), 30);
    assert_eq!(get(&b, "Organization/org1").await.status(), 200);
    // -r filters and COMPARE over a directory converges.
    let r = sync(&["-s", &src, "-t", &b.base, "-m", "COMPARE", "-r", "Patient"]).await;
    assert!(r.ok, "{}", r.stderr);
    assert!(
        r.stderr.contains("Patient") && !r.stderr.contains("Observation "),
        "{}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn search_source_ids_types_and_numeric_prefix() {
    let (a, b) = (InProcess::start().await, InProcess::start().await);
    load(&a, &people(12)).await;
    load(&a, &[
        json!({"resourceType": "Patient", "id": "123", "link": [{"other": {"reference": format!("{}/Patient/124", a.base)}, "type": "seealso"}]}),
        json!({"resourceType": "Patient", "id": "124"}),
        json!({"resourceType": "Observation", "id": "555", "status": "final", "code": {"text": "x"}, "subject": {"reference": "Patient/123/_history/1"}}),
        json!({"resourceType": "Bundle", "id": "9", "type": "collection", "entry": [{"fullUrl": format!("{}/Patient/123", a.base), "resource": {"resourceType": "Patient", "id": "123"}}]}),
    ]).await;
    // A search URL: only its matches.
    let r = sync(&[
        "-s",
        &format!("{}/Patient?identifier=urn:mrn|1", a.base),
        "-t",
        &b.base,
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        content(&b, &["Patient"])
            .await
            .keys()
            .cloned()
            .collect::<Vec<_>>(),
        vec!["Patient/p1", "Patient/p10", "Patient/p4", "Patient/p7"]
    );
    // Explicit ids.
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &b.base,
        "--resource-ids",
        "Observation/o3,Patient/p3",
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(get(&b, "Observation/o3").await.status(), 200);
    // -r with --resource-ids is refused in one line.
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &b.base,
        "-r",
        "Patient",
        "--resource-ids",
        "Patient/p1",
    ])
    .await;
    assert!(!r.ok);
    assert_eq!(r.stderr.trim().lines().count(), 1, "{}", r.stderr);
    assert!(r.stderr.contains("cannot be combined"), "{}", r.stderr);
    // Numeric ids get the prefix and nothing dangles.
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &b.base,
        "-r",
        "Patient,Observation,Bundle",
        "--prefix-numeric-ids",
        "SRC",
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    let (_, p) = status_json(get(&b, "Patient/SRC123").await).await;
    assert_eq!(p["link"][0]["other"]["reference"], "Patient/SRC124");
    let (_, o) = status_json(get(&b, "Observation/SRC555").await).await;
    assert_eq!(o["subject"]["reference"], "Patient/SRC123/_history/1");
    let (_, bu) = status_json(get(&b, "Bundle/SRC9").await).await;
    assert_eq!(bu["entry"][0]["resource"]["id"], "SRC123");
    assert_eq!(
        bu["entry"][0]["fullUrl"],
        format!("{}/Patient/SRC123", a.base)
    );
    assert_eq!(get(&b, "Patient/123").await.status(), 404);
    assert_eq!(
        get(&b, "Patient/p5").await.status(),
        200,
        "non-numeric ids stay"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn several_targets_share_the_load() {
    let (a, b, c) = (
        InProcess::start().await,
        InProcess::start().await,
        InProcess::start().await,
    );
    load(&a, &people(40)).await;
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &b.base,
        "-t",
        &c.base,
        "--thread-count",
        "4",
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    let types = ["Patient", "Observation"];
    let (in_b, in_c) = (content(&b, &types).await, content(&c, &types).await);
    assert!(
        !in_b.is_empty() && !in_c.is_empty(),
        "{} / {}",
        in_b.len(),
        in_c.len()
    );
    let mut union = in_b.clone();
    union.extend(in_c);
    assert_eq!(union, content(&a, &types).await);
    let r = sync(&["-s", &a.base, "-t", &b.base, "-t", &c.base, "-m", "COMPARE"]).await;
    assert!(
        !r.ok && r.stderr.contains("exactly one --target"),
        "{}",
        r.stderr
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn synthea_mode_support_bundles_first_with_semaphore_free_patients() {
    let b = InProcess::start().await;
    let dir = tempfile::tempdir().unwrap();
    let mut rng = Rng::new(3);
    // The support bundles define the Organization and Practitioner that the
    // patient bundles find by condition.
    let org = json!({"resourceType": "Bundle", "type": "batch", "entry": (0..20).map(|i| json!({"resource": {"resourceType": "Organization", "identifier": [{"system": "https://example.org/org", "value": format!("org-{i}")}]}, "request": {"method": "POST", "url": "Organization", "ifNoneExist": format!("identifier=https://example.org/org|org-{i}")}})).collect::<Vec<_>>()});
    std::fs::write(
        dir.path().join("hospitalInformation1.json"),
        org.to_string(),
    )
    .unwrap();
    let pr = json!({"resourceType": "Bundle", "type": "batch", "entry": (0..50).map(|i| json!({"resource": {"resourceType": "Practitioner", "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": format!("pract-{i}")}]}, "request": {"method": "POST", "url": "Practitioner", "ifNoneExist": format!("identifier=http://hl7.org/fhir/sid/us-npi|pract-{i}")}})).collect::<Vec<_>>()});
    std::fs::write(
        dir.path().join("practitionerInformation1.json"),
        pr.to_string(),
    )
    .unwrap();
    for i in 0..6 {
        std::fs::write(
            dir.path().join(format!("Patient{i}.json")),
            synthea_like_bundle(&mut rng, 3, 4).to_string(),
        )
        .unwrap();
    }
    let r = sync(&[
        "-s",
        &format!("file://{}", dir.path().display()),
        "-t",
        &b.base,
        "-m",
        "SYNTHEA",
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(content(&b, &["Patient"]).await.len(), 6);
    assert_eq!(
        content(&b, &["Organization"]).await.len(),
        20,
        "patient bundles matched the support bundles' organizations"
    );
    assert_eq!(content(&b, &["Observation"]).await.len(), 6 * 12);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incremental_follows_the_change_log_and_saves_the_cursor() {
    let (a, b) = (InProcess::start().await, InProcess::start().await);
    load(&a, &people(20)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let st = state.to_str().unwrap();
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &b.base,
        "-m",
        "INCREMENTAL",
        "--state",
        st,
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    let types = ["Patient", "Observation"];
    assert_eq!(content(&a, &types).await, content(&b, &types).await);
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(saved["since"], 40);
    // Edits, a delete, and several versions of one resource.
    for k in 0..3 {
        load(
            &a,
            &[json!({"resourceType": "Patient", "id": "p1", "birthDate": format!("200{k}-01-01")})],
        )
        .await;
    }
    delete(&a, "Observation/o2").await;
    let rep = dir.path().join("r.json");
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &b.base,
        "-m",
        "INCREMENTAL",
        "--state",
        st,
        "--report",
        rep.to_str().unwrap(),
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(total(&report(&rep), "read"), 4);
    assert_eq!(content(&a, &types).await, content(&b, &types).await);
    expect_outcome(get(&b, "Observation/o2").await, 410).await;
    // Nothing new: nothing read or written.
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &b.base,
        "-m",
        "INCREMENTAL",
        "--state",
        st,
        "--report",
        rep.to_str().unwrap(),
    ])
    .await;
    assert!(r.ok);
    assert_eq!(total(&report(&rep), "read"), 0);
    // A state file of another pair is refused.
    let r = sync(&[
        "-s",
        &b.base,
        "-t",
        &a.base,
        "-m",
        "INCREMENTAL",
        "--state",
        st,
    ])
    .await;
    assert!(!r.ok && r.stderr.contains("belongs to"), "{}", r.stderr);

    // --follow picks up new writes until interrupted.
    let mut child = tokio::process::Command::new(BIN)
        .args([
            "sync",
            "-s",
            &a.base,
            "-t",
            &b.base,
            "-m",
            "INCREMENTAL",
            "--state",
            st,
            "--follow",
        ])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    load(&a, &[json!({"resourceType": "Patient", "id": "late"})]).await;
    let mut seen = false;
    for _ in 0..100 {
        if get(&b, "Patient/late").await.status() == 200 {
            seen = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(seen, "--follow did not deliver");
    let pid = child.id().unwrap().to_string();
    std::process::Command::new("kill")
        .args(["-INT", &pid])
        .status()
        .unwrap();
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "{status:?}");
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert_eq!(
        saved["since"].as_u64(),
        Some(fhirsync_store::Store::last_seq(&*a.store))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retries_with_backoff_and_retry_after_lose_nothing() {
    let (a, b) = (InProcess::start().await, InProcess::start().await);
    load(&a, &people(40)).await;
    let flaky = Proxy::start(
        &b.base,
        ProxyOptions {
            fail_every: Some(3),
            fail_status: 503,
            retry_after: Some("0".into()),
            ..Default::default()
        },
    )
    .await;
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &flaky.base,
        "--target-retry-count",
        "6",
        "--thread-count",
        "3",
        "--request-id",
        "req-42",
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert!(flaky.stats.injected.load(Ordering::SeqCst) > 0);
    let types = ["Patient", "Observation"];
    assert_eq!(content(&a, &types).await, content(&b, &types).await);
    let ids = flaky.stats.request_ids.lock().unwrap().clone();
    assert!(!ids.is_empty() && ids.iter().all(|i| i == "req-42"));
    // With 429 and no retries allowed, failures are counted and the exit is non-zero.
    let c = InProcess::start().await;
    let busy = Proxy::start(
        &c.base,
        ProxyOptions {
            fail_every: Some(2),
            fail_status: 429,
            ..Default::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    let rep = dir.path().join("r.json");
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &busy.base,
        "--target-retry-count",
        "0",
        "--thread-count",
        "1",
        "--report",
        rep.to_str().unwrap(),
    ])
    .await;
    assert!(!r.ok);
    assert!(r.stderr.contains("failed"), "{}", r.stderr);
    let rp = report(&rep);
    assert!(total(&rp, "failed") > 0);
    assert_eq!(rp["failures"][0]["status"], 429, "{rp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn credentials_are_sent_and_refusals_are_clear() {
    let (a, b) = (InProcess::start().await, InProcess::start().await);
    load(&a, &people(5)).await;
    let bearer = auth_proxy(&b.base, "Bearer s3cret").await;
    let basic_src = auth_proxy(&a.base, "Basic dXNlcjpwYXNz").await;
    let r = sync(&[
        "-s",
        &basic_src.base,
        "--source-basic-auth",
        "user:pass",
        "-t",
        &bearer.base,
        "--target-bearer-token",
        "s3cret",
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(content(&b, &["Patient"]).await.len(), 5);
    // The other way round: a bearer token for the source, basic auth for the target.
    let c = InProcess::start().await;
    let bearer_src = auth_proxy(&a.base, "Bearer src-token").await;
    let basic_tgt = auth_proxy(&c.base, "Basic dXNlcjpwYXNz").await;
    let r = sync(&[
        "-s",
        &bearer_src.base,
        "--source-bearer-token",
        "src-token",
        "-t",
        &basic_tgt.base,
        "--target-basic-auth",
        "user:pass",
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(content(&c, &["Observation"]).await.len(), 5);
    assert_eq!(
        bearer_src.stats.unauthorized.load(Ordering::SeqCst)
            + basic_tgt.stats.unauthorized.load(Ordering::SeqCst),
        0
    );
    for args in [
        vec![
            "-s",
            &basic_src.base,
            "-t",
            &bearer.base,
            "--target-bearer-token",
            "s3cret",
        ],
        vec![
            "-s",
            &basic_src.base,
            "--source-basic-auth",
            "user:pass",
            "-t",
            &bearer.base,
            "--target-bearer-token",
            "wrong",
        ],
    ] {
        let r = sync(&args).await;
        assert!(!r.ok);
        let last = r.stderr.trim().lines().last().unwrap_or("").to_owned();
        assert!(
            last.contains("401") && last.contains("credentials"),
            "{}",
            r.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_is_one_line_and_writes_nothing() {
    let b = InProcess::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.ndjson"),
        format!("{}\n{{broken\n", pat("x")),
    )
    .unwrap();
    let src = format!("file:{}", dir.path().display());
    let r = sync(&["-s", &src, "-t", &b.base]).await;
    assert!(!r.ok);
    assert!(
        r.stderr.contains("a.ndjson:2") && r.stderr.contains("not valid JSON"),
        "{}",
        r.stderr
    );
    assert_eq!(
        fhirsync_store::Store::last_seq(&*b.store),
        0,
        "a malformed directory wrote something"
    );
    for (args, want) in [
        (
            vec!["-s", "http://127.0.0.1:9/fhir", "-t", &b.base],
            "not reachable",
        ),
        (vec!["-s", &b.base, "-t", &b.base, "-m", "MIRROR"], "--mode"),
        (vec!["-s", "ftp://x", "-t", &b.base], "--source"),
        (
            vec!["-s", &b.base, "-t", &b.base, "-r", "Patients"],
            "not a FHIR R4 resource type",
        ),
        (
            vec!["-s", &b.base, "-t", &b.base, "-m", "INCREMENTAL"],
            "--state",
        ),
        (vec!["-s", &b.base, "-t", &b.base, "-v", "R5"], "only R4"),
        (
            vec!["-s", &b.base, "-t", &b.base, "--no-summary"],
            "--no-summary applies to COMPARE only",
        ),
        (
            vec![
                "-s",
                &b.base,
                "-t",
                &b.base,
                "--semaphore-path",
                "Patient.name.where(x)",
            ],
            "not supported",
        ),
    ] {
        let r = sync(&args).await;
        assert!(!r.ok, "{args:?}");
        let lines: Vec<&str> = r.stderr.trim().lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {}", r.stderr);
        assert!(
            lines[0].starts_with("fhirsync: error: ") && lines[0].contains(want),
            "{args:?}: {}",
            r.stderr
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn semaphore_path_keeps_same_patient_uploads_apart() {
    let b = InProcess::start().await;
    let watch = Proxy::start(
        &b.base,
        ProxyOptions {
            track_patient_concurrency: true,
            ..Default::default()
        },
    )
    .await;
    let dir = tempfile::tempdir().unwrap();
    // 12 transaction Bundles for only 2 patients (updates of the same ones).
    for i in 0..12 {
        let pid = format!("pt{}", i % 2);
        let bundle = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
            {"resource": {"resourceType": "Patient", "id": pid, "birthDate": format!("19{:02}-01-01", 50 + i)}, "request": {"method": "PUT", "url": format!("Patient/{pid}")}}
        ]});
        std::fs::write(dir.path().join(format!("b{i:02}.json")), bundle.to_string()).unwrap();
    }
    let src = format!("file:{}", dir.path().display());
    let r = sync(&[
        "-s",
        &src,
        "-t",
        &watch.base,
        "--thread-count",
        "6",
        "--semaphore-path",
        "Bundle.entry.resource.as(Patient).id",
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(
        watch.stats.max_same_patient.load(Ordering::SeqCst),
        1,
        "two uploads for one patient overlapped"
    );
    assert!(
        watch.stats.max_in_flight.load(Ordering::SeqCst) >= 2,
        "the test did not run uploads concurrently"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_with_generated_certificates() {
    use fhirsync_testkit::tls::{TestCerts, TlsProxy};
    let a = InProcess::start().await;
    load(&a, &people(15)).await;
    let dir = tempfile::tempdir().unwrap();
    let certs = TestCerts::generate(dir.path()).unwrap();
    // The TLS port is known before the node starts, so the node's links use it.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let tls_base = format!("https://127.0.0.1:{port}/fhir");
    let b = InProcess::start_with(fhirsync_testkit::server::Options {
        api: fhirsync_api::ApiConfig {
            base_url: Some(tls_base.clone()),
            ..Default::default()
        },
        ..Default::default()
    })
    .await;
    let node_addr: std::net::SocketAddr = b
        .base
        .trim_start_matches("http://")
        .trim_end_matches("/fhir")
        .parse()
        .unwrap();
    let _proxy = TlsProxy::start(listener, node_addr, certs.server_config().unwrap());
    let f = |n: &str| certs.dir.join(n).to_string_lossy().into_owned();

    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &tls_base,
        "--target-tls-auth",
        &f("mtls.json"),
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(content(&b, &["Patient"]).await.len(), 15);
    // COMPARE reads the target's pages over TLS too; and the source side works the same way.
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &tls_base,
        "--target-tls-auth",
        &f("mtls.json"),
        "-m",
        "COMPARE",
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    let c = InProcess::start().await;
    let r = sync(&[
        "-s",
        &tls_base,
        "--source-tls-auth",
        &f("mtls.json"),
        "-t",
        &c.base,
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(content(&c, &["Observation"]).await.len(), 15);

    // Without a client certificate, with a CA that did not sign the server,
    // with no TLS file at all, or with a broken file: one clear line.
    for (args, want) in [
        (
            vec!["--target-tls-auth".to_string(), f("ca-only.json")],
            "target not reachable",
        ),
        (
            vec!["--target-tls-auth".to_string(), f("wrong-ca.json")],
            "target not reachable",
        ),
        (vec![], "target not reachable"),
        (
            vec!["--target-tls-auth".to_string(), f("client.pem")],
            "not a TLS authentication file",
        ),
        (
            vec!["--target-tls-auth".to_string(), f("missing.json")],
            "cannot read",
        ),
    ] {
        let mut all = vec![
            "-s".to_string(),
            a.base.clone(),
            "-t".to_string(),
            tls_base.clone(),
            "--target-retry-count".into(),
            "0".into(),
        ];
        all.extend(args.iter().cloned());
        let refs: Vec<&str> = all.iter().map(String::as_str).collect();
        let r = sync(&refs).await;
        assert!(!r.ok, "{args:?}");
        let lines: Vec<&str> = r.stderr.trim().lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {}", r.stderr);
        assert!(lines[0].contains(want), "{args:?}: {}", r.stderr);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bundles_as_resources_or_as_transactions() {
    let (a, b, c) = (
        InProcess::start().await,
        InProcess::start().await,
        InProcess::start().await,
    );
    // A stored Bundle resource whose entries carry requests.
    let bundle = json!({"resourceType": "Bundle", "id": "stored", "type": "batch", "entry": [
        {"resource": {"resourceType": "Patient", "id": "from-bundle"}, "request": {"method": "PUT", "url": "Patient/from-bundle"}}
    ]});
    let r = put(&a, "Bundle/stored", &bundle).await;
    assert_eq!(r.status(), 201);
    // Plain COPY: the Bundle is a resource like any other.
    let r = sync(&["-s", &a.base, "-t", &b.base, "-r", "Bundle"]).await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(get(&b, "Bundle/stored").await.status(), 200);
    assert_eq!(get(&b, "Patient/from-bundle").await.status(), 404);
    // As transactions: its entries are carried out on the target.
    let r = sync(&[
        "-s",
        &a.base,
        "-t",
        &c.base,
        "-r",
        "Bundle",
        "--upload-bundles-as-transactions",
    ])
    .await;
    assert!(r.ok, "{}", r.stderr);
    assert_eq!(get(&c, "Patient/from-bundle").await.status(), 200);
    assert_eq!(get(&c, "Bundle/stored").await.status(), 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incremental_follows_a_node_with_children_with_a_system_read_token() {
    use fhirsync_api::auth::{token_hash, Auth, Scopes, TokenEntry};
    let entry = |name: &str, scopes: &str| TokenEntry {
        name: name.into(),
        sha256: token_hash(&format!("secret-of-{name}")),
        scopes: Scopes::parse(scopes).unwrap(),
    };
    let a = InProcess::start_with(fhirsync_testkit::server::Options {
        api: fhirsync_api::ApiConfig {
            auth: std::sync::Arc::new(Auth::new(
                true,
                vec![
                    entry("reader", "system/*.rs"),
                    entry("patients", "system/Patient.rs"),
                ],
                Vec::new(),
            )),
            ..Default::default()
        },
        children: vec![fhirsync_api::ChildConfig {
            node_id: "clinic".into(),
            token: "edge-token-of-the-clinic".into(),
            pull: true,
            push: true,
            push_types: Vec::new(),
        }],
        ..Default::default()
    })
    .await;
    let b = InProcess::start().await;
    load(&a, &people(12)).await;
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state.json");
    let run = |token: Option<&'static str>| {
        let mut args = vec!["-s", &a.base, "-t", &b.base, "-m", "INCREMENTAL"];
        args.extend(["--state", state.to_str().unwrap()]);
        if let Some(t) = token {
            args.extend(["--source-bearer-token", t]);
        }
        let args: Vec<String> = args.into_iter().map(String::from).collect();
        async move { sync(&args.iter().map(String::as_str).collect::<Vec<_>>()).await }
    };
    // Without credentials the feed is the children's only.
    let r = run(None).await;
    assert!(!r.ok && r.stderr.contains("401"), "{}", r.stderr);
    // A token that cannot read every type is refused.
    let r = run(Some("secret-of-patients")).await;
    assert!(!r.ok && r.stderr.contains("403"), "{}", r.stderr);
    let r = run(Some("secret-of-reader")).await;
    assert!(r.ok, "{}", r.stderr);
    let types = ["Patient", "Observation"];
    assert_eq!(content(&a, &types).await, content(&b, &types).await);
    assert_eq!(content(&b, &["Patient"]).await.len(), 12);
    // A reader is no child: the node keeps no contact or cursor for it.
    assert!(fhirsync_store::Store::peers(a.store.as_ref())
        .await
        .unwrap()
        .is_empty());
}
