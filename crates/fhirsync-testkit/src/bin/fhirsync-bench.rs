//! Benchmarks of a running node and data for `fhirsync import`.
//! Build with `--release`; `scripts/bench.sh` runs the whole set.

use std::io::Write;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use fhirsync_testkit::gen::{ndjson_line, synthea_like_bundle, Rng};

#[derive(Parser)]
#[command(about = "fhirsync benchmarks")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Write COUNT resources as NDJSON (1 Patient : 4 Observations).
    GenNdjson {
        #[arg(long)]
        count: u64,
        #[arg(long)]
        out: std::path::PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// POST Synthea-sized patient transaction Bundles from several clients.
    /// Index extraction alone (one thread): NDJSON in, entries counted.
    Index {
        #[arg(long)]
        input: std::path::PathBuf,
    },
    HttpTx {
        /// One or more node processes; clients are spread over them.
        #[arg(long, required = true)]
        base: Vec<String>,
        #[arg(long, default_value_t = 4)]
        clients: usize,
        #[arg(long, default_value_t = 40)]
        bundles: usize,
        #[arg(long, default_value_t = 50)]
        encounters: usize,
        #[arg(long, default_value_t = 16)]
        obs: usize,
    },
    /// Starts a PostgreSQL server (initdb in DIR, a free port), makes the
    /// databases named, prints one URL per line, and runs until stdin closes.
    Postgres {
        #[arg(long)]
        db: Vec<String>,
        /// A server setting, `name=value` (repeatable).
        #[arg(long)]
        set: Vec<String>,
    },
    /// Reads `Type/{prefix}{0..ids}` at a fixed rate; reports latency percentiles.
    ReadLatency {
        #[arg(long)]
        base: String,
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long, default_value = "Patient/p")]
        prefix: String,
        #[arg(long, default_value_t = 1000)]
        ids: u64,
    },
    /// Runs searches one after another and reports latency percentiles;
    /// `{n}` in the query is replaced by a random number below `--ids`.
    SearchLatency {
        #[arg(long)]
        base: String,
        #[arg(long)]
        query: String,
        #[arg(long, default_value_t = 500)]
        count: u64,
        #[arg(long, default_value_t = 200_000)]
        ids: u64,
        /// Sent as `Authorization: Bearer TOKEN`.
        #[arg(long)]
        token: Option<String>,
    },
    /// Initial pull of COUNT resources from a parent process into an empty child process.
    ReplicatePull {
        /// The release `fhirsync` binary.
        #[arg(long)]
        bin: std::path::PathBuf,
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        #[arg(long)]
        work: std::path::PathBuf,
        /// `[parent] batch_size_max` of the child.
        #[arg(long, default_value_t = 500)]
        batch: usize,
        /// The other way: the child holds the resources and pushes them to
        /// an empty parent.
        #[arg(long)]
        push: bool,
    },
    /// Anti-entropy between a parent and a child that hold COUNT identical
    /// resources (the child's store a copy of the parent's) plus DIFFS
    /// resources at one end only: find, repair, then verify the identical
    /// stores.
    Verify {
        /// The release `fhirsync` binary.
        #[arg(long)]
        bin: std::path::PathBuf,
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        #[arg(long, default_value_t = 100)]
        diffs: u64,
        #[arg(long)]
        work: std::path::PathBuf,
    },
    /// Applying pages of conflicting versions (one store each): under
    /// `hlc-lww`, and under `merge` (every pair merged against its ancestor).
    Merge {
        #[arg(long, default_value_t = 20_000)]
        count: u64,
        /// Versions per applied page (the edge's batch).
        #[arg(long, default_value_t = 500)]
        page: usize,
        #[arg(long)]
        work: std::path::PathBuf,
    },
    /// Lag from a commit on a child to its visibility in the parent's change feed.
    ReplicateLag {
        #[arg(long)]
        bin: std::path::PathBuf,
        #[arg(long, default_value_t = 100)]
        rate: u64,
        /// Concurrent writers sharing the rate.
        #[arg(long, default_value_t = 1)]
        writers: u64,
        #[arg(long, default_value_t = 30)]
        seconds: u64,
        #[arg(long)]
        work: std::path::PathBuf,
        /// The parent is two processes on this PostgreSQL database: writes
        /// go to one, the child pulls through the other, and the lag is
        /// from a write's `201` to its arrival in the child's change feed.
        #[arg(long)]
        postgres: Option<String>,
    },
    /// 100k-resource load and write-to-visible lag between two nodes through JetStream.
    Nats {
        #[arg(long)]
        bin: std::path::PathBuf,
        #[arg(long, default_value_t = 100_000)]
        count: u64,
        /// Writes per second of the lag run.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long)]
        work: std::path::PathBuf,
        /// Also measure the lag on the loaded nodes right after the load.
        #[arg(long)]
        lag_after_load: bool,
    },
    /// Write throughput with SUBS active subscriptions (REST hooks) against
    /// none, and notification latency from a write's 201 to the hook.
    Subs {
        #[arg(long)]
        bin: std::path::PathBuf,
        #[arg(long, default_value_t = 100)]
        subs: usize,
        /// Patients written in each throughput run.
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Writes per second of the latency run.
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        #[arg(long)]
        work: std::path::PathBuf,
    },
    /// Row changes per second through the binlog reader: ROWS rows written
    /// to a MariaDB started here, in transactions of TX rows, then read.
    Binlog {
        #[arg(long, default_value_t = 100_000)]
        rows: u64,
        #[arg(long, default_value_t = 1000)]
        tx: u64,
    },
    /// Sender → receiver: ROWS observation rows (with a foreign key to one
    /// of 1,000 patients, mapped by uuid) in transactions of TX rows, as
    /// fast as MariaDB takes them, until all are in the central database;
    /// then lag at RATE single-row transactions per second for SECONDS.
    DbSync {
        #[arg(long, default_value_t = 100_000)]
        rows: u64,
        #[arg(long, default_value_t = 100)]
        tx: u64,
        #[arg(long, default_value_t = 200)]
        rate: u64,
        #[arg(long, default_value_t = 20)]
        seconds: u64,
        /// http or nats
        #[arg(long, default_value = "http")]
        transport: String,
    },
    /// Writes and reads per second through the API (8 clients each), and
    /// whether the node's AuditEvents number its requests. BIN may be an
    /// older build, to compare.
    Audit {
        #[arg(long)]
        bin: std::path::PathBuf,
        #[arg(long, default_value_t = 10_000)]
        count: u64,
        /// Run the node with `[api] audit_wait = true`.
        #[arg(long)]
        wait: bool,
        #[arg(long)]
        work: std::path::PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Index { input } => {
            let text = std::fs::read_to_string(&input)?;
            let docs: Vec<serde_json::Value> = text
                .lines()
                .filter(|l| !l.trim().is_empty())
                .map(serde_json::from_str)
                .collect::<Result<_, _>>()?;
            let start = std::time::Instant::now();
            let mut entries = 0usize;
            for d in &docs {
                let t = d["resourceType"].as_str().unwrap_or("");
                entries += fhirsync_core::index::extract(t, d).len();
            }
            let s = start.elapsed().as_secs_f64();
            println!(
                "indexed {} resources in {s:.2} s ({:.0}/s, one thread), {entries} entries",
                docs.len(),
                docs.len() as f64 / s
            );
            Ok(())
        }
        Cmd::GenNdjson { count, out, seed } => {
            let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&out)?);
            for i in 0..count {
                writeln!(f, "{}", ndjson_line(seed, i))?;
            }
            f.flush()?;
            println!("wrote {count} resources to {}", out.display());
            Ok(())
        }
        Cmd::HttpTx {
            base,
            clients,
            bundles,
            encounters,
            obs,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(http_tx(base, clients, bundles, encounters, obs))
        }
        Cmd::Postgres { db, set } => {
            let pg = fhirsync_testkit::postgres::Postgres::start_configured(&set)?;
            for d in &db {
                println!("{}", pg.create_db(d));
            }
            use std::io::{Read, Write};
            std::io::stdout().flush()?;
            let mut sink = Vec::new();
            let _ = std::io::stdin().read_to_end(&mut sink);
            drop(pg);
            Ok(())
        }
        Cmd::ReadLatency {
            base,
            rate,
            seconds,
            prefix,
            ids,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(read_latency(base, rate, seconds, prefix, ids))
        }
        Cmd::SearchLatency {
            base,
            query,
            count,
            ids,
            token,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(search_latency(base, query, count, ids, token))
        }
        Cmd::ReplicatePull {
            bin,
            count,
            work,
            batch,
            push,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(replicate_pull(bin, count, work, batch, push))
        }
        Cmd::Merge { count, page, work } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(merge_bench(count, page, work))
        }
        Cmd::Verify {
            bin,
            count,
            diffs,
            work,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(verify_bench(bin, count, diffs, work))
        }
        Cmd::Nats {
            bin,
            count,
            rate,
            seconds,
            work,
            lag_after_load,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(nats_bench(bin, count, rate, seconds, work, lag_after_load))
        }
        Cmd::Subs {
            bin,
            subs,
            count,
            rate,
            seconds,
            work,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(subs_bench(bin, subs, count, rate, seconds, work))
        }
        Cmd::Binlog { rows, tx } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(binlog_bench(rows, tx))
        }
        Cmd::DbSync {
            rows,
            tx,
            rate,
            seconds,
            transport,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(db_sync_bench(rows, tx, rate, seconds, &transport))
        }
        Cmd::Audit {
            bin,
            count,
            wait,
            work,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            rt.block_on(audit_bench(bin, count, wait, work))
        }
        Cmd::ReplicateLag {
            bin,
            rate,
            writers,
            seconds,
            work,
            postgres,
        } => {
            let rt = tokio::runtime::Runtime::new()?;
            match postgres {
                Some(url) => rt.block_on(replicate_lag_pg(bin, &url, rate, writers, seconds, work)),
                None => rt.block_on(replicate_lag(bin, rate, writers, seconds, work)),
            }
        }
    }
}

