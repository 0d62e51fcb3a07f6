//! The shared SQL (`crate::sql`) on PostgreSQL: statements translated from
//! SQLite's dialect once and prepared once per connection, arguments
//! converted to whatever type PostgreSQL inferred for each parameter, and
//! rows read by the column's type.

use std::cell::{RefCell, RefMut};
use std::collections::HashMap;
use std::error::Error;

use bytes::BytesMut;
use postgres::types::{to_sql_checked, IsNull, ToSql, Type};
use postgres::{Client, Statement};

use super::bulk::{self, VersionRow};
use crate::sql::{Db, Dialect, Row, Sql};
use crate::StoreError;

/// Most prepared statements one connection keeps (searches make many
/// shapes); past it the cache starts again.
pub const STATEMENTS_MAX: usize = 512;

/// A PostgreSQL connection the shared SQL runs on (inside a transaction
/// when the caller opened one with `BEGIN`).
pub struct PgConn {
    client: RefCell<Client>,
    stmts: RefCell<HashMap<String, Statement>>,
    /// Rows appended and not yet sent; every statement sends them first.
    pending: RefCell<Vec<VersionRow>>,
}

/// SQLite's SQL as PostgreSQL's: `?N` → `$N`, a bare `?` → the next number
/// after the highest so far (SQLite's rule), `INDEXED BY x` hints dropped,
/// `json_each(?)` of a JSON array → `json_array_elements_text`. String
/// literals are left as they are.
pub fn translate(sql: &str) -> String {
    let sql = sql.replace(
        "json_each(?)",
        "json_array_elements_text(CAST(? AS text)::json)",
    );
    let mut out = String::with_capacity(sql.len() + 16);
    let mut max = 0u32;
    let mut chars = sql.chars().peekable();
    let mut quoted = false;
    while let Some(c) = chars.next() {
        if quoted {
            out.push(c);
            if c == '\'' {
                quoted = false;
            }
            continue;
        }
        match c {
            '\'' => {
                quoted = true;
                out.push(c);
            }
            '?' => {
                let mut digits = String::new();
                while let Some(d) = chars.peek().filter(|d| d.is_ascii_digit()) {
                    digits.push(*d);
                    chars.next();
                }
                let k = match digits.parse::<u32>() {
                    Ok(k) => k,
                    Err(_) => max + 1,
                };
                max = max.max(k);
                out.push('$');
                out.push_str(&k.to_string());
            }
            _ => out.push(c),
        }
    }
    drop_hints(&out)
}

/// The text without its `INDEXED BY name` hints.
fn drop_hints(sql: &str) -> String {
    const HINT: &str = " INDEXED BY ";
    let mut out = String::with_capacity(sql.len());
    let mut rest = sql;
    while let Some(i) = rest.find(HINT) {
        out.push_str(&rest[..i]);
        let after = &rest[i + HINT.len()..];
        let end = after
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(after.len());
        rest = &after[end..];
    }
    out.push_str(rest);
    out
}

impl PgConn {
    pub fn new(client: Client) -> PgConn {
        PgConn {
            client: RefCell::new(client),
            stmts: RefCell::new(HashMap::new()),
            pending: RefCell::new(Vec::new()),
        }
    }

    /// The connection itself, for what the shared SQL does not cover;
    /// the caller [`flush`](Self::flush)es first when it matters.
    pub fn client(&self) -> RefMut<'_, Client> {
        self.client.borrow_mut()
    }

    /// Adds a row to `versions` with the next statement (see
    /// [`super::bulk`]).
    pub fn append(&self, row: VersionRow) {
        self.pending.borrow_mut().push(row);
    }

    /// Sends the appended rows.
    pub fn flush(&self) -> Result<(), StoreError> {
        if self.pending.borrow().is_empty() {
            return Ok(());
        }
        let rows = std::mem::take(&mut *self.pending.borrow_mut());
        let insert = self.prepare(bulk::INSERT)?;
        bulk::write(&mut self.client.borrow_mut(), &insert, &rows)
    }

    pub fn is_closed(&self) -> bool {
        self.client.borrow().is_closed()
    }

    /// Runs statements without arguments (`BEGIN`, `COMMIT`, DDL). A
    /// `ROLLBACK` (of the transaction or to a savepoint) drops the rows
    /// not yet sent: they were appended since the last statement, so
    /// inside whatever it rolls back.
    pub fn batch(&self, sql: &str) -> Result<(), StoreError> {
        if sql.starts_with("ROLLBACK") {
            self.pending.borrow_mut().clear();
        } else {
            self.flush()?;
        }
        Ok(self.client.borrow_mut().batch_execute(sql)?)
    }

    fn prepare(&self, sql: &str) -> Result<Statement, StoreError> {
        if let Some(s) = self.stmts.borrow().get(sql) {
            return Ok(s.clone());
        }
        let pg = translate(sql);
        let st = self
            .client
            .borrow_mut()
            .prepare(&pg)
            .map_err(|e| StoreError::Backend(format!("{}: {pg}", super::describe(&e))))?;
        let mut cache = self.stmts.borrow_mut();
        if cache.len() >= STATEMENTS_MAX {
            cache.clear();
        }
        cache.insert(sql.to_owned(), st.clone());
        Ok(st)
    }
}

/// An argument as the type PostgreSQL inferred for its parameter.
#[derive(Debug)]
struct Arg<'a>(&'a Sql);

type BoxError = Box<dyn Error + Sync + Send>;

fn text_type(ty: &Type) -> bool {
    matches!(
        *ty,
        Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN
    )
}

