//! Content hashes for COMPARE that ignore what servers change on their own:
//! `id`, `meta.versionId`, `meta.lastUpdated`, `meta.source`, the order of
//! object members, and how a number is written (`1.50` = `1.5`).

use std::borrow::Cow;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use xxhash_rust::xxh3::Xxh3;

/// One resource's canonical hash, with the `resourceType` and `id` read on
/// the way.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashed {
    pub hash: u128,
    pub rtype: Option<String>,
    pub id: Option<String>,
}

/// The canonical hash of a resource's JSON text, read straight from the
/// text (no `Value` is built): every object's members are hashed on their
/// own and taken in key order, so member order does not count.
pub fn hash_text(text: &[u8]) -> Result<Hashed, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(text);
    let mut h = Xxh3::new();
    let mut top = Top::default();
    Node {
        h: &mut h,
        at: At::Top(&mut top),
    }
    .deserialize(&mut de)?;
    de.end()?;
    Ok(Hashed {
        hash: h.digest128(),
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

/// Where a value sits: the resource itself, its `meta`, or anywhere else.
enum At<'t> {
    Top(&'t mut Top),
    Meta(&'t mut bool),
    Inner,
}

/// One JSON value, hashed into `h`.
struct Node<'h, 't> {
    h: &'h mut Xxh3,
    at: At<'t>,
}

impl<'de> DeserializeSeed<'de> for Node<'_, '_> {
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

impl Node<'_, '_> {
    /// A resource is an object: anything else at the top is refused.
    fn inner<E: serde::de::Error>(&self) -> Result<(), E> {
        match self.at {
            At::Top(_) => Err(E::custom("a resource is a JSON object")),
            _ => Ok(()),
        }
    }
    fn number(self, text: &str) {
        self.h.update(b"#");
        if is_normal_number(text) {
            self.h.update(text.as_bytes());
        } else {
            self.h.update(normalize_number(text).as_bytes());
        }
    }
}

/// A top-level member the hash reads as a value (`resourceType`), hashed
/// as [`hash_text`] hashes a member's value.
fn member_hash(v: &Value) -> u128 {
    let mut h = Xxh3::new();
    match v {
        Value::String(s) => {
            h.update(b"\"");
            h.update(&(s.len() as u64).to_le_bytes());
            h.update(s.as_bytes());
        }
        other => {
            h.update(b"v");
            h.update(other.to_string().as_bytes());
        }
    }
    h.digest128()
}

impl<'de> Visitor<'de> for Node<'_, '_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self.at {
            At::Top(_) => "a resource (a JSON object)",
            _ => "a JSON value",
        })
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<(), E> {
        self.inner()?;
        self.h.update(b"n");
        Ok(())
    }
    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<(), E> {
        self.inner()?;
        self.h.update(if b { b"t" } else { b"f" });
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
        self.h.update(b"\"");
        self.h.update(&(s.len() as u64).to_le_bytes());
        self.h.update(s.as_bytes());
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.inner()?;
        self.h.update(b"[");
        while seq
            .next_element_seed(Node {
                h: &mut *self.h,
                at: At::Inner,
            })?
            .is_some()
        {}
        self.h.update(b"]");
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let mut members: Vec<(Cow<'de, str>, u128)> = Vec::new();
        let Node { h, mut at } = self;
        while let Some(Key(k)) = map.next_key::<Key<'de>>()? {
            if k == NUMBER_TOKEN && members.is_empty() {
                // A number, as it was written (`arbitrary_precision`).
                let text = map.next_value::<Key<'de>>()?.0;
                if let At::Top(_) = at {
                    return Err(serde::de::Error::custom("a resource is a JSON object"));
                }
                Node { h, at: At::Inner }.number(&text);
                return Ok(());
            }
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
                    members.push((k, member_hash(&v)));
                    continue;
                }
                At::Meta(_) if SERVER_META.contains(&k.as_ref()) => {
                    map.next_value::<serde::de::IgnoredAny>()?;
                    continue;
                }
                _ => {}
            }
            let mut sub = Xxh3::new();
            let mut any = true;
            let sub_at = match &at {
                At::Top(_) if k == "meta" => At::Meta(&mut any),
                _ => At::Inner,
            };
            map.next_value_seed(Node {
                h: &mut sub,
                at: sub_at,
            })?;
            if any {
                members.push((k, sub.digest128()));
            }
        }
        if let At::Meta(any) = at {
            // `meta` that holds only what a server sets counts as absent.
            *any = !members.is_empty();
        }
        members.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        h.update(b"{");
        for (k, sub) in members {
            h.update(&(k.len() as u64).to_le_bytes());
            h.update(k.as_bytes());
            h.update(&sub.to_le_bytes());
        }
        h.update(b"}");
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
