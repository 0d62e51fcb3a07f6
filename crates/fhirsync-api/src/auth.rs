//! API authentication and authorization. Callers present a bearer token:
//! a configured one (kept as a SHA-256 hash), an access token issued by the
//! SMART Backend Services token endpoint (`client_credentials` with a
//! `private_key_jwt` assertion, RS384/ES384, `jti` used once), or a child's
//! edge token (for `$changes`/`$apply` only). SMART system scopes
//! (`system/Patient.cruds`, `system/*.rs`, v1 `system/*.read`) are checked
//! per interaction. Requests without a token are refused unless anonymous
//! access is enabled.

use std::collections::HashMap;
use std::fmt;
use std::sync::Mutex;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use base64::Engine;
use fhirsync_core::audit::Who;
use fhirsync_core::clock::{Clock, SystemClock};
use fhirsync_store::{StoreError, SyncWrite, WriteRequest};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{json, Value};

use crate::http::base_url;
use crate::{ApiError, AppState};

/// Permission bits of a scope.
pub const C: u8 = 1;
pub const R: u8 = 2;
pub const U: u8 = 4;
pub const D: u8 = 8;
pub const S: u8 = 16;
const ALL: u8 = C | R | U | D | S;

/// Longest life of a client assertion (`exp` at most this far ahead).
pub const ASSERTION_LIFE_MAX_S: u64 = 300;
/// Clock skew allowed when checking `exp`.
const LEEWAY_S: u64 = 10;
const ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// SMART system scopes: per resource type (or `*`), the allowed interactions.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct Scopes(Vec<(String, u8)>);

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_string())
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self
            .0
            .iter()
            .map(|(t, p)| {
                let letters: String = [(C, 'c'), (R, 'r'), (U, 'u'), (D, 'd'), (S, 's')]
                    .iter()
                    .filter(|(b, _)| p & b != 0)
                    .map(|(_, l)| *l)
                    .collect();
                format!("system/{t}.{letters}")
            })
            .collect();
        f.write_str(&parts.join(" "))
    }
}

impl Scopes {
    /// Everything (anonymous access when enabled).
    pub fn all() -> Scopes {
        Scopes(vec![("*".into(), ALL)])
    }

