//! Database sync from the binlog, end to end: `fhirsync db-sender` and
//! `fhirsync db-receiver` as processes against a real MariaDB (site
//! databases and the central one on one server, each sender following its
//! own database): a snapshot then inserts, updates, deletes and a
//! transaction across tables arrive with parents mapped by uuid; a sender
//! and a receiver killed mid-stream lose and repeat nothing; two sites in
//! other time zones (one over HTTPS, one over NATS); a conflict is queued,
//! holds its row, and is resolved in the console; bad states are refused.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::web::{field, Web};
use fhirsync_api::console::db::DbReceiverLink;
use fhirsync_api::console::{users, ConsoleConfig, Role};
use fhirsync_testkit::free_port;
use fhirsync_testkit::mariadb::{available, MariaDb};
use fhirsync_testkit::nats::NatsServer;
use fhirsync_testkit::server::Options;
use fhirsync_testkit::InProcess;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_fhirsync");

fn schema(db: &str) -> String {
    format!(
        "CREATE DATABASE {db};
CREATE TABLE {db}.person (id INT PRIMARY KEY AUTO_INCREMENT, uuid CHAR(36) NOT NULL UNIQUE,
  name VARCHAR(50), birthdate DATE, visit_time TIME, created DATETIME(3),
  n INT NOT NULL DEFAULT 0, date_changed DATETIME NULL);
CREATE TABLE {db}.obs (id INT PRIMARY KEY AUTO_INCREMENT, uuid CHAR(36) NOT NULL UNIQUE,
  person_id INT NOT NULL, value VARCHAR(20), FOREIGN KEY (person_id) REFERENCES {db}.person(id));
CREATE TABLE {db}.location (code VARCHAR(10) PRIMARY KEY, label VARCHAR(40));"
    )
}

/// Logs of the processes a test started, shown when it fails.
static LOGS: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

fn log_file(path: PathBuf) -> std::fs::File {
    LOGS.lock().unwrap().push(path.clone());
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap()
}

fn logs() -> String {
    LOGS.lock()
        .unwrap()
        .iter()
        .map(|p| {
            format!(
                "--- {}\n{}",
                p.display(),
                std::fs::read_to_string(p).unwrap_or_default()
            )
        })
        .collect()
}

/// A child process killed on drop.
struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Central {
    /// Dropped first: the process goes before its directory.
    proc: Option<Proc>,
    dir: tempfile::TempDir,
    config: PathBuf,
    url: String,
    port: u16,
    /// The CA of its certificate, when it serves HTTPS.
    ca: Option<PathBuf>,
}

const ADMIN: &str = "admin-secret";

/// `fhirsync COMMAND --config CONFIG ARGS...`, run to its end.
fn db_cmd(command: &str, config: &Path, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args([command, "--config"])
        .arg(config)
        .args(args)
        .output()
        .unwrap()
}

/// `fhirsync db-receiver --config CONFIG ARGS...`, run to its end.
fn receiver_cmd(config: &Path, args: &[&str]) -> std::process::Output {
    db_cmd("db-receiver", config, args)
}

