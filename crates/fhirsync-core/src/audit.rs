//! Audit records and their FHIR `AuditEvent` form, after the IHE Basic Audit
//! Log Patterns (BALP): who (agent, network address), what (the resources and
//! patients touched, the query), when (recorded), and the outcome. One record
//! per audited REST request and per sync operation.

use serde_json::{json, Value};

use crate::instant::format_instant;

/// What kind of event a record is: a REST interaction, a sync operation, or
/// a console login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditKind {
    Rest,
    Sync,
    Login,
}

impl AuditKind {
    /// `(system, code, display)` of `AuditEvent.type`.
    fn coding(self) -> (&'static str, &'static str, &'static str) {
        match self {
            AuditKind::Rest => (
                "http://terminology.hl7.org/CodeSystem/audit-event-type",
                "rest",
                "Restful Operation",
            ),
            AuditKind::Sync => (
                "http://dicom.nema.org/resources/ontology/DCM",
                "110106",
                "Export",
            ),
            AuditKind::Login => (
                "http://dicom.nema.org/resources/ontology/DCM",
                "110114",
                "User Authentication",
            ),
        }
    }

    /// The kind `as_str` names (`rest` for anything unknown).
    pub fn parse(s: &str) -> AuditKind {
        match s {
            "sync" => AuditKind::Sync,
            "login" => AuditKind::Login,
            _ => AuditKind::Rest,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AuditKind::Rest => "rest",
            AuditKind::Sync => "sync",
            AuditKind::Login => "login",
        }
    }
}

/// Who acted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Who {
    /// A configured bearer token, by its name.
    Token(String),
    /// A SMART Backend Services client, by its `client_id`.
    Client(String),
    /// A child node authenticated by its edge token.
    Node(String),
    /// A console user.
    User(String),
    /// Nobody authenticated (anonymous access, or a refused request).
    Anonymous,
    /// This node itself (its sync agents).
    System,
}

impl Who {
    /// The agent a [`Who::name`] stands for.
    pub fn parse(name: &str) -> Who {
        match name.split_once(':') {
            Some(("token", n)) => Who::Token(n.into()),
            Some(("client", n)) => Who::Client(n.into()),
            Some(("node", n)) => Who::Node(n.into()),
            Some(("user", n)) => Who::User(n.into()),
            _ if name == "system" => Who::System,
            _ => Who::Anonymous,
        }
    }

    /// The name used in `agent.who.display` and in searches (`agent=`).
    pub fn name(&self) -> String {
        match self {
            Who::Token(n) => format!("token:{n}"),
            Who::Client(n) => format!("client:{n}"),
            Who::Node(n) => format!("node:{n}"),
            Who::User(n) => format!("user:{n}"),
            Who::Anonymous => "anonymous".into(),
            Who::System => "system".into(),
        }
    }
}

/// One audited event, before it has an id.
#[derive(Debug, Clone)]
pub struct AuditRecord {
    pub at_ms: u64,
    pub kind: AuditKind,
    /// The FHIR interaction (`read`, `create`, `search-type`, ...) for REST,
    /// the operation (`pull`, `push`, `resolve`, ...) for sync, `login`.
    pub subtype: String,
    /// `C`, `R`, `U`, `D` or `E` (execute).
    pub action: char,
    /// `0` success, `4` minor failure (refused, not found), `8` serious
    /// failure (server error).
    pub outcome: u8,
    pub outcome_desc: Option<String>,
    pub who: Who,
    /// The caller's IP address.
    pub address: Option<String>,
    /// The node that recorded the event.
    pub observer: String,
    /// Resources touched (`Type/id` or `Type/id/_history/v`).
    pub entities: Vec<String>,
    /// Patients whose data was touched (`Patient/id`).
    pub patients: Vec<String>,
    /// The search or request query, as sent.
    pub query: Option<String>,
}

/// `outcome` from an HTTP status.
pub fn outcome_of(status: u16) -> u8 {
    match status {
        s if s < 400 => 0,
        s if s < 500 => 4,
        _ => 8,
    }
}

