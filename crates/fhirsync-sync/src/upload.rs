//! Writing items to the targets: round-robin over several targets, a pool
//! of workers, optional semaphores on a path value, and a second chance
//! for resources refused because what they point to had not arrived yet.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use std::sync::{Arc, Mutex};

use reqwest::Method;
use serde::Serialize;
use serde_json::{Map, Value};
use tokio::sync::mpsc::Receiver;

use crate::client::{outcome_text, FhirClient};
use crate::ids::Prefixer;
use crate::report::{Count, Failure, Report};
use crate::semaphore::path_values;
use crate::source::Item;
use crate::SyncError;

/// Entries per `batch` Bundle when every target supports batches.
pub const BATCH_ENTRIES_MAX: usize = 100;
/// Most items waiting in one queue for the upload workers.
pub const UPLOAD_QUEUE_MAX: usize = 2_000;

/// How many items a queue feeding `workers` upload workers holds: enough
/// for each to fill a whole `batch` Bundle, up to [`UPLOAD_QUEUE_MAX`].
/// A worker sends what is queued when its turn comes, so a shallow queue
/// (it was 4 per worker) made Bundles of 30 – 40 entries, and a target
/// pays for each request and each commit (a 100k COPY into a node: 2,931
/// requests instead of 1,000).
pub fn queue_depth(workers: usize) -> usize {
    workers
        .saturating_mul(BATCH_ENTRIES_MAX)
        .clamp(1, UPLOAD_QUEUE_MAX)
}

/// Items kept for a second pass; past this a refusal is final at once.
pub const DEFERRED_MAX: usize = 100_000;
/// Passes over deferred items while each pass makes progress.
pub const DEFERRED_PASSES_MAX: usize = 5;

/// What the run shares between workers.
pub struct Shared {
    pub report: Arc<Mutex<Report>>,
    /// Set when the run must stop (fatal error or interrupt).
    pub abort: AtomicBool,
    pub fatal: Mutex<Option<SyncError>>,
}

impl Shared {
    pub fn new(report: Arc<Mutex<Report>>) -> Arc<Shared> {
        Arc::new(Shared {
            report,
            abort: AtomicBool::new(false),
            fatal: Mutex::new(None),
        })
    }
    pub fn count(&self, rtype: &str, c: Count) {
        self.count_n(rtype, c, 1);
    }

    pub fn count_n(&self, rtype: &str, c: Count, n: u64) {
        if let Ok(mut r) = self.report.lock() {
            r.count_n(rtype, c, n);
        }
    }
    pub fn fail(&self, rtype: &str, f: Failure) {
        if let Ok(mut r) = self.report.lock() {
            r.fail(rtype, f);
        }
    }
    pub fn note(&self, n: String) {
        if let Ok(mut r) = self.report.lock() {
            r.notes.push(n);
        }
    }
    pub fn set_fatal(&self, e: SyncError) {
        self.abort.store(true, Ordering::SeqCst);
        if let Ok(mut f) = self.fatal.lock() {
            f.get_or_insert(e);
        }
    }
    pub fn take_fatal(&self) -> Option<SyncError> {
        self.fatal.lock().ok().and_then(|mut f| f.take())
    }
    pub fn aborted(&self) -> bool {
        self.abort.load(Ordering::SeqCst)
    }
}

/// The result of one write.
#[derive(Debug)]
pub enum Written {
    Done(Count),
    /// A transaction: one count per entry, under the entry's type.
    Entries(Vec<(String, Count)>),
    /// Refused; `retry_later` when a later pass may succeed.
    Refused {
        failure: Failure,
        retry_later: bool,
    },
}

pub struct Uploader {
    pub targets: Vec<FhirClient>,
    next: AtomicUsize,
    pub prefix: Option<Prefixer>,
    pub dry_run: bool,
    semaphore_path: Option<String>,
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    deferred: Mutex<Vec<Item>>,
    /// Items sent together in one `batch` Bundle (1: one request each).
    batch_max: AtomicUsize,
}

