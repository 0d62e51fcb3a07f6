//! The PostgreSQL backend against a real server (started by the harness:
//! `initdb` in a temporary directory, a free port): migrations applied
//! once however many processes start together, a newer schema refused,
//! and the change log gapless and in order for readers while many
//! connections (standing for processes) append and roll back at once.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use common::feed_seqs;
use fhirsync_store::postgres::log::{advance_head, lock_head, read_head, Head, Listener};
use fhirsync_store::postgres::schema::{migrate, MIGRATIONS};
use fhirsync_store::postgres::{connect, PgConfig};
use fhirsync_testkit::postgres::Postgres;

fn fresh(pg: &Postgres, name: &str) -> PgConfig {
    PgConfig::new(pg.create_db(name))
}

#[test]
fn migrations_run_once_and_a_newer_schema_is_refused() {
    let pg = Postgres::start().unwrap();
    let cfg = fresh(&pg, "migrate");
    // Four processes start at once: one applies, the others find it done.
    let start = Arc::new(Barrier::new(4));
    let runs: Vec<_> = (0..4)
        .map(|_| {
            let (cfg, start) = (cfg.clone(), start.clone());
            std::thread::spawn(move || {
                let mut c = connect(&cfg).unwrap();
                start.wait();
                migrate(&mut c).unwrap()
            })
        })
        .collect();
    let applied: Vec<Vec<i64>> = runs.into_iter().map(|t| t.join().unwrap()).collect();
    let all: Vec<i64> = (1..=MIGRATIONS.len() as i64).collect();
    assert_eq!(
        applied.iter().filter(|a| **a == all).count(),
        1,
        "{applied:?}"
    );
    assert_eq!(
        applied.iter().filter(|a| a.is_empty()).count(),
        3,
        "{applied:?}"
    );
    let mut c = connect(&cfg).unwrap();
    assert!(migrate(&mut c).unwrap().is_empty());
    assert_eq!(read_head(&mut c).unwrap(), Head::default());
    // Text compares in code-point order, as in SQLite.
    let lt: bool = c
        .query_one(
            "SELECT 'Z'::text COLLATE \"C\" < 'a' AND 'Patient' >= 'A' AND 'Patient' < '['",
            &[],
        )
        .unwrap()
        .get(0);
    assert!(lt);
    c.batch_execute(
        "INSERT INTO schema_migrations (version, name) VALUES (999, 'from the future')",
    )
    .unwrap();
    let e = migrate(&mut c).unwrap_err().to_string();
    assert!(e.contains("version 999") && e.contains("newer"), "{e}");
    // A database that cannot be reached is a clear error, not a hang.
    let dead = PgConfig::new(format!(
        "postgres://u:pw@127.0.0.1:{}/x",
        fhirsync_testkit::free_port()
    ));
    let e = connect(&dead).err().expect("no connection").to_string();
    assert!(e.contains("cannot connect") && !e.contains("pw"), "{e}");
}

/// A small deterministic generator per thread.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// Appends `n` versions in one transaction the way the writer does; rolls
/// back instead of committing when `commit` is false. Returns the seqs.
fn append(c: &mut postgres::Client, n: u64, commit: bool, pause: Duration) -> Vec<u64> {
    let mut tx = c.transaction().unwrap();
    let head = lock_head(&mut tx).unwrap();
    let seqs: Vec<u64> = (head.seq + 1..=head.seq + n).collect();
    for s in &seqs {
        tx.execute(
            "INSERT INTO versions (seq, type, id, vid, lu_ms, deleted, method, origin, vv, hlc)
             VALUES ($1, 'Observation', $2, 1, 0, 0, 'PUT', 'n', '{}', $1)",
            &[&(*s as i64), &format!("o{s}")],
        )
        .unwrap();
    }
    // Time for a reader to look while this is in flight.
    std::thread::sleep(pause);
    advance_head(
        &mut tx,
        Head {
            seq: head.seq + n,
            hlc: head.seq + n,
        },
    )
    .unwrap();
    if commit {
        tx.commit().unwrap();
        seqs
    } else {
        tx.rollback().unwrap();
        Vec::new()
    }
}

