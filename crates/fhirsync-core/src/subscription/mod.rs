//! Subscriptions: topic-based ones (R5 `SubscriptionTopic`, or its R4
//! `Basic` form, with the Subscriptions Backport `Subscription`) and R4's
//! query-based ones; reading them from JSON, deciding whether a change is
//! an event for them (the parts that need the store are searches the
//! notifier runs), and the notification Bundles.

pub mod basic;

use serde_json::{json, Map, Value};

use crate::fhirpath::{self, Env, Expr};
use crate::instant::format_instant;
use crate::search::SearchQuery;

/// Backport IG extensions and profiles.
pub const BACKPORT: &str = "http://hl7.org/fhir/uv/subscriptions-backport/StructureDefinition";
/// fhirsync's own extensions (NATS channels).
pub const EXT: &str = "https://fhirsync.dev/fhir/StructureDefinition";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interaction {
    Create,
    Update,
    Delete,
}

impl Interaction {
    pub fn code(self) -> &'static str {
        match self {
            Interaction::Create => "create",
            Interaction::Update => "update",
            Interaction::Delete => "delete",
        }
    }

    fn parse(s: &str) -> Option<Interaction> {
        Some(match s {
            "create" => Interaction::Create,
            "update" => Interaction::Update,
            "delete" => Interaction::Delete,
            _ => return None,
        })
    }
}

/// A trigger's `queryCriteria`: searches the previous and the current
/// version must satisfy, as the store stood when each was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryCriteria {
    /// Search parameters (`status:not=finished`) for the previous version.
    pub previous: Option<String>,
    /// Search parameters for the current version.
    pub current: Option<String>,
    /// The previous test's result for a create (`resultForCreate`;
    /// default `test-passes`).
    pub create_passes: bool,
    /// The current test's result for a delete (`resultForDelete`;
    /// default `test-fails`).
    pub delete_passes: bool,
    /// Both tests must pass (otherwise either).
    pub require_both: bool,
}

impl QueryCriteria {
    fn parse(rtype: &str, q: &Value) -> Result<QueryCriteria, String> {
        let text = |k: &str| -> Result<Option<String>, String> {
            match q[k].as_str() {
                None => Ok(None),
                Some(t) => {
                    search_of(rtype, t)
                        .map_err(|e| format!("queryCriteria.{k} '{}': {e}", quoted(t)))?;
                    Ok(Some(t.to_owned()))
                }
            }
        };
        let result = |k: &str, default: bool| match q[k].as_str() {
            None => Ok(default),
            Some("test-passes") => Ok(true),
            Some("test-fails") => Ok(false),
            Some(o) => Err(format!(
                "queryCriteria.{k} '{o}' is not test-passes|test-fails"
            )),
        };
        let c = QueryCriteria {
            previous: text("previous")?,
            current: text("current")?,
            create_passes: result("resultForCreate", true)?,
            delete_passes: result("resultForDelete", false)?,
            require_both: q["requireBoth"].as_bool().unwrap_or(false),
        };
        if c.previous.is_none() && c.current.is_none() {
            return Err("queryCriteria needs previous or current".into());
        }
        Ok(c)
    }

    /// Whether the change is an event, from the tests' results (`None`:
    /// that test is absent).
    pub fn decide(&self, previous: Option<bool>, current: Option<bool>) -> bool {
        match (previous, current) {
            (Some(p), Some(c)) if self.require_both => p && c,
            (Some(p), Some(c)) => p || c,
            (Some(x), None) | (None, Some(x)) => x,
            (None, None) => true,
        }
    }
}

/// Most characters of a client's text (a criteria, a filter) quoted in a
/// refusal or in `Subscription.error`.
const QUOTED_CHARS_MAX: usize = 80;

/// Most characters of the reason a query-based subscription cannot be
/// served (it becomes `Subscription.error`).
pub const PROBLEM_CHARS_MAX: usize = 300;

/// The start of a client's text, for a message.
fn quoted(text: &str) -> String {
    text.chars().take(QUOTED_CHARS_MAX).collect()
}

/// Search parameters (`a=1&b=2`, optionally after `Type?`) as a search on
/// `rtype`; refuses parameters the node does not know.
pub fn search_of(rtype: &str, text: &str) -> Result<SearchQuery, String> {
    let qs = match text.split_once('?') {
        Some((t, q)) if t.is_empty() || t == rtype => q,
        Some((t, _)) => return Err(format!("names {t}, not {rtype}")),
        None => text,
    };
    search_of_pairs(rtype, &crate::search::query_pairs(qs))
}

