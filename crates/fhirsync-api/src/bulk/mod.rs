//! Bulk Data (FHIR Bulk Data Access IG 2.0.0): `$export` and `$import` as
//! asynchronous jobs. A job's state (`job.json`) and its files live in
//! its own directory under [`BulkConfig::dir`]; a file is written as
//! `.part` and renamed when whole, and a job is `done` only when all of
//! its files are, so nothing half-written is ever served as complete.
//! Jobs that were running when the node stopped fail at the next start.

pub mod export;
pub mod import;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use fhirsync_core::clock::{Clock, SystemClock};
use fhirsync_core::instant::format_instant;
use fhirsync_store::Store;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use crate::auth::Principal;
use crate::http::base_url;
use crate::{ApiError, AppState};

/// Jobs accepted and not yet finished, running or waiting; past it a
/// kick-off is answered 429.
pub const JOBS_PENDING_MAX: usize = 32;
/// The `Retry-After` of a status answer while a job runs, in seconds.
pub const RETRY_AFTER_S: u64 = 1;
/// The NDJSON media type of every file.
pub const NDJSON: &str = "application/fhir+ndjson";

/// Settings of bulk data; every limit has a default.
#[derive(Debug, Clone)]
pub struct BulkConfig {
    /// Where jobs keep their state and files.
    pub dir: PathBuf,
    /// A type's export is split into files of about this size.
    pub file_bytes_max: u64,
    /// Finished jobs and their files are removed this long after they end.
    pub retention_s: u64,
    /// Jobs that run at once; the others wait their turn.
    pub jobs_max: usize,
    /// Largest input file an `$import` fetches.
    pub import_bytes_max: u64,
    /// Bearer token sent with an `$import`'s fetches, when its inputs need one.
    pub import_token: Option<String>,
    /// The hosts (`host` or `host:port`) an `$import` may fetch from;
    /// empty: any.
    pub import_hosts: Vec<String>,
}

impl BulkConfig {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        BulkConfig {
            dir: dir.into(),
            file_bytes_max: 256 * 1024 * 1024,
            retention_s: 24 * 3600,
            jobs_max: 2,
            import_bytes_max: 16 * 1024 * 1024 * 1024,
            import_token: None,
            import_hosts: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
}

/// One entry of a manifest: a file of one type, or an `$import` input.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Output {
    #[serde(rename = "type")]
    pub rtype: String,
    /// The file's name in the job's directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
    pub count: u64,
    /// `$import`: the input this entry is about.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_url: Option<String>,
}

/// A job as stored in its `job.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// `export` or `import`.
    pub kind: String,
    /// Who asked for it; only they may see it.
    pub owner: String,
    /// The kick-off request's URL.
    pub request: String,
    pub created_ms: u64,
    /// When it left the queue and when it ended (ms).
    #[serde(default)]
    pub started_ms: Option<u64>,
    pub state: JobState,
    #[serde(default)]
    pub finished_ms: Option<u64>,
    /// The log cut an export reads (its `transactionTime`, ms).
    #[serde(default)]
    pub transaction_ms: Option<u64>,
    #[serde(default)]
    pub progress: String,
    #[serde(default)]
    pub output: Vec<Output>,
    #[serde(default)]
    pub deleted: Vec<Output>,
    #[serde(default)]
    pub error: Vec<Output>,
    /// Why a failed job failed: HTTP status and reason.
    #[serde(default)]
    pub failure: Option<(u16, String)>,
    /// `$import`: the reasons, `url:line: why`, of the lines refused.
    #[serde(default)]
    pub line_errors: Vec<String>,
}

/// A job in memory: what it is, and whether it was cancelled.
pub struct Live {
    pub job: Mutex<Job>,
    pub cancel: AtomicBool,
    /// The node is stopping: the job stops where it is and stays
    /// `running` on disk, so the next start fails it.
    pub halt: AtomicBool,
}

impl Live {
    /// The job as it stands.
    pub fn snapshot(&self) -> Job {
        self.job.lock().expect("bulk job").clone()
    }
    pub fn update(&self, f: impl FnOnce(&mut Job)) {
        f(&mut self.job.lock().expect("bulk job"));
    }
    /// Whether the job should stop (cancelled, or the node stops).
    pub fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed) || self.halt.load(Ordering::Relaxed)
    }
}

