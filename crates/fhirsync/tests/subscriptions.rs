//! Topic-based subscriptions against real receivers: a webhook server on
//! 127.0.0.1 (behind a TCP proxy that can go down), a real nats-server with
//! JetStream, and JWT users with per-subject permissions.

mod common;

use std::time::{Duration, Instant};

use common::*;
use fhirsync_core::subscription::{BACKPORT, EXT};
use fhirsync_nats::NatsConfig;
use fhirsync_subs::{NatsConnection, SubsConfig};
use fhirsync_testkit::hook::{event_numbers, note_type, HookReceiver, Received};
use fhirsync_testkit::nats::NatsServer;
use fhirsync_testkit::server::{InProcess, Options};
use fhirsync_testkit::tcp::{Link, TcpProxy};
use futures::StreamExt;
use serde_json::{json, Value};

fn quick() -> SubsConfig {
    SubsConfig {
        retry_delay_ms_min: 20,
        retry_delay_ms_max: 200,
        ..SubsConfig::default()
    }
}

async fn node(subs: SubsConfig, nats: Option<NatsConfig>) -> InProcess {
    InProcess::start_with(Options {
        subs: Some(subs),
        nats,
        ..Options::default()
    })
    .await
}

fn topic(id: &str, criteria: &str, interactions: &[&str]) -> Value {
    json!({
        "resourceType": "SubscriptionTopic",
        "id": id,
        "url": format!("http://example.org/topic/{id}"),
        "status": "active",
        "resourceTrigger": [{
            "resource": "http://hl7.org/fhir/StructureDefinition/Patient",
            "supportedInteraction": interactions,
            "fhirPathCriteria": criteria
        }],
        "canFilterBy": [{"resource": "Patient", "filterParameter": "gender"}]
    })
}

fn subscription(
    id: &str,
    topic_id: &str,
    channel: Value,
    content: &str,
    filter: Option<&str>,
) -> Value {
    let mut s = json!({
        "resourceType": "Subscription",
        "id": id,
        "status": "requested",
        "reason": "test",
        "criteria": format!("http://example.org/topic/{topic_id}"),
        "channel": channel,
    });
    s["channel"]["payload"] = json!("application/fhir+json");
    s["channel"]["_payload"] = json!({"extension": [{"url": format!("{BACKPORT}/backport-payload-content"), "valueCode": content}]});
    if let Some(f) = filter {
        s["_criteria"] = json!({"extension": [{"url": format!("{BACKPORT}/backport-filter-criteria"), "valueString": f}]});
    }
    s
}

fn rest_hook(url: &str) -> Value {
    json!({"type": "rest-hook", "endpoint": url, "header": ["Authorization: Bearer hook-secret"]})
}

fn nats_channel(kind: &str, subject: &str, connection: Option<&str>) -> Value {
    let mut c = json!({
        "type": "rest-hook",
        "_type": {"extension": [{"url": format!("{BACKPORT}/backport-channel-type"),
            "valueCoding": {"system": format!("{EXT}/channel-type"), "code": kind}}]},
        "endpoint": subject,
    });
    if let Some(name) = connection {
        c["extension"] = json!([{"url": format!("{EXT}/nats-connection"), "valueString": name}]);
    }
    c
}

async fn ok_put(s: &InProcess, path: &str, body: &Value) {
    let r = put(s, path, body).await;
    let st = r.status().as_u16();
    assert!(
        st == 200 || st == 201,
        "PUT {path}: {st} {}",
        r.text().await.unwrap_or_default()
    );
}

/// The reference scenario's topic: a Patient created or updated with a name.
async fn put_named_topic(n: &InProcess) {
    let t = topic("named", "%current.name.exists()", &["create", "update"]);
    ok_put(n, "SubscriptionTopic/named", &t).await;
}

