//! Every resource of the official FHIR R4 examples survives PUT then GET:
//! the same JSON apart from `meta.versionId` / `meta.lastUpdated`, numbers
//! compared by their exact text. The examples then serve as a search
//! corpus: searches whose answers were checked by reading the example
//! files.

mod common;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use common::*;
use serde_json::Value;

fn examples_dir() -> PathBuf {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let dir = root.join(".cache/fhir-r4-examples");
    if !dir.join(".complete").exists() {
        let st = std::process::Command::new("bash")
            .arg(root.join("scripts/fetch-fhir-examples.sh"))
            .arg(&dir)
            .status()
            .expect("run scripts/fetch-fhir-examples.sh");
        assert!(st.success(), "fetching the FHIR R4 examples failed");
    }
    dir
}

/// Removes what the server sets; a `meta` left empty was added by the server.
fn strip_server_meta(v: &mut Value) {
    let Some(obj) = v.as_object_mut() else { return };
    if let Some(m) = obj.get_mut("meta").and_then(Value::as_object_mut) {
        m.remove("versionId");
        m.remove("lastUpdated");
        if m.is_empty() {
            obj.remove("meta");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn official_r4_examples_round_trip() {
    let dir = examples_dir();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    files.sort();
    assert!(files.len() >= 5000, "only {} examples", files.len());
    let total = files.len();
    // One example (Bundle-resources.json) is larger than the default body limit.
    let s = Arc::new(
        InProcess::start_with(fhirsync_testkit::server::Options {
            api: fhirsync_api::ApiConfig {
                body_bytes_max: 128 << 20,
                ..Default::default()
            },
            ..Default::default()
        })
        .await,
    );
    let queue = Arc::new(Mutex::new(files));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (s, queue) = (s.clone(), queue.clone());
        workers.push(tokio::spawn(async move {
            let mut ok = 0usize;
            let mut refused = Vec::new();
            let mut types = std::collections::HashSet::new();
            loop {
                let Some(path) = queue.lock().unwrap().pop() else {
                    break;
                };
                let text = std::fs::read_to_string(&path).unwrap();
                let sent: Value = serde_json::from_str(&text).unwrap();
                let t = sent["resourceType"].as_str().unwrap().to_owned();
                let id = sent["id"].as_str().unwrap().to_owned();
                let url = s.url(&format!("{t}/{id}"));
                let r = s
                    .client
                    .put(&url)
                    .header("content-type", FHIR_JSON)
                    .body(text)
                    .send()
                    .await
                    .unwrap();
                let st = r.status().as_u16();
                if !(200..300).contains(&st) {
                    refused.push((
                        path.file_name().unwrap().to_string_lossy().into_owned(),
                        st,
                        r.text().await.unwrap(),
                    ));
                    continue;
                }
                let back = s
                    .client
                    .get(&url)
                    .send()
                    .await
                    .unwrap()
                    .text()
                    .await
                    .unwrap();
                let mut back: Value = serde_json::from_str(&back).unwrap();
                assert!(
                    back["meta"]["versionId"].is_string()
                        && back["meta"]["lastUpdated"].is_string()
                );
                let mut sent = sent;
                strip_server_meta(&mut sent);
                strip_server_meta(&mut back);
                assert_eq!(back, sent, "{} changed in the round trip", path.display());
                types.insert(t);
                ok += 1;
            }
            (ok, refused, types)
        }));
    }
    let mut ok = 0;
    let mut refused = Vec::new();
    let mut types = std::collections::HashSet::new();
    for w in workers {
        let (o, r, t) = w.await.unwrap();
        ok += o;
        refused.extend(r);
        types.extend(t);
    }
    // The one example whose id breaks the FHIR id rule (over 64 characters)
    // and the ones that break the structure rules must be refused with 422;
    // everything else must round-trip, the AuditEvents included (clients'
    // records, beside the node's own trail).
    let invalid = fhirsync_core::validate::INVALID_R4_EXAMPLES;
    for (name, st, body) in &refused {
        assert_eq!(*st, 422, "{name}: {body}");
        assert!(
            body.contains("invalid resource id") || invalid.iter().any(|(n, _)| n == name),
            "{name} refused: {body}"
        );
    }
    assert_eq!(refused.len(), 1 + invalid.len(), "refused: {refused:?}");
    assert_eq!(ok, total - refused.len());
    assert!(types.contains("AuditEvent"));
    assert!(types.len() >= 126, "{} types", types.len());
    println!(
        "{ok} of {total} examples round-tripped, {} resource types",
        types.len()
    );
    corpus_searches(&s).await;
}

/// Matches (and includes) of a search on the loaded examples.
async fn found(s: &InProcess, q: &str) -> (Vec<String>, Vec<String>) {
    let (code, b) = status_json(get(s, &format!("{q}&_count=1000")).await).await;
    assert_eq!(code, 200, "{q}: {b}");
    let (mut m, mut i) = (Vec::new(), Vec::new());
    for e in b["entry"].as_array().into_iter().flatten() {
        let key = format!(
            "{}/{}",
            e["resource"]["resourceType"].as_str().unwrap(),
            e["resource"]["id"].as_str().unwrap()
        );
        match e["search"]["mode"].as_str() {
            Some("include") => i.push(key),
            _ => m.push(key),
        }
    }
    m.sort();
    i.sort();
    (m, i)
}

/// Searches on the official examples whose answers were checked by
/// reading the example files (e.g. `Observation-blood-pressure*.json`: the
/// three blood pressures of Patient/example, systolic 107 in two, the
/// third cancelled without a value).
async fn corpus_searches(s: &InProcess) {
    let cases: &[(&str, &[&str], &[&str])] = &[
        ("Patient?family=chalmers", &["Patient/example"], &[]),
        ("Patient?family:exact=Chalmers", &["Patient/example"], &[]),
        ("Patient?birthdate=1974-12-25", &["Patient/ch-example", "Patient/example"], &[]),
        ("Observation?code=http://loinc.org|29463-7", &["Observation/example"], &[]),
        (
            "Observation?code=http://loinc.org|85354-9",
            &["Observation/blood-pressure", "Observation/blood-pressure-cancel", "Observation/blood-pressure-dar"],
            &[],
        ),
        (
            "Observation?code=http://loinc.org|85354-9&status:not=cancelled",
            &["Observation/blood-pressure", "Observation/blood-pressure-dar"],
            &[],
        ),
        (
            "Observation?component-code-value-quantity=http://loinc.org|8480-6$gt100",
            &["Observation/blood-pressure", "Observation/blood-pressure-dar"],
            &[],
        ),
        (
            "Observation?value-quantity=lt5",
            &["Observation/1minute-apgar-score", "Observation/bmd", "Observation/f004", "Observation/herd1"],
            &[],
        ),
        ("Condition?clinical-status=resolved", &["Condition/f201", "Condition/f202"], &[]),
        (
            "Condition?subject=Patient/example&_include=Condition:subject",
            &["Condition/example", "Condition/example2", "Condition/family-history", "Condition/stroke"],
            &["Patient/example"],
        ),
        ("Encounter?class=IMP", &["Encounter/emerg", "Encounter/example", "Encounter/f203"], &[]),
        (
            "Observation?subject:Patient.family=chalmers&code=http://loinc.org|85354-9&status=final",
            &["Observation/blood-pressure", "Observation/blood-pressure-dar"],
            &[],
        ),
        ("Patient?_has:Condition:subject:clinical-status=resolved", &["Patient/f201"], &[]),
        ("Patient?family=bor&_revinclude=Condition:subject&_revinclude=Encounter:subject", &["Patient/f201"], &[]),
    ];
    for (q, matches, included) in cases {
        let (m, i) = found(s, q).await;
        assert_eq!(m, *matches, "{q}");
        if !included.is_empty() {
            assert_eq!(i, *included, "{q}");
        }
    }
    // the Roel patient's conditions and encounters come back as includes
    let (_, i) = found(
        s,
        "Patient?family=bor&_revinclude=Condition:subject&_revinclude=Encounter:subject",
    )
    .await;
    assert!(
        i.contains(&"Condition/f201".to_owned()) && i.contains(&"Encounter/f201".to_owned()),
        "{i:?}"
    );
}
