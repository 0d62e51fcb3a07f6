//! `fhirsync migrate`: a SQLite node moved into an empty PostgreSQL
//! database with everything it has (versions with their `seq`s, vectors
//! and HLCs, the search index, cursors, conflicts, dead letters, audit,
//! subscription events, peers), in one transaction, so that the node
//! keeps its identity and its log and its peers notice nothing.

use std::path::Path;

use rusqlite::{Connection, OpenFlags};

use super::conn::PgConn;
use super::log::{advance_head, lock_head, Head};
use super::{connect, schema, PgConfig};
use crate::sql::{int, Db, Sql};
use crate::StoreError;

/// Every table moved, with its columns (the same on both backends), and
/// its identity column, whose sequence continues after the moved rows.
const TABLES: &[(&str, &str, Option<&str>)] = &[
    (
        "versions",
        "seq, type, id, vid, lu_ms, deleted, method, origin, vv, hlc, hash, superseded, body, via",
        None,
    ),
    ("tokens", "param, value, system, seq", None),
    ("strings", "param, norm, raw, seq", None),
    ("dates", "param, lo, hi, seq", None),
    ("numbers", "param, value, system, code, seq", None),
    (
        "composites",
        "param, a_val, a_sys, b_val, b_sys, b_lo, b_hi, seq",
        None,
    ),
    ("cursors", "key, seq, updated_ms", None),
    (
        "conflicts",
        "cid, type, id, state, edge, policy, created_ms, closed_ms, resolution, local, remote, ancestor",
        Some("cid"),
    ),
    (
        "dead_letters",
        "did, created_ms, edge, direction, type, id, seq, record, error, attempts",
        Some("did"),
    ),
    (
        "audit",
        "aid, at_ms, edge, action, outcome, count, first_seq, last_seq, detail",
        Some("aid"),
    ),
    (
        "sub_events",
        "sub, num, seq, type, id, vid, deleted, at_ms",
        None,
    ),
    (
        "audit_events",
        "aid, at_ms, kind, subtype, action, outcome, who, address, observer, entities, patients, query, detail",
        Some("aid"),
    ),
    ("audit_event_refs", "ref, aid", None),
    ("used_once", "key, until_ms", None),
    (
        "peers",
        "node_id, first_ms, last_ms, last_seq_received, last_seq_sent",
        None,
    ),
];

/// Most parameters of one statement (PostgreSQL allows 65,535).
const PARAMS_PER_STATEMENT: usize = 30_000;

/// Rows moved per table, in [`TABLES`] order.
pub type Moved = Vec<(&'static str, u64)>;

/// Moves the SQLite store at `db` (no process may have it open) into the
/// database of `cfg`, which must hold no node yet. Returns the node id
/// and the rows moved per table; `progress(table, rows)` is told as it goes.
pub fn migrate(
    db: &Path,
    cfg: &PgConfig,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<(String, Moved), StoreError> {
    if !db.is_file() {
        return Err(StoreError::NotFound(format!(
            "no store at {}",
            db.display()
        )));
    }
    let src = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    let node_id: String = src
        .query_row(
            "SELECT value FROM node_info WHERE key = 'node_id'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| StoreError::Backend(format!("{}: no node id ({e})", db.display())))?;
    let version = crate::sqlite::reindex::index_version(&src)?;
    if version != Some(crate::sqlite::schema::INDEX_VERSION) {
        return Err(StoreError::State(format!(
            "the search index of {} is out of date: run `fhirsync reindex` (or start the node once) first",
            db.display()
        )));
    }
    let mut client = connect(cfg)?;
    schema::migrate(&mut client)?;
    let pg = PgConn::new(client);
    pg.batch("BEGIN")?;
    let r = (|| {
        let head = lock_head(&mut *pg.client())?;
        let versions = int(&pg, "SELECT count(*) FROM versions", &[])?;
        let owner = crate::sql::first(
            &pg,
            "SELECT value FROM node_info WHERE key = 'node_id'",
            &[],
            |r| r.text(0),
        )?;
        if versions > 0 || head.seq > 0 || owner.is_some() {
            return Err(StoreError::State(format!(
                "the target database is not empty ({versions} versions{}): migrate only into a new database",
                owner.map(|o| format!(", node '{o}'")).unwrap_or_default()
            )));
        }
        let mut moved = Vec::new();
        for (table, cols, identity) in TABLES {
            let n = copy_table(&src, &pg, table, cols)?;
            if let Some(id) = identity {
                pg.exec(
                    &format!(
                        "SELECT setval(pg_get_serial_sequence('{table}', '{id}'), \
                         coalesce((SELECT max({id}) FROM {table}), 0) + 1, false)"
                    ),
                    &[],
                )?;
            }
            progress(table, n);
            moved.push((*table, n));
        }
        pg.exec(
            "INSERT INTO node_info (key, value) VALUES ('node_id', ?1)",
            &[Sql::Text(node_id.clone())],
        )?;
        let seq = int(&pg, "SELECT coalesce(max(seq), 0) FROM versions", &[])? as u64;
        let hlc = int(&pg, "SELECT coalesce(max(hlc), 0) FROM versions", &[])? as u64;
        advance_head(&mut *pg.client(), Head { seq, hlc })?;
        Ok(moved)
    })();
    match r {
        Ok(moved) => {
            pg.batch("COMMIT")?;
            Ok((node_id, moved))
        }
        Err(e) => {
            let _ = pg.batch("ROLLBACK");
            Err(e)
        }
    }
}

/// Copies every row of one table in multi-row inserts; returns the rows.
fn copy_table(src: &Connection, pg: &PgConn, table: &str, cols: &str) -> Result<u64, StoreError> {
    let ncols = cols.split(", ").count();
    let per = (PARAMS_PER_STATEMENT / ncols).max(1);
    let mut st = src.prepare(&format!("SELECT {cols} FROM {table}"))?;
    let mut rows = st.query([])?;
    let mut batch: Vec<Sql> = Vec::with_capacity(per * ncols);
    let mut n = 0u64;
    let flush = |batch: &mut Vec<Sql>| -> Result<(), StoreError> {
        if batch.is_empty() {
            return Ok(());
        }
        let row = format!("({})", vec!["?"; ncols].join(", "));
        let values = vec![row; batch.len() / ncols].join(", ");
        pg.exec(
            &format!("INSERT INTO {table} ({cols}) VALUES {values}"),
            batch,
        )?;
        batch.clear();
        Ok(())
    };
    while let Some(r) = rows.next()? {
        for i in 0..ncols {
            batch.push(r.get::<_, Sql>(i)?);
        }
        n += 1;
        if batch.len() >= per * ncols {
            flush(&mut batch)?;
        }
    }
    flush(&mut batch)?;
    Ok(n)
}