async fn http_tx(
    bases: Vec<String>,
    clients: usize,
    bundles: usize,
    encounters: usize,
    obs: usize,
) -> anyhow::Result<()> {
    let mut rng = Rng::new(99);
    let bodies: Vec<String> = (0..bundles)
        .map(|_| synthea_like_bundle(&mut rng, encounters, obs).to_string())
        .collect();
    let entries = 3 + encounters * (1 + obs);
    let bytes: usize = bodies.iter().map(String::len).sum();
    let queue = Arc::new(std::sync::Mutex::new(bodies));
    let client = reqwest::Client::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..clients {
        let base = bases[i % bases.len()].clone();
        let (queue, client) = (queue.clone(), client.clone());
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            loop {
                let Some(body) = queue.lock().map_err(|_| anyhow::anyhow!("lock"))?.pop() else {
                    break;
                };
                let t = Instant::now();
                let r = client
                    .post(format!("{base}/"))
                    .header("content-type", "application/fhir+json")
                    .body(body)
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "status {}", r.status());
                r.bytes().await?;
                lat.push(t.elapsed());
            }
            anyhow::Ok(lat)
        }));
    }
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await??);
    }
    let secs = started.elapsed().as_secs_f64();
    lat.sort();
    let resources = bundles * entries;
    println!(
        "http-tx: {bundles} bundles x {entries} entries ({:.1} MB each) from {clients} clients in {secs:.2} s: {:.0} resources/s, {:.1} bundles/s, bundle latency p50 {:?} p99 {:?}",
        bytes as f64 / bundles as f64 / 1e6,
        resources as f64 / secs,
        bundles as f64 / secs,
        pct(&lat, 50.0),
        pct(&lat, 99.0)
    );
    Ok(())
}

async fn read_latency(
    base: String,
    rate: u64,
    seconds: u64,
    prefix: String,
    ids: u64,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    // Warm the connection pool.
    client
        .get(format!("{base}/{prefix}0"))
        .send()
        .await?
        .bytes()
        .await?;
    let total = rate * seconds;
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(total as usize);
    let mut rng = Rng::new(7);
    for _ in 0..total {
        ticker.tick().await;
        let url = format!("{base}/{prefix}{}", rng.below(ids));
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let t = Instant::now();
            let r = client.get(url).send().await?;
            let ok = r.status().is_success();
            r.bytes().await?;
            anyhow::ensure!(ok, "read failed");
            anyhow::Ok(t.elapsed())
        }));
    }
    let mut lat = Vec::with_capacity(tasks.len());
    for t in tasks {
        lat.push(t.await??);
    }
    lat.sort();
    println!(
        "read-latency: {total} reads at {rate}/s: p50 {:?} p99 {:?} max {:?}",
        pct(&lat, 50.0),
        pct(&lat, 99.0),
        lat.last().copied().unwrap_or_default()
    );
    Ok(())
}

async fn search_latency(
    base: String,
    query: String,
    count: u64,
    ids: u64,
    token: Option<String>,
) -> anyhow::Result<()> {
    let client = reqwest::Client::new();
    let mut rng = Rng::new(11);
    let mut lat = Vec::with_capacity(count as usize);
    let (mut matched, mut included) = (0u64, 0u64);
    for i in 0..=count {
        let url = format!(
            "{base}/{}",
            query.replace("{n}", &rng.below(ids).to_string())
        );
        let mut rq = client.get(&url);
        if let Some(t) = &token {
            rq = rq.bearer_auth(t);
        }
        let t = Instant::now();
        let r = rq.send().await?;
        let ok = r.status();
        let body: serde_json::Value = r.json().await?;
        let took = t.elapsed();
        anyhow::ensure!(ok.is_success(), "{url}: {ok} {body}");
        for e in body["entry"].as_array().into_iter().flatten() {
            match e["search"]["mode"].as_str() {
                Some("include") => included += 1,
                _ => matched += 1,
            }
        }
        // the first search warms the connection
        if i > 0 {
            lat.push(took);
        }
    }
    lat.sort();
    println!(
        "search-latency: {count} searches of {query}: p50 {:?} p99 {:?} max {:?}; {:.1} matches and {:.1} includes a page",
        pct(&lat, 50.0),
        pct(&lat, 99.0),
        lat.last().copied().unwrap_or_default(),
        matched as f64 / (count + 1) as f64,
        included as f64 / (count + 1) as f64,
    );
    Ok(())
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

const OBSERVER_TOKEN: &str = "bench-observer-token-0123456789";
const CHILD_TOKEN: &str = "bench-child-token-0123456789";
/// A reader of the parent with a system read scope (`fhirsync sync`).
const READER_TOKEN: &str = "bench-reader-token-0123456789";

/// Configs of a parent (children `child` and `observer`) and of `child`.
fn replication_configs(
    work: &std::path::Path,
    parent_url: Option<&str>,
    batch: usize,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    let p = work.join("parent.toml");
    std::fs::write(
        &p,
        format!(
            "node_id = \"parent\"\nlog = \"warn\"\n[[auth.tokens]]\nname = \"reader\"\nsha256 = \"{}\"\nscopes = \"system/*.rs\"\n[[children]]\nnode_id = \"child\"\ntoken = \"{CHILD_TOKEN}\"\n[[children]]\nnode_id = \"observer\"\ntoken = \"{OBSERVER_TOKEN}\"\npush = false\n",
            fhirsync_api::auth::token_hash(READER_TOKEN)
        ),
    )?;
    let c = work.join("child.toml");
    if let Some(url) = parent_url {
        std::fs::write(
            &c,
            format!("node_id = \"child\"\nlog = \"warn\"\n[parent]\nurl = \"{url}\"\ntoken = \"{CHILD_TOKEN}\"\nbatch_size_max = {batch}\n"),
        )?;
    }
    Ok((p, c))
}

/// Lines `from..to` of the deterministic data set in a file of the work
/// directory (written once, kept for the next run).
fn ndjson_file(work: &std::path::Path, from: u64, to: u64) -> anyhow::Result<std::path::PathBuf> {
    let data = if from == 0 {
        work.join(format!("data-{to}.ndjson"))
    } else {
        work.join(format!("data-{from}-{to}.ndjson"))
    };
    if !data.exists() {
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&data)?);
        for i in from..to {
            writeln!(f, "{}", ndjson_line(1, i))?;
        }
        f.flush()?;
    }
    Ok(data)
}

