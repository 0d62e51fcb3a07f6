//! Rebuilding the search index from the stored versions, in batches of
//! short transactions so that a running node keeps writing in between.

use fhirsync_core::index::extract;
use rusqlite::{params, Connection};
use serde_json::Value;

use super::index_rows;
use super::schema::INDEX_VERSION;
use crate::StoreError;

/// Versions reindexed per transaction.
pub const REINDEX_BATCH: u64 = 2_000;

/// Versions per transaction of a reindex asked for while the node serves:
/// smaller, since a write arriving meanwhile waits for the batch under way.
pub const ONLINE_REINDEX_BATCH: u64 = 500;

/// Progress of a reindex: versions done and versions in all.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// A reindex under way: the versions `next..=last` are still to do.
#[derive(Debug, Clone)]
pub struct Reindex {
    /// Whether the first batch clears the index (a rebuild); otherwise
    /// entries are added to it (existing ones are kept once).
    pub clear: bool,
    /// Versions per transaction.
    pub batch: u64,
    pub next: u64,
    pub last: u64,
    pub done: u64,
    pub total: u64,
}

impl Reindex {
    /// A reindex of every version after `after` (0: of all, which first
    /// clears the index).
    pub fn start(conn: &Connection, after: u64) -> Result<Reindex, StoreError> {
        let mut r = Self::additive(conn, after)?;
        r.clear = after == 0;
        r.batch = REINDEX_BATCH;
        Ok(r)
    }

    /// A reindex of every version after `after` that adds to the index
    /// in place (searches stay right while it runs).
    pub fn additive(conn: &Connection, after: u64) -> Result<Reindex, StoreError> {
        let (last, total): (i64, i64) = conn.query_row(
            "SELECT coalesce(max(seq), 0), count(*) FROM versions WHERE seq > ?1",
            [after as i64],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        Ok(Reindex {
            clear: false,
            batch: ONLINE_REINDEX_BATCH,
            next: after + 1,
            last: last as u64,
            done: 0,
            total: total as u64,
        })
    }

    pub fn finished(&self) -> bool {
        self.next > self.last
    }

    pub fn status(&self) -> crate::ReindexStatus {
        crate::ReindexStatus {
            running: !self.finished(),
            done: self.done,
            total: self.total,
        }
    }

    /// Reindexes the next `batch` versions in one transaction;
    /// after the last batch, records the index version.
    pub fn step(&mut self, conn: &Connection) -> Result<(), StoreError> {
        if !self.finished() {
            let (from, to) = (self.next, (self.next + self.batch - 1).min(self.last));
            let tx = conn.unchecked_transaction()?;
            if std::mem::take(&mut self.clear) {
                index_rows::clear(&tx)?;
            }
            {
                let mut st = tx.prepare_cached(
                    "SELECT seq, type, body FROM versions WHERE seq BETWEEN ?1 AND ?2 AND body IS NOT NULL",
                )?;
                let mut pending = index_rows::Pending::default();
                let rows = st.query_map(params![from as i64, to as i64], |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                    ))
                })?;
                for row in rows {
                    let (seq, rtype, body) = row?;
                    let Ok(v) = serde_json::from_str::<Value>(&body) else {
                        tracing::warn!(seq, "a stored body is not JSON; not indexed");
                        continue;
                    };
                    pending.add(seq, extract(&rtype, &v));
                }
                pending.flush(&tx)?;
            }
            tx.commit()?;
            self.done = (self.done + to + 1 - from).min(self.total);
            self.next = to + 1;
        }
        if self.finished() {
            conn.execute(
                "INSERT OR REPLACE INTO node_info (key, value) VALUES ('index_version', ?1)",
                [INDEX_VERSION.to_string()],
            )?;
        }
        Ok(())
    }
}

/// Reindexes every version after `after` (0: all) at once, then records
/// the index version. Returns the versions reindexed.
pub fn reindex(conn: &Connection, after: u64, progress: Progress<'_>) -> Result<u64, StoreError> {
    let mut r = Reindex::start(conn, after)?;
    loop {
        r.step(conn)?;
        progress(r.done, r.total);
        if r.finished() {
            return Ok(r.total);
        }
    }
}

/// The index version the store was built with (`None`: before versions
/// were recorded).
pub fn index_version(conn: &Connection) -> Result<Option<i64>, StoreError> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row(
            "SELECT value FROM node_info WHERE key = 'index_version'",
            [],
            |r| r.get::<_, String>(0),
        )
        .optional()?
        .and_then(|v| v.parse().ok()))
}

#[cfg(test)]
mod tests {
    use fhirsync_core::search::SearchQuery;
    use serde_json::json;

    use crate::sqlite::{SqliteConfig, SqliteStore};
    use crate::types::{Prepared, WriteRequest};
    use crate::Store;

    async fn names(store: &SqliteStore, q: &str) -> Vec<String> {
        let q = SearchQuery::parse_query_string(Some("Patient"), q).unwrap();
        let page = store.search(q).await.unwrap();
        page.items.into_iter().map(|v| v.id).collect()
    }

    /// A store whose index is missing or of an older version is rebuilt:
    /// in the background when a node opens it, at once by the CLI's call.
    #[tokio::test(flavor = "multi_thread")]
    async fn an_outdated_index_is_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fhirsync.db");
        let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
        for (id, family) in [("a", "Otieno"), ("b", "Wanjiru")] {
            let res = json!({"resourceType": "Patient", "name": [{"family": family}]});
            let res = Prepared::new("Patient".into(), res.as_object().unwrap().clone());
            store
                .write(WriteRequest::Update {
                    id: id.into(),
                    res,
                    if_match: None,
                })
                .await
                .unwrap();
        }
        assert_eq!(names(&store, "name=oti").await, ["a"]);
        drop(store);
        let forget = || {
            let c = rusqlite::Connection::open(&path).unwrap();
            c.execute_batch(
                "DELETE FROM strings; DELETE FROM tokens;
                 UPDATE node_info SET value = '0' WHERE key = 'index_version';",
            )
            .unwrap();
        };
        forget();
        let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while names(&store, "name=oti").await.is_empty() {
            assert!(std::time::Instant::now() < deadline, "not reindexed");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert_eq!(names(&store, "name=wan").await, ["b"]);
        drop(store);
        forget();
        let mut seen = Vec::new();
        let n =
            SqliteStore::reindex_offline(&SqliteConfig::new(&path), &mut |d, t| seen.push((d, t)))
                .unwrap();
        assert_eq!(n, 2);
        assert_eq!(seen.last(), Some(&(2, 2)));
        let store = SqliteStore::open(SqliteConfig::new(&path)).unwrap();
        assert_eq!(names(&store, "name=oti").await, ["a"]);
        let missing = SqliteStore::reindex_offline(
            &SqliteConfig::new(dir.path().join("none.db")),
            &mut |_, _| {},
        );
        assert!(missing.is_err());
    }
}