/// Decoded `key=value` pairs as a search on `rtype`, as [`search_of`].
fn search_of_pairs(rtype: &str, pairs: &[(String, String)]) -> Result<SearchQuery, String> {
    let q = SearchQuery::parse(Some(rtype), pairs).map_err(|e| e.to_string())?;
    if let Some(u) = q.unsupported.first() {
        return Err(format!("'{u}' is not a search parameter of {rtype}"));
    }
    if q.clauses.is_empty() {
        return Err("no search parameter".into());
    }
    Ok(q)
}

#[derive(Debug, Clone)]
pub struct Trigger {
    pub rtype: String,
    pub interactions: Vec<Interaction>,
    /// `fhirPathCriteria`, evaluated with `%current` and `%previous`.
    pub criteria: Option<Expr>,
    /// `queryCriteria`, decided by the notifier through the store.
    pub query: Option<QueryCriteria>,
}

#[derive(Debug, Clone)]
pub struct Topic {
    pub url: String,
    pub triggers: Vec<Trigger>,
    /// `canFilterBy`: (resource type or any, parameter).
    pub can_filter: Vec<(Option<String>, String)>,
}

/// The type a `resource` element names: `Patient` or its canonical URL.
fn type_of(canonical: &str) -> String {
    canonical.rsplit('/').next().unwrap_or(canonical).to_owned()
}

fn bad(m: impl Into<String>) -> String {
    m.into()
}

impl Topic {
    pub fn parse(res: &Value) -> Result<Topic, String> {
        let url = res["url"]
            .as_str()
            .ok_or_else(|| bad("SubscriptionTopic.url is required"))?;
        let mut triggers = Vec::new();
        for t in res["resourceTrigger"].as_array().into_iter().flatten() {
            let rtype = t["resource"]
                .as_str()
                .map(type_of)
                .ok_or_else(|| bad("resourceTrigger.resource is required"))?;
            if !crate::resource::is_resource_type(&rtype) {
                return Err(format!(
                    "resourceTrigger.resource '{rtype}' is not a resource type"
                ));
            }
            let mut interactions = Vec::new();
            for i in t["supportedInteraction"].as_array().into_iter().flatten() {
                let s = i.as_str().unwrap_or("");
                interactions.push(
                    Interaction::parse(s).ok_or_else(|| format!("unknown interaction '{s}'"))?,
                );
            }
            if interactions.is_empty() {
                interactions = vec![
                    Interaction::Create,
                    Interaction::Update,
                    Interaction::Delete,
                ];
            }
            let query = match t.get("queryCriteria") {
                None => None,
                // a search needs a concrete type
                Some(_) if !crate::resource::is_resource_type(&rtype) || rtype == "Resource" => {
                    return Err(format!(
                        "resourceTrigger.queryCriteria needs a concrete resource type, not {rtype}"
                    ))
                }
                Some(q) => Some(QueryCriteria::parse(&rtype, q)?),
            };
            let criteria = match t["fhirPathCriteria"].as_str() {
                Some(e) => Some(
                    fhirpath::parse(e).map_err(|why| format!("fhirPathCriteria '{e}': {why}"))?,
                ),
                None => None,
            };
            triggers.push(Trigger {
                rtype,
                interactions,
                criteria,
                query,
            });
        }
        if triggers.is_empty() {
            return Err("SubscriptionTopic needs a resourceTrigger".into());
        }
        let can_filter = res["canFilterBy"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|f| {
                let p = f["filterParameter"].as_str()?;
                Some((f["resource"].as_str().map(type_of), p.to_owned()))
            })
            .collect();
        Ok(Topic {
            url: url.to_owned(),
            triggers,
            can_filter,
        })
    }

    /// Whether a change is an event of this topic, as far as it can be
    /// decided without the store: [`Topic::triggered`] is not empty and
    /// one of those triggers has no `queryCriteria` (the notifier decides
    /// the rest; this is for tests).
    #[cfg(test)]
    pub fn matches(
        &self,
        rtype: &str,
        interaction: Interaction,
        current: Option<&Value>,
        previous: Option<&Value>,
    ) -> bool {
        self.triggered(rtype, interaction, current, previous)
            .iter()
            .any(|t| t.query.is_none())
    }

