//! Three-way merge of two concurrent versions of a resource against their
//! common ancestor, element by element: a change made on one side only is
//! kept; the same change on both sides is kept once; two different changes
//! of one element are a clash (a real conflict, for a person or a fallback
//! policy). Repeating elements are matched by the identity FHIR gives their
//! items (`id`, `system`+`code`, `system`+`value`, `url`, `reference`,
//! `linkId`, or a primitive's value) and by position otherwise.
//!
//! The merge is symmetric: `merge3(o, a, b)` and `merge3(o, b, a)` give the
//! same content, keys and items in the same order, so every node that
//! merges the same pair stores the same bytes. (Kept objects list their
//! keys in the ancestor's order, then new keys sorted; kept arrays their
//! items in the ancestor's order, then new items sorted by identity.)

use std::collections::{BTreeMap, HashSet};

use serde_json::{Map, Value};

/// Nesting the merge descends (deeper input is a clash, not a crash).
pub const MERGE_DEPTH_MAX: usize = 64;

/// Why two versions cannot be merged: the first element both changed
/// differently (a JSON-pointer-like path).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clash {
    pub path: String,
    pub why: &'static str,
}

impl std::fmt::Display for Clash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} at {}", self.why, self.path)
    }
}

/// What a merge kept from each side: the top-level elements each changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Merged {
    pub resource: Map<String, Value>,
    pub from_a: Vec<String>,
    pub from_b: Vec<String>,
}

/// The elements every stored version differs in whatever its content.
const VOLATILE_META: [&str; 2] = ["versionId", "lastUpdated"];

fn without_volatile(mut r: Map<String, Value>) -> Map<String, Value> {
    if let Some(Value::Object(m)) = r.get_mut("meta") {
        for k in VOLATILE_META {
            m.remove(k);
        }
        if m.is_empty() {
            r.remove("meta");
        }
    }
    r
}

/// Merges `a` and `b`, both descended from `ancestor` (`meta.versionId`
/// and `meta.lastUpdated` are left out: the store sets them). The sides
/// are taken by value: the result is made of their elements, not copies.
pub fn merge3(
    ancestor: Map<String, Value>,
    a: Map<String, Value>,
    b: Map<String, Value>,
) -> Result<Merged, Clash> {
    let (o, a, b) = (
        without_volatile(ancestor),
        without_volatile(a),
        without_volatile(b),
    );
    let changed = |x: &Map<String, Value>| -> Vec<String> {
        let mut keys: Vec<String> = o
            .keys()
            .chain(x.keys())
            .filter(|k| o.get(*k) != x.get(*k))
            .cloned()
            .collect();
        keys.sort();
        keys.dedup();
        keys
    };
    let (from_a, from_b) = (changed(&a), changed(&b));
    let resource = object(Some(&o), a, b, &mut String::new(), 0)?;
    Ok(Merged {
        resource,
        from_a,
        from_b,
    })
}

fn clash(path: &str, why: &'static str) -> Clash {
    Clash {
        path: if path.is_empty() {
            "/".into()
        } else {
            path.into()
        },
        why,
    }
}

/// One element: `None` is absent (removed, or never there).
fn value(
    o: Option<&Value>,
    a: Option<Value>,
    b: Option<Value>,
    path: &mut String,
    depth: usize,
) -> Result<Option<Value>, Clash> {
    if a == b || b.as_ref() == o {
        return Ok(a);
    }
    if a.as_ref() == o {
        return Ok(b);
    }
    if depth >= MERGE_DEPTH_MAX {
        return Err(clash(path, "nested too deep to merge"));
    }
    match (o, a, b) {
        (None | Some(Value::Object(_)), Some(Value::Object(a)), Some(Value::Object(b))) => {
            let o = o.and_then(Value::as_object);
            Ok(Some(Value::Object(object(o, a, b, path, depth + 1)?)))
        }
        (None | Some(Value::Array(_)), Some(Value::Array(a)), Some(Value::Array(b))) => {
            let o = o.and_then(Value::as_array).map_or(&[][..], Vec::as_slice);
            Ok(Some(Value::Array(array(o, a, b, path, depth + 1)?)))
        }
        (_, Some(_), None) | (_, None, Some(_)) => {
            Err(clash(path, "changed on one side, removed on the other"))
        }
        _ => Err(clash(path, "changed differently on both sides")),
    }
}

