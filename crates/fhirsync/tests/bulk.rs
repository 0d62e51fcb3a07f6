//! Bulk Data: `$export` (system, Patient, Group) and `$import` on the
//! node, by the IG's rules, over real HTTP; and a node killed during an
//! export.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::*;
use fhirsync_testkit::proxy::{Proxy, ProxyOptions};
use fhirsync_testkit::server::Options;
use fhirsync_testkit::NodeProcess;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_fhirsync");

/// Kicks off an export at `path` (with `Prefer: respond-async`); the
/// status URL.
async fn kick_off(c: &reqwest::Client, url: &str, token: Option<&str>) -> String {
    let mut rb = c.get(url).header("prefer", "respond-async");
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    let r = rb.send().await.unwrap();
    let status = r.status().as_u16();
    let loc = r
        .headers()
        .get("content-location")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(status, 202, "{}", r.text().await.unwrap());
    loc.expect("Content-Location")
}

/// Polls a status URL until the job ends: (status, body).
async fn wait(c: &reqwest::Client, status_url: &str, token: Option<&str>) -> (u16, Value) {
    for _ in 0..600 {
        let mut rb = c.get(status_url);
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let r = rb.send().await.unwrap();
        if r.status().as_u16() == 202 {
            assert!(r.headers().get("x-progress").is_some());
            assert!(r.headers().get("retry-after").is_some());
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        }
        return status_json(r).await;
    }
    panic!("the job did not end");
}

/// Every file of a manifest list: type → the resources' JSON lines.
async fn download(
    c: &reqwest::Client,
    list: &Value,
    token: Option<&str>,
) -> BTreeMap<String, Vec<Value>> {
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for o in list.as_array().unwrap() {
        let mut rb = c.get(o["url"].as_str().unwrap());
        if let Some(t) = token {
            rb = rb.bearer_auth(t);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], "application/fhir+ndjson");
        let text = r.text().await.unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            lines.len() as u64,
            o["count"].as_u64().unwrap(),
            "count of {o}"
        );
        out.entry(o["type"].as_str().unwrap().to_owned())
            .or_default()
            .extend(lines);
    }
    out
}

async fn export(
    s: &InProcess,
    path: &str,
) -> (
    Value,
    BTreeMap<String, Vec<Value>>,
    BTreeMap<String, Vec<Value>>,
) {
    let st = kick_off(&s.client, &s.url(path), None).await;
    let (code, m) = wait(&s.client, &st, None).await;
    assert_eq!(code, 200, "{m}");
    let out = download(&s.client, &m["output"], None).await;
    let del = download(&s.client, &m["deleted"], None).await;
    (m, out, del)
}

fn ids(lines: Option<&Vec<Value>>) -> BTreeSet<String> {
    lines
        .into_iter()
        .flatten()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect()
}

async fn seed(s: &InProcess, patients: usize, obs_each: usize) {
    for p in 0..patients {
        let r = put(
            s,
            &format!("Patient/p{p}"),
            &json!({"resourceType": "Patient", "id": format!("p{p}"), "gender": "female"}),
        )
        .await;
        assert!(r.status().is_success());
        for o in 0..obs_each {
            let status = if o % 2 == 0 { "final" } else { "preliminary" };
            let r = put(
                s,
                &format!("Observation/o{p}-{o}"),
                &json!({"resourceType": "Observation", "id": format!("o{p}-{o}"), "status": status,
                        "code": {"text": "x"}, "subject": {"reference": format!("Patient/p{p}")}}),
            )
            .await;
            assert!(r.status().is_success());
        }
    }
}

