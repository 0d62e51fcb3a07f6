//! Writing search index rows on PostgreSQL: each table's rows of a batch
//! in one statement (`INSERT … SELECT FROM unnest(arrays)`), so a batch of
//! versions costs five round trips, not one per row; the rows of many new
//! versions by one `COPY` per table ([`write_new`]).

use std::collections::HashSet;
use std::hash::{Hash, Hasher};

use fhirsync_core::index::{IndexEntry, Key};
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::Type;
use postgres::Client;

use crate::StoreError;

/// Rows per statement (bounds one statement's memory on both ends).
pub const ROWS_PER_STATEMENT: usize = 10_000;

/// Fewer new rows than this go in by [`write`]: five `COPY`s cost more
/// round trips than five statements.
pub const COPY_ROWS_MIN: usize = 256;

/// One index table's rows of a batch, column by column.
#[derive(Default)]
struct Table {
    /// Text columns, then float columns, then integer columns.
    text: Vec<Vec<String>>,
    float: Vec<Vec<f64>>,
    int: Vec<Vec<i64>>,
}

impl Table {
    fn push(&mut self, text: &[&str], float: &[f64], int: &[i64]) {
        self.text.resize_with(text.len(), Vec::new);
        self.float.resize_with(float.len(), Vec::new);
        self.int.resize_with(int.len(), Vec::new);
        for (c, v) in self.text.iter_mut().zip(text) {
            c.push((*v).to_owned());
        }
        for (c, v) in self.float.iter_mut().zip(float) {
            c.push(*v);
        }
        for (c, v) in self.int.iter_mut().zip(int) {
            c.push(*v);
        }
    }

    /// Inserts the rows with `sql`, whose parameters are the text, float
    /// and integer columns in that order.
    fn write(&self, client: &mut Client, sql: &str) -> Result<(), StoreError> {
        if self.text.first().is_none_or(Vec::is_empty) {
            return Ok(());
        }
        let mut params: Vec<&(dyn postgres::types::ToSql + Sync)> = Vec::new();
        params.extend(
            self.text
                .iter()
                .map(|c| c as &(dyn postgres::types::ToSql + Sync)),
        );
        params.extend(
            self.float
                .iter()
                .map(|c| c as &(dyn postgres::types::ToSql + Sync)),
        );
        params.extend(
            self.int
                .iter()
                .map(|c| c as &(dyn postgres::types::ToSql + Sync)),
        );
        client.execute(sql, &params)?;
        Ok(())
    }
}

#[derive(Default)]
struct Columns {
    tokens: Table,
    strings: Table,
    dates: Table,
    numbers: Table,
    composites: Table,
    n: usize,
}

/// Writes `rows` (version `seq`, entry); rows already there are kept once.
pub fn write<'e>(
    client: &mut Client,
    rows: impl IntoIterator<Item = (u64, &'e IndexEntry)>,
) -> Result<(), StoreError> {
    let mut c = Columns::default();
    for (seq, e) in rows {
        let (p, s) = (&*e.param, seq as i64);
        match &e.key {
            Key::Token { system, value } => c.tokens.push(&[p, value, system], &[], &[s]),
            Key::Text { norm, raw } => c.strings.push(&[p, norm, raw], &[], &[s]),
            Key::Date { lo, hi } => c.dates.push(&[p], &[], &[*lo, *hi, s]),
            Key::Number {
                value,
                system,
                code,
            } => c.numbers.push(&[p, system, code], &[*value], &[s]),
            Key::Composite {
                a_sys,
                a_val,
                b_sys,
                b_val,
                b_lo,
                b_hi,
            } => c
                .composites
                .push(&[p, a_val, a_sys, b_val, b_sys], &[*b_lo, *b_hi], &[s]),
        }
        c.n += 1;
        if c.n >= ROWS_PER_STATEMENT {
            flush(client, std::mem::take(&mut c))?;
        }
    }
    flush(client, c)
}

fn flush(client: &mut Client, c: Columns) -> Result<(), StoreError> {
    c.tokens.write(
        client,
        "INSERT INTO tokens (param, value, system, seq)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[])
         ON CONFLICT DO NOTHING",
    )?;
    c.strings.write(
        client,
        "INSERT INTO strings (param, norm, raw, seq)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[])
         ON CONFLICT DO NOTHING",
    )?;
    c.dates.write(
        client,
        "INSERT INTO dates (param, lo, hi, seq)
         SELECT * FROM unnest($1::text[], $2::int8[], $3::int8[], $4::int8[])
         ON CONFLICT DO NOTHING",
    )?;
    c.numbers.write(
        client,
        "INSERT INTO numbers (param, system, code, value, seq)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::float8[], $5::int8[])
         ON CONFLICT DO NOTHING",
    )?;
    c.composites.write(
        client,
        "INSERT INTO composites (param, a_val, a_sys, b_val, b_sys, b_lo, b_hi, seq)
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                              $6::float8[], $7::float8[], $8::int8[])
         ON CONFLICT DO NOTHING",
    )
}

/// An index row as its table's primary key sees it (floats by value, so
/// `-0` is `0`), to drop a version's repeated rows before a `COPY`.
struct Once<'e>(u64, &'e IndexEntry);

fn float_key(f: f64) -> u64 {
    (f + 0.0).to_bits()
}

