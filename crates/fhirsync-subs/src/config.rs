//! The `[subscriptions]` TOML table.

use std::path::PathBuf;

use serde::Deserialize;

fn retry_max() -> u32 {
    10
}
fn delay_min() -> u64 {
    200
}
fn delay_max() -> u64 {
    30_000
}
fn batch() -> usize {
    500
}

/// A NATS connection a subscription may name (`nats-connection`).
/// Credentials stay in the node's config; a Subscription only names them.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct NatsConnection {
    pub name: String,
    pub servers: Vec<String>,
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
}

impl From<&fhirsync_nats::NatsConfig> for NatsConnection {
    /// The node's own `[nats]` servers and credentials, as the default
    /// connection (named "").
    fn from(n: &fhirsync_nats::NatsConfig) -> Self {
        let a = n.auth();
        NatsConnection {
            name: String::new(),
            servers: n.servers.clone(),
            credentials_file: a.credentials_file,
            nkey_seed_file: a.nkey_seed_file,
            tls_ca_file: a.tls_ca_file,
            tls_cert_file: a.tls_cert_file,
            tls_key_file: a.tls_key_file,
        }
    }
}

impl NatsConnection {
    pub fn auth(&self) -> fhirsync_nats::AuthFiles {
        fhirsync_nats::AuthFiles {
            tls_ca_file: self.tls_ca_file.clone(),
            tls_cert_file: self.tls_cert_file.clone(),
            tls_key_file: self.tls_key_file.clone(),
            nkey_seed_file: self.nkey_seed_file.clone(),
            credentials_file: self.credentials_file.clone(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubsConfig {
    /// The node's base URL as receivers see it (in references of
    /// notifications); default: the address the node listens on.
    #[serde(default)]
    pub base_url: Option<String>,
    /// Failed attempts in a row before a subscription goes to `error`.
    #[serde(default = "retry_max")]
    pub retry_max: u32,
    #[serde(default = "delay_min")]
    pub retry_delay_ms_min: u64,
    #[serde(default = "delay_max")]
    pub retry_delay_ms_max: u64,
    /// Changes the matcher reads per pass.
    #[serde(default = "batch")]
    pub batch_size_max: usize,
    /// Connections for `nats` / `nats-jetstream` channels.
    #[serde(default)]
    pub nats: Vec<NatsConnection>,
}

impl Default for SubsConfig {
    fn default() -> Self {
        SubsConfig {
            base_url: None,
            retry_max: retry_max(),
            retry_delay_ms_min: delay_min(),
            retry_delay_ms_max: delay_max(),
            batch_size_max: batch(),
            nats: Vec::new(),
        }
    }
}

impl SubsConfig {
    pub fn check(&self) -> Result<(), String> {
        if self.retry_max == 0 {
            return Err("subscriptions.retry_max must be at least 1".into());
        }
        if self.retry_delay_ms_min == 0 || self.retry_delay_ms_min > self.retry_delay_ms_max {
            return Err("subscriptions.retry_delay_ms_min must be 1..=retry_delay_ms_max".into());
        }
        if self.batch_size_max == 0 {
            return Err("subscriptions.batch_size_max must be at least 1".into());
        }
        let mut names = std::collections::BTreeSet::new();
        for c in &self.nats {
            if !names.insert(c.name.as_str()) {
                return Err(format!("subscriptions.nats: name '{}' is repeated", c.name));
            }
            if c.servers.is_empty() {
                return Err(format!("subscriptions.nats '{}': servers is empty", c.name));
            }
            if c.tls_cert_file.is_some() != c.tls_key_file.is_some() {
                return Err(format!(
                    "subscriptions.nats '{}': tls_cert_file and tls_key_file go together",
                    c.name
                ));
            }
        }
        Ok(())
    }
}
