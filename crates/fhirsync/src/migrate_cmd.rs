//! `fhirsync migrate`: moves a stopped SQLite node into an empty
//! PostgreSQL database with its log, index and sync state.

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use fhirsync_store::postgres::{from_sqlite, PgConfig};
use fhirsync_store::sqlite::SqliteStore;

use crate::lock::lock_data_dir;

#[derive(Args)]
pub struct MigrateArgs {
    /// The node's data directory (the node must be stopped).
    #[arg(long)]
    from: PathBuf,
    /// The new, empty database: `postgres://user:password@host:port/db`.
    #[arg(long, env = "FHIRSYNC_DATABASE_URL")]
    to: String,
    /// TLS to the database: disable, require or verify-full.
    #[arg(long, default_value = "disable")]
    sslmode: String,
    /// PEM file of the CA(s) of the database's certificate.
    #[arg(long)]
    ca_file: Option<PathBuf>,
}

pub fn run(a: MigrateArgs) -> anyhow::Result<()> {
    crate::serve::init_logging("warn");
    anyhow::ensure!(
        a.to.starts_with("postgres://") || a.to.starts_with("postgresql://"),
        "--to '{}' is not a postgres:// URL",
        fhirsync_store::postgres::redact(&a.to)
    );
    let _lock = lock_data_dir(&a.from)?;
    let mut cfg = PgConfig::new(a.to.clone());
    cfg.tls = a
        .sslmode
        .parse()
        .map_err(|e: String| anyhow::anyhow!("--{e}"))?;
    cfg.ca_file = a.ca_file;
    let started = std::time::Instant::now();
    let (node, moved) =
        from_sqlite::migrate(&SqliteStore::db_path(&a.from), &cfg, &mut |table, n| {
            eprintln!("{table}: {n} rows")
        })
        .context("cannot migrate")?;
    let versions = moved
        .iter()
        .find(|(t, _)| *t == "versions")
        .map_or(0, |(_, n)| *n);
    println!(
        "moved node '{node}' ({versions} versions) into {} in {:.1} s; \
         set [storage] backend = \"postgres\" and its url, and start it there",
        cfg.redacted_url(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
