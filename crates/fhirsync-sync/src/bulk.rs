//! A Bulk Data (IG 2.0) client for any server that implements it: the
//! kick-off, polling that honours `Retry-After`, and the files read line
//! by line with retries; a download that breaks off is fetched again and
//! the lines already delivered are skipped (a file does not change).

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;

use crate::client::{outcome_text, status_error, FhirClient};
use crate::SyncError;

/// Longest an export may take before the client gives up.
pub const EXPORT_WAIT_MAX_S: u64 = 24 * 3600;
/// Longest pause between two polls, whatever `Retry-After` says.
pub const POLL_WAIT_MAX_S: u64 = 60;
/// Longest line of a file (one resource).
pub const LINE_BYTES_MAX: usize = 64 * 1024 * 1024;

/// What to export.
#[derive(Debug, Clone, Default)]
pub struct ExportRequest {
    /// `None`: `[base]/$export`; `Some(None)`: `Patient/$export`;
    /// `Some(Some(id))`: `Group/[id]/$export`.
    pub patients: Option<Option<String>>,
    pub types: Vec<String>,
    /// `_since`, an instant as the server takes it.
    pub since: Option<String>,
    pub type_filters: Vec<String>,
}

impl ExportRequest {
    /// The kick-off's path and query.
    pub fn path(&self) -> String {
        let mut path = match &self.patients {
            None => "$export".to_owned(),
            Some(None) => "Patient/$export".to_owned(),
            Some(Some(g)) => format!("Group/{g}/$export"),
        };
        let mut q = form_pairs();
        q.append_pair("_outputFormat", "application/fhir+ndjson");
        if !self.types.is_empty() {
            q.append_pair("_type", &self.types.join(","));
        }
        if let Some(s) = &self.since {
            q.append_pair("_since", s);
        }
        for f in &self.type_filters {
            q.append_pair("_typeFilter", f);
        }
        path.push('?');
        path.push_str(&q.finish());
        path
    }
}

fn form_pairs() -> form_urlencoded::Serializer<'static, String> {
    form_urlencoded::Serializer::new(String::new())
}

/// One file of a manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestFile {
    pub rtype: String,
    pub url: String,
    pub count: Option<u64>,
}

/// A finished export.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub raw: Value,
    pub output: Vec<ManifestFile>,
    pub deleted: Vec<ManifestFile>,
    pub transaction_time: String,
    /// The status URL (a `DELETE` on it tells the server it may drop the files).
    pub status_url: String,
}

