//! A FHIR REST client for one server: credentials, `X-Request-Id`,
//! timeouts, and retries with exponential backoff and jitter that honour
//! `Retry-After`.

use std::sync::Mutex;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde_json::Value;

use crate::retry::{backoff, is_retryable_status, retry_after, Jitter};
use crate::SyncError;

/// How a client proves who it is.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Auth {
    #[default]
    None,
    Basic {
        user: String,
        password: String,
    },
    Bearer(String),
}

impl Auth {
    /// From `--*-basic-auth user:pass` and `--*-bearer-token T`.
    pub fn from_options(
        basic: Option<&str>,
        bearer: Option<&str>,
        side: &str,
    ) -> Result<Auth, SyncError> {
        match (basic, bearer) {
            (Some(_), Some(_)) => Err(SyncError::Options(format!(
                "--{side}-basic-auth and --{side}-bearer-token cannot be combined"
            ))),
            (Some(b), None) => match b.split_once(':') {
                Some((u, p)) if !u.is_empty() => Ok(Auth::Basic {
                    user: u.into(),
                    password: p.into(),
                }),
                _ => Err(SyncError::Options(format!(
                    "--{side}-basic-auth must be user:password"
                ))),
            },
            (None, Some(t)) if !t.trim().is_empty() => Ok(Auth::Bearer(t.trim().into())),
            (None, Some(_)) => Err(SyncError::Options(format!(
                "--{side}-bearer-token is empty"
            ))),
            (None, None) => Ok(Auth::None),
        }
    }
}

/// What a server answered.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
    /// The `ETag` header, if any.
    pub etag: Option<String>,
    /// All the answer's headers (bulk data reads `Content-Location`,
    /// `Retry-After` and `X-Progress`).
    pub headers: reqwest::header::HeaderMap,
}

/// What a server answered, as the bytes it sent.
#[derive(Debug)]
pub struct RawReply {
    pub status: u16,
    pub body: bytes::Bytes,
    /// The `ETag` header, if any.
    pub etag: Option<String>,
    pub headers: reqwest::header::HeaderMap,
}

impl RawReply {
    /// The body as JSON (a non-JSON body as one string, an empty one as
    /// null), parsed from the bytes as they came: no copy into a `String`.
    pub fn parsed(self) -> Reply {
        let body = if self.body.trim_ascii().is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&self.body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&self.body).into_owned()))
        };
        Reply {
            status: self.status,
            body,
            etag: self.etag,
            headers: self.headers,
        }
    }
}

/// Whether a request may be repeated after an ambiguous failure (the
/// server may have done it): PUT, DELETE and GET may; POST may only when
/// the server clearly did nothing (connection refused, 429, 503).
fn idempotent(m: &Method) -> bool {
    m != Method::POST
}

pub struct FhirClient {
    base: String,
    http: reqwest::Client,
    auth: Auth,
    request_id: Option<String>,
    retries: u32,
    jitter: Mutex<Jitter>,
}

/// Seconds a single request may take.
pub const REQUEST_TIMEOUT_S: u64 = 120;

impl FhirClient {
    pub fn new(
        base: &str,
        auth: Auth,
        request_id: Option<String>,
        retries: u32,
        tls: Option<&crate::tls::TlsAuth>,
    ) -> Result<Self, SyncError> {
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(Duration::from_secs(REQUEST_TIMEOUT_S))
            .connect_timeout(Duration::from_secs(10))
            .pool_max_idle_per_host(64);
        if let Some(t) = tls {
            b = t.apply(b, base)?;
        }
        let http = b
            .build()
            .map_err(|e| SyncError::Options(format!("cannot build an HTTP client: {e}")))?;
        Ok(FhirClient {
            base: base.trim_end_matches('/').to_owned(),
            http,
            auth,
            request_id,
            retries,
            jitter: Mutex::new(Jitter::new(base.len() as u64 ^ 0x5eed)),
        })
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    /// An absolute URL for `path` (absolute URLs pass through).
    pub fn url(&self, path: &str) -> String {
        if path.starts_with("http://") || path.starts_with("https://") {
            path.to_owned()
        } else {
            format!("{}/{}", self.base, path.trim_start_matches('/'))
        }
    }

    fn wait_for(&self, attempt: u32, resp_retry_after: Option<&str>) -> Duration {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        if let Some(d) = resp_retry_after.and_then(|v| retry_after(v, now)) {
            return d;
        }
        let unit = self.jitter.lock().map(|mut j| j.unit()).unwrap_or(0.5);
        backoff(attempt, unit)
    }

    /// Sends a request, retrying what is worth retrying; a non-2xx answer
    /// that is not retried (or out of retries) is returned as a [`Reply`].
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
    ) -> Result<Reply, SyncError> {
        self.send_with(method, path, body, &[]).await
    }

    /// A request to `url` with this server's credentials and request id.
    pub fn request(&self, method: Method, url: &str) -> reqwest::RequestBuilder {
        let mut rb = self.http.request(method, url);
        if let Some(id) = &self.request_id {
            rb = rb.header("x-request-id", id);
        }
        match &self.auth {
            Auth::None => rb,
            Auth::Basic { user, password } => rb.basic_auth(user, Some(password)),
            Auth::Bearer(t) => rb.bearer_auth(t),
        }
    }

