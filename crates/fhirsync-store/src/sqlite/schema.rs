//! The SQLite schema and connection settings.

use rusqlite::Connection;

/// Bumped when the schema changes; a store of another version is refused.
pub const SCHEMA_VERSION: i64 = 1;

/// `versions` is the change log and the version history at once: `seq` is
/// the gapless log position, `superseded` the `seq` of the next version of
/// the same resource (NULL for the current one), which lets a search run at
/// any snapshot `seq`. `tokens` holds search keys per version.
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
    body       TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS versions_key ON versions(type, id, vid);
CREATE UNIQUE INDEX IF NOT EXISTS versions_current ON versions(type, id) WHERE superseded IS NULL;
CREATE INDEX IF NOT EXISTS versions_type_seq ON versions(type, seq);
CREATE TABLE IF NOT EXISTS tokens (
    param  TEXT    NOT NULL,
    value  TEXT    NOT NULL,
    system TEXT    NOT NULL,
    seq    INTEGER NOT NULL,
    PRIMARY KEY (param, value, system, seq)
) WITHOUT ROWID;
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

pub fn configure_writer(conn: &Connection, sync: SyncMode) -> rusqlite::Result<()> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match sync {
            SyncMode::Full => "FULL",
            SyncMode::Normal => "NORMAL",
        },
    )?;
    conn.pragma_update(None, "cache_size", -65536)?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}

pub fn configure_reader(conn: &Connection) -> rusqlite::Result<()> {
    conn.pragma_update(None, "cache_size", -16384)?;
    conn.pragma_update(None, "mmap_size", 268_435_456)?;
    conn.busy_timeout(std::time::Duration::from_secs(10))?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(())
}