#[test]
fn the_log_is_gapless_and_ordered_for_readers_while_many_append() {
    const WRITERS: u64 = 6;
    const ROUNDS: u64 = 60;
    let pg = Postgres::start().unwrap();
    let cfg = fresh(&pg, "log");
    migrate(&mut connect(&cfg).unwrap()).unwrap();
    let committed = Arc::new(Mutex::new(BTreeSet::new()));
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (cfg, committed) = (cfg.clone(), committed.clone());
            std::thread::spawn(move || {
                let mut c = connect(&cfg).unwrap();
                let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ (w + 1));
                for _ in 0..ROUNDS {
                    let n = 1 + rng.below(5);
                    let commit = rng.below(5) != 0;
                    let pause = Duration::from_millis(rng.below(4));
                    let seqs = append(&mut c, n, commit, pause);
                    committed.lock().unwrap().extend(seqs);
                }
            })
        })
        .collect();
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Readers follow the log as a `$changes` consumer does: after their
    // cursor, in seq order. One polls; one waits for the listener's wake-up.
    let readers: Vec<_> = [false, true]
        .into_iter()
        .map(|woken| {
            let (cfg, done) = (cfg.clone(), done.clone());
            std::thread::spawn(move || {
                let mut c = connect(&cfg).unwrap();
                let (tx, mut rx) = tokio::sync::watch::channel(0u64);
                let _listener = woken.then(|| Listener::start(&cfg, tx).unwrap());
                let (mut cursor, mut seen) = (0u64, Vec::new());
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    let rows = c
                        .query(
                            "SELECT seq FROM versions WHERE seq > $1 ORDER BY seq LIMIT 50",
                            &[&(cursor as i64)],
                        )
                        .unwrap();
                    for r in &rows {
                        let s = r.get::<_, i64>(0) as u64;
                        assert_eq!(s, cursor + 1, "after {cursor} the reader saw {s}: a gap");
                        cursor = s;
                        seen.push(s);
                    }
                    let end = done.load(std::sync::atomic::Ordering::SeqCst);
                    if rows.is_empty() && end {
                        let head = read_head(&mut c).unwrap().seq;
                        if cursor == head {
                            if woken {
                                assert_eq!(*rx.borrow_and_update(), head, "listener behind");
                            }
                            return seen;
                        }
                    }
                    assert!(Instant::now() < deadline, "reader stuck at {cursor}");
                    if rows.is_empty() {
                        if woken {
                            let wait = Instant::now() + Duration::from_millis(500);
                            while *rx.borrow_and_update() <= cursor && Instant::now() < wait {
                                std::thread::sleep(Duration::from_millis(1));
                            }
                        } else {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                    }
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    done.store(true, std::sync::atomic::Ordering::SeqCst);
    let committed = committed.lock().unwrap().clone();
    let all: Vec<u64> = (1..=committed.len() as u64).collect();
    assert_eq!(
        committed.iter().copied().collect::<Vec<_>>(),
        all,
        "committed seqs have a gap"
    );
    assert!(
        committed.len() as u64 > WRITERS * ROUNDS,
        "too few appends to mean anything"
    );
    for r in readers {
        assert_eq!(r.join().unwrap(), all);
    }
}

const BIN: &str = env!("CARGO_BIN_EXE_fhirsync");

fn config(dir: &std::path::Path, storage: &str) -> std::path::PathBuf {
    let f = dir.join("node.toml");
    std::fs::write(&f, format!("node_id = \"pg-node\"\n[storage]\n{storage}\n")).unwrap();
    f
}

/// `fhirsync import`, `serve` and a restart on PostgreSQL, over TLS with
/// the certificate verified; a wrong CA, a missing URL and another node
/// id are refused with one line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_import_on_postgres_over_verified_tls() {
    let tmp = tempfile::tempdir().unwrap();
    let certs = fhirsync_testkit::tls::TestCerts::generate(tmp.path()).unwrap();
    let pg = Postgres::start_tls(
        &certs.dir.join("server.pem"),
        &certs.dir.join("server-key.pem"),
    )
    .unwrap();
    let url = pg.create_db("node");
    let storage = |ca: &str| {
        format!(
            "backend = \"postgres\"\nurl = \"{url}\"\nsslmode = \"verify-full\"\nca_file = \"{}\"",
            certs.dir.join(ca).display()
        )
    };
    let cfg = config(tmp.path(), &storage("ca.pem"));
    let ndjson = tmp.path().join("patients.ndjson");
    let lines: Vec<String> = (0..50)
        .map(|i| format!(r#"{{"resourceType":"Patient","id":"p{i}","active":true}}"#))
        .collect();
    std::fs::write(&ndjson, lines.join("\n")).unwrap();
    let data = tmp.path().join("data");
    let out = std::process::Command::new(BIN)
        .args(["import", "--config"])
        .arg(&cfg)
        .arg("--data-dir")
        .arg(&data)
        .arg(&ndjson)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut node = fhirsync_testkit::NodeProcess::spawn(
        BIN.as_ref(),
        &data,
        &["--config", cfg.to_str().unwrap()],
    )
    .unwrap();
    let client = reqwest::Client::new();
    let total = |url: String| {
        let client = client.clone();
        async move {
            let r = client.get(url).send().await.unwrap();
            assert_eq!(r.status(), 200);
            r.json::<serde_json::Value>().await.unwrap()["total"].clone()
        }
    };
    assert_eq!(
        total(node.url("Patient?_total=accurate&_count=1")).await,
        50
    );
    let r = client
        .put(node.url("Patient/new"))
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","id":"new"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // The node's connections are encrypted.
    let ssl = pg.sql(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
         WHERE a.application_name = 'fhirsync' AND s.ssl",
    );
    assert!(ssl.trim().parse::<u32>().unwrap() >= 2, "{ssl}");
    node.terminate(Duration::from_secs(20)).unwrap();
    let node = fhirsync_testkit::NodeProcess::spawn(
        BIN.as_ref(),
        &data,
        &["--config", cfg.to_str().unwrap()],
    )
    .unwrap();
    assert_eq!(
        total(node.url("Patient?_total=accurate&_count=1")).await,
        51
    );
    drop(node);
    let refused = |storage: &str, extra: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), storage);
        let out = std::process::Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&cfg)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(extra)
            .args(["--listen", "127.0.0.1:0"])
            .env_remove("FHIRSYNC_DATABASE_URL")
            .output()
            .unwrap();
        assert!(!out.status.success());
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = refused(&storage("other-ca.pem"), &[]);
    assert!(e.contains("cannot connect"), "{e}");
    let e = refused("backend = \"postgres\"", &[]);
    assert!(e.contains("FHIRSYNC_DATABASE_URL"), "{e}");
    let e = refused(&storage("ca.pem"), &["--node-id", "someone-else"]);
    assert!(e.contains("belongs to node 'pg-node'"), "{e}");
    let e = refused(
        "backend = \"postgres\"\nurl = \"postgres://u@h/d\"\npool_max = 0",
        &[],
    );
    assert!(e.contains("pool_max"), "{e}");
}

/// Follows `$changes` of `base` from 0 with long-polls until `want`
/// versions are seen, asserting each page starts right after the last.
async fn follow(
    client: reqwest::Client,
    base: String,
    want: Arc<std::sync::atomic::AtomicU64>,
) -> Vec<u64> {
    let (mut since, mut seen) = (0u64, Vec::new());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let w = want.load(std::sync::atomic::Ordering::SeqCst);
        if w > 0 && since >= w {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "the feed of {base} stopped at {since}"
        );
        let r = client
            .get(format!("{base}/$changes?since={since}&_count=100&wait=2"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        let b: serde_json::Value = r.json().await.unwrap();
        for s in feed_seqs(&b) {
            assert_eq!(s, since + 1, "{base}: after {since} the feed gave {s}");
            since = s;
            seen.push(s);
        }
    }
}

/// Two node processes (here two servers in one test process, each with
/// its own store, writer, pool and listener) on one database: writers
/// hammer both at once while a consumer follows the feed on each; every
/// consumer sees every committed version once, in `seq` order, none
/// skipped. A long-poll on one wakes at the other's commit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_processes_on_one_database_share_a_gapless_log() {
    use fhirsync_testkit::server::Options;
    use fhirsync_testkit::InProcess;
    const TASKS: usize = 3;
    const ROUNDS: usize = 20;
    let pg = Postgres::start().unwrap();
    let url = pg.create_db("hq");
    let proc = || {
        InProcess::start_with(Options {
            node_id: Some("hq".into()),
            postgres: Some(url.clone()),
            ..Options::default()
        })
    };
    let (a, b) = (proc().await, proc().await);
    let want = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let consumers: Vec<_> = [&a, &b]
        .iter()
        .map(|n| tokio::spawn(follow(n.client.clone(), n.base.clone(), want.clone())))
        .collect();
    let mut writers = Vec::new();
    for (p, n) in [&a, &b].iter().enumerate() {
        for t in 0..TASKS {
            let (client, base) = (n.client.clone(), n.base.clone());
            writers.push(tokio::spawn(async move {
                for r in 0..ROUNDS {
                    let id = format!("p{p}t{t}r{r}");
                    let single = client
                        .put(format!("{base}/Patient/{id}"))
                        .header("content-type", "application/fhir+json")
                        .body(format!(r#"{{"resourceType":"Patient","id":"{id}"}}"#))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(single.status(), 201);
                    let entries: Vec<String> = (0..3)
                        .map(|k| {
                            format!(
                                r#"{{"resource":{{"resourceType":"Observation","id":"{id}-{k}","status":"final","code":{{"text":"x"}}}},"request":{{"method":"PUT","url":"Observation/{id}-{k}"}}}}"#
                            )
                        })
                        .collect();
                    let tx = client
                        .post(&base)
                        .header("content-type", "application/fhir+json")
                        .body(format!(
                            r#"{{"resourceType":"Bundle","type":"transaction","entry":[{}]}}"#,
                            entries.join(",")
                        ))
                        .send()
                        .await
                        .unwrap();
                    assert_eq!(tx.status(), 200);
                }
            }));
        }
    }
    for w in writers {
        w.await.unwrap();
    }
    let total = (2 * TASKS * ROUNDS * 4) as u64;
    want.store(total, std::sync::atomic::Ordering::SeqCst);
    let all: Vec<u64> = (1..=total).collect();
    for c in consumers {
        assert_eq!(c.await.unwrap(), all);
    }
    // A long-poll on b wakes at a's commit, well before its wait ends.
    let (client, base) = (b.client.clone(), b.base.clone());
    let poll = tokio::spawn(async move {
        let started = Instant::now();
        let r = client
            .get(format!("{base}/$changes?since={total}&wait=20"))
            .send()
            .await
            .unwrap();
        let b: serde_json::Value = r.json().await.unwrap();
        (started.elapsed(), feed_seqs(&b))
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = a
        .client
        .put(a.url("Patient/late"))
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","id":"late"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let (took, seqs) = poll.await.unwrap();
    assert_eq!(seqs, vec![total + 1]);
    assert!(took < Duration::from_secs(5), "woke after {took:?}");
    assert_eq!(b.store.last_seq(), total + 1);
}

/// Everything of a log that a peer relies on: seq, key, version, vector,
/// HLC, origin and body.
async fn log_of(s: &dyn fhirsync_store::Store) -> Vec<String> {
    let rows = s
        .changes(fhirsync_store::ChangesQuery {
            since: 0,
            count: 10_000,
            ..Default::default()
        })
        .await
        .unwrap();
    rows.iter()
        .map(|v| {
            format!(
                "{} {}/{}/{} {} {} {} {:?}",
                v.seq,
                v.rtype,
                v.id,
                v.vid,
                v.vv.to_json(),
                v.hlc.packed(),
                v.origin,
                v.body
            )
        })
        .collect()
}

/// A SQLite parent with a child, a pushed write, a conflict and an audit
/// trail moves to PostgreSQL: its log (seqs, vectors, HLCs), index,
/// cursors, conflicts, peers and audit come along; its child's cursor
/// still means the same; a second move into the same database is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrate_moves_a_node_with_its_sync_state() {
    use fhirsync_api::ChildConfig;
    use fhirsync_store::ListQuery;
    use fhirsync_testkit::server::Options;
    use fhirsync_testkit::InProcess;
    let child_cfg = ChildConfig {
        node_id: "c1".into(),
        token: "token-of-c1-0123456789".into(),
        pull: true,
        push: true,
        push_types: Vec::new(),
    };
    let parent = InProcess::start_with(Options {
        node_id: Some("hq".into()),
        children: vec![child_cfg.clone()],
        ..Options::default()
    })
    .await;
    let put = |s: &InProcess, path: &str, body: String| {
        s.client
            .put(s.url(path))
            .header("content-type", "application/fhir+json")
            .body(body)
            .send()
    };
    for i in 0..30 {
        let r = put(
            &parent,
            &format!("Patient/p{i}"),
            format!(r#"{{"resourceType":"Patient","id":"p{i}","gender":"female"}}"#),
        )
        .await
        .unwrap();
        assert_eq!(r.status(), 201);
    }
    let mut edge = fhirsync_replica::EdgeConfig::new(&parent.base, "token-of-c1-0123456789");
    edge.long_poll_s = 1;
    let child = InProcess::start_with(Options {
        node_id: Some("c1".into()),
        parent: Some(edge),
        ..Options::default()
    })
    .await;
    // The child edits what it pulled: wait for the pull, or the edit is a
    // create (201) racing it.
    common::eventually("the child pulled", 30, || async {
        child.store.last_seq() >= 30
    })
    .await;
    let r = put(
        &child,
        "Patient/p3",
        r#"{"resourceType":"Patient","id":"p3","gender":"male"}"#.into(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    let deadline = Instant::now() + Duration::from_secs(30);
    while parent.store.last_seq() < 31 || child.store.last_seq() < 31 {
        assert!(Instant::now() < deadline, "no convergence");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    drop(child);
    let before = (
        log_of(parent.store.as_ref()).await,
        parent.store.cursors().await.unwrap(),
        format!("{:?}", parent.store.peers().await.unwrap()),
        format!(
            "{:?}",
            parent.store.audit(ListQuery::default()).await.unwrap()
        ),
        parent.store.open_counts().await.unwrap(),
    );
    // The node stopped; its file moved.
    parent.store.shutdown();
    let saved = tempfile::tempdir().unwrap();
    let db = fhirsync_store::sqlite::SqliteStore::db_path(parent.dir.path());
    std::fs::copy(
        &db,
        fhirsync_store::sqlite::SqliteStore::db_path(saved.path()),
    )
    .unwrap();
    drop(parent);
    let pg = Postgres::start().unwrap();
    let url = pg.create_db("hq");
    let migrate = || {
        std::process::Command::new(BIN)
            .args(["migrate", "--from"])
            .arg(saved.path())
            .args(["--to", &url])
            .output()
            .unwrap()
    };
    let out = migrate();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("moved node 'hq' (31 versions)"));
    let moved = InProcess::start_with(Options {
        node_id: Some("hq".into()),
        children: vec![child_cfg],
        postgres: Some(url.clone()),
        ..Options::default()
    })
    .await;
    let after = (
        log_of(moved.store.as_ref()).await,
        moved.store.cursors().await.unwrap(),
        format!("{:?}", moved.store.peers().await.unwrap()),
        format!(
            "{:?}",
            moved.store.audit(ListQuery::default()).await.unwrap()
        ),
        moved.store.open_counts().await.unwrap(),
    );
    assert_eq!(before, after);
    assert_eq!(moved.store.last_seq(), 31);
    // The index came along; the log goes on after the moved one.
    let r = moved
        .client
        .get(moved.url("Patient?gender=male&_total=accurate"))
        .send()
        .await
        .unwrap();
    let b: serde_json::Value = r.json().await.unwrap();
    assert_eq!(b["total"], 1, "{b}");
    let r = put(
        &moved,
        "Patient/after",
        r#"{"resourceType":"Patient","id":"after"}"#.into(),
    )
    .await
    .unwrap();
    assert_eq!(r.status(), 201);
    // What the child's cursor (31) reads next is exactly the new version.
    let next = moved
        .client
        .get(moved.url("$changes?since=31"))
        .bearer_auth("token-of-c1-0123456789")
        .header("x-fhirsync-node", "c1")
        .send()
        .await
        .unwrap();
    let b: serde_json::Value = next.json().await.unwrap();
    assert_eq!(feed_seqs(&b), vec![32], "{b}");
    let last = log_of(moved.store.as_ref()).await;
    let stamp = |l: &str| l.split(' ').nth(3).unwrap().parse::<u64>().unwrap();
    assert!(stamp(&last[31]) > stamp(&last[30]), "the HLC went back");
    // A database with a node in it is refused.
    let out = migrate();
    assert!(!out.status.success());
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(e.contains("not empty"), "{e}");
}

/// Whether a node process runs the agents, from its `/admin/status`.
async fn holds_lease(client: &reqwest::Client, base: &str) -> Option<bool> {
    let r = client
        .get(base.replace("/fhir", "/admin/status"))
        .send()
        .await
        .ok()?;
    let v: serde_json::Value = r.json().await.ok()?;
    let lease = v["edges"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == "lease")?
        .clone();
    Some(lease["state"] == "holder")
}

/// A process's `/admin/status`: the processes on its database (pid, up,
/// lease holder) and the pid of the lease holder.
async fn processes(client: &reqwest::Client, base: &str) -> (Vec<(u32, bool, bool)>, Option<u32>) {
    let v: serde_json::Value = client
        .get(base.replace("/fhir", "/admin/status"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(v["storage"]["backend"], "postgres", "{v}");
    let db = v["storage"]["database"].as_str().unwrap();
    assert!(db.starts_with("postgres://") && db.ends_with("/hq"), "{v}");
    let list: Vec<(u32, bool, bool, String)> = v["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["pid"].as_u64().unwrap() as u32,
                p["up"] == true,
                p["leaseHolder"] == true,
                p["id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    let holder = v["leaseHolder"].as_str().map(|id| {
        list.iter()
            .find(|p| p.3 == id)
            .expect("the holder is listed")
            .0
    });
    (list.into_iter().map(|p| (p.0, p.1, p.2)).collect(), holder)
}

/// Two `fhirsync serve` processes of one child node on one database: only
/// the lease holder runs the parent edge; `/admin/status` of either lists
/// both and names the holder. Killed (SIGKILL) while the
/// parent streams 200 writes, the holder hands the lease to the other
/// within seconds, which pulls the rest: every write arrives, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_lease_holder_dies_mid_stream_and_the_other_takes_over() {
    use fhirsync_api::ChildConfig;
    use fhirsync_testkit::server::Options;
    use fhirsync_testkit::{InProcess, NodeProcess};
    const N: usize = 200;
    let parent = InProcess::start_with(Options {
        node_id: Some("district".into()),
        children: vec![ChildConfig {
            node_id: "hq".into(),
            token: "token-of-hq-0123456789".into(),
            pull: true,
            push: true,
            push_types: Vec::new(),
        }],
        ..Options::default()
    })
    .await;
    let pg = Postgres::start().unwrap();
    let url = pg.create_db("hq");
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("hq.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = \"hq\"\n[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\n\
             [parent]\nurl = \"{}\"\ntoken = \"token-of-hq-0123456789\"\nlong_poll_s = 1\nretry_delay_ms_max = 300\n\
             [console]\nlisten = \"off\"\n",
            parent.base
        ),
    )
    .unwrap();
    let spawn = |name: &str| {
        NodeProcess::spawn(
            BIN.as_ref(),
            &tmp.path().join(name),
            &["--config", cfg.to_str().unwrap()],
        )
        .unwrap()
    };
    let mut procs = [spawn("a"), spawn("b")];
    let client = reqwest::Client::new();
    // Exactly one holds the lease.
    let deadline = Instant::now() + Duration::from_secs(20);
    let holder = loop {
        let a = holds_lease(&client, &procs[0].base).await;
        let b = holds_lease(&client, &procs[1].base).await;
        match (a, b) {
            (Some(true), Some(false)) => break 0,
            (Some(false), Some(true)) => break 1,
            (Some(true), Some(true)) => panic!("both processes hold the lease"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "no process took the lease");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let pids = [procs[0].pid(), procs[1].pid()];
    let mut pids_sorted = pids;
    pids_sorted.sort();
    loop {
        let (list, lease) = processes(&client, &procs[1 - holder].base).await;
        let mut up: Vec<u32> = list.iter().filter(|p| p.1).map(|p| p.0).collect();
        up.sort();
        if up == pids_sorted && lease == Some(pids[holder]) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "status does not show both processes and the holder: {list:?} {lease:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let writer = {
        let (client, base) = (parent.client.clone(), parent.base.clone());
        tokio::spawn(async move {
            for i in 0..N {
                let r = client
                    .put(format!("{base}/Patient/p{i}"))
                    .header("content-type", "application/fhir+json")
                    .body(format!(r#"{{"resourceType":"Patient","id":"p{i}"}}"#))
                    .send()
                    .await
                    .unwrap();
                assert_eq!(r.status(), 201);
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    procs[holder].kill();
    let other = 1 - holder;
    let killed = Instant::now();
    while holds_lease(&client, &procs[other].base).await != Some(true) {
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "the survivor did not take the lease"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = killed.elapsed();
    writer.await.unwrap();
    let total = |c: reqwest::Client, base: String| async move {
        let r = c
            .get(format!("{base}/$changes?since=0&_count=1000"))
            .send()
            .await
            .unwrap();
        let b: serde_json::Value = r.json().await.unwrap();
        feed_seqs(&b).len()
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while total(client.clone(), procs[other].base.clone()).await < N {
        assert!(
            Instant::now() < deadline,
            "the survivor did not pull everything"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Each write once: no version stored twice.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(total(client.clone(), procs[other].base.clone()).await, N);
    assert!(took < Duration::from_secs(5), "takeover took {took:?}");
    // The status shows the dead process down (no heartbeat for
    // PROCESS_STALE_MS) and the survivor holding.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (list, lease) = processes(&client, &procs[other].base).await;
        if lease == Some(pids[other]) && list.contains(&(pids[holder], false, false)) {
            break;
        }
        assert!(Instant::now() < deadline, "{list:?} {lease:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bin: &std::path::Path = BIN.as_ref();
    let out = std::process::Command::new(bin)
        .args(["status", "--url", &procs[other].base])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("storage postgres postgres://"), "{text}");
    assert!(
        text.contains(&format!("pid {} at", pids[other]))
            && text.contains("up, lease holder: runs the agents, answered this")
            && text.contains(&format!("pid {} at", pids[holder]))
            && text.contains(": down"),
        "{text}"
    );
}

/// A database whose index was built by an older extraction (here: its
/// `strings` rows gone and no index version recorded) is reindexed in the
/// background by the next process that opens it; the node keeps taking
/// writes meanwhile, and afterwards search finds everything again and the
/// index version is recorded.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outdated_index_is_rebuilt_in_the_background_on_open() {
    use fhirsync_store::postgres::{PgNode, PgStore};
    use fhirsync_testkit::server::Options;
    use fhirsync_testkit::InProcess;
    const N: usize = 1_200;
    let pg = Postgres::start().unwrap();
    let url = pg.create_db("ri");
    let node = InProcess::start_with(Options {
        postgres: Some(url.clone()),
        ..Options::default()
    })
    .await;
    let entries: Vec<serde_json::Value> = (0..N)
        .map(|i| {
            serde_json::json!({"resource": {"resourceType": "Patient", "id": format!("p{i}"),
                "name": [{"family": "Reindexed"}]},
             "request": {"method": "PUT", "url": format!("Patient/p{i}")}})
        })
        .collect();
    let r = node
        .client
        .post(&node.base)
        .header("content-type", "application/fhir+json")
        .body(
            serde_json::json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
                .to_string(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let count = |node: &InProcess| {
        let (c, u) = (
            node.client.clone(),
            node.url("Patient?family=reindexed&_summary=count"),
        );
        async move {
            let v: serde_json::Value = c.get(u).send().await.unwrap().json().await.unwrap();
            v["total"].as_u64().unwrap()
        }
    };
    assert_eq!(count(&node).await, N as u64);
    let cfg = PgConfig::new(url.clone());
    // (the blocking client, off the async workers)
    let index_version = |cfg: &PgConfig| {
        tokio::task::block_in_place(|| {
            let mut c = connect(cfg).unwrap();
            c.query_opt(
                "SELECT value FROM node_info WHERE key = 'index_version'",
                &[],
            )
            .unwrap()
            .map(|r| r.get::<_, String>(0))
        })
    };
    // a new database records its index version at once
    assert_eq!(index_version(&cfg).as_deref(), Some("1"));
    tokio::task::block_in_place(|| {
        connect(&cfg)
            .unwrap()
            .batch_execute("DELETE FROM strings; DELETE FROM node_info WHERE key = 'index_version'")
            .unwrap()
    });
    assert_eq!(count(&node).await, 0);
    let c2 = cfg.clone();
    let second = tokio::task::spawn_blocking(move || {
        PgStore::open(
            c2,
            PgNode {
                node_id: None,
                group_commit_max: 64,
                write_queue_max: 64,
            },
        )
        .unwrap()
    })
    .await
    .unwrap();
    use fhirsync_store::Store;
    assert!(second.reindex_status().running || second.reindex_status().done == N as u64);
    // writes go on while it runs
    let r = node
        .client
        .put(node.url("Patient/late"))
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","id":"late","name":[{"family":"Reindexed"}]}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    common::eventually("the reindex is done", 60, || async {
        !second.reindex_status().running
    })
    .await;
    assert_eq!(count(&node).await, N as u64 + 1);
    assert_eq!(index_version(&cfg).as_deref(), Some("1"));
    tokio::task::spawn_blocking(move || second.shutdown())
        .await
        .unwrap();
}