/// Waits until the subscription's stored status is `want`.
async fn wait_status(s: &InProcess, id: &str, want: &str, secs: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        let (_, b) = status_json(get(s, &format!("Subscription/{id}")).await).await;
        if b["status"] == want {
            return b;
        }
        if Instant::now() > deadline {
            panic!("Subscription/{id} not {want}: {b}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn events_of(got: &[Received]) -> Vec<u64> {
    got.iter()
        .filter(|r| note_type(&r.body) == "event-notification")
        .flat_map(|r| event_numbers(&r.body))
        .collect()
}

fn named(id: &str, name: Option<&str>, gender: &str) -> Value {
    let mut p = json!({"resourceType": "Patient", "id": id, "gender": gender});
    if let Some(n) = name {
        p["name"] = json!([{"family": n}]);
    }
    p
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reference_scenario_patient_name_exists() {
    let hook = HookReceiver::start().await;
    let n = node(quick(), None).await;
    put_named_topic(&n).await;
    ok_put(
        &n,
        "Subscription/s1",
        &subscription("s1", "named", rest_hook(&hook.url()), "full-resource", None),
    )
    .await;
    wait_status(&n, "s1", "active", 10).await;
    let got = hook.wait(10, "handshake", |g| !g.is_empty()).await;
    assert_eq!(note_type(&got[0].body), "handshake");
    assert_eq!(got[0].headers["authorization"], "Bearer hook-secret");
    assert_eq!(got[0].headers["content-type"], "application/fhir+json");

    ok_put(
        &n,
        "Patient/with-name",
        &named("with-name", Some("Otieno"), "female"),
    )
    .await;
    ok_put(&n, "Patient/no-name", &named("no-name", None, "female")).await;
    // a later event proves the nameless patient was passed over, not pending
    ok_put(
        &n,
        "Patient/with-name-2",
        &named("with-name-2", Some("Achieng"), "male"),
    )
    .await;
    let got = hook
        .wait(10, "two events", |g| events_of(g).len() >= 2)
        .await;
    assert_eq!(events_of(&got), vec![1, 2]);
    let first = got
        .iter()
        .find(|r| note_type(&r.body) == "event-notification")
        .unwrap();
    let b = &first.body;
    assert_eq!(b["resourceType"], "Bundle");
    assert_eq!(b["type"], "history");
    assert_eq!(b["entry"][0]["resource"]["resourceType"], "Parameters");
    assert_eq!(b["entry"][1]["resource"]["id"], "with-name");
    assert_eq!(b["entry"][1]["request"]["method"], "POST");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        events_of(&hook.received()),
        vec![1, 2],
        "nothing more, nothing twice"
    );

    // $status and $events (replay by number, other content)
    let (st, s) = status_json(get(&n, "Subscription/s1/$status").await).await;
    assert_eq!(st, 200);
    let params = &s["entry"][0]["resource"]["parameter"];
    let p = |name: &str| {
        params
            .as_array()
            .unwrap()
            .iter()
            .find(|x| x["name"] == name)
            .cloned()
            .unwrap()
    };
    assert_eq!(p("status")["valueCode"], "active");
    assert_eq!(p("type")["valueCode"], "query-status");
    assert_eq!(p("events-since-subscription-start")["valueString"], "2");
    let (st, ev) = status_json(
        get(
            &n,
            "Subscription/s1/$events?eventsSinceNumber=2&content=id-only",
        )
        .await,
    )
    .await;
    assert_eq!(st, 200);
    assert_eq!(event_numbers(&ev), vec![2]);
    assert_eq!(
        ev["entry"][1]["fullUrl"]
            .as_str()
            .unwrap()
            .rsplit('/')
            .next(),
        Some("with-name-2")
    );
    assert!(
        ev["entry"][1].get("resource").is_none(),
        "id-only carries no resource"
    );
    let (_, all) = status_json(get(&n, "Subscription/s1/$events").await).await;
    assert_eq!(event_numbers(&all), vec![1, 2]);
    expect_outcome(
        get(&n, "Subscription/s1/$events?eventsSinceNumber=x").await,
        400,
    )
    .await;
    expect_outcome(get(&n, "Subscription/nope/$status").await, 404).await;
    // the admin API and metrics show the subscription
    let edges = admin(&n, "edges").await;
    assert!(edges.to_string().contains("subscription:s1"), "{edges}");
    assert!(metrics(&n)
        .await
        .contains("fhirsync_edge_applied_total{edge=\"subscription:s1\",direction=\"notify\"} 2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updates_that_start_and_stop_matching_deletes_and_filters() {
    let hook = HookReceiver::start().await;
    let n = node(quick(), None).await;
    // an event when the patient becomes active or stops being active (a
    // delete of an active patient counts)
    let changed =
        "%current.where(active = true).exists() != %previous.where(active = true).exists()";
    ok_put(
        &n,
        "SubscriptionTopic/active",
        &topic("active", changed, &["create", "update", "delete"]),
    )
    .await;
    ok_put(
        &n,
        "Subscription/women",
        &subscription(
            "women",
            "active",
            rest_hook(&hook.url()),
            "id-only",
            Some("Patient?gender=female"),
        ),
    )
    .await;
    wait_status(&n, "women", "active", 10).await;
    let mut p = named("p", Some("A"), "female");
    p["active"] = json!(false);
    ok_put(&n, "Patient/p", &p).await; // created inactive: no event
    p["active"] = json!(true);
    ok_put(&n, "Patient/p", &p).await; // 1: became active
    p["name"] = json!([{"family": "B"}]);
    ok_put(&n, "Patient/p", &p).await; // still active: no event
    p["active"] = json!(false);
    ok_put(&n, "Patient/p", &p).await; // 2: stopped
    p["active"] = json!(true);
    ok_put(&n, "Patient/p", &p).await; // 3: active again
    let mut m = named("m", Some("C"), "male");
    m["active"] = json!(true);
    ok_put(&n, "Patient/m", &m).await; // filtered out (male)
    assert_eq!(delete(&n, "Patient/p").await.status().as_u16(), 204); // 4: active patient deleted
    let got = hook
        .wait(10, "four events", |g| events_of(g).len() >= 4)
        .await;
    assert_eq!(events_of(&got), vec![1, 2, 3, 4]);
    let methods: Vec<String> = got
        .iter()
        .filter(|r| note_type(&r.body) == "event-notification")
        .map(|r| {
            r.body["entry"][1]["request"]["method"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(methods, ["PUT", "PUT", "PUT", "DELETE"]);
    let focus: Vec<String> = got
        .iter()
        .filter(|r| note_type(&r.body) == "event-notification")
        .map(|r| {
            r.body["entry"][1]["fullUrl"]
                .as_str()
                .unwrap()
                .rsplit('/')
                .next()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(
        focus,
        ["p", "p", "p", "p"],
        "the male patient was filtered out"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(events_of(&hook.received()).len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_down_for_a_while_gets_every_event_after_in_order() {
    let hook = HookReceiver::start().await;
    let proxy = TcpProxy::start(&hook.addr).await;
    let n = node(
        SubsConfig {
            retry_max: 1000,
            ..quick()
        },
        None,
    )
    .await;
    put_named_topic(&n).await;
    let url = format!("http://{}/hook", proxy.addr);
    let mut s = subscription("s", "named", rest_hook(&url), "full-resource", None);
    s["channel"]["extension"] =
        json!([{"url": format!("{BACKPORT}/backport-max-count"), "valueUnsignedInt": 5}]);
    ok_put(&n, "Subscription/s", &s).await;
    wait_status(&n, "s", "active", 10).await;
    proxy.set(Link::Down);
    for i in 0..30 {
        ok_put(
            &n,
            &format!("Patient/p{i}"),
            &named(&format!("p{i}"), Some("X"), "female"),
        )
        .await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        events_of(&hook.received()).is_empty(),
        "the receiver was down"
    );
    // the receiver comes back but answers 503 for a while, then recovers
    hook.answer(503);
    proxy.set(Link::Up);
    tokio::time::sleep(Duration::from_millis(300)).await;
    hook.answer(200);
    let got = hook
        .wait(30, "30 events", |g| events_of(g).len() >= 30)
        .await;
    let nums = events_of(&got);
    assert_eq!(
        nums,
        (1..=30).collect::<Vec<u64>>(),
        "in order, none lost, none twice"
    );
    let ids: Vec<String> = got
        .iter()
        .filter(|r| note_type(&r.body) == "event-notification")
        .flat_map(|r| {
            r.body["entry"].as_array().unwrap()[1..]
                .iter()
                .map(|e| e["resource"]["id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .collect();
    assert_eq!(ids, (0..30).map(|i| format!("p{i}")).collect::<Vec<_>>());
    assert!(
        got.iter().any(|r| event_numbers(&r.body).len() > 1),
        "batched up to max-count after the outage"
    );
    assert_eq!(wait_status(&n, "s", "active", 1).await["status"], "active");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_run_out_into_error_status_and_reactivation_loses_nothing() {
    let hook = HookReceiver::start().await;
    let n = node(
        SubsConfig {
            retry_max: 3,
            ..quick()
        },
        None,
    )
    .await;
    put_named_topic(&n).await;
    ok_put(
        &n,
        "Subscription/s",
        &subscription("s", "named", rest_hook(&hook.url()), "id-only", None),
    )
    .await;
    wait_status(&n, "s", "active", 10).await;
    hook.answer(500);
    ok_put(&n, "Patient/a", &named("a", Some("A"), "female")).await;
    let failed = wait_status(&n, "s", "error", 10).await;
    let why = failed["error"].as_str().unwrap();
    assert!(
        why.contains("HTTP 500") && why.contains("3 attempts"),
        "{why}"
    );
    let (_, st) = status_json(get(&n, "Subscription/s/$status").await).await;
    assert!(st.to_string().contains("HTTP 500"), "{st}");
    ok_put(&n, "Patient/b", &named("b", Some("B"), "female")).await; // still counted while in error
    hook.answer(200);
    let mut again = failed.clone();
    again["status"] = json!("requested");
    again.as_object_mut().unwrap().remove("error");
    ok_put(&n, "Subscription/s", &again).await;
    wait_status(&n, "s", "active", 10).await;
    let got = hook
        .wait(10, "both events", |g| events_of(g).len() >= 2)
        .await;
    assert_eq!(events_of(&got), vec![1, 2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_topics_and_subscriptions_are_refused() {
    let n = node(quick(), None).await;
    let mut t = topic("t", "%current.name.exists(", &["create"]);
    expect_outcome(put(&n, "SubscriptionTopic/t", &t).await, 422).await;
    t = topic("t", "%current.name.nosuchfn()", &["create"]);
    expect_outcome(put(&n, "SubscriptionTopic/t", &t).await, 422).await;
    t = topic("t", "name.exists()", &["read"]);
    expect_outcome(put(&n, "SubscriptionTopic/t", &t).await, 422).await;
    ok_put(
        &n,
        "SubscriptionTopic/t",
        &topic("t", "name.exists()", &["create"]),
    )
    .await;
    for (ch, content) in [
        (
            json!({"type": "email", "endpoint": "mailto:a@b"}),
            "id-only",
        ),
        (
            json!({"type": "rest-hook", "endpoint": "ftp://x"}),
            "id-only",
        ),
        (
            json!({"type": "rest-hook", "endpoint": "http://x", "header": ["no colon"]}),
            "id-only",
        ),
        (rest_hook("http://127.0.0.1:9/h"), "everything"),
        (nats_channel("nats", "a.>", None), "empty"),
    ] {
        let r = put(
            &n,
            "Subscription/bad",
            &subscription("bad", "t", ch, content, None),
        )
        .await;
        expect_outcome(r, 422).await;
    }
    assert_eq!(
        get(&n, "Subscription/bad").await.status().as_u16(),
        404,
        "nothing stored"
    );
    // a filter the topic does not allow, an unknown topic: error status
    ok_put(
        &n,
        "Subscription/f",
        &subscription(
            "f",
            "t",
            rest_hook("http://127.0.0.1:9/h"),
            "empty",
            Some("Patient?birthdate=2000"),
        ),
    )
    .await;
    let f = wait_status(&n, "f", "error", 10).await;
    assert!(f["error"].as_str().unwrap().contains("canFilterBy"), "{f}");
    ok_put(
        &n,
        "Subscription/u",
        &subscription(
            "u",
            "missing",
            rest_hook("http://127.0.0.1:9/h"),
            "empty",
            None,
        ),
    )
    .await;
    let u = wait_status(&n, "u", "error", 10).await;
    assert!(
        u["error"]
            .as_str()
            .unwrap()
            .contains("no SubscriptionTopic"),
        "{u}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn nats_core_best_effort_and_jetstream_at_least_once_with_a_crashing_consumer() {
    let server = NatsServer::start().unwrap();
    let mut nc = NatsConfig::new(vec![server.url()]);
    nc.publish = false;
    let n = node(quick(), Some(nc)).await;
    let client = async_nats::connect(server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "NOTIFY".into(),
        subjects: vec!["notify.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut live = client.subscribe("live.patients").await.unwrap();
    client.flush().await.unwrap();
    put_named_topic(&n).await;
    ok_put(
        &n,
        "Subscription/core",
        &subscription(
            "core",
            "named",
            nats_channel("nats", "live.patients", None),
            "id-only",
            None,
        ),
    )
    .await;
    ok_put(
        &n,
        "Subscription/js",
        &subscription(
            "js",
            "named",
            nats_channel("nats-jetstream", "notify.patients", None),
            "full-resource",
            None,
        ),
    )
    .await;
    wait_status(&n, "core", "active", 10).await;
    wait_status(&n, "js", "active", 10).await;
    let hs: Value = serde_json::from_slice(&live.next().await.unwrap().payload).unwrap();
    assert_eq!(note_type(&hs), "handshake");
    for i in 0..10 {
        ok_put(
            &n,
            &format!("Patient/p{i}"),
            &named(&format!("p{i}"), Some("N"), "female"),
        )
        .await;
    }
    let mut core_events = Vec::new();
    while core_events.len() < 10 {
        let m = tokio::time::timeout(Duration::from_secs(10), live.next())
            .await
            .expect("core event")
            .unwrap();
        let b: Value = serde_json::from_slice(&m.payload).unwrap();
        core_events.extend(event_numbers(&b));
    }
    assert_eq!(core_events, (1..=10).collect::<Vec<u64>>());

    // a consumer takes the JetStream notifications and crashes before acking
    use async_nats::jetstream::consumer::{pull, AckPolicy};
    let stream = js.get_stream("NOTIFY").await.unwrap();
    let cfg = pull::Config {
        durable_name: Some("reader".into()),
        ack_policy: AckPolicy::Explicit,
        ack_wait: Duration::from_secs(1),
        ..Default::default()
    };
    let consumer = stream.create_consumer(cfg.clone()).await.unwrap();
    let mut batch = consumer
        .fetch()
        .max_messages(100)
        .expires(Duration::from_secs(2))
        .messages()
        .await
        .unwrap();
    let mut seen_first = Vec::new();
    while let Some(Ok(m)) = batch.next().await {
        let b: Value = serde_json::from_slice(&m.payload).unwrap();
        seen_first.extend(event_numbers(&b));
        // crash: no ack
    }
    assert_eq!(seen_first, (1..=10).collect::<Vec<u64>>());
    drop(consumer);
    // the restarted consumer gets every notification again and acks them
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let consumer = stream.get_consumer::<pull::Config>("reader").await.unwrap();
    let mut again = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while again.len() < 10 && Instant::now() < deadline {
        let mut batch = consumer
            .fetch()
            .max_messages(100)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .unwrap();
        while let Some(Ok(m)) = batch.next().await {
            let b: Value = serde_json::from_slice(&m.payload).unwrap();
            if note_type(&b) == "event-notification" {
                again.extend(event_numbers(&b));
                assert_eq!(b["entry"][1]["resource"]["resourceType"], "Patient");
            }
            m.ack().await.unwrap();
        }
    }
    again.sort_unstable();
    again.dedup();
    assert_eq!(
        again,
        (1..=10).collect::<Vec<u64>>(),
        "redelivered after the crash"
    );
    let info = stream.clone().info().await.unwrap().clone();
    assert_eq!(
        info.state.messages, 11,
        "handshake + 10 events, none published twice"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jwt_user_denied_a_subject_is_reported_in_the_status() {
    let dir = tempfile::tempdir().unwrap();
    let auth = fhirsync_testkit::nats_jwt::Authority::new();
    let server = NatsServer::start_with(&auth.server_config()).unwrap();
    let creds = dir.path().join("joe.creds");
    std::fs::write(&creds, auth.user_creds("joe", &["joe.>"])).unwrap();
    let admin_creds = dir.path().join("admin.creds");
    std::fs::write(&admin_creds, auth.user_creds_with("admin", &[">"], &[">"])).unwrap();
    let joe = NatsConnection {
        name: "joe".into(),
        servers: vec![server.url()],
        credentials_file: Some(creds),
        ..Default::default()
    };
    let n = node(
        SubsConfig {
            retry_max: 3,
            nats: vec![joe],
            ..quick()
        },
        None,
    )
    .await;
    let watcher = async_nats::ConnectOptions::new()
        .credentials_file(&admin_creds)
        .await
        .unwrap()
        .connect(server.url())
        .await
        .unwrap();
    let mut joe_msgs = watcher.subscribe("joe.message").await.unwrap();
    watcher.flush().await.unwrap();
    put_named_topic(&n).await;
    ok_put(
        &n,
        "Subscription/to-joe",
        &subscription(
            "to-joe",
            "named",
            nats_channel("nats", "joe.message", Some("joe")),
            "id-only",
            None,
        ),
    )
    .await;
    ok_put(
        &n,
        "Subscription/to-pam",
        &subscription(
            "to-pam",
            "named",
            nats_channel("nats", "pam.message", Some("joe")),
            "id-only",
            None,
        ),
    )
    .await;
    wait_status(&n, "to-joe", "active", 10).await;
    let denied = wait_status(&n, "to-pam", "error", 15).await;
    let why = denied["error"].as_str().unwrap().to_ascii_lowercase();
    assert!(
        why.contains("denied") && why.contains("pam.message"),
        "{why}"
    );
    ok_put(&n, "Patient/a", &named("a", Some("A"), "female")).await;
    let mut nums = Vec::new();
    while nums.is_empty() {
        let m = tokio::time::timeout(Duration::from_secs(10), joe_msgs.next())
            .await
            .expect("joe event")
            .unwrap();
        let b: Value = serde_json::from_slice(&m.payload).unwrap();
        nums.extend(event_numbers(&b));
    }
    assert_eq!(nums, vec![1]);
    let (_, st) = status_json(get(&n, "Subscription/to-pam/$status").await).await;
    let text = st.to_string().to_ascii_lowercase();
    assert!(
        text.contains("\"error\"") && text.contains("permissions violation"),
        "{st}"
    );
    // the denied subscription still counted its event: nothing is lost
    assert!(
        text.contains("\"events-since-subscription-start\",\"valuestring\":\"1\""),
        "{st}"
    );
}

/// (event number, focus reference) pairs of a notification or `$events` Bundle.
fn event_focus(bundle: &Value) -> Vec<(u64, String)> {
    bundle["entry"][0]["resource"]["parameter"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["name"] == "notification-event")
        .filter_map(|p| {
            let parts = p["part"].as_array()?;
            let num = parts.iter().find(|x| x["name"] == "event-number")?["valueString"]
                .as_str()?
                .parse()
                .ok()?;
            let focus = parts.iter().find(|x| x["name"] == "focus")?["valueReference"]["reference"]
                .as_str()?;
            // the base differs across restarts (same port), keep Type/id/_history/vid
            let tail = focus.split("/fhir/").nth(1)?.to_owned();
            Some((num, tail))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigkill_during_delivery_loses_and_renumbers_nothing() {
    use fhirsync_testkit::NodeProcess;
    const BIN: &str = env!("CARGO_BIN_EXE_fhirsync");
    const PATIENTS: u64 = 1500;
    let dir = tempfile::tempdir().unwrap();
    let hook = HookReceiver::start().await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let data = dir.path().join("node");
    let start = || NodeProcess::spawn_at(std::path::Path::new(BIN), &data, &listen, &[]).unwrap();
    let mut node = start();
    let base = node.base.clone();
    let http = reqwest::Client::new();
    let (h2, b2) = (http.clone(), base.clone());
    let put_json = move |path: String, body: Value| {
        let (http, base) = (h2.clone(), b2.clone());
        async move {
            http.put(format!("{base}/{path}"))
                .header("content-type", "application/fhir+json")
                .body(body.to_string())
                .send()
                .await
        }
    };
    assert!(put_json(
        "SubscriptionTopic/named".into(),
        topic("named", "%current.name.exists()", &["create", "update"])
    )
    .await
    .unwrap()
    .status()
    .is_success());
    let mut s = subscription("s", "named", rest_hook(&hook.url()), "id-only", None);
    s["channel"]["extension"] =
        json!([{"url": format!("{BACKPORT}/backport-max-count"), "valueUnsignedInt": 20}]);
    assert!(put_json("Subscription/s".into(), s)
        .await
        .unwrap()
        .status()
        .is_success());
    hook.wait(10, "handshake", |g| !g.is_empty()).await;
    // a writer that retries each patient until the node answers
    let writer = {
        let put_json = put_json.clone();
        tokio::spawn(async move {
            for i in 0..PATIENTS {
                loop {
                    match put_json(
                        format!("Patient/p{i}"),
                        named(&format!("p{i}"), Some("K"), "female"),
                    )
                    .await
                    {
                        Ok(r) if r.status().is_success() => break,
                        _ => tokio::time::sleep(Duration::from_millis(20)).await,
                    }
                }
            }
        })
    };
    let mut rng = fhirsync_testkit::gen::Rng::new(7);
    let mut kills = 0;
    while !writer.is_finished() && kills < 6 {
        tokio::time::sleep(Duration::from_millis(150 + rng.below(400))).await;
        node.kill();
        kills += 1;
        node = start();
    }
    writer.await.unwrap();
    assert!(kills >= 3, "only {kills} kills came during the writes");
    // the store's numbering is the truth: contiguous from 1
    let mut truth: Vec<(u64, String)> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = truth.len() as u64;
        let b: Value = http
            .get(format!(
                "{base}/Subscription/s/$events?eventsSinceNumber={}",
                n + 1
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let page = event_focus(&b);
        if page.is_empty() {
            let (_, st) = status_json(
                http.get(format!("{base}/Subscription/s/$status"))
                    .send()
                    .await
                    .unwrap(),
            )
            .await;
            if st.to_string().contains(&format!("\"valueString\":\"{n}\"")) && n >= PATIENTS {
                break;
            }
            assert!(Instant::now() < deadline, "events stopped at {n}");
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        }
        truth.extend(page);
    }
    let nums: Vec<u64> = truth.iter().map(|x| x.0).collect();
    assert_eq!(
        nums,
        (1..=truth.len() as u64).collect::<Vec<_>>(),
        "contiguous numbers"
    );
    let patients: std::collections::BTreeSet<String> = truth
        .iter()
        .map(|x| x.1.split("/_history").next().unwrap().to_owned())
        .collect();
    assert_eq!(
        patients.len() as u64,
        PATIENTS,
        "every patient has an event"
    );
    // every event reached the hook, each number always with the same focus
    let want: std::collections::BTreeMap<u64, String> = truth.into_iter().collect();
    let got = hook
        .wait(60, "every event delivered", |g| {
            let seen: std::collections::BTreeSet<u64> =
                g.iter().flat_map(|r| event_numbers(&r.body)).collect();
            want.keys().all(|k| seen.contains(k))
        })
        .await;
    let mut delivered = 0;
    for r in got
        .iter()
        .filter(|r| note_type(&r.body) == "event-notification")
    {
        for (num, focus) in event_focus(&r.body) {
            assert_eq!(want.get(&num), Some(&focus), "event {num} renumbered");
            delivered += 1;
        }
    }
    eprintln!(
        "{} events, {delivered} deliveries ({} repeated after kills), {kills} kills",
        want.len(),
        delivered - want.len()
    );
    // the operator's view
    let url = base.trim_end_matches("/fhir").to_owned();
    let out = std::process::Command::new(BIN)
        .args(["status", "--url", &url])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("subscription s (active): topic http://example.org/topic/named"),
        "{text}"
    );
    assert!(
        text.contains("subscriptions: change log matched up to seq"),
        "{text}"
    );
    node.terminate(Duration::from_secs(30)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_subscription_sends_heartbeats() {
    let hook = HookReceiver::start().await;
    let n = node(quick(), None).await;
    ok_put(
        &n,
        "SubscriptionTopic/named",
        &topic("named", "%current.name.exists()", &["create"]),
    )
    .await;
    let mut s = subscription("hb", "named", rest_hook(&hook.url()), "empty", None);
    s["channel"]["extension"] =
        json!([{"url": format!("{BACKPORT}/backport-heartbeat-period"), "valueUnsignedInt": 1}]);
    ok_put(&n, "Subscription/hb", &s).await;
    let got = hook
        .wait(10, "two heartbeats", |g| {
            g.iter()
                .filter(|r| note_type(&r.body) == "heartbeat")
                .count()
                >= 2
        })
        .await;
    assert_eq!(note_type(&got[0].body), "handshake");
    let beats: Vec<&Received> = got
        .iter()
        .filter(|r| note_type(&r.body) == "heartbeat")
        .collect();
    assert!(
        beats[1].at.duration_since(beats[0].at) >= Duration::from_millis(900),
        "a beat per period, not more"
    );
    assert_eq!(
        beats[0].body["entry"].as_array().unwrap().len(),
        1,
        "a heartbeat carries the status only"
    );
}

/// An R4 query-based Subscription on the node: `criteria` is a search.
fn classic(id: &str, criteria: &str, endpoint: &str, payload: Option<&str>) -> Value {
    let mut s = json!({
        "resourceType": "Subscription", "id": id, "status": "requested",
        "reason": "test", "criteria": criteria,
        "channel": {"type": "rest-hook", "endpoint": endpoint, "header": ["Authorization: Bearer hook-secret"]},
    });
    if let Some(p) = payload {
        s["channel"]["payload"] = json!(p);
    }
    s
}

fn encounter(id: &str, patient: &str, status: &str) -> Value {
    json!({"resourceType": "Encounter", "id": id, "status": status,
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": format!("Patient/{patient}")}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn classic_r4_subscriptions_notify_every_matching_create_and_update_in_order() {
    let hook = HookReceiver::start().await;
    let n = node(quick(), None).await;
    let base = hook.url();
    // a full-resource one on two parameters, an empty one on a chain
    let full = classic(
        "finished",
        "Encounter?patient=Patient/123&status=finished",
        &base,
        Some("application/fhir+json"),
    );
    ok_put(&n, "Subscription/finished", &full).await;
    let chained = classic(
        "otieno",
        "Encounter?subject:Patient.family=Otieno",
        &base,
        None,
    );
    ok_put(&n, "Subscription/otieno", &chained).await;
    // what the node cannot serve goes to error with the reason
    for (id, sub, why) in [
        (
            "unknown-param",
            classic("unknown-param", "Encounter?nope=1", &base, None),
            "'nope' is not a search parameter of Encounter",
        ),
        (
            "bad-value",
            classic("bad-value", "Encounter?date=soon", &base, None),
            "invalid value 'soon'",
        ),
        (
            "email",
            {
                let mut s = classic("email", "Encounter?status=finished", &base, None);
                s["channel"] = json!({"type": "email", "endpoint": "mailto:ward@example.org"});
                s
            },
            "channel type 'email' is not served",
        ),
    ] {
        ok_put(&n, &format!("Subscription/{id}"), &sub).await;
        let b = wait_status(&n, id, "error", 10).await;
        assert!(b["error"].as_str().unwrap_or("").contains(why), "{id}: {b}");
    }
    wait_status(&n, "finished", "active", 10).await;
    wait_status(&n, "otieno", "active", 10).await;

    ok_put(
        &n,
        "Patient/123",
        &json!({"resourceType": "Patient", "id": "123", "name": [{"family": "Otieno"}]}),
    )
    .await;
    ok_put(
        &n,
        "Patient/999",
        &json!({"resourceType": "Patient", "id": "999", "name": [{"family": "Smith"}]}),
    )
    .await;
    ok_put(&n, "Encounter/e1", &encounter("e1", "123", "in-progress")).await; // otieno 1
    ok_put(&n, "Encounter/e1", &encounter("e1", "123", "finished")).await; // finished 1, otieno 2
    ok_put(&n, "Encounter/e2", &encounter("e2", "999", "finished")).await; // neither
                                                                           // the receiver fails for a while: nothing is lost or repeated
    hook.answer(503);
    ok_put(&n, "Encounter/e3", &encounter("e3", "123", "finished")).await; // finished 2, otieno 3
    let mut e1 = encounter("e1", "123", "finished");
    e1["period"] = json!({"end": "2026-12-01"});
    ok_put(&n, "Encounter/e1", &e1).await; // finished 3, otieno 4
    tokio::time::sleep(Duration::from_millis(300)).await;
    hook.answer(200);
    assert_eq!(delete(&n, "Encounter/e3").await.status().as_u16(), 204); // a delete is no event
                                                                         // the patient renamed: later encounters of 123 no longer match the chain
    ok_put(
        &n,
        "Patient/123",
        &json!({"resourceType": "Patient", "id": "123", "name": [{"family": "Odhiambo"}]}),
    )
    .await;
    ok_put(&n, "Encounter/e4", &encounter("e4", "123", "planned")).await; // neither

    let puts = |g: &[Received]| -> Vec<(String, String)> {
        g.iter()
            .filter(|r| r.method == "PUT")
            .map(|r| {
                (
                    r.path.clone(),
                    r.body["meta"]["versionId"]
                        .as_str()
                        .unwrap_or("")
                        .to_owned(),
                )
            })
            .collect()
    };
    let got = hook
        .wait(15, "3 PUTs and 4 POSTs", |g| {
            puts(g).len() >= 3 && g.iter().filter(|r| r.method == "POST").count() >= 4
        })
        .await;
    assert_eq!(
        puts(&got),
        [
            ("/hook/Encounter/e1".to_owned(), "2".to_owned()),
            ("/hook/Encounter/e3".to_owned(), "1".to_owned()),
            ("/hook/Encounter/e1".to_owned(), "3".to_owned()),
        ],
        "each matching version once, in commit order"
    );
    let put_e3 = got.iter().find(|r| r.path == "/hook/Encounter/e3").unwrap();
    assert_eq!(put_e3.body["status"], "finished");
    assert_eq!(put_e3.headers["authorization"], "Bearer hook-secret");
    assert_eq!(put_e3.headers["content-type"], "application/fhir+json");
    let posts: Vec<&Received> = got.iter().filter(|r| r.method == "POST").collect();
    assert!(
        posts
            .iter()
            .all(|r| r.path == "/hook" && r.body == json!("")),
        "empty payload: no body"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = hook.received();
    assert_eq!(puts(&after).len(), 3);
    assert_eq!(after.iter().filter(|r| r.method == "POST").count(), 4);
    let (_, st) = status_json(get(&n, "Subscription/finished/$status").await).await;
    assert!(st.to_string().contains("\"valueString\":\"3\""), "{st}");
}

/// A topic as the Backport IG writes it in R4 (`Basic`), with
/// `queryCriteria`, and a filter naming a search parameter.
fn basic_topic(id: &str, current: &str) -> Value {
    let x = |name: &str| {
        format!("http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic.{name}")
    };
    json!({
        "resourceType": "Basic", "id": id,
        "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]},
        "extension": [
            {"url": x("url"), "valueUri": format!("http://example.org/topic/{id}")},
            {"url": x("status"), "valueCode": "active"},
            {"url": x("resourceTrigger"), "extension": [
                {"url": "resource", "valueUri": "http://hl7.org/fhir/StructureDefinition/Encounter"},
                {"url": "supportedInteraction", "valueCode": "create"},
                {"url": "supportedInteraction", "valueCode": "update"},
                {"url": "queryCriteria", "extension": [
                    {"url": "previous", "valueString": "status:not=finished"},
                    {"url": "resultForCreate", "valueCode": "test-passes"},
                    {"url": "current", "valueString": current},
                    {"url": "requireBoth", "valueBoolean": true}]}]},
            {"url": x("canFilterBy"), "extension": [
                {"url": "resource", "valueUri": "Encounter"},
                {"url": "filterParameter", "valueString": "patient"}]}
        ]
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_topics_with_query_criteria_and_search_parameter_filters() {
    let hook = HookReceiver::start().await;
    let n = node(quick(), None).await;
    // a topic that cannot be served is refused like a SubscriptionTopic
    let r = put(&n, "Basic/broken", &basic_topic("broken", "nope=1")).await;
    let (code, oo) = status_json(r).await;
    assert_eq!(code, 422, "{oo}");
    assert!(
        oo.to_string().contains("'nope' is not a search parameter"),
        "{oo}"
    );
    ok_put(
        &n,
        "Basic/finished",
        &basic_topic("finished", "status=finished"),
    )
    .await;
    let mut s = subscription(
        "p1",
        "finished",
        rest_hook(&hook.url()),
        "id-only",
        Some("Encounter?patient=Patient/1"),
    );
    s["id"] = json!("p1");
    ok_put(&n, "Subscription/p1", &s).await;
    wait_status(&n, "p1", "active", 10).await;
    ok_put(&n, "Encounter/a", &encounter("a", "1", "planned")).await; // current fails
    ok_put(&n, "Encounter/a", &encounter("a", "1", "finished")).await; // 1: became finished
    let mut a = encounter("a", "1", "finished");
    a["period"] = json!({"end": "2026-12-01"});
    ok_put(&n, "Encounter/a", &a).await; // was finished already: no event
    ok_put(&n, "Encounter/b", &encounter("b", "2", "finished")).await; // filtered out
    ok_put(&n, "Encounter/c", &encounter("c", "1", "finished")).await; // 2: created finished
    let got = hook
        .wait(10, "two events", |g| events_of(g).len() >= 2)
        .await;
    assert_eq!(events_of(&got), vec![1, 2]);
    let foci: Vec<String> = got
        .iter()
        .filter(|r| note_type(&r.body) == "event-notification")
        .map(|r| r.body["entry"][1]["fullUrl"].as_str().unwrap().to_owned())
        .collect();
    assert!(
        foci[0].ends_with("/Encounter/a") && foci[1].ends_with("/Encounter/c"),
        "{foci:?}"
    );
    // deleting the topic stops the events
    assert_eq!(delete(&n, "Basic/finished").await.status().as_u16(), 204);
    ok_put(&n, "Encounter/d", &encounter("d", "1", "finished")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(events_of(&hook.received()), vec![1, 2]);
}

#[tokio::test]
async fn filters_judged_in_memory_give_the_stores_answer() {
    // The matcher judges simple filters on a version's own index entries
    // instead of asking the store; for each version and each search here,
    // wherever it does, its answer must be the store's.
    use fhirsync_core::index;
    use fhirsync_core::search::{judge, SearchQuery};
    let n = InProcess::start().await;
    let resources = [
        json!({"resourceType": "Patient", "id": "a", "gender": "female", "active": true,
               "identifier": [{"system": "urn:mrn", "value": "g5"}, {"value": "G5"}],
               "name": [{"family": "Ødegård", "given": ["Anne-Marie"]}],
               "managingOrganization": {"reference": "Organization/o1"}}),
        json!({"resourceType": "Patient", "id": "b", "gender": "male",
               "identifier": [{"system": "urn:other", "value": "g50"}],
               "name": [{"family": "Odegard", "given": ["Bo"]}],
               "generalPractitioner": [{"reference": "http://elsewhere.example/fhir/Practitioner/x"}]}),
        json!({"resourceType": "Observation", "id": "o", "status": "final",
               "code": {"coding": [{"system": "http://loinc.org", "code": "8310-5"}], "text": "Body temperature"},
               "category": [{"coding": [{"code": "vital-signs"}]}],
               "subject": {"reference": "Patient/a"}, "valueString": "warm"}),
        json!({"resourceType": "Observation", "id": "p", "status": "amended",
               "code": {"text": "weight"}, "subject": {"reference": "Group/g"}}),
    ];
    let mut versions = Vec::new();
    for r in &resources {
        let path = format!(
            "{}/{}",
            r["resourceType"].as_str().unwrap(),
            r["id"].as_str().unwrap()
        );
        assert_eq!(put(&n, &path, r).await.status(), 201);
        let v = n
            .store
            .read(
                r["resourceType"].as_str().unwrap(),
                r["id"].as_str().unwrap(),
            )
            .await
            .unwrap()
            .unwrap();
        versions.push(v);
    }
    let searches = [
        ("Patient", "identifier=g5"),
        ("Patient", "identifier=G5"),
        ("Patient", "identifier=urn:mrn|g5"),
        ("Patient", "identifier=urn:other|g5"),
        ("Patient", "identifier=|G5"),
        ("Patient", "identifier=urn:mrn|"),
        ("Patient", "identifier=g5,g50"),
        ("Patient", "gender=female&identifier=g50"),
        ("Patient", "gender=male,female"),
        ("Patient", "active=true"),
        ("Patient", "family=ode"),
        ("Patient", "family=Øde"),
        ("Patient", "family:exact=Ødegård"),
        ("Patient", "family:exact=odegard"),
        ("Patient", "family:contains=EGA"),
        ("Patient", "name=anne"),
        ("Patient", "given=marie"),
        ("Patient", "organization=Organization/o1"),
        ("Patient", "organization=o1"),
        ("Patient", "organization=o2"),
        (
            "Patient",
            "general-practitioner=http://elsewhere.example/fhir/Practitioner/x",
        ),
        ("Patient", "_id=a"),
        ("Patient", "_id=b,c"),
        ("Patient", "identifier:text=g"),
        ("Observation", "subject=Patient/a"),
        ("Observation", "subject=a"),
        ("Observation", "patient=a"),
        ("Observation", "patient=Patient/a"),
        ("Observation", "subject=Group/g"),
        ("Observation", "subject:Patient=a"),
        ("Observation", "code=http://loinc.org|8310-5"),
        ("Observation", "code=8310-5"),
        ("Observation", "code:text=body"),
        ("Observation", "code:text=weight"),
        ("Observation", "category=vital-signs&status=final"),
        ("Observation", "status=final,amended"),
        ("Observation", "value-string=war"),
        // judged by the store: the matcher must leave these to it
        ("Observation", "status:not=final"),
        ("Observation", "subject:missing=true"),
        ("Patient", "birthdate=ge2000"),
        ("Observation", "subject:Patient.gender=female"),
    ];
    let (mut judged, mut left) = (0, 0);
    for v in &versions {
        let body: Value = serde_json::from_str(v.body.as_deref().unwrap()).unwrap();
        let entries = index::extract(&v.rtype, &body);
        for (t, s) in searches {
            let q = SearchQuery::parse_query_string(Some(t), s).unwrap();
            let store = n.store.version_matches(q.clone(), v.seq).await.unwrap();
            match judge(&q, &v.rtype, &v.id, &entries) {
                Some(mem) => {
                    judged += 1;
                    assert_eq!(mem, store, "{}/{} against {t}?{s}", v.rtype, v.id);
                }
                None => left += 1,
            }
        }
    }
    assert!(judged >= 150, "judged in memory: {judged}");
    assert!(left >= 8, "left to the store: {left}");
}
