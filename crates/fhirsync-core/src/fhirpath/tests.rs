use super::*;
use serde_json::json;

fn check(expr: &str, want: bool) {
    let res = json!({
        "resourceType": "Patient",
        "active": true,
        "gender": "female",
        "birthDate": "1980-05-01",
        "name": [{"family": "Otieno", "given": ["Akinyi", "B"]}],
        "address": [{"city": "Kisumu"}, {"city": "Nairobi"}],
        "multipleBirthInteger": 2,
    });
    let e = parse(expr).unwrap_or_else(|err| panic!("{expr}: {err}"));
    assert_eq!(matches(&e, &res), want, "{expr}");
}

#[test]
fn evaluates() {
    check("active", true);
    check("Patient.active = true", true);
    check("Observation.status = 'final'", false);
    check("gender = 'female' and name.family = 'Otieno'", true);
    check(
        "gender = 'male' or address.city.first().contains('Kis')",
        true,
    );
    check("address.where(city = 'Kisumu').exists()", true);
    check("address.city.first() = 'Kisumu'", true);
    check("'Nairobi' in address.city", true);
    check("gender in ('male' | 'other')", false);
    check("name.given.count() = 2", true);
    check(
        "multipleBirthInteger >= 2 and multipleBirthInteger < 3",
        true,
    );
    check("multipleBirth = 2", true);
    check("deceasedBoolean.exists().not()", true);
    check("deceasedBoolean = true", false);
    check("telecom.empty()", true);
    check("name.family.startsWith('Oti')", true);
    check("(gender = 'male') implies active", true);
    check("birthDate < @1990-01-01", true);
    check("birthDate > @1980-05", false);
    check("name.given.select($this.upper()).first() = 'AKINYI'", true);
    check("name.family.lower().matches('^oti.*')", true);
    check("(birthDate + 10 years) = @1990-05-01", true);
    check("iif(active, 1, 2) = 1", true);
}

#[test]
fn previous_and_current() {
    let old = json!({"resourceType": "Patient", "active": false});
    let new = json!({"resourceType": "Patient", "active": true});
    let mut env = Env::new();
    env.set("previous", Some(&old)).set("current", Some(&new));
    let e = parse("%previous.active = false and %current.active = true").unwrap();
    assert!(matches_with(&e, &new, &env));
    let mut env = Env::new();
    env.set("previous", None).set("current", Some(&new));
    assert!(matches_with(
        &parse("%previous.empty()").unwrap(),
        &new,
        &env
    ));
    // an unknown variable is an evaluation error: the criterion does not pass
    assert!(!matches(&parse("%nothing.exists()").unwrap(), &new));
}

#[test]
fn refuses_what_it_cannot_do() {
    for bad in [
        "",
        "a =",
        "name.resolvee()",
        "a.'x'",
        "f(",
        "'open",
        "2 + 2 /",
        "2 /* x",
        "exists(1, 2)",
    ] {
        assert!(parse(bad).is_err(), "{bad}");
    }
}

#[test]
fn overflow_is_an_error_not_a_panic() {
    let p = json!({"resourceType": "Patient", "birthDate": "2000-01-01"});
    for e in [
        "(birthDate + 99999999999999 days) > @2000-01-01",
        "(birthDate + 999999999999 years) > @2000-01-01",
        "9223372036854775807 + 1 = 0",
        "(79228162514264337593543950335.0 * 10.0) > 0",
        "(79228162514264337593543950335 'g' * 10 'g') > 0 'g'",
        "(-9223372036854775807 - 2) div -1 = 0",
        "(1 'kg' * 1.0) = 1000 'g'",
        "2.power(1000) > 0",
        "0.0000000000000000000000000001.lowBoundary() < 1",
        "(@2000-01-01 + 5000000 years) > @2000-01-01",
    ] {
        let x = parse(e).unwrap_or_else(|err| panic!("{e}: {err}"));
        let _ = matches(&x, &p);
        let _ = evaluate(&x, &p, &Env::new());
    }
}

/// The forms of nesting sub-expressions inside each other, `n` deep.
fn nested_forms(n: usize) -> Vec<(&'static str, String)> {
    vec![
        (
            "parentheses",
            format!("{}true{}", "(".repeat(n), ")".repeat(n)),
        ),
        (
            "where in where",
            format!("{}true{}", "where(".repeat(n), ")".repeat(n)),
        ),
        ("unary minus", format!("{}1", "-".repeat(n))),
        (
            "indexers in indexers",
            format!("{}0{}", "name[".repeat(n), "]".repeat(n)),
        ),
    ]
}

