//! SQL for `AuditEvent`s (one row each, with a reference index for patient
//! and entity searches) and for keys that may be used once (`jti`s).

use fhirsync_core::audit::{AuditKind, AuditRecord, Who};
use rusqlite::types::Value as Sql;
use rusqlite::{params, params_from_iter, Connection};
use serde_json::Value;

use crate::sync::AuditQuery;
use crate::StoreError;

/// Stores the record's fields; the AuditEvent JSON is made when read, so
/// the writer spends no time on it.
pub fn add_audit_event(conn: &Connection, r: &AuditRecord) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO audit_events (at_ms, kind, subtype, action, outcome, who, address,
                                   observer, entities, patients, query, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
    )?
    .execute(params![
        r.at_ms as i64,
        r.kind.as_str(),
        r.subtype,
        r.action.to_string(),
        r.outcome as i64,
        r.who.name(),
        r.address,
        r.observer,
        r.entities.join("\n"),
        r.patients.join("\n"),
        r.query,
        r.outcome_desc
    ])?;
    let aid = conn.last_insert_rowid();
    let mut ins =
        conn.prepare_cached("INSERT OR IGNORE INTO audit_event_refs (ref, aid) VALUES (?1, ?2)")?;
    for p in &r.patients {
        ins.execute(params![format!("patient|{p}"), aid])?;
    }
    for e in &r.entities {
        let plain = e.split("/_history/").next().unwrap_or(e);
        ins.execute(params![format!("entity|{plain}"), aid])?;
    }
    Ok(())
}

fn where_sql(q: &AuditQuery) -> (String, Vec<Sql>) {
    let mut sql = String::from(" WHERE 1 = 1");
    let mut args = Vec::new();
    let mut eq = |col: &str, v: &Option<String>, args: &mut Vec<Sql>| {
        if let Some(v) = v {
            sql.push_str(&format!(" AND {col} = ?"));
            args.push(Sql::Text(v.clone()));
        }
    };
    eq("kind", &q.kind, &mut args);
    eq("subtype", &q.subtype, &mut args);
    eq("action", &q.action, &mut args);
    eq("who", &q.agent, &mut args);
    if let Some(o) = q.outcome {
        sql.push_str(" AND outcome = ?");
        args.push(Sql::Integer(o as i64));
    }
    if let Some(t) = q.from_ms {
        sql.push_str(" AND at_ms >= ?");
        args.push(Sql::Integer(t as i64));
    }
    if let Some(t) = q.until_ms {
        sql.push_str(" AND at_ms < ?");
        args.push(Sql::Integer(t as i64));
    }
    for (prefix, v) in [("patient", &q.patient), ("entity", &q.entity)] {
        if let Some(v) = v {
            sql.push_str(" AND aid IN (SELECT aid FROM audit_event_refs WHERE ref = ?)");
            args.push(Sql::Text(format!("{prefix}|{v}")));
        }
    }
    (sql, args)
}

/// Matching events newest first, one page (`before`: ids below it).
pub fn audit_events(conn: &Connection, q: &AuditQuery) -> Result<Vec<Value>, StoreError> {
    let (mut w, mut args) = where_sql(q);
    if let Some(b) = q.before {
        w.push_str(" AND aid < ?");
        args.push(Sql::Integer(b as i64));
    }
    let sql = format!(
        "SELECT aid, at_ms, kind, subtype, action, outcome, who, address, observer, entities,
                patients, query, detail
         FROM audit_events{w} ORDER BY aid DESC LIMIT {}",
        q.count.max(1)
    );
    let mut st = conn.prepare(&sql)?;
    let lines = |s: String| -> Vec<String> {
        s.split('\n')
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let rows = st.query_map(params_from_iter(args), |r| {
        let aid = r.get::<_, i64>(0)? as u64;
        let rec = AuditRecord {
            at_ms: r.get::<_, i64>(1)? as u64,
            kind: AuditKind::parse(&r.get::<_, String>(2)?),
            subtype: r.get(3)?,
            action: r.get::<_, String>(4)?.chars().next().unwrap_or('E'),
            outcome: r.get::<_, i64>(5)? as u8,
            who: Who::parse(&r.get::<_, String>(6)?),
            address: r.get(7)?,
            observer: r.get(8)?,
            entities: lines(r.get(9)?),
            patients: lines(r.get(10)?),
            query: r.get(11)?,
            outcome_desc: r.get(12)?,
        };
        Ok(rec.to_fhir(aid))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// How many events match (paging ignored).
pub fn audit_event_count(conn: &Connection, q: &AuditQuery) -> Result<u64, StoreError> {
    let (w, args) = where_sql(q);
    let n: i64 = conn.query_row(
        &format!("SELECT count(*) FROM audit_events{w}"),
        params_from_iter(args),
        |r| r.get(0),
    )?;
    Ok(n as u64)
}

/// Records `key` as used until `until_ms`; `false` when it already is.
/// Keys whose time has passed are forgotten.
pub fn claim_once(
    conn: &Connection,
    key: &str,
    until_ms: u64,
    now_ms: u64,
) -> Result<bool, StoreError> {
    conn.prepare_cached("DELETE FROM used_once WHERE until_ms < ?1")?
        .execute([now_ms as i64])?;
    let n = conn
        .prepare_cached("INSERT OR IGNORE INTO used_once (key, until_ms) VALUES (?1, ?2)")?
        .execute(params![key, until_ms as i64])?;
    Ok(n == 1)
}
