//! Topics as the R4 Subscriptions Backport IG writes them in R4: a `Basic`
//! resource carrying the R5 `SubscriptionTopic` elements as
//! `extension-SubscriptionTopic.*` extensions, read into the
//! `SubscriptionTopic` shape that [`super::Topic::parse`] takes.

use serde_json::{Map, Value};

/// The prefix of the cross-version extensions of `SubscriptionTopic`.
pub const TOPIC_EXT: &str =
    "http://hl7.org/fhir/5.0/StructureDefinition/extension-SubscriptionTopic";

/// Deepest nesting of extensions read (a trigger's `queryCriteria` is 2).
pub const DEPTH_MAX: usize = 4;

/// Elements of `SubscriptionTopic` (and its backbone elements) that repeat.
const REPEATING: &[&str] = &[
    "resourceTrigger",
    "supportedInteraction",
    "canFilterBy",
    "eventTrigger",
    "notificationShape",
    "include",
    "revInclude",
    "comparator",
    "modifier",
    "derivedFrom",
    "identifier",
    "contact",
    "useContext",
    "jurisdiction",
];

/// Whether a `Basic` resource is a topic: it carries at least one
/// `extension-SubscriptionTopic.*` extension.
pub fn is_topic(res: &Value) -> bool {
    res["resourceType"] == "Basic"
        && res["extension"].as_array().is_some_and(|a| {
            a.iter().any(|e| {
                e["url"].as_str().is_some_and(|u| {
                    u.starts_with(TOPIC_EXT) && u[TOPIC_EXT.len()..].starts_with('.')
                })
            })
        })
}

/// The value of an extension: its `value[x]`, or an object of its own
/// extensions (by their `url`) when it has none.
fn value_of(ext: &Map<String, Value>, depth: usize) -> Option<Value> {
    if let Some((_, v)) = ext.iter().find(|(k, _)| k.starts_with("value")) {
        return Some(v.clone());
    }
    if depth >= DEPTH_MAX {
        return None;
    }
    let inner = ext.get("extension")?.as_array()?;
    Some(Value::Object(fields(
        inner.iter().filter_map(|e| {
            let o = e.as_object()?;
            Some((o.get("url")?.as_str()?.to_owned(), o))
        }),
        depth + 1,
    )))
}

/// Builds an object from (element name, extension) pairs.
fn fields<'a>(
    exts: impl Iterator<Item = (String, &'a Map<String, Value>)>,
    depth: usize,
) -> Map<String, Value> {
    let mut out = Map::new();
    for (name, e) in exts {
        let Some(v) = value_of(e, depth) else {
            continue;
        };
        if REPEATING.contains(&name.as_str()) {
            if let Value::Array(a) = out.entry(name).or_insert_with(|| Value::Array(Vec::new())) {
                a.push(v);
            }
        } else {
            out.entry(name).or_insert(v);
        }
    }
    out
}

/// The `SubscriptionTopic` a topic `Basic` stands for (its `id` kept).
pub fn topic_json(basic: &Value) -> Value {
    let exts = basic["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let o = e.as_object()?;
            let name = o
                .get("url")?
                .as_str()?
                .strip_prefix(TOPIC_EXT)?
                .strip_prefix('.')?;
            Some((name.to_owned(), o))
        });
    let mut t = fields(exts, 0);
    t.insert("resourceType".into(), "SubscriptionTopic".into());
    if let Some(id) = basic.get("id") {
        t.insert("id".into(), id.clone());
    }
    Value::Object(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The shape of the Backport IG's R4 topic example.
    #[test]
    fn reads_the_backport_example_shape() {
        let x = |n: &str| format!("{TOPIC_EXT}.{n}");
        let basic = json!({
            "resourceType": "Basic", "id": "r4-encounter-complete",
            "extension": [
                {"url": x("url"), "valueUri": "http://example.org/topic/encounter-complete"},
                {"url": x("status"), "valueCode": "draft"},
                {"url": x("resourceTrigger"), "extension": [
                    {"url": "resource", "valueUri": "http://hl7.org/fhir/StructureDefinition/Encounter"},
                    {"url": "supportedInteraction", "valueCode": "create"},
                    {"url": "supportedInteraction", "valueCode": "update"},
                    {"url": "queryCriteria", "extension": [
                        {"url": "previous", "valueString": "status:not=finished"},
                        {"url": "resultForCreate", "valueCode": "test-passes"},
                        {"url": "current", "valueString": "status=finished"},
                        {"url": "resultForDelete", "valueCode": "test-fails"},
                        {"url": "requireBoth", "valueBoolean": true}]}]},
                {"url": x("canFilterBy"), "extension": [
                    {"url": "resource", "valueUri": "Encounter"},
                    {"url": "filterParameter", "valueString": "patient"}]},
                {"url": "http://example.org/other", "valueString": "ignored"}
            ],
            "code": {"coding": [{"system": "http://hl7.org/fhir/fhir-types", "code": "SubscriptionTopic"}]}
        });
        assert!(is_topic(&basic));
        assert!(!is_topic(
            &json!({"resourceType": "Basic", "code": {"text": "x"}})
        ));
        let t = topic_json(&basic);
        assert_eq!(t["url"], "http://example.org/topic/encounter-complete");
        assert_eq!(
            t["resourceTrigger"][0]["supportedInteraction"],
            json!(["create", "update"])
        );
        assert_eq!(
            t["resourceTrigger"][0]["queryCriteria"]["requireBoth"],
            true
        );
        assert_eq!(t["canFilterBy"][0]["filterParameter"], "patient");
        let topic = super::super::Topic::parse(&t).unwrap();
        assert_eq!(topic.triggers[0].rtype, "Encounter");
        assert!(topic.triggers[0].query.is_some());
    }

    /// Extensions nested past `DEPTH_MAX` are not read (100 levels here;
    /// the JSON parser refuses much deeper input before).
    #[test]
    fn deep_nesting_stops_at_the_limit() {
        let mut inner = json!({"url": "leaf", "valueString": "x"});
        for i in 0..100 {
            inner = json!({"url": format!("n{i}"), "extension": [inner]});
        }
        let basic = json!({"resourceType": "Basic",
            "extension": [{"url": format!("{TOPIC_EXT}.resourceTrigger"), "extension": [inner]}]});
        assert!(is_topic(&basic));
        let t = topic_json(&basic);
        let mut depth = 0;
        let mut v = &t["resourceTrigger"][0];
        while let Some((_, next)) = v.as_object().and_then(|o| o.iter().next()) {
            depth += 1;
            v = next;
        }
        assert!(depth <= DEPTH_MAX, "{depth}");
        assert!(super::super::Topic::parse(&t).is_err());
    }
}