/// `fhirsync import` of one file into a data directory.
fn import(
    bin: &std::path::Path,
    node: &str,
    dir: &std::path::Path,
    data: &std::path::Path,
) -> anyhow::Result<()> {
    let st = std::process::Command::new(bin)
        .args(["import", "--node-id", node, "--data-dir"])
        .arg(dir)
        .arg(data)
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "import into {} failed", dir.display());
    Ok(())
}

async fn replicate_pull(
    bin: std::path::PathBuf,
    count: u64,
    work: std::path::PathBuf,
    batch: usize,
    push: bool,
) -> anyhow::Result<()> {
    use fhirsync_testkit::NodeProcess;
    std::fs::create_dir_all(&work)?;
    let data = ndjson_file(&work, 0, count)?;
    let (pdir, cdir) = (work.join("parent"), work.join("child"));
    let _ = std::fs::remove_dir_all(&pdir);
    let _ = std::fs::remove_dir_all(&cdir);
    let (dir, direction) = match push {
        false => {
            import(&bin, "parent", &pdir, &data)?;
            ("pull", "initial pull")
        }
        true => {
            import(&bin, "child", &cdir, &data)?;
            ("push", "initial push")
        }
    };
    let (pcfg, _) = replication_configs(&work, None, batch)?;
    let parent = NodeProcess::spawn(&bin, &pdir, &["--config", pcfg.to_str().unwrap_or("")])?;
    let (_, ccfg) = replication_configs(&work, Some(&parent.base), batch)?;
    let t0 = Instant::now();
    let child = NodeProcess::spawn(&bin, &cdir, &["--config", ccfg.to_str().unwrap_or("")])?;
    let status = child.base.replace("/fhir", "/admin/status");
    let http = reqwest::Client::new();
    loop {
        let v: serde_json::Value = http.get(&status).send().await?.json().await?;
        if v["edges"][0][dir]["cursor"].as_u64().unwrap_or(0) >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{direction} of {count} resources (batch {batch}): {secs:.2} s, {:.0} resources/s",
        count as f64 / secs
    );
    drop(child);
    drop(parent);
    Ok(())
}

/// One `POST /admin/verify` of the child: the report and the time the
/// call took.
async fn verify_call(
    http: &reqwest::Client,
    child: &fhirsync_testkit::NodeProcess,
    repair: bool,
) -> anyhow::Result<(serde_json::Value, f64)> {
    let url = child
        .base
        .replace("/fhir", &format!("/admin/verify?repair={repair}"));
    let t0 = Instant::now();
    let r = http.post(&url).send().await?;
    let status = r.status();
    let v: serde_json::Value = r.json().await?;
    anyhow::ensure!(status.is_success(), "verify answered {status}: {v}");
    Ok((v, t0.elapsed().as_secs_f64()))
}