#[tokio::test]
async fn kick_off_is_checked() {
    let s = InProcess::start().await;
    // without Prefer: respond-async
    let d = expect_outcome(get(&s, "$export").await, 400).await;
    assert!(d.contains("respond-async"), "{d}");
    for bad in [
        "$export?_outputFormat=text/csv",
        "$export?_since=yesterday",
        "$export?_type=Nope",
        "$export?_elements=id",
        "$export?_typeFilter=Observation",
        "$export?_type=Patient&_typeFilter=Observation%3Fstatus%3Dfinal",
        "$export?_typeFilter=Patient%3Fnope%3D1",
        "$export?patient=Patient/p1",
        "Patient/$export?_type=Organization",
    ] {
        let r = s
            .client
            .get(s.url(bad))
            .header("prefer", "respond-async")
            .send()
            .await
            .unwrap();
        expect_outcome(r, 400).await;
    }
    let r = s
        .client
        .get(s.url("Group/none/$export"))
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 404).await;
    expect_outcome(get(&s, "$bulk-status/nope").await, 404).await;
    // the CapabilityStatement and SMART discovery say so
    let (_, cap) = status_json(get(&s, "metadata").await).await;
    assert!(cap["instantiates"].to_string().contains("bulk-data"));
    let ops = cap["rest"][0]["operation"].to_string();
    for op in ["\"export\"", "patient-export", "group-export", "\"import\""] {
        assert!(ops.contains(op), "{op} in {ops}");
    }
    let (_, smart) = status_json(get(&s, ".well-known/smart-configuration").await).await;
    assert!(smart["operations"].to_string().contains("export"));
}

#[tokio::test]
async fn system_export_since_types_filters_and_deletes() {
    let s = InProcess::start().await;
    seed(&s, 5, 4).await;
    let (m, out, del) = export(&s, "$export").await;
    assert_eq!(m["requiresAccessToken"], false);
    assert!(m["request"].as_str().unwrap().ends_with("/fhir/$export"));
    assert_eq!(ids(out.get("Patient")).len(), 5);
    assert_eq!(ids(out.get("Observation")).len(), 20);
    assert_eq!(out.len(), 2, "only types with resources have files");
    assert!(del.is_empty());
    let t1 = m["transactionTime"].as_str().unwrap().to_owned();

    // after t1: one update, one create, one delete
    put(
        &s,
        "Patient/p0",
        &json!({"resourceType": "Patient", "id": "p0", "gender": "male"}),
    )
    .await;
    put(
        &s,
        "Patient/p9",
        &json!({"resourceType": "Patient", "id": "p9"}),
    )
    .await;
    assert!(delete(&s, "Observation/o1-1").await.status().is_success());
    let since = urlencode(&t1);
    let (_, out2, del2) = export(&s, &format!("$export?_since={since}")).await;
    assert_eq!(
        ids(out2.get("Patient")),
        BTreeSet::from(["p0".to_owned(), "p9".to_owned()])
    );
    assert_eq!(out2.get("Patient").unwrap()[0]["gender"], "male");
    assert!(!out2.contains_key("Observation"));
    let d = &del2["Bundle"];
    assert_eq!(d.len(), 1);
    assert_eq!(d[0]["entry"][0]["request"]["method"], "DELETE");
    assert_eq!(d[0]["entry"][0]["request"]["url"], "Observation/o1-1");

    // _type and _typeFilter restrict
    let (_, out3, _) = export(&s, "$export?_type=Observation").await;
    assert_eq!(out3.keys().collect::<Vec<_>>(), vec!["Observation"]);
    assert_eq!(out3["Observation"].len(), 19);
    let filt = urlencode("Observation?status=final");
    let (_, out4, _) = export(
        &s,
        &format!("$export?_type=Observation,Patient&_typeFilter={filt}"),
    )
    .await;
    assert_eq!(out4["Patient"].len(), 6);
    assert!(out4["Observation"].iter().all(|o| o["status"] == "final"));
    assert_eq!(
        out4["Observation"].len(),
        10,
        "{:?}",
        ids(out4.get("Observation"))
    );
    // two filters of one type are OR'ed, each resource once
    let f2 = urlencode("Observation?subject=Patient/p1");
    let (_, out5, _) = export(
        &s,
        &format!("$export?_type=Observation&_typeFilter={filt}&_typeFilter={f2}"),
    )
    .await;
    let got = ids(out5.get("Observation"));
    assert_eq!(out5["Observation"].len(), got.len(), "no resource twice");
    // final ones (10) plus p1's preliminary one left (o1-3; o1-1 is deleted)
    assert_eq!(got.len(), 11, "{got:?}");
    assert!(got.contains("o1-3"));
}

fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

