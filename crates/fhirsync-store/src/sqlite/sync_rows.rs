//! SQL for the replication bookkeeping tables (cursors, conflicts, dead
//! letters, audit, peers), shared by the writer and the reader pool.

use rusqlite::types::Value as Sql;
use rusqlite::{params, params_from_iter, Connection, OptionalExtension, Row};
use serde_json::Value;

use crate::sync::*;
use crate::StoreError;

fn side(text: &str) -> rusqlite::Result<ConflictSide> {
    serde_json::from_str::<Value>(text)
        .ok()
        .as_ref()
        .and_then(ConflictSide::from_json)
        .ok_or_else(|| {
            rusqlite::Error::InvalidColumnType(0, "side".into(), rusqlite::types::Type::Text)
        })
}

const CONFLICT_COLS: &str =
    "cid, type, id, state, edge, policy, created_ms, closed_ms, resolution, local, remote, ancestor";

fn row_to_conflict(r: &Row<'_>) -> rusqlite::Result<Conflict> {
    let state: String = r.get(3)?;
    let ancestor: Option<String> = r.get(11)?;
    Ok(Conflict {
        id: r.get::<_, i64>(0)? as u64,
        rtype: r.get(1)?,
        rid: r.get(2)?,
        state: ConflictState::parse(&state).unwrap_or(ConflictState::Open),
        edge: r.get(4)?,
        policy: r.get(5)?,
        created_ms: r.get::<_, i64>(6)? as u64,
        closed_ms: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
        resolution: r.get(8)?,
        local: side(&r.get::<_, String>(9)?)?,
        remote: side(&r.get::<_, String>(10)?)?,
        ancestor: ancestor.as_deref().map(side).transpose()?,
    })
}

pub fn conflict(conn: &Connection, id: u64) -> Result<Option<Conflict>, StoreError> {
    let sql = format!("SELECT {CONFLICT_COLS} FROM conflicts WHERE cid = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id as i64], row_to_conflict)
        .optional()?)
}

pub fn open_conflict(
    conn: &Connection,
    rtype: &str,
    id: &str,
) -> Result<Option<Conflict>, StoreError> {
    let sql = format!(
        "SELECT {CONFLICT_COLS} FROM conflicts WHERE type = ?1 AND id = ?2 AND state = 'open'"
    );
    Ok(conn
        .prepare_cached(&sql)?
        .query_row(params![rtype, id], row_to_conflict)
        .optional()?)
}

/// Inserts (`id == 0`) or updates a conflict; returns its id.
pub fn put_conflict(conn: &Connection, c: &Conflict) -> Result<u64, StoreError> {
    let local = c.local.to_json().to_string();
    let remote = c.remote.to_json().to_string();
    let ancestor = c.ancestor.as_ref().map(|a| a.to_json().to_string());
    let closed = c.closed_ms.map(|v| v as i64);
    if c.id == 0 {
        conn.prepare_cached(
            "INSERT INTO conflicts (type, id, state, edge, policy, created_ms, closed_ms, resolution, local, remote, ancestor)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11)",
        )?
        .execute(params![
            c.rtype,
            c.rid,
            c.state.as_str(),
            c.edge,
            c.policy,
            c.created_ms as i64,
            closed,
            c.resolution,
            local,
            remote,
            ancestor
        ])?;
        Ok(conn.last_insert_rowid() as u64)
    } else {
        conn.prepare_cached(
            "UPDATE conflicts SET state = ?2, closed_ms = ?3, resolution = ?4, local = ?5, remote = ?6, ancestor = ?7
             WHERE cid = ?1",
        )?
        .execute(params![
            c.id as i64,
            c.state.as_str(),
            closed,
            c.resolution,
            local,
            remote,
            ancestor
        ])?;
        Ok(c.id)
    }
}

/// Appends `WHERE`-clauses of a [`ListQuery`] for a table whose id column is `idcol`.
fn list_sql(base: &str, idcol: &str, q: &ListQuery, state_col: Option<&str>) -> (String, Vec<Sql>) {
    let mut sql = format!("{base} WHERE 1 = 1");
    let mut args = Vec::new();
    if let (Some(s), Some(col)) = (&q.state, state_col) {
        sql.push_str(&format!(" AND {col} = ?"));
        args.push(Sql::Text(s.clone()));
    }
    if let Some(e) = &q.edge {
        sql.push_str(" AND edge = ?");
        args.push(Sql::Text(e.clone()));
    }
    if let Some(b) = q.before {
        sql.push_str(&format!(" AND {idcol} < ?"));
        args.push(Sql::Integer(b as i64));
    }
    sql.push_str(&format!(" ORDER BY {idcol} DESC LIMIT {}", q.count.max(1)));
    (sql, args)
}

