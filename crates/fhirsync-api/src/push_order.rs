//! The order of a child's pipelined pushes. A child may send the next
//! `$apply` batch before the answer to the one before comes back, naming its
//! push stream and the batch's number in it. The batches of a stream are
//! applied in their numbers' order, and those that wait while the writer
//! stores the ones before are stored together, in one write request (up to
//! [`PUSH_COMBINE_MAX`] versions); each batch still gets its own answer.
//! After a batch that stopped (a refused entry, an error) every later
//! batch of that stream is refused with 409, and the child sends again from
//! its cursor under a new stream. A stream starts with its batch 0 (the
//! child sends batch 1 only once batch 0 was answered), and a node keeps
//! [`PUSH_STREAMS_MAX`] streams per child, the least recently used going
//! first; a later batch of a stream not kept is refused (409) at once.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use fhirsync_core::replicate::Policy;
use fhirsync_store::{
    Applied, ApplyReport, ApplyRequest, Direction, RemoteVersion, Store, WriteOutcome, WriteRequest,
};
use tokio::sync::oneshot;

use crate::ApiError;

/// Extension of an `$apply` Bundle naming the child's push stream
/// (`valueString`).
pub const STREAM_EXTENSION: &str = "push-stream";
/// Extension of an `$apply` Bundle numbering the batch in its stream
/// (`valueInteger`, from 0).
pub const BATCH_EXTENSION: &str = "push-batch";
/// `$apply` answer parameter saying this node keeps the order of push
/// streams (a child pipelines its pushes only to a parent that says so).
pub const ORDER_PARAMETER: &str = "push-order";

/// Longest a batch waits for its turn (for the batches before it to
/// arrive); a batch already being stored is waited for however long.
pub const PUSH_ORDER_WAIT: Duration = Duration::from_secs(10);

/// Longest push stream id a child may name.
pub const PUSH_STREAM_ID_MAX: usize = 64;

/// Push streams kept per child (a child uses one at a time; the ones
/// before it may still have requests on their way).
pub const PUSH_STREAMS_MAX: usize = 4;

/// Most batches of one stream waiting for their turn; one more is refused
/// (429), so a child cannot make this node hold batches without end.
pub const PUSH_WAITING_MAX: usize = 16;

/// Most versions of waiting batches stored in one write request.
pub const PUSH_COMBINE_MAX: usize = 4_000;

/// One batch of a stream, as read from its request.
pub struct Batch {
    pub policy: Policy,
    /// The versions up to the first entry that cannot be applied.
    pub versions: Vec<RemoteVersion>,
    /// That entry's status and reason: the stream stops after this batch.
    pub refused: Option<(u16, String)>,
}

/// What became of a batch: the report of its own versions.
type Outcome = Result<ApplyReport, ApiError>;

struct Waiting {
    batch: Batch,
    reply: oneshot::Sender<Outcome>,
}

/// Where one child's current stream is.
struct Stream {
    id: String,
    /// The batch to store next.
    next: u64,
    /// Batches are being stored.
    running: bool,
    /// A batch stopped: nothing later in this stream is stored.
    broken: bool,
    /// Batches that arrived before their turn.
    queue: BTreeMap<u64, Waiting>,
    /// When a batch of it last arrived.
    used: Instant,
}

type Streams = HashMap<String, Vec<Stream>>;

/// The child's stream `id`, made if new (and the child's least recently
/// used one dropped, past [`PUSH_STREAMS_MAX`]).
fn stream_new<'a>(streams: &'a mut Streams, child: &str, id: &str) -> &'a mut Stream {
    let list = streams.entry(child.to_owned()).or_default();
    let i = match list.iter().position(|s| s.id == id) {
        Some(i) => i,
        None => {
            if list.len() >= PUSH_STREAMS_MAX {
                if let Some(old) = list
                    .iter()
                    .enumerate()
                    .min_by_key(|(_, s)| s.used)
                    .map(|(i, _)| i)
                {
                    let gone = list.swap_remove(old);
                    for (_, w) in gone.queue {
                        let _ = w.reply.send(Err(superseded(&gone.id)));
                    }
                }
            }
            list.push(Stream {
                id: id.to_owned(),
                next: 0,
                running: false,
                broken: false,
                queue: BTreeMap::new(),
                used: Instant::now(),
            });
            list.len() - 1
        }
    };
    &mut list[i]
}

