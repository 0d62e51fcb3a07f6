//! Tables generated from the FHIR R4 definitions (`scripts/gen-spec-tables.py`):
//! search parameters, compartments and summary elements, with lookups.

mod compartments;
mod elements;
mod search_params;
mod summary;

pub use compartments::COMPARTMENTS;
pub use elements::ELEMENTS;
pub use search_params::PARAMS;
pub use summary::SUMMARY;

/// The type of a search parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Token,
    Reference,
    String,
    Date,
    Composite,
    Uri,
    Quantity,
    Number,
    Special,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Token => "token",
            Kind::Reference => "reference",
            Kind::String => "string",
            Kind::Date => "date",
            Kind::Composite => "composite",
            Kind::Uri => "uri",
            Kind::Quantity => "quantity",
            Kind::Number => "number",
            Kind::Special => "special",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "token" => Kind::Token,
            "reference" => Kind::Reference,
            "string" => Kind::String,
            "date" => Kind::Date,
            "composite" => Kind::Composite,
            "uri" => Kind::Uri,
            "quantity" => Kind::Quantity,
            "number" => Kind::Number,
            "special" => Kind::Special,
            _ => return None,
        })
    }
}

/// One SearchParameter of the spec on one base type.
#[derive(Debug)]
pub struct ParamDef {
    pub base: &'static str,
    pub code: &'static str,
    pub kind: Kind,
    /// This base's part of the FHIRPath expression.
    pub expr: Option<&'static str>,
    pub targets: &'static [&'static str],
    /// Composite parts: the component's code, type and expression relative
    /// to each element the parameter's expression selects.
    pub components: &'static [(&'static str, Kind, &'static str)],
}

/// One element of a resource or data type's definition.
#[derive(Debug)]
pub struct Element {
    /// `Observation.component.code`, `Quantity.value`, `Observation.value[x]`.
    pub path: &'static str,
    pub min: u32,
    /// `u32::MAX` for `*`.
    pub max: u32,
    /// Type codes (`Quantity`, `string`, `BackboneElement`, `Resource`);
    /// empty with a content reference.
    pub types: &'static [&'static str],
    /// The element whose definition this one reuses (`Observation.referenceRange`).
    pub content_ref: &'static str,
}

/// The element at `path`.
pub fn element(path: &str) -> Option<&'static Element> {
    ELEMENTS
        .binary_search_by(|e| e.path.cmp(path))
        .ok()
        .map(|i| &ELEMENTS[i])
}

/// The element `name` of the type or element `def` (`def.name`), found
/// without building the path.
pub fn child(def: &str, name: &str) -> Option<&'static Element> {
    let key = [def.as_bytes(), b".", name.as_bytes()];
    ELEMENTS
        .binary_search_by(|e| {
            let mut p = e.path.as_bytes();
            for part in key {
                let n = part.len().min(p.len());
                match p[..n].cmp(&part[..n]) {
                    std::cmp::Ordering::Equal if n == part.len() => p = &p[n..],
                    std::cmp::Ordering::Equal => return std::cmp::Ordering::Less,
                    other => return other,
                }
            }
            if p.is_empty() {
                std::cmp::Ordering::Equal
            } else {
                std::cmp::Ordering::Greater
            }
        })
        .ok()
        .map(|i| &ELEMENTS[i])
}

/// The direct children of `def` with `min` ≥ 1, found once per `def`.
pub fn required_children(def: &str) -> &'static [&'static Element] {
    static R: std::sync::OnceLock<std::collections::HashMap<&'static str, Vec<&'static Element>>> =
        std::sync::OnceLock::new();
    let map = R.get_or_init(|| {
        let mut m: std::collections::HashMap<&'static str, Vec<&'static Element>> =
            std::collections::HashMap::new();
        for e in ELEMENTS.iter().filter(|e| e.min > 0) {
            if let Some((parent, _)) = e.path.rsplit_once('.') {
                m.entry(parent).or_default().push(e);
            }
        }
        m
    });
    map.get(def).map(Vec::as_slice).unwrap_or(&[])
}

