//! The SQLite schema and connection settings.

use rusqlite::Connection;

/// Bumped when the schema changes; a store of another version is refused.
pub const SCHEMA_VERSION: i64 = 3;

/// Bumped when what the index holds changes (new parameters, new rules):
/// a store indexed by an older version is reindexed when it opens.
pub const INDEX_VERSION: i64 = 1;

/// Schema 1 lacked `versions.via` and the replication tables (which
/// `SCHEMA` creates when missing).
pub const MIGRATE_1_TO_2: &str = "ALTER TABLE versions ADD COLUMN via TEXT;";

/// `versions` is the change log and the version history at once: `seq` is
/// the gapless log position, `superseded` the `seq` of the next version of
/// the same resource (NULL for the current one), which lets a search run at
/// any snapshot `seq`. `tokens`, `strings`, `dates`, `numbers` and
/// `composites` hold the search index per version (see
/// `fhirsync_core::index`); their keys start with the parameter, and every
/// query reaches them by it. `dates` and `numbers` are also indexed by
/// `seq`, so that a dense range is checked version by version (an append
/// at every write: `seq` only grows); `dates` also by `(param, hi)`, for
/// `gt`/`ge` (`hi > x`), which its key (`lo` first) cannot bound.
/// References (the `tokens` rows whose system is a resource type) are
/// indexed by `seq` too (`tokens_ref_seq`, partial), so that a dense chain
/// looks up each version's reference. `versions_type_cur` covers what a
/// search asks of a version besides its conditions (type, snapshot,
/// deleted, id), so that walking a type or listing a chain's targets
/// reads no bodies. `versions_summary` covers what anti-entropy reads of
/// each current version (`sql::summary`), so comparing a million
/// resources reads an index, not the table.
pub const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS node_info (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS versions (
    seq        INTEGER PRIMARY KEY,
    type       TEXT    NOT NULL,
    id         TEXT    NOT NULL,
    vid        INTEGER NOT NULL,
    lu_ms      INTEGER NOT NULL,
    deleted    INTEGER NOT NULL,
    method     TEXT    NOT NULL,
    origin     TEXT    NOT NULL,
    vv         TEXT    NOT NULL,
    hlc        INTEGER NOT NULL,
    hash       BLOB,
    superseded INTEGER,
    body       TEXT,
    via        TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS versions_key ON versions(type, id, vid);
CREATE UNIQUE INDEX IF NOT EXISTS versions_current ON versions(type, id) WHERE superseded IS NULL;
DROP INDEX IF EXISTS versions_type_seq;
CREATE INDEX IF NOT EXISTS versions_type_cur ON versions(type, seq, deleted, superseded, id);
CREATE INDEX IF NOT EXISTS versions_summary ON versions(type, id, vv, hash) WHERE superseded IS NULL;
CREATE TABLE IF NOT EXISTS tokens (
    param  TEXT    NOT NULL,
    value  TEXT    NOT NULL,
    system TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    PRIMARY KEY (param, value, system, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS tokens_ref_seq ON tokens(seq) WHERE system >= 'A' AND system < '[';
CREATE TABLE IF NOT EXISTS strings (
    param TEXT    NOT NULL,
    norm  TEXT    NOT NULL,
    raw   TEXT    NOT NULL,
    seq   INTEGER NOT NULL,
    PRIMARY KEY (param, norm, raw, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dates (
    param TEXT    NOT NULL,
    lo    INTEGER NOT NULL,
    hi    INTEGER NOT NULL,
    seq   INTEGER NOT NULL,
    PRIMARY KEY (param, lo, hi, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dates_seq ON dates(seq);
CREATE INDEX IF NOT EXISTS dates_hi ON dates(param, hi);
CREATE TABLE IF NOT EXISTS numbers (
    param  TEXT    NOT NULL,
    value  REAL    NOT NULL,
    system TEXT    NOT NULL,
    code   TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    PRIMARY KEY (param, value, system, code, seq)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS numbers_seq ON numbers(seq);
CREATE TABLE IF NOT EXISTS composites (
    param TEXT    NOT NULL,
    a_val TEXT    NOT NULL,
    a_sys TEXT    NOT NULL,
    b_val TEXT    NOT NULL,
    b_sys TEXT    NOT NULL,
    b_lo  REAL    NOT NULL,
    b_hi  REAL    NOT NULL,
    seq   INTEGER NOT NULL,
    PRIMARY KEY (param, a_val, a_sys, b_val, b_sys, b_lo, b_hi, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cursors (
    key        TEXT PRIMARY KEY,
    seq        INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS conflicts (
    cid        INTEGER PRIMARY KEY,
    type       TEXT    NOT NULL,
    id         TEXT    NOT NULL,
    state      TEXT    NOT NULL,
    edge       TEXT    NOT NULL,
    policy     TEXT    NOT NULL,
    created_ms INTEGER NOT NULL,
    closed_ms  INTEGER,
    resolution TEXT,
    local      TEXT    NOT NULL,
    remote     TEXT    NOT NULL,
    ancestor   TEXT
);
CREATE INDEX IF NOT EXISTS conflicts_open ON conflicts(type, id) WHERE state = 'open';
CREATE TABLE IF NOT EXISTS dead_letters (
    did        INTEGER PRIMARY KEY,
    created_ms INTEGER NOT NULL,
    edge       TEXT    NOT NULL,
    direction  TEXT    NOT NULL,
    type       TEXT    NOT NULL,
    id         TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    record     TEXT    NOT NULL,
    error      TEXT    NOT NULL,
    attempts   INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
    aid        INTEGER PRIMARY KEY,
    at_ms      INTEGER NOT NULL,
    edge       TEXT    NOT NULL,
    action     TEXT    NOT NULL,
    outcome    TEXT    NOT NULL,
    count      INTEGER NOT NULL,
    first_seq  INTEGER,
    last_seq   INTEGER,
    detail     TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS sub_events (
    sub     TEXT    NOT NULL,
    num     INTEGER NOT NULL,
    seq     INTEGER NOT NULL,
    type    TEXT    NOT NULL,
    id      TEXT    NOT NULL,
    vid     INTEGER NOT NULL,
    deleted INTEGER NOT NULL,
    at_ms   INTEGER NOT NULL,
    PRIMARY KEY (sub, num)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS audit_events (
    aid      INTEGER PRIMARY KEY,
    at_ms    INTEGER NOT NULL,
    kind     TEXT    NOT NULL,
    subtype  TEXT    NOT NULL,
    action   TEXT    NOT NULL,
    outcome  INTEGER NOT NULL,
    who      TEXT    NOT NULL,
    address  TEXT,
    observer TEXT    NOT NULL,
    entities TEXT    NOT NULL,
    patients TEXT    NOT NULL,
    query    TEXT,
    detail   TEXT
);
CREATE INDEX IF NOT EXISTS audit_events_at ON audit_events(at_ms);
CREATE TABLE IF NOT EXISTS audit_event_refs (
    ref TEXT    NOT NULL,
    aid INTEGER NOT NULL,
    PRIMARY KEY (ref, aid)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS used_once (
    key      TEXT PRIMARY KEY,
    until_ms INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS peers (
    node_id            TEXT PRIMARY KEY,
    first_ms           INTEGER NOT NULL,
    last_ms            INTEGER NOT NULL,
    last_seq_received  INTEGER NOT NULL,
    last_seq_sent      INTEGER NOT NULL
);
"#;

/// How hard a commit waits for the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SyncMode {
    /// fsync on every commit (group commits share it): survives power loss.
    #[default]
    Full,
    /// fsync at WAL checkpoints only: survives a process crash, not power loss.
    Normal,
}

fn set_sync(conn: &Connection, sync: SyncMode) -> rusqlite::Result<()> {
    conn.pragma_update(
        None,
        "synchronous",
        match sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        },
    )
}

pub fn configure_writer(conn: &Connection, sync: SyncMode) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    set_sync(conn, sync)?;
    conn.pragma_update(
        None,
        "wal_autocheckpoint",
        super::checkpoint::WRITER_BACKSTOP_PAGES,
    )?;
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

/// The checkpoint thread's connection: it syncs the database file as the
/// writer would before the WAL starts over.
pub fn configure_checkpointer(conn: &Connection, sync: SyncMode) -> rusqlite::Result<()> {
    set_sync(conn, sync)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))
}

pub fn configure_reader(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "cache_size", -16384)?;
    conn.pragma_update(None, "mmap_size", 268_435_456)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

#[cfg(test)]
mod tests {
    /// `.cargo/config.toml` compiles SQLite without allocation statistics:
    /// they take one process-wide mutex on every allocation.
    #[test]
    fn sqlite_keeps_no_allocation_statistics() {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        let used: i64 = conn
            .query_row(
                "SELECT sqlite_compileoption_used('DEFAULT_MEMSTATUS=0')",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(used, 1, "SQLite was built with allocation statistics on");
    }
}
