//! INCREMENTAL from a server that is not a fhirsync node: its system (or
//! per-type) `_history` since the cursor. A window of history is spilled
//! to an on-disk table (constant memory), applied oldest first, and the
//! cursor is the last applied `lastUpdated` plus the versions already
//! applied at exactly that instant: `_since` is inclusive, so versions
//! sharing one `lastUpdated` are neither skipped nor applied twice.

use std::path::Path;
use std::sync::Arc;

use fhirsync_core::instant::parse_range;
use rusqlite::{params, Connection};
use serde_json::Value;
use tokio::sync::watch;

use crate::client::FhirClient;
use crate::incremental::{apply, State};
use crate::options::{SyncOptions, PAGE_COUNT};
use crate::report::Count;
use crate::source::{is_infrastructure, Item, PageTrail};
use crate::upload::{Shared, Uploader};
use crate::SyncError;

/// Entries applied between two cursor saves.
const APPLY_BATCH: usize = 500;
/// Seconds between polls of `--follow`.
pub const HISTORY_POLL_S: u64 = 5;

/// One history entry, read for ordering and applying.
struct Entry {
    lu_ms: i64,
    lu: String,
    key: String,
    vid: String,
    deleted: bool,
    body: Option<String>,
}

fn entry(e: &Value) -> Option<Entry> {
    let res = e.get("resource").filter(|r| r.is_object());
    let deleted = e["request"]["method"] == "DELETE" || res.is_none();
    let key = match res {
        Some(r) => format!("{}/{}", r["resourceType"].as_str()?, r["id"].as_str()?),
        None => {
            let url = e["request"]["url"].as_str().or(e["fullUrl"].as_str())?;
            let mut it = url.split('?').next()?.trim_end_matches('/').rsplitn(3, '/');
            let (id, t) = (it.next()?, it.next()?);
            format!("{t}/{id}")
        }
    };
    let lu = res
        .and_then(|r| r["meta"]["lastUpdated"].as_str())
        .or(e["response"]["lastModified"].as_str())?
        .to_owned();
    let (lu_ms, _) = parse_range(&lu)?;
    let vid = res
        .and_then(|r| r["meta"]["versionId"].as_str())
        .map(str::to_owned)
        .or_else(|| {
            e["response"]["etag"]
                .as_str()
                .map(|t| t.trim_start_matches("W/").trim_matches('"').to_owned())
        })
        .unwrap_or_default();
    if res
        .and_then(Value::as_object)
        .is_some_and(is_infrastructure)
    {
        return None;
    }
    Some(Entry {
        lu_ms,
        lu,
        key,
        vid,
        deleted,
        body: res.map(|r| r.to_string()),
    })
}

/// Reads the history window since the cursor into `hist`.
async fn read_window(
    source: &FhirClient,
    opts: &SyncOptions,
    state: &State,
    db: &Path,
) -> Result<u64, SyncError> {
    let firsts: Vec<String> = {
        let since = state
            .history_since
            .as_deref()
            .map(|s| format!("&_since={}", form_encode(s)))
            .unwrap_or_default();
        if opts.resource_types.is_empty() {
            vec![format!("_history?_count={PAGE_COUNT}{since}")]
        } else {
            opts.resource_types
                .iter()
                .map(|t| format!("{t}/_history?_count={PAGE_COUNT}{since}"))
                .collect()
        }
    };
    let mut conn = Connection::open(db)?;
    conn.execute_batch(
        "PRAGMA synchronous = OFF; DROP TABLE IF EXISTS hist;
         CREATE TABLE hist (lu_ms INTEGER, ord INTEGER, lu TEXT, key TEXT, vid TEXT, deleted INTEGER, body TEXT)",
    )?;
    let mut ord: i64 = 0;
    for first in firsts {
        let mut trail = PageTrail::new(&first);
        let mut url = first;
        loop {
            let b = source.get_json(&url).await?;
            let tx = conn.transaction()?;
            for e in b["entry"].as_array().map(Vec::as_slice).unwrap_or(&[]) {
                let Some(en) = entry(e) else { continue };
                // Already applied at the cursor's instant.
                if Some(en.lu_ms)
                    == state
                        .history_since
                        .as_deref()
                        .and_then(parse_range)
                        .map(|r| r.0)
                    && state.seen.contains(&format!("{}/{}", en.key, en.vid))
                {
                    continue;
                }
                ord += 1;
                tx.execute(
                    "INSERT INTO hist VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                    params![
                        en.lu_ms,
                        ord,
                        en.lu,
                        en.key,
                        en.vid,
                        en.deleted as i64,
                        en.body
                    ],
                )?;
            }
            tx.commit()?;
            let next = b["link"]
                .as_array()
                .and_then(|l| l.iter().find(|l| l["relation"] == "next"))
                .and_then(|l| l["url"].as_str());
            match trail.follow(&url, next)? {
                Some(n) => url = n,
                None => break,
            }
        }
    }
    Ok(ord as u64)
}

