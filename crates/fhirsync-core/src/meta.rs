//! Server-owned parts of a stored resource: `id`, `meta.versionId`,
//! `meta.lastUpdated`, and the content hash that ignores them.

use serde_json::{Map, Value};
use xxhash_rust::xxh3::xxh3_128;

/// Hash of the resource content, ignoring `meta.versionId` and
/// `meta.lastUpdated` (the parts the server sets). Equal hashes mean an
/// update would change nothing.
pub fn content_hash(res: &Map<String, Value>) -> u128 {
    let mut copy = res.clone();
    if let Some(Value::Object(meta)) = copy.get_mut("meta") {
        meta.remove("versionId");
        meta.remove("lastUpdated");
        if meta.is_empty() {
            copy.remove("meta");
        }
    }
    let bytes = serde_json::to_vec(&Value::Object(copy)).unwrap_or_default();
    xxh3_128(&bytes)
}

/// Sets `id`, `meta.versionId` and `meta.lastUpdated`, keeping every other
/// element as the client sent it. `id` goes after `resourceType` and `meta`
/// after `id` when they were absent; inside `meta` the two server fields come
/// first.
pub fn stamp(res: &mut Map<String, Value>, id: &str, version_id: &str, last_updated: &str) {
    let old = std::mem::take(res);
    let mut meta = Map::new();
    meta.insert("versionId".into(), Value::String(version_id.into()));
    meta.insert("lastUpdated".into(), Value::String(last_updated.into()));
    let mut rest = Map::new();
    let mut rtype = None;
    for (k, v) in old {
        match k.as_str() {
            "resourceType" => rtype = Some(v),
            "id" => {}
            "meta" => {
                if let Value::Object(m) = v {
                    for (mk, mv) in m {
                        if mk != "versionId" && mk != "lastUpdated" {
                            meta.insert(mk, mv);
                        }
                    }
                }
            }
            _ => {
                rest.insert(k, v);
            }
        }
    }
    if let Some(t) = rtype {
        res.insert("resourceType".into(), t);
    }
    res.insert("id".into(), Value::String(id.into()));
    res.insert("meta".into(), Value::Object(meta));
    for (k, v) in rest {
        res.insert(k, v);
    }
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
    fn stamp_keeps_content_and_decimals() {
        let mut r = obj(
            r#"{"resourceType":"Observation","valueQuantity":{"value":1.50},"meta":{"source":"x","versionId":"9"}}"#,
        );
        stamp(&mut r, "o1", "2", "2024-01-01T00:00:00.000Z");
        let s = serde_json::to_string(&r).unwrap();
        assert_eq!(
            s,
            r#"{"resourceType":"Observation","id":"o1","meta":{"versionId":"2","lastUpdated":"2024-01-01T00:00:00.000Z","source":"x"},"valueQuantity":{"value":1.50}}"#
        );
    }

    #[test]
    fn hash_ignores_server_fields_only() {
        let a = obj(r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"1"}}"#);
        let b = obj(
            r#"{"resourceType":"Patient","id":"p","meta":{"versionId":"7","lastUpdated":"2020-01-01T00:00:00Z"}}"#,
        );
        let c = obj(r#"{"resourceType":"Patient","id":"p","active":true}"#);
        let d = obj(r#"{"resourceType":"Patient","id":"p"}"#);
        assert_eq!(content_hash(&a), content_hash(&b));
        assert_eq!(content_hash(&a), content_hash(&d));
        assert_ne!(content_hash(&a), content_hash(&c));
    }
}
