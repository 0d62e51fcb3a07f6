//! API authentication against a real server on 127.0.0.1: bearer tokens
//! with SMART scopes, SMART Backend Services (ES384 and RS384 assertions),
//! anonymous access off. Refused requests get 401/403 with an
//! OperationOutcome and change nothing.

mod common;

use std::sync::Arc;

use common::*;
use fhirsync_api::auth::{token_hash, Auth, ClientEntry, Scopes, TokenEntry};
use fhirsync_api::{ApiConfig, ChildConfig};
use fhirsync_core::clock::{Clock, ManualClock};
use fhirsync_testkit::server::Options;
use fhirsync_testkit::smart::Client;
use serde_json::{json, Value};

fn token(name: &str, scopes: &str) -> TokenEntry {
    TokenEntry {
        name: name.into(),
        sha256: token_hash(&format!("secret-{name}")),
        scopes: Scopes::parse(scopes).unwrap(),
    }
}

fn client(c: &Client, scopes: &str) -> ClientEntry {
    ClientEntry {
        client_id: c.client_id.clone(),
        jwks: serde_json::from_value(c.jwks()).unwrap(),
        scopes: Scopes::parse(scopes).unwrap(),
    }
}

async fn server(auth: Auth) -> InProcess {
    InProcess::start_with(Options {
        api: ApiConfig {
            auth: Arc::new(auth),
            ..ApiConfig::default()
        },
        children: vec![ChildConfig {
            node_id: "clinic".into(),
            token: "edge-token".into(),
            pull: true,
            push: true,
            push_types: Vec::new(),
        }],
        ..Options::default()
    })
    .await
}

fn bearer(rb: reqwest::RequestBuilder, name: &str) -> reqwest::RequestBuilder {
    rb.bearer_auth(format!("secret-{name}"))
}

