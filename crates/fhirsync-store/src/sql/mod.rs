//! The SQL both backends share. Statements are written once, in SQLite's
//! dialect with `?` / `?N` parameters, and run through [`Db`]: rusqlite's
//! connection as it is, PostgreSQL's through a translation (see
//! `postgres::conn`). What differs between the two and cannot be
//! translated asks [`Db::dialect`].
//!
//! Shared here: the reads of versions ([`query`]), search ([`search`]),
//! the replication and audit tables ([`sync_rows`], [`audit_rows`]) and
//! the stored `SearchParameter`s ([`custom_params`]). The writers' hot
//! paths (appending versions and their index rows) stay each backend's own.

pub mod audit_rows;
pub mod custom_params;
pub mod query;
pub mod search;
pub mod sync_rows;

pub use rusqlite::types::Value as Sql;

use crate::StoreError;

/// Which SQL a [`Db`] speaks, where a statement must differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

/// One row of a result, read by column position.
pub trait Row {
    fn i64(&self, i: usize) -> Result<i64, StoreError>;
    fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError>;
    fn f64(&self, i: usize) -> Result<f64, StoreError>;
    fn text(&self, i: usize) -> Result<String, StoreError>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError>;
    fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>, StoreError>;
    fn bool(&self, i: usize) -> Result<bool, StoreError> {
        Ok(self.i64(i)? != 0)
    }
}

/// A connection (or open transaction) the shared SQL runs on.
pub trait Db {
    fn dialect(&self) -> Dialect;
    /// Runs a query and hands each row to `f` until it returns `false`.
    fn rows(
        &self,
        sql: &str,
        args: &[Sql],
        f: &mut dyn FnMut(&dyn Row) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError>;
    /// Runs a statement; returns how many rows it changed.
    fn exec(&self, sql: &str, args: &[Sql]) -> Result<u64, StoreError>;
}

/// Every row, mapped.
pub fn all<T>(
    db: &dyn Db,
    sql: &str,
    args: &[Sql],
    mut f: impl FnMut(&dyn Row) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut out = Vec::new();
    db.rows(sql, args, &mut |r| {
        out.push(f(r)?);
        Ok(true)
    })?;
    Ok(out)
}

/// The first row, mapped, if there is one.
pub fn first<T>(
    db: &dyn Db,
    sql: &str,
    args: &[Sql],
    f: impl FnOnce(&dyn Row) -> Result<T, StoreError>,
) -> Result<Option<T>, StoreError> {
    let mut f = Some(f);
    let mut out = None;
    db.rows(sql, args, &mut |r| {
        if let Some(f) = f.take() {
            out = Some(f(r)?);
        }
        Ok(false)
    })?;
    Ok(out)
}

/// Whether the query returns a row.
pub fn exists(db: &dyn Db, sql: &str, args: &[Sql]) -> Result<bool, StoreError> {
    Ok(first(db, sql, args, |_| Ok(()))?.is_some())
}

/// The first column of the first row as an integer (0 without a row).
pub fn int(db: &dyn Db, sql: &str, args: &[Sql]) -> Result<i64, StoreError> {
    Ok(first(db, sql, args, |r| r.i64(0))?.unwrap_or(0))
}

/// A text argument.
pub fn t(s: &str) -> Sql {
    Sql::Text(s.to_owned())
}

/// An integer argument (`u64`s are stored as `i64`, as everywhere).
pub fn n(v: u64) -> Sql {
    Sql::Integer(v as i64)
}

/// An optional integer argument.
pub fn on(v: Option<u64>) -> Sql {
    v.map_or(Sql::Null, n)
}

/// An optional text argument.
pub fn ot(v: Option<&str>) -> Sql {
    v.map_or(Sql::Null, t)
}

impl Db for rusqlite::Connection {
    fn dialect(&self) -> Dialect {
        Dialect::Sqlite
    }

    fn rows(
        &self,
        sql: &str,
        args: &[Sql],
        f: &mut dyn FnMut(&dyn Row) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let mut st = self.prepare_cached(sql)?;
        let mut rows = st.query(rusqlite::params_from_iter(args))?;
        while let Some(r) = rows.next()? {
            if !f(r)? {
                break;
            }
        }
        Ok(())
    }

    fn exec(&self, sql: &str, args: &[Sql]) -> Result<u64, StoreError> {
        Ok(self
            .prepare_cached(sql)?
            .execute(rusqlite::params_from_iter(args))? as u64)
    }
}

impl Row for rusqlite::Row<'_> {
    fn i64(&self, i: usize) -> Result<i64, StoreError> {
        Ok(self.get(i)?)
    }
    fn opt_i64(&self, i: usize) -> Result<Option<i64>, StoreError> {
        Ok(self.get(i)?)
    }
    fn f64(&self, i: usize) -> Result<f64, StoreError> {
        Ok(self.get(i)?)
    }
    fn text(&self, i: usize) -> Result<String, StoreError> {
        Ok(self.get(i)?)
    }
    fn opt_text(&self, i: usize) -> Result<Option<String>, StoreError> {
        Ok(self.get(i)?)
    }
    fn opt_blob(&self, i: usize) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.get(i)?)
    }
}
