//! Applies batches to the central database: one transaction per batch,
//! rows matched by `uuid`, foreign keys mapped from parent uuids to local
//! ids, DATETIMEs moved to the receiver's zone, the site's cursor moved in
//! the same transaction (a batch delivered twice is applied once), and the
//! conflict rule: a row changed here since its last sync, whose incoming
//! version is older, goes to the conflict queue and is held there.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use mysql_async::prelude::Queryable;
use mysql_async::{Conn, Opts, OptsBuilder, Pool, Row, Transaction, TxOpts, Value};
use serde::Serialize;
use serde_json::{json, Map, Value as Json};

use crate::binlog::Position;
use crate::record::{Batch, Change};
use crate::schema::{q, Schema, Table};
use crate::tz::{convert, Zone};
use crate::DbError;

/// What became of a batch.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct Applied {
    pub applied: usize,
    /// Rows that went to the conflict queue.
    pub conflicts: usize,
    /// Changes held because their row has an open conflict.
    pub held: usize,
    /// The batch was applied before (its position is not after the cursor).
    pub duplicate: bool,
    pub position: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SiteStatus {
    pub site: String,
    pub position: Option<String>,
    pub last_received_at: Option<String>,
    pub records: u64,
    pub batches: u64,
    pub open_conflicts: u64,
    pub last_error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Conflict {
    pub id: i64,
    pub site: String,
    pub table: String,
    pub key: String,
    /// The zone every DATETIME and TIMESTAMP of `incoming` and `local` is
    /// shown in: the receiver's.
    pub time_zone: String,
    /// The incoming change (the latest one held), its row shown in
    /// `time_zone` (`site_time_zone`: where it came from).
    pub incoming: Json,
    /// The receiver's row when the conflict was found, typed like
    /// `incoming`'s.
    pub local: Json,
    /// Incoming changes held for this row.
    pub held: u64,
    pub created_at: String,
    pub resolved_at: Option<String>,
    pub resolution: Option<String>,
}

/// Which version a resolution keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Keep {
    Incoming,
    Local,
}

impl std::str::FromStr for Keep {
    type Err = String;
    fn from_str(s: &str) -> Result<Keep, String> {
        match s {
            "incoming" => Ok(Keep::Incoming),
            "local" => Ok(Keep::Local),
            _ => Err(format!("keep {s:?}: incoming or local")),
        }
    }
}

/// Shortest time between two readings of the target's tables.
pub const SCHEMA_RELOAD_MS_MIN: u64 = 1000;

const STATE_TABLES: &str = "
CREATE TABLE IF NOT EXISTS fhirsync_db_sites (
  site VARCHAR(64) PRIMARY KEY, token_sha256 CHAR(64) NOT NULL, created_at DATETIME(6) NOT NULL,
  position VARCHAR(255) NULL, last_received_at DATETIME(6) NULL,
  records BIGINT NOT NULL DEFAULT 0, batches BIGINT NOT NULL DEFAULT 0, last_error TEXT NULL) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
CREATE TABLE IF NOT EXISTS fhirsync_db_rows (
  tbl VARCHAR(64) NOT NULL, k VARCHAR(255) NOT NULL, hash CHAR(32) NOT NULL,
  site VARCHAR(64) NULL, synced_at DATETIME(6) NOT NULL, PRIMARY KEY (tbl, k))
  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
CREATE TABLE IF NOT EXISTS fhirsync_db_conflicts (
  id BIGINT AUTO_INCREMENT PRIMARY KEY, site VARCHAR(64) NOT NULL, tbl VARCHAR(64) NOT NULL,
  k VARCHAR(255) NOT NULL, incoming LONGTEXT NOT NULL, local_row LONGTEXT NOT NULL,
  held INT NOT NULL DEFAULT 1, created_at DATETIME(6) NOT NULL, resolved_at DATETIME(6) NULL,
  resolution VARCHAR(16) NULL, resolved_by VARCHAR(64) NULL, KEY open_rows (tbl, k, resolved_at))
  CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;";

/// Upserts of one table with the same columns, not yet sent.
struct Pending {
    table: String,
    cols: Vec<String>,
    rows: Vec<Vec<Value>>,
}

/// The writes of one database transaction.
#[derive(Default)]
struct Writes {
    pending: Option<Pending>,
    /// (parent table, uuid) → local id.
    ids: HashMap<(String, String), Value>,
}

/// The receiver's view of a row before a batch touched it.
struct Local {
    changed: bool,
    stamp: Option<String>,
}

