//! The node's TOML configuration. Every field has a documented default;
//! unknown fields are rejected; command-line flags and their environment
//! variables override the file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context;
use fhirsync_store::postgres::PgConfig;
use fhirsync_store::sqlite::{SqliteConfig, SyncMode};
use serde::Deserialize;

use crate::NodeArgs;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's id; minted and stored at first start when absent.
    pub node_id: Option<String>,
    /// Directory of the embedded database.
    pub data_dir: PathBuf,
    /// HTTP listen address.
    pub listen: String,
    /// Public FHIR base URL; derived from the `Host` header when absent.
    pub base_url: Option<String>,
    pub storage: StorageConfig,
    pub api: ApiSection,
    /// Log filter (`info`, `fhirsync=debug`, ...); `RUST_LOG` overrides it.
    pub log: String,
    /// Bearer token the admin API (`/admin`) requires; open when absent.
    pub admin_token: Option<String>,
    /// Bearer token `/metrics` requires (the admin token is taken too);
    /// open to anyone who reaches the port when absent.
    pub metrics_token: Option<String>,
    /// This node's parent edge (it is then a child).
    pub parent: Option<fhirsync_replica::EdgeConfig>,
    /// Children allowed to pull from and push to this node.
    pub children: Vec<ChildSection>,
    /// The NATS JetStream transport (outbox and followed nodes).
    pub nats: Option<fhirsync_nats::NatsConfig>,
    /// Topic-based subscriptions (always served; this tunes them).
    pub subscriptions: fhirsync_subs::SubsConfig,
    /// HTTPS (and optionally client certificates) for the HTTP server.
    pub tls: Option<crate::tls::TlsSection>,
    /// Who may call the FHIR API.
    pub auth: crate::auth_cfg::AuthSection,
    /// The web console.
    pub console: crate::console_cfg::ConsoleSection,
    /// Structural validation of what clients write.
    pub validation: ValidationSection,
    /// Bulk data (`$export`, `$import`).
    pub bulk: BulkSection,
}

/// Longest `[bulk] retention_s`: a year.
pub const RETENTION_S_MAX: u64 = 365 * 24 * 3600;

/// `[bulk]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BulkSection {
    /// Serve `$export` and `$import`.
    pub enabled: bool,
    /// Where jobs keep their files; default `<data_dir>/bulk`.
    pub dir: Option<PathBuf>,
    /// An export's files are split at about this size, in bytes.
    pub file_bytes_max: u64,
    /// Finished jobs and their files are removed this long after, in seconds.
    pub retention_s: u64,
    /// Jobs that run at once (the others wait).
    pub jobs_max: usize,
    /// Largest input file an `$import` fetches, in bytes.
    pub import_bytes_max: u64,
    /// Bearer token sent with an `$import`'s fetches.
    pub import_token: Option<String>,
    /// Hosts (`host` or `host:port`) an `$import` may fetch from; empty: any.
    pub import_hosts: Vec<String>,
}

impl Default for BulkSection {
    fn default() -> Self {
        let d = fhirsync_api::bulk::BulkConfig::new("");
        BulkSection {
            enabled: true,
            dir: None,
            file_bytes_max: d.file_bytes_max,
            retention_s: d.retention_s,
            jobs_max: d.jobs_max,
            import_bytes_max: d.import_bytes_max,
            import_token: None,
            import_hosts: Vec::new(),
        }
    }
}

impl BulkSection {
    /// The settings of a node whose data lives in `data_dir`; `None`: off.
    pub fn config(
        &self,
        data_dir: &std::path::Path,
    ) -> anyhow::Result<Option<fhirsync_api::bulk::BulkConfig>> {
        if !self.enabled {
            return Ok(None);
        }
        if self.file_bytes_max < 1024 || self.jobs_max == 0 || self.jobs_max > 64 {
            anyhow::bail!("[bulk] file_bytes_max must be at least 1024 and jobs_max 1 to 64");
        }
        if self.retention_s > RETENTION_S_MAX {
            anyhow::bail!("[bulk] retention_s must be at most {RETENTION_S_MAX} (a year)");
        }
        Ok(Some(fhirsync_api::bulk::BulkConfig {
            dir: self.dir.clone().unwrap_or_else(|| data_dir.join("bulk")),
            file_bytes_max: self.file_bytes_max,
            retention_s: self.retention_s,
            jobs_max: self.jobs_max,
            import_bytes_max: self.import_bytes_max,
            import_token: self.import_token.clone(),
            import_hosts: self.import_hosts.clone(),
        }))
    }
}