/// The FHIR `action` code of a REST interaction.
pub fn action_of(interaction: &str) -> char {
    match interaction {
        "create" => 'C',
        "update" | "patch" => 'U',
        "delete" => 'D',
        "transaction" | "batch" | "operation" | "apply" => 'E',
        _ => 'R',
    }
}

impl AuditRecord {
    /// A REST record with no entities yet.
    pub fn rest(at_ms: u64, interaction: &str, status: u16, who: Who, observer: &str) -> Self {
        AuditRecord {
            at_ms,
            kind: AuditKind::Rest,
            subtype: interaction.to_owned(),
            action: action_of(interaction),
            outcome: outcome_of(status),
            outcome_desc: None,
            who,
            address: None,
            observer: observer.to_owned(),
            entities: Vec::new(),
            patients: Vec::new(),
            query: None,
        }
    }

    /// Adds the resource a `Location` (absolute or `Type/id/_history/v`)
    /// names, and its patient when it is a Patient.
    pub fn touch_location(&mut self, loc: &str) {
        self.add_location(loc);
        self.dedup();
    }

    /// [`AuditRecord::touch_location`] without removing repeats.
    fn add_location(&mut self, loc: &str) {
        let rel = loc.rsplit_once("/fhir/").map_or(loc, |(_, r)| r);
        let mut seg = rel.split('/');
        let (Some(t), Some(id)) = (seg.next(), seg.next()) else {
            return;
        };
        if t.is_empty() || id.is_empty() {
            return;
        }
        if t == "Patient" {
            self.patients.push(format!("Patient/{id}"));
        }
        self.entities.push(rel.to_owned());
    }

    /// Keeps the first of each repeated entity and patient. Repeats are
    /// removed once per body, by sorting: a search page of 1,000 resources
    /// checked name by name as it was read cost half a million string
    /// comparisons.
    fn dedup(&mut self) {
        dedup_in_order(&mut self.entities);
        dedup_in_order(&mut self.patients);
    }

    /// Adds the resources (and patients) of a JSON body, a resource or a
    /// Bundle, reading only the fields that name them: no tree is built.
    pub fn touch_json(&mut self, body: &[u8]) {
        let Ok(top) = serde_json::from_slice::<Mini>(body) else {
            return;
        };
        if top.resource_type.as_deref() == Some("Bundle") {
            for e in top.entry.into_iter().flatten() {
                if let Some(r) = e.resource {
                    self.touch_mini(r);
                }
                if let Some(loc) = e.response.and_then(|r| r.location) {
                    self.add_location(&loc);
                }
            }
        } else if top.resource_type.as_deref() != Some("OperationOutcome") {
            self.touch_mini(top);
        }
        self.dedup();
    }

    fn touch_mini(&mut self, m: Mini) {
        let (Some(rt), Some(id)) = (m.resource_type, m.id) else {
            return;
        };
        let r = match m.meta.and_then(|x| x.version_id) {
            Some(v) => format!("{rt}/{id}/_history/{v}"),
            None => format!("{rt}/{id}"),
        };
        self.entities.push(r);
        if rt == "Patient" {
            self.patients.push(format!("Patient/{id}"));
        }
        for p in [m.subject, m.patient, m.beneficiary]
            .into_iter()
            .flatten()
            .filter_map(|r| r.reference)
        {
            if let Some(p) = p.strip_prefix("Patient/") {
                self.patients.push(format!("Patient/{p}"));
            }
        }
    }

