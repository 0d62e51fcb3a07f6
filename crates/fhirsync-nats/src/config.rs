//! The `[nats]` TOML table.

use std::path::PathBuf;
use std::time::Duration;

use fhirsync_core::replicate::Policy;
use fhirsync_core::validate::Mode as ValidationMode;
use serde::Deserialize;

fn stream() -> String {
    "FHIRSYNC".into()
}
fn prefix() -> String {
    "fhirsync".into()
}
fn yes() -> bool {
    true
}
fn batch() -> usize {
    256
}
fn retry_max() -> u32 {
    5
}
fn ack_wait_s() -> u64 {
    30
}
fn duplicate_window_s() -> u64 {
    120
}
fn replicas() -> usize {
    1
}
fn minus_one() -> i64 {
    -1
}

/// How records travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Durable: a JetStream stream, PubAcks, durable consumers, acks.
    #[default]
    Jetstream,
    /// Best effort, live events only: core NATS publish and subscribe;
    /// what is published while a follower is away is not seen by it.
    Core,
}

/// A node whose changes this node follows.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Follow {
    pub node: String,
    /// Resource types to apply; empty: all (others are acked and counted).
    #[serde(default)]
    pub types: Vec<String>,
    /// The followed node's FHIR base over HTTP: anti-entropy with it
    /// (`$summary`, `$current`), which NATS alone cannot do.
    #[serde(default)]
    pub verify_url: Option<String>,
    /// A token the followed node accepts for its feed (a child's token or
    /// one with a system read scope).
    #[serde(default)]
    pub verify_token: Option<String>,
    /// Seconds between two anti-entropy runs with repair; 0: on demand only.
    #[serde(default = "verify_every")]
    pub verify_every_s: u64,
}

fn verify_every() -> u64 {
    3600
}

