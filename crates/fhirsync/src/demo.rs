//! `fhirsync demo`: a district parent and two clinics on 127.0.0.1, each an
//! embedded store with its API, the clinics replicating with the parent.
//! It loads patients at one clinic, edits at both, takes a clinic offline
//! to make a conflict, resolves it, and prints how the data flows.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use fhirsync_api::{AppState, ChildConfig, Children};
use fhirsync_replica::{EdgeConfig, Replicator};
use fhirsync_store::sqlite::{SqliteConfig, SqliteStore};
use fhirsync_store::{ChangesQuery, Store};
use serde_json::{json, Value};
use tokio::sync::watch;

#[derive(clap::Args, Debug)]
pub struct DemoArgs {
    /// Patients to load at the first clinic.
    #[arg(long, default_value_t = 25)]
    patients: usize,
    /// Keep the nodes serving after the demo (until Ctrl-C).
    #[arg(long)]
    hold: bool,
    /// Directory for the three stores [default: a temporary one].
    #[arg(long)]
    dir: Option<PathBuf>,
}

struct Node {
    name: &'static str,
    base: String,
    store: Arc<SqliteStore>,
    replicator: Option<Arc<Replicator>>,
    edge: Option<EdgeConfig>,
    stop: watch::Sender<bool>,
    server: tokio::task::JoinHandle<()>,
    auditor: fhirsync_api::auditor::Auditor,
}

impl Node {
    async fn start(
        name: &'static str,
        dir: &std::path::Path,
        children: Vec<ChildConfig>,
        edge: Option<EdgeConfig>,
    ) -> anyhow::Result<Node> {
        let mut cfg = SqliteConfig::new(SqliteStore::db_path(&dir.join(name)));
        cfg.node_id = Some(name.into());
        let store = Arc::new(
            SqliteStore::open(cfg).with_context(|| format!("cannot open the store of {name}"))?,
        );
        let (stop, rx) = watch::channel(false);
        let mut state = AppState::new(
            store.clone(),
            fhirsync_api::ApiConfig::default(),
            rx.clone(),
        );
        state.children = Arc::new(Children::new(children));
        let replicator = match &edge {
            Some(e) => Some(
                Replicator::start(store.clone(), vec![e.clone()]).map_err(anyhow::Error::msg)?,
            ),
            None => None,
        };
        if let Some(r) = &replicator {
            state.agents.push(r.clone());
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut rx2 = rx;
        let auditor = state.auditor.clone();
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, fhirsync_api::service(state))
                .with_graceful_shutdown(async move {
                    let _ = rx2.wait_for(|v| *v).await;
                })
                .await;
        });
        Ok(Node {
            name,
            base: format!("http://{addr}/fhir"),
            store,
            replicator,
            edge,
            stop,
            server,
            auditor,
        })
    }

    /// Stops as `fhirsync serve` does: replication, then the API (open
    /// long-polls answered), the audit records of the last answers, and
    /// the store last, so that nothing is cut off mid-answer.
    async fn stop(mut self) {
        if let Some(r) = self.replicator.take() {
            r.shutdown().await;
        }
        let _ = self.stop.send(true);
        let _ = self.server.await;
        self.auditor.flush().await;
        let s = self.store.clone();
        let _ = tokio::task::spawn_blocking(move || s.shutdown()).await;
    }

    async fn put(&self, http: &reqwest::Client, res: &Value) -> anyhow::Result<()> {
        let url = format!(
            "{}/{}/{}",
            self.base,
            res["resourceType"].as_str().unwrap_or(""),
            res["id"].as_str().unwrap_or("")
        );
        let r = http
            .put(&url)
            .header("content-type", "application/fhir+json")
            .body(res.to_string())
            .send()
            .await?;
        anyhow::ensure!(r.status().is_success(), "PUT {url}: {}", r.status());
        Ok(())
    }

    async fn get(&self, http: &reqwest::Client, path: &str) -> anyhow::Result<Value> {
        Ok(http
            .get(format!("{}/{path}", self.base))
            .send()
            .await?
            .json()
            .await?)
    }

    /// Current (type, id) → body without server fields.
    async fn digest(&self) -> anyhow::Result<BTreeMap<(String, String), String>> {
        let mut out = BTreeMap::new();
        let mut since = 0;
        loop {
            let rows = self
                .store
                .changes(ChangesQuery {
                    since,
                    count: 1000,
                    ..Default::default()
                })
                .await?;
            let Some(last) = rows.last() else { break };
            since = last.seq;
            for v in rows {
                let content = v.body.as_deref().map(|b| {
                    let m: serde_json::Map<String, Value> =
                        serde_json::from_str(b).unwrap_or_default();
                    fhirsync_core::meta::split(&m).rest
                });
                out.insert((v.rtype, v.id), content.unwrap_or_else(|| "deleted".into()));
            }
        }
        Ok(out)
    }
}