impl Manifest {
    fn parse(raw: Value, status_url: String) -> Result<Manifest, SyncError> {
        let files = |k: &str| -> Result<Vec<ManifestFile>, SyncError> {
            raw[k]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or(&[])
                .iter()
                .map(|o| {
                    Ok(ManifestFile {
                        rtype: o["type"].as_str().unwrap_or_default().to_owned(),
                        url: o["url"]
                            .as_str()
                            .ok_or_else(|| SyncError::Http {
                                url: status_url.clone(),
                                reason: format!("a manifest entry without url: {o}"),
                            })?
                            .to_owned(),
                        count: o["count"].as_u64(),
                    })
                })
                .collect()
        };
        Ok(Manifest {
            output: files("output")?,
            deleted: files("deleted")?,
            transaction_time: raw["transactionTime"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
            raw,
            status_url,
        })
    }
}

/// Whether a CapabilityStatement says the server serves `$export`.
pub fn advertises_export(cap: &Value) -> bool {
    let instantiates = cap["instantiates"].as_array().is_some_and(|a| {
        a.iter().any(|u| {
            u.as_str()
                .is_some_and(|u| u.contains("bulkdata") || u.contains("bulk-data"))
        })
    });
    let op = cap["rest"][0]["operation"]
        .as_array()
        .is_some_and(|a| a.iter().any(|o| o["name"] == "export"));
    instantiates || op
}

/// Kicks off an export; the status URL, or `None` when the server does
/// not serve this export (400, 404, 405 or 501 to the kick-off).
pub async fn kick_off(
    client: &FhirClient,
    req: &ExportRequest,
) -> Result<Option<String>, SyncError> {
    let path = req.path();
    let r = client
        .send_with(Method::GET, &path, None, &[("prefer", "respond-async")])
        .await?;
    match r.status {
        202 => {}
        400 | 404 | 405 | 501 => {
            tracing::debug!(status = r.status, reason = %outcome_text(&r.body), "no bulk export");
            return Ok(None);
        }
        s => {
            return Err(status_error(
                &format!("$export at {}", client.base()),
                s,
                &r.body,
            ))
        }
    }
    r.headers
        .get("content-location")
        .and_then(|v| v.to_str().ok())
        .map(|s| Some(s.to_owned()))
        .ok_or_else(|| SyncError::Http {
            url: client.url(&path),
            reason: "the kick-off answered 202 without Content-Location".into(),
        })
}

/// Polls an export's status URL until the server has finished it;
/// `progress` hears the server's `X-Progress`.
pub async fn wait(
    client: &FhirClient,
    status_url: &str,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<Manifest, SyncError> {
    let started = Instant::now();
    let mut attempt = 0;
    loop {
        let r = client.send(Method::GET, status_url, None).await?;
        match r.status {
            200 => return Manifest::parse(r.body, status_url.to_owned()),
            202 => {
                if let Some(p) = r.headers.get("x-progress").and_then(|v| v.to_str().ok()) {
                    progress(p);
                }
                if started.elapsed().as_secs() > EXPORT_WAIT_MAX_S {
                    return Err(SyncError::Http {
                        url: status_url.to_owned(),
                        reason: format!("the export did not finish in EXPORT_WAIT_MAX_S ({EXPORT_WAIT_MAX_S} s)"),
                    });
                }
                let ra = r.headers.get("retry-after").and_then(|v| v.to_str().ok());
                let wait = match ra {
                    Some(_) => client.retry_wait(0, ra),
                    None => Duration::from_millis(200 * (1 << attempt.min(5))),
                };
                attempt += 1;
                tokio::time::sleep(wait.min(Duration::from_secs(POLL_WAIT_MAX_S))).await;
            }
            s => {
                return Err(SyncError::Status {
                    what: format!("export {status_url}"),
                    status: s,
                    detail: outcome_text(&r.body),
                })
            }
        }
    }
}

/// Kicks off an export and waits for it (see [`kick_off`], [`wait`]).
pub async fn export(
    client: &FhirClient,
    req: &ExportRequest,
    progress: &(dyn Fn(&str) + Send + Sync),
) -> Result<Manifest, SyncError> {
    let Some(status_url) = kick_off(client, req).await? else {
        return Err(SyncError::Http {
            url: client.url(&req.path()),
            reason: "the server does not serve this $export".into(),
        });
    };
    wait(client, &status_url, progress).await
}

/// The lines of one file, read in batches as they arrive; a download that
/// fails or breaks off is fetched again (up to the client's retries,
/// honouring `Retry-After`) and the lines already handed out are skipped.
pub struct Lines<'a> {
    client: &'a FhirClient,
    url: String,
    resp: Option<reqwest::Response>,
    buf: Vec<u8>,
    /// Lines handed out so far, and lines seen in the current download.
    delivered: u64,
    seen: u64,
    attempt: u32,
    done: bool,
}

impl<'a> Lines<'a> {
    pub fn new(client: &'a FhirClient, url: &str) -> Self {
        Lines {
            client,
            url: url.to_owned(),
            resp: None,
            buf: Vec::new(),
            delivered: 0,
            seen: 0,
            attempt: 0,
            done: false,
        }
    }

    /// Lines handed out so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    fn err(&self, reason: String) -> SyncError {
        SyncError::Http {
            url: self.url.clone(),
            reason,
        }
    }