    /// The triggers for the type and interaction whose FHIRPath criterion
    /// (if any) is true; the change is an event when one of them has no
    /// `queryCriteria` or its `queryCriteria` hold. The criterion runs on
    /// the current version (the previous one for a delete), with
    /// `%current` and `%previous` set (empty when there is none).
    pub fn triggered(
        &self,
        rtype: &str,
        interaction: Interaction,
        current: Option<&Value>,
        previous: Option<&Value>,
    ) -> Vec<&Trigger> {
        self.triggers
            .iter()
            .filter(|t| {
                if t.rtype != rtype && t.rtype != "Resource" && t.rtype != "DomainResource" {
                    return false;
                }
                if !t.interactions.contains(&interaction) {
                    return false;
                }
                let Some(e) = &t.criteria else {
                    return true;
                };
                let Some(focus) = current.or(previous) else {
                    return false;
                };
                let mut env = Env::new();
                env.set("current", current).set("previous", previous);
                fhirpath::matches_with(e, focus, &env)
            })
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Channel {
    RestHook {
        endpoint: String,
        headers: Vec<(String, String)>,
    },
    /// `subject` on a NATS connection (`connection`: a name from the node's
    /// config; `None`: the node's own `[nats]` servers).
    Nats {
        subject: String,
        connection: Option<String>,
        jetstream: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    Empty,
    IdOnly,
    Full,
}

impl Payload {
    pub fn parse(s: &str) -> Option<Payload> {
        Some(match s {
            "empty" => Payload::Empty,
            "id-only" => Payload::IdOnly,
            "full-resource" => Payload::Full,
            _ => return None,
        })
    }
}

/// Most filters (parameters of `backport-filter-criteria`) one
/// subscription may have; every change a topic matches is tested
/// against them.
pub const FILTERS_MAX: usize = 64;
/// Most values those filters may hold in all.
pub const FILTER_VALUES_MAX: usize = 1000;

/// A filter from `backport-filter-criteria`: `Type?param[:modifier]=a,b`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub rtype: Option<String>,
    /// The parameter's code (what `canFilterBy` names).
    pub param: String,
    /// The parameter as written, with its modifier.
    pub key: String,
    /// Any of these values matches.
    pub values: Vec<String>,
}

impl Filter {
    /// The filter as a search on `rtype` when it names one of that type's
    /// search parameters (the notifier runs it on the version); `None`
    /// when it names an element instead.
    pub fn search(&self, rtype: &str) -> Option<SearchQuery> {
        self.query(rtype).and_then(Result::ok)
    }

    /// The filter as a search on `rtype`, or why its value is not one;
    /// `None` when it names an element.
    fn query(&self, rtype: &str) -> Option<Result<SearchQuery, String>> {
        if !self.param.starts_with('_') && crate::index::param(rtype, &self.param).is_none() {
            return None;
        }
        Some(search_of_pairs(
            rtype,
            &[(self.key.clone(), self.values.join(","))],
        ))
    }

    /// Whether a resource's element named by the parameter holds one of
    /// the values (a code, a Coding/CodeableConcept's code or
    /// `system|code`, an Identifier, a Reference).
    pub fn matches_elements(&self, res: &Value) -> bool {
        let vals = element_values(res, &self.param);
        self.values
            .iter()
            .any(|want| vals.iter().any(|v| v == want))
    }
}

#[derive(Debug, Clone)]
pub struct Subscription {
    pub id: String,
    pub status: String,
    /// The topic's URL; for a query-based subscription, its `criteria`.
    pub topic: String,
    /// A query-based (R4) subscription: its `criteria` as a search.
    pub classic: Option<SearchQuery>,
    /// Why the node cannot serve this query-based subscription (it is
    /// stored as data like any R4 resource and set to `error` with this).
    pub problem: Option<String>,
    pub filters: Vec<Filter>,
    pub channel: Channel,
    pub payload: Payload,
    pub heartbeat_s: Option<u64>,
    pub timeout_s: u64,
    pub max_count: usize,
}

fn ext<'a>(v: &'a Value, url_tail: &str) -> Vec<&'a Value> {
    v["extension"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|e| e["url"].as_str().is_some_and(|u| u.ends_with(url_tail)))
        .collect()
}

fn ext_uint(v: &Value, tail: &str) -> Option<u64> {
    ext(v, tail).first().and_then(|e| {
        e.get("valueUnsignedInt")
            .or_else(|| e.get("valuePositiveInt"))
            .or_else(|| e.get("valueInteger"))
            .and_then(Value::as_u64)
    })
}

