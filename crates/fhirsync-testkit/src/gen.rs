//! Seeded generators of FHIR data shaped like real clinical records
//! (Synthea-style patient transaction Bundles, NDJSON of patients and
//! observations). The same seed always gives the same data.

use serde_json::{json, Value};

/// SplitMix64: small, fast, and reproducible from its seed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
    /// A UUID-shaped string.
    pub fn uuid(&mut self) -> String {
        let a = self.next_u64();
        let b = self.next_u64();
        format!(
            "{:08x}-{:04x}-4{:03x}-8{:03x}-{:012x}",
            a >> 32,
            (a >> 16) & 0xffff,
            a & 0xfff,
            b >> 52,
            b & 0xffff_ffff_ffff
        )
    }
    /// A decimal with exactly `places` digits after the point (`98.60`).
    pub fn decimal(&mut self, lo: u64, hi: u64, places: u32) -> Value {
        let scale = 10u64.pow(places);
        let v = lo * scale + self.below((hi - lo) * scale);
        let text = format!(
            "{}.{:0width$}",
            v / scale,
            v % scale,
            width = places as usize
        );
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }
}

const GIVEN: &[&str] = &[
    "Amina", "Joseph", "Wanjiru", "Otieno", "Grace", "Peter", "Achieng", "Daniel",
];
const FAMILY: &[&str] = &[
    "Odhiambo", "Mwangi", "Kamau", "Njoroge", "Wafula", "Chebet", "Mutua",
];
const VITALS: &[(&str, &str, &str, u64, u64)] = &[
    ("8867-4", "Heart rate", "/min", 50, 120),
    ("8310-5", "Body temperature", "Cel", 35, 40),
    ("29463-7", "Body weight", "kg", 3, 120),
    ("8302-2", "Body height", "cm", 45, 200),
    ("9279-1", "Respiratory rate", "/min", 10, 30),
    ("2339-0", "Glucose", "mg/dL", 60, 200),
];

pub fn patient(rng: &mut Rng, id: &str) -> Value {
    let given = rng.pick(GIVEN).to_string();
    let family = rng.pick(FAMILY).to_string();
    json!({
        "resourceType": "Patient",
        "id": id,
        "text": {"status": "generated", "div": format!("<div xmlns=\"http://www.w3.org/1999/xhtml\">{given} {family}</div>")},
        "identifier": [
            {"system": "urn:oid:2.16.840.1.113883.4.1", "value": format!("{:09}", rng.below(1_000_000_000))},
            {"system": "https://example.org/mrn", "value": id}
        ],
        "name": [{"use": "official", "family": family, "given": [given]}],
        "gender": rng.pick(&["male", "female"]),
        "birthDate": format!("{}-{:02}-{:02}", 1940 + rng.below(80), 1 + rng.below(12), 1 + rng.below(28)),
        "address": [{"city": rng.pick(&["Kisumu", "Nairobi", "Eldoret", "Mombasa"]), "country": "KE"}],
    })
}

pub fn observation(
    rng: &mut Rng,
    id: Option<&str>,
    patient_ref: &str,
    encounter_ref: Option<&str>,
) -> Value {
    let (code, display, unit, lo, hi) = *rng.pick(VITALS);
    let mut o = json!({
        "resourceType": "Observation",
        "status": "final",
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs", "display": "vital-signs"}]}],
        "code": {"coding": [{"system": "http://loinc.org", "code": code, "display": display}], "text": display},
        "subject": {"reference": patient_ref},
        "effectiveDateTime": format!("20{:02}-{:02}-{:02}T{:02}:{:02}:00+03:00", 10 + rng.below(16), 1 + rng.below(12), 1 + rng.below(28), rng.below(24), rng.below(60)),
        "issued": "2024-01-01T10:00:00.000+03:00",
        "valueQuantity": {"value": rng.decimal(lo, hi, 2), "unit": unit, "system": "http://unitsofmeasure.org", "code": unit},
    });
    o["meta"] = json!({"profile": ["http://hl7.org/fhir/StructureDefinition/vitalsigns"]});
    let summary = format!(
        "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p><b>{display}</b> ({code}): {} {unit}, recorded {}, status final, category vital-signs</p></div>",
        o["valueQuantity"]["value"],
        o["effectiveDateTime"].as_str().unwrap_or("")
    );
    o["text"] = json!({"status": "generated", "div": summary});
    o["referenceRange"] = json!([{"low": {"value": lo, "unit": unit}, "high": {"value": hi, "unit": unit}, "text": "normal range for an adult"}]);
    if let Some(id) = id {
        o["id"] = json!(id);
    }
    if let Some(e) = encounter_ref {
        o["encounter"] = json!({"reference": e});
    }
    o
}