impl Uploader {
    pub fn new(
        targets: Vec<FhirClient>,
        prefix: Option<Prefixer>,
        dry_run: bool,
        semaphore_path: Option<String>,
    ) -> Self {
        Uploader {
            targets,
            next: AtomicUsize::new(0),
            prefix,
            dry_run,
            semaphore_path,
            locks: Mutex::new(HashMap::new()),
            deferred: Mutex::new(Vec::new()),
            batch_max: AtomicUsize::new(1),
        }
    }

    /// Sends resources in `batch` Bundles of up to `n` entries (when every
    /// target supports batches and no semaphore path is set).
    pub fn set_batch(&self, n: usize) {
        if self.semaphore_path.is_none() {
            self.batch_max.store(n.max(1), Ordering::Relaxed);
        }
    }

    /// Writes several resources or deletes in one `batch` Bundle and
    /// handles each entry's outcome; falls back to one request each if the
    /// batch as a whole is refused.
    pub async fn process_batch(&self, items: Vec<Item>, shared: &Shared, deferrable: bool) {
        if items.len() == 1 || self.dry_run {
            for i in items {
                self.process(i, shared, deferrable).await;
            }
            return;
        }
        let bundle = batch_text(&items);
        let target = self.target();
        let r = match target.send(Method::POST, "", Some(&bundle)).await {
            Ok(r) => r,
            Err(_) => {
                for i in items {
                    self.process(i, shared, deferrable).await;
                }
                return;
            }
        };
        if matches!(r.status, 401 | 403) {
            shared.set_fatal(crate::client::status_error(
                target.base(),
                r.status,
                &r.body,
            ));
            return;
        }
        let responses = r.body["entry"].as_array().cloned().unwrap_or_default();
        if r.status != 200 || responses.len() != items.len() {
            for i in items {
                self.process(i, shared, deferrable).await;
            }
            return;
        }
        for (item, e) in items.into_iter().zip(responses) {
            tracing::debug!(item = ?item.key(), status = ?e["response"]["status"], "batch entry");
            let status: u16 = e["response"]["status"]
                .as_str()
                .and_then(|s| s.split_whitespace().next())
                .and_then(|s| s.parse().ok())
                .unwrap_or(0);
            let rtype = item.rtype().to_owned();
            let is_delete = matches!(item, Item::Delete { .. });
            match status {
                200..=299 | 404 | 410 if is_delete => shared.count(&rtype, Count::Deleted),
                201 => shared.count(&rtype, Count::Created),
                200 => shared.count(&rtype, Count::Updated),
                s if crate::retry::is_retryable_status(s) || s == 0 => {
                    // Overload inside a batch: that entry goes alone, with retries.
                    self.process(item, shared, deferrable).await;
                }
                s => {
                    let outcome = e["response"]["outcome"].clone();
                    let failure = Failure {
                        resource: item.key().unwrap_or_else(|| item.origin().to_owned()),
                        status: s,
                        message: outcome_text(&outcome),
                        outcome,
                    };
                    let retry_later = matches!(s, 400 | 404 | 409 | 412 | 422) && !is_delete;
                    self.refused(item, failure, retry_later, shared, deferrable);
                }
            }
        }
    }

    fn refused(
        &self,
        item: Item,
        failure: Failure,
        retry_later: bool,
        shared: &Shared,
        deferrable: bool,
    ) {
        let rtype = item.rtype().to_owned();
        if retry_later && deferrable {
            if let Ok(mut d) = self.deferred.lock() {
                if d.len() < DEFERRED_MAX {
                    d.push(item);
                    return;
                }
            }
        }
        shared.fail(&rtype, failure);
    }

    fn target(&self) -> &FhirClient {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.targets.len();
        &self.targets[i]
    }

    /// Applies id prefixing to an item (before hashing or uploading).
    pub fn transform(&self, item: Item) -> Item {
        let Some(p) = &self.prefix else { return item };
        match item {
            Item::Resource {
                rtype,
                id,
                mut res,
                origin,
            } => {
                p.apply(&mut res);
                Item::Resource {
                    rtype,
                    id: id.map(|i| p.id(&i)),
                    res,
                    origin,
                }
            }
            Item::Bundle { mut res, origin } => {
                p.apply(&mut res);
                Item::Bundle { res, origin }
            }
            Item::Delete { rtype, id, origin } => Item::Delete {
                id: p.id(&id),
                rtype,
                origin,
            },
        }
    }

