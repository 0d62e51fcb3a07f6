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
    HttpTx {
        #[arg(long)]
        base: String,
        #[arg(long, default_value_t = 4)]
        clients: usize,
        #[arg(long, default_value_t = 40)]
        bundles: usize,
        #[arg(long, default_value_t = 50)]
        encounters: usize,
        #[arg(long, default_value_t = 16)]
        obs: usize,
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
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
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
    }
}

async fn http_tx(
    base: String,
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
    for _ in 0..clients {
        let (queue, client, base) = (queue.clone(), client.clone(), base.clone());
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

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}
