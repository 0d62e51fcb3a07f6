//! Walking and rewriting `Reference.reference` values inside a resource.

use serde_json::Value;

/// Calls `f` on every `reference` string in `v`; where `f` returns a new
/// value, the reference is replaced. Returns how many were replaced.
pub fn rewrite_references(v: &mut Value, f: &mut impl FnMut(&str) -> Option<String>) -> usize {
    let mut n = 0;
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                if k == "reference" {
                    if let Value::String(s) = child {
                        if let Some(new) = f(s) {
                            *s = new;
                            n += 1;
                        }
                        continue;
                    }
                }
                n += rewrite_references(child, f);
            }
        }
        Value::Array(a) => {
            for child in a {
                n += rewrite_references(child, f);
            }
        }
        _ => {}
    }
    n
}

/// `(Type, id)` of a literal reference: `Patient/1`, `Patient/1/_history/2`,
/// or an absolute URL ending in `Type/id`. Contained (`#x`), `urn:` and
/// conditional (`Type?query`) references give `None`.
pub fn parse_reference(r: &str) -> Option<(&str, &str)> {
    if r.starts_with('#') || r.starts_with("urn:") || r.contains('?') {
        return None;
    }
    let r = r.trim_end_matches('/');
    let r = match r.find("/_history/") {
        Some(i) => &r[..i],
        None => r,
    };
    let mut it = r.rsplitn(3, '/');
    let id = it.next()?;
    let rtype = it.next()?;
    (crate::resource::is_resource_type(rtype) && crate::resource::is_valid_id(id))
        .then_some((rtype, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse() {
        assert_eq!(parse_reference("Patient/1"), Some(("Patient", "1")));
        assert_eq!(
            parse_reference("http://x/fhir/Patient/1/_history/3"),
            Some(("Patient", "1"))
        );
        assert_eq!(parse_reference("#c1"), None);
        assert_eq!(parse_reference("urn:uuid:abc"), None);
        assert_eq!(parse_reference("Patient?identifier=a|b"), None);
        assert_eq!(parse_reference("Foo/1"), None);
    }

    #[test]
    fn rewrite_nested() {
        let mut v: Value = serde_json::from_str(
            r#"{"subject":{"reference":"urn:uuid:1"},"x":[{"y":{"reference":"urn:uuid:1"}},{"reference":"Patient/2"}]}"#,
        )
        .unwrap();
        let n = rewrite_references(&mut v, &mut |r| {
            (r == "urn:uuid:1").then(|| "Patient/9".to_string())
        });
        assert_eq!(n, 2);
        assert_eq!(v["x"][0]["y"]["reference"], "Patient/9");
        assert_eq!(v["x"][1]["reference"], "Patient/2");
    }
}