impl Follow {
    /// Following `node` for every type, without anti-entropy.
    pub fn new(node: &str) -> Follow {
        Follow {
            node: node.to_owned(),
            types: Vec::new(),
            verify_url: None,
            verify_token: None,
            verify_every_s: verify_every(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NatsConfig {
    /// `nats://host:port` URLs of the cluster.
    pub servers: Vec<String>,
    /// `jetstream` (default) or `core` (best effort, live events only).
    #[serde(default)]
    pub mode: Mode,
    /// The JetStream stream, created or checked at start.
    #[serde(default = "stream")]
    pub stream: String,
    /// First token of every subject: `<prefix>.<node>.<ResourceType>`.
    #[serde(default = "prefix")]
    pub subject_prefix: String,
    /// Publish this node's change log (the outbox).
    #[serde(default = "yes")]
    pub publish: bool,
    /// Nodes to follow, each through its own durable consumer.
    #[serde(default)]
    pub follow: Vec<Follow>,
    /// `manual`, `hlc-lww`, `merge` or `merge+hlc-lww` (nodes on a stream
    /// have no parent/child sides).
    #[serde(default, with = "policy_serde")]
    pub conflict_policy: Policy,
    /// Records per publish round or applied batch.
    #[serde(default = "batch")]
    pub batch_size_max: usize,
    /// Deliveries of a failing message before it becomes a dead letter.
    #[serde(default = "retry_max")]
    pub retry_max: u32,
    /// Seconds JetStream waits for an ack before redelivering.
    #[serde(default = "ack_wait_s")]
    pub ack_wait_s: u64,
    /// Stream limits (only used when this node creates the stream).
    #[serde(default)]
    pub stream_max_age_s: u64,
    #[serde(default = "minus_one")]
    pub stream_max_bytes: i64,
    /// Window in which JetStream drops a repeated `Nats-Msg-Id`.
    #[serde(default = "duplicate_window_s")]
    pub duplicate_window_s: u64,
    #[serde(default = "replicas")]
    pub replicas: usize,
    /// PEM file of the CA(s) that signed the servers' certificates; set, it
    /// also requires TLS.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (PEM) for mutual TLS.
    #[serde(default)]
    pub tls_cert_file: Option<PathBuf>,
    #[serde(default)]
    pub tls_key_file: Option<PathBuf>,
    /// File holding this node's NKey seed (`SU...`), from `fhirsync nats keygen`.
    #[serde(default)]
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (user JWT and seed) for servers in operator/account mode.
    #[serde(default)]
    pub credentials_file: Option<PathBuf>,
    /// How received versions are validated: the node's `[validation]
    /// mode`, not a field of `[nats]`.
    #[serde(skip)]
    pub validation: ValidationMode,
}

mod policy_serde {
    use fhirsync_core::replicate::Policy;
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Policy, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A valid subject token (node ids and types are checked elsewhere too).
fn token_ok(s: &str) -> bool {
    !s.is_empty() && !s.contains(['.', '*', '>', ' ', '\t'])
}

impl NatsConfig {
    /// The files this node authenticates to NATS with.
    pub fn auth(&self) -> crate::AuthFiles {
        crate::AuthFiles {
            tls_ca_file: self.tls_ca_file.clone(),
            tls_cert_file: self.tls_cert_file.clone(),
            tls_key_file: self.tls_key_file.clone(),
            nkey_seed_file: self.nkey_seed_file.clone(),
            credentials_file: self.credentials_file.clone(),
        }
    }

    pub fn new(servers: Vec<String>) -> Self {
        NatsConfig {
            servers,
            mode: Mode::Jetstream,
            stream: stream(),
            subject_prefix: prefix(),
            publish: true,
            follow: Vec::new(),
            conflict_policy: Policy::Manual,
            batch_size_max: batch(),
            retry_max: retry_max(),
            ack_wait_s: ack_wait_s(),
            stream_max_age_s: 0,
            stream_max_bytes: -1,
            duplicate_window_s: duplicate_window_s(),
            replicas: replicas(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            nkey_seed_file: None,
            credentials_file: None,
            validation: ValidationMode::Strict,
        }
    }

    /// Checks what can be checked before connecting.
    pub fn check(&self, node_id: Option<&str>) -> Result<(), String> {
        if self.servers.is_empty() {
            return Err("nats.servers is empty".into());
        }
        for s in &self.servers {
            if !(s.starts_with("nats://") || s.starts_with("tls://")) {
                return Err(format!("nats server '{s}' is not a nats:// or tls:// URL"));
            }
        }
        if !token_ok(&self.stream) || !token_ok(&self.subject_prefix) {
            return Err("nats.stream and nats.subject_prefix must be single subject tokens".into());
        }
        if !matches!(
            self.conflict_policy.fallback(),
            Policy::Manual | Policy::HlcLww
        ) {
            return Err(format!(
                "nats.conflict_policy '{}' needs a parent and a child; use manual, hlc-lww, merge or merge+hlc-lww",
                self.conflict_policy
            ));
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err("nats.tls_cert_file and nats.tls_key_file go together".into());
        }
        if self.nkey_seed_file.is_some() && self.credentials_file.is_some() {
            return Err("nats.nkey_seed_file and nats.credentials_file cannot be combined".into());
        }
        for f in [
            &self.tls_ca_file,
            &self.tls_cert_file,
            &self.tls_key_file,
            &self.nkey_seed_file,
            &self.credentials_file,
        ]
        .into_iter()
        .flatten()
        {
            if !f.is_file() {
                return Err(format!("nats: cannot read {}", f.display()));
            }
        }
        if self.batch_size_max == 0 || self.retry_max == 0 {
            return Err("nats.batch_size_max and nats.retry_max must be at least 1".into());
        }
        for f in &self.follow {
            if !token_ok(&f.node) {
                return Err(format!("nats.follow node '{}' is not a node id", f.node));
            }
            if Some(f.node.as_str()) == node_id {
                return Err(format!("nats.follow lists this node itself ('{}')", f.node));
            }
            for t in &f.types {
                if !fhirsync_core::resource::is_resource_type(t) {
                    return Err(format!("nats.follow type '{t}' is not a resource type"));
                }
            }
            match (&f.verify_url, &f.verify_token) {
                (None, None) => {}
                (Some(u), Some(_)) if u.starts_with("http://") || u.starts_with("https://") => {}
                (Some(u), Some(_)) => {
                    return Err(format!(
                        "nats.follow verify_url '{u}' is not an http(s) URL"
                    ))
                }
                _ => {
                    return Err(format!(
                        "nats.follow '{}': verify_url and verify_token go together",
                        f.node
                    ))
                }
            }
            if f.verify_every_s > fhirsync_core::summary::VERIFY_EVERY_S_MAX {
                return Err(format!(
                    "nats.follow verify_every_s {} is more than a week ({})",
                    f.verify_every_s,
                    fhirsync_core::summary::VERIFY_EVERY_S_MAX
                ));
            }
        }
        Ok(())
    }

    pub fn subject(&self, node: &str, rtype: &str) -> String {
        format!("{}.{node}.{rtype}", self.subject_prefix)
    }

    pub fn ack_wait(&self) -> Duration {
        Duration::from_secs(self.ack_wait_s.max(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follows_verify_settings_are_checked() {
        let mut c = NatsConfig::new(vec!["nats://127.0.0.1:4222".into()]);
        c.follow = vec![Follow::new("b")];
        assert_eq!(c.check(Some("a")), Ok(()));
        let bad = |f: fn(&mut Follow), want: &str| {
            let mut c = c.clone();
            f(&mut c.follow[0]);
            let e = c.check(Some("a")).unwrap_err();
            assert!(e.contains(want), "{e}");
        };
        bad(
            |f| f.verify_url = Some("http://b/fhir".into()),
            "go together",
        );
        bad(
            |f| {
                f.verify_url = Some("ftp://b".into());
                f.verify_token = Some("t".into());
            },
            "not an http(s) URL",
        );
        bad(
            |f| {
                f.verify_url = Some("http://b/fhir".into());
                f.verify_token = Some("t".into());
                f.verify_every_s = 8 * 24 * 3600;
            },
            "more than a week",
        );
        c.conflict_policy = Policy::MergeSourceWins;
        assert!(c
            .check(Some("a"))
            .unwrap_err()
            .contains("parent and a child"));
        c.conflict_policy = Policy::MergeHlcLww;
        assert_eq!(c.check(Some("a")), Ok(()));
    }
}
