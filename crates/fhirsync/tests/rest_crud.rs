//! Instance interactions, headers, Prefer, conditional forms and bad
//! input, through the real HTTP server.

mod common;

use common::*;
use serde_json::{json, Value};

#[tokio::test]
async fn create_read_vread_update_delete() {
    let s = InProcess::start().await;
    let r = post(
        &s,
        "Patient",
        &json!({"resourceType": "Patient", "id": "ignored", "active": true}),
    )
    .await;
    assert_eq!(r.status(), 201);
    let loc = r.headers()["location"].to_str().unwrap().to_owned();
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    assert!(r.headers().contains_key("last-modified"));
    let (_, body) = status_json(r).await;
    let id = body["id"].as_str().unwrap().to_owned();
    assert_ne!(id, "ignored", "a create ignores the id in the body");
    assert_eq!(loc, s.url(&format!("Patient/{id}/_history/1")));
    assert_eq!(body["meta"]["versionId"], "1");

    let (st, read) = status_json(get(&s, &format!("Patient/{id}")).await).await;
    assert_eq!(st, 200);
    assert_eq!(read, body);

    let mut upd = read.clone();
    upd["active"] = json!(false);
    let r = put(&s, &format!("Patient/{id}"), &upd).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "W/\"2\"");

    let (st, v1) = status_json(get(&s, &format!("Patient/{id}/_history/1")).await).await;
    assert_eq!(st, 200);
    assert_eq!(v1["active"], true);

    let r = delete(&s, &format!("Patient/{id}")).await;
    assert_eq!(r.status(), 204);
    assert_eq!(r.headers()["etag"], "W/\"3\"");
    expect_outcome(get(&s, &format!("Patient/{id}")).await, 410).await;
    expect_outcome(get(&s, &format!("Patient/{id}/_history/3")).await, 410).await;
    // Deleting again changes nothing.
    let seq = s.store.last_seq();
    assert_eq!(delete(&s, &format!("Patient/{id}")).await.status(), 204);
    assert_eq!(delete(&s, "Patient/never-was").await.status(), 204);
    assert_eq!(s.store.last_seq(), seq);
    // An update after a delete brings the resource back as version 4.
    let r = put(
        &s,
        &format!("Patient/{id}"),
        &json!({"resourceType": "Patient", "id": id}),
    )
    .await;
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["etag"], "W/\"4\"");
}

#[tokio::test]
async fn create_on_update_with_client_ids() {
    let s = InProcess::start().await;
    for id in ["123", "abc-DEF.9", "0"] {
        let r = put(&s, &format!("Patient/{id}"), &pat(id)).await;
        assert_eq!(r.status(), 201, "id {id}");
        assert_eq!(
            r.headers()["location"].to_str().unwrap(),
            s.url(&format!("Patient/{id}/_history/1"))
        );
        let (st, b) = status_json(get(&s, &format!("Patient/{id}")).await).await;
        assert_eq!((st, b["id"].as_str()), (200, Some(id)));
    }
}

