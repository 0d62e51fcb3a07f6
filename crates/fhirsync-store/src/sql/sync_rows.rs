//! SQL for the replication bookkeeping tables (cursors, conflicts, dead
//! letters, audit, peers), shared by the writer and the reader pool.

use serde_json::Value;

use super::{all, first, int, n, on, ot, t, Db, Dialect, Row, Sql};

use crate::sync::*;
use crate::StoreError;

fn side(text: &str) -> Result<ConflictSide, StoreError> {
    serde_json::from_str::<Value>(text)
        .ok()
        .as_ref()
        .and_then(ConflictSide::from_json)
        .ok_or_else(|| StoreError::Backend("a stored conflict side is not readable".into()))
}

const CONFLICT_COLS: &str =
    "cid, type, id, state, edge, policy, created_ms, closed_ms, resolution, local, remote, ancestor";

fn row_to_conflict(r: &dyn Row) -> Result<Conflict, StoreError> {
    let state = r.text(3)?;
    let ancestor = r.opt_text(11)?;
    Ok(Conflict {
        id: r.i64(0)? as u64,
        rtype: r.text(1)?,
        rid: r.text(2)?,
        state: ConflictState::parse(&state).unwrap_or(ConflictState::Open),
        edge: r.text(4)?,
        policy: r.text(5)?,
        created_ms: r.i64(6)? as u64,
        closed_ms: r.opt_i64(7)?.map(|v| v as u64),
        resolution: r.opt_text(8)?,
        local: side(&r.text(9)?)?,
        remote: side(&r.text(10)?)?,
        ancestor: ancestor.as_deref().map(side).transpose()?,
    })
}

pub fn conflict(db: &dyn Db, id: u64) -> Result<Option<Conflict>, StoreError> {
    let sql = format!("SELECT {CONFLICT_COLS} FROM conflicts WHERE cid = ?1");
    first(db, &sql, &[n(id)], row_to_conflict)
}

/// A resource's open conflicts, oldest first (more than one when
/// concurrent versions came from several branches).
pub fn open_conflicts(db: &dyn Db, rtype: &str, id: &str) -> Result<Vec<Conflict>, StoreError> {
    let sql = format!(
        "SELECT {CONFLICT_COLS} FROM conflicts WHERE type = ?1 AND id = ?2 AND state = 'open' ORDER BY cid"
    );
    all(db, &sql, &[t(rtype), t(id)], row_to_conflict)
}

