//! Rows as the conflict queue shows them: both versions of a row in one
//! zone (the receiver's) and with one JSON type per column, so that a
//! column diff compares values, not their spelling (`"0"` and `0`, or
//! `12:00` in the site's zone and `09:00` in UTC, are the same value).

use serde_json::{Map, Value as Json};

use crate::schema::{Column, Table};
use crate::tz::{convert, Zone};

const INTEGER_TYPES: &[&str] = &[
    "tinyint",
    "smallint",
    "mediumint",
    "int",
    "integer",
    "bigint",
];
const FLOAT_TYPES: &[&str] = &["float", "double", "real"];

/// `row` (values of zone `from`: an incoming change in its site's zone,
/// or a row read here as text) in zone `to`, typed by the table's columns;
/// columns the table does not have are kept as they are.
pub fn row(t: &Table, row: &Map<String, Json>, from: Zone, to: Zone) -> Map<String, Json> {
    row.iter()
        .map(|(name, v)| {
            let shown = match t.column(name) {
                Some(c) => value(c, v, from, to),
                None => v.clone(),
            };
            (name.clone(), shown)
        })
        .collect()
}

/// One value: DATETIMEs moved to `to` (TIMESTAMPs travel and are read in
/// UTC, so they move from UTC), fractions without trailing zeros; integers
/// and floats as numbers; an ENUM as its label.
pub fn value(c: &Column, v: &Json, from: Zone, to: Zone) -> Json {
    let ty = c.data_type.as_str();
    match v {
        Json::Null => Json::Null,
        Json::String(s) if ty == "datetime" => Json::String(trim_fraction(&convert(s, from, to))),
        Json::String(s) if ty == "timestamp" => {
            Json::String(trim_fraction(&convert(s, Zone::UTC, to)))
        }
        Json::Number(n) if !c.enum_values.is_empty() => n
            .as_u64()
            .and_then(|i| c.enum_values.get((i as usize).checked_sub(1)?))
            .map(|s| Json::String(s.clone()))
            .unwrap_or_else(|| v.clone()),
        Json::String(s) if INTEGER_TYPES.contains(&ty) && c.enum_values.is_empty() => s
            .trim()
            .parse::<i64>()
            .map(Json::from)
            .or_else(|_| s.trim().parse::<u64>().map(Json::from))
            .unwrap_or_else(|_| v.clone()),
        Json::String(s) if FLOAT_TYPES.contains(&ty) => s
            .trim()
            .parse::<f64>()
            .ok()
            .and_then(|f| serde_json::Number::from_f64(f).map(Json::Number))
            .unwrap_or_else(|| v.clone()),
        // The same number in the float's own spelling (`1.5`, not `1.50`).
        Json::Number(n) if FLOAT_TYPES.contains(&ty) => n
            .as_f64()
            .and_then(serde_json::Number::from_f64)
            .map(Json::Number)
            .unwrap_or_else(|| v.clone()),
        Json::Bool(b) if INTEGER_TYPES.contains(&ty) => Json::from(*b as i64),
        _ => v.clone(),
    }
}

/// `12:00:00.500000` → `12:00:00.5`, `12:00:00.000` → `12:00:00`.
fn trim_fraction(s: &str) -> String {
    match s.split_once('.') {
        Some((secs, frac)) if frac.bytes().all(|b| b.is_ascii_digit()) => {
            let f = frac.trim_end_matches('0');
            if f.is_empty() {
                secs.to_string()
            } else {
                format!("{secs}.{f}")
            }
        }
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn col(name: &str, ty: &str) -> Column {
        Column {
            name: name.into(),
            data_type: ty.into(),
            enum_values: Vec::new(),
        }
    }

    #[test]
    fn the_same_instant_and_number_look_the_same_from_both_sides() {
        let t = Table {
            name: "person".into(),
            columns: vec![
                col("created", "datetime"),
                col("n", "int"),
                col("w", "double"),
                col("seen", "timestamp"),
                Column {
                    enum_values: vec!["a".into(), "b".into()],
                    ..col("kind", "enum")
                },
            ],
            pk: None,
            has_uuid: true,
            fks: Vec::new(),
        };
        let nairobi = Zone::parse("Africa/Nairobi").unwrap();
        let incoming = json!({"created": "2026-01-01 12:00:00.000", "n": 0, "w": 1.5,
                              "seen": "2026-01-01 09:00:00", "kind": 2, "extra": "x"});
        let local = json!({"created": "2026-01-01 09:00:00", "n": "0", "w": "1.50",
                           "seen": "2026-01-01 09:00:00", "kind": "b", "extra": "x"});
        let a = row(&t, incoming.as_object().unwrap(), nairobi, Zone::UTC);
        let b = row(&t, local.as_object().unwrap(), Zone::UTC, Zone::UTC);
        assert_eq!(a, b);
        assert_eq!(a["created"], "2026-01-01 09:00:00");
        assert_eq!(a["n"], 0);
        assert_eq!(a["kind"], "b");
        // Shown in Nairobi: both sides move the same way.
        let a = row(&t, incoming.as_object().unwrap(), nairobi, nairobi);
        let b = row(&t, local.as_object().unwrap(), Zone::UTC, nairobi);
        assert_eq!(a, b);
        assert_eq!(a["created"], "2026-01-01 12:00:00");
        assert_eq!(a["seen"], "2026-01-01 12:00:00");
    }

    #[test]
    fn fractions_lose_trailing_zeros_only() {
        assert_eq!(
            trim_fraction("2026-01-01 12:00:00.500000"),
            "2026-01-01 12:00:00.5"
        );
        assert_eq!(trim_fraction("2026-01-01 12:00:00"), "2026-01-01 12:00:00");
        assert_eq!(
            trim_fraction("0000-00-00 00:00:00.000"),
            "0000-00-00 00:00:00"
        );
    }
}
