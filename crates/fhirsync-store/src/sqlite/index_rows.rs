//! The search index tables: writing a version's entries and deleting
//! those of a range of versions (for reindexing).

use fhirsync_core::index::{IndexEntry, Key};
use rusqlite::{params, CachedStatement, Connection};

use crate::{StoreError, WriteRequest};

/// The index tables, each with a `seq` column.
pub const TABLES: &[&str] = &["tokens", "strings", "dates", "numbers", "composites"];

/// Writes the entries of version `seq`.
pub fn insert(conn: &Connection, seq: u64, entries: &[IndexEntry]) -> Result<(), StoreError> {
    if entries.is_empty() {
        return Ok(());
    }
    write_rows(conn, entries.iter().map(|e| (seq, e)))
}

/// Writes rows, fastest in key order (each B-tree page touched once).
fn write_rows<'e>(
    conn: &Connection,
    rows: impl Iterator<Item = (u64, &'e IndexEntry)>,
) -> Result<(), StoreError> {
    let mut ins = Inserter::new(conn)?;
    for (seq, e) in rows {
        ins.put(seq, e)?;
    }
    Ok(())
}

/// The five insert statements, prepared once for many rows.
struct Inserter<'c> {
    token: CachedStatement<'c>,
    text: CachedStatement<'c>,
    date: CachedStatement<'c>,
    number: CachedStatement<'c>,
    composite: CachedStatement<'c>,
}

