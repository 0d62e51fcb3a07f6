//! Read queries, shared by the reader pool and the writer (which must see
//! its own uncommitted writes inside a transaction).

use std::sync::Arc;

use super::{all, first, int, n, t, Db, Row, Sql};
use fhirsync_core::{Hlc, VersionVector};

use crate::types::*;
use crate::StoreError;

pub const COLS: &str = "seq, type, id, vid, lu_ms, deleted, method, origin, vv, hlc, body";

pub fn row_to_version(row: &dyn Row) -> Result<StoredVersion, StoreError> {
    let vv = row.text(8)?;
    let method = row.text(6)?;
    let body = row.opt_text(10)?;
    Ok(StoredVersion {
        seq: row.i64(0)? as u64,
        rtype: row.text(1)?,
        id: row.text(2)?,
        vid: row.i64(3)? as u64,
        last_updated_ms: row.i64(4)? as u64,
        deleted: row.bool(5)?,
        method: Method::parse(&method).unwrap_or(Method::Put),
        origin: row.text(7)?,
        vv: VersionVector::from_json(&vv).unwrap_or_default(),
        hlc: Hlc::from_packed(row.i64(9)? as u64),
        body: body.map(Arc::from),
    })
}

pub fn last_seq(db: &dyn Db) -> Result<u64, StoreError> {
    Ok(int(db, "SELECT coalesce(max(seq), 0) FROM versions", &[])? as u64)
}

pub fn read_current(
    db: &dyn Db,
    rtype: &str,
    id: &str,
) -> Result<Option<StoredVersion>, StoreError> {
    let sql =
        format!("SELECT {COLS} FROM versions WHERE type = ?1 AND id = ?2 AND superseded IS NULL");
    first(db, &sql, &[t(rtype), t(id)], row_to_version)
}

pub fn vread(
    db: &dyn Db,
    rtype: &str,
    id: &str,
    vid: u64,
) -> Result<Option<StoredVersion>, StoreError> {
    let sql = format!("SELECT {COLS} FROM versions WHERE type = ?1 AND id = ?2 AND vid = ?3");
    first(db, &sql, &[t(rtype), t(id), n(vid)], row_to_version)
}

pub fn history(db: &dyn Db, q: &HistoryQuery) -> Result<Vec<StoredVersion>, StoreError> {
    let mut sql = format!("SELECT {COLS} FROM versions WHERE seq < ?1 AND lu_ms >= ?2");
    let mut args: Vec<Sql> = vec![
        Sql::Integer(q.before.map(|b| b as i64).unwrap_or(i64::MAX)),
        Sql::Integer(q.since_ms.unwrap_or(i64::MIN)),
    ];
    match &q.scope {
        HistoryScope::System => {}
        HistoryScope::Type(t) => {
            sql.push_str(" AND type = ?3");
            args.push(Sql::Text(t.clone()));
        }
        HistoryScope::Instance(t, id) => {
            sql.push_str(" AND type = ?3 AND id = ?4");
            args.push(Sql::Text(t.clone()));
            args.push(Sql::Text(id.clone()));
        }
    }
    sql.push_str(&format!(" ORDER BY seq DESC LIMIT {}", q.count));
    all(db, &sql, &args, row_to_version)
}

pub fn lineage(
    db: &dyn Db,
    rtype: &str,
    id: &str,
    limit: usize,
) -> Result<Vec<StoredVersion>, StoreError> {
    let sql = format!(
        "SELECT {COLS} FROM versions WHERE type = ?1 AND id = ?2 ORDER BY vid DESC LIMIT {limit}"
    );
    all(db, &sql, &[t(rtype), t(id)], row_to_version)
}

pub fn changes(db: &dyn Db, q: &ChangesQuery) -> Result<Vec<StoredVersion>, StoreError> {
    let mut sql = format!("SELECT {COLS} FROM versions WHERE seq > ?1");
    let mut args: Vec<Sql> = vec![Sql::Integer(q.since as i64)];
    if !q.types.is_empty() {
        sql.push_str(" AND type IN (");
        for (i, t) in q.types.iter().enumerate() {
            sql.push_str(if i == 0 { "?" } else { ",?" });
            args.push(Sql::Text(t.clone()));
        }
        sql.push(')');
    }
    if let Some(v) = &q.exclude_via {
        sql.push_str(" AND (via IS NULL OR via <> ?)");
        args.push(Sql::Text(v.clone()));
    }
    sql.push_str(&format!(" ORDER BY seq LIMIT {}", q.count));
    all(db, &sql, &args, row_to_version)
}
