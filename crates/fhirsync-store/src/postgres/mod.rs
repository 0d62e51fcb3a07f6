//! The PostgreSQL backend, for nodes that outgrow one SQLite file: one
//! database that several node processes share. The connection settings;
//! the schema and its migrations ([`schema`]); the change log made
//! gapless across processes ([`log`]); the shared SQL on PostgreSQL
//! ([`conn`]); index rows in bulk ([`index`]); the writer and the store.

pub mod bulk;
pub mod conn;
pub mod from_sqlite;
pub mod index;
pub mod lease;
pub mod log;
pub mod schema;
pub mod store;
pub mod writer;

pub use store::{PgNode, PgStore};

use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use crate::StoreError;

/// Longest time a new connection may take.
pub const CONNECT_TIMEOUT_S: u64 = 10;

/// Settings of the PostgreSQL backend; every limit has a default.
#[derive(Debug, Clone)]
pub struct PgConfig {
    /// `postgres://user:password@host:port/database?…` (libpq's URL form).
    pub url: String,
    /// Most connections this process opens for reads.
    pub pool_max: usize,
    /// Longest a statement may run before the database cancels it (0: no limit).
    pub statement_timeout_ms: u64,
    /// TLS to the database.
    pub tls: TlsMode,
    /// PEM file of the CA(s) the server's certificate must chain to;
    /// `None`: the system's roots.
    pub ca_file: Option<PathBuf>,
}

/// Whether connections use TLS (`sslmode`). With TLS the server's
/// certificate is always verified, chain and host name; `require` and
/// `verify-full` differ only in name (libpq's `require` checks nothing).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TlsMode {
    #[default]
    Disable,
    Require,
    VerifyFull,
}

impl FromStr for TlsMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "disable" => Ok(TlsMode::Disable),
            "require" => Ok(TlsMode::Require),
            "verify-full" => Ok(TlsMode::VerifyFull),
            _ => Err(format!(
                "sslmode '{s}' must be disable, require or verify-full"
            )),
        }
    }
}

impl PgConfig {
    pub fn new(url: impl Into<String>) -> PgConfig {
        PgConfig {
            url: url.into(),
            pool_max: 16,
            statement_timeout_ms: 30_000,
            tls: TlsMode::Disable,
            ca_file: None,
        }
    }

    /// The URL with any password replaced by `***`, for logs and errors.
    pub fn redacted_url(&self) -> String {
        redact(&self.url)
    }
}

/// `postgres://user:secret@host/db` → `postgres://user:***@host/db`.
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let Some((auth, host)) = rest.split_once('@') else {
        return url.to_owned();
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_owned(),
    }
}

/// A new connection with the configured settings.
pub fn connect(cfg: &PgConfig) -> Result<postgres::Client, StoreError> {
    let mut c = postgres::Config::from_str(&cfg.url).map_err(|e| {
        StoreError::Backend(format!("bad database URL {}: {e}", cfg.redacted_url()))
    })?;
    c.application_name("fhirsync");
    if c.get_connect_timeout().is_none() {
        c.connect_timeout(Duration::from_secs(CONNECT_TIMEOUT_S));
    }
    if cfg.statement_timeout_ms > 0 {
        c.options(&format!(
            "-c statement_timeout={}",
            cfg.statement_timeout_ms
        ));
    }
    let refused = |e: postgres::Error| {
        StoreError::Backend(format!(
            "cannot connect to {}: {}",
            cfg.redacted_url(),
            describe(&e)
        ))
    };
    match cfg.tls {
        TlsMode::Disable => {
            c.ssl_mode(postgres::config::SslMode::Disable);
            c.connect(postgres::NoTls).map_err(refused)
        }
        TlsMode::Require | TlsMode::VerifyFull => {
            c.ssl_mode(postgres::config::SslMode::Require);
            c.connect(tls_connector(cfg)?).map_err(refused)
        }
    }
}

/// A rustls connector trusting `ca_file`, or the system's roots.
fn tls_connector(cfg: &PgConfig) -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    match &cfg.ca_file {
        Some(f) => {
            let pem = std::fs::read(f).map_err(|e| {
                StoreError::Backend(format!("cannot read the database CA {}: {e}", f.display()))
            })?;
            let mut n = 0;
            for cert in rustls::pki_types::pem::PemObject::pem_slice_iter(&pem) {
                let cert: rustls::pki_types::CertificateDer = cert.map_err(|e| {
                    StoreError::Backend(format!("database CA {}: {e}", f.display()))
                })?;
                roots.add(cert).map_err(|e| {
                    StoreError::Backend(format!("database CA {}: {e}", f.display()))
                })?;
                n += 1;
            }
            if n == 0 {
                return Err(StoreError::Backend(format!(
                    "database CA {} holds no certificate",
                    f.display()
                )));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::Backend(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// A PostgreSQL error with the server's message when there is one.
pub fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {} ({})", db.severity(), db.message(), db.code().code()),
        None => {
            let mut s = e.to_string();
            let mut src = std::error::Error::source(e);
            while let Some(x) = src {
                s.push_str(&format!(": {x}"));
                src = x.source();
            }
            s
        }
    }
}

impl From<postgres::Error> for StoreError {
    fn from(e: postgres::Error) -> Self {
        StoreError::Backend(describe(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact("postgres://fhir:s3cret@db.example.org:5432/node"),
            "postgres://fhir:***@db.example.org:5432/node"
        );
        assert_eq!(redact("postgres://fhir@db/node"), "postgres://fhir@db/node");
        assert_eq!(redact("host=db user=fhir"), "host=db user=fhir");
        let e = connect(&PgConfig::new("postgres://u:pw@127.0.0.1:notaport/x"))
            .err()
            .expect("a bad URL");
        assert!(!e.to_string().contains("pw"), "{e}");
    }
}