impl<'c> Inserter<'c> {
    fn new(conn: &'c Connection) -> Result<Self, StoreError> {
        Ok(Inserter {
            token: conn.prepare_cached(
                "INSERT OR IGNORE INTO tokens (param, value, system, seq) VALUES (?1, ?2, ?3, ?4)",
            )?,
            text: conn.prepare_cached(
                "INSERT OR IGNORE INTO strings (param, norm, raw, seq) VALUES (?1, ?2, ?3, ?4)",
            )?,
            date: conn.prepare_cached(
                "INSERT OR IGNORE INTO dates (param, lo, hi, seq) VALUES (?1, ?2, ?3, ?4)",
            )?,
            number: conn.prepare_cached(
                "INSERT OR IGNORE INTO numbers (param, value, system, code, seq) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?,
            composite: conn.prepare_cached(
                "INSERT OR IGNORE INTO composites (param, a_val, a_sys, b_val, b_sys, b_lo, b_hi, seq) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            )?,
        })
    }

    fn put(&mut self, seq: u64, e: &IndexEntry) -> Result<(), StoreError> {
        let seq = seq as i64;
        let p: &str = &e.param;
        match &e.key {
            Key::Token { system, value } => self.token.execute(params![p, value, system, seq])?,
            Key::Text { norm, raw } => self.text.execute(params![p, norm, raw, seq])?,
            Key::Date { lo, hi } => self.date.execute(params![p, lo, hi, seq])?,
            Key::Number {
                value,
                system,
                code,
            } => self.number.execute(params![p, value, system, code, seq])?,
            Key::Composite {
                a_sys,
                a_val,
                b_sys,
                b_val,
                b_lo,
                b_hi,
            } => self
                .composite
                .execute(params![p, a_val, a_sys, b_val, b_sys, b_lo, b_hi, seq])?,
        };
        Ok(())
    }
}

/// Deletes every entry (a reindex of everything starts with it).
pub fn clear(conn: &Connection) -> Result<(), StoreError> {
    for t in TABLES {
        conn.execute(&format!("DELETE FROM {t}"), [])?;
    }
    Ok(())
}

/// Entries held back to be written in key order: inserting a whole batch
/// sorted by table and key touches each B-tree page once instead of once
/// per resource.
#[derive(Default)]
pub struct Pending(Vec<(u64, IndexEntry)>);

impl Pending {
    pub fn add(&mut self, seq: u64, entries: Vec<IndexEntry>) {
        self.0.extend(entries.into_iter().map(|e| (seq, e)));
    }

    /// How many entries are held.
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Drops the entries held after the first `n`.
    pub fn truncate(&mut self, n: usize) {
        self.0.truncate(n);
    }

    /// Writes what is held, in key order.
    pub fn flush(&mut self, conn: &Connection) -> Result<(), StoreError> {
        if self.0.is_empty() {
            return Ok(());
        }
        let mut rows = std::mem::take(&mut self.0);
        rows.sort_unstable_by(|(sa, a), (sb, b)| order(a, b).then(sa.cmp(sb)));
        write_rows(conn, rows.iter().map(|(seq, e)| (*seq, e)))
    }
}

/// The index entries of a streamed batch's requests, taken out of them and
/// sorted in key order before the batch reaches the writer (sorting is a
/// sixth of the writer's time otherwise). Each row names its request by
/// position; the writer gives it the `seq` of the version that request
/// wrote, so the rows stay in (key, seq) order.
#[derive(Default)]
pub struct Presorted(Vec<(u32, IndexEntry)>);

impl Presorted {
    /// Takes the entries of the resources in `reqs` (leaving theirs empty)
    /// and sorts them, in parallel. A batch with a request that searches
    /// (a conditional one, a Bundle) keeps its entries: that search must
    /// find the rows of the requests before it, which the writer then
    /// writes as it goes.
    pub fn take(reqs: &mut [WriteRequest]) -> Presorted {
        use rayon::slice::ParallelSliceMut;
        let plain = |r: &WriteRequest| {
            matches!(
                r,
                WriteRequest::Create {
                    if_none_exist: None,
                    ..
                } | WriteRequest::Update { .. }
                    | WriteRequest::Delete { .. }
            )
        };
        if !reqs.iter().all(plain) {
            return Presorted::default();
        }
        let mut rows = Vec::new();
        for (i, r) in reqs.iter_mut().enumerate() {
            let (WriteRequest::Create { res, .. } | WriteRequest::Update { res, .. }) = r else {
                continue;
            };
            rows.extend(
                std::mem::take(&mut res.index)
                    .into_iter()
                    .map(|e| (i as u32, e)),
            );
        }
        rows.par_sort_unstable_by(|(ia, a), (ib, b)| order(a, b).then(ia.cmp(ib)));
        Presorted(rows)
    }

    /// Writes the rows of the requests that wrote a version (`seqs[i]`).
    pub fn write(self, conn: &Connection, seqs: &[Option<u64>]) -> Result<(), StoreError> {
        write_rows(conn, self.rows(seqs))
    }

    /// The rows of the requests that wrote a version (`seqs[i]`), with
    /// that version's `seq`, in key order.
    pub fn rows<'a>(
        &'a self,
        seqs: &'a [Option<u64>],
    ) -> impl Iterator<Item = (u64, &'a IndexEntry)> + 'a {
        self.0
            .iter()
            .filter_map(|(i, e)| match seqs.get(*i as usize) {
                Some(Some(seq)) => Some((*seq, e)),
                _ => None,
            })
    }
}

/// The order of entries in their tables' keys (table first).
fn order(a: &IndexEntry, b: &IndexEntry) -> std::cmp::Ordering {
    a.key
        .rank()
        .cmp(&b.key.rank())
        .then_with(|| a.param.cmp(&b.param))
        .then_with(|| a.key.order(&b.key))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn entries(i: u64) -> Vec<IndexEntry> {
        let p: Arc<str> = Arc::from("p");
        let keys = vec![
            Key::Token {
                system: "s".into(),
                value: format!("v{}", i % 7),
            },
            Key::Text {
                norm: format!("n{i}"),
                raw: format!("N{i}"),
            },
            Key::Date {
                lo: i as i64,
                hi: i as i64 + 1,
            },
            Key::Number {
                value: i as f64 / 3.0,
                system: "u".into(),
                code: "mg".into(),
            },
            Key::Composite {
                a_sys: "s".into(),
                a_val: "a".into(),
                b_sys: "".into(),
                b_val: format!("{i}"),
                b_lo: 1.0,
                b_hi: 2.0,
            },
        ];
        keys.into_iter()
            .map(|key| IndexEntry {
                param: p.clone(),
                key,
            })
            .collect()
    }

    fn dump(conn: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        for t in TABLES {
            let mut st = conn
                .prepare(&format!("SELECT * FROM {t} ORDER BY 1, 2, 3, 4"))
                .unwrap();
            let n = st.column_count();
            let rows = st
                .query_map([], |r| {
                    let mut s = String::from(*t);
                    for i in 0..n {
                        let v: rusqlite::types::Value = r.get(i)?;
                        s.push_str(&format!("|{v:?}"));
                    }
                    Ok(s)
                })
                .unwrap();
            out.extend(rows.map(Result::unwrap));
        }
        out
    }

    /// A sorted flush writes exactly what inserts in arrival order write.
    #[test]
    fn a_flush_writes_what_single_inserts_write() {
        let a = Connection::open_in_memory().unwrap();
        let b = Connection::open_in_memory().unwrap();
        for c in [&a, &b] {
            c.execute_batch(crate::sqlite::schema::SCHEMA).unwrap();
        }
        let mut pending = Pending::default();
        for i in 1..=203 {
            pending.add(i, entries(i));
            insert(&b, i, &entries(i)).unwrap();
        }
        pending.flush(&a).unwrap();
        let (da, db) = (dump(&a), dump(&b));
        assert_eq!(da.len(), 203 * 5);
        assert_eq!(da, db);
    }

    /// Rows sorted off the writer land as the writer's own inserts would,
    /// without those of requests that wrote no version; a batch with a
    /// searching request keeps its entries.
    #[test]
    fn presorted_rows_write_what_single_inserts_write() {
        use crate::Prepared;
        let resource = |i: u64| {
            let v = serde_json::json!({
                "resourceType": "Observation", "id": format!("o{i}"), "status": "final",
                "code": {"coding": [{"system": "http://loinc.org", "code": format!("{}", i % 5)}], "text": "T"},
                "subject": {"reference": format!("Patient/p{}", i % 3)},
                "valueQuantity": {"value": i, "unit": "mg", "system": "http://unitsofmeasure.org", "code": "mg"}
            });
            let serde_json::Value::Object(m) = v else {
                unreachable!()
            };
            Prepared::new("Observation".into(), m)
        };
        let a = Connection::open_in_memory().unwrap();
        let b = Connection::open_in_memory().unwrap();
        for c in [&a, &b] {
            c.execute_batch(crate::sqlite::schema::SCHEMA).unwrap();
        }
        let mut reqs: Vec<WriteRequest> = (0..50)
            .map(|i| WriteRequest::Update {
                id: format!("o{i}"),
                res: resource(i),
                if_match: None,
            })
            .collect();
        // every third request "wrote nothing" (unchanged)
        let seqs: Vec<Option<u64>> = (0..50u64)
            .map(|i| (i % 3 != 0).then_some(100 + i))
            .collect();
        for (i, seq) in seqs.iter().enumerate() {
            if let Some(seq) = seq {
                insert(&b, *seq, &resource(i as u64).index).unwrap();
            }
        }
        let sorted = Presorted::take(&mut reqs);
        assert!(reqs
            .iter()
            .all(|r| matches!(r, WriteRequest::Update { res, .. } if res.index.is_empty())));
        sorted.write(&a, &seqs).unwrap();
        let (da, db) = (dump(&a), dump(&b));
        assert!(da.len() > 150, "{}", da.len());
        assert_eq!(da, db);

        let mut mixed = vec![
            WriteRequest::Update {
                id: "o1".into(),
                res: resource(1),
                if_match: None,
            },
            WriteRequest::Bundle(
                crate::bundle::plan(
                    serde_json::json!({"resourceType": "Bundle", "type": "batch"})
                        .as_object()
                        .cloned()
                        .unwrap(),
                )
                .unwrap(),
            ),
        ];
        assert!(Presorted::take(&mut mixed).0.is_empty());
        assert!(matches!(&mixed[0], WriteRequest::Update { res, .. } if !res.index.is_empty()));
    }
}
