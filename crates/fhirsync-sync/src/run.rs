//! Drives one sync run: builds the clients, starts the source reader and
//! the writers, and hands the mode-specific parts to [`crate::compare`] and
//! [`crate::incremental`].

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::client::FhirClient;
use crate::ids::Prefixer;
use crate::options::{BulkRead, Mode, SourceSpec, SyncOptions, SOURCE_RETRY_COUNT};
use crate::report::{Count, Failure, Report};
use crate::source::{
    is_infrastructure, read_directory, read_search, server_types, type_url, Item, Searched, FIRST,
    INFRASTRUCTURE,
};
use crate::upload::{Shared, Uploader};
use crate::SyncError;

/// Builds the source client, if the source is a server.
pub fn source_client(opts: &SyncOptions) -> Result<Option<FhirClient>, SyncError> {
    opts.source
        .base()
        .map(|b| {
            FhirClient::new(
                b,
                opts.source_auth.clone(),
                opts.request_id.clone(),
                SOURCE_RETRY_COUNT,
                opts.source_tls.as_ref(),
            )
        })
        .transpose()
}

pub fn uploader(opts: &SyncOptions) -> Result<Arc<Uploader>, SyncError> {
    let targets = opts
        .targets
        .iter()
        .map(|t| {
            FhirClient::new(
                t,
                opts.target_auth.clone(),
                opts.request_id.clone(),
                opts.target_retry_count,
                opts.target_tls.as_ref(),
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    let prefix = opts
        .prefix_numeric_ids
        .as_deref()
        .map(|p| Prefixer::new(p, opts.source.base()));
    if let Some(p) = &opts.semaphore_path {
        crate::semaphore::check(p).map_err(SyncError::Options)?;
    }
    Ok(Arc::new(Uploader::new(
        targets,
        prefix,
        opts.dry_run,
        opts.semaphore_path.clone(),
    )))
}

/// Checks a server answers (and accepts the credentials) before any
/// write; returns its CapabilityStatement.
pub async fn probe(client: &FhirClient, side: &str) -> Result<Value, SyncError> {
    let r = client
        .send(reqwest::Method::GET, "metadata", None)
        .await
        .map_err(|e| match e {
            SyncError::Http { url, reason } => SyncError::Http {
                url,
                reason: format!("{side} not reachable: {reason}"),
            },
            e => e,
        })?;
    match r.status {
        200..=299 => Ok(r.body),
        s => Err(crate::client::status_error(
            &format!("{side} {}", client.base()),
            s,
            &r.body,
        )),
    }
}

/// Runs the whole sync. `report` is updated as it goes (for progress);
/// `stop` ends a `--follow` run cleanly.
pub async fn run(
    opts: SyncOptions,
    report: Arc<Mutex<Report>>,
    stop: watch::Receiver<bool>,
) -> Result<(), SyncError> {
    opts.check()?;
    let started = Instant::now();
    let shared = Shared::new(report.clone());
    let up = uploader(&opts)?;
    let source = source_client(&opts)?;
    let source_cap = match &source {
        Some(s) => probe(s, "source").await?,
        None => Value::Null,
    };
    let mut all_batch = true;
    let mut target_caps = Vec::with_capacity(up.targets.len());
    for t in &up.targets {
        let cap = probe(t, "target").await?;
        all_batch &= cap["rest"][0]["interaction"]
            .as_array()
            .is_some_and(|a| a.iter().any(|i| i["code"] == "batch"));
        target_caps.push(cap);
    }
    if all_batch {
        up.set_batch(crate::upload::BATCH_ENTRIES_MAX);
    }
    let r = match opts.mode {
        Mode::Copy => copy(&opts, source, &up, &shared).await,
        Mode::Synthea => synthea(&opts, &up, &shared).await,
        Mode::Compare => match &source {
            Some(s) if crate::summaries::applies(&opts, &source_cap, &target_caps[0]) => {
                match crate::summaries::compare(&opts, s, &up.targets[0], &up, &shared).await {
                    Ok(true) => Ok(()),
                    Ok(false) => crate::compare::compare(&opts, source, &up, &shared).await,
                    Err(e) => Err(e),
                }
            }
            _ => crate::compare::compare(&opts, source, &up, &shared).await,
        },
        Mode::Incremental => {
            let s = source
                .ok_or_else(|| SyncError::Options("INCREMENTAL needs a server source".into()))?;
            crate::incremental::incremental(&opts, s, &up, &shared, stop).await
        }
    };
    if let Ok(mut rep) = report.lock() {
        rep.seconds = started.elapsed().as_secs_f64();
    }
    r?;
    match shared.take_fatal() {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

/// Starts the reader of `opts.source` feeding `tx`; counts what it reads.
pub fn spawn_reader(
    opts: &SyncOptions,
    source: Option<FhirClient>,
    tx: mpsc::Sender<Item>,
    shared: Arc<Shared>,
    bundles_as_tx: bool,
) -> tokio::task::JoinHandle<Result<Vec<String>, SyncError>> {
    let spec = opts.source.clone();
    let types = opts.resource_types.clone();
    let ids = opts.resource_ids.clone();
    let bulk = opts.bulk;
    tokio::spawn(async move {
        let count = |i: &Item| shared.count(i.rtype(), Count::Read);
        match spec {
            SourceSpec::Directory(dir) => {
                // Check every file before anything is written, then read again.
                let d = dir.clone();
                let total =
                    tokio::task::spawn_blocking(move || read_directory(&d, None, bundles_as_tx))
                        .await
                        .map_err(|e| SyncError::Index(e.to_string()))??;
                if let Ok(mut r) = shared.report.lock() {
                    r.expected = Some(total);
                }
                let sh = shared.clone();
                let types2 = types.clone();
                let (ftx, mut frx) = mpsc::channel::<Item>(64);
                let reader = tokio::task::spawn_blocking(move || {
                    read_directory(&dir, Some(&ftx), bundles_as_tx)
                });
                let mut seen_types: Vec<String> = Vec::new();
                while let Some(item) = frx.recv().await {
                    if !types2.is_empty() && !types2.iter().any(|t| t == item.rtype()) {
                        continue;
                    }
                    if !seen_types.iter().any(|t| t == item.rtype()) {
                        seen_types.push(item.rtype().to_owned());
                    }
                    sh.count(item.rtype(), Count::Read);
                    if tx.send(item).await.is_err() {
                        break;
                    }
                }
                reader
                    .await
                    .map_err(|e| SyncError::Index(e.to_string()))??;
                Ok(if types.is_empty() { seen_types } else { types })
            }
            SourceSpec::Search { url, .. } => {
                let c = source.ok_or_else(|| SyncError::Options("no source client".into()))?;
                if read_search(&c, &url, &tx, bundles_as_tx, count).await? == Searched::NotSupported
                {
                    return Err(SyncError::Http {
                        url: c.url(&url),
                        reason: "the source does not support this search".into(),
                    });
                }
                let t = url
                    .rsplit('/')
                    .next()
                    .unwrap_or("")
                    .split('?')
                    .next()
                    .unwrap_or("")
                    .to_owned();
                Ok(vec![t])
            }
            SourceSpec::Server(_) => {
                let c = source.ok_or_else(|| SyncError::Options("no source client".into()))?;
                if !ids.is_empty() {
                    for (t, id) in &ids {
                        let r = c
                            .send(reqwest::Method::GET, &format!("{t}/{id}"), None)
                            .await?;
                        if r.status != 200 {
                            shared.fail(
                                t,
                                Failure {
                                    resource: format!("{t}/{id}"),
                                    status: r.status,
                                    message: format!(
                                        "not readable on the source: {}",
                                        crate::client::outcome_text(&r.body)
                                    ),
                                    outcome: Value::Null,
                                },
                            );
                            continue;
                        }
                        let Value::Object(res) = r.body else { continue };
                        let item = Item::from_resource(res, format!("{t}/{id}"), bundles_as_tx)
                            .map_err(|reason| SyncError::Http {
                                url: c.url(&format!("{t}/{id}")),
                                reason,
                            })?;
                        count(&item);
                        if tx.send(item).await.is_err() {
                            break;
                        }
                    }
                    let mut t: Vec<String> = ids.iter().map(|(t, _)| t.clone()).collect();
                    t.dedup();
                    return Ok(t);
                }
                if let Some(read) =
                    read_bulk_or_page(&c, bulk, &types, &tx, bundles_as_tx, &shared, Side::Source)
                        .await?
                {
                    return Ok(read);
                }
                let types = server_types(&c, &types).await?;
                let mut read = Vec::with_capacity(types.len());
                for t in types {
                    match read_search(&c, &type_url(&t), &tx, bundles_as_tx, count).await? {
                        Searched::Read => read.push(t),
                        Searched::NotSupported => {
                            tracing::debug!(rtype = %t, "source cannot search this type")
                        }
                    }
                }
                Ok(read)
            }
        }
    })
}

/// Which server of a run is read: the source's resources are counted as
/// read and its export's counts are the report's expected total; COMPARE
/// reads the target whole too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Side {
    Source,
    Target,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Target => "target",
        }
    }
}

/// Reads a server through bulk export when `bulk` allows it and the
/// server offers and accepts one: the types read. `None`: the server is to
/// be paged through searches instead, and the report says why.
pub(crate) async fn read_bulk_or_page<T: FromLine>(
    c: &FhirClient,
    bulk: BulkRead,
    types: &[String],
    tx: &mpsc::Sender<T>,
    with: T::With,
    shared: &Arc<Shared>,
    side: Side,
) -> Result<Option<Vec<String>>, SyncError> {
    let side_name = side.name();
    let why = if bulk == BulkRead::Never {
        "--no-bulk".to_owned()
    } else if bulk == BulkRead::Always
        || crate::bulk::advertises_export(&c.get_json("metadata").await?)
    {
        match read_bulk(c, types, tx, with, shared, side).await? {
            Some(read) => return Ok(Some(read)),
            None => format!("the {side_name} refused $export"),
        }
    } else {
        format!("the {side_name} does not offer $export")
    };
    shared.note(format!(
        "read the {side_name} page by page through searches ({why})"
    ));
    Ok(None)
}

/// What a line of a bulk export file becomes for a reader's consumer.
pub(crate) trait FromLine: Sized + Send + 'static {
    /// How lines are read (for items: whether Bundles become transactions).
    type With: Copy + Send + 'static;
    /// `None`: left out (it describes the server, see [`is_infrastructure`]).
    fn from_line(line: &[u8], at: String, with: Self::With) -> Result<Option<Self>, SyncError>;
    fn rtype(&self) -> &str;
}

impl FromLine for Item {
    type With = bool;
    fn from_line(line: &[u8], at: String, bundles_as_tx: bool) -> Result<Option<Item>, SyncError> {
        let Ok(Value::Object(res)) = serde_json::from_slice::<Value>(line) else {
            return Err(SyncError::File {
                path: at,
                reason: "not a JSON object".into(),
            });
        };
        if is_infrastructure(&res) {
            return Ok(None);
        }
        Item::from_resource(res, at.clone(), bundles_as_tx)
            .map(Some)
            .map_err(|e| SyncError::File {
                path: at,
                reason: e,
            })
    }
    fn rtype(&self) -> &str {
        Item::rtype(self)
    }
}

/// Reads a server through bulk export: the files are read as they
/// download, in the order reference targets first; `None` when the server
/// refuses the export (the target also when it refuses this caller with
/// 401 or 403), else the types read (those asked for, or those
/// with files when none were named). What describes the server (see
/// [`is_infrastructure`]) is left out, as when paging.
async fn read_bulk<T: FromLine>(
    c: &FhirClient,
    types: &[String],
    tx: &mpsc::Sender<T>,
    with: T::With,
    shared: &Arc<Shared>,
    side: Side,
) -> Result<Option<Vec<String>>, SyncError> {
    let req = crate::bulk::ExportRequest {
        types: types.to_vec(),
        ..Default::default()
    };
    let status_url = match crate::bulk::kick_off(c, &req).await {
        Ok(Some(url)) => url,
        Ok(None) => return Ok(None),
        // Credentials that may search the target but not export it: the
        // target is paged, as it was before it could be exported.
        Err(SyncError::Status {
            status: 401 | 403, ..
        }) if side == Side::Target => return Ok(None),
        Err(e) => return Err(e),
    };
    let m = crate::bulk::wait(
        c,
        &status_url,
        &|p| tracing::debug!(progress = %p, "export"),
    )
    .await?;
    if side == Side::Source {
        if let Ok(mut r) = shared.report.lock() {
            r.expected = m.output.iter().map(|f| f.count).sum();
        }
    }
    let mut files = m.output.clone();
    let rank = |t: &str| FIRST.iter().position(|f| *f == t).unwrap_or(FIRST.len());
    files.sort_by_key(|f| rank(&f.rtype));
    let mut read: Vec<String> = Vec::new();
    let (mut n, mut files_read) = (0u64, 0usize);
    for f in &files {
        if INFRASTRUCTURE.contains(&f.rtype.as_str()) {
            continue;
        }
        files_read += 1;
        if !read.contains(&f.rtype) {
            read.push(f.rtype.clone());
        }
        let mut lines = crate::bulk::Lines::new(c, &f.url);
        while let Some(batch) = lines.next_batch().await? {
            let first = lines.delivered() - batch.len() as u64;
            // parsed off the runtime's threads
            let url = f.url.clone();
            let items = tokio::task::spawn_blocking(move || {
                batch
                    .iter()
                    .enumerate()
                    .map(|(i, l)| T::from_line(l, format!("{url}:{}", first + i as u64 + 1), with))
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| SyncError::Index(e.to_string()))?;
            for item in items {
                let Some(item) = item? else { continue };
                if side == Side::Source {
                    shared.count(item.rtype(), Count::Read);
                }
                n += 1;
                if tx.send(item).await.is_err() {
                    return Ok(Some(read));
                }
            }
        }
    }
    // the server may drop the files now
    let _ = c.send(reqwest::Method::DELETE, &status_url, None).await;
    shared.note(format!(
        "read the {} through bulk export: {files_read} files, {n} resources at {}",
        side.name(),
        m.transaction_time
    ));
    // An export covers every type it was asked for, those it had no file
    // for too (the source holds none of them).
    if !types.is_empty() {
        read = types
            .iter()
            .filter(|t| !INFRASTRUCTURE.contains(&t.as_str()))
            .cloned()
            .collect();
    }
    Ok(Some(read))
}

async fn copy(
    opts: &SyncOptions,
    source: Option<FhirClient>,
    up: &Arc<Uploader>,
    shared: &Arc<Shared>,
) -> Result<(), SyncError> {
    let n = opts.thread_count;
    let (tx, rx) = mpsc::channel::<Item>(crate::upload::queue_depth(n));
    let reader = spawn_reader(
        opts,
        source,
        tx,
        shared.clone(),
        opts.upload_bundles_as_transactions,
    );
    // Id prefixing between reader and writers.
    let (trx, transform) = up.spawn_transform(rx, crate::upload::queue_depth(n));
    up.drain(trx, n, shared, true).await;
    let _ = transform.await;
    let read = reader.await.map_err(|e| SyncError::Index(e.to_string()))?;
    read?;
    up.retry_deferred(n, shared).await;
    Ok(())
}

/// Synthea output: hospital and practitioner bundles first, then patients,
/// each Bundle one transaction.
async fn synthea(
    opts: &SyncOptions,
    up: &Arc<Uploader>,
    shared: &Arc<Shared>,
) -> Result<(), SyncError> {
    let SourceSpec::Directory(dir) = &opts.source else {
        return Err(SyncError::Options(
            "SYNTHEA takes a directory source".into(),
        ));
    };
    let files = crate::files::collect_files(std::slice::from_ref(dir))?;
    let is_support = |p: &std::path::PathBuf| {
        let name = p
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        name.starts_with("hospitalInformation") || name.starts_with("practitionerInformation")
    };
    let (support, patients): (Vec<_>, Vec<_>) = files.into_iter().partition(is_support);
    for group in [support, patients] {
        let (tx, rx) = mpsc::channel::<Item>(opts.thread_count * 2);
        let sh = shared.clone();
        let feed = tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
            for f in group {
                let name = f.display().to_string();
                let bytes = std::fs::read(&f).map_err(|e| SyncError::File {
                    path: name.clone(),
                    reason: e.to_string(),
                })?;
                let v: Value = serde_json::from_slice(&bytes).map_err(|e| SyncError::File {
                    path: name.clone(),
                    reason: format!("not valid JSON: {e}"),
                })?;
                let Value::Object(mut res) = v else {
                    return Err(SyncError::File {
                        path: name,
                        reason: "not a JSON object".into(),
                    });
                };
                if res.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
                    return Err(SyncError::File {
                        path: name,
                        reason: "SYNTHEA mode takes transaction Bundles".into(),
                    });
                }
                res.insert("type".into(), Value::String("transaction".into()));
                for e in res
                    .get("entry")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or(&[])
                {
                    sh.count(
                        e["resource"]["resourceType"].as_str().unwrap_or("Bundle"),
                        Count::Read,
                    );
                }
                if tx
                    .blocking_send(Item::Bundle { res, origin: name })
                    .is_err()
                {
                    break;
                }
            }
            Ok(())
        });
        up.drain(rx, opts.thread_count, shared, false).await;
        feed.await.map_err(|e| SyncError::Index(e.to_string()))??;
        if shared.aborted() {
            break;
        }
    }
    Ok(())
}
