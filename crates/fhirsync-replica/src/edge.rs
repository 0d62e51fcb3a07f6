//! One parent edge at runtime: the pull loop, the push loop, their
//! counters and state. Transport failures retry with backoff for ever; a
//! record that fails `retry_max` times blocks its direction or becomes a
//! dead letter, as configured.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fhirsync_api::agent::EdgeCounters;
use fhirsync_api::peers::NODE_HEADER;
use fhirsync_api::push_order::{BATCH_EXTENSION, ORDER_PARAMETER, STREAM_EXTENSION};
use fhirsync_api::POLICY_EXTENSION;
use fhirsync_store::replica::cursor_key;
use fhirsync_store::{
    entry_seq, find_extension, ApplyReport, ApplyRequest, AuditEntry, BundleShell, DeadLetter,
    Direction, NewDeadLetter, RemoteVersion, Store, SyncWrite, WriteOutcome, WriteRequest,
    EXTENSION_BASE,
};
use fhirsync_sync::retry::{backoff, Jitter};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::config::{EdgeConfig, OnError};
use crate::filter::Filter;
use crate::verify::VerifyState;

mod push;

/// Seconds a request may take beyond the long-poll wait.
pub const REQUEST_TIMEOUT_S: u64 = 60;
/// Pages of the parent's feed fetched ahead of the ones being stored.
pub const PULL_PAGES_AHEAD: usize = 4;
/// Most pulled versions stored in one transaction: pages that arrived
/// while the writer was busy are stored together.
pub const PULL_APPLY_MAX: usize = 4000;

/// Counters and state of one direction.
#[derive(Debug, Default)]
pub struct DirStats {
    pub stored: AtomicU64,
    pub skipped: AtomicU64,
    pub conflicts: AtomicU64,
    pub filtered: AtomicU64,
    pub dead_letters: AtomicU64,
    pub errors: AtomicU64,
    /// Changes not yet carried (sender's last seq minus the cursor).
    pub lag: AtomicU64,
    pub cursor: AtomicU64,
    /// `starting`, `ok`, `retrying`, `blocked`, `off`.
    pub state: Mutex<(String, Option<String>)>,
}

impl DirStats {
    pub fn set_state(&self, s: &str, err: Option<String>) {
        if let Ok(mut g) = self.state.lock() {
            *g = (s.to_owned(), err);
        }
    }
    fn count(&self, r: &ApplyReport) {
        self.stored.fetch_add(r.stored, Ordering::Relaxed);
        self.skipped.fetch_add(r.skipped, Ordering::Relaxed);
        self.conflicts.fetch_add(r.conflicts, Ordering::Relaxed);
    }
    pub fn counters(&self, edge: &str, dir: &str) -> EdgeCounters {
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        EdgeCounters {
            edge: edge.to_owned(),
            direction: dir.to_owned(),
            lag: g(&self.lag),
            applied: g(&self.stored),
            skipped: g(&self.skipped),
            conflicts: g(&self.conflicts),
            filtered: g(&self.filtered),
            dead_letters: g(&self.dead_letters),
            errors: g(&self.errors),
        }
    }

    pub fn to_json(&self, dir: &str, enabled: bool) -> Value {
        let (state, err) = self.state.lock().map(|g| g.clone()).unwrap_or_default();
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        json!({
            "direction": dir,
            "enabled": enabled,
            "state": if enabled { state } else { "off".into() },
            "lastError": err,
            "cursor": g(&self.cursor),
            "lagSeq": g(&self.lag),
            "stored": g(&self.stored),
            "skipped": g(&self.skipped),
            "conflicts": g(&self.conflicts),
            "filtered": g(&self.filtered),
            "deadLetters": g(&self.dead_letters),
            "errors": g(&self.errors),
        })
    }
}

/// Why a request to the parent failed.
#[derive(Debug)]
pub struct Failure {
    pub status: Option<u16>,
    pub reason: String,
}

/// What the parent answered to `$apply`.
#[derive(Debug, Default)]
pub struct ApplyAnswer {
    pub node_id: String,
    pub applied: usize,
    pub stored: u64,
    pub skipped: u64,
    pub conflicts: u64,
    /// Index, status and reason of the entry that failed.
    pub failed: Option<(usize, u16, String)>,
    /// The parent keeps the order of push streams, so batches may be sent
    /// before the answer to the one before.
    pub ordered: bool,
}