impl Subscription {
    /// Reads a Subscription with the backport profile; the reason when it
    /// cannot be served.
    pub fn parse(res: &Value) -> Result<Subscription, String> {
        let id = res["id"].as_str().unwrap_or("").to_owned();
        let status = res["status"]
            .as_str()
            .ok_or("Subscription.status is required")?
            .to_owned();
        if !matches!(status.as_str(), "requested" | "active" | "error" | "off") {
            return Err(format!(
                "Subscription.status '{status}' is not requested|active|error|off"
            ));
        }
        let topic = res["criteria"]
            .as_str()
            .ok_or("Subscription.criteria (the topic URL) is required")?;
        if topic.contains('?') {
            return Ok(Self::classic(res, id, status, topic));
        }
        let mut filters = Vec::new();
        for f in ext(&res["_criteria"], "/backport-filter-criteria") {
            let text = f["valueString"]
                .as_str()
                .ok_or("backport-filter-criteria needs valueString")?;
            filters.extend(parse_filter(text)?);
        }
        let values: usize = filters.iter().map(|f| f.values.len()).sum();
        if filters.len() > FILTERS_MAX || values > FILTER_VALUES_MAX {
            return Err(format!(
                "{} filters with {values} values: at most {FILTERS_MAX} filters (FILTERS_MAX) with {FILTER_VALUES_MAX} values in all (FILTER_VALUES_MAX)",
                filters.len()
            ));
        }
        let ch = &res["channel"];
        let declared = ch["type"].as_str().unwrap_or("");
        let custom = ext(&ch["_type"], "/backport-channel-type")
            .first()
            .and_then(|e| e["valueCoding"]["code"].as_str())
            .map(str::to_owned);
        let kind = custom.as_deref().unwrap_or(declared);
        let endpoint = ch["endpoint"].as_str().unwrap_or("").to_owned();
        let channel = match kind {
            "rest-hook" => rest_hook(ch)?,
            "nats" | "nats-jetstream" => {
                let subject = endpoint
                    .strip_prefix("nats:")
                    .unwrap_or(&endpoint)
                    .to_owned();
                if subject.is_empty() || subject.contains([' ', '*', '>']) {
                    return Err("a NATS channel needs channel.endpoint = the subject to publish to (no wildcards)".into());
                }
                let connection = ext(ch, "/nats-connection")
                    .first()
                    .and_then(|e| e["valueString"].as_str())
                    .map(str::to_owned);
                Channel::Nats {
                    subject,
                    connection,
                    jetstream: kind == "nats-jetstream",
                }
            }
            "" => return Err("Subscription.channel.type is required".into()),
            other => {
                return Err(format!(
                    "channel type '{other}' is not supported (rest-hook, nats, nats-jetstream)"
                ))
            }
        };
        let payload = match ext(&ch["_payload"], "/backport-payload-content").first() {
            Some(e) => {
                let c = e["valueCode"].as_str().unwrap_or("");
                Payload::parse(c).ok_or_else(|| {
                    format!("payload content '{c}' is not empty|id-only|full-resource")
                })?
            }
            None if ch.get("payload").is_some() => Payload::IdOnly,
            None => Payload::Empty,
        };
        if let Some(p) = ch["payload"].as_str() {
            if !p.contains("json") {
                return Err(format!(
                    "channel.payload '{p}': only application/fhir+json is served"
                ));
            }
        }
        Ok(Subscription {
            id,
            status,
            topic: topic.to_owned(),
            classic: None,
            problem: None,
            filters,
            channel,
            payload,
            heartbeat_s: ext_uint(ch, "/backport-heartbeat-period").filter(|s| *s > 0),
            timeout_s: ext_uint(ch, "/backport-timeout")
                .unwrap_or(10)
                .clamp(1, 300),
            max_count: ext_uint(ch, "/backport-max-count")
                .unwrap_or(1)
                .clamp(1, 1000) as usize,
        })
    }