/// `[validation]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ValidationSection {
    /// `strict` (refuse with 422), `lenient` (store, log the problems) or
    /// `off`.
    pub mode: String,
}

impl Default for ValidationSection {
    fn default() -> Self {
        ValidationSection {
            mode: "strict".into(),
        }
    }
}

/// A registered child (`[[children]]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChildSection {
    pub node_id: String,
    /// The token the child sends as `Authorization: Bearer`.
    pub token: String,
    /// May pull this node's changes.
    #[serde(default = "yes")]
    pub pull: bool,
    /// May push its changes here.
    #[serde(default = "yes")]
    pub push: bool,
    /// Resource types it may push; empty: all.
    #[serde(default)]
    pub push_types: Vec<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// `full`: fsync every (group) commit; `normal`: survive process
    /// crashes but not power loss.
    pub sync: String,
    /// Most write requests sharing one commit.
    pub group_commit_max: usize,
    /// Write requests queued for the writer before callers wait.
    pub write_queue_max: usize,
    /// Read connections kept open (SQLite).
    pub readers_max: usize,
    /// `sqlite` (the default: one file in the data directory) or
    /// `postgres` (a database several node processes may share).
    pub backend: String,
    /// The PostgreSQL database, `postgres://user:password@host:port/db`
    /// (or `FHIRSYNC_DATABASE_URL` when this is not set).
    pub url: Option<String>,
    /// Most connections one process opens for reads (PostgreSQL).
    pub pool_max: usize,
    /// Longest a statement may run before the database cancels it, in ms
    /// (PostgreSQL; 0: no limit).
    pub statement_timeout_ms: u64,
    /// TLS to the database: `disable`, `require` or `verify-full` (with
    /// TLS the certificate is always verified).
    pub sslmode: String,
    /// PEM file of the CA(s) of the database's certificate; unset: the
    /// system's roots.
    pub ca_file: Option<PathBuf>,
}

/// Most read connections one process may open to PostgreSQL.
pub const POOL_MAX: usize = 256;
/// Longest statement timeout that may be configured (an hour).
pub const STATEMENT_TIMEOUT_MS_MAX: u64 = 3_600_000;
/// The environment variable that gives the database URL.
pub const DATABASE_URL_ENV: &str = "FHIRSYNC_DATABASE_URL";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Largest accepted request body, in bytes.
    pub body_bytes_max: usize,
    /// Longest `$changes` long-poll, in seconds.
    pub long_poll_s_max: u64,
    /// Each answer waits until its AuditEvent is committed (else the
    /// record follows within 10 ms).
    pub audit_wait: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: None,
            data_dir: PathBuf::from("./fhirsync-data"),
            listen: "127.0.0.1:8080".into(),
            base_url: None,
            storage: StorageConfig::default(),
            api: ApiSection::default(),
            log: "info".into(),
            admin_token: None,
            metrics_token: None,
            parent: None,
            children: Vec::new(),
            nats: None,
            subscriptions: fhirsync_subs::SubsConfig::default(),
            tls: None,
            auth: Default::default(),
            console: Default::default(),
            validation: Default::default(),
            bulk: Default::default(),
        }
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        let d = SqliteConfig::new("");
        StorageConfig {
            sync: "full".into(),
            group_commit_max: d.group_commit_max,
            write_queue_max: d.write_queue_max,
            readers_max: d.readers_max,
            backend: "sqlite".into(),
            url: None,
            pool_max: 16,
            statement_timeout_ms: 30_000,
            sslmode: "disable".into(),
            ca_file: None,
        }
    }
}

impl Default for ApiSection {
    fn default() -> Self {
        let d = fhirsync_api::ApiConfig::default();
        ApiSection {
            body_bytes_max: d.body_bytes_max,
            long_poll_s_max: d.long_poll_s_max,
            audit_wait: d.audit_wait,
        }
    }
}