    /// A stage between a reader and the writers that applies
    /// [`Uploader::transform`] to every item.
    pub fn spawn_transform(
        self: &Arc<Self>,
        mut rx: Receiver<Item>,
        depth: usize,
    ) -> (Receiver<Item>, tokio::task::JoinHandle<()>) {
        let (tx, out) = tokio::sync::mpsc::channel(depth.max(1));
        let me = self.clone();
        let task = tokio::spawn(async move {
            while let Some(i) = rx.recv().await {
                if tx.send(me.transform(i)).await.is_err() {
                    break;
                }
            }
        });
        (out, task)
    }

    /// Writes one (already transformed) item to the next target.
    pub async fn write(&self, item: &Item) -> Result<Written, SyncError> {
        let (method, path, body) = match item {
            Item::Resource {
                rtype,
                id: Some(id),
                res,
                ..
            } => (Method::PUT, format!("{rtype}/{id}"), Some(json_text(res))),
            Item::Resource {
                rtype,
                id: None,
                res,
                ..
            } => (Method::POST, rtype.clone(), Some(json_text(res))),
            Item::Bundle { res, .. } => (Method::POST, String::new(), Some(json_text(res))),
            Item::Delete { rtype, id, .. } => (Method::DELETE, format!("{rtype}/{id}"), None),
        };
        if self.dry_run {
            return Ok(Written::Done(match item {
                Item::Delete { .. } => Count::Deleted,
                _ => Count::Created,
            }));
        }
        let _guards = self.lock_semaphores(item).await;
        let target = self.target();
        let r = target.send(method.clone(), &path, body.as_deref()).await?;
        let what = item.key().unwrap_or_else(|| item.origin().to_owned());
        match r.status {
            401 | 403 => Err(crate::client::status_error(
                &target.url(&path),
                r.status,
                &r.body,
            )),
            200..=299 | 404 | 410 if method == Method::DELETE => Ok(Written::Done(Count::Deleted)),
            201 => Ok(Written::Done(Count::Created)),
            200 if method == Method::POST && matches!(item, Item::Bundle { .. }) => {
                // A transaction: the outcome of each entry.
                let failed: Vec<String> = r.body["entry"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|e| e["response"]["status"].as_str())
                            .filter(|s| !s.starts_with('2'))
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default();
                if failed.is_empty() {
                    let types = match item {
                        Item::Bundle { res, .. } => entry_types(res),
                        _ => Vec::new(),
                    };
                    let statuses = r.body["entry"].as_array().cloned().unwrap_or_default();
                    let counts = types
                        .into_iter()
                        .zip(statuses)
                        .map(|(t, e)| {
                            let c = match e["response"]["status"].as_str().unwrap_or("") {
                                s if s.starts_with("201") => Count::Created,
                                s if s.starts_with("204") => Count::Deleted,
                                _ => Count::Updated,
                            };
                            (t, c)
                        })
                        .collect();
                    Ok(Written::Entries(counts))
                } else {
                    Ok(Written::Refused {
                        failure: Failure {
                            resource: what,
                            status: 200,
                            message: format!("batch entries failed: {}", failed.join(", ")),
                            outcome: r.body,
                        },
                        retry_later: false,
                    })
                }
            }
            200 => Ok(Written::Done(Count::Updated)),
            s => {
                // A refusal that names a missing reference target may pass
                // once that target has arrived.
                let retry_later =
                    matches!(s, 400 | 404 | 409 | 412 | 422) && method != Method::DELETE;
                Ok(Written::Refused {
                    failure: Failure {
                        resource: what,
                        status: s,
                        message: outcome_text(&r.body),
                        outcome: if r.body.is_object() {
                            r.body
                        } else {
                            Value::Null
                        },
                    },
                    retry_later,
                })
            }
        }
    }

    async fn lock_semaphores(&self, item: &Item) -> Vec<tokio::sync::OwnedMutexGuard<()>> {
        let (Some(expr), Item::Resource { res, .. } | Item::Bundle { res, .. }) =
            (&self.semaphore_path, item)
        else {
            return Vec::new();
        };
        let mut keys = path_values(&Value::Object(res.clone()), expr);
        keys.sort();
        keys.dedup();
        let locks: Vec<Arc<tokio::sync::Mutex<()>>> = {
            let Ok(mut map) = self.locks.lock() else {
                return Vec::new();
            };
            keys.iter()
                .map(|k| map.entry(k.clone()).or_default().clone())
                .collect()
        };
        let mut guards = Vec::with_capacity(locks.len());
        // Sorted keys: every worker takes locks in the same order, so none deadlock.
        for l in locks {
            guards.push(l.lock_owned().await);
        }
        guards
    }

