//! `fhirsync export`: a Bulk Data export from any server that implements
//! the IG, into a directory of NDJSON files and the manifest.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Context};
use fhirsync_sync::bulk::{self, ExportRequest, ManifestFile};
use fhirsync_sync::client::{Auth, FhirClient};
use fhirsync_sync::options::{SyncOptions, SOURCE_RETRY_COUNT};
use fhirsync_sync::tls::TlsAuth;
use serde_json::json;

/// Files downloaded at once, at most.
pub const PARALLEL_MAX: usize = 32;

#[derive(clap::Args, Debug)]
pub struct ExportArgs {
    /// The server's FHIR base URL.
    #[arg(short = 's', long)]
    pub source: String,
    /// Resource types to export (A,B,...); default: all the server gives.
    #[arg(short = 'r', long)]
    pub resource_types: Option<String>,
    /// Only resources changed at or after this instant (`_since`).
    #[arg(long)]
    pub since: Option<String>,
    /// A search the resources of its type must satisfy (`_typeFilter`,
    /// `Type?query`); repeat for more.
    #[arg(long = "type-filter")]
    pub type_filters: Vec<String>,
    /// Export the compartments of this Group's members.
    #[arg(long, conflicts_with = "patient")]
    pub group: Option<String>,
    /// Export the Patient compartments (`Patient/$export`).
    #[arg(long)]
    pub patient: bool,
    /// Directory for the NDJSON files and `manifest.json`.
    #[arg(short = 'o', long)]
    pub output: PathBuf,
    /// Files downloaded at once.
    #[arg(long, default_value_t = 4)]
    pub parallel: usize,
    /// user:password for the server.
    #[arg(long)]
    pub source_basic_auth: Option<String>,
    #[arg(long)]
    pub source_bearer_token: Option<String>,
    /// TLS authentication file (JSON naming PEM files; see docs/sync.md).
    #[arg(long)]
    pub source_tls_auth: Option<PathBuf>,
    /// Sent as X-Request-Id with every request.
    #[arg(long)]
    pub request_id: Option<String>,
}

pub fn run(a: ExportArgs) -> anyhow::Result<()> {
    crate::serve::init_logging("warn");
    if !(a.source.starts_with("http://") || a.source.starts_with("https://")) {
        bail!("--source '{}' must be an http(s) base URL", a.source);
    }
    if a.parallel == 0 || a.parallel > PARALLEL_MAX {
        bail!("--parallel must be 1 to {PARALLEL_MAX}");
    }
    let types = a
        .resource_types
        .as_deref()
        .map(SyncOptions::parse_types)
        .transpose()?
        .unwrap_or_default();
    if let Some(g) = &a.group {
        if !fhirsync_core::resource::is_valid_id(g) {
            bail!("--group '{g}' is not a valid id");
        }
    }
    for f in &a.type_filters {
        match f.split_once('?') {
            Some((t, _)) if fhirsync_core::resource::is_resource_type(t) => {}
            _ => bail!("--type-filter '{f}' is not Type?query"),
        }
    }
    std::fs::create_dir_all(&a.output)
        .with_context(|| format!("cannot create {}", a.output.display()))?;
    if a.output.join("manifest.json").exists() {
        bail!(
            "{} holds an export already (manifest.json); choose an empty directory",
            a.output.display()
        );
    }
    let req = ExportRequest {
        patients: match (&a.group, a.patient) {
            (Some(g), _) => Some(Some(g.clone())),
            (None, true) => Some(None),
            (None, false) => None,
        },
        types,
        since: a.since.clone(),
        type_filters: a.type_filters.clone(),
    };
    let tls = a
        .source_tls_auth
        .as_deref()
        .map(TlsAuth::load)
        .transpose()?;
    let client = Arc::new(FhirClient::new(
        &a.source,
        Auth::from_options(
            a.source_basic_auth.as_deref(),
            a.source_bearer_token.as_deref(),
            "source",
        )?,
        a.request_id.clone(),
        SOURCE_RETRY_COUNT,
        tls.as_ref(),
    )?);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(export(client, req, a.output.clone(), a.parallel))
}

async fn export(
    client: Arc<FhirClient>,
    req: ExportRequest,
    dir: PathBuf,
    parallel: usize,
) -> anyhow::Result<()> {
    let started = Instant::now();
    let bar = indicatif::ProgressBar::new_spinner();
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar.set_message("export requested");
    let b2 = bar.clone();
    let m = bulk::export(&client, &req, &move |p| {
        b2.set_message(format!("server: {p}"))
    })
    .await?;
    let exported = started.elapsed().as_secs_f64();
    // local names: Type-N.ndjson, deleted-N.ndjson
    let mut jobs: Vec<(ManifestFile, String)> = Vec::new();
    let mut per_type: std::collections::HashMap<String, usize> = Default::default();
    for (list, deleted) in [(&m.output, false), (&m.deleted, true)] {
        for f in list {
            let key = if deleted {
                "deleted".to_owned()
            } else {
                f.rtype.clone()
            };
            let n = per_type.entry(key.clone()).or_default();
            *n += 1;
            jobs.push((f.clone(), format!("{key}-{n}.ndjson")));
        }
    }
    bar.finish_and_clear();
    let total_files = jobs.len() as u64;
    let bar = indicatif::ProgressBar::new(total_files);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} files {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let slots = Arc::new(tokio::sync::Semaphore::new(parallel));
    let mut set = tokio::task::JoinSet::new();
    for (f, name) in jobs.clone() {
        let (client, dir, slots, bar) = (client.clone(), dir.clone(), slots.clone(), bar.clone());
        set.spawn(async move {
            let _permit = slots.acquire_owned().await;
            let r = bulk::download(&client, &f, &dir, &name).await;
            bar.inc(1);
            r
        });
    }
    let mut resources = 0u64;
    while let Some(r) = set.join_next().await {
        resources += r.context("a download task failed")??;
    }
    bar.finish_and_clear();
    let mut manifest = m.raw.clone();
    for (key, list) in [("output", &m.output), ("deleted", &m.deleted)] {
        if let Some(arr) = manifest[key].as_array_mut() {
            for (entry, f) in arr.iter_mut().zip(list.iter()) {
                if let Some((_, name)) = jobs.iter().find(|(j, _)| j.url == f.url) {
                    entry["file"] = json!(name);
                }
            }
        }
    }
    std::fs::write(
        dir.join("manifest.json"),
        serde_json::to_string_pretty(&manifest)?,
    )
    .context("cannot write manifest.json")?;
    // the server may drop the files now
    let _ = client
        .send(reqwest::Method::DELETE, &m.status_url, None)
        .await;
    let secs = started.elapsed().as_secs_f64();
    // a fhirsync node says how long the job itself ran
    let server = match m.raw["extension"]["https://fhirsync.dev/bulk/seconds"].as_f64() {
        Some(s) => format!(
            "the job ran {s:.2} s, {:.0}/s",
            resources as f64 / s.max(1e-3)
        ),
        None => format!("kick-off to manifest {exported:.2} s"),
    };
    println!(
        "exported {resources} resources in {total_files} files to {} in {secs:.2} s ({:.0}/s; {server}); transactionTime {}",
        dir.display(),
        resources as f64 / secs.max(1e-9),
        m.transaction_time
    );
    Ok(())
}