/// A token printed by a `site` command, which must succeed.
fn site_token(config: &Path, args: &[&str]) -> String {
    let out = receiver_cmd(config, args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string()
}

fn write(path: &Path, text: &str) -> PathBuf {
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// Starts a receiver into database `central` (HTTP, and NATS if given)
/// with the given sites registered; answers their tokens.
fn receiver(
    db: &MariaDb,
    nats: Option<&NatsServer>,
    certs: Option<&Path>,
    sites: &[&str],
) -> (Central, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut text = format!(
        "target = \"{}\"\ndatabase = \"central\"\ntime_zone = \"UTC\"\nlisten = \"127.0.0.1:{port}\"\nadmin_token = \"{ADMIN}\"\n",
        db.url
    );
    if let Some(c) = certs {
        text.push_str(&format!(
            "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
            c.join("server.pem").display(),
            c.join("server-key.pem").display()
        ));
    }
    if let Some(n) = nats {
        text.push_str(&format!("[nats]\nservers = [\"{}\"]\n", n.url()));
    }
    let config = write(&dir.path().join("receiver.toml"), &text);
    let tokens = sites
        .iter()
        .map(|s| site_token(&config, &["site", "add", s]))
        .collect();
    let scheme = if certs.is_some() { "https" } else { "http" };
    let mut c = Central {
        proc: None,
        dir,
        config,
        url: format!("{scheme}://127.0.0.1:{port}"),
        port,
        ca: certs.map(|c| c.join("ca.pem")),
    };
    c.start();
    (c, tokens)
}

impl Central {
    /// Starts the receiver process (again) and waits until it listens.
    fn start(&mut self) {
        self.proc = Some(Proc(
            Command::new(BIN)
                .args(["db-receiver", "--config"])
                .arg(&self.config)
                .stdout(Stdio::null())
                .stderr(log_file(self.dir.path().join("receiver.log")))
                .spawn()
                .unwrap(),
        ));
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "the receiver did not listen");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

struct Site {
    config: PathBuf,
    _dir: tempfile::TempDir,
}

fn site(db: &MariaDb, name: &str, database: &str, zone: &str, link: &str, snapshot: bool) -> Site {
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "site = \"{name}\"\nsource = \"{}\"\ndatabase = \"{database}\"\ntime_zone = \"{zone}\"\nstate_dir = \"{}\"\nsnapshot = {snapshot}\nserver_id = {}\nbatch_rows = 200\nlinger_ms = 20\n{link}",
        db.url,
        dir.path().join("state").display(),
        7000 + free_port() as u32 % 1000,
    );
    Site {
        config: write(&dir.path().join("sender.toml"), &text),
        _dir: dir,
    }
}

fn start_sender(s: &Site) -> Proc {
    Proc(
        Command::new(BIN)
            .args(["db-sender", "--config"])
            .arg(&s.config)
            .stdout(Stdio::null())
            .stderr(log_file(s.config.with_file_name("sender.log")))
            .spawn()
            .unwrap(),
    )
}

fn http_link(c: &Central, token: &str) -> String {
    format!("[http]\nurl = \"{}\"\ntoken = \"{token}\"\n", c.url)
}

/// Waits until `sql` at the server prints `want`.
fn wait_for(db: &MariaDb, sql: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = db.sql(sql);
        if got.trim() == want.trim() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{sql}: waited for {want:?}, have {got:?}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A client that trusts the receiver's certificate.
fn client(c: &Central) -> reqwest::Client {
    let mut b = reqwest::Client::builder();
    if let Some(ca) = &c.ca {
        b = b.add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap(),
        );
    }
    b.build().unwrap()
}

async fn admin_get(c: &Central, path: &str) -> Value {
    client(c)
        .get(format!("{}{path}", c.url))
        .bearer_auth(ADMIN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

async fn post_batch(c: &Central, token: &str, batch: &Value) -> reqwest::Response {
    client(c)
        .post(format!("{}/db/batches", c.url))
        .bearer_auth(token)
        .json(batch)
        .send()
        .await
        .unwrap()
}

/// A MariaDB with `site_a` and `central` (after `before` ran), a receiver
/// with site-a registered, and site-a's sender set up (not started).
fn one_site(before: &str, snapshot: bool) -> (MariaDb, Central, String, Site) {
    need_mariadb();
    let db = MariaDb::start().unwrap();
    db.sql(&(schema("site_a") + &schema("central") + before));
    let (central, mut tokens) = receiver(&db, None, None, &["site-a"]);
    let token = tokens.remove(0);
    let a = site(
        &db,
        "site-a",
        "site_a",
        "UTC",
        &http_link(&central, &token),
        snapshot,
    );
    (db, central, token, a)
}

/// A node whose console links the receiver, and a browser signed in to
/// it as a user of `role`.
async fn linked_console(central: &Central, role: Role) -> (InProcess, Web) {
    let users_file = central.dir.path().join("console-users");
    users::add(&users_file, "amina", role, "kisumu-district-2026").unwrap();
    let mut cfg = ConsoleConfig::new(users_file);
    cfg.db_receiver = Some(DbReceiverLink {
        url: central.url.clone(),
        admin_token: ADMIN.into(),
    });
    let node = InProcess::start_with(Options {
        console: Some(cfg),
        ..Options::default()
    })
    .await;
    let mut w = Web::new(node.console.as_deref().unwrap());
    assert_eq!(w.login("amina", "kisumu-district-2026").await.status, 303);
    (node, w)
}

fn need_mariadb() {
    assert!(
        available(),
        "MariaDB is needed (Debian package mariadb-server)"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn snapshot_then_changes_arrive_with_parents_mapped_and_twice_is_once() {
    // Central ids differ from the site's: a row of its own first. Rows
    // before the sender's first run come with the snapshot.
    let (db, central, token, a) = one_site(
        "INSERT INTO central.person (uuid, name) VALUES ('c-0', 'Central only');
         INSERT INTO site_a.person (uuid, name, birthdate, created) VALUES
           ('p-1', 'Amina', '1980-02-01', '2026-01-02 03:04:05.678'), ('p-2', 'Otieno', NULL, NULL);
         INSERT INTO site_a.obs (uuid, person_id, value) VALUES ('o-1', 2, 'before');
         INSERT INTO site_a.location VALUES ('K1', 'Kisumu');",
        true,
    );
    let _sender = start_sender(&a);
    wait_for(&db, "SELECT COUNT(*) FROM central.person", "3");
    let obs_parent = "SELECT p.uuid FROM central.obs o JOIN central.person p ON p.id = o.person_id WHERE o.uuid = 'o-1'";
    wait_for(&db, obs_parent, "p-2");

    db.sql("UPDATE site_a.person SET name = 'Amina O.' WHERE uuid = 'p-1'");
    db.sql(
        "START TRANSACTION;
           INSERT INTO site_a.person (uuid, name) VALUES ('p-3', 'Wanjiru');
           INSERT INTO site_a.obs (uuid, person_id, value) VALUES ('o-2', LAST_INSERT_ID(), 'positive');
           UPDATE site_a.location SET label = 'Kisumu East' WHERE code = 'K1';
         COMMIT;",
    );
    db.sql("DELETE FROM site_a.obs WHERE uuid = 'o-1'");
    db.sql("INSERT INTO site_a.location VALUES ('N1', 'Nairobi')");
    wait_for(&db, "SELECT COUNT(*) FROM central.location", "2");
    let rows = db.sql(
        "SELECT p.uuid, p.name, IFNULL(p.birthdate, '-'), IFNULL(p.created, '-') FROM central.person p ORDER BY p.uuid",
    );
    assert_eq!(
        rows,
        "c-0\tCentral only\t-\t-\np-1\tAmina O.\t1980-02-01\t2026-01-02 03:04:05.678\np-2\tOtieno\t-\t-\np-3\tWanjiru\t-\t-\n"
    );
    let obs = db.sql(
        "SELECT o.uuid, p.uuid, o.value FROM central.obs o JOIN central.person p ON p.id = o.person_id ORDER BY o.uuid",
    );
    assert_eq!(obs, "o-2\tp-3\tpositive\n");
    assert_eq!(
        db.sql("SELECT label FROM central.location WHERE code = 'K1'"),
        "Kisumu East\n"
    );
    // The site's ids were not copied: p-3 has another id here.
    assert_ne!(
        db.sql("SELECT id FROM central.person WHERE uuid = 'p-3'"),
        db.sql("SELECT id FROM site_a.person WHERE uuid = 'p-3'")
    );

    let sites = admin_get(&central, "/db/sites").await;
    let s = &sites[0];
    assert_eq!(s["site"], "site-a");
    // 4 snapshot rows, then 1 + 3 + 1 + 1 changes.
    assert_eq!(s["records"], 10, "{s}");
    assert!(s["last_received_at"].as_str().unwrap().ends_with('Z'));
    let position = s["position"].as_str().unwrap().to_string();

    // A batch delivered again (a sender that died before saving its
    // cursor) is applied once.
    let again = serde_json::json!({
        "site": "site-a", "time_zone": "UTC", "end": position,
        "changes": [{"table": "location", "op": "u", "key": "N1", "row": {"code": "N1", "label": "stale"}}]
    });
    let r: Value = post_batch(&central, &token, &again)
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(r["duplicate"], true, "{r}");
    assert_eq!(
        db.sql("SELECT label FROM central.location WHERE code = 'N1'"),
        "Nairobi\n"
    );
    // A wrong token and a batch for a table the receiver lacks change
    // nothing and say why.
    let r = post_batch(&central, "nope", &again).await;
    assert_eq!(r.status(), 401);
    let bad = serde_json::json!({
        "site": "site-a", "time_zone": "UTC", "end": "binlog.999999:4",
        "changes": [{"table": "nothing", "op": "c", "key": "1", "row": {"id": 1}}]
    });
    let r = post_batch(&central, &token, &bad).await;
    assert_eq!(r.status(), 422);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["resourceType"], "OperationOutcome");
    let sites = admin_get(&central, "/db/sites").await;
    assert_eq!(sites[0]["position"], position.as_str());

    // The status command says the same.
    let out = receiver_cmd(&central.config, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("site-a") && text.contains(&position),
        "{text}"
    );

    // A new token: the old one is refused at once, the new one works.
    let new = site_token(&central.config, &["site", "rotate", "site-a"]);
    assert_eq!(post_batch(&central, &token, &again).await.status(), 401);
    assert_eq!(post_batch(&central, &new, &again).await.status(), 200);
    // A removed site's token opens nothing; removing it twice says so.
    let remove = || receiver_cmd(&central.config, &["site", "remove", "site-a"]);
    assert!(remove().status.success());
    assert_eq!(post_batch(&central, &new, &again).await.status(), 401);
    let twice = remove();
    assert!(!twice.status.success());
    assert!(String::from_utf8_lossy(&twice.stderr).contains("not registered"));
}

#[tokio::test(flavor = "multi_thread")]
async fn sender_and_receiver_killed_mid_stream_lose_and_repeat_nothing() {
    let (db, mut central, _, a) = one_site("", false);
    let mut sender = start_sender(&a);
    // Give the first run time to take its starting position.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !a.config.parent().unwrap().join("state/cursor").exists() {
        assert!(Instant::now() < deadline, "no cursor file");
        std::thread::sleep(Duration::from_millis(50));
    }
    // 300 transactions of 10 inserts and 5 updates, written while the
    // sender is killed again and again.
    let url = db.url.clone();
    let writer = tokio::spawn(async move {
        use mysql_async::prelude::Queryable;
        let mut c = mysql_async::Conn::from_url(url.as_str()).await.unwrap();
        for t in 0..300 {
            let mut tx = c.start_transaction(Default::default()).await.unwrap();
            for i in 0..10 {
                tx.exec_drop(
                    "INSERT INTO site_a.person (uuid, name) VALUES (?, ?)",
                    (format!("p-{t}-{i}"), format!("name {t} {i}")),
                )
                .await
                .unwrap();
            }
            tx.exec_drop(
                "UPDATE site_a.person SET n = n + 1 WHERE uuid LIKE ? AND name LIKE '% 1' OR uuid LIKE ? AND name LIKE '% 2'
                   OR uuid LIKE ? AND name LIKE '% 3' OR uuid LIKE ? AND name LIKE '% 4' OR uuid LIKE ? AND name LIKE '% 5'",
                vec![format!("p-{t}-%"); 5],
            )
            .await
            .unwrap();
            tx.commit().await.unwrap();
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    });
    for round in 0..6 {
        tokio::time::sleep(Duration::from_millis(300 + 170 * round)).await;
        // SIGKILL: no chance to save anything.
        sender.0.kill().unwrap();
        sender.0.wait().unwrap();
        sender = start_sender(&a);
        // Every other round the receiver dies too, with batches in flight.
        if round % 2 == 1 {
            central.proc = None;
            tokio::time::sleep(Duration::from_millis(100)).await;
            central.start();
        }
    }
    writer.await.unwrap();
    wait_for(
        &db,
        "SELECT COUNT(*), SUM(n) FROM central.person",
        "3000\t1500",
    );
    assert_eq!(
        db.sql("SELECT MD5(GROUP_CONCAT(uuid, name, n ORDER BY uuid)) FROM central.person"),
        db.sql("SELECT MD5(GROUP_CONCAT(uuid, name, n ORDER BY uuid)) FROM site_a.person")
    );
    // Each row change was applied exactly once: batches sent again after
    // a kill were recognised as such.
    let sites = admin_get(&central, "/db/sites").await;
    assert_eq!(sites[0]["records"], 3000 + 1500, "{}", sites[0]);
    drop(sender);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_sites_in_other_time_zones_one_over_nats() {
    need_mariadb();
    let db = MariaDb::start().unwrap();
    let nats = NatsServer::start().unwrap();
    db.sql(&(schema("site_a") + &schema("site_b") + &schema("central")));
    // The HTTP site reaches the receiver over HTTPS.
    let certs = tempfile::tempdir().unwrap();
    fhirsync_testkit::tls::TestCerts::generate(certs.path()).unwrap();
    let (central, tokens) = receiver(
        &db,
        Some(&nats),
        Some(certs.path()),
        &["nairobi", "newyork"],
    );
    assert!(central.url.starts_with("https://"));
    let https = format!(
        "{}ca_file = \"{}\"\n",
        http_link(&central, &tokens[0]),
        certs.path().join("ca.pem").display()
    );
    let a = site(&db, "nairobi", "site_a", "Africa/Nairobi", &https, true);
    let b = site(
        &db,
        "newyork",
        "site_b",
        "America/New_York",
        &format!("[nats]\nservers = [\"{}\"]\n", nats.url()),
        true,
    );
    let _sa = start_sender(&a);
    let _sb = start_sender(&b);
    for (d, u) in [("site_a", "a-1"), ("site_b", "b-1")] {
        db.sql(&format!(
            "INSERT INTO {d}.person (uuid, birthdate, visit_time, created, date_changed)
               VALUES ('{u}', '1990-05-05', '08:30:00', '2026-03-01 12:00:00.250', '2026-07-01 12:00:00')"
        ));
    }
    wait_for(&db, "SELECT COUNT(*) FROM central.person", "2");
    assert_eq!(
        db.sql("SELECT uuid, birthdate, visit_time, created, date_changed FROM central.person ORDER BY uuid"),
        "a-1\t1990-05-05\t08:30:00\t2026-03-01 09:00:00.250\t2026-07-01 09:00:00\n\
         b-1\t1990-05-05\t08:30:00\t2026-03-01 17:00:00.250\t2026-07-01 16:00:00\n"
    );
    let sites = admin_get(&central, "/db/sites").await;
    assert_eq!(sites[1]["site"], "newyork");
    assert_eq!(sites[1]["records"], 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conflict_is_queued_holds_its_row_and_is_resolved() {
    let (db, central, _, a) = one_site("", true);
    let _sender = start_sender(&a);
    db.sql(
        "INSERT INTO site_a.person (uuid, name, date_changed) VALUES
           ('p-1', 'Amina', '2026-01-01 10:00:00'), ('p-2', 'Otieno', '2026-01-01 10:00:00')",
    );
    wait_for(&db, "SELECT COUNT(*) FROM central.person", "2");
    // Edited here after the sync.
    db.sql("UPDATE central.person SET name = 'Amina (central)', date_changed = '2026-05-01 10:00:00' WHERE uuid IN ('p-1', 'p-2')");
    // An older edit at the site: a conflict. A newer one: applied.
    db.sql("UPDATE site_a.person SET name = 'Amina (site)', date_changed = '2026-04-01 10:00:00' WHERE uuid = 'p-1'");
    db.sql("UPDATE site_a.person SET name = 'Otieno (site)', date_changed = '2026-06-01 10:00:00' WHERE uuid = 'p-2'");
    wait_for(
        &db,
        "SELECT name FROM central.person WHERE uuid = 'p-2'",
        "Otieno (site)",
    );
    let open = admin_get(&central, "/db/conflicts").await;
    assert_eq!(open.as_array().unwrap().len(), 1, "{open}");
    let c = &open[0];
    assert_eq!(
        (c["table"].as_str(), c["key"].as_str()),
        (Some("person"), Some("p-1"))
    );
    assert_eq!(c["incoming"]["change"]["row"]["name"], "Amina (site)");
    assert_eq!(c["local"]["name"], "Amina (central)");
    // The row is held: later changes wait in the queue, even newer ones.
    db.sql("UPDATE site_a.person SET name = 'Amina (site 2)', date_changed = '2026-07-01 10:00:00' WHERE uuid = 'p-1'");
    db.sql("INSERT INTO site_a.person (uuid, name) VALUES ('p-3', 'marker')");
    wait_for(&db, "SELECT COUNT(*) FROM central.person", "3");
    assert_eq!(
        db.sql("SELECT name FROM central.person WHERE uuid = 'p-1'"),
        "Amina (central)\n"
    );
    let open = admin_get(&central, "/db/conflicts").await;
    assert_eq!(open[0]["held"], 2);
    assert_eq!(
        open[0]["incoming"]["change"]["row"]["name"],
        "Amina (site 2)"
    );
    let sites = admin_get(&central, "/db/sites").await;
    assert_eq!(sites[0]["open_conflicts"], 1);

    // Resolving needs the admin token.
    let id = open[0]["id"].as_i64().unwrap();
    let client = reqwest::Client::new();
    let url = format!("{}/db/conflicts/{id}/resolve?keep=incoming", central.url);
    let r = client.post(&url).bearer_auth("wrong").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(
        db.sql("SELECT name FROM central.person WHERE uuid = 'p-1'"),
        "Amina (central)\n"
    );

    // The console of a node linked to the receiver shows the site and the
    // conflict with both versions; an admin takes the incoming one there.
    let (_node, mut w) = linked_console(&central, Role::Admin).await;
    let p = w.get("/db").await;
    assert!(
        p.body.contains("site-a") && p.body.contains(&format!("href=\"/db/conflicts/{id}\"")),
        "{}",
        p.body
    );
    let p = w.get(&format!("/db/conflicts/{id}")).await;
    assert_eq!(p.status, 200);
    assert!(
        p.body.contains("Amina (site 2)") && p.body.contains("Amina (central)"),
        "{}",
        p.body
    );
    assert!(p.body.contains("<span id=\"changed\">"), "{}", p.body);
    let csrf = field(&p.body, "csrf");
    // Without the CSRF token nothing happens.
    let r = w
        .post(
            &format!("/db/conflicts/{id}/resolve"),
            &[("keep", "incoming")],
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(
        db.sql("SELECT name FROM central.person WHERE uuid = 'p-1'"),
        "Amina (central)\n"
    );
    let r = w
        .post(
            &format!("/db/conflicts/{id}/resolve"),
            &[("csrf", &csrf), ("keep", "incoming")],
        )
        .await;
    assert_eq!(r.status, 303, "{}", r.body);
    // The latest incoming version is written and the row syncs again.
    assert_eq!(
        db.sql("SELECT name FROM central.person WHERE uuid = 'p-1'"),
        "Amina (site 2)\n"
    );
    assert!(w
        .get(&format!("/db/conflicts/{id}"))
        .await
        .body
        .contains("resolved: kept incoming"));
    assert_eq!(
        admin_get(&central, "/db/conflicts")
            .await
            .as_array()
            .unwrap()
            .len(),
        0
    );
    db.sql("UPDATE site_a.person SET name = 'Amina (site 3)', date_changed = '2026-08-01 10:00:00' WHERE uuid = 'p-1'");
    wait_for(
        &db,
        "SELECT name FROM central.person WHERE uuid = 'p-1'",
        "Amina (site 3)",
    );
    let all = admin_get(&central, "/db/conflicts?all=true").await;
    assert_eq!(all[0]["resolution"], "incoming");
}

#[test]
fn bad_states_are_refused_with_their_way_out() {
    need_mariadb();
    let db = MariaDb::start_with(&["--binlog-format=STATEMENT"]).unwrap();
    db.sql(&schema("site_a"));
    let a = site(
        &db,
        "site-a",
        "site_a",
        "UTC",
        "[http]\nurl = \"http://127.0.0.1:9\"\ntoken = \"t\"\n",
        false,
    );
    let out = Command::new(BIN)
        .args(["db-sender", "--config"])
        .arg(&a.config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("binlog_format is STATEMENT, not ROW"), "{err}");
    assert!(!a.config.parent().unwrap().join("state/cursor").exists());
    // A receiver on the network without TLS would carry tokens and rows
    // in clear: it refuses to start.
    db.sql(&schema("central"));
    let dir = tempfile::tempdir().unwrap();
    let config = write(
        &dir.path().join("receiver.toml"),
        &format!(
            "target = \"{}\"\ndatabase = \"central\"\nlisten = \"0.0.0.0:{}\"\n",
            db.url,
            free_port()
        ),
    );
    let out = receiver_cmd(&config, &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("is not a loopback address") && err.contains("tls_cert_file"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_conflict_shows_both_rows_in_the_receivers_zone_with_the_same_types() {
    need_mariadb();
    let db = MariaDb::start().unwrap();
    db.sql(&(schema("site_a") + &schema("central")));
    let (central, mut tokens) = receiver(&db, None, None, &["site-a"]);
    let a = site(
        &db,
        "site-a",
        "site_a",
        "Africa/Nairobi",
        &http_link(&central, &tokens.remove(0)),
        true,
    );
    let _sender = start_sender(&a);
    db.sql(
        "INSERT INTO site_a.person (uuid, name, birthdate, visit_time, created, n, date_changed) VALUES
           ('p-1', 'Amina', '1980-02-01', '08:30:00', '2026-01-01 12:00:00.000', 0, '2026-01-01 12:00:00')",
    );
    wait_for(
        &db,
        "SELECT created FROM central.person WHERE uuid = 'p-1'",
        "2026-01-01 09:00:00.000",
    );
    db.sql("UPDATE central.person SET name = 'Amina (central)', date_changed = '2026-05-01 10:00:00' WHERE uuid = 'p-1'");
    db.sql("UPDATE site_a.person SET name = 'Amina (site)', date_changed = '2026-04-01 10:00:00' WHERE uuid = 'p-1'");
    let deadline = Instant::now() + Duration::from_secs(60);
    let open = loop {
        let open = admin_get(&central, "/db/conflicts").await;
        if !open.as_array().unwrap().is_empty() {
            break open;
        }
        assert!(Instant::now() < deadline, "no conflict\n{}", logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let c = &open[0];
    assert_eq!(c["time_zone"], "UTC", "{c}");
    assert_eq!(c["incoming"]["site_time_zone"], "Africa/Nairobi", "{c}");
    let (inc, loc) = (&c["incoming"]["change"]["row"], &c["local"]);
    // The same instant, number and date on both sides, in the same form.
    for col in ["created", "n", "birthdate", "visit_time", "uuid"] {
        assert_eq!(inc[col], loc[col], "{col}: {c}");
    }
    assert_eq!(inc["created"], "2026-01-01 09:00:00", "{c}");
    assert_eq!(inc["n"], 0, "{c}");
    assert_eq!(inc["date_changed"], "2026-04-01 07:00:00", "{c}");
    assert_eq!(loc["date_changed"], "2026-05-01 10:00:00", "{c}");
    assert!(inc.get("id").is_none() && loc.get("id").is_none(), "{c}");
    // The console's diff marks only what differs: the name and the change time.
    let id = c["id"].as_i64().unwrap();
    let (_node, mut w) = linked_console(&central, Role::Viewer).await;
    let p = w.get(&format!("/db/conflicts/{id}")).await;
    assert!(
        p.body.contains("<span id=\"changed\">2</span>"),
        "{}",
        p.body
    );
    assert!(p.body.contains("receiver's time zone, UTC"), "{}", p.body);
    // The command line says which zone it shows.
    let out = receiver_cmd(&central.config, &["conflicts"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("times in UTC") && text.contains("2026-01-01 09:00:00"),
        "{text}"
    );
}

/// `fhirsync db-sender --config CONFIG status --json`.
fn sender_status(s: &Site) -> Value {
    let out = db_cmd("db-sender", &s.config, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_batch_is_kept_and_retried_until_the_receiver_can_take_it() {
    need_mariadb();
    let db = MariaDb::start().unwrap();
    db.sql(&(schema("site_a") + &schema("central")));
    db.sql("CREATE TABLE site_a.visit (id INT PRIMARY KEY AUTO_INCREMENT, uuid CHAR(36) NOT NULL UNIQUE, note VARCHAR(40))");
    let (central, mut tokens) = receiver(&db, None, None, &["site-a"]);
    let status_port = free_port();
    let a = site(
        &db,
        "site-a",
        "site_a",
        "UTC",
        &format!(
            "retry_delay_ms_max = 300\nstatus_listen = \"127.0.0.1:{status_port}\"\n{}",
            http_link(&central, &tokens.remove(0))
        ),
        true,
    );
    let mut sender = start_sender(&a);
    db.sql("INSERT INTO site_a.person (uuid, name) VALUES ('p-0', 'before')");
    wait_for(&db, "SELECT COUNT(*) FROM central.person", "1");
    // The central database has no table visit: the receiver refuses.
    db.sql("INSERT INTO site_a.visit (uuid, note) VALUES ('v-1', 'first visit')");
    db.sql("INSERT INTO site_a.person (uuid, name) VALUES ('p-1', 'after')");
    let deadline = Instant::now() + Duration::from_secs(30);
    let st = loop {
        let st = sender_status(&a);
        if st["state"] == "refused" && st["attempts"].as_u64() >= Some(3) {
            break st;
        }
        assert!(Instant::now() < deadline, "never refused: {st}\n{}", logs());
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        st["lastError"]
            .as_str()
            .unwrap()
            .contains("table visit is not in the receiver's database central"),
        "{st}"
    );
    // Still running, the cursor still before the refused batch, and the
    // change behind it waits its turn.
    assert!(
        sender.0.try_wait().unwrap().is_none(),
        "the sender exited\n{}",
        logs()
    );
    let cursor_file = a.config.parent().unwrap().join("state/cursor");
    let cursor = std::fs::read_to_string(&cursor_file).unwrap();
    assert_eq!(st["position"].as_str().unwrap(), cursor.trim(), "{st}");
    let m = reqwest::get(format!("http://127.0.0.1:{status_port}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        m.contains("fhirsync_db_sender_failing{site=\"site-a\"} 1"),
        "{m}"
    );
    let refused: u64 = m
        .lines()
        .find(|l| l.starts_with("fhirsync_db_sender_refused_total"))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    assert!(refused >= 3, "{m}");
    let sites = admin_get(&central, "/db/sites").await;
    assert!(
        sites[0]["last_error"]
            .as_str()
            .unwrap_or("")
            .contains("table visit"),
        "{sites}"
    );
    assert_eq!(db.sql("SELECT COUNT(*) FROM central.person").trim(), "1");
    assert_eq!(std::fs::read_to_string(&cursor_file).unwrap(), cursor);
    // Fixed at the centre: the batch goes through, in order.
    db.sql("CREATE TABLE central.visit (id INT PRIMARY KEY AUTO_INCREMENT, uuid CHAR(36) NOT NULL UNIQUE, note VARCHAR(40))");
    wait_for(&db, "SELECT note FROM central.visit", "first visit");
    wait_for(&db, "SELECT COUNT(*) FROM central.person", "2");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let st = sender_status(&a);
        if st["state"] == "following" && st["lastError"].is_null() {
            assert_ne!(st["position"].as_str().unwrap(), cursor.trim());
            break;
        }
        assert!(Instant::now() < deadline, "{st}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(sender.0.try_wait().unwrap().is_none());
}
