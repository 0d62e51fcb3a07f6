//! What a running db-sender is doing, for people and scrapers: its state
//! (following, retrying a delivery, refused by the receiver), counters,
//! the last error and the position delivered; written to `status.json` in
//! the state directory (read by `fhirsync db-sender status`) and rendered
//! as Prometheus text for `status_listen`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};

use crate::DbError;

/// Longest time the status file may lag behind the counters.
pub const STATUS_WRITE_MS_MAX: u64 = 1000;

/// The file, in the state directory, a sender keeps its status in.
pub fn status_file(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

#[derive(Debug, Default)]
struct Now {
    /// `starting`, `following`, `retrying` (delivery failed: the receiver
    /// or the broker cannot be reached, or answered 5xx), `refused` (the
    /// receiver answered that it cannot take the batch).
    state: String,
    last_error: Option<String>,
    /// Since when the batch in hand has been failing (ms since the epoch).
    failing_since_ms: Option<u64>,
    /// Attempts at the batch in hand.
    attempts: u64,
    position: Option<String>,
    last_delivered_ms: Option<u64>,
}

/// Counters and state of one sender.
#[derive(Debug, Default)]
pub struct Progress {
    site: String,
    state_dir: PathBuf,
    /// The longest wait between two attempts at one batch.
    pub retry_delay_max: Duration,
    pub batches: AtomicU64,
    pub changes: AtomicU64,
    /// Deliveries the receiver refused (each attempt counts).
    pub refused: AtomicU64,
    /// Deliveries that failed in transport or with a 5xx.
    pub delivery_errors: AtomicU64,
    now: Mutex<Now>,
    written: Mutex<Option<Instant>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn rfc3339(ms: u64) -> String {
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|t| t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string())
        .unwrap_or_default()
}

impl Progress {
    pub fn new(site: &str, state_dir: &Path, retry_delay_max: Duration) -> Progress {
        Progress {
            site: site.to_string(),
            state_dir: state_dir.to_path_buf(),
            retry_delay_max,
            ..Progress::default()
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Now) -> R) -> R {
        f(&mut self.now.lock().expect("sender status"))
    }

    pub fn following(&self, position: &str) {
        self.with(|n| {
            n.state = "following".into();
            n.position = Some(position.to_string());
        })
    }

    /// A batch went through.
    pub fn delivered(&self, changes: usize, position: &str) {
        self.batches.fetch_add(1, Relaxed);
        self.changes.fetch_add(changes as u64, Relaxed);
        self.with(|n| {
            n.state = "following".into();
            n.last_error = None;
            n.failing_since_ms = None;
            n.attempts = 0;
            n.position = Some(position.to_string());
            n.last_delivered_ms = Some(now_ms());
        })
    }

    /// A delivery failed; `refused`: the receiver's answer, else transport.
    pub fn failed(&self, refused: bool, why: &str) {
        let counter = if refused {
            &self.refused
        } else {
            &self.delivery_errors
        };
        counter.fetch_add(1, Relaxed);
        self.with(|n| {
            n.state = if refused { "refused" } else { "retrying" }.into();
            n.last_error = Some(why.to_string());
            n.failing_since_ms.get_or_insert_with(now_ms);
            n.attempts += 1;
        })
    }

    pub fn state(&self) -> String {
        self.with(|n| n.state.clone())
    }

    pub fn to_json(&self) -> Value {
        let site = &self.site;
        let g = |a: &AtomicU64| a.load(Relaxed);
        self.with(|n| {
            json!({
                "site": site,
                "state": n.state,
                "position": n.position,
                "batches": g(&self.batches),
                "changes": g(&self.changes),
                "refused": g(&self.refused),
                "deliveryErrors": g(&self.delivery_errors),
                "attempts": n.attempts,
                "lastError": n.last_error,
                "failingSince": n.failing_since_ms.map(rfc3339),
                "lastDelivered": n.last_delivered_ms.map(rfc3339),
                "updated": rfc3339(now_ms()),
                "pid": std::process::id(),
            })
        })
    }

    /// Prometheus text of the counters and state.
    pub fn metrics(&self) -> String {
        let site = &self.site;
        let g = |a: &AtomicU64| a.load(Relaxed);
        let (failing, last) = self.with(|n| (n.failing_since_ms.is_some(), n.last_delivered_ms));
        let mut out = String::new();
        let mut put = |name: &str, kind: &str, help: &str, v: String| {
            out.push_str(&format!(
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name}{{site=\"{site}\"}} {v}\n"
            ));
        };
        put(
            "fhirsync_db_sender_batches_total",
            "counter",
            "Batches the receiver (or the broker) confirmed.",
            g(&self.batches).to_string(),
        );
        put(
            "fhirsync_db_sender_changes_total",
            "counter",
            "Row changes in confirmed batches.",
            g(&self.changes).to_string(),
        );
        put(
            "fhirsync_db_sender_refused_total",
            "counter",
            "Deliveries the receiver refused (each attempt).",
            g(&self.refused).to_string(),
        );
        put(
            "fhirsync_db_sender_delivery_errors_total",
            "counter",
            "Deliveries that failed in transport or with a 5xx (each attempt).",
            g(&self.delivery_errors).to_string(),
        );
        put(
            "fhirsync_db_sender_failing",
            "gauge",
            "1 while the batch in hand is being retried.",
            (failing as u8).to_string(),
        );
        put(
            "fhirsync_db_sender_last_delivered_timestamp_seconds",
            "gauge",
            "When the last batch was confirmed (0: none yet).",
            format!("{:.3}", last.unwrap_or(0) as f64 / 1000.0),
        );
        out
    }

    /// Writes the status file (aside, then renamed: readers see a whole
    /// one) when `force`, or when the last write is older than
    /// [`STATUS_WRITE_MS_MAX`]. Not synced: it is a view, not state.
    pub fn save(&self, force: bool) -> Result<(), DbError> {
        {
            let mut w = self.written.lock().expect("status written");
            if !force && w.is_some_and(|t| t.elapsed() < Duration::from_millis(STATUS_WRITE_MS_MAX))
            {
                return Ok(());
            }
            *w = Some(Instant::now());
        }
        let path = status_file(&self.state_dir);
        let tmp = path.with_extension("tmp");
        let io =
            |e: std::io::Error| DbError::State(format!("cannot write {}: {e}", path.display()));
        std::fs::write(&tmp, self.to_json().to_string()).map_err(io)?;
        std::fs::rename(&tmp, &path).map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_shows_until_a_delivery_goes_through() {
        let p = Progress::new("site-a", Path::new("."), Duration::from_secs(1));
        p.following("mariadb-bin.000001:4");
        p.failed(
            true,
            "table visit is not in the receiver's database central",
        );
        p.failed(
            true,
            "table visit is not in the receiver's database central",
        );
        let j = p.to_json();
        assert_eq!(j["state"], "refused");
        assert_eq!(j["attempts"], 2);
        assert!(j["failingSince"].is_string());
        let m = p.metrics();
        assert!(
            m.contains("fhirsync_db_sender_refused_total{site=\"site-a\"} 2"),
            "{m}"
        );
        assert!(
            m.contains("fhirsync_db_sender_failing{site=\"site-a\"} 1"),
            "{m}"
        );
        p.delivered(3, "mariadb-bin.000001:900");
        let j = p.to_json();
        assert_eq!(
            (j["state"].as_str(), j["changes"].as_u64()),
            (Some("following"), Some(3))
        );
        assert!(j["lastError"].is_null() && j["failingSince"].is_null());
        assert!(p
            .metrics()
            .contains("fhirsync_db_sender_failing{site=\"site-a\"} 0"));
    }
}
