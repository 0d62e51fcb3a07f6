//! Search keys extracted from a resource version: identifiers and the
//! `subject` / `patient` references. Stored beside each version.

use serde_json::{Map, Value};

use crate::refs::parse_reference;

/// One search key: `param` with a `system` and `value`. For identifiers the
/// system is the identifier system (empty when absent); for references it is
/// the target type and the value the target id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub param: &'static str,
    pub system: String,
    pub value: String,
}

/// Resource elements whose reference feeds the `patient` parameter.
const PATIENT_ELEMENTS: &[&str] = &["patient", "subject", "beneficiary"];

pub fn extract(res: &Map<String, Value>) -> Vec<IndexEntry> {
    let mut out = Vec::new();
    match res.get("identifier") {
        Some(Value::Array(a)) => a.iter().for_each(|i| push_identifier(i, &mut out)),
        Some(i @ Value::Object(_)) => push_identifier(i, &mut out),
        _ => {}
    }
    if let Some((t, id)) = reference_of(res.get("subject")) {
        out.push(IndexEntry {
            param: "subject",
            system: t.into(),
            value: id.into(),
        });
    }
    for el in PATIENT_ELEMENTS {
        if let Some(("Patient", id)) = reference_of(res.get(*el)) {
            let e = IndexEntry {
                param: "patient",
                system: "Patient".into(),
                value: id.into(),
            };
            if !out.contains(&e) {
                out.push(e);
            }
        }
    }
    out
}

fn push_identifier(i: &Value, out: &mut Vec<IndexEntry>) {
    let Some(value) = i.get("value").and_then(Value::as_str) else {
        return;
    };
    let system = i.get("system").and_then(Value::as_str).unwrap_or("");
    let e = IndexEntry {
        param: "identifier",
        system: system.into(),
        value: value.into(),
    };
    if !out.contains(&e) {
        out.push(e);
    }
}

fn reference_of(v: Option<&Value>) -> Option<(&str, &str)> {
    // A single Reference; for arrays the first one (R4 subject/patient are single).
    let r = match v? {
        Value::Array(a) => a.first()?,
        other => other,
    };
    parse_reference(r.get("reference")?.as_str()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts() {
        let v: Value = serde_json::from_str(
            r#"{"resourceType":"Observation","identifier":[{"system":"s","value":"1"},{"value":"2"},{"system":"x"}],
                "subject":{"reference":"Patient/p1"}}"#,
        )
        .unwrap();
        let e = extract(v.as_object().unwrap());
        let got: Vec<_> = e
            .iter()
            .map(|e| (e.param, e.system.as_str(), e.value.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("identifier", "s", "1"),
                ("identifier", "", "2"),
                ("subject", "Patient", "p1"),
                ("patient", "Patient", "p1")
            ]
        );
    }
}
