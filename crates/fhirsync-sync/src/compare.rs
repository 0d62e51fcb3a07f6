//! COMPARE: both sides go into temporary on-disk indexes (constant memory),
//! content hashes that ignore server-set fields are compared, and only
//! what is missing or different is uploaded; what the source no longer has
//! is deleted on the target (unless `--no-delete`).
//!
//! Each side has its own index file, so the two readers never wait on one
//! another's write lock, and the source's bodies go to a flat file beside
//! them: the joins scan rows of a few dozen bytes, and only bodies to send
//! are read back.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rusqlite::{params, Connection};
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::Value;
use tokio::sync::mpsc;

use crate::canonical::hash_text;
use crate::client::FhirClient;
use crate::options::{BulkRead, SourceSpec, SyncOptions, SOURCE_RETRY_COUNT};
use crate::report::{Count, Failure};
use crate::run::{read_bulk_or_page, spawn_reader, FromLine, Side};
use crate::source::{
    checked_type, is_infrastructure, type_url, Item, PageTrail, Searched, INFRASTRUCTURE,
};
use crate::upload::{Shared, Uploader};
use crate::SyncError;

/// Rows inserted per index transaction.
const INDEX_BATCH: usize = 2000;

/// The temporary files of one COMPARE run.
struct Index {
    /// The source's keys and hashes, and where each body is in `bodies`.
    src: PathBuf,
    /// The target's keys and hashes.
    tgt: PathBuf,
    /// The source's resources as JSON text, one after another.
    bodies: PathBuf,
}

impl Index {
    fn new(dir: &Path) -> Result<Index, SyncError> {
        let ix = Index {
            src: dir.join("source.db"),
            tgt: dir.join("target.db"),
            bodies: dir.join("source.bodies"),
        };
        open_index(&ix.src)?.execute_batch(
            "CREATE TABLE src (type TEXT NOT NULL, id TEXT NOT NULL, hash BLOB NOT NULL, pos INTEGER NOT NULL, len INTEGER NOT NULL, PRIMARY KEY (type, id)) WITHOUT ROWID;
             CREATE TABLE gone (type TEXT NOT NULL, id TEXT NOT NULL);",
        )?;
        open_index(&ix.tgt)?.execute_batch(
            "CREATE TABLE tgt (type TEXT NOT NULL, id TEXT NOT NULL, hash BLOB NOT NULL, PRIMARY KEY (type, id)) WITHOUT ROWID;",
        )?;
        Ok(ix)
    }

    /// The source's index with the target's attached as `t`.
    fn joined(&self) -> Result<Connection, SyncError> {
        let c = open_index(&self.src)?;
        c.execute("ATTACH DATABASE ?1 AS t", [self.tgt.to_string_lossy()])?;
        Ok(c)
    }
}

fn open_index(path: &Path) -> Result<Connection, SyncError> {
    let c = Connection::open(path)?;
    c.execute_batch(
        "PRAGMA journal_mode = MEMORY; PRAGMA synchronous = OFF; PRAGMA cache_size = -32768;",
    )?;
    Ok(c)
}

fn index_error(e: std::io::Error) -> SyncError {
    SyncError::Index(format!("the temporary index: {e}"))
}

/// One resource as an index keeps it: its key, its hash, and (on the
/// source) its text, kept as it came.
struct Row {
    rtype: String,
    id: Option<String>,
    hash: [u8; 16],
    text: Vec<u8>,
    /// Where it came from (named when it cannot be compared).
    origin: String,
}

/// The row of a resource's text; `None` when it describes the server (see
/// [`is_infrastructure`]), which is left out as other readers leave it.
fn row_of_text(text: &[u8], origin: String, keep: bool) -> Result<Option<Row>, String> {
    let h = hash_text(text).map_err(|e| format!("not a resource: {e}"))?;
    let rtype = checked_type(h.rtype.as_deref())?;
    if INFRASTRUCTURE.contains(&rtype.as_str()) || (rtype == "Basic" && infrastructure_text(text)) {
        return Ok(None);
    }
    Ok(Some(Row {
        rtype,
        id: h.id,
        hash: h.hash.to_be_bytes(),
        text: if keep { text.to_vec() } else { Vec::new() },
        origin,
    }))
}