impl Config {
    /// The file (if any), then flags and environment on top.
    pub fn load(args: &NodeArgs, listen: Option<&str>) -> anyhow::Result<Config> {
        let mut c = Self::load_file(args, listen)?;
        if args.anonymous {
            c.auth.anonymous = true;
        }
        if let Some(l) = &args.console_listen {
            c.console.listen = l.clone();
        }
        c.console.addr(c.tls.is_some())?;
        Ok(c)
    }

    fn load_file(args: &NodeArgs, listen: Option<&str>) -> anyhow::Result<Config> {
        let mut c = match &args.config {
            Some(p) => Self::from_file(p)?,
            None => Config::default(),
        };
        if let Some(d) = &args.data_dir {
            c.data_dir = d.clone();
        }
        if let Some(n) = &args.node_id {
            c.node_id = Some(n.clone());
        }
        if let Some(l) = listen {
            c.listen = l.to_owned();
        }
        if c.storage.url.is_none() {
            c.storage.url = std::env::var(DATABASE_URL_ENV)
                .ok()
                .filter(|u| !u.is_empty());
        }
        c.check()?;
        Ok(c)
    }

    pub fn from_file(p: &Path) -> anyhow::Result<Config> {
        let text = std::fs::read_to_string(p)
            .with_context(|| format!("cannot read config {}", p.display()))?;
        toml::from_str(&text).map_err(|e| {
            // One line: file, line number and the parser's message.
            let line = e
                .span()
                .map(|s| text.get(..s.start).unwrap_or(&text).matches('\n').count() + 1)
                .unwrap_or(1);
            anyhow::anyhow!("config {}:{line}: {}", p.display(), e.message().trim())
        })
    }

