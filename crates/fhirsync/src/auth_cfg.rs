//! The `[auth]` table: anonymous access, bearer tokens (as SHA-256 hashes)
//! and SMART Backend Services clients (with their JWKS files), checked
//! when the node starts, one line per mistake.

use std::path::PathBuf;

use anyhow::{bail, Context};
use fhirsync_api::auth::{Auth, ClientEntry, Scopes, TokenEntry};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSection {
    /// Requests without a token may do everything. Off unless set here or
    /// with `serve --anonymous`.
    pub anonymous: bool,
    /// Life of the access tokens the token endpoint issues, in seconds.
    pub access_token_s: u64,
    /// The URL client assertions must name as `aud`; default: this
    /// server's `/auth/token` (from `base_url`, else the `Host` header).
    pub token_url: Option<String>,
    pub tokens: Vec<TokenSection>,
    pub clients: Vec<ClientSection>,
}

impl Default for AuthSection {
    fn default() -> Self {
        AuthSection {
            anonymous: false,
            access_token_s: 300,
            token_url: None,
            tokens: Vec::new(),
            clients: Vec::new(),
        }
    }
}

/// `[[auth.tokens]]`: a bearer token, known by its hash only.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenSection {
    pub name: String,
    /// SHA-256 of the token, 64 hex digits (`fhirsync token new` prints it).
    pub sha256: String,
    /// SMART system scopes, space-separated.
    pub scopes: String,
}

/// `[[auth.clients]]`: a SMART Backend Services client.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientSection {
    pub client_id: String,
    /// The client's public keys (a JWKS JSON file).
    pub jwks_file: PathBuf,
    /// The most it may be granted.
    pub scopes: String,
}

impl AuthSection {
    /// The API's authenticator; every token, scope and key file checked.
    pub fn build(&self) -> anyhow::Result<Auth> {
        let mut tokens = Vec::new();
        for t in &self.tokens {
            let h = t.sha256.to_ascii_lowercase();
            if h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                bail!("[[auth.tokens]] '{}': sha256 must be 64 hex digits", t.name);
            }
            if tokens.iter().any(|x: &TokenEntry| x.name == t.name) {
                bail!("[[auth.tokens]] '{}' is listed twice", t.name);
            }
            let scopes = Scopes::parse(&t.scopes)
                .map_err(|e| anyhow::anyhow!("[[auth.tokens]] '{}': {e}", t.name))?;
            tokens.push(TokenEntry {
                name: t.name.clone(),
                sha256: h,
                scopes,
            });
        }
        let mut clients = Vec::new();
        for c in &self.clients {
            let ctx = || format!("[[auth.clients]] '{}'", c.client_id);
            let text = std::fs::read_to_string(&c.jwks_file)
                .with_context(|| format!("{}: cannot read {}", ctx(), c.jwks_file.display()))?;
            let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_str(&text)
                .with_context(|| format!("{}: {} is not a JWKS", ctx(), c.jwks_file.display()))?;
            if jwks.keys.is_empty() {
                bail!("{}: {} has no keys", ctx(), c.jwks_file.display());
            }
            for k in &jwks.keys {
                jsonwebtoken::DecodingKey::from_jwk(k).map_err(|e| {
                    anyhow::anyhow!("{}: a key in {}: {e}", ctx(), c.jwks_file.display())
                })?;
            }
            if clients
                .iter()
                .any(|x: &ClientEntry| x.client_id == c.client_id)
            {
                bail!("{} is listed twice", ctx());
            }
            let scopes = Scopes::parse(&c.scopes).map_err(|e| anyhow::anyhow!("{}: {e}", ctx()))?;
            clients.push(ClientEntry {
                client_id: c.client_id.clone(),
                jwks,
                scopes,
            });
        }
        if self.access_token_s == 0 || self.access_token_s > 3600 {
            bail!("[auth] access_token_s must be 1..3600");
        }
        let mut a = Auth::new(self.anonymous, tokens, clients);
        a.access_token_s = self.access_token_s;
        a.token_url = self.token_url.clone();
        Ok(a)
    }

    /// One line for the start-up banner.
    pub fn summary(&self) -> String {
        let who = format!(
            "{} token(s), {} client(s)",
            self.tokens.len(),
            self.clients.len()
        );
        if self.anonymous {
            format!("auth: {who}; ANONYMOUS ACCESS IS ENABLED (anyone who can connect may read and write)")
        } else {
            format!("auth: {who}; requests without a token get 401")
        }
    }
}
