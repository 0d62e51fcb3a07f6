//! The NATS JetStream transport against a real `nats-server` (started by
//! the harness on a free port with its own JetStream directory): nodes
//! converge, the server restarts mid-stream and is down during writes, a
//! node dies between apply and ack, a message arrives twice.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fhirsync_nats::{Follow, NatsConfig};
use fhirsync_store::ChangesQuery;
use fhirsync_testkit::server::Options;
use fhirsync_testkit::NatsServer;
use serde_json::{json, Value};

fn nats_cfg(server: &NatsServer, follow: &[&str]) -> NatsConfig {
    let mut c = NatsConfig::new(vec![server.url()]);
    c.follow = follow.iter().map(|n| Follow::new(n)).collect();
    c
}

async fn node(id: &str, cfg: NatsConfig) -> InProcess {
    InProcess::start_with(Options {
        node_id: Some(id.into()),
        nats: Some(cfg),
        ..Options::default()
    })
    .await
}

async fn digest(s: &InProcess) -> (Digest, VersionCounts) {
    store_digest(s.store.as_ref()).await
}

async fn converge(nodes: &[&InProcess], want: usize, secs: u64) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let first = digest(nodes[0]).await.0;
        let mut same = first.len() == want;
        for n in &nodes[1..] {
            same &= digest(n).await.0 == first;
        }
        if same {
            return;
        }
        if Instant::now() > deadline {
            let sizes: Vec<usize> = futures_sizes(nodes).await;
            panic!("no convergence to {want} resources; sizes {sizes:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn futures_sizes(nodes: &[&InProcess]) -> Vec<usize> {
    let mut v = Vec::new();
    for n in nodes {
        v.push(digest(n).await.0.len());
    }
    v
}

fn obs(id: &str, v: u64) -> Value {
    json!({"resourceType":"Observation","id":id,"status":"final","code":{"text":"hr"},"valueInteger":v})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_nodes_converge_through_jetstream() {
    let server = NatsServer::start().unwrap();
    let a = node("site-a", nats_cfg(&server, &["site-b", "site-c"])).await;
    let b = node("site-b", nats_cfg(&server, &["site-a", "site-c"])).await;
    let c = node("site-c", nats_cfg(&server, &["site-a", "site-b"])).await;
    for i in 0..40 {
        put(&a, &format!("Patient/a{i}"), &pat(&format!("a{i}"))).await;
        put(&b, &format!("Observation/b{i}"), &obs(&format!("b{i}"), i)).await;
        put(&c, &format!("Patient/c{i}"), &pat(&format!("c{i}"))).await;
    }
    // Edits of replicated resources and a delete travel too.
    converge(&[&a, &b, &c], 120, 30).await;
    put(
        &b,
        "Patient/a1",
        &json!({"resourceType":"Patient","id":"a1","active":false}),
    )
    .await;
    delete(&c, "Observation/b2").await;
    converge(&[&a, &b, &c], 120, 30).await;
    let (_, v) = status_json(get(&a, "Patient/a1").await).await;
    assert_eq!(v["active"], false);
    assert_eq!(get(&a, "Observation/b2").await.status(), 410);
    // Nothing stored twice: each resource has the versions it was given.
    for n in [&a, &b, &c] {
        let (_, counts) = digest(n).await;
        assert_eq!(counts[&("Patient".to_string(), "a1".to_string())], 2);
        assert_eq!(counts[&("Observation".to_string(), "b2".to_string())], 2);
        assert!(counts.values().all(|c| *c <= 2));
    }
    let st = admin(&a, "status").await;
    let edges = st["edges"].as_array().unwrap();
    assert!(edges.iter().any(|e| e["name"] == "nats:site-b"), "{st}");
    let out = std::process::Command::new(BIN)
        .args(["status", "--url", &a.base])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("edge nats: NATS nats://127.0.0.1:") && text.contains("edge nats:site-b"),
        "{text}"
    );
    assert!(text.contains("connection connected"), "{text}");
    let m = metrics(&a).await;
    assert!(
        m.contains("fhirsync_edge_applied_total{edge=\"nats:site-b\",direction=\"pull\"}"),
        "{m}"
    );
    assert!(
        m.contains("fhirsync_edge_applied_total{edge=\"nats\",direction=\"publish\"}"),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn server_restart_and_outage_lose_nothing() {
    let mut server = NatsServer::start().unwrap();
    let a = node("site-a", nats_cfg(&server, &["site-b"])).await;
    let b = node("site-b", nats_cfg(&server, &["site-a"])).await;
    let writer = {
        let (client, base) = (a.client.clone(), a.base.clone());
        tokio::spawn(async move {
            for i in 0..300 {
                let r = client
                    .put(format!("{base}/Observation/o{i}"))
                    .header("content-type", FHIR_JSON)
                    .body(obs(&format!("o{i}"), i).to_string())
                    .send()
                    .await
                    .unwrap();
                assert!(r.status().is_success());
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
    };
    // Restart mid-stream, then a longer outage while writes go on.
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.restart().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.kill();
    for i in 0..30 {
        put(
            &b,
            &format!("Patient/while-down-{i}"),
            &pat(&format!("while-down-{i}")),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.restart().unwrap();
    writer.await.unwrap();
    converge(&[&a, &b], 330, 60).await;
    for n in [&a, &b] {
        let (_, counts) = digest(n).await;
        assert!(counts.values().all(|c| *c == 1), "a version applied twice");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_delivered_twice_is_applied_once() {
    let server = NatsServer::start().unwrap();
    let a = node("site-a", nats_cfg(&server, &[])).await;
    let b = node("site-b", nats_cfg(&server, &["site-a"])).await;
    put(&a, "Patient/p", &pat("p")).await;
    converge(&[&a, &b], 1, 20).await;
    // The same change record again, under a new message id (past the
    // duplicate window, as after a republish), and an older version after
    // a newer one.
    put(
        &a,
        "Patient/p",
        &json!({"resourceType":"Patient","id":"p","active":false}),
    )
    .await;
    converge(&[&a, &b], 1, 20).await;
    let log = a
        .store
        .changes(ChangesQuery {
            since: 0,
            count: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    for v in &log {
        let mut h = async_nats::HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("replay-{}", v.seq).as_str());
        js.publish_with_headers(
            "fhirsync.site-a.Patient",
            h,
            fhirsync_store::change_entry_text(None, v).into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = admin(&b, "edges").await;
        let e = st["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "nats:site-a")
            .unwrap()
            .clone();
        if e["pull"]["skipped"].as_u64().unwrap() >= 2 {
            assert_eq!(e["pull"]["stored"], 2, "{e}");
            break;
        }
        assert!(Instant::now() < deadline, "replays not seen: {e}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (d, counts) = digest(&b).await;
    assert_eq!(counts[&("Patient".to_string(), "p".to_string())], 2);
    assert_eq!(d, digest(&a).await.0);
    let (_, v) = status_json(get(&b, "Patient/p").await).await;
    assert_eq!(v["active"], false);
}

const BIN: &str = env!("CARGO_BIN_EXE_fhirsync");

/// `fhirsync nats keygen`: the public key printed, the seed in `file`.
fn keygen(file: &std::path::Path) -> String {
    let out = std::process::Command::new(BIN)
        .args(["nats", "keygen", "--seed-file"])
        .arg(file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_owned()
}

/// `fhirsync serve` with a `[nats]` table that the server must refuse:
/// a one-line reason and a non-zero exit, before listening.
fn serve_refused(dir: &std::path::Path, nats_toml: &str) -> String {
    let cfg = dir.join("refused.toml");
    std::fs::write(&cfg, format!("node_id = \"site-x\"\n{nats_toml}")).unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(dir.join("refused-data"))
        .env("RUST_LOG", "off")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("fhirsync serve did not stop on a refused NATS connection");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success());
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    err
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nkey_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let (sa, sb, sx) = (
        dir.path().join("a.seed"),
        dir.path().join("b.seed"),
        dir.path().join("x.seed"),
    );
    let (pa, pb) = (keygen(&sa), keygen(&sb));
    keygen(&sx);
    assert!(pa.starts_with('U') && pa.len() == 56, "{pa}");
    let server = NatsServer::start_with(&format!(
        "authorization {{ users = [ {{ nkey: {pa} }}, {{ nkey: {pb} }} ] }}"
    ))
    .unwrap();
    let mut ca = nats_cfg(&server, &["site-b"]);
    ca.nkey_seed_file = Some(sa);
    let mut cb = nats_cfg(&server, &["site-a"]);
    cb.nkey_seed_file = Some(sb);
    let a = node("site-a", ca).await;
    let b = node("site-b", cb).await;
    put(&a, "Patient/p", &pat("p")).await;
    put(&b, "Patient/q", &pat("q")).await;
    converge(&[&a, &b], 2, 20).await;
    // A key the server does not know: refused at start, clearly.
    let err = serve_refused(
        dir.path(),
        &format!(
            "[nats]\nservers = [\"{}\"]\nnkey_seed_file = \"{}\"\n",
            server.url(),
            sx.display()
        ),
    );
    assert!(
        err.contains("NATS refused this node (authorization)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mutual_tls_with_a_custom_ca() {
    let dir = tempfile::tempdir().unwrap();
    let certs = fhirsync_testkit::tls::TestCerts::generate(dir.path()).unwrap();
    let p = |f: &str| certs.dir.join(f);
    let server = NatsServer::start_with(&format!(
        "tls {{\n  cert_file: \"{}\"\n  key_file: \"{}\"\n  ca_file: \"{}\"\n  verify: true\n}}",
        p("server.pem").display(),
        p("server-key.pem").display(),
        p("ca.pem").display()
    ))
    .unwrap();
    let tls = |follow: &str| {
        let mut c = nats_cfg(&server, &[follow]);
        c.servers = vec![format!("tls://127.0.0.1:{}", server.port)];
        c.tls_ca_file = Some(p("ca.pem"));
        c.tls_cert_file = Some(p("client.pem"));
        c.tls_key_file = Some(p("client-key.pem"));
        c
    };
    let a = node("site-a", tls("site-b")).await;
    let b = node("site-b", tls("site-a")).await;
    put(&a, "Patient/p", &pat("p")).await;
    converge(&[&a, &b], 1, 20).await;
    // Without a client certificate, or trusting another CA: refused at start.
    let base = format!("[nats]\nservers = [\"tls://127.0.0.1:{}\"]\n", server.port);
    let err = serve_refused(
        dir.path(),
        &format!("{base}tls_ca_file = \"{}\"\n", p("ca.pem").display()),
    );
    assert!(err.contains("NATS refused this node"), "{err}");
    let err = serve_refused(
        dir.path(),
        &format!(
            "{base}tls_ca_file = \"{}\"\ntls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            p("other-ca.pem").display(),
            p("client.pem").display(),
            p("client-key.pem").display()
        ),
    );
    assert!(err.contains("NATS refused this node (TLS)"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jwt_credentials_with_subject_permissions_and_a_denied_publish() {
    let dir = tempfile::tempdir().unwrap();
    let auth = fhirsync_testkit::nats_jwt::Authority::new();
    let server = NatsServer::start_with(&auth.server_config()).unwrap();
    let creds = |name: &str, publish: &[&str]| {
        let p = dir.path().join(format!("{name}.creds"));
        std::fs::write(&p, auth.user_creds(name, publish)).unwrap();
        p
    };
    let mut ca = nats_cfg(&server, &["site-b"]);
    ca.credentials_file = Some(creds("site-a", &["fhirsync.site-a.>"]));
    let mut cb = nats_cfg(&server, &["site-a"]);
    cb.credentials_file = Some(creds("site-b", &["fhirsync.site-b.>"]));
    let a = node("site-a", ca).await;
    let b = node("site-b", cb).await;
    put(&a, "Patient/p", &pat("p")).await;
    put(&b, "Patient/q", &pat("q")).await;
    converge(&[&a, &b], 2, 30).await;
    // site-c's user may publish only to another node's subjects: its
    // publish is denied, reported, and nothing is lost or skipped.
    let mut cc = nats_cfg(&server, &[]);
    cc.credentials_file = Some(creds("site-c", &["fhirsync.elsewhere.>"]));
    let c = node("site-c", cc).await;
    put(&c, "Patient/r", &pat("r")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    let nats_edge = loop {
        let st = admin(&c, "edges").await;
        let e = st["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "nats")
            .unwrap()
            .clone();
        let seen = e["connection"]["lastError"]
            .as_str()
            .unwrap_or("")
            .to_ascii_lowercase()
            .contains("permissions violation");
        if seen && e["publish"]["state"] == "retrying" {
            break e;
        }
        assert!(Instant::now() < deadline, "no denied publish reported: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(
        nats_edge["publish"]["cursor"], 0,
        "the outbox did not move past the denied record: {nats_edge}"
    );
    let m = metrics(&c).await;
    let errors: u64 = m
        .lines()
        .find(|l| {
            l.starts_with("fhirsync_edge_errors_total{edge=\"nats\",direction=\"connection\"}")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    assert!(errors >= 1, "{m}");
    assert!(a.store.read("Patient", "r").await.unwrap().is_none());
    // A refused user at start: a clear one-line error.
    let bad = dir.path().join("bad.creds");
    std::fs::write(
        &bad,
        fhirsync_testkit::nats_jwt::Authority::new().user_creds("stranger", &["fhirsync.>"]),
    )
    .unwrap();
    let err = serve_refused(
        dir.path(),
        &format!(
            "[nats]\nservers = [\"{}\"]\ncredentials_file = \"{}\"\n",
            server.url(),
            bad.display()
        ),
    );
    assert!(
        err.contains("NATS refused this node (authorization)"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn core_mode_carries_live_events_only() {
    let server = NatsServer::start().unwrap();
    let core = |follow: &[&str]| {
        let mut c = nats_cfg(&server, follow);
        c.mode = fhirsync_nats::Mode::Core;
        c
    };
    let a = node("site-a", core(&[])).await;
    put(&a, "Patient/before", &pat("before")).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A follower that joins later sees what is published from then on.
    let b = node("site-b", core(&["site-a"])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    put(&a, "Patient/live", &pat("live")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while get(&b, "Patient/live").await.status() != 200 {
        assert!(Instant::now() < deadline, "live event not applied");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        get(&b, "Patient/before").await.status(),
        404,
        "best effort: no history"
    );
    // No stream was made in core mode.
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    assert!(js.get_stream("FHIRSYNC").await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_message_that_cannot_be_applied_becomes_a_dead_letter() {
    let server = NatsServer::start().unwrap();
    let a = node("site-a", nats_cfg(&server, &[])).await;
    let mut cb = nats_cfg(&server, &["site-a"]);
    cb.retry_max = 2;
    let b = node("site-b", cb).await;
    put(&a, "Patient/first", &pat("first")).await;
    converge(&[&a, &b], 1, 20).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.publish(
        "fhirsync.site-a.Patient",
        r#"{"not":"a change record"}"#.into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    put(&a, "Patient/after", &pat("after")).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dl = admin(&b, "deadletters").await["items"]
            .as_array()
            .unwrap()
            .clone();
        if dl.len() == 1 && get(&b, "Patient/after").await.status() == 200 {
            assert_eq!(dl[0]["edge"], "nats:site-a");
            assert_eq!(dl[0]["attempts"], 2, "{dl:?}");
            assert!(
                dl[0]["error"].as_str().unwrap().contains("sync-metadata"),
                "{dl:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "no dead letter: {dl:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Retrying cannot make it valid: it stays, with a clear reason.
    let id = admin(&b, "deadletters").await["items"][0]["id"]
        .as_u64()
        .unwrap();
    let r = b
        .client
        .post(
            b.base
                .replace("/fhir", &format!("/admin/deadletters/{id}/retry")),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 422);
    assert_eq!(
        admin(&b, "deadletters").await["items"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_outbox_shows_a_dead_server_within_a_second() {
    let mut server = NatsServer::start().unwrap();
    let a = node("site-a", nats_cfg(&server, &[])).await;
    let publish = || async {
        let st = admin(&a, "edges").await;
        st["items"]
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "nats")
            .unwrap()["publish"]
            .clone()
    };
    let published = |cursor: u64| async move {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let p = publish().await;
            if p["state"] == "ok" && p["lagSeq"] == 0 && p["cursor"] == cursor {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not published up to {cursor}: {p}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    put(&a, "Patient/first", &pat("first")).await;
    published(1).await;
    server.kill();
    for i in 0..100 {
        put(&a, &format!("Patient/w{i}"), &pat(&format!("w{i}"))).await;
    }
    let written = Instant::now();
    loop {
        let p = publish().await;
        if p["state"] != "ok" && p["lagSeq"] == 100 {
            assert!(
                p["lastError"].as_str().is_some_and(|e| !e.is_empty()),
                "{p}"
            );
            break;
        }
        assert!(
            written.elapsed() < Duration::from_secs(1),
            "still {p} a second after the server died"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Back again: everything goes out and the edge is ok.
    server.restart().unwrap();
    published(101).await;
}

/// Puts `n` resources made by `make(i)` through `base` as transaction
/// Bundles of `per` entries.
async fn put_many(
    client: reqwest::Client,
    base: String,
    n: usize,
    per: usize,
    make: impl Fn(usize) -> Value,
) {
    for start in (0..n).step_by(per) {
        let entries: Vec<Value> = (start..(start + per).min(n))
            .map(|i| {
                let r = make(i);
                let url = format!(
                    "{}/{}",
                    r["resourceType"].as_str().unwrap(),
                    r["id"].as_str().unwrap()
                );
                json!({"resource": r, "request": {"method": "PUT", "url": url}})
            })
            .collect();
        let bundle = json!({"resourceType":"Bundle","type":"transaction","entry":entries});
        let r = with_body(client.post(&base), &bundle).send().await.unwrap();
        assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    }
}

/// The cluster of `docs/nats.md`: three servers, stream replicas 3 and,
/// where the server has it, `sync_interval: always`. The stream's leader
/// is killed while two nodes stream 20k resources to each other: every
/// resource arrives at both, none is stored twice, and the stream holds
/// each change record once (a batch republished after a lost PubAck is
/// dropped by its message ids on the new leader).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_three_server_cluster_loses_a_server_mid_stream() {
    const EACH: usize = 10_000;
    let mut cluster = fhirsync_testkit::NatsCluster::start(3).await.unwrap();
    let cfg = |follow: &str| {
        let mut c = NatsConfig::new(cluster.urls());
        c.replicas = 3;
        c.follow = vec![Follow::new(follow)];
        c
    };
    let a = node("site-a", cfg("site-b")).await;
    let b = node("site-b", cfg("site-a")).await;
    let write = |s: &InProcess, rtype: &'static str| {
        tokio::spawn(put_many(
            s.client.clone(),
            s.base.clone(),
            EACH,
            200,
            move |i| {
                if rtype == "Patient" {
                    pat(&format!("p{i}"))
                } else {
                    obs(&format!("o{i}"), i as u64)
                }
            },
        ))
    };
    let wa = write(&a, "Observation");
    let wb = write(&b, "Patient");
    // Kill the stream's leader once a fifth of the records are written.
    let deadline = Instant::now() + Duration::from_secs(120);
    while a.store.last_seq() + b.store.last_seq() < (EACH * 2 / 5) as u64 {
        assert!(Instant::now() < deadline, "writes do not progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let leader = cluster.stream_leader("FHIRSYNC").await.unwrap();
    cluster.servers[leader].kill();
    wa.await.unwrap();
    wb.await.unwrap();
    let total = (2 * EACH) as u64;
    let deadline = Instant::now() + Duration::from_secs(180);
    while a.store.last_seq() < total || b.store.last_seq() < total {
        assert!(
            Instant::now() < deadline,
            "not converged: site-a at seq {}, site-b at {}",
            a.store.last_seq(),
            b.store.last_seq()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (da, ca) = digest(&a).await;
    let (db, cb) = digest(&b).await;
    assert_eq!(da.len(), 2 * EACH);
    assert_eq!(da, db);
    assert!(
        ca.values().chain(cb.values()).all(|c| *c == 1),
        "a version stored twice"
    );
    assert_eq!((a.store.last_seq(), b.store.last_seq()), (total, total));
    // The stream, read through a surviving member, holds each record once.
    let alive = (leader + 1) % 3;
    let client = async_nats::connect(cluster.servers[alive].url())
        .await
        .unwrap();
    let js = async_nats::jetstream::new(client);
    let info = js
        .get_stream("FHIRSYNC")
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .clone();
    assert_eq!(info.state.messages, total, "{:?}", info.state);
    assert_eq!(info.config.num_replicas, 3);
}

/// `GET /admin/edges` of a node process, as JSON.
async fn edges_of(base: &str) -> Vec<Value> {
    let v: Value = reqwest::get(base.replace("/fhir", "/admin/edges"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["items"].as_array().unwrap().clone()
}

/// A follow with `verify_url`: what NATS never delivered (the stream was
/// purged while the follower was down) is found by anti-entropy with the
/// followed node over HTTP and repaired; then the two are in sync.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_follow_verifies_over_http_what_nats_lost() {
    use fhirsync_testkit::NodeProcess;
    let server = NatsServer::start().unwrap();
    let root = tempfile::tempdir().unwrap();
    let token = "token-of-a-0123456789";
    let write_cfg = |name: &str, text: String| {
        let p = root.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let b_cfg = write_cfg(
        "b.toml",
        format!(
            "node_id = \"b\"\n[[children]]\nnode_id = \"a\"\ntoken = \"{token}\"\n\
             [nats]\nservers = [\"{}\"]\n[[nats.follow]]\nnode = \"a\"\n",
            server.url()
        ),
    );
    let spawn = |id: &str, cfg: &std::path::Path| {
        NodeProcess::spawn(
            std::path::Path::new(BIN),
            &root.path().join(id),
            &["--config", cfg.to_str().unwrap()],
        )
        .unwrap()
    };
    let b = spawn("b", &b_cfg);
    let a_cfg = write_cfg(
        "a.toml",
        format!(
            "node_id = \"a\"\n[nats]\nservers = [\"{}\"]\n[[nats.follow]]\nnode = \"b\"\n\
             verify_url = \"{}\"\nverify_token = \"{token}\"\nverify_every_s = 0\n",
            server.url(),
            b.base
        ),
    );
    let mut a = spawn("a", &a_cfg);
    let http = reqwest::Client::new();
    let put_at = |base: &str, i: usize| {
        let (http, url) = (http.clone(), format!("{base}/Patient/n{i}"));
        async move {
            let r = http
                .put(&url)
                .header("content-type", "application/fhir+json")
                .body(json!({"resourceType": "Patient", "id": format!("n{i}")}).to_string())
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{url}: {}", r.status());
        }
    };
    let seen = |base: &str, i: usize| {
        let (http, url) = (http.clone(), format!("{base}/Patient/n{i}"));
        async move { http.get(&url).send().await.unwrap().status() == 200 }
    };
    for i in 0..5 {
        put_at(&b.base, i).await;
    }
    eventually("a follows b over NATS", 30, || seen(&a.base, 4)).await;

    // a is down while b writes; the stream loses those messages.
    a.terminate(Duration::from_secs(20)).unwrap();
    for i in 5..15 {
        put_at(&b.base, i).await;
    }
    eventually("b published everything", 30, || async {
        let e = edges_of(&b.base).await;
        e.iter()
            .any(|e| e["name"] == "nats" && e["publish"]["lagSeq"] == 0)
    })
    .await;
    let js = async_nats::jetstream::new(async_nats::connect(server.url()).await.unwrap());
    js.get_stream("FHIRSYNC")
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();
    let a = spawn("a", &a_cfg);
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(!seen(&a.base, 14).await, "NATS lost it");
    let edges = edges_of(&a.base).await;
    assert!(
        edges.iter().any(|e| e["name"] == "nats:b:verify"),
        "{edges:?}"
    );

    let verify = |repair: bool| {
        let url = a.base.replace(
            "/fhir",
            &format!("/admin/verify?edge=nats:b:verify&repair={repair}"),
        );
        let http = http.clone();
        async move {
            let r = http.post(&url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<Value>().await.unwrap()
        }
    };
    let rep = verify(true).await;
    assert_eq!(rep["differences"], 10, "{rep}");
    assert_eq!(rep["byKind"]["missing-here"], 10, "{rep}");
    assert_eq!(rep["pulled"]["stored"], 10, "{rep}");
    assert_eq!(rep["parentNodeId"], "b");
    for i in 0..15 {
        assert!(seen(&a.base, i).await, "Patient/n{i}");
    }
    let rep = verify(false).await;
    assert_eq!(rep["inSync"], true, "{rep}");
}