/// A job failure: the status the status URL answers and the reason.
#[derive(Debug)]
pub struct Failure(pub u16, pub String);

impl From<fhirsync_store::StoreError> for Failure {
    fn from(e: fhirsync_store::StoreError) -> Self {
        Failure(500, e.to_string())
    }
}

impl From<std::io::Error> for Failure {
    fn from(e: std::io::Error) -> Self {
        Failure(500, format!("cannot write the job's files: {e}"))
    }
}

/// The bulk jobs of a node.
pub struct Jobs {
    pub cfg: BulkConfig,
    pub store: Arc<dyn Store>,
    live: Mutex<HashMap<String, Arc<Live>>>,
    slots: Arc<Semaphore>,
    clock: Arc<dyn Clock>,
}

impl Jobs {
    /// Opens the jobs directory: jobs that were queued or running when the
    /// node stopped fail (their files are removed), finished ones are kept
    /// until their retention ends. Starts the task that removes expired
    /// jobs: call inside a Tokio runtime.
    pub fn open(cfg: BulkConfig, store: Arc<dyn Store>) -> std::io::Result<Arc<Jobs>> {
        std::fs::create_dir_all(&cfg.dir)?;
        let clock: Arc<dyn Clock> = Arc::new(SystemClock);
        let mut live = HashMap::new();
        for entry in std::fs::read_dir(&cfg.dir)? {
            let dir = entry?.path();
            let job = std::fs::read(dir.join("job.json"))
                .ok()
                .and_then(|b| serde_json::from_slice::<Job>(&b).ok());
            let Some(mut job) = job else {
                // not a job (or one whose state was never written whole)
                let _ = std::fs::remove_dir_all(&dir);
                continue;
            };
            if matches!(job.state, JobState::Queued | JobState::Running) {
                tracing::warn!(job = %job.id, kind = %job.kind, "a bulk job was cut short by a stop of the node; it failed");
                remove_files(&dir);
                job.state = JobState::Failed;
                job.finished_ms = Some(clock.now_ms());
                job.output.clear();
                job.deleted.clear();
                job.error.clear();
                job.failure = Some((
                    500,
                    "the node stopped while this job ran; nothing of it is served: start it again"
                        .into(),
                ));
                write_job(&dir, &job)?;
            }
            live.insert(
                job.id.clone(),
                Arc::new(Live {
                    job: Mutex::new(job),
                    cancel: AtomicBool::new(false),
                    halt: AtomicBool::new(false),
                }),
            );
        }
        let jobs = Arc::new(Jobs {
            slots: Arc::new(Semaphore::new(cfg.jobs_max.max(1))),
            cfg,
            store,
            live: Mutex::new(live),
            clock,
        });
        let weak = Arc::downgrade(&jobs);
        tokio::spawn(async move {
            loop {
                let every = match weak.upgrade() {
                    Some(j) => {
                        j.expire();
                        j.cfg.retention_s.clamp(1, 60)
                    }
                    None => return,
                };
                tokio::time::sleep(Duration::from_secs(every)).await;
            }
        });
        Ok(jobs)
    }

    fn job_dir(&self, id: &str) -> PathBuf {
        self.cfg.dir.join(id)
    }

    /// Removes finished jobs whose retention has ended.
    fn expire(&self) {
        let now = self.clock.now_ms();
        let old: Vec<String> = self
            .live
            .lock()
            .expect("bulk jobs")
            .iter()
            .filter(|(_, l)| {
                l.snapshot().finished_ms.is_some_and(|f| {
                    now >= f.saturating_add(self.cfg.retention_s.saturating_mul(1000))
                })
            })
            .map(|(k, _)| k.clone())
            .collect();
        for id in old {
            self.live.lock().expect("bulk jobs").remove(&id);
            let _ = std::fs::remove_dir_all(self.job_dir(&id));
            tracing::info!(job = %id, "bulk job expired; its files are removed");
        }
    }

