//! INCREMENTAL: follow a fhirsync node's change log from the cursor in the
//! state file; apply creates, updates and deletes in log order (versions of
//! one resource never overtake each other); save the cursor only after the
//! target confirmed. `--follow` long-polls for more.

use std::path::Path;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::{mpsc, watch};

use crate::client::FhirClient;
use crate::options::SyncOptions;
use crate::report::{Count, Failure};
use crate::source::Item;
use crate::upload::{Shared, Uploader, Written};
use crate::SyncError;

/// Entries asked for per poll.
pub const CHANGES_BATCH: usize = 500;
/// Seconds one long-poll of `--follow` waits.
pub const FOLLOW_WAIT_S: u64 = 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct State {
    pub source: String,
    pub target: String,
    /// The last change-log `seq` the target confirmed (fhirsync sources).
    pub since: u64,
    /// Other servers: the `lastUpdated` of the last applied version ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub history_since: Option<String>,
    /// ... and the versions (`Type/id/vid`) applied at exactly that instant.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub seen: Vec<String>,
}

impl State {
    pub fn load(path: &Path, source: &str, target: &str) -> Result<State, SyncError> {
        let err = |reason: String| SyncError::State {
            path: path.display().to_string(),
            reason,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let s: State = serde_json::from_str(&text)
                    .map_err(|e| err(format!("not a sync state: {e}")))?;
                if s.source != source || s.target != target {
                    return Err(err(format!(
                        "it belongs to {} -> {}, not {source} -> {target}",
                        s.source, s.target
                    )));
                }
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State {
                source: source.to_owned(),
                target: target.to_owned(),
                since: 0,
                history_since: None,
                seen: Vec::new(),
            }),
            Err(e) => Err(err(e.to_string())),
        }
    }

    /// Moves the history cursor past `applied` (`lastUpdated`, version key),
    /// in apply order.
    pub fn advance_history(&mut self, applied: &[(String, String)]) {
        use fhirsync_core::instant::parse_range;
        let Some((last, _)) = applied.last() else {
            return;
        };
        let ms = |s: &str| parse_range(s).map(|r| r.0);
        if self.history_since.as_deref().and_then(ms) != ms(last) {
            self.seen.clear();
        }
        let last_ms = ms(last);
        self.seen.extend(
            applied
                .iter()
                .filter(|(lu, _)| ms(lu) == last_ms)
                .map(|(_, k)| k.clone()),
        );
        self.history_since = Some(last.clone());
    }

    /// Written to a temporary file and renamed: never half-written.
    pub fn save(&self, path: &Path) -> Result<(), SyncError> {
        let err = |e: std::io::Error| SyncError::State {
            path: path.display().to_string(),
            reason: e.to_string(),
        };
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string_pretty(self).map_err(|e| err(std::io::Error::other(e)))?;
        std::fs::write(&tmp, text).map_err(err)?;
        let f = std::fs::File::open(&tmp).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, path).map_err(err)
    }
}

/// One change-log entry as an item, with its `seq`.
fn entry_item(e: &Value, up: &Uploader) -> Option<(u64, Item)> {
    let seq = e["extension"][0]["extension"]
        .as_array()?
        .iter()
        .find(|x| x["url"] == "seq")?["valueDecimal"]
        .as_u64()?;
    let full = e["fullUrl"].as_str()?;
    let mut parts = full.rsplitn(3, '/');
    let id = parts.next()?.to_owned();
    let rtype = parts.next()?.to_owned();
    let item = if e["request"]["method"] == "DELETE" {
        Item::Delete {
            rtype,
            id,
            origin: full.to_owned(),
        }
    } else {
        let res = e["resource"].as_object()?.clone();
        Item::Resource {
            rtype,
            id: Some(id),
            res,
            origin: full.to_owned(),
        }
    };
    Some((seq, up.transform(item)))
}

