//! Helpers shared by the integration tests: a real server on 127.0.0.1 and
//! small request shorthands.
#![allow(dead_code)]

pub mod web;

pub use fhirsync_testkit::InProcess;
use reqwest::{RequestBuilder, Response};
use serde_json::Value;
use std::time::{Duration, Instant};

pub const FHIR_JSON: &str = "application/fhir+json";

pub fn with_body(rb: RequestBuilder, body: &Value) -> RequestBuilder {
    rb.header("content-type", FHIR_JSON).body(body.to_string())
}

pub async fn put(s: &InProcess, path: &str, body: &Value) -> Response {
    with_body(s.client.put(s.url(path)), body)
        .send()
        .await
        .expect("PUT")
}

pub async fn post(s: &InProcess, path: &str, body: &Value) -> Response {
    with_body(s.client.post(s.url(path)), body)
        .send()
        .await
        .expect("POST")
}

pub async fn get(s: &InProcess, path: &str) -> Response {
    s.client.get(s.url(path)).send().await.expect("GET")
}

pub async fn delete(s: &InProcess, path: &str) -> Response {
    s.client.delete(s.url(path)).send().await.expect("DELETE")
}

/// Status and parsed body (numbers keep their exact text).
pub async fn status_json(r: Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.expect("body");
    let v = if text.is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
    };
    (status, v)
}

/// Asserts an OperationOutcome with `status`; returns its diagnostics.
pub async fn expect_outcome(r: Response, status: u16) -> String {
    let ct = r
        .headers()
        .get("content-type")
        .map(|c| c.to_str().unwrap_or("").to_owned())
        .unwrap_or_default();
    let (s, v) = status_json(r).await;
    assert_eq!(s, status, "unexpected status, body {v}");
    assert!(ct.starts_with("application/fhir+json"), "content-type {ct}");
    assert_eq!(v["resourceType"], "OperationOutcome", "{v}");
    v["issue"][0]["diagnostics"]
        .as_str()
        .unwrap_or("")
        .to_owned()
}

