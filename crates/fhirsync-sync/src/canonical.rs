//! Content hashes for COMPARE that ignore what servers change on their own:
//! `id`, `meta.versionId`, `meta.lastUpdated`, `meta.source`, the order of
//! object members, and how a number is written (`1.50` = `1.5`).

use serde_json::Value;
use xxhash_rust::xxh3::Xxh3;

pub fn content_hash(res: &Value) -> u128 {
    let mut h = Xxh3::new();
    write(res, &mut h, true);
    h.digest128()
}

fn write(v: &Value, h: &mut Xxh3, top: bool) {
    match v {
        Value::Null => h.update(b"n"),
        Value::Bool(b) => h.update(if *b { b"t" } else { b"f" }),
        Value::Number(n) => {
            h.update(b"#");
            // The number as it was written (arbitrary precision keeps it).
            let text = n.as_str();
            if is_normal_number(text) {
                h.update(text.as_bytes());
            } else {
                h.update(normalize_number(text).as_bytes());
            }
        }
        Value::String(s) => {
            h.update(b"\"");
            h.update(&(s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        Value::Array(a) => {
            h.update(b"[");
            for x in a {
                write(x, h, false);
            }
            h.update(b"]");
        }
        Value::Object(m) => {
            // Members in key order, each with its value: no lookups by key.
            let mut members: Vec<(&String, &Value)> = m.iter().collect();
            members.sort_unstable_by(|a, b| a.0.cmp(b.0));
            h.update(b"{");
            for (k, val) in members {
                if top && k == "id" {
                    continue;
                }
                if top && k == "meta" {
                    if let Value::Object(meta) = val {
                        write_meta(meta, h);
                        continue;
                    }
                }
                write_key(k, h);
                write(val, h, false);
            }
            h.update(b"}");
        }
    }
}

fn write_key(k: &str, h: &mut Xxh3) {
    h.update(&(k.len() as u64).to_le_bytes());
    h.update(k.as_bytes());
}

/// `meta` without the fields a server sets; nothing when that leaves it
/// empty.
fn write_meta(meta: &serde_json::Map<String, Value>, h: &mut Xxh3) {
    let mut members: Vec<(&String, &Value)> = meta
        .iter()
        .filter(|(k, _)| !SERVER_META.contains(&k.as_str()))
        .collect();
    if members.is_empty() {
        return;
    }
    members.sort_unstable_by(|a, b| a.0.cmp(b.0));
    h.update(b"meta{");
    for (k, val) in members {
        write_key(k, h);
        write(val, h, false);
    }
    h.update(b"}");
}

/// The members of `meta` a server sets on its own.
const SERVER_META: [&str; 3] = ["versionId", "lastUpdated", "source"];

/// Whether `s` is already as [`normalize_number`] writes it: an integer
/// other than `-0` (the usual case, checked without allocating).
fn is_normal_number(s: &str) -> bool {
    !s.is_empty() && s != "-0" && s.bytes().all(|b| b.is_ascii_digit() || b == b'-')
}

/// One text per numeric value: no trailing fractional zeros, no `+` or
/// leading zeros in the exponent, lower-case `e`.
pub fn normalize_number(s: &str) -> String {
    let s = s.trim();
    let (mant, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut m = mant.to_owned();
    if m.contains('.') {
        while m.ends_with('0') {
            m.pop();
        }
        if m.ends_with('.') {
            m.pop();
        }
    }
    if m == "-0" {
        m = "0".into();
    }
    match exp {
        Some(e) => {
            let neg = e.starts_with('-');
            let digits = e.trim_start_matches(['+', '-']).trim_start_matches('0');
            if digits.is_empty() {
                m
            } else {
                format!("{m}e{}{digits}", if neg { "-" } else { "" })
            }
        }
        None => m,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> u128 {
        content_hash(&serde_json::from_str(s).unwrap())
    }

    #[test]
    fn numbers() {
        for (a, b) in [
            ("1.50", "1.5"),
            ("2.0", "2"),
            ("1e+02", "1e2"),
            ("1E2", "1e2"),
            ("-0.0", "0"),
            ("100", "100"),
            ("-0", "0"),
            ("-12", "-12"),
        ] {
            assert_eq!(normalize_number(a), b, "{a}");
            let n: serde_json::Number = serde_json::from_str(a).unwrap();
            assert_eq!(
                h(&format!("{{\"x\":{n}}}")),
                h(&format!("{{\"x\":{b}}}")),
                "{a}"
            );
        }
    }

    #[test]
    fn ignores_server_fields_and_order() {
        let a = h(
            r#"{"resourceType":"Patient","id":"1","meta":{"versionId":"3","lastUpdated":"x","source":"s"},"active":true,"x":1.50}"#,
        );
        let b = h(r#"{"x":1.5,"active":true,"resourceType":"Patient","id":"2"}"#);
        assert_eq!(a, b);
        let c = h(r#"{"resourceType":"Patient","active":false,"x":1.5}"#);
        assert_ne!(a, c);
        let d = h(r#"{"resourceType":"Patient","active":true,"x":1.5,"meta":{"profile":["p"]}}"#);
        assert_ne!(a, d);
        // Array order matters; string vs number matters.
        assert_ne!(h(r#"{"a":[1,2]}"#), h(r#"{"a":[2,1]}"#));
        assert_ne!(h(r#"{"a":"1"}"#), h(r#"{"a":1}"#));
    }
}
