//! SQL for `AuditEvent`s (one row each, with a reference index for patient
//! and entity searches) and for keys that may be used once (`jti`s).

use fhirsync_core::audit::{AuditKind, AuditRecord, Who};
use serde_json::Value;

use super::{all, int, n, ot, t, Db, Sql};

use crate::sync::AuditQuery;
use crate::StoreError;

/// Stores the record's fields; the AuditEvent JSON is made when read, so
/// the writer spends no time on it.
pub fn add_audit_event(db: &dyn Db, r: &AuditRecord) -> Result<(), StoreError> {
    let aid = int(
        db,
        "INSERT INTO audit_events (at_ms, kind, subtype, action, outcome, who, address,
                                   observer, entities, patients, query, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12) RETURNING aid",
        &[
            n(r.at_ms),
            t(r.kind.as_str()),
            t(&r.subtype),
            Sql::Text(r.action.to_string()),
            n(r.outcome as u64),
            Sql::Text(r.who.name()),
            ot(r.address.as_deref()),
            t(&r.observer),
            Sql::Text(r.entities.join("\n")),
            Sql::Text(r.patients.join("\n")),
            ot(r.query.as_deref()),
            ot(r.outcome_desc.as_deref()),
        ],
    )?;
    let ins = "INSERT INTO audit_event_refs (ref, aid) VALUES (?1, ?2) ON CONFLICT DO NOTHING";
    for p in &r.patients {
        db.exec(ins, &[Sql::Text(format!("patient|{p}")), Sql::Integer(aid)])?;
    }
    for e in &r.entities {
        let plain = e.split("/_history/").next().unwrap_or(e);
        db.exec(
            ins,
            &[Sql::Text(format!("entity|{plain}")), Sql::Integer(aid)],
        )?;
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
pub fn audit_events(db: &dyn Db, q: &AuditQuery) -> Result<Vec<Value>, StoreError> {
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
    let lines = |s: String| -> Vec<String> {
        s.split('\n')
            .filter(|x| !x.is_empty())
            .map(str::to_owned)
            .collect()
    };
    all(db, &sql, &args, |r| {
        let aid = r.i64(0)? as u64;
        let rec = AuditRecord {
            at_ms: r.i64(1)? as u64,
            kind: AuditKind::parse(&r.text(2)?),
            subtype: r.text(3)?,
            action: r.text(4)?.chars().next().unwrap_or('E'),
            outcome: r.i64(5)? as u8,
            who: Who::parse(&r.text(6)?),
            address: r.opt_text(7)?,
            observer: r.text(8)?,
            entities: lines(r.text(9)?),
            patients: lines(r.text(10)?),
            query: r.opt_text(11)?,
            outcome_desc: r.opt_text(12)?,
        };
        Ok(rec.to_fhir(aid))
    })
}

/// How many events match (paging ignored).
pub fn audit_event_count(db: &dyn Db, q: &AuditQuery) -> Result<u64, StoreError> {
    let (w, args) = where_sql(q);
    Ok(int(db, &format!("SELECT count(*) FROM audit_events{w}"), &args)? as u64)
}

/// Records `key` as used until `until_ms`; `false` when it already is.
/// Keys whose time has passed are forgotten.
pub fn claim_once(db: &dyn Db, key: &str, until_ms: u64, now_ms: u64) -> Result<bool, StoreError> {
    db.exec("DELETE FROM used_once WHERE until_ms < ?1", &[n(now_ms)])?;
    let added = db.exec(
        "INSERT INTO used_once (key, until_ms) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        &[t(key), n(until_ms)],
    )?;
    Ok(added == 1)
}
