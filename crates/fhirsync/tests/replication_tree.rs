//! Replication between real `fhirsync serve` processes on 127.0.0.1: a
//! three-level tree with filters and a pull-only edge, a child cut off
//! through a TCP proxy, and SIGKILLs at random moments during a 50k sync.

mod common;

use common::{store_digest, Digest, VersionCounts};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fhirsync_store::sqlite::{SqliteConfig, SqliteStore};
use fhirsync_store::Store;
use fhirsync_testkit::free_port;
use fhirsync_testkit::gen::Rng;
use fhirsync_testkit::{Link, NodeProcess, TcpProxy};
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_fhirsync");

fn token(child: &str) -> String {
    format!("tok-{child}-0123456789abcdef")
}

/// Writes a node's config: its registered children and its parent edge
/// (`parent`: URL, then extra `[parent]` lines).
fn config(root: &Path, id: &str, children: &[&str], parent: Option<(&str, &str)>) -> PathBuf {
    let mut t = format!("node_id = \"{id}\"\nlog = \"warn\"\n");
    for c in children {
        t.push_str(&format!(
            "[[children]]\nnode_id = \"{c}\"\ntoken = \"{}\"\n",
            token(c)
        ));
    }
    if let Some((url, extra)) = parent {
        t.push_str(&format!(
            "[parent]\nurl = \"{url}\"\ntoken = \"{}\"\nlong_poll_s = 2\nretry_delay_ms_max = 300\n{extra}\n",
            token(id)
        ));
    }
    let p = root.join(format!("{id}.toml"));
    std::fs::write(&p, t).unwrap();
    p
}

fn spawn(root: &Path, id: &str, cfg: &Path) -> NodeProcess {
    NodeProcess::spawn(
        Path::new(BIN),
        &root.join(id),
        &["--config", cfg.to_str().unwrap()],
    )
    .unwrap()
}

fn host_port(base: &str) -> &str {
    base.trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
}

async fn put(base: &str, res: &Value) {
    let url = format!(
        "{base}/{}/{}",
        res["resourceType"].as_str().unwrap(),
        res["id"].as_str().unwrap()
    );
    let r = reqwest::Client::new()
        .put(&url)
        .header("content-type", "application/fhir+json")
        .body(res.to_string())
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "PUT {url}: {}", r.status());
}

async fn exists(base: &str, path: &str) -> bool {
    reqwest::Client::new()
        .get(format!("{base}/{path}"))
        .send()
        .await
        .map(|r| r.status() == 200)
        .unwrap_or(false)
}

async fn eventually(
    what: &str,
    secs: u64,
    f: impl Fn() -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>>,
) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// What a stopped node's store holds (see `store_digest`), its last seq
/// and its cursors.
async fn read_store(data_dir: &Path) -> (Digest, VersionCounts, u64, Vec<(String, u64, u64)>) {
    let store = SqliteStore::open(SqliteConfig::new(SqliteStore::db_path(data_dir))).unwrap();
    let (d, n) = store_digest(&store).await;
    let last = store.last_seq();
    let cursors = store.cursors().await.unwrap();
    store.shutdown();
    (d, n, last, cursors)
}

fn obs(id: &str, subject: &str) -> Value {
    json!({"resourceType":"Observation","id":id,"status":"final","code":{"text":"bp"},
           "subject":{"reference":subject},"valueString":"120/80"})
}

