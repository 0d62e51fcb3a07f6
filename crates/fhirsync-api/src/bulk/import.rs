//! `$import` (the Bulk Data Import proposal's `Parameters` form): the
//! inputs are fetched over HTTP(S) into the job's directory, then loaded
//! in one all-or-nothing transaction through the path of `fhirsync
//! import` (parsed, validated as the node's mode says, indexed). A bad
//! line loads nothing; the job's outcome names each one, `url:line: why`.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::Path;
use std::time::Duration;

use axum::body::Body;
use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;
use axum::Extension;
use fhirsync_core::resource::is_resource_type;
use fhirsync_store::load::{line_request, read_lines, Checker, Recent};
use fhirsync_store::sqlite::Presorted;
use fhirsync_store::{StoreError, StreamMsg, WriteRequest};
use rayon::prelude::*;
use serde_json::Value;

use super::{jobs, owner_of, Failure, Jobs, Live, Output};
use crate::auth::{Principal, C, U};
use crate::http::{base_url, prefer};
use crate::{ApiError, AppState};

/// Inputs one `$import` may name.
pub const INPUTS_MAX: usize = 1000;
/// Refused lines an `$import` reports (it stops reading after them).
pub const LINE_ERRORS_MAX: usize = 100;
/// Lines parsed together and handed to the writer as one batch.
const BATCH: usize = 2000;
/// Batches in flight between the parser and the writer.
const PIPELINE_DEPTH: usize = 4;
/// Tries of each fetch before the job fails.
const FETCH_TRIES: u32 = 3;

/// One input: the type its lines hold and where to fetch them.
#[derive(Debug, Clone)]
pub struct Input {
    pub rtype: String,
    pub url: String,
}

/// `POST [base]/$import`.
pub async fn kick_off(
    State(state): State<AppState>,
    uri: axum::http::Uri,
    p: Option<Extension<Principal>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let jobs = jobs(&state)?.clone();
    if !prefer(&headers).respond_async {
        return Err(ApiError::bad_request(
            "$import runs asynchronously: send 'Prefer: respond-async'",
        ));
    }
    let bytes = axum::body::to_bytes(body, state.cfg.body_bytes_max)
        .await
        .map_err(|_| ApiError::new(413, "too-costly", "the request body is too large"))?;
    let inputs = parse(&bytes)?;
    for i in &inputs {
        if !host_allowed(&i.url, &jobs.cfg.import_hosts) {
            return Err(ApiError::new(
                403,
                "forbidden",
                format!(
                    "input {} is on a host this node does not fetch from ([bulk] import_hosts)",
                    i.url
                ),
            ));
        }
    }
    if let Some(p) = p.as_deref() {
        for i in &inputs {
            p.require(&i.rtype, C | U, "import")?;
        }
    }
    let base = base_url(&state, &headers);
    let request = format!("{base}{uri}");
    let mode = state.cfg.validation;
    jobs.submit(
        "import",
        &owner_of(p.as_deref()),
        request,
        &base,
        move |jobs, live, dir| run(jobs, live, dir, &inputs, mode),
    )
}

/// The inputs of an `$import`'s `Parameters`.
pub fn parse(bytes: &[u8]) -> Result<Vec<Input>, ApiError> {
    let v: Value = serde_json::from_slice(bytes)
        .map_err(|e| ApiError::bad_request(format!("the body is not JSON: {e}")))?;
    if v.get("resourceType").and_then(Value::as_str) != Some("Parameters") {
        return Err(ApiError::bad_request(
            "the body must be a Parameters resource",
        ));
    }
    let value = |p: &Value| -> Option<String> {
        ["valueCode", "valueString", "valueUri", "valueUrl"]
            .iter()
            .find_map(|k| p.get(*k).and_then(Value::as_str))
            .map(str::to_owned)
    };
    let part = |p: &Value, name: &str| -> Option<String> {
        p["part"]
            .as_array()?
            .iter()
            .find(|x| x["name"] == name)
            .and_then(value)
    };
    let mut inputs = Vec::new();
    for p in v["parameter"].as_array().into_iter().flatten() {
        let name = p["name"].as_str().unwrap_or_default();
        match name {
            "inputFormat" => {
                let f = value(p).unwrap_or_default();
                if !matches!(
                    f.as_str(),
                    "application/fhir+ndjson" | "application/ndjson" | "ndjson"
                ) {
                    return Err(ApiError::bad_request(format!(
                        "inputFormat '{f}' is not read: use application/fhir+ndjson"
                    )));
                }
            }
            "inputSource" | "mode" => {}
            "storageDetail" => {
                let t = part(p, "type").or_else(|| value(p)).unwrap_or_default();
                if t != "https" {
                    return Err(ApiError::new(
                        400,
                        "not-supported",
                        format!("storageDetail type '{t}' is not served: inputs are fetched over https (or http)"),
                    ));
                }
            }
            "input" => {
                let rtype = part(p, "type").unwrap_or_default();
                if !is_resource_type(&rtype) {
                    return Err(ApiError::bad_request(format!(
                        "input type '{rtype}' is not a resource type"
                    )));
                }
                let url = part(p, "url").unwrap_or_default();
                if !(url.starts_with("https://") || url.starts_with("http://")) {
                    return Err(ApiError::bad_request(format!(
                        "input url '{url}' is not an http(s) URL"
                    )));
                }
                inputs.push(Input { rtype, url });
            }
            other => {
                return Err(ApiError::new(
                    400,
                    "not-supported",
                    format!("$import has no parameter '{other}'"),
                ))
            }
        }
    }
    if inputs.is_empty() {
        return Err(ApiError::bad_request("$import names no input"));
    }
    if inputs.len() > INPUTS_MAX {
        return Err(ApiError::new(
            400,
            "too-costly",
            format!("more than INPUTS_MAX ({INPUTS_MAX}) inputs"),
        ));
    }
    Ok(inputs)
}