#[tokio::test]
async fn patient_and_group_exports_are_the_compartments() {
    let s = InProcess::start().await;
    seed(&s, 4, 2).await;
    put(
        &s,
        "Organization/org1",
        &json!({"resourceType": "Organization", "id": "org1", "name": "x"}),
    )
    .await;
    put(
        &s,
        "Group/g1",
        &json!({"resourceType": "Group", "id": "g1", "type": "person", "actual": true,
                "member": [{"entity": {"reference": "Patient/p1"}}, {"entity": {"reference": "Patient/p3"}}]}),
    )
    .await;
    let (_, out, _) = export(&s, "Group/g1/$export").await;
    assert_eq!(
        ids(out.get("Patient")),
        BTreeSet::from(["p1".to_owned(), "p3".to_owned()])
    );
    assert_eq!(
        ids(out.get("Observation")),
        ["o1-0", "o1-1", "o3-0", "o3-1"]
            .iter()
            .map(|x| x.to_string())
            .collect()
    );
    assert!(!out.contains_key("Organization"));
    // the Group is in its members' compartments (Group.member)
    assert_eq!(ids(out.get("Group")), BTreeSet::from(["g1".to_owned()]));

    // POST with a Parameters body: `patient` narrows to those patients
    let params = json!({"resourceType": "Parameters", "parameter": [
        {"name": "_type", "valueString": "Patient,Observation"},
        {"name": "patient", "valueReference": {"reference": "Patient/p2"}}]});
    let r = with_body(s.client.post(s.url("Patient/$export")), &params)
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let st = r.headers()["content-location"].to_str().unwrap().to_owned();
    let (_, m) = wait(&s.client, &st, None).await;
    let out = download(&s.client, &m["output"], None).await;
    assert_eq!(ids(out.get("Patient")), BTreeSet::from(["p2".to_owned()]));
    assert_eq!(ids(out.get("Observation")).len(), 2);

    let (_, all, _) = export(&s, "Patient/$export").await;
    assert_eq!(ids(all.get("Patient")).len(), 4);
    assert_eq!(ids(all.get("Observation")).len(), 8);
    assert!(!all.contains_key("Organization"));

    // a deleted member's observation shows among a Group export's deletions
    assert!(delete(&s, "Observation/o3-1").await.status().is_success());
    assert!(delete(&s, "Observation/o2-1").await.status().is_success());
    let (_, _, del) = export(&s, "Group/g1/$export?_since=2000-01-01T00:00:00Z").await;
    let urls: Vec<&str> = del["Bundle"]
        .iter()
        .map(|b| b["entry"][0]["request"]["url"].as_str().unwrap())
        .collect();
    assert_eq!(urls, vec!["Observation/o3-1"]);
}

#[tokio::test]
async fn files_split_and_cancel_removes_them() {
    let mut o = Options::default();
    let mut b = fhirsync_api::bulk::BulkConfig::new("");
    b.file_bytes_max = 1024;
    o.bulk = Some(b);
    let s = InProcess::start_with(o).await;
    seed(&s, 10, 3).await;
    let (m, out, _) = export(&s, "$export").await;
    let files = m["output"].as_array().unwrap();
    assert!(files.len() > 2, "split into files: {m}");
    assert_eq!(out["Observation"].len(), 30);
    // cancel (DELETE) a finished job: the status and files are gone
    let st = kick_off(&s.client, &s.url("$export"), None).await;
    let (_, m2) = wait(&s.client, &st, None).await;
    let file = m2["output"][0]["url"].as_str().unwrap().to_owned();
    let job = st.rsplit('/').next().unwrap().to_owned();
    assert_eq!(s.client.delete(&st).send().await.unwrap().status(), 202);
    assert_eq!(s.client.get(&st).send().await.unwrap().status(), 404);
    assert_eq!(s.client.get(&file).send().await.unwrap().status(), 404);
    assert!(!s.dir.path().join("bulk").join(job).exists());
}