pub struct Receiver {
    pool: Pool,
    /// The target's tables, read again when a batch names one it lacks
    /// (a table created after start).
    schema: std::sync::RwLock<Arc<Schema>>,
    /// When the schema was last read.
    schema_read: std::sync::Mutex<std::time::Instant>,
    pub zone: Zone,
    change_columns: Vec<String>,
    /// One batch at a time: batches of different sites may touch the same
    /// rows, and the conflict rule reads before it writes.
    lock: tokio::sync::Mutex<()>,
}

/// The server's current UTC offset, as a zone.
pub async fn server_zone(conn: &mut Conn) -> Result<Zone, DbError> {
    let minutes: Option<i64> = conn
        .query_first("SELECT TIMESTAMPDIFF(MINUTE, UTC_TIMESTAMP(), NOW())")
        .await?;
    let m = minutes.unwrap_or(0);
    let sign = if m < 0 { '-' } else { '+' };
    Zone::parse(&format!("{sign}{:02}:{:02}", m.abs() / 60, m.abs() % 60)).map_err(DbError::Config)
}

pub fn sha256_hex(s: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 random bytes in hex.
fn new_token() -> Result<String, DbError> {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_err(|_| DbError::State("no random numbers".into()))?;
    Ok(b.iter().map(|x| format!("{x:02x}")).collect())
}

/// MD5 over a row's copied columns, as the database prints them.
fn hash_expr(t: &Table) -> String {
    let parts: Vec<String> = t
        .columns
        .iter()
        .filter(|c| t.copied(&c.name))
        .map(|c| format!("IFNULL(CAST(t.{} AS CHAR), '\\\\N')", q(&c.name)))
        .collect();
    format!("MD5(CONCAT_WS('|', {}))", parts.join(", "))
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(",")
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::NULL => None,
        Value::Bytes(b) => Some(String::from_utf8_lossy(b).into_owned()),
        other => Some(other.as_sql(true).trim_matches('\'').to_string()),
    }
}

impl Receiver {
    /// Connects, creates the state tables and reads the target's schema.
    pub async fn open(
        url: &str,
        database: &str,
        zone: Option<Zone>,
        change_columns: Vec<String>,
    ) -> Result<Receiver, DbError> {
        let opts = Opts::from_url(url).map_err(|e| DbError::Config(format!("target: {e}")))?;
        let mut first = Conn::new(opts.clone()).await?;
        let zone = match zone {
            Some(z) => z,
            None => server_zone(&mut first).await?,
        };
        first.query_drop(format!("USE {}", q(database))).await?;
        first.query_drop(STATE_TABLES).await?;
        let schema = Schema::load(&mut first, database, &[]).await?;
        first.disconnect().await?;
        // TIMESTAMP values travel in UTC; DATETIMEs are converted here.
        let opts = OptsBuilder::from_opts(opts)
            .db_name(Some(database))
            .init(vec!["SET time_zone = '+00:00'"]);
        Ok(Receiver {
            pool: Pool::new(opts),
            schema: std::sync::RwLock::new(Arc::new(schema)),
            schema_read: std::sync::Mutex::new(std::time::Instant::now()),
            zone,
            change_columns,
            lock: tokio::sync::Mutex::new(()),
        })
    }

    /// The target's tables as last read.
    pub fn schema(&self) -> Arc<Schema> {
        self.schema.read().expect("schema").clone()
    }

    /// Reads the target's tables again, at most once every
    /// [`SCHEMA_RELOAD_MS_MIN`] (a sender retrying a batch for a table the
    /// receiver lacks asks again and again).
    async fn reload_schema(&self) -> Result<Arc<Schema>, DbError> {
        {
            let mut last = self.schema_read.lock().expect("schema time");
            if last.elapsed() < Duration::from_millis(SCHEMA_RELOAD_MS_MIN) {
                return Ok(self.schema());
            }
            *last = std::time::Instant::now();
        }
        let database = self.schema().database.clone();
        let mut conn = self.pool.get_conn().await?;
        let fresh = Arc::new(Schema::load(&mut conn, &database, &[]).await?);
        tracing::info!(database = %database, tables = fresh.tables.len(), "db-receiver read the target's tables again");
        *self.schema.write().expect("schema") = fresh.clone();
        Ok(fresh)
    }

    pub async fn close(self) -> Result<(), DbError> {
        self.pool.disconnect().await?;
        Ok(())
    }