/// Inserts (`id == 0`) or updates a conflict; returns its id.
pub fn put_conflict(db: &dyn Db, c: &Conflict) -> Result<u64, StoreError> {
    let local = Sql::Text(c.local.to_json_text());
    let remote = Sql::Text(c.remote.to_json_text());
    let ancestor = c
        .ancestor
        .as_ref()
        .map_or(Sql::Null, |a| Sql::Text(a.to_json_text()));
    let closed = on(c.closed_ms);
    if c.id == 0 {
        let id = int(
            db,
            "INSERT INTO conflicts (type, id, state, edge, policy, created_ms, closed_ms, resolution, local, remote, ancestor)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) RETURNING cid",
            &[
                t(&c.rtype),
                t(&c.rid),
                t(c.state.as_str()),
                t(&c.edge),
                t(&c.policy),
                n(c.created_ms),
                closed,
                ot(c.resolution.as_deref()),
                local,
                remote,
                ancestor,
            ],
        )?;
        Ok(id as u64)
    } else {
        db.exec(
            "UPDATE conflicts SET state = ?2, closed_ms = ?3, resolution = ?4, local = ?5, remote = ?6, ancestor = ?7
             WHERE cid = ?1",
            &[
                n(c.id),
                t(c.state.as_str()),
                closed,
                ot(c.resolution.as_deref()),
                local,
                remote,
                ancestor,
            ],
        )?;
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

pub fn conflicts(db: &dyn Db, q: &ListQuery) -> Result<Vec<Conflict>, StoreError> {
    let (sql, args) = list_sql(
        &format!("SELECT {CONFLICT_COLS} FROM conflicts"),
        "cid",
        q,
        Some("state"),
    );
    all(db, &sql, &args, row_to_conflict)
}

pub fn cursor(db: &dyn Db, key: &str) -> Result<Option<u64>, StoreError> {
    Ok(first(
        db,
        "SELECT seq FROM cursors WHERE key = ?1",
        &[t(key)],
        |r| r.i64(0),
    )?
    .map(|v| v as u64))
}

pub fn cursors(db: &dyn Db) -> Result<Vec<(String, u64, u64)>, StoreError> {
    all(
        db,
        "SELECT key, seq, updated_ms FROM cursors ORDER BY key",
        &[],
        |r| Ok((r.text(0)?, r.i64(1)? as u64, r.i64(2)? as u64)),
    )
}

pub fn put_cursor(db: &dyn Db, key: &str, seq: u64, now_ms: u64) -> Result<(), StoreError> {
    db.exec(
        "INSERT INTO cursors (key, seq, updated_ms) VALUES (?1, ?2, ?3)
         ON CONFLICT(key) DO UPDATE SET seq = excluded.seq, updated_ms = excluded.updated_ms",
        &[t(key), n(seq), n(now_ms)],
    )?;
    Ok(())
}

pub fn peers(db: &dyn Db) -> Result<Vec<PeerInfo>, StoreError> {
    all(
        db,
        "SELECT node_id, first_ms, last_ms, last_seq_received, last_seq_sent FROM peers ORDER BY node_id",
        &[],
        |r| {
            Ok(PeerInfo {
                node_id: r.text(0)?,
                first_ms: r.i64(1)? as u64,
                last_ms: r.i64(2)? as u64,
                last_seq_received: r.i64(3)? as u64,
                last_seq_sent: r.i64(4)? as u64,
            })
        },
    )
}

/// Records contact with a peer; the seqs only ever grow.
pub fn put_peer(
    db: &dyn Db,
    node_id: &str,
    received: Option<u64>,
    sent: Option<u64>,
    now_ms: u64,
) -> Result<(), StoreError> {
    // the larger of two values: `max(a, b)` in SQLite, `greatest` elsewhere
    let max = match db.dialect() {
        Dialect::Sqlite => "max",
        Dialect::Postgres => "greatest",
    };
    let sql = format!(
        "INSERT INTO peers (node_id, first_ms, last_ms, last_seq_received, last_seq_sent)
         VALUES (?1, ?2, ?2, coalesce(?3, 0), coalesce(?4, 0))
         ON CONFLICT(node_id) DO UPDATE SET last_ms = excluded.last_ms,
           last_seq_received = {max}(peers.last_seq_received, excluded.last_seq_received),
           last_seq_sent = {max}(peers.last_seq_sent, excluded.last_seq_sent)"
    );
    db.exec(&sql, &[t(node_id), n(now_ms), on(received), on(sent)])?;
    Ok(())
}

const DL_COLS: &str = "did, created_ms, edge, direction, type, id, seq, record, error, attempts";

fn row_to_dead_letter(r: &dyn Row) -> Result<DeadLetter, StoreError> {
    let dir = r.text(3)?;
    Ok(DeadLetter {
        id: r.i64(0)? as u64,
        created_ms: r.i64(1)? as u64,
        letter: NewDeadLetter {
            edge: r.text(2)?,
            direction: Direction::parse(&dir).unwrap_or(Direction::Pull),
            rtype: r.text(4)?,
            rid: r.text(5)?,
            seq: r.i64(6)? as u64,
            record: r.text(7)?,
            error: r.text(8)?,
            attempts: r.i64(9)? as u32,
        },
    })
}

pub fn add_dead_letter(db: &dyn Db, l: &NewDeadLetter, now_ms: u64) -> Result<u64, StoreError> {
    let id = int(
        db,
        "INSERT INTO dead_letters (created_ms, edge, direction, type, id, seq, record, error, attempts)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9) RETURNING did",
        &[
            n(now_ms),
            t(&l.edge),
            t(l.direction.as_str()),
            t(&l.rtype),
            t(&l.rid),
            n(l.seq),
            t(&l.record),
            t(&l.error),
            n(l.attempts as u64),
        ],
    )?;
    Ok(id as u64)
}

pub fn dead_letter(db: &dyn Db, id: u64) -> Result<Option<DeadLetter>, StoreError> {
    let sql = format!("SELECT {DL_COLS} FROM dead_letters WHERE did = ?1");
    first(db, &sql, &[n(id)], row_to_dead_letter)
}

pub fn drop_dead_letter(db: &dyn Db, id: u64) -> Result<bool, StoreError> {
    Ok(db.exec("DELETE FROM dead_letters WHERE did = ?1", &[n(id)])? == 1)
}

pub fn dead_letters(db: &dyn Db, q: &ListQuery) -> Result<Vec<DeadLetter>, StoreError> {
    let (sql, args) = list_sql(
        &format!("SELECT {DL_COLS} FROM dead_letters"),
        "did",
        q,
        Some("direction"),
    );
    all(db, &sql, &args, row_to_dead_letter)
}

/// Open conflicts and dead letters, counted.
pub fn open_counts(db: &dyn Db) -> Result<(u64, u64), StoreError> {
    Ok((
        int(
            db,
            "SELECT COUNT(*) FROM conflicts WHERE state = 'open'",
            &[],
        )? as u64,
        int(db, "SELECT COUNT(*) FROM dead_letters", &[])? as u64,
    ))
}

pub fn add_audit(db: &dyn Db, a: &AuditEntry, now_ms: u64) -> Result<(), StoreError> {
    db.exec(
        "INSERT INTO audit (at_ms, edge, action, outcome, count, first_seq, last_seq, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        &[
            n(now_ms),
            t(&a.edge),
            t(&a.action),
            t(&a.outcome),
            n(a.count),
            on(a.first_seq),
            on(a.last_seq),
            t(&a.detail),
        ],
    )?;
    Ok(())
}

/// Audit lines newest first; `state` filters on the action.
pub fn audit(db: &dyn Db, q: &ListQuery) -> Result<Vec<AuditEntry>, StoreError> {
    let (sql, args) = list_sql(
        "SELECT aid, at_ms, edge, action, outcome, count, first_seq, last_seq, detail FROM audit",
        "aid",
        q,
        Some("action"),
    );
    all(db, &sql, &args, |r| {
        Ok(AuditEntry {
            id: r.i64(0)? as u64,
            at_ms: r.i64(1)? as u64,
            edge: r.text(2)?,
            action: r.text(3)?,
            outcome: r.text(4)?,
            count: r.i64(5)? as u64,
            first_seq: r.opt_i64(6)?.map(|v| v as u64),
            last_seq: r.opt_i64(7)?.map(|v| v as u64),
            detail: r.text(8)?,
        })
    })
}

pub fn add_sub_event(db: &dyn Db, e: &SubEvent) -> Result<(), StoreError> {
    db.exec(
        "INSERT INTO sub_events (sub, num, seq, type, id, vid, deleted, at_ms)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        &[
            t(&e.sub),
            n(e.num),
            n(e.seq),
            t(&e.rtype),
            t(&e.rid),
            n(e.vid),
            n(e.deleted as u64),
            n(e.at_ms),
        ],
    )?;
    Ok(())
}

pub fn sub_events(
    db: &dyn Db,
    sub: &str,
    from: u64,
    until: u64,
    limit: usize,
) -> Result<Vec<SubEvent>, StoreError> {
    let until = until.min(i64::MAX as u64);
    all(
        db,
        "SELECT num, seq, type, id, vid, deleted, at_ms FROM sub_events
         WHERE sub = ?1 AND num >= ?2 AND num <= ?3 ORDER BY num LIMIT ?4",
        &[t(sub), n(from), n(until), n(limit as u64)],
        |r| {
            Ok(SubEvent {
                sub: sub.to_owned(),
                num: r.i64(0)? as u64,
                seq: r.i64(1)? as u64,
                rtype: r.text(2)?,
                rid: r.text(3)?,
                vid: r.i64(4)? as u64,
                deleted: r.bool(5)?,
                at_ms: r.i64(6)? as u64,
            })
        },
    )
}