#[tokio::test]
async fn a_token_with_fewer_scopes_gets_fewer_types() {
    use fhirsync_api::auth::{token_hash, Auth, Scopes, TokenEntry};
    let mut o = Options::default();
    let tokens = vec![
        TokenEntry {
            name: "all".into(),
            sha256: token_hash("all-secret"),
            scopes: Scopes::parse("system/*.cruds").unwrap(),
        },
        TokenEntry {
            name: "pat".into(),
            sha256: token_hash("pat-secret"),
            scopes: Scopes::parse("system/Patient.rs").unwrap(),
        },
    ];
    o.api.auth = std::sync::Arc::new(Auth::new(false, tokens, Vec::new()));
    let s = InProcess::start_with(o).await;
    for (path, body) in [
        ("Patient/a", json!({"resourceType": "Patient", "id": "a"})),
        (
            "Observation/b",
            json!({"resourceType": "Observation", "id": "b", "status": "final", "code": {"text": "x"}}),
        ),
    ] {
        let r = with_body(s.client.put(s.url(path)), &body)
            .bearer_auth("all-secret")
            .send()
            .await
            .unwrap();
        assert!(r.status().is_success());
    }
    let st = kick_off(&s.client, &s.url("$export"), Some("pat-secret")).await;
    let (code, m) = wait(&s.client, &st, Some("pat-secret")).await;
    assert_eq!(code, 200);
    assert_eq!(m["requiresAccessToken"], true);
    let out = download(&s.client, &m["output"], Some("pat-secret")).await;
    assert_eq!(out.keys().collect::<Vec<_>>(), vec!["Patient"]);
    // another caller sees neither the job nor its files
    let r = s
        .client
        .get(&st)
        .bearer_auth("all-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let f = m["output"][0]["url"].as_str().unwrap();
    assert_eq!(s.client.get(f).send().await.unwrap().status(), 401);
    // asking for a type it may not read is refused
    let r = s
        .client
        .get(s.url("$export?_type=Observation"))
        .header("prefer", "respond-async")
        .bearer_auth("pat-secret")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
}

#[tokio::test]
async fn writes_during_an_export_are_in_the_next_since_export_only() {
    let s = InProcess::start().await;
    let lines: Vec<Value> = (0..3000)
        .map(|i| serde_json::from_str(&fhirsync_testkit::gen::ndjson_line(7, i)).unwrap())
        .collect();
    let tx = json!({"resourceType": "Bundle", "type": "transaction",
        "entry": lines.iter().map(|r| json!({"resource": r, "request": {"method": "PUT",
            "url": format!("{}/{}", r["resourceType"].as_str().unwrap(), r["id"].as_str().unwrap())}})).collect::<Vec<_>>()});
    assert_eq!(post(&s, "", &tx).await.status(), 200);
    let st = kick_off(&s.client, &s.url("$export"), None).await;
    // write new patients until the export is done
    let mut written = 0;
    let m = loop {
        put(
            &s,
            &format!("Patient/new{written}"),
            &json!({"resourceType": "Patient", "id": format!("new{written}")}),
        )
        .await;
        written += 1;
        let r = s.client.get(&st).send().await.unwrap();
        if r.status() == 200 {
            break r.json::<Value>().await.unwrap();
        }
    };
    let first = download(&s.client, &m["output"], None).await;
    let t = urlencode(m["transactionTime"].as_str().unwrap());
    let (_, second, _) = export(&s, &format!("$export?_since={t}")).await;
    let a: Vec<String> = first
        .values()
        .flatten()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    let b: Vec<String> = second
        .values()
        .flatten()
        .map(|r| r["id"].as_str().unwrap().to_owned())
        .collect();
    let sa: BTreeSet<_> = a.iter().cloned().collect();
    let sb: BTreeSet<_> = b.iter().cloned().collect();
    assert_eq!(sa.len(), a.len(), "no resource twice in one export");
    assert!(
        sa.is_disjoint(&sb),
        "nothing in both: {:?}",
        sa.intersection(&sb).collect::<Vec<_>>()
    );
    assert_eq!(sa.len() + sb.len(), 3000 + written, "nothing lost");
    assert!((0..3000).all(|i| {
        let r: Value = serde_json::from_str(&fhirsync_testkit::gen::ndjson_line(7, i)).unwrap();
        sa.contains(r["id"].as_str().unwrap())
    }));
}

/// A plain file server for `$import`'s inputs.
async fn file_server(files: Vec<(&'static str, String)>) -> String {
    let mut app = axum::Router::new();
    for (name, body) in files {
        app = app.route(
            &format!("/{name}"),
            axum::routing::get(move || {
                let b = body.clone();
                async move { b }
            }),
        );
    }
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(l, app).await;
    });
    format!("http://{addr}")
}

