//! `--semaphore-path`: the values of a simple FHIRPath (member paths,
//! `as(Type)` / `ofType(Type)`, `|` unions) used as lock keys so that
//! resources sharing a value are never uploaded at the same time.

use serde_json::Value;

/// Values found at `expr` in `res`, as text.
pub fn path_values(res: &Value, expr: &str) -> Vec<String> {
    let mut out = Vec::new();
    for alt in expr.split('|').map(str::trim).filter(|a| !a.is_empty()) {
        let mut cur: Vec<&Value> = vec![res];
        for (i, step) in split_steps(alt).into_iter().enumerate() {
            if i == 0 && fhirsync_core::resource::is_resource_type(step) {
                cur.retain(|v| v["resourceType"] == step);
                continue;
            }
            if let Some(t) = type_filter(step) {
                cur.retain(|v| v["resourceType"] == t);
                continue;
            }
            let mut next = Vec::new();
            for v in cur {
                match v.get(step) {
                    Some(Value::Array(a)) => next.extend(a.iter()),
                    Some(x) => next.push(x),
                    None => {}
                }
            }
            cur = next;
        }
        for v in cur {
            match v {
                Value::String(s) => out.push(s.clone()),
                Value::Number(n) => out.push(n.to_string()),
                Value::Bool(b) => out.push(b.to_string()),
                _ => {}
            }
        }
    }
    out
}

/// `as(Patient)` or `ofType(Patient)` gives `Patient`.
fn type_filter(step: &str) -> Option<&str> {
    let inner = step
        .strip_prefix("as(")
        .or_else(|| step.strip_prefix("ofType("))?
        .strip_suffix(')')?;
    Some(inner.trim())
}

/// Splits on dots outside parentheses.
fn split_steps(p: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut depth, mut start) = (0, 0);
    for (i, c) in p.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            '.' if depth == 0 => {
                out.push(&p[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    out.push(&p[start..]);
    out.into_iter().filter(|s| !s.is_empty()).collect()
}

/// Checks an expression has the supported form.
pub fn check(expr: &str) -> Result<(), String> {
    for alt in expr.split('|').map(str::trim) {
        if alt.is_empty() {
            return Err("empty path in --semaphore-path".into());
        }
        for s in split_steps(alt) {
            let ok = type_filter(s).is_some()
                || s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
            if !ok {
                return Err(format!("--semaphore-path step '{s}' is not supported (member names, as(T), ofType(T), |)"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn paths() {
        let b = json!({"resourceType": "Bundle", "entry": [
            {"resource": {"resourceType": "Patient", "id": "p1"}},
            {"resource": {"resourceType": "Observation", "id": "o1"}},
            {"resource": {"resourceType": "Practitioner", "id": "d1"}}
        ]});
        assert_eq!(
            path_values(&b, "Bundle.entry.resource.as(Patient).id"),
            vec!["p1"]
        );
        assert_eq!(path_values(&b, "Bundle.entry.resource.ofType(Patient).id | Bundle.entry.resource.as(Practitioner).id"), vec!["p1", "d1"]);
        let p = json!({"resourceType": "Patient", "id": "x", "identifier": [{"value": "a"}, {"value": "b"}]});
        assert_eq!(path_values(&p, "Patient.id|Practitioner.id"), vec!["x"]);
        assert_eq!(path_values(&p, "identifier.value"), vec!["a", "b"]);
        assert!(check("Bundle.entry.resource.as(Patient).id").is_ok());
        assert!(check("Patient.name.where(use='x')").is_err());
    }
}
