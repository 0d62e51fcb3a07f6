//! The files a NATS connection authenticates with (TLS, NKey, JWT
//! credentials), applied to connect options: one definition for the
//! transport and for subscription channels.

use std::path::PathBuf;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuthFiles {
    /// A custom CA: TLS is then required.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate and key (mutual TLS).
    pub tls_cert_file: Option<PathBuf>,
    pub tls_key_file: Option<PathBuf>,
    pub nkey_seed_file: Option<PathBuf>,
    /// A `.creds` file (user JWT + NKey seed, operator mode).
    pub credentials_file: Option<PathBuf>,
}

impl AuthFiles {
    pub async fn apply(
        &self,
        mut o: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions, String> {
        if let Some(ca) = &self.tls_ca_file {
            o = o.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(c), Some(k)) = (&self.tls_cert_file, &self.tls_key_file) {
            o = o
                .add_client_certificate(c.clone(), k.clone())
                .require_tls(true);
        }
        if let Some(p) = &self.nkey_seed_file {
            let seed = std::fs::read_to_string(p)
                .map_err(|e| format!("cannot read {}: {e}", p.display()))?;
            let seed = seed.trim().to_owned();
            nkeys::KeyPair::from_seed(&seed)
                .map_err(|e| format!("{} holds no NKey seed: {e}", p.display()))?;
            o = o.nkey(seed);
        }
        if let Some(p) = &self.credentials_file {
            o = o
                .credentials_file(p)
                .await
                .map_err(|e| format!("cannot use credentials {}: {e}", p.display()))?;
        }
        Ok(o)
    }
}