fn import_params(inputs: &[(&str, String)]) -> Value {
    let mut ps = vec![
        json!({"name": "inputFormat", "valueCode": "application/fhir+ndjson"}),
        json!({"name": "storageDetail", "part": [{"name": "type", "valueCode": "https"}]}),
    ];
    for (t, url) in inputs {
        ps.push(json!({"name": "input", "part": [
            {"name": "type", "valueCode": t}, {"name": "url", "valueUri": url}]}));
    }
    json!({"resourceType": "Parameters", "parameter": ps})
}

async fn import(s: &InProcess, params: &Value) -> (u16, Value) {
    let r = with_body(s.client.post(s.url("$import")), params)
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    let st = r.headers()["content-location"].to_str().unwrap().to_owned();
    wait(&s.client, &st, None).await
}

#[tokio::test]
async fn import_loads_all_or_nothing() {
    let s = InProcess::start().await;
    let pats: String = (0..50)
        .map(|i| format!("{{\"resourceType\":\"Patient\",\"id\":\"i{i}\"}}\n"))
        .collect();
    let obs: String = (0..20)
        .map(|i| format!("{{\"resourceType\":\"Observation\",\"id\":\"io{i}\",\"status\":\"final\",\"code\":{{\"text\":\"x\"}},\"subject\":{{\"reference\":\"Patient/i{i}\"}}}}\n"))
        .collect();
    let bad =
        format!("{pats}{{\"resourceType\":\"Patient\",\"id\":\"bad\",\"gender\":7}}\nnot json\n");
    let files = file_server(vec![
        ("p.ndjson", pats.clone()),
        ("o.ndjson", obs),
        ("bad.ndjson", bad),
    ])
    .await;
    let before = s.store.last_seq();
    // a bad line: nothing changes, and each bad line is named
    let (code, oo) = import(
        &s,
        &import_params(&[
            ("Patient", format!("{files}/p.ndjson")),
            ("Patient", format!("{files}/bad.ndjson")),
        ]),
    )
    .await;
    assert_eq!(code, 422, "{oo}");
    let issues: Vec<&str> = oo["issue"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["diagnostics"].as_str().unwrap())
        .collect();
    assert_eq!(issues.len(), 2, "{issues:?}");
    assert!(issues[0].contains("bad.ndjson:51:"), "{issues:?}");
    assert!(issues[1].contains("bad.ndjson:52:"), "{issues:?}");
    assert_eq!(s.store.last_seq(), before, "nothing was stored");
    // a type that is not the input's
    let (code, oo) = import(
        &s,
        &import_params(&[("Observation", format!("{files}/p.ndjson"))]),
    )
    .await;
    assert_eq!(code, 422, "{oo}");
    // a missing file
    let (code, _) = import(
        &s,
        &import_params(&[("Patient", format!("{files}/none.ndjson"))]),
    )
    .await;
    assert_eq!(code, 400);
    assert_eq!(s.store.last_seq(), before);
    // good inputs: everything, with counts per input
    let (code, m) = import(
        &s,
        &import_params(&[
            ("Patient", format!("{files}/p.ndjson")),
            ("Observation", format!("{files}/o.ndjson")),
        ]),
    )
    .await;
    assert_eq!(code, 200, "{m}");
    assert_eq!(m["output"][0]["count"], 50);
    assert_eq!(m["output"][1]["count"], 20);
    assert_eq!(m["output"][1]["inputUrl"], format!("{files}/o.ndjson"));
    let (_, b) = status_json(get(&s, "Observation?subject=Patient/i3").await).await;
    assert_eq!(b["entry"].as_array().unwrap().len(), 1, "indexed: {b}");
    // bad parameters
    for bad in [
        json!({"resourceType": "Parameters", "parameter": []}),
        json!({"resourceType": "Parameters", "parameter": [{"name": "inputFormat", "valueCode": "text/csv"}]}),
        json!({"resourceType": "Parameters", "parameter": [{"name": "input", "part": [{"name": "type", "valueCode": "Nope"}, {"name": "url", "valueUri": "http://x/y"}]}]}),
        json!({"resourceType": "Parameters", "parameter": [{"name": "input", "part": [{"name": "type", "valueCode": "Patient"}, {"name": "url", "valueUri": "file:///etc/passwd"}]}]}),
        json!({"resourceType": "Patient"}),
    ] {
        let r = with_body(s.client.post(s.url("$import")), &bad)
            .header("prefer", "respond-async")
            .send()
            .await
            .unwrap();
        expect_outcome(r, 400).await;
    }
}

