//! Structural validation of a resource against the R4 definitions
//! (`spec::ELEMENTS`): unknown elements, JSON types, primitive formats,
//! cardinality, choice types, contained resources, reference format.
//! Profiles and terminology are not checked.

use serde_json::{Map, Value};

use crate::resource::is_resource_type;
use crate::spec::{self, Element};

/// Most problems reported for one resource; the rest are counted.
pub const ISSUES_MAX: usize = 100;

/// One problem: what is wrong and where (a FHIRPath-like element path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub expression: String,
    pub message: String,
}

/// What a node does with a write that fails validation (`[validation] mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Refused with the problems.
    #[default]
    Strict,
    /// Stored; the problems are reported as warnings.
    Lenient,
    /// Not validated.
    Off,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "strict" => Some(Mode::Strict),
            "lenient" => Some(Mode::Lenient),
            "off" => Some(Mode::Off),
            _ => None,
        }
    }

    /// The problems of `v` this mode looks at (none when it is off).
    pub fn issues(self, v: &Value) -> Vec<Issue> {
        match self {
            Mode::Off => Vec::new(),
            Mode::Strict | Mode::Lenient => validate(v),
        }
    }

    /// Whether problems refuse the write.
    pub fn refuses(self) -> bool {
        self == Mode::Strict
    }

    /// Checks `v` as this mode says: `Err` with the problems when they
    /// refuse it, else `Ok` with those to report as warnings (lenient).
    pub fn check(self, v: &Value) -> Result<Vec<Issue>, Vec<Issue>> {
        self.verdict(self.issues(v))
    }

    /// [`Mode::check`] of a resource held as its members (no `Value` is
    /// built around it).
    pub fn check_object(self, o: &Map<String, Value>) -> Result<Vec<Issue>, Vec<Issue>> {
        let issues = match self {
            Mode::Off => Vec::new(),
            Mode::Strict | Mode::Lenient => validate_object(o),
        };
        self.verdict(issues)
    }

    fn verdict(self, issues: Vec<Issue>) -> Result<Vec<Issue>, Vec<Issue>> {
        if !issues.is_empty() && self.refuses() {
            Err(issues)
        } else {
            Ok(issues)
        }
    }
}

/// One line for a list of problems: their count, the first one and its path.
pub fn summary(issues: &[Issue]) -> String {
    match issues.first() {
        None => "no problems found".into(),
        Some(i) => format!(
            "{} problem(s), the first at {}: {}",
            issues.len(),
            i.expression,
            i.message
        ),
    }
}

/// The problems of `v` as a resource; empty when it is valid.
pub fn validate(v: &Value) -> Vec<Issue> {
    let mut cx = Cx {
        issues: Vec::new(),
        path: String::new(),
    };
    cx.resource(v);
    cx.issues
}

/// [`validate`] of a resource held as its members.
pub fn validate_object(o: &Map<String, Value>) -> Vec<Issue> {
    let mut cx = Cx {
        issues: Vec::new(),
        path: String::new(),
    };
    cx.resource_object(o);
    cx.issues
}

struct Cx {
    issues: Vec<Issue>,
    /// The path of the value being checked (`Observation.code.coding[0]`),
    /// grown and cut back as the walk goes, copied only into an issue.
    path: String,
}

impl Cx {
    /// A problem at the current path.
    fn issue(&mut self, message: String) {
        self.issue_at("", message);
    }

    /// A problem at the current path followed by `tail` (`.name`).
    fn issue_at(&mut self, tail: &str, message: String) {
        if self.issues.len() < ISSUES_MAX {
            self.issues.push(Issue {
                expression: format!("{}{tail}", self.path),
                message,
            });
        }
    }

    /// Runs `f` with `.name` (or `[i]`) added to the path.
    fn within(&mut self, seg: std::fmt::Arguments, f: impl FnOnce(&mut Cx)) {
        use std::fmt::Write;
        let len = self.path.len();
        let _ = self.path.write_fmt(seg);
        f(self);
        self.path.truncate(len);
    }

    fn resource(&mut self, v: &Value) {
        let Some(o) = v.as_object() else {
            self.issue("a resource must be a JSON object".into());
            return;
        };
        self.resource_object(o);
    }

