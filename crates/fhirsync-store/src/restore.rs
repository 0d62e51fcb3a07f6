//! Backup and restore of a SQLite node, and the identity a restored node
//! edits under.
//!
//! A backup is a prefix of the node's log. A node restored from one has
//! forgotten the versions it made (and pushed) after the backup, whose
//! vectors count its edits up to some `{node: k}`; its next edits would count
//! the same `k` again for other content, and a parent holding the lost
//! version would take the two for one. So a restore gives the node a fresh
//! *vector id* (`{node_id}.{random}`, a name no node id can have): its later
//! edits count under it and are concurrent with whatever the lost copy made,
//! which is a conflict, never a silent loss. The restore also leaves the
//! cursor [`RESTORED_CURSOR`]: the replicator runs anti-entropy with repair
//! before it clears it, which brings back what the node had pushed after
//! the backup (the parent's feed leaves that out, as it came from this node).

use std::path::{Path, PathBuf};

use rusqlite::{Connection, OpenFlags, OptionalExtension};

use crate::StoreError;

/// The `node_info` key of the vector id (absent: the node id).
pub const VECTOR_ID_KEY: &str = "vector_id";
/// The cursor a restore sets (to the backup's last `seq`) and the
/// replicator clears once anti-entropy has repaired what differs.
pub const RESTORED_CURSOR: &str = "restored";

/// The identity a node's local edits count under in version vectors.
pub fn vector_id(conn: &Connection, node_id: &str) -> Result<String, StoreError> {
    let v: Option<String> = conn
        .query_row(
            "SELECT value FROM node_info WHERE key = ?1",
            [VECTOR_ID_KEY],
            |r| r.get(0),
        )
        .optional()?;
    Ok(v.unwrap_or_else(|| node_id.to_owned()))
}

/// What a backup (or a database) holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    pub node_id: String,
    /// The highest `seq` in its log.
    pub last_seq: u64,
    pub bytes: u64,
}

/// Reads a database's node id and log head, read-only; an error names a
/// file that is not a node's database.
pub fn inspect(path: &Path) -> Result<BackupInfo, StoreError> {
    let bad = |e: String| StoreError::BadRequest(format!("{}: {e}", path.display()));
    let bytes = std::fs::metadata(path)
        .map_err(|e| bad(e.to_string()))?
        .len();
    let conn = Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
        .map_err(|e| bad(e.to_string()))?;
    let node_id: String = conn
        .query_row(
            "SELECT value FROM node_info WHERE key = 'node_id'",
            [],
            |r| r.get(0),
        )
        .map_err(|e| bad(format!("not a fhirsync database ({e})")))?;
    let last: i64 = conn
        .query_row("SELECT coalesce(max(seq), 0) FROM versions", [], |r| {
            r.get(0)
        })
        .map_err(|e| bad(format!("not a fhirsync database ({e})")))?;
    Ok(BackupInfo {
        node_id,
        last_seq: last as u64,
        bytes,
    })
}

/// Writes a consistent copy of the database `db` to `out` while the node
/// serves: `VACUUM INTO` in one read transaction (the writer goes on), into
/// `out.partial`, synced and then renamed, so that a file named `out` is
/// always a whole backup. `out` must not exist.
pub fn backup(db: &Path, out: &Path) -> Result<BackupInfo, StoreError> {
    if out.exists() {
        return Err(StoreError::BadRequest(format!(
            "{} exists; a backup never overwrites a file",
            out.display()
        )));
    }
    if !db.exists() {
        return Err(StoreError::BadRequest(format!(
            "no database at {}",
            db.display()
        )));
    }
    let partial = with_suffix(out, ".partial");
    let _ = std::fs::remove_file(&partial);
    let conn = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    let target = partial.to_str().ok_or_else(|| {
        StoreError::BadRequest(format!("{} is not a UTF-8 path", partial.display()))
    })?;
    conn.execute("VACUUM INTO ?1", [target])?;
    drop(conn);
    sync_file(&partial)?;
    std::fs::rename(&partial, out).map_err(io(out))?;
    sync_parent(out)?;
    inspect(out)
}

/// What a restore did.
#[derive(Debug, Clone)]
pub struct RestoreInfo {
    pub restored: BackupInfo,
    /// Where the replaced database was kept, when there was one.
    pub replaced: Option<PathBuf>,
    pub vector_id: String,
}