    /// The `AuditEvent` resource with id `id`.
    pub fn to_fhir(&self, id: u64) -> Value {
        let (tsys, tcode, tdisp) = self.kind.coding();
        let subtype_system = match self.kind {
            AuditKind::Rest => "http://hl7.org/fhir/restful-interaction",
            AuditKind::Sync => "urn:fhirsync:sync-operation",
            AuditKind::Login => "urn:fhirsync:console",
        };
        let role = match self.who {
            Who::User(_) => "humanuser",
            Who::Node(_) | Who::System => "datacollector",
            _ => "dataprocessor",
        };
        let mut agent = json!({
            "type": {"coding": [{
                "system": "http://terminology.hl7.org/CodeSystem/extra-security-role-type",
                "code": role,
            }]},
            "who": {"display": self.who.name()},
            "requestor": true,
        });
        if let Some(a) = &self.address {
            agent["network"] = json!({"address": a, "type": "2"});
        }
        let mut entity: Vec<Value> = self
            .patients
            .iter()
            .map(|p| {
                json!({
                    "what": {"reference": p},
                    "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "1", "display": "Person"},
                    "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "1", "display": "Patient"},
                })
            })
            .collect();
        for e in &self.entities {
            entity.push(json!({
                "what": {"reference": e},
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "4", "display": "Domain Resource"},
            }));
        }
        if let Some(q) = &self.query {
            entity.push(json!({
                "type": {"system": "http://terminology.hl7.org/CodeSystem/audit-entity-type", "code": "2", "display": "System Object"},
                "role": {"system": "http://terminology.hl7.org/CodeSystem/object-role", "code": "24", "display": "Query"},
                "description": q,
                "query": base64(q.as_bytes()),
            }));
        }
        let mut v = json!({
            "resourceType": "AuditEvent",
            "id": id.to_string(),
            "meta": {"versionId": "1", "lastUpdated": format_instant(self.at_ms)},
            "type": {"system": tsys, "code": tcode, "display": tdisp},
            "subtype": [{"system": subtype_system, "code": self.subtype}],
            "action": self.action.to_string(),
            "recorded": format_instant(self.at_ms),
            "outcome": self.outcome.to_string(),
            "agent": [agent],
            "source": {
                "observer": {"display": self.observer},
                "type": [{"system": "http://terminology.hl7.org/CodeSystem/security-source-type", "code": "4", "display": "Application Server"}],
            },
        });
        if let Some(d) = &self.outcome_desc {
            v["outcomeDesc"] = json!(d);
        }
        if !entity.is_empty() {
            v["entity"] = Value::Array(entity);
        }
        v
    }
}

/// The fields of a resource (or Bundle) that name it and its patient; the
/// rest of the body is skipped while parsing.
#[derive(serde::Deserialize)]
struct Mini {
    #[serde(rename = "resourceType")]
    resource_type: Option<String>,
    id: Option<String>,
    meta: Option<MiniMeta>,
    subject: Option<MiniRef>,
    patient: Option<MiniRef>,
    beneficiary: Option<MiniRef>,
    entry: Option<Vec<MiniEntry>>,
}

#[derive(serde::Deserialize)]
struct MiniMeta {
    #[serde(rename = "versionId")]
    version_id: Option<String>,
}

#[derive(serde::Deserialize)]
struct MiniRef {
    reference: Option<String>,
}

#[derive(serde::Deserialize)]
struct MiniEntry {
    resource: Option<Mini>,
    response: Option<MiniResponse>,
}

#[derive(serde::Deserialize)]
struct MiniResponse {
    location: Option<String>,
}

/// Removes repeats from `v`, keeping each first occurrence where it was.
fn dedup_in_order(v: &mut Vec<String>) {
    if v.len() < 2 {
        return;
    }
    let mut order: Vec<usize> = (0..v.len()).collect();
    // Stable: among equal names the first comes first.
    order.sort_by(|&a, &b| v[a].cmp(&v[b]));
    let mut keep = vec![true; v.len()];
    for w in order.windows(2) {
        if v[w[0]] == v[w[1]] {
            keep[w[1]] = false;
        }
    }
    let mut i = 0;
    v.retain(|_| {
        i += 1;
        keep[i - 1]
    });
}

