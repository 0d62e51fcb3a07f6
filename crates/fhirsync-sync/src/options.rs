//! What a sync run is asked to do, checked before anything is read or
//! written.

use std::path::PathBuf;

use fhirsync_core::resource::{is_resource_type, is_valid_id};

use crate::client::Auth;
use crate::SyncError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Mode {
    Copy,
    Compare,
    Synthea,
    Incremental,
}

impl Mode {
    pub fn parse(s: &str) -> Result<Mode, SyncError> {
        match s.to_ascii_uppercase().as_str() {
            "COPY" => Ok(Mode::Copy),
            "COMPARE" => Ok(Mode::Compare),
            "SYNTHEA" => Ok(Mode::Synthea),
            "INCREMENTAL" => Ok(Mode::Incremental),
            _ => Err(SyncError::Options(format!(
                "--mode '{s}' must be COPY, COMPARE, SYNTHEA or INCREMENTAL"
            ))),
        }
    }
}

/// Where resources come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceSpec {
    /// A FHIR base URL (a fhirsync node is one).
    Server(String),
    /// A search URL: `base/Type?params`; every page is followed.
    Search { base: String, url: String },
    /// A local directory (or file) of `.json` / `.ndjson`.
    Directory(PathBuf),
}

impl SourceSpec {
    pub fn parse(s: &str) -> Result<SourceSpec, SyncError> {
        if let Some(p) = s.strip_prefix("file:") {
            let p = p.strip_prefix("//").unwrap_or(p);
            return Ok(SourceSpec::Directory(PathBuf::from(p)));
        }
        if !(s.starts_with("http://") || s.starts_with("https://")) {
            return Err(SyncError::Options(format!(
                "--source '{s}' must be an http(s) URL or file:DIRECTORY"
            )));
        }
        let (path, query) = match s.split_once('?') {
            Some((p, q)) => (p.trim_end_matches('/'), Some(q)),
            None => (s.trim_end_matches('/'), None),
        };
        let last = path.rsplit('/').next().unwrap_or("");
        if is_resource_type(last) {
            let base = &path[..path.len() - last.len() - 1];
            let url = match query {
                Some(q) => format!("{path}?{q}"),
                None => path.to_owned(),
            };
            return Ok(SourceSpec::Search {
                base: base.to_owned(),
                url,
            });
        }
        if query.is_some() {
            return Err(SyncError::Options(format!(
                "--source '{s}': a search URL names a resource type (base/Type?params)"
            )));
        }
        Ok(SourceSpec::Server(path.to_owned()))
    }