    /// Parses space-separated scopes: `system/TYPE.cruds` (v2, any subset
    /// in that order) or `system/TYPE.read|write|*` (v1). `TYPE` is a
    /// resource type or `*`. `patient/` and `user/` scopes are refused:
    /// this API serves systems.
    pub fn parse(text: &str) -> Result<Scopes, String> {
        let mut out = Vec::new();
        for s in text.split_whitespace() {
            let rest = s.strip_prefix("system/").ok_or_else(|| {
                format!("scope '{s}': only system/ scopes are supported (system/Patient.rs)")
            })?;
            let (t, p) = rest
                .rsplit_once('.')
                .ok_or_else(|| format!("scope '{s}' has no '.': system/TYPE.cruds"))?;
            if t != "*" && !fhirsync_core::resource::is_resource_type(t) {
                return Err(format!("scope '{s}': '{t}' is not a resource type"));
            }
            let bits = match p {
                "read" => R | S,
                "write" => C | U | D,
                "*" => ALL,
                letters => {
                    let mut bits = 0u8;
                    let mut last = 0usize;
                    for ch in letters.chars() {
                        let (i, b) = match ch {
                            'c' => (1, C),
                            'r' => (2, R),
                            'u' => (3, U),
                            'd' => (4, D),
                            's' => (5, S),
                            _ => {
                                return Err(format!(
                                    "scope '{s}': '{p}' is not cruds, read, write or *"
                                ))
                            }
                        };
                        if i <= last {
                            return Err(format!(
                                "scope '{s}': write the letters in the order c r u d s"
                            ));
                        }
                        last = i;
                        bits |= b;
                    }
                    if bits == 0 {
                        return Err(format!("scope '{s}' grants nothing"));
                    }
                    bits
                }
            };
            out.push((t.to_owned(), bits));
        }
        Ok(Scopes(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The permissions granted on a type.
    pub fn perms(&self, rtype: &str) -> u8 {
        self.0
            .iter()
            .filter(|(t, _)| t == "*" || t == rtype)
            .fold(0, |a, (_, p)| a | p)
    }

    pub fn allows(&self, rtype: &str, want: u8) -> bool {
        self.perms(rtype) & want == want
    }

    /// What of `asked` these scopes cover.
    pub fn narrow(&self, asked: &Scopes) -> Scopes {
        Scopes(
            asked
                .0
                .iter()
                .filter_map(|(t, p)| {
                    let have = if t == "*" {
                        self.0
                            .iter()
                            .filter(|(x, _)| x == "*")
                            .fold(0, |a, (_, p)| a | p)
                    } else {
                        self.perms(t)
                    };
                    let g = p & have;
                    (g != 0).then(|| (t.clone(), g))
                })
                .collect(),
        )
    }
}

/// The SHA-256 of a token, hex.
pub fn token_hash(token: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A new random token (256 bits, base64url).
pub fn new_token() -> String {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system's random source");
    B64URL.encode(b)
}

/// A configured bearer token.
#[derive(Debug, Clone)]
pub struct TokenEntry {
    pub name: String,
    /// SHA-256 of the token, hex.
    pub sha256: String,
    pub scopes: Scopes,
}

/// A SMART Backend Services client.
#[derive(Debug, Clone)]
pub struct ClientEntry {
    pub client_id: String,
    /// The client's public keys.
    pub jwks: JwkSet,
    /// The most it may be granted.
    pub scopes: Scopes,
}

#[derive(Debug, Clone)]
struct Issued {
    client_id: String,
    scopes: Scopes,
    exp_ms: u64,
}

/// Who may call the API, and the access tokens issued so far.
pub struct Auth {
    pub anonymous: bool,
    pub tokens: Vec<TokenEntry>,
    pub clients: Vec<ClientEntry>,
    /// Life of an issued access token.
    pub access_token_s: u64,
    /// The `aud` assertions must name; default: this server's `/auth/token`.
    pub token_url: Option<String>,
    pub clock: std::sync::Arc<dyn Clock>,
    issued: Mutex<HashMap<String, Issued>>,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Auth")
            .field("anonymous", &self.anonymous)
            .field("tokens", &self.tokens.len())
            .field("clients", &self.clients.len())
            .finish()
    }
}

impl Default for Auth {
    /// Open: anonymous requests may do everything (embedding and tests).
    fn default() -> Self {
        Auth::new(true, Vec::new(), Vec::new())
    }
}

/// The authenticated caller of a request.
#[derive(Debug, Clone)]
pub struct Principal {
    pub who: Who,
    pub scopes: Scopes,
}

impl Principal {
    /// 403 unless the caller may do `want` on `rtype`.
    pub fn require(&self, rtype: &str, want: u8, what: &str) -> Result<(), ApiError> {
        if self.scopes.allows(rtype, want) {
            return Ok(());
        }
        let need = Scopes(vec![(rtype.to_owned(), want)]);
        Err(ApiError::new(
            403,
            "forbidden",
            format!(
                "{} may not {what}: it needs scope {need} (it has '{}')",
                self.who.name(),
                self.scopes
            ),
        ))
    }
}

fn unauthorized(why: &str) -> Response {
    let mut r = ApiError::new(401, "login", why).into_response();
    r.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"fhir\""),
    );
    r
}

impl Auth {
    pub fn new(anonymous: bool, tokens: Vec<TokenEntry>, clients: Vec<ClientEntry>) -> Self {
        Auth {
            anonymous,
            tokens,
            clients,
            access_token_s: 300,
            token_url: None,
            clock: std::sync::Arc::new(SystemClock),
            issued: Mutex::new(HashMap::new()),
        }
    }

