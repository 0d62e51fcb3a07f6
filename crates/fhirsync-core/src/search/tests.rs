use super::*;

fn parse(qs: &str) -> Result<SearchQuery, SearchError> {
    SearchQuery::parse_query_string(Some("Observation"), qs)
}

fn token(param: &str, system: Option<&str>, value: Option<&str>) -> Cond {
    Cond::Token {
        param: param.into(),
        system: system.map(Into::into),
        value: value.map(Into::into),
    }
}

#[test]
fn tokens_and_refs() {
    let q = parse("identifier=s%7C1,%7C2,s%7C&patient=p1&subject=Patient/p2").unwrap();
    assert_eq!(q.clauses.len(), 3);
    assert_eq!(
        q.clauses[0],
        Clause::Any(vec![
            token("identifier", Some("s"), Some("1")),
            token("identifier", Some(""), Some("2")),
            token("identifier", Some("s"), None),
        ])
    );
    assert_eq!(
        q.clauses[1],
        Clause::Any(vec![token("patient", None, Some("p1"))])
    );
    assert_eq!(
        q.clauses[2],
        Clause::Any(vec![token("subject", Some("Patient"), Some("p2"))])
    );
    let q = SearchQuery::parse_at(
        Some("Observation"),
        &query_pairs("subject=http://me/fhir/Patient/9"),
        Some("http://me/fhir"),
    )
    .unwrap();
    assert_eq!(
        q.clauses[0],
        Clause::Any(vec![token("subject", Some("Patient"), Some("9"))])
    );
    assert!(parse("subject=Foo/1").is_err());
    assert!(parse("subject:Patient=Group/1").is_err());
}

#[test]
fn modifiers_and_kinds() {
    let q = parse("status:not=final&code:text=Heart&value-quantity=gt5.4%7C%7Cmg&date=ge2020&combo-code-value-quantity=http://loinc.org%7C8480-6$lt60").unwrap();
    assert!(matches!(&q.clauses[0], Clause::Not(v) if v.len() == 1));
    assert_eq!(
        q.clauses[1],
        Clause::Any(vec![Cond::Text {
            param: "code:text".into(),
            op: TextOp::Starts,
            value: "heart".into()
        }])
    );
    assert!(
        matches!(&q.clauses[2], Clause::Any(v) if matches!(&v[0], Cond::Number { q, .. } if q.prefix == Prefix::Gt && q.code.as_deref() == Some("mg")))
    );
    assert!(
        matches!(&q.clauses[3], Clause::Any(v) if matches!(&v[0], Cond::Date { prefix: Prefix::Ge, .. }))
    );
    assert!(matches!(&q.clauses[4], Clause::Any(v) if matches!(&v[0], Cond::Composite { .. })));
    assert!(parse("status:exact=x").is_err(), "no :exact on a token");
    assert!(parse("date=xx2020").is_err());
    assert!(parse("date=2020-99").is_err());
    assert!(parse("value-quantity=abc").is_err());
    assert!(parse("code:missing=maybe").is_err());
    let q = parse("code:missing=true").unwrap();
    assert!(matches!(
        &q.clauses[0],
        Clause::Missing {
            missing: true,
            kind: Kind::Token,
            ..
        }
    ));
}

#[test]
fn chains_has_and_includes() {
    let q = parse("subject:Patient.name=otieno&_include=Observation:subject&_revinclude=Provenance:target:Observation&_include:iterate=Patient:organization").unwrap();
    let Clause::Chain { param, targets } = &q.clauses[0] else {
        panic!("{:?}", q.clauses[0])
    };
    assert_eq!(param, "subject");
    assert_eq!(targets.len(), 1);
    assert_eq!(targets[0].0, "Patient");
    assert_eq!(q.includes.len(), 2);
    assert!(q.includes[1].iterate);
    assert_eq!(q.revincludes[0].target.as_deref(), Some("Observation"));
    // Without a type, every target type that has the parameter.
    let q = parse("subject.name=x").unwrap();
    let Clause::Chain { targets, .. } = &q.clauses[0] else {
        panic!()
    };
    assert!(
        targets.iter().any(|(t, _)| t == "Patient") && targets.iter().any(|(t, _)| t == "Location")
    );
    let q =
        SearchQuery::parse_query_string(Some("Patient"), "_has:Observation:patient:code=1234-5")
            .unwrap();
    assert!(
        matches!(&q.clauses[0], Clause::Has { rtype, param, .. } if rtype == "Observation" && param == "patient")
    );
    assert!(
        SearchQuery::parse_query_string(Some("Patient"), "_has:Observation:code:code=1").is_err()
    );
    assert!(parse("_include=Observation:status").is_err());
    let deep = "subject.organization.partof.partof.partof.partof.name=x";
    assert!(matches!(parse(deep), Err(SearchError::Limit(_))));
}

#[test]
fn sort_summary_paging() {
    let q = parse("_lastUpdated=gt2020-01-01&_lastUpdated=le2021&_count=5&_sort=-_lastUpdated")
        .unwrap();
    assert_eq!(q.clauses.len(), 2);
    assert_eq!(q.count, 5);
    assert!(q.by_seq() && q.descending());
    let q = parse("_sort=-date,code&_summary=data&_elements=status,code").unwrap();
    assert!(!q.by_seq());
    assert_eq!(
        q.sort[0],
        SortKey {
            param: "date".into(),
            kind: Some(Kind::Date),
            desc: true
        }
    );
    assert_eq!(q.summary, Summary::Data);
    assert_eq!(q.elements, vec!["status", "code"]);
    assert!(parse("_sort=nonsense").is_err());
    assert!(parse("_count=abc").is_err());
    assert!(parse("_count=0").unwrap().summary_count());
}

#[test]
fn unsupported_collected() {
    let q = parse("nonsense=smith&_format=json&code:below=x").unwrap();
    assert_eq!(
        q.unsupported,
        vec!["nonsense".to_string(), "code:below".to_string()]
    );
}

#[test]
fn date_clause_semantics() {
    let d = |p| DateClause {
        prefix: p,
        start_ms: 10,
        end_ms: 20,
    };
    assert!(d(Prefix::Eq).matches(10) && !d(Prefix::Eq).matches(20));
    assert!(d(Prefix::Ne).matches(20) && !d(Prefix::Ne).matches(10));
    assert!(d(Prefix::Gt).matches(20) && !d(Prefix::Gt).matches(19));
    assert!(d(Prefix::Ge).matches(10) && !d(Prefix::Ge).matches(9));
    assert!(d(Prefix::Lt).matches(9) && !d(Prefix::Lt).matches(10));
    assert!(d(Prefix::Le).matches(19) && !d(Prefix::Le).matches(20));
}

#[test]
fn conditional_queries_have_clauses() {
    let q = SearchQuery::parse_query_string(Some("Patient"), "identifier=urn:mrn|m").unwrap();
    assert_eq!(q.clauses.len(), 1, "{q:?}");
}

#[test]
fn includes_are_bounded() {
    let many: Vec<String> = (0..=INCLUDES_MAX)
        .map(|_| "_include=Observation:subject".to_string())
        .collect();
    let err = parse(&many.join("&")).unwrap_err();
    assert!(err.to_string().contains("INCLUDES_MAX"), "{err}");
    assert!(parse(&many[..INCLUDES_MAX].join("&")).is_ok());
}
