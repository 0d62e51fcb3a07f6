//! A deterministic simulation of a tree of nodes in one process: real
//! SQLite stores and the real apply path (change records in their wire
//! form, `Store::write` with the edge's cursors), driven one step at a time
//! by one seeded random source. Steps: local writes, deletes and edits
//! that become concurrent, conflict resolutions, pulls and pushes over a
//! simulated network that drops, delays, reorders and duplicates messages
//! and cuts links, crashes (a store closed and opened again: what was in
//! flight to it arrives stale or not at all), and injected clocks with
//! skew. Invariants are checked after every step and after healing; an
//! error names the seed and the step, and the same seed replays the same
//! run exactly.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;

use fhirsync_core::clock::ManualClock;
use fhirsync_core::replicate::Policy;
use fhirsync_core::validate::Mode;
use fhirsync_core::{Causality, VersionVector};
use fhirsync_store::replica::cursor_key;
use fhirsync_store::sqlite::{SqliteConfig, SqliteStore, SyncMode};
use fhirsync_store::sync::change_entry_text;
use fhirsync_store::{
    ApplyRequest, ChangesQuery, Direction, ListQuery, Prepared, RemoteVersion, Resolution, Store,
    StoredVersion, SyncWrite, WriteOutcome, WriteRequest,
};
use serde_json::{json, Value};

use crate::gen::Rng;

/// Change records per pull page or push batch.
const PAGE: usize = 8;
/// The edge name a child's cursors and conflicts carry.
const PARENT_EDGE: &str = "parent";
/// Sync rounds healing may take before it counts as no convergence.
const HEAL_ROUNDS_MAX: usize = 200;
/// Resolution passes after healing (each resolves every open conflict).
const RESOLVE_PASSES_MAX: usize = 10;

/// One simulated run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    pub seed: u64,
    pub steps: usize,
    /// Each node's parent (by index); `None`: the root.
    pub tree: Vec<Option<usize>>,
    pub policy: Policy,
    /// Where the nodes' databases go (a fresh directory).
    pub dir: PathBuf,
    /// Distinct resources written (few: edits collide).
    pub ids: u64,
}

impl SimConfig {
    /// A root, two districts and three clinics (two levels below the root),
    /// 300 steps, the policy chosen by the seed.
    pub fn new(seed: u64, dir: PathBuf) -> SimConfig {
        let policies = [Policy::Manual, Policy::HlcLww, Policy::Merge];
        SimConfig {
            seed,
            steps: 300,
            tree: vec![None, Some(0), Some(0), Some(1), Some(1), Some(2)],
            policy: policies[(seed % 3) as usize],
            dir,
            ids: 12,
        }
    }
}

/// What a finished run held, to compare two runs of one seed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// `Type/id` → (content hash, vector) at every node (all equal).
    pub state: BTreeMap<String, (Option<u128>, String)>,
    pub writes: usize,
    pub conflicts: u64,
    pub crashes: usize,
    pub dropped: usize,
}

enum Msg {
    /// The parent's answer to a pull since `since`.
    Page {
        child: usize,
        since: u64,
        next: u64,
        entries: Vec<String>,
    },
    /// A child's push of its log in (since, upto].
    Push {
        child: usize,
        since: u64,
        upto: u64,
        entries: Vec<String>,
    },
    /// The parent took a push whole.
    Ack { child: usize, since: u64, upto: u64 },
}

impl Msg {
    fn child(&self) -> usize {
        match self {
            Msg::Page { child, .. } | Msg::Push { child, .. } | Msg::Ack { child, .. } => *child,
        }
    }
}

struct Node {
    id: String,
    parent: Option<usize>,
    skew_ms: i64,
    clock: Arc<ManualClock>,
    path: PathBuf,
    store: Option<SqliteStore>,
}

/// A local write the node acknowledged: no later state may lose it.
struct Acked {
    key: (String, String),
    vv: VersionVector,
    at: String,
}

pub struct Sim {
    cfg: SimConfig,
    rng: Rng,
    nodes: Vec<Node>,
    net: Vec<Msg>,
    /// Children whose link to their parent is cut.
    down: BTreeSet<usize>,
    now_ms: u64,
    acked: Vec<Acked>,
    step: usize,
    /// The last steps, for a failure's report.
    trace: Vec<String>,
    outcome: Outcome,
}

type SimResult<T> = Result<T, String>;