const GIVEN: &[&str] = &[
    "Akinyi", "Baraka", "Chebet", "Dalmas", "Esther", "Faith", "Gitau", "Halima",
];
const FAMILY: &[&str] = &[
    "Otieno", "Wanjiru", "Kiprop", "Mwangi", "Achieng", "Mutua", "Njeri",
];

fn patient(i: usize) -> Value {
    json!({
        "resourceType": "Patient",
        "id": format!("demo-pat-{i}"),
        "identifier": [{"system": "https://clinic-a.example/mrn", "value": format!("A{i:05}")}],
        "name": [{"family": FAMILY[i % FAMILY.len()], "given": [GIVEN[i % GIVEN.len()]]}],
        "gender": if i.is_multiple_of(2) { "female" } else { "male" },
        "birthDate": format!("{}-0{}-1{}", 1960 + i % 50, 1 + i % 9, i % 10),
    })
}

fn weight(i: usize, kg: &str) -> Value {
    json!({
        "resourceType": "Observation",
        "id": format!("demo-obs-{i}"),
        "status": "final",
        "code": {"coding": [{"system": "http://loinc.org", "code": "29463-7", "display": "Body weight"}]},
        "subject": {"reference": format!("Patient/demo-pat-{i}")},
        "valueQuantity": {"value": kg.parse::<f64>().unwrap_or(0.0), "unit": "kg"},
    })
}

