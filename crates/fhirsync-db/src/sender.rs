//! `fhirsync db-sender`: follows the site's tables in the binlog, groups
//! whole transactions into batches, delivers each batch and only then
//! moves the cursor file. A first run can copy the tables first (a
//! consistent snapshot) and then follow from the snapshot's position.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, Row, Value};
use serde_json::{Map, Value as Json};

use crate::binlog::{bytes_json, current_position, BinlogError, Position, Reader, Transaction};
use crate::config::SenderConfig;
use crate::receiver::{key_text, server_zone};
use crate::record::{Batch, Change};
use crate::schema::{q, Schema};
use crate::status::Progress;
use crate::tz::Zone;
use crate::DbError;

/// Where a batch goes; `deliver` returns once the receiver (or the
/// broker) has it for good.
pub enum Transport {
    Http {
        client: reqwest::Client,
        url: String,
        token: String,
    },
    Nats(Box<crate::nats::Publisher>),
}

impl Transport {
    pub async fn connect(cfg: &SenderConfig) -> Result<Transport, DbError> {
        if let Some(h) = &cfg.http {
            let mut b = reqwest::Client::builder().timeout(Duration::from_secs(120));
            if let Some(ca) = &h.ca_file {
                let pem = std::fs::read(ca)
                    .map_err(|e| DbError::Config(format!("cannot read {}: {e}", ca.display())))?;
                let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                    DbError::Config(format!("{} is not a PEM certificate: {e}", ca.display()))
                })?;
                b = b.add_root_certificate(cert);
            }
            let client = b.build().map_err(|e| DbError::Config(e.to_string()))?;
            return Ok(Transport::Http {
                client,
                url: format!("{}/db/batches", h.url.trim_end_matches('/')),
                token: h.token()?,
            });
        }
        let n = cfg
            .nats
            .as_ref()
            .ok_or_else(|| DbError::Config("no [http] or [nats]".into()))?;
        Ok(Transport::Nats(Box::new(
            crate::nats::Publisher::connect(n, &cfg.site).await?,
        )))
    }

    /// The largest batch, in bytes, one delivery can carry.
    pub fn max_bytes(&self) -> usize {
        match self {
            // The receiver takes bodies up to 256 MiB.
            Transport::Http { .. } => 200 << 20,
            Transport::Nats(p) => p.max_payload(),
        }
    }

    /// One attempt: `Delivery` for what may pass by itself (a connection,
    /// a 5xx), `Refused` for the receiver's "no" (a table or a parent it
    /// lacks, a token it does not know); the caller retries both.
    pub async fn deliver(&self, batch: &Batch) -> Result<(), DbError> {
        match self {
            Transport::Http { client, url, token } => http_deliver(client, url, token, batch).await,
            Transport::Nats(p) => p.publish(batch).await,
        }
    }
}

async fn http_deliver(
    client: &reqwest::Client,
    url: &str,
    token: &str,
    batch: &Batch,
) -> Result<(), DbError> {
    let resp = client
        .post(url)
        .bearer_auth(token)
        .json(batch)
        .send()
        .await
        .map_err(|e| DbError::Delivery(e.to_string()))?;
    let status = resp.status();
    if status.is_success() {
        return Ok(());
    }
    let body: Json = resp.json().await.unwrap_or(Json::Null);
    let why = body["issue"][0]["diagnostics"]
        .as_str()
        .map(String::from)
        .unwrap_or_else(|| status.to_string());
    if status.is_server_error() {
        Err(DbError::Delivery(format!("{status}: {why}")))
    } else {
        Err(DbError::Refused(why))
    }
}

/// Delivers `batch`, retrying with back-off (doubling up to
/// `retry_delay_ms_max`) whatever fails, the receiver's refusals included,
/// with each failure in the sender's status; `false` when `stop` came
/// first. The caller moves no cursor past the batch before this is `true`,
/// and sends nothing after it.
async fn until_through(
    transport: &Transport,
    progress: &Progress,
    batch: &Batch,
    stop: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<bool, DbError> {
    let mut attempt = 0u32;
    loop {
        let r = tokio::select! {
            r = transport.deliver(batch) => r,
            _ = stop.wait_for(|s| *s) => return Ok(false),
        };
        let (refused, e) = match r {
            Ok(()) => return Ok(true),
            Err(e @ DbError::Refused(_)) => (true, e),
            Err(e @ DbError::Delivery(_)) => (false, e),
            Err(e) => return Err(e),
        };
        let wait = crate::backoff_capped(attempt, progress.retry_delay_max);
        progress.failed(refused, &e.to_string());
        progress.save(true)?;
        tracing::warn!(error = %e, retry_in = ?wait, changes = batch.changes.len(), "db-sender: batch not delivered; kept and retried");
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return Ok(false),
        }
        attempt = attempt.saturating_add(1);
    }
}

