//! Reads a MySQL/MariaDB binlog as a replica would and turns the row
//! changes of the followed tables into change records, one committed
//! transaction at a time. A transaction's `end` is the binlog position
//! after its commit: resuming there repeats nothing and skips nothing.

use std::collections::BTreeMap;

use futures_util::StreamExt;
use mysql_async::binlog::events::{EventData, OptionalMetadataField, RowsEventData, TableMapEvent};
use mysql_async::binlog::row::BinlogRow;
use mysql_async::binlog::value::BinlogValue;
use mysql_async::consts::ColumnType;
use mysql_async::prelude::Queryable;
use mysql_async::{BinlogStream, BinlogStreamRequest, Conn, Opts, Value};
use serde_json::{json, Map, Value as Json};

use crate::tz::epoch_to_utc;

/// A place in the binlog: file and byte offset of the next event.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Position {
    pub file: String,
    pub pos: u64,
}

impl std::fmt::Display for Position {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.file, self.pos)
    }
}

/// c, u or d.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Create,
    Update,
    Delete,
}

impl Op {
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Create => "c",
            Op::Update => "u",
            Op::Delete => "d",
        }
    }
}

/// One row change of a followed table.
#[derive(Debug, Clone, PartialEq)]
pub struct RowChange {
    pub database: String,
    pub table: String,
    pub op: Op,
    /// The row after the change (before it, for a delete), by column name.
    pub row: Map<String, Json>,
}

/// The row changes of one committed transaction.
#[derive(Debug, Clone)]
pub struct Transaction {
    pub changes: Vec<RowChange>,
    /// Where the next transaction starts.
    pub end: Position,
}

#[derive(Debug, thiserror::Error)]
pub enum BinlogError {
    #[error("cannot connect to {0}: {1}")]
    Connect(String, String),
    #[error("binlog_format is {0}, not ROW: set binlog_format=ROW on the server (and restart the sender)")]
    NotRow(String),
    #[error("binlog_row_metadata is {0}, not FULL: set binlog_row_metadata=FULL so row events carry column names")]
    NoColumnNames(String),
    #[error("the binlog is off on the server: start it with log_bin")]
    NoBinlog,
    #[error("binlog file {0} is no longer on the server (purged): take a new snapshot with --snapshot, then follow from its position")]
    Purged(String),
    #[error("the user may not read the binlog: GRANT REPLICATION SLAVE, REPLICATION CLIENT ON *.* TO the sender's user ({0})")]
    Privileges(String),
    #[error("binlog: {0}")]
    Stream(String),
}

fn mysql_err(e: mysql_async::Error) -> BinlogError {
    let s = e.to_string();
    if s.contains("1227") || s.contains("1045") || s.to_lowercase().contains("access denied") {
        BinlogError::Privileges(s)
    } else if s.contains("1236") {
        BinlogError::Purged(s)
    } else {
        BinlogError::Stream(s)
    }
}

/// Checks the server's settings; answers its current position.
pub async fn check_server(conn: &mut Conn) -> Result<Position, BinlogError> {
    let (log_bin, format, meta): (Option<String>, Option<String>, Option<String>) = conn
        .query_first("SELECT @@log_bin, @@binlog_format, @@binlog_row_metadata")
        .await
        .map_err(mysql_err)?
        .unwrap_or_default();
    if log_bin.as_deref() != Some("1") && log_bin.as_deref() != Some("ON") {
        return Err(BinlogError::NoBinlog);
    }
    let format = format.unwrap_or_default();
    if format != "ROW" {
        return Err(BinlogError::NotRow(format));
    }
    let meta = meta.unwrap_or_default();
    if meta != "FULL" {
        return Err(BinlogError::NoColumnNames(meta));
    }
    current_position(conn).await
}

/// `SHOW MASTER STATUS`.
pub async fn current_position(conn: &mut Conn) -> Result<Position, BinlogError> {
    let row: Option<(String, u64)> = conn
        .query_first("SHOW MASTER STATUS")
        .await
        .map_err(mysql_err)?
        .map(|r: mysql_async::Row| mysql_async::from_row_opt(r).map_err(|e| e.to_string()))
        .transpose()
        .map_err(BinlogError::Stream)?
        .map(|(f, p, _, _): (String, u64, String, String)| (f, p));
    row.map(|(file, pos)| Position { file, pos })
        .ok_or(BinlogError::NoBinlog)
}