    /// Accepts a job and starts it when a slot is free; `run` does the
    /// work (on a blocking thread) and fills in the job through its
    /// [`Live`]. Answers the 202 of a kick-off.
    pub fn submit(
        self: &Arc<Self>,
        kind: &str,
        owner: &str,
        request: String,
        base: &str,
        run: impl FnOnce(&Jobs, &Live, &Path) -> Result<(), Failure> + Send + 'static,
    ) -> Result<Response, ApiError> {
        let pending = self
            .live
            .lock()
            .expect("bulk jobs")
            .values()
            .filter(|l| matches!(l.snapshot().state, JobState::Queued | JobState::Running))
            .count();
        if pending >= JOBS_PENDING_MAX {
            let mut r = ApiError::new(
                429,
                "throttled",
                format!("{pending} bulk jobs wait or run (JOBS_PENDING_MAX); try again later"),
            )
            .into_response();
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S * 10));
            return Ok(r);
        }
        let id = uuid::Uuid::new_v4().simple().to_string();
        let job = Job {
            id: id.clone(),
            kind: kind.to_owned(),
            owner: owner.to_owned(),
            request,
            created_ms: self.clock.now_ms(),
            started_ms: None,
            state: JobState::Queued,
            finished_ms: None,
            transaction_ms: None,
            progress: "waiting for a free slot".into(),
            output: Vec::new(),
            deleted: Vec::new(),
            error: Vec::new(),
            failure: None,
            line_errors: Vec::new(),
        };
        let dir = self.job_dir(&id);
        std::fs::create_dir_all(&dir)
            .and_then(|_| write_job(&dir, &job))
            .map_err(|e| ApiError::new(500, "exception", format!("cannot start the job: {e}")))?;
        let live = Arc::new(Live {
            job: Mutex::new(job),
            cancel: AtomicBool::new(false),
            halt: AtomicBool::new(false),
        });
        self.live
            .lock()
            .expect("bulk jobs")
            .insert(id.clone(), live.clone());
        let jobs = self.clone();
        let slots = self.slots.clone();
        let kind_owned = kind.to_owned();
        tokio::spawn(async move {
            let Ok(_permit) = slots.acquire_owned().await else {
                return;
            };
            if live.halt.load(Ordering::Relaxed) {
                return;
            }
            if live.cancelled() {
                let _ = std::fs::remove_dir_all(&dir);
                return;
            }
            let now = jobs.clock.now_ms();
            live.update(|j| {
                j.state = JobState::Running;
                j.started_ms = Some(now);
                j.progress = "started".into();
            });
            let _ = write_job(&dir, &live.snapshot());
            tracing::info!(job = %live.snapshot().id, kind = %kind_owned, "bulk job started");
            let (j2, l2, d2) = (jobs.clone(), live.clone(), dir.clone());
            let r = tokio::task::spawn_blocking(move || run(&j2, &l2, &d2))
                .await
                .unwrap_or_else(|e| Err(Failure(500, format!("the job stopped: {e}"))));
            if live.halt.load(Ordering::Relaxed) {
                tracing::info!(job = %live.snapshot().id, "bulk job stopped with the node; it fails at the next start");
                return;
            }
            if live.cancelled() {
                let _ = std::fs::remove_dir_all(&dir);
                tracing::info!(job = %live.snapshot().id, "bulk job cancelled; its files are removed");
                return;
            }
            let now = jobs.clock.now_ms();
            live.update(|j| {
                j.finished_ms = Some(now);
                match r {
                    Ok(()) => {
                        j.state = JobState::Done;
                        j.progress = "done".into();
                    }
                    Err(Failure(status, why)) => {
                        j.state = JobState::Failed;
                        j.failure = Some((status, why));
                    }
                }
            });
            let job = live.snapshot();
            match &job.failure {
                None => tracing::info!(job = %job.id, kind = %job.kind, "bulk job done"),
                Some((_, why)) => {
                    if job.kind == "export" {
                        remove_files(&dir);
                    }
                    tracing::warn!(job = %job.id, kind = %job.kind, reason = %why, "bulk job failed")
                }
            }
            if let Err(e) = write_job(&dir, &job) {
                tracing::error!(job = %job.id, error = %e, "cannot store the bulk job's state");
            }
        });
        let mut r = Response::new(Body::from(
            json!({
                "resourceType": "OperationOutcome",
                "issue": [{"severity": "information", "code": "informational",
                           "diagnostics": format!("{kind} job {id} accepted; poll its status URL")}]
            })
            .to_string(),
        ));
        *r.status_mut() = StatusCode::ACCEPTED;
        let loc = format!("{base}/$bulk-status/{id}");
        r.headers_mut().insert(
            header::CONTENT_LOCATION,
            HeaderValue::from_str(&loc).unwrap_or(HeaderValue::from_static("")),
        );
        r.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(crate::http::FHIR_JSON),
        );
        Ok(r)
    }

    /// Stops every job where it is (the node shuts down); they stay
    /// `running` on disk and fail at the next start.
    pub fn halt(&self) {
        for l in self.live.lock().expect("bulk jobs").values() {
            l.halt.store(true, Ordering::Relaxed);
        }
    }

    /// The job of this id, when `owner` asked for it.
    fn get(&self, id: &str, owner: &str) -> Result<Arc<Live>, ApiError> {
        self.live
            .lock()
            .expect("bulk jobs")
            .get(id)
            .filter(|l| l.snapshot().owner == owner)
            .cloned()
            .ok_or_else(|| ApiError::not_found(format!("no bulk job {id}")))
    }
}