fn err<E: std::fmt::Display>(what: &str) -> impl Fn(E) -> String + '_ {
    move |e| format!("{what}: {e}")
}

impl Sim {
    pub fn new(cfg: SimConfig) -> SimResult<Sim> {
        let mut rng = Rng::new(cfg.seed);
        let now_ms = 1_800_000_000_000;
        let mut nodes = Vec::new();
        for (i, parent) in cfg.tree.iter().enumerate() {
            // Clocks up to five minutes apart.
            let skew_ms = rng.below(600_000) as i64 - 300_000;
            let clock = Arc::new(ManualClock::new((now_ms as i64 + skew_ms) as u64));
            nodes.push(Node {
                id: format!("n{i}"),
                parent: *parent,
                skew_ms,
                clock,
                path: cfg.dir.join(format!("n{i}.db")),
                store: None,
            });
        }
        let mut sim = Sim {
            rng,
            nodes,
            net: Vec::new(),
            down: BTreeSet::new(),
            now_ms,
            acked: Vec::new(),
            step: 0,
            trace: Vec::new(),
            outcome: Outcome {
                state: BTreeMap::new(),
                writes: 0,
                conflicts: 0,
                crashes: 0,
                dropped: 0,
            },
            cfg,
        };
        for i in 0..sim.nodes.len() {
            sim.open(i)?;
        }
        Ok(sim)
    }

    fn open(&mut self, i: usize) -> SimResult<()> {
        let n = &mut self.nodes[i];
        let mut c = SqliteConfig::new(n.path.clone());
        c.node_id = Some(n.id.clone());
        // A crash here is the process's, not the machine's: the WAL's
        // commits survive it without an fsync each.
        c.sync = SyncMode::Normal;
        n.store = Some(SqliteStore::open_with_clock(c, n.clock.clone()).map_err(err("open"))?);
        Ok(())
    }

    fn store(&self, i: usize) -> &SqliteStore {
        self.nodes[i].store.as_ref().expect("open")
    }

    fn note(&mut self, s: String) {
        if self.trace.len() == 40 {
            self.trace.remove(0);
        }
        self.trace.push(format!("step {}: {s}", self.step));
    }

    fn fail(&self, why: String) -> String {
        format!(
            "seed {} failed at step {} ({}): {why}\nlast steps:\n  {}",
            self.cfg.seed,
            self.step,
            self.cfg.policy,
            self.trace.join("\n  ")
        )
    }