fn form_encode(s: &str) -> String {
    s.replace('+', "%2B").replace(':', "%3A")
}

pub async fn follow_history(
    opts: &SyncOptions,
    source: &FhirClient,
    up: &Arc<Uploader>,
    shared: &Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    state: &mut State,
    state_path: &Path,
) -> Result<(), SyncError> {
    let dir = tempfile::tempdir()
        .map_err(|e| SyncError::Index(format!("no temporary directory: {e}")))?;
    let db = dir.path().join("history.db");
    loop {
        if *stop.borrow() || shared.aborted() {
            break;
        }
        let n = read_window(source, opts, state, &db).await?;
        if n == 0 {
            if !opts.follow {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_secs(HISTORY_POLL_S)) => continue,
                _ = stop.changed() => break,
            }
        }
        // Oldest first; among equal instants, the server's page order reversed.
        let mut offset = 0usize;
        let mut finished = true;
        loop {
            let batch = read_batch(&db, offset, shared, up)?;
            if batch.is_empty() {
                break;
            }
            offset += batch.len();
            let marks: Vec<(String, String)> = batch
                .iter()
                .map(|(lu, k, _)| (lu.clone(), k.clone()))
                .collect();
            let items: Vec<(u64, Item)> = batch
                .into_iter()
                .enumerate()
                .map(|(i, (_, _, it))| (i as u64, it))
                .collect();
            let done = apply(items, up, shared, opts.thread_count).await;
            if done > 0 && !opts.dry_run {
                state.advance_history(&marks[..done]);
                state.save(state_path)?;
            }
            if done < marks.len() {
                shared.note(format!(
                    "stopped at {}: it failed; the cursor stays so a re-run retries it",
                    marks[done].1
                ));
                finished = false;
                break;
            }
        }
        if !finished || !opts.follow {
            break;
        }
    }
    if let Some(s) = &state.history_since {
        shared.note(format!("cursor saved at lastUpdated {s}"));
    }
    Ok(())
}

/// The next batch of the window, in apply order: (`lastUpdated`,
/// `Type/id/vid`, item).
fn read_batch(
    db: &Path,
    offset: usize,
    shared: &Shared,
    up: &Uploader,
) -> Result<Vec<(String, String, Item)>, SyncError> {
    let conn = Connection::open(db)?;
    let mut st = conn.prepare("SELECT lu, key, vid, deleted, body FROM hist ORDER BY lu_ms ASC, ord DESC LIMIT ?1 OFFSET ?2")?;
    let mut rows = st.query(params![APPLY_BATCH as i64, offset as i64])?;
    let mut out = Vec::with_capacity(APPLY_BATCH);
    while let Some(r) = rows.next()? {
        let (lu, key, vid, deleted, body): (String, String, String, i64, Option<String>) =
            (r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?);
        let (rtype, id) = key
            .split_once('/')
            .map(|(t, i)| (t.to_owned(), i.to_owned()))
            .unwrap_or_default();
        let item = match (
            deleted,
            body.and_then(|b| serde_json::from_str::<Value>(&b).ok()),
        ) {
            (0, Some(Value::Object(res))) => Item::Resource {
                rtype,
                id: Some(id),
                res,
                origin: key.clone(),
            },
            _ => Item::Delete {
                rtype,
                id,
                origin: key.clone(),
            },
        };
        shared.count(item.rtype(), Count::Read);
        out.push((lu, format!("{key}/{vid}"), up.transform(item)));
    }
    Ok(out)
}
