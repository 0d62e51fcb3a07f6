//! Finding and reading FHIR files: `.json` (a resource or a Bundle) and
//! `.ndjson` (one resource a line), in a stable order.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

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

/// What a `.json` file holds, as units of work.
#[derive(Debug)]
pub enum FilePart {
    /// A `transaction` or `batch` Bundle, to be run as such.
    Bundle(Map<String, Value>),
    /// One resource; `entry` is its position inside a collection Bundle.
    Resource {
        res: Map<String, Value>,
        entry: Option<usize>,
    },
}

/// Splits a `.json` file: transaction/batch Bundles stay whole; the entries
/// of collection/searchset Bundles come out one by one (unless
/// `keep_collections`); anything else is one resource.
pub fn split_file(
    res: Map<String, Value>,
    keep_collections: bool,
) -> Result<Vec<FilePart>, String> {
    if res.get("resourceType").and_then(Value::as_str) == Some("Bundle") {
        match res.get("type").and_then(Value::as_str) {
            Some("transaction") | Some("batch") => return Ok(vec![FilePart::Bundle(res)]),
            Some("collection") | Some("searchset") if !keep_collections => {
                let entries = match res.get("entry") {
                    None => return Ok(Vec::new()),
                    Some(Value::Array(a)) => a.clone(),
                    Some(_) => return Err("Bundle.entry must be an array".into()),
                };
                return entries
                    .into_iter()
                    .enumerate()
                    .filter_map(|(i, e)| match e {
                        Value::Object(mut e) => match e.remove("resource") {
                            Some(Value::Object(r)) => Some(Ok(FilePart::Resource {
                                res: r,
                                entry: Some(i),
                            })),
                            Some(_) => Some(Err(format!("entry {i}: resource is not an object"))),
                            None => None,
                        },
                        _ => Some(Err(format!("entry {i} is not an object"))),
                    })
                    .collect();
            }
            _ => {}
        }
    }
    Ok(vec![FilePart::Resource { res, entry: None }])
}