    fn resource_object(&mut self, o: &Map<String, Value>) {
        let Some(t) = o.get("resourceType").and_then(Value::as_str) else {
            self.issue("resourceType is missing".into());
            return;
        };
        if !is_resource_type(t) {
            self.issue(format!("unknown resourceType '{t}'"));
            return;
        }
        // A type this node serves beyond R4 (SubscriptionTopic, from R5)
        // has no R4 definition to check against.
        if spec::children(t).next().is_none() {
            return;
        }
        if self.path.is_empty() {
            self.within(format_args!("{t}"), |cx| cx.object(o, t, true));
        } else {
            self.object(o, t, true);
        }
    }

    /// The members of `o` against the children of `def` (a type or a
    /// backbone element's path).
    fn object(&mut self, o: &Map<String, Value>, def: &str, is_resource: bool) {
        for (name, value) in o {
            if is_resource && name == "resourceType" {
                continue;
            }
            let base = name.strip_prefix('_');
            let lookup = base.unwrap_or(name);
            let Some((el, ty)) = find(def, lookup) else {
                self.issue_at(&format!(".{name}"), format!("unknown element '{name}'"));
                continue;
            };
            if base.is_some() {
                // The id and extensions of a primitive.
                if !is_primitive(ty) {
                    self.issue_at(
                        &format!(".{name}"),
                        format!("'{name}' is for primitives; '{lookup}' is a {ty}"),
                    );
                }
                continue;
            }
            self.within(format_args!(".{name}"), |cx| match value {
                Value::Array(items) => {
                    if el.max <= 1 {
                        cx.issue(format!("'{name}' has at most one value: not an array"));
                        return;
                    }
                    let ext = items
                        .iter()
                        .any(Value::is_null)
                        .then(|| o.get(&format!("_{name}")))
                        .flatten();
                    for (i, item) in items.iter().enumerate() {
                        cx.within(format_args!("[{i}]"), |cx| {
                            if item.is_null() {
                                let has_ext = ext
                                    .and_then(Value::as_array)
                                    .and_then(|a| a.get(i))
                                    .is_some_and(|x| !x.is_null());
                                if !has_ext {
                                    cx.issue("null without an extension in '_' form".into());
                                }
                                return;
                            }
                            cx.value(item, el, ty);
                        });
                    }
                }
                other => {
                    if el.max > 1 {
                        cx.issue(format!("'{name}' repeats: it must be an array"));
                        return;
                    }
                    cx.value(other, el, ty);
                }
            });
        }
        // Required elements.
        for el in spec::required_children(def) {
            let name = &el.path[def.len() + 1..];
            let present = match name.strip_suffix("[x]") {
                Some(stem) => o.keys().any(|k| choice_suffix(k, stem).is_some()),
                None => o.contains_key(name) || o.keys().any(|k| k.strip_prefix('_') == Some(name)),
            };
            if !present {
                self.issue_at(
                    &format!(".{name}"),
                    format!("'{name}' is required (at least {})", el.min),
                );
            }
        }
    }

    /// One value of element `el`, of type `ty`.
    fn value(&mut self, v: &Value, el: &Element, ty: &str) {
        if is_primitive(ty) {
            if let Some(why) = primitive(ty, v) {
                self.issue(why);
            }
            return;
        }
        let Some(o) = v.as_object() else {
            self.issue(format!("a {ty} must be a JSON object"));
            return;
        };
        match ty {
            "Resource" => self.resource(v),
            "BackboneElement" | "Element" if spec::children(el.path).next().is_some() => {
                self.object(o, el.path, false)
            }
            "" => match el.content_ref {
                "" => {}
                r => self.object(o, r, false),
            },
            t => {
                if t == "Reference" {
                    if let Some(r) = o.get("reference").and_then(Value::as_str) {
                        if let Some(why) = reference_format(r) {
                            self.issue_at(".reference", why);
                        }
                    }
                }
                self.object(o, t, false)
            }
        }
    }
}

/// The element `name` of `def` and the type its value has: a choice
/// element (`value[x]`) gives the type its suffix names.
fn find(def: &str, name: &str) -> Option<(&'static Element, &'static str)> {
    if let Some(el) = spec::child(def, name) {
        let ty = match (el.types, el.content_ref) {
            ([t], _) => t,
            ([], _) => "",
            (ts, _) => ts[0],
        };
        return Some((el, ty));
    }
    // A choice: the longest stem that names one.
    for el in spec::children(def) {
        let Some(stem) = el.path[def.len() + 1..].strip_suffix("[x]") else {
            continue;
        };
        if let Some(suffix) = choice_suffix(name, stem) {
            if let Some(t) = el.types.iter().find(|t| type_suffix(t) == suffix) {
                return Some((el, t));
            }
        }
    }
    None
}

