//! Anti-entropy summaries: what a node holds, hashed so that two nodes can
//! compare their sets without sending them. An item is one current
//! resource (type, id, version vector, content hash or tombstone); a
//! range's [`Fingerprint`] is the count and the wrapping sum of its items'
//! 128-bit hashes, so it is the same whatever order the items are read in
//! and the fingerprints of adjacent parts add up to the whole.

use std::fmt;

use xxhash_rust::xxh3::Xxh3;

/// Longest period between two scheduled anti-entropy runs (a week),
/// other than 0 (off), for a parent edge and a NATS follow alike.
pub const VERIFY_EVERY_S_MAX: u64 = 7 * 24 * 3_600;

/// The count and hash sum of a set of items.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Fingerprint {
    pub count: u64,
    pub sum: u128,
}

impl Fingerprint {
    pub fn add(&mut self, item: u128) {
        self.count += 1;
        self.sum = self.sum.wrapping_add(item);
    }

    /// The 32 hex digits of `sum` (the count travels on its own).
    pub fn sum_hex(&self) -> String {
        format!("{:032x}", self.sum)
    }

    pub fn from_parts(count: u64, sum_hex: &str) -> Option<Fingerprint> {
        if sum_hex.len() != 32 {
            return None;
        }
        Some(Fingerprint {
            count,
            sum: u128::from_str_radix(sum_hex, 16).ok()?,
        })
    }
}

/// The hash of one item. The vector is its stored JSON text, which is
/// canonical (keys sorted, no spaces); `content` is the content hash,
/// `None` for a tombstone.
pub fn item_hash(rtype: &str, id: &str, vv: &str, content: Option<&[u8]>) -> u128 {
    let mut h = Xxh3::new();
    h.update(rtype.as_bytes());
    h.update(&[0]);
    h.update(id.as_bytes());
    h.update(&[0]);
    h.update(vv.as_bytes());
    match content {
        Some(c) => {
            h.update(&[1]);
            h.update(c);
        }
        None => h.update(&[2]),
    }
    h.digest128()
}

/// Bytes as lower-case hex digits (content hashes on the wire).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex digits back to bytes; `None` unless every pair is hex.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// The ids of one type in `(after, upto]`: `after` exclusive, `upto`
/// inclusive, `None` for no bound. Ids compare as bytes, as both backends
/// order them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    pub rtype: String,
    pub after: Option<String>,
    pub upto: Option<String>,
}

impl KeyRange {
    pub fn whole(rtype: &str) -> KeyRange {
        KeyRange {
            rtype: rtype.to_owned(),
            after: None,
            upto: None,
        }
    }

    pub fn contains(&self, id: &str) -> bool {
        self.after.as_deref().is_none_or(|a| id > a) && self.upto.as_deref().is_none_or(|u| id <= u)
    }

    /// The sub-range from `after` (exclusive) to `upto` (inclusive) inside
    /// this one.
    pub fn sub(&self, after: Option<String>, upto: Option<String>) -> KeyRange {
        KeyRange {
            rtype: self.rtype.clone(),
            after,
            upto,
        }
    }
}

impl fmt::Display for KeyRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}({}..{}]",
            self.rtype,
            self.after.as_deref().unwrap_or(""),
            self.upto.as_deref().unwrap_or("")
        )
    }
}

/// Cuts a sorted stream of items into parts at given bounds: part `i`
/// holds the ids up to `bounds[i]` (inclusive) after the previous bound;
/// the last part holds the rest. Both ends of a comparison cut their items
/// at the same bounds.
pub struct Cutter<'a> {
    bounds: &'a [String],
    at: usize,
    pub parts: Vec<Fingerprint>,
}

impl<'a> Cutter<'a> {
    pub fn new(bounds: &'a [String]) -> Cutter<'a> {
        Cutter {
            bounds,
            at: 0,
            parts: vec![Fingerprint::default(); bounds.len() + 1],
        }
    }

    /// Adds the next item; ids must come in ascending order.
    pub fn add(&mut self, id: &str, item: u128) {
        while self.at < self.bounds.len() && id > self.bounds[self.at].as_str() {
            self.at += 1;
        }
        self.parts[self.at].add(item);
    }
}

/// Where a range of `count` items is cut into `fanout` parts of about
/// equal size: after the items numbered `size, 2·size, …` (1-based).
pub fn part_size(count: u64, fanout: usize) -> u64 {
    count.div_ceil(fanout.max(2) as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_do_not_depend_on_order_and_parts_add_up() {
        let items: Vec<u128> = (0..100)
            .map(|i| {
                item_hash(
                    "Patient",
                    &format!("p{i:03}"),
                    r#"{"a":1}"#,
                    Some(&[i as u8]),
                )
            })
            .collect();
        let mut fwd = Fingerprint::default();
        items.iter().for_each(|i| fwd.add(*i));
        let mut back = Fingerprint::default();
        items.iter().rev().for_each(|i| back.add(*i));
        assert_eq!(fwd, back);
        let bounds = vec!["p010".to_owned(), "p050".to_owned()];
        let mut c = Cutter::new(&bounds);
        for (i, item) in items.iter().enumerate() {
            c.add(&format!("p{i:03}"), *item);
        }
        let counts: Vec<u64> = c.parts.iter().map(|p| p.count).collect();
        assert_eq!(counts, vec![11, 40, 49]);
        let total = c.parts.iter().fold(0u128, |s, p| s.wrapping_add(p.sum));
        assert_eq!(total, fwd.sum);
    }

    #[test]
    fn every_field_of_an_item_changes_its_hash() {
        let base = item_hash("Patient", "a", r#"{"n":1}"#, Some(b"x"));
        assert_ne!(base, item_hash("Patient", "b", r#"{"n":1}"#, Some(b"x")));
        assert_ne!(base, item_hash("Group", "a", r#"{"n":1}"#, Some(b"x")));
        assert_ne!(base, item_hash("Patient", "a", r#"{"n":2}"#, Some(b"x")));
        assert_ne!(base, item_hash("Patient", "a", r#"{"n":1}"#, Some(b"y")));
        assert_ne!(base, item_hash("Patient", "a", r#"{"n":1}"#, None));
        // The separators keep fields from running into each other.
        assert_ne!(
            item_hash("Pa", "tient", "", None),
            item_hash("Pat", "ient", "", None)
        );
    }

    #[test]
    fn fingerprint_text_round_trips_and_bad_text_is_refused() {
        let f = Fingerprint {
            count: 3,
            sum: 0xdead_beef,
        };
        assert_eq!(Fingerprint::from_parts(3, &f.sum_hex()), Some(f));
        assert_eq!(Fingerprint::from_parts(3, "xyz"), None);
        assert_eq!(Fingerprint::from_parts(3, &"g".repeat(32)), None);
        assert_eq!(unhex(&hex(&[0, 9, 255])), Some(vec![0, 9, 255]));
        assert_eq!(unhex("abc"), None);
        assert_eq!(unhex("zz"), None);
        assert_eq!(unhex("é0"), None);
    }

    #[test]
    fn ranges_hold_what_their_bounds_say() {
        let r = KeyRange {
            rtype: "Patient".into(),
            after: Some("b".into()),
            upto: Some("d".into()),
        };
        assert!(!r.contains("b") && r.contains("c") && r.contains("d") && !r.contains("e"));
        assert!(KeyRange::whole("Patient").contains(""));
        assert_eq!(part_size(100, 16), 7);
        assert_eq!(part_size(0, 16), 1);
    }
}