    /// Registers a sender; answers its token (only its hash is kept).
    pub async fn add_site(&self, site: &str) -> Result<String, DbError> {
        if site.is_empty()
            || !site
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(DbError::Config(format!(
                "site {site:?}: letters, digits, - and _ only"
            )));
        }
        let token = new_token()?;
        let mut conn = self.pool.get_conn().await?;
        let r = conn
            .exec_drop(
                "INSERT INTO fhirsync_db_sites (site, token_sha256, created_at) VALUES (?, ?, NOW(6))",
                (site, sha256_hex(&token)),
            )
            .await;
        match r {
            Err(mysql_async::Error::Server(e)) if e.code == 1062 => Err(DbError::Config(format!(
                "site {site} is already registered"
            ))),
            other => other.map(|_| token).map_err(DbError::from),
        }
    }

    /// Gives a site a new token; the old one stops working at once.
    pub async fn rotate_token(&self, site: &str) -> Result<String, DbError> {
        let token = new_token()?;
        let mut conn = self.pool.get_conn().await?;
        conn.exec_drop(
            "UPDATE fhirsync_db_sites SET token_sha256 = ? WHERE site = ?",
            (sha256_hex(&token), site),
        )
        .await?;
        match conn.affected_rows() {
            0 => Err(DbError::UnknownSite(site.into())),
            _ => Ok(token),
        }
    }

    /// Forgets a site and its cursor (its rows and conflicts stay); its
    /// token stops working.
    pub async fn remove_site(&self, site: &str) -> Result<(), DbError> {
        let mut conn = self.pool.get_conn().await?;
        conn.exec_drop("DELETE FROM fhirsync_db_sites WHERE site = ?", (site,))
            .await?;
        match conn.affected_rows() {
            0 => Err(DbError::UnknownSite(site.into())),
            _ => Ok(()),
        }
    }

    /// The site a token belongs to.
    pub async fn site_for_token(&self, token: &str) -> Result<Option<String>, DbError> {
        let mut conn = self.pool.get_conn().await?;
        Ok(conn
            .exec_first(
                "SELECT site FROM fhirsync_db_sites WHERE token_sha256 = ?",
                (sha256_hex(token),),
            )
            .await?)
    }

    pub async fn sites(&self) -> Result<Vec<SiteStatus>, DbError> {
        let mut conn = self.pool.get_conn().await?;
        let rows: Vec<Row> = conn
            .query(
                "SELECT s.site, s.position, CAST(s.last_received_at AS CHAR), s.records, s.batches,
                   (SELECT COUNT(*) FROM fhirsync_db_conflicts c WHERE c.site = s.site AND c.resolved_at IS NULL),
                   s.last_error
                 FROM fhirsync_db_sites s ORDER BY s.site",
            )
            .await?;
        Ok(rows
            .into_iter()
            .map(|mut r| SiteStatus {
                site: r.take(0).unwrap_or_default(),
                position: r.take(1).unwrap_or_default(),
                last_received_at: r.take::<Option<String>, _>(2).flatten().map(utc),
                records: r.take(3).unwrap_or_default(),
                batches: r.take(4).unwrap_or_default(),
                open_conflicts: r.take(5).unwrap_or_default(),
                last_error: r.take(6).unwrap_or_default(),
            })
            .collect())
    }

    /// Notes a failed batch in the site's status (outside its transaction).
    pub async fn note_error(&self, site: &str, error: &str) {
        if let Ok(mut conn) = self.pool.get_conn().await {
            let _ = conn
                .exec_drop(
                    "UPDATE fhirsync_db_sites SET last_error = ? WHERE site = ?",
                    (error, site),
                )
                .await;
        }
    }

    /// Applies a batch; all of it or nothing.
    pub async fn apply(&self, batch: &Batch) -> Result<Applied, DbError> {
        let from = Zone::parse(&batch.time_zone).map_err(DbError::BadRecord)?;
        let mut schema = self.schema();
        if batch
            .changes
            .iter()
            .any(|c| schema.table(&c.table).is_none())
        {
            schema = self.reload_schema().await?;
        }
        for c in &batch.changes {
            let t = schema.table(&c.table).ok_or_else(|| {
                DbError::Schema(format!(
                    "table {} is not in the receiver's database {}",
                    c.table, schema.database
                ))
            })?;
            if !matches!(c.op.as_str(), "c" | "u" | "d") {
                return Err(DbError::BadRecord(format!("op {:?}", c.op)));
            }
            if t.key()
                .is_some_and(|k| c.row.get(k).is_some_and(|v| key_text(v) != c.key))
            {
                return Err(DbError::BadRecord(format!(
                    "{} {}: key and row differ",
                    c.table, c.key
                )));
            }
        }
        let end = Position::parse(&batch.end)
            .ok_or_else(|| DbError::BadRecord(format!("position {:?}", batch.end)))?;
        let _one = self.lock.lock().await;
        let mut conn = self.pool.get_conn().await?;
        let mut tx = conn.start_transaction(TxOpts::default()).await?;
        let cursor: Option<Option<String>> = tx
            .exec_first(
                "SELECT position FROM fhirsync_db_sites WHERE site = ? FOR UPDATE",
                (&batch.site,),
            )
            .await?;
        let Some(cursor) = cursor else {
            return Err(DbError::UnknownSite(batch.site.clone()));
        };
        // Changes the cursor covers were applied before (a batch sent
        // again, or cut differently by a sender that restarted).
        let covered = match cursor.as_deref().and_then(Position::parse) {
            Some(c) if !batch.snapshot => Some(c),
            _ => None,
        };
        let fresh: Vec<&Change> = batch
            .changes
            .iter()
            .filter(|c| {
                let at =
                    c.at.as_deref()
                        .and_then(Position::parse)
                        .unwrap_or_else(|| end.clone());
                covered.as_ref().is_none_or(|cur| at > *cur)
            })
            .collect();
        if let Some(c) = &covered {
            if end <= *c {
                return Ok(Applied {
                    duplicate: true,
                    position: Some(c.to_string()),
                    ..Applied::default()
                });
            }
        }
        let mut open: HashSet<(String, String)> = tx
            .query_map(
                "SELECT tbl, k FROM fhirsync_db_conflicts WHERE resolved_at IS NULL",
                |(t, k): (String, String)| (t, k),
            )
            .await?
            .into_iter()
            .collect();
        let local = self.local_state(&mut tx, &fresh).await?;
        let mut out = Applied::default();
        let mut seen: HashSet<(String, String)> = HashSet::new();
        let mut written: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let mut deferred = Vec::new();
        let mut w = Writes::default();
        self.prefetch_ids(&mut tx, &mut w, &fresh).await?;
        // Rows waiting for a parent: their later changes wait too.
        let mut waiting: HashSet<(String, String)> = HashSet::new();
        for c in fresh.iter().copied() {
            let id = (c.table.clone(), c.key.clone());
            if waiting.contains(&id) {
                deferred.push(c);
                continue;
            }
            if open.contains(&id) {
                tx.exec_drop(
                    "UPDATE fhirsync_db_conflicts SET incoming = ?, held = held + 1
                     WHERE tbl = ? AND k = ? AND resolved_at IS NULL",
                    (held_json(c, &batch.time_zone), &c.table, &c.key),
                )
                .await?;
                out.held += 1;
                continue;
            }
            if seen.insert(id.clone()) {
                if let Some(l) = local.get(&id).filter(|l| l.changed) {
                    let incoming = self.stamp(c.row.iter().map(|(k, v)| {
                        (k.as_str(), v.as_str().map(|s| convert(s, from, self.zone)))
                    }));
                    let older = match (&incoming, &l.stamp) {
                        (Some(i), Some(l)) => i < l,
                        // Without change times a local edit is never
                        // overwritten silently.
                        _ => true,
                    };
                    if older {
                        let row = self.local_row(&mut tx, &c.table, &c.key).await?;
                        tx.exec_drop(
                            "INSERT INTO fhirsync_db_conflicts (site, tbl, k, incoming, local_row, created_at)
                             VALUES (?, ?, ?, ?, ?, NOW(6))",
                            (&batch.site, &c.table, &c.key, held_json(c, &batch.time_zone), row.to_string()),
                        )
                        .await?;
                        tracing::warn!(site = %batch.site, table = %c.table, key = %c.key, "conflict: the row changed here after its last sync and the incoming version is older");
                        open.insert(id);
                        out.conflicts += 1;
                        continue;
                    }
                }
            }
            match self.write(&mut tx, &mut w, c, from).await {
                Ok(()) => {
                    written
                        .entry(c.table.clone())
                        .or_default()
                        .push(c.key.clone());
                    out.applied += 1;
                }
                Err(DbError::MissingParent { .. }) => {
                    waiting.insert(id);
                    deferred.push(c);
                }
                Err(e) => return Err(e),
            }
        }
        // Parents that came later in the batch than their children.
        self.flush(&mut tx, &mut w).await?;
        for c in deferred {
            self.write(&mut tx, &mut w, c, from).await?;
            written
                .entry(c.table.clone())
                .or_default()
                .push(c.key.clone());
            out.applied += 1;
        }
        self.flush(&mut tx, &mut w).await?;
        for (table, keys) in &written {
            self.record_synced(&mut tx, table, keys, &batch.site)
                .await?;
        }
        let moves = !batch.snapshot || batch.snapshot_done;
        tx.exec_drop(
            "UPDATE fhirsync_db_sites SET position = IF(?, ?, position), last_received_at = NOW(6),
               records = records + ?, batches = batches + 1, last_error = NULL WHERE site = ?",
            (moves, end.to_string(), fresh.len() as u64, &batch.site),
        )
        .await?;
        tx.commit().await?;
        out.position = Some(end.to_string());
        Ok(out)
    }

    /// The latest of a row's change columns.
    fn stamp<'a>(&self, row: impl Iterator<Item = (&'a str, Option<String>)>) -> Option<String> {
        row.filter(|(k, _)| self.change_columns.iter().any(|c| c == k))
            .filter_map(|(_, v)| v)
            .max()
    }

    /// For each row a batch touches and the receiver has: whether it
    /// changed here since its last sync, and its latest change time.
    async fn local_state(
        &self,
        tx: &mut Transaction<'_>,
        changes: &[&Change],
    ) -> Result<HashMap<(String, String), Local>, DbError> {
        let mut keys: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        let mut seen = HashSet::new();
        for c in changes {
            if seen.insert((c.table.as_str(), c.key.as_str())) {
                keys.entry(&c.table).or_default().push(&c.key);
            }
        }
        let schema = self.schema();
        let mut out = HashMap::new();
        for (table, keys) in keys {
            let t = &schema.tables[table];
            let key = t.key().unwrap_or("uuid");
            let stamps: Vec<&str> = self
                .change_columns
                .iter()
                .filter(|c| t.column(c).is_some())
                .map(String::as_str)
                .collect();
            let stamp_cols: String = stamps
                .iter()
                .map(|c| format!(", CAST(t.{} AS CHAR)", q(c)))
                .collect();
            for part in keys.chunks(500) {
                let sql = format!(
                    "SELECT CAST(t.{k} AS CHAR), {h} = r.hash{stamp_cols}
                     FROM {tab} t LEFT JOIN fhirsync_db_rows r ON r.tbl = ? AND r.k = CAST(t.{k} AS CHAR)
                     WHERE t.{k} IN ({p})",
                    k = q(key),
                    h = hash_expr(t),
                    tab = q(table),
                    p = placeholders(part.len())
                );
                let mut params: Vec<Value> = vec![table.into()];
                params.extend(part.iter().map(|k| Value::from(*k)));
                let rows: Vec<Row> = tx.exec(sql, params).await?;
                for r in rows {
                    let vals = r.unwrap();
                    let k = text(&vals[0]).unwrap_or_default();
                    let same: Option<i64> = text(&vals[1]).and_then(|s| s.parse().ok());
                    let stamp =
                        self.stamp(stamps.iter().zip(&vals[2..]).map(|(c, v)| (*c, text(v))));
                    out.insert(
                        (table.to_string(), k),
                        Local {
                            changed: same != Some(1),
                            stamp,
                        },
                    );
                }
            }
        }
        Ok(out)
    }

    async fn local_row(
        &self,
        tx: &mut Transaction<'_>,
        table: &str,
        key: &str,
    ) -> Result<Json, DbError> {
        let schema = self.schema();
        let t = &schema.tables[table];
        let cols: Vec<String> = t
            .columns
            .iter()
            .map(|c| format!("CAST({} AS CHAR)", q(&c.name)))
            .collect();
        let sql = format!(
            "SELECT {} FROM {} WHERE {} = ?",
            cols.join(", "),
            q(table),
            q(t.key().unwrap_or("uuid"))
        );
        let row: Option<Row> = tx.exec_first(sql, (key,)).await?;
        Ok(match row {
            None => Json::Null,
            Some(r) => {
                let mut m = Map::new();
                for (c, v) in t.columns.iter().zip(r.unwrap()) {
                    m.insert(
                        c.name.clone(),
                        text(&v).map(Json::String).unwrap_or(Json::Null),
                    );
                }
                Json::Object(m)
            }
        })
    }

    /// Remembers the rows as this sync wrote them.
    async fn record_synced(
        &self,
        tx: &mut Transaction<'_>,
        table: &str,
        keys: &[String],
        site: &str,
    ) -> Result<(), DbError> {
        let schema = self.schema();
        let t = &schema.tables[table];
        let k = q(t.key().unwrap_or("uuid"));
        let mut uniq: Vec<&String> = keys.iter().collect();
        uniq.sort();
        uniq.dedup();
        for part in uniq.chunks(500) {
            let sql = format!(
                "INSERT INTO fhirsync_db_rows (tbl, k, hash, site, synced_at)
                 SELECT ?, CAST(t.{k} AS CHAR), {h}, ?, NOW(6) FROM {tab} t WHERE t.{k} IN ({p})
                 ON DUPLICATE KEY UPDATE hash = VALUES(hash), site = VALUES(site), synced_at = VALUES(synced_at)",
                h = hash_expr(t),
                tab = q(table),
                p = placeholders(part.len())
            );
            let mut params: Vec<Value> = vec![table.into(), site.into()];
            params.extend(part.iter().map(|k| Value::from(k.as_str())));
            tx.exec_drop(sql, params).await?;
        }
        Ok(())
    }

    /// Writes one change: delete by key, or insert-or-update by key
    /// (queued in `w` while the next changes are upserts of the same
    /// table and columns).
    async fn write(
        &self,
        tx: &mut Transaction<'_>,
        w: &mut Writes,
        c: &Change,
        from: Zone,
    ) -> Result<(), DbError> {
        let schema = self.schema();
        let t = &schema.tables[&c.table];
        let key = t.key().unwrap_or("uuid");
        if c.op == "d" {
            self.flush(tx, w).await?;
            w.ids.remove(&(c.table.clone(), c.key.clone()));
            tx.exec_drop(
                format!("DELETE FROM {} WHERE {} = ?", q(&t.name), q(key)),
                (&c.key,),
            )
            .await?;
            tx.exec_drop(
                "DELETE FROM fhirsync_db_rows WHERE tbl = ? AND k = ?",
                (&c.table, &c.key),
            )
            .await?;
            return Ok(());
        }
        let mut cols = Vec::new();
        let mut params = Vec::new();
        for col in &t.columns {
            let Some(v) = c.row.get(&col.name).filter(|_| t.copied(&col.name)) else {
                continue;
            };
            let value = match schema.mapped_parent(t, &col.name) {
                Some(parent) if !v.is_null() => {
                    let uuid = c.refs.get(&col.name).ok_or_else(|| {
                        DbError::BadRecord(format!(
                            "{} {}: no parent uuid for {}",
                            c.table, c.key, col.name
                        ))
                    })?;
                    let mut id = self.local_id(tx, w, parent, uuid).await?;
                    if id.is_none() && w.pending.is_some() {
                        // The parent may be among the queued rows.
                        self.flush(tx, w).await?;
                        id = self.local_id(tx, w, parent, uuid).await?;
                    }
                    id.ok_or_else(|| DbError::MissingParent {
                        table: c.table.clone(),
                        key: c.key.clone(),
                        column: col.name.clone(),
                        parent: parent.name.clone(),
                        parent_key: uuid.clone(),
                    })?
                }
                _ => sql_value(v, col, from, self.zone),
            };
            cols.push(q(&col.name));
            params.push(value);
        }
        if cols.is_empty() {
            return Err(DbError::BadRecord(format!(
                "{} {}: no columns",
                c.table, c.key
            )));
        }
        match &mut w.pending {
            Some(p) if p.table == t.name && p.cols == cols => p.rows.push(params),
            _ => {
                self.flush(tx, w).await?;
                w.pending = Some(Pending {
                    table: t.name.clone(),
                    cols,
                    rows: vec![params],
                });
            }
        }
        Ok(())
    }

    /// Sends the queued upserts: one statement per up to 60,000 values.
    async fn flush(&self, tx: &mut Transaction<'_>, w: &mut Writes) -> Result<(), DbError> {
        let Some(p) = w.pending.take() else {
            return Ok(());
        };
        let updates: Vec<String> = p
            .cols
            .iter()
            .map(|c| format!("{c} = VALUES({c})"))
            .collect();
        let row = format!("({})", placeholders(p.cols.len()));
        for part in p.rows.chunks((60_000 / p.cols.len()).max(1)) {
            let sql = format!(
                "INSERT INTO {} ({}) VALUES {} ON DUPLICATE KEY UPDATE {}",
                q(&p.table),
                p.cols.join(", "),
                vec![row.as_str(); part.len()].join(","),
                updates.join(", ")
            );
            tx.exec_drop(sql, part.concat()).await?;
        }
        Ok(())
    }

    /// Looks up the local ids of the parents a batch refers to, 500 at a
    /// query (parents created by the batch itself are found later).
    async fn prefetch_ids(
        &self,
        tx: &mut Transaction<'_>,
        w: &mut Writes,
        changes: &[&Change],
    ) -> Result<(), DbError> {
        let schema = self.schema();
        let mut wanted: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for c in changes.iter().filter(|c| c.op != "d") {
            let t = &schema.tables[&c.table];
            for (col, uuid) in &c.refs {
                if let Some(parent) = schema.mapped_parent(t, col) {
                    wanted.entry(&parent.name).or_default().push(uuid);
                }
            }
        }
        for (parent, mut uuids) in wanted {
            uuids.sort_unstable();
            uuids.dedup();
            let pk = schema.tables[parent].pk.as_deref().unwrap_or("id");
            for part in uuids.chunks(500) {
                let sql = format!(
                    "SELECT CAST(uuid AS CHAR), {} FROM {} WHERE uuid IN ({})",
                    q(pk),
                    q(parent),
                    placeholders(part.len())
                );
                let params: Vec<Value> = part.iter().map(|u| Value::from(*u)).collect();
                let rows: Vec<(String, Value)> = tx.exec(sql, params).await?;
                for (uuid, id) in rows {
                    w.ids.insert((parent.to_string(), uuid), id);
                }
            }
        }
        Ok(())
    }

    async fn local_id(
        &self,
        tx: &mut Transaction<'_>,
        w: &mut Writes,
        parent: &Table,
        uuid: &str,
    ) -> Result<Option<Value>, DbError> {
        let k = (parent.name.clone(), uuid.to_string());
        if let Some(v) = w.ids.get(&k) {
            return Ok(Some(v.clone()));
        }
        let pk = parent.pk.as_deref().unwrap_or("id");
        let v: Option<Value> = tx
            .exec_first(
                format!("SELECT {} FROM {} WHERE uuid = ?", q(pk), q(&parent.name)),
                (uuid,),
            )
            .await?;
        if let Some(v) = &v {
            w.ids.insert(k, v.clone());
        }
        Ok(v)
    }

    pub async fn conflicts(&self, open_only: bool) -> Result<Vec<Conflict>, DbError> {
        let mut conn = self.pool.get_conn().await?;
        let sql = format!(
            "SELECT id, site, tbl, k, incoming, local_row, held, CAST(created_at AS CHAR),
               CAST(resolved_at AS CHAR), resolution FROM fhirsync_db_conflicts {} ORDER BY id",
            if open_only {
                "WHERE resolved_at IS NULL"
            } else {
                ""
            }
        );
        let rows: Vec<Row> = conn.query(sql).await?;
        Ok(rows
            .into_iter()
            .map(|r| self.shown(conflict_of(r)))
            .collect())
    }

    /// A conflict as people read it: both rows in this receiver's zone and
    /// typed by their columns (the stored incoming change, in its site's
    /// zone, is what a resolution applies).
    fn shown(&self, mut c: Conflict) -> Conflict {
        c.time_zone = self.zone.to_string();
        let schema = self.schema();
        let Some(t) = schema.table(&c.table) else {
            return c;
        };
        let site_zone = c.incoming["time_zone"]
            .as_str()
            .and_then(|z| Zone::parse(z).ok())
            .unwrap_or(self.zone);
        // A local id (the key is the uuid) is not synced: not shown either.
        let drop_local_id = |mut m: Map<String, Json>| {
            m.retain(|k, _| t.copied(k));
            Json::Object(m)
        };
        if let Some(row) = c.incoming["change"]["row"].as_object() {
            let shown = drop_local_id(crate::display::row(t, row, site_zone, self.zone));
            c.incoming["change"]["row"] = shown;
            c.incoming["site_time_zone"] = json!(site_zone.to_string());
            c.incoming["time_zone"] = json!(c.time_zone);
        }
        if let Some(row) = c.local.as_object() {
            c.local = drop_local_id(crate::display::row(t, row, self.zone, self.zone));
        }
        c
    }

    /// Ends a conflict keeping one version; the row syncs again after.
    pub async fn resolve(&self, id: i64, keep: Keep, by: &str) -> Result<(), DbError> {
        let _one = self.lock.lock().await;
        let mut conn = self.pool.get_conn().await?;
        let mut tx = conn.start_transaction(TxOpts::default()).await?;
        let row: Option<(String, String, String, String)> = tx
            .exec_first(
                "SELECT site, tbl, k, incoming FROM fhirsync_db_conflicts
                 WHERE id = ? AND resolved_at IS NULL FOR UPDATE",
                (id,),
            )
            .await?;
        let (site, table, key, incoming) = row.ok_or(DbError::NoConflict(id))?;
        if keep == Keep::Incoming {
            let held: Json =
                serde_json::from_str(&incoming).map_err(|e| DbError::BadRecord(e.to_string()))?;
            let from = Zone::parse(held["time_zone"].as_str().unwrap_or("UTC"))
                .map_err(DbError::BadRecord)?;
            let c: Change = serde_json::from_value(held["change"].clone())
                .map_err(|e| DbError::BadRecord(e.to_string()))?;
            let mut w = Writes::default();
            self.write(&mut tx, &mut w, &c, from).await?;
            self.flush(&mut tx, &mut w).await?;
        }
        if self.schema().table(&table).is_some() {
            self.record_synced(&mut tx, &table, std::slice::from_ref(&key), &site)
                .await?;
        }
        tx.exec_drop(
            "UPDATE fhirsync_db_conflicts SET resolved_at = NOW(6), resolution = ?, resolved_by = ? WHERE id = ?",
            (if keep == Keep::Incoming { "incoming" } else { "local" }, by, id),
        )
        .await?;
        tx.commit().await?;
        tracing::info!(id, %table, %key, ?keep, by, "conflict resolved");
        Ok(())
    }
}