fn object(
    o: Option<&Map<String, Value>>,
    mut a: Map<String, Value>,
    mut b: Map<String, Value>,
    path: &mut String,
    depth: usize,
) -> Result<Map<String, Value>, Clash> {
    let empty = Map::new();
    let o = o.unwrap_or(&empty);
    let mut new: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| !o.contains_key(*k))
        .cloned()
        .collect();
    new.sort();
    new.dedup();
    // Two choices of one element (`valueString` here, `valueQuantity`
    // there) cannot both stand.
    fn only<'m>(
        o: &Map<String, Value>,
        x: &'m Map<String, Value>,
        y: &Map<String, Value>,
    ) -> Vec<&'m str> {
        x.keys()
            .filter(|k| !o.contains_key(*k) && !y.contains_key(*k))
            .filter_map(|k| choice_stem(k))
            .collect()
    }
    // The first such element by name, so that either side's key order
    // reports the same one.
    let stems_a = only(o, &a, &b);
    let stems_b = only(o, &b, &a);
    if let Some(stem) = stems_a.iter().filter(|s| stems_b.contains(s)).min() {
        let at = format!("{path}/{stem}[x]");
        return Err(clash(&at, "two choices of one element added"));
    }
    let mut out = Map::new();
    let keys = o
        .keys()
        .map(|k| (k.as_str(), None))
        .chain(new.into_iter().map(|k| ("", Some(k))));
    for (old, new) in keys {
        let k = new.as_deref().unwrap_or(old);
        let len = path.len();
        path.push('/');
        path.push_str(k);
        let v = value(o.get(k), a.remove(k), b.remove(k), path, depth)?;
        path.truncate(len);
        if let Some(v) = v {
            out.insert(new.unwrap_or_else(|| old.to_owned()), v);
        }
    }
    Ok(out)
}

/// `value` of `valueQuantity`: the name of a choice element, when `k`
/// can be one (lower-case stem, then an upper-case type name).
fn choice_stem(k: &str) -> Option<&str> {
    let i = k.find(|c: char| c.is_ascii_uppercase())?;
    (i > 0).then(|| &k[..i])
}

/// The identity of a repeating element's item, where FHIR gives one.
fn identity(v: &Value) -> Option<String> {
    let s = |m: &Map<String, Value>, k: &str| m.get(k).and_then(Value::as_str).map(str::to_owned);
    match v {
        Value::Object(m) => {
            if let Some(id) = s(m, "id") {
                return Some(format!("id {id}"));
            }
            if let (Some(sys), Some(code)) = (s(m, "system"), s(m, "code")) {
                return Some(format!("code {sys}|{code}"));
            }
            if let (Some(sys), Some(val)) = (s(m, "system"), s(m, "value")) {
                return Some(format!("value {sys}|{val}"));
            }
            for k in ["url", "reference", "linkId"] {
                if let Some(x) = s(m, k) {
                    return Some(format!("{k} {x}"));
                }
            }
            None
        }
        Value::Array(_) | Value::Null => None,
        primitive => Some(format!("= {primitive}")),
    }
}

/// Each item's identity, when every item has one and none repeats.
fn keyed(items: &[Value]) -> Option<Vec<String>> {
    let mut seen = HashSet::new();
    items
        .iter()
        .map(|v| identity(v).filter(|k| seen.insert(k.clone())))
        .collect()
}

