//! Resources of a load (`fhirsync import`, `$import`) as write requests:
//! parsed, checked, validated as the node's mode says and prepared.

use std::collections::VecDeque;
use std::io::BufRead;
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
        let issues = self
            .mode
            .check_object(&res)
            .map_err(|i| format!("fails validation: {}", summary(&i)))?;
        if !issues.is_empty() {
            self.lenient.fetch_add(1, Ordering::Relaxed);
        }
        Ok(res)
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

/// Up to `max` non-blank lines of an NDJSON reader with their numbers
/// (`line_no` counts every line read so far); `read` hears the bytes of
/// each line. Empty at the end of the input.
pub fn read_lines(
    reader: &mut impl BufRead,
    max: usize,
    line_no: &mut usize,
    mut read: impl FnMut(usize),
) -> std::io::Result<Vec<(usize, String)>> {
    let mut lines = Vec::with_capacity(max);
    let mut buf = String::new();
    while lines.len() < max {
        buf.clear();
        let n = reader.read_line(&mut buf)?;
        if n == 0 {
            break;
        }
        *line_no += 1;
        read(n);
        if !buf.trim().is_empty() {
            lines.push((*line_no, std::mem::take(&mut buf)));
        }
    }
    Ok(lines)
}

/// Where the requests of the batches a writer may still hold came from
/// (a load's error names the request by its index in the load), for
/// `depth` batches in flight.
pub struct Recent<T> {
    batches: VecDeque<(u64, Vec<T>)>,
    depth: usize,
}

impl<T: Clone> Recent<T> {
    pub fn new(depth: usize) -> Self {
        Recent {
            batches: VecDeque::new(),
            depth,
        }
    }

    /// The origins of the batch whose first request has index `first`.
    pub fn push(&mut self, first: u64, origins: Vec<T>) {
        self.batches.push_back((first, origins));
        while self.batches.len() > self.depth + 2 {
            self.batches.pop_front();
        }
    }

    /// Where request `index` came from, if its batch is still known.
    pub fn find(&self, index: u64) -> Option<T> {
        self.batches
            .iter()
            .find(|(first, o)| index >= *first && index < first + o.len() as u64)
            .map(|(first, o)| o[(index - first) as usize].clone())
    }
}
