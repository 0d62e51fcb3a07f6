//! `fhirsync status`, `verify`, `conflicts`, `deadletters` and `reindex --url`: thin
//! clients of a running node's admin API that print what it answers.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Where the node's admin API is. The options are global: users type them
/// before or after the subcommand (`conflicts list --url URL`).
#[derive(Args, Debug, Clone)]
pub struct Target {
    /// The node's address (its `/fhir` base or its root).
    #[arg(
        long,
        env = "FHIRSYNC_URL",
        default_value = "http://127.0.0.1:8080",
        global = true
    )]
    pub url: String,
    /// The node's admin token, when it has one.
    #[arg(long, env = "FHIRSYNC_ADMIN_TOKEN", global = true)]
    pub admin_token: Option<String>,
    /// Print the API's JSON instead of a summary.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ConflictsCmd {
    /// Conflicts, newest first.
    List {
        /// open, resolved, superseded or auto.
        #[arg(long, default_value = "open")]
        state: String,
    },
    /// Both sides and the common ancestor of one conflict.
    Show { id: u64 },
    /// Settles a conflict with a new version that replicates.
    Resolve {
        id: u64,
        /// Keep `local` or take `remote`.
        #[arg(long, conflicts_with = "resource")]
        keep: Option<String>,
        /// A merged resource (JSON file).
        #[arg(long)]
        resource: Option<PathBuf>,
    },
}

#[derive(Subcommand, Debug)]
pub enum DeadLettersCmd {
    /// Records set aside after their retries.
    List,
    /// Sends (or applies) dead letters again; removed when they go through.
    Retry {
        /// One dead letter.
        id: Option<u64>,
        /// Every dead letter, oldest first.
        #[arg(long, conflicts_with = "id")]
        all: bool,
    },
}

impl Target {
    fn admin(&self, path: &str) -> String {
        let root = self.url.trim_end_matches('/').trim_end_matches("/fhir");
        format!("{root}/admin/{path}")
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let url = self.admin(path);
        let mut rb = reqwest::Client::new().request(method, &url);
        if let Some(t) = &self.admin_token {
            rb = rb.bearer_auth(t);
        }
        if let Some(b) = body {
            rb = rb.json(&b);
        }
        let r = rb
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = r.status().as_u16();
        let v: Value = r.json().await.unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            let why = fhirsync_sync::client::outcome_text(&v);
            anyhow::bail!("{url} answered {status}: {why}");
        }
        Ok(v)
    }
}

fn run_async(f: impl std::future::Future<Output = anyhow::Result<()>>) -> anyhow::Result<()> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?
        .block_on(f)
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// The store's database and the processes serving from it.
fn print_deployment(v: &Value) {
    let st = &v["storage"];
    if let Some(b) = st["backend"].as_str() {
        println!("storage {b} {}", st["database"].as_str().unwrap_or("?"));
    }
    for p in v["processes"].as_array().into_iter().flatten() {
        let mut notes = vec![if p["up"] == true { "up" } else { "down" }];
        if p["leaseHolder"] == true {
            notes.push("lease holder: runs the agents");
        }
        if p["this"] == true {
            notes.push("answered this");
        }
        println!(
            "process {} pid {} at {} since {}{}: {}",
            p["host"].as_str().unwrap_or("?"),
            p["pid"],
            p["base"].as_str().unwrap_or("?"),
            p["startedAt"].as_str().unwrap_or("?"),
            p["lastSeen"]
                .as_str()
                .map(|s| format!(", last seen {s}"))
                .unwrap_or_default(),
            notes.join(", ")
        );
    }
    if v.get("leaseHolder").is_some_and(Value::is_null) {
        println!("lease: no process holds it now (the agents do not run)");
    }
}

