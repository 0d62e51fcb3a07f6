//! Hostile input against a real `fhirsync serve`: deep and long FHIRPath
//! in every nesting form, deep JSON, JSON that FHIR forbids, oversized
//! Bundles and searches, bad feed parameters. Each is refused with an
//! OperationOutcome naming what it broke, and afterwards the node still
//! answers with its data unchanged.

use fhirsync_core::fhirpath::{DEPTH_MAX, EXPRESSION_BYTES_MAX, NEST_MAX};
use fhirsync_core::search::{PARAMS_MAX, VALUES_MAX, VALUE_BYTES_MAX};
use fhirsync_store::bundle::BUNDLE_ENTRIES_MAX;
use fhirsync_testkit::NodeProcess;
use serde_json::{json, Value};

const BIN: &str = env!("CARGO_BIN_EXE_fhirsync");
const FHIR_JSON: &str = "application/fhir+json";

fn topic(criteria: &str) -> String {
    json!({"resourceType": "SubscriptionTopic", "url": "http://example.org/topic/x",
           "status": "active",
           "resourceTrigger": [{"resource": "Patient", "supportedInteraction": ["create"],
                                "fhirPathCriteria": criteria}]})
    .to_string()
}

/// Every way of nesting or chaining a FHIRPath expression, `n` deep.
fn expressions(n: usize) -> Vec<(&'static str, String)> {
    vec![
        (
            "parentheses",
            format!("{}true{}", "(".repeat(n), ")".repeat(n)),
        ),
        ("not chain", format!("true{}", ".not()".repeat(n))),
        (
            "where in where",
            format!("{}true{}", "where(".repeat(n), ")".repeat(n)),
        ),
        ("union run", vec!["%current.active"; n + 1].join(" | ")),
        ("and run", vec!["true"; n + 1].join(" and ")),
        ("unary minus", format!("{}1 = 1", "-".repeat(n))),
        (
            "indexers",
            format!("{}0{}", "name[".repeat(n), "]".repeat(n)),
        ),
    ]
}

struct Hostile {
    what: String,
    method: reqwest::Method,
    path: String,
    body: Option<String>,
    /// Statuses that count as a clear refusal.
    want: &'static [u16],
    /// A word the OperationOutcome must hold (the limit's name).
    says: &'static str,
}

fn h(
    what: impl Into<String>,
    method: reqwest::Method,
    path: impl Into<String>,
    body: Option<String>,
    want: &'static [u16],
    says: &'static str,
) -> Hostile {
    Hostile {
        what: what.into(),
        method,
        path: path.into(),
        body,
        want,
        says,
    }
}