impl ToSql for Arg<'_> {
    fn to_sql(&self, ty: &Type, out: &mut BytesMut) -> Result<IsNull, BoxError> {
        match self.0 {
            Sql::Null => Ok(IsNull::Yes),
            Sql::Integer(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                Type::FLOAT4 => (*i as f32).to_sql(ty, out),
                _ if text_type(ty) => i.to_string().to_sql(ty, out),
                _ => Err(format!("an integer for a parameter of type {ty}").into()),
            },
            Sql::Real(f) => match *ty {
                Type::FLOAT8 => f.to_sql(ty, out),
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                _ if text_type(ty) => f.to_string().to_sql(ty, out),
                _ => Err(format!("a number for a parameter of type {ty}").into()),
            },
            Sql::Text(s) => match *ty {
                _ if text_type(ty) => s.as_str().to_sql(ty, out),
                Type::INT8 => s.parse::<i64>()?.to_sql(ty, out),
                _ => Err(format!("text for a parameter of type {ty}").into()),
            },
            Sql::Blob(b) => b.as_slice().to_sql(ty, out),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

struct PgRow<'a>(&'a postgres::Row);

/// A row read from column `.1` on, for code that reads its columns from 0.
pub struct Shifted<'a>(pub &'a postgres::Row, pub usize);

impl Row for Shifted<'_> {
    fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError> {
        PgRow(self.0).opt_i64(i + self.1)
    }
    fn i64(&self, i: usize) -> Result<i64, StoreError> {
        PgRow(self.0).i64(i + self.1)
    }
    fn f64(&self, i: usize) -> Result<f64, StoreError> {
        PgRow(self.0).f64(i + self.1)
    }
    fn text(&self, i: usize) -> Result<String, StoreError> {
        PgRow(self.0).text(i + self.1)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        PgRow(self.0).opt_text(i + self.1)
    }
    fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>, StoreError> {
        PgRow(self.0).opt_blob(i + self.1)
    }
}

fn col_err(i: usize, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("column {i}: {e}"))
}

impl Row for PgRow<'_> {
    fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError> {
        let r = self.0;
        let ty = r
            .columns()
            .get(i)
            .ok_or_else(|| col_err(i, "no such column"))?
            .type_()
            .clone();
        let v = match ty {
            Type::INT8 => r.try_get::<_, Option<i64>>(i),
            Type::INT4 => r.try_get::<_, Option<i32>>(i).map(|v| v.map(i64::from)),
            Type::INT2 => r.try_get::<_, Option<i16>>(i).map(|v| v.map(i64::from)),
            Type::BOOL => r.try_get::<_, Option<bool>>(i).map(|v| v.map(i64::from)),
            other => return Err(col_err(i, format!("{other} is not an integer"))),
        };
        v.map_err(|e| col_err(i, e))
    }
    fn i64(&self, i: usize) -> Result<i64, StoreError> {
        self.opt_i64(i)?.ok_or_else(|| col_err(i, "NULL"))
    }
    fn f64(&self, i: usize) -> Result<f64, StoreError> {
        let r = self.0;
        match r.columns().get(i).map(|c| c.type_().clone()) {
            Some(Type::FLOAT8) => r.try_get::<_, f64>(i).map_err(|e| col_err(i, e)),
            Some(Type::FLOAT4) => r
                .try_get::<_, f32>(i)
                .map(f64::from)
                .map_err(|e| col_err(i, e)),
            _ => Ok(self.i64(i)? as f64),
        }
    }
    fn text(&self, i: usize) -> Result<String, StoreError> {
        self.opt_text(i)?.ok_or_else(|| col_err(i, "NULL"))
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        self.0.try_get(i).map_err(|e| col_err(i, e))
    }
    fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>, StoreError> {
        self.0.try_get(i).map_err(|e| col_err(i, e))
    }
}

impl Db for PgConn {
    fn dialect(&self) -> Dialect {
        Dialect::Postgres
    }

    fn rows(
        &self,
        sql: &str,
        args: &[Sql],
        f: &mut dyn FnMut(&dyn Row) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        self.flush()?;
        let st = self.prepare(sql)?;
        let args: Vec<Arg<'_>> = args.iter().map(Arg).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as _).collect();
        let rows = self.client.borrow_mut().query(&st, &refs)?;
        for r in &rows {
            if !f(&PgRow(r))? {
                break;
            }
        }
        Ok(())
    }

    fn exec(&self, sql: &str, args: &[Sql]) -> Result<u64, StoreError> {
        self.flush()?;
        let st = self.prepare(sql)?;
        let args: Vec<Arg<'_>> = args.iter().map(Arg).collect();
        let refs: Vec<&(dyn ToSql + Sync)> = args.iter().map(|a| a as _).collect();
        Ok(self.client.borrow_mut().execute(&st, &refs)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_sql_becomes_postgres_sql() {
        assert_eq!(
            translate("SELECT x FROM t WHERE a = ?1 AND b IN (?, ?) AND c = '?' AND d = ?2"),
            "SELECT x FROM t WHERE a = $1 AND b IN ($2, $3) AND c = '?' AND d = $2"
        );
        assert_eq!(
            translate("SELECT 1 FROM tokens r INDEXED BY tokens_ref_seq WHERE r.seq = ?"),
            "SELECT 1 FROM tokens r WHERE r.seq = $1"
        );
        assert_eq!(
            translate("id IN (SELECT value FROM json_each(?)) AND x = ?"),
            "id IN (SELECT value FROM json_array_elements_text(CAST($1 AS text)::json)) AND x = $2"
        );
        assert_eq!(
            translate("a = 'it''s ?' AND b = ?"),
            "a = 'it''s ?' AND b = $1"
        );
    }
}
