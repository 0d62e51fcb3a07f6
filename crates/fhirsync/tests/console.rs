//! The web console against real servers: login with argon2 users, session
//! cookies, CSRF on every form, lock-out, roles (a viewer cannot resolve),
//! a conflict resolved from its diff page, and a headless Chromium run of
//! the same flow with a screenshot.

mod common;

use std::time::Duration;

use common::web::{field, Web};
use common::*;
use fhirsync_api::console::{users, ConsoleConfig, Role};
use fhirsync_api::ChildConfig;
use fhirsync_replica::EdgeConfig;
use fhirsync_store::{AuditQuery, ListQuery};
use fhirsync_testkit::server::Options;
use fhirsync_testkit::{Link, TcpProxy};
use serde_json::json;

const ADMIN_PW: &str = "kisumu-district-2026";
const VIEWER_PW: &str = "just-looking-please";

fn users_file(dir: &std::path::Path) -> std::path::PathBuf {
    let f = dir.join("console-users");
    users::add(&f, "amina", Role::Admin, ADMIN_PW).unwrap();
    users::add(&f, "joe", Role::Viewer, VIEWER_PW).unwrap();
    f
}

/// A parent and a child (with a console) holding one open conflict on
/// `Patient/x`: both edited it while their link was down.
struct Scene {
    parent: InProcess,
    child: InProcess,
    _link: TcpProxy,
    _dir: tempfile::TempDir,
}

async fn scene(cfg: impl FnOnce(ConsoleConfig) -> ConsoleConfig) -> Scene {
    let dir = tempfile::tempdir().unwrap();
    let parent = InProcess::start_with(Options {
        node_id: Some("district".into()),
        children: vec![ChildConfig {
            node_id: "clinic".into(),
            token: "clinic-edge-token".into(),
            pull: true,
            push: true,
            push_types: Vec::new(),
        }],
        ..Options::default()
    })
    .await;
    let host = parent
        .base
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let link = TcpProxy::start(&host).await;
    let mut e = EdgeConfig::new(&link.url_for(&parent.base), "clinic-edge-token");
    e.long_poll_s = 1;
    let child = InProcess::start_with(Options {
        node_id: Some("clinic".into()),
        parent: Some(e),
        console: Some(cfg(ConsoleConfig::new(users_file(dir.path())))),
        ..Options::default()
    })
    .await;
    let p = json!({"resourceType": "Patient", "id": "x", "name": [{"family": "Otieno"}]});
    assert_eq!(put(&parent, "Patient/x", &p).await.status(), 201);
    wait("the child has x", || async {
        get(&child, "Patient/x").await.status() == 200
    })
    .await;
    link.set(Link::Down);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let at_parent = json!({"resourceType": "Patient", "id": "x", "name": [{"family": "Otieno"}], "gender": "female", "birthDate": "1980-02-01"});
    let at_child = json!({"resourceType": "Patient", "id": "x", "name": [{"family": "Otieno"}], "gender": "male"});
    assert_eq!(put(&parent, "Patient/x", &at_parent).await.status(), 200);
    assert_eq!(put(&child, "Patient/x", &at_child).await.status(), 200);
    link.set(Link::Up);
    wait("an open conflict at the child", || async {
        open(&child).await == 1
    })
    .await;
    Scene {
        parent,
        child,
        _link: link,
        _dir: dir,
    }
}

async fn open(s: &InProcess) -> usize {
    s.store
        .conflicts(ListQuery {
            state: Some("open".into()),
            count: 10,
            ..ListQuery::default()
        })
        .await
        .unwrap()
        .len()
}