/// `Quantity` of `valueQuantity` for the stem `value`.
fn choice_suffix<'a>(name: &'a str, stem: &str) -> Option<&'a str> {
    let rest = name.strip_prefix(stem)?;
    rest.starts_with(|c: char| c.is_ascii_uppercase())
        .then_some(rest)
}

/// How a type code appears as a choice suffix (`dateTime` → `DateTime`).
fn type_suffix(t: &str) -> String {
    let mut c = t.chars();
    match c.next() {
        Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
        None => String::new(),
    }
}

const PRIMITIVES: &[&str] = &[
    "base64Binary",
    "boolean",
    "canonical",
    "code",
    "date",
    "dateTime",
    "decimal",
    "id",
    "instant",
    "integer",
    "markdown",
    "oid",
    "positiveInt",
    "string",
    "time",
    "unsignedInt",
    "uri",
    "url",
    "uuid",
    "xhtml",
];

fn is_primitive(t: &str) -> bool {
    PRIMITIVES.contains(&t)
}

/// Why `v` is not a valid `ty`, if it is not.
fn primitive(ty: &str, v: &Value) -> Option<String> {
    let s = match (ty, v) {
        ("boolean", Value::Bool(_)) => return None,
        ("boolean", _) => return Some("a boolean must be true or false".into()),
        ("integer" | "positiveInt" | "unsignedInt", Value::Number(n)) => {
            let Some(i) = n.as_i64() else {
                return Some(format!("an {ty} must be a whole number"));
            };
            let ok = match ty {
                "positiveInt" => i >= 1 && i <= i32::MAX as i64,
                "unsignedInt" => (0..=i32::MAX as i64).contains(&i),
                _ => (i32::MIN as i64..=i32::MAX as i64).contains(&i),
            };
            return (!ok).then(|| format!("{i} is out of range for {ty}"));
        }
        ("integer" | "positiveInt" | "unsignedInt" | "decimal", _) if !v.is_number() => {
            return Some(format!("a {ty} must be a JSON number"));
        }
        ("decimal", _) => return None,
        (_, Value::String(s)) => s,
        _ => return Some(format!("a {ty} must be a JSON string")),
    };
    let ok = match ty {
        "id" => crate::resource::is_valid_id(s),
        "code" => !s.is_empty() && s.trim() == s && !s.contains("  "),
        "uri" | "url" | "canonical" => !s.is_empty() && !s.chars().any(char::is_whitespace),
        "oid" => s.starts_with("urn:oid:"),
        "uuid" => s.starts_with("urn:uuid:"),
        "date" => is_date(s),
        "dateTime" => is_datetime(s),
        "instant" => is_instant(s),
        "time" => is_time(s),
        "base64Binary" => s.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'+' | b'/' | b'=' | b' ' | b'\n' | b'\r')
        }),
        _ => true,
    };
    (!ok).then(|| format!("'{}' is not a valid {ty}", truncate(s)))
}

fn truncate(s: &str) -> String {
    s.chars().take(64).collect()
}

fn digits(s: &str, n: usize) -> bool {
    s.len() == n && s.bytes().all(|b| b.is_ascii_digit())
}

fn is_date(s: &str) -> bool {
    let p: Vec<&str> = s.split('-').collect();
    match p.as_slice() {
        [y] => digits(y, 4),
        [y, m] => digits(y, 4) && month(m),
        [y, m, d] => digits(y, 4) && month(m) && day(d),
        _ => false,
    }
}

fn month(m: &str) -> bool {
    digits(m, 2) && (1..=12).contains(&m.parse::<u32>().unwrap_or(0))
}

fn day(d: &str) -> bool {
    digits(d, 2) && (1..=31).contains(&d.parse::<u32>().unwrap_or(0))
}

fn is_time(s: &str) -> bool {
    let (hms, frac) = s.split_once('.').unwrap_or((s, "0"));
    let p: Vec<&str> = hms.split(':').collect();
    matches!(p.as_slice(), [h, m, sec] if digits(h, 2) && digits(m, 2) && digits(sec, 2)
        && h.parse::<u32>().unwrap_or(99) < 24 && m.parse::<u32>().unwrap_or(99) < 60
        && sec.parse::<u32>().unwrap_or(99) <= 60)
        && !frac.is_empty()
        && frac.bytes().all(|b| b.is_ascii_digit())
}