/// A UTC DATETIME as the database prints it, in RFC 3339.
fn utc(t: String) -> String {
    format!("{}Z", t.replace(' ', "T"))
}

fn held_json(c: &Change, zone: &str) -> String {
    json!({"time_zone": zone, "change": c}).to_string()
}

fn conflict_of(mut r: Row) -> Conflict {
    let parse = |s: Option<String>| {
        s.and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(Json::Null)
    };
    Conflict {
        id: r.take(0).unwrap_or_default(),
        site: r.take(1).unwrap_or_default(),
        table: r.take(2).unwrap_or_default(),
        key: r.take(3).unwrap_or_default(),
        time_zone: String::new(),
        incoming: parse(r.take(4)),
        local: parse(r.take(5)),
        held: r.take(6).unwrap_or_default(),
        created_at: r.take::<String, _>(7).map(utc).unwrap_or_default(),
        resolved_at: r.take::<Option<String>, _>(8).flatten().map(utc),
        resolution: r.take(9).unwrap_or_default(),
    }
}

/// A key value as text (`uuid` strings, integer primary keys).
pub fn key_text(v: &Json) -> String {
    match v {
        Json::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A JSON value of a row as a parameter for column `col`.
fn sql_value(v: &Json, col: &crate::schema::Column, from: Zone, to: Zone) -> Value {
    match v {
        Json::Null => Value::NULL,
        Json::Bool(b) => Value::Int(*b as i64),
        Json::String(s) if col.data_type == "datetime" => {
            Value::Bytes(convert(s, from, to).into_bytes())
        }
        Json::String(s) => Value::Bytes(s.clone().into_bytes()),
        // The binlog carries an ENUM as its 1-based index.
        Json::Number(n) if !col.enum_values.is_empty() => n
            .as_u64()
            .and_then(|i| col.enum_values.get((i as usize).checked_sub(1)?))
            .map(|s| Value::Bytes(s.clone().into_bytes()))
            .unwrap_or(Value::Bytes(b"".to_vec())),
        Json::Number(n) => Value::Bytes(n.to_string().into_bytes()),
        Json::Object(o) => match o.get("$hex").and_then(Json::as_str) {
            Some(h) => Value::Bytes(
                (0..h.len() / 2)
                    .filter_map(|i| u8::from_str_radix(&h[2 * i..2 * i + 2], 16).ok())
                    .collect(),
            ),
            None => Value::Bytes(v.to_string().into_bytes()),
        },
        Json::Array(_) => Value::Bytes(v.to_string().into_bytes()),
    }
}
