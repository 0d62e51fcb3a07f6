//! Content hashes for COMPARE that ignore what servers change on their own:
//! `id`, `meta.versionId`, `meta.lastUpdated`, `meta.source`, the order of
//! object members, and how a number is written (`1.50` = `1.5`).

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use xxhash_rust::xxh3::xxh3_128;

/// One resource's canonical hash, with the `resourceType` and `id` read on
/// the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    pub hash: u128,
    pub rtype: Option<String>,
    pub id: Option<String>,
}

/// The canonical hash of a resource's JSON text, read straight from the
/// text (no `Value` is built): the resource is written again as one
/// canonical byte string, every object's members in key order, which is
/// hashed once.
///
/// The string is decodable from its start (so two different resources
/// cannot write the same one): `n`, `t`, `f`; a number as `#`, its
/// length and its text; a string as `"`, its length and its bytes; an
/// array as `[`, its items and `]`; an object as `{`, its member count,
/// then each member as `k`, its name's length and bytes, and its value.
/// Lengths and counts are 4 bytes, little-endian.
pub fn hash_text(text: &[u8]) -> Result<Hashed, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let mut w = Written {
        out: Vec::with_capacity(text.len()),
        members: Vec::new(),
        spare: Vec::new(),
    };
    let mut top = Top::default();
    Node {
        w: &mut w,
        at: At::Top(&mut top),
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(Hashed {
        hash: xxh3_128(&w.out),
        rtype: top.rtype,
        id: top.id,
    })
}

/// What the top level of a resource gives besides its hash.
#[derive(Default)]
struct Top {
    rtype: Option<String>,
    id: Option<String>,
}

/// Where a value sits: the resource itself, its `meta` (which says
/// whether anything but what a server sets is in it), or anywhere else.
enum At<'t> {
    Top(&'t mut Top),
    Meta(&'t mut bool),
    Inner,
}

/// The canonical string being written, with room reused for every
/// object: the members of the objects being read (each object's own at
/// the end: its name and where it is on `out`), and a copy of an
/// object's members while they are put in key order.
struct Written<'de> {
    out: Vec<u8>,
    members: Vec<(Cow<'de, str>, std::ops::Range<usize>)>,
    spare: Vec<u8>,
}

/// One JSON value, written canonically.
struct Node<'w, 't, 'de> {
    w: &'w mut Written<'de>,
    at: At<'t>,
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_, 'de> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// The serde_json name under which a number comes as its text
/// (`arbitrary_precision`).
const NUMBER_TOKEN: &str = "$serde_json::private::Number";

/// A member name, borrowed from the text when it has no escapes.
struct Key<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for Key<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Key<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a member name")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s.to_owned())))
            }
            fn visit_string<E>(self, s: String) -> Result<Key<'de>, E> {
                Ok(Key(Cow::Owned(s)))
            }
        }
        d.deserialize_str(V)
    }
}

/// `tag`, then `bytes` with their length before them.
fn put(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    out.push(tag);
    put_len(out, bytes.len());
    out.extend_from_slice(bytes);
}

/// A length or count, as 4 bytes (a resource's text is far shorter than
/// 4 GB; a longer one wraps, and the hash is still the same for the same
/// content).
fn put_len(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&(n as u32).to_le_bytes());
}

impl Node<'_, '_, '_> {
    /// A resource is an object: anything else at the top is refused.
    fn inner<E: serde::de::Error>(&self) -> Result<(), E> {
        match self.at {
            At::Top(_) => Err(E::custom("a resource is a JSON object")),
            _ => Ok(()),
        }
    }
    fn number(self, text: &str) {
        if is_normal_number(text) {
            put(&mut self.w.out, b'#', text.as_bytes());
        } else {
            put(&mut self.w.out, b'#', normalize_number(text).as_bytes());
        }
    }
}

/// A top-level member the hash reads as a value (`resourceType`), written
/// as [`hash_text`] writes a string.
fn put_value(out: &mut Vec<u8>, v: &Value) {
    match v {
        Value::String(s) => put(out, b'"', s.as_bytes()),
        other => put(out, b'v', other.to_string().as_bytes()),
    }
}

