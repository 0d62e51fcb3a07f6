//! Resources of a load (`fhirsync import`, `$import`) as write requests:
//! parsed, checked, validated as the node's mode says and prepared.

use std::sync::atomic::{AtomicU64, Ordering};

use fhirsync_core::resource::{body_id, check_resource, parse_resource};
use fhirsync_core::validate::{summary, Mode};
use serde_json::{Map, Value};

use crate::{Prepared, WriteRequest};

/// Validation of what a load brings, as the node's `[validation] mode`
/// says; counts what lenient mode lets through.
pub struct Checker {
    mode: Mode,
    lenient: AtomicU64,
}

impl Checker {
    pub fn new(mode: Mode) -> Self {
        Checker {
            mode,
            lenient: AtomicU64::new(0),
        }
    }

    /// Resources that fail validation and were let through (lenient mode).
    pub fn lenient(&self) -> u64 {
        self.lenient.load(Ordering::Relaxed)
    }

    /// The resource, or the problems in one line when the mode refuses them.
    pub fn check_map(&self, res: Map<String, Value>) -> Result<Map<String, Value>, String> {
        let res = Value::Object(res);
        let issues = self
            .mode
            .check(&res)
            .map_err(|i| format!("fails validation: {}", summary(&i)))?;
        if !issues.is_empty() {
            self.lenient.fetch_add(1, Ordering::Relaxed);
        }
        match res {
            Value::Object(m) => Ok(m),
            _ => Err("not a JSON object".into()),
        }
    }
}

/// One NDJSON line: with an id an update (create-or-update), without one
/// a create; Bundles are resources like any other.
pub fn line_request(bytes: &[u8], checker: &Checker) -> Result<WriteRequest, String> {
    let res = parse_resource(bytes).map_err(|e| e.to_string())?;
    resource_request(res, checker)
}

/// A parsed resource as its write request (see [`line_request`]).
pub fn resource_request(
    res: Map<String, Value>,
    checker: &Checker,
) -> Result<WriteRequest, String> {
    let rtype = check_resource(&res, None).map_err(|e| e.to_string())?;
    let res = checker.check_map(res)?;
    let id = body_id(&res).map(str::to_owned);
    let res = Prepared::new(rtype, res);
    Ok(match id {
        Some(id) => WriteRequest::Update {
            id,
            res,
            if_match: None,
        },
        None => WriteRequest::Create {
            res,
            if_none_exist: None,
        },
    })
}