    /// A query-based R4 subscription: `criteria` is a search, the channel
    /// a `rest-hook` whose `payload` is empty (a POST without a body) or
    /// `application/fhir+json` (a PUT of the resource to
    /// `endpoint/Type/id`). What the node cannot serve is in `problem`.
    fn classic(res: &Value, id: String, status: String, criteria: &str) -> Subscription {
        let ch = &res["channel"];
        let rtype = criteria.split('?').next().unwrap_or("");
        let shown = quoted(criteria);
        let query = if crate::resource::is_resource_type(rtype) {
            search_of(rtype, criteria).map_err(|e| format!("criteria '{shown}': {e}"))
        } else {
            Err(format!(
                "criteria '{shown}': '{}' is not a resource type",
                quoted(rtype)
            ))
        };
        let channel = match ch["type"].as_str().unwrap_or("") {
            "rest-hook" => rest_hook(ch),
            other => Err(format!(
                "channel type '{other}' is not served for query-based subscriptions (rest-hook)"
            )),
        };
        let payload = match ch["payload"].as_str().unwrap_or("") {
            "" => Ok(Payload::Empty),
            p if p.contains("json") => Ok(Payload::Full),
            p => Err(format!(
                "channel.payload '{p}': only application/fhir+json is served"
            )),
        };
        let problem = [
            query.as_ref().err(),
            channel.as_ref().err(),
            payload.as_ref().err(),
        ]
        .into_iter()
        .flatten()
        .next()
        .cloned();
        Subscription {
            id,
            status,
            topic: criteria.to_owned(),
            classic: query.ok(),
            problem,
            filters: Vec::new(),
            channel: channel.unwrap_or(Channel::RestHook {
                endpoint: String::new(),
                headers: Vec::new(),
            }),
            payload: payload.unwrap_or(Payload::Empty),
            heartbeat_s: None,
            timeout_s: 10,
            max_count: 1,
        }
    }

    /// Refuses filters the topic does not allow.
    pub fn check_filters(&self, topic: &Topic) -> Result<(), String> {
        for f in &self.filters {
            let ok = topic
                .can_filter
                .iter()
                .any(|(t, p)| *p == f.param && (t.is_none() || f.rtype.is_none() || t == &f.rtype));
            if !ok {
                return Err(format!(
                    "filter '{}' is not allowed by topic {} (canFilterBy)",
                    f.param, topic.url
                ));
            }
        }
        Ok(())
    }

    /// Whether a resource passes every filter (filters of another type do
    /// not apply). A parameter names the element it filters: its values
    /// (a code, a Coding/CodeableConcept's code or `system|code`, an
    /// Identifier, a Reference) match any of the filter's values. The
    /// element rule only: the notifier runs filters that name search
    /// parameters through the store (this is for tests).
    #[cfg(test)]
    pub fn filters_match(&self, rtype: &str, res: &Value) -> bool {
        self.filters
            .iter()
            .all(|f| f.rtype.as_deref().is_some_and(|t| t != rtype) || f.matches_elements(res))
    }
}

/// A `rest-hook` channel: an http(s) endpoint and `Name: value` headers.
fn rest_hook(ch: &Value) -> Result<Channel, String> {
    let endpoint = ch["endpoint"].as_str().unwrap_or("").to_owned();
    if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
        return Err("a rest-hook channel needs an http(s) channel.endpoint".into());
    }
    let mut headers = Vec::new();
    for h in ch["header"].as_array().into_iter().flatten() {
        let h = h.as_str().unwrap_or("");
        let (k, v) = h
            .split_once(':')
            .ok_or_else(|| format!("channel.header '{h}' is not 'Name: value'"))?;
        headers.push((k.trim().to_owned(), v.trim().to_owned()));
    }
    Ok(Channel::RestHook { endpoint, headers })
}

fn parse_filter(full: &str) -> Result<Vec<Filter>, String> {
    let text = quoted(full);
    let (rtype, query) = match full.split_once('?') {
        Some((t, q)) => (Some(t.trim().to_owned()).filter(|t| !t.is_empty()), q),
        None => (None, full),
    };
    if let Some(t) = &rtype {
        if !crate::resource::is_resource_type(t) {
            return Err(format!("filter '{text}': '{t}' is not a resource type"));
        }
    }
    let mut out = Vec::new();
    for (k, v) in form_urlencoded::parse(query.as_bytes()) {
        let param = k.split(':').next().unwrap_or("");
        if param.is_empty() || v.is_empty() {
            return Err(format!("filter '{text}': expected param[:modifier]=value"));
        }
        let f = Filter {
            rtype: rtype.clone(),
            param: param.to_owned(),
            key: k.clone().into_owned(),
            values: v.split(',').map(str::to_owned).collect(),
        };
        // a search parameter of the type: its value must be one the search takes
        if let Some(Some(Err(e))) = rtype.as_deref().map(|t| f.query(t)) {
            return Err(format!("filter '{text}': {e}"));
        }
        if f.key != f.param && rtype.is_none() {
            return Err(format!(
                "filter '{text}': a modifier needs the filter's resource type (Type?param:modifier=value)"
            ));
        }
        out.push(f);
    }
    if out.is_empty() {
        return Err(format!("filter '{text}' has no parameter"));
    }
    Ok(out)
}