fn zone(z: &str) -> bool {
    z == "Z"
        || (z.len() == 6
            && z.is_ascii()
            && (z.starts_with('+') || z.starts_with('-'))
            && digits(&z[1..3], 2)
            && &z[3..4] == ":"
            && digits(&z[4..6], 2))
}

fn is_datetime(s: &str) -> bool {
    match s.split_once('T') {
        None => is_date(s),
        Some((d, rest)) => {
            d.len() == 10 && is_date(d) && {
                let cut = rest.find(['Z', '+', '-']).unwrap_or(rest.len());
                let (t, z) = rest.split_at(cut);
                is_time(t) && zone(z)
            }
        }
    }
}

fn is_instant(s: &str) -> bool {
    s.contains('T') && is_datetime(s)
}

/// Why a literal reference is malformed, if it is.
fn reference_format(r: &str) -> Option<String> {
    if r.is_empty() || r.chars().any(char::is_whitespace) {
        return Some(format!("'{}' is not a reference", truncate(r)));
    }
    if r.starts_with('#') || r.contains(':') || r.contains('?') {
        return None;
    }
    let mut parts = r.split('/');
    let (Some(t), Some(id)) = (parts.next(), parts.next()) else {
        return Some(format!("'{}' is not Type/id", truncate(r)));
    };
    if !is_resource_type(t) {
        return Some(format!(
            "'{t}' in reference '{}' is no resource type",
            truncate(r)
        ));
    }
    if !crate::resource::is_valid_id(id) {
        return Some(format!(
            "'{id}' in reference '{}' is no valid id",
            truncate(r)
        ));
    }
    match (parts.next(), parts.next(), parts.next()) {
        (None, _, _) => None,
        (Some("_history"), Some(_), None) => None,
        _ => Some(format!("'{}' is not Type/id[/_history/vid]", truncate(r))),
    }
}