/// The child's stream `id`, if kept.
fn stream_kept<'a>(streams: &'a mut Streams, child: &str, id: &str) -> Option<&'a mut Stream> {
    streams.get_mut(child)?.iter_mut().find(|s| s.id == id)
}

/// Each child's recent push streams.
pub struct PushOrder {
    streams: Mutex<Streams>,
    /// [`PUSH_ORDER_WAIT`], shorter in tests.
    wait: Duration,
}

impl Default for PushOrder {
    fn default() -> Self {
        PushOrder {
            streams: Mutex::default(),
            wait: PUSH_ORDER_WAIT,
        }
    }
}

impl std::fmt::Debug for PushOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PushOrder")
            .field("children", &self.lock().len())
            .finish()
    }
}

fn conflict(why: String) -> ApiError {
    ApiError::new(409, "conflict", why)
}

fn stopped(stream: &str) -> ApiError {
    conflict(format!(
        "an earlier batch of push stream {stream} stopped; send again from the cursor"
    ))
}

impl PushOrder {
    /// Stores batch `n` of `child`'s `stream` in its turn, through `store`;
    /// the report of its versions, or why they were not stored.
    pub async fn apply(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        child: &str,
        stream: &str,
        n: u64,
        batch: Batch,
    ) -> Outcome {
        if stream.is_empty() || stream.len() > PUSH_STREAM_ID_MAX {
            return Err(ApiError::bad_request(format!(
                "a push stream id has 1 to {PUSH_STREAM_ID_MAX} characters"
            )));
        }
        let (reply, mut rx) = oneshot::channel();
        {
            let mut streams = self.lock();
            // A child sends batch 1 only once batch 0 was answered: a later
            // batch of a stream not kept here is from before this node
            // restarted, or from a stream the child gave up.
            let s = match n {
                0 => stream_new(&mut streams, child, stream),
                _ => stream_kept(&mut streams, child, stream).ok_or_else(|| superseded(stream))?,
            };
            s.used = Instant::now();
            if s.broken {
                return Err(stopped(stream));
            }
            if s.queue.len() >= PUSH_WAITING_MAX {
                return Err(ApiError::new(
                    429,
                    "throttled",
                    format!(
                        "{PUSH_WAITING_MAX} batches of push stream {stream} are already waiting"
                    ),
                ));
            }
            if n < s.next || s.queue.contains_key(&n) {
                return Err(conflict(format!(
                    "batch {n} of push stream {stream} came twice"
                )));
            }
            s.queue.insert(n, Waiting { batch, reply });
        }
        self.kick(store, child, stream);
        tokio::select! {
            r = &mut rx => return r.unwrap_or_else(|_| Err(superseded(stream))),
            _ = tokio::time::sleep(self.wait) => {}
        }
        // Still waiting for its turn: it gives up; once taken, it is
        // waited for.
        let gave_up = stream_kept(&mut self.lock(), child, stream)
            .is_some_and(|s| s.queue.remove(&n).is_some());
        if gave_up {
            return Err(conflict(format!(
                "batch {n} of push stream {stream} waited {} ms for the batches before it",
                self.wait.as_millis()
            )));
        }
        rx.await.unwrap_or_else(|_| Err(superseded(stream)))
    }

