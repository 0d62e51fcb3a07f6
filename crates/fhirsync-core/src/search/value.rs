//! The value syntax of each search parameter type: prefixes, tokens,
//! references, dates, numbers, quantities and composites.

use super::{bad, Clause, CompB, Cond, Prefix, SearchError, TextOp};
use crate::index::{self, Param, IDENTIFIER_SUFFIX, OF_TYPE_SUFFIX, TEXT_SUFFIX};
use crate::instant::parse_range;
use crate::resource::{is_resource_type, is_valid_id};
use crate::spec::Kind;

/// Splits a leading comparison prefix off a date, number or quantity.
pub(super) fn prefix(v: &str) -> (Prefix, &str) {
    let p = match v.get(..2) {
        Some("eq") => Prefix::Eq,
        Some("ne") => Prefix::Ne,
        Some("gt") => Prefix::Gt,
        Some("ge") => Prefix::Ge,
        Some("lt") => Prefix::Lt,
        Some("le") => Prefix::Le,
        Some("sa") => Prefix::Sa,
        Some("eb") => Prefix::Eb,
        Some("ap") => Prefix::Ap,
        _ => return (Prefix::Eq, v),
    };
    (p, &v[2..])
}

/// A date value as `[lo, hi)` ms with its prefix.
pub(super) fn date(k: &str, v: &str) -> Result<(Prefix, i64, i64), SearchError> {
    // An unencoded `+` of a zone offset arrives as a space after form decoding.
    let fixed = v.replace(' ', "+");
    let (p, rest) = prefix(&fixed);
    if rest.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(bad(k, v, "prefixes are eq, ne, gt, lt, ge, le, sa, eb, ap"));
    }
    let (lo, hi) = parse_range(rest).ok_or_else(|| bad(k, v, "not a FHIR date or instant"))?;
    Ok((p, lo, hi))
}

/// A decimal as written and the range its precision implies.
pub(super) fn number(k: &str, v: &str) -> Result<(f64, f64, f64), SearchError> {
    let x: f64 = v
        .parse()
        .ok()
        .filter(|x: &f64| x.is_finite())
        .ok_or_else(|| bad(k, v, "not a number"))?;
    let (mantissa, exp) = match v.to_ascii_lowercase().split_once('e') {
        Some((m, e)) => (m.to_owned(), e.parse::<i32>().unwrap_or(0)),
        None => (v.to_owned(), 0),
    };
    let decimals = mantissa.split_once('.').map_or(0, |(_, f)| f.len() as i32);
    let half = 0.5 * 10f64.powi(exp - decimals);
    // a precision finer than a double's (16.992228104112467) must still
    // take the value itself: [x, next above x) at least
    Ok((x, (x - half).min(x), (x + half).max(x.next_up())))
}

#[cfg(test)]
mod number_tests {
    /// The range of a value always holds the value, however many digits.
    #[test]
    fn a_range_holds_its_value() {
        for v in [
            "15.992228104112467",
            "1e-300",
            "91",
            "0.000100",
            "123456789012345678901",
        ] {
            let (x, lo, hi) = super::number("n", v).unwrap();
            assert!(lo <= x && x < hi, "{v}: [{lo}, {hi}) {x}");
        }
    }
}

fn token(param: &str, v: &str) -> Cond {
    let (system, value) = match v.split_once('|') {
        None => (None, Some(v.to_owned())),
        Some((s, c)) => (Some(s.to_owned()), (!c.is_empty()).then(|| c.to_owned())),
    };
    Cond::Token {
        param: param.to_owned(),
        system,
        value,
    }
}