/// The forms that make a deep tree without nesting, `n` long.
fn chained_forms(n: usize) -> Vec<(&'static str, String)> {
    vec![
        ("method chain", format!("true{}", ".not()".repeat(n))),
        ("union run", vec!["active"; n + 1].join(" | ")),
        ("and run", vec!["active"; n + 1].join(" and ")),
        ("member chain", format!("Patient{}", ".name".repeat(n))),
        ("indexers", format!("name{}", "[0]".repeat(n))),
    ]
}

#[test]
fn deep_and_long_expressions_are_refused_not_a_crash() {
    // The reported one: 2,000 pairs of parentheses.
    let e = parse(&format!("{}true{}", "(".repeat(2000), ")".repeat(2000))).unwrap_err();
    assert!(e.to_string().contains("NEST_MAX"), "{e}");
    for (form, text) in nested_forms(NEST_MAX + 1) {
        let e = parse(&text).expect_err(form);
        assert!(e.to_string().contains("NEST_MAX"), "{form}: {e}");
    }
    for (form, text) in chained_forms(DEPTH_MAX + 1) {
        let e = parse(&text).expect_err(form);
        assert!(e.to_string().contains("DEPTH_MAX"), "{form}: {e}");
    }
    for (form, text) in nested_forms(100_000)
        .into_iter()
        .chain(chained_forms(100_000))
    {
        let e = parse(&text).expect_err(form);
        assert!(
            e.to_string().contains("EXPRESSION_BYTES_MAX"),
            "{form}: {e}"
        );
    }
}

#[test]
fn the_deepest_accepted_expressions_evaluate_on_a_small_stack() {
    // A tokio worker's stack (2 MiB), in a debug build: every form at the
    // deepest the parser takes parses, evaluates and drops without running
    // out of stack.
    std::thread::Builder::new()
        .stack_size(2 << 20)
        .spawn(|| {
            let res = json!({"resourceType": "Patient", "active": true,
                             "name": [{"family": "Otieno"}]});
            let deepest = nested_forms(NEST_MAX)
                .into_iter()
                .chain(chained_forms(DEPTH_MAX - 2));
            for (form, text) in deepest {
                let e = parse(&text).unwrap_or_else(|err| panic!("{form}: {err}"));
                let _ = evaluate(&e, &res, &Env::new());
                drop(e);
            }
        })
        .unwrap()
        .join()
        .unwrap();
}

#[test]
fn costly_evaluations_stop_with_an_error() {
    let res = json!({"resourceType": "Patient", "name": [{"family": "Otieno", "given": ["a", "b", "c"]}],
                     "address": [{"line": ["1", "2"], "city": "Kisumu"}, {"city": "Nairobi"}]});
    let run = |text: &str| {
        let e = parse(text).unwrap();
        evaluate(&e, &res, &Env::new())
    };
    // A string doubling at every step.
    let doubling = format!("'ab'{}", ".replace('ab', 'abab')".repeat(40));
    let e = run(&doubling).map(|r| r.len()).unwrap_err();
    assert!(e.to_string().contains("STRING_BYTES_MAX"), "{e}");
    let e = run("'x'.replace('', 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy').replace('', 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy').replace('', 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy').replace('', 'yyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyyy')").map(|r| r.len()).unwrap_err();
    assert!(e.to_string().contains("STRING_BYTES_MAX"), "{e}");
    // Collections that grow at every step.
    let growing = format!(
        "descendants(){}",
        ".select(%resource.descendants())".repeat(8)
    );
    let e = run(&growing).map(|r| r.len()).unwrap_err();
    assert!(e.to_string().contains("WORK_MAX"), "{e}");
    let dedup = format!(
        "descendants(){}",
        ".repeat(%resource.descendants())".repeat(4)
    );
    assert!(run(&dedup).map(|r| r.len()).is_ok());
    // A cheap expression is untouched.
    assert_eq!(run("name.given.count()").unwrap().len(), 1);
}

#[test]
fn an_escaped_character_of_several_bytes_is_read_whole() {
    // Found by the fuzzer: the lexer stepped into the middle of 'Ӌ'.
    let e = parse("'\\Ӌ' = 'Ӌ' and '\\é\\n' = 'é\n'").unwrap();
    assert!(matches(&e, &json!({"resourceType": "Patient"})));
    assert!(parse("'\\").is_err());
}