/// A binlog follower of some tables (`db.table`; empty: all).
pub struct Reader {
    stream: BinlogStream,
    tables: Vec<String>,
    file: String,
    pending: Vec<RowChange>,
}

impl Reader {
    /// Connects as replica `server_id` and reads from `start`. The
    /// position's file must still be on the server.
    pub async fn open(
        url: &str,
        server_id: u32,
        start: &Position,
        tables: Vec<String>,
    ) -> Result<Reader, BinlogError> {
        let opts =
            Opts::from_url(url).map_err(|e| BinlogError::Connect(url.into(), e.to_string()))?;
        let mut conn = Conn::new(opts)
            .await
            .map_err(|e| BinlogError::Connect(url.into(), e.to_string()))?;
        check_server(&mut conn).await?;
        let files: Vec<String> = conn
            .query_map("SHOW BINARY LOGS", |r: mysql_async::Row| {
                r.get::<String, _>(0).unwrap_or_default()
            })
            .await
            .map_err(mysql_err)?;
        if !files.contains(&start.file) {
            return Err(BinlogError::Purged(start.file.clone()));
        }
        let req = BinlogStreamRequest::new(server_id)
            .with_filename(start.file.as_bytes())
            .with_pos(start.pos);
        let stream = conn.get_binlog_stream(req).await.map_err(mysql_err)?;
        Ok(Reader {
            stream,
            tables,
            file: start.file.clone(),
            pending: Vec::new(),
        })
    }

    fn follows(&self, db: &str, table: &str) -> bool {
        self.tables.is_empty() || self.tables.iter().any(|t| *t == format!("{db}.{table}"))
    }

    /// The next committed transaction that touched a followed table;
    /// waits for one.
    pub async fn next(&mut self) -> Result<Transaction, BinlogError> {
        while let Some(ev) = self.stream.next().await {
            let ev = ev.map_err(mysql_err)?;
            let next_pos = ev.header().log_pos() as u64;
            let data = ev
                .read_data()
                .map_err(|e| BinlogError::Stream(e.to_string()))?;
            match data {
                // The server's artificial rotate (position 0) at the start
                // names the file asked for, and arrives before the format
                // event that says whether events end in a checksum; only a
                // real rotate moves to the next file.
                Some(EventData::RotateEvent(r)) if next_pos != 0 => {
                    self.file = r.name().into_owned();
                }
                Some(EventData::RowsEvent(rows)) => {
                    let Some(tme) = self.stream.get_tme(rows.table_id()) else {
                        continue;
                    };
                    let (db, table) = (
                        tme.database_name().into_owned(),
                        tme.table_name().into_owned(),
                    );
                    if !self.follows(&db, &table) {
                        continue;
                    }
                    let names = column_names(tme);
                    let op =
                        match rows {
                            RowsEventData::WriteRowsEvent(_)
                            | RowsEventData::WriteRowsEventV1(_) => Op::Create,
                            RowsEventData::DeleteRowsEvent(_)
                            | RowsEventData::DeleteRowsEventV1(_) => Op::Delete,
                            _ => Op::Update,
                        };
                    let mut out = Vec::new();
                    for r in rows.rows(tme) {
                        let (before, after) = r.map_err(|e| BinlogError::Stream(e.to_string()))?;
                        let row = if op == Op::Delete { before } else { after };
                        if let Some(row) = row {
                            out.push(RowChange {
                                database: db.clone(),
                                table: table.clone(),
                                op,
                                row: row_json(row, &names, tme),
                            });
                        }
                    }
                    self.pending.extend(out);
                }
                Some(EventData::XidEvent(_)) => {
                    if let Some(t) = self.commit(next_pos) {
                        return Ok(t);
                    }
                }
                Some(EventData::QueryEvent(q)) if q.query().eq_ignore_ascii_case("COMMIT") => {
                    if let Some(t) = self.commit(next_pos) {
                        return Ok(t);
                    }
                }
                _ => {}
            }
        }
        Err(BinlogError::Stream(
            "the server closed the binlog stream".into(),
        ))
    }

