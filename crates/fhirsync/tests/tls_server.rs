//! HTTPS for the node's own HTTP server, with and without client
//! certificates, against a real `fhirsync serve` process.

use std::path::Path;

use fhirsync_testkit::tls::TestCerts;
use fhirsync_testkit::NodeProcess;

const BIN: &str = env!("CARGO_BIN_EXE_fhirsync");

fn client(certs: &Path, identity: bool) -> reqwest::Client {
    let ca = std::fs::read(certs.join("ca.pem")).unwrap();
    let mut b = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
        .timeout(std::time::Duration::from_secs(10));
    if identity {
        let mut pem = std::fs::read(certs.join("client.pem")).unwrap();
        pem.extend(std::fs::read(certs.join("client-key.pem")).unwrap());
        b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
    }
    b.build().unwrap()
}

fn config(dir: &Path, mutual: bool) -> std::path::PathBuf {
    let c = dir.join("certs");
    let mut t = format!(
        "[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        c.join("server.pem").display(),
        c.join("server-key.pem").display()
    );
    if mutual {
        t.push_str(&format!(
            "client_ca_file = \"{}\"\n",
            c.join("ca.pem").display()
        ));
    }
    let p = dir.join(if mutual { "mtls.toml" } else { "tls.toml" });
    std::fs::write(&p, t).unwrap();
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    TestCerts::generate(&certs).unwrap();

    let cfg = config(dir.path(), false);
    let node = NodeProcess::spawn(
        Path::new(BIN),
        &dir.path().join("a"),
        &["--config", cfg.to_str().unwrap()],
    )
    .unwrap();
    assert!(node.base.starts_with("https://127.0.0.1:"), "{}", node.base);
    let c = client(&certs, false);
    let r = c
        .put(node.url("Patient/p"))
        .header("content-type", "application/fhir+json")
        .body(r#"{"resourceType":"Patient","id":"p"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 201);
    assert_eq!(
        c.get(node.url("Patient/p"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    // plain HTTP on the TLS port gets nothing
    let plain = node.base.replace("https://", "http://");
    assert!(reqwest::get(format!("{plain}/metadata")).await.is_err());
    // a client that does not trust the CA refuses the server
    assert!(reqwest::get(node.url("metadata")).await.is_err());
    // the node still serves after failed handshakes
    assert_eq!(
        c.get(node.url("metadata"))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16(),
        200
    );
    drop(node);

    let cfg = config(dir.path(), true);
    let node = NodeProcess::spawn(
        Path::new(BIN),
        &dir.path().join("b"),
        &["--config", cfg.to_str().unwrap()],
    )
    .unwrap();
    assert!(
        client(&certs, false)
            .get(node.url("metadata"))
            .send()
            .await
            .is_err(),
        "no client certificate"
    );
    let r = client(&certs, true)
        .get(node.url("metadata"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
}

#[test]
fn bad_tls_files_are_refused_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    TestCerts::generate(&certs).unwrap();
    for (toml, want) in [
        (
            format!(
                "[tls]\ncert_file = \"{0}/server.pem\"\nkey_file = \"{0}/missing.pem\"\n",
                certs.display()
            ),
            "holds no private key",
        ),
        (
            format!(
                "[tls]\ncert_file = \"{0}/server.pem\"\nkey_file = \"{0}/client-key.pem\"\n",
                certs.display()
            ),
            "does not match",
        ),
        (
            format!(
                "[tls]\ncert_file = \"{0}/nope.pem\"\nkey_file = \"{0}/server-key.pem\"\n",
                certs.display()
            ),
            "cannot read",
        ),
        (
            format!("[tls]\ncert_file = \"{0}/server.pem\"\n", certs.display()),
            "key_file",
        ),
    ] {
        let p = dir.path().join("bad.toml");
        std::fs::write(&p, &toml).unwrap();
        let data = dir.path().join("data");
        let out = std::process::Command::new(BIN)
            .args([
                "serve",
                "--listen",
                "127.0.0.1:0",
                "--config",
                p.to_str().unwrap(),
                "--data-dir",
            ])
            .arg(&data)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{toml}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        assert!(err.contains(want), "{want} not in {err}");
        assert!(!data.exists(), "a refused config must not create the store");
    }
}

/// A child replicates to its parent over mutual TLS (two real processes);
/// a child without a client certificate gets nothing through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_replicates_over_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    TestCerts::generate(&certs).unwrap();
    let mut pcfg = std::fs::read_to_string(config(dir.path(), true)).unwrap();
    pcfg.push_str(
        "[[children]]\nnode_id = \"clinic\"\ntoken = \"clinic-token-0123456789\"\n\
         [[children]]\nnode_id = \"rogue\"\ntoken = \"rogue-token-0123456789\"\n",
    );
    std::fs::write(dir.path().join("parent.toml"), pcfg).unwrap();
    let parent = NodeProcess::spawn(
        Path::new(BIN),
        &dir.path().join("parent"),
        &[
            "--config",
            dir.path().join("parent.toml").to_str().unwrap(),
            "--node-id",
            "district",
        ],
    )
    .unwrap();
    let child_cfg = |name: &str, token: &str, identity: bool| {
        let mut t = format!(
            "[parent]\nurl = \"{}\"\ntoken = \"{token}\"\nlong_poll_s = 1\ntls_ca_file = \"{}\"\n",
            parent.base,
            certs.join("ca.pem").display()
        );
        if identity {
            t.push_str(&format!(
                "tls_cert_file = \"{}\"\ntls_key_file = \"{}\"\n",
                certs.join("client.pem").display(),
                certs.join("client-key.pem").display()
            ));
        }
        let p = dir.path().join(format!("{name}.toml"));
        std::fs::write(&p, t).unwrap();
        p
    };
    let c1 = child_cfg("clinic", "clinic-token-0123456789", true);
    let child = NodeProcess::spawn(
        Path::new(BIN),
        &dir.path().join("clinic"),
        &["--config", c1.to_str().unwrap(), "--node-id", "clinic"],
    )
    .unwrap();
    let c2 = child_cfg("rogue", "rogue-token-0123456789", false);
    let rogue = NodeProcess::spawn(
        Path::new(BIN),
        &dir.path().join("rogue"),
        &["--config", c2.to_str().unwrap(), "--node-id", "rogue"],
    )
    .unwrap();
    let plain = reqwest::Client::new();
    for (node, id) in [(&child, "from-clinic"), (&rogue, "from-rogue")] {
        let r = plain
            .put(node.url(&format!("Patient/{id}")))
            .header("content-type", "application/fhir+json")
            .body(format!(r#"{{"resourceType":"Patient","id":"{id}"}}"#))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 201);
    }
    let c = client(&certs, true);
    let mut arrived = false;
    for _ in 0..200 {
        let r = c
            .get(parent.url("Patient/from-clinic"))
            .send()
            .await
            .unwrap();
        if r.status().as_u16() == 200 {
            arrived = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(
        arrived,
        "the clinic's patient did not reach the parent over mTLS"
    );
    // The rogue child's edge fails its handshakes: nothing arrives, and its
    // status says why.
    let mut why = String::new();
    for _ in 0..200 {
        let edges: serde_json::Value = plain
            .get(rogue.base.replace("/fhir", "/admin/edges"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if let Some(e) = edges["items"][0]["push"]["lastError"].as_str() {
            why = e.to_owned();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(!why.is_empty(), "the rogue edge reported no error");
    let r = c
        .get(parent.url("Patient/from-rogue"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 404);
}