/// One NDJSON line of a deterministic data set: for every patient, four
/// observations that point to it. Line `i` always has the same content.
pub fn ndjson_line(seed: u64, i: u64) -> String {
    let mut rng = Rng::new(seed ^ i.wrapping_mul(0x2545_F491_4F6C_DD1D));
    let p = i / 5;
    let v = if i.is_multiple_of(5) {
        patient(&mut rng, &format!("p{p}"))
    } else {
        observation(
            &mut rng,
            Some(&format!("o{i}")),
            &format!("Patient/p{p}"),
            None,
        )
    };
    v.to_string()
}

/// A transaction Bundle shaped like one Synthea patient: conditional
/// Organization and Practitioner, the Patient, and `encounters` Encounters
/// each with `obs_per_encounter` Observations, all linked by `urn:uuid:`.
pub fn synthea_like_bundle(rng: &mut Rng, encounters: usize, obs_per_encounter: usize) -> Value {
    let mut entries = Vec::new();
    let org = format!("org-{}", rng.below(20));
    let pract = format!("pract-{}", rng.below(50));
    entries.push(json!({
        "fullUrl": format!("urn:uuid:{}", rng.uuid()),
        "resource": {"resourceType": "Organization", "identifier": [{"system": "https://example.org/org", "value": org}], "name": format!("Clinic {org}")},
        "request": {"method": "POST", "url": "Organization", "ifNoneExist": format!("identifier=https://example.org/org|{org}")}
    }));
    let org_url = entries[0]["fullUrl"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    entries.push(json!({
        "fullUrl": format!("urn:uuid:{}", rng.uuid()),
        "resource": {"resourceType": "Practitioner", "identifier": [{"system": "http://hl7.org/fhir/sid/us-npi", "value": pract}], "name": [{"family": rng.pick(FAMILY)}]},
        "request": {"method": "POST", "url": "Practitioner", "ifNoneExist": format!("identifier=http://hl7.org/fhir/sid/us-npi|{pract}")}
    }));
    let pract_url = entries[1]["fullUrl"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let patient_url = format!("urn:uuid:{}", rng.uuid());
    let mut p = patient(rng, "x");
    if let Some(m) = p.as_object_mut() {
        m.remove("id");
    }
    entries.push(json!({"fullUrl": patient_url, "resource": p, "request": {"method": "POST", "url": "Patient"}}));
    for _ in 0..encounters {
        let enc_url = format!("urn:uuid:{}", rng.uuid());
        entries.push(json!({
            "fullUrl": enc_url,
            "resource": {
                "resourceType": "Encounter", "status": "finished",
                "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
                "type": [{"coding": [{"system": "http://snomed.info/sct", "code": "185349003", "display": "Encounter for check up"}], "text": "Encounter for check up"}],
                "subject": {"reference": patient_url},
                "participant": [{"individual": {"reference": pract_url}}],
                "period": {"start": "2020-01-01T10:00:00+03:00", "end": "2020-01-01T10:30:00+03:00"},
                "serviceProvider": {"reference": org_url}
            },
            "request": {"method": "POST", "url": "Encounter"}
        }));
        for _ in 0..obs_per_encounter {
            let mut o = observation(rng, None, &patient_url, Some(&enc_url));
            o["performer"] = json!([{"reference": pract_url}]);
            entries.push(json!({
                "fullUrl": format!("urn:uuid:{}", rng.uuid()),
                "resource": o,
                "request": {"method": "POST", "url": "Observation"}
            }));
        }
    }
    json!({"resourceType": "Bundle", "type": "transaction", "entry": entries})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deterministic() {
        assert_eq!(ndjson_line(7, 3), ndjson_line(7, 3));
        assert_ne!(ndjson_line(7, 3), ndjson_line(8, 3));
        let a = synthea_like_bundle(&mut Rng::new(1), 3, 4);
        let b = synthea_like_bundle(&mut Rng::new(1), 3, 4);
        assert_eq!(a, b);
        assert_eq!(a["entry"].as_array().map(Vec::len), Some(3 + 3 + 12));
    }

    #[test]
    fn decimals_keep_places() {
        let mut r = Rng::new(3);
        for _ in 0..50 {
            let d = r.decimal(1, 9, 2).to_string();
            assert_eq!(d.split('.').nth(1).map(str::len), Some(2), "{d}");
        }
    }
}