#[tokio::test]
async fn import_fetches_only_from_the_allowed_hosts() {
    let mut b = fhirsync_api::bulk::BulkConfig::new("");
    b.import_hosts = vec!["files.example.org".into()];
    let s = InProcess::start_with(Options {
        bulk: Some(b),
        ..Default::default()
    })
    .await;
    let p = import_params(&[("Patient", "http://127.0.0.1:9/p.ndjson".to_owned())]);
    let r = with_body(s.client.post(s.url("$import")), &p)
        .header("prefer", "respond-async")
        .send()
        .await
        .unwrap();
    let d = expect_outcome(r, 403).await;
    assert!(d.contains("import_hosts"), "{d}");
}

#[tokio::test]
async fn a_node_killed_during_an_export_fails_the_job_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let data = tempfile::NamedTempFile::with_suffix(".ndjson").unwrap();
    let body: String = (0..40_000)
        .map(|i| fhirsync_testkit::gen::ndjson_line(3, i) + "\n")
        .collect();
    std::fs::write(data.path(), body).unwrap();
    let st = std::process::Command::new(BIN)
        .args(["import", "--data-dir"])
        .arg(dir.path())
        .arg(data.path())
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let c = reqwest::Client::new();
    let mut node = NodeProcess::spawn(BIN.as_ref(), dir.path(), &[]).unwrap();
    let status_url = kick_off(&c, &node.url("$export"), None).await;
    // kill it while the job runs
    loop {
        let r = c.get(&status_url).send().await.unwrap();
        assert_eq!(r.status(), 202, "the export ended before the kill");
        if r.headers()["x-progress"]
            .to_str()
            .unwrap()
            .contains("Observation")
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    node.kill();
    let job = status_url.rsplit('/').next().unwrap().to_owned();
    let node = NodeProcess::spawn(BIN.as_ref(), dir.path(), &[]).unwrap();
    let status_url = node.url(&format!("$bulk-status/{job}"));
    let r = c.get(&status_url).send().await.unwrap();
    let d = expect_outcome(r, 500).await;
    assert!(d.contains("node stopped"), "{d}");
    let files: Vec<_> = std::fs::read_dir(dir.path().join("bulk").join(&job))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(files, vec!["job.json"], "no file of it is left");
    // a new export runs whole
    let st = kick_off(&c, &node.url("$export"), None).await;
    let (code, m) = wait(&c, &st, None).await;
    assert_eq!(code, 200);
    let n: u64 = m["output"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["count"].as_u64().unwrap())
        .sum();
    assert_eq!(n, 40_000);
    // a node stopped cleanly (SIGTERM) while an export runs: promptly, and
    // the job fails the same way at the next start
    let mut node = node;
    let st = kick_off(&c, &node.url("$export"), None).await;
    let job = st.rsplit('/').next().unwrap().to_owned();
    let r = c.get(&st).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let t = std::time::Instant::now();
    assert!(node.terminate(Duration::from_secs(20)).unwrap().success());
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stopping took {:?}",
        t.elapsed()
    );
    let node = NodeProcess::spawn(BIN.as_ref(), dir.path(), &[]).unwrap();
    let r = c
        .get(node.url(&format!("$bulk-status/{job}")))
        .send()
        .await
        .unwrap();
    let d = expect_outcome(r, 500).await;
    assert!(d.contains("node stopped"), "{d}");
}