pub fn status(t: Target) -> anyhow::Result<()> {
    run_async(async {
        let v = t.call(reqwest::Method::GET, "status", None).await?;
        if t.json {
            print_json(&v);
            return Ok(());
        }
        println!(
            "node {}  last seq {}",
            v["nodeId"].as_str().unwrap_or("?"),
            v["lastSeq"]
        );
        println!(
            "open conflicts {}  dead letters {}",
            v["openConflicts"], v["deadLetters"]
        );
        print_deployment(&v);
        for e in v["edges"].as_array().into_iter().flatten() {
            let name = e["name"].as_str().unwrap_or("?");
            if let Some(url) = e["parentUrl"].as_str() {
                println!(
                    "edge {name} → {} ({url}), policy {}",
                    e["parentNodeId"].as_str().unwrap_or("not reached yet"),
                    e["conflictPolicy"].as_str().unwrap_or("?")
                );
            } else if e["kind"] == "subscription" {
                println!(
                    "subscription {} ({}): topic {}, events {}, sent {}, delivered {}, errors {}{}",
                    name.trim_start_matches("subscription:"),
                    e["status"].as_str().unwrap_or("?"),
                    e["topic"].as_str().unwrap_or("?"),
                    e["eventsSinceStart"],
                    e["eventsSent"],
                    e["delivered"],
                    e["errors"],
                    e["error"]
                        .as_str()
                        .or(e["lastError"].as_str())
                        .map(|x| format!("\n  last error: {x}"))
                        .unwrap_or_default()
                );
                continue;
            } else if e["kind"] == "matcher" {
                println!(
                    "subscriptions: change log matched up to seq {} of {}",
                    e["matchedSeq"], e["lastSeq"]
                );
                continue;
            } else if let Some(servers) = e["servers"].as_array() {
                let list: Vec<&str> = servers.iter().filter_map(Value::as_str).collect();
                println!(
                    "edge {name}: NATS {} stream {} subject {}",
                    list.join(","),
                    e["stream"].as_str().unwrap_or("?"),
                    e["subject"].as_str().unwrap_or("?")
                );
            } else {
                println!(
                    "edge {name}, policy {}",
                    e["conflictPolicy"].as_str().unwrap_or("?")
                );
            }
            for d in ["connection", "publish", "pull", "push"] {
                let s = &e[d];
                if !s.is_object() {
                    continue;
                }
                println!(
                    "  {d:<10} {:<12} cursor {:>8}  lag {:>6}  stored {}  skipped {}  conflicts {}  filtered {}  dead letters {}  errors {}{}",
                    s["state"].as_str().unwrap_or("?"),
                    s["cursor"], s["lagSeq"], s["stored"], s["skipped"], s["conflicts"],
                    s["filtered"], s["deadLetters"], s["errors"],
                    s["lastError"].as_str().map(|e| format!("\n             last error: {e}")).unwrap_or_default()
                );
            }
        }
        for c in v["children"].as_array().into_iter().flatten() {
            println!(
                "child {}  last contact {}  received up to {}  sent up to {}  lag {}",
                c["nodeId"].as_str().unwrap_or("?"),
                c["lastContact"].as_str().unwrap_or("never"),
                c["lastSeqReceived"],
                c["lastSeqSent"],
                c["lagSeq"]
            );
        }
        Ok(())
    })
}

fn side_summary(s: &Value) -> String {
    let what = if s["deleted"] == true {
        "deleted".to_string()
    } else {
        s["resource"].to_string()
    };
    format!(
        "by {} at {} {}: {what}",
        s["origin"].as_str().unwrap_or("?"),
        s["hlc"].as_str().unwrap_or("?"),
        s["vector"]
    )
}