/// Writes a job's state whole (temporary file, then rename).
pub fn write_job(dir: &Path, job: &Job) -> std::io::Result<()> {
    let tmp = dir.join("job.json.tmp");
    std::fs::write(
        &tmp,
        serde_json::to_vec(job).map_err(std::io::Error::other)?,
    )?;
    std::fs::rename(tmp, dir.join("job.json"))
}

/// Removes a job's data files, keeping its state.
fn remove_files(dir: &Path) {
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_name() != "job.json" {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// The jobs of the node, or 404 when bulk data is off.
pub fn jobs(state: &AppState) -> Result<&Arc<Jobs>, ApiError> {
    state.bulk.as_ref().ok_or_else(|| {
        ApiError::new(
            404,
            "not-supported",
            "bulk data is off on this node ([bulk] enabled = false)",
        )
    })
}

/// Who a job belongs to.
pub fn owner_of(p: Option<&Principal>) -> String {
    p.map(|p| p.who.name())
        .unwrap_or_else(|| "anonymous".into())
}

/// `GET [base]/$bulk-status/{id}`: 202 with `X-Progress` while the job
/// runs, 200 with the manifest when it is done, the failure's status and
/// an OperationOutcome when it failed.
pub async fn status(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    p: Option<Extension<Principal>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let jobs = jobs(&state)?;
    let live = jobs.get(&id, &owner_of(p.as_deref()))?;
    let job = live.snapshot();
    match job.state {
        JobState::Queued | JobState::Running => {
            let mut r = Response::new(Body::empty());
            *r.status_mut() = StatusCode::ACCEPTED;
            let progress = HeaderValue::from_str(&job.progress)
                .unwrap_or(HeaderValue::from_static("in progress"));
            r.headers_mut().insert("x-progress", progress);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_S));
            Ok(r)
        }
        JobState::Failed => {
            let (status, why) = job.failure.unwrap_or((500, "the job failed".into()));
            let mut e = ApiError::new(status, crate::error::issue_code(status), why.clone());
            if !job.line_errors.is_empty() {
                let issues: Vec<Value> = job
                    .line_errors
                    .iter()
                    .map(|l| json!({"severity": "error", "code": "invalid", "diagnostics": l}))
                    .collect();
                e.outcome = Some(json!({"resourceType": "OperationOutcome", "issue": issues}));
            }
            Err(e)
        }
        JobState::Done => {
            let base = base_url(&state, &headers);
            let files = |list: &[Output]| -> Vec<Value> {
                list.iter()
                    .map(|o| {
                        let mut v = json!({"type": o.rtype, "count": o.count});
                        if let Some(f) = &o.file {
                            v["url"] = json!(format!("{base}/$bulk-file/{}/{f}", job.id));
                        }
                        if let Some(u) = &o.input_url {
                            v["inputUrl"] = json!(u);
                        }
                        v
                    })
                    .collect()
            };
            let manifest = json!({
                "transactionTime": format_instant(job.transaction_ms.unwrap_or(job.created_ms)),
                "request": job.request,
                "requiresAccessToken": !state.cfg.auth.anonymous,
                "output": files(&job.output),
                "deleted": files(&job.deleted),
                "error": files(&job.error),
                // how long the job ran, for operators and benchmarks
                "extension": {
                    "https://fhirsync.dev/bulk/seconds": job
                        .started_ms
                        .zip(job.finished_ms)
                        .map(|(a, b)| b.saturating_sub(a) as f64 / 1000.0)
                },
            });
            let mut r = Response::new(Body::from(manifest.to_string()));
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            if let Some(f) = job.finished_ms {
                let expires = f.saturating_add(jobs.cfg.retention_s.saturating_mul(1000));
                if let Ok(v) =
                    HeaderValue::from_str(&fhirsync_core::instant::format_http_date(expires))
                {
                    r.headers_mut().insert(header::EXPIRES, v);
                }
            }
            Ok(r)
        }
    }
}