/// [`is_infrastructure`] of a resource's text.
fn infrastructure_text(text: &[u8]) -> bool {
    matches!(serde_json::from_slice(text), Ok(Value::Object(m)) if is_infrastructure(&m))
}

impl FromLine for Row {
    /// Whether the text is kept (the source's is, to be sent).
    type With = bool;
    fn from_line(line: &[u8], at: String, keep: bool) -> Result<Option<Row>, SyncError> {
        row_of_text(line, at.clone(), keep).map_err(|reason| SyncError::File { path: at, reason })
    }
    fn rtype(&self) -> &str {
        &self.rtype
    }
}

/// Fills one side's index from `rx`, in transactions of [`INDEX_BATCH`];
/// with `bodies` (the source) each text is kept there, and a resource
/// without an id cannot be compared and fails. The target's resources
/// without ids are left out.
fn fill(
    conn: &mut Connection,
    mut bodies: Option<BufWriter<File>>,
    mut rx: mpsc::Receiver<Row>,
    shared: &Shared,
) -> Result<(), SyncError> {
    let sql = match bodies {
        Some(_) => {
            "INSERT OR REPLACE INTO src (type, id, hash, pos, len) VALUES (?1, ?2, ?3, ?4, ?5)"
        }
        None => "INSERT OR REPLACE INTO tgt (type, id, hash) VALUES (?1, ?2, ?3)",
    };
    let mut pos = 0u64;
    loop {
        let tx = conn.transaction()?;
        let mut n = 0;
        {
            let mut st = tx.prepare_cached(sql)?;
            while n < INDEX_BATCH {
                let Some(row) = rx.blocking_recv() else {
                    break;
                };
                n += 1;
                match (row.id, &mut bodies) {
                    (Some(id), Some(bodies)) => {
                        bodies.write_all(&row.text).map_err(index_error)?;
                        let len = row.text.len() as u64;
                        st.execute(params![row.rtype, id, &row.hash[..], pos as i64, len as i64])?;
                        pos += len;
                    }
                    (Some(id), None) => {
                        st.execute(params![row.rtype, id, &row.hash[..]])?;
                    }
                    (None, Some(_)) => shared.fail(
                        &row.rtype,
                        Failure {
                            resource: row.origin,
                            status: 0,
                            message: "COMPARE needs resources with ids (use COPY or SYNTHEA for this one)".into(),
                            outcome: Value::Null,
                        },
                    ),
                    (None, None) => {}
                }
            }
        }
        tx.commit()?;
        if n < INDEX_BATCH {
            if let Some(bodies) = &mut bodies {
                bodies.flush().map_err(index_error)?;
            }
            return Ok(());
        }
    }
}

/// Rows of items that were read (and transformed) as parsed resources:
/// each is written out as text and hashed from that.
fn rows_of_items(mut rx: mpsc::Receiver<Item>, tx: mpsc::Sender<Row>) -> Result<(), SyncError> {
    while let Some(item) = rx.blocking_recv() {
        let row = match item {
            Item::Resource {
                rtype,
                id,
                res,
                origin,
            } => {
                // Straight into bytes: `to_string` would go through `fmt`.
                let text = serde_json::to_vec(&res).map_err(|e| SyncError::Index(e.to_string()))?;
                let hash = hash_text(&text)
                    .map_err(|e| SyncError::Index(e.to_string()))?
                    .hash
                    .to_be_bytes();
                Row {
                    rtype,
                    id,
                    hash,
                    text,
                    origin,
                }
            }
            other => Row {
                rtype: other.rtype().to_owned(),
                id: None,
                hash: [0; 16],
                text: Vec::new(),
                origin: other.origin().to_owned(),
            },
        };
        if tx.blocking_send(row).is_err() {
            break;
        }
    }
    Ok(())
}

/// A search page as an index reads it: each resource stays text.
#[derive(Deserialize)]
struct Page<'a> {
    #[serde(rename = "resourceType")]
    rtype: Option<&'a str>,
    #[serde(default)]
    link: Vec<PageLink>,
    #[serde(borrow, default)]
    entry: Vec<PageEntry<'a>>,
}