    fn commit(&mut self, next_pos: u64) -> Option<Transaction> {
        if self.pending.is_empty() {
            return None;
        }
        Some(Transaction {
            changes: std::mem::take(&mut self.pending),
            end: Position {
                file: self.file.clone(),
                pos: next_pos,
            },
        })
    }
}

fn column_names(tme: &TableMapEvent<'_>) -> Vec<String> {
    for m in tme.iter_optional_meta().flatten() {
        if let OptionalMetadataField::ColumnName(names) = m {
            return names
                .iter_names()
                .filter_map(Result::ok)
                .map(|n| n.name().into_owned())
                .collect();
        }
    }
    (0..tme.columns_count())
        .map(|i| format!("col{i}"))
        .collect()
}

/// A row as JSON by column name. DATETIME and TIMESTAMP are
/// `YYYY-MM-DD hh:mm:ss[.ffffff]` (TIMESTAMP in UTC), DATE `YYYY-MM-DD`,
/// TIME `hh:mm:ss`, text as strings, other bytes as `{"$hex"}`.
fn row_json(row: BinlogRow, names: &[String], tme: &TableMapEvent<'_>) -> Map<String, Json> {
    let mut out = Map::new();
    for (i, v) in row.unwrap().into_iter().enumerate() {
        let name = names.get(i).cloned().unwrap_or_else(|| format!("col{i}"));
        let ty = tme.get_column_type(i).ok().flatten();
        out.insert(name, value_json(v, ty));
    }
    out
}

fn value_json(v: BinlogValue<'_>, ty: Option<ColumnType>) -> Json {
    let v = match v {
        BinlogValue::Value(v) => v,
        other => return Json::String(format!("{other:?}")),
    };
    match v {
        Value::NULL => Json::Null,
        Value::Int(i) => json!(i),
        Value::UInt(u) => json!(u),
        Value::Float(f) => json!(f),
        Value::Double(d) => json!(d),
        Value::Bytes(b)
            if matches!(
                ty,
                Some(ColumnType::MYSQL_TYPE_TIMESTAMP | ColumnType::MYSQL_TYPE_TIMESTAMP2)
            ) =>
        {
            let s = String::from_utf8_lossy(&b);
            epoch_to_utc(&s).map(Json::String).unwrap_or(Json::Null)
        }
        Value::Bytes(b) => bytes_json(b),
        Value::Date(y, mo, d, h, mi, s, us) => {
            if matches!(
                ty,
                Some(ColumnType::MYSQL_TYPE_DATE | ColumnType::MYSQL_TYPE_NEWDATE)
            ) {
                json!(format!("{y:04}-{mo:02}-{d:02}"))
            } else if us > 0 {
                json!(format!(
                    "{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}.{us:06}"
                ))
            } else {
                json!(format!("{y:04}-{mo:02}-{d:02} {h:02}:{mi:02}:{s:02}"))
            }
        }
        Value::Time(neg, days, h, mi, s, us) => {
            let hours = days * 24 + h as u32;
            let sign = if neg { "-" } else { "" };
            if us > 0 {
                json!(format!("{sign}{hours:02}:{mi:02}:{s:02}.{us:06}"))
            } else {
                json!(format!("{sign}{hours:02}:{mi:02}:{s:02}"))
            }
        }
    }
}

/// Text as a string; bytes that are not UTF-8 as `{"$hex": "..."}`.
pub fn bytes_json(b: Vec<u8>) -> Json {
    match String::from_utf8(b) {
        Ok(s) => Json::String(s),
        Err(e) => {
            json!({"$hex": e.as_bytes().iter().map(|b| format!("{b:02x}")).collect::<String>()})
        }
    }
}

/// Column values of a row change, sorted by name (for comparisons).
pub fn sorted(row: &Map<String, Json>) -> BTreeMap<String, Json> {
    row.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}