#[tokio::test]
async fn export_command_survives_429_and_broken_downloads() {
    use fhirsync_testkit::{Proxy, ProxyOptions};
    let mut o = Options::default();
    let mut b = fhirsync_api::bulk::BulkConfig::new("");
    b.file_bytes_max = 2048;
    o.bulk = Some(b);
    let s = InProcess::start_with(o).await;
    seed(&s, 12, 3).await;
    let proxy = Proxy::start(
        &s.base,
        ProxyOptions {
            fail_every: Some(4),
            fail_status: 429,
            retry_after: Some("1".into()),
            forward_host: true,
            cut_files_every: Some(2),
            ..Default::default()
        },
    )
    .await;
    let out = tempfile::tempdir().unwrap();
    let dir = out.path().join("x");
    let (ok, stdout, stderr) = cli(&[
        "export",
        "-s",
        &proxy.base,
        "-o",
        dir.to_str().unwrap(),
        "-r",
        "Patient,Observation",
    ])
    .await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("exported 48 resources"), "{stdout}");
    let stats = &proxy.stats;
    assert!(stats.injected.load(std::sync::atomic::Ordering::SeqCst) > 0);
    assert!(stats.files_cut.load(std::sync::atomic::Ordering::SeqCst) > 0);
    let m: Value =
        serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap()).unwrap();
    let mut seen = BTreeSet::new();
    for f in m["output"].as_array().unwrap() {
        let text = std::fs::read_to_string(dir.join(f["file"].as_str().unwrap())).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len() as u64, f["count"].as_u64().unwrap());
        for r in lines {
            assert!(
                seen.insert(format!(
                    "{}/{}",
                    r["resourceType"].as_str().unwrap(),
                    r["id"].as_str().unwrap()
                )),
                "once"
            );
        }
    }
    assert_eq!(seen.len(), 48);
    assert!(std::fs::read_dir(&dir).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .ends_with(".part")));
    // again into the same directory: refused, one line
    let (ok, _, stderr) = cli(&["export", "-s", &s.base, "-o", dir.to_str().unwrap()]).await;
    assert!(
        !ok && stderr.contains("holds an export already"),
        "{stderr}"
    );
    // the CLI checks what it is given
    for bad in [
        vec!["export", "-s", "ftp://x", "-o", "/tmp/y"],
        vec!["export", "-s", &s.base, "-o", "/tmp/y", "-r", "Nope"],
        vec![
            "export",
            "-s",
            &s.base,
            "-o",
            "/tmp/y",
            "--type-filter",
            "status=final",
        ],
        vec!["export", "-s", &s.base, "-o", "/tmp/y", "--parallel", "0"],
    ] {
        let (ok, _, stderr) = cli(&bad).await;
        assert!(
            !ok && stderr.starts_with("fhirsync: error:") && stderr.lines().count() == 1,
            "{stderr}"
        );
    }
    // Group and type filter through the CLI
    put(
        &s,
        "Group/g",
        &json!({"resourceType": "Group", "id": "g", "type": "person", "actual": true,
        "member": [{"entity": {"reference": "Patient/p2"}}]}),
    )
    .await;
    let gdir = out.path().join("g");
    let (ok, stdout, stderr) = cli(&[
        "export",
        "-s",
        &s.base,
        "-o",
        gdir.to_str().unwrap(),
        "--group",
        "g",
        "-r",
        "Patient,Observation",
        "--type-filter",
        "Observation?status=final",
    ])
    .await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("exported 3 resources"), "{stdout}");
}

