//! Read queries, shared by the reader pool and the writer (which must see
//! its own uncommitted writes inside a transaction).

use std::sync::Arc;

use fhirsync_core::search::{Prefix, SearchQuery, SortOrder, TotalMode};
use fhirsync_core::{Hlc, ResourceKey, VersionVector};
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

/// The WHERE clause of a search at `snapshot`, without paging.
fn search_where(q: &SearchQuery, snapshot: u64) -> (String, Vec<Sql>) {
    let mut w =
        String::from("v.seq <= ? AND (v.superseded IS NULL OR v.superseded > ?) AND v.deleted = 0");
    let mut a = vec![Sql::Integer(snapshot as i64), Sql::Integer(snapshot as i64)];
    if let Some(t) = &q.rtype {
        w.push_str(" AND v.type = ?");
        a.push(Sql::Text(t.clone()));
    }
    for ids in &q.ids {
        w.push_str(" AND v.id IN (");
        for (i, id) in ids.iter().enumerate() {
            w.push_str(if i == 0 { "?" } else { ",?" });
            a.push(Sql::Text(id.clone()));
        }
        w.push(')');
    }
    for d in &q.last_updated {
        let (cond, vals): (&str, Vec<i64>) = match d.prefix {
            Prefix::Eq => (
                " AND v.lu_ms >= ? AND v.lu_ms < ?",
                vec![d.start_ms, d.end_ms],
            ),
            Prefix::Gt => (" AND v.lu_ms >= ?", vec![d.end_ms]),
            Prefix::Ge => (" AND v.lu_ms >= ?", vec![d.start_ms]),
            Prefix::Lt => (" AND v.lu_ms < ?", vec![d.start_ms]),
            Prefix::Le => (" AND v.lu_ms < ?", vec![d.end_ms]),
        };
        w.push_str(cond);
        a.extend(vals.into_iter().map(Sql::Integer));
    }
    for t in &q.tokens {
        w.push_str(" AND v.seq IN (SELECT seq FROM tokens WHERE param = ? AND (");
        a.push(Sql::Text(t.param.to_owned()));
        for (i, m) in t.any_of.iter().enumerate() {
            if i > 0 {
                w.push_str(" OR ");
            }
            match (&m.system, &m.value) {
                (Some(s), Some(v)) => {
                    w.push_str("(value = ? AND system = ?)");
                    a.push(Sql::Text(v.clone()));
                    a.push(Sql::Text(s.clone()));
                }
                (None, Some(v)) => {
                    w.push_str("value = ?");
                    a.push(Sql::Text(v.clone()));
                }
                (Some(s), None) => {
                    w.push_str("system = ?");
                    a.push(Sql::Text(s.clone()));
                }
                (None, None) => w.push('1'),
            }
        }
        w.push_str("))");
    }
    (w, a)
}

pub fn search(conn: &Connection, q: &SearchQuery) -> Result<SearchPage, StoreError> {
    let snapshot = match q.snapshot {
        Some(s) => s,
        None => last_seq(conn)?,
    };
    let (w, args) = search_where(q, snapshot);
    // A snapshot's total does not change: later pages carry the first one's.
    let carried = q
        .snapshot
        .and(q.snapshot_total)
        .filter(|_| !q.summary_count);
    let total = if let Some(t) = carried.filter(|_| q.total == TotalMode::Accurate) {
        Some(t)
    } else if q.total == TotalMode::Accurate || q.summary_count {
        let sql = format!("SELECT count(*) FROM versions v WHERE {w}");
        let n: i64 = conn
            .prepare_cached(&sql)?
            .query_row(params_from_iter(args.iter()), |r| r.get(0))?;
        Some(n as u64)
    } else {
        None
    };
    if q.summary_count {
        return Ok(SearchPage {
            snapshot,
            total,
            items: Vec::new(),
            next_cursor: None,
        });
    }
    let (cmp, order) = match q.sort {
        SortOrder::Ascending => (">", "ASC"),
        SortOrder::Descending => ("<", "DESC"),
    };
    let mut sql = format!("SELECT {COLS} FROM versions v WHERE {w}");
    let mut args = args;
    if let Some(c) = q.cursor {
        sql.push_str(&format!(" AND v.seq {cmp} ?"));
        args.push(Sql::Integer(c as i64));
    }
    sql.push_str(&format!(" ORDER BY v.seq {order} LIMIT {}", q.count + 1));
    let mut st = conn.prepare_cached(&sql)?;
    let mut items: Vec<StoredVersion> = st
        .query_map(params_from_iter(args), row_to_version)?
        .collect::<Result<_, _>>()?;
    let next_cursor = if items.len() > q.count {
        items.truncate(q.count);
        items.last().map(|v| v.seq)
    } else {
        None
    };
    Ok(SearchPage {
        snapshot,
        total,
        items,
        next_cursor,
    })
}

/// Keys of current resources matching `q` (for conditional operations).
pub fn matches(
    conn: &Connection,
    q: &SearchQuery,
    limit: usize,
) -> Result<Vec<ResourceKey>, StoreError> {
    let snapshot = last_seq(conn)?;
    let (w, args) = search_where(q, snapshot);
    let sql = format!("SELECT v.type, v.id FROM versions v WHERE {w} LIMIT {limit}");
    let mut st = conn.prepare_cached(&sql)?;
    let rows = st.query_map(params_from_iter(args), |r| {
        Ok(ResourceKey::new(
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
