//! The matcher (change log → stored events, one cursor) and the delivery
//! workers (stored events → channel, one cursor per subscription).
//!
//! Events are numbered per subscription in log order and stored in the
//! same transaction as the matcher's cursor, so a restart neither loses nor
//! renumbers them; a worker moves its `sent` cursor only after the channel
//! confirmed (HTTP 2xx, JetStream ack, NATS flush), so delivery is at least
//! once and in order. Writes never wait for any of this.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use async_trait::async_trait;
use fhirsync_api::agent::EdgeCounters;
use fhirsync_api::SyncAgent;
use fhirsync_core::index::{self, IndexEntry};
use fhirsync_core::search::{judge, SearchQuery};
use fhirsync_core::subscription::Channel;
use fhirsync_core::subscription::{
    basic, notification_bundle, search_of, Event, Interaction, NoteKind, Payload, Status,
    Subscription, Topic,
};
use fhirsync_store::{
    sub_events_key, sub_sent_key, ChangesQuery, DeadLetter, Prepared, Store, StoredVersion,
    SubEvent, SyncWrite, WriteRequest, SUB_MATCHED_KEY,
};
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;

use crate::channel::Channels;
use crate::config::SubsConfig;

/// How often a busy subscription stores its delivery cursor.
const SENT_STORE_EVERY: Duration = Duration::from_millis(500);

/// One subscription served by this node.
struct SubState {
    id: String,
    /// The current version: parsed, its `vid`, its JSON.
    cur: Mutex<(Arc<Subscription>, u64, Arc<Value>)>,
    events: AtomicU64,
    sent: AtomicU64,
    /// The `sent` value last stored, and when.
    stored: Mutex<(u64, std::time::Instant)>,
    delivered: AtomicU64,
    errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    wake: Notify,
}

impl SubState {
    fn current(&self) -> (Arc<Subscription>, u64, Arc<Value>) {
        self.cur
            .lock()
            .map(|c| c.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }
}

struct Inner {
    store: Arc<dyn Store>,
    cfg: SubsConfig,
    base: String,
    channels: Channels,
    topics: RwLock<HashMap<String, Arc<Topic>>>,
    subs: Mutex<HashMap<String, Arc<SubState>>>,
    workers: Mutex<HashMap<String, JoinHandle<()>>>,
    matched: AtomicU64,
    stop: watch::Sender<bool>,
}

/// A subscription that collects events, its current version and its topic
/// (none for a query-based one).
type Served = (Arc<SubState>, Arc<Subscription>, Option<Arc<Topic>>);

/// One change as the matcher judges it.
struct Change<'a> {
    v: &'a StoredVersion,
    interaction: Interaction,
    /// The version before (none for a create), its JSON and `seq`.
    previous: Option<Value>,
    prev_seq: Option<u64>,
    /// This version's JSON (none for a delete).
    current: Option<Value>,
    /// The index entries of `current` and of `previous`, made at the first
    /// search judged on each.
    current_index: OnceLock<Vec<IndexEntry>>,
    previous_index: OnceLock<Vec<IndexEntry>>,
}

impl Change<'_> {
    /// The index entries of the version at `seq` (this change's or the
    /// one before), if its resource is at hand.
    fn index_at(&self, seq: u64) -> Option<&[IndexEntry]> {
        let (body, cell) = if seq == self.v.seq {
            (self.current.as_ref()?, &self.current_index)
        } else if Some(seq) == self.prev_seq {
            (self.previous.as_ref()?, &self.previous_index)
        } else {
            return None;
        };
        Some(cell.get_or_init(|| index::extract(&self.v.rtype, body)))
    }
}

/// The subscriptions agent of a node.
pub struct Notifier {
    inner: Arc<Inner>,
    matcher: Mutex<Option<JoinHandle<()>>>,
}

async fn list_all(store: &dyn Store, rtype: &str) -> Vec<StoredVersion> {
    let mut out = Vec::new();
    let mut q = SearchQuery {
        rtype: Some(rtype.to_owned()),
        count: 1000,
        ..Default::default()
    };
    loop {
        match store.search(q.clone()).await {
            Ok(page) => {
                out.extend(page.items);
                match page.next_cursor {
                    Some(c) => {
                        q.cursor = Some(c);
                        q.snapshot = Some(page.snapshot);
                    }
                    None => return out,
                }
            }
            Err(e) => {
                tracing::error!(error = %e, rtype, "cannot list resources");
                return out;
            }
        }
    }
}

