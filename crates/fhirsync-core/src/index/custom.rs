//! Search parameters defined by `SearchParameter` resources stored on a
//! node (status `active`): read from the resource, compiled once, and used
//! beside R4's to index new versions and to search.
//!
//! The set is process-wide: each store names its own definitions by a
//! source key, and the parameters in force are the union over the stores
//! of the process (one in a deployed node; several in tests).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use serde_json::Value;

use super::{simple_paths, Param};
use crate::fhirpath;
use crate::resource::is_resource_type;
use crate::spec::Kind;

/// Most distinct custom definitions (base, code, type, expression,
/// targets) one process compiles; each stays in memory for the process's
/// life, so the number is bounded.
pub const CUSTOM_PARAMS_MAX: usize = 1_000;

/// Longest code of a custom parameter.
pub const CODE_CHARS_MAX: usize = 64;

/// A custom search parameter as a `SearchParameter` resource defines it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Definition {
    pub bases: Vec<String>,
    pub code: String,
    pub kind: Kind,
    pub expression: String,
    pub targets: Vec<String>,
}

fn strings(v: &Value, key: &str) -> Vec<String> {
    match v.get(key) {
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        Some(Value::String(s)) => vec![s.clone()],
        _ => Vec::new(),
    }
}

impl Definition {
    /// The parameter a `SearchParameter` resource defines: `None` unless
    /// its status is `active` and it defines a parameter R4 does not have
    /// on some base; an error when it is active but cannot be served (the
    /// reason in one line).
    pub fn from_resource(v: &Value) -> Result<Option<Definition>, String> {
        if v.get("status").and_then(Value::as_str) != Some("active") {
            return Ok(None);
        }
        let code = v
            .get("code")
            .and_then(Value::as_str)
            .ok_or("SearchParameter.code is missing")?;
        if code.is_empty()
            || code.len() > CODE_CHARS_MAX
            || code.starts_with('_')
            || !code
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(format!(
                "SearchParameter.code '{code}': 1 to {CODE_CHARS_MAX} of A-Z a-z 0-9 - _, not starting with _"
            ));
        }
        let mut bases = strings(v, "base");
        if bases.is_empty() {
            return Err("SearchParameter.base is missing".into());
        }
        if let Some(b) = bases.iter().find(|b| !is_resource_type(b)) {
            return Err(format!("SearchParameter.base '{b}' is not a resource type"));
        }
        // R4's own parameters are built in: a definition of one (such as
        // the spec's, loaded as data) is stored and R4's is served.
        bases.retain(|b| !super::params(b).iter().any(|p| p.code == code));
        if bases.is_empty() {
            return Ok(None);
        }
        let kind_text = v.get("type").and_then(Value::as_str).unwrap_or("");
        let kind = match Kind::parse(kind_text) {
            Some(k) if !matches!(k, Kind::Composite | Kind::Special) => k,
            _ => {
                return Err(format!(
                    "SearchParameter.type '{kind_text}': custom parameters may be token, reference, string, date, uri, number or quantity"
                ))
            }
        };
        let expression = v
            .get("expression")
            .and_then(Value::as_str)
            .ok_or("SearchParameter.expression is missing")?;
        fhirpath::parse(expression)
            .map_err(|e| format!("SearchParameter.expression does not parse: {e}"))?;
        let targets = strings(v, "target");
        if let Some(t) = targets.iter().find(|t| !is_resource_type(t)) {
            return Err(format!(
                "SearchParameter.target '{t}' is not a resource type"
            ));
        }
        Ok(Some(Definition {
            bases,
            code: code.to_owned(),
            kind,
            expression: expression.to_owned(),
            targets,
        }))
    }
}

type Active = HashMap<String, Vec<&'static Param>>;

struct Registry {
    /// Each store's definitions.
    sources: HashMap<String, Vec<Definition>>,
    /// Compiled parameters by (base, definition); kept for the process.
    compiled: HashMap<(String, Definition), &'static Param>,
    /// At most this many compiled ([`CUSTOM_PARAMS_MAX`]).
    cap: usize,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);
static ACTIVE: RwLock<Option<Arc<Active>>> = RwLock::new(None);
/// Whether any custom parameter is in force (the common case, none, costs
/// one atomic load per indexed version).
static ANY: AtomicBool = AtomicBool::new(false);

fn leak(s: &str) -> &'static str {
    Box::leak(s.to_owned().into_boxed_str())
}

fn compile(base: &str, d: &Definition) -> Result<&'static Param, String> {
    let expr = leak(&d.expression);
    let parsed = fhirpath::parse(expr).map_err(|e| format!("{}: {e}", d.code))?;
    let targets: Vec<&'static str> = d.targets.iter().map(|t| leak(t)).collect();
    let code = leak(&d.code);
    Ok(Box::leak(Box::new(Param {
        code,
        kind: d.kind,
        expr: Some(parsed),
        targets: Box::leak(targets.into_boxed_slice()),
        components: Vec::new(),
        paths: simple_paths(base, expr),
        name: Arc::from(code),
        derived: super::Derived::of(code),
        custom: true,
        stored: super::Stored::Own,
    })))
}

impl Registry {
    fn new(cap: usize) -> Registry {
        Registry {
            sources: HashMap::new(),
            compiled: HashMap::new(),
            cap,
        }
    }