/// The official R4 examples (file names in `hl7.fhir.r4.examples@4.0.1`)
/// that break the R4 rules themselves, and how: validation refuses them.
pub const INVALID_R4_EXAMPLES: &[(&str, &str)] = &[
    (
        "ig-r4.json",
        "a 68-character id in a reference; name and status missing",
    ),
    ("ImplementationGuide-fhir.json", "the same as ig-r4.json"),
    (
        "CodeSystem-v2-0550.json",
        "codes ending in a no-break space",
    ),
    ("Bundle-v2-valuesets.json", "holds CodeSystem-v2-0550"),
    (
        "Questionnaire-qs1.json",
        "items without the required linkId",
    ),
    (
        "SearchParameter-valueset-extensions-ValueSet-author.json",
        "no base",
    ),
    (
        "SearchParameter-valueset-extensions-ValueSet-keyword.json",
        "no base",
    ),
    (
        "SearchParameter-valueset-extensions-ValueSet-workflow.json",
        "no base",
    ),
    (
        "SearchParameter-valueset-extensions-ValueSet-end.json",
        "no base",
    ),
    (
        "SearchParameter-valueset-extensions-ValueSet-effective.json",
        "no base",
    ),
    (
        "SearchParameter-codesystem-extensions-CodeSystem-author.json",
        "no base",
    ),
    (
        "SearchParameter-codesystem-extensions-CodeSystem-effective.json",
        "no base",
    ),
    (
        "SearchParameter-codesystem-extensions-CodeSystem-workflow.json",
        "no base",
    ),
    (
        "SearchParameter-codesystem-extensions-CodeSystem-end.json",
        "no base",
    ),
    (
        "SearchParameter-codesystem-extensions-CodeSystem-keyword.json",
        "no base",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn paths(v: Value) -> Vec<String> {
        validate(&v).into_iter().map(|i| i.expression).collect()
    }

    #[test]
    fn valid_resources_pass() {
        assert!(paths(json!({"resourceType": "Patient", "active": true, "name": [{"family": "X", "given": ["A"]}],
            "birthDate": "1970-03", "_birthDate": {"extension": [{"url": "u", "valueString": "s"}]},
            "deceasedDateTime": "2020-01-01T10:00:00+02:00",
            "contained": [{"resourceType": "Organization", "id": "o", "name": "N"}],
            "managingOrganization": {"reference": "#o"}}))
        .is_empty());
        assert!(paths(json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"},
            "valueQuantity": {"value": 1.5, "unit": "mg"},
            "component": [{"code": {"text": "c"}, "valueString": "v", "referenceRange": [{"text": "t"}]}]}))
        .is_empty());
    }

    /// A zone with a multi-byte character is refused, never sliced inside
    /// the character.
    #[test]
    fn odd_zones_are_refused_not_sliced() {
        for bad in [
            "2020-01-01T10:00:00+00\u{e9}0",
            "2020-01-01T10:00:00+\u{e9}0:0",
            "2020-01-01T10:00:00-0\u{20ac}",
        ] {
            assert_eq!(
                paths(json!({"resourceType": "Patient", "deceasedDateTime": bad})),
                ["Patient.deceasedDateTime"],
                "{bad}"
            );
        }
    }

    #[test]
    fn types_beyond_r4_are_not_checked() {
        assert!(paths(
            json!({"resourceType": "SubscriptionTopic", "url": "u", "status": "active"})
        )
        .is_empty());
    }

    #[test]
    fn each_kind_of_problem_is_found_with_its_path() {
        assert_eq!(
            paths(json!({"resourceType": "Patient", "notAnElement": true})),
            ["Patient.notAnElement"]
        );
        assert_eq!(
            paths(json!({"resourceType": "Patient", "active": "yes"})),
            ["Patient.active"]
        );
        assert_eq!(
            paths(json!({"resourceType": "Patient", "birthDate": "1970-13-01"})),
            ["Patient.birthDate"]
        );
        assert_eq!(
            paths(json!({"resourceType": "Patient", "gender": ["male"]})),
            ["Patient.gender"]
        );
        assert_eq!(
            paths(json!({"resourceType": "Patient", "name": {"family": "X"}})),
            ["Patient.name"]
        );
        assert_eq!(
            paths(json!({"resourceType": "Patient", "name": [{"family": 1}]})),
            ["Patient.name[0].family"]
        );
        assert_eq!(
            paths(json!({"resourceType": "Observation", "code": {"text": "x"}})),
            ["Observation.status"]
        );
        assert_eq!(
            paths(
                json!({"resourceType": "Observation", "status": "final", "code": {"text": "x"}, "valueFoo": 1})
            ),
            ["Observation.valueFoo"]
        );
        assert_eq!(
            paths(json!({"resourceType": "Patient", "contained": [{"resourceType": "Nope"}]})),
            ["Patient.contained[0]"]
        );
        assert_eq!(
            paths(
                json!({"resourceType": "Patient", "managingOrganization": {"reference": "Org anization/1"}})
            ),
            ["Patient.managingOrganization.reference"]
        );
        assert_eq!(
            paths(json!({"resourceType": "Patient", "multipleBirthInteger": 1.5})),
            ["Patient.multipleBirthInteger"]
        );
        let many: Vec<Value> = (0..500).map(|i| json!({"x": i})).collect();
        assert_eq!(
            validate(&json!({"resourceType": "Patient", "name": many})).len(),
            ISSUES_MAX
        );
    }

    /// Every official R4 example passes but the 15 that break the rules
    /// (when the examples are present: `scripts/fetch-fhir-examples.sh`).
    #[test]
    fn every_official_example_passes() {
        let dir =
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/fhir-r4-examples");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            eprintln!("no examples at {}; skipped", dir.display());
            return;
        };
        let mut bad = Vec::new();
        let mut n = 0;
        for f in rd.flatten() {
            let Ok(text) = std::fs::read_to_string(f.path()) else {
                continue;
            };
            let Ok(v) = serde_json::from_str::<Value>(&text) else {
                continue;
            };
            if v.get("resourceType").is_none() {
                continue;
            }
            n += 1;
            let issues = validate(&v);
            let name = f.file_name().to_string_lossy().into_owned();
            let known = INVALID_R4_EXAMPLES.iter().any(|(x, _)| *x == name);
            if issues.is_empty() == known {
                bad.push(format!("{name}: {:?}", &issues[..issues.len().min(3)]));
            }
        }
        assert!(n > 5000 || n == 0, "{n} examples");
        assert!(
            bad.is_empty(),
            "{} of {n} examples are not as expected:\n{}",
            bad.len(),
            bad[..bad.len().min(40)].join("\n")
        );
    }
}