pub struct Edge {
    pub cfg: EdgeConfig,
    pub(crate) store: Arc<dyn Store>,
    http: reqwest::Client,
    pub(crate) pull_filter: Filter,
    pub(crate) push_filter: Filter,
    /// The parent's node id, learned at the first contact.
    parent_id: Mutex<Option<String>>,
    pub pull: DirStats,
    pub push: DirStats,
    /// Anti-entropy runs of this edge (`crate::verify`).
    pub verify: VerifyState,
    jitter: Mutex<Jitter>,
}

/// A page of the parent's feed as fetched: its Bundle-level extensions
/// (cursors, the parent's node id) read, its entries left as text, each
/// read on its own, in parallel, by [`Edge::read_page`].
struct Page {
    /// The Bundle's `extension` array.
    extension: Option<Value>,
    text: Vec<u8>,
    /// Where each entry is in `text`.
    entries: Vec<std::ops::Range<usize>>,
}

impl Page {
    fn read(text: Vec<u8>) -> Result<Page, String> {
        let shell: BundleShell = serde_json::from_slice(&text)
            .map_err(|e| format!("the parent's page is not a Bundle: {e}"))?;
        if !shell.is_bundle() {
            return Err("the parent's page is not a Bundle".into());
        }
        let start = text.as_ptr() as usize;
        let entries = shell
            .entry
            .iter()
            .flatten()
            .map(|e| {
                let at = (e.get().as_ptr() as usize).saturating_sub(start);
                at..at + e.get().len()
            })
            .collect();
        Ok(Page {
            extension: shell.extension,
            entries,
            text,
        })
    }

    fn entry_text(&self, i: usize) -> &[u8] {
        self.entries
            .get(i)
            .and_then(|r| self.text.get(r.clone()))
            .unwrap_or_default()
    }

    /// Entry `i` as a tree (for a record that is not applied).
    fn entry(&self, i: usize) -> Value {
        serde_json::from_slice(self.entry_text(i)).unwrap_or(Value::Null)
    }

    /// A Bundle-level fhirsync extension.
    fn extension(&self, name: &str) -> Option<&Value> {
        find_extension(self.extension.as_ref(), name)
    }

    fn decimal(&self, name: &str) -> Option<u64> {
        self.extension(name)?["valueDecimal"]
            .to_string()
            .parse()
            .ok()
    }
}

/// A page of the parent's feed, fetched ahead and read (`page` is `None`
/// when it could not be fetched).
struct Fetched {
    page: Option<Page>,
    read: Result<PageRead, String>,
}

impl Fetched {
    fn versions(&self) -> usize {
        self.read.as_ref().map_or(0, |r| r.versions.len())
    }

    /// Read without an unreadable entry: later pages may join it.
    fn whole(&self) -> bool {
        self.read.as_ref().is_ok_and(|r| r.bad.is_none())
    }
}

