//! SQL for `AuditEvent`s (one row each, with a reference index for patient
//! and entity searches) and for keys that may be used once (`jti`s).

use fhirsync_core::audit::{AuditKind, AuditRecord, Who};
use serde_json::Value;

use super::{all, int, n, ot, t, Db, Dialect, Sql};

use crate::sync::AuditQuery;
use crate::StoreError;

/// Stores the records' fields (the AuditEvent JSON is made when read, so
/// the writer spends no time on it), then their reference rows in key
/// order, so that each insert lands near the one before it. A resource
/// that is both a record's patient and one of its entities (a Patient
/// read or written) takes one row, `both|Patient/id`, not two.
pub fn add_audit_events(db: &dyn Db, records: &[AuditRecord]) -> Result<(), StoreError> {
    const INSERT: &str = "INSERT INTO audit_events (at_ms, kind, subtype, action, outcome, who,
                              address, observer, entities, patients, query, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)";
    let mut refs: Vec<(String, i64)> = Vec::new();
    for r in records {
        let args = [
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
        ];
        // SQLite's RETURNING opens a statement journal for each row.
        let aid = match db.dialect() {
            Dialect::Sqlite => {
                db.exec(INSERT, &args)?;
                int(db, "SELECT last_insert_rowid()", &[])?
            }
            Dialect::Postgres => int(db, &format!("{INSERT} RETURNING aid"), &args)?,
        };
        // sorted, so that each is looked up in the other list in log time
        let mut plain: Vec<&str> = r
            .entities
            .iter()
            .map(|e| e.split("/_history/").next().unwrap_or(e))
            .collect();
        plain.sort_unstable();
        let mut patients: Vec<&str> = r.patients.iter().map(String::as_str).collect();
        patients.sort_unstable();
        for p in &patients {
            let role = match plain.binary_search(p) {
                Ok(_) => "both",
                Err(_) => "patient",
            };
            refs.push((format!("{role}|{p}"), aid));
        }
        for e in &plain {
            if patients.binary_search(e).is_err() {
                refs.push((format!("entity|{e}"), aid));
            }
        }
    }
    refs.sort_unstable();
    refs.dedup();
    let ins = "INSERT INTO audit_event_refs (ref, aid) VALUES (?1, ?2) ON CONFLICT DO NOTHING";
    for (r, aid) in refs {
        db.exec(ins, &[Sql::Text(r), Sql::Integer(aid)])?;
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
            // `both|` rows name a resource that is the patient and an entity.
            sql.push_str(" AND aid IN (SELECT aid FROM audit_event_refs WHERE ref IN (?, ?))");
            args.push(Sql::Text(format!("{prefix}|{v}")));
            args.push(Sql::Text(format!("both|{v}")));
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