    fn children(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].parent.is_some())
            .collect()
    }

    /// Runs the steps, heals, checks; the run's outcome.
    pub async fn run(mut self) -> SimResult<Outcome> {
        for s in 0..self.cfg.steps {
            self.step = s;
            self.tick();
            self.one_step().await.map_err(|e| self.fail(e))?;
            self.check_cursors().await.map_err(|e| self.fail(e))?;
        }
        self.step = self.cfg.steps;
        self.heal().await.map_err(|e| self.fail(e))?;
        self.check_open_conflicts_per_edge()
            .await
            .map_err(|e| self.fail(e))?;
        self.resolve_all().await.map_err(|e| self.fail(e))?;
        self.check_final().await.map_err(|e| self.fail(e))?;
        for n in &self.nodes {
            if let Some(s) = &n.store {
                s.shutdown();
            }
        }
        Ok(self.outcome)
    }

    fn tick(&mut self) {
        self.now_ms += self.rng.below(40);
        for n in &self.nodes {
            n.clock.set((self.now_ms as i64 + n.skew_ms) as u64);
        }
    }

    async fn one_step(&mut self) -> SimResult<()> {
        let n = self.nodes.len() as u64;
        let children = self.children();
        let node = self.rng.below(n) as usize;
        match self.rng.below(100) {
            0..=29 => self.write(node).await,
            30..=41 => {
                let c = *self.rng.pick(&children);
                self.pull(c).await
            }
            42..=53 => {
                let c = *self.rng.pick(&children);
                self.push(c).await
            }
            54..=85 => self.deliver_one().await,
            86..=89 => {
                let c = *self.rng.pick(&children);
                if !self.down.remove(&c) {
                    self.down.insert(c);
                }
                self.note(format!(
                    "link of n{c} {}",
                    if self.down.contains(&c) { "cut" } else { "up" }
                ));
                Ok(())
            }
            90..=93 => self.resolve_one(node).await,
            _ => self.crash(node),
        }
    }

    /// A local edit of one element, a create, or a delete.
    async fn write(&mut self, i: usize) -> SimResult<()> {
        let id = format!("p{}", self.rng.below(self.cfg.ids));
        let cur = self
            .store(i)
            .read("Patient", &id)
            .await
            .map_err(err("read"))?
            .and_then(|v| v.body);
        let req = if cur.is_some() && self.rng.below(8) == 0 {
            WriteRequest::Delete {
                rtype: "Patient".into(),
                id: id.clone(),
                if_match: None,
            }
        } else {
            let mut r: Value = match &cur {
                Some(b) => serde_json::from_str(b).map_err(err("stored body"))?,
                None => json!({"resourceType": "Patient", "id": id}),
            };
            let v = self.rng.below(1000);
            match self.rng.below(5) {
                0 => r["gender"] = json!(["male", "female", "other"][(v % 3) as usize]),
                1 => r["birthDate"] = json!(format!("19{:02}-01-01", v % 100)),
                2 => r["name"] = json!([{"family": format!("F{v}")}]),
                3 => {
                    let t = r["telecom"].as_array().cloned().unwrap_or_default();
                    let mut t = t;
                    t.push(json!({"system": "phone", "value": format!("07{v}")}));
                    r["telecom"] = json!(t);
                }
                _ => r["active"] = json!(v.is_multiple_of(2)),
            }
            let map = r.as_object().cloned().unwrap_or_default();
            WriteRequest::Update {
                id: id.clone(),
                res: Prepared::new("Patient".into(), map),
                if_match: None,
            }
        };
        let out = self.store(i).write(req).await.map_err(err("write"))?;
        let v = match out {
            WriteOutcome::Written { version, .. } => Some(version),
            WriteOutcome::Deleted { version } => version,
            _ => None,
        };
        if let Some(v) = v {
            self.ack(i, &v);
            self.note(format!("n{i} wrote Patient/{id} {}", v.vv.to_json()));
        }
        Ok(())
    }

    fn ack(&mut self, i: usize, v: &StoredVersion) {
        self.outcome.writes += 1;
        self.acked.push(Acked {
            key: (v.rtype.clone(), v.id.clone()),
            vv: v.vv.clone(),
            at: format!("n{i} step {}", self.step),
        });
    }

    async fn cursor(&self, i: usize, dir: Direction) -> SimResult<u64> {
        Ok(self
            .store(i)
            .cursor(&cursor_key(PARENT_EDGE, dir))
            .await
            .map_err(err("cursor"))?
            .unwrap_or(0))
    }

    /// A page of `from`'s log past `since` without what came from `to`,
    /// and the cursor that follows it.
    async fn page(&self, from: usize, to: usize, since: u64) -> SimResult<(Vec<String>, u64)> {
        let s = self.store(from);
        let rows = s
            .changes(ChangesQuery {
                since,
                count: PAGE,
                types: Vec::new(),
                exclude_via: Some(self.nodes[to].id.clone()),
            })
            .await
            .map_err(err("changes"))?;
        let next = match rows.last() {
            Some(v) if rows.len() >= PAGE => v.seq,
            _ => s.last_seq().max(since),
        };
        Ok((
            rows.iter().map(|v| change_entry_text(None, v)).collect(),
            next,
        ))
    }

    async fn pull(&mut self, c: usize) -> SimResult<()> {
        let p = self.nodes[c].parent.expect("a child");
        let since = self.cursor(c, Direction::Pull).await?;
        let (entries, next) = self.page(p, c, since).await?;
        self.note(format!(
            "n{c} pulls since {since}: {} records",
            entries.len()
        ));
        self.send(Msg::Page {
            child: c,
            since,
            next,
            entries,
        });
        Ok(())
    }

    async fn push(&mut self, c: usize) -> SimResult<()> {
        let p = self.nodes[c].parent.expect("a child");
        let since = self.cursor(c, Direction::Push).await?;
        let (entries, upto) = self.page(c, p, since).await?;
        if upto == since {
            return Ok(());
        }
        self.note(format!(
            "n{c} pushes ({since}, {upto}]: {} records",
            entries.len()
        ));
        self.send(Msg::Push {
            child: c,
            since,
            upto,
            entries,
        });
        Ok(())
    }

    /// Into the network: lost at once on a cut link.
    fn send(&mut self, m: Msg) {
        if self.down.contains(&m.child()) {
            self.outcome.dropped += 1;
            return;
        }
        self.net.push(m);
    }

    /// One message in flight, chosen at random: dropped, duplicated or
    /// delivered.
    async fn deliver_one(&mut self) -> SimResult<()> {
        if self.net.is_empty() {
            return Ok(());
        }
        let k = self.rng.below(self.net.len() as u64) as usize;
        let m = self.net.remove(k);
        if self.down.contains(&m.child()) || self.rng.below(10) == 0 {
            self.outcome.dropped += 1;
            self.note("a message dropped".into());
            return Ok(());
        }
        if self.rng.below(10) == 0 {
            let copy = match &m {
                Msg::Page {
                    child,
                    since,
                    next,
                    entries,
                } => Msg::Page {
                    child: *child,
                    since: *since,
                    next: *next,
                    entries: entries.clone(),
                },
                Msg::Push {
                    child,
                    since,
                    upto,
                    entries,
                } => Msg::Push {
                    child: *child,
                    since: *since,
                    upto: *upto,
                    entries: entries.clone(),
                },
                Msg::Ack { child, since, upto } => Msg::Ack {
                    child: *child,
                    since: *since,
                    upto: *upto,
                },
            };
            self.net.push(copy);
            self.note("a message duplicated".into());
        }
        self.deliver(m).await
    }

    fn versions(entries: &[String]) -> SimResult<Vec<RemoteVersion>> {
        entries
            .iter()
            .map(|e| {
                let v: Value = serde_json::from_str(e).map_err(err("entry"))?;
                RemoteVersion::from_entry(&v, Mode::Strict)
            })
            .collect()
    }

    async fn apply(&mut self, at: usize, req: ApplyRequest) -> SimResult<()> {
        let n = req.versions.len();
        let out = self
            .store(at)
            .write(WriteRequest::Apply(Box::new(req)))
            .await
            .map_err(err("apply"))?;
        let WriteOutcome::Applied(rep) = out else {
            return Err("apply: unexpected outcome".into());
        };
        if let Some((i, _, why)) = rep.failed() {
            return Err(format!("n{at} refused record {i} of {n}: {why}"));
        }
        self.outcome.conflicts += rep.conflicts;
        Ok(())
    }

    async fn deliver(&mut self, m: Msg) -> SimResult<()> {
        match m {
            Msg::Page {
                child,
                since,
                next,
                entries,
            } => {
                // The edge applies only the answer to what it asked.
                if self.cursor(child, Direction::Pull).await? != since {
                    self.note(format!("n{child}: a stale page since {since}"));
                    return Ok(());
                }
                let p = self.nodes[child].parent.expect("a child");
                self.note(format!("n{child} applies a page ({since}, {next}]"));
                let req = ApplyRequest {
                    edge: PARENT_EDGE.into(),
                    direction: Direction::Pull,
                    peer: self.nodes[p].id.clone(),
                    policy: self.cfg.policy,
                    versions: Self::versions(&entries)?,
                    cursor: Some(next),
                    dead_letters: Vec::new(),
                    record_peer: false,
                };
                self.apply(child, req).await?;
            }
            Msg::Push {
                child,
                since,
                upto,
                entries,
            } => {
                let p = self.nodes[child].parent.expect("a child");
                self.note(format!("n{p} applies n{child}'s push ({since}, {upto}]"));
                let req = ApplyRequest {
                    edge: self.nodes[child].id.clone(),
                    direction: Direction::Push,
                    peer: self.nodes[child].id.clone(),
                    policy: self.cfg.policy,
                    versions: Self::versions(&entries)?,
                    cursor: None,
                    dead_letters: Vec::new(),
                    record_peer: true,
                };
                self.apply(p, req).await?;
                self.send(Msg::Ack { child, since, upto });
            }
            Msg::Ack { child, since, upto } => {
                if self.cursor(child, Direction::Push).await? != since {
                    return Ok(());
                }
                self.note(format!("n{child}'s push cursor to {upto}"));
                let w = SyncWrite::SetCursor {
                    key: cursor_key(PARENT_EDGE, Direction::Push),
                    seq: upto,
                    audit: None,
                };
                self.store(child)
                    .write(WriteRequest::Sync(w))
                    .await
                    .map_err(err("set cursor"))?;
            }
        }
        Ok(())
    }

    async fn open_conflicts(&self, i: usize) -> SimResult<Vec<fhirsync_store::Conflict>> {
        self.store(i)
            .conflicts(ListQuery {
                state: Some("open".into()),
                count: 1000,
                ..ListQuery::default()
            })
            .await
            .map_err(err("conflicts"))
    }

    async fn resolve_one(&mut self, i: usize) -> SimResult<()> {
        let open = self.open_conflicts(i).await?;
        if open.is_empty() {
            return Ok(());
        }
        let c = &open[self.rng.below(open.len() as u64) as usize];
        let how = if self.rng.below(2) == 0 {
            Resolution::KeepLocal
        } else {
            Resolution::TakeRemote
        };
        self.resolve(i, c.id, how).await
    }

    async fn resolve(&mut self, i: usize, conflict: u64, how: Resolution) -> SimResult<()> {
        let w = SyncWrite::Resolve { conflict, how };
        match self.store(i).write(WriteRequest::Sync(w)).await {
            Ok(WriteOutcome::Written { version, .. }) => {
                self.note(format!(
                    "n{i} resolved conflict {conflict} on {}/{}",
                    version.rtype, version.id
                ));
                self.ack(i, &version);
                Ok(())
            }
            Ok(_) => Err("resolve: unexpected outcome".into()),
            Err(e) => Err(format!("n{i} cannot resolve conflict {conflict}: {e}")),
        }
    }

    /// The store closed without a goodbye and opened again.
    fn crash(&mut self, i: usize) -> SimResult<()> {
        self.outcome.crashes += 1;
        self.note(format!("n{i} crashes"));
        if let Some(s) = self.nodes[i].store.take() {
            s.shutdown();
        }
        self.open(i)
    }

    /// A child's cursors never run ahead: the pull cursor is within the
    /// parent's log, the push cursor within its own.
    async fn check_cursors(&self) -> SimResult<()> {
        for c in self.children() {
            let p = self.nodes[c].parent.expect("a child");
            let (pull, push) = (
                self.cursor(c, Direction::Pull).await?,
                self.cursor(c, Direction::Push).await?,
            );
            if pull > self.store(p).last_seq() {
                return Err(format!(
                    "n{c}'s pull cursor {pull} is past its parent's log"
                ));
            }
            if push > self.store(c).last_seq() {
                return Err(format!("n{c}'s push cursor {push} is past its own log"));
            }
        }
        Ok(())
    }

    /// Links up, no loss: every edge pulls and pushes until nothing moves.
    async fn heal(&mut self) -> SimResult<()> {
        self.down.clear();
        self.net.clear();
        for _ in 0..HEAL_ROUNDS_MAX {
            let before = self.heads();
            for c in self.children() {
                let p = self.nodes[c].parent.expect("a child");
                for dir in [Direction::Pull, Direction::Push] {
                    for _ in 0..HEAL_ROUNDS_MAX {
                        let (from, head) = match dir {
                            Direction::Pull => {
                                (self.cursor(c, dir).await?, self.store(p).last_seq())
                            }
                            Direction::Push => {
                                (self.cursor(c, dir).await?, self.store(c).last_seq())
                            }
                        };
                        if from == head {
                            break;
                        }
                        match dir {
                            Direction::Pull => self.pull(c).await?,
                            Direction::Push => self.push(c).await?,
                        }
                        while let Some(m) = self.net.pop() {
                            self.deliver(m).await?;
                        }
                    }
                }
            }
            let mut idle = self.heads() == before;
            for c in self.children() {
                let p = self.nodes[c].parent.expect("a child");
                idle &= self.cursor(c, Direction::Pull).await? == self.store(p).last_seq();
                idle &= self.cursor(c, Direction::Push).await? == self.store(c).last_seq();
            }
            if idle {
                return Ok(());
            }
        }
        Err(format!("no convergence in {HEAL_ROUNDS_MAX} rounds"))
    }

    fn heads(&self) -> Vec<u64> {
        (0..self.nodes.len())
            .map(|i| self.store(i).last_seq())
            .collect()
    }

    /// After healing, the two ends of each edge differ only where their
    /// versions are concurrent, and there both ends have the resource in
    /// an open conflict: no silent divergence, and nothing one end has
    /// that the other has not seen.
    async fn check_open_conflicts_per_edge(&self) -> SimResult<()> {
        let open = |v: Vec<fhirsync_store::Conflict>| -> BTreeSet<String> {
            v.into_iter()
                .map(|x| format!("{}/{}", x.rtype, x.rid))
                .collect()
        };
        let mut cur = Vec::new();
        for i in 0..self.nodes.len() {
            cur.push(self.current(i).await?.1);
        }
        for c in self.children() {
            let p = self.nodes[c].parent.expect("a child");
            let (op, oc) = (
                open(self.open_conflicts(p).await?),
                open(self.open_conflicts(c).await?),
            );
            let keys: BTreeSet<&String> = cur[p].keys().chain(cur[c].keys()).collect();
            for k in keys {
                let none = VersionVector::new();
                let (a, b) = (
                    cur[p].get(k).unwrap_or(&none),
                    cur[c].get(k).unwrap_or(&none),
                );
                match a.compare(b) {
                    Causality::Equal => {}
                    Causality::Concurrent if op.contains(k) && oc.contains(k) => {}
                    how => {
                        return Err(format!(
                            "{k} on edge n{p}-n{c} after healing: {} at the parent, {} at the child ({how:?}; open at the parent: {}, at the child: {})",
                            a.to_json(),
                            b.to_json(),
                            op.contains(k),
                            oc.contains(k)
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Every open conflict resolved at one node (the first holding it),
    /// then healed, until none is open.
    async fn resolve_all(&mut self) -> SimResult<()> {
        for _ in 0..RESOLVE_PASSES_MAX {
            let mut done = BTreeSet::new();
            for i in 0..self.nodes.len() {
                for c in self.open_conflicts(i).await? {
                    if done.insert((c.rtype.clone(), c.rid.clone())) {
                        self.resolve(i, c.id, Resolution::KeepLocal).await?;
                    }
                }
            }
            self.heal().await?;
            if done.is_empty() {
                return Ok(());
            }
        }
        Err(format!(
            "conflicts still open after {RESOLVE_PASSES_MAX} passes"
        ))
    }

    /// Every node holds the same current versions; no acknowledged write
    /// is lost (each is contained in the final vector); no version is
    /// stored twice.
    async fn check_final(&mut self) -> SimResult<()> {
        let mut first: Option<BTreeMap<String, (Option<u128>, String)>> = None;
        for i in 0..self.nodes.len() {
            let (state, vvs) = self.current(i).await?;
            for a in &self.acked {
                let key = format!("{}/{}", a.key.0, a.key.1);
                let Some(vv) = vvs.get(&key) else {
                    return Err(format!("n{i} lost {key} (written at {})", a.at));
                };
                if !matches!(vv.compare(&a.vv), Causality::After | Causality::Equal) {
                    return Err(format!(
                        "n{i} lost the write of {key} at {} ({} is not in {})",
                        a.at,
                        a.vv.to_json(),
                        vv.to_json()
                    ));
                }
            }
            match &first {
                None => first = Some(state),
                Some(f) if *f != state => {
                    let diff: Vec<&String> = f
                        .keys()
                        .chain(state.keys())
                        .filter(|k| f.get(*k) != state.get(*k))
                        .collect();
                    return Err(format!("n{i} differs from n0 on {diff:?}"));
                }
                Some(_) => {}
            }
        }
        self.outcome.state = first.unwrap_or_default();
        Ok(())
    }

    /// A node's current versions, and the check that its log has no
    /// (type, id, vector) twice.
    async fn current(
        &self,
        i: usize,
    ) -> SimResult<(
        BTreeMap<String, (Option<u128>, String)>,
        BTreeMap<String, VersionVector>,
    )> {
        let (mut state, mut vvs, mut seen) = (BTreeMap::new(), BTreeMap::new(), BTreeSet::new());
        let mut since = 0;
        loop {
            let rows = self
                .store(i)
                .changes(ChangesQuery {
                    since,
                    count: 1000,
                    ..ChangesQuery::default()
                })
                .await
                .map_err(err("changes"))?;
            let Some(last) = rows.last() else { break };
            since = last.seq;
            for v in rows {
                let key = format!("{}/{}", v.rtype, v.id);
                if !seen.insert((key.clone(), v.vv.to_json())) {
                    return Err(format!("n{i} stored {key} {} twice", v.vv.to_json()));
                }
                let hash = v.body.as_deref().map(|b| {
                    let m: serde_json::Map<String, Value> =
                        serde_json::from_str(b).unwrap_or_default();
                    fhirsync_core::meta::content_hash(&v.rtype, &fhirsync_core::meta::split(&m))
                });
                state.insert(key.clone(), (hash, v.vv.to_json()));
                vvs.insert(key, v.vv);
            }
        }
        Ok((state, vvs))
    }
}