/// The reference alternatives of `v`, read relative to `base` (this
/// server's address) when it is absolute.
fn reference(
    p: &Param,
    type_modifier: Option<&str>,
    v: &str,
    base: Option<&str>,
) -> Result<Cond, SearchError> {
    let k = p.code;
    let local = base
        .and_then(|b| v.strip_prefix(b.trim_end_matches('/')))
        .and_then(|r| r.strip_prefix('/'))
        .unwrap_or(v);
    let tok = |system: Option<&str>, value: &str| Cond::Token {
        param: k.to_owned(),
        system: system.map(str::to_owned),
        value: Some(value.to_owned()),
    };
    if local.contains("://") || local.starts_with("urn:") {
        let url = local.split_once('|').map_or(local, |(u, _)| u);
        return Ok(tok(Some(""), url));
    }
    let unversioned = local.find("/_history/").map_or(local, |i| &local[..i]);
    if let Some((t, id)) = unversioned.split_once('/') {
        if !is_resource_type(t) {
            return Err(bad(k, v, "unknown resource type in reference"));
        }
        if !is_valid_id(id) {
            return Err(bad(k, v, "not a valid id in reference"));
        }
        if type_modifier.is_some_and(|m| m != t) {
            return Err(bad(k, v, "the reference's type is not the modifier's"));
        }
        return Ok(tok(Some(t), id));
    }
    if !is_valid_id(unversioned) {
        return Err(bad(k, v, "expected Type/id, an id or a URL"));
    }
    let only = match (type_modifier, p.targets) {
        (Some(t), _) => Some(t),
        (None, [t]) => Some(*t),
        _ => None,
    };
    Ok(tok(only, unversioned))
}

/// The second part of a composite value, by the component's type.
fn comp_b(k: &str, kind: Kind, v: &str) -> Result<CompB, SearchError> {
    Ok(match kind {
        Kind::Token | Kind::Reference | Kind::Uri => match token("", v) {
            Cond::Token { system, value, .. } => CompB::Token(system, value),
            _ => unreachable!("token() builds a token"),
        },
        Kind::String => CompB::Text(index::fold(v)),
        Kind::Date => {
            let (p, lo, hi) = date(k, v)?;
            CompB::Range(p, lo as f64, hi as f64, lo as f64)
        }
        Kind::Number | Kind::Quantity => {
            let q = quantity(k, v)?;
            CompB::Number(q)
        }
        Kind::Composite | Kind::Special => return Err(bad(k, v, "unsupported composite part")),
    })
}

/// `[prefix]number[|system|code]`.
pub(super) fn quantity(k: &str, v: &str) -> Result<super::NumberCond, SearchError> {
    let (p, rest) = prefix(v);
    let mut parts = rest.splitn(3, '|');
    let num = parts.next().unwrap_or("");
    let (x, lo, hi) = number(k, num)?;
    let system = parts.next().map(str::to_owned);
    let code = parts.next().filter(|c| !c.is_empty()).map(str::to_owned);
    let system = system.filter(|s| !s.is_empty() || code.is_none());
    Ok(super::NumberCond {
        prefix: p,
        value: x,
        lo,
        hi,
        system: system.filter(|s| !s.is_empty()),
        code,
    })
}