/// The values a filter parameter compares with.
fn element_values(res: &Value, param: &str) -> Vec<String> {
    let mut out = Vec::new();
    if param == "_id" {
        out.extend(res["id"].as_str().map(str::to_owned));
        return out;
    }
    let elems: Vec<&Value> = match param {
        "patient" => ["patient", "subject", "beneficiary"]
            .iter()
            .map(|k| &res[*k])
            .collect(),
        _ => vec![&res[param]],
    };
    fn push(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::String(s) => out.push(s.clone()),
            Value::Bool(b) => out.push(b.to_string()),
            Value::Number(n) => out.push(n.to_string()),
            Value::Array(a) => a.iter().for_each(|x| push(x, out)),
            Value::Object(o) => {
                if let Some(r) = o.get("reference").and_then(Value::as_str) {
                    out.push(r.to_owned());
                    if let Some(id) = r.rsplit('/').next() {
                        out.push(id.to_owned());
                    }
                }
                if let Some(c) = o.get("code").and_then(Value::as_str) {
                    out.push(c.to_owned());
                    if let Some(s) = o.get("system").and_then(Value::as_str) {
                        out.push(format!("{s}|{c}"));
                    }
                }
                if let Some(val) = o.get("value").and_then(Value::as_str) {
                    out.push(val.to_owned());
                    if let Some(s) = o.get("system").and_then(Value::as_str) {
                        out.push(format!("{s}|{val}"));
                    }
                }
                if let Some(c) = o.get("coding") {
                    push(c, out);
                }
            }
            Value::Null => {}
        }
    }
    for e in elems {
        push(e, &mut out);
    }
    out
}

/// One event as carried in a notification.
#[derive(Debug, Clone)]
pub struct Event {
    pub num: u64,
    pub at_ms: u64,
    pub rtype: String,
    pub id: String,
    pub vid: u64,
    pub deleted: bool,
    /// The version's JSON, for `full-resource`.
    pub body: Option<Value>,
}

/// What a notification Bundle is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoteKind {
    Handshake,
    Heartbeat,
    EventNotification,
    QueryStatus,
    QueryEvent,
}

impl NoteKind {
    pub fn code(self) -> &'static str {
        match self {
            NoteKind::Handshake => "handshake",
            NoteKind::Heartbeat => "heartbeat",
            NoteKind::EventNotification => "event-notification",
            NoteKind::QueryStatus => "query-status",
            NoteKind::QueryEvent => "query-event",
        }
    }
}

/// The subscription status (R4 backport `Parameters`).
pub struct Status<'a> {
    pub base: &'a str,
    pub sub_id: &'a str,
    pub topic: &'a str,
    pub status: &'a str,
    pub kind: NoteKind,
    pub events_since_start: u64,
    pub error: Option<&'a str>,
}

pub fn status_parameters(s: &Status, events: &[Event], payload: Payload) -> Value {
    let mut p = vec![
        json!({"name": "subscription", "valueReference": {"reference": format!("{}/Subscription/{}", s.base, s.sub_id)}}),
        json!({"name": "topic", "valueCanonical": s.topic}),
        json!({"name": "status", "valueCode": s.status}),
        json!({"name": "type", "valueCode": s.kind.code()}),
        json!({"name": "events-since-subscription-start", "valueString": s.events_since_start.to_string()}),
    ];
    for e in events {
        let mut part = vec![
            json!({"name": "event-number", "valueString": e.num.to_string()}),
            json!({"name": "timestamp", "valueInstant": format_instant(e.at_ms)}),
        ];
        if payload != Payload::Empty {
            part.push(json!({"name": "focus", "valueReference": {"reference": format!("{}/{}/{}/_history/{}", s.base, e.rtype, e.id, e.vid)}}));
        }
        p.push(json!({"name": "notification-event", "part": part}));
    }
    if let Some(err) = s.error {
        p.push(json!({"name": "error", "valueCodeableConcept": {"text": err}}));
    }
    json!({
        "resourceType": "Parameters",
        "meta": {"profile": [format!("{BACKPORT}/backport-subscription-status-r4")]},
        "parameter": p,
    })
}