fn inputs() -> Vec<Hostile> {
    use reqwest::Method as M;
    let mut v = Vec::new();
    let post_topic = |what: String, e: &str, says: &'static str| {
        h(
            what,
            M::POST,
            "SubscriptionTopic",
            Some(topic(e)),
            &[422],
            says,
        )
    };
    // The reported crash, then every form at the limits and far past them.
    v.push(post_topic(
        "2,000 pairs of parentheses".into(),
        &format!("{}true{}", "(".repeat(2000), ")".repeat(2000)),
        "NEST_MAX",
    ));
    for (form, e) in expressions(NEST_MAX.max(DEPTH_MAX) + 1) {
        v.push(post_topic(format!("{form} past the limit"), &e, "_MAX"));
    }
    for (form, e) in expressions(100_000) {
        v.push(post_topic(
            format!("{form} 100,000 deep"),
            &e,
            "EXPRESSION_BYTES_MAX",
        ));
    }
    v.push(post_topic(
        "a long expression".into(),
        &"a".repeat(EXPRESSION_BYTES_MAX + 1),
        "EXPRESSION_BYTES_MAX",
    ));
    // JSON deeper than serde_json's limit of 128, and far deeper.
    for depth in [129, 200, 100_000] {
        let body = format!(
            "{{\"resourceType\":\"Patient\",\"extension\":{}1{}}}",
            "[".repeat(depth),
            "]".repeat(depth)
        );
        v.push(h(
            format!("JSON {depth} deep"),
            M::POST,
            "Patient",
            Some(body),
            &[400],
            "recursion limit",
        ));
    }
    // JSON that FHIR forbids.
    for (what, body, says) in [
        (
            "a member twice",
            r#"{"resourceType":"Patient","active":true,"active":false}"#,
            "appears twice",
        ),
        (
            "a member twice, escaped",
            r#"{"resourceType":"Patient","gender":"male","\u0067ender":"female"}"#,
            "appears twice",
        ),
        (
            "a control character",
            r#"{"resourceType":"Patient","name":[{"family":"Oti\u0001eno"}]}"#,
            "U+0001",
        ),
        (
            "an empty string",
            r#"{"resourceType":"Patient","name":[{"family":""}]}"#,
            "empty string",
        ),
        (
            "an empty array",
            r#"{"resourceType":"Patient","name":[]}"#,
            "empty array",
        ),
        (
            "an empty object",
            r#"{"resourceType":"Patient","meta":{}}"#,
            "empty object",
        ),
        ("an empty resource", "{}", "empty object"),
    ] {
        v.push(h(what, M::POST, "Patient", Some(body.into()), &[400], says));
    }
    // A Bundle with too many entries.
    let entry = json!({"resource": {"resourceType": "Basic", "code": {"text": "x"}},
                       "request": {"method": "POST", "url": "Basic"}});
    let entries = vec![entry; BUNDLE_ENTRIES_MAX + 1];
    v.push(h(
        "a Bundle past BUNDLE_ENTRIES_MAX",
        M::POST,
        "",
        Some(
            json!({"resourceType": "Bundle", "type": "transaction", "entry": entries}).to_string(),
        ),
        &[422],
        "BUNDLE_ENTRIES_MAX",
    ));
    // Searches past their limits.
    let many: Vec<String> = (0..=PARAMS_MAX).map(|i| format!("_id=p{i}")).collect();
    v.push(h(
        "too many search parameters",
        M::GET,
        format!("Patient?{}", many.join("&")),
        None,
        &[400],
        "PARAMS_MAX",
    ));
    v.push(h(
        "a long search value",
        M::GET,
        format!("Patient?identifier={}", "x".repeat(VALUE_BYTES_MAX + 1)),
        None,
        &[400],
        "VALUE_BYTES_MAX",
    ));
    let ids: Vec<String> = (0..=VALUES_MAX).map(|i| format!("p{i}")).collect();
    v.push(h(
        "too many alternatives",
        M::GET,
        format!("Patient?_id={}", ids.join(",")),
        None,
        &[400],
        "VALUES_MAX",
    ));
    let form: Vec<String> = (0..10_000).map(|i| format!("name=n{i}")).collect();
    v.push(h(
        "a _search body of 10,000 parameters",
        M::POST,
        "Patient/_search",
        Some(form.join("&")),
        &[400, 415],
        "",
    ));
    // The change feed with numbers that do not fit.
    v.push(h(
        "a wait that overflows",
        M::GET,
        "$changes?since=0&wait=18446744073709551616",
        None,
        &[400],
        "wait",
    ));
    v.push(h(
        "a cursor that overflows",
        M::GET,
        "$changes?since=99999999999999999999999",
        None,
        &[400],
        "since",
    ));
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_input_is_refused_and_the_node_stays_up_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let node = NodeProcess::spawn(std::path::Path::new(BIN), dir.path(), &[]).unwrap();
    let client = reqwest::Client::new();
    let p1 = json!({"resourceType": "Patient", "id": "p1", "name": [{"family": "Otieno"}]});
    let r = client
        .put(node.url("Patient/p1"))
        .header("content-type", FHIR_JSON)
        .body(p1.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let before = client
        .get(node.url("Patient/p1"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let feed = |c: reqwest::Client, url: String| async move {
        let b: Value = c.get(url).send().await.unwrap().json().await.unwrap();
        b["entry"].as_array().map_or(0, Vec::len)
    };
    let changes_before = feed(client.clone(), node.url("$changes?since=0")).await;

    for x in inputs() {
        let mut rb = client.request(x.method.clone(), node.url(&x.path));
        if let Some(b) = x.body {
            let ct = if x.path.ends_with("_search") {
                "application/x-www-form-urlencoded"
            } else {
                FHIR_JSON
            };
            rb = rb.header("content-type", ct).body(b);
        }
        let r = rb
            .send()
            .await
            .unwrap_or_else(|e| panic!("{}: the node did not answer: {e}", x.what));
        let st = r.status().as_u16();
        let text = r.text().await.unwrap();
        assert!(x.want.contains(&st), "{}: {st} {text:.300}", x.what);
        let oo: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{}: not an OperationOutcome: {text:.300}", x.what));
        assert_eq!(oo["resourceType"], "OperationOutcome", "{}", x.what);
        let why = oo["issue"][0]["diagnostics"].as_str().unwrap_or("");
        assert!(why.contains(x.says), "{}: {why:.300}", x.what);
    }

    // Still up, and nothing changed.
    let r = client.get(node.url("Patient/p1")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), before);
    assert_eq!(
        feed(client.clone(), node.url("$changes?since=0")).await,
        changes_before
    );
    let r = client
        .get(node.url("SubscriptionTopic?_summary=count"))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["total"], 0, "{v}");
    let health = node.base.replace("/fhir", "/healthz");
    assert_eq!(client.get(health).send().await.unwrap().status(), 200);
}
