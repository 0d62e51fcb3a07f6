//! `fhirsync sync`: the command-line face of [`fhirsync_sync`], with the
//! option names of Smile CDR's `synchronize-fhir-servers`.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use fhirsync_sync::client::Auth;
use fhirsync_sync::options::{BulkRead, SourceSpec};
use fhirsync_sync::tls::TlsAuth;
use fhirsync_sync::{Mode, Report, SyncOptions};
use tokio::sync::watch;

#[derive(clap::Args, Debug)]
pub struct SyncArgs {
    /// FHIR version of both sides (R4 only).
    #[arg(short = 'v', long = "fhir-version", default_value = "R4")]
    pub fhir_version: String,
    /// Base URL, search URL (base/Type?params) or file:DIRECTORY.
    #[arg(short = 's', long)]
    pub source: String,
    /// user:password for the source.
    #[arg(long)]
    pub source_basic_auth: Option<String>,
    #[arg(long)]
    pub source_bearer_token: Option<String>,
    /// TLS authentication file for the source (JSON naming PEM files; see docs/sync.md).
    #[arg(long)]
    pub source_tls_auth: Option<PathBuf>,
    /// Target base URL; repeat to spread COPY/SYNTHEA round-robin.
    #[arg(short = 't', long = "target", required = true)]
    pub targets: Vec<String>,
    #[arg(long)]
    pub target_basic_auth: Option<String>,
    #[arg(long)]
    pub target_bearer_token: Option<String>,
    #[arg(long)]
    pub target_tls_auth: Option<PathBuf>,
    /// Retries of a failed write (429, 5xx, timeouts), with backoff.
    #[arg(long, default_value_t = 3)]
    pub target_retry_count: u32,
    /// Resource types to sync, in this order (A,B,...).
    #[arg(short = 'r', long)]
    pub resource_types: Option<String>,
    /// Resources to sync (Type/id,...); not with -r.
    #[arg(long)]
    pub resource_ids: Option<String>,
    #[arg(long, default_value_t = 10)]
    pub thread_count: usize,
    /// Prefix for purely numeric ids; references are rewritten to match.
    #[arg(long)]
    pub prefix_numeric_ids: Option<String>,
    /// COPY, COMPARE, SYNTHEA or INCREMENTAL.
    #[arg(short = 'm', long, default_value = "COPY")]
    pub mode: String,
    /// Send Bundles found in the source as transactions.
    #[arg(long)]
    pub upload_bundles_as_transactions: bool,
    /// Sent as X-Request-Id with every request.
    #[arg(long)]
    pub request_id: Option<String>,
    /// Resources with the same value at this path are never uploaded concurrently.
    #[arg(long)]
    pub semaphore_path: Option<String>,
    /// COMPARE: keep target resources that the source does not have.
    #[arg(long)]
    pub no_delete: bool,
    /// Read and compare, write nothing; report what would be written.
    #[arg(long)]
    pub dry_run: bool,
    /// Write the summary as JSON to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// INCREMENTAL: file that keeps the cursor.
    #[arg(long)]
    pub state: Option<PathBuf>,
    /// INCREMENTAL: keep polling for new changes until interrupted.
    #[arg(long)]
    pub follow: bool,
    /// COPY/COMPARE: read the source (and COMPARE's target) through bulk
    /// export even when its CapabilityStatement does not offer it (paging
    /// if it is refused).
    #[arg(long, conflicts_with = "no_bulk")]
    pub bulk: bool,
    /// COPY/COMPARE: never use bulk export; page through searches.
    #[arg(long)]
    pub no_bulk: bool,
    /// COMPARE: read every resource even when both ends are fhirsync
    /// nodes (which otherwise compare `$summary` fingerprints and read
    /// only what differs).
    #[arg(long)]
    pub no_summary: bool,
}