async fn wait<F, Fut>(what: &str, f: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    for _ in 0..300 {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for {what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn login_sessions_csrf_and_lock_out() {
    let s = scene(|mut c| {
        c.lockout_failures = 3;
        c
    })
    .await;
    let base = s.child.console.clone().unwrap();
    let mut w = Web::new(&base);
    // Pages need a session.
    let p = w.get("/").await;
    assert_eq!((p.status, p.location.as_str()), (303, "/login"));
    // The login form needs its CSRF token.
    let p = w.get("/login").await;
    assert_eq!(p.status, 200);
    assert!(p.body.contains("id=\"signin\""));
    let p = w
        .post(
            "/login",
            &[
                ("csrf", "forged"),
                ("user", "amina"),
                ("password", ADMIN_PW),
            ],
        )
        .await;
    assert_eq!(p.status, 403);
    assert!(p.body.contains("CSRF"));
    // Wrong password, then right.
    let p = w.login("amina", "not-the-password").await;
    assert_eq!(p.status, 401);
    assert!(p.body.contains("Wrong user name or password"));
    let p = w.login("amina", ADMIN_PW).await;
    assert_eq!((p.status, p.location.as_str()), (303, "/"), "{}", p.body);
    let sc = p
        .set_cookie
        .iter()
        .find(|c| c.starts_with("fhirsync_session="))
        .unwrap();
    assert!(
        sc.contains("HttpOnly") && sc.contains("SameSite=Strict"),
        "{sc}"
    );
    let p = w.get("/").await;
    assert_eq!(p.status, 200);
    assert!(
        p.body.contains("clinic") && p.body.contains("open conflicts") && p.body.contains("<svg"),
        "{}",
        p.body
    );
    for path in [
        "/edges",
        "/children",
        "/conflicts",
        "/deadletters",
        "/audit",
        "/subscriptions",
    ] {
        let p = w.get(path).await;
        assert_eq!(p.status, 200, "{path}");
    }
    let p = w.get("/edges").await;
    assert!(p.body.contains("parent"), "{}", p.body);
    // Sign out needs the token too; afterwards the session is gone.
    let csrf = field(&w.get("/").await.body, "csrf");
    assert_eq!(w.post("/logout", &[]).await.status, 403);
    assert_eq!(w.post("/logout", &[("csrf", &csrf)]).await.status, 303);
    assert_eq!(w.get("/").await.status, 303);

    // Three failures lock the name, even for the right password.
    let mut m = Web::new(&base);
    assert_eq!(m.login("joe", "guess-1").await.status, 401);
    assert_eq!(m.login("joe", "guess-2").await.status, 401);
    assert_eq!(m.login("joe", "guess-3").await.status, 429);
    let p = m.login("joe", VIEWER_PW).await;
    assert_eq!(p.status, 429);
    assert!(p.body.contains("locked"));
    // Another name is not locked.
    assert_eq!(m.login("amina", ADMIN_PW).await.status, 303);

    // Logins are in the audit trail (committed within moments of the answer).
    let logins = AuditQuery {
        kind: Some("login".into()),
        outcome: Some(0),
        subtype: Some("login".into()),
        count: 10,
        ..AuditQuery::default()
    };
    let trail = &s.child.store;
    wait("two logins audited", || async {
        trail.audit_events(logins.clone()).await.unwrap().0.len() == 2
    })
    .await;
    let (ok, _) = trail.audit_events(logins).await.unwrap();
    assert_eq!(ok[0]["agent"][0]["who"]["display"], "user:amina");
    // Every failed attempt is there with its reason, the forged CSRF
    // token's included.
    let (failures, failed) = s
        .child
        .store
        .audit_events(AuditQuery {
            kind: Some("login".into()),
            outcome: Some(4),
            count: 10,
            ..AuditQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(failed, 6);
    let why: Vec<&str> = failures
        .iter()
        .map(|e| e["outcomeDesc"].as_str().unwrap_or(""))
        .collect();
    let forged = failures
        .iter()
        .find(|e| e["outcomeDesc"].as_str().unwrap_or("").contains("CSRF"))
        .unwrap_or_else(|| panic!("no failed login for the forged CSRF token: {why:?}"));
    assert_eq!(forged["agent"][0]["who"]["display"], "user:amina");
    assert!(why.contains(&"wrong user name or password"), "{why:?}");
    drop(s.parent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_viewer_cannot_resolve_and_an_admin_needs_the_csrf_token() {
    let s = scene(|c| c).await;
    let base = s.child.console.clone().unwrap();
    let id = s
        .child
        .store
        .conflicts(ListQuery {
            state: Some("open".into()),
            count: 1,
            ..ListQuery::default()
        })
        .await
        .unwrap()[0]
        .id;
    let page = format!("/conflicts/{id}");
    let action = format!("/conflicts/{id}/resolve");

    let mut v = Web::new(&base);
    assert_eq!(v.login("joe", VIEWER_PW).await.status, 303);
    let p = v.get(&page).await;
    assert_eq!(p.status, 200);
    // The side-by-side diff: the differing fields, both values.
    assert!(
        p.body
            .contains("<td>gender</td><td class=\"side\">male</td><td class=\"side\">female</td>"),
        "{}",
        p.body
    );
    assert!(p
        .body
        .contains("<td>birthDate</td><td class=\"side\">—</td><td class=\"side\">1980-02-01</td>"));
    assert!(p.body.contains("<span id=\"changed\">2</span>"));
    assert!(p.body.contains("Viewers cannot resolve") && !p.body.contains("keep-remote"));
    let csrf = field(&p.body, "csrf");
    let r = v
        .post(&action, &[("csrf", &csrf), ("keep", "remote")])
        .await;
    assert_eq!(r.status, 403);
    assert!(r.body.contains("viewer"), "{}", r.body);
    assert_eq!(open(&s.child).await, 1);

    let mut a = Web::new(&base);
    assert_eq!(a.login("amina", ADMIN_PW).await.status, 303);
    let p = a.get(&page).await;
    assert!(p.body.contains("id=\"keep-remote\""));
    // Without the token, or with the viewer's: refused, nothing changes.
    assert_eq!(a.post(&action, &[("keep", "remote")]).await.status, 403);
    assert_eq!(
        a.post(&action, &[("csrf", &csrf), ("keep", "remote")])
            .await
            .status,
        403
    );
    assert_eq!(open(&s.child).await, 1);
    let (_, before) = status_json(get(&s.child, "Patient/x").await).await;
    assert_eq!(before["gender"], "male");
    // With it: resolved, and the remote version wins here.
    let mine = field(&p.body, "csrf");
    let r = a
        .post(&action, &[("csrf", &mine), ("keep", "remote")])
        .await;
    assert_eq!((r.status, r.location.as_str()), (303, page.as_str()));
    assert_eq!(open(&s.child).await, 0);
    let (_, after) = status_json(get(&s.child, "Patient/x").await).await;
    assert_eq!(after["gender"], "female");
    let p = a.get(&page).await;
    assert!(
        p.body.contains("id=\"outcome\"") && p.body.contains("resolved"),
        "{}",
        p.body
    );
    // The resolution is audited with the user's name.
    let q = AuditQuery {
        subtype: Some("resolve".into()),
        agent: Some("user:amina".into()),
        count: 5,
        ..AuditQuery::default()
    };
    let trail = &s.child.store;
    wait("the resolution audited", || async {
        trail.audit_events(q.clone()).await.unwrap().0.len() == 1
    })
    .await;
    let (ev, _) = trail.audit_events(q).await.unwrap();
    assert_eq!(ev[0]["entity"][0]["what"]["reference"], "Patient/x");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_browser_signs_in_opens_the_conflict_and_resolves_it() {
    assert!(
        fhirsync_testkit::browser::available(),
        "Chromium and chromedriver are needed (Debian packages chromium, chromium-driver)"
    );
    let s = scene(|c| c).await;
    let base = s.child.console.clone().unwrap();
    let b = fhirsync_testkit::browser::Browser::start().await.unwrap();
    b.go(&format!("{base}/")).await.unwrap();
    assert!(b.current_url().await.unwrap().ends_with("/login"));
    b.type_into("#user", "amina").await.unwrap();
    b.type_into("#password", ADMIN_PW).await.unwrap();
    b.click("#signin").await.unwrap();
    b.wait_for("#open-conflicts").await.unwrap();
    assert_eq!(b.title().await.unwrap(), "Overview · fhirsync");
    assert_eq!(b.text("#open-conflicts b").await.unwrap(), "1");
    b.click("#open-conflicts a").await.unwrap();
    b.wait_for("#conflicts a").await.unwrap();
    assert!(b.title().await.unwrap().starts_with("Conflicts"));
    b.click("#conflicts a").await.unwrap();
    b.wait_for("#diff").await.unwrap();
    let diff = b.text("#diff").await.unwrap();
    assert!(diff.contains("gender male female"), "{diff}");
    assert_eq!(b.text("#changed").await.unwrap(), "2");
    b.click("#keep-remote").await.unwrap();
    b.wait_for("#outcome").await.unwrap();
    let outcome = b.text("#outcome").await.unwrap();
    assert!(
        outcome.starts_with("resolved — resolution: remote"),
        "{outcome}"
    );
    let shot =
        std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("console-conflict-resolved.png");
    b.screenshot(&shot).await.unwrap();
    let png = std::fs::read(&shot).unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    assert_eq!(open(&s.child).await, 0);
    let (_, after) = status_json(get(&s.child, "Patient/x").await).await;
    assert_eq!(after["gender"], "female");
    // The overview now shows no open conflict.
    b.go(&format!("{base}/")).await.unwrap();
    assert_eq!(b.text("#open-conflicts b").await.unwrap(), "0");
    println!("screenshot: {}", shot.display());
}

const BIN: &str = env!("CARGO_BIN_EXE_fhirsync");

fn fhirsync(args: &[&str], stdin: &str) -> std::process::Output {
    use std::io::Write;
    let mut c = std::process::Command::new(BIN)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    c.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
    c.wait_with_output().unwrap()
}

/// `fhirsync user` manages the users file; `serve` says where the console
/// listens and refuses to serve it to the network without TLS.
#[test]
fn user_command_and_console_start_line() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("node");
    let d = data.to_str().unwrap();
    let o = fhirsync(
        &["user", "add", "amina", "--role", "admin", "--data-dir", d],
        &format!("{ADMIN_PW}\n"),
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let f = data.join("console-users");
    let text = std::fs::read_to_string(&f).unwrap();
    assert!(text.contains("amina:admin:$argon2id$") && !text.contains(ADMIN_PW));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let o = fhirsync(
        &["user", "add", "joe", "--role", "viewer", "--data-dir", d],
        "short\n",
    );
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("at least 12 characters"), "{err}");
    let o = fhirsync(&["user", "list", "--data-dir", d], "");
    assert_eq!(String::from_utf8_lossy(&o.stdout), "amina\tadmin\n");
    let o = fhirsync(&["user", "remove", "nobody", "--data-dir", d], "");
    assert!(!o.status.success());

    // The console on another address without TLS: refused, one line.
    let o = std::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--console-listen",
            "0.0.0.0:0",
            "--data-dir",
            d,
        ])
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("needs [tls]") && err.lines().count() == 1,
        "{err}"
    );

    // A real start says where the console is and who may call the API.
    let mut child = std::process::Command::new(BIN)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--console-listen",
            "127.0.0.1:0",
            "--data-dir",
            d,
        ])
        .env_remove("FHIRSYNC_ANONYMOUS")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let mut seen = Vec::new();
    while let Some(Ok(l)) = lines.next() {
        let done = l.starts_with("console on");
        seen.push(l);
        if done {
            break;
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    let all = seen.join("\n");
    assert!(all.contains("requests without a token get 401"), "{all}");
    assert!(
        all.contains("console on http://127.0.0.1:")
            && all.contains("loopback only")
            && all.contains("1 user(s)"),
        "{all}"
    );
}

/// A second node on the machine: the console's default address taken, the
/// node starts with its console off and says so; an address set by the
/// operator that is taken stops the start with one line.
#[test]
fn a_taken_default_console_address_leaves_the_console_off() {
    // Held here (or already held by someone else: taken either way).
    let _hold = std::net::TcpListener::bind("127.0.0.1:8081");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let mut child = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", d])
        .env_remove("FHIRSYNC_CONSOLE_LISTEN")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stdout.take().unwrap()));
    let line = lines
        .by_ref()
        .map_while(Result::ok)
        .find(|l| l.starts_with("console"))
        .unwrap_or_default();
    std::thread::sleep(std::time::Duration::from_millis(300));
    let running = child.try_wait().unwrap().is_none();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        line.starts_with("console: off (127.0.0.1:8081 is taken"),
        "{line}"
    );
    assert!(running, "the node keeps serving without its console");

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let o = std::process::Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir", d])
        .arg("--console-listen")
        .arg(taken.local_addr().unwrap().to_string())
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("console: cannot listen on"), "{err}");
}