#[derive(Deserialize)]
struct PageLink {
    relation: Option<String>,
    url: Option<String>,
}

#[derive(Deserialize)]
struct PageEntry<'a> {
    #[serde(default)]
    search: Option<EntrySearch>,
    #[serde(borrow)]
    resource: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct EntrySearch {
    mode: Option<String>,
}

/// A search page's `next` link and the rows of the resources it matched.
fn page_rows(url: &str, page: &[u8], keep: bool) -> Result<(Option<String>, Vec<Row>), SyncError> {
    let bad = |reason: String| SyncError::Http {
        url: url.to_owned(),
        reason,
    };
    let page: Page = serde_json::from_slice(page)
        .map_err(|e| bad(format!("the answer is not a Bundle: {e}")))?;
    if page.rtype != Some("Bundle") {
        return Err(bad("the answer is not a Bundle".into()));
    }
    let next = page
        .link
        .into_iter()
        .find(|l| l.relation.as_deref() == Some("next"))
        .and_then(|l| l.url);
    let mut rows = Vec::with_capacity(page.entry.len());
    for e in page.entry {
        let mode = e.search.and_then(|s| s.mode);
        if mode.as_deref().is_some_and(|m| m != "match") {
            continue;
        }
        let Some(raw) = e.resource else { continue };
        if let Some(row) = row_of_text(raw.get().as_bytes(), url.to_owned(), keep).map_err(bad)? {
            rows.push(row);
        }
    }
    Ok((next, rows))
}

/// How many resources a search page gives an index, and its `next` link
/// (what the fuzz target `sync_page` drives).
pub fn page_keys(page: &[u8]) -> Result<(Option<String>, usize), SyncError> {
    page_rows("page", page, true).map(|(next, rows)| (next, rows.len()))
}

/// Every page of the search `first`, its resources sent as rows (with
/// their text when `keep`, counted as read when `counted`); `next` links
/// are followed as [`PageTrail`] says. A type the server cannot search
/// (its first page refused with 400, 404, 405 or 501) sends nothing. The
/// next page is requested while this one is hashed and handed on.
async fn read_pages(
    client: &FhirClient,
    first: &str,
    tx: &mpsc::Sender<Row>,
    keep: bool,
    counted: Option<&Shared>,
) -> Result<Searched, SyncError> {
    let get = |url: String| async move {
        let r = client.send_raw(reqwest::Method::GET, &url, None, &[]).await;
        (url, r)
    };
    let (mut url, mut reply) = get(first.to_owned()).await;
    let mut trail = PageTrail::new(first);
    let mut first_page = true;
    loop {
        let r = reply?;
        if first_page && matches!(r.status, 400 | 404 | 405 | 501) {
            return Ok(Searched::NotSupported);
        }
        if !(200..300).contains(&r.status) {
            let status = r.status;
            let body = r.parsed().body;
            return Err(crate::client::status_error(
                &client.url(&url),
                status,
                &body,
            ));
        }
        first_page = false;
        let at = url.clone();
        let (next, rows) = tokio::task::spawn_blocking(move || page_rows(&at, &r.body, keep))
            .await
            .map_err(|e| SyncError::Index(e.to_string()))??;
        let next = trail.follow(&url, next.as_deref())?;
        let hand_on = async {
            for row in rows {
                if let Some(shared) = counted {
                    shared.count(&row.rtype, Count::Read);
                }
                if tx.send(row).await.is_err() {
                    return false; // the run is stopping
                }
            }
            true
        };
        let Some(next) = next else {
            hand_on.await;
            return Ok(Searched::Read);
        };
        let (handed_on, fetched) = tokio::join!(hand_on, get(next));
        if !handed_on {
            return Ok(Searched::Read);
        }
        (url, reply) = fetched;
    }
}