/// The clause of parameter `p` with `modifier` and the comma-separated
/// `value`; `Ok(None)` when the modifier is one this server does not
/// serve (reported as unsupported).
pub(super) fn clause(
    p: &Param,
    modifier: Option<&str>,
    value: &str,
    base: Option<&str>,
) -> Result<Option<Clause>, SearchError> {
    let k = p.code;
    if modifier == Some("missing") {
        let missing = match value {
            "true" => true,
            "false" => false,
            _ => return Err(bad(k, value, "expected true or false")),
        };
        return Ok(Some(Clause::Missing {
            kind: p.kind,
            param: k.to_owned(),
            missing,
        }));
    }
    let alts = value.split(',');
    let mut any = Vec::new();
    let mut negate = false;
    match (p.kind, modifier) {
        (Kind::Token, None) => any.extend(alts.map(|v| token(k, v))),
        (Kind::Token, Some("not")) => {
            negate = true;
            any.extend(alts.map(|v| token(k, v)));
        }
        (Kind::Token, Some("text")) => any.extend(alts.map(|v| Cond::Text {
            param: format!("{k}{TEXT_SUFFIX}"),
            op: TextOp::Starts,
            value: index::fold(v),
        })),
        (Kind::Token, Some("of-type")) => {
            for v in alts {
                let mut it = v.splitn(3, '|');
                let (Some(s), Some(c), Some(val)) = (it.next(), it.next(), it.next()) else {
                    return Err(bad(k, v, "expected system|code|value"));
                };
                any.push(Cond::Token {
                    param: format!("{k}{OF_TYPE_SUFFIX}"),
                    system: Some(s.to_owned()),
                    value: Some(format!("{c}|{val}")),
                });
            }
        }
        (Kind::Token, Some("above" | "below" | "in" | "not-in")) => return Ok(None),
        (Kind::Reference, Some("identifier")) => {
            any.extend(alts.map(|v| token(&format!("{k}{IDENTIFIER_SUFFIX}"), v)))
        }
        (Kind::Reference, Some(t)) if is_resource_type(t) => {
            for v in alts {
                any.push(reference(p, Some(t), v, base)?);
            }
        }
        (Kind::Reference, None) => {
            for v in alts {
                any.push(reference(p, None, v, base)?);
            }
        }
        (Kind::Reference, Some("above" | "below")) => return Ok(None),
        (Kind::String, m @ (None | Some("exact") | Some("contains"))) => {
            any.extend(alts.map(|v| {
                let (op, value) = match m {
                    Some("exact") => (TextOp::Exact, v.to_owned()),
                    Some("contains") => (TextOp::Contains, index::fold(v)),
                    _ => (TextOp::Starts, index::fold(v)),
                };
                Cond::Text {
                    param: k.to_owned(),
                    op,
                    value,
                }
            }))
        }
        (Kind::Uri, None) => any.extend(alts.map(|v| Cond::Token {
            param: k.to_owned(),
            system: Some(String::new()),
            value: Some(v.to_owned()),
        })),
        (Kind::Uri, Some(m @ ("below" | "above"))) => any.extend(alts.map(|v| Cond::Uri {
            param: k.to_owned(),
            below: m == "below",
            value: v.to_owned(),
        })),
        (Kind::Date, None) => {
            for v in alts {
                let (prefix, lo, hi) = date(k, v)?;
                any.push(Cond::Date {
                    param: k.to_owned(),
                    prefix,
                    lo,
                    hi,
                });
            }
        }
        (Kind::Number | Kind::Quantity, None) => {
            for v in alts {
                let q = quantity(k, v)?;
                if p.kind == Kind::Number && (q.system.is_some() || q.code.is_some()) {
                    return Err(bad(k, v, "a number takes no system or unit"));
                }
                any.push(Cond::Number {
                    param: k.to_owned(),
                    q,
                });
            }
        }
        (Kind::Composite, None) => {
            let [(ka, _), (kb, _)] = p.components.as_slice() else {
                return Ok(None);
            };
            if !matches!(ka, Kind::Token | Kind::Reference | Kind::Uri) {
                return Ok(None);
            }
            for v in alts {
                let Some((a, b)) = v.split_once('$') else {
                    return Err(bad(k, v, "a composite value is first$second"));
                };
                let Cond::Token { system, value, .. } = token(k, a) else {
                    unreachable!("token() builds a token")
                };
                any.push(Cond::Composite {
                    param: k.to_owned(),
                    a_sys: system,
                    a_val: value,
                    b: comp_b(k, *kb, b)?,
                });
            }
        }
        (Kind::Special, _) | (Kind::Composite, Some(_)) => return Ok(None),
        (_, Some(m)) => {
            return Err(SearchError::BadModifier {
                param: k.to_owned(),
                modifier: m.to_owned(),
            })
        }
    }
    Ok(Some(if negate {
        Clause::Not(any)
    } else {
        Clause::Any(any)
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_carry_their_precision() {
        assert_eq!(number("n", "100").unwrap(), (100.0, 99.5, 100.5));
        let (_, lo, hi) = number("n", "1.5").unwrap();
        assert!((lo - 1.45).abs() < 1e-9 && (hi - 1.55).abs() < 1e-9);
        assert!(number("n", "abc").is_err());
        assert!(number("n", "inf").is_err());
    }

    #[test]
    fn quantities() {
        let q = quantity("q", "gt5.4|http://unitsofmeasure.org|mg").unwrap();
        assert_eq!(q.prefix, Prefix::Gt);
        assert_eq!(q.system.as_deref(), Some("http://unitsofmeasure.org"));
        assert_eq!(q.code.as_deref(), Some("mg"));
        let q = quantity("q", "5.4||mg").unwrap();
        assert_eq!((q.system, q.code.as_deref()), (None, Some("mg")));
    }
}