/// Whether `url`'s host (alone, or with its port) is in `allowed`; an
/// empty list allows every host.
pub fn host_allowed(url: &str, allowed: &[String]) -> bool {
    if allowed.is_empty() {
        return true;
    }
    let Ok(u) = reqwest::Url::parse(url) else {
        return false;
    };
    let Some(host) = u.host_str() else {
        return false;
    };
    let with_port = u.port_or_known_default().map(|p| format!("{host}:{p}"));
    allowed
        .iter()
        .any(|a| a.eq_ignore_ascii_case(host) || Some(a.to_ascii_lowercase()) == with_port)
}

/// Fetches one input into `path`, with retries; at most `bytes_max`.
async fn fetch(
    client: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    path: &Path,
    bytes_max: u64,
) -> Result<u64, Failure> {
    let mut last = String::new();
    for attempt in 0..FETCH_TRIES {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        let mut req = client.get(url).header("accept", super::NDJSON);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let mut resp = match req.send().await {
            Ok(r) if r.status().is_success() => r,
            Ok(r) if r.status().is_server_error() || r.status().as_u16() == 429 => {
                last = format!("{url} answered {}", r.status());
                continue;
            }
            Ok(r) => return Err(Failure(400, format!("{url} answered {}", r.status()))),
            Err(e) => {
                last = format!("cannot fetch {url}: {e}");
                continue;
            }
        };
        let mut f = std::io::BufWriter::new(File::create(path)?);
        let mut n: u64 = 0;
        let whole = loop {
            match resp.chunk().await {
                Ok(Some(c)) => {
                    n += c.len() as u64;
                    if n > bytes_max {
                        return Err(Failure(
                            400,
                            format!("{url} is larger than import_bytes_max ({bytes_max} bytes)"),
                        ));
                    }
                    f.write_all(&c)?;
                }
                Ok(None) => break true,
                Err(e) => {
                    last = format!("{url} broke off: {e}");
                    break false;
                }
            }
        };
        if whole {
            f.flush()?;
            return Ok(n);
        }
    }
    Err(Failure(502, last))
}