pub fn conflicts(t: Target, cmd: ConflictsCmd) -> anyhow::Result<()> {
    run_async(async {
        match cmd {
            ConflictsCmd::List { state } => {
                let v = t
                    .call(
                        reqwest::Method::GET,
                        &format!("conflicts?state={state}"),
                        None,
                    )
                    .await?;
                if t.json {
                    print_json(&v);
                    return Ok(());
                }
                let items = v["items"].as_array().cloned().unwrap_or_default();
                if items.is_empty() {
                    println!("no {state} conflicts");
                }
                for c in items {
                    println!(
                        "{:>5}  {}/{}  {}  edge {}  {}",
                        c["id"],
                        c["resourceType"].as_str().unwrap_or("?"),
                        c["resourceId"].as_str().unwrap_or("?"),
                        c["state"].as_str().unwrap_or("?"),
                        c["edge"].as_str().unwrap_or("?"),
                        c["created"].as_str().unwrap_or("?")
                    );
                }
            }
            ConflictsCmd::Show { id } => {
                let c = t
                    .call(reqwest::Method::GET, &format!("conflicts/{id}"), None)
                    .await?;
                if t.json {
                    print_json(&c);
                    return Ok(());
                }
                println!(
                    "conflict {id} on {}/{} ({}, policy {})",
                    c["resourceType"].as_str().unwrap_or("?"),
                    c["resourceId"].as_str().unwrap_or("?"),
                    c["state"].as_str().unwrap_or("?"),
                    c["policy"].as_str().unwrap_or("?")
                );
                println!("local    {}", side_summary(&c["local"]));
                println!("remote   {}", side_summary(&c["remote"]));
                if !c["ancestor"].is_null() {
                    println!("ancestor {}", side_summary(&c["ancestor"]));
                }
            }
            ConflictsCmd::Resolve { id, keep, resource } => {
                let body = match (keep.as_deref(), resource) {
                    (Some(k @ ("local" | "remote")), None) => json!({"keep": k}),
                    (Some(k), None) => anyhow::bail!("--keep must be local or remote, not '{k}'"),
                    (None, Some(p)) => {
                        let text = std::fs::read_to_string(&p)
                            .with_context(|| format!("cannot read {}", p.display()))?;
                        let r: Value = serde_json::from_str(&text)
                            .with_context(|| format!("{} is not JSON", p.display()))?;
                        json!({"resource": r})
                    }
                    _ => anyhow::bail!("give --keep local|remote or --resource FILE"),
                };
                let v = t
                    .call(
                        reqwest::Method::POST,
                        &format!("conflicts/{id}/resolve"),
                        Some(body),
                    )
                    .await?;
                if t.json {
                    print_json(&v);
                } else {
                    println!(
                        "conflict {id} resolved: {}",
                        v["resolved"].as_str().unwrap_or("?")
                    );
                }
            }
        }
        Ok(())
    })
}

pub fn dead_letters(t: Target, cmd: DeadLettersCmd) -> anyhow::Result<()> {
    run_async(async {
        match cmd {
            DeadLettersCmd::List => {
                let v = t.call(reqwest::Method::GET, "deadletters", None).await?;
                if t.json {
                    print_json(&v);
                    return Ok(());
                }
                let items = v["items"].as_array().cloned().unwrap_or_default();
                if items.is_empty() {
                    println!("no dead letters");
                }
                for d in items {
                    println!(
                        "{:>5}  {} {}/{} seq {}  after {} attempts: {}",
                        d["id"],
                        d["direction"].as_str().unwrap_or("?"),
                        d["resourceType"].as_str().unwrap_or("?"),
                        d["resourceId"].as_str().unwrap_or("?"),
                        d["seq"],
                        d["attempts"],
                        d["error"].as_str().unwrap_or("?")
                    );
                }
            }
            DeadLettersCmd::Retry { id, all } => {
                let path = match (id, all) {
                    (Some(id), false) => format!("deadletters/{id}/retry"),
                    (None, true) => "deadletters/retry".into(),
                    _ => anyhow::bail!("give a dead letter id or --all"),
                };
                let v = t.call(reqwest::Method::POST, &path, None).await?;
                if t.json {
                    print_json(&v);
                    return Ok(());
                }
                let ok = v["retried"].as_array().map_or(0, |a| a.len());
                let failed = v["failed"].as_array().cloned().unwrap_or_default();
                println!("{ok} went through, {} still failing", failed.len());
                for f in &failed {
                    println!("  {}: {}", f["id"], f["error"].as_str().unwrap_or("?"));
                }
                if !failed.is_empty() {
                    anyhow::bail!("{} dead letters still fail", failed.len());
                }
            }
        }
        Ok(())
    })
}

