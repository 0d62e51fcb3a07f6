//! `fhirsync import`: streams files into the store without HTTP. Files are
//! read in chunks, parsed in parallel, and applied by the store's writer in
//! one transaction: the whole import lands, or (on the first bad line)
//! nothing does and the error names the file and line. What is loaded is
//! validated as the node's `[validation] mode` says.

use std::fs::File;
use std::io::BufReader;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use fhirsync_core::resource::parse_resource;
use fhirsync_store::load::{line_request, read_lines, resource_request, Checker, Recent};
use fhirsync_store::sqlite::{Presorted, SqliteStore, StreamMsg};
use fhirsync_store::{StoreError, WriteRequest};
use fhirsync_sync::files::{split_file, FilePart};
use indicatif::{ProgressBar, ProgressStyle};
use rayon::prelude::*;

use crate::config::Config;
use crate::lock::lock_data_dir;

/// Batches in flight between the parser and the writer.
const PIPELINE_DEPTH: usize = 4;

/// The writer closed the stream early: it refused a request.
#[derive(Debug)]
struct WriterStopped;

impl std::fmt::Display for WriterStopped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("the store stopped accepting the import")
    }
}

impl std::error::Error for WriterStopped {}

/// Where a request came from, to name it in errors.
#[derive(Clone)]
struct Origin {
    file: PathBuf,
    line: usize,
}

pub fn run(cfg: Config, batch_size: usize, paths: &[PathBuf]) -> anyhow::Result<()> {
    crate::serve::init_logging("warn");
    let checker = Checker::new(cfg.validation_mode()?);
    let files = collect_files(paths)?;
    let total_bytes: u64 = files
        .iter()
        .filter_map(|f| f.metadata().ok())
        .map(|m| m.len())
        .sum();
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let store = cfg.open_store_offline()?;
    let (tx, done) = store.load_stream(PIPELINE_DEPTH)?;

    let bar = ProgressBar::new(total_bytes);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {binary_bytes_per_sec} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let mut sent: u64 = 0;
    let mut recent = Recent::new(PIPELINE_DEPTH);
    let mut send =
        |mut reqs: Vec<WriteRequest>, origins: Vec<Origin>, sent: &mut u64| -> anyhow::Result<()> {
            recent.push(*sent, origins);
            *sent += reqs.len() as u64;
            let index = Presorted::take(&mut reqs);
            tx.blocking_send(StreamMsg::Batch(reqs, index))
                .map_err(|_| anyhow::Error::new(WriterStopped))
        };

    let result: anyhow::Result<()> = (|| {
        for file in &files {
            let is_ndjson = fhirsync_sync::files::is_ndjson(file);
            if is_ndjson {
                let f =
                    File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
                let mut reader = BufReader::with_capacity(1 << 20, f);
                let mut line_no = 0usize;
                loop {
                    let lines =
                        read_lines(&mut reader, batch_size, &mut line_no, |n| bar.inc(n as u64))
                            .with_context(|| {
                                format!("{}:{}: cannot read", file.display(), line_no + 1)
                            })?;
                    if lines.is_empty() {
                        break;
                    }
                    let parsed: Vec<Result<WriteRequest, String>> = lines
                        .par_iter()
                        .map(|(_, l)| line_request(l.as_bytes(), &checker))
                        .collect();
                    let mut reqs = Vec::with_capacity(parsed.len());
                    let mut origins = Vec::with_capacity(parsed.len());
                    for ((line, _), p) in lines.iter().zip(parsed) {
                        match p {
                            Ok(r) => {
                                reqs.push(r);
                                origins.push(Origin {
                                    file: file.clone(),
                                    line: *line,
                                });
                            }
                            Err(e) => bail!("{}:{}: {}", file.display(), line, e),
                        }
                    }
                    send(reqs, origins, &mut sent)?;
                }
            } else {
                let bytes = std::fs::read(file)
                    .with_context(|| format!("cannot read {}", file.display()))?;
                bar.inc(bytes.len() as u64);
                let reqs = file_requests(&bytes, &checker)
                    .map_err(|e| anyhow::anyhow!("{}: {}", file.display(), e))?;
                let origins = vec![
                    Origin {
                        file: file.clone(),
                        line: 1,
                    };
                    reqs.len()
                ];
                send(reqs, origins, &mut sent)?;
            }
        }
        Ok(())
    })();

    // When the writer stopped (it refused a request), its own answer says why.
    let writer_stopped = matches!(&result, Err(e) if e.is::<WriterStopped>());
    if let Err(e) = result {
        if !writer_stopped {
            drop(tx); // no Commit: the writer rolls everything back
            let _ = done.blocking_recv();
            bar.abandon();
            return Err(e.context("nothing was imported"));
        }
    } else {
        // A failed send means the writer has already answered below.
        let _ = tx.blocking_send(StreamMsg::Commit);
    }
    drop(tx);
    let summary = match done.blocking_recv() {
        Ok(Ok(s)) => s,
        Ok(Err(StoreError::Entry { index, source })) => {
            bar.abandon();
            let at = recent
                .find(index as u64)
                .map(|o: Origin| format!("{}:{}", o.file.display(), o.line))
                .unwrap_or_else(|| format!("request {index}"));
            bail!("{at}: {source}; nothing was imported");
        }
        Ok(Err(e)) => bail!("{e}; nothing was imported"),
        Err(_) => bail!("the store writer stopped; nothing was imported"),
    };
    bar.finish_and_clear();
    drop(store);
    let lenient = checker.lenient();
    if lenient > 0 {
        eprintln!("{lenient} resources fail validation and were stored anyway ([validation] mode = \"lenient\")");
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "imported {} resources from {} files in {:.2} s ({:.0}/s): {} created, {} updated, {} unchanged, {} deleted; change log at seq {}",
        summary.requests,
        files.len(),
        secs,
        summary.requests as f64 / secs.max(1e-9),
        summary.created,
        summary.updated,
        summary.unchanged,
        summary.deleted,
        summary.last_seq
    );
    Ok(())
}

