//! Read queries, shared by the reader pool and the writer (which must see
//! its own uncommitted writes inside a transaction).

use std::sync::Arc;

use fhirsync_core::{Hlc, VersionVector};
use rusqlite::types::Value as Sql;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};

use crate::types::*;
use crate::StoreError;

pub const COLS: &str = "seq, type, id, vid, lu_ms, deleted, method, origin, vv, hlc, body";

pub fn row_to_version(row: &Row<'_>) -> rusqlite::Result<StoredVersion> {
    let vv: String = row.get(8)?;
    let method: String = row.get(6)?;
    let body: Option<String> = row.get(10)?;
    Ok(StoredVersion {
        seq: row.get::<_, i64>(0)? as u64,
        rtype: row.get(1)?,
        id: row.get(2)?,
        vid: row.get::<_, i64>(3)? as u64,
        last_updated_ms: row.get::<_, i64>(4)? as u64,
        deleted: row.get::<_, i64>(5)? != 0,
        method: Method::parse(&method).unwrap_or(Method::Put),
        origin: row.get(7)?,
        vv: VersionVector::from_json(&vv).unwrap_or_default(),
        hlc: Hlc::from_packed(row.get::<_, i64>(9)? as u64),
        body: body.map(Arc::from),
    })
}

pub fn last_seq(conn: &Connection) -> Result<u64, StoreError> {
    let s: i64 = conn
        .prepare_cached("SELECT coalesce(max(seq), 0) FROM versions")?
        .query_row([], |r| r.get(0))?;
    Ok(s as u64)
}

pub fn read_current(
    conn: &Connection,
    rtype: &str,
    id: &str,
) -> Result<Option<StoredVersion>, StoreError> {
    let sql =
        format!("SELECT {COLS} FROM versions WHERE type = ?1 AND id = ?2 AND superseded IS NULL");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row(params![rtype, id], row_to_version)
        .optional()?)
}

pub fn vread(
    conn: &Connection,
    rtype: &str,
    id: &str,
    vid: u64,
) -> Result<Option<StoredVersion>, StoreError> {
    let sql = format!("SELECT {COLS} FROM versions WHERE type = ?1 AND id = ?2 AND vid = ?3");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row(params![rtype, id, vid as i64], row_to_version)
        .optional()?)
}

pub fn history(conn: &Connection, q: &HistoryQuery) -> Result<Vec<StoredVersion>, StoreError> {
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
    let mut st = conn.prepare_cached(&sql)?;
    let rows = st.query_map(params_from_iter(args), row_to_version)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn lineage(
    conn: &Connection,
    rtype: &str,
    id: &str,
    limit: usize,
) -> Result<Vec<StoredVersion>, StoreError> {
    let sql = format!(
        "SELECT {COLS} FROM versions WHERE type = ?1 AND id = ?2 ORDER BY vid DESC LIMIT {limit}"
    );
    let mut st = conn.prepare_cached(&sql)?;
    let rows = st.query_map(params![rtype, id], row_to_version)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn changes(conn: &Connection, q: &ChangesQuery) -> Result<Vec<StoredVersion>, StoreError> {
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
    let mut st = conn.prepare_cached(&sql)?;
    let rows = st.query_map(params_from_iter(args), row_to_version)?;
    Ok(rows.collect::<Result<_, _>>()?)
}
