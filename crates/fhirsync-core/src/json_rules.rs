//! FHIR's rules for JSON that plain JSON allows (R4 "JSON representation"):
//! no member twice in one object, no control characters in strings other
//! than tab, CR and LF, and no empty elements (`""`, `{}`, `[]`). A
//! client's resource that breaks one is refused before anything is stored.

use std::collections::HashSet;

use serde_json::Value;

/// The first rule a resource's members break, with the path of the
/// element (`Patient.name[0].family`); `json` is the text `m` was read
/// from, whose members are counted to find a name given twice.
pub fn check_resource_json(m: &serde_json::Map<String, Value>, json: &[u8]) -> Result<(), String> {
    if m.is_empty() {
        return Err("the resource is an empty object".into());
    }
    let root = m.get("resourceType").and_then(Value::as_str).unwrap_or("$");
    let members = |text: bool| -> Result<usize, String> {
        let mut n = m.len();
        for (k, v) in m {
            n += walk(v, text).map_err(|f| f.render(&format!("{root}.{k}")))?;
        }
        Ok(n)
    };
    // Strings are read in the text: JSON cannot hold a raw control
    // character, only an escape of one, and the tree is walked for each
    // string's bytes only to name the element that has one.
    let scan = scan(json);
    let n = members(scan.control)?;
    // Each member of each object is followed by exactly one `:` outside
    // strings; the parsed tree has fewer members only when a name was
    // given twice (serde_json keeps the last). The slower scan names it.
    if scan.colons != n {
        let k = duplicate_key(json).unwrap_or_default();
        return Err(format!("the member '{k}' appears twice in one object"));
    }
    Ok(())
}

/// The first rule `v` breaks, with the path of the element.
pub fn check_value(v: &Value) -> Result<(), String> {
    walk(v, true).map(|_| ()).map_err(|f| f.render("$"))
}

/// A broken rule and the path below the element where it was found
/// (innermost first; made only on the way out of an error).
struct Fault {
    rule: String,
    below: Vec<String>,
}

impl Fault {
    fn new(rule: String) -> Fault {
        Fault {
            rule,
            below: Vec::new(),
        }
    }

    fn under(mut self, step: String) -> Fault {
        self.below.push(step);
        self
    }

    fn render(self, root: &str) -> String {
        let mut path = root.to_string();
        for step in self.below.iter().rev() {
            path.push_str(step);
        }
        format!("{path} {}", self.rule)
    }
}

/// Checks `v` (its strings' characters too when `text`) and answers how
/// many object members it holds.
fn walk(v: &Value, text: bool) -> Result<usize, Fault> {
    match v {
        Value::String(s) if s.is_empty() => Err(Fault::new(
            "is an empty string (FHIR JSON has no empty elements)".into(),
        )),
        Value::String(_) if !text => Ok(0),
        Value::String(s) => {
            // A control character is one byte in UTF-8.
            match s
                .bytes()
                .find(|b| *b < 0x20 && !matches!(b, b'\t' | b'\r' | b'\n'))
            {
                Some(b) => Err(Fault::new(format!(
                    "holds the control character U+{b:04X} (only tab, CR and LF are allowed)"
                ))),
                None => Ok(0),
            }
        }
        Value::Array(a) if a.is_empty() => Err(Fault::new(
            "is an empty array (FHIR JSON has no empty elements)".into(),
        )),
        Value::Array(a) => {
            let mut n = 0;
            for (i, x) in a.iter().enumerate() {
                n += walk(x, text).map_err(|f| f.under(format!("[{i}]")))?;
            }
            Ok(n)
        }
        Value::Object(m) if m.is_empty() => Err(Fault::new(
            "is an empty object (FHIR JSON has no empty elements)".into(),
        )),
        Value::Object(m) => {
            let mut n = m.len();
            for (k, x) in m {
                n += walk(x, text).map_err(|f| f.under(format!(".{k}")))?;
            }
            Ok(n)
        }
        _ => Ok(0),
    }
}

/// What one pass over valid JSON text finds.
struct Scan {
    /// `:` outside strings: one per object member.
    colons: usize,
    /// A string holds an escaped control character other than tab, CR
    /// and LF (`\b`, `\f`, `\u0000` to `\u001F`).
    control: bool,
}

fn scan(json: &[u8]) -> Scan {
    let mut out = Scan {
        colons: 0,
        control: false,
    };
    let mut in_string = false;
    let mut skip = None;
    for i in memchr::memchr3_iter(b'"', b'\\', b':', json) {
        if skip == Some(i) {
            continue;
        }
        match (json[i], in_string) {
            (b'\\', true) => {
                skip = Some(i + 1);
                let e = json.get(i + 1..).unwrap_or_default();
                let control = match e.first() {
                    Some(b'b' | b'f') => true,
                    Some(b'u') => e
                        .get(1..5)
                        .and_then(|h| std::str::from_utf8(h).ok())
                        .and_then(|h| u32::from_str_radix(h, 16).ok())
                        .is_some_and(|c| c < 0x20 && !matches!(c, 0x09 | 0x0a | 0x0d)),
                    _ => false,
                };
                out.control |= control;
            }
            (b'"', _) => in_string = !in_string,
            (b':', false) => out.colons += 1,
            _ => {}
        }
    }
    out
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
