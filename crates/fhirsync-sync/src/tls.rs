//! TLS authentication files (`--source-tls-auth`, `--target-tls-auth`): a
//! small JSON document naming PEM files, relative to the document:
//!
//! ```json
//! {"clientCertificate": "client.pem", "clientKey": "client-key.pem", "caCertificate": "ca.pem"}
//! ```
//!
//! `clientCertificate` and `clientKey` (mutual TLS) go together;
//! `caCertificate` adds a trusted root besides the system's. Each is
//! optional.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::SyncError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct TlsFile {
    client_certificate: Option<PathBuf>,
    client_key: Option<PathBuf>,
    ca_certificate: Option<PathBuf>,
}

/// PEM material read from a TLS authentication file.
#[derive(Debug, Clone, Default)]
pub struct TlsAuth {
    /// Certificate chain then private key, as reqwest's identity wants them.
    pub identity_pem: Option<Vec<u8>>,
    pub ca_pem: Option<Vec<u8>>,
}

impl TlsAuth {
    pub fn load(path: &Path) -> Result<TlsAuth, SyncError> {
        let err = |reason: String| SyncError::File {
            path: path.display().to_string(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(format!("cannot read: {e}")))?;
        let f: TlsFile = serde_json::from_str(&text)
            .map_err(|e| err(format!("not a TLS authentication file: {e}")))?;
        let dir = path.parent().unwrap_or(Path::new("."));
        let read = |p: &Path, what: &str| -> Result<Vec<u8>, SyncError> {
            let full = dir.join(p);
            let bytes =
                std::fs::read(&full).map_err(|e| err(format!("{what} {}: {e}", full.display())))?;
            if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
                return Err(err(format!("{what} {} is not PEM", full.display())));
            }
            Ok(bytes)
        };
        let identity_pem = match (&f.client_certificate, &f.client_key) {
            (Some(c), Some(k)) => {
                let mut pem = read(c, "clientCertificate")?;
                pem.push(b'\n');
                pem.extend(read(k, "clientKey")?);
                Some(pem)
            }
            (None, None) => None,
            _ => return Err(err("clientCertificate and clientKey go together".into())),
        };
        let ca_pem = f
            .ca_certificate
            .as_deref()
            .map(|c| read(c, "caCertificate"))
            .transpose()?;
        if identity_pem.is_none() && ca_pem.is_none() {
            return Err(err("names no certificate".into()));
        }
        Ok(TlsAuth {
            identity_pem,
            ca_pem,
        })
    }

    /// Adds this material to a client builder.
    pub fn apply(
        &self,
        mut b: reqwest::ClientBuilder,
        what: &str,
    ) -> Result<reqwest::ClientBuilder, SyncError> {
        let bad = |e: reqwest::Error| SyncError::Options(format!("{what}: {e}"));
        if let Some(ca) = &self.ca_pem {
            for c in reqwest::Certificate::from_pem_bundle(ca).map_err(bad)? {
                b = b.add_root_certificate(c);
            }
        }
        if let Some(id) = &self.identity_pem {
            b = b.identity(reqwest::Identity::from_pem(id).map_err(bad)?);
        }
        Ok(b)
    }
}