    fn lock(&self) -> MutexGuard<'_, Streams> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts storing the batches of the child's `stream` whose turn it
    /// is, unless some are being stored.
    fn kick(self: &Arc<Self>, store: &Arc<dyn Store>, child: &str, stream: &str) {
        let (id, taken) = {
            let mut streams = self.lock();
            let Some(s) = stream_kept(&mut streams, child, stream) else {
                return;
            };
            if s.running || s.broken {
                return;
            }
            let mut taken: Vec<(u64, Waiting)> = Vec::new();
            let mut versions = 0;
            while let Some(e) = s.queue.first_entry() {
                let first = taken.first().map(|(_, w)| w.batch.policy);
                let fits = taken.is_empty()
                    || (versions + e.get().batch.versions.len() <= PUSH_COMBINE_MAX
                        && first == Some(e.get().batch.policy));
                if *e.key() != s.next + taken.len() as u64 || !fits {
                    break;
                }
                let (n, w) = e.remove_entry();
                versions += w.batch.versions.len();
                let last = w.batch.refused.is_some();
                taken.push((n, w));
                if last {
                    break;
                }
            }
            if taken.is_empty() {
                return;
            }
            s.running = true;
            (s.id.clone(), taken)
        };
        let (order, store, child) = (self.clone(), store.clone(), child.to_owned());
        // Its own task: a request dropped midway does not leave the
        // batches it took unanswered.
        tokio::spawn(async move {
            let last = taken.last().map_or(0, |(n, _)| *n);
            let whole = store_together(&store, &child, &id, taken).await;
            {
                let mut streams = order.lock();
                if let Some(s) = stream_kept(&mut streams, &child, &id) {
                    s.running = false;
                    if whole {
                        s.next = last + 1;
                    } else {
                        s.broken = true;
                        for (_, w) in std::mem::take(&mut s.queue) {
                            let _ = w.reply.send(Err(stopped(&id)));
                        }
                    }
                }
            }
            order.kick(&store, &child, &id);
        });
    }
}

fn superseded(stream: &str) -> ApiError {
    conflict(format!(
        "push stream {stream} is not kept here (this node restarted, or more recent streams of this child came); send again from the cursor"
    ))
}

/// Stores versions a child pushed, in one transaction.
pub(crate) async fn store_push(
    store: &Arc<dyn Store>,
    child: &str,
    policy: Policy,
    versions: Vec<RemoteVersion>,
) -> Result<ApplyReport, ApiError> {
    let out = store
        .write(WriteRequest::Apply(Box::new(ApplyRequest {
            edge: child.to_owned(),
            direction: Direction::Push,
            peer: child.to_owned(),
            policy,
            versions,
            cursor: None,
            dead_letters: Vec::new(),
            record_peer: true,
        })))
        .await?;
    match out {
        WriteOutcome::Applied(rep) => Ok(rep),
        _ => Err(ApiError::new(500, "exception", "unexpected write outcome")),
    }
}

/// Stores the batches in one write request and answers each; `true` when
/// every one was stored in full.
async fn store_together(
    store: &Arc<dyn Store>,
    child: &str,
    stream: &str,
    taken: Vec<(u64, Waiting)>,
) -> bool {
    let policy = taken
        .first()
        .map_or(Policy::Manual, |(_, w)| w.batch.policy);
    let mut versions = Vec::with_capacity(taken.iter().map(|(_, w)| w.batch.versions.len()).sum());
    let mut parts = Vec::with_capacity(taken.len());
    for (_, w) in taken {
        parts.push((w.batch.versions.len(), w.batch.refused, w.reply));
        versions.extend(w.batch.versions);
    }
    let mut results = match store_push(store, child, policy, versions).await {
        Ok(rep) => rep.results.into_iter(),
        Err(e) => {
            for (_, _, reply) in parts {
                let _ = reply.send(Err(ApiError::new(
                    e.status.as_u16(),
                    e.code,
                    e.diagnostics.clone(),
                )));
            }
            return false;
        }
    };
    let mut whole = true;
    for (len, refused, reply) in parts {
        if !whole {
            let _ = reply.send(Err(stopped(stream)));
            continue;
        }
        let mut rep = ApplyReport::default();
        for a in results.by_ref().take(len) {
            match &a {
                Applied::Stored => rep.stored += 1,
                Applied::Skipped => rep.skipped += 1,
                Applied::Conflict { .. } => rep.conflicts += 1,
                Applied::Failed { .. } => whole = false,
            }
            rep.results.push(a);
            if !whole {
                break;
            }
        }
        whole &= rep.results.len() == len && refused.is_none();
        let _ = reply.send(Ok(rep));
    }
    whole
}

#[cfg(test)]
mod tests {
    use super::*;