/// `DELETE [base]/$bulk-status/{id}`: cancels the job (a running one
/// stops at its next page) and removes its files.
pub async fn cancel(
    State(state): State<AppState>,
    UrlPath(id): UrlPath<String>,
    p: Option<Extension<Principal>>,
) -> Result<Response, ApiError> {
    let jobs = jobs(&state)?;
    let live = jobs.get(&id, &owner_of(p.as_deref()))?;
    live.cancel.store(true, Ordering::Relaxed);
    jobs.live.lock().expect("bulk jobs").remove(&id);
    // a running job also removes its directory when it notices
    let _ = std::fs::remove_dir_all(jobs.job_dir(&id));
    let mut r = Response::new(Body::from(
        crate::error::outcome(
            "information",
            "informational",
            &format!("bulk job {id} cancelled"),
        )
        .to_string(),
    ));
    *r.status_mut() = StatusCode::ACCEPTED;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(crate::http::FHIR_JSON),
    );
    Ok(r)
}

/// `GET [base]/$bulk-file/{id}/{name}`: one file of a finished job,
/// streamed from disk.
pub async fn file(
    State(state): State<AppState>,
    UrlPath((id, name)): UrlPath<(String, String)>,
    p: Option<Extension<Principal>>,
) -> Result<Response, ApiError> {
    let jobs = jobs(&state)?;
    let live = jobs.get(&id, &owner_of(p.as_deref()))?;
    let job = live.snapshot();
    let listed = job
        .output
        .iter()
        .chain(&job.deleted)
        .chain(&job.error)
        .any(|o| o.file.as_deref() == Some(name.as_str()));
    if job.state != JobState::Done || !listed {
        return Err(ApiError::not_found(format!(
            "bulk job {id} has no file {name}"
        )));
    }
    let f = tokio::fs::File::open(jobs.job_dir(&id).join(&name))
        .await
        .map_err(|_| ApiError::not_found(format!("bulk job {id} has no file {name}")))?;
    let len = f.metadata().await.map(|m| m.len()).ok();
    let mut r = Response::new(Body::from_stream(
        tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024),
    ));
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    if let Some(n) = len {
        r.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fhirsync_store::sqlite::{SqliteConfig, SqliteStore};

    #[tokio::test]
    async fn kick_offs_past_jobs_pending_max_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(
            SqliteStore::open(SqliteConfig::new(SqliteStore::db_path(dir.path()))).unwrap(),
        );
        let mut cfg = BulkConfig::new(dir.path().join("bulk"));
        cfg.jobs_max = 1;
        let jobs = Jobs::open(cfg, store).unwrap();
        let slow = |_: &Jobs, live: &Live, _: &Path| {
            while !live.cancelled() {
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(())
        };
        for _ in 0..JOBS_PENDING_MAX {
            let r = jobs
                .submit("export", "me", "x".into(), "http://h/fhir", slow)
                .unwrap();
            assert_eq!(r.status(), 202);
        }
        let r = jobs
            .submit("export", "me", "x".into(), "http://h/fhir", slow)
            .unwrap();
        assert_eq!(r.status(), 429);
        assert!(r.headers().contains_key(header::RETRY_AFTER));
        jobs.halt();
    }
}
