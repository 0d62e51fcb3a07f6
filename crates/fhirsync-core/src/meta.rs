//! Server-owned parts of a stored resource (`id`, `meta.versionId`,
//! `meta.lastUpdated`) and the content hash that ignores them.
//!
//! A resource is serialized once, outside the writer, into [`Split`]: the
//! client's `meta` members and the client's other members. The writer then
//! only concatenates `{"resourceType","id","meta":{versionId,lastUpdated,..},..}`.

use std::io::Write;

use serde_json::{Map, Value};
use xxhash_rust::xxh3::Xxh3;

/// A resource serialized without the parts the server sets.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Split {
    /// Members of `meta` other than `versionId`/`lastUpdated`, comma-joined,
    /// without braces; empty when there are none.
    pub meta_rest: String,
    /// Top-level members other than `resourceType`, `id` and `meta`.
    pub rest: String,
}

fn push_member(out: &mut Vec<u8>, k: &str, v: &Value) {
    if !out.is_empty() {
        out.push(b',');
    }
    // Writing to a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, k);
    out.push(b':');
    let _ = serde_json::to_writer(&mut *out, v);
}

pub fn split(res: &Map<String, Value>) -> Split {
    let mut meta = Vec::new();
    let mut rest = Vec::with_capacity(1024);
    for (k, v) in res {
        match k.as_str() {
            "resourceType" | "id" => {}
            "meta" => {
                if let Value::Object(m) = v {
                    for (mk, mv) in m {
                        if mk != "versionId" && mk != "lastUpdated" {
                            push_member(&mut meta, mk, mv);
                        }
                    }
                }
            }
            _ => push_member(&mut rest, k, v),
        }
    }
    Split {
        meta_rest: String::from_utf8(meta).unwrap_or_default(),
        rest: String::from_utf8(rest).unwrap_or_default(),
    }
}

/// Hash of the content, ignoring `id`, `meta.versionId` and
/// `meta.lastUpdated`. Equal hashes mean an update would change nothing.
pub fn content_hash(rtype: &str, s: &Split) -> u128 {
    let mut h = Xxh3::new();
    h.update(rtype.as_bytes());
    h.update(&[0]);
    h.update(s.meta_rest.as_bytes());
    h.update(&[0]);
    h.update(s.rest.as_bytes());
    h.digest128()
}

/// The stored JSON: `resourceType`, `id`, then `meta` with the server's
/// fields first, then everything else as the client sent it.
pub fn assemble(rtype: &str, id: &str, version_id: &str, last_updated: &str, s: &Split) -> String {
    let mut out = Vec::with_capacity(s.rest.len() + s.meta_rest.len() + 128);
    let _ = write!(out, "{{\"resourceType\":");
    let _ = serde_json::to_writer(&mut out, rtype);
    out.extend_from_slice(b",\"id\":");
    let _ = serde_json::to_writer(&mut out, id);
    out.extend_from_slice(b",\"meta\":{\"versionId\":");
    let _ = serde_json::to_writer(&mut out, version_id);
    out.extend_from_slice(b",\"lastUpdated\":");
    let _ = serde_json::to_writer(&mut out, last_updated);
    if !s.meta_rest.is_empty() {
        out.push(b',');
        out.extend_from_slice(s.meta_rest.as_bytes());
    }
    out.push(b'}');
    if !s.rest.is_empty() {
        out.push(b',');
        out.extend_from_slice(s.rest.as_bytes());
    }
    out.push(b'}');
    String::from_utf8(out).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(s: &str) -> Map<String, Value> {
        match serde_json::from_str(s).unwrap() {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn assemble_keeps_content_and_decimals() {
        let r = obj(
            r#"{"valueQuantity":{"value":1.50},"resourceType":"Observation","meta":{"source":"x","versionId":"9"}}"#,
        );
        let s = assemble(
            "Observation",
            "o1",
            "2",
            "2024-01-01T00:00:00.000Z",
            &split(&r),
        );
        assert_eq!(
            s,
            r#"{"resourceType":"Observation","id":"o1","meta":{"versionId":"2","lastUpdated":"2024-01-01T00:00:00.000Z","source":"x"},"valueQuantity":{"value":1.50}}"#
        );
        let bare = assemble(
            "Patient",
            "p",
            "1",
            "t",
            &split(&obj(r#"{"resourceType":"Patient"}"#)),
        );
        assert_eq!(
            bare,
            r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"1","lastUpdated":"t"}}"#
        );
        let v: Value = serde_json::from_str(&bare).unwrap();
        assert!(v.is_object());
    }

    #[test]
    fn hash_ignores_server_fields_only() {
        let h = |s: &str| content_hash("Patient", &split(&obj(s)));
        let a = h(r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"1"}}"#);
        let b = h(
            r#"{"resourceType":"Patient","id":"q","meta":{"versionId":"7","lastUpdated":"2020-01-01T00:00:00Z"}}"#,
        );
        let c = h(r#"{"resourceType":"Patient","id":"p","active":true}"#);
        let d = h(r#"{"resourceType":"Patient","id":"p"}"#);
        let e = h(r#"{"resourceType":"Patient","id":"p","meta":{"source":"s"}}"#);
        assert_eq!(a, b);
        assert_eq!(a, d);
        assert_ne!(a, c);
        assert_ne!(a, e);
    }
}
