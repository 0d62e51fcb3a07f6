//! Versions appended in bulk: the writer's new rows wait in the
//! connection ([`super::conn::PgConn::append`]) until the next statement
//! of any kind, then go in together, by `COPY … (FORMAT binary)` when
//! there are enough of them. Every statement flushes first, so what a
//! transaction reads always includes what it wrote.

use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};
use postgres::{Client, Statement};

use crate::StoreError;

/// Fewer rows than this go in by `INSERT`, one statement each (a `COPY`
/// costs an extra round trip).
pub const COPY_ROWS_MIN: usize = 8;

/// A new row of `versions`.
#[derive(Debug, Clone)]
pub struct VersionRow {
    pub seq: i64,
    pub rtype: String,
    pub id: String,
    pub vid: i64,
    pub lu_ms: i64,
    pub deleted: i16,
    pub method: &'static str,
    pub origin: String,
    pub vv: String,
    pub hlc: i64,
    pub hash: Option<Vec<u8>>,
    pub body: Option<String>,
    pub via: Option<String>,
}

const COLUMNS: &str =
    "seq, type, id, vid, lu_ms, deleted, method, origin, vv, hlc, hash, body, via";

const TYPES: [Type; 13] = [
    Type::INT8,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::INT8,
    Type::INT2,
    Type::TEXT,
    Type::TEXT,
    Type::TEXT,
    Type::INT8,
    Type::BYTEA,
    Type::TEXT,
    Type::TEXT,
];

impl VersionRow {
    fn values(&self) -> [&(dyn ToSql + Sync); 13] {
        [
            &self.seq,
            &self.rtype,
            &self.id,
            &self.vid,
            &self.lu_ms,
            &self.deleted,
            &self.method,
            &self.origin,
            &self.vv,
            &self.hlc,
            &self.hash,
            &self.body,
            &self.via,
        ]
    }
}

/// The statement of one row (PostgreSQL's own placeholders, which the
/// connection's translation leaves alone).
pub const INSERT: &str = "INSERT INTO versions (seq, type, id, vid, lu_ms, deleted, method, origin, vv, hlc, hash, body, via) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)";

/// Writes `rows` into `versions`: by `insert` (the prepared [`INSERT`])
/// when they are few, else by one `COPY`.
pub fn write(
    client: &mut Client,
    insert: &Statement,
    rows: &[VersionRow],
) -> Result<(), StoreError> {
    if rows.len() < COPY_ROWS_MIN {
        for r in rows {
            client.execute(insert, &r.values())?;
        }
        return Ok(());
    }
    let sink = client.copy_in(&format!(
        "COPY versions ({COLUMNS}) FROM STDIN (FORMAT binary)"
    ))?;
    let mut w = BinaryCopyInWriter::new(sink, &TYPES);
    for r in rows {
        w.write(&r.values())?;
    }
    w.finish()?;
    Ok(())
}