/// The newest version of a resource at or before `cursor`, starting from
/// its current one.
async fn covered(store: &dyn Store, mut v: StoredVersion, cursor: u64) -> Option<StoredVersion> {
    loop {
        if v.seq <= cursor {
            return (!v.deleted).then_some(v);
        }
        if v.vid <= 1 {
            return None;
        }
        v = store
            .vread(&v.rtype, &v.id, v.vid - 1)
            .await
            .ok()
            .flatten()?;
    }
}

fn body_json(v: &StoredVersion) -> Option<Value> {
    v.body.as_deref().and_then(|b| serde_json::from_str(b).ok())
}

impl Notifier {
    /// Starts the matcher; subscriptions created on this node are served
    /// from then on. `nats`: connections for NATS channels (the one named
    /// "" is the default).
    pub fn start(
        store: Arc<dyn Store>,
        cfg: SubsConfig,
        base: String,
    ) -> Result<Arc<Notifier>, String> {
        cfg.check()?;
        let (stop, _) = watch::channel(false);
        let inner = Arc::new(Inner {
            channels: Channels::new(cfg.nats.clone()),
            base: cfg
                .base_url
                .clone()
                .unwrap_or(base)
                .trim_end_matches('/')
                .to_owned(),
            store,
            cfg,
            topics: RwLock::default(),
            subs: Mutex::default(),
            workers: Mutex::default(),
            matched: AtomicU64::new(0),
            stop,
        });
        let i = inner.clone();
        let matcher = tokio::spawn(async move { i.run_matcher().await });
        Ok(Arc::new(Notifier {
            inner,
            matcher: Mutex::new(Some(matcher)),
        }))
    }

    pub fn stop(&self) {
        let _ = self.inner.stop.send(true);
        if let Ok(mut m) = self.matcher.lock() {
            if let Some(h) = m.take() {
                h.abort();
            }
        }
        if let Ok(mut w) = self.inner.workers.lock() {
            for (_, h) in w.drain() {
                h.abort();
            }
        }
    }

    /// Stops and waits for the tasks to end.
    pub async fn shutdown(&self) {
        let _ = self.inner.stop.send(true);
        let m = self.matcher.lock().ok().and_then(|mut m| m.take());
        if let Some(h) = m {
            let _ = h.await;
        }
        let ws: Vec<JoinHandle<()>> = self
            .inner
            .workers
            .lock()
            .map(|mut w| w.drain().map(|x| x.1).collect())
            .unwrap_or_default();
        for h in ws {
            let _ = h.await;
        }
        for st in self.inner.subs_list() {
            self.inner.store_sent(&st, true).await;
        }
    }

    /// Position of the matcher in the change log.
    pub fn matched_seq(&self) -> u64 {
        self.inner.matched.load(Relaxed)
    }
}

impl Drop for Notifier {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Inner {
    /// The subscriptions served now (a snapshot).
    fn subs_list(&self) -> Vec<Arc<SubState>> {
        self.subs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Sleeps unless stopped first; false when stopped.
    async fn pause(&self, d: Duration) -> bool {
        let mut rx = self.stop.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(d) => !self.stopped(),
            _ = rx.wait_for(|s| *s) => false,
        }
    }