impl Hash for Once<'_> {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.0.hash(h);
        self.1.param.hash(h);
        match &self.1.key {
            Key::Token { system, value } => (0u8, system, value).hash(h),
            Key::Text { norm, raw } => (1u8, norm, raw).hash(h),
            Key::Date { lo, hi } => (2u8, lo, hi).hash(h),
            Key::Number {
                value,
                system,
                code,
            } => (3u8, float_key(*value), system, code).hash(h),
            Key::Composite {
                a_sys,
                a_val,
                b_sys,
                b_val,
                b_lo,
                b_hi,
            } => (
                4u8,
                a_sys,
                a_val,
                b_sys,
                b_val,
                float_key(*b_lo),
                float_key(*b_hi),
            )
                .hash(h),
        }
    }
}

impl PartialEq for Once<'_> {
    fn eq(&self, o: &Self) -> bool {
        // `==` on floats: `-0 == 0`, as the table's key compares them
        self.0 == o.0 && self.1 == o.1
    }
}

impl Eq for Once<'_> {}

/// The rows of each table (tokens, strings, dates, numbers, composites),
/// each once. (`index::extract` gives a version's rows once already; a
/// repeat would make a `COPY` fail, so it is checked here too.)
fn by_table(rows: Vec<(u64, &IndexEntry)>) -> [Vec<(i64, &IndexEntry)>; 5] {
    let mut seen = HashSet::with_capacity(rows.len());
    let mut tables: [Vec<(i64, &IndexEntry)>; 5] = Default::default();
    for (seq, e) in rows {
        if !seen.insert(Once(seq, e)) {
            continue;
        }
        let t = match e.key {
            Key::Token { .. } => 0,
            Key::Text { .. } => 1,
            Key::Date { .. } => 2,
            Key::Number { .. } => 3,
            Key::Composite { .. } => 4,
        };
        tables[t].push((seq as i64, e));
    }
    tables
}

/// Writes the index rows of versions written in this transaction (no row
/// of theirs is in the tables yet): a version's repeated rows dropped,
/// then one `COPY` per table.
pub fn write_new<'e>(
    client: &mut Client,
    rows: impl IntoIterator<Item = (u64, &'e IndexEntry)>,
) -> Result<(), StoreError> {
    let rows: Vec<(u64, &IndexEntry)> = rows.into_iter().collect();
    if rows.len() < COPY_ROWS_MIN {
        return write(client, rows);
    }
    let tables = by_table(rows);
    const T: Type = Type::TEXT;
    const I: Type = Type::INT8;
    const F: Type = Type::FLOAT8;
    let shapes: [(&str, &[Type]); 5] = [
        ("tokens (param, value, system, seq)", &[T, T, T, I]),
        ("strings (param, norm, raw, seq)", &[T, T, T, I]),
        ("dates (param, lo, hi, seq)", &[T, I, I, I]),
        (
            "numbers (param, system, code, value, seq)",
            &[T, T, T, F, I],
        ),
        (
            "composites (param, a_val, a_sys, b_val, b_sys, b_lo, b_hi, seq)",
            &[T, T, T, T, T, F, F, I],
        ),
    ];
    for (rows, (table, types)) in tables.iter().zip(shapes) {
        if rows.is_empty() {
            continue;
        }
        let sink = client.copy_in(&format!("COPY {table} FROM STDIN (FORMAT binary)"))?;
        let mut w = BinaryCopyInWriter::new(sink, types);
        for (seq, e) in rows {
            let p: &str = &e.param;
            match &e.key {
                Key::Token { system, value } => w.write(&[&p, value, system, seq])?,
                Key::Text { norm, raw } => w.write(&[&p, norm, raw, seq])?,
                Key::Date { lo, hi } => w.write(&[&p, lo, hi, seq])?,
                Key::Number {
                    value,
                    system,
                    code,
                } => w.write(&[&p, system, code, value, seq])?,
                Key::Composite {
                    a_sys,
                    a_val,
                    b_sys,
                    b_val,
                    b_lo,
                    b_hi,
                } => w.write(&[&p, a_val, a_sys, b_val, b_sys, b_lo, b_hi, seq])?,
            }
        }
        w.finish()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn number(p: &str, value: f64) -> IndexEntry {
        IndexEntry {
            param: Arc::from(p),
            key: Key::Number {
                value,
                system: String::new(),
                code: String::new(),
            },
        }
    }

    #[test]
    fn a_versions_repeated_rows_go_once_and_minus_zero_is_zero() {
        let token = IndexEntry {
            param: Arc::from("code"),
            key: Key::Token {
                system: "s".into(),
                value: "v".into(),
            },
        };
        let (zero, minus_zero, one) = (number("n", 0.0), number("n", -0.0), number("n", 1.0));
        let rows = vec![
            (1, &token),
            (1, &token),
            (2, &token),
            (1, &zero),
            (1, &minus_zero),
            (1, &one),
            (2, &minus_zero),
        ];
        let t = by_table(rows);
        assert_eq!(t[0].iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2]);
        let nums: Vec<(i64, f64)> = t[3]
            .iter()
            .map(|(s, e)| match e.key {
                Key::Number { value, .. } => (*s, value),
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(nums, vec![(1, 0.0), (1, 1.0), (2, -0.0)]);
        assert!(t[1].is_empty() && t[2].is_empty() && t[4].is_empty());
    }
}
