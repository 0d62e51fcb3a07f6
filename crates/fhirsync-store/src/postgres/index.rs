//! Writing search index rows on PostgreSQL: each table's rows of a batch
//! in one statement (`INSERT … SELECT FROM unnest(arrays)`), so a batch of
//! versions costs five round trips, not one per row.

use fhirsync_core::index::{IndexEntry, Key};
use postgres::Client;

use crate::StoreError;

/// Rows per statement (bounds one statement's memory on both ends).
pub const ROWS_PER_STATEMENT: usize = 10_000;

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
