//! When to retry a request and how long to wait: plain functions, so the
//! policy is tested without a network and replays from a seed.

use std::time::Duration;

/// First retry delay.
pub const RETRY_DELAY_MS_MIN: u64 = 200;
/// Longest delay between two attempts.
pub const RETRY_DELAY_MS_MAX: u64 = 30_000;

/// Whether an HTTP status is worth retrying (overload, server trouble).
pub fn is_retryable_status(status: u16) -> bool {
    matches!(status, 408 | 425 | 429 | 500 | 502 | 503 | 504)
}

/// Exponential backoff with full jitter: a delay in
/// `[min, min * 2^attempt]`, capped; `unit` in `[0, 1)` is the random draw.
pub fn backoff(attempt: u32, unit: f64) -> Duration {
    let ceiling = RETRY_DELAY_MS_MIN
        .saturating_mul(1u64 << attempt.min(20))
        .min(RETRY_DELAY_MS_MAX);
    let span = ceiling - RETRY_DELAY_MS_MIN.min(ceiling);
    Duration::from_millis(
        RETRY_DELAY_MS_MIN.min(ceiling) + (span as f64 * unit.clamp(0.0, 1.0)) as u64,
    )
}

/// The wait a `Retry-After` header asks for (seconds form; an HTTP date is
/// read relative to `now_ms`), capped at the maximum delay.
pub fn retry_after(value: &str, now_ms: u64) -> Option<Duration> {
    let v = value.trim();
    let ms = if let Ok(s) = v.parse::<u64>() {
        s.saturating_mul(1000)
    } else {
        let t = chrono_like_http_date(v)?;
        t.saturating_sub(now_ms)
    };
    Some(Duration::from_millis(ms.min(RETRY_DELAY_MS_MAX)))
}

/// `Sun, 06 Nov 1994 08:49:37 GMT` to ms since the epoch.
fn chrono_like_http_date(v: &str) -> Option<u64> {
    let parts: Vec<&str> = v.split_whitespace().collect();
    if parts.len() != 6 || parts[5] != "GMT" {
        return None;
    }
    let day: i64 = parts[1].parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| *m == parts[2])? as i64
        + 1;
    let year: i64 = parts[3].parse().ok()?;
    let hms: Vec<i64> = parts[4].split(':').filter_map(|x| x.parse().ok()).collect();
    if hms.len() != 3 {
        return None;
    }
    // Days from civil (Howard Hinnant's algorithm).
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hms[0] * 3600 + hms[1] * 60 + hms[2];
    u64::try_from(secs).ok().map(|s| s * 1000)
}

/// A small seeded generator for jitter (SplitMix64).
#[derive(Debug, Clone)]
pub struct Jitter(u64);

impl Jitter {
    pub fn new(seed: u64) -> Self {
        Jitter(seed)
    }
    /// A draw in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses() {
        for s in [429, 500, 502, 503, 504, 408] {
            assert!(is_retryable_status(s), "{s}");
        }
        for s in [200, 400, 401, 403, 404, 409, 412, 422] {
            assert!(!is_retryable_status(s), "{s}");
        }
    }

    #[test]
    fn backoff_grows_within_bounds() {
        assert_eq!(backoff(0, 0.0), Duration::from_millis(RETRY_DELAY_MS_MIN));
        assert_eq!(backoff(0, 0.999), Duration::from_millis(RETRY_DELAY_MS_MIN));
        assert!(backoff(3, 0.999) <= Duration::from_millis(1600));
        assert!(backoff(3, 0.999) > Duration::from_millis(1500));
        assert!(backoff(40, 1.0) <= Duration::from_millis(RETRY_DELAY_MS_MAX));
        let mut j = Jitter::new(1);
        for _ in 0..1000 {
            let u = j.unit();
            assert!((0.0..1.0).contains(&u));
        }
    }

    #[test]
    fn retry_after_forms() {
        assert_eq!(retry_after("2", 0), Some(Duration::from_secs(2)));
        assert_eq!(
            retry_after("9999", 0),
            Some(Duration::from_millis(RETRY_DELAY_MS_MAX))
        );
        assert_eq!(
            retry_after("Thu, 01 Jan 1970 00:00:05 GMT", 1000),
            Some(Duration::from_millis(4000))
        );
        assert_eq!(
            retry_after("Thu, 01 Jan 1970 00:00:05 GMT", 9000),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after("soon", 0), None);
    }
}