    /// Handles one item: write, count, defer or fail.
    pub async fn process(&self, item: Item, shared: &Shared, deferrable: bool) {
        if shared.aborted() {
            return;
        }
        let rtype = item.rtype().to_owned();
        match self.write(&item).await {
            Ok(Written::Done(c)) => shared.count(&rtype, c),
            Ok(Written::Entries(counts)) => {
                for (t, c) in counts {
                    shared.count(&t, c);
                }
            }
            Ok(Written::Refused {
                failure,
                retry_later,
            }) => self.refused(item, failure, retry_later, shared, deferrable),
            Err(e @ SyncError::Status { .. }) => shared.set_fatal(e),
            Err(e) => shared.fail(
                &rtype,
                Failure {
                    resource: item.key().unwrap_or_else(|| item.origin().to_owned()),
                    status: 0,
                    message: e.to_string(),
                    outcome: Value::Null,
                },
            ),
        }
    }

    /// Takes items from `rx` with `workers` concurrent writers until it closes.
    pub async fn drain(
        self: &Arc<Self>,
        rx: Receiver<Item>,
        workers: usize,
        shared: &Arc<Shared>,
        deferrable: bool,
    ) {
        let rx = Arc::new(tokio::sync::Mutex::new(rx));
        let mut tasks = Vec::with_capacity(workers);
        for _ in 0..workers {
            let (rx, me, shared) = (rx.clone(), self.clone(), shared.clone());
            tasks.push(tokio::spawn(async move {
                loop {
                    let max = me.batch_max.load(Ordering::Relaxed);
                    let mut batch = Vec::new();
                    let mut alone = Vec::new();
                    {
                        let mut rx = rx.lock().await;
                        let Some(first) = rx.recv().await else { break };
                        match first {
                            b @ Item::Bundle { .. } => alone.push(b),
                            i => batch.push(i),
                        }
                        while alone.is_empty() && batch.len() < max {
                            match rx.try_recv() {
                                // Bundles go alone, after the batch.
                                Ok(b @ Item::Bundle { .. }) => alone.push(b),
                                Ok(i) => batch.push(i),
                                Err(_) => break,
                            }
                        }
                    }
                    if !batch.is_empty() {
                        me.process_batch(batch, &shared, deferrable).await;
                    }
                    for b in alone {
                        me.process(b, &shared, deferrable).await;
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    }

    /// Retries deferred items while a pass makes progress; what remains fails.
    pub async fn retry_deferred(self: &Arc<Self>, workers: usize, shared: &Arc<Shared>) {
        for pass in 0..DEFERRED_PASSES_MAX {
            let items: Vec<Item> = self
                .deferred
                .lock()
                .map(|mut d| std::mem::take(&mut *d))
                .unwrap_or_default();
            if items.is_empty() || shared.aborted() {
                return;
            }
            let before = items.len();
            let last = pass + 1 == DEFERRED_PASSES_MAX;
            let (tx, rx) = tokio::sync::mpsc::channel(workers * 2);
            let feed = tokio::spawn(async move {
                for i in items {
                    if tx.send(i).await.is_err() {
                        break;
                    }
                }
            });
            self.drain(rx, workers, shared, !last).await;
            let _ = feed.await;
            let after = self.deferred.lock().map(|d| d.len()).unwrap_or(0);
            tracing::debug!(pass, before, after, "deferred pass");
            if after == before {
                // No progress: one final pass that records the failures.
                let items: Vec<Item> = self
                    .deferred
                    .lock()
                    .map(|mut d| std::mem::take(&mut *d))
                    .unwrap_or_default();
                let (tx, rx) = tokio::sync::mpsc::channel(workers * 2);
                let feed = tokio::spawn(async move {
                    for i in items {
                        if tx.send(i).await.is_err() {
                            break;
                        }
                    }
                });
                self.drain(rx, workers, shared, false).await;
                let _ = feed.await;
                return;
            }
        }
    }
}

/// The resource type of each entry of a Bundle (from the resource, or the
/// request URL for entries without one).
fn entry_types(res: &serde_json::Map<String, Value>) -> Vec<String> {
    res.get("entry")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|e| {
                    e["resource"]["resourceType"]
                        .as_str()
                        .or_else(|| {
                            e["request"]["url"]
                                .as_str()
                                .and_then(|u| u.split(['/', '?']).next())
                        })
                        .unwrap_or("Bundle")
                        .to_owned()
                })
                .collect()
        })
        .unwrap_or_default()
}

/// A resource as JSON text, serialized straight into bytes (no copy of the
/// resource, no `fmt`). A map with string keys always serializes.
fn json_text(res: &Map<String, Value>) -> String {
    serde_json::to_string(res).unwrap_or_default()
}

/// One entry of a `batch` Bundle, borrowing its resource.
#[derive(Serialize)]
struct BatchEntry<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    resource: Option<&'a Map<String, Value>>,
    request: BatchRequest,
}

#[derive(Serialize)]
struct BatchRequest {
    method: &'static str,
    url: String,
}

/// The `batch` Bundle of `items` as JSON text (a nested Bundle item, which
/// no batch holds, is a `null` entry).
fn batch_text(items: &[Item]) -> String {
    let entry: Vec<Option<BatchEntry>> = items
        .iter()
        .map(|i| {
            let (resource, method, url) = match i {
                Item::Resource {
                    rtype,
                    id: Some(id),
                    res,
                    ..
                } => (Some(res), "PUT", format!("{rtype}/{id}")),
                Item::Resource { rtype, res, .. } => (Some(res), "POST", rtype.clone()),
                Item::Delete { rtype, id, .. } => (None, "DELETE", format!("{rtype}/{id}")),
                Item::Bundle { .. } => return None,
            };
            Some(BatchEntry {
                resource,
                request: BatchRequest { method, url },
            })
        })
        .collect();
    #[derive(Serialize)]
    struct Batch<'a> {
        #[serde(rename = "resourceType")]
        resource_type: &'static str,
        #[serde(rename = "type")]
        kind: &'static str,
        entry: Vec<Option<BatchEntry<'a>>>,
    }
    serde_json::to_string(&Batch {
        resource_type: "Bundle",
        kind: "batch",
        entry,
    })
    .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_fills_each_workers_bundle_up_to_its_limit() {
        assert_eq!(queue_depth(0), 1);
        assert_eq!(queue_depth(1), BATCH_ENTRIES_MAX);
        assert_eq!(queue_depth(10), 10 * BATCH_ENTRIES_MAX);
        assert_eq!(queue_depth(1_000), UPLOAD_QUEUE_MAX);
        assert_eq!(queue_depth(usize::MAX), UPLOAD_QUEUE_MAX);
    }

    #[test]
    fn a_batch_text_is_the_bundle_it_stands_for() {
        let res = |id: &str| match serde_json::json!({"resourceType": "Patient", "id": id, "active": true})
        {
            Value::Object(m) => m,
            _ => unreachable!(),
        };
        let origin = String::new;
        let items = vec![
            Item::Resource {
                rtype: "Patient".into(),
                id: Some("a".into()),
                res: res("a"),
                origin: origin(),
            },
            Item::Resource {
                rtype: "Patient".into(),
                id: None,
                res: res("b"),
                origin: origin(),
            },
            Item::Delete {
                rtype: "Patient".into(),
                id: "c".into(),
                origin: origin(),
            },
        ];
        let got: Value = serde_json::from_str(&batch_text(&items)).unwrap();
        let want = serde_json::json!({"resourceType": "Bundle", "type": "batch", "entry": [
            {"resource": res("a"), "request": {"method": "PUT", "url": "Patient/a"}},
            {"resource": res("b"), "request": {"method": "POST", "url": "Patient"}},
            {"request": {"method": "DELETE", "url": "Patient/c"}},
        ]});
        assert_eq!(got, want);
        assert_eq!(
            json_text(&res("a")),
            r#"{"resourceType":"Patient","id":"a","active":true}"#
        );
    }
}
