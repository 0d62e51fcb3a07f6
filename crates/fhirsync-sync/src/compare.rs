//! COMPARE: both sides go into a temporary on-disk index (constant memory),
//! content hashes that ignore server-set fields are compared, and only
//! what is missing or different is uploaded; what the source no longer has
//! is deleted on the target (unless `--no-delete`).

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

/// Fills `table` from `rx`; items without an id cannot be compared and fail.
fn fill(
    conn: &mut Connection,
    table: &str,
    mut rx: mpsc::Receiver<Item>,
    shared: &Shared,
) -> Result<(), SyncError> {
    let sql = if table == "src" {
        "INSERT OR REPLACE INTO src (type, id, hash, body) VALUES (?1, ?2, ?3, ?4)"
    } else {
        "INSERT OR REPLACE INTO tgt (type, id, hash) VALUES (?1, ?2, ?3)"
    };
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
                match item {
                    Item::Resource { rtype, id: Some(id), res, .. } => {
                        let v = Value::Object(res);
                        let hash = content_hash(&v).to_be_bytes();
                        if table == "src" {
                            st.execute(params![rtype, id, &hash[..], v.to_string()])?;
                        } else {
                            st.execute(params![rtype, id, &hash[..]])?;
                        }
                    }
                    other if table == "src" => shared.fail(
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
            return Ok(());
        }
    }
}

fn open_index_tables(c: &Connection) -> Result<(), SyncError> {
    c.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = OFF;
         CREATE TABLE IF NOT EXISTS src (type TEXT NOT NULL, id TEXT NOT NULL, hash BLOB NOT NULL, body TEXT NOT NULL, PRIMARY KEY (type, id)) WITHOUT ROWID;
         CREATE TABLE IF NOT EXISTS tgt (type TEXT NOT NULL, id TEXT NOT NULL, hash BLOB NOT NULL, PRIMARY KEY (type, id)) WITHOUT ROWID;",
    )?;
    Ok(())
}

fn open_index(path: &std::path::Path) -> Result<Connection, SyncError> {
    let c = Connection::open(path)?;
    c.busy_timeout(std::time::Duration::from_secs(60))?;
    c.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -32768;")?;
    Ok(c)
}

/// Reads the source (transformed: prefixed ids, so keys match the
/// target's) into `src`; returns the types it covered.
async fn fill_source(
    opts: &SyncOptions,
    source: Option<FhirClient>,
    up: &Arc<Uploader>,
    shared: &Arc<Shared>,
    path: &std::path::Path,
) -> Result<Vec<String>, SyncError> {
    let n = opts.thread_count;
    let (tx, rx) = mpsc::channel::<Item>(n * 8);
    let reader = spawn_reader(opts, source, tx, shared.clone(), false);
    // Id prefixing between reader and writers.
    let (trx, transform) = up.spawn_transform(rx, n * 4);
    let (p, sh) = (path.to_owned(), shared.clone());
    let filler = tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        let mut c = open_index(&p)?;
        fill(&mut c, "src", trx, &sh)
    });
    let types = reader.await.map_err(|e| SyncError::Index(e.to_string()))?;
    let _ = transform.await;
    filler
        .await
        .map_err(|e| SyncError::Index(e.to_string()))??;
    types
}

/// Reads the target's resources of `types` into `tgt`.
async fn fill_target(
    target: &FhirClient,
    types: &[String],
    shared: &Arc<Shared>,
    path: &std::path::Path,
    n: usize,
) -> Result<(), SyncError> {
    let (tx, trx) = mpsc::channel::<Item>(n * 8);
    let (p, sh) = (path.to_owned(), shared.clone());
    let filler = tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        let mut c = open_index(&p)?;
        fill(&mut c, "tgt", trx, &sh)
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
    let path = dir.path().join("compare.db");
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
    open_index_tables(&Connection::open(&path)?)?;
    let source_side = fill_source(&opts_src, source, up, shared, &path);
    let target = FhirClient::new(
        up.targets[0].base(),
        opts.target_auth.clone(),
        opts.request_id.clone(),
        SOURCE_RETRY_COUNT,
        opts.target_tls.as_ref(),
    )?;
    let source_types = match known_types {
        Some(types) => {
            let target_side = fill_target(&target, &types, shared, &path, n);
            let (a, b) = tokio::join!(source_side, target_side);
            b?;
            a?
        }
        None => {
            let types = source_side.await?;
            fill_target(&target, &types, shared, &path, n).await?;
            types
        }
    };
    // Only types the source could be read for are compared for deletes.
    {
        let c = Connection::open(&path)?;
        c.execute_batch("CREATE TABLE src_types (type TEXT PRIMARY KEY) WITHOUT ROWID")?;
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
        let c = Connection::open(&path)?;
        let mut st = c.prepare("SELECT s.type, count(*) FROM src s JOIN tgt t ON s.type = t.type AND s.id = t.id AND s.hash = t.hash GROUP BY s.type")?;
        let rows = st.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
        for row in rows {
            let (t, k) = row?;
            shared.count_n(&t, Count::Unchanged, k as u64);
        }
    }

    // Missing or different: uploaded.
    let (tx, rx) = mpsc::channel::<Item>(n * 4);
    let p = path.clone();
    let feeder = tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        let c = Connection::open(&p)?;
        let mut st = c.prepare(
            "SELECT s.type, s.id, s.body FROM src s LEFT JOIN tgt t ON s.type = t.type AND s.id = t.id
             WHERE t.hash IS NULL OR t.hash != s.hash",
        )?;
        let mut rows = st.query([])?;
        while let Some(r) = rows.next()? {
            let (rtype, id, body): (String, String, String) = (r.get(0)?, r.get(1)?, r.get(2)?);
            let Ok(Value::Object(res)) = serde_json::from_str::<Value>(&body) else {
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
    let p = path.clone();
    let feeder = tokio::task::spawn_blocking(move || -> Result<(), SyncError> {
        let c = Connection::open(&p)?;
        let mut st = c.prepare(
            "SELECT t.type, t.id FROM tgt t LEFT JOIN src s ON s.type = t.type AND s.id = t.id
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