/// Puts the backup `from` in place of the database `db` (the node stopped:
/// the caller holds the data directory's lock). The backup must be of the
/// same node as `db`, when `db` exists; the old database is kept beside it
/// as `fhirsync.db.replaced-<ms>` (with its WAL). The restored database
/// gets a fresh vector id and [`RESTORED_CURSOR`] (see the module's text).
pub fn restore(db: &Path, from: &Path, now_ms: u64) -> Result<RestoreInfo, StoreError> {
    let info = inspect(from)?;
    if db.exists() {
        let here = inspect(db)?;
        if here.node_id != info.node_id {
            return Err(StoreError::BadRequest(format!(
                "{} is a backup of node '{}'; this data directory holds node '{}'",
                from.display(),
                info.node_id,
                here.node_id
            )));
        }
    }
    let staged = with_suffix(db, ".restoring");
    let _ = std::fs::remove_file(&staged);
    std::fs::copy(from, &staged).map_err(io(&staged))?;
    let vector_id = format!(
        "{}.{}",
        info.node_id,
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    );
    {
        let mut conn = Connection::open(&staged)?;
        let tx = conn.transaction()?;
        tx.execute(
            "INSERT INTO node_info (key, value) VALUES (?1, ?2)
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            [VECTOR_ID_KEY, vector_id.as_str()],
        )?;
        tx.execute(
            "INSERT INTO cursors (key, seq, updated_ms) VALUES (?1, ?2, ?3)
             ON CONFLICT (key) DO UPDATE SET seq = excluded.seq, updated_ms = excluded.updated_ms",
            rusqlite::params![RESTORED_CURSOR, info.last_seq as i64, now_ms as i64],
        )?;
        tx.commit()?;
    }
    sync_file(&staged)?;
    let replaced = if db.exists() {
        let keep = with_suffix(db, &format!(".replaced-{now_ms}"));
        for side in ["", "-wal", "-shm"] {
            let f = with_suffix(db, side);
            if f.exists() {
                std::fs::rename(&f, with_suffix(&keep, side)).map_err(io(&f))?;
            }
        }
        Some(keep)
    } else {
        None
    };
    std::fs::rename(&staged, db).map_err(io(db))?;
    sync_parent(db)?;
    Ok(RestoreInfo {
        restored: info,
        replaced,
        vector_id,
    })
}

fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut s = p.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> StoreError + '_ {
    move |e| StoreError::Backend(format!("{}: {e}", p.display()))
}

fn sync_file(p: &Path) -> Result<(), StoreError> {
    std::fs::File::open(p)
        .and_then(|f| f.sync_all())
        .map_err(io(p))
}

/// Makes a rename durable (the directory's entry).
fn sync_parent(p: &Path) -> Result<(), StoreError> {
    match p.parent().filter(|d| !d.as_os_str().is_empty()) {
        Some(d) => sync_file(d),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_backup_is_refused_over_a_file_and_a_restore_of_another_node() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("a.db");
        let conn = Connection::open(&db).unwrap();
        conn.execute_batch(crate::sqlite::schema::SCHEMA).unwrap();
        conn.execute(
            "INSERT INTO node_info (key, value) VALUES ('node_id', 'a')",
            [],
        )
        .unwrap();
        drop(conn);
        let out = d.path().join("b.db");
        let info = backup(&db, &out).unwrap();
        assert_eq!((info.node_id.as_str(), info.last_seq), ("a", 0));
        assert!(backup(&db, &out)
            .unwrap_err()
            .to_string()
            .contains("exists"));
        assert!(inspect(&d.path().join("none")).is_err());
        // Another node's database in place: refused, nothing changed.
        let other = d.path().join("other.db");
        let conn = Connection::open(&other).unwrap();
        conn.execute_batch(crate::sqlite::schema::SCHEMA).unwrap();
        conn.execute(
            "INSERT INTO node_info (key, value) VALUES ('node_id', 'z')",
            [],
        )
        .unwrap();
        drop(conn);
        let e = restore(&other, &out, 1).unwrap_err().to_string();
        assert!(e.contains("backup of node 'a'"), "{e}");
        assert_eq!(inspect(&other).unwrap().node_id, "z");
        // Twice from one backup: two different vector ids.
        let r1 = restore(&db, &out, 2).unwrap();
        let r2 = restore(&db, &out, 3).unwrap();
        assert!(r1.vector_id.starts_with("a.") && r1.vector_id != r2.vector_id);
        assert!(r2.replaced.unwrap().ends_with("a.db.replaced-3"));
        let conn = Connection::open(&db).unwrap();
        assert_eq!(vector_id(&conn, "a").unwrap(), r2.vector_id);
    }
}