    async fn run_matcher(self: Arc<Self>) {
        let store = self.store.clone();
        let mut cursor = loop {
            match store.cursor(SUB_MATCHED_KEY).await {
                Ok(Some(c)) => break c,
                Ok(None) => {
                    // a new node: subscriptions see what is written from now on
                    let last = store.last_seq();
                    let w = SyncWrite::SetCursor {
                        key: SUB_MATCHED_KEY.into(),
                        seq: last,
                        audit: None,
                    };
                    if store.write(WriteRequest::Sync(w)).await.is_ok() {
                        break last;
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot read the subscriptions cursor"),
            }
            if !self.pause(Duration::from_millis(500)).await {
                return;
            }
        };
        self.matched.store(cursor, Relaxed);
        // the versions the matcher's position covers; newer ones come
        // through the log in order
        for rtype in ["SubscriptionTopic", "Basic"] {
            for t in list_all(store.as_ref(), rtype).await {
                if let Some(v) = covered(store.as_ref(), t, cursor).await {
                    self.topic_version(&v);
                }
            }
        }
        for s in list_all(store.as_ref(), "Subscription").await {
            if let Some(v) = covered(store.as_ref(), s, cursor).await {
                self.sub_version(&v).await;
            }
        }
        let mut seq_rx = store.watch_seq();
        let mut stop = self.stop.subscribe();
        loop {
            if self.stopped() {
                return;
            }
            if store.last_seq() <= cursor {
                tokio::select! {
                    _ = seq_rx.changed() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                continue;
            }
            match self.match_batch(cursor).await {
                Ok(c) => {
                    cursor = c;
                    self.matched.store(c, Relaxed);
                }
                Err(e) => {
                    tracing::error!(error = %e, "subscription matcher failed; retrying");
                    if !self.pause(Duration::from_secs(1)).await {
                        return;
                    }
                }
            }
        }
    }

    /// A SubscriptionTopic version, or a `Basic` one (a topic in the
    /// Backport IG's R4 form, or no longer one): topics are kept by type,
    /// id and url.
    fn topic_version(&self, v: &StoredVersion) {
        let body = (!v.deleted).then(|| body_json(v)).flatten();
        let body = match (v.rtype.as_str(), body) {
            ("Basic", Some(b)) if basic::is_topic(&b) => Some(basic::topic_json(&b)),
            ("Basic", _) => None,
            (_, b) => b,
        };
        let mut topics = self.topics.write().unwrap_or_else(|p| p.into_inner());
        let prefix = format!("{}/{}:", v.rtype, v.id);
        topics.retain(|k, _| !k.starts_with(&prefix));
        if let Some(b) = body {
            match Topic::parse(&b) {
                Ok(t) => {
                    topics.insert(format!("{prefix}{}", t.url), Arc::new(t));
                }
                Err(e) => tracing::warn!(id = %v.id, error = %e, "SubscriptionTopic not usable"),
            }
        }
    }

    fn topic(&self, url: &str) -> Option<Arc<Topic>> {
        let topics = self.topics.read().unwrap_or_else(|p| p.into_inner());
        topics
            .iter()
            .find(|(_, t)| t.url == url)
            .map(|(_, t)| t.clone())
    }

    /// A Subscription version seen in the log (or at start).
    async fn sub_version(self: &Arc<Self>, v: &StoredVersion) {
        if v.origin != self.store.node_id() {
            return; // served by the node where it was created
        }
        if v.deleted {
            self.subs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&v.id);
            if let Some(h) = self
                .workers
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&v.id)
            {
                h.abort();
            }
            return;
        }
        let Some(body) = body_json(v) else { return };
        let parsed = match Subscription::parse(&body) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(id = %v.id, error = %e, "Subscription not usable");
                return;
            }
        };
        let existing = self
            .subs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&v.id)
            .cloned();
        match existing {
            Some(st) => {
                {
                    let mut cur = st.cur.lock().unwrap_or_else(|p| p.into_inner());
                    if v.vid > cur.1 {
                        *cur = (Arc::new(parsed), v.vid, Arc::new(body));
                    }
                }
                st.wake.notify_one();
            }
            None => {
                let events = self
                    .store
                    .cursor(&sub_events_key(&v.id))
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                let sent = self
                    .store
                    .cursor(&sub_sent_key(&v.id))
                    .await
                    .ok()
                    .flatten()
                    .unwrap_or(0);
                let st = Arc::new(SubState {
                    id: v.id.clone(),
                    cur: Mutex::new((Arc::new(parsed), v.vid, Arc::new(body))),
                    events: AtomicU64::new(events),
                    sent: AtomicU64::new(sent),
                    stored: Mutex::new((sent, std::time::Instant::now())),
                    delivered: AtomicU64::new(0),
                    errors: AtomicU64::new(0),
                    last_error: Mutex::new(None),
                    wake: Notify::new(),
                });
                self.subs
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(v.id.clone(), st.clone());
                let me = self.clone();
                let h = tokio::spawn(async move { me.run_worker(st).await });
                self.workers
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(v.id.clone(), h);
            }
        }
    }

    /// Matches one batch of changes; returns the new cursor.
    async fn match_batch(self: &Arc<Self>, cursor: u64) -> Result<u64, String> {
        let changes = self
            .store
            .changes(ChangesQuery {
                since: cursor,
                count: self.cfg.batch_size_max,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = changes.last().map(|v| v.seq) else {
            return Ok(cursor);
        };
        let mut events: Vec<SubEvent> = Vec::new();
        let mut counts: HashMap<String, u64> = HashMap::new();
        let mut active = self.active();
        for v in &changes {
            match v.rtype.as_str() {
                "SubscriptionTopic" | "Basic" => {
                    self.topic_version(v);
                    active = self.active();
                }
                "Subscription" => {
                    self.sub_version(v).await;
                    active = self.active();
                }
                _ => {}
            }
            let candidates: Vec<&Served> = active
                .iter()
                .filter(|(_, sub, topic)| match topic {
                    Some(t) => t.triggers.iter().any(|t| {
                        t.rtype == v.rtype || t.rtype == "Resource" || t.rtype == "DomainResource"
                    }),
                    None => {
                        !v.deleted
                            && sub
                                .classic
                                .as_ref()
                                .is_some_and(|q| q.rtype.as_deref() == Some(v.rtype.as_str()))
                    }
                })
                .collect();
            if candidates.is_empty() {
                continue;
            }
            let current = (!v.deleted).then(|| body_json(v)).flatten();
            let previous = if v.vid > 1 {
                self.store
                    .vread(&v.rtype, &v.id, v.vid - 1)
                    .await
                    .map_err(|e| e.to_string())?
                    .filter(|p| !p.deleted)
            } else {
                None
            };
            let change = Change {
                v,
                interaction: if v.deleted {
                    Interaction::Delete
                } else if previous.is_none() {
                    Interaction::Create
                } else {
                    Interaction::Update
                },
                prev_seq: previous.as_ref().map(|p| p.seq),
                previous: previous.as_ref().and_then(body_json),
                current,
                current_index: OnceLock::new(),
                previous_index: OnceLock::new(),
            };
            // a topic is decided once per change, however many
            // subscriptions share it; the filters run first
            let mut memo: Vec<(usize, bool)> = Vec::new();
            for (st, sub, topic) in candidates {
                let hit = match (topic, &sub.classic) {
                    (Some(topic), _) => {
                        if !self.filters_pass(sub, &change).await? {
                            continue;
                        }
                        let key = Arc::as_ptr(topic) as usize;
                        match memo.iter().find(|m| m.0 == key) {
                            Some(m) => m.1,
                            None => {
                                let m = self.topic_matches(topic, &change).await?;
                                memo.push((key, m));
                                m
                            }
                        }
                    }
                    (None, Some(q)) => self.holds(q.clone(), &change, v.seq).await?,
                    (None, None) => false,
                };
                if !hit {
                    continue;
                }
                let n = counts
                    .entry(st.id.clone())
                    .or_insert_with(|| st.events.load(Relaxed));
                *n += 1;
                events.push(SubEvent {
                    sub: st.id.clone(),
                    num: *n,
                    seq: v.seq,
                    rtype: v.rtype.clone(),
                    rid: v.id.clone(),
                    vid: v.vid,
                    deleted: v.deleted,
                    at_ms: v.last_updated_ms,
                });
            }
        }
        let mut cursors = vec![(SUB_MATCHED_KEY.to_owned(), last)];
        cursors.extend(counts.iter().map(|(s, n)| (sub_events_key(s), *n)));
        self.store
            .write(WriteRequest::Sync(SyncWrite::SubEvents { events, cursors }))
            .await
            .map_err(|e| e.to_string())?;
        for st in self.subs_list() {
            if let Some(n) = counts.get(&st.id) {
                st.events.store(*n, Relaxed);
                st.wake.notify_one();
            }
        }
        Ok(last)
    }

    /// Whether the version at `seq` (the change's or the one before)
    /// satisfies a search as it was written: judged on the version's own
    /// index entries when that gives the store's answer (see
    /// [`judge`]), otherwise by the store.
    async fn holds(&self, q: SearchQuery, c: &Change<'_>, seq: u64) -> Result<bool, String> {
        if let Some(entries) = c.index_at(seq) {
            let id = &c.v.id;
            if let Some(b) = judge(&q, &c.v.rtype, id, entries) {
                return Ok(b);
            }
        }
        self.store
            .version_matches(q, seq)
            .await
            .map_err(|e| e.to_string())
    }

    /// Whether a change passes a subscription's filters (those of another
    /// type do not apply): a search parameter of the type through the
    /// store, otherwise the element it names. A deletion is judged by the
    /// version it deleted.
    async fn filters_pass(&self, sub: &Subscription, c: &Change<'_>) -> Result<bool, String> {
        let (focus, seq) = match (&c.current, &c.previous, c.prev_seq) {
            (Some(cur), _, _) => (cur, c.v.seq),
            (None, Some(prev), Some(s)) => (prev, s),
            _ => return Ok(false),
        };
        for f in &sub.filters {
            if f.rtype.as_deref().is_some_and(|t| t != c.v.rtype) {
                continue;
            }
            let ok = match f.search(&c.v.rtype) {
                Some(q) => self.holds(q, c, seq).await?,
                None => f.matches_elements(focus),
            };
            if !ok {
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Whether a change is an event of a topic: a trigger whose FHIRPath
    /// criterion holds and whose `queryCriteria` (if any) hold, the
    /// previous test on the previous version and the current test on this
    /// one, each as the store stood when it was written.
    async fn topic_matches(&self, topic: &Topic, c: &Change<'_>) -> Result<bool, String> {
        let rtype = c.v.rtype.as_str();
        let triggered = topic.triggered(
            rtype,
            c.interaction,
            c.current.as_ref(),
            c.previous.as_ref(),
        );
        for t in triggered {
            let Some(qc) = &t.query else { return Ok(true) };
            let test = |text: &Option<String>| text.as_deref().map(|t| search_of(rtype, t));
            let previous = match (test(&qc.previous), c.prev_seq) {
                (None, _) => None,
                (Some(q), Some(s)) => Some(self.holds(q?, c, s).await?),
                (Some(_), None) => Some(qc.create_passes),
            };
            let current = match test(&qc.current) {
                None => None,
                Some(_) if c.v.deleted => Some(qc.delete_passes),
                Some(q) => Some(self.holds(q?, c, c.v.seq).await?),
            };
            if qc.decide(previous, current) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Subscriptions that collect events (not `off`), with their topics
    /// (none for a query-based one).
    fn active(&self) -> Vec<Served> {
        self.subs_list()
            .into_iter()
            .filter_map(|st| {
                let (sub, _, _) = st.current();
                if sub.status == "off" {
                    return None;
                }
                if sub.classic.is_some() {
                    return Some((st, sub, None));
                }
                let topic = self.topic(&sub.topic)?;
                Some((st, sub, Some(topic)))
            })
            .collect()
    }

    /// Writes the subscription's status (and error) as a new version;
    /// false when it was not written (a client changed it meanwhile, or the
    /// store refused).
    async fn set_status(&self, st: &SubState, status: &str, error: Option<&str>) -> bool {
        let (_, vid, body) = st.current();
        let mut body = (*body).clone();
        body["status"] = json!(status);
        match error {
            Some(e) => body["error"] = json!(e),
            None => {
                if let Some(o) = body.as_object_mut() {
                    o.remove("error");
                }
            }
        }
        if let Some(o) = body.as_object_mut() {
            o.remove("meta");
        }
        let Value::Object(map) = body.clone() else {
            return false;
        };
        let req = WriteRequest::Update {
            id: st.id.clone(),
            res: Prepared::new("Subscription".into(), map),
            if_match: Some(vid),
        };
        match self.store.write(req).await {
            Ok(fhirsync_store::WriteOutcome::Written { version, .. }) => {
                if let Ok(parsed) = Subscription::parse(&body) {
                    let mut cur = st.cur.lock().unwrap_or_else(|p| p.into_inner());
                    if version.vid > cur.1 {
                        *cur = (
                            Arc::new(parsed),
                            version.vid,
                            Arc::new(body_json(&version).unwrap_or(body)),
                        );
                    }
                }
                tracing::info!(subscription = %st.id, status, error, "subscription status");
                true
            }
            Ok(_) => false,
            // changed meanwhile by a client: its version wins, the matcher brings it
            Err(e) => {
                tracing::info!(subscription = %st.id, error = %e, "status not written");
                false
            }
        }
    }

    /// Sets the status; when that did not happen, waits a moment (the
    /// matcher brings the client's newer version) instead of spinning.
    /// False when stopped.
    async fn settle(&self, st: &SubState, status: &str, error: Option<&str>) -> bool {
        self.set_status(st, status, error).await || self.pause(Duration::from_millis(200)).await
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let min = self.cfg.retry_delay_ms_min;
        let ms = min
            .saturating_mul(1u64 << attempt.min(16))
            .min(self.cfg.retry_delay_ms_max);
        // jitter: up to a quarter less
        let j = (std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() as u64)
            .unwrap_or(0))
            % (ms / 4 + 1);
        Duration::from_millis(ms - j)
    }

    fn status_of<'a>(
        &'a self,
        sub: &'a Subscription,
        id: &'a str,
        kind: NoteKind,
        n: u64,
    ) -> Status<'a> {
        Status {
            base: &self.base,
            sub_id: id,
            topic: &sub.topic,
            status: &sub.status,
            kind,
            events_since_start: n,
            error: None,
        }
    }

    /// Sends the next event of a query-based (R4) subscription: a POST
    /// without a body to the endpoint, or with `application/fhir+json` a
    /// PUT of the version as stored to `endpoint/Type/id`.
    async fn deliver_classic(
        &self,
        st: &SubState,
        sub: &Subscription,
        num: u64,
    ) -> Result<(), String> {
        let Channel::RestHook { endpoint, headers } = &sub.channel else {
            return Err("query-based subscriptions use rest-hook channels".into());
        };
        let ev = self
            .store
            .sub_events(&st.id, num, num, 1)
            .await
            .map_err(|e| e.to_string())?
            .pop()
            .ok_or_else(|| format!("event {num} is not stored"))?;
        let timeout = Duration::from_secs(sub.timeout_s);
        if sub.payload == Payload::Empty {
            return self
                .channels
                .rest(reqwest::Method::POST, endpoint, headers, None, timeout)
                .await;
        }
        let body = self
            .store
            .vread(&ev.rtype, &ev.rid, ev.vid)
            .await
            .map_err(|e| e.to_string())?
            .and_then(|v| v.body)
            .ok_or_else(|| format!("{}/{}/_history/{} is not stored", ev.rtype, ev.rid, ev.vid))?;
        let url = format!("{}/{}/{}", endpoint.trim_end_matches('/'), ev.rtype, ev.rid);
        self.channels
            .rest(
                reqwest::Method::PUT,
                &url,
                headers,
                Some(body.as_bytes().to_vec()),
                timeout,
            )
            .await
    }

    /// Builds and sends the next notification; `Ok(false)` when nothing
    /// was pending.
    async fn deliver_next(&self, st: &SubState, sub: &Subscription) -> Result<bool, String> {
        let (sent, total) = (st.sent.load(Relaxed), st.events.load(Relaxed));
        if sent >= total {
            return Ok(false);
        }
        if sub.classic.is_some() {
            self.deliver_classic(st, sub, sent + 1).await?;
            st.delivered.fetch_add(1, Relaxed);
            st.sent.store(sent + 1, Relaxed);
            self.store_sent(st, false).await;
            return Ok(true);
        }
        let evs = self
            .store
            .sub_events(&st.id, sent + 1, total, sub.max_count)
            .await
            .map_err(|e| e.to_string())?;
        let Some(last) = evs.last().map(|e| e.num) else {
            return Ok(false);
        };
        let mut out = Vec::with_capacity(evs.len());
        for e in evs {
            let body = if sub.payload == fhirsync_core::subscription::Payload::Full && !e.deleted {
                self.store
                    .vread(&e.rtype, &e.rid, e.vid)
                    .await
                    .map_err(|e| e.to_string())?
                    .and_then(|v| body_json(&v))
            } else {
                None
            };
            out.push(Event {
                num: e.num,
                at_ms: e.at_ms,
                rtype: e.rtype,
                id: e.rid,
                vid: e.vid,
                deleted: e.deleted,
                body,
            });
        }
        let status = self.status_of(sub, &st.id, NoteKind::EventNotification, last);
        let bundle = notification_bundle(&status, &out, sub.payload, now_ms());
        let body = serde_json::to_vec(&bundle).map_err(|e| e.to_string())?;
        let timeout = Duration::from_secs(sub.timeout_s);
        self.channels
            .send(&sub.channel, body, &format!("{}:{}", st.id, last), timeout)
            .await?;
        st.delivered.fetch_add(out.len() as u64, Relaxed);
        st.sent.store(last, Relaxed);
        self.store_sent(st, false).await;
        Ok(true)
    }

    /// Stores the delivery cursor when it is due: at most every
    /// `SENT_STORE_EVERY` (an idle worker stores it when that time is up),
    /// so a crash repeats at most that much: delivery is at least once.
    async fn store_sent(&self, st: &SubState, force: bool) {
        let sent = st.sent.load(Relaxed);
        let (stored, at) = *st.stored.lock().unwrap_or_else(|p| p.into_inner());
        if sent == stored || !(force || at.elapsed() >= SENT_STORE_EVERY) {
            return;
        }
        let w = SyncWrite::SetCursor {
            key: sub_sent_key(&st.id),
            seq: sent,
            audit: None,
        };
        match self.store.write(WriteRequest::Sync(w)).await {
            Ok(_) => {
                *st.stored.lock().unwrap_or_else(|p| p.into_inner()) =
                    (sent, std::time::Instant::now())
            }
            Err(e) => {
                tracing::warn!(subscription = %st.id, error = %e, "cannot store the delivery cursor")
            }
        }
    }

    async fn send_kind(
        &self,
        st: &SubState,
        sub: &Subscription,
        kind: NoteKind,
    ) -> Result<(), String> {
        let n = st.events.load(Relaxed);
        let status = self.status_of(sub, &st.id, kind, n);
        let bundle = notification_bundle(&status, &[], sub.payload, now_ms());
        let body = serde_json::to_vec(&bundle).map_err(|e| e.to_string())?;
        let id = format!("{}:{}:{}", st.id, kind.code(), now_ms());
        self.channels
            .send(&sub.channel, body, &id, Duration::from_secs(sub.timeout_s))
            .await
    }

    /// Why a subscription cannot be served, before any attempt.
    fn refusal(&self, sub: &Subscription) -> Option<String> {
        if sub.problem.is_some() || sub.classic.is_some() {
            return sub.problem.clone();
        }
        let Some(topic) = self.topic(&sub.topic) else {
            return Some(format!("no SubscriptionTopic with url {}", sub.topic));
        };
        if let Err(e) = sub.check_filters(&topic) {
            return Some(e);
        }
        if let fhirsync_core::subscription::Channel::Nats { connection, .. } = &sub.channel {
            if !self.channels.has_connection(connection.as_deref()) {
                return Some(match connection {
                    Some(c) => format!("no NATS connection named '{c}' in [[subscriptions.nats]]"),
                    None => "no NATS connection: configure [nats] or name one with nats-connection"
                        .into(),
                });
            }
        }
        None
    }

    async fn run_worker(self: Arc<Self>, st: Arc<SubState>) {
        let mut stop = self.stop.subscribe();
        let mut attempts: u32 = 0;
        let mut last_vid = 0;
        let mut last_send = tokio::time::Instant::now();
        loop {
            if self.stopped() {
                return;
            }
            let (sub, vid, _) = st.current();
            if vid != last_vid {
                attempts = 0;
                last_vid = vid;
            }
            let result: Result<bool, String> = match sub.status.as_str() {
                "requested" => match self.refusal(&sub) {
                    Some(why) => {
                        if !self.settle(&st, "error", Some(&why)).await {
                            return;
                        }
                        continue;
                    }
                    // R4's query-based subscriptions have no handshake
                    None if sub.classic.is_some() => {
                        if !self.settle(&st, "active", None).await {
                            return;
                        }
                        continue;
                    }
                    None => match self.send_kind(&st, &sub, NoteKind::Handshake).await {
                        Ok(()) => {
                            if !self.settle(&st, "active", None).await {
                                return;
                            }
                            last_send = tokio::time::Instant::now();
                            continue;
                        }
                        Err(e) => Err(e),
                    },
                },
                "active" => match self.refusal(&sub) {
                    Some(why) => {
                        if !self.settle(&st, "error", Some(&why)).await {
                            return;
                        }
                        continue;
                    }
                    None => self.deliver_next(&st, &sub).await,
                },
                _ => Ok(false),
            };
            match result {
                Ok(true) => {
                    attempts = 0;
                    last_send = tokio::time::Instant::now();
                    *st.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                }
                Ok(false) => {
                    let heartbeat = (sub.status == "active")
                        .then_some(sub.heartbeat_s)
                        .flatten();
                    let beat_due = heartbeat.map(|h| last_send + Duration::from_secs(h));
                    let unstored =
                        st.sent.load(Relaxed) != st.stored.lock().map(|s| s.0).unwrap_or(0);
                    let now = tokio::time::Instant::now();
                    let mut wait = match beat_due {
                        Some(d) => d.saturating_duration_since(now),
                        None => Duration::from_secs(3600),
                    };
                    if unstored {
                        wait = wait.min(SENT_STORE_EVERY);
                    }
                    let timer = tokio::select! {
                        _ = st.wake.notified() => false,
                        _ = tokio::time::sleep(wait) => true,
                        _ = stop.wait_for(|s| *s) => return,
                    };
                    if timer {
                        if unstored {
                            self.store_sent(&st, true).await;
                        }
                        if beat_due.is_some_and(|d| d <= tokio::time::Instant::now()) {
                            match self.send_kind(&st, &sub, NoteKind::Heartbeat).await {
                                Ok(()) => last_send = tokio::time::Instant::now(),
                                Err(e) => {
                                    tracing::warn!(subscription = %st.id, error = %e, "heartbeat failed")
                                }
                            }
                        }
                    }
                }
                Err(e) => {
                    attempts += 1;
                    st.errors.fetch_add(1, Relaxed);
                    tracing::warn!(subscription = %st.id, attempt = attempts, error = %e, "delivery failed");
                    *st.last_error.lock().unwrap_or_else(|p| p.into_inner()) = Some(e.clone());
                    if attempts >= self.cfg.retry_max {
                        let why = format!("{e} ({attempts} attempts)");
                        if !self.settle(&st, "error", Some(&why)).await {
                            return;
                        }
                        continue;
                    }
                    let d = self.backoff(attempts - 1);
                    tokio::select! {
                        _ = tokio::time::sleep(d) => {}
                        _ = stop.wait_for(|s| *s) => return,
                    }
                }
            }
        }
    }
}

fn now_ms() -> u64 {
    fhirsync_core::clock::Clock::now_ms(&fhirsync_core::clock::SystemClock)
}

#[async_trait]
impl SyncAgent for Notifier {
    async fn edges(&self) -> Vec<Value> {
        let mut out: Vec<Value> = self
            .inner
            .subs_list()
            .iter()
            .map(|st| {
                let (sub, vid, body) = st.current();
                json!({
                    "name": format!("subscription:{}", st.id),
                    "kind": "subscription",
                    "status": sub.status,
                    "error": body.get("error"),
                    "version": vid,
                    "topic": sub.topic,
                    "eventsSinceStart": st.events.load(Relaxed),
                    "eventsSent": st.sent.load(Relaxed),
                    "delivered": st.delivered.load(Relaxed),
                    "errors": st.errors.load(Relaxed),
                    "lastError": st.last_error.lock().ok().and_then(|e| e.clone()),
                })
            })
            .collect();
        out.sort_by(|a, b| a["name"].as_str().cmp(&b["name"].as_str()));
        out.push(json!({
            "name": "subscriptions",
            "kind": "matcher",
            "matchedSeq": self.matched_seq(),
            "lastSeq": self.inner.store.last_seq(),
        }));
        out
    }

    fn owns(&self, _edge: &str) -> bool {
        false
    }

    async fn retry(&self, _letter: &DeadLetter) -> Result<(), (u16, String)> {
        Err((400, "subscriptions keep no dead letters".into()))
    }

    fn counters(&self) -> Vec<EdgeCounters> {
        let mut rows: Vec<EdgeCounters> = self
            .inner
            .subs_list()
            .iter()
            .map(|st| EdgeCounters {
                edge: format!("subscription:{}", st.id),
                direction: "notify".into(),
                lag: st
                    .events
                    .load(Relaxed)
                    .saturating_sub(st.sent.load(Relaxed)),
                applied: st.delivered.load(Relaxed),
                errors: st.errors.load(Relaxed),
                ..Default::default()
            })
            .collect();
        rows.push(EdgeCounters {
            edge: "subscriptions".into(),
            direction: "match".into(),
            lag: self
                .inner
                .store
                .last_seq()
                .saturating_sub(self.matched_seq()),
            ..Default::default()
        });
        rows.sort_by(|a, b| a.edge.cmp(&b.edge));
        rows
    }
}