pub fn conflicts(conn: &Connection, q: &ListQuery) -> Result<Vec<Conflict>, StoreError> {
    let (sql, args) = list_sql(
        &format!("SELECT {CONFLICT_COLS} FROM conflicts"),
        "cid",
        q,
        Some("state"),
    );
    let mut st = conn.prepare(&sql)?;
    let rows = st.query_map(params_from_iter(args), row_to_conflict)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn cursor(conn: &Connection, key: &str) -> Result<Option<u64>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT seq FROM cursors WHERE key = ?1")?
        .query_row([key], |r| r.get::<_, i64>(0))
        .optional()?
        .map(|v| v as u64))
}

pub fn cursors(conn: &Connection) -> Result<Vec<(String, u64, u64)>, StoreError> {
    let mut st = conn.prepare_cached("SELECT key, seq, updated_ms FROM cursors ORDER BY key")?;
    let rows = st.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, i64>(1)? as u64,
            r.get::<_, i64>(2)? as u64,
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn put_cursor(conn: &Connection, key: &str, seq: u64, now_ms: u64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO cursors (key, seq, updated_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT(key) DO UPDATE SET seq = excluded.seq, updated_ms = excluded.updated_ms",
    )?
    .execute(params![key, seq as i64, now_ms as i64])?;
    Ok(())
}

pub fn peers(conn: &Connection) -> Result<Vec<PeerInfo>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT node_id, first_ms, last_ms, last_seq_received, last_seq_sent FROM peers ORDER BY node_id",
    )?;
    let rows = st.query_map([], |r| {
        Ok(PeerInfo {
            node_id: r.get(0)?,
            first_ms: r.get::<_, i64>(1)? as u64,
            last_ms: r.get::<_, i64>(2)? as u64,
            last_seq_received: r.get::<_, i64>(3)? as u64,
            last_seq_sent: r.get::<_, i64>(4)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Records contact with a peer; the seqs only ever grow.
pub fn put_peer(
    conn: &Connection,
    node_id: &str,
    received: Option<u64>,
    sent: Option<u64>,
    now_ms: u64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO peers (node_id, first_ms, last_ms, last_seq_received, last_seq_sent)
         VALUES (?1, ?2, ?2, coalesce(?3, 0), coalesce(?4, 0))
         ON CONFLICT(node_id) DO UPDATE SET last_ms = excluded.last_ms,
           last_seq_received = max(last_seq_received, excluded.last_seq_received),
           last_seq_sent = max(last_seq_sent, excluded.last_seq_sent)",
    )?
    .execute(params![
        node_id,
        now_ms as i64,
        received.map(|v| v as i64),
        sent.map(|v| v as i64)
    ])?;
    Ok(())
}

const DL_COLS: &str = "did, created_ms, edge, direction, type, id, seq, record, error, attempts";

fn row_to_dead_letter(r: &Row<'_>) -> rusqlite::Result<DeadLetter> {
    let dir: String = r.get(3)?;
    Ok(DeadLetter {
        id: r.get::<_, i64>(0)? as u64,
        created_ms: r.get::<_, i64>(1)? as u64,
        letter: NewDeadLetter {
            edge: r.get(2)?,
            direction: Direction::parse(&dir).unwrap_or(Direction::Pull),
            rtype: r.get(4)?,
            rid: r.get(5)?,
            seq: r.get::<_, i64>(6)? as u64,
            record: r.get(7)?,
            error: r.get(8)?,
            attempts: r.get::<_, i64>(9)? as u32,
        },
    })
}

pub fn add_dead_letter(
    conn: &Connection,
    l: &NewDeadLetter,
    now_ms: u64,
) -> Result<u64, StoreError> {
    conn.prepare_cached(
        "INSERT INTO dead_letters (created_ms, edge, direction, type, id, seq, record, error, attempts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?
    .execute(params![
        now_ms as i64,
        l.edge,
        l.direction.as_str(),
        l.rtype,
        l.rid,
        l.seq as i64,
        l.record,
        l.error,
        l.attempts as i64
    ])?;
    Ok(conn.last_insert_rowid() as u64)
}

pub fn dead_letter(conn: &Connection, id: u64) -> Result<Option<DeadLetter>, StoreError> {
    let sql = format!("SELECT {DL_COLS} FROM dead_letters WHERE did = ?1");
    Ok(conn
        .prepare_cached(&sql)?
        .query_row([id as i64], row_to_dead_letter)
        .optional()?)
}

pub fn drop_dead_letter(conn: &Connection, id: u64) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("DELETE FROM dead_letters WHERE did = ?1")?
        .execute([id as i64])?
        == 1)
}

pub fn dead_letters(conn: &Connection, q: &ListQuery) -> Result<Vec<DeadLetter>, StoreError> {
    let (sql, args) = list_sql(
        &format!("SELECT {DL_COLS} FROM dead_letters"),
        "did",
        q,
        Some("direction"),
    );
    let mut st = conn.prepare(&sql)?;
    let rows = st.query_map(params_from_iter(args), row_to_dead_letter)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Open conflicts and dead letters, counted.
pub fn open_counts(conn: &Connection) -> Result<(u64, u64), StoreError> {
    let count = |sql: &str| -> Result<u64, StoreError> {
        Ok(conn
            .prepare_cached(sql)?
            .query_row([], |r| r.get::<_, i64>(0))? as u64)
    };
    Ok((
        count("SELECT COUNT(*) FROM conflicts WHERE state = 'open'")?,
        count("SELECT COUNT(*) FROM dead_letters")?,
    ))
}

pub fn add_audit(conn: &Connection, a: &AuditEntry, now_ms: u64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO audit (at_ms, edge, action, outcome, count, first_seq, last_seq, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        now_ms as i64,
        a.edge,
        a.action,
        a.outcome,
        a.count as i64,
        a.first_seq.map(|v| v as i64),
        a.last_seq.map(|v| v as i64),
        a.detail
    ])?;
    Ok(())
}

/// Audit lines newest first; `state` filters on the action.
pub fn audit(conn: &Connection, q: &ListQuery) -> Result<Vec<AuditEntry>, StoreError> {
    let (sql, args) = list_sql(
        "SELECT aid, at_ms, edge, action, outcome, count, first_seq, last_seq, detail FROM audit",
        "aid",
        q,
        Some("action"),
    );
    let mut st = conn.prepare(&sql)?;
    let rows = st.query_map(params_from_iter(args), |r| {
        Ok(AuditEntry {
            id: r.get::<_, i64>(0)? as u64,
            at_ms: r.get::<_, i64>(1)? as u64,
            edge: r.get(2)?,
            action: r.get(3)?,
            outcome: r.get(4)?,
            count: r.get::<_, i64>(5)? as u64,
            first_seq: r.get::<_, Option<i64>>(6)?.map(|v| v as u64),
            last_seq: r.get::<_, Option<i64>>(7)?.map(|v| v as u64),
            detail: r.get(8)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn add_sub_event(conn: &Connection, e: &SubEvent) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO sub_events (sub, num, seq, type, id, vid, deleted, at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
        e.sub,
        e.num as i64,
        e.seq as i64,
        e.rtype,
        e.rid,
        e.vid as i64,
        e.deleted,
        e.at_ms as i64
    ])?;
    Ok(())
}

pub fn sub_events(
    conn: &Connection,
    sub: &str,
    from: u64,
    until: u64,
    limit: usize,
) -> Result<Vec<SubEvent>, StoreError> {
    let mut st = conn.prepare_cached(
        "SELECT num, seq, type, id, vid, deleted, at_ms FROM sub_events
         WHERE sub = ?1 AND num >= ?2 AND num <= ?3 ORDER BY num LIMIT ?4",
    )?;
    let until = until.min(i64::MAX as u64) as i64;
    let rows = st.query_map(params![sub, from as i64, until, limit as i64], |r| {
        Ok(SubEvent {
            sub: sub.to_owned(),
            num: r.get::<_, i64>(0)? as u64,
            seq: r.get::<_, i64>(1)? as u64,
            rtype: r.get(2)?,
            rid: r.get(3)?,
            vid: r.get::<_, i64>(4)? as u64,
            deleted: r.get(5)?,
            at_ms: r.get::<_, i64>(6)? as u64,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