impl<'de> Visitor<'de> for Node<'_, '_, 'de> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self.at {
            At::Top(_) => "a resource (a JSON object)",
            _ => "a JSON value",
        })
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.inner()?;
        self.w.out.push(b'n');
        Ok(())
    }
    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<(), E> {
        self.inner()?;
        self.w.out.push(if b { b't' } else { b'f' });
        Ok(())
    }
    // Without `arbitrary_precision` numbers come as these three.
    fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<(), E> {
        self.inner()?;
        self.number(&n.to_string());
        Ok(())
    }
    fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<(), E> {
        self.inner()?;
        self.number(&n.to_string());
        Ok(())
    }
    fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<(), E> {
        self.inner()?;
        self.number(&n.to_string());
        Ok(())
    }
    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<(), E> {
        self.inner()?;
        put(&mut self.w.out, b'"', s.as_bytes());
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.inner()?;
        self.w.out.push(b'[');
        while seq
            .next_element_seed(Node {
                w: &mut *self.w,
                at: At::Inner,
            })?
            .is_some()
        {}
        self.w.out.push(b']');
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let Node { w, mut at } = self;
        // This object's members are `w.members[first..]`.
        let first = w.members.len();
        let header = w.out.len();
        w.out.push(b'{');
        put_len(&mut w.out, 0); // the count, set below
        let body = w.out.len();
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            if k == NUMBER_TOKEN && w.members.len() == first {
                // A number, as it was written (`arbitrary_precision`).
                let text = map.next_value::<Key<'de>>()?.0;
                if let At::Top(_) = at {
                    return Err(serde::de::Error::custom("a resource is a JSON object"));
                }
                w.out.truncate(header);
                Node { w, at: At::Inner }.number(&text);
                return Ok(());
            }
            let start = w.out.len();
            match &mut at {
                At::Top(top) if k == "id" => {
                    // Not hashed: servers assign ids; kept as the key.
                    let v: Value = map.next_value()?;
                    top.id = v.as_str().map(str::to_owned);
                    continue;
                }
                At::Top(top) if k == "resourceType" => {
                    let v: Value = map.next_value()?;
                    top.rtype = v.as_str().map(str::to_owned);
                    put(&mut w.out, b'k', k.as_bytes());
                    put_value(&mut w.out, &v);
                    w.members.push((k, start..w.out.len()));
                    continue;
                }
                At::Meta(_) if SERVER_META.contains(&k.as_ref()) => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    continue;
                }
                _ => {}
            }
            put(&mut w.out, b'k', k.as_bytes());
            let mut any = true;
            let sub_at = match &at {
                At::Top(_) if k == "meta" => At::Meta(&mut any),
                _ => At::Inner,
            };
            map.next_value_seed(Node {
                w: &mut *w,
                at: sub_at,
            })?;
            if any {
                w.members.push((k, start..w.out.len()));
            } else {
                w.out.truncate(start);
            }
        }
        let members = &mut w.members[first..];
        if let At::Meta(any) = at {
            // `meta` that holds only what a server sets counts as absent.
            *any = !members.is_empty();
        }
        let count = (members.len() as u32).to_le_bytes();
        w.out[header + 1..body].copy_from_slice(&count);
        if !members.windows(2).all(|m| m[0].0 <= m[1].0) {
            // Members in key order (the text's order among equal names).
            w.spare.clear();
            w.spare.extend_from_slice(&w.out[body..]);
            members.sort_by(|a, b| a.0.cmp(&b.0));
            w.out.truncate(body);
            for (_, at) in members.iter() {
                w.out
                    .extend_from_slice(&w.spare[at.start - body..at.end - body]);
            }
        }
        w.members.truncate(first);
        Ok(())
    }
}

/// The members of `meta` a server sets on its own.
const SERVER_META: [&str; 3] = ["versionId", "lastUpdated", "source"];

/// Whether `s` is already as [`normalize_number`] writes it: an integer
/// other than `-0` (the usual case, checked without allocating).
fn is_normal_number(s: &str) -> bool {
    !s.is_empty() && s != "-0" && s.bytes().all(|b| b.is_ascii_digit() || b == b'-')
}