/// Files to load, in a stable order; directories are searched recursively.
fn collect_files(paths: &[PathBuf]) -> anyhow::Result<Vec<PathBuf>> {
    let out = fhirsync_sync::files::collect_files(paths)?;
    if out.is_empty() {
        bail!("no .json or .ndjson files found");
    }
    Ok(out)
}

/// A `.json` file as write requests (see `fhirsync_sync::files::split_file`).
fn file_requests(bytes: &[u8], checker: &Checker) -> Result<Vec<WriteRequest>, String> {
    let res = parse_resource(bytes).map_err(|e| e.to_string())?;
    split_file(res, false)?
        .into_iter()
        .map(|part| match part {
            FilePart::Bundle(b) => Ok(WriteRequest::Bundle(
                fhirsync_store::bundle::plan(checker.check_map(b)?).map_err(|e| e.to_string())?,
            )),
            FilePart::Resource { res, entry: None } => resource_request(res, checker),
            FilePart::Resource {
                res,
                entry: Some(i),
            } => resource_request(res, checker).map_err(|m| format!("entry {i}: {m}")),
        })
        .collect()
}

/// `fhirsync reindex`: the whole search index rebuilt, with progress on
/// stderr.
pub fn reindex(cfg: Config) -> anyhow::Result<()> {
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let start = std::time::Instant::now();
    if cfg.postgres()?.is_some() {
        // additive, in place: other processes on the database serve on
        let store = cfg.open_store()?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")?;
        let st = rt.block_on(store.reindex()).context("cannot reindex")?;
        println!(
            "reindexed {} versions in {:.2} s",
            st.done,
            start.elapsed().as_secs_f64()
        );
        return Ok(());
    }
    let mut last_report = std::time::Instant::now();
    let n = SqliteStore::reindex_offline(&cfg.sqlite()?, &mut |done, total| {
        if last_report.elapsed().as_secs() >= 1 || done == total {
            eprintln!("reindexed {done} of {total} versions");
            last_report = std::time::Instant::now();
        }
    })
    .context("cannot reindex")?;
    println!(
        "reindexed {n} versions in {:.2} s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}