/// Reads the source into its index and bodies file; returns the types it
/// covered. A server read whole with ids as they are is read as text
/// (through bulk export unless refused, else page by page); any other
/// source is read as parsed resources, transformed (prefixed ids, so
/// keys match the target's), then written out as text.
async fn fill_source(
    opts: &SyncOptions,
    source: Option<FhirClient>,
    up: &Arc<Uploader>,
    shared: &Arc<Shared>,
    ix: &Index,
) -> Result<Vec<String>, SyncError> {
    let n = opts.thread_count;
    let (rtx, rrx) = mpsc::channel::<Row>(n * 8);
    let (p, b, sh) = (ix.src.clone(), ix.bodies.clone(), shared.clone());
    let filler = tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        let bodies = BufWriter::with_capacity(1 << 20, File::create(&b).map_err(index_error)?);
        fill(&mut open_index(&p)?, Some(bodies), rrx, &sh)
    });
    let as_text = matches!(opts.source, SourceSpec::Server(_))
        && opts.resource_ids.is_empty()
        && up.prefix.is_none();
    let types = match source {
        Some(c) if as_text => {
            let read = read_server_text(&c, opts, &rtx, shared).await;
            drop(rtx); // the index sees the end
            read
        }
        source => {
            let (tx, rx) = mpsc::channel::<Item>(n * 8);
            let reader = spawn_reader(opts, source, tx, shared.clone(), false);
            // Id prefixing between reader and index (not upload workers:
            // a few items per thread keep the index fed).
            let (trx, transform) = up.spawn_transform(rx, n * 4);
            let rows = tokio::task::spawn_blocking(move || rows_of_items(trx, rtx));
            let types = reader.await.map_err(|e| SyncError::Index(e.to_string()));
            let _ = transform.await;
            rows.await.map_err(|e| SyncError::Index(e.to_string()))??;
            types?
        }
    };
    filler
        .await
        .map_err(|e| SyncError::Index(e.to_string()))??;
    types
}

/// A whole server source read as text: through bulk export, or page by
/// page when it does not offer or refuses one.
async fn read_server_text(
    c: &FhirClient,
    opts: &SyncOptions,
    tx: &mpsc::Sender<Row>,
    shared: &Arc<Shared>,
) -> Result<Vec<String>, SyncError> {
    let types = &opts.resource_types;
    if let Some(read) =
        read_bulk_or_page(c, opts.bulk, types, tx, true, shared, Side::Source).await?
    {
        return Ok(read);
    }
    let mut read = Vec::new();
    for t in crate::source::server_types(c, types).await? {
        match read_pages(c, &type_url(&t), tx, true, Some(shared)).await? {
            Searched::Read => read.push(t),
            Searched::NotSupported => {
                tracing::debug!(rtype = %t, "source cannot search this type")
            }
        }
    }
    Ok(read)
}

/// Reads the target's resources of `types` into its index: through bulk
/// export as `bulk` says (its texts hashed, not kept), else page by page.
async fn fill_target(
    target: &FhirClient,
    types: &[String],
    bulk: BulkRead,
    shared: &Arc<Shared>,
    ix: &Index,
    n: usize,
) -> Result<(), SyncError> {
    let (tx, trx) = mpsc::channel::<Row>(n * 8);
    let (p, sh) = (ix.tgt.clone(), shared.clone());
    let filler = tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        fill(&mut open_index(&p)?, None, trx, &sh)
    });
    // Without types there is nothing of the target to compare.
    if !types.is_empty()
        && read_bulk_or_page(target, bulk, types, &tx, false, shared, Side::Target)
            .await?
            .is_none()
    {
        // Types are taken in turn by two searches at once, so the node
        // builds one page while another is hashed.
        let next = std::sync::atomic::AtomicUsize::new(0);
        let lane = || async {
            while let Some(t) = types.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                // A type the target cannot search holds nothing to compare or delete.
                read_pages(target, &type_url(t), &tx, false, None).await?;
            }
            Ok::<(), SyncError>(())
        };
        let (a, b) = tokio::join!(lane(), lane());
        a.and(b)?;
    }
    drop(tx);
    filler
        .await
        .map_err(|e| SyncError::Index(e.to_string()))??;
    Ok(())
}

/// One key of an index, as the merge reads it.
struct Keyed {
    rtype: String,
    id: String,
    hash: Vec<u8>,
    /// Where the source's body is in the bodies file (offset, length).
    body: (u64, usize),
}