/// One text per numeric value: no trailing fractional zeros, no `+` or
/// leading zeros in the exponent, lower-case `e`.
pub fn normalize_number(s: &str) -> String {
    let s = s.trim();
    let (mant, exp) = match s.find(['e', 'E']) {
        Some(i) => (&s[..i], Some(&s[i + 1..])),
        None => (s, None),
    };
    let mut m = mant.to_owned();
    if m.contains('.') {
        while m.ends_with('0') {
            m.pop();
        }
        if m.ends_with('.') {
            m.pop();
        }
    }
    if m == "-0" {
        m = "0".into();
    }
    match exp {
        Some(e) => {
            let neg = e.starts_with('-');
            let digits = e.trim_start_matches(['+', '-']).trim_start_matches('0');
            if digits.is_empty() {
                m
            } else {
                format!("{m}e{}{digits}", if neg { "-" } else { "" })
            }
        }
        None => m,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(s: &str) -> u128 {
        // The text as given and as a parsed value writes it hash the same.
        let from_text = hash_text(s.as_bytes()).unwrap().hash;
        let v: Value = serde_json::from_str(s).unwrap();
        let rewritten = hash_text(&serde_json::to_vec(&v).unwrap()).unwrap().hash;
        assert_eq!(from_text, rewritten);
        from_text
    }

    #[test]
    fn text_gives_type_and_id_and_refuses_what_is_not_a_resource() {
        let x = hash_text(br#"{"resourceType":"Patient","id":"p-1","active":true}"#).unwrap();
        assert_eq!(x.rtype.as_deref(), Some("Patient"));
        assert_eq!(x.id.as_deref(), Some("p-1"));
        for bad in [
            &b"[1]"[..],
            b"1",
            b"\"x\"",
            b"null",
            b"{\"a\":1",
            b"{} {}",
            b"{\"a\":[1,]}",
        ] {
            assert!(hash_text(bad).is_err(), "{}", String::from_utf8_lossy(bad));
        }
        // The parser's depth limit holds.
        let deep = format!("{{\"a\":{}1{}}}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(hash_text(deep.as_bytes()).is_err());
    }

    #[test]
    fn nested_order_escapes_and_bare_meta_do_not_count() {
        assert_eq!(
            h(r#"{"resourceType":"Patient","name":[{"family":"A","given":["B"]}]}"#),
            h(r#"{"name":[{"given":["B"],"family":"\u0041"}],"resourceType":"Patient"}"#)
        );
        assert_eq!(
            h(r#"{"resourceType":"Patient","meta":{"versionId":"1"}}"#),
            h(r#"{"resourceType":"Patient"}"#)
        );
        assert_ne!(
            h(r#"{"resourceType":"Patient","meta":{}}"#),
            h(r#"{"resourceType":"Patient","meta":"x"}"#)
        );
        // A member's value does not run into the next member's name.
        assert_ne!(h(r#"{"a":"bc","d":1}"#), h(r#"{"a":"b","cd":1}"#));
        assert_ne!(h(r#"{"a":{"b":1}}"#), h(r#"{"a":{"b":2}}"#));
        assert_ne!(h(r#"{"a":[[1],[2]]}"#), h(r#"{"a":[[1,2]]}"#));
        // An object's members stay its own, whatever is written after it.
        assert_ne!(h(r#"{"a":{"b":1},"c":2}"#), h(r#"{"a":{"b":1,"c":2}}"#));
        assert_ne!(h(r#"{"a":[{"b":1}],"c":2}"#), h(r#"{"a":[{"b":1,"c":2}]}"#));
        assert_ne!(h(r#"{"a":{}}"#), h(r#"{"a":[]}"#));
        assert_ne!(h(r#"{"a":"1"}"#), h(r#"{"a":1}"#));
        assert_ne!(h(r#"{"a":12,"b":3}"#), h(r#"{"a":1,"b":23}"#));
        // Key order counts at every depth, in arrays too; a nested `meta`
        // is data like any other.
        assert_eq!(
            h(r#"{"x":[{"b":{"d":1,"c":[{"f":2,"e":3}]},"a":0}]}"#),
            h(r#"{"x":[{"a":0,"b":{"c":[{"e":3,"f":2}],"d":1}}]}"#)
        );
        assert_ne!(
            h(r#"{"x":{"meta":{"versionId":"1"}}}"#),
            h(r#"{"x":{"meta":{}}}"#)
        );
    }

    #[test]
    fn numbers() {
        for (a, b) in [
            ("1.50", "1.5"),
            ("2.0", "2"),
            ("1e+02", "1e2"),
            ("1E2", "1e2"),
            ("-0.0", "0"),
            ("100", "100"),
            ("-0", "0"),
            ("-12", "-12"),
        ] {
            assert_eq!(normalize_number(a), b, "{a}");
            let n: serde_json::Number = serde_json::from_str(a).unwrap();
            assert_eq!(
                h(&format!("{{\"x\":{n}}}")),
                h(&format!("{{\"x\":{b}}}")),
                "{a}"
            );
        }
    }

    #[test]
    fn ignores_server_fields_and_order() {
        let a = h(
            r#"{"resourceType":"Patient","id":"1","meta":{"versionId":"3","lastUpdated":"x","source":"s"},"active":true,"x":1.50}"#,
        );
        let b = h(r#"{"x":1.5,"active":true,"resourceType":"Patient","id":"2"}"#);
        assert_eq!(a, b);
        let c = h(r#"{"resourceType":"Patient","active":false,"x":1.5}"#);
        assert_ne!(a, c);
        let d = h(r#"{"resourceType":"Patient","active":true,"x":1.5,"meta":{"profile":["p"]}}"#);
        assert_ne!(a, d);
        // Array order matters; string vs number matters.
        assert_ne!(h(r#"{"a":[1,2]}"#), h(r#"{"a":[2,1]}"#));
        assert_ne!(h(r#"{"a":"1"}"#), h(r#"{"a":1}"#));
    }
}
