//! The TOML files of `fhirsync db-sender` and `fhirsync db-receiver`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::tz::Zone;
use crate::DbError;

fn batch_rows() -> usize {
    1000
}
fn linger_ms() -> u64 {
    50
}
fn retry_delay_ms_max() -> u64 {
    30_000
}
fn server_id() -> u32 {
    7001
}
fn stream() -> String {
    "FHIRSYNC_DB".into()
}
fn prefix() -> String {
    "fhirsync".into()
}
fn durable() -> String {
    "fhirsync-db-receiver".into()
}
fn change_columns() -> Vec<String> {
    [
        "date_created",
        "date_changed",
        "date_voided",
        "date_retired",
    ]
    .map(String::from)
    .to_vec()
}

/// Delivery over HTTP to a receiver's `listen` address.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpTarget {
    /// `http(s)://host:port` of the receiver.
    pub url: String,
    /// The site's token (from `db-receiver site add`), or a file holding it.
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA that signed the receiver's certificate, when it
    /// is not a public one.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl HttpTarget {
    pub fn token(&self) -> Result<String, DbError> {
        match (&self.token, &self.token_file) {
            (Some(t), _) => Ok(t.clone()),
            (None, Some(p)) => std::fs::read_to_string(p)
                .map(|s| s.trim().to_string())
                .map_err(|e| DbError::Config(format!("cannot read {}: {e}", p.display()))),
            (None, None) => Err(DbError::Config("[http] needs token or token_file".into())),
        }
    }
}

/// A JetStream stream both sides use: `<prefix>.db.<site>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsLink {
    pub servers: Vec<String>,
    #[serde(default = "stream")]
    pub stream: String,
    #[serde(default = "prefix")]
    pub subject_prefix: String,
    /// The receiver's durable consumer.
    #[serde(default = "durable")]
    pub durable: String,
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
}

impl NatsLink {
    pub fn auth(&self) -> fhirsync_nats::AuthFiles {
        fhirsync_nats::AuthFiles {
            tls_ca_file: self.tls_ca_file.clone(),
            tls_cert_file: self.tls_cert_file.clone(),
            tls_key_file: self.tls_key_file.clone(),
            nkey_seed_file: self.nkey_seed_file.clone(),
            credentials_file: self.credentials_file.clone(),
        }
    }

    pub fn subject(&self, site: &str) -> String {
        format!("{}.db.{site}", self.subject_prefix)
    }
}

/// Bounds of `retry_delay_ms_max`: retries faster than this would hammer
/// the receiver, slower ones leave a fixed cause unnoticed for hours.
pub const RETRY_DELAY_MS_MIN: u64 = 100;
pub const RETRY_DELAY_MS_LIMIT: u64 = 3_600_000;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SenderConfig {
    /// This site's id, as registered at the receiver.
    pub site: String,
    /// `mysql://user:password@host:port/` of the site's database; the
    /// user needs REPLICATION SLAVE, REPLICATION CLIENT and SELECT.
    pub source: String,
    pub database: String,
    /// Tables to follow; empty: all tables of the database.
    #[serde(default)]
    pub tables: Vec<String>,
    /// Replica id, unique among the source server's replicas.
    #[serde(default = "server_id")]
    pub server_id: u32,
    /// Zone of the source's DATETIME values; default: the server's
    /// current UTC offset.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Where the cursor (binlog position) is kept.
    pub state_dir: PathBuf,
    /// With no cursor yet, copy the tables first, then follow the binlog
    /// from the snapshot's position; else start at the current position.
    #[serde(default)]
    pub snapshot: bool,
    #[serde(default = "batch_rows")]
    pub batch_rows: usize,
    /// How long a batch waits for more transactions.
    #[serde(default = "linger_ms")]
    pub linger_ms: u64,
    /// Longest wait between two attempts at a batch that failed (the
    /// receiver refused it, or could not be reached); the wait doubles
    /// from 1 s up to this.
    #[serde(default = "retry_delay_ms_max")]
    pub retry_delay_ms_max: u64,
    /// `host:port` (loopback) where the sender serves `GET /status`
    /// (JSON) and `GET /metrics` (Prometheus); none: not served.
    #[serde(default)]
    pub status_listen: Option<String>,
    #[serde(default)]
    pub http: Option<HttpTarget>,
    #[serde(default)]
    pub nats: Option<NatsLink>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiverConfig {
    /// `mysql://user:password@host:port/` of the central database.
    pub target: String,
    pub database: String,
    /// Zone of the target's DATETIME values; default: the server's current
    /// UTC offset.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Where senders POST batches (`host:port`); none: NATS only. An
    /// address other than loopback needs `tls_cert_file` and `tls_key_file`.
    #[serde(default)]
    pub listen: Option<String>,
    /// HTTPS for `listen`: certificate chain and key (PEM).
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// Bearer token of the admin API (sites, conflicts).
    #[serde(default)]
    pub admin_token: Option<String>,
    /// Columns whose latest value says when a row last changed; the
    /// conflict rule compares them.
    #[serde(default = "change_columns")]
    pub change_columns: Vec<String>,
    #[serde(default)]
    pub nats: Option<NatsLink>,
}

fn read<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, DbError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| DbError::Config(format!("cannot read {}: {e}", path.display())))?;
    toml::from_str(&text).map_err(|e| {
        DbError::Config(format!(
            "{}: {}",
            path.display(),
            e.to_string().lines().collect::<Vec<_>>().join(" ")
        ))
    })
}

fn zone(s: &Option<String>) -> Result<Option<Zone>, DbError> {
    s.as_deref()
        .map(Zone::parse)
        .transpose()
        .map_err(DbError::Config)
}

impl SenderConfig {
    pub fn load(path: &Path) -> Result<SenderConfig, DbError> {
        let c: SenderConfig = read(path)?;
        c.check()?;
        Ok(c)
    }

    pub fn check(&self) -> Result<(), DbError> {
        if self.site.is_empty()
            || !self
                .site
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(DbError::Config(format!(
                "site {:?}: letters, digits, - and _ only",
                self.site
            )));
        }
        if self.http.is_some() == self.nats.is_some() {
            return Err(DbError::Config(
                "give exactly one of [http] and [nats]".into(),
            ));
        }
        if !(RETRY_DELAY_MS_MIN..=RETRY_DELAY_MS_LIMIT).contains(&self.retry_delay_ms_max) {
            return Err(DbError::Config(format!(
                "retry_delay_ms_max {}: between {RETRY_DELAY_MS_MIN} and {RETRY_DELAY_MS_LIMIT}",
                self.retry_delay_ms_max
            )));
        }
        if self.batch_rows == 0 {
            return Err(DbError::Config("batch_rows must be at least 1".into()));
        }
        zone(&self.time_zone)?;
        Ok(())
    }

    pub fn zone(&self) -> Result<Option<Zone>, DbError> {
        zone(&self.time_zone)
    }
}

impl ReceiverConfig {
    pub fn load(path: &Path) -> Result<ReceiverConfig, DbError> {
        let c: ReceiverConfig = read(path)?;
        zone(&c.time_zone)?;
        Ok(c)
    }

    pub fn zone(&self) -> Result<Option<Zone>, DbError> {
        zone(&self.time_zone)
    }
}