    /// How long to wait before the next try of a request (`Retry-After`
    /// when the server gave one, else backoff with jitter).
    pub fn retry_wait(&self, attempt: u32, retry_after: Option<&str>) -> Duration {
        self.wait_for(attempt, retry_after)
    }

    /// Retries of a failed request this client makes.
    pub fn retries(&self) -> u32 {
        self.retries
    }

    /// [`FhirClient::send`] with more request headers.
    pub async fn send_with(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Result<Reply, SyncError> {
        Ok(self.send_raw(method, path, body, extra).await?.parsed())
    }

    /// [`FhirClient::send_with`] without parsing the answer.
    pub async fn send_raw(
        &self,
        method: Method,
        path: &str,
        body: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Result<RawReply, SyncError> {
        let url = self.url(path);
        let mut attempt = 0u32;
        loop {
            let mut rb = self
                .request(method.clone(), &url)
                .header("accept", "application/fhir+json");
            for (k, v) in extra {
                rb = rb.header(*k, *v);
            }
            if let Some(b) = body {
                rb = rb
                    .header("content-type", "application/fhir+json")
                    .body(b.to_owned());
            }
            match rb.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let clearly_not_done = matches!(status, 429 | 503);
                    if is_retryable_status(status)
                        && attempt < self.retries
                        && (idempotent(&method) || clearly_not_done)
                    {
                        let ra = resp
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        let wait = self.wait_for(attempt, ra.as_deref());
                        tracing::debug!(%url, status, ?wait, attempt, "retrying");
                        tokio::time::sleep(wait).await;
                        attempt += 1;
                        continue;
                    }
                    let headers = resp.headers().clone();
                    let etag = headers
                        .get("etag")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let bytes = resp.bytes().await.map_err(|e| SyncError::Http {
                        url: url.clone(),
                        reason: format!("reading the answer failed: {e}"),
                    })?;
                    return Ok(RawReply {
                        status,
                        body: bytes,
                        etag,
                        headers,
                    });
                }
                Err(e) => {
                    let refused = e.is_connect();
                    if attempt < self.retries && (idempotent(&method) || refused) {
                        let wait = self.wait_for(attempt, None);
                        tracing::debug!(%url, error = %e, ?wait, attempt, "retrying");
                        tokio::time::sleep(wait).await;
                        attempt += 1;
                        continue;
                    }
                    let reason = if e.is_timeout() {
                        "timed out".to_string()
                    } else {
                        // The innermost cause says most (refused, TLS alert, ...).
                        let mut cause: &dyn std::error::Error = &e;
                        while let Some(c) = cause.source() {
                            cause = c;
                        }
                        if refused && cause.to_string().contains("refused") {
                            "cannot connect (connection refused)".to_string()
                        } else {
                            format!("cannot connect: {cause}")
                        }
                    };
                    return Err(SyncError::Http { url, reason });
                }
            }
        }
    }

    /// GET that must succeed with a JSON body.
    pub async fn get_json(&self, path: &str) -> Result<Value, SyncError> {
        let r = self.send(Method::GET, path, None).await?;
        if (200..300).contains(&r.status) {
            Ok(r.body)
        } else {
            Err(status_error(&self.url(path), r.status, &r.body))
        }
    }
}

/// A readable error for a refused request, with advice for auth failures.
pub fn status_error(what: &str, status: u16, body: &Value) -> SyncError {
    let mut detail = outcome_text(body);
    if status == StatusCode::UNAUTHORIZED.as_u16() || status == StatusCode::FORBIDDEN.as_u16() {
        detail = format!("{detail} (check the credentials options)")
            .trim()
            .to_owned();
    }
    SyncError::Status {
        what: what.to_owned(),
        status,
        detail,
    }
}

/// The diagnostics of an OperationOutcome, or a short form of the body.
pub fn outcome_text(body: &Value) -> String {
    if body["resourceType"] == "OperationOutcome" {
        let parts: Vec<String> = body["issue"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|i| i["diagnostics"].as_str().or(i["details"]["text"].as_str()))
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        if !parts.is_empty() {
            return parts.join("; ");
        }
    }
    let s = match body {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_options() {
        assert_eq!(
            Auth::from_options(None, None, "source").unwrap(),
            Auth::None
        );
        assert_eq!(
            Auth::from_options(Some("u:p:w"), None, "source").unwrap(),
            Auth::Basic {
                user: "u".into(),
                password: "p:w".into()
            }
        );
        assert!(Auth::from_options(Some("nocolon"), None, "target").is_err());
        assert!(Auth::from_options(Some("u:p"), Some("t"), "target").is_err());
        assert_eq!(
            Auth::from_options(None, Some(" t "), "x").unwrap(),
            Auth::Bearer("t".into())
        );
    }

    #[test]
    fn outcome_texts() {
        let oo = serde_json::json!({"resourceType": "OperationOutcome", "issue": [{"diagnostics": "a"}, {"details": {"text": "b"}}]});
        assert_eq!(outcome_text(&oo), "a; b");
        assert_eq!(outcome_text(&Value::Null), "");
    }
}