    /// The caller a bearer token stands for; `None`: unknown or expired.
    fn lookup(&self, state: &AppState, token: &str) -> Option<Principal> {
        let h = token_hash(token);
        if let Some(t) = self.tokens.iter().find(|t| t.sha256 == h) {
            return Some(Principal {
                who: Who::Token(t.name.clone()),
                scopes: t.scopes.clone(),
            });
        }
        {
            let now = self.clock.now_ms();
            let mut issued = self.issued.lock().expect("issued tokens");
            match issued.get(&h) {
                Some(i) if i.exp_ms > now => {
                    return Some(Principal {
                        who: Who::Client(i.client_id.clone()),
                        scopes: i.scopes.clone(),
                    })
                }
                Some(_) => {
                    issued.remove(&h);
                }
                None => {}
            }
        }
        state
            .children
            .list()
            .iter()
            .find(|c| crate::peers::same(&c.token, token))
            .map(|c| Principal {
                who: Who::Node(c.node_id.clone()),
                scopes: Scopes::default(),
            })
    }

    /// The caller of a request, or the 401 to answer.
    /// With anonymous access on, credentials this server does not know
    /// (another scheme, an unknown token) count as none.
    pub fn authenticate(
        &self,
        state: &AppState,
        headers: &HeaderMap,
    ) -> Result<Principal, Box<Response>> {
        let anonymous = || Principal {
            who: Who::Anonymous,
            scopes: Scopes::all(),
        };
        match headers.get(header::AUTHORIZATION) {
            None if self.anonymous => Ok(anonymous()),
            Some(v) if self.anonymous => Ok(v
                .to_str()
                .ok()
                .and_then(|v| v.strip_prefix("Bearer "))
                .and_then(|t| self.lookup(state, t.trim()))
                .unwrap_or_else(anonymous)),
            None => Err(Box::new(unauthorized(
                "this server needs a bearer token (Authorization: Bearer ...)",
            ))),
            Some(v) => {
                let token = v
                    .to_str()
                    .ok()
                    .and_then(|v| v.strip_prefix("Bearer "))
                    .map(str::trim)
                    .ok_or_else(|| {
                        Box::new(unauthorized(
                            "the Authorization header is not 'Bearer <token>'",
                        ))
                    })?;
                self.lookup(state, token).ok_or_else(|| {
                    Box::new(unauthorized("the bearer token is unknown or has expired"))
                })
            }
        }
    }