/// Applies a batch in log order; returns how many from the start succeeded.
pub(crate) async fn apply(
    items: Vec<(u64, Item)>,
    up: &Arc<Uploader>,
    shared: &Arc<Shared>,
    workers: usize,
) -> usize {
    let n = items.len();
    let ok: Arc<std::sync::Mutex<Vec<bool>>> = Arc::new(std::sync::Mutex::new(vec![false; n]));
    let mut senders = Vec::with_capacity(workers);
    let mut tasks = Vec::with_capacity(workers);
    for _ in 0..workers {
        let (tx, mut rx) = mpsc::channel::<(usize, Item)>(64);
        senders.push(tx);
        let (up, shared, ok) = (up.clone(), shared.clone(), ok.clone());
        tasks.push(tokio::spawn(async move {
            // One worker per key: versions of a resource stay in order.
            let mut failed_keys: Vec<String> = Vec::new();
            while let Some((i, item)) = rx.recv().await {
                let key = item.key().unwrap_or_default();
                if failed_keys.contains(&key) {
                    continue;
                }
                let rtype = item.rtype().to_owned();
                match up.write(&item).await {
                    Ok(w @ (Written::Done(_) | Written::Entries(_))) => {
                        match w {
                            Written::Done(c) => shared.count(&rtype, c),
                            Written::Entries(cs) => {
                                cs.into_iter().for_each(|(t, c)| shared.count(&t, c))
                            }
                            Written::Refused { .. } => {}
                        }
                        if let Ok(mut o) = ok.lock() {
                            o[i] = true;
                        }
                    }
                    Ok(Written::Refused { failure, .. }) => {
                        failed_keys.push(key);
                        shared.fail(&rtype, failure);
                    }
                    Err(e @ SyncError::Status { .. }) => {
                        shared.set_fatal(e);
                        break;
                    }
                    Err(e) => {
                        failed_keys.push(key.clone());
                        shared.fail(
                            &rtype,
                            Failure {
                                resource: key,
                                status: 0,
                                message: e.to_string(),
                                outcome: Value::Null,
                            },
                        );
                    }
                }
            }
        }));
    }
    for (i, (_, item)) in items.into_iter().enumerate() {
        let key = item.key().unwrap_or_default();
        let w = (xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % workers as u64) as usize;
        if senders[w].send((i, item)).await.is_err() {
            break;
        }
    }
    drop(senders);
    for t in tasks {
        let _ = t.await;
    }
    let ok = ok.lock().map(|o| o.clone()).unwrap_or_default();
    ok.iter().take_while(|x| **x).count()
}

pub async fn incremental(
    opts: &SyncOptions,
    source: FhirClient,
    up: &Arc<Uploader>,
    shared: &Arc<Shared>,
    mut stop: watch::Receiver<bool>,
) -> Result<(), SyncError> {
    let state_path = opts
        .state
        .clone()
        .ok_or_else(|| SyncError::Options("INCREMENTAL needs --state".into()))?;
    let target = up.targets[0].base().to_owned();
    let mut state = State::load(&state_path, source.base(), &target)?;
    let meta = source.get_json("metadata").await?;
    if meta["software"]["name"] != "fhirsync" {
        let r = crate::history::follow_history(
            opts,
            &source,
            up,
            shared,
            stop,
            &mut state,
            &state_path,
        )
        .await;
        return r;
    }
    let types = if opts.resource_types.is_empty() {
        String::new()
    } else {
        format!("&_type={}", opts.resource_types.join(","))
    };
    loop {
        if *stop.borrow() || shared.aborted() {
            break;
        }
        let wait = if opts.follow { FOLLOW_WAIT_S } else { 0 };
        let url = format!(
            "$changes?since={}&_count={CHANGES_BATCH}{types}&wait={wait}",
            state.since
        );
        let page = tokio::select! {
            p = source.get_json(&url) => p?,
            _ = stop.changed() => break,
        };
        let entries = page["entry"].as_array().cloned().unwrap_or_default();
        if entries.is_empty() {
            if opts.follow {
                continue;
            }
            break;
        }
        let mut items = Vec::with_capacity(entries.len());
        for e in &entries {
            match entry_item(e, up) {
                Some(x) => {
                    shared.count(x.1.rtype(), Count::Read);
                    items.push(x);
                }
                None => {
                    return Err(SyncError::Http {
                        url: source.url(&url),
                        reason: "a change-log entry without seq, fullUrl or resource".into(),
                    })
                }
            }
        }
        let seqs: Vec<u64> = items.iter().map(|(s, _)| *s).collect();
        let done = apply(items, up, shared, opts.thread_count).await;
        if done > 0 && !opts.dry_run {
            state.since = seqs[done - 1];
            state.save(&state_path)?;
        }
        if done < seqs.len() {
            shared.note(format!(
                "stopped at change-log seq {}: it failed; the cursor stays at {} so a re-run retries it",
                seqs[done], state.since
            ));
            break;
        }
    }
    shared.note(format!("cursor saved at change-log seq {}", state.since));
    Ok(())
}