/// A batch in parts of at most `max` bytes, cut between transactions
/// (each part ends at its last transaction's position).
fn split(batch: Batch, max: usize) -> Result<Vec<Batch>, DbError> {
    let size = |c: &Change| serde_json::to_vec(c).map(|v| v.len() + 1).unwrap_or(0);
    let total: usize = 256 + batch.changes.iter().map(size).sum::<usize>();
    if total <= max {
        return Ok(vec![batch]);
    }
    let Batch {
        site,
        time_zone,
        changes,
        ..
    } = batch;
    let mut parts: Vec<Batch> = Vec::new();
    let mut i = 0;
    while i < changes.len() {
        // One transaction: the changes sharing a position.
        let at = changes[i].at.clone();
        let j = changes[i..]
            .iter()
            .position(|c| c.at != at)
            .map_or(changes.len(), |n| i + n);
        let tx = &changes[i..j];
        let bytes: usize = tx.iter().map(size).sum();
        if 256 + bytes > max {
            return Err(DbError::Refused(format!(
                "a transaction of {bytes} bytes is larger than one message may be ({max}): raise the NATS server's max_payload or deliver over [http]"
            )));
        }
        let fits = parts
            .last()
            .is_some_and(|p| 256 + p.changes.iter().map(size).sum::<usize>() + bytes <= max);
        if !fits {
            parts.push(Batch {
                site: site.clone(),
                time_zone: time_zone.clone(),
                end: String::new(),
                snapshot: false,
                snapshot_done: false,
                changes: Vec::new(),
            });
        }
        let p = parts.last_mut().expect("a part");
        p.changes.extend_from_slice(tx);
        p.end = at.unwrap_or_default();
        i = j;
    }
    Ok(parts)
}

/// The cursor file: the binlog position after the last delivered batch.
pub struct Cursor {
    path: PathBuf,
}

impl Cursor {
    pub fn new(state_dir: &Path) -> Result<Cursor, DbError> {
        std::fs::create_dir_all(state_dir)
            .map_err(|e| DbError::State(format!("cannot create {}: {e}", state_dir.display())))?;
        Ok(Cursor {
            path: state_dir.join("cursor"),
        })
    }