/// The pages [`Edge::fetch_chain`] fetches ahead; dropping it stops it.
struct Chain {
    /// The `since` of the next page to come.
    since: u64,
    rx: mpsc::Receiver<(u64, Fetched)>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Chain {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What [`Edge::read_page`] made of a page's entries.
struct PageRead {
    versions: Vec<RemoteVersion>,
    /// Each version's index among the page's entries.
    from_entry: Vec<usize>,
    /// Entries the pull filter left out.
    filtered: u64,
    /// The first unreadable entry: its index, `seq` and why.
    bad: Option<(usize, u64, String)>,
}

/// The edge's TLS settings: extra trusted roots, and a client certificate
/// for mutual TLS. Bad files are refused with their path.
fn tls(mut b: reqwest::ClientBuilder, cfg: &EdgeConfig) -> Result<reqwest::ClientBuilder, String> {
    let read = |p: &std::path::Path, what: &str| {
        let bytes = std::fs::read(p).map_err(|e| format!("{what} {}: {e}", p.display()))?;
        if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
            return Err(format!("{what} {} is not PEM", p.display()));
        }
        Ok(bytes)
    };
    if let Some(ca) = &cfg.tls_ca_file {
        let certs = reqwest::Certificate::from_pem_bundle(&read(ca, "tls_ca_file")?)
            .map_err(|e| format!("tls_ca_file {}: {e}", ca.display()))?;
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    match (&cfg.tls_cert_file, &cfg.tls_key_file) {
        (Some(c), Some(k)) => {
            let mut pem = read(c, "tls_cert_file")?;
            pem.push(b'\n');
            pem.extend(read(k, "tls_key_file")?);
            let id = reqwest::Identity::from_pem(&pem)
                .map_err(|e| format!("tls_cert_file/tls_key_file: {e}"))?;
            b = b.identity(id);
        }
        (None, None) => {}
        _ => return Err("tls_cert_file and tls_key_file go together".into()),
    }
    Ok(b)
}

/// A failing record and how many times it failed.
struct Failing {
    seq: u64,
    attempts: u32,
}

impl Edge {
    pub fn new(cfg: EdgeConfig, store: Arc<dyn Store>) -> Result<Edge, String> {
        let http = tls(
            reqwest::Client::builder()
                .use_rustls_tls()
                .timeout(Duration::from_secs(cfg.long_poll_s + REQUEST_TIMEOUT_S))
                .connect_timeout(Duration::from_secs(10)),
            &cfg,
        )?
        .build()
        .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        let seed = store
            .node_id()
            .bytes()
            .fold(7u64, |h, b| h.wrapping_mul(31) ^ b as u64);
        Ok(Edge {
            pull_filter: Filter::new(&cfg.pull_filter)?,
            push_filter: Filter::new(&cfg.push_filter)?,
            cfg,
            store,
            http,
            parent_id: Mutex::new(None),
            pull: DirStats::default(),
            push: DirStats::default(),
            verify: VerifyState::default(),
            jitter: Mutex::new(Jitter::new(seed)),
        })
    }

    pub fn parent_id(&self) -> Option<String> {
        self.parent_id.lock().ok().and_then(|g| g.clone())
    }

    pub(crate) fn learn_parent(&self, id: &str) {
        if let Ok(mut g) = self.parent_id.lock() {
            if g.as_deref() != Some(id) {
                *g = Some(id.to_owned());
            }
        }
    }

    pub(crate) fn delay(&self, attempt: u32) -> Duration {
        let unit = self.jitter.lock().map(|mut j| j.unit()).unwrap_or(0.5);
        backoff(attempt, unit).min(Duration::from_millis(self.cfg.retry_delay_ms_max))
    }

    fn request(&self, rb: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        rb.bearer_auth(&self.cfg.token)
            .header(NODE_HEADER, self.store.node_id())
            .header("accept", "application/fhir+json")
    }

    /// Sends a request to the parent; its answer's text when it is a 200,
    /// or why not.
    async fn send_text(&self, rb: reqwest::RequestBuilder) -> Result<Vec<u8>, Failure> {
        let resp = self.request(rb).send().await.map_err(|e| Failure {
            status: None,
            reason: format!("cannot reach the parent: {e}"),
        })?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await.map_err(|e| Failure {
            status: Some(status),
            reason: format!("the parent's answer broke off: {e}"),
        })?;
        if status != 200 {
            let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
            return Err(Failure {
                status: Some(status),
                reason: format!(
                    "the parent answered {status}: {}",
                    fhirsync_sync::client::outcome_text(&body)
                ),
            });
        }
        Ok(bytes.into())
    }

    /// Sends a request to the parent; its JSON answer and the answer's
    /// size in bytes, or why not.
    async fn send_counted(&self, rb: reqwest::RequestBuilder) -> Result<(Value, usize), Failure> {
        let text = self.send_text(rb).await?;
        let body: Value = serde_json::from_slice(&text).unwrap_or(Value::Null);
        Ok((body, text.len()))
    }

    /// POSTs a JSON body to one of the parent's operations; the answer and
    /// its size in bytes.
    pub(crate) async fn post_json(
        &self,
        op: &str,
        body: String,
    ) -> Result<(Value, usize), Failure> {
        self.send_counted(
            self.http
                .post(format!("{}/{op}", self.cfg.url))
                .header("content-type", "application/json")
                .body(body),
        )
        .await
    }

    /// Sends change records (entry texts) to the parent's `$apply`.
    pub async fn post_apply(&self, entries: &[String]) -> Result<ApplyAnswer, Failure> {
        self.post_apply_body(self.apply_body(entries, None)).await
    }

    /// An `$apply` request's Bundle of entry texts; `stream`: the push
    /// stream and the batch's number in it.
    fn apply_body(&self, entries: &[String], stream: Option<(&str, u64)>) -> String {
        let mut body =
            String::with_capacity(entries.iter().map(|e| e.len() + 1).sum::<usize>() + 500);
        let mut ext = vec![
            json!({"url": format!("{EXTENSION_BASE}/{POLICY_EXTENSION}"), "valueCode": self.cfg.conflict_policy.as_str()}),
        ];
        if let Some((id, n)) = stream {
            ext.push(
                json!({"url": format!("{EXTENSION_BASE}/{STREAM_EXTENSION}"), "valueString": id}),
            );
            ext.push(
                json!({"url": format!("{EXTENSION_BASE}/{BATCH_EXTENSION}"), "valueInteger": n}),
            );
        }
        body.push_str(r#"{"resourceType":"Bundle","type":"collection","extension":"#);
        body.push_str(&Value::Array(ext).to_string());
        body.push_str(r#","entry":["#);
        for (i, e) in entries.iter().enumerate() {
            if i > 0 {
                body.push(',');
            }
            body.push_str(e);
        }
        body.push_str("]}");
        body
    }

    /// POSTs an [`Self::apply_body`] to the parent and reads its answer.
    async fn post_apply_body(&self, body: String) -> Result<ApplyAnswer, Failure> {
        let (v, _) = self
            .send_counted(
                self.http
                    .post(format!("{}/$apply", self.cfg.url))
                    .header("content-type", "application/fhir+json")
                    .body(body),
            )
            .await?;
        let p = |name: &str| {
            v.get("parameter")
                .and_then(Value::as_array)
                .and_then(|a| a.iter().find(|x| x["name"] == name))
                .cloned()
        };
        let int = |name: &str| {
            p(name)
                .and_then(|x| x.get("valueInteger").and_then(Value::as_u64))
                .unwrap_or(0)
        };
        let node_id = p("node-id")
            .and_then(|x| x["valueString"].as_str().map(str::to_owned))
            .ok_or_else(|| Failure {
                status: Some(200),
                reason: "the parent's $apply answer has no node-id".into(),
            })?;
        let failed = p("failed-index").map(|x| {
            (
                x["valueInteger"].as_u64().unwrap_or(0) as usize,
                int("failed-status") as u16,
                p("failed-reason")
                    .and_then(|x| x["valueString"].as_str().map(str::to_owned))
                    .unwrap_or_default(),
            )
        });
        Ok(ApplyAnswer {
            node_id,
            applied: int("applied") as usize,
            stored: int("stored"),
            skipped: int("skipped"),
            conflicts: int("conflicts"),
            failed,
            ordered: p(ORDER_PARAMETER).is_some_and(|x| x["valueBoolean"] == true),
        })
    }

    /// Waits, unless the edge is stopping; `false` when it is.
    pub(crate) async fn pause(&self, d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
        if *stop.borrow() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = stop.changed() => false,
        }
    }

    /// A record failed once more: retry later, or after `retry_max`
    /// attempts block the direction or set it aside as a dead letter.
    /// Returns the wait before the next attempt.
    async fn record_failed(
        &self,
        dir: Direction,
        failing: &mut Option<Failing>,
        letter: NewDeadLetter,
    ) -> Duration {
        let stats = self.stats(dir);
        stats.errors.fetch_add(1, Ordering::Relaxed);
        let attempts = match failing {
            Some(f) if f.seq == letter.seq => f.attempts + 1,
            _ => 1,
        };
        *failing = Some(Failing {
            seq: letter.seq,
            attempts,
        });
        let what = format!(
            "{}/{} (seq {}) failed {attempts} times: {}",
            letter.rtype, letter.rid, letter.seq, letter.error
        );
        if attempts < self.cfg.retry_max {
            stats.set_state("retrying", Some(what));
            return self.delay(attempts);
        }
        match self.cfg.on_error {
            OnError::Block => {
                tracing::error!(edge = %self.cfg.name, direction = dir.as_str(), "{what}; the edge is blocked");
                stats.set_state("blocked", Some(what));
                Duration::from_millis(self.cfg.retry_delay_ms_max)
            }
            OnError::DeadLetter => {
                let key = cursor_key(&self.cfg.name, dir);
                let seq = letter.seq;
                let letter = NewDeadLetter { attempts, ..letter };
                let w = SyncWrite::DeadLetters {
                    letters: vec![letter],
                    cursor: Some((key, seq)),
                };
                match self.store.write(WriteRequest::Sync(w)).await {
                    Ok(_) => {
                        tracing::warn!(edge = %self.cfg.name, direction = dir.as_str(), "{what}; set aside as a dead letter");
                        stats.dead_letters.fetch_add(1, Ordering::Relaxed);
                        stats.cursor.store(seq, Ordering::Relaxed);
                        *failing = None;
                        Duration::ZERO
                    }
                    Err(e) => {
                        stats.set_state(
                            "retrying",
                            Some(format!("cannot store a dead letter: {e}")),
                        );
                        self.delay(attempts)
                    }
                }
            }
        }
    }

    pub fn stats(&self, dir: Direction) -> &DirStats {
        match dir {
            Direction::Pull => &self.pull,
            Direction::Push => &self.push,
        }
    }

    fn letter(
        &self,
        dir: Direction,
        rtype: &str,
        rid: &str,
        seq: u64,
        record: String,
        error: String,
    ) -> NewDeadLetter {
        NewDeadLetter {
            edge: self.cfg.name.clone(),
            direction: dir,
            rtype: rtype.to_owned(),
            rid: rid.to_owned(),
            seq,
            record,
            error,
            attempts: 0,
        }
    }

    /// GETs one page of the parent's feed after `since` and reads it and
    /// its entries on a blocking thread (while the page before is applied).
    async fn fetch(self: Arc<Self>, since: u64) -> Result<Fetched, Failure> {
        let mut url = format!(
            "{}/$changes?since={since}&_count={}&wait={}",
            self.cfg.url, self.cfg.batch_size_max, self.cfg.long_poll_s
        );
        if !self.pull_filter.types.is_empty() {
            url.push_str(&format!("&_type={}", self.pull_filter.types.join(",")));
        }
        let text = self.send_text(self.http.get(&url)).await?;
        tokio::task::spawn_blocking(move || match Page::read(text) {
            Ok(page) => {
                let read = self.read_page(&page);
                Fetched {
                    page: Some(page),
                    read,
                }
            }
            Err(why) => Fetched {
                page: None,
                read: Err(why),
            },
        })
        .await
        .map_err(|e| Failure {
            status: None,
            reason: format!("reading a page failed: {e}"),
        })
    }

    /// The versions of a page that pass the pull filter, up to its first
    /// unreadable entry.
    fn read_page(&self, page: &Page) -> Result<PageRead, String> {
        let n = page.entries.len();
        let mut r = PageRead {
            versions: Vec::with_capacity(n),
            from_entry: Vec::with_capacity(n),
            filtered: 0,
            bad: None,
        };
        let texts: Vec<&[u8]> = (0..n).map(|i| page.entry_text(i)).collect();
        let reads = RemoteVersion::from_payloads(&texts, self.cfg.validation);
        for (i, read) in reads.into_iter().enumerate() {
            match read {
                Ok(v) => {
                    // An expression is judged on the resource as a tree.
                    let tree = match &v.raw {
                        Some(raw) if self.pull_filter.has_expr() => serde_json::from_str(raw).ok(),
                        _ => None,
                    };
                    if self.pull_filter.passes(&v.rtype, tree.as_ref()) {
                        r.versions.push(v);
                        r.from_entry.push(i);
                    } else {
                        r.filtered += 1;
                    }
                }
                Err(why) => {
                    let seq = entry_seq(&page.entry(i))
                        .ok_or_else(|| format!("the parent sent an entry without seq: {why}"))?;
                    r.bad = Some((i, seq, why));
                    break;
                }
            }
        }
        Ok(r)
    }

    /// Fetches the parent's feed from `since` on, page after page (each
    /// page's `since` is the one before's `next` cursor), into `out`. It
    /// ends after a page it could not fetch, or when `out` is dropped.
    async fn fetch_chain(self: Arc<Self>, mut since: u64, out: mpsc::Sender<(u64, Fetched)>) {
        loop {
            let r = self.clone().fetch(since).await;
            let next = r
                .as_ref()
                .ok()
                .and_then(|f| f.page.as_ref()?.decimal("changes-next-since"));
            let failed = r.is_err();
            let item = r.unwrap_or_else(|f| Fetched {
                page: None,
                read: Err(f.reason),
            });
            if out.send((since, item)).await.is_err() || failed {
                return;
            }
            match next {
                Some(n) => since = n,
                None => return,
            }
        }
    }

    /// Pulls the parent's change feed until `stop`. Pages are fetched
    /// ahead by [`Self::fetch_chain`] (up to [`PULL_PAGES_AHEAD`]) while the
    /// writer stores the ones before; what has arrived meanwhile is stored
    /// in one transaction (up to [`PULL_APPLY_MAX`] versions). Pages fetched
    /// ahead are dropped when what came before them is not stored whole.
    pub async fn run_pull(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let key = cursor_key(&self.cfg.name, Direction::Pull);
        let mut attempt = 0u32;
        let mut failing: Option<Failing> = None;
        // The cursor as last committed; `None`: read it from the store.
        let mut known: Option<u64> = None;
        let mut chain: Option<Chain> = None;
        self.pull.set_state("starting", None);
        while !*stop.borrow() {
            let since = match known {
                Some(c) => c,
                None => match self.store.cursor(&key).await {
                    Ok(c) => c.unwrap_or(0),
                    Err(e) => {
                        self.pull.set_state("retrying", Some(e.to_string()));
                        if !self.pause(self.delay(attempt), &mut stop).await {
                            break;
                        }
                        attempt += 1;
                        continue;
                    }
                },
            };
            known = Some(since);
            self.pull.cursor.store(since, Ordering::Relaxed);
            let ch = match chain.take() {
                Some(c) if c.since == since => chain.insert(c),
                _ => {
                    let (tx, rx) = mpsc::channel(PULL_PAGES_AHEAD);
                    let task = tokio::spawn(self.clone().fetch_chain(since, tx));
                    chain.insert(Chain { since, rx, task })
                }
            };
            let first = tokio::select! {
                r = ch.rx.recv() => r,
                _ = stop.changed() => break,
            };
            let Some((from, first)) = first.filter(|(s, _)| *s == since) else {
                chain = None;
                continue;
            };
            if first.page.is_none() {
                chain = None;
                self.pull.errors.fetch_add(1, Ordering::Relaxed);
                self.pull.set_state("retrying", first.read.err());
                if !self.pause(self.delay(attempt), &mut stop).await {
                    break;
                }
                attempt += 1;
                continue;
            }
            attempt = 0;
            // Whatever else has arrived joins this transaction; a page that
            // could not be fetched or read ends the chain (it is fetched
            // again), one with an unreadable entry ends the transaction.
            let mut pages = vec![first];
            let mut versions = pages[0].versions();
            let mut restart = false;
            while versions < PULL_APPLY_MAX && pages.last().is_some_and(Fetched::whole) {
                match ch.rx.try_recv() {
                    Ok((_, f)) if f.page.is_some() && f.read.is_ok() => {
                        versions += f.versions();
                        pages.push(f);
                    }
                    Ok(_) => {
                        restart = true;
                        break;
                    }
                    Err(_) => break,
                }
            }
            let next = pages
                .last()
                .and_then(|p| p.page.as_ref()?.decimal("changes-next-since"));
            ch.since = next.unwrap_or(from);
            if restart {
                chain = None;
            }
            match self.apply_pages(since, pages, &mut failing).await {
                Ok(None) => known = next,
                Ok(Some(wait)) => {
                    known = None;
                    chain = None;
                    if !self.pause(wait, &mut stop).await {
                        break;
                    }
                }
                Err(e) => {
                    known = None;
                    chain = None;
                    self.pull.errors.fetch_add(1, Ordering::Relaxed);
                    self.pull.set_state("retrying", Some(e));
                    if !self.pause(self.delay(attempt), &mut stop).await {
                        break;
                    }
                    attempt += 1;
                }
            }
        }
        drop(chain);
        tracing::debug!(edge = %self.cfg.name, "pull stopped");
    }

    /// Stores consecutive pages of the parent's feed, with the cursor, in
    /// one transaction. `Ok(Some)`: a record failed; wait that long before
    /// the next attempt.
    async fn apply_pages(
        &self,
        since: u64,
        mut pages: Vec<Fetched>,
        failing: &mut Option<Failing>,
    ) -> Result<Option<Duration>, String> {
        fn fetched(f: &Fetched) -> Result<&Page, &'static str> {
            f.page
                .as_ref()
                .ok_or("a page of the parent's feed was not fetched")
        }
        let parent = fetched(&pages[0])?
            .extension("node-id")
            .and_then(|x| x["valueString"].as_str().map(str::to_owned))
            .ok_or("the parent's feed has no node-id")?;
        self.learn_parent(&parent);
        let tail = fetched(&pages[pages.len() - 1])?;
        let next = tail
            .decimal("changes-next-since")
            .ok_or("the parent's feed has no next cursor")?;
        let last = tail.decimal("changes-last-seq").unwrap_or(next);
        let mut versions = Vec::new();
        // Each version's page and entry.
        let mut from_entry = Vec::new();
        let mut bad = None;
        for (p, f) in pages.iter_mut().enumerate() {
            let read = std::mem::replace(&mut f.read, Err(String::new()))?;
            self.pull
                .filtered
                .fetch_add(read.filtered, Ordering::Relaxed);
            from_entry.extend(read.from_entry.iter().map(|&i| (p, i)));
            versions.extend(read.versions);
            if let Some((i, seq, why)) = read.bad {
                bad = Some((p, i, seq, why));
            }
        }
        let cursor = match &bad {
            None => next,
            Some((_, _, seq, _)) => seq.saturating_sub(1).max(since),
        };
        let out = self
            .store
            .write(WriteRequest::Apply(Box::new(ApplyRequest {
                edge: self.cfg.name.clone(),
                direction: Direction::Pull,
                peer: parent,
                policy: self.cfg.conflict_policy,
                versions,
                cursor: Some(cursor),
                dead_letters: Vec::new(),
                record_peer: false,
            })))
            .await
            .map_err(|e| format!("cannot store pulled changes: {e}"))?;
        let WriteOutcome::Applied(rep) = out else {
            return Err("unexpected write outcome".into());
        };
        self.pull.count(&rep);
        let now = rep.cursor.unwrap_or(since);
        self.pull.cursor.store(now, Ordering::Relaxed);
        self.pull
            .lag
            .store(last.saturating_sub(now), Ordering::Relaxed);
        let entry = |p: usize, i: usize| pages[p].page.as_ref().map_or(Value::Null, |g| g.entry(i));
        let failed = match (rep.failed(), bad) {
            (Some((i, status, why)), _) => {
                let (p, n) = from_entry[i];
                let e = entry(p, n);
                let v = RemoteVersion::from_entry(&e, self.cfg.validation)
                    .map_err(|w| w.to_string())?;
                Some(self.letter(
                    Direction::Pull,
                    &v.rtype,
                    &v.id,
                    v.seq,
                    e.to_string(),
                    format!("{status}: {why}"),
                ))
            }
            (None, Some((p, i, seq, why))) => {
                let e = entry(p, i);
                let url = e
                    .pointer("/request/url")
                    .and_then(Value::as_str)
                    .unwrap_or("?/?");
                let (t, id) = url.split_once('/').unwrap_or((url, ""));
                Some(self.letter(Direction::Pull, t, id, seq, e.to_string(), why))
            }
            (None, None) => None,
        };
        match failed {
            Some(l) => Ok(Some(self.record_failed(Direction::Pull, failing, l).await)),
            None => {
                *failing = None;
                self.pull.set_state("ok", None);
                Ok(None)
            }
        }
    }

    /// Tries a dead letter again; removes it when it goes through.
    pub async fn retry_dead_letter(&self, d: &DeadLetter) -> Result<(), (u16, String)> {
        let l = &d.letter;
        match l.direction {
            Direction::Pull => {
                let peer = self.parent_id().unwrap_or_else(|| "parent".into());
                apply_again(
                    &self.store,
                    d,
                    &peer,
                    self.cfg.conflict_policy,
                    self.cfg.validation,
                )
                .await?;
            }
            Direction::Push => {
                let ans = self
                    .post_apply(std::slice::from_ref(&l.record))
                    .await
                    .map_err(|f| {
                        (
                            f.status.map_or(502, |s| if s >= 500 { 502 } else { s }),
                            f.reason,
                        )
                    })?;
                if let Some((_, status, why)) = ans.failed {
                    return Err((if status >= 400 { status } else { 409 }, why));
                }
            }
        }
        drop_dead_letter(&self.store, d).await
    }
}

/// Applies a received record that was set aside (pull-side dead letters,
/// whatever transport brought it), through the usual apply path.
pub async fn apply_again(
    store: &Arc<dyn Store>,
    d: &DeadLetter,
    peer: &str,
    policy: fhirsync_core::replicate::Policy,
    validation: fhirsync_core::validate::Mode,
) -> Result<(), (u16, String)> {
    let entry: Value = serde_json::from_str(&d.letter.record)
        .map_err(|e| (422, format!("the record is not JSON: {e}")))?;
    let v = RemoteVersion::from_entry(&entry, validation).map_err(|w| (422, w))?;
    let out = store
        .write(WriteRequest::Apply(Box::new(ApplyRequest {
            edge: d.letter.edge.clone(),
            direction: Direction::Pull,
            peer: peer.to_owned(),
            policy,
            versions: vec![v],
            cursor: None,
            dead_letters: Vec::new(),
            record_peer: false,
        })))
        .await
        .map_err(|e| (e.status(), e.to_string()))?;
    if let WriteOutcome::Applied(rep) = out {
        if let Some((_, status, why)) = rep.failed() {
            return Err((if status >= 400 { status } else { 409 }, why.to_owned()));
        }
    }
    Ok(())
}

/// Removes a dead letter that went through, with its audit line.
pub async fn drop_dead_letter(store: &Arc<dyn Store>, d: &DeadLetter) -> Result<(), (u16, String)> {
    let l = &d.letter;
    let audit = AuditEntry::new(
        &l.edge,
        "retry",
        "ok",
        1,
        format!(
            "dead letter {}: {}/{} (seq {}) went through",
            d.id, l.rtype, l.rid, l.seq
        ),
    );
    store
        .write(WriteRequest::Sync(SyncWrite::DropDeadLetter {
            id: d.id,
            audit,
        }))
        .await
        .map_err(|e| (e.status(), e.to_string()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A page's entries are found in its text as they are in its tree,
    /// whatever the spacing and escapes; its cursors are read.
    #[test]
    fn a_page_read_as_text_holds_the_entries_of_its_tree() {
        let ext = |name: &str| format!("{EXTENSION_BASE}/{name}");
        let text = format!(
            r#"{{ "resourceType" : "Bundle",
                 "extension" : [ {{"url": "{}", "valueDecimal": 42}},
                                 {{"url": "{}", "valueString": "parent-1"}} ],
                 "entry" : [ {{"request": {{"url": "Patient\/p1"}}, "resource": {{"name": "O\u2019Brien"}}}},
                             [ 1, {{ }} ] , "x\"y",
                             {{}} ] }}"#,
            ext("changes-next-since"),
            ext("node-id"),
        );
        let tree: Value = serde_json::from_str(&text).unwrap();
        let page = Page::read(text.into_bytes()).unwrap();
        let entries = tree["entry"].as_array().unwrap();
        assert_eq!(page.entries.len(), entries.len());
        for (i, e) in entries.iter().enumerate() {
            assert_eq!(&page.entry(i), e);
        }
        assert_eq!(page.entry(9), Value::Null);
        assert_eq!(page.decimal("changes-next-since"), Some(42));
        assert_eq!(
            page.extension("node-id").unwrap()["valueString"],
            "parent-1"
        );
        assert_eq!(page.decimal("changes-last-seq"), None);
        for bad in [
            &b"7"[..],
            br#"{"resourceType": "Bundle", "entry": 7}"#,
            br#"{"resourceType": "Patient", "entry": []}"#,
            br#"{"entry": []}"#,
            b"{",
            b"",
        ] {
            let why = Page::read(bad.to_vec()).err().expect("refused");
            assert!(why.contains("not a Bundle"), "{why}");
        }
    }
}