fn array(
    o: &[Value],
    a: Vec<Value>,
    b: Vec<Value>,
    path: &mut String,
    depth: usize,
) -> Result<Vec<Value>, Clash> {
    if let (Some(ko), Some(ka), Some(kb)) = (keyed(o), keyed(&a), keyed(&b)) {
        let mo: BTreeMap<&String, &Value> = ko.iter().zip(o).collect();
        let mut ma: BTreeMap<String, Value> = ka.into_iter().zip(a).collect();
        let mut mb: BTreeMap<String, Value> = kb.into_iter().zip(b).collect();
        let mut added: Vec<String> = ma
            .keys()
            .chain(mb.keys())
            .filter(|k| !mo.contains_key(k))
            .cloned()
            .collect();
        added.sort();
        added.dedup();
        let mut out = Vec::new();
        for k in ko.iter().chain(&added) {
            let len = path.len();
            path.push_str(&format!("[{k}]"));
            let v = value(mo.get(k).copied(), ma.remove(k), mb.remove(k), path, depth)?;
            path.truncate(len);
            out.extend(v);
        }
        return Ok(out);
    }
    // No identity: by position, when neither side changed the length.
    if a.len() != o.len() || b.len() != o.len() {
        return Err(clash(
            path,
            "a list without item identities changed length on both sides",
        ));
    }
    let mut out = Vec::with_capacity(o.len());
    for (i, (o, (a, b))) in o.iter().zip(a.into_iter().zip(b)).enumerate() {
        let len = path.len();
        path.push_str(&format!("[{i}]"));
        let v = value(Some(o), Some(a), Some(b), path, depth)?;
        path.truncate(len);
        match v {
            Some(v) => out.push(v),
            None => return Err(clash(path, "an item of a list was removed")),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(v: Value) -> Map<String, Value> {
        v.as_object().unwrap().clone()
    }

    /// Merges both ways and checks both give the same bytes.
    fn both(o: Value, a: Value, b: Value) -> Result<Value, Clash> {
        let (o, a, b) = (m(o), m(a), m(b));
        let ab = merge3(o.clone(), a.clone(), b.clone()).map(|x| Value::Object(x.resource));
        let ba = merge3(o, b, a).map(|x| Value::Object(x.resource));
        match (&ab, &ba) {
            (Ok(x), Ok(y)) => assert_eq!(x.to_string(), y.to_string()),
            (Err(x), Err(y)) => assert_eq!(x.path, y.path),
            _ => panic!("one way merged, the other not: {ab:?} / {ba:?}"),
        }
        ab
    }

    fn pat(extra: Value) -> Value {
        let mut p = json!({"resourceType": "Patient", "id": "p1",
            "meta": {"versionId": "3", "lastUpdated": "2026-01-01T00:00:00Z"},
            "name": [{"family": "Otieno", "given": ["Akinyi"]}],
            "telecom": [{"system": "phone", "value": "0700"}],
            "identifier": [{"system": "urn:mrn", "value": "1"}]});
        for (k, v) in extra.as_object().unwrap() {
            p[k] = v.clone();
        }
        p
    }

    #[test]
    fn different_elements_changed_are_both_kept() {
        let o = pat(json!({}));
        let a = pat(json!({"gender": "female", "meta": {"versionId": "4"}}));
        let b = pat(
            json!({"birthDate": "1990-01-01", "name": [{"family": "Otieno", "given": ["Akinyi", "Grace"]}]}),
        );
        let r = both(o.clone(), a, b).unwrap();
        assert_eq!(r["gender"], "female");
        assert_eq!(r["birthDate"], "1990-01-01");
        assert_eq!(r["name"][0]["given"], json!(["Akinyi", "Grace"]));
        assert!(r.get("meta").is_none(), "the store sets meta");
        let x = merge3(
            m(o.clone()),
            m(pat(json!({"gender": "female"}))),
            m(pat(json!({"birthDate": "1990-01-01"}))),
        )
        .unwrap();
        assert_eq!(
            (x.from_a, x.from_b),
            (vec!["gender".to_owned()], vec!["birthDate".to_owned()])
        );
    }

    #[test]
    fn lists_are_merged_by_identity() {
        let o = pat(json!({}));
        let a = pat(
            json!({"telecom": [{"system": "phone", "value": "0700"}, {"system": "email", "value": "a@x"}]}),
        );
        let b = pat(
            json!({"telecom": [{"system": "phone", "value": "0700", "use": "mobile"}, {"system": "email", "value": "b@x"}],
                           "identifier": []}),
        );
        let r = both(o, a, b).unwrap();
        assert_eq!(
            r["telecom"],
            json!([{"system": "phone", "value": "0700", "use": "mobile"},
                   {"system": "email", "value": "a@x"}, {"system": "email", "value": "b@x"}])
        );
        assert_eq!(r["identifier"], json!([]));
        // Codings by system and code; given names as values.
        let o = json!({"resourceType": "Observation", "code": {"coding": [{"system": "l", "code": "1"}]}, "x": ["a", "b"]});
        let a = json!({"resourceType": "Observation", "code": {"coding": [{"system": "l", "code": "1"}, {"system": "s", "code": "9"}]}, "x": ["b"]});
        let b = json!({"resourceType": "Observation", "code": {"coding": [{"system": "l", "code": "1", "display": "d"}]}, "x": ["a", "b", "c"]});
        let r = both(o, a, b).unwrap();
        assert_eq!(
            r["code"]["coding"],
            json!([{"system": "l", "code": "1", "display": "d"}, {"system": "s", "code": "9"}])
        );
        assert_eq!(r["x"], json!(["b", "c"]));
    }

    #[test]
    fn the_same_element_changed_differently_is_a_clash() {
        let o = pat(json!({"gender": "male"}));
        let e = both(
            o.clone(),
            pat(json!({"gender": "female"})),
            pat(json!({"gender": "other"})),
        )
        .unwrap_err();
        assert_eq!(e.path, "/gender");
        // Edited on one side, removed on the other.
        let mut gone = pat(json!({}));
        gone.as_object_mut().unwrap().remove("gender");
        let e = both(o.clone(), pat(json!({"gender": "female"})), gone).unwrap_err();
        assert_eq!(e.why, "changed on one side, removed on the other");
        // The same change on both sides is no clash.
        let r = both(
            o,
            pat(json!({"gender": "female"})),
            pat(json!({"gender": "female"})),
        )
        .unwrap();
        assert_eq!(r["gender"], "female");
        // Lists without identities: by position while the length holds.
        let o = json!({"resourceType": "Basic", "l": [{"a": 1}, {"a": 2}]});
        let r = both(
            o.clone(),
            json!({"resourceType": "Basic", "l": [{"a": 9}, {"a": 2}]}),
            json!({"resourceType": "Basic", "l": [{"a": 1}, {"a": 2, "b": 3}]}),
        )
        .unwrap();
        assert_eq!(r["l"], json!([{"a": 9}, {"a": 2, "b": 3}]));
        let e = both(
            o,
            json!({"resourceType": "Basic", "l": [{"a": 1}]}),
            json!({"resourceType": "Basic", "l": [{"a": 1}, {"a": 2}, {"a": 3}]}),
        )
        .unwrap_err();
        assert_eq!(e.path, "/l");
        // Two choices of one element.
        let o = json!({"resourceType": "Observation", "status": "final"});
        let e = both(
            o,
            json!({"resourceType": "Observation", "status": "final", "valueString": "x"}),
            json!({"resourceType": "Observation", "status": "final", "valueInteger": 1}),
        )
        .unwrap_err();
        assert_eq!(e.path, "/value[x]");
    }

    #[test]
    fn depth_is_bounded() {
        let mut deep = json!(1);
        let mut deep2 = json!(2);
        for _ in 0..(MERGE_DEPTH_MAX + 5) {
            deep = json!({"n": deep, "z": 1});
            deep2 = json!({"n": deep2, "y": 1});
        }
        let e = both(
            json!({"resourceType": "Basic"}),
            json!({"resourceType": "Basic", "d": deep}),
            json!({"resourceType": "Basic", "d": deep2}),
        )
        .unwrap_err();
        assert_eq!(e.why, "nested too deep to merge");
    }
}