/// GET a path of the API with a bearer token.
async fn get_as(s: &InProcess, path: &str, token: &str) -> reqwest::Response {
    s.client
        .get(s.url(path))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn refused_requests_get_401_or_403_and_change_nothing() {
    let s = server(Auth::new(
        false,
        vec![
            token("reader", "system/*.rs"),
            token("writer", "system/Patient.cruds"),
            token("labs", "system/Observation.cr"),
        ],
        Vec::new(),
    ))
    .await;
    let pat = json!({"resourceType": "Patient", "id": "p1", "active": true});
    let r = bearer(with_body(s.client.put(s.url("Patient/p1")), &pat), "writer")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let seq = s.store.last_seq();

    // No token, a malformed header, an unknown token: 401 with a challenge.
    let r = get(&s, "Patient/p1").await;
    assert_eq!(r.headers()["www-authenticate"], "Bearer realm=\"fhir\"");
    assert!(expect_outcome(r, 401)
        .await
        .contains("needs a bearer token"));
    let r = s
        .client
        .get(s.url("Patient/p1"))
        .header("authorization", "Basic abc")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 401).await;
    let r = get_as(&s, "Patient/p1", "guess").await;
    assert!(expect_outcome(r, 401)
        .await
        .contains("unknown or has expired"));
    expect_outcome(
        put(
            &s,
            "Patient/p2",
            &json!({"resourceType": "Patient", "id": "p2"}),
        )
        .await,
        401,
    )
    .await;
    expect_outcome(delete(&s, "Patient/p1").await, 401).await;

    // Wrong scopes: 403 naming the scope needed.
    let changed = json!({"resourceType": "Patient", "id": "p1", "active": false});
    let r = bearer(
        with_body(s.client.put(s.url("Patient/p1")), &changed),
        "reader",
    )
    .send()
    .await
    .unwrap();
    let why = expect_outcome(r, 403).await;
    assert!(
        why.contains("token:reader") && why.contains("system/Patient.u"),
        "{why}"
    );
    let r = bearer(s.client.delete(s.url("Patient/p1")), "reader")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 403).await;
    let r = bearer(s.client.get(s.url("Patient/p1")), "labs")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 403).await;
    let r = bearer(s.client.get(s.url("Observation")), "writer")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 403).await;
    let r = bearer(s.client.get(s.url("_history")), "writer")
        .send()
        .await
        .unwrap();
    expect_outcome(r, 403).await;
    // A transaction is checked entry by entry before anything runs.
    let tx = json!({"resourceType": "Bundle", "type": "transaction", "entry": [
        {"resource": changed, "request": {"method": "PUT", "url": "Patient/p1"}},
        {"resource": {"resourceType": "Observation", "status": "final", "code": {"text": "x"}},
         "request": {"method": "POST", "url": "Observation"}}]});
    let r = bearer(with_body(s.client.post(s.url("")), &tx), "writer")
        .send()
        .await
        .unwrap();
    let why = expect_outcome(r, 403).await;
    assert!(
        why.starts_with("entry 1:") && why.contains("system/Observation.c"),
        "{why}"
    );
    // A child's edge token is for its feed and pushes only.
    let r = get_as(&s, "Patient/p1", "edge-token").await;
    assert!(expect_outcome(r, 403)
        .await
        .contains("$changes, $apply, $summary and $current only"));
    // The admin API is closed without an admin token when anonymous is off.
    let r = s
        .client
        .get(s.base.replace("/fhir", "/admin/status"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    assert_eq!(s.store.last_seq(), seq, "a refused request wrote something");
    let r = bearer(s.client.get(s.url("Patient/p1")), "reader")
        .send()
        .await
        .unwrap();
    let (st, v) = status_json(r).await;
    assert_eq!(
        (st, v["active"].clone(), v["meta"]["versionId"].clone()),
        (200, json!(true), json!("1"))
    );
    let r = bearer(s.client.get(s.url("Patient/p2")), "reader")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    // Allowed: reader searches, writer writes; metadata is open.
    let r = bearer(s.client.get(s.url("Patient?active=true")), "reader")
        .send()
        .await
        .unwrap();
    let (st, v) = status_json(r).await;
    assert_eq!((st, v["total"].clone()), (200, json!(1)));
    let r = bearer(
        with_body(s.client.put(s.url("Patient/p1")), &changed),
        "writer",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(get(&s, "metadata").await.status(), 200);
}

#[tokio::test]
async fn anonymous_access_only_when_enabled() {
    let open = InProcess::start().await;
    assert_eq!(
        put(
            &open,
            "Patient/a",
            &json!({"resourceType": "Patient", "id": "a"})
        )
        .await
        .status(),
        201
    );
    let closed = server(Auth::new(false, Vec::new(), Vec::new())).await;
    expect_outcome(get(&closed, "Patient").await, 401).await;
}

fn origin(s: &InProcess) -> String {
    s.base.trim_end_matches("/fhir").to_owned()
}

async fn token_request(s: &InProcess, form: String) -> (u16, Value) {
    let r = s
        .client
        .post(format!("{}/auth/token", origin(s)))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    status_json(r).await
}

#[tokio::test]
async fn backend_services_issue_short_lived_tokens_once_per_assertion() {
    let es = Client::es384("lab-system");
    let rs = Client::rs384("registry");
    let other = Client::es384("lab-system");
    let clock = Arc::new(ManualClock::new(fhirsync_core::clock::SystemClock.now_ms()));
    let mut auth = Auth::new(
        false,
        Vec::new(),
        vec![
            client(&es, "system/Patient.rs system/Observation.cruds"),
            client(&rs, "system/*.rs"),
        ],
    );
    auth.clock = clock.clone();
    let s = server(auth).await;
    let aud = format!("{}/auth/token", origin(&s));

    // Discovery is open.
    let (st, conf) = status_json(get(&s, ".well-known/smart-configuration").await).await;
    assert_eq!(st, 200);
    assert_eq!(conf["token_endpoint"], aud.as_str());

    // A good ES384 assertion: a token with the granted part of the scope.
    let a = es.assertion(&aud, 240, "jti-1");
    let (st, t) = token_request(&s, es.token_form(&a, "system/Patient.cruds")).await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["token_type"], "bearer");
    assert_eq!(t["expires_in"], 300);
    assert_eq!(t["scope"], "system/Patient.rs");
    let tok = t["access_token"].as_str().unwrap().to_owned();
    let r = get_as(&s, "Patient", &tok).await;
    assert_eq!(r.status(), 200);
    let r = with_body(
        s.client.put(s.url("Patient/x")),
        &json!({"resourceType": "Patient", "id": "x"}),
    )
    .bearer_auth(&tok)
    .send()
    .await
    .unwrap();
    expect_outcome(r, 403).await;

    // The same assertion again: its jti was used.
    let (st, e) = token_request(&s, es.token_form(&a, "system/Patient.rs")).await;
    assert_eq!((st, e["error"].clone()), (401, json!("invalid_client")));
    assert!(
        e["error_description"]
            .as_str()
            .unwrap()
            .contains("used before"),
        "{e}"
    );

    // Expired; too long-lived; wrong audience; signed by another key; HS256; no jti; unknown client.
    let cases = [
        (es.assertion(&aud, -60, "jti-2"), "ExpiredSignature"),
        (es.assertion(&aud, 600, "jti-3"), "at most 300"),
        (es.assertion("https://elsewhere/token", 240, "jti-4"), "InvalidAudience"),
        (other.assertion(&aud, 240, "jti-5"), "refused"),
        (
            jsonwebtoken::encode(
                &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
                &json!({"iss": "lab-system", "sub": "lab-system", "aud": aud, "exp": 9999999999u64, "jti": "j6"}),
                &jsonwebtoken::EncodingKey::from_secret(b"k"),
            )
            .unwrap(),
            "only RS384 and ES384",
        ),
        (es.assertion_with(&aud, json!({"jti": null})), "no jti"),
        (Client::es384("stranger").assertion(&aud, 240, "jti-7"), "not registered"),
    ];
    for (a, want) in cases {
        let (st, e) = token_request(&s, es.token_form(&a, "system/Patient.rs")).await;
        assert_eq!(st, 401, "{want}: {e}");
        assert!(
            e["error_description"].as_str().unwrap().contains(want),
            "{want}: {e}"
        );
    }
    // A scope the client does not hold; a patient scope; another grant type.
    let (st, e) = token_request(
        &s,
        es.token_form(&es.assertion(&aud, 240, "jti-8"), "system/Encounter.r"),
    )
    .await;
    assert_eq!((st, e["error"].clone()), (400, json!("invalid_scope")));
    let (st, e) = token_request(
        &s,
        es.token_form(&es.assertion(&aud, 240, "jti-9"), "patient/*.read"),
    )
    .await;
    assert_eq!((st, e["error"].clone()), (400, json!("invalid_scope")));
    let (st, e) = token_request(&s, "grant_type=password&username=a".into()).await;
    assert_eq!(
        (st, e["error"].clone()),
        (400, json!("unsupported_grant_type"))
    );

    // RS384 works the same way.
    let (st, t) = token_request(
        &s,
        rs.token_form(&rs.assertion(&aud, 120, "r-1"), "system/*.read"),
    )
    .await;
    assert_eq!(st, 200, "{t}");
    assert_eq!(t["scope"], "system/*.rs");
    let rtok = t["access_token"].as_str().unwrap().to_owned();
    assert_eq!(get_as(&s, "Observation", &rtok).await.status(), 200);

    // Issued tokens expire.
    clock.set(clock.now_ms() + 301_000);
    let r = get_as(&s, "Patient", &tok).await;
    assert!(expect_outcome(r, 401).await.contains("expired"));
}