fn options(a: &SyncArgs) -> anyhow::Result<SyncOptions> {
    if !a.fhir_version.eq_ignore_ascii_case("R4") {
        bail!("--fhir-version {}: only R4 is supported", a.fhir_version);
    }
    Ok(SyncOptions {
        source: SourceSpec::parse(&a.source)?,
        source_auth: Auth::from_options(
            a.source_basic_auth.as_deref(),
            a.source_bearer_token.as_deref(),
            "source",
        )?,
        source_tls: a
            .source_tls_auth
            .as_deref()
            .map(TlsAuth::load)
            .transpose()?,
        targets: a
            .targets
            .iter()
            .map(|t| t.trim_end_matches('/').to_owned())
            .collect(),
        target_auth: Auth::from_options(
            a.target_basic_auth.as_deref(),
            a.target_bearer_token.as_deref(),
            "target",
        )?,
        target_tls: a
            .target_tls_auth
            .as_deref()
            .map(TlsAuth::load)
            .transpose()?,
        target_retry_count: a.target_retry_count,
        resource_types: a
            .resource_types
            .as_deref()
            .map(SyncOptions::parse_types)
            .transpose()?
            .unwrap_or_default(),
        resource_ids: a
            .resource_ids
            .as_deref()
            .map(SyncOptions::parse_ids)
            .transpose()?
            .unwrap_or_default(),
        thread_count: a.thread_count,
        prefix_numeric_ids: a.prefix_numeric_ids.clone(),
        mode: Mode::parse(&a.mode)?,
        upload_bundles_as_transactions: a.upload_bundles_as_transactions,
        request_id: a.request_id.clone(),
        semaphore_path: a.semaphore_path.clone(),
        no_delete: a.no_delete,
        dry_run: a.dry_run,
        state: a.state.clone(),
        follow: a.follow,
        bulk: if a.bulk {
            BulkRead::Always
        } else if a.no_bulk {
            BulkRead::Never
        } else {
            BulkRead::Auto
        },
        no_summary: a.no_summary,
    })
}

pub fn run(a: SyncArgs) -> anyhow::Result<()> {
    crate::serve::init_logging("warn");
    let opts = options(&a)?;
    opts.check()?;
    let source_name = a.source.clone();
    let report = Arc::new(Mutex::new(Report::new(
        opts.mode,
        source_name,
        opts.targets.clone(),
        opts.dry_run,
    )));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = rt.block_on(async {
        let (stop_tx, stop_rx) = watch::channel(false);
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                let _ = stop_tx.send(true);
            }
        });
        let progress = tokio::spawn(progress(report.clone()));
        let r = fhirsync_sync::run::run(opts, report.clone(), stop_rx).await;
        progress.abort();
        r
    });
    let rep = report
        .lock()
        .map(|r| r.clone())
        .map_err(|_| anyhow::anyhow!("report lock poisoned"))?;
    if let Some(path) = &a.report {
        let text = serde_json::to_string_pretty(&rep)?;
        std::fs::write(path, text)
            .with_context(|| format!("cannot write report {}", path.display()))?;
    }
    let t = rep.totals();
    let did_something = t.read + t.created + t.updated + t.unchanged + t.deleted + t.failed > 0;
    // A run refused before it started is just its one-line reason.
    if result.is_ok() || did_something {
        eprint!("{}", rep.summary());
    }
    result?;
    let failed = rep.totals().failed;
    if failed > 0 {
        bail!("{failed} resources failed (listed above)");
    }
    Ok(())
}

/// A live line on a terminal; a quiet line every 10 s otherwise.
async fn progress(report: Arc<Mutex<Report>>) {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let bar = tty.then(|| {
        let b = indicatif::ProgressBar::new_spinner();
        b.enable_steady_tick(Duration::from_millis(200));
        b
    });
    let mut tick = tokio::time::interval(Duration::from_secs(if tty { 1 } else { 10 }));
    tick.tick().await;
    loop {
        tick.tick().await;
        let Ok(r) = report.lock().map(|r| r.clone()) else {
            return;
        };
        let t = r.totals();
        let secs = started.elapsed().as_secs_f64().max(0.001);
        let written = t.created + t.updated + t.deleted;
        let busiest = r
            .types
            .iter()
            .max_by_key(|(_, c)| c.read)
            .map(|(k, _)| k.as_str())
            .unwrap_or("-");
        let rate = t.read as f64 / secs;
        let eta = match r.expected {
            Some(n) if rate > 0.0 && n > t.read => {
                format!(", ETA {:.0} s", (n - t.read) as f64 / rate)
            }
            Some(n) => format!(" of {n}"),
            None => String::new(),
        };
        let line = format!(
            "read {}{eta} ({rate:.0}/s), written {written}, unchanged {}, failed {}; largest type {busiest}",
            t.read, t.unchanged, t.failed
        );
        match &bar {
            Some(b) => b.set_message(line),
            None => eprintln!("sync: {line}"),
        }
    }
}