fn pat(id: &str, city: &str) -> Value {
    json!({"resourceType":"Patient","id":id,"address":[{"city":city}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_level_tree_with_filters_and_a_pull_only_edge() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let p_cfg = config(r, "national", &["district", "clinic-b"], None);
    let mut national = spawn(r, "national", &p_cfg);
    let d_cfg = config(r, "district", &["clinic-a"], Some((&national.base, "")));
    let mut district = spawn(r, "district", &d_cfg);
    let a_cfg = config(r, "clinic-a", &[], Some((&district.base, "")));
    let mut clinic_a = spawn(r, "clinic-a", &a_cfg);
    // clinic-b only pulls, and only Patients of Kisumu.
    let b_cfg = config(
        r,
        "clinic-b",
        &[],
        Some((&national.base, "push = false\n[parent.pull_filter]\ntypes = [\"Patient\"]\nfhirpath = \"address.city = 'Kisumu'\"")),
    );
    let mut clinic_b = spawn(r, "clinic-b", &b_cfg);

    put(&clinic_a.base, &pat("a1", "Kisumu")).await;
    put(&clinic_a.base, &obs("a1-o", "Patient/a1")).await;
    put(&clinic_a.base, &pat("a2", "Nairobi")).await;
    put(&national.base, &pat("n1", "Kisumu")).await;
    put(&district.base, &obs("d-o", "Patient/n1")).await;
    put(&clinic_b.base, &pat("b-local", "Kisumu")).await;

    let all = [
        "Patient/a1",
        "Observation/a1-o",
        "Patient/a2",
        "Patient/n1",
        "Observation/d-o",
    ];
    for (name, base) in [
        ("national", &national.base),
        ("district", &district.base),
        ("clinic-a", &clinic_a.base),
    ] {
        for p in all {
            let (b, p2) = (base.clone(), p.to_string());
            eventually(&format!("{p} at {name}"), 30, move || {
                let (b, p2) = (b.clone(), p2.clone());
                Box::pin(async move { exists(&b, &p2).await })
            })
            .await;
        }
    }
    for p in ["Patient/a1", "Patient/n1"] {
        let (b, p2) = (clinic_b.base.clone(), p.to_string());
        eventually(&format!("{p} at clinic-b"), 30, move || {
            let (b, p2) = (b.clone(), p2.clone());
            Box::pin(async move { exists(&b, &p2).await })
        })
        .await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    // Filters held: no Observations and no Nairobi patient at clinic-b.
    for p in ["Observation/a1-o", "Observation/d-o", "Patient/a2"] {
        assert!(
            !exists(&clinic_b.base, p).await,
            "{p} must not reach clinic-b"
        );
    }
    // The pull-only edge never pushed.
    for base in [&national.base, &district.base, &clinic_a.base] {
        assert!(!exists(base, "Patient/b-local").await);
    }
    let status: Value = reqwest::get(clinic_a.base.replace("/fhir", "/admin/status"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["edges"][0]["parentNodeId"], "district", "{status}");
    let children: Value = reqwest::get(national.base.replace("/fhir", "/admin/children"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let b = children["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["nodeId"] == "clinic-b")
        .unwrap();
    assert_eq!(b["lastSeqReceived"], 0, "clinic-b never pushed: {children}");
    assert!(b["lastContact"].is_string(), "{children}");

    for n in [&mut clinic_a, &mut clinic_b, &mut district, &mut national] {
        n.terminate(Duration::from_secs(20)).unwrap();
    }
    // The three full nodes hold the same set, each version stored once.
    let (dn, nn, ..) = read_store(&r.join("national")).await;
    let (dd, nd, ..) = read_store(&r.join("district")).await;
    let (da, na, ..) = read_store(&r.join("clinic-a")).await;
    assert_eq!(dn, dd);
    assert_eq!(dn, da);
    for n in [nn, nd, na] {
        assert!(
            n.values().all(|c| *c == 1),
            "a version was stored twice: {n:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_child_cut_off_keeps_writing_and_converges_after_reconnection() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let p_cfg = config(r, "parent", &["c1", "c2"], None);
    let mut parent = spawn(r, "parent", &p_cfg);
    let link = TcpProxy::start(host_port(&parent.base)).await;
    let c1_cfg = config(r, "c1", &[], Some((&link.url_for(&parent.base), "")));
    let mut c1 = spawn(r, "c1", &c1_cfg);
    let c2_cfg = config(r, "c2", &[], Some((&parent.base, "")));
    let mut c2 = spawn(r, "c2", &c2_cfg);
    let mut rng = Rng::new(7);
    for i in 0..50 {
        put(&parent.base, &pat(&format!("p{i}"), "Kisumu")).await;
    }
    let b = c1.base.clone();
    eventually("c1 has the parent's patients", 30, move || {
        let b = b.clone();
        Box::pin(async move { exists(&b, "Patient/p49").await })
    })
    .await;
    // Offline: dropped connections, then a stalled link, while all write.
    link.set(Link::Down);
    for round in 0..3 {
        for i in 0..40 {
            let id = format!("c1-r{round}-{i}");
            put(&c1.base, &obs(&id, &format!("Patient/p{}", rng.below(50)))).await;
            put(&c2.base, &obs(&format!("c2-r{round}-{i}"), "Patient/p1")).await;
            put(
                &parent.base,
                &pat(&format!("p{}", 100 + round * 40 + i), "Eldoret"),
            )
            .await;
        }
        link.set(if round == 0 {
            Link::Stalled
        } else {
            Link::Down
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let b = parent.base.clone();
    assert!(
        !exists(&b, "Observation/c1-r0-0").await,
        "the link was down"
    );
    link.set(Link::Up);
    let (pb, c1b, c2b) = (parent.base.clone(), c1.base.clone(), c2.base.clone());
    eventually("everything everywhere", 60, move || {
        let (pb, c1b, c2b) = (pb.clone(), c1b.clone(), c2b.clone());
        Box::pin(async move {
            exists(&pb, "Observation/c1-r2-39").await
                && exists(&c2b, "Observation/c1-r2-39").await
                && exists(&c1b, "Observation/c2-r2-39").await
                && exists(&c1b, "Patient/p219").await
        })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    for n in [&mut c1, &mut c2, &mut parent] {
        n.terminate(Duration::from_secs(20)).unwrap();
    }
    let (dp, np, ..) = read_store(&r.join("parent")).await;
    let (d1, n1, ..) = read_store(&r.join("c1")).await;
    let (d2, n2, ..) = read_store(&r.join("c2")).await;
    assert_eq!(dp.len(), 50 + 120 + 120 + 120);
    assert_eq!(dp, d1);
    assert_eq!(dp, d2);
    for n in [np, n1, n2] {
        assert!(n.values().all(|c| *c == 1), "a version was stored twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_twenty_times_during_a_50k_sync_loses_and_duplicates_nothing() {
    const PARENT_RESOURCES: u64 = 50_000;
    const CHILD_RESOURCES: u64 = 3_000;
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    // Load both stores offline with `fhirsync import`; the child's ids carry
    // a prefix so the two sets are distinct.
    for (id, n, seed) in [
        ("parent", PARENT_RESOURCES, 1u64),
        ("child", CHILD_RESOURCES, 2u64),
    ] {
        let file = r.join(format!("{id}.ndjson"));
        let mut text = String::new();
        for i in 0..n {
            let line = fhirsync_testkit::gen::ndjson_line(seed, i);
            let line = if id == "child" {
                line.replace("\"id\":\"", "\"id\":\"c-")
                    .replace("Patient/p", "Patient/c-p")
            } else {
                line
            };
            text.push_str(&line);
            text.push('\n');
        }
        std::fs::write(&file, text).unwrap();
        let out = std::process::Command::new(BIN)
            .args(["import", "--node-id", id, "--data-dir"])
            .arg(r.join(id))
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // The parent keeps its port across restarts, so the child's edge stays valid.
    let listen = format!("127.0.0.1:{}", free_port());
    let p_cfg = config(r, "parent", &["child"], None);
    let start_parent = || {
        NodeProcess::spawn_at(
            Path::new(BIN),
            &r.join("parent"),
            &listen,
            &["--config", p_cfg.to_str().unwrap()],
        )
        .unwrap()
    };
    let mut parent = start_parent();
    let c_cfg = config(
        r,
        "child",
        &[],
        Some((&parent.base, "batch_size_max = 1000")),
    );
    let mut child = spawn(r, "child", &c_cfg);
    let mut rng = Rng::new(0x5eed);
    let mut kills_mid_sync = 0;
    for k in 0..20 {
        tokio::time::sleep(Duration::from_millis(100 + rng.below(700))).await;
        // Where the child's pull stood when the kill came.
        let st: Option<Value> =
            match reqwest::get(child.base.replace("/fhir", "/admin/status")).await {
                Ok(r) => r.json().await.ok(),
                Err(_) => None,
            };
        let cursor = st
            .as_ref()
            .and_then(|s| s["edges"][0]["pull"]["cursor"].as_u64())
            .unwrap_or(0);
        if cursor < PARENT_RESOURCES {
            kills_mid_sync += 1;
        }
        if k % 3 == 2 {
            parent.kill();
            parent = start_parent();
        } else {
            child.kill();
            child = spawn(r, "child", &c_cfg);
        }
    }
    assert!(
        kills_mid_sync >= 10,
        "only {kills_mid_sync} kills came during the sync"
    );
    // Let it finish, then check both stores.
    let (cb, pb) = (child.base.clone(), parent.base.clone());
    let last_parent = format!("Observation/o{}", PARENT_RESOURCES - 1);
    let last_child = format!("Observation/c-o{}", CHILD_RESOURCES - 1);
    eventually("the sync finished", 300, move || {
        let (cb, pb, lp, lc) = (
            cb.clone(),
            pb.clone(),
            last_parent.clone(),
            last_child.clone(),
        );
        Box::pin(async move { exists(&cb, &lp).await && exists(&pb, &lc).await })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    child.terminate(Duration::from_secs(30)).unwrap();
    parent.terminate(Duration::from_secs(30)).unwrap();
    let (dp, np, last_p, _) = read_store(&r.join("parent")).await;
    let (dc, nc, last_c, cursors) = read_store(&r.join("child")).await;
    assert_eq!(
        dp.len() as u64,
        PARENT_RESOURCES + CHILD_RESOURCES,
        "nothing lost at the parent"
    );
    assert_eq!(dp, dc, "both hold the same resources with the same content");
    // Each resource has one version globally: a second version anywhere
    // would be a version applied twice.
    assert!(
        np.values().all(|c| *c == 1),
        "a version was applied twice at the parent"
    );
    assert!(
        nc.values().all(|c| *c == 1),
        "a version was applied twice at the child"
    );
    assert_eq!(last_p, PARENT_RESOURCES + CHILD_RESOURCES);
    assert_eq!(last_c, PARENT_RESOURCES + CHILD_RESOURCES);
    // Cursors never ahead of the data they cover.
    for (key, seq, _) in cursors {
        let bound = if key.ends_with(":pull") {
            last_p
        } else {
            last_c
        };
        assert!(seq <= bound, "cursor {key} = {seq} is past {bound}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_between_apply_and_ack_over_jetstream_loses_and_duplicates_nothing() {
    const N: u64 = 20_000;
    let server = fhirsync_testkit::NatsServer::start().unwrap();
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let file = r.join("a.ndjson");
    let mut text = String::new();
    for i in 0..N {
        text.push_str(&fhirsync_testkit::gen::ndjson_line(3, i));
        text.push('\n');
    }
    std::fs::write(&file, text).unwrap();
    let out = std::process::Command::new(BIN)
        .args(["import", "--node-id", "site-a", "--data-dir"])
        .arg(r.join("site-a"))
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = |id: &str, follow: &str| {
        let p = r.join(format!("{id}.toml"));
        let mut t = format!("node_id = \"{id}\"\nlog = \"warn\"\n[nats]\nservers = [\"{}\"]\nbatch_size_max = 500\n", server.url());
        if !follow.is_empty() {
            t.push_str(&format!("[[nats.follow]]\nnode = \"{follow}\"\n"));
        }
        std::fs::write(&p, t).unwrap();
        p
    };
    let (a_cfg, b_cfg) = (cfg("site-a", ""), cfg("site-b", "site-a"));
    let mut a = spawn(r, "site-a", &a_cfg);
    let mut b = spawn(r, "site-b", &b_cfg);
    let mut rng = Rng::new(42);
    let mut kills_mid_stream = 0;
    for k in 0..10 {
        tokio::time::sleep(Duration::from_millis(100 + rng.below(500))).await;
        // How far site-b's store was when the kill came.
        let seen = reqwest::get(format!("{}/Observation?_summary=count", b.base))
            .await
            .ok();
        let count = match seen {
            Some(r) => r
                .json::<Value>()
                .await
                .ok()
                .and_then(|v| v["total"].as_u64()),
            None => None,
        };
        if count.is_some_and(|c| c < N * 4 / 5) {
            kills_mid_stream += 1;
        }
        if k % 4 == 3 {
            a.kill();
            a = spawn(r, "site-a", &a_cfg);
        } else {
            b.kill();
            b = spawn(r, "site-b", &b_cfg);
        }
    }
    assert!(
        kills_mid_stream >= 5,
        "only {kills_mid_stream} kills came mid-stream"
    );
    let (bb, last) = (b.base.clone(), format!("Observation/o{}", N - 1));
    eventually("site-b has everything", 300, move || {
        let (bb, last) = (bb.clone(), last.clone());
        Box::pin(async move { exists(&bb, &last).await })
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    b.terminate(Duration::from_secs(30)).unwrap();
    a.terminate(Duration::from_secs(30)).unwrap();
    let (da, _, last_a, _) = read_store(&r.join("site-a")).await;
    let (db, nb, last_b, _) = read_store(&r.join("site-b")).await;
    assert_eq!(da.len() as u64, N);
    assert_eq!(da, db, "nothing lost");
    assert!(nb.values().all(|c| *c == 1), "a version applied twice");
    assert_eq!(last_a, N, "site-a stored nothing back");
    assert_eq!(last_b, N);
}

/// `fhirsync <args>` to completion: (success, stdout, stderr).
fn run_cli(args: &[&str]) -> (bool, String, String) {
    let o = std::process::Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

async fn admin_json(base: &str, path: &str) -> Value {
    reqwest::get(base.replace("/fhir", &format!("/admin/{path}")))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn open_conflicts(base: &str) -> Vec<String> {
    admin_json(base, "conflicts?state=open").await["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            format!(
                "{}/{}",
                c["resourceType"].as_str().unwrap(),
                c["resourceId"].as_str().unwrap()
            )
        })
        .collect()
}

/// A child backed up while it serves, then restored from that backup after
/// it had pushed more (new patients and an edit) and pulled more: while its
/// parent is down it edits the resource whose later edit it forgot, and
/// creates one. When the parent is back, nothing is lost: the child gets
/// back what it had pushed (anti-entropy: the parent's feed leaves out what
/// came from the child) and what it had pulled (its restored cursor is
/// older), the parent gets the new patient, and the two edits of the one
/// patient are a conflict at both ends, not one edit silently kept; every
/// other resource is the same at both ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_child_restored_from_an_old_backup_rejoins_without_losing_anything() {
    let root = tempfile::tempdir().unwrap();
    let r = root.path();
    let p_cfg = config(r, "parent", &["c1"], None);
    let mut parent = spawn(r, "parent", &p_cfg);
    let c1_cfg = config(r, "c1", &[], Some((&parent.base, "")));
    let mut c1 = spawn(r, "c1", &c1_cfg);
    let c1_dir = r.join("c1");
    for i in 0..20 {
        put(&parent.base, &pat(&format!("p{i}"), "Kisumu")).await;
    }
    for i in 0..10 {
        put(&c1.base, &obs(&format!("before{i}"), "Patient/p1")).await;
    }
    let (pb, cb) = (parent.base.clone(), c1.base.clone());
    eventually("the first data at both ends", 30, move || {
        let (pb, cb) = (pb.clone(), cb.clone());
        Box::pin(async move {
            exists(&cb, "Patient/p19").await && exists(&pb, "Observation/before9").await
        })
    })
    .await;

    // The backup, while the child serves.
    let backup = r.join("c1-backup.db");
    let (ok, out, err) = run_cli(&[
        "backup",
        "--config",
        c1_cfg.to_str().unwrap(),
        "--data-dir",
        c1_dir.to_str().unwrap(),
        backup.to_str().unwrap(),
    ]);
    assert!(ok, "backup: {err}");
    assert!(out.contains("backed up node 'c1'"), "{out}");
    let (ok, _, err) = run_cli(&[
        "backup",
        "--data-dir",
        c1_dir.to_str().unwrap(),
        backup.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("exists"), "{err}");

    // After the backup: the child pushes new patients and an edit, and
    // pulls the parent's new patients.
    for i in 0..5 {
        put(&c1.base, &pat(&format!("after{i}"), "Nakuru")).await;
        put(&parent.base, &pat(&format!("late{i}"), "Eldoret")).await;
    }
    put(&c1.base, &pat("p0", "edited at c1 after the backup")).await;
    let (pb, cb) = (parent.base.clone(), c1.base.clone());
    eventually("the post-backup writes at both ends", 30, move || {
        let (pb, cb) = (pb.clone(), cb.clone());
        Box::pin(async move {
            let p0: Value = match reqwest::get(format!("{pb}/Patient/p0")).await {
                Ok(r) => r.json().await.unwrap_or(Value::Null),
                Err(_) => Value::Null,
            };
            p0["address"][0]["city"] == "edited at c1 after the backup"
                && exists(&pb, "Patient/after4").await
                && exists(&cb, "Patient/late4").await
        })
    })
    .await;

    // The child's disk is lost; the parent is down for a while too.
    c1.kill();
    let parent_addr = host_port(&parent.base).to_owned();
    parent.terminate(Duration::from_secs(20)).unwrap();
    let (ok, _, err) = run_cli(&[
        "restore",
        "--data-dir",
        r.join("parent").to_str().unwrap(),
        backup.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("backup of node 'c1'"), "{err}");
    let (ok, out, err) = run_cli(&[
        "restore",
        "--config",
        c1_cfg.to_str().unwrap(),
        "--data-dir",
        c1_dir.to_str().unwrap(),
        backup.to_str().unwrap(),
    ]);
    assert!(ok, "restore: {err}");
    assert!(out.contains("restored node 'c1'"), "{out}");
    let mut c1 = spawn(r, "c1", &c1_cfg);
    assert!(
        !exists(&c1.base, "Patient/after0").await,
        "the backup is older"
    );
    put(&c1.base, &pat("p0", "edited at c1 after the restore")).await;
    put(&c1.base, &obs("restored0", "Patient/p2")).await;

    let mut parent = NodeProcess::spawn_at(
        Path::new(BIN),
        &r.join("parent"),
        &parent_addr,
        &["--config", p_cfg.to_str().unwrap()],
    )
    .unwrap();
    let (pb, cb) = (parent.base.clone(), c1.base.clone());
    eventually("the two ends rejoined", 60, move || {
        let (pb, cb) = (pb.clone(), cb.clone());
        Box::pin(async move {
            exists(&cb, "Patient/after4").await
                && exists(&cb, "Patient/late4").await
                && exists(&pb, "Observation/restored0").await
                && open_conflicts(&pb).await.len() == 1
                && open_conflicts(&cb).await.len() == 1
        })
    })
    .await;
    assert_eq!(open_conflicts(&parent.base).await, ["Patient/p0"]);
    assert_eq!(open_conflicts(&c1.base).await, ["Patient/p0"]);
    let edges = admin_json(&c1.base, "edges").await;
    assert!(
        edges["items"][0]["verify"]["runs"].as_u64() >= Some(1),
        "{edges}"
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    c1.terminate(Duration::from_secs(20)).unwrap();
    parent.terminate(Duration::from_secs(20)).unwrap();
    let (mut dp, np, ..) = read_store(&r.join("parent")).await;
    let (mut d1, n1, _, cursors) = read_store(&c1_dir).await;
    // Each end keeps its own p0 until the conflict is resolved.
    let key = ("Patient".to_owned(), "p0".to_owned());
    assert_ne!(dp.remove(&key), d1.remove(&key));
    assert_eq!(dp.len(), 20 + 10 + 5 + 5 + 1 - 1);
    assert_eq!(dp, d1);
    for n in [np, n1] {
        let twice: Vec<_> = n.iter().filter(|(k, c)| **c > 1 && **k != key).collect();
        assert!(twice.is_empty(), "stored twice: {twice:?}");
    }
    let restored = cursors.iter().find(|c| c.0 == "restored").unwrap();
    assert_eq!(restored.1, 0, "the restore marker was cleared");
}
