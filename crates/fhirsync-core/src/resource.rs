//! Resource identity and the structural checks every incoming resource
//! passes before it reaches storage.

use std::fmt;

use serde_json::{Map, Value};

/// All resource types of FHIR R4 (4.0.1), sorted for binary search.
pub const RESOURCE_TYPES: &[&str] = &[
    "Account",
    "ActivityDefinition",
    "AdverseEvent",
    "AllergyIntolerance",
    "Appointment",
    "AppointmentResponse",
    "AuditEvent",
    "Basic",
    "Binary",
    "BiologicallyDerivedProduct",
    "BodyStructure",
    "Bundle",
    "CapabilityStatement",
    "CarePlan",
    "CareTeam",
    "CatalogEntry",
    "ChargeItem",
    "ChargeItemDefinition",
    "Claim",
    "ClaimResponse",
    "ClinicalImpression",
    "CodeSystem",
    "Communication",
    "CommunicationRequest",
    "CompartmentDefinition",
    "Composition",
    "ConceptMap",
    "Condition",
    "Consent",
    "Contract",
    "Coverage",
    "CoverageEligibilityRequest",
    "CoverageEligibilityResponse",
    "DetectedIssue",
    "Device",
    "DeviceDefinition",
    "DeviceMetric",
    "DeviceRequest",
    "DeviceUseStatement",
    "DiagnosticReport",
    "DocumentManifest",
    "DocumentReference",
    "EffectEvidenceSynthesis",
    "Encounter",
    "Endpoint",
    "EnrollmentRequest",
    "EnrollmentResponse",
    "EpisodeOfCare",
    "EventDefinition",
    "Evidence",
    "EvidenceVariable",
    "ExampleScenario",
    "ExplanationOfBenefit",
    "FamilyMemberHistory",
    "Flag",
    "Goal",
    "GraphDefinition",
    "Group",
    "GuidanceResponse",
    "HealthcareService",
    "ImagingStudy",
    "Immunization",
    "ImmunizationEvaluation",
    "ImmunizationRecommendation",
    "ImplementationGuide",
    "InsurancePlan",
    "Invoice",
    "Library",
    "Linkage",
    "List",
    "Location",
    "Measure",
    "MeasureReport",
    "Media",
    "Medication",
    "MedicationAdministration",
    "MedicationDispense",
    "MedicationKnowledge",
    "MedicationRequest",
    "MedicationStatement",
    "MedicinalProduct",
    "MedicinalProductAuthorization",
    "MedicinalProductContraindication",
    "MedicinalProductIndication",
    "MedicinalProductIngredient",
    "MedicinalProductInteraction",
    "MedicinalProductManufactured",
    "MedicinalProductPackaged",
    "MedicinalProductPharmaceutical",
    "MedicinalProductUndesirableEffect",
    "MessageDefinition",
    "MessageHeader",
    "MolecularSequence",
    "NamingSystem",
    "NutritionOrder",
    "Observation",
    "ObservationDefinition",
    "OperationDefinition",
    "OperationOutcome",
    "Organization",
    "OrganizationAffiliation",
    "Parameters",
    "Patient",
    "PaymentNotice",
    "PaymentReconciliation",
    "Person",
    "PlanDefinition",
    "Practitioner",
    "PractitionerRole",
    "Procedure",
    "Provenance",
    "Questionnaire",
    "QuestionnaireResponse",
    "RelatedPerson",
    "RequestGroup",
    "ResearchDefinition",
    "ResearchElementDefinition",
    "ResearchStudy",
    "ResearchSubject",
    "RiskAssessment",
    "RiskEvidenceSynthesis",
    "Schedule",
    "SearchParameter",
    "ServiceRequest",
    "Slot",
    "Specimen",
    "SpecimenDefinition",
    "StructureDefinition",
    "StructureMap",
    "Subscription",
    "SubscriptionTopic",
    "Substance",
    "SubstanceNucleicAcid",
    "SubstancePolymer",
    "SubstanceProtein",
    "SubstanceReferenceInformation",
    "SubstanceSourceMaterial",
    "SubstanceSpecification",
    "SupplyDelivery",
    "SupplyRequest",
    "Task",
    "TerminologyCapabilities",
    "TestReport",
    "TestScript",
    "ValueSet",
    "VerificationResult",
    "VisionPrescription",
];

/// Maximum length of a FHIR id.
pub const ID_LEN_MAX: usize = 64;

pub fn is_resource_type(t: &str) -> bool {
    RESOURCE_TYPES.binary_search(&t).is_ok()
}

/// `[A-Za-z0-9\-\.]{1,64}` (FHIR R4 `id`).
pub fn is_valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= ID_LEN_MAX
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
}

/// Why a resource was refused. Each maps to one HTTP status at the edge.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValidationError {
    #[error("body is not valid JSON: {0}")]
    Json(String),
    #[error("body must be a JSON object that is a FHIR resource")]
    NotAnObject,
    #[error("resource has no resourceType")]
    MissingType,
    #[error("unknown resourceType '{0}'")]
    UnknownType(String),
    #[error("resourceType '{found}' does not match the URL type '{expected}'")]
    TypeMismatch { expected: String, found: String },
    #[error("invalid resource id '{0}' (1 to 64 of A-Z a-z 0-9 - .)")]
    BadId(String),
    #[error("resource id '{body}' differs from the id in the URL '{url}'")]
    IdMismatch { url: String, body: String },
    #[error("resource has no id; an update needs the id of the URL in the body")]
    MissingId,
    #[error("{0}")]
    Invalid(String),
}

/// `Type/id` of a resource.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ResourceKey {
    pub rtype: String,
    pub id: String,
}