    fn empty() -> Batch {
        Batch {
            policy: Policy::Manual,
            versions: Vec::new(),
            refused: None,
        }
    }

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        use fhirsync_store::sqlite::{SqliteConfig, SqliteStore};
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(SqliteConfig::new(SqliteStore::db_path(dir.path()))).unwrap();
        (dir, Arc::new(s))
    }

    #[tokio::test]
    async fn a_batch_waits_for_the_one_before_and_a_stop_refuses_the_rest() {
        let (o, (_dir, s)) = (Arc::new(PushOrder::default()), store());
        // A stream not started here: refused at once.
        let e = o.apply(&s, "c", "s", 1, empty()).await.unwrap_err();
        assert!(e.diagnostics.contains("not kept"), "{}", e.diagnostics);
        o.apply(&s, "c", "s", 0, empty()).await.unwrap();
        let (o1, s1) = (o.clone(), s.clone());
        let third = tokio::spawn(async move { o1.apply(&s1, "c", "s", 2, empty()).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!third.is_finished(), "batch 2 went before batch 1");
        o.apply(&s, "c", "s", 1, empty()).await.unwrap();
        third.await.unwrap().unwrap();
        // Batch 3 is refused: batch 4 after it is not stored.
        let mut refused = empty();
        refused.refused = Some((422, "bad".into()));
        let rep = o.apply(&s, "c", "s", 3, refused).await.unwrap();
        assert!(rep.results.is_empty());
        let e = o.apply(&s, "c", "s", 4, empty()).await.unwrap_err();
        assert_eq!(e.status.as_u16(), 409);
        assert!(e.diagnostics.contains("stopped"), "{}", e.diagnostics);
        // Another stream is its own, and so are another child's.
        o.apply(&s, "c", "t", 0, empty()).await.unwrap();
        o.apply(&s, "c", "t", 1, empty()).await.unwrap();
        assert_eq!(
            o.apply(&s, "c", "t", 1, empty())
                .await
                .unwrap_err()
                .status
                .as_u16(),
            409
        );
        o.apply(&s, "d", "s", 0, empty()).await.unwrap();
        // Past PUSH_STREAMS_MAX streams, the least recently used goes, with
        // the batches waiting in it.
        o.apply(&s, "c", "old", 0, empty()).await.unwrap();
        let (o1, s1) = (o.clone(), s.clone());
        let waiting = tokio::spawn(async move { o1.apply(&s1, "c", "old", 2, empty()).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        for i in 0..PUSH_STREAMS_MAX {
            o.apply(&s, "c", &format!("new{i}"), 0, empty())
                .await
                .unwrap();
        }
        let e = waiting.await.unwrap().unwrap_err();
        assert!(e.diagnostics.contains("not kept"), "{}", e.diagnostics);
    }

    #[tokio::test]
    async fn a_batch_whose_predecessor_never_comes_is_refused_after_the_wait() {
        let o = Arc::new(PushOrder {
            wait: Duration::from_millis(200),
            ..PushOrder::default()
        });
        let (_dir, s) = store();
        o.apply(&s, "c", "s", 0, empty()).await.unwrap();
        let e = o.apply(&s, "c", "s", 2, empty()).await.unwrap_err();
        assert_eq!(e.status.as_u16(), 409);
        assert!(e.diagnostics.contains("waited"), "{}", e.diagnostics);
        // Batch 1 comes late: its turn is still open.
        o.apply(&s, "c", "s", 1, empty()).await.unwrap();
        // No more than PUSH_WAITING_MAX batches wait.
        let mut waiting = Vec::new();
        for n in 0..PUSH_WAITING_MAX as u64 {
            let (o, s) = (o.clone(), s.clone());
            waiting.push(tokio::spawn(async move {
                o.apply(&s, "c", "s", 3 + n, empty()).await
            }));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let e = o.apply(&s, "c", "s", 100, empty()).await.unwrap_err();
        assert_eq!(e.status.as_u16(), 429, "{}", e.diagnostics);
        for w in waiting {
            assert_eq!(w.await.unwrap().unwrap_err().status.as_u16(), 409);
        }
        let long = "x".repeat(PUSH_STREAM_ID_MAX + 1);
        assert_eq!(
            o.apply(&s, "c", &long, 0, empty())
                .await
                .unwrap_err()
                .status
                .as_u16(),
            400
        );
    }
}