async fn verify_bench(
    bin: std::path::PathBuf,
    count: u64,
    diffs: u64,
    work: std::path::PathBuf,
) -> anyhow::Result<()> {
    use fhirsync_testkit::NodeProcess;
    std::fs::create_dir_all(&work)?;
    let (pdir, cdir) = (work.join("parent"), work.join("child"));
    let _ = std::fs::remove_dir_all(&pdir);
    let _ = std::fs::remove_dir_all(&cdir);
    import(&bin, "parent", &pdir, &ndjson_file(&work, 0, count)?)?;
    // The child's store is a copy of the parent's under its own node id,
    // as an operator would seed a site; then each end gets resources the
    // other never hears of (the cursors are moved past them).
    std::fs::create_dir_all(&cdir)?;
    std::fs::copy(pdir.join("fhirsync.db"), cdir.join("fhirsync.db"))?;
    let half = diffs / 2;
    import(
        &bin,
        "parent",
        &pdir,
        &ndjson_file(&work, count, count + half)?,
    )?;
    {
        let db = rusqlite::Connection::open(cdir.join("fhirsync.db"))?;
        db.execute(
            "UPDATE node_info SET value = 'child' WHERE key = 'node_id'",
            [],
        )?;
    }
    import(
        &bin,
        "child",
        &cdir,
        &ndjson_file(&work, count + half, count + diffs)?,
    )?;
    {
        let db = rusqlite::Connection::open(cdir.join("fhirsync.db"))?;
        let own: i64 = db.query_row("SELECT max(seq) FROM versions", [], |r| r.get(0))?;
        db.execute(
            "INSERT INTO cursors (key, seq, updated_ms) VALUES ('parent:pull', ?1, 0), ('parent:push', ?2, 0)",
            rusqlite::params![(count + half) as i64, own],
        )?;
    }
    let (pcfg, _) = replication_configs(&work, None, 500)?;
    let parent = NodeProcess::spawn(&bin, &pdir, &["--config", pcfg.to_str().unwrap_or("")])?;
    let (_, ccfg) = replication_configs(&work, Some(&parent.base), 500)?;
    let mut cfg = std::fs::read_to_string(&ccfg)?;
    cfg.push_str("verify_every_s = 0\n");
    std::fs::write(&ccfg, cfg)?;
    let child = NodeProcess::spawn(&bin, &cdir, &["--config", ccfg.to_str().unwrap_or("")])?;
    let http = reqwest::Client::new();
    let line = |what: &str, v: &serde_json::Value, secs: f64| {
        println!(
            "verify {what}, {count} resources: {} differences in {secs:.2} s ({} requests, {} bytes sent, {} received; repaired: pulled {}, pushed {})",
            v["differences"],
            v["requests"],
            v["bytesSent"],
            v["bytesReceived"],
            v["pulled"]["stored"],
            v["pushed"]["stored"],
        );
    };
    let (found, secs) = verify_call(&http, &child, false).await?;
    line(&format!("with {diffs} differences"), &found, secs);
    anyhow::ensure!(
        found["differences"] == diffs,
        "expected {diffs} differences: {found}"
    );
    // `fhirsync sync -m COMPARE` between the two nodes by summaries: what
    // it finds (a dry run: verify repairs below).
    let compare = |dry: bool| -> anyhow::Result<(serde_json::Value, f64)> {
        let rp = work.join("compare-report.json");
        let mut args = vec![
            "sync",
            "-s",
            &parent.base,
            "-t",
            &child.base,
            "-m",
            "COMPARE",
            "--source-bearer-token",
            READER_TOKEN,
            "--report",
        ];
        let rp_s = rp.to_string_lossy().into_owned();
        args.push(&rp_s);
        if dry {
            args.push("--dry-run");
        }
        let t0 = Instant::now();
        let out = std::process::Command::new(&bin).args(&args).output()?;
        anyhow::ensure!(
            out.status.success(),
            "fhirsync sync -m COMPARE failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let secs = t0.elapsed().as_secs_f64();
        Ok((serde_json::from_slice(&std::fs::read(&rp)?)?, secs))
    };
    let compare_line = |what: &str, r: &serde_json::Value, secs: f64| -> u64 {
        let (mut read, mut written) = (0, 0);
        for t in r["types"].as_object().into_iter().flatten().map(|(_, c)| c) {
            read += t["read"].as_u64().unwrap_or(0);
            written += ["created", "updated", "deleted"]
                .iter()
                .map(|k| t[*k].as_u64().unwrap_or(0))
                .sum::<u64>();
        }
        println!(
            "sync -m COMPARE {what}, {count} resources: {secs:.2} s, {read} read in full, {written} to write or delete; {}",
            r["notes"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|n| n.as_str())
                .find(|n| n.starts_with("compared"))
                .unwrap_or("")
        );
        written
    };
    let (r, secs) = compare(true)?;
    let written = compare_line(&format!("with {diffs} differences (dry run)"), &r, secs);
    anyhow::ensure!(written == diffs, "expected {diffs} differences: {r}");
    let (fixed, secs) = verify_call(&http, &child, true).await?;
    line("--repair", &fixed, secs);
    let stored = fixed["pulled"]["stored"].as_u64().unwrap_or(0)
        + fixed["pushed"]["stored"].as_u64().unwrap_or(0);
    anyhow::ensure!(stored == diffs, "expected {diffs} repaired: {fixed}");
    let (same, secs) = verify_call(&http, &child, false).await?;
    line("of identical stores", &same, secs);
    anyhow::ensure!(
        same["differences"] == 0,
        "expected identical stores: {same}"
    );
    let (r, secs) = compare(false)?;
    let written = compare_line("of identical nodes", &r, secs);
    anyhow::ensure!(written == 0, "expected nothing to write: {r}");
    // The child backed up while it serves, then restored once stopped.
    let backup = work.join("child-backup.db");
    let _ = std::fs::remove_file(&backup);
    let run = |args: &[&std::ffi::OsStr]| -> anyhow::Result<f64> {
        let t0 = Instant::now();
        let st = std::process::Command::new(&bin)
            .args(args)
            .stdout(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(st.success(), "fhirsync {args:?} failed");
        Ok(t0.elapsed().as_secs_f64())
    };
    let (dir_flag, cdir_os) = (std::ffi::OsStr::new("--data-dir"), cdir.as_os_str());
    let secs = run(&["backup".as_ref(), dir_flag, cdir_os, backup.as_os_str()])?;
    let bytes = std::fs::metadata(&backup)?.len();
    println!("backup while serving, {count} resources: {secs:.2} s, {bytes} bytes");
    drop(child);
    let secs = run(&["restore".as_ref(), dir_flag, cdir_os, backup.as_os_str()])?;
    println!("restore, {count} resources: {secs:.2} s");
    drop(parent);
    Ok(())
}

/// A patient as a site holds it: `extra` elements on top of the common one.
fn merge_patient(i: u64, extra: serde_json::Value) -> serde_json::Value {
    let mut p = serde_json::json!({"resourceType": "Patient", "id": format!("p{i}"),
        "identifier": [{"system": "https://example.org/mrn", "value": format!("p{i}")}],
        "name": [{"family": "Odhiambo", "given": ["Akinyi", "Grace"]}],
        "telecom": [{"system": "phone", "value": format!("+2547{i:08}")}],
        "address": [{"city": "Kisumu", "country": "KE"}]});
    for (k, v) in extra.as_object().into_iter().flatten() {
        p[k] = v.clone();
    }
    p
}

/// Pages of versions from `origin`, each `{p: 1}` bumped by `origin`
/// (`None`: the common ancestor, `{p: 1}` itself).
fn merge_pages(
    count: u64,
    page: usize,
    origin: Option<&str>,
    extra: &serde_json::Value,
    policy: fhirsync_core::replicate::Policy,
) -> Vec<fhirsync_store::ApplyRequest> {
    use fhirsync_store::{ApplyRequest, Direction, Prepared, RemoteVersion};
    let base = fhirsync_core::VersionVector::new().bumped("p");
    let vv = origin.map_or_else(|| base.clone(), |o| base.bumped(o));
    let versions: Vec<RemoteVersion> = (0..count)
        .map(|i| {
            let body = merge_patient(i, extra.clone());
            let raw = body.to_string();
            let map = body.as_object().cloned().unwrap_or_default();
            RemoteVersion {
                rtype: "Patient".into(),
                id: format!("p{i}"),
                res: Some(Prepared::new("Patient".into(), map)),
                raw: Some(raw.into()),
                origin: origin.unwrap_or("p").into(),
                vv: vv.clone(),
                hlc: fhirsync_core::Hlc::new(1_700_000_000_000 + i, 0),
                seq: i + 1,
            }
        })
        .collect();
    versions
        .chunks(page.max(1))
        .map(|c| ApplyRequest {
            edge: "bench".into(),
            direction: Direction::Pull,
            peer: origin.unwrap_or("p").into(),
            policy,
            versions: c.to_vec(),
            cursor: None,
            dead_letters: Vec::new(),
            record_peer: false,
        })
        .collect()
}

/// `v` as a change entry of a page (`$changes`, `$apply`).
fn entry_of(v: &fhirsync_store::RemoteVersion) -> serde_json::Value {
    serde_json::json!({
        "extension": [{
            "url": format!("{}/sync-metadata", fhirsync_store::sync::EXTENSION_BASE),
            "extension": [
                {"url": "seq", "valueDecimal": v.seq},
                {"url": "origin", "valueString": v.origin},
                {"url": "vector", "valueString": v.vv.to_json()},
                {"url": "hlc", "valueString": v.hlc.to_string()},
            ]
        }],
        "resource": v.raw.as_deref().map(serde_json::from_str::<serde_json::Value>).transpose().ok().flatten(),
        "request": {"method": "PUT", "url": format!("{}/{}", v.rtype, v.id)},
    })
}

async fn merge_bench(count: u64, page: usize, work: std::path::PathBuf) -> anyhow::Result<()> {
    use fhirsync_core::replicate::Policy;
    use fhirsync_store::sqlite::{SqliteConfig, SqliteStore};
    use fhirsync_store::{Store, WriteOutcome, WriteRequest};
    use serde_json::json;
    let (mut took, mut writer) = (Vec::new(), Vec::new());
    for policy in [Policy::HlcLww, Policy::Merge] {
        let dir = work.join(format!("merge-{policy}"));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = SqliteConfig::new(SqliteStore::db_path(&dir));
        cfg.node_id = Some("here".into());
        let store = SqliteStore::open(cfg)?;
        let apply = |reqs: Vec<fhirsync_store::ApplyRequest>| async {
            let (mut stored, mut conflicts) = (0, 0);
            for r in reqs {
                match store.write(WriteRequest::Apply(Box::new(r))).await? {
                    WriteOutcome::Applied(rep) => {
                        stored += rep.stored;
                        conflicts += rep.conflicts;
                    }
                    o => anyhow::bail!("unexpected outcome {o:?}"),
                }
            }
            Ok::<_, anyhow::Error>((stored, conflicts))
        };
        apply(merge_pages(count, page, None, &json!({}), policy)).await?;
        apply(merge_pages(
            count,
            page,
            Some("a"),
            &json!({"gender": "female"}),
            policy,
        ))
        .await?;
        // The conflicting pages as a pull receives them: JSON entries,
        // parsed, validated (the default mode) and prepared
        // (`RemoteVersion::from_entry`) inside the timing.
        let texts: Vec<(fhirsync_store::ApplyRequest, String)> = merge_pages(
            count,
            page,
            Some("b"),
            &json!({"birthDate": "1990-04-01"}),
            policy,
        )
        .into_iter()
        .map(|mut r| {
            let entries: Vec<serde_json::Value> = std::mem::take(&mut r.versions)
                .iter()
                .map(entry_of)
                .collect();
            (r, serde_json::Value::Array(entries).to_string())
        })
        .collect();
        let (t0, mut writing) = (Instant::now(), std::time::Duration::ZERO);
        let mut conflicts = 0;
        for (mut r, text) in texts {
            let entries: Vec<serde_json::Value> = serde_json::from_str(&text)?;
            r.versions = entries
                .iter()
                .map(|e| {
                    fhirsync_store::RemoteVersion::from_entry(
                        e,
                        fhirsync_core::validate::Mode::default(),
                    )
                })
                .collect::<Result<_, _>>()
                .map_err(anyhow::Error::msg)?;
            let w0 = Instant::now();
            conflicts += apply(vec![r]).await?.1;
            writing += w0.elapsed();
        }
        let secs = t0.elapsed().as_secs_f64();
        anyhow::ensure!(
            conflicts == count,
            "{policy}: {conflicts} conflicts of {count}"
        );
        let merged = store.read("Patient", "p0").await?.and_then(|v| v.body);
        let both = merged
            .as_deref()
            .is_some_and(|b| b.contains("female") && b.contains("1990-04-01"));
        anyhow::ensure!(
            both == (policy == Policy::Merge),
            "{policy}: p0 is {merged:?}"
        );
        println!(
            "conflicting pages of {page}, {count} conflicts, {policy}: {secs:.2} s received and applied, {:.0} conflicts/s; writer {:.2} s",
            count as f64 / secs,
            writing.as_secs_f64()
        );
        writer.push(writing.as_secs_f64());
        took.push(secs);
        store.shutdown();
    }
    println!(
        "merge costs {:+.1} % over hlc-lww to apply a received page ({:+.1} % of the writer's time)",
        (took[1] / took[0] - 1.0) * 100.0,
        (writer[1] / writer[0] - 1.0) * 100.0
    );
    Ok(())
}

async fn replicate_lag(
    bin: std::path::PathBuf,
    rate: u64,
    writers: u64,
    seconds: u64,
    work: std::path::PathBuf,
) -> anyhow::Result<()> {
    use fhirsync_testkit::NodeProcess;
    std::fs::create_dir_all(&work)?;
    let (pdir, cdir) = (work.join("lag-parent"), work.join("lag-child"));
    let _ = std::fs::remove_dir_all(&pdir);
    let _ = std::fs::remove_dir_all(&cdir);
    let (pcfg, _) = replication_configs(&work, None, 500)?;
    let parent = NodeProcess::spawn(&bin, &pdir, &["--config", pcfg.to_str().unwrap_or("")])?;
    let (_, ccfg) = replication_configs(&work, Some(&parent.base), 500)?;
    let child = NodeProcess::spawn(&bin, &cdir, &["--config", ccfg.to_str().unwrap_or("")])?;
    let http = reqwest::Client::new();
    let line = lag_run(
        &http,
        &child.base,
        &parent.base,
        Some(("observer", OBSERVER_TOKEN)),
        rate,
        writers,
        seconds,
    )
    .await?
    .0;
    println!("lag child commit -> visible at parent, {line}");
    drop(child);
    drop(parent);
    Ok(())
}

/// Lag from a write on process A of a parent to its arrival at a child
/// that pulls through process B, both processes on one PostgreSQL database.
async fn replicate_lag_pg(
    bin: std::path::PathBuf,
    url: &str,
    rate: u64,
    writers: u64,
    seconds: u64,
    work: std::path::PathBuf,
) -> anyhow::Result<()> {
    use fhirsync_testkit::NodeProcess;
    std::fs::create_dir_all(&work)?;
    let (pcfg, _) = replication_configs(&work, None, 500)?;
    let mut parent = std::fs::read_to_string(&pcfg)?;
    parent.push_str(&format!(
        "[storage]\nbackend = \"postgres\"\nurl = \"{url}\"\n"
    ));
    std::fs::write(&pcfg, parent)?;
    let dirs: Vec<_> = ["lag-a", "lag-b", "lag-child"]
        .iter()
        .map(|d| work.join(d))
        .collect();
    for d in &dirs {
        let _ = std::fs::remove_dir_all(d);
    }
    let cfg = pcfg.to_str().unwrap_or("");
    let a = NodeProcess::spawn(&bin, &dirs[0], &["--config", cfg])?;
    let b = NodeProcess::spawn(&bin, &dirs[1], &["--config", cfg])?;
    let (_, ccfg) = replication_configs(&work, Some(&b.base), 500)?;
    let mut child = std::fs::read_to_string(&ccfg)?;
    child.push_str(&format!(
        "[[children]]\nnode_id = \"observer\"\ntoken = \"{OBSERVER_TOKEN}\"\npush = false\n"
    ));
    std::fs::write(&ccfg, child)?;
    let c = NodeProcess::spawn(&bin, &dirs[2], &["--config", ccfg.to_str().unwrap_or("")])?;
    let http = reqwest::Client::new();
    let (line, _) = lag_run(
        &http,
        &a.base,
        &c.base,
        Some(("observer", OBSERVER_TOKEN)),
        rate,
        writers,
        seconds,
    )
    .await?;
    println!("lag write on process A -> visible at a child pulling through process B, {line}");
    anyhow::ensure!(
        line.ends_with("missing 0"),
        "writes never reached the child"
    );
    drop((c, b, a));
    Ok(())
}

/// Writers of the NATS lag run: enough that 1,000 writes/s hold while each
/// waits for its commit.
const NATS_WRITERS: u64 = 8;

/// Writes to `write_base` at `rate` for `seconds` (`writers` tasks) while
/// following `watch_base`'s change feed; the lag of each write is from its
/// `201` to its arrival in the feed.
async fn lag_run(
    http: &reqwest::Client,
    write_base: &str,
    watch_base: &str,
    auth: Option<(&'static str, &'static str)>,
    rate: u64,
    writers: u64,
    seconds: u64,
) -> anyhow::Result<(String, Vec<(String, Instant)>)> {
    use std::collections::HashMap;
    let seen: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let (s2, h2, base) = (seen.clone(), http.clone(), watch_base.to_owned());
    // Follow from the feed's current end: older entries are not this run's.
    let start = {
        let mut rb = http.get(format!("{watch_base}/$changes?since=0&_count=1"));
        if let Some((node, token)) = auth {
            rb = rb.bearer_auth(token).header("x-fhirsync-node", node);
        }
        let b: serde_json::Value = rb.send().await?.json().await?;
        b["extension"]
            .as_array()
            .and_then(|x| {
                x.iter().find(|e| {
                    e["url"]
                        .as_str()
                        .is_some_and(|u| u.ends_with("changes-last-seq"))
                })
            })
            .and_then(|e| e["valueDecimal"].to_string().parse::<u64>().ok())
            .unwrap_or(0)
    };
    let observer = tokio::spawn(async move {
        let mut since = start;
        loop {
            let mut rb = h2.get(format!("{base}/$changes?since={since}&_count=1000&wait=10"));
            if let Some((node, token)) = auth {
                rb = rb.bearer_auth(token).header("x-fhirsync-node", node);
            }
            let Ok(r) = rb.send().await else { continue };
            let Ok(b) = r.json::<serde_json::Value>().await else {
                continue;
            };
            let now = Instant::now();
            if let Some(es) = b["entry"].as_array() {
                let mut m = s2.lock().unwrap_or_else(|e| e.into_inner());
                for e in es {
                    if let Some(id) = e["resource"]["id"].as_str() {
                        m.entry(id.to_owned()).or_insert(now);
                    }
                }
            }
            let ext = b["extension"].as_array().cloned().unwrap_or_default();
            if let Some(n) = ext.iter().find(|x| {
                x["url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with("changes-next-since"))
            }) {
                since = n["valueDecimal"].to_string().parse().unwrap_or(since);
            }
        }
    });
    let writers = writers.max(1);
    let acked: Arc<std::sync::Mutex<Vec<(String, Instant)>>> = Arc::default();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (http, base, acked) = (http.clone(), write_base.to_owned(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let per = (rate / writers).max(1);
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / per));
            let mut rng = Rng::new(9 + w);
            for i in 0..per * seconds {
                tick.tick().await;
                let id = format!("lag-{w}-{i}");
                let body = serde_json::json!({"resourceType":"Observation","id":id,"status":"final",
                    "code":{"text":"heart rate"},"valueQuantity":{"value": 60 + rng.below(40),"unit":"/min"}});
                let r = http
                    .put(format!("{base}/Observation/{id}"))
                    .header("content-type", "application/fhir+json")
                    .body(body.to_string())
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "write failed: {}", r.status());
                acked
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push((id, Instant::now()));
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    observer.abort();
    let m = seen.lock().unwrap_or_else(|e| e.into_inner());
    let acked = acked.lock().unwrap_or_else(|e| e.into_inner());
    let mut lat: Vec<Duration> = Vec::new();
    let mut missing = 0;
    for (id, t) in acked.iter() {
        match m.get(id) {
            Some(s) => lat.push(s.saturating_duration_since(*t)),
            None => missing += 1,
        }
    }
    lat.sort();
    Ok((
        format!(
            "{} writes at {rate}/s: p50 {:?}, p99 {:?}, max {:?}, missing {missing}",
            acked.len(),
            pct(&lat, 50.0),
            pct(&lat, 99.0),
            lat.last().copied().unwrap_or_default()
        ),
        acked.clone(),
    ))
}

async fn nats_bench(
    bin: std::path::PathBuf,
    count: u64,
    rate: u64,
    seconds: u64,
    work: std::path::PathBuf,
    lag_after_load: bool,
) -> anyhow::Result<()> {
    use fhirsync_testkit::{NatsServer, NodeProcess};
    std::fs::create_dir_all(&work)?;
    let server = NatsServer::start()?;
    let data = work.join(format!("data-{count}.ndjson"));
    if !data.exists() {
        let mut f = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&data)?);
        for i in 0..count {
            writeln!(f, "{}", ndjson_line(1, i))?;
        }
        f.flush()?;
    }
    // A pair of nodes following each other, in fresh data directories.
    let pair = |a: &str,
                b: &str|
     -> anyhow::Result<(
        std::path::PathBuf,
        std::path::PathBuf,
        std::path::PathBuf,
        std::path::PathBuf,
    )> {
        let mut out = Vec::new();
        for (id, follow) in [(a, b), (b, a)] {
            let dir = work.join(format!("nats-{id}"));
            let _ = std::fs::remove_dir_all(&dir);
            let p = work.join(format!("nats-{id}.toml"));
            std::fs::write(
                &p,
                format!(
                    "node_id = \"{id}\"\nlog = \"warn\"\n[nats]\nservers = [\"{}\"]\n[[nats.follow]]\nnode = \"{follow}\"\n",
                    server.url()
                ),
            )?;
            out.push((dir, p));
        }
        let (a, b) = (out.remove(0), out.remove(0));
        Ok((a.0, a.1, b.0, b.1))
    };
    let http = reqwest::Client::new();

    // Lag, on empty nodes.
    let (adir, acfg, bdir, bcfg) = pair("lag-a", "lag-b")?;
    let a = NodeProcess::spawn(&bin, &adir, &["--config", acfg.to_str().unwrap_or("")])?;
    let b = NodeProcess::spawn(&bin, &bdir, &["--config", bcfg.to_str().unwrap_or("")])?;
    // A core-NATS probe sees each message when JetStream takes it: the
    // publish half of the lag.
    let probe = async_nats::connect(server.url()).await?;
    let mut sub = probe.subscribe("fhirsync.lag-a.>").await?;
    let at: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> = Arc::default();
    let at2 = at.clone();
    let probe_task = tokio::spawn(async move {
        use futures::StreamExt;
        while let Some(m) = sub.next().await {
            let now = Instant::now();
            if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&m.payload) {
                if let Some(id) = v["resource"]["id"].as_str() {
                    at2.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .entry(id.to_owned())
                        .or_insert(now);
                }
            }
        }
    });
    let (line, acked) = lag_run(&http, &a.base, &b.base, None, rate, NATS_WRITERS, seconds).await?;
    probe_task.abort();
    let mut lat: Vec<Duration> = {
        let at = at.lock().unwrap_or_else(|e| e.into_inner());
        acked
            .iter()
            .filter_map(|(id, t)| at.get(id).map(|s| s.saturating_duration_since(*t)))
            .collect()
    };
    lat.sort();
    println!("lag node A commit -> visible at node B through JetStream, {line}");
    println!(
        "  of which commit -> in the stream (outbox): p50 {:?}, p99 {:?}, max {:?}",
        pct(&lat, 50.0),
        pct(&lat, 99.0),
        lat.last().copied().unwrap_or_default()
    );
    drop(b);
    drop(a);

    // Throughput: A loaded with `fhirsync import`, B empty.
    let (adir, acfg, bdir, bcfg) = pair("load-a", "load-b")?;
    let st = std::process::Command::new(&bin)
        .args(["import", "--node-id", "load-a", "--data-dir"])
        .arg(&adir)
        .arg(&data)
        .stdout(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(st.success(), "import failed");
    let t0 = Instant::now();
    let a = NodeProcess::spawn(&bin, &adir, &["--config", acfg.to_str().unwrap_or("")])?;
    let b = NodeProcess::spawn(&bin, &bdir, &["--config", bcfg.to_str().unwrap_or("")])?;
    let find = |v: &serde_json::Value, name: &str| {
        v["items"]
            .as_array()
            .and_then(|a| a.iter().find(|e| e["name"] == name).cloned())
            .unwrap_or_default()
    };
    let mut published_at = None;
    loop {
        let ea: serde_json::Value = http
            .get(a.base.replace("/fhir", "/admin/edges"))
            .send()
            .await?
            .json()
            .await?;
        let eb: serde_json::Value = http
            .get(b.base.replace("/fhir", "/admin/edges"))
            .send()
            .await?
            .json()
            .await?;
        let outbox = find(&ea, "nats")["publish"]["cursor"].as_u64().unwrap_or(0);
        if outbox >= count && published_at.is_none() {
            published_at = Some(t0.elapsed());
        }
        let applied = find(&eb, "nats:load-a")["pull"]["stored"]
            .as_u64()
            .unwrap_or(0);
        if applied >= count {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{count} resources node A -> JetStream -> node B: all published after {:.2} s, all applied at B after {secs:.2} s = {:.0} resources/s end to end",
        published_at.map_or(secs, |d| d.as_secs_f64()),
        count as f64 / secs
    );
    if lag_after_load {
        let (line, _) = lag_run(&http, &a.base, &b.base, None, rate, NATS_WRITERS, seconds).await?;
        println!("lag on the same nodes right after the load, {line}");
    }
    drop(b);
    drop(a);
    Ok(())
}

/// A patient for the subscription runs: `identifier` picks the one
/// subscription (of `subs`) whose filter it passes; `subs = 0`: none.
fn sub_patient(i: u64, subs: usize) -> String {
    let tag = match subs {
        0 => "none".to_owned(),
        n => format!("g{}", i % n as u64),
    };
    serde_json::json!({
        "resourceType": "Patient", "id": format!("p{i}"),
        "name": [{"family": format!("F{i}")}],
        "identifier": [{"value": tag}],
    })
    .to_string()
}

/// PUTs patients `from..from+count` from 8 writers; returns writes/s.
async fn sub_writes(
    http: &reqwest::Client,
    base: &str,
    from: u64,
    count: u64,
    subs: usize,
) -> anyhow::Result<f64> {
    let writers = 8u64;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let (http, base) = (http.clone(), base.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut i = from + w;
            while i < from + count {
                let r = http
                    .put(format!("{base}/Patient/p{i}"))
                    .header("content-type", "application/fhir+json")
                    .body(sub_patient(i, subs))
                    .send()
                    .await?;
                anyhow::ensure!(r.status().is_success(), "PUT p{i}: {}", r.status());
                i += writers;
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(count as f64 / t.elapsed().as_secs_f64())
}

/// Patient ids a notification carries, with its arrival.
fn notified(
    got: &[fhirsync_testkit::hook::Received],
) -> std::collections::HashMap<String, Instant> {
    let mut out = std::collections::HashMap::new();
    for r in got {
        for e in r.body["entry"].as_array().into_iter().flatten().skip(1) {
            if let Some(id) = e["fullUrl"].as_str().and_then(|u| u.rsplit('/').next()) {
                out.entry(id.to_owned()).or_insert(r.at);
            }
        }
    }
    out
}

async fn subs_bench(
    bin: std::path::PathBuf,
    subs: usize,
    count: u64,
    rate: u64,
    seconds: u64,
    work: std::path::PathBuf,
) -> anyhow::Result<()> {
    use fhirsync_core::subscription::BACKPORT;
    use fhirsync_testkit::hook::HookReceiver;
    use fhirsync_testkit::NodeProcess;
    std::fs::create_dir_all(&work)?;
    let http = reqwest::Client::new();
    // without subscriptions
    let plain_dir = work.join("subs-none");
    let _ = std::fs::remove_dir_all(&plain_dir);
    let plain = NodeProcess::spawn(&bin, &plain_dir, &[])?;
    let none = sub_writes(&http, &plain.base, 0, count, subs).await?;
    drop(plain);
    println!("subs: {count} writes, no subscriptions: {none:.0} writes/s");
    // with SUBS subscriptions, each passing 1/SUBS of the patients
    let dir = work.join("subs-active");
    let _ = std::fs::remove_dir_all(&dir);
    let node = NodeProcess::spawn(&bin, &dir, &[])?;
    let hook = HookReceiver::start().await;
    let put = |path: String, body: serde_json::Value| {
        http.put(format!("{}/{path}", node.base))
            .header("content-type", "application/fhir+json")
            .body(body.to_string())
            .send()
    };
    let topic = serde_json::json!({
        "resourceType": "SubscriptionTopic", "id": "named", "url": "http://bench/topic/named", "status": "active",
        "resourceTrigger": [{"resource": "Patient", "supportedInteraction": ["create", "update"],
            "fhirPathCriteria": "%current.name.exists()"}],
        "canFilterBy": [{"resource": "Patient", "filterParameter": "identifier"}],
    });
    anyhow::ensure!(
        put("SubscriptionTopic/named".into(), topic)
            .await?
            .status()
            .is_success(),
        "topic"
    );
    for k in 0..subs {
        let s = serde_json::json!({
            "resourceType": "Subscription", "id": format!("s{k}"), "status": "requested", "reason": "bench",
            "criteria": "http://bench/topic/named",
            "_criteria": {"extension": [{"url": format!("{BACKPORT}/backport-filter-criteria"), "valueString": format!("Patient?identifier=g{k}")}]},
            "channel": {"type": "rest-hook", "endpoint": hook.url(), "payload": "application/fhir+json",
                "_payload": {"extension": [{"url": format!("{BACKPORT}/backport-payload-content"), "valueCode": "id-only"}]},
                "extension": [{"url": format!("{BACKPORT}/backport-max-count"), "valueUnsignedInt": 100}]},
        });
        let r = put(format!("Subscription/s{k}"), s).await?;
        let status = r.status();
        anyhow::ensure!(
            status.is_success(),
            "subscription s{k}: {status} {}",
            r.text().await.unwrap_or_default()
        );
    }
    hook.wait(60, "handshakes", |g| g.len() >= subs).await;
    // patients no subscription's filter passes: the matcher's cost alone
    let unmatched = sub_writes(&http, &node.base, 10 * count, count, 0).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!(
        "subs: {count} writes, {subs} subscriptions, none notified: {unmatched:.0} writes/s ({:.0}% of none)",
        unmatched * 100.0 / none
    );
    let t = Instant::now();
    let with = sub_writes(&http, &node.base, 0, count, subs).await?;
    let got = hook
        .wait(300, "all notifications", |g| {
            notified(g).len() as u64 >= count
        })
        .await;
    let drained = t.elapsed();
    println!(
        "subs: {count} writes, {subs} subscriptions, each write notified: {with:.0} writes/s ({:.0}% of none); all {count} notified after {:.2} s ({:.0} events/s), {} POSTs",
        with * 100.0 / none,
        drained.as_secs_f64(),
        count as f64 / drained.as_secs_f64(),
        got.len() - subs
    );
    // latency at a fixed rate
    let total = rate * seconds;
    let from = count;
    let mut written: Vec<(String, Instant)> = Vec::with_capacity(total as usize);
    let start = Instant::now();
    for n in 0..total {
        let due = start + Duration::from_secs_f64(n as f64 / rate as f64);
        tokio::time::sleep_until(due.into()).await;
        let i = from + n;
        let r = put(
            format!("Patient/p{i}"),
            serde_json::from_str(&sub_patient(i, subs))?,
        )
        .await?;
        anyhow::ensure!(r.status().is_success(), "PUT p{i}");
        written.push((format!("p{i}"), Instant::now()));
    }
    let got = hook
        .wait(60, "latency-run notifications", |g| {
            notified(g).len() as u64 >= count + total
        })
        .await;
    let seen = notified(&got);
    let mut lat: Vec<Duration> = written
        .iter()
        .filter_map(|(id, at)| seen.get(id).map(|s| s.saturating_duration_since(*at)))
        .collect();
    lat.sort();
    println!(
        "subs: notification latency (201 -> hook) at {rate} writes/s, {subs} subscriptions: p50 {:?}, p99 {:?}, max {:?}, missing {}",
        pct(&lat, 0.50),
        pct(&lat, 0.99),
        lat.last().copied().unwrap_or_default(),
        total as usize - lat.len()
    );
    drop(node);
    Ok(())
}

async fn audit_bench(
    bin: std::path::PathBuf,
    count: u64,
    wait: bool,
    work: std::path::PathBuf,
) -> anyhow::Result<()> {
    use fhirsync_testkit::NodeProcess;
    let dir = work.join("audit");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&work)?;
    let cfg = work.join("audit-wait.toml");
    std::fs::write(&cfg, "[api]\naudit_wait = true\n")?;
    let extra: Vec<&str> = if wait {
        vec!["--config", cfg.to_str().unwrap_or_default()]
    } else {
        Vec::new()
    };
    let node = NodeProcess::spawn(&bin, &dir, &extra)?;
    let http = reqwest::Client::new();
    let writes = sub_writes(&http, &node.base, 0, count, 1).await?;
    let clients = 8u64;
    let t = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..clients {
        let (http, base) = (http.clone(), node.base.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = w;
            while i < count {
                let r = http.get(format!("{base}/Patient/p{i}")).send().await?;
                anyhow::ensure!(r.status().is_success(), "GET p{i}: {}", r.status());
                r.bytes().await?;
                i += clients;
            }
            Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    let reads = count as f64 / t.elapsed().as_secs_f64();
    let r = http
        .get(format!("{}/AuditEvent?_summary=count", node.base))
        .send()
        .await?;
    let audited = if r.status().is_success() {
        let v: serde_json::Value = r.json().await?;
        format!("{} AuditEvents for {} requests", v["total"], 2 * count)
    } else {
        format!("no audit trail (HTTP {})", r.status())
    };
    println!("audit: {count} writes {writes:.0}/s, {count} reads {reads:.0}/s; {audited}");
    Ok(())
}

/// Writes ROWS observation rows into `DB.obs` in transactions of TX
/// (patient ids from `first` on, 1,000 of them); answers the seconds taken.
async fn write_obs(
    conn: &mut mysql_async::Conn,
    db: &str,
    rows: u64,
    tx: u64,
    first: u64,
) -> anyhow::Result<f64> {
    use mysql_async::prelude::Queryable;
    let t = Instant::now();
    let mut n = 0u64;
    while n < rows {
        let k = tx.min(rows - n);
        let values: Vec<String> = (n..n + k)
            .map(|i| {
                format!(
                    "('obs-{i:08}', {}, 'weight', {}.5, '2026-01-02 03:04:05', '2026-01-02 03:04:05.678')",
                    first + i % 1000,
                    i % 97
                )
            })
            .collect();
        conn.query_drop(format!(
            "INSERT INTO {db}.obs (uuid, person_id, concept, value_numeric, obs_datetime, date_created) VALUES {}",
            values.join(",")
        ))
        .await?;
        n += k;
    }
    Ok(t.elapsed().as_secs_f64())
}

async fn binlog_bench(rows: u64, tx: u64) -> anyhow::Result<()> {
    use fhirsync_db::binlog::{current_position, Reader};
    let db = fhirsync_testkit::mariadb::MariaDb::start()?;
    db.sql(
        "CREATE DATABASE emr; CREATE TABLE emr.obs (id INT PRIMARY KEY AUTO_INCREMENT, \
         uuid CHAR(36) NOT NULL UNIQUE, person_id INT, concept VARCHAR(40), value_numeric DOUBLE, \
         obs_datetime DATETIME, date_created DATETIME(3))",
    );
    let mut conn = mysql_async::Conn::from_url(&db.url).await?;
    let start = current_position(&mut conn).await?;
    let written = write_obs(&mut conn, "emr", rows, tx, 0).await?;
    let t = Instant::now();
    let mut r = Reader::open(&db.url, 999, &start, vec!["emr.obs".into()]).await?;
    let mut got = 0u64;
    let mut txs = 0u64;
    while got < rows {
        let t = r.next().await?;
        got += t.changes.len() as u64;
        txs += 1;
    }
    let read = t.elapsed().as_secs_f64();
    println!(
        "binlog: {rows} rows written in {written:.2} s ({:.0}/s); read back as {txs} transactions in {read:.2} s: {:.0} row changes/s",
        rows as f64 / written,
        rows as f64 / read
    );
    Ok(())
}

async fn count(c: &mut mysql_async::Conn, sql: &str) -> anyhow::Result<u64> {
    use mysql_async::prelude::Queryable;
    Ok(c.query_first::<u64, _>(sql).await?.unwrap_or_default())
}

async fn db_sync_bench(
    rows: u64,
    tx: u64,
    rate: u64,
    seconds: u64,
    transport: &str,
) -> anyhow::Result<()> {
    use fhirsync_db::config::SenderConfig;
    use fhirsync_db::receiver::Receiver;
    use fhirsync_db::sender::Sender;
    use mysql_async::prelude::Queryable;
    let db = fhirsync_testkit::mariadb::MariaDb::start()?;
    let schema = |d: &str| {
        format!(
            "CREATE DATABASE {d}; CREATE TABLE {d}.person (id INT PRIMARY KEY AUTO_INCREMENT, \
             uuid CHAR(36) NOT NULL UNIQUE, name VARCHAR(50), birthdate DATE); \
             CREATE TABLE {d}.obs (id INT PRIMARY KEY AUTO_INCREMENT, uuid CHAR(36) NOT NULL UNIQUE, \
             person_id INT NOT NULL, concept VARCHAR(40), value_numeric DOUBLE, obs_datetime DATETIME, \
             date_created DATETIME(3), FOREIGN KEY (person_id) REFERENCES {d}.person(id));"
        )
    };
    db.sql(&(schema("site") + &schema("central")));
    let people: Vec<String> = (0..1000)
        .map(|i| format!("('person-{i:04}', 'Patient {i}', '1980-01-01')"))
        .collect();
    db.sql(&format!(
        "INSERT INTO site.person (uuid, name, birthdate) VALUES {}",
        people.join(",")
    ));
    let receiver = Arc::new(Receiver::open(&db.url, "central", None, Vec::new()).await?);
    let token = receiver.add_site("site").await?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = fhirsync_db::server::router(receiver.clone(), None);
    tokio::spawn(async move { axum::serve(listener, app).await });
    let nats = if transport == "nats" {
        Some(fhirsync_testkit::nats::NatsServer::start()?)
    } else {
        None
    };
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    if let Some(n) = &nats {
        let link: fhirsync_db::config::NatsLink =
            toml::from_str(&format!("servers = [\"{}\"]", n.url()))?;
        tokio::spawn(fhirsync_db::nats::receive(
            receiver.clone(),
            link,
            stop.clone(),
        ));
    }
    let state = tempfile::tempdir()?;
    let link = match &nats {
        Some(n) => format!("[nats]\nservers = [\"{}\"]\n", n.url()),
        None => format!("[http]\nurl = \"http://{addr}\"\ntoken = \"{token}\"\n"),
    };
    let cfg: SenderConfig = toml::from_str(&format!(
        "site = \"site\"\nsource = \"{}\"\ndatabase = \"site\"\nstate_dir = \"{}\"\nsnapshot = true\n{link}",
        db.url,
        state.path().display()
    ))?;
    let sender = Sender::open(cfg).await?;
    let progress = sender.progress.clone();
    let run = tokio::spawn(sender.run(false, stop.clone()));
    let mut central = mysql_async::Conn::from_url(&db.url).await?;
    while count(&mut central, "SELECT COUNT(*) FROM central.person").await? < 1000 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut site = mysql_async::Conn::from_url(&db.url).await?;
    let t = Instant::now();
    let written = write_obs(&mut site, "site", rows, tx, 1).await?;
    while count(&mut central, "SELECT COUNT(*) FROM central.obs").await? < rows {
        anyhow::ensure!(!run.is_finished(), "the sender stopped");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let synced = t.elapsed().as_secs_f64();
    let mapped = count(
        &mut central,
        "SELECT COUNT(*) FROM central.obs o JOIN central.person p ON p.id = o.person_id \
         WHERE p.uuid = CONCAT('person-', LPAD(MOD(CAST(SUBSTRING(o.uuid, 5) AS UNSIGNED), 1000), 4, '0'))",
    )
    .await?;
    let batches = progress.batches.load(std::sync::atomic::Ordering::Relaxed);
    println!(
        "db-sync ({transport}): {rows} rows in transactions of {tx}: written in {written:.2} s ({:.0}/s), \
         all in the central database after {synced:.2} s: {:.0} row changes/s sustained; {batches} batches; \
         {mapped} of {rows} with the right patient",
        rows as f64 / written,
        rows as f64 / synced
    );
    // Lag: single-row transactions at RATE/s; each sampled row is timed
    // from its commit to its arrival.
    let mut lags = Vec::new();
    let start = Instant::now();
    let mut i = 0u64;
    let period = Duration::from_secs_f64(1.0 / rate as f64);
    while start.elapsed() < Duration::from_secs(seconds) {
        let uuid = format!("lag-{i:08}");
        site.query_drop(format!(
            "INSERT INTO site.obs (uuid, person_id, concept) VALUES ('{uuid}', 1, 'lag')"
        ))
        .await?;
        if i.is_multiple_of((rate / 5).max(1)) {
            let committed = Instant::now();
            loop {
                let found: Option<u64> = central
                    .query_first(format!("SELECT 1 FROM central.obs WHERE uuid = '{uuid}'"))
                    .await?;
                if found.is_some() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            lags.push(committed.elapsed().as_secs_f64() * 1000.0);
        }
        i += 1;
        let next = start + period * i as u32;
        tokio::time::sleep_until(next.into()).await;
    }
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| lags[((lags.len() - 1) as f64 * p) as usize];
    println!(
        "db-sync ({transport}) lag at {rate} transactions/s for {seconds} s: p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms ({} samples)",
        pct(0.5),
        pct(0.95),
        pct(1.0),
        lags.len()
    );
    let _ = stop_tx.send(true);
    Ok(())
}
