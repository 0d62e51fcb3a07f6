//! FHIR's rules for JSON that plain JSON allows (R4 "JSON representation"):
//! no member twice in one object, no control characters in strings other
//! than tab, CR and LF, and no empty elements (`""`, `{}`, `[]`). A
//! client's resource that breaks one is refused before anything is stored.

use std::collections::HashSet;
use std::fmt::Write;

use serde_json::Value;

/// The first rule a resource's members break, with the path of the
/// element (`Patient.name[0].family`).
pub fn check_members(m: &serde_json::Map<String, Value>) -> Result<(), String> {
    if m.is_empty() {
        return Err("the resource is an empty object".into());
    }
    let root = m.get("resourceType").and_then(Value::as_str).unwrap_or("$");
    for (k, v) in m {
        walk(v, &mut format!("{root}.{k}"))?;
    }
    Ok(())
}

/// The first rule `v` breaks, with the path of the element.
pub fn check_value(v: &Value) -> Result<(), String> {
    walk(v, &mut String::from("$"))
}

fn walk(v: &Value, path: &mut String) -> Result<(), String> {
    match v {
        Value::String(s) if s.is_empty() => Err(format!(
            "{path} is an empty string (FHIR JSON has no empty elements)"
        )),
        Value::String(s) => match s
            .chars()
            .find(|c| (*c as u32) < 0x20 && !matches!(c, '\t' | '\r' | '\n'))
        {
            Some(c) => Err(format!(
                "{path} holds the control character U+{:04X} (only tab, CR and LF are allowed)",
                c as u32
            )),
            None => Ok(()),
        },
        Value::Array(a) if a.is_empty() => Err(format!(
            "{path} is an empty array (FHIR JSON has no empty elements)"
        )),
        Value::Array(a) => {
            for (i, x) in a.iter().enumerate() {
                let len = path.len();
                let _ = write!(path, "[{i}]");
                walk(x, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        Value::Object(m) if m.is_empty() => Err(format!(
            "{path} is an empty object (FHIR JSON has no empty elements)"
        )),
        Value::Object(m) => {
            for (k, x) in m {
                let len = path.len();
                path.push('.');
                path.push_str(k);
                walk(x, path)?;
                path.truncate(len);
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

/// Objects with at most this many members are checked for duplicates by
/// comparing; larger ones by a hash set.
const SMALL_OBJECT: usize = 16;

/// The first member name given twice in one object of `json` (text that
/// `serde_json` has already read as valid JSON, whose parser keeps only
/// the last of two equal names). Names are compared as their JSON text,
/// unescaped when they hold an escape (`"a"` and `"\u0061"` are equal).
pub fn duplicate_key(json: &[u8]) -> Option<String> {
    enum Frame {
        Object {
            small: Vec<String>,
            big: Option<HashSet<String>>,
            want_key: bool,
        },
        Array,
    }
    let mut stack: Vec<Frame> = Vec::new();
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'{' => stack.push(Frame::Object {
                small: Vec::new(),
                big: None,
                want_key: true,
            }),
            b'[' => stack.push(Frame::Array),
            b'}' | b']' => {
                stack.pop();
            }
            b',' => {
                if let Some(Frame::Object { want_key, .. }) = stack.last_mut() {
                    *want_key = true;
                }
            }
            b'"' => {
                let start = i;
                i += 1;
                while i < json.len() && json[i] != b'"' {
                    i += if json[i] == b'\\' { 2 } else { 1 };
                }
                let raw = json.get(start..=i)?;
                if let Some(Frame::Object {
                    small,
                    big,
                    want_key,
                }) = stack.last_mut()
                {
                    if *want_key {
                        *want_key = false;
                        let name = if raw.contains(&b'\\') {
                            serde_json::from_slice::<String>(raw).ok()?
                        } else {
                            String::from_utf8_lossy(&raw[1..raw.len() - 1]).into_owned()
                        };
                        let seen = match big {
                            Some(set) => !set.insert(name.clone()),
                            None if small.contains(&name) => true,
                            None => {
                                small.push(name.clone());
                                if small.len() > SMALL_OBJECT {
                                    *big = Some(small.drain(..).collect());
                                }
                                false
                            }
                        };
                        if seen {
                            return Some(name);
                        }
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_a_name_given_twice_at_any_depth_and_spelling() {
        assert_eq!(
            duplicate_key(br#"{"a":1,"b":{"c":2},"a":3}"#),
            Some("a".into())
        );
        assert_eq!(duplicate_key(br#"{"a":{"x":1,"x":2}}"#), Some("x".into()));
        assert_eq!(duplicate_key(br#"{"a":1,"\u0061":2}"#), Some("a".into()));
        assert_eq!(duplicate_key(br#"{"a":[{"k":1},{"k":2}],"b":"a"}"#), None);
        assert_eq!(duplicate_key(br#"{"s":"\"a\":1,\"a\"","a":1}"#), None);
        let many: Vec<String> = (0..40).map(|i| format!("\"k{i}\":{i}")).collect();
        let text = format!("{{{},\"k7\":0}}", many.join(","));
        assert_eq!(duplicate_key(text.as_bytes()), Some("k7".into()));
        assert_eq!(
            duplicate_key(format!("{{{}}}", many.join(",")).as_bytes()),
            None
        );
    }

    #[test]
    fn empty_elements_and_control_characters_are_named_with_their_path() {
        let bad = |v: Value| check_value(&v).unwrap_err();
        assert!(bad(json!({"name": [{"family": ""}]}))
            .starts_with("$.name[0].family is an empty string"));
        assert!(bad(json!({"name": []})).contains("empty array"));
        assert!(bad(json!({"meta": {}})).contains("empty object"));
        assert!(bad(json!({"text": "a\u{1}b"})).contains("U+0001"));
        assert!(check_value(&json!({"text": "line 1\r\n\tline 2", "n": 0, "b": false})).is_ok());
    }
}