#[tokio::test]
async fn sync_copy_and_compare_read_through_bulk_export() {
    let src = InProcess::start().await;
    seed(&src, 6, 2).await;
    let dst = InProcess::start().await;
    let report = tempfile::NamedTempFile::new().unwrap();
    let rp = report.path().to_str().unwrap().to_owned();
    let (ok, _, stderr) = cli(&[
        "sync", "-s", &src.base, "-t", &dst.base, "-m", "COPY", "--report", &rp,
    ])
    .await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("read the source through bulk export"),
        "{stderr}"
    );
    let (_, b) = status_json(get(&dst, "Observation?_summary=count").await).await;
    assert_eq!(b["total"], 12);
    let (_, b) = status_json(get(&dst, "Patient?_summary=count").await).await;
    assert_eq!(b["total"], 6);
    // COMPARE (told not to use summaries) reads both sides through bulk
    // export: a change on the source, a resource the target lost and one
    // only the target holds are found and mended
    put(
        &src,
        "Patient/p1",
        &json!({"resourceType": "Patient", "id": "p1", "gender": "male"}),
    )
    .await;
    assert!(delete(&dst, "Observation/o2-0").await.status().is_success());
    let extra = json!({"resourceType": "Patient", "id": "only-here", "gender": "other"});
    assert!(put(&dst, "Patient/only-here", &extra)
        .await
        .status()
        .is_success());
    let (ok, _, stderr) = cli(&[
        "sync",
        "-s",
        &src.base,
        "-t",
        &dst.base,
        "-m",
        "COMPARE",
        "--no-summary",
        "--report",
        &rp,
    ])
    .await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("read the source through bulk export"),
        "{stderr}"
    );
    assert!(
        stderr.contains("read the target through bulk export"),
        "{stderr}"
    );
    let rep: Value = serde_json::from_slice(&std::fs::read(report.path()).unwrap()).unwrap();
    assert_eq!(rep["types"]["Patient"]["updated"], 1, "{rep}");
    assert_eq!(rep["types"]["Patient"]["deleted"], 1, "{rep}");
    assert_eq!(rep["types"]["Observation"]["created"], 1, "{rep}");
    assert_eq!(rep["types"]["Observation"]["unchanged"], 11, "{rep}");
    assert_eq!(get(&dst, "Patient/only-here").await.status(), 410);
    let (_, b) = status_json(get(&dst, "Observation?_summary=count").await).await;
    assert_eq!(b["total"], 12);
    // --no-bulk pages, and says so
    let (ok, _, stderr) = cli(&[
        "sync",
        "-s",
        &src.base,
        "-t",
        &dst.base,
        "-m",
        "COMPARE",
        "--no-bulk",
        "--no-summary",
    ])
    .await;
    assert!(ok, "{stderr}");
    assert!(
        stderr.contains("read the source page by page through searches (--no-bulk)"),
        "{stderr}"
    );
    assert!(
        stderr.contains("read the target page by page through searches (--no-bulk)"),
        "{stderr}"
    );
    // a source without bulk data: paging, and a note why
    let plain = InProcess::start_with(Options {
        bulk: None,
        ..Default::default()
    })
    .await;
    seed(&plain, 1, 1).await;
    let (ok, _, stderr) = cli(&[
        "sync",
        "-s",
        &plain.base,
        "-t",
        &dst.base,
        "-m",
        "COPY",
        "--bulk",
    ])
    .await;
    assert!(ok, "{stderr}");
    assert!(stderr.contains("the source refused $export"), "{stderr}");
    // a target without bulk data is compared page by page, and the same
    // differences are found: it lacks the source's other resources and
    // holds its one Patient and Observation as the source does
    let report = tempfile::NamedTempFile::new().unwrap();
    let rp = report.path().to_str().unwrap().to_owned();
    for bulk in [true, false] {
        let mut args = vec![
            "sync",
            "-s",
            &src.base,
            "-t",
            &plain.base,
            "-m",
            "COMPARE",
            "--no-summary",
            "--dry-run",
            "--report",
            &rp,
        ];
        if bulk {
            args.push("--bulk");
        }
        let (ok, _, stderr) = cli(&args).await;
        assert!(ok, "{stderr}");
        let why = match bulk {
            true => "the target refused $export",
            false => "the target does not offer $export",
        };
        assert!(
            stderr.contains(&format!(
                "read the target page by page through searches ({why})"
            )),
            "{stderr}"
        );
        let rep: Value = serde_json::from_slice(&std::fs::read(report.path()).unwrap()).unwrap();
        assert_eq!(rep["types"]["Patient"]["unchanged"], 1, "{rep}");
        assert_eq!(rep["types"]["Patient"]["created"], 5, "{rep}");
        assert_eq!(rep["types"]["Observation"]["created"], 11, "{rep}");
    }
    // a target that offers $export but refuses it to this caller (403)
    // is paged; the same source's export is not excused
    let no_export = Proxy::start(
        &plain.base,
        ProxyOptions {
            refuse_path: Some("$export".into()),
            ..Default::default()
        },
    )
    .await;
    async fn compare(from: &str, to: &str) -> (bool, String, String) {
        let args = ["-m", "COMPARE", "--no-summary", "--dry-run", "--bulk"];
        cli(&[&["sync", "-s", from, "-t", to][..], &args].concat()).await
    }
    let (ok, _, stderr) = compare(&src.base, &no_export.base).await;
    assert!(ok, "{stderr}");
    assert!(
        stderr
            .contains("read the target page by page through searches (the target refused $export)"),
        "{stderr}"
    );
    let (ok, _, stderr) = compare(&no_export.base, &dst.base).await;
    assert!(!ok, "{stderr}");
    assert!(stderr.contains("answered 403"), "{stderr}");
}