/// Standard base64 with padding (`AuditEvent.entity.query` is base64Binary).
pub fn base64(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (c[0] as u32) << 16
            | (c.get(1).copied().unwrap_or(0) as u32) << 8
            | c.get(2).copied().unwrap_or(0) as u32;
        for (i, shift) in [18, 12, 6, 0].into_iter().enumerate() {
            if i <= c.len() {
                out.push(T[(n >> shift & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_of_an_observation_names_its_patient() {
        let mut r = AuditRecord::rest(0, "read", 200, Who::Token("ehr".into()), "n1");
        r.touch_json(
            br#"{"resourceType": "Observation", "id": "o1", "meta": {"versionId": "2"},
                 "subject": {"reference": "Patient/p9"}}"#,
        );
        r.address = Some("10.0.0.7".into());
        let v = r.to_fhir(5);
        assert_eq!(v["id"], "5");
        assert_eq!(v["action"], "R");
        assert_eq!(v["outcome"], "0");
        assert_eq!(v["subtype"][0]["code"], "read");
        assert_eq!(v["agent"][0]["who"]["display"], "token:ehr");
        assert_eq!(v["agent"][0]["network"]["address"], "10.0.0.7");
        assert_eq!(v["entity"][0]["what"]["reference"], "Patient/p9");
        assert_eq!(v["entity"][0]["role"]["code"], "1");
        assert_eq!(
            v["entity"][1]["what"]["reference"],
            "Observation/o1/_history/2"
        );
        assert_eq!(v["source"]["observer"]["display"], "n1");
    }

    #[test]
    fn repeats_are_dropped_keeping_first_places() {
        let mut v: Vec<String> = ["b", "a", "b", "c", "a", "a", "d", "c"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        dedup_in_order(&mut v);
        assert_eq!(v, ["b", "a", "c", "d"]);
        let mut r = AuditRecord::rest(0, "search-type", 200, Who::Anonymous, "n1");
        let entries: Vec<Value> = (0..3000)
            .map(|i| {
                json!({"resource": {"resourceType": "Observation", "id": format!("o{}", i % 1500),
                "subject": {"reference": format!("Patient/p{}", i % 7)}}})
            })
            .collect();
        r.touch_json(
            json!({"resourceType": "Bundle", "entry": entries})
                .to_string()
                .as_bytes(),
        );
        assert_eq!(r.entities.len(), 1500);
        assert_eq!(r.entities[1], "Observation/o1");
        assert_eq!(
            r.patients,
            (0..7).map(|i| format!("Patient/p{i}")).collect::<Vec<_>>()
        );
    }

    #[test]
    fn locations_name_resources_and_patients() {
        let mut r = AuditRecord::rest(0, "transaction", 200, Who::Anonymous, "n1");
        r.touch_location("http://h/fhir/Patient/p1/_history/1");
        r.touch_location("Observation/o1/_history/3");
        r.touch_location("Observation/o1/_history/3");
        assert_eq!(r.patients, ["Patient/p1"]);
        assert_eq!(
            r.entities,
            ["Patient/p1/_history/1", "Observation/o1/_history/3"]
        );
    }

    #[test]
    fn touch_json_reads_resources_bundles_and_locations() {
        let mut r = AuditRecord::rest(0, "search-type", 200, Who::Anonymous, "n1");
        let b = json!({"resourceType": "Bundle", "type": "searchset", "entry": [
            {"resource": {"resourceType": "Observation", "id": "o1", "meta": {"versionId": "2"},
                          "subject": {"reference": "Patient/p9", "display": "x"}, "valueQuantity": {"value": 1.50}}},
            {"resource": {"resourceType": "Patient", "id": "p8", "name": [{"family": "A"}]}},
            {"response": {"status": "201", "location": "Encounter/e1/_history/1"}}]});
        r.touch_json(b.to_string().as_bytes());
        assert_eq!(r.patients, ["Patient/p9", "Patient/p8"]);
        assert_eq!(
            r.entities,
            [
                "Observation/o1/_history/2",
                "Patient/p8",
                "Encounter/e1/_history/1"
            ]
        );
        let mut r2 = AuditRecord::rest(0, "read", 200, Who::Anonymous, "n1");
        r2.touch_json(br#"{"resourceType":"OperationOutcome","id":"x"}"#);
        r2.touch_json(b"not json");
        assert!(r2.entities.is_empty());
    }

    #[test]
    fn codes() {
        assert_eq!(outcome_of(201), 0);
        assert_eq!(outcome_of(403), 4);
        assert_eq!(outcome_of(503), 8);
        assert_eq!(action_of("delete"), 'D');
        assert_eq!(action_of("search-type"), 'R');
        assert_eq!(base64(b"name=x"), "bmFtZT14");
        assert_eq!(base64(b"ab"), "YWI=");
        assert_eq!(base64(b"a"), "YQ==");
    }
}