/// A notification Bundle (type `history`): the status first, then one entry
/// per event unless the payload is `empty`.
pub fn notification_bundle(s: &Status, events: &[Event], payload: Payload, now_ms: u64) -> Value {
    let status = status_parameters(s, events, payload);
    let mut entries = vec![json!({
        "fullUrl": format!("urn:uuid:{}", uuid_like(s.sub_id, s.events_since_start, now_ms)),
        "resource": status,
        "request": {"method": "GET", "url": format!("{}/Subscription/{}/$status", s.base, s.sub_id)},
        "response": {"status": "200"},
    })];
    if payload != Payload::Empty {
        for e in events {
            let url = format!("{}/{}/{}", s.base, e.rtype, e.id);
            let mut entry = Map::new();
            entry.insert("fullUrl".into(), json!(url));
            if payload == Payload::Full {
                if let Some(b) = &e.body {
                    entry.insert("resource".into(), b.clone());
                }
            }
            let method = if e.deleted {
                "DELETE"
            } else if e.vid == 1 {
                "POST"
            } else {
                "PUT"
            };
            entry.insert(
                "request".into(),
                json!({"method": method, "url": if method == "POST" { e.rtype.clone() } else { format!("{}/{}", e.rtype, e.id) }}),
            );
            entry.insert(
                "response".into(),
                json!({"status": if e.deleted { "204" } else if e.vid == 1 { "201" } else { "200" },
                       "etag": format!("W/\"{}\"", e.vid)}),
            );
            entries.push(Value::Object(entry));
        }
    }
    json!({
        "resourceType": "Bundle",
        "meta": {"profile": [format!("{BACKPORT}/backport-subscription-notification-r4")]},
        "type": "history",
        "timestamp": format_instant(now_ms),
        "entry": entries,
    })
}