impl ResourceKey {
    pub fn new(rtype: impl Into<String>, id: impl Into<String>) -> Self {
        Self {
            rtype: rtype.into(),
            id: id.into(),
        }
    }
}

impl fmt::Display for ResourceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.rtype, self.id)
    }
}

/// Parses a request body into a JSON object resource. Numbers keep their
/// exact text (`1.50` stays `1.50`) and element order is kept.
pub fn parse_resource(body: &[u8]) -> Result<Map<String, Value>, ValidationError> {
    let v: Value =
        serde_json::from_slice(body).map_err(|e| ValidationError::Json(e.to_string()))?;
    match v {
        Value::Object(m) => Ok(m),
        _ => Err(ValidationError::NotAnObject),
    }
}

/// [`parse_resource`] for what a client writes: FHIR's JSON rules too (no
/// member twice in an object, no control characters but tab, CR and LF, no
/// empty strings, objects or arrays; see [`crate::json_rules`]).
pub fn parse_client_resource(body: &[u8]) -> Result<Map<String, Value>, ValidationError> {
    let m = parse_resource(body)?;
    crate::json_rules::check_resource_json(&m, body).map_err(ValidationError::Json)?;
    Ok(m)
}

/// Checks `resourceType` (known, and equal to `expected` when given) and the
/// id element's form; returns the type.
pub fn check_resource(
    res: &Map<String, Value>,
    expected: Option<&str>,
) -> Result<String, ValidationError> {
    let rtype = match res.get("resourceType") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => {
            return Err(ValidationError::Invalid(
                "resourceType must be a string".into(),
            ))
        }
        None => return Err(ValidationError::MissingType),
    };
    if !is_resource_type(&rtype) {
        return Err(ValidationError::UnknownType(rtype));
    }
    if let Some(exp) = expected {
        if exp != rtype {
            return Err(ValidationError::TypeMismatch {
                expected: exp.to_owned(),
                found: rtype,
            });
        }
    }
    match res.get("id") {
        None => {}
        Some(Value::String(id)) if is_valid_id(id) => {}
        Some(Value::String(id)) => return Err(ValidationError::BadId(id.clone())),
        Some(other) => return Err(ValidationError::BadId(other.to_string())),
    }
    if let Some(meta) = res.get("meta") {
        if !meta.is_object() {
            return Err(ValidationError::Invalid("meta must be an object".into()));
        }
    }
    match rtype.as_str() {
        // a topic-based (backport) subscription must be one the node can
        // serve; a query-based R4 subscription is stored as data, and the
        // node sets it to `error` when it cannot serve it
        "Subscription"
            if !res
                .get("criteria")
                .and_then(Value::as_str)
                .is_some_and(|c| c.contains('?')) =>
        {
            crate::subscription::Subscription::parse(&Value::Object(res.clone()))
                .map_err(ValidationError::Invalid)?;
        }
        // The node's own audit trail has ids of digits only; an AuditEvent
        // a client or peer stores is an ordinary resource beside it.
        "AuditEvent" if body_id(res).is_some_and(is_trail_id) => {
            return Err(ValidationError::Invalid(format!(
                "AuditEvent ids of digits only are this node's own audit trail: give AuditEvent/{} another id (fhirsync sync: --prefix-numeric-ids)",
                body_id(res).unwrap_or_default()
            )));
        }
        "SubscriptionTopic" => {
            crate::subscription::Topic::parse(&Value::Object(res.clone()))
                .map_err(ValidationError::Invalid)?;
        }
        // a topic in the Backport IG's R4 form
        "Basic" => {
            let v = Value::Object(res.clone());
            if crate::subscription::basic::is_topic(&v) {
                crate::subscription::Topic::parse(&crate::subscription::basic::topic_json(&v))
                    .map_err(|e| {
                        ValidationError::Invalid(format!("SubscriptionTopic (Basic): {e}"))
                    })?;
            }
        }
        _ => {}
    }
    Ok(rtype)
}

/// An id of the node's own audit trail (`AuditEvent/123`): digits only.
pub fn is_trail_id(id: &str) -> bool {
    !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())
}

/// The id element of a checked resource.
pub fn body_id(res: &Map<String, Value>) -> Option<&str> {
    res.get("id").and_then(Value::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn types_sorted_and_complete() {
        let mut sorted = RESOURCE_TYPES.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, RESOURCE_TYPES);
        // the 146 of R4 and SubscriptionTopic (R5), for topic-based subscriptions
        assert_eq!(RESOURCE_TYPES.len(), 147);
        assert!(is_resource_type("Patient"));
        assert!(!is_resource_type("Patients"));
    }

    #[test]
    fn ids() {
        assert!(is_valid_id("123"));
        assert!(is_valid_id("a-b.C"));
        assert!(!is_valid_id(""));
        assert!(!is_valid_id("a b"));
        assert!(!is_valid_id("a_b"));
        assert!(!is_valid_id(&"x".repeat(65)));
    }

    #[test]
    fn check() {
        let m = parse_resource(br#"{"resourceType":"Patient","id":"p1"}"#).unwrap();
        assert_eq!(check_resource(&m, Some("Patient")).unwrap(), "Patient");
        assert!(matches!(
            check_resource(&m, Some("Observation")),
            Err(ValidationError::TypeMismatch { .. })
        ));
        let m = parse_resource(br#"{"resourceType":"Nope"}"#).unwrap();
        assert!(matches!(
            check_resource(&m, None),
            Err(ValidationError::UnknownType(_))
        ));
        assert!(matches!(
            parse_resource(b"[1]"),
            Err(ValidationError::NotAnObject)
        ));
        assert!(matches!(
            parse_resource(b"{"),
            Err(ValidationError::Json(_))
        ));
    }
}