/// The direct children of the element or type at `path`.
pub fn children(path: &str) -> impl Iterator<Item = &'static Element> + '_ {
    let start = ELEMENTS.partition_point(|e| e.path <= path);
    ELEMENTS[start..]
        .iter()
        .take_while(move |e| {
            e.path.len() > path.len()
                && e.path.starts_with(path)
                && e.path.as_bytes()[path.len()] == b'.'
        })
        .filter(move |e| !e.path[path.len() + 1..].contains('.'))
}

/// The bases whose parameters apply to every resource type.
pub const COMMON_BASES: &[&str] = &["Resource", "DomainResource"];

/// The spec's parameters of `rtype`, its own and the common ones.
pub fn params_of(rtype: &str) -> impl Iterator<Item = &'static ParamDef> + '_ {
    of_base(rtype).chain(COMMON_BASES.iter().flat_map(|b| of_base(b)))
}

fn of_base(base: &str) -> impl Iterator<Item = &'static ParamDef> + '_ {
    let start = PARAMS.partition_point(|p| p.base < base);
    PARAMS[start..].iter().take_while(move |p| p.base == base)
}

/// The compartments' link parameters of a member type (`Patient`,
/// `Observation` → `subject`, `performer`).
pub fn compartment_params(compartment: &str, rtype: &str) -> Option<&'static [&'static str]> {
    COMPARTMENTS
        .iter()
        .find(|(c, t, _)| *c == compartment && *t == rtype)
        .map(|(_, _, p)| *p)
}

/// The member types of a compartment.
pub fn compartment_members(compartment: &str) -> impl Iterator<Item = &'static str> + '_ {
    COMPARTMENTS
        .iter()
        .filter(move |(c, _, _)| *c == compartment)
        .map(|(_, t, _)| *t)
}

/// The top-level elements `_summary=true` keeps for `rtype`.
pub fn summary_elements(rtype: &str) -> &'static [&'static str] {
    SUMMARY
        .iter()
        .find(|(t, _)| *t == rtype)
        .map(|(_, e)| *e)
        .unwrap_or(&[])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_are_sorted_and_complete() {
        assert!(PARAMS
            .windows(2)
            .all(|w| (w[0].base, w[0].code) <= (w[1].base, w[1].code)));
        let obs: Vec<_> = params_of("Observation").map(|p| p.code).collect();
        for c in [
            "code",
            "subject",
            "patient",
            "value-quantity",
            "_id",
            "_tag",
        ] {
            assert!(obs.contains(&c), "{c}");
        }
        let p = params_of("Observation")
            .find(|p| p.code == "patient")
            .unwrap();
        assert_eq!(
            p.expr,
            Some("Observation.subject.where(resolve() is Patient)")
        );
        assert_eq!(
            compartment_params("Patient", "Observation").unwrap(),
            ["subject", "performer"]
        );
        assert!(compartment_members("Patient").any(|t| t == "Encounter"));
        assert!(summary_elements("Patient").contains(&"name"));
    }

    /// `child` finds what `element` finds on the joined path, and nothing
    /// for names that only share a prefix with an element's.
    #[test]
    fn child_is_element_of_the_joined_path() {
        for e in ELEMENTS {
            let Some((def, name)) = e.path.rsplit_once('.') else {
                continue;
            };
            assert!(std::ptr::eq(child(def, name).unwrap(), e), "{}", e.path);
        }
        for (def, name) in [
            ("Observation", "cod"),
            ("Observation", "codes"),
            ("Observatio", "n.code"),
            ("Observation.code", ""),
            ("", "Observation"),
        ] {
            assert_eq!(
                child(def, name).map(|e| e.path),
                element(&format!("{def}.{name}")).map(|e| e.path),
                "{def} {name}"
            );
        }
        let req: Vec<_> = required_children("Observation")
            .iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(req, ["Observation.code", "Observation.status"]);
    }
}