    /// Waits before the next try, or fails when the tries are used up.
    async fn retry(&mut self, why: String, retry_after: Option<String>) -> Result<(), SyncError> {
        self.resp = None;
        if self.attempt >= self.client.retries() {
            return Err(self.err(format!("{why} (after {} retries)", self.attempt)));
        }
        let wait = self.client.retry_wait(self.attempt, retry_after.as_deref());
        tracing::debug!(url = %self.url, reason = %why, ?wait, "fetching the file again");
        tokio::time::sleep(wait).await;
        self.attempt += 1;
        Ok(())
    }

    /// The next lines (never empty), or `None` at the end of the file.
    pub async fn next_batch(&mut self) -> Result<Option<Vec<Vec<u8>>>, SyncError> {
        loop {
            if self.done {
                return Ok(None);
            }
            let Some(resp) = self.resp.as_mut() else {
                let r = self
                    .client
                    .request(Method::GET, &self.url)
                    .header("accept", "application/fhir+ndjson")
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        self.resp = Some(r);
                        self.buf.clear();
                        self.seen = 0;
                    }
                    Ok(r) if crate::retry::is_retryable_status(r.status().as_u16()) => {
                        let ra = r
                            .headers()
                            .get("retry-after")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_owned);
                        self.retry(format!("answered {}", r.status()), ra).await?;
                    }
                    Ok(r) => return Err(self.err(format!("answered {}", r.status()))),
                    Err(e) => self.retry(format!("cannot fetch: {e}"), None).await?,
                }
                continue;
            };
            let mut out = Vec::new();
            match resp.chunk().await {
                Ok(Some(c)) => {
                    self.buf.extend_from_slice(&c);
                    let mut start = 0;
                    while let Some(nl) = self.buf[start..].iter().position(|b| *b == b'\n') {
                        self.take(start, start + nl, &mut out);
                        start += nl + 1;
                    }
                    self.buf.drain(..start);
                    if self.buf.len() > LINE_BYTES_MAX {
                        return Err(self.err(format!(
                            "a line longer than LINE_BYTES_MAX ({LINE_BYTES_MAX} bytes)"
                        )));
                    }
                }
                Ok(None) => {
                    let end = self.buf.len();
                    self.take(0, end, &mut out);
                    self.buf.clear();
                    self.done = true;
                }
                Err(e) => {
                    self.retry(format!("the download broke off: {e}"), None)
                        .await?
                }
            }
            if !out.is_empty() {
                self.delivered += out.len() as u64;
                return Ok(Some(out));
            }
        }
    }

    /// Hands out `buf[a..b]` unless it is blank or was handed out before.
    fn take(&mut self, a: usize, b: usize, out: &mut Vec<Vec<u8>>) {
        let line = &self.buf[a..b];
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        self.seen += 1;
        if self.seen > self.delivered + out.len() as u64 {
            out.push(line.to_vec());
        }
    }
}

/// Downloads one file into `dir/name` (written as `.part`, renamed when
/// whole); checks the line count against the manifest's.
pub async fn download(
    client: &FhirClient,
    f: &ManifestFile,
    dir: &Path,
    name: &str,
) -> Result<u64, SyncError> {
    let part = dir.join(format!("{name}.part"));
    let io = |e: std::io::Error| SyncError::File {
        path: part.display().to_string(),
        reason: e.to_string(),
    };
    let mut w =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&part).map_err(io)?);
    let mut lines = Lines::new(client, &f.url);
    while let Some(batch) = lines.next_batch().await? {
        for l in batch {
            w.write_all(&l)
                .and_then(|_| w.write_all(b"\n"))
                .map_err(io)?;
        }
    }
    let n = lines.delivered();
    if let Some(c) = f.count {
        if c != n {
            return Err(SyncError::Http {
                url: f.url.clone(),
                reason: format!("the manifest says {c} resources, the file holds {n}"),
            });
        }
    }
    w.into_inner()
        .map_err(|e| io(e.into_error()))?
        .sync_all()
        .map_err(io)?;
    std::fs::rename(&part, dir.join(name)).map_err(io)?;
    Ok(n)
}