/// A stable pseudo-UUID for the status entry.
fn uuid_like(sub: &str, n: u64, ms: u64) -> String {
    let h = xxhash_rust::xxh3::xxh3_128(format!("{sub}:{n}:{ms}").as_bytes());
    let x = format!("{h:032x}");
    format!(
        "{}-{}-4{}-8{}-{}",
        &x[0..8],
        &x[8..12],
        &x[13..16],
        &x[17..20],
        &x[20..32]
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topic() -> Topic {
        Topic::parse(&json!({
            "resourceType": "SubscriptionTopic",
            "url": "http://example.org/topic/patient-named",
            "resourceTrigger": [{
                "resource": "http://hl7.org/fhir/StructureDefinition/Patient",
                "supportedInteraction": ["create", "update"],
                "fhirPathCriteria": "%current.name.exists() and (%previous.empty() or %previous.name.empty())"
            }],
            "canFilterBy": [{"resource": "Patient", "filterParameter": "gender"}]
        }))
        .unwrap()
    }

    #[test]
    fn topic_triggers() {
        let t = topic();
        let named =
            json!({"resourceType": "Patient", "name": [{"family": "A"}], "gender": "female"});
        let unnamed = json!({"resourceType": "Patient"});
        assert!(t.matches("Patient", Interaction::Create, Some(&named), None));
        assert!(!t.matches("Patient", Interaction::Create, Some(&unnamed), None));
        assert!(t.matches("Patient", Interaction::Update, Some(&named), Some(&unnamed)));
        assert!(!t.matches("Patient", Interaction::Update, Some(&named), Some(&named)));
        assert!(!t.matches("Patient", Interaction::Delete, None, Some(&named)));
        assert!(!t.matches("Observation", Interaction::Create, Some(&named), None));
    }

    #[test]
    fn subscription_reads_backport_shape() {
        let s = Subscription::parse(&json!({
            "resourceType": "Subscription", "id": "s1", "status": "requested",
            "criteria": "http://example.org/topic/patient-named",
            "_criteria": {"extension": [{"url": format!("{BACKPORT}/backport-filter-criteria"), "valueString": "Patient?gender=female,other"}]},
            "channel": {
                "type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook", "header": ["Authorization: Bearer x"],
                "payload": "application/fhir+json",
                "_payload": {"extension": [{"url": format!("{BACKPORT}/backport-payload-content"), "valueCode": "full-resource"}]},
                "extension": [{"url": format!("{BACKPORT}/backport-heartbeat-period"), "valueUnsignedInt": 30}]
            }
        }))
        .unwrap();
        assert_eq!(s.payload, Payload::Full);
        assert_eq!(s.heartbeat_s, Some(30));
        assert!(s.check_filters(&topic()).is_ok());
        assert!(s.filters_match("Patient", &json!({"gender": "female"})));
        assert!(!s.filters_match("Patient", &json!({"gender": "male"})));
        let mut bad = s.clone();
        bad.filters[0].param = "birthdate".into();
        assert!(bad.check_filters(&topic()).is_err());
        for wrong in [
            json!({"status": "requested", "criteria": "http://t", "channel": {"type": "email", "endpoint": "mailto:x"}}),
            json!({"status": "requested", "criteria": "http://t", "channel": {"type": "rest-hook", "endpoint": "ftp://x"}}),
            json!({"status": "requested", "criteria": "http://t", "channel": {"type": "nats", "endpoint": "a.*"}}),
        ] {
            assert!(Subscription::parse(&wrong).is_err(), "{wrong}");
        }
        // Query-based (R4) subscriptions are read whatever they say; what
        // cannot be served is their problem.
        let classic = |criteria: &str, ch: Value| {
            Subscription::parse(
                &json!({"status": "requested", "criteria": criteria, "channel": ch}),
            )
            .unwrap()
        };
        let ok = classic(
            "Observation?code=http://loinc.org|1975-2",
            json!({"type": "rest-hook", "endpoint": "http://x/h", "payload": "application/fhir+json"}),
        );
        assert_eq!(ok.problem, None);
        assert_eq!(ok.payload, Payload::Full);
        assert_eq!(ok.classic.unwrap().rtype.as_deref(), Some("Observation"));
        for (criteria, ch, why) in [
            (
                "Observation?nope=1",
                json!({"type": "rest-hook", "endpoint": "http://x"}),
                "'nope' is not a search parameter",
            ),
            (
                "Nothing?a=1",
                json!({"type": "rest-hook", "endpoint": "http://x"}),
                "not a resource type",
            ),
            (
                "Observation?date=tomorrow",
                json!({"type": "rest-hook", "endpoint": "http://x"}),
                "invalid value",
            ),
            (
                "Observation?code=1",
                json!({"type": "email", "endpoint": "mailto:a@b"}),
                "'email' is not served",
            ),
            (
                "Observation?code=1",
                json!({"type": "rest-hook", "endpoint": "http://x", "payload": "application/fhir+xml"}),
                "only application/fhir+json",
            ),
        ] {
            let p = classic(criteria, ch).problem.unwrap_or_default();
            assert!(p.contains(why), "{criteria}: {p}");
        }
        // What a client wrote is quoted only in part.
        let long = format!("Observation?code={}", "x".repeat(20_000));
        let p = classic(&long, json!({"type": "rest-hook", "endpoint": "http://x"}))
            .problem
            .unwrap();
        assert!(
            p.chars().count() <= PROBLEM_CHARS_MAX && p.contains("VALUE_BYTES_MAX"),
            "{p}"
        );
        let p = classic(
            &format!("{}?a=1", "T".repeat(5000)),
            json!({"type": "rest-hook", "endpoint": "http://x"}),
        )
        .problem
        .unwrap();
        assert!(p.len() < PROBLEM_CHARS_MAX, "{p}");
        // Filters naming search parameters take their modifiers and values.
        let filtered = |text: &str| {
            Subscription::parse(&json!({"status": "requested", "criteria": "http://t",
                "_criteria": {"extension": [{"url": format!("{BACKPORT}/backport-filter-criteria"), "valueString": text}]},
                "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook"}}))
        };
        let f = filtered("Encounter?patient=Patient/1&status:not=finished").unwrap();
        assert!(f.filters[0].search("Encounter").is_some());
        assert_eq!(f.filters[1].param, "status");
        assert!(filtered("Encounter?date=soon")
            .unwrap_err()
            .contains("invalid value"));
        assert!(filtered("status:not=x")
            .unwrap_err()
            .contains("resource type"));
        // Filters past their limits.
        let values: Vec<String> = (0..=FILTER_VALUES_MAX).map(|i| format!("v{i}")).collect();
        for text in [
            format!("Patient?gender={}", values.join(",")),
            (0..=FILTERS_MAX)
                .map(|i| format!("p{i}=x"))
                .collect::<Vec<_>>()
                .join("&"),
        ] {
            let sub = json!({"status": "requested", "criteria": "http://t",
                "_criteria": {"extension": [{"url": format!("{BACKPORT}/backport-filter-criteria"), "valueString": text}]},
                "channel": {"type": "rest-hook", "endpoint": "http://127.0.0.1:9/hook"}});
            let e = Subscription::parse(&sub).unwrap_err();
            assert!(e.contains("VALUES_MAX") || e.contains("FILTERS_MAX"), "{e}");
            assert!(e.len() < 300, "{e}");
        }
    }
}
