//! The SQL both backends share. Statements are written once, in SQLite's
//! dialect with `?` / `?N` parameters, and run through [`Db`]: rusqlite's
//! connection as it is, PostgreSQL's through a translation (see
//! `postgres::conn`). What differs between the two and cannot be
//! translated asks [`Db::dialect`].
//!
//! Shared here: the reads of versions ([`query`]), search ([`search`]),
//! the replication and audit tables ([`sync_rows`], [`audit_rows`]),
//! the stored `SearchParameter`s ([`custom_params`]), and how the
//! watched last `seq` is raised ([`raise`]). The writers' hot
//! paths (appending versions and their index rows) stay each backend's own.

pub mod audit_rows;
pub mod custom_params;
pub mod query;
pub mod search;
pub mod summary;
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

/// `impl Store for $t` with every read that is shared SQL written out
/// once here (run through `self.read_with`, which hands a `&dyn Db` to a
/// closure off the async runtime), followed by the backend's own items.
macro_rules! store_impl {
    ($t:ty; $($rest:tt)*) => {
        #[async_trait::async_trait]
        impl $crate::Store for $t {
            async fn read(&self, rtype: &str, id: &str) -> Result<Option<$crate::StoredVersion>, $crate::StoreError> {
                let (t, i) = (rtype.to_owned(), id.to_owned());
                self.read_with(move |c| $crate::sql::query::read_current(c, &t, &i)).await
            }

            async fn vread(&self, rtype: &str, id: &str, vid: u64) -> Result<Option<$crate::StoredVersion>, $crate::StoreError> {
                let (t, i) = (rtype.to_owned(), id.to_owned());
                self.read_with(move |c| $crate::sql::query::vread(c, &t, &i, vid)).await
            }

            async fn history(&self, q: $crate::HistoryQuery) -> Result<Vec<$crate::StoredVersion>, $crate::StoreError> {
                self.read_with(move |c| $crate::sql::query::history(c, &q)).await
            }

            async fn search(&self, q: fhirsync_core::search::SearchQuery) -> Result<$crate::SearchPage, $crate::StoreError> {
                self.read_with(move |c| $crate::sql::search::search(c, &q)).await
            }

            async fn version_matches(&self, q: fhirsync_core::search::SearchQuery, seq: u64) -> Result<bool, $crate::StoreError> {
                self.read_with(move |c| $crate::sql::search::version_matches(c, &q, seq)).await
            }

            async fn changes(&self, q: $crate::ChangesQuery) -> Result<Vec<$crate::StoredVersion>, $crate::StoreError> {
                self.read_with(move |c| $crate::sql::query::changes(c, &q)).await
            }

            async fn conflicts(&self, q: $crate::ListQuery) -> Result<Vec<$crate::Conflict>, $crate::StoreError> {
                self.read_with(move |c| $crate::sql::sync_rows::conflicts(c, &q)).await
            }

            async fn conflict(&self, id: u64) -> Result<Option<$crate::Conflict>, $crate::StoreError> {
                self.read_with(move |c| $crate::sql::sync_rows::conflict(c, id)).await
            }

            async fn dead_letters(&self, q: $crate::ListQuery) -> Result<Vec<$crate::DeadLetter>, $crate::StoreError> {
                self.read_with(move |c| $crate::sql::sync_rows::dead_letters(c, &q)).await
            }

            async fn dead_letter(&self, id: u64) -> Result<Option<$crate::DeadLetter>, $crate::StoreError> {
                self.read_with(move |c| $crate::sql::sync_rows::dead_letter(c, id)).await
            }

            async fn open_counts(&self) -> Result<(u64, u64), $crate::StoreError> {
                self.read_with(|c| $crate::sql::sync_rows::open_counts(c)).await
            }

            async fn audit(&self, q: $crate::ListQuery) -> Result<Vec<$crate::AuditEntry>, $crate::StoreError> {
                self.read_with(move |c| $crate::sql::sync_rows::audit(c, &q)).await
            }

            async fn audit_events(&self, q: $crate::AuditQuery) -> Result<(Vec<serde_json::Value>, u64), $crate::StoreError> {
                self.read_with(move |c| {
                    let total = $crate::sql::audit_rows::audit_event_count(c, &q)?;
                    let page = if q.count == 0 {
                        Vec::new()
                    } else {
                        $crate::sql::audit_rows::audit_events(c, &q)?
                    };
                    Ok((page, total))
                })
                .await
            }

            async fn cursor(&self, key: &str) -> Result<Option<u64>, $crate::StoreError> {
                let k = key.to_owned();
                self.read_with(move |c| $crate::sql::sync_rows::cursor(c, &k)).await
            }

            async fn cursors(&self) -> Result<Vec<(String, u64, u64)>, $crate::StoreError> {
                self.read_with(|c| $crate::sql::sync_rows::cursors(c)).await
            }

            async fn peers(&self) -> Result<Vec<$crate::PeerInfo>, $crate::StoreError> {
                self.read_with(|c| $crate::sql::sync_rows::peers(c)).await
            }

            async fn sub_events(&self, sub: &str, from: u64, until: u64, limit: usize) -> Result<Vec<$crate::SubEvent>, $crate::StoreError> {
                let s = sub.to_owned();
                self.read_with(move |c| $crate::sql::sync_rows::sub_events(c, &s, from, until, limit)).await
            }

            async fn deleted(&self, q: $crate::DeletedQuery) -> Result<Vec<(String, String, u64)>, $crate::StoreError> {
                self.read_with(move |c| $crate::sql::search::deleted(c, &q)).await
            }

            async fn summary(&self, q: $crate::summary::SummaryQuery, basis: $crate::summary::Basis) -> Result<$crate::summary::SummaryAnswer, $crate::StoreError> {
                self.read_with(move |c| $crate::sql::summary::run(c, &q, basis)).await
            }

            async fn current_many(&self, keys: Vec<(String, String)>) -> Result<Vec<$crate::StoredVersion>, $crate::StoreError> {
                self.read_with(move |c| $crate::sql::summary::current_many(c, &keys)).await
            }

            $($rest)*
        }
    };
}
pub(crate) use store_impl;