#[tokio::test]
async fn exact_json_is_kept() {
    // Lenient validation stores what strict would refuse (an unknown
    // element, components without a code).
    let s = lenient_node().await;
    let text = r##"{"resourceType":"Observation","id":"o1","meta":{"versionId":"99","lastUpdated":"2000-01-01T00:00:00Z","source":"#abc","profile":["http://x/p"]},"status":"final","code":{"text":"t"},"valueQuantity":{"value":1.50,"unit":"mg"},"component":[{"valueDecimal":0.000100},{"valueDecimal":1e2}],"unknownElement":{"nested":[1,2.0,"x"]},"_status":{"extension":[{"url":"http://x/e","valueString":"y"}]}}"##;
    let r = s
        .client
        .put(s.url("Observation/o1"))
        .header("content-type", FHIR_JSON)
        .body(text)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let got = get(&s, "Observation/o1").await.text().await.unwrap();
    assert!(got.contains(r#""value":1.50"#), "{got}");
    assert!(got.contains(r#""valueDecimal":0.000100"#), "{got}");
    // Exponent forms keep their digits; the sign of the exponent is written out.
    assert!(got.contains(r#""valueDecimal":1e+2"#), "{got}");
    assert!(got.contains(r#""nested":[1,2.0,"x"]"#), "{got}");
    let mut sent: Value = serde_json::from_str(&text.replace("1e2", "1e+2")).unwrap();
    let mut back: Value = serde_json::from_str(&got).unwrap();
    assert_eq!(back["meta"]["versionId"], "1");
    assert_ne!(back["meta"]["lastUpdated"], "2000-01-01T00:00:00Z");
    for v in [&mut sent, &mut back] {
        let m = v["meta"].as_object_mut().unwrap();
        m.remove("versionId");
        m.remove("lastUpdated");
    }
    assert_eq!(sent, back);
}

#[tokio::test]
async fn unchanged_content_makes_no_version() {
    let s = InProcess::start().await;
    put(&s, "Patient/p", &pat("p")).await;
    let seq = s.store.last_seq();
    let r = put(&s, "Patient/p", &pat("p")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["etag"], "W/\"1\"");
    assert_eq!(s.store.last_seq(), seq);
}

#[tokio::test]
async fn if_match_and_if_none_match() {
    let s = InProcess::start().await;
    put(&s, "Patient/p", &pat("p")).await;
    let mut b = pat("p");
    b["active"] = json!(false);
    let r = with_body(s.client.put(s.url("Patient/p")), &b)
        .header("if-match", "W/\"7\"")
        .send()
        .await
        .unwrap();
    let d = expect_outcome(r, 412).await;
    assert!(d.contains("version 1"), "{d}");
    let r = with_body(s.client.put(s.url("Patient/p")), &b)
        .header("if-match", "W/\"1\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // If-Match on a resource that does not exist.
    let r = with_body(s.client.put(s.url("Patient/q")), &pat("q"))
        .header("if-match", "W/\"1\"")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 412).await;
    let r = with_body(s.client.put(s.url("Patient/p")), &b)
        .header("if-match", "garbage")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 400).await;
    // Delete with a stale If-Match.
    let r = s
        .client
        .delete(s.url("Patient/p"))
        .header("if-match", "W/\"1\"")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 412).await;
    let r = s
        .client
        .get(s.url("Patient/p"))
        .header("if-none-match", "W/\"2\"")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 304);
}

#[tokio::test]
async fn prefer_return() {
    let s = InProcess::start().await;
    let r = with_body(s.client.put(s.url("Patient/a")), &pat("a"))
        .header("prefer", "return=minimal")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    assert!(r.headers().contains_key("location"));
    assert_eq!(r.text().await.unwrap(), "");
    let r = with_body(s.client.put(s.url("Patient/b")), &pat("b"))
        .header("prefer", "return=OperationOutcome")
        .send()
        .await
        .unwrap();
    let (st, v) = status_json(r).await;
    assert_eq!(st, 201);
    assert_eq!(v["resourceType"], "OperationOutcome");
    assert_eq!(v["issue"][0]["severity"], "information");
    let r = with_body(s.client.post(s.url("Patient")), &pat("c"))
        .header("prefer", "return=representation")
        .send()
        .await
        .unwrap();
    let (_, v) = status_json(r).await;
    assert_eq!(v["resourceType"], "Patient");
}

#[tokio::test]
async fn conditional_create() {
    let s = InProcess::start().await;
    let p =
        json!({"resourceType": "Patient", "identifier": [{"system": "urn:mrn", "value": "42"}]});
    let create = || {
        with_body(s.client.post(s.url("Patient")), &p)
            .header("if-none-exist", "identifier=urn:mrn|42")
            .send()
    };
    let r = create().await.unwrap();
    assert_eq!(r.status(), 201);
    let (_, first) = status_json(r).await;
    let r = create().await.unwrap();
    assert_eq!(r.status(), 200);
    let (_, second) = status_json(r).await;
    assert_eq!(first["id"], second["id"]);
    // Two matches: 412, nothing created.
    post(&s, "Patient", &p).await;
    let seq = s.store.last_seq();
    expect_outcome(create().await.unwrap(), 412).await;
    assert_eq!(s.store.last_seq(), seq);
    // A condition without supported parameters is refused.
    let r = with_body(s.client.post(s.url("Patient")), &p)
        .header("if-none-exist", "nonsense=smith")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 400).await;
}

#[tokio::test]
async fn conditional_update_and_delete() {
    let s = InProcess::start().await;
    let p = |active: bool| json!({"resourceType": "Patient", "active": active, "identifier": [{"system": "urn:mrn", "value": "7"}]});
    // No match, no id: created with a server id.
    let r = put(&s, "Patient?identifier=urn:mrn|7", &p(true)).await;
    assert_eq!(r.status(), 201);
    let (_, a) = status_json(r).await;
    // One match: updated.
    let r = put(&s, "Patient?identifier=urn:mrn%7C7", &p(false)).await;
    assert_eq!(r.status(), 200);
    let (_, b) = status_json(r).await;
    assert_eq!(a["id"], b["id"]);
    assert_eq!(b["meta"]["versionId"], "2");
    // One match but a different id in the body: 400.
    let mut wrong = p(true);
    wrong["id"] = json!("other");
    expect_outcome(put(&s, "Patient?identifier=urn:mrn|7", &wrong).await, 400).await;
    // No match with an id in the body: created with that id.
    let mut c = json!({"resourceType": "Patient", "id": "given", "identifier": [{"system": "urn:mrn", "value": "8"}]});
    assert_eq!(
        put(&s, "Patient?identifier=urn:mrn|8", &c).await.status(),
        201
    );
    assert_eq!(get(&s, "Patient/given").await.status(), 200);
    // Two matches: 412.
    c["id"] = json!("given2");
    put(&s, "Patient/given2", &c).await;
    expect_outcome(put(&s, "Patient?identifier=urn:mrn|8", &c).await, 412).await;
    // Conditional delete of a single match.
    assert_eq!(
        delete(&s, "Patient?identifier=urn:mrn|7").await.status(),
        204
    );
    expect_outcome(
        get(&s, &format!("Patient/{}", a["id"].as_str().unwrap())).await,
        410,
    )
    .await;
    expect_outcome(delete(&s, "Patient?identifier=urn:mrn|8").await, 412).await;
}

#[tokio::test]
async fn bad_input_is_refused_and_changes_nothing() {
    use reqwest::Method as M;
    let s = InProcess::start().await;
    put(&s, "Patient/p", &pat("p")).await;
    let seq = s.store.last_seq();
    // (method, path, content type, body, expected status)
    let cases: &[(M, &str, &str, &str, u16)] = &[
        (M::POST, "Patient", FHIR_JSON, "{not json", 400),
        (M::POST, "Patient", FHIR_JSON, "[1,2]", 400),
        (M::POST, "Patient", FHIR_JSON, "", 400),
        (M::POST, "Patient", FHIR_JSON, r#"{"active":true}"#, 422),
        (M::POST, "Foo", FHIR_JSON, r#"{"resourceType":"Foo"}"#, 422),
        (
            M::POST,
            "Patient",
            FHIR_JSON,
            r#"{"resourceType":"Observation"}"#,
            400,
        ),
        (
            M::PUT,
            "Patient/p",
            FHIR_JSON,
            r#"{"resourceType":"Patient","id":"q"}"#,
            422,
        ),
        (
            M::PUT,
            "Patient/p",
            FHIR_JSON,
            r#"{"resourceType":"Patient"}"#,
            400,
        ),
        (
            M::PUT,
            "Patient/bad_id",
            FHIR_JSON,
            r#"{"resourceType":"Patient","id":"bad_id"}"#,
            422,
        ),
        (
            M::PUT,
            "Patient/ok",
            FHIR_JSON,
            r#"{"resourceType":"Patient","id":"no spaces"}"#,
            422,
        ),
        (
            M::PUT,
            "Patient/p",
            FHIR_JSON,
            r#"{"resourceType":"Patient","id":"p","meta":3}"#,
            422,
        ),
        (
            M::POST,
            "Patient",
            "application/fhir+xml",
            "<Patient/>",
            415,
        ),
        (M::GET, "Patient/p?_format=xml", FHIR_JSON, "", 406),
        (M::GET, "Nope/1", FHIR_JSON, "", 404),
        (M::GET, "Patient/missing", FHIR_JSON, "", 404),
        (M::GET, "Patient/p/_history/9", FHIR_JSON, "", 404),
        (M::GET, "Patient/p/_history/x", FHIR_JSON, "", 404),
        (M::PATCH, "Patient/p", FHIR_JSON, "", 405),
    ];
    for (method, path, ct, body, status) in cases {
        let r = s
            .client
            .request(method.clone(), s.url(path))
            .header("content-type", *ct)
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let st = r.status().as_u16();
        assert_eq!(st, *status, "{method} {path} {body}");
        expect_outcome(r, *status).await;
    }
    let r = s
        .client
        .get(s.url("Patient/p"))
        .header("accept", "application/fhir+xml")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 406).await;
    let outside = format!("{}/nothing-here", s.base.trim_end_matches("/fhir"));
    expect_outcome(s.client.get(outside).send().await.unwrap(), 404).await;
    assert_eq!(s.store.last_seq(), seq, "bad input changed the store");
}

#[tokio::test]
async fn body_limit_gives_413() {
    let opts = fhirsync_testkit::server::Options {
        api: fhirsync_api::ApiConfig {
            body_bytes_max: 1000,
            ..Default::default()
        },
        ..Default::default()
    };
    let s = InProcess::start_with(opts).await;
    let big = json!({"resourceType": "Patient", "id": "big", "text": {"div": "x".repeat(2000)}});
    expect_outcome(put(&s, "Patient/big", &big).await, 413).await;
    // Also when the length is not announced up front (chunked body).
    let addr = s
        .base
        .trim_start_matches("http://")
        .trim_end_matches("/fhir")
        .to_owned();
    let body = big.to_string();
    let req = format!(
        "PUT /fhir/Patient/big HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/fhir+json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut conn = tokio::net::TcpStream::connect(&addr).await.unwrap();
    conn.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    let _ = conn.read_to_string(&mut resp).await;
    assert!(resp.starts_with("HTTP/1.1 413"), "{resp}");
    assert!(resp.contains("OperationOutcome"), "{resp}");
    assert_eq!(s.store.last_seq(), 0);
}

#[tokio::test]
async fn capability_statement_tells_the_truth() {
    let before = fhirsync_core::instant::format_instant(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64,
    );
    let s = InProcess::start().await;
    let (st, c) = status_json(get(&s, "metadata").await).await;
    assert_eq!(st, 200);
    assert_eq!(c["resourceType"], "CapabilityStatement");
    // The node's start, not a fixed day; the crate's version.
    let date = c["date"].as_str().unwrap();
    assert!(date >= before.as_str(), "{date} is before {before}");
    assert_eq!(c["software"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(c["fhirVersion"], "4.0.1");
    let rest = &c["rest"][0];
    let types: Vec<&str> = rest["resource"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["type"].as_str().unwrap())
        .collect();
    assert_eq!(types.len(), fhirsync_core::resource::RESOURCE_TYPES.len());
    let sys: Vec<&str> = rest["interaction"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["code"].as_str().unwrap())
        .collect();
    assert!(sys.contains(&"transaction") && sys.contains(&"batch"));
    // Every declared search parameter is accepted under strict handling.
    for p in rest["resource"][0]["searchParam"].as_array().unwrap() {
        let name = p["name"].as_str().unwrap();
        let value = match p["type"].as_str().unwrap() {
            "date" => "ge2020-01-01",
            "reference" => "Patient/x",
            "number" | "quantity" => "5",
            _ => "x",
        };
        let r = s
            .client
            .get(s.url(&format!("Account?{name}={value}")))
            .header("prefer", "handling=strict")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "declared parameter {name} refused");
    }
}