/// Walks the source's and the target's indexes together in key order
/// (both are ordered by their primary key, as Rust orders strings):
/// resources with equal hashes are counted as unchanged, the source's
/// missing or different ones are sent on `tx` with their bodies, and the
/// target's that the source lacks go into `gone` when their type is in
/// `gone_types`.
fn merge_indexes(
    c: &Connection,
    bodies: &File,
    gone_types: &[String],
    tx: &mpsc::Sender<Item>,
    shared: &Shared,
) -> Result<(), SyncError> {
    let mut src = c.prepare("SELECT type, id, hash, pos, len FROM src ORDER BY type, id")?;
    let mut tgt = c.prepare("SELECT type, id, hash FROM t.tgt ORDER BY type, id")?;
    let mut gone = c.prepare("INSERT INTO gone (type, id) VALUES (?1, ?2)")?;
    let (mut src_rows, mut tgt_rows) = (src.query([])?, tgt.query([])?);
    let next_src = |rows: &mut rusqlite::Rows| -> Result<Option<Keyed>, SyncError> {
        Ok(match rows.next()? {
            Some(r) => Some(Keyed {
                rtype: r.get(0)?,
                id: r.get(1)?,
                hash: r.get(2)?,
                body: (r.get::<_, i64>(3)? as u64, r.get::<_, i64>(4)? as usize),
            }),
            None => None,
        })
    };
    let next_tgt = |rows: &mut rusqlite::Rows| -> Result<Option<Keyed>, SyncError> {
        Ok(match rows.next()? {
            Some(r) => Some(Keyed {
                rtype: r.get(0)?,
                id: r.get(1)?,
                hash: r.get(2)?,
                body: (0, 0),
            }),
            None => None,
        })
    };
    let (mut s, mut t) = (next_src(&mut src_rows)?, next_tgt(&mut tgt_rows)?);
    let mut unchanged: Vec<(String, u64)> = Vec::new();
    let mut body = Vec::new();
    c.execute_batch("BEGIN")?;
    loop {
        let order = match (&s, &t) {
            (None, None) => break,
            (Some(_), None) => std::cmp::Ordering::Less,
            (None, Some(_)) => std::cmp::Ordering::Greater,
            (Some(a), Some(b)) => (&a.rtype, &a.id).cmp(&(&b.rtype, &b.id)),
        };
        match (order, s.take(), t.take()) {
            (std::cmp::Ordering::Equal, Some(a), Some(b)) if a.hash == b.hash => {
                match unchanged.last_mut() {
                    Some((rtype, k)) if *rtype == a.rtype => *k += 1,
                    _ => unchanged.push((a.rtype, 1)),
                }
                s = next_src(&mut src_rows)?;
                t = next_tgt(&mut tgt_rows)?;
            }
            (std::cmp::Ordering::Greater, a, Some(b)) => {
                if gone_types.contains(&b.rtype) {
                    gone.execute(params![b.rtype, b.id])?;
                }
                s = a;
                t = next_tgt(&mut tgt_rows)?;
            }
            (order, Some(a), b) => {
                // Missing (Less) or different (Equal): sent.
                let both = order == std::cmp::Ordering::Equal;
                if !send_body(a, bodies, &mut body, tx)? {
                    break; // the run is stopping
                }
                s = next_src(&mut src_rows)?;
                t = if both { next_tgt(&mut tgt_rows)? } else { b };
            }
            _ => unreachable!("an order needs the rows it compares"),
        }
    }
    c.execute_batch("COMMIT")?;
    for (rtype, k) in unchanged {
        shared.count_n(&rtype, Count::Unchanged, k);
    }
    Ok(())
}

/// Reads one source resource's body back and sends it; `false` when the
/// run is stopping. A body that no longer parses is left out.
fn send_body(
    a: Keyed,
    bodies: &File,
    body: &mut Vec<u8>,
    tx: &mpsc::Sender<Item>,
) -> Result<bool, SyncError> {
    body.resize(a.body.1, 0);
    bodies.read_exact_at(body, a.body.0).map_err(index_error)?;
    let Ok(Value::Object(res)) = serde_json::from_slice::<Value>(body) else {
        return Ok(true);
    };
    let origin = format!("{}/{}", a.rtype, a.id);
    Ok(tx
        .blocking_send(Item::Resource {
            rtype: a.rtype,
            id: Some(a.id),
            res,
            origin,
        })
        .is_ok())
}

