//! The `fhirsync` binary: import, configuration and environment, clear
//! one-line errors, the data-directory lock, and graceful shutdown.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use fhirsync_testkit::gen::{ndjson_line, synthea_like_bundle, Rng};
use fhirsync_testkit::NodeProcess;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_fhirsync");

fn fhirsync(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts a failure with a one-line reason containing `want`.
fn fails_with(o: &Output, want: &str) {
    assert!(!o.status.success(), "expected failure: {o:?}");
    let e = stderr(o);
    let lines: Vec<&str> = e.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "not one line: {e}");
    assert!(lines[0].starts_with("fhirsync: error: "), "{e}");
    assert!(e.contains(want), "{e} lacks {want}");
}

fn write_ndjson(path: &Path, from: u64, n: u64) {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    for i in from..from + n {
        writeln!(f, "{}", ndjson_line(1, i)).unwrap();
    }
}

async fn count(node: &NodeProcess, q: &str) -> u64 {
    let b: Value = reqwest::get(node.url(&format!(
        "{q}{}_summary=count",
        if q.contains('?') { "&" } else { "?" }
    )))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    b["total"].as_u64().unwrap()
}

#[tokio::test]
async fn import_files_then_serve_them() {
    let data = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    write_ndjson(&src.path().join("a.ndjson"), 0, 2000);
    std::fs::create_dir(src.path().join("bundles")).unwrap();
    let tx = synthea_like_bundle(&mut Rng::new(5), 3, 4);
    std::fs::write(src.path().join("bundles/patient1.json"), tx.to_string()).unwrap();
    let coll = json!({"resourceType": "Bundle", "type": "collection", "entry": [
        {"resource": {"resourceType": "Practitioner", "id": "dr-c"}},
        {"resource": {"resourceType": "Location", "name": "no id: created"}}
    ]});
    std::fs::write(src.path().join("bundles/collection.json"), coll.to_string()).unwrap();
    std::fs::write(
        src.path().join("single.json"),
        json!({"resourceType": "Patient", "id": "single", "active": true}).to_string(),
    )
    .unwrap();
    std::fs::write(src.path().join("ignored.txt"), "not fhir").unwrap();

    let d = data.path().to_str().unwrap();
    let o = fhirsync(&[
        "import",
        "--data-dir",
        d,
        "--node-id",
        "importer",
        src.path().to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    // 2000 lines + 1 bundle request + 2 collection entries + 1 file.
    assert!(
        out.contains("imported 2004 resources from 4 files"),
        "{out}"
    );
    assert!(
        out.contains("2000 created") || out.contains("created"),
        "{out}"
    );

    // Importing the same files again changes nothing but the bundle (new server ids).
    let o = fhirsync(&[
        "import",
        "--data-dir",
        d,
        &src.path().join("a.ndjson").to_string_lossy(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).contains("0 created, 0 updated, 2000 unchanged"),
        "{}",
        String::from_utf8_lossy(&o.stdout)
    );

    let node = NodeProcess::spawn(BIN.as_ref(), data.path(), &[]).unwrap();
    assert_eq!(count(&node, "Patient?_id=single").await, 1);
    assert_eq!(count(&node, "Observation?patient=p3").await, 4);
    assert_eq!(count(&node, "Practitioner?_id=dr-c").await, 1);
    assert_eq!(count(&node, "Location").await, 1);
    // 400 NDJSON patients, 1 bundle patient, 1 single.
    assert_eq!(count(&node, "Patient").await, 402);
    let enc: Value = reqwest::get(node.url("Encounter"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let subj = enc["entry"][0]["resource"]["subject"]["reference"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(subj.starts_with("Patient/"), "{subj}");
    assert_eq!(reqwest::get(node.url(&subj)).await.unwrap().status(), 200);
    // The node keeps the id given at import.
    let meta: Value = reqwest::get(node.url("$changes?_count=1"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        meta["entry"][0]["extension"][0]["extension"][1]["valueString"],
        "importer"
    );
}

#[tokio::test]
async fn bad_import_names_file_and_line_and_changes_nothing() {
    let data = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let d = data.path().to_str().unwrap();
    write_ndjson(&src.path().join("good.ndjson"), 0, 100);
    assert!(fhirsync(&[
        "import",
        "--data-dir",
        d,
        &src.path().join("good.ndjson").to_string_lossy()
    ])
    .status
    .success());

    // A bad line deep in a file that comes after good data.
    let bad = src.path().join("bad.ndjson");
    write_ndjson(&bad, 100, 3000);
    let mut text = std::fs::read_to_string(&bad).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut fixed: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    fixed[2499] = r#"{"resourceType":"Patient","id":"bad id"}"#.into();
    text = fixed.join("\n");
    std::fs::write(&bad, text).unwrap();
    let o = fhirsync(&[
        "import",
        "--data-dir",
        d,
        "--batch-size",
        "500",
        &src.path().join("good.ndjson").to_string_lossy(),
        &bad.to_string_lossy(),
    ]);
    fails_with(&o, "bad.ndjson:2500: invalid resource id 'bad id'");
    assert!(stderr(&o).contains("nothing was imported"));

    // Malformed JSON and an unknown type.
    std::fs::write(&bad, "{\"resourceType\":\"Patient\"}\n{oops\n").unwrap();
    fails_with(
        &fhirsync(&["import", "--data-dir", d, &bad.to_string_lossy()]),
        "bad.ndjson:2: body is not valid JSON",
    );
    std::fs::write(&bad, "\n\n{\"resourceType\":\"Patientt\"}\n").unwrap();
    fails_with(
        &fhirsync(&["import", "--data-dir", d, &bad.to_string_lossy()]),
        "bad.ndjson:3: unknown resourceType 'Patientt'",
    );
    // A resource that fails validation (the default mode is strict).
    std::fs::write(
        &bad,
        "{\"resourceType\":\"Patient\"}\n{\"resourceType\":\"Patient\",\"notAnElement\":1}\n",
    )
    .unwrap();
    fails_with(
        &fhirsync(&["import", "--data-dir", d, &bad.to_string_lossy()]),
        "bad.ndjson:2: fails validation: 1 problem(s), the first at Patient.notAnElement",
    );
    // A failing transaction inside a bundle file.
    let bundle = src.path().join("tx.json");
    std::fs::write(&bundle, json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": {"resourceType": "Patient", "id": "t1"}, "request": {"method": "PUT", "url": "Patient/t1"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "subject": {"reference": "urn:uuid:missing"}}, "request": {"method": "POST", "url": "Observation"}}
    ]}).to_string()).unwrap();
    fails_with(
        &fhirsync(&["import", "--data-dir", d, &bundle.to_string_lossy()]),
        "tx.json:1: bundle entry 1: reference 'urn:uuid:missing'",
    );
    fails_with(
        &fhirsync(&["import", "--data-dir", d, "/no/such/path"]),
        "/no/such/path: cannot read",
    );

    let node = NodeProcess::spawn(BIN.as_ref(), data.path(), &[]).unwrap();
    assert_eq!(
        count(&node, "Patient").await,
        20,
        "a failed import changed the store"
    );
    assert_eq!(count(&node, "Observation").await, 80);
    let feed: Value = reqwest::get(node.url("$changes?since=100"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(feed["entry"].as_array().unwrap().is_empty());
}

/// An import goes through a rollback journal (the store is its alone).
/// One killed after it began writing into the database file leaves a hot
/// journal, which undoes it at the next open; the store is back in WAL
/// mode after an import that ends.
#[tokio::test]
async fn an_import_killed_midway_changes_nothing() {
    let data = tempfile::tempdir().unwrap();
    let src = tempfile::tempdir().unwrap();
    let d = data.path().to_str().unwrap();
    let [first, big, more] =
        ["first", "big", "more"].map(|n| src.path().join(format!("{n}.ndjson")));
    write_ndjson(&first, 0, 2000);
    // Enough for the writer's page cache to spill into the database file
    // (about half way) before the commit.
    write_ndjson(&big, 2000, 70_000);
    write_ndjson(&more, 80_000, 100);
    let o = fhirsync(&["import", "--data-dir", d, first.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (db, journal) = (
        data.path().join("fhirsync.db"),
        data.path().join("fhirsync.db-journal"),
    );
    // SQLite writes a journal's magic number once the journal is synced,
    // before it writes any page into the database file: from then on the
    // journal is hot.
    const MAGIC: [u8; 8] = [0xd9, 0xd5, 0x05, 0xf9, 0x20, 0xa1, 0x63, 0xd7];
    let hot = || std::fs::read(&journal).is_ok_and(|j| j.starts_with(&MAGIC));

    let mut child = Command::new(BIN)
        .args(["import", "--data-dir", d, big.to_str().unwrap()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let waited = std::time::Instant::now();
    while !hot() {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the import ended first"
        );
        assert!(
            waited.elapsed() < Duration::from_secs(120),
            "no hot journal"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(hot(), "the killed import left no hot journal");

    let node = NodeProcess::spawn(BIN.as_ref(), data.path(), &[]).unwrap();
    assert_eq!(
        count(&node, "Patient").await,
        400,
        "the killed import landed in part"
    );
    assert_eq!(count(&node, "Observation").await, 1600);
    drop(node);
    assert!(!journal.exists(), "the hot journal was not rolled back");

    let o = fhirsync(&["import", "--data-dir", d, more.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!journal.exists());
    let mode: String = rusqlite::Connection::open(&db)
        .unwrap()
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    assert_eq!(mode, "wal");
    let node = NodeProcess::spawn(BIN.as_ref(), data.path(), &[]).unwrap();
    assert_eq!(count(&node, "Patient").await, 420);
}

#[tokio::test]
async fn one_process_per_data_dir() {
    let data = tempfile::tempdir().unwrap();
    let _node = NodeProcess::spawn(BIN.as_ref(), data.path(), &[]).unwrap();
    let f = data.path().join("x.ndjson");
    write_ndjson(&f, 0, 1);
    fails_with(
        &fhirsync(&[
            "import",
            "--data-dir",
            data.path().to_str().unwrap(),
            f.to_str().unwrap(),
        ]),
        "is in use by another fhirsync process",
    );
    fails_with(
        &fhirsync(&[
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            data.path().to_str().unwrap(),
        ]),
        "is in use",
    );
}

#[test]
fn configuration_errors_are_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("c.toml");
    std::fs::write(&cfg, "listen = \"127.0.0.1:0\"\nlisten_port = 3\n").unwrap();
    fails_with(
        &fhirsync(&["serve", "--config", cfg.to_str().unwrap()]),
        "unknown field `listen_port`",
    );
    std::fs::write(&cfg, "[storage]\nsync = \"sometimes\"\n").unwrap();
    fails_with(
        &fhirsync(&["serve", "--config", cfg.to_str().unwrap()]),
        "storage.sync 'sometimes' must be full or normal",
    );
    fails_with(
        &fhirsync(&["serve", "--listen", "nowhere"]),
        "listen address 'nowhere' is not IP:PORT",
    );
    fails_with(
        &fhirsync(&["serve", "--config", "/no/such.toml"]),
        "cannot read config /no/such.toml",
    );
    fails_with(
        &fhirsync(&["serve", "--node-id", "has space", "--listen", "127.0.0.1:0"]),
        "invalid node id 'has space'",
    );
}

#[tokio::test]
async fn config_file_env_and_flags_and_node_id_is_fixed() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let cfg = dir.path().join("c.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = \"from-file\"\ndata_dir = \"{}\"\n[api]\nbody_bytes_max = 500\n",
            data.display()
        ),
    )
    .unwrap();
    let mut node =
        NodeProcess::spawn(BIN.as_ref(), &data, &["--config", cfg.to_str().unwrap()]).unwrap();
    let big = json!({"resourceType": "Patient", "id": "x", "text": {"div": "y".repeat(600)}});
    let r = reqwest::Client::new()
        .put(node.url("Patient/x"))
        .header("content-type", "application/fhir+json")
        .body(big.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413, "the config file's limit applies");
    let meta: Value = reqwest::get(node.url("metadata"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(meta["implementation"]["description"]
        .as_str()
        .unwrap()
        .contains("from-file"));
    node.terminate(Duration::from_secs(10)).unwrap();

    // Environment variables stand in for flags; the stored node id cannot change.
    let o = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0"])
        .env("FHIRSYNC_DATA_DIR", &data)
        .env("FHIRSYNC_NODE_ID", "other")
        .output()
        .unwrap();
    fails_with(&o, "belongs to node 'from-file', not 'other'");
}

#[tokio::test]
async fn sigterm_shuts_down_cleanly_and_keeps_data() {
    let data = tempfile::tempdir().unwrap();
    let mut node = NodeProcess::spawn(BIN.as_ref(), data.path(), &[]).unwrap();
    let client = reqwest::Client::new();
    let r = client
        .put(node.url("Patient/a"))
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","id":"a"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // A long-poll in progress does not hold the shutdown up.
    let poll = tokio::spawn(client.get(node.url("$changes?since=1&wait=60")).send());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = std::time::Instant::now();
    let status = node.terminate(Duration::from_secs(10)).unwrap();
    assert!(status.success(), "{status:?}");
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    let _ = poll.await;
    // The WAL was checkpointed into the database file at shutdown.
    let wal = data.path().join("fhirsync.db-wal");
    assert!(!wal.exists() || std::fs::metadata(&wal).unwrap().len() == 0);
    let node = NodeProcess::spawn(BIN.as_ref(), data.path(), &[]).unwrap();
    assert_eq!(
        reqwest::get(node.url("Patient/a")).await.unwrap().status(),
        200
    );
}

/// A `SearchParameter` written to a running node is in force at once for
/// what is written after; `fhirsync reindex --url` indexes what was there
/// before while the node serves; the definition survives a restart; one
/// the node cannot serve is refused with the reason.
#[tokio::test(flavor = "multi_thread")]
async fn a_search_parameter_defined_on_a_running_node_is_served() {
    let data = tempfile::tempdir().unwrap();
    let node = NodeProcess::spawn(BIN.as_ref(), data.path(), &[]).unwrap();
    let c = reqwest::Client::new();
    let post = |path: &str, body: Value| c.post(node.url(path)).json(&body).send();
    let maiden = |name: &str| {
        json!({"resourceType": "Patient", "extension": [
            {"url": "http://example.org/mothers-maiden-name", "valueString": name}]})
    };
    assert_eq!(
        post("Patient", maiden("Wanjiru")).await.unwrap().status(),
        201
    );
    let sp = json!({"resourceType": "SearchParameter", "url": "http://example.org/sp/mm",
        "name": "MothersMaidenName", "status": "active", "description": "Mother's maiden name",
        "code": "mothers-maiden", "base": ["Patient"], "type": "string",
        "expression": "Patient.extension.where(url = 'http://example.org/mothers-maiden-name').value"});
    let r = post("SearchParameter", sp.clone()).await.unwrap();
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    assert_eq!(
        post("Patient", maiden("Wambui")).await.unwrap().status(),
        201
    );
    assert_eq!(count(&node, "Patient?mothers-maiden=wam").await, 1);
    // Stored before the definition: found once reindexed.
    assert_eq!(count(&node, "Patient?mothers-maiden=wan").await, 0);
    let o = fhirsync(&["reindex", "--url", &node.base]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("reindexed 3 versions"));
    assert_eq!(count(&node, "Patient?mothers-maiden=wan").await, 1);
    assert_eq!(count(&node, "Patient?mothers-maiden:exact=Wambui").await, 1);
    let cap = reqwest::get(node.url("metadata"))
        .await
        .unwrap()
        .text()
        .await;
    assert!(cap
        .unwrap()
        .contains(r#""name":"mothers-maiden","type":"string""#));

    for (change, why) in [
        (json!({"type": "composite"}), "custom parameters may be"),
        (
            json!({"expression": "Patient.extension.where("}),
            "does not parse",
        ),
        (json!({"base": ["Nope"]}), "not a resource type"),
        (json!({"code": "_x"}), "not starting with _"),
    ] {
        let mut bad = sp.clone();
        bad["code"] = json!("other");
        for (k, v) in change.as_object().unwrap() {
            bad[k] = v.clone();
        }
        let r = post("SearchParameter", bad).await.unwrap();
        assert_eq!(r.status(), 422);
        let body = r.text().await.unwrap();
        assert!(body.contains(why), "{body}");
    }
    assert_eq!(count(&node, "SearchParameter").await, 1);

    drop(node);
    let node = NodeProcess::spawn(BIN.as_ref(), data.path(), &[]).unwrap();
    assert_eq!(count(&node, "Patient?mothers-maiden=w").await, 2);
    // Retired: the code is no longer a parameter.
    let id = {
        let b: Value = reqwest::get(node.url("SearchParameter"))
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        b["entry"][0]["resource"]["id"].as_str().unwrap().to_owned()
    };
    let mut retired = sp.clone();
    retired["id"] = json!(id);
    retired["status"] = json!("retired");
    let r = c
        .put(node.url(&format!("SearchParameter/{id}")))
        .json(&retired)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = c
        .get(node.url("Patient?mothers-maiden=w"))
        .header("prefer", "handling=strict")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
}
