//! Time zones of the sender's and the receiver's databases: DATETIME
//! values are wall-clock times of their database, so a receiver in
//! another zone converts them (DATE and TIME columns are left as they are).

use chrono::{FixedOffset, NaiveDateTime, Offset, TimeZone, Utc};

/// An IANA zone (`Africa/Nairobi`), `UTC`, or a fixed offset (`+03:00`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Zone {
    Named(chrono_tz::Tz),
    Fixed(FixedOffset),
}

impl Zone {
    pub const UTC: Zone = Zone::Named(chrono_tz::UTC);

    pub fn parse(s: &str) -> Result<Zone, String> {
        let s = s.trim();
        if let Ok(tz) = s.parse::<chrono_tz::Tz>() {
            return Ok(Zone::Named(tz));
        }
        let (sign, rest) = match s.as_bytes().first() {
            Some(b'+') => (1, &s[1..]),
            Some(b'-') => (-1, &s[1..]),
            _ => {
                return Err(format!(
                    "time zone {s:?}: use a name like Africa/Nairobi or an offset like +03:00"
                ))
            }
        };
        let (h, m) = rest
            .split_once(':')
            .and_then(|(h, m)| Some((h.parse::<i32>().ok()?, m.parse::<i32>().ok()?)))
            .filter(|(h, m)| *h <= 14 && *m < 60)
            .ok_or_else(|| format!("time zone {s:?}: an offset is +HH:MM or -HH:MM"))?;
        FixedOffset::east_opt(sign * (h * 3600 + m * 60))
            .map(Zone::Fixed)
            .ok_or_else(|| format!("time zone {s:?} is out of range"))
    }

    /// The UTC instant of a wall-clock time here (the earlier one when a
    /// clock change makes it ambiguous, the time after the gap when it
    /// does not exist).
    fn to_utc(self, t: NaiveDateTime) -> NaiveDateTime {
        match self {
            Zone::Fixed(o) => t - o.fix(),
            Zone::Named(tz) => match tz.from_local_datetime(&t).earliest() {
                Some(d) => d.naive_utc(),
                None => {
                    let later = t + chrono::Duration::hours(1);
                    tz.from_local_datetime(&later)
                        .earliest()
                        .map(|d| d.naive_utc() - chrono::Duration::hours(1))
                        .unwrap_or(t)
                }
            },
        }
    }

    fn local_of(self, t: NaiveDateTime) -> NaiveDateTime {
        match self {
            Zone::Fixed(o) => t + o.fix(),
            Zone::Named(tz) => tz.from_utc_datetime(&t).naive_local(),
        }
    }
}

impl std::fmt::Display for Zone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Zone::Named(tz) => write!(f, "{}", tz.name()),
            Zone::Fixed(o) => write!(f, "{o}"),
        }
    }
}

/// A DATETIME value (`YYYY-MM-DD hh:mm:ss[.ffffff]`) of zone `from` as
/// the same instant in zone `to`, with the same precision. Values that
/// are not such a time (MySQL's zero date) come back unchanged.
pub fn convert(value: &str, from: Zone, to: Zone) -> String {
    if from == to {
        return value.to_string();
    }
    let Ok(t) = NaiveDateTime::parse_from_str(value, "%Y-%m-%d %H:%M:%S%.f") else {
        return value.to_string();
    };
    let out = to.local_of(from.to_utc(t));
    let secs = out.format("%Y-%m-%d %H:%M:%S").to_string();
    match value.split_once('.') {
        Some((_, frac)) => format!(
            "{secs}.{:0width$}",
            out.and_utc().timestamp_subsec_micros() / 10u32.pow(6 - frac.len().min(6) as u32),
            width = frac.len()
        ),
        None => secs,
    }
}

/// A TIMESTAMP from the binlog (seconds since the epoch, maybe with a
/// fraction) as a UTC `YYYY-MM-DD hh:mm:ss[.ffffff]`.
pub fn epoch_to_utc(value: &str) -> Option<String> {
    let (secs, frac) = match value.split_once('.') {
        Some((s, f)) => (s, Some(f)),
        None => (value, None),
    };
    let t = Utc.timestamp_opt(secs.parse().ok()?, 0).single()?;
    let base = t.format("%Y-%m-%d %H:%M:%S").to_string();
    Some(match frac {
        Some(f) => format!("{base}.{f}"),
        None => base,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datetimes_move_between_zones_and_keep_precision() {
        let nairobi = Zone::parse("Africa/Nairobi").unwrap();
        let ny = Zone::parse("America/New_York").unwrap();
        assert_eq!(
            convert("2026-03-01 12:00:00", nairobi, Zone::UTC),
            "2026-03-01 09:00:00"
        );
        assert_eq!(
            convert("2026-03-01 12:00:00", ny, Zone::UTC),
            "2026-03-01 17:00:00"
        );
        // Summer time in New York.
        assert_eq!(
            convert("2026-07-01 12:00:00", ny, Zone::UTC),
            "2026-07-01 16:00:00"
        );
        assert_eq!(
            convert(
                "2026-03-01 00:30:00.250",
                Zone::parse("+03:00").unwrap(),
                Zone::UTC
            ),
            "2026-02-28 21:30:00.250"
        );
        assert_eq!(
            convert("0000-00-00 00:00:00", nairobi, Zone::UTC),
            "0000-00-00 00:00:00"
        );
        assert_eq!(epoch_to_utc("0").unwrap(), "1970-01-01 00:00:00");
        assert_eq!(epoch_to_utc("86400.5").unwrap(), "1970-01-02 00:00:00.5");
        assert!(Zone::parse("Mars/Olympus").is_err());
        assert!(Zone::parse("+25:00").is_err());
    }
}