    fn check(&self) -> anyhow::Result<()> {
        self.listen_addr()?;
        self.sync_mode()?;
        self.postgres()?;
        self.validation_mode()?;
        self.bulk.config(&self.data_dir)?;
        if let Some(n) = &self.node_id {
            anyhow::ensure!(
                fhirsync_store::sqlite::is_valid_node_id(n),
                "invalid node id '{n}' (1 to 64 of A-Z a-z 0-9 - _)"
            );
        }
        let mut tokens = std::collections::HashSet::new();
        for c in &self.children {
            anyhow::ensure!(
                fhirsync_store::sqlite::is_valid_node_id(&c.node_id),
                "children: invalid node id '{}'",
                c.node_id
            );
            anyhow::ensure!(
                c.token.len() >= 16,
                "children: the token of '{}' is shorter than 16 characters",
                c.node_id
            );
            anyhow::ensure!(
                tokens.insert(c.token.as_str()),
                "children: two children share a token"
            );
            for t in &c.push_types {
                anyhow::ensure!(
                    fhirsync_core::resource::is_resource_type(t),
                    "children: push type '{t}' of '{}' is not a resource type",
                    c.node_id
                );
            }
        }
        if let Some(n) = &self.nats {
            n.check(self.node_id.as_deref())
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        if let Some(t) = &self.tls {
            t.server_config()?;
        }
        self.subscriptions
            .check()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(
            self.subscriptions.nats.iter().all(|c| !c.name.is_empty()),
            "subscriptions.nats: every connection needs a name"
        );
        if let Some(p) = &self.parent {
            anyhow::ensure!(
                p.url.starts_with("http://") || p.url.starts_with("https://"),
                "parent.url '{}' is not an http(s) URL",
                p.url
            );
            anyhow::ensure!(
                p.batch_size_max >= 1,
                "parent.batch_size_max must be at least 1"
            );
            anyhow::ensure!(p.retry_max >= 1, "parent.retry_max must be at least 1");
            anyhow::ensure!(
                p.verify_every_s <= fhirsync_replica::config::VERIFY_EVERY_S_MAX,
                "parent.verify_every_s must be at most {} (a week), or 0 for on demand only",
                fhirsync_replica::config::VERIFY_EVERY_S_MAX
            );
            fhirsync_replica::filter::Filter::new(&p.pull_filter)
                .map_err(|e| anyhow::anyhow!("parent.pull_filter: {e}"))?;
            fhirsync_replica::filter::Filter::new(&p.push_filter)
                .map_err(|e| anyhow::anyhow!("parent.push_filter: {e}"))?;
        }
        Ok(())
    }

    pub fn listen_addr(&self) -> anyhow::Result<SocketAddr> {
        self.listen
            .parse()
            .with_context(|| format!("listen address '{}' is not IP:PORT", self.listen))
    }

    pub fn sync_mode(&self) -> anyhow::Result<SyncMode> {
        match self.storage.sync.as_str() {
            "full" => Ok(SyncMode::Full),
            "normal" => Ok(SyncMode::Normal),
            s => anyhow::bail!("storage.sync '{s}' must be full or normal"),
        }
    }

    /// The PostgreSQL settings when `storage.backend` is `postgres`.
    pub fn postgres(&self) -> anyhow::Result<Option<PgConfig>> {
        let st = &self.storage;
        match st.backend.as_str() {
            "sqlite" => return Ok(None),
            "postgres" => {}
            b => anyhow::bail!("storage.backend '{b}' must be sqlite or postgres"),
        }
        let url = st.url.as_deref().ok_or_else(|| {
            anyhow::anyhow!("storage.backend is postgres: set storage.url or {DATABASE_URL_ENV}")
        })?;
        anyhow::ensure!(
            url.starts_with("postgres://") || url.starts_with("postgresql://"),
            "storage.url '{}' is not a postgres:// URL",
            fhirsync_store::postgres::redact(url)
        );
        anyhow::ensure!(
            (1..=POOL_MAX).contains(&st.pool_max),
            "storage.pool_max {} must be 1 to {POOL_MAX}",
            st.pool_max
        );
        anyhow::ensure!(
            st.statement_timeout_ms <= STATEMENT_TIMEOUT_MS_MAX,
            "storage.statement_timeout_ms {} is over {STATEMENT_TIMEOUT_MS_MAX}",
            st.statement_timeout_ms
        );
        let tls = st
            .sslmode
            .parse()
            .map_err(|e: String| anyhow::anyhow!("storage.{e}"))?;
        if let Some(f) = &st.ca_file {
            anyhow::ensure!(f.is_file(), "storage.ca_file: cannot read {}", f.display());
        }
        let mut pg = PgConfig::new(url);
        pg.pool_max = st.pool_max;
        pg.statement_timeout_ms = st.statement_timeout_ms;
        pg.tls = tls;
        pg.ca_file = st.ca_file.clone();
        Ok(Some(pg))
    }

    /// Opens the configured store. Blocks: call it outside the async
    /// runtime's threads (or in `block_in_place`).
    pub fn open_store(&self) -> anyhow::Result<std::sync::Arc<dyn fhirsync_store::Store>> {
        self.store(false)
    }

    /// [`Config::open_store`] for a command that alone uses the store,
    /// holding the data directory's lock (see [`SqliteConfig::offline`]).
    pub fn open_store_offline(&self) -> anyhow::Result<std::sync::Arc<dyn fhirsync_store::Store>> {
        self.store(true)
    }

    fn store(&self, offline: bool) -> anyhow::Result<std::sync::Arc<dyn fhirsync_store::Store>> {
        Ok(match self.postgres()? {
            Some(pg) => {
                let node = fhirsync_store::postgres::PgNode {
                    node_id: self.node_id.clone(),
                    group_commit_max: self.storage.group_commit_max,
                    write_queue_max: self.storage.write_queue_max,
                };
                std::sync::Arc::new(
                    fhirsync_store::postgres::PgStore::open(pg, node)
                        .context("cannot open the store")?,
                )
            }
            None => {
                let mut cfg = self.sqlite()?;
                cfg.offline = offline;
                std::sync::Arc::new(
                    fhirsync_store::sqlite::SqliteStore::open(cfg)
                        .context("cannot open the store")?,
                )
            }
        })
    }

    pub fn sqlite(&self) -> anyhow::Result<SqliteConfig> {
        let mut s = SqliteConfig::new(fhirsync_store::sqlite::SqliteStore::db_path(&self.data_dir));
        s.node_id = self.node_id.clone();
        s.sync = self.sync_mode()?;
        s.group_commit_max = self.storage.group_commit_max;
        s.write_queue_max = self.storage.write_queue_max;
        s.readers_max = self.storage.readers_max;
        Ok(s)
    }

    pub fn api(&self) -> anyhow::Result<fhirsync_api::ApiConfig> {
        Ok(fhirsync_api::ApiConfig {
            body_bytes_max: self.api.body_bytes_max,
            long_poll_s_max: self.api.long_poll_s_max,
            base_url: self.base_url.clone(),
            admin_token: self.admin_token.clone(),
            metrics_token: self.metrics_token.clone(),
            auth: std::sync::Arc::new(self.auth.build()?),
            https: self.tls.is_some(),
            audit_wait: self.api.audit_wait,
            validation: self.validation_mode()?,
        })
    }

    pub fn validation_mode(&self) -> anyhow::Result<fhirsync_core::validate::Mode> {
        fhirsync_core::validate::Mode::parse(&self.validation.mode).ok_or_else(|| {
            anyhow::anyhow!(
                "[validation] mode '{}': expected strict, lenient or off",
                self.validation.mode
            )
        })
    }

    pub fn children(&self) -> fhirsync_api::Children {
        fhirsync_api::Children::new(
            self.children
                .iter()
                .map(|c| fhirsync_api::ChildConfig {
                    node_id: c.node_id.clone(),
                    token: c.token.clone(),
                    pull: c.pull,
                    push: c.push,
                    push_types: c.push_types.clone(),
                })
                .collect(),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_rejected() {
        let e = toml::from_str::<Config>("lisen = \"x\"").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = toml::from_str::<Config>("[storage]\nsnyc = \"full\"").unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
    }

    #[test]
    fn file_values_and_defaults() {
        let c: Config = toml::from_str("node_id = \"a\"\n[storage]\nsync = \"normal\"").unwrap();
        assert_eq!(c.node_id.as_deref(), Some("a"));
        assert_eq!(c.sync_mode().unwrap(), SyncMode::Normal);
        assert_eq!(c.listen, "127.0.0.1:8080");
        assert_eq!(c.storage.group_commit_max, 256);
    }

    #[test]
    fn bulk_settings_out_of_range_are_refused() {
        let dir = std::path::Path::new("/d");
        for bad in [
            "[bulk]\nfile_bytes_max = 10",
            "[bulk]\njobs_max = 0",
            "[bulk]\njobs_max = 65",
            "[bulk]\nretention_s = 18446744073709551615",
        ] {
            let c: Config = toml::from_str(bad).unwrap();
            assert!(c.bulk.config(dir).is_err(), "{bad}");
        }
        let c: Config = toml::from_str("[bulk]\nimport_hosts = [\"a.example\"]").unwrap();
        let b = c.bulk.config(dir).unwrap().unwrap();
        assert_eq!(b.dir, dir.join("bulk"));
        assert_eq!(b.import_hosts, vec!["a.example".to_owned()]);
        let off: Config = toml::from_str("[bulk]\nenabled = false").unwrap();
        assert!(off.bulk.config(dir).unwrap().is_none());
    }

    #[test]
    fn storage_settings_out_of_range_are_refused() {
        let pg = "[storage]\nbackend = \"postgres\"\nurl = \"postgres://u:pw@h/d\"\n";
        for (bad, says) in [
            ("[storage]\nbackend = \"oracle\"", "sqlite or postgres"),
            ("[storage]\nbackend = \"postgres\"", "FHIRSYNC_DATABASE_URL"),
            (
                "[storage]\nbackend = \"postgres\"\nurl = \"mysql://u:pw@h/d\"",
                "postgres://",
            ),
            (&format!("{pg}pool_max = 0"), "pool_max"),
            (&format!("{pg}pool_max = 257"), "pool_max"),
            (
                &format!("{pg}statement_timeout_ms = 3600001"),
                "statement_timeout_ms",
            ),
            (&format!("{pg}sslmode = \"allow\""), "sslmode"),
            (&format!("{pg}ca_file = \"/no/such/ca.pem\""), "ca_file"),
        ] {
            let c: Config = toml::from_str(bad).unwrap();
            let e = c.postgres().unwrap_err().to_string();
            assert!(e.contains(says) && !e.contains(":pw@"), "{bad}: {e}");
        }
        let c: Config = toml::from_str(&format!("{pg}sslmode = \"verify-full\"")).unwrap();
        let p = c.postgres().unwrap().unwrap();
        assert_eq!(p.tls, fhirsync_store::postgres::TlsMode::VerifyFull);
        assert_eq!((p.pool_max, p.statement_timeout_ms), (16, 30_000));
        let sqlite: Config = toml::from_str("").unwrap();
        assert!(sqlite.postgres().unwrap().is_none());
    }
}