/// One line per direction of a repair.
fn repaired_line(what: &str, r: &Value) -> String {
    format!(
        "{what}: {} stored, {} skipped, {} conflicts, {} filtered, {} failed",
        r["stored"], r["skipped"], r["conflicts"], r["filtered"], r["failed"]
    )
}

/// `fhirsync verify [--repair]`: one anti-entropy run on a running node.
/// Exits non-zero when the ends differ and were not (all) repaired, so a
/// script can tell.
pub fn verify(t: Target, repair: bool, edge: Option<String>) -> anyhow::Result<()> {
    run_async(async {
        let mut q = reqwest::Url::parse("http://query/").context("query")?;
        q.query_pairs_mut()
            .append_pair("repair", if repair { "true" } else { "false" });
        if let Some(e) = &edge {
            q.query_pairs_mut().append_pair("edge", e);
        }
        let path = format!("verify?{}", q.query().unwrap_or_default());
        let v = t.call(reqwest::Method::POST, &path, None).await?;
        if t.json {
            print_json(&v);
        } else {
            println!(
                "edge {} ↔ parent {}: {} resources here, parent at seq {}; {} differences in {} ms ({} requests, {} bytes sent, {} received)",
                v["edge"].as_str().unwrap_or("?"),
                v["parentNodeId"].as_str().unwrap_or("?"),
                v["resources"],
                v["parentSeq"],
                v["differences"],
                v["tookMs"],
                v["requests"],
                v["bytesSent"],
                v["bytesReceived"],
            );
            if let Some(k) = v["byKind"].as_object() {
                for (kind, n) in k {
                    println!("  {kind}: {n}");
                }
            }
            for d in v["examples"].as_array().into_iter().flatten() {
                println!(
                    "  e.g. {}/{} ({})",
                    d["type"].as_str().unwrap_or("?"),
                    d["id"].as_str().unwrap_or("?"),
                    d["kind"].as_str().unwrap_or("?")
                );
            }
            if repair {
                println!("  {}", repaired_line("pulled", &v["pulled"]));
                println!("  {}", repaired_line("pushed", &v["pushed"]));
            }
        }
        let differences = v["differences"].as_u64().unwrap_or(0);
        let failed = v["pulled"]["failed"].as_u64().unwrap_or(0)
            + v["pushed"]["failed"].as_u64().unwrap_or(0);
        if differences > 0 && (!repair || failed > 0) {
            anyhow::bail!(
                "{differences} differences{}",
                if repair {
                    format!(", {failed} not repaired")
                } else {
                    String::new()
                }
            );
        }
        Ok(())
    })
}

/// How often `fhirsync reindex --url` asks for progress.
const REINDEX_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// `fhirsync reindex --url`: starts a reindex on a running node and
/// follows it to the end.
pub fn reindex(t: Target) -> anyhow::Result<()> {
    run_async(async {
        let start = std::time::Instant::now();
        let mut v = t.call(reqwest::Method::POST, "reindex", None).await?;
        while v["running"] == json!(true) {
            eprintln!("reindexed {} of {} versions", v["done"], v["total"]);
            tokio::time::sleep(REINDEX_POLL).await;
            v = t.call(reqwest::Method::GET, "reindex", None).await?;
        }
        println!(
            "reindexed {} versions in {:.2} s",
            v["total"],
            start.elapsed().as_secs_f64()
        );
        Ok(())
    })
}