    pub fn read(&self) -> Result<Option<Position>, DbError> {
        match std::fs::read_to_string(&self.path) {
            Ok(s) => Position::parse(s.trim()).map(Some).ok_or_else(|| {
                DbError::State(format!("{} holds no position: {s:?}", self.path.display()))
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(DbError::State(format!(
                "cannot read {}: {e}",
                self.path.display()
            ))),
        }
    }

    /// Replaces the file whole (written aside, synced, renamed).
    pub fn write(&self, p: &Position) -> Result<(), DbError> {
        let tmp = self.path.with_extension("tmp");
        let io = |e: std::io::Error| {
            DbError::State(format!("cannot write {}: {e}", self.path.display()))
        };
        {
            use std::io::Write;
            let mut f = std::fs::File::create(&tmp).map_err(io)?;
            writeln!(f, "{p}").map_err(io)?;
            f.sync_all().map_err(io)?;
        }
        std::fs::rename(&tmp, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        Ok(())
    }
}

pub struct Sender {
    b: Builder,
    transport: Transport,
    cursor: Cursor,
    pub progress: std::sync::Arc<Progress>,
}

/// Makes batches of change records from binlog transactions.
struct Builder {
    cfg: SenderConfig,
    zone: Zone,
    schema: Schema,
    pool: Pool,
    /// (table, local id) → uuid of rows seen or looked up.
    uuids: HashMap<(String, String), String>,
}

const UUID_CACHE_MAX: usize = 500_000;

impl Sender {
    pub async fn open(cfg: SenderConfig) -> Result<Sender, DbError> {
        cfg.check()?;
        let opts =
            Opts::from_url(&cfg.source).map_err(|e| DbError::Config(format!("source: {e}")))?;
        let mut conn = Conn::new(opts.clone()).await.map_err(|e| {
            DbError::Binlog(BinlogError::Connect(cfg.source.clone(), e.to_string()))
        })?;
        crate::binlog::check_server(&mut conn).await?;
        let zone = match cfg.zone()? {
            Some(z) => z,
            None => server_zone(&mut conn).await?,
        };
        let schema = Schema::load(&mut conn, &cfg.database, &cfg.tables).await?;
        conn.disconnect().await?;
        let pool = Pool::new(OptsBuilder::from_opts(opts).init(vec!["SET time_zone = '+00:00'"]));
        let transport = Transport::connect(&cfg).await?;
        let cursor = Cursor::new(&cfg.state_dir)?;
        let progress = std::sync::Arc::new(Progress::new(
            &cfg.site,
            &cfg.state_dir,
            Duration::from_millis(cfg.retry_delay_ms_max),
        ));
        Ok(Sender {
            b: Builder {
                cfg,
                zone,
                schema,
                pool,
                uuids: HashMap::new(),
            },
            transport,
            cursor,
            progress,
        })
    }

    /// Follows the binlog until `stop` is set or an error that retrying
    /// cannot fix. `force_snapshot` copies the tables again first. The
    /// next batch is read while the last one is being delivered.
    pub async fn run(
        mut self,
        force_snapshot: bool,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<(), DbError> {
        let start = match self.cursor.read()? {
            Some(p) if !force_snapshot => p,
            _ if force_snapshot || self.b.cfg.snapshot => match self.snapshot(&mut stop).await? {
                Some(p) => p,
                // Stopped: the next run copies the tables again.
                None => return Ok(()),
            },
            _ => {
                let mut conn = self.b.pool.get_conn().await?;
                let p = current_position(&mut conn).await?;
                tracing::info!(position = %p, "no cursor and no snapshot: following from the current position");
                self.cursor.write(&p)?;
                p
            }
        };
        let Sender {
            mut b,
            transport,
            cursor,
            progress,
        } = self;
        progress.following(&start.to_string());
        progress.save(true)?;
        let tables: Vec<String> = b
            .schema
            .tables
            .keys()
            .map(|t| format!("{}.{t}", b.cfg.database))
            .collect();
        let mut reader = Reader::open(&b.cfg.source, b.cfg.server_id, &start, tables).await?;
        tracing::info!(site = %b.cfg.site, position = %start, zone = %b.zone, tables = b.schema.tables.len(), "db-sender following the binlog");
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Batch>(2);
        let max = transport.max_bytes();
        let mut build = tokio::spawn(async move {
            let linger = Duration::from_millis(b.cfg.linger_ms);
            loop {
                let first = reader.next().await?;
                let mut rows = first.changes.len();
                let mut txs = vec![first];
                let deadline = tokio::time::Instant::now() + linger;
                while rows < b.cfg.batch_rows {
                    match tokio::time::timeout_at(deadline, reader.next()).await {
                        Ok(t) => {
                            let t = t?;
                            rows += t.changes.len();
                            txs.push(t);
                        }
                        Err(_) => break,
                    }
                }
                for part in split(b.batch(txs).await?, max)? {
                    if tx.send(part).await.is_err() {
                        return Ok(());
                    }
                }
            }
        });
        let delivered: Result<(), DbError> = async {
            loop {
                let part = tokio::select! {
                    p = rx.recv() => p,
                    _ = stop.wait_for(|s| *s) => None,
                };
                let Some(part) = part else { return Ok(()) };
                if !until_through(&transport, &progress, &part, &mut stop).await? {
                    return Ok(());
                }
                let end = part
                    .end_position()
                    .expect("a batch from the binlog has a position");
                cursor.write(&end)?;
                let was_failing = progress.state() != "following";
                progress.delivered(part.changes.len(), &end.to_string());
                progress.save(was_failing)?;
            }
        }
        .await;
        // Whatever ended the delivery ends the builder too.
        build.abort();
        let built = match (&mut build).await {
            Ok(r) => r,
            Err(e) if e.is_cancelled() => Ok(()),
            Err(e) => Err(DbError::State(format!("the batch builder failed: {e}"))),
        };
        delivered.and(built)
    }
}

impl Builder {
    async fn batch(&mut self, txs: Vec<Transaction>) -> Result<Batch, DbError> {
        let end = txs.last().map(|t| t.end.to_string()).unwrap_or_default();
        let mut changes = Vec::new();
        for t in txs {
            let at = t.end.to_string();
            for c in t.changes {
                let mut c = self.change(&c.table, c.op.as_str(), c.row)?;
                c.at = Some(at.clone());
                changes.push(c);
            }
        }
        self.attach_refs(&mut changes).await?;
        Ok(Batch {
            site: self.cfg.site.clone(),
            time_zone: self.zone.to_string(),
            end,
            snapshot: false,
            snapshot_done: false,
            changes,
        })
    }

    fn change(&self, table: &str, op: &str, row: Map<String, Json>) -> Result<Change, DbError> {
        let t = self
            .schema
            .table(table)
            .ok_or_else(|| DbError::Schema(format!("table {table} is not followed")))?;
        let key = t
            .key()
            .and_then(|k| row.get(k))
            .map(key_text)
            .ok_or_else(|| {
                DbError::Schema(format!(
                    "{table}: a row without its key (is binlog_row_image FULL?)"
                ))
            })?;
        Ok(Change {
            table: table.to_string(),
            op: op.to_string(),
            key,
            row,
            refs: Default::default(),
            at: None,
        })
    }

    /// Adds the parent uuid of each foreign key whose parent is matched by
    /// uuid: from rows already seen, else looked up in the source.
    async fn attach_refs(&mut self, changes: &mut [Change]) -> Result<(), DbError> {
        if self.uuids.len() > UUID_CACHE_MAX {
            self.uuids.clear();
        }
        for c in changes.iter() {
            let t = &self.schema.tables[&c.table];
            if let (true, Some(pk), Some(Json::String(u))) = (t.has_uuid, &t.pk, c.row.get("uuid"))
            {
                if let Some(id) = c.row.get(pk) {
                    self.uuids
                        .insert((c.table.clone(), key_text(id)), u.clone());
                }
            }
        }
        let mut missing: HashMap<String, Vec<String>> = HashMap::new();
        let mut wanted = Vec::new();
        for (i, c) in changes.iter().enumerate() {
            if c.op == "d" {
                continue;
            }
            let t = &self.schema.tables[&c.table];
            for fk in &t.fks {
                let Some(parent) = self.schema.mapped_parent(t, &fk.column) else {
                    continue;
                };
                let Some(v) = c.row.get(&fk.column).filter(|v| !v.is_null()) else {
                    continue;
                };
                let id = key_text(v);
                if !self.uuids.contains_key(&(parent.name.clone(), id.clone())) {
                    missing
                        .entry(parent.name.clone())
                        .or_default()
                        .push(id.clone());
                }
                wanted.push((i, fk.column.clone(), parent.name.clone(), id));
            }
        }
        for (parent, mut ids) in missing {
            ids.sort();
            ids.dedup();
            let pk = self.schema.tables[&parent]
                .pk
                .clone()
                .unwrap_or_else(|| "id".into());
            let mut conn = self.pool.get_conn().await?;
            for part in ids.chunks(500) {
                let sql = format!(
                    "SELECT CAST({} AS CHAR), uuid FROM {}.{} WHERE {} IN ({})",
                    q(&pk),
                    q(&self.cfg.database),
                    q(&parent),
                    q(&pk),
                    vec!["?"; part.len()].join(",")
                );
                let params: Vec<Value> = part.iter().map(|s| Value::from(s.as_str())).collect();
                let found: Vec<(String, String)> = conn.exec(sql, params).await?;
                for (id, uuid) in found {
                    self.uuids.insert((parent.clone(), id), uuid);
                }
            }
        }
        for (i, col, parent, id) in wanted {
            match self.uuids.get(&(parent.clone(), id.clone())) {
                Some(u) => {
                    changes[i].refs.insert(col, u.clone());
                }
                None => {
                    tracing::warn!(table = %changes[i].table, key = %changes[i].key, %col, %parent, %id, "parent row not found at the source; the receiver will refuse this change")
                }
            }
        }
        Ok(())
    }
}

impl Sender {
    /// Copies the followed tables, parents first, from one consistent
    /// read, and answers the binlog position that read stands at.
    /// Copies the tables; `None` when `stop` came first.
    async fn snapshot(
        &mut self,
        stop: &mut tokio::sync::watch::Receiver<bool>,
    ) -> Result<Option<Position>, DbError> {
        let started = Instant::now();
        let opts =
            Opts::from_url(&self.b.cfg.source).map_err(|e| DbError::Config(e.to_string()))?;
        let mut conn =
            Conn::new(OptsBuilder::from_opts(opts).init(vec!["SET time_zone = '+00:00'"])).await?;
        conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            .await?;
        conn.query_drop("START TRANSACTION WITH CONSISTENT SNAPSHOT")
            .await?;
        // MariaDB says where in the binlog a consistent snapshot stands.
        let status: Vec<(String, String)> =
            conn.query("SHOW STATUS LIKE 'binlog_snapshot_%'").await?;
        let get = |n: &str| {
            status
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(n))
                .map(|(_, v)| v.clone())
        };
        let pos = match (get("binlog_snapshot_file"), get("binlog_snapshot_position")) {
            (Some(file), Some(p)) if !file.is_empty() => Position {
                file,
                pos: p.parse().unwrap_or(4),
            },
            _ => {
                return Err(DbError::Schema(
                    "the server does not report binlog_snapshot_file (MySQL): take the snapshot with MariaDB, or set snapshot = false and copy the tables yourself".into(),
                ))
            }
        };
        tracing::info!(position = %pos, "snapshot started");
        let mut total = 0usize;
        for table in self.b.schema.dependency_order() {
            let t = self.b.schema.tables[&table].clone();
            let cols: Vec<String> = t.columns.iter().map(|c| q(&c.name)).collect();
            let sql = format!(
                "SELECT {} FROM {}.{}",
                cols.join(", "),
                q(&self.b.cfg.database),
                q(&table)
            );
            let mut result = conn.query_iter(sql).await?;
            let mut part = Vec::new();
            loop {
                let row: Option<Row> = result.next().await?;
                let done = row.is_none();
                if let Some(r) = row {
                    let mut m = Map::new();
                    for (c, v) in t.columns.iter().zip(r.unwrap()) {
                        m.insert(
                            c.name.clone(),
                            match v {
                                Value::NULL => Json::Null,
                                Value::Bytes(b) => bytes_json(b),
                                other => {
                                    Json::String(other.as_sql(true).trim_matches('\'').to_string())
                                }
                            },
                        );
                    }
                    part.push(self.b.change(&table, "c", m)?);
                }
                if part.len() >= self.b.cfg.batch_rows || (done && !part.is_empty()) {
                    total += part.len();
                    let mut changes = std::mem::take(&mut part);
                    self.b.attach_refs(&mut changes).await?;
                    let batch = Batch {
                        site: self.b.cfg.site.clone(),
                        time_zone: self.b.zone.to_string(),
                        end: pos.to_string(),
                        snapshot: true,
                        snapshot_done: false,
                        changes,
                    };
                    if !until_through(&self.transport, &self.progress, &batch, stop).await? {
                        return Ok(None);
                    }
                    self.progress
                        .delivered(batch.changes.len(), &pos.to_string());
                }
                if done {
                    break;
                }
            }
        }
        conn.query_drop("COMMIT").await?;
        conn.disconnect().await?;
        let done = Batch {
            site: self.b.cfg.site.clone(),
            time_zone: self.b.zone.to_string(),
            end: pos.to_string(),
            snapshot: true,
            snapshot_done: true,
            changes: Vec::new(),
        };
        if !until_through(&self.transport, &self.progress, &done, stop).await? {
            return Ok(None);
        }
        self.cursor.write(&pos)?;
        tracing::info!(rows = total, position = %pos, seconds = started.elapsed().as_secs_f64(), "snapshot delivered");
        Ok(Some(pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(at: &str, text: &str) -> Change {
        let mut row = Map::new();
        row.insert("uuid".into(), Json::String(text.into()));
        Change {
            table: "t".into(),
            op: "c".into(),
            key: text.into(),
            row,
            refs: Default::default(),
            at: Some(at.into()),
        }
    }

    #[test]
    fn batches_are_cut_between_transactions_only() {
        let long = "x".repeat(400);
        let batch = Batch {
            site: "s".into(),
            time_zone: "UTC".into(),
            end: "b.1:30".into(),
            snapshot: false,
            snapshot_done: false,
            changes: vec![
                change("b.1:10", &long),
                change("b.1:10", &long),
                change("b.1:20", &long),
                change("b.1:30", &long),
            ],
        };
        assert_eq!(split(batch.clone(), 1 << 20).unwrap(), vec![batch.clone()]);
        let parts = split(batch.clone(), 2500).unwrap();
        let ends: Vec<(&str, usize)> = parts
            .iter()
            .map(|p| (p.end.as_str(), p.changes.len()))
            .collect();
        assert_eq!(ends, [("b.1:10", 2), ("b.1:30", 2)]);
        // One transaction over the limit cannot be cut.
        let e = split(batch, 1500).unwrap_err();
        assert!(e.to_string().contains("max_payload"), "{e}");
    }
}