    /// Sets the definitions of `source`; the parameters in force over all
    /// sources, and the problems of those that could not be put in force.
    fn put(&mut self, source: &str, defs: Vec<Definition>) -> (Active, Vec<String>) {
        let mut problems = Vec::new();
        self.sources.insert(source.to_owned(), defs);
        let mut active: Active = HashMap::new();
        let mut wanted: Vec<(String, Definition)> = Vec::new();
        for defs in self.sources.values() {
            for d in defs {
                for b in &d.bases {
                    wanted.push((b.clone(), d.clone()));
                }
            }
        }
        for (base, d) in wanted {
            let key = (base.clone(), d.clone());
            let p = match self.compiled.get(&key) {
                Some(p) => *p,
                None if self.compiled.len() >= self.cap => {
                    problems.push(format!(
                        "{}: more than CUSTOM_PARAMS_MAX ({}) custom parameter definitions in this process",
                        d.code, self.cap
                    ));
                    continue;
                }
                None => match compile(&base, &d) {
                    Ok(p) => {
                        self.compiled.insert(key, p);
                        p
                    }
                    Err(e) => {
                        problems.push(e);
                        continue;
                    }
                },
            };
            let list = active.entry(base).or_default();
            if !list.iter().any(|q| q.code == p.code) {
                list.push(p);
            }
        }
        (active, problems)
    }
}

/// Sets the definitions of `source` (a store) and returns the problems of
/// those that could not be put in force (each named by its code).
pub fn set(source: &str, defs: Vec<Definition>) -> Vec<String> {
    let Ok(mut g) = REGISTRY.lock() else {
        return vec!["the custom parameter registry is poisoned".into()];
    };
    let reg = g.get_or_insert_with(|| Registry::new(CUSTOM_PARAMS_MAX));
    let (active, problems) = reg.put(source, defs);
    ANY.store(!active.is_empty(), Ordering::Release);
    if let Ok(mut a) = ACTIVE.write() {
        *a = Some(Arc::new(active));
    }
    problems
}

/// The custom parameters in force for `rtype`.
pub fn params(rtype: &str) -> Vec<&'static Param> {
    if !ANY.load(Ordering::Acquire) {
        return Vec::new();
    }
    let active = ACTIVE.read().ok().and_then(|a| a.clone());
    active
        .and_then(|a| a.get(rtype).cloned())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sp(code: &str, kind: &str, expr: &str) -> Value {
        json!({"resourceType": "SearchParameter", "status": "active", "code": code,
               "base": ["Patient"], "type": kind, "expression": expr})
    }

    #[test]
    fn definitions_are_read_and_refused_with_a_reason() {
        let d = Definition::from_resource(&sp("nickname", "string", "Patient.name.given"))
            .unwrap()
            .unwrap();
        assert_eq!(d.kind, Kind::String);
        let mut draft = sp("x", "string", "Patient.name");
        draft["status"] = json!("draft");
        assert_eq!(Definition::from_resource(&draft).unwrap(), None);
        for (v, why) in [
            (sp("_x", "string", "Patient.name"), "not starting with _"),
            (
                sp("x", "composite", "Patient.name"),
                "custom parameters may be",
            ),
            (sp("x", "string", "Patient.name.("), "does not parse"),
            (sp("x", "string", "Patient.name.where("), "does not parse"),
            (
                sp(&"a".repeat(CODE_CHARS_MAX + 1), "string", "Patient.name"),
                "1 to 64",
            ),
            (sp("a b", "string", "Patient.name"), "1 to 64"),
        ] {
            let e = Definition::from_resource(&v).unwrap_err();
            assert!(e.contains(why), "{e}");
        }
        // A definition of R4's own parameter is stored; R4's is served.
        let own = sp("family", "composite", "Patient.name.family");
        assert_eq!(Definition::from_resource(&own).unwrap(), None);
    }

    #[test]
    fn a_set_definition_indexes_and_is_found() {
        let d = Definition::from_resource(&sp(
            "unit-test-mothers-maiden",
            "string",
            "Patient.extension.where(url = 'http://x/mm').value",
        ))
        .unwrap()
        .unwrap();
        assert!(set("unit-test-source", vec![d]).is_empty());
        let p = json!({"resourceType": "Patient", "extension": [{"url": "http://x/mm", "valueString": "Wanjiru"}]});
        let entries = super::super::extract("Patient", &p);
        assert!(entries
            .iter()
            .any(|e| &*e.param == "unit-test-mothers-maiden"));
        assert!(super::super::param("Patient", "unit-test-mothers-maiden").is_some());
        set("unit-test-source", Vec::new());
        assert!(super::super::param("Patient", "unit-test-mothers-maiden").is_none());
    }

    #[test]
    fn definitions_past_the_cap_are_not_in_force() {
        let mut reg = Registry::new(1);
        let def = |code: &str| {
            Definition::from_resource(&sp(code, "string", "Patient.name.given"))
                .unwrap()
                .unwrap()
        };
        let (active, problems) = reg.put("a", vec![def("cap-one"), def("cap-two")]);
        assert_eq!(active["Patient"].len(), 1);
        assert_eq!(problems.len(), 1);
        assert!(problems[0].contains("CUSTOM_PARAMS_MAX"), "{problems:?}");
        // What is already compiled stays usable.
        let (active, problems) = reg.put("a", vec![def("cap-one")]);
        assert_eq!((active["Patient"].len(), problems.len()), (1, 0));
    }
}
