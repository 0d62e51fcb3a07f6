//! FHIR `instant` / `dateTime` text and HTTP dates, as milliseconds since
//! the Unix epoch. Partial dates (`2024`, `2024-03`, `2024-03-05T10:00`)
//! become the half-open range of milliseconds they cover.

use chrono::{DateTime, FixedOffset, NaiveDate, NaiveDateTime, TimeZone, Utc};

/// `2024-03-05T10:00:00.123Z`
pub fn format_instant(ms: u64) -> String {
    match Utc.timestamp_millis_opt(ms as i64).single() {
        Some(t) => t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        None => "1970-01-01T00:00:00.000Z".into(),
    }
}

/// `Tue, 05 Mar 2024 10:00:00 GMT` (for `Last-Modified`).
pub fn format_http_date(ms: u64) -> String {
    match Utc.timestamp_millis_opt(ms as i64).single() {
        Some(t) => t.format("%a, %d %b %Y %H:%M:%S GMT").to_string(),
        None => "Thu, 01 Jan 1970 00:00:00 GMT".into(),
    }
}

/// Parses a FHIR date, dateTime or instant into `[start, end)` in ms.
/// A value without a zone is read as UTC.
pub fn parse_range(s: &str) -> Option<(i64, i64)> {
    let s = s.trim();
    // Full precision with a zone: an instant, possibly with fractions.
    if let Ok(t) = DateTime::<FixedOffset>::parse_from_rfc3339(s) {
        let start = t.timestamp_millis();
        let frac_digits = s
            .split_once('.')
            .map(|(_, rest)| rest.bytes().take_while(u8::is_ascii_digit).count())
            .unwrap_or(0);
        let width = match frac_digits {
            0 => 1000,
            1 => 100,
            2 => 10,
            _ => 1,
        };
        return Some((start, start + width));
    }
    let (body, offset_s) = split_zone(s)?;
    let utc = |naive: NaiveDateTime| naive.and_utc().timestamp_millis() - offset_s * 1000;
    match body.len() {
        4 => {
            let y: i32 = body.parse().ok()?;
            let a = NaiveDate::from_ymd_opt(y, 1, 1)?.and_hms_opt(0, 0, 0)?;
            let b = NaiveDate::from_ymd_opt(y + 1, 1, 1)?.and_hms_opt(0, 0, 0)?;
            Some((utc(a), utc(b)))
        }
        7 => {
            let y: i32 = body.get(0..4)?.parse().ok()?;
            let m: u32 = body.get(5..7)?.parse().ok()?;
            if body.as_bytes()[4] != b'-' {
                return None;
            }
            let a = NaiveDate::from_ymd_opt(y, m, 1)?;
            let b = if m == 12 {
                NaiveDate::from_ymd_opt(y + 1, 1, 1)?
            } else {
                NaiveDate::from_ymd_opt(y, m + 1, 1)?
            };
            Some((utc(a.and_hms_opt(0, 0, 0)?), utc(b.and_hms_opt(0, 0, 0)?)))
        }
        10 => {
            let d = NaiveDate::parse_from_str(body, "%Y-%m-%d").ok()?;
            let a = d.and_hms_opt(0, 0, 0)?;
            Some((utc(a), utc(a) + 86_400_000))
        }
        16 => {
            let t = NaiveDateTime::parse_from_str(body, "%Y-%m-%dT%H:%M").ok()?;
            Some((utc(t), utc(t) + 60_000))
        }
        _ => {
            let t = NaiveDateTime::parse_from_str(body, "%Y-%m-%dT%H:%M:%S%.f").ok()?;
            let frac = body.split_once('.').map(|(_, f)| f.len()).unwrap_or(0);
            let width = match frac {
                0 => 1000,
                1 => 100,
                2 => 10,
                _ => 1,
            };
            Some((utc(t), utc(t) + width))
        }
    }
}

/// Splits an optional `Z` / `+hh:mm` / `-hh:mm` zone off a date-time.
fn split_zone(s: &str) -> Option<(&str, i64)> {
    if let Some(b) = s.strip_suffix('Z') {
        return Some((b, 0));
    }
    if s.len() > 16 && s.is_char_boundary(s.len() - 6) {
        let (b, z) = s.split_at(s.len() - 6);
        let zb = z.as_bytes();
        if (zb[0] == b'+' || zb[0] == b'-') && zb[3] == b':' {
            let h: i64 = z.get(1..3)?.parse().ok()?;
            let m: i64 = z.get(4..6)?.parse().ok()?;
            let sign = if zb[0] == b'-' { -1 } else { 1 };
            return Some((b, sign * (h * 3600 + m * 60)));
        }
    }
    Some((s, 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn format() {
        assert_eq!(format_instant(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_instant(1_500), "1970-01-01T00:00:01.500Z");
        assert_eq!(format_http_date(0), "Thu, 01 Jan 1970 00:00:00 GMT");
    }

    #[test]
    fn ranges() {
        let day = 86_400_000;
        assert_eq!(parse_range("1970-01-02"), Some((day, 2 * day)));
        assert_eq!(parse_range("1970"), Some((0, 365 * day)));
        assert_eq!(parse_range("1970-02"), Some((31 * day, 59 * day)));
        assert_eq!(parse_range("1970-01-01T00:00:01Z"), Some((1000, 2000)));
        assert_eq!(parse_range("1970-01-01T00:00:01.5Z"), Some((1500, 1600)));
        assert_eq!(parse_range("1970-01-01T01:00:00+01:00"), Some((0, 1000)));
        assert_eq!(parse_range("1970-01-01T00:01"), Some((60_000, 120_000)));
        assert_eq!(parse_range("garbage"), None);
        assert_eq!(parse_range("1970-13"), None);
        assert_eq!(parse_range("1970-01-01T00:00:00ééé"), None);
        assert_eq!(parse_range("1970-01-01T00:00:00é12345"), None);
        assert_eq!(parse_range("ééééééééééééééééé"), None);
    }
}