    /// The base URL, for sources that have one.
    pub fn base(&self) -> Option<&str> {
        match self {
            SourceSpec::Server(b) | SourceSpec::Search { base: b, .. } => Some(b),
            SourceSpec::Directory(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct SyncOptions {
    pub source: SourceSpec,
    pub source_auth: Auth,
    pub source_tls: Option<crate::tls::TlsAuth>,
    pub targets: Vec<String>,
    pub target_auth: Auth,
    pub target_tls: Option<crate::tls::TlsAuth>,
    pub target_retry_count: u32,
    pub resource_types: Vec<String>,
    pub resource_ids: Vec<(String, String)>,
    pub thread_count: usize,
    pub prefix_numeric_ids: Option<String>,
    pub mode: Mode,
    pub upload_bundles_as_transactions: bool,
    pub request_id: Option<String>,
    pub semaphore_path: Option<String>,
    pub no_delete: bool,
    pub dry_run: bool,
    pub state: Option<PathBuf>,
    pub follow: bool,
    /// COPY and COMPARE read a server source (and COMPARE its target)
    /// through bulk export.
    pub bulk: BulkRead,
    /// COMPARE reads every resource even between two fhirsync nodes
    /// (which otherwise compare summaries; see `crate::summaries`).
    pub no_summary: bool,
}

/// Whether COPY and COMPARE read a server source (and COMPARE its
/// target) through bulk export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum BulkRead {
    /// When the server's CapabilityStatement offers `$export`.
    #[default]
    Auto,
    /// Always try it (`--bulk`); page through searches if it is refused.
    Always,
    /// Never (`--no-bulk`): page through searches.
    Never,
}

/// Retries of a failed read on the source.
pub const SOURCE_RETRY_COUNT: u32 = 5;
/// Page size asked of servers when reading.
pub const PAGE_COUNT: usize = 1000;

impl SyncOptions {
    /// Parses `-r A,B` and `--resource-ids T/id,...`.
    pub fn parse_types(s: &str) -> Result<Vec<String>, SyncError> {
        let mut out = Vec::new();
        for t in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            if !is_resource_type(t) {
                return Err(SyncError::Options(format!(
                    "-r: '{t}' is not a FHIR R4 resource type"
                )));
            }
            if !out.iter().any(|x| x == t) {
                out.push(t.to_owned());
            }
        }
        Ok(out)
    }

    pub fn parse_ids(s: &str) -> Result<Vec<(String, String)>, SyncError> {
        let mut out = Vec::new();
        for r in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            match r.split_once('/') {
                Some((t, id)) if is_resource_type(t) && is_valid_id(id) => {
                    out.push((t.to_owned(), id.to_owned()))
                }
                _ => {
                    return Err(SyncError::Options(format!(
                        "--resource-ids: '{r}' is not Type/id"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// Checks combinations the modes do not allow.
    pub fn check(&self) -> Result<(), SyncError> {
        let bad = |m: &str| Err(SyncError::Options(m.to_owned()));
        if self.targets.is_empty() {
            return bad("at least one --target is needed");
        }
        for t in &self.targets {
            if !(t.starts_with("http://") || t.starts_with("https://")) {
                return Err(SyncError::Options(format!(
                    "--target '{t}' must be an http(s) base URL"
                )));
            }
        }
        if !self.resource_types.is_empty() && !self.resource_ids.is_empty() {
            return bad("--resource-types and --resource-ids cannot be combined");
        }
        if !self.resource_ids.is_empty() && !matches!(self.source, SourceSpec::Server(_)) {
            return bad("--resource-ids needs a FHIR server as --source");
        }
        if self.thread_count == 0 {
            return bad("--thread-count must be at least 1");
        }
        if let Some(p) = &self.prefix_numeric_ids {
            if p.is_empty()
                || !is_valid_id(&format!("{p}1"))
                || p.bytes().all(|b| b.is_ascii_digit())
            {
                return bad(
                    "--prefix-numeric-ids must be letters, digits, '-' or '.', not only digits",
                );
            }
        }
        match self.mode {
            Mode::Compare | Mode::Incremental if self.targets.len() > 1 => {
                return bad("COMPARE and INCREMENTAL take exactly one --target")
            }
            Mode::Synthea if !matches!(self.source, SourceSpec::Directory(_)) => {
                return bad("SYNTHEA takes a directory source (file:DIR)")
            }
            Mode::Incremental if matches!(self.source, SourceSpec::Directory(_)) => {
                return bad(
                    "INCREMENTAL reads a server's history; use COPY or COMPARE for a directory",
                )
            }
            _ => {}
        }
        if self.semaphore_path.is_some() && self.mode != Mode::Copy {
            return bad("--semaphore-path applies to COPY only");
        }
        if self.no_summary && self.mode != Mode::Compare {
            return bad("--no-summary applies to COMPARE only");
        }
        if self.follow && self.mode != Mode::Incremental {
            return bad("--follow applies to INCREMENTAL only");
        }
        if self.state.is_some() && self.mode != Mode::Incremental {
            return bad("--state applies to INCREMENTAL only");
        }
        if self.mode == Mode::Incremental && self.state.is_none() {
            return bad("INCREMENTAL needs --state FILE to keep its cursor");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources() {
        assert_eq!(
            SourceSpec::parse("http://h/fhir/").unwrap(),
            SourceSpec::Server("http://h/fhir".into())
        );
        assert_eq!(
            SourceSpec::parse("http://h/fhir/Patient?name=smith").unwrap(),
            SourceSpec::Search {
                base: "http://h/fhir".into(),
                url: "http://h/fhir/Patient?name=smith".into()
            }
        );
        assert_eq!(
            SourceSpec::parse("file:///tmp/x").unwrap(),
            SourceSpec::Directory("/tmp/x".into())
        );
        assert_eq!(
            SourceSpec::parse("file:rel/dir").unwrap(),
            SourceSpec::Directory("rel/dir".into())
        );
        assert!(SourceSpec::parse("ftp://x").is_err());
        assert!(SourceSpec::parse("http://h/fhir?x=1").is_err());
    }

    #[test]
    fn lists() {
        assert_eq!(
            SyncOptions::parse_types("Patient, Observation,Patient").unwrap(),
            vec!["Patient", "Observation"]
        );
        assert!(SyncOptions::parse_types("Patient,Nope").is_err());
        assert_eq!(
            SyncOptions::parse_ids("Patient/1,Encounter/a")
                .unwrap()
                .len(),
            2
        );
        assert!(SyncOptions::parse_ids("Patient").is_err());
        assert!(Mode::parse("copy").is_ok() && Mode::parse("MIRROR").is_err());
    }
}
