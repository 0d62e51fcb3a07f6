//! `fhirsync backup` (a consistent copy of a SQLite node's database while
//! it serves) and `fhirsync restore` (a stopped node from such a copy; it
//! then rejoins its parent safely: see `fhirsync_store::restore`).

use std::path::Path;

use anyhow::Context;
use fhirsync_store::restore;
use fhirsync_store::sqlite::SqliteStore;

use crate::config::Config;
use crate::lock::lock_data_dir;

/// A PostgreSQL node is backed up and restored with PostgreSQL's tools.
fn sqlite_only(cfg: &Config, what: &str) -> anyhow::Result<()> {
    if cfg.postgres()?.is_some() {
        anyhow::bail!(
            "this node stores its data in PostgreSQL: {what} it with pg_dump/pg_restore \
             (or the server's continuous archiving), then run `fhirsync verify --repair` \
             on the node and on each of its children"
        );
    }
    Ok(())
}

pub fn backup(cfg: Config, out: &Path) -> anyhow::Result<()> {
    sqlite_only(&cfg, "back up")?;
    let started = std::time::Instant::now();
    let info = restore::backup(&SqliteStore::db_path(&cfg.data_dir), out)
        .with_context(|| format!("cannot back up {}", cfg.data_dir.display()))?;
    println!(
        "backed up node '{}' (log up to seq {}, {} bytes) to {} in {:.1} s",
        info.node_id,
        info.last_seq,
        info.bytes,
        out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

pub fn restore(cfg: Config, from: &Path) -> anyhow::Result<()> {
    sqlite_only(&cfg, "restore")?;
    let _lock = lock_data_dir(&cfg.data_dir)?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let r = restore::restore(&SqliteStore::db_path(&cfg.data_dir), from, now)
        .with_context(|| format!("cannot restore {}", from.display()))?;
    if let Some(p) = &r.replaced {
        println!("kept the replaced database as {}", p.display());
    }
    println!(
        "restored node '{}' (log up to seq {}); its new edits count as '{}'; \
         at its next start it compares itself with its parent and repairs what differs",
        r.restored.node_id, r.restored.last_seq, r.vector_id
    );
    Ok(())
}