/// Ids of a Bundle's entries with a resource (excluding OperationOutcomes).
pub fn entry_ids(b: &Value) -> Vec<String> {
    b["entry"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|e| e["resource"]["resourceType"] != "OperationOutcome")
                .filter_map(|e| {
                    let r = &e["resource"];
                    Some(format!(
                        "{}/{}",
                        r["resourceType"].as_str()?,
                        r["id"].as_str()?
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// The `next` link of a Bundle, if any.
pub fn next_link(b: &Value) -> Option<String> {
    b["link"]
        .as_array()?
        .iter()
        .find(|l| l["relation"] == "next")
        .and_then(|l| l["url"].as_str())
        .map(str::to_owned)
}

/// Follows `next` links from `first`, collecting every page's entries.
pub async fn all_pages(s: &InProcess, first: &str) -> (Vec<Value>, usize) {
    let mut url = s.url(first);
    let mut entries = Vec::new();
    let mut pages = 0;
    loop {
        let (st, b) = status_json(s.client.get(&url).send().await.unwrap()).await;
        assert_eq!(st, 200, "{b}");
        pages += 1;
        entries.extend(b["entry"].as_array().cloned().unwrap_or_default());
        match next_link(&b) {
            Some(n) => url = n,
            None => break,
        }
        assert!(pages < 1000, "paging does not end");
    }
    (entries, pages)
}

/// The `response.status` of each entry of a batch or transaction response.
pub fn entry_statuses(b: &Value) -> Vec<&str> {
    b["entry"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| e["response"]["status"].as_str().unwrap_or(""))
        .collect()
}

/// API settings of a node whose `[validation] mode` is lenient: it stores
/// what strict validation refuses.
pub fn lenient_api() -> fhirsync_api::ApiConfig {
    fhirsync_api::ApiConfig {
        validation: fhirsync_api::validation::Mode::Lenient,
        ..Default::default()
    }
}

/// A node with [`lenient_api`].
pub async fn lenient_node() -> InProcess {
    InProcess::start_with(fhirsync_testkit::server::Options {
        api: lenient_api(),
        ..Default::default()
    })
    .await
}

pub fn pat(id: &str) -> Value {
    serde_json::json!({"resourceType": "Patient", "id": id, "active": true})
}

/// A count summed over all types of a `--report` JSON (`created`, ...).
pub fn total(r: &Value, what: &str) -> u64 {
    r["types"]
        .as_object()
        .unwrap()
        .values()
        .map(|c| c[what].as_u64().unwrap())
        .sum()
}

/// (type, id) → content hash of the current version (`None`: deleted).
pub type Digest = std::collections::BTreeMap<(String, String), Option<u128>>;
/// (type, id) → number of versions stored.
pub type VersionCounts = std::collections::BTreeMap<(String, String), usize>;

/// What a store holds, read through its change log: the digest that two
/// converged nodes share, and how many versions each resource has (a
/// version applied twice shows as one too many).
pub async fn store_digest(store: &dyn fhirsync_store::Store) -> (Digest, VersionCounts) {
    let (mut d, mut n) = (Digest::new(), VersionCounts::new());
    let mut since = 0;
    loop {
        let rows = store
            .changes(fhirsync_store::ChangesQuery {
                since,
                count: 5000,
                ..Default::default()
            })
            .await
            .unwrap();
        let Some(last) = rows.last() else { break };
        since = last.seq;
        for v in rows {
            let h = v.body.as_deref().map(|b| {
                let m: serde_json::Map<String, Value> = serde_json::from_str(b).unwrap();
                fhirsync_core::meta::content_hash(&v.rtype, &fhirsync_core::meta::split(&m))
            });
            *n.entry((v.rtype.clone(), v.id.clone())).or_insert(0) += 1;
            d.insert((v.rtype, v.id), h);
        }
    }
    (d, n)
}

/// `GET /admin/{path}` of a node, as JSON (asserts 200).
pub async fn admin(s: &InProcess, path: &str) -> Value {
    let r = s
        .client
        .get(s.base.replace("/fhir", &format!("/admin/{path}")))
        .send()
        .await
        .expect("admin GET");
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.expect("admin JSON")
}

/// The node's `/metrics` text.
pub async fn metrics(s: &InProcess) -> String {
    s.client
        .get(s.base.replace("/fhir", "/metrics"))
        .send()
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

/// `POST $apply` to `s` as child `node` with `token`.
pub async fn apply_as(s: &InProcess, node: &str, token: &str, body: String) -> Response {
    s.client
        .post(s.url("$apply"))
        .bearer_auth(token)
        .header("x-fhirsync-node", node)
        .header("content-type", FHIR_JSON)
        .body(body)
        .send()
        .await
        .expect("POST $apply")
}

/// Waits up to `secs` for `f` to say yes; panics naming `what` otherwise.
pub async fn eventually<F, Fut>(what: &str, secs: u64, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// The `seq`s of a `$changes` page, in order.
pub fn feed_seqs(b: &Value) -> Vec<u64> {
    b["entry"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|e| {
                    let ext = &e["extension"][0]["extension"];
                    ext.as_array()
                        .unwrap()
                        .iter()
                        .find(|x| x["url"] == "seq")
                        .unwrap()["valueDecimal"]
                        .as_u64()
                        .unwrap()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Stores the current versions of `keys` at `from` into `to` as if `peer`
/// had sent them over an edge (`via = peer`, vectors kept), outside any
/// edge: a divergence the protocol did not cause (a store copied by hand,
/// a dead letter someone deleted). With `via` the parent, a child never
/// pushes them; with `via` a child, the parent never feeds them back.
pub async fn plant(from: &InProcess, to: &InProcess, peer: &str, keys: &[(&str, String)]) {
    use fhirsync_store::{ApplyRequest, Direction, RemoteVersion, WriteOutcome, WriteRequest};
    let mut versions = Vec::new();
    for (t, id) in keys {
        let v = from
            .store
            .read(t, id)
            .await
            .unwrap()
            .expect("planted version");
        let e: Value = serde_json::from_str(&fhirsync_store::change_entry_text(None, &v)).unwrap();
        versions
            .push(RemoteVersion::from_entry(&e, fhirsync_core::validate::Mode::Strict).unwrap());
    }
    let n = versions.len();
    let out = to
        .store
        .write(WriteRequest::Apply(Box::new(ApplyRequest {
            edge: "planted".into(),
            direction: Direction::Pull,
            peer: peer.into(),
            policy: fhirsync_core::replicate::Policy::Manual,
            versions,
            cursor: None,
            dead_letters: Vec::new(),
            record_peer: false,
        })))
        .await
        .unwrap();
    let WriteOutcome::Applied(rep) = out else {
        panic!("not applied")
    };
    assert_eq!(rep.stored as usize, n, "every planted version stored");
}

/// `POST /admin/verify` on a node; status and the report.
pub async fn verify(s: &InProcess, query: &str) -> (u16, Value) {
    let r = s
        .client
        .post(s.base.replace("/fhir", &format!("/admin/verify?{query}")))
        .send()
        .await
        .expect("POST /admin/verify");
    status_json(r).await
}

/// Runs the `fhirsync` binary; returns exit success, stdout, stderr.
pub async fn cli(args: &[&str]) -> (bool, String, String) {
    let o = tokio::process::Command::new(env!("CARGO_BIN_EXE_fhirsync"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .unwrap();
    (
        o.status.success(),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}
