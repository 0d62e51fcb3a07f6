//! `--prefix-numeric-ids`: purely numeric ids get a prefix, and every
//! reference to them is rewritten (relative, absolute to the source base,
//! and inside Bundles) so nothing dangles.

use fhirsync_core::refs::rewrite_references;
use fhirsync_core::resource::is_resource_type;
use serde_json::{Map, Value};

#[derive(Debug, Clone)]
pub struct Prefixer {
    prefix: String,
    /// The source's base URL; absolute references to it are rewritten.
    source_base: Option<String>,
}

fn is_numeric(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())
}

impl Prefixer {
    pub fn new(prefix: &str, source_base: Option<&str>) -> Prefixer {
        Prefixer {
            prefix: prefix.to_owned(),
            source_base: source_base.map(|b| b.trim_end_matches('/').to_owned()),
        }
    }

    pub fn id(&self, id: &str) -> String {
        if is_numeric(id) {
            format!("{}{id}", self.prefix)
        } else {
            id.to_owned()
        }
    }

    /// The rewritten form of a reference, or `None` when it stays.
    pub fn reference(&self, r: &str) -> Option<String> {
        let rel = match &self.source_base {
            Some(b) => r
                .strip_prefix(b.as_str())
                .and_then(|x| x.strip_prefix('/'))
                .unwrap_or(r),
            None => r,
        };
        if rel.contains("://")
            || rel.starts_with('#')
            || rel.starts_with("urn:")
            || rel.contains('?')
        {
            return None;
        }
        let mut parts: Vec<&str> = rel.split('/').collect();
        if parts.len() < 2 || !is_resource_type(parts[0]) || !is_numeric(parts[1]) {
            return None;
        }
        let new_id = self.id(parts[1]);
        parts[1] = &new_id;
        Some(parts.join("/"))
    }

    /// Rewrites a resource (or a Bundle and everything in it) in place.
    pub fn apply(&self, res: &mut Map<String, Value>) {
        let mut v = Value::Object(std::mem::take(res));
        rewrite_references(&mut v, &mut |r| self.reference(r));
        if let Value::Object(m) = v {
            *res = m;
        }
        self.fix_ids(res);
    }

    fn fix_ids(&self, res: &mut Map<String, Value>) {
        if let Some(Value::String(id)) = res.get_mut("id") {
            *id = self.id(id);
        }
        if res.get("resourceType").and_then(Value::as_str) != Some("Bundle") {
            return;
        }
        let Some(Value::Array(entries)) = res.get_mut("entry") else {
            return;
        };
        for e in entries {
            if let Some(Value::String(fu)) = e.get_mut("fullUrl") {
                if let Some(n) = self.reference(fu) {
                    *fu = match &self.source_base {
                        Some(b) if fu.starts_with(b.as_str()) => format!("{b}/{n}"),
                        _ => n,
                    };
                }
            }
            if let Some(Value::String(u)) = e.get_mut("request").and_then(|r| r.get_mut("url")) {
                if let Some(n) = self.reference(u) {
                    *u = n;
                }
            }
            if let Some(Value::Object(r)) = e.get_mut("resource") {
                self.fix_ids(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn references() {
        let p = Prefixer::new("PFX", Some("http://src/fhir/"));
        assert_eq!(
            p.reference("Patient/123").as_deref(),
            Some("Patient/PFX123")
        );
        assert_eq!(
            p.reference("Patient/123/_history/2").as_deref(),
            Some("Patient/PFX123/_history/2")
        );
        assert_eq!(
            p.reference("http://src/fhir/Patient/9").as_deref(),
            Some("Patient/PFX9")
        );
        assert_eq!(p.reference("http://other/fhir/Patient/9"), None);
        assert_eq!(p.reference("Patient/abc"), None);
        assert_eq!(p.reference("#1"), None);
        assert_eq!(p.id("42"), "PFX42");
        assert_eq!(p.id("a42"), "a42");
    }

    #[test]
    fn bundle_everywhere() {
        let p = Prefixer::new("X", Some("http://src/fhir"));
        let mut b = json!({"resourceType": "Bundle", "id": "7", "type": "transaction", "entry": [
            {"fullUrl": "http://src/fhir/Patient/1", "resource": {"resourceType": "Patient", "id": "1", "contained": [{"resourceType": "Organization", "id": "2"}], "managingOrganization": {"reference": "#2"}},
             "request": {"method": "PUT", "url": "Patient/1"}},
            {"resource": {"resourceType": "Observation", "id": "o", "subject": {"reference": "Patient/1"}}}
        ]});
        p.apply(b.as_object_mut().unwrap());
        assert_eq!(b["id"], "X7");
        assert_eq!(b["entry"][0]["fullUrl"], "http://src/fhir/Patient/X1");
        assert_eq!(b["entry"][0]["resource"]["id"], "X1");
        assert_eq!(b["entry"][0]["request"]["url"], "Patient/X1");
        assert_eq!(
            b["entry"][0]["resource"]["contained"][0]["id"], "2",
            "contained ids stay"
        );
        assert_eq!(
            b["entry"][0]["resource"]["managingOrganization"]["reference"],
            "#2"
        );
        assert_eq!(
            b["entry"][1]["resource"]["subject"]["reference"],
            "Patient/X1"
        );
    }
}
