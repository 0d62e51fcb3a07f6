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
use serde_json::Value;
use tokio::sync::mpsc;

use crate::canonical::content_hash;
use crate::client::FhirClient;
use crate::options::{SourceSpec, SyncOptions, SOURCE_RETRY_COUNT};
use crate::report::{Count, Failure};
use crate::run::spawn_reader;
use crate::source::{read_search, type_url, Item};
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
             CREATE TABLE src_types (type TEXT PRIMARY KEY) WITHOUT ROWID;",
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

/// Where a side's rows go: the source's bodies are kept for the upload.
enum Side {
    Source(BufWriter<File>),
    Target,
}

/// Fills one side's index from `rx`; source items without an id cannot be
/// compared and fail.
fn fill(
    conn: &mut Connection,
    mut side: Side,
    mut rx: mpsc::Receiver<Item>,
    shared: &Shared,
) -> Result<(), SyncError> {
    let sql = match side {
        Side::Source(_) => {
            "INSERT OR REPLACE INTO src (type, id, hash, pos, len) VALUES (?1, ?2, ?3, ?4, ?5)"
        }
        Side::Target => "INSERT OR REPLACE INTO tgt (type, id, hash) VALUES (?1, ?2, ?3)",
    };
    let (mut pos, mut text) = (0u64, Vec::new());
    loop {
        let tx = conn.transaction()?;
        let mut n = 0;
        {
            let mut st = tx.prepare_cached(sql)?;
            while n < INDEX_BATCH {
                let Some(item) = rx.blocking_recv() else {
                    break;
                };
                n += 1;
                match (item, &mut side) {
                    (Item::Resource { rtype, id: Some(id), res, .. }, Side::Source(bodies)) => {
                        let v = Value::Object(res);
                        let hash = content_hash(&v).to_be_bytes();
                        // Straight into bytes: `to_string` would go through `fmt`.
                        text.clear();
                        serde_json::to_writer(&mut text, &v)
                            .map_err(|e| SyncError::Index(e.to_string()))?;
                        bodies.write_all(&text).map_err(index_error)?;
                        let len = text.len() as u64;
                        st.execute(params![rtype, id, &hash[..], pos as i64, len as i64])?;
                        pos += len;
                    }
                    (Item::Resource { rtype, id: Some(id), res, .. }, Side::Target) => {
                        let hash = content_hash(&Value::Object(res)).to_be_bytes();
                        st.execute(params![rtype, id, &hash[..]])?;
                    }
                    (other, Side::Source(_)) => shared.fail(
                        other.rtype(),
                        Failure {
                            resource: other.origin().to_owned(),
                            status: 0,
                            message: "COMPARE needs resources with ids (use COPY or SYNTHEA for this one)".into(),
                            outcome: Value::Null,
                        },
                    ),
                    _ => {}
                }
            }
        }
        tx.commit()?;
        if n < INDEX_BATCH {
            if let Side::Source(bodies) = &mut side {
                bodies.flush().map_err(index_error)?;
            }
            return Ok(());
        }
    }
}

/// Reads the source (transformed: prefixed ids, so keys match the
/// target's) into its index; returns the types it covered.
async fn fill_source(
    opts: &SyncOptions,
    source: Option<FhirClient>,
    up: &Arc<Uploader>,
    shared: &Arc<Shared>,
    ix: &Index,
) -> Result<Vec<String>, SyncError> {
    let n = opts.thread_count;
    let (tx, rx) = mpsc::channel::<Item>(n * 8);
    let reader = spawn_reader(opts, source, tx, shared.clone(), false);
    // Id prefixing between reader and writers.
    let (trx, transform) = up.spawn_transform(rx, n * 4);
    let (p, b, sh) = (ix.src.clone(), ix.bodies.clone(), shared.clone());
    let filler = tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        let bodies = BufWriter::with_capacity(1 << 20, File::create(&b).map_err(index_error)?);
        fill(&mut open_index(&p)?, Side::Source(bodies), trx, &sh)
    });
    let types = reader.await.map_err(|e| SyncError::Index(e.to_string()))?;
    let _ = transform.await;
    filler
        .await
        .map_err(|e| SyncError::Index(e.to_string()))??;
    types
}

