//! Bad input never gives a 500: a sweep of malformed requests over every
//! endpoint, each answered with an OperationOutcome and a 4xx.

mod common;

use common::*;
use fhirsync_testkit::gen::Rng;

const ODD: &[&str] = &[
    "",
    "%",
    "%zz",
    "é",
    "ééééééééééééééééééé",
    "\u{0}",
    "a|b|c",
    "|",
    ",,,",
    "..",
    "-1",
    "99999999999999999999999",
    "2020-01-01T00:00:00ééé",
    "2020-01-01T00:00:00é12345",
    "eq",
    "gt",
    "ne2020",
    "Patient/",
    "/x",
    "Patient?x=1",
    "\"",
    "{}",
    "[]",
    "null",
    "ge9999-99-99",
    "2020-02-30",
    "le-5",
    "_history",
    "$changes",
    "%00",
    "a b",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requests_get_4xx_outcomes() {
    let s = InProcess::start().await;
    put(&s, "Patient/p", &pat("p")).await;
    let params = [
        "_id",
        "_lastUpdated",
        "identifier",
        "patient",
        "subject",
        "_count",
        "_sort",
        "_summary",
        "_total",
        "_snapshot",
        "_cursor",
        "_since",
        "since",
        "wait",
        "_type",
        "_before",
    ];
    let mut rng = Rng::new(11);
    let mut checked = 0;
    let long = "x".repeat(3000);
    let odds: Vec<&str> = ODD.iter().copied().chain([long.as_str()]).collect();
    for odd in odds {
        let enc: String = form_urlencoded::byte_serialize(odd.as_bytes()).collect();
        let mut urls = vec![
            format!("Patient/{enc}"),
            format!("Patient/p/_history/{enc}"),
            format!("{enc}/p"),
            format!("Patient/{enc}/_history"),
        ];
        for p in params {
            urls.push(format!("Patient?{p}={enc}"));
            urls.push(format!("_history?{p}={enc}"));
            urls.push(format!("$changes?{p}={enc}"));
        }
        for u in urls {
            let r = s.client.get(s.url(&u)).send().await.unwrap();
            let st = r.status().as_u16();
            assert!(st < 500, "GET {u} gave {st}");
            checked += 1;
        }
        // Bodies: odd values dropped into otherwise valid resources and bundles.
        let bodies = [
            format!(
                r#"{{"resourceType":"Patient","id":"{}"}}"#,
                odd.replace('"', "")
            ),
            format!(r#"{{"resourceType":"{}"}}"#, odd.replace('"', "")),
            format!(
                r#"{{"resourceType":"Bundle","type":"transaction","entry":[{{"request":{{"method":"{0}","url":"{0}"}}}}]}}"#,
                odd.replace('"', "")
            ),
            format!(
                r#"{{"resourceType":"Bundle","type":"batch","entry":[{{"resource":{{"resourceType":"Patient"}},"request":{{"method":"PUT","url":"Patient?identifier={}"}}}}]}}"#,
                odd.replace('"', "")
            ),
            odd.to_string(),
        ];
        for b in bodies {
            for (m, path) in [
                (reqwest::Method::POST, ""),
                (reqwest::Method::POST, "Patient"),
                (reqwest::Method::PUT, "Patient/p"),
                (reqwest::Method::PUT, "Patient?identifier=x"),
            ] {
                let r = s
                    .client
                    .request(m.clone(), s.url(path))
                    .header("content-type", FHIR_JSON)
                    .header("if-match", *rng.pick(&["W/\"1\"", "W/\"x\"", odd]))
                    .body(b.clone())
                    .send()
                    .await;
                // Header values that are not valid HTTP are refused by the client itself.
                let Ok(r) = r else { continue };
                let st = r.status().as_u16();
                assert!(st < 500, "{m} {path} with {b:.80} gave {st}");
                checked += 1;
            }
        }
    }
    assert!(checked > 1000, "{checked}");
    // Nothing the sweep sent was valid enough to write, except batch
    // entries that created a conditional Patient; the original is intact.
    let (st, p) = status_json(get(&s, "Patient/p").await).await;
    assert_eq!(st, 200);
    assert_eq!(p["meta"]["versionId"], "1");
}