/// The job: fetch every input, then load them all in one transaction.
pub fn run(
    jobs: &Jobs,
    live: &Live,
    dir: &Path,
    inputs: &[Input],
    mode: fhirsync_core::validate::Mode,
) -> Result<(), Failure> {
    let rt = tokio::runtime::Handle::current();
    let client = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| Failure(500, format!("cannot make an HTTP client: {e}")))?;
    for (i, input) in inputs.iter().enumerate() {
        if live.cancelled() {
            return Err(Failure(499, "cancelled".into()));
        }
        live.update(|j| j.progress = format!("fetching input {} of {}", i + 1, inputs.len()));
        let path = dir.join(format!("input-{i}.ndjson"));
        rt.block_on(fetch(
            &client,
            &input.url,
            jobs.cfg.import_token.as_deref(),
            &path,
            jobs.cfg.import_bytes_max,
        ))?;
    }
    let checker = Checker::new(mode);
    let (tx, done) = jobs.store.load_stream(PIPELINE_DEPTH)?;
    let mut counts = vec![0u64; inputs.len()];
    let mut errors: Vec<String> = Vec::new();
    let mut recent = Recent::new(PIPELINE_DEPTH);
    let mut sent: u64 = 0;
    let mut writer_stopped = false;
    'inputs: for (i, input) in inputs.iter().enumerate() {
        live.update(|j| {
            j.progress = format!(
                "loading input {} of {}, {sent} resources so far",
                i + 1,
                inputs.len()
            )
        });
        let mut reader =
            BufReader::with_capacity(1 << 20, File::open(dir.join(format!("input-{i}.ndjson")))?);
        let mut line_no = 0usize;
        loop {
            if live.cancelled() {
                return Err(Failure(499, "cancelled".into()));
            }
            let lines = match read_lines(&mut reader, BATCH, &mut line_no, |_| {}) {
                Ok(l) => l,
                Err(e) => {
                    errors.push(format!("{}:{}: cannot read: {e}", input.url, line_no + 1));
                    break 'inputs;
                }
            };
            if lines.is_empty() {
                break;
            }
            let parsed: Vec<Result<WriteRequest, String>> = lines
                .par_iter()
                .map(|(_, l)| {
                    let r = line_request(l.as_bytes(), &checker)?;
                    let t = match &r {
                        WriteRequest::Update { res, .. } | WriteRequest::Create { res, .. } => {
                            res.rtype.as_str()
                        }
                        _ => "",
                    };
                    if t != input.rtype {
                        return Err(format!("a {t} in an input of type {}", input.rtype));
                    }
                    Ok(r)
                })
                .collect();
            let mut reqs = Vec::with_capacity(parsed.len());
            let mut origins = Vec::with_capacity(parsed.len());
            for ((line, _), p) in lines.iter().zip(parsed) {
                match p {
                    Ok(r) => {
                        reqs.push(r);
                        origins.push((i, *line));
                    }
                    Err(e) => {
                        errors.push(format!("{}:{line}: {e}", input.url));
                        if errors.len() >= LINE_ERRORS_MAX {
                            break 'inputs;
                        }
                    }
                }
            }
            counts[i] += reqs.len() as u64;
            if !errors.is_empty() {
                // nothing is loaded: the lines after are only read for their errors
                continue;
            }
            recent.push(sent, origins);
            sent += reqs.len() as u64;
            let index = Presorted::take(&mut reqs);
            if tx.blocking_send(StreamMsg::Batch(reqs, index)).is_err() {
                writer_stopped = true;
                break 'inputs;
            }
        }
    }
    if !errors.is_empty() {
        drop(tx); // no Commit: the writer rolls everything back
        let _ = done.blocking_recv();
        let n = errors.len();
        live.update(|j| j.line_errors = errors);
        return Err(Failure(
            422,
            format!(
                "{n} lines refused (the first {LINE_ERRORS_MAX} are listed); nothing was imported"
            ),
        ));
    }
    if !writer_stopped {
        let _ = tx.blocking_send(StreamMsg::Commit);
    }
    drop(tx);
    let summary = match done.blocking_recv() {
        Ok(Ok(s)) => s,
        Ok(Err(StoreError::Entry { index, source })) => {
            let at = recent
                .find(index as u64)
                .map(|(i, line)| format!("{}:{line}", inputs[i].url))
                .unwrap_or_else(|| format!("request {index}"));
            let why = format!("{at}: {source}");
            live.update(|j| j.line_errors = vec![why.clone()]);
            return Err(Failure(422, format!("{why}; nothing was imported")));
        }
        Ok(Err(e)) => return Err(Failure(500, format!("{e}; nothing was imported"))),
        Err(_) => {
            return Err(Failure(
                500,
                "the store writer stopped; nothing was imported".into(),
            ))
        }
    };
    for i in 0..inputs.len() {
        let _ = std::fs::remove_file(dir.join(format!("input-{i}.ndjson")));
    }
    let lenient = checker.lenient();
    live.update(|j| {
        j.output = inputs
            .iter()
            .zip(&counts)
            .map(|(inp, n)| Output {
                rtype: inp.rtype.clone(),
                file: None,
                count: *n,
                input_url: Some(inp.url.clone()),
            })
            .collect();
        j.progress = format!(
            "{} resources: {} created, {} updated, {} unchanged; {lenient} fail validation and were stored anyway",
            summary.requests, summary.created, summary.updated, summary.unchanged
        );
    });
    tracing::info!(
        resources = summary.requests,
        last_seq = summary.last_seq,
        "import loaded"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn inputs_are_fetched_from_the_allowed_hosts_only() {
        let list = vec!["files.example.org".to_owned(), "10.0.0.5:8443".to_owned()];
        assert!(host_allowed("https://files.example.org/a.ndjson", &list));
        assert!(host_allowed("https://FILES.example.org:9000/a", &list));
        assert!(host_allowed("https://10.0.0.5:8443/a", &list));
        assert!(!host_allowed("https://10.0.0.5/a", &list));
        assert!(!host_allowed("http://169.254.169.254/latest", &list));
        assert!(!host_allowed("http://files.example.org.evil.test/a", &list));
        assert!(!host_allowed("not a url", &list));
        assert!(host_allowed("http://anything/a", &[]));
    }

    #[test]
    fn more_inputs_than_inputs_max_are_refused() {
        let input = json!({"name": "input", "part": [
            {"name": "type", "valueCode": "Patient"}, {"name": "url", "valueUri": "https://x/p.ndjson"}]});
        let body = |n: usize| {
            json!({"resourceType": "Parameters", "parameter": vec![input.clone(); n]}).to_string()
        };
        assert_eq!(
            parse(body(INPUTS_MAX).as_bytes()).unwrap().len(),
            INPUTS_MAX
        );
        let e = parse(body(INPUTS_MAX + 1).as_bytes()).unwrap_err();
        assert!(e.diagnostics.contains("INPUTS_MAX"), "{}", e.diagnostics);
    }
}