/// The [`crate::engine::WriteTx`] methods that are shared SQL, for a
/// writer with `conn` (a [`Db`]), `clock` and `node_id`.
macro_rules! write_tx_rows {
    () => {
        fn node_id(&self) -> &str {
            &self.node_id
        }

        fn vector_id(&self) -> &str {
            &self.vector_id
        }

        fn read(
            &mut self,
            rtype: &str,
            id: &str,
        ) -> Result<Option<$crate::StoredVersion>, $crate::StoreError> {
            $crate::sql::query::read_current(&self.conn, rtype, id)
        }

        fn vread(
            &mut self,
            rtype: &str,
            id: &str,
            vid: u64,
        ) -> Result<Option<$crate::StoredVersion>, $crate::StoreError> {
            $crate::sql::query::vread(&self.conn, rtype, id, vid)
        }

        fn new_id(&mut self) -> String {
            uuid::Uuid::new_v4().to_string()
        }

        fn now_ms(&self) -> u64 {
            self.clock.now_ms()
        }

        fn lineage(
            &mut self,
            rtype: &str,
            id: &str,
            limit: usize,
        ) -> Result<Vec<$crate::StoredVersion>, $crate::StoreError> {
            $crate::sql::query::lineage(&self.conn, rtype, id, limit)
        }

        fn open_conflicts(
            &mut self,
            rtype: &str,
            id: &str,
        ) -> Result<Vec<$crate::Conflict>, $crate::StoreError> {
            $crate::sql::sync_rows::open_conflicts(&self.conn, rtype, id)
        }

        fn conflict(&mut self, id: u64) -> Result<Option<$crate::Conflict>, $crate::StoreError> {
            $crate::sql::sync_rows::conflict(&self.conn, id)
        }

        fn put_conflict(&mut self, c: &$crate::Conflict) -> Result<u64, $crate::StoreError> {
            $crate::sql::sync_rows::put_conflict(&self.conn, c)
        }

        fn put_cursor(&mut self, key: &str, seq: u64) -> Result<(), $crate::StoreError> {
            $crate::sql::sync_rows::put_cursor(&self.conn, key, seq, self.clock.now_ms())
        }

        fn put_peer(
            &mut self,
            node_id: &str,
            received: Option<u64>,
            sent: Option<u64>,
        ) -> Result<(), $crate::StoreError> {
            $crate::sql::sync_rows::put_peer(
                &self.conn,
                node_id,
                received,
                sent,
                self.clock.now_ms(),
            )
        }

        fn add_dead_letter(
            &mut self,
            l: &$crate::NewDeadLetter,
        ) -> Result<u64, $crate::StoreError> {
            $crate::sql::sync_rows::add_dead_letter(&self.conn, l, self.clock.now_ms())
        }

        fn drop_dead_letter(&mut self, id: u64) -> Result<bool, $crate::StoreError> {
            $crate::sql::sync_rows::drop_dead_letter(&self.conn, id)
        }

        fn add_audit(&mut self, a: &$crate::AuditEntry) -> Result<(), $crate::StoreError> {
            let now = self.clock.now_ms();
            $crate::sql::sync_rows::add_audit(&self.conn, a, now)?;
            $crate::sql::audit_rows::add_audit_events(
                &self.conn,
                &[a.to_record(now, &self.node_id)],
            )
        }

        fn add_sub_event(&mut self, e: &$crate::SubEvent) -> Result<(), $crate::StoreError> {
            $crate::sql::sync_rows::add_sub_event(&self.conn, e)
        }

        fn add_audit_events(
            &mut self,
            records: &[fhirsync_core::audit::AuditRecord],
        ) -> Result<(), $crate::StoreError> {
            $crate::sql::audit_rows::add_audit_events(&self.conn, records)
        }

        fn claim_once(&mut self, key: &str, until_ms: u64) -> Result<bool, $crate::StoreError> {
            $crate::sql::audit_rows::claim_once(&self.conn, key, until_ms, self.clock.now_ms())
        }
    };
}
pub(crate) use write_tx_rows;

/// Raises the change log's watched last `seq` to `seq` (never lowers it);
/// its listeners wake only when it moved. Both backends publish through it.
pub(crate) fn raise(tx: &tokio::sync::watch::Sender<u64>, seq: u64) {
    tx.send_if_modified(|v| {
        let up = seq > *v;
        if up {
            *v = seq;
        }
        up
    });
}
