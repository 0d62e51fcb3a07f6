//! The seeded simulation (`fhirsync_testkit::sim`): a tree of six nodes on
//! real SQLite stores, random writes, deletes, concurrent edits and
//! resolutions over a network that drops, duplicates, reorders and cuts,
//! with crashes and skewed clocks; invariants after every step and after
//! healing. The policy (manual, hlc-lww, merge) follows the seed.
//!
//! `cargo test -p fhirsync --test simulation` runs seeds 1..=SEEDS_CI;
//! `… -- --seed N` replays one seed exactly; `… -- --seeds A..B` runs a
//! longer campaign (docs/replication.md).

use std::process::ExitCode;

use fhirsync_testkit::sim::{Sim, SimConfig};

/// Seeds the suite runs (well under a second each, debug build).
const SEEDS_CI: u64 = 24;

/// Seeds that found bugs, kept whatever `SEEDS_CI` becomes: 5, 8, 11, 14
/// (`merge`: two ends merged one pair against different ancestors and a
/// node stored one vector twice, with two contents) and 20, 21 (a second
/// concurrent branch replaced the first in the one open conflict of a
/// resource, so one end of an edge stopped showing it).
const REGRESSION_SEEDS: [u64; 6] = [5, 8, 11, 14, 20, 21];

fn run(seed: u64) -> Result<fhirsync_testkit::sim::Outcome, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let cfg = SimConfig::new(seed, dir.path().to_owned());
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?
        .block_on(async { Sim::new(cfg)?.run().await })
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut seeds: Vec<u64> = (1..=SEEDS_CI).chain(REGRESSION_SEEDS).collect();
    seeds.sort();
    seeds.dedup();
    let mut i = 0;
    while i < args.len() {
        let value = args.get(i + 1).cloned().unwrap_or_default();
        match args[i].as_str() {
            "--seed" => {
                seeds = vec![value.parse().expect("--seed N")];
                i += 1;
            }
            "--seeds" => {
                let (a, b) = value.split_once("..").expect("--seeds A..B");
                seeds = (a.parse().expect("A")..b.parse().expect("B")).collect();
                i += 1;
            }
            // libtest's own flags (`--nocapture`, a filter…) mean nothing here.
            _ => {}
        }
        i += 1;
    }
    let (mut passed, mut failed) = (0, 0);
    for &seed in &seeds {
        match run(seed) {
            Ok(o) => {
                passed += 1;
                println!(
                    "test seed {seed} ... ok ({} writes, {} conflicts, {} crashes, {} messages lost, {} resources)",
                    o.writes,
                    o.conflicts,
                    o.crashes,
                    o.dropped,
                    o.state.len()
                );
            }
            Err(e) => {
                failed += 1;
                println!("test seed {seed} ... FAILED\n{e}\nreplay: cargo test -p fhirsync --test simulation -- --seed {seed}");
            }
        }
    }
    // The same seed twice: the same run, to the byte.
    if seeds.len() > 1 {
        let seed = seeds[0];
        match (run(seed), run(seed)) {
            (Ok(a), Ok(b)) if a == b => passed += 1,
            _ => {
                failed += 1;
                println!("test seed {seed} twice ... FAILED: two runs differ");
            }
        }
    }
    println!("\ntest result: {}. {passed} passed; {failed} failed; 0 ignored; 0 measured; 0 filtered out\n",
        if failed == 0 { "ok" } else { "FAILED" });
    if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