/// Reads the target's resources of `types` into its index.
async fn fill_target(
    target: &FhirClient,
    types: &[String],
    shared: &Arc<Shared>,
    ix: &Index,
    n: usize,
) -> Result<(), SyncError> {
    let (tx, trx) = mpsc::channel::<Item>(n * 8);
    let (p, sh) = (ix.tgt.clone(), shared.clone());
    let filler = tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        fill(&mut open_index(&p)?, Side::Target, trx, &sh)
    });
    for t in types {
        // A type the target cannot search holds nothing to compare or delete.
        let _ = read_search(target, &type_url(t), &tx, false, |_| {}).await?;
    }
    drop(tx);
    filler
        .await
        .map_err(|e| SyncError::Index(e.to_string()))??;
    Ok(())
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
        fill_target(&target, &types, shared, &ix, n).await?;
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
    // Only types the source could be read for are compared for deletes.
    {
        let c = open_index(&ix.src)?;
        let mut st = c.prepare("INSERT OR IGNORE INTO src_types (type) VALUES (?1)")?;
        for t in &source_types {
            st.execute([t])?;
        }
    }
    if shared.aborted() {
        return Ok(());
    }

    // Equal content: counted, not sent.
    {
        let c = ix.joined()?;
        let mut st = c.prepare("SELECT s.type, count(*) FROM src s JOIN t.tgt t ON s.type = t.type AND s.id = t.id AND s.hash = t.hash GROUP BY s.type")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (t, k) = row?;
            shared.count_n(&t, Count::Unchanged, k as u64);
        }
    }

    // Missing or different: uploaded.
    let (tx, rx) = mpsc::channel::<Item>(n * 4);
    let (c, bodies) = (ix.joined()?, File::open(&ix.bodies).map_err(index_error)?);
    let feeder = tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        let mut st = c.prepare(
            "SELECT s.type, s.id, s.pos, s.len FROM src s LEFT JOIN t.tgt t ON s.type = t.type AND s.id = t.id
             WHERE t.hash IS NULL OR t.hash != s.hash",
        )?;
        let mut rows = st.query([])?;
        let mut body = Vec::new();
        while let Some(r) = rows.next()? {
            let (rtype, id, pos, len): (String, String, i64, i64) =
                (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?);
            body.resize(len as usize, 0);
            bodies
                .read_exact_at(&mut body, pos as u64)
                .map_err(index_error)?;
            let Ok(Value::Object(res)) = serde_json::from_slice::<Value>(&body) else {
                continue;
            };
            let origin = format!("{rtype}/{id}");
            if tx
                .blocking_send(Item::Resource {
                    rtype,
                    id: Some(id),
                    res,
                    origin,
                })
                .is_err()
            {
                break;
            }
        }
        Ok(())
    });
    up.drain(rx, n, shared, true).await;
    feeder
        .await
        .map_err(|e| SyncError::Index(e.to_string()))??;
    up.retry_deferred(n, shared).await;

    // Gone from the source: deleted on the target.
    if matches!(opts.source, SourceSpec::Search { .. }) {
        shared.note(
            "a search source is a subset of the server: nothing was deleted on the target".into(),
        );
        return Ok(());
    }
    if opts.no_delete {
        shared.note("--no-delete: resources missing on the source were kept on the target".into());
        return Ok(());
    }
    if shared.aborted() {
        return Ok(());
    }
    let (tx, rx) = mpsc::channel::<Item>(n * 4);
    let c = ix.joined()?;
    let feeder = tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        let mut st = c.prepare(
            "SELECT t.type, t.id FROM t.tgt t LEFT JOIN src s ON s.type = t.type AND s.id = t.id
             WHERE s.id IS NULL AND t.type IN (SELECT type FROM src_types)",
        )?;
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
