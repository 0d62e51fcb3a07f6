//! SMART Backend Services clients for tests: a fresh ES384 (P-384) or
//! RS384 (RSA 2048, made by `openssl`) key pair, its public JWKS, and
//! signed client assertions with any `aud`, `exp` and `jti`.

use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

pub struct Client {
    pub client_id: String,
    pub kid: String,
    pub alg: Algorithm,
    key: EncodingKey,
    /// The public key as a JWK.
    pub jwk: Value,
}

fn now_s() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs() as i64
}

impl Client {
    /// A client with a new P-384 key (ES384).
    pub fn es384(client_id: &str) -> Client {
        let kp = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P384_SHA384).expect("P-384 key");
        let raw = kp.public_key_raw(); // 0x04 || x || y
        let (x, y) = raw[1..].split_at(48);
        let kid = format!("{client_id}-es");
        Client {
            client_id: client_id.to_owned(),
            kid: kid.clone(),
            alg: Algorithm::ES384,
            key: EncodingKey::from_ec_der(&kp.serialize_der()),
            jwk: json!({"kty": "EC", "crv": "P-384", "x": B64URL.encode(x), "y": B64URL.encode(y),
                        "kid": kid, "alg": "ES384", "use": "sig"}),
        }
    }

    /// A client with a new RSA 2048 key (RS384), made by `openssl`.
    pub fn rs384(client_id: &str) -> Client {
        let dir = tempfile::tempdir().expect("temp dir");
        let pem = dir.path().join("key.pem");
        let st = Command::new("openssl")
            .args([
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
            ])
            .arg(&pem)
            .output()
            .expect("openssl");
        assert!(st.status.success(), "openssl genpkey failed");
        let out = Command::new("openssl")
            .args(["rsa", "-noout", "-modulus", "-in"])
            .arg(&pem)
            .output()
            .expect("openssl");
        let text = String::from_utf8_lossy(&out.stdout);
        let hex = text.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex modulus"))
            .collect();
        let kid = format!("{client_id}-rs");
        Client {
            client_id: client_id.to_owned(),
            kid: kid.clone(),
            alg: Algorithm::RS384,
            key: EncodingKey::from_rsa_pem(&std::fs::read(&pem).expect("key file"))
                .expect("RSA key"),
            jwk: json!({"kty": "RSA", "n": B64URL.encode(&n), "e": "AQAB",
                        "kid": kid, "alg": "RS384", "use": "sig"}),
        }
    }

    /// The JWKS holding this client's public key.
    pub fn jwks(&self) -> Value {
        json!({"keys": [self.jwk]})
    }

    /// An assertion for `aud` that expires `exp_in_s` from now.
    pub fn assertion(&self, aud: &str, exp_in_s: i64, jti: &str) -> String {
        self.assertion_with(aud, json!({"exp": now_s() + exp_in_s, "jti": jti}))
    }

    /// An assertion with the standard claims plus (or overridden by) `extra`.
    pub fn assertion_with(&self, aud: &str, extra: Value) -> String {
        let mut claims = json!({"iss": self.client_id, "sub": self.client_id, "aud": aud,
                                "exp": now_s() + 240, "jti": uuid::Uuid::new_v4().to_string()});
        for (k, v) in extra.as_object().into_iter().flatten() {
            claims[k] = v.clone();
        }
        let mut h = Header::new(self.alg);
        h.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&h, &claims, &self.key).expect("sign")
    }

    /// The form body of a `client_credentials` token request.
    pub fn token_form(&self, assertion: &str, scope: &str) -> String {
        format!(
            "grant_type=client_credentials&scope={}&client_assertion_type=urn%3Aietf%3Aparams%3Aoauth%3Aclient-assertion-type%3Ajwt-bearer&client_assertion={assertion}",
            scope.replace(' ', "+").replace('/', "%2F").replace('*', "%2A")
        )
    }
}
