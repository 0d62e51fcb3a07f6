//! Finding and reading FHIR files: `.json` (a resource or a Bundle) and
//! `.ndjson` (one resource a line), in a stable order.

use std::path::{Path, PathBuf};

use crate::SyncError;

/// Files to read, sorted; directories are searched recursively for
/// `.json` and `.ndjson`.
pub fn collect_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, SyncError> {
    let mut out = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|e| SyncError::File {
            path: p.display().to_string(),
            reason: format!("cannot read: {e}"),
        })?;
        if meta.is_dir() {
            walk(p, &mut out)?;
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), SyncError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| SyncError::File {
            path: dir.display().to_string(),
            reason: format!("cannot list: {e}"),
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .collect();
    entries.sort();
    for e in entries {
        if e.is_dir() {
            walk(&e, out)?;
        } else if is_fhir_file(&e) {
            out.push(e);
        }
    }
    Ok(())
}

pub fn is_fhir_file(p: &Path) -> bool {
    p.extension().is_some_and(|x| x == "json" || x == "ndjson")
}

pub fn is_ndjson(p: &Path) -> bool {
    p.extension().is_some_and(|x| x == "ndjson")
}