    fn issue(&self, client_id: &str, scopes: Scopes) -> (String, u64) {
        let token = new_token();
        let now = self.clock.now_ms();
        let mut issued = self.issued.lock().expect("issued tokens");
        issued.retain(|_, i| i.exp_ms > now);
        issued.insert(
            token_hash(&token),
            Issued {
                client_id: client_id.to_owned(),
                scopes,
                exp_ms: now + self.access_token_s * 1000,
            },
        );
        (token, self.access_token_s)
    }
}

/// The permission a request needs, from its interaction and path; `None`:
/// no resource permission (open endpoints, or checked by the handler).
fn needed(interaction: &str, path: &str) -> Option<(String, u8, &'static str)> {
    let seg: Vec<&str> = path
        .trim_start_matches("/fhir")
        .split('/')
        .filter(|s| !s.is_empty())
        .collect();
    let rtype = seg.first().map(|s| s.to_string()).unwrap_or_default();
    let (t, p, what) = match interaction {
        "read" | "vread" | "history-instance" => (rtype, R, "read"),
        "search-type" | "history-type" => (rtype, S, "search"),
        "search-system" | "history-system" => ("*".into(), S, "search all types"),
        "create" => (rtype, C, "create"),
        "update" => (rtype, U, "update"),
        "delete" => (rtype, D, "delete"),
        "operation" => (rtype, R, "read"),
        "changes" => ("*".into(), R, "read the change feed"),
        "verify" => ("*".into(), R, "compare summaries"),
        "apply" => ("*".into(), C | U | D, "apply changes"),
        _ => return None,
    };
    Some((t, p, what))
}

/// The `/fhir` paths anyone may read: the CapabilityStatement and SMART
/// discovery (neither is audited).
pub fn is_public(path: &str) -> bool {
    path == "/fhir/metadata" || path == "/fhir/.well-known/smart-configuration"
}

/// The middleware in front of `/fhir`: authenticates the caller, checks its
/// scopes for the interaction, and leaves a [`Principal`] in the request's
/// extensions for the handlers (a transaction checks each entry).
pub async fn guard(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let path = req.uri().path().to_owned();
    if !path.starts_with("/fhir") {
        return next.run(req).await;
    }
    let open = is_public(&path);
    let p = match state.cfg.auth.authenticate(&state, req.headers()) {
        Ok(p) => p,
        Err(_) if open => Principal {
            who: Who::Anonymous,
            scopes: Scopes::default(),
        },
        Err(r) => return *r,
    };
    let interaction = crate::http_metrics::classify(req.method(), &path);
    req.extensions_mut().insert(p.clone());
    let mut resp = if open {
        next.run(req).await
    } else if let Who::Node(n) = &p.who {
        // A child's edge token opens its feed, its pushes and the
        // summaries of anti-entropy, nothing else; those handlers check
        // what the child may do.
        if matches!(interaction, "changes" | "apply" | "verify") {
            next.run(req).await
        } else {
            ApiError::new(
                403,
                "forbidden",
                format!("node:{n} used its edge token, which is for $changes, $apply, $summary and $current only"),
            )
            .into_response()
        }
    } else {
        match needed(interaction, &path).map(|(t, bits, what)| p.require(&t, bits, what)) {
            Some(Err(e)) => e.into_response(),
            _ => next.run(req).await,
        }
    };
    // The audit trail names the caller from here.
    resp.extensions_mut().insert(p);
    resp
}

/// 403 unless the caller may run every entry of a transaction or batch.
pub fn check_bundle(
    p: &Principal,
    bundle: &serde_json::Map<String, Value>,
) -> Result<(), ApiError> {
    for (i, e) in bundle
        .get("entry")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .enumerate()
    {
        let method = e
            .pointer("/request/method")
            .and_then(Value::as_str)
            .unwrap_or("");
        let url = e
            .pointer("/request/url")
            .and_then(Value::as_str)
            .unwrap_or("");
        let path = format!("/fhir/{}", url.split('?').next().unwrap_or(""));
        let m = Method::from_bytes(method.as_bytes()).unwrap_or(Method::GET);
        let interaction = crate::http_metrics::classify(&m, &path);
        if let Some((t, bits, what)) = needed(interaction, &path) {
            p.require(&t, bits, what).map_err(|e| {
                ApiError::new(403, "forbidden", format!("entry {i}: {}", e.diagnostics))
            })?;
        }
    }
    Ok(())
}

/// A plain JSON answer that must not be cached (OAuth's rule for the
/// token endpoint).
fn json_no_store(status: u16, v: Value) -> Response {
    let mut r = Response::new(Body::from(v.to_string()));
    *r.status_mut() = axum::http::StatusCode::from_u16(status).unwrap_or_default();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn oauth_error(status: u16, code: &str, why: &str) -> Response {
    json_no_store(status, json!({"error": code, "error_description": why}))
}

/// The URL assertions must name as `aud`.
fn token_url(state: &AppState, headers: &HeaderMap) -> String {
    if let Some(u) = &state.cfg.auth.token_url {
        return u.clone();
    }
    let base = base_url(state, headers);
    format!("{}/auth/token", base.trim_end_matches("/fhir"))
}

/// The claims of a client assertion.
#[derive(Debug, serde::Deserialize)]
struct Assertion {
    iss: String,
    sub: String,
    exp: u64,
    jti: Option<String>,
}

/// Why a token request is refused: the OAuth error code and a reason.
type Refusal = (u16, &'static str, String);

/// `POST /auth/token`: SMART Backend Services, `client_credentials` with a
/// signed JWT assertion. The caller's identity for the audit trail is left
/// in the response's extensions.
pub async fn token(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let form_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
    let result = match axum::body::to_bytes(body, 64 * 1024).await {
        _ if !form_type => Err((
            (
                400,
                "invalid_request",
                "send application/x-www-form-urlencoded".to_owned(),
            ),
            Who::Anonymous,
        )),
        Ok(form) => grant(&state, &headers, &form).await,
        Err(_) => Err((
            (
                400,
                "invalid_request",
                "the request body is over 64 KiB".to_owned(),
            ),
            Who::Anonymous,
        )),
    };
    let (resp, who) = match result {
        Ok((client, scopes)) => {
            let (token, life) = state.cfg.auth.issue(&client, scopes.clone());
            let r = json_no_store(
                200,
                json!({
                    "access_token": token,
                    "token_type": "bearer",
                    "expires_in": life,
                    "scope": scopes.to_string(),
                }),
            );
            (r, Who::Client(client))
        }
        Err(((status, code, why), who)) => {
            tracing::info!(%why, "token request refused");
            (oauth_error(status, code, &why), who)
        }
    };
    let mut resp = resp;
    resp.extensions_mut().insert(Principal {
        who,
        scopes: Scopes::default(),
    });
    resp
}

async fn grant(
    state: &AppState,
    headers: &HeaderMap,
    form: &[u8],
) -> Result<(String, Scopes), (Refusal, Who)> {
    let anon = |s, c, w: String| ((s, c, w), Who::Anonymous);
    let f: HashMap<String, String> = form_urlencoded::parse(form).into_owned().collect();
    if f.get("grant_type").map(String::as_str) != Some("client_credentials") {
        return Err(anon(
            400,
            "unsupported_grant_type",
            "grant_type must be client_credentials".into(),
        ));
    }
    if f.get("client_assertion_type").map(String::as_str) != Some(ASSERTION_TYPE) {
        return Err(anon(
            400,
            "invalid_request",
            format!("client_assertion_type must be {ASSERTION_TYPE}"),
        ));
    }
    let jwt = f
        .get("client_assertion")
        .ok_or_else(|| anon(400, "invalid_request", "client_assertion is missing".into()))?;
    let head = jsonwebtoken::decode_header(jwt).map_err(|e| {
        anon(
            401,
            "invalid_client",
            format!("the assertion is not a JWT: {e}"),
        )
    })?;
    if !matches!(head.alg, Algorithm::RS384 | Algorithm::ES384) {
        return Err(anon(
            401,
            "invalid_client",
            format!("alg {:?}: only RS384 and ES384 are accepted", head.alg),
        ));
    }
    // The issuer names the client; the signature is checked with its keys.
    let unverified: Value = jwt
        .split('.')
        .nth(1)
        .and_then(|p| B64URL.decode(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(Value::Null);
    let iss = unverified.get("iss").and_then(Value::as_str).unwrap_or("");
    let auth = &state.cfg.auth;
    let client = auth
        .clients
        .iter()
        .find(|c| c.client_id == iss)
        .ok_or_else(|| {
            anon(
                401,
                "invalid_client",
                format!("client '{iss}' is not registered"),
            )
        })?;
    let who = || Who::Client(client.client_id.clone());
    let refuse = |s, c, w: String| ((s, c, w), who());
    let keys: Vec<&jsonwebtoken::jwk::Jwk> = match &head.kid {
        Some(kid) => client.jwks.find(kid).into_iter().collect(),
        None => client.jwks.keys.iter().collect(),
    };
    if keys.is_empty() {
        return Err(refuse(
            401,
            "invalid_client",
            format!(
                "no key '{}' in the client's JWKS",
                head.kid.unwrap_or_default()
            ),
        ));
    }
    let mut v = Validation::new(head.alg);
    v.set_audience(&[token_url(state, headers)]);
    v.set_issuer(&[&client.client_id]);
    v.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    v.leeway = LEEWAY_S;
    let mut last = String::from("no key verifies the signature");
    let mut claims = None;
    for k in keys {
        let Ok(dk) = DecodingKey::from_jwk(k) else {
            continue;
        };
        match jsonwebtoken::decode::<Assertion>(jwt, &dk, &v) {
            Ok(d) => {
                claims = Some(d.claims);
                break;
            }
            Err(e) => last = format!("the assertion is refused: {e}"),
        }
    }
    let c = claims.ok_or_else(|| refuse(401, "invalid_client", last))?;
    if c.sub != c.iss {
        return Err(refuse(
            401,
            "invalid_client",
            "sub must equal iss (the client_id)".into(),
        ));
    }
    let now_s = auth.clock.now_ms() / 1000;
    if c.exp > now_s + ASSERTION_LIFE_MAX_S + LEEWAY_S {
        return Err(refuse(
            401,
            "invalid_client",
            format!(
                "exp is {} s ahead; at most {ASSERTION_LIFE_MAX_S} s is accepted",
                c.exp - now_s
            ),
        ));
    }
    let jti = c
        .jti
        .filter(|j| !j.is_empty())
        .ok_or_else(|| refuse(401, "invalid_client", "the assertion has no jti".into()))?;
    let claim = SyncWrite::ClaimOnce {
        key: format!("jti:{}:{jti}", client.client_id),
        until_ms: (c.exp + LEEWAY_S) * 1000,
    };
    match state.store.write(WriteRequest::Sync(claim)).await {
        Ok(_) => {}
        Err(StoreError::State(_)) => {
            return Err(refuse(
                401,
                "invalid_client",
                format!("jti '{jti}' has been used before"),
            ))
        }
        Err(e) => {
            tracing::error!(error = %e, "cannot record a jti");
            return Err(refuse(
                503,
                "temporarily_unavailable",
                "cannot record the assertion".into(),
            ));
        }
    }
    let asked = match f.get("scope") {
        Some(s) => Scopes::parse(s).map_err(|e| refuse(400, "invalid_scope", e))?,
        None => client.scopes.clone(),
    };
    let granted = client.scopes.narrow(&asked);
    if granted.is_empty() {
        return Err(refuse(
            400,
            "invalid_scope",
            format!(
                "none of '{asked}' is allowed to this client (it may have '{}')",
                client.scopes
            ),
        ));
    }
    Ok((client.client_id.clone(), granted))
}

/// `GET /fhir/.well-known/smart-configuration`.
pub async fn smart_configuration(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let mut conf = json!({
            "token_endpoint": token_url(&state, &headers),
            "grant_types_supported": ["client_credentials"],
            "token_endpoint_auth_methods_supported": ["private_key_jwt"],
            "token_endpoint_auth_signing_alg_values_supported": ["RS384", "ES384"],
            "scopes_supported": ["system/*.cruds", "system/*.rs", "system/*.read", "system/*.write"],
            "capabilities": ["client-confidential-asymmetric", "permission-v1", "permission-v2"],
    });
    if state.bulk.is_some() {
        conf["associated_endpoints"] = json!([]);
        conf["operations"] = json!(["export", "patient-export", "group-export", "import"]);
        conf["instantiates"] = json!([crate::capability::BULK_DATA_IG]);
    }
    json_no_store(200, conf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_parse_and_check() {
        let s = Scopes::parse("system/Patient.cruds system/Observation.rs").unwrap();
        assert!(s.allows("Patient", C | D));
        assert!(s.allows("Observation", R));
        assert!(!s.allows("Observation", C));
        assert!(!s.allows("Encounter", R));
        let v1 = Scopes::parse("system/*.read").unwrap();
        assert!(v1.allows("Encounter", R | S));
        assert!(!v1.allows("Encounter", U));
        assert_eq!(v1.to_string(), "system/*.rs");
        for bad in [
            "patient/*.read",
            "user/Patient.r",
            "system/Patient",
            "system/Nope.r",
            "system/*.rc",
            "system/*.x",
        ] {
            assert!(Scopes::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn narrowing_grants_only_what_is_held() {
        let held = Scopes::parse("system/*.rs system/Patient.cu").unwrap();
        let got = held.narrow(&Scopes::parse("system/Patient.cruds system/*.cruds").unwrap());
        assert_eq!(got.to_string(), "system/Patient.crus system/*.rs");
        assert!(held
            .narrow(&Scopes::parse("system/Encounter.d").unwrap())
            .is_empty());
    }

    #[test]
    fn token_hash_is_sha256() {
        assert_eq!(
            token_hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_ne!(new_token(), new_token());
        assert_eq!(new_token().len(), 43);
    }
}
