//! The configuration of a node's parent edge (the `[parent]` TOML table).

use fhirsync_core::replicate::Policy;
use fhirsync_core::validate::Mode;
use serde::Deserialize;

/// What to do with a record that keeps failing after its retries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum OnError {
    /// Stop the edge at that record until it succeeds (or is fixed).
    #[default]
    Block,
    /// Set it aside in the dead-letter list and go on.
    DeadLetter,
}

/// Which records a direction carries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Resource types; empty: all.
    #[serde(default)]
    pub types: Vec<String>,
    /// A FHIRPath boolean expression the resource must satisfy
    /// (tombstones of the listed types always pass).
    #[serde(default)]
    pub fhirpath: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_name() -> String {
    "parent".into()
}
fn default_batch() -> usize {
    500
}
fn default_wait() -> u64 {
    25
}
fn default_retry_max() -> u32 {
    5
}
/// The default time between anti-entropy runs: an hour.
fn default_verify_every() -> u64 {
    3_600
}

pub use fhirsync_core::summary::VERIFY_EVERY_S_MAX;

fn default_delay_max() -> u64 {
    30_000
}

/// A child's edge to its parent.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EdgeConfig {
    /// Name in status, audit and metrics.
    #[serde(default = "default_name")]
    pub name: String,
    /// The parent's FHIR base URL (`http://host:port/fhir`).
    pub url: String,
    /// The token the parent registered for this child.
    pub token: String,
    /// Pull the parent's changes.
    #[serde(default = "yes")]
    pub pull: bool,
    /// Push this node's changes to the parent.
    #[serde(default = "yes")]
    pub push: bool,
    #[serde(default)]
    pub pull_filter: FilterConfig,
    #[serde(default)]
    pub push_filter: FilterConfig,
    /// `manual`, `source-wins` (the parent's version), `target-wins` (the
    /// child's), `hlc-lww`, or `merge` (three-way; what it cannot settle is
    /// `manual`) and `merge+hlc-lww`, `merge+source-wins`,
    /// `merge+target-wins` (what it cannot settle goes to that policy).
    #[serde(default, with = "policy_serde")]
    pub conflict_policy: Policy,
    /// Change records per pull or push request.
    #[serde(default = "default_batch")]
    pub batch_size_max: usize,
    /// Seconds a pull long-poll waits for new changes.
    #[serde(default = "default_wait")]
    pub long_poll_s: u64,
    /// Attempts at one failing record before `on_error` applies.
    #[serde(default = "default_retry_max")]
    pub retry_max: u32,
    /// Longest wait between retries.
    #[serde(default = "default_delay_max")]
    pub retry_delay_ms_max: u64,
    #[serde(default)]
    pub on_error: OnError,
    /// Seconds between two anti-entropy runs (compare with the parent and
    /// repair what differs); 0: only on demand.
    #[serde(default = "default_verify_every")]
    pub verify_every_s: u64,
    /// PEM roots to trust for the parent's HTTPS, besides the system's.
    #[serde(default)]
    pub tls_ca_file: Option<std::path::PathBuf>,
    /// This node's client certificate (PEM) for mutual TLS, with `tls_key_file`.
    #[serde(default)]
    pub tls_cert_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<std::path::PathBuf>,
    /// How pulled versions are validated: the node's `[validation] mode`,
    /// not a field of `[parent]`.
    #[serde(skip)]
    pub validation: Mode,
    /// Anti-entropy only, no pull or push loops (a NATS follow's HTTP
    /// side: NATS carries the changes). Not a field of `[parent]`.
    #[serde(skip)]
    pub verify_only: bool,
}

mod policy_serde {
    use fhirsync_core::replicate::Policy;
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Policy, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl EdgeConfig {
    /// An edge with the defaults (tests and `fhirsync demo`).
    pub fn new(url: &str, token: &str) -> Self {
        EdgeConfig {
            name: default_name(),
            url: url.trim_end_matches('/').to_owned(),
            token: token.to_owned(),
            pull: true,
            push: true,
            pull_filter: FilterConfig::default(),
            push_filter: FilterConfig::default(),
            conflict_policy: Policy::Manual,
            batch_size_max: default_batch(),
            long_poll_s: default_wait(),
            retry_max: default_retry_max(),
            retry_delay_ms_max: default_delay_max(),
            on_error: OnError::Block,
            verify_every_s: default_verify_every(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            validation: Mode::Strict,
            verify_only: false,
        }
    }
}