async fn wait_same(nodes: &[&Node], what: &str) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_secs(60);
    loop {
        let first = nodes[0].digest().await?;
        let mut same = true;
        for n in &nodes[1..] {
            same &= n.digest().await? == first;
        }
        if same {
            println!(
                "   ✓ {what}: all {} nodes hold the same {} resources ({} ms)",
                nodes.len(),
                first.len(),
                t0.elapsed().as_millis()
            );
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what}: the nodes did not converge within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn run(a: DemoArgs) -> anyhow::Result<()> {
    crate::serve::init_logging("warn");
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(demo(a))
}

async fn demo(a: DemoArgs) -> anyhow::Result<()> {
    let tmp;
    let dir = match &a.dir {
        Some(d) => d.clone(),
        None => {
            tmp = std::env::temp_dir().join(format!("fhirsync-demo-{}", std::process::id()));
            tmp
        }
    };
    let token = |c: &str| format!("demo-token-for-{c}-0123456789");
    let reg = |c: &str| ChildConfig {
        node_id: c.into(),
        token: token(c),
        pull: true,
        push: true,
        push_types: Vec::new(),
    };
    let district = Node::start(
        "district",
        &dir,
        vec![reg("clinic-a"), reg("clinic-b")],
        None,
    )
    .await?;
    let edge = |c: &str| {
        let mut e = EdgeConfig::new(&district.base, &token(c));
        e.name = "district".into();
        e.long_poll_s = 5;
        e.retry_delay_ms_max = 1000;
        e
    };
    let clinic_a = Node::start("clinic-a", &dir, vec![], Some(edge("clinic-a"))).await?;
    let mut clinic_b = Node::start("clinic-b", &dir, vec![], Some(edge("clinic-b"))).await?;
    println!(
        "fhirsync demo: one district node and two clinics, each with its own embedded store\n"
    );
    for n in [&district, &clinic_a, &clinic_b] {
        println!("   {:<9} {}", n.name, n.base);
    }
    println!(
        "   clinics pull the district's changes (long-poll) and push their own; policy: manual\n"
    );
    let http = reqwest::Client::new();

    println!(
        "1. clinic-a registers {} patients, each with a body weight",
        a.patients
    );
    for i in 0..a.patients {
        clinic_a.put(&http, &patient(i)).await?;
        clinic_a
            .put(&http, &weight(i, &format!("{}.5", 50 + i % 30)))
            .await?;
    }
    wait_same(
        &[&district, &clinic_a, &clinic_b],
        "clinic-a → district → clinic-b",
    )
    .await?;

    println!("\n2. clinic-b updates a weight; the district corrects a birth date");
    clinic_b.put(&http, &weight(3, "61.2")).await?;
    let mut p = patient(5);
    p["birthDate"] = json!("1971-07-17");
    district.put(&http, &p).await?;
    wait_same(
        &[&district, &clinic_a, &clinic_b],
        "edits from both directions",
    )
    .await?;

    println!("\n3. clinic-b goes offline; both clinics edit patient demo-pat-1 meanwhile");
    if let Some(r) = clinic_b.replicator.take() {
        r.shutdown().await;
    }
    let mut pa = patient(1);
    pa["telecom"] = json!([{"system": "phone", "value": "+254 700 111 111"}]);
    clinic_a.put(&http, &pa).await?;
    let mut pb = patient(1);
    pb["telecom"] = json!([{"system": "phone", "value": "+254 722 222 222"}]);
    clinic_b.put(&http, &pb).await?;
    clinic_b.put(&http, &weight(7, "70.0")).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    println!("   clinic-b reconnects");
    clinic_b.replicator = Some(
        Replicator::start(
            clinic_b.store.clone(),
            vec![clinic_b.edge.clone().context("edge")?],
        )
        .map_err(anyhow::Error::msg)?,
    );
    let t0 = Instant::now();
    let conflict = loop {
        let v = http
            .get(
                district
                    .base
                    .replace("/fhir", "/admin/conflicts?state=open"),
            )
            .send()
            .await?
            .json::<Value>()
            .await?;
        if let Some(c) = v["items"].as_array().and_then(|a| a.first()).cloned() {
            break c;
        }
        anyhow::ensure!(
            t0.elapsed() < Duration::from_secs(30),
            "no conflict appeared"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!(
        "   ! conflict {} at the district on Patient/{}: local phone {} (from {}) vs remote {} (from {})",
        conflict["id"],
        conflict["resourceId"].as_str().unwrap_or("?"),
        conflict["local"]["resource"]["telecom"][0]["value"],
        conflict["local"]["origin"].as_str().unwrap_or("?"),
        conflict["remote"]["resource"]["telecom"][0]["value"],
        conflict["remote"]["origin"].as_str().unwrap_or("?"),
    );
    let mut merged = patient(1);
    merged["telecom"] = json!([
        {"system": "phone", "value": "+254 700 111 111"},
        {"system": "phone", "value": "+254 722 222 222"}
    ]);
    let r = http
        .post(district.base.replace(
            "/fhir",
            &format!("/admin/conflicts/{}/resolve", conflict["id"]),
        ))
        .json(&json!({"resource": merged}))
        .send()
        .await?;
    anyhow::ensure!(r.status().is_success(), "resolve: {}", r.status());
    println!("   the district resolves it with a merged record (both phone numbers)");
    wait_same(&[&district, &clinic_a, &clinic_b], "resolution replicated").await?;
    let p1 = clinic_b.get(&http, "Patient/demo-pat-1").await?;
    println!(
        "   clinic-b now has Patient/demo-pat-1 version {} with {} phone numbers",
        p1["meta"]["versionId"].as_str().unwrap_or("?"),
        p1["telecom"].as_array().map_or(0, |t| t.len())
    );

    println!("\n4. what each node did");
    for n in [&district, &clinic_a, &clinic_b] {
        let last = n.store.last_seq();
        let open = n
            .store
            .conflicts(fhirsync_store::ListQuery {
                state: Some("open".into()),
                count: 100,
                ..Default::default()
            })
            .await?
            .len();
        println!(
            "   {:<9} change log {:>4} entries, open conflicts {}",
            n.name, last, open
        );
    }
    if a.hold {
        println!(
            "\nnodes keep running; try: fhirsync status --url {}   (Ctrl-C to stop)",
            clinic_a.base
        );
        tokio::signal::ctrl_c().await?;
    }
    // The clinics first: their long-polls at the district end with them.
    for n in [clinic_a, clinic_b, district] {
        n.stop().await;
    }
    if a.dir.is_none() {
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
