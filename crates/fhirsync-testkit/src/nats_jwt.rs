//! NATS decentralized auth for tests: an operator, an account with
//! JetStream, and users with subject permissions, as signed JWTs (the
//! format `nsc` writes), plus the server config lines and `.creds` files.

use base64::Engine;
use nkeys::KeyPair;
use serde_json::{json, Value};

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A JWT with `claims.nats = nats`, issued by `issuer` about `subject`.
fn encode(issuer: &KeyPair, subject: &str, name: &str, nats: Value) -> String {
    let header = json!({"typ": "JWT", "alg": "ed25519-nkey"});
    let claims = json!({
        // An id for the token; the server does not check how it was made.
        "jti": format!("{}{}", &subject[1..21], now_s()),
        "iat": now_s(),
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let signing_input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let sig = issuer.sign(signing_input.as_bytes()).expect("sign");
    format!("{signing_input}.{}", b64(&sig))
}

pub struct Authority {
    account: KeyPair,
    system: KeyPair,
    operator_jwt: String,
    account_jwt: String,
    system_jwt: String,
}

impl Default for Authority {
    fn default() -> Self {
        Self::new()
    }
}

impl Authority {
    pub fn new() -> Authority {
        let operator = KeyPair::new_operator();
        let account = KeyPair::new_account();
        // JetStream needs a system account.
        let system = KeyPair::new_account();
        let system_jwt = encode(
            &operator,
            &system.public_key(),
            "SYS",
            json!({"type": "account", "version": 2}),
        );
        let operator_jwt = encode(
            &operator,
            &operator.public_key(),
            "fhirsync-test-operator",
            json!({"type": "operator", "version": 2}),
        );
        let account_jwt = encode(
            &operator,
            &account.public_key(),
            "FHIRSYNC",
            json!({
                "limits": {"subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
                           "wildcards": true, "conn": -1, "leaf": -1,
                           "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1},
                "default_permissions": {"pub": {}, "sub": {}},
                "type": "account",
                "version": 2
            }),
        );
        Authority {
            account,
            system,
            operator_jwt,
            account_jwt,
            system_jwt,
        }
    }

    /// Lines for the server's config: operator mode with the account preloaded.
    pub fn server_config(&self) -> String {
        format!(
            "operator: \"{}\"\nsystem_account: {}\nresolver: MEMORY\nresolver_preload: {{\n  {}: \"{}\"\n  {}: \"{}\"\n}}\n",
            self.operator_jwt,
            self.system.public_key(),
            self.account.public_key(),
            self.account_jwt,
            self.system.public_key(),
            self.system_jwt
        )
    }

    /// A `.creds` file text for a user allowed to publish to `publish`
    /// (plus the JetStream API and acks) and to subscribe to inboxes.
    pub fn user_creds(&self, name: &str, publish: &[&str]) -> String {
        self.user_creds_with(name, publish, &["_INBOX.>"])
    }

    /// As [`Authority::user_creds`], allowed to subscribe to `subscribe`.
    pub fn user_creds_with(&self, name: &str, publish: &[&str], subscribe: &[&str]) -> String {
        let user = KeyPair::new_user();
        let mut allow: Vec<String> = publish.iter().map(|s| s.to_string()).collect();
        allow.extend(["$JS.API.>".to_string(), "$JS.ACK.>".to_string()]);
        let jwt = encode(
            &self.account,
            &user.public_key(),
            name,
            json!({
                "pub": {"allow": allow},
                "sub": {"allow": subscribe},
                "subs": -1, "data": -1, "payload": -1,
                "type": "user",
                "version": 2
            }),
        );
        format!(
            "-----BEGIN NATS USER JWT-----\n{jwt}\n------END NATS USER JWT------\n\n-----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
            user.seed().expect("seed")
        )
    }
}