pub async fn compare(
    opts: &SyncOptions,
    source: Option<FhirClient>,
    up: &Arc<Uploader>,
    shared: &Arc<Shared>,
) -> Result<(), SyncError> {
    let dir = tempfile::tempdir()
        .map_err(|e| SyncError::Index(format!("no temporary directory: {e}")))?;
    let ix = Index::new(dir.path())?;
    let n = opts.thread_count;

    // For a server source the types are known up front, so both sides are
    // read at the same time; otherwise the source's own types decide.
    let known_types = match (&opts.source, &source) {
        (SourceSpec::Server(_), Some(c)) if opts.resource_ids.is_empty() => {
            Some(crate::source::server_types(c, &opts.resource_types).await?)
        }
        _ => None,
    };
    let mut opts_src = opts.clone();
    if let Some(t) = &known_types {
        opts_src.resource_types = t.clone();
    }
    let started = std::time::Instant::now();
    let source_side = async {
        let types = fill_source(&opts_src, source, up, shared, &ix).await;
        tracing::debug!(elapsed = ?started.elapsed(), "the source is indexed");
        types
    };
    let target = FhirClient::new(
        up.targets[0].base(),
        opts.target_auth.clone(),
        opts.request_id.clone(),
        SOURCE_RETRY_COUNT,
        opts.target_tls.as_ref(),
    )?;
    let target_side = |types: Vec<String>| async {
        fill_target(&target, &types, opts.bulk, shared, &ix, n).await?;
        tracing::debug!(elapsed = ?started.elapsed(), "the target is indexed");
        Ok::<_, SyncError>(types)
    };
    let source_types = match known_types {
        Some(types) => {
            let target_side = target_side(types);
            let (a, b) = tokio::join!(source_side, target_side);
            b?;
            a?
        }
        None => target_side(source_side.await?).await?,
    };
    if shared.aborted() {
        return Ok(());
    }

    // One pass over both indexes in key order: equal content is counted,
    // what is missing or different is uploaded, and what only the target
    // holds (of the types the source was read for) is listed for deleting.
    let deletes = if matches!(opts.source, SourceSpec::Search { .. }) {
        shared.note(
            "a search source is a subset of the server: nothing was deleted on the target".into(),
        );
        false
    } else if opts.no_delete {
        shared.note("--no-delete: resources missing on the source were kept on the target".into());
        false
    } else {
        true
    };
    let (tx, rx) = mpsc::channel::<Item>(crate::upload::queue_depth(n));
    let (c, bodies) = (ix.joined()?, File::open(&ix.bodies).map_err(index_error)?);
    let sh = shared.clone();
    let feeder = tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        let gone_types = if deletes { source_types } else { Vec::new() };
        merge_indexes(&c, &bodies, &gone_types, &tx, &sh)
    });
    up.drain(rx, n, shared, true).await;
    feeder
        .await
        .map_err(|e| SyncError::Index(e.to_string()))??;
    up.retry_deferred(n, shared).await;

    // Gone from the source: deleted on the target.
    if !deletes || shared.aborted() {
        return Ok(());
    }
    let (tx, rx) = mpsc::channel::<Item>(crate::upload::queue_depth(n));
    let c = ix.joined()?;
    let feeder = tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        let mut st = c.prepare("SELECT type, id FROM gone")?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let (rtype, id): (String, String) = (r.get(0)?, r.get(1)?);
            let origin = format!("{rtype}/{id}");
            if tx
                .blocking_send(Item::Delete { rtype, id, origin })
                .is_err()
            {
                break;
            }
        }
        Ok(())
    });
    up.drain(rx, n, shared, false).await;
    feeder
        .await
        .map_err(|e| SyncError::Index(e.to_string()))??;
    Ok(())
}
