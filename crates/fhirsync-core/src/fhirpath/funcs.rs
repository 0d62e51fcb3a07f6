//! FHIRPath functions: existence, filtering, subsetting, conversion,
//! strings, math, tree navigation, dates and the FHIR additions.

use std::cmp::Ordering;

use chrono::{Local, Offset};
use regex::Regex;
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, MathematicalOps};
use serde_json::Value;

use super::eval::{
    boolean, eval, exec, member, single, string_fits, truth, type_is, union, Coll, Cx, R,
};
use super::parse::Expr;
use super::value::{dec_f64, dec_from_f64, equal, num, parse_decimal, time_of, Item, Temporal};
use super::Error;

/// Name, least and most arguments.
const FUNCTIONS: &[(&str, usize, usize)] = &[
    ("empty", 0, 0),
    ("exists", 0, 1),
    ("all", 1, 1),
    ("allTrue", 0, 0),
    ("anyTrue", 0, 0),
    ("allFalse", 0, 0),
    ("anyFalse", 0, 0),
    ("subsetOf", 1, 1),
    ("supersetOf", 1, 1),
    ("count", 0, 0),
    ("distinct", 0, 0),
    ("isDistinct", 0, 0),
    ("where", 1, 1),
    ("select", 1, 1),
    ("repeat", 1, 1),
    ("ofType", 1, 1),
    ("is", 1, 1),
    ("as", 1, 1),
    ("single", 0, 0),
    ("first", 0, 0),
    ("last", 0, 0),
    ("tail", 0, 0),
    ("skip", 1, 1),
    ("take", 1, 1),
    ("intersect", 1, 1),
    ("exclude", 1, 1),
    ("union", 1, 1),
    ("combine", 1, 1),
    ("iif", 2, 3),
    ("toBoolean", 0, 0),
    ("convertsToBoolean", 0, 0),
    ("toInteger", 0, 0),
    ("convertsToInteger", 0, 0),
    ("toDecimal", 0, 0),
    ("convertsToDecimal", 0, 0),
    ("toString", 0, 0),
    ("convertsToString", 0, 0),
    ("toDate", 0, 0),
    ("convertsToDate", 0, 0),
    ("toDateTime", 0, 0),
    ("convertsToDateTime", 0, 0),
    ("toTime", 0, 0),
    ("convertsToTime", 0, 0),
    ("toQuantity", 0, 1),
    ("convertsToQuantity", 0, 1),
    ("indexOf", 1, 1),
    ("substring", 1, 2),
    ("startsWith", 1, 1),
    ("endsWith", 1, 1),
    ("contains", 1, 1),
    ("upper", 0, 0),
    ("lower", 0, 0),
    ("replace", 2, 2),
    ("matches", 1, 1),
    ("matchesFull", 1, 1),
    ("replaceMatches", 2, 2),
    ("length", 0, 0),
    ("toChars", 0, 0),
    ("trim", 0, 0),
    ("split", 1, 1),
    ("join", 0, 1),
    ("encode", 1, 1),
    ("decode", 1, 1),
    ("escape", 1, 1),
    ("unescape", 1, 1),
    ("abs", 0, 0),
    ("ceiling", 0, 0),
    ("exp", 0, 0),
    ("floor", 0, 0),
    ("ln", 0, 0),
    ("log", 1, 1),
    ("power", 1, 1),
    ("round", 0, 1),
    ("sqrt", 0, 0),
    ("truncate", 0, 0),
    ("children", 0, 0),
    ("descendants", 0, 0),
    ("trace", 1, 2),
    ("now", 0, 0),
    ("today", 0, 0),
    ("timeOfDay", 0, 0),
    ("not", 0, 0),
    ("aggregate", 1, 2),
    ("sort", 0, 9),
    ("extension", 1, 1),
    ("hasValue", 0, 0),
    ("getValue", 0, 0),
    ("lowBoundary", 0, 1),
    ("highBoundary", 0, 1),
    ("precision", 0, 0),
    ("type", 0, 0),
    ("resolve", 0, 0),
];

/// `resolve()` without a server to ask: a Reference (or a reference
/// string) becomes an empty element of the type it names, so that
/// `resolve() is Patient` and `resolve().ofType(Patient)` work; the target's
/// own elements are not read.
fn resolve_type<'a>(it: &Item<'a>) -> Option<Item<'a>> {
    let s = match it {
        Item::Node(n) => match n.v {
            Value::Object(o) => o.get("reference")?.as_str()?,
            Value::String(s) => s.as_str(),
            _ => return None,
        },
        Item::Str(s) => s.as_str(),
        _ => return None,
    };
    let (t, _) = crate::refs::parse_reference(s)?;
    Some(Item::Node(super::value::Node {
        v: &super::value::NULL,
        ty: Some(t.to_owned()),
        ext: None,
    }))
}

/// Refuses an unknown function or a wrong number of arguments.
pub(crate) fn check(name: &str, n: usize) -> Result<(), Error> {
    match FUNCTIONS.iter().find(|f| f.0 == name) {
        None => Err(Error::Semantic(format!("unknown function '{name}'"))),
        Some((_, lo, hi)) if n < *lo || n > *hi => Err(Error::Semantic(format!(
            "{name}() takes {lo}..{hi} arguments, got {n}"
        ))),
        Some(_) => Ok(()),
    }
}

/// Evaluates `e` once per item with `$this` and `$index` set.
fn each<'a>(input: &[Item<'a>], e: &Expr, cx: &Cx<'a, '_>) -> R<Vec<Coll<'a>>> {
    input
        .iter()
        .enumerate()
        .map(|(i, it)| {
            let mut c = cx.clone();
            c.this = Some(it.clone());
            c.index = Some(i);
            eval(e, std::slice::from_ref(it), &c)
        })
        .collect()
}

fn type_arg(e: &Expr) -> R<String> {
    match e {
        Expr::Ident(n) => Ok(n.clone()),
        Expr::Member(b, n) => Ok(format!("{}.{n}", type_arg(b)?)),
        _ => Err(Error::Semantic("expected a type name".into())),
    }
}

/// The single input item as a system value, if any.
fn one_value<'a>(input: &[Item<'a>], f: &str) -> R<Option<Item<'a>>> {
    Ok(single(input, f)?.map(Item::prim))
}

fn one_str(input: &[Item], f: &str) -> R<Option<String>> {
    match single(input, f)? {
        None => Ok(None),
        Some(i) => match i.prim() {
            Item::Str(s) => Ok(Some(s)),
            other => Err(exec(format!(
                "{f}() needs a string, got {}",
                other.type_name().1
            ))),
        },
    }
}

fn arg_str<'a>(args: &[Expr], i: usize, focus: &[Item<'a>], cx: &Cx<'a, '_>) -> R<Option<String>> {
    let v = eval(&args[i], focus, cx)?;
    Ok(single(&v, "an argument")?.map(|x| x.prim().to_string()))
}

fn arg_int<'a>(args: &[Expr], i: usize, focus: &[Item<'a>], cx: &Cx<'a, '_>) -> R<Option<i64>> {
    let v = eval(&args[i], focus, cx)?;
    match single(&v, "an argument")?.map(Item::prim) {
        None => Ok(None),
        Some(Item::Int(n)) => Ok(Some(n)),
        Some(_) => Err(exec("expected an integer argument")),
    }
}

fn contains_eq(c: &[Item], x: &Item) -> bool {
    c.iter().any(|y| equal(x, y) == Some(true))
}

fn distinct<'a>(input: Coll<'a>, cx: &Cx<'a, '_>) -> R<Coll<'a>> {
    union(input, Vec::new(), cx)
}

pub(crate) fn call<'a>(
    name: &str,
    input: Coll<'a>,
    args: &[Expr],
    focus: &[Item<'a>],
    cx: &Cx<'a, '_>,
) -> R<Coll<'a>> {
    let b = |x: bool| Ok(vec![Item::Bool(x)]);
    let arg = |i: usize| eval(&args[i], focus, cx);
    match name {
        "empty" => b(input.is_empty()),
        "exists" => match args.first() {
            None => b(!input.is_empty()),
            Some(c) => b(each(&input, c, cx)?
                .iter()
                .any(|r| matches!(truth(r), Ok(Some(true))))),
        },
        "all" => {
            for r in each(&input, &args[0], cx)? {
                if truth(&r)? != Some(true) {
                    return b(false);
                }
            }
            b(true)
        }
        "allTrue" | "anyTrue" | "allFalse" | "anyFalse" => {
            let want = name.ends_with("True");
            let mut bools = Vec::new();
            for i in &input {
                match i.prim() {
                    Item::Bool(x) => bools.push(x),
                    _ => return Err(exec(format!("{name}() needs booleans"))),
                }
            }
            b(if name.starts_with("all") {
                bools.iter().all(|x| *x == want)
            } else {
                bools.contains(&want)
            })
        }
        "subsetOf" => {
            let other = arg(0)?;
            b(input.iter().all(|x| contains_eq(&other, x)))
        }
        "supersetOf" => {
            let other = arg(0)?;
            b(other.iter().all(|x| contains_eq(&input, x)))
        }
        "count" => Ok(vec![Item::Int(input.len() as i64)]),
        "distinct" => distinct(input, cx),
        "isDistinct" => {
            let n = input.len();
            b(distinct(input, cx)?.len() == n)
        }
        "where" => {
            let keep = each(&input, &args[0], cx)?;
            let mut out = Vec::new();
            for (it, r) in input.into_iter().zip(keep) {
                if truth(&r)? == Some(true) {
                    out.push(it);
                }
            }
            Ok(out)
        }
        "select" => Ok(each(&input, &args[0], cx)?.into_iter().flatten().collect()),
        "repeat" => {
            let mut out: Coll = Vec::new();
            let mut frontier = input;
            while !frontier.is_empty() {
                let next: Coll = each(&frontier, &args[0], cx)?
                    .into_iter()
                    .flatten()
                    .collect();
                frontier = Vec::new();
                for n in next {
                    cx.spend(out.len())?;
                    if !contains_eq(&out, &n) {
                        out.push(n.clone());
                        frontier.push(n);
                    }
                }
            }
            Ok(out)
        }
        "ofType" => {
            let t = type_arg(&args[0])?;
            Ok(input.into_iter().filter(|i| type_is(i, &t)).collect())
        }
        "is" | "as" => {
            let t = type_arg(&args[0])?;
            match single(&input, name)? {
                None => Ok(Vec::new()),
                Some(i) if name == "is" => b(type_is(i, &t)),
                Some(i) => Ok(if type_is(i, &t) {
                    vec![i.clone()]
                } else {
                    Vec::new()
                }),
            }
        }
        "single" => Ok(single(&input, "single()")?.cloned().into_iter().collect()),
        "first" => Ok(input.into_iter().take(1).collect()),
        "last" => Ok(input.into_iter().last().into_iter().collect()),
        "tail" => Ok(input.into_iter().skip(1).collect()),
        "skip" => {
            let n = arg_int(args, 0, focus, cx)?.unwrap_or(0).max(0) as usize;
            Ok(input.into_iter().skip(n).collect())
        }
        "take" => {
            let n = arg_int(args, 0, focus, cx)?.unwrap_or(0).max(0) as usize;
            Ok(input.into_iter().take(n).collect())
        }
        "intersect" => {
            let other = arg(0)?;
            cx.spend(input.len().saturating_mul(other.len()))?;
            distinct(
                input
                    .into_iter()
                    .filter(|x| contains_eq(&other, x))
                    .collect(),
                cx,
            )
        }
        "exclude" => {
            let other = arg(0)?;
            cx.spend(input.len().saturating_mul(other.len()))?;
            Ok(input
                .into_iter()
                .filter(|x| !contains_eq(&other, x))
                .collect())
        }
        "union" => union(input, arg(0)?, cx),
        "combine" => Ok(input.into_iter().chain(arg(0)?).collect()),
        "iif" => {
            let it = single(&input, "iif()")?.cloned();
            let mut c = cx.clone();
            if let Some(i) = &it {
                c.this = Some(i.clone());
            }
            let f: Vec<Item<'a>> = it.clone().into_iter().collect();
            let fo = if it.is_some() { &f[..] } else { focus };
            let cond = eval(&args[0], fo, &c)?;
            let cond = match single(&cond, "iif() criterion")?.map(Item::prim) {
                None => None,
                Some(Item::Bool(x)) => Some(x),
                Some(_) => return Err(exec("iif() criterion must be a boolean")),
            };
            if cond == Some(true) {
                eval(&args[1], fo, &c)
            } else if let Some(e) = args.get(2) {
                eval(e, fo, &c)
            } else {
                Ok(Vec::new())
            }
        }
        "not" => Ok(boolean(truth(&input)?.map(|x| !x))),
        "toBoolean" | "convertsToBoolean" | "toInteger" | "convertsToInteger" | "toDecimal"
        | "convertsToDecimal" | "toString" | "convertsToString" | "toDate" | "convertsToDate"
        | "toDateTime" | "convertsToDateTime" | "toTime" | "convertsToTime" | "toQuantity"
        | "convertsToQuantity" => convert(name, &input, args, focus, cx),
        "indexOf" | "substring" | "startsWith" | "endsWith" | "contains" | "upper" | "lower"
        | "replace" | "matches" | "matchesFull" | "replaceMatches" | "length" | "toChars"
        | "trim" | "split" | "encode" | "decode" | "escape" | "unescape" => {
            string(name, &input, args, focus, cx)
        }
        "join" => {
            let sep = if args.is_empty() {
                Some(String::new())
            } else {
                arg_str(args, 0, focus, cx)?
            };
            let parts: Vec<String> = input.iter().map(|i| i.prim().to_string()).collect();
            let sep = sep.unwrap_or_default();
            string_fits(
                parts.iter().map(String::len).sum::<usize>()
                    + sep.len().saturating_mul(parts.len()),
            )?;
            Ok(vec![Item::Str(parts.join(&sep))])
        }
        "abs" | "ceiling" | "exp" | "floor" | "ln" | "log" | "power" | "round" | "sqrt"
        | "truncate" => math(name, &input, args, focus, cx),
        "children" | "descendants" => {
            let mut out = Vec::new();
            let mut frontier = input;
            loop {
                let mut next = Vec::new();
                for it in &frontier {
                    children(it, &mut next);
                }
                if next.is_empty() || name == "children" {
                    out.extend(next);
                    return Ok(out);
                }
                out.extend(next.iter().cloned());
                frontier = next;
            }
        }
        "trace" => Ok(input),
        "now" | "today" | "timeOfDay" => {
            let now = cx.env.now.unwrap_or_else(|| {
                let l = Local::now();
                l.with_timezone(&l.offset().fix())
            });
            let text = now.format("%Y-%m-%dT%H:%M:%S%.3f%:z").to_string();
            let t = Temporal::parse_datetime(&text).ok_or_else(|| exec("clock"))?;
            Ok(vec![match name {
                "now" => Item::DateTime(t),
                "today" => Item::Date(Temporal {
                    tz: None,
                    ..t.with_len(3)
                }),
                _ => Item::Time(time_of(now.time())),
            }])
        }
        "aggregate" => {
            let mut total = match args.get(1) {
                Some(e) => eval(e, focus, cx)?,
                None => Vec::new(),
            };
            for (i, it) in input.iter().enumerate() {
                let mut c = cx.clone();
                c.this = Some(it.clone());
                c.index = Some(i);
                c.total = Some(total);
                total = eval(&args[0], std::slice::from_ref(it), &c)?;
            }
            Ok(total)
        }
        "sort" => sort(input, args, cx),
        "extension" => {
            let url = arg_str(args, 0, focus, cx)?;
            let mut out = Vec::new();
            for it in &input {
                let Item::Node(n) = it else { continue };
                let mut exts = Vec::new();
                member(it, "extension", &mut exts);
                if let Some(e) = n.ext {
                    member(&Item::node(e), "extension", &mut exts);
                }
                out.extend(exts.into_iter().filter(|e| {
                    matches!(e, Item::Node(x) if x.v.get("url").and_then(Value::as_str) == url.as_deref())
                }));
            }
            Ok(out)
        }
        "hasValue" => b(
            matches!(single(&input, "hasValue()")?, Some(Item::Node(n)) if !n.v.is_null() && !n.v.is_object()),
        ),
        "getValue" => Ok(match single(&input, "getValue()")? {
            Some(i @ Item::Node(n)) if !n.v.is_null() && !n.v.is_object() => vec![i.prim()],
            _ => Vec::new(),
        }),
        "lowBoundary" | "highBoundary" | "precision" => boundary(name, &input, args, focus, cx),
        "resolve" => Ok(input.iter().filter_map(resolve_type).collect()),
        "type" => Ok(input
            .iter()
            .map(|i| {
                let (ns, n) = i.type_name();
                Item::Type(ns, n)
            })
            .collect()),
        _ => Err(Error::Semantic(format!("unknown function '{name}'"))),
    }
}

fn children<'a>(it: &Item<'a>, out: &mut Coll<'a>) {
    let Item::Node(n) = it else { return };
    let Value::Object(o) = n.v else { return };
    for k in o.keys() {
        if k.starts_with('_') || k == "resourceType" {
            continue;
        }
        member(it, k, out);
    }
}

fn sort<'a>(input: Coll<'a>, args: &[Expr], cx: &Cx<'a, '_>) -> R<Coll<'a>> {
    // each argument is a key; `-key` sorts that key descending
    let mut keyed: Vec<(Vec<Coll<'a>>, Item<'a>)> = Vec::new();
    for (i, it) in input.iter().enumerate() {
        let mut c = cx.clone();
        c.this = Some(it.clone());
        c.index = Some(i);
        let mut keys = Vec::new();
        for a in args {
            let e = if let Expr::Neg(x) = a { x } else { a };
            keys.push(eval(e, std::slice::from_ref(it), &c)?);
        }
        keyed.push((keys, it.clone()));
    }
    let cmp_item = |a: &Coll, b: &Coll| -> Ordering {
        match (a.first(), b.first()) {
            (None, None) => Ordering::Equal,
            (None, Some(_)) => Ordering::Less,
            (Some(_), None) => Ordering::Greater,
            (Some(x), Some(y)) => super::value::order(x, y)
                .ok()
                .flatten()
                .unwrap_or(Ordering::Equal),
        }
    };
    keyed.sort_by(|(ka, a), (kb, b)| {
        if args.is_empty() {
            return cmp_item(&vec![a.clone()], &vec![b.clone()]);
        }
        for (i, e) in args.iter().enumerate() {
            let o = cmp_item(&ka[i], &kb[i]);
            let both = !ka[i].is_empty() && !kb[i].is_empty();
            let o = if matches!(e, Expr::Neg(_)) && both {
                o.reverse()
            } else {
                o
            };
            if o != Ordering::Equal {
                return o;
            }
        }
        Ordering::Equal
    });
    Ok(keyed.into_iter().map(|x| x.1).collect())
}

fn convert<'a>(
    name: &str,
    input: &[Item<'a>],
    args: &[Expr],
    focus: &[Item<'a>],
    cx: &Cx<'a, '_>,
) -> R<Coll<'a>> {
    let Some(it) = one_value(input, name)? else {
        return Ok(Vec::new());
    };
    let target = name
        .trim_start_matches("convertsTo")
        .trim_start_matches("to");
    let out: Option<Item<'a>> = match target {
        "Boolean" => match &it {
            Item::Bool(_) => Some(it.clone()),
            Item::Int(0) => Some(Item::Bool(false)),
            Item::Int(1) => Some(Item::Bool(true)),
            Item::Dec(d) if *d == Decimal::ZERO => Some(Item::Bool(false)),
            Item::Dec(d) if *d == Decimal::ONE => Some(Item::Bool(true)),
            Item::Str(s) => match s.to_lowercase().as_str() {
                "true" | "t" | "yes" | "y" | "1" | "1.0" => Some(Item::Bool(true)),
                "false" | "f" | "no" | "n" | "0" | "0.0" => Some(Item::Bool(false)),
                _ => None,
            },
            _ => None,
        },
        "Integer" => match &it {
            Item::Int(_) => Some(it.clone()),
            Item::Bool(x) => Some(Item::Int(*x as i64)),
            Item::Str(s) => s
                .parse::<i64>()
                .ok()
                .filter(|_| !s.starts_with('+') || s.len() > 1)
                .map(Item::Int),
            _ => None,
        },
        "Decimal" => match &it {
            Item::Int(i) => Some(Item::Dec(Decimal::from(*i))),
            Item::Dec(_) => Some(it.clone()),
            Item::Bool(x) => Some(Item::Dec(if *x { Decimal::ONE } else { Decimal::ZERO })),
            Item::Str(s)
                if s.chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, '.' | '-' | '+')) =>
            {
                s.parse::<Decimal>().ok().map(Item::Dec)
            }
            _ => None,
        },
        "String" => match &it {
            Item::Node(_) => None,
            Item::Qty(d, u) => Some(Item::Str(format!("{d} '{u}'"))),
            _ => Some(Item::Str(it.to_string())),
        },
        "Date" => match &it {
            Item::Date(_) => Some(it.clone()),
            Item::DateTime(t) => Some(Item::Date(Temporal {
                tz: None,
                ..t.with_len(t.len.min(3))
            })),
            Item::Str(s) => Temporal::parse_date(s)
                .or_else(|| Temporal::parse_datetime(s).map(|t| t.with_len(t.len.min(3))))
                .map(Item::Date),
            _ => None,
        },
        "DateTime" => match &it {
            Item::DateTime(_) => Some(it.clone()),
            Item::Date(t) => Some(Item::DateTime(t.clone())),
            Item::Str(s) => Temporal::parse_datetime(s).map(Item::DateTime),
            _ => None,
        },
        "Time" => match &it {
            Item::Time(_) => Some(it.clone()),
            Item::Str(s) => Temporal::parse_time(s).map(Item::Time),
            _ => None,
        },
        "Quantity" => {
            let q = match &it {
                Item::Qty(..) => Some(it.clone()),
                Item::Int(i) => Some(Item::Qty(Decimal::from(*i), "1".into())),
                Item::Dec(d) => Some(Item::Qty(*d, "1".into())),
                Item::Str(s) => parse_quantity(s),
                Item::Bool(x) => Some(Item::Qty(
                    if *x { Decimal::ONE } else { Decimal::ZERO },
                    "1".into(),
                )),
                _ => None,
            };
            match (q, args.first()) {
                (Some(Item::Qty(d, u)), Some(_)) => {
                    let want = arg_str(args, 0, focus, cx)?.unwrap_or_default();
                    if u == want {
                        Some(Item::Qty(d, u))
                    } else {
                        super::value::compare_qty((&Decimal::ONE, &want), (&Decimal::ONE, &u))
                            .and(None)
                    }
                }
                (q, _) => q,
            }
        }
        _ => return Err(Error::Semantic(format!("unknown function '{name}'"))),
    };
    if name.starts_with("convertsTo") {
        Ok(vec![Item::Bool(out.is_some())])
    } else {
        Ok(out.into_iter().collect())
    }
}

fn parse_quantity(s: &str) -> Option<Item<'static>> {
    let s = s.trim();
    let (n, rest) = match s.find(' ') {
        Some(i) => (&s[..i], s[i..].trim()),
        None => (s, ""),
    };
    let d = parse_decimal(n).filter(|_| !n.contains(['e', 'E']))?;
    let unit = if rest.is_empty() {
        "1".to_owned()
    } else if let Some(u) = rest.strip_prefix('\'').and_then(|r| r.strip_suffix('\'')) {
        u.to_owned()
    } else if super::value::is_calendar_word(rest) {
        rest.to_owned()
    } else {
        return None;
    };
    Some(Item::Qty(d, unit))
}

fn string<'a>(
    name: &str,
    input: &[Item<'a>],
    args: &[Expr],
    focus: &[Item<'a>],
    cx: &Cx<'a, '_>,
) -> R<Coll<'a>> {
    let Some(s) = one_str(input, name)? else {
        return Ok(Vec::new());
    };
    let sa = |i: usize| arg_str(args, i, focus, cx);
    let out = |i: Item<'a>| Ok(vec![i]);
    let chars: Vec<char> = s.chars().collect();
    match name {
        "indexOf" => match sa(0)? {
            None => Ok(Vec::new()),
            Some(p) => out(Item::Int(
                s.find(&p)
                    .map(|b| s[..b].chars().count() as i64)
                    .unwrap_or(-1),
            )),
        },
        "substring" => {
            let Some(start) = arg_int(args, 0, focus, cx)? else {
                return Ok(Vec::new());
            };
            if start < 0 || start as usize >= chars.len() {
                return Ok(Vec::new());
            }
            let len = if args.len() > 1 {
                arg_int(args, 1, focus, cx)?
            } else {
                None
            };
            let end = match len {
                Some(l) => (start + l.max(0)).min(chars.len() as i64) as usize,
                None => chars.len(),
            };
            out(Item::Str(chars[start as usize..end].iter().collect()))
        }
        "startsWith" | "endsWith" | "contains" => match sa(0)? {
            None => Ok(Vec::new()),
            Some(p) => out(Item::Bool(match name {
                "startsWith" => s.starts_with(&p),
                "endsWith" => s.ends_with(&p),
                _ => s.contains(&p),
            })),
        },
        "upper" => out(Item::Str(s.to_uppercase())),
        "lower" => out(Item::Str(s.to_lowercase())),
        "replace" => match (sa(0)?, sa(1)?) {
            (Some(p), Some(r)) => out(Item::Str(if p.is_empty() {
                string_fits(s.len() + (chars.len() + 1).saturating_mul(r.len()))?;
                let mut o = r.clone();
                for c in s.chars() {
                    o.push(c);
                    o.push_str(&r);
                }
                o
            } else {
                string_fits(s.len() + s.matches(p.as_str()).count().saturating_mul(r.len()))?;
                s.replace(&p, &r)
            })),
            _ => Ok(Vec::new()),
        },
        "matches" | "matchesFull" | "replaceMatches" => {
            let Some(p) = sa(0)? else {
                return Ok(Vec::new());
            };
            let re =
                Regex::new(&format!("(?s){p}")).map_err(|e| exec(format!("bad regex: {e}")))?;
            if name == "matches" {
                return out(Item::Bool(re.is_match(&s)));
            }
            if p.is_empty() {
                return out(Item::Str(s));
            }
            if name == "matchesFull" {
                let full = Regex::new(&format!("(?s)^(?:{p})$"))
                    .map_err(|e| exec(format!("bad regex: {e}")))?;
                return out(Item::Bool(full.is_match(&s)));
            }
            match sa(1)? {
                None => Ok(Vec::new()),
                Some(r) => {
                    string_fits(s.len() + re.find_iter(&s).count().saturating_mul(r.len()))?;
                    let done = re
                        .replace_all(&s, r.replace("$", "$$").replace("$$$$", "$$").as_str())
                        .into_owned();
                    string_fits(done.len())?;
                    out(Item::Str(done))
                }
            }
        }
        "length" => out(Item::Int(chars.len() as i64)),
        "toChars" => Ok(chars.iter().map(|c| Item::Str(c.to_string())).collect()),
        "trim" => out(Item::Str(s.trim().to_owned())),
        "split" => match sa(0)? {
            None => Ok(Vec::new()),
            Some(sep) => Ok(s
                .split(sep.as_str())
                .map(|p| Item::Str(p.to_owned()))
                .collect()),
        },
        "encode" | "decode" | "escape" | "unescape" => {
            let Some(how) = sa(0)? else {
                return Ok(Vec::new());
            };
            code(name, &how, &s).map(|r| r.map(Item::Str).into_iter().collect())
        }
        _ => Err(exec(format!("{name}() is not a string function"))),
    }
}

fn code(name: &str, how: &str, s: &str) -> R<Option<String>> {
    const B64: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let enc64 = |bytes: &[u8], url: bool| -> String {
        let mut o = String::new();
        for ch in bytes.chunks(3) {
            let n = (ch[0] as u32) << 16
                | (*ch.get(1).unwrap_or(&0) as u32) << 8
                | *ch.get(2).unwrap_or(&0) as u32;
            for k in 0..4 {
                if k <= ch.len() {
                    let c = B64[(n >> (18 - 6 * k) & 63) as usize] as char;
                    o.push(match (url, c) {
                        (true, '+') => '-',
                        (true, '/') => '_',
                        _ => c,
                    });
                } else {
                    o.push('=');
                }
            }
        }
        o
    };
    let dec64 = |t: &str| -> Option<Vec<u8>> {
        let mut bits = 0u32;
        let mut n = 0;
        let mut o = Vec::new();
        for c in t.bytes().filter(|c| *c != b'=') {
            let v = match c {
                b'-' => 62,
                b'_' => 63,
                _ => B64.iter().position(|x| *x == c)? as u32,
            };
            bits = bits << 6 | v;
            n += 6;
            if n >= 8 {
                n -= 8;
                o.push((bits >> n) as u8);
                bits &= (1 << n) - 1;
            }
        }
        Some(o)
    };
    Ok(match (name, how) {
        ("encode", "hex") => Some(s.bytes().map(|b| format!("{b:02x}")).collect()),
        ("encode", "base64") => Some(enc64(s.as_bytes(), false)),
        ("encode", "urlbase64") => Some(enc64(s.as_bytes(), true)),
        ("decode", "hex") => (0..s.len())
            .step_by(2)
            .map(|i| s.get(i..i + 2).and_then(|h| u8::from_str_radix(h, 16).ok()))
            .collect::<Option<Vec<u8>>>()
            .and_then(|v| String::from_utf8(v).ok()),
        ("decode", "base64" | "urlbase64") => dec64(s).and_then(|v| String::from_utf8(v).ok()),
        ("escape", "html") => Some(
            s.replace('&', "&amp;")
                .replace('<', "&lt;")
                .replace('>', "&gt;")
                .replace('"', "&quot;")
                .replace('\'', "&#39;"),
        ),
        ("unescape", "html") => Some(
            s.replace("&lt;", "<")
                .replace("&gt;", ">")
                .replace("&quot;", "\"")
                .replace("&#39;", "'")
                .replace("&amp;", "&"),
        ),
        ("escape", "json") => {
            let q = serde_json::to_string(s).unwrap_or_default();
            Some(q[1..q.len() - 1].to_owned())
        }
        ("unescape", "json") => serde_json::from_str::<String>(&format!("\"{s}\"")).ok(),
        _ => return Err(exec(format!("{name}('{how}') is not supported"))),
    })
}

fn math<'a>(
    name: &str,
    input: &[Item<'a>],
    args: &[Expr],
    focus: &[Item<'a>],
    cx: &Cx<'a, '_>,
) -> R<Coll<'a>> {
    let Some(it) = one_value(input, name)? else {
        return Ok(Vec::new());
    };
    if let (Item::Qty(d, u), "abs") = (&it, name) {
        return Ok(vec![Item::Qty(d.abs(), u.clone())]);
    }
    let x = num(&it).ok_or_else(|| exec(format!("{name}() needs a number")))?;
    let is_int = matches!(it, Item::Int(_));
    let arg_num = |i: usize| -> R<Option<Decimal>> {
        let v = eval(&args[i], focus, cx)?;
        Ok(single(&v, "an argument")?.and_then(|a| num(&a.prim())))
    };
    let int = |d: Decimal| d.to_i64().map(Item::Int);
    let dec = |f: f64| dec_from_f64(f).map(Item::Dec);
    let r: Option<Item<'a>> = match name {
        "abs" => Some(if is_int {
            Item::Int(x.abs().to_i64().unwrap_or(0))
        } else {
            Item::Dec(x.abs())
        }),
        "ceiling" => int(x.ceil()),
        "floor" => int(x.floor()),
        "truncate" => int(x.trunc()),
        "exp" => dec(dec_f64(&x).exp()),
        "ln" => (x > Decimal::ZERO).then(|| dec(dec_f64(&x).ln())).flatten(),
        "sqrt" => (x >= Decimal::ZERO)
            .then(|| x.sqrt().map(Item::Dec))
            .flatten(),
        "log" => match arg_num(0)? {
            Some(base) if x > Decimal::ZERO && base > Decimal::ZERO => {
                dec(dec_f64(&x).ln() / dec_f64(&base).ln())
            }
            _ => None,
        },
        "power" => match arg_num(0)? {
            Some(p) => {
                let f = dec_f64(&x).powf(dec_f64(&p));
                if f.is_nan() {
                    None
                } else if is_int && p.fract().is_zero() && p >= Decimal::ZERO {
                    x.checked_powd(p).and_then(int)
                } else {
                    dec(f)
                }
            }
            None => None,
        },
        "round" => {
            let n = if args.is_empty() {
                0
            } else {
                arg_int(args, 0, focus, cx)?.unwrap_or(0)
            };
            if n < 0 {
                return Err(exec("round() needs a precision of 0 or more"));
            }
            Some(Item::Dec(x.round_dp_with_strategy(
                n as u32,
                rust_decimal::RoundingStrategy::MidpointAwayFromZero,
            )))
        }
        _ => None,
    };
    Ok(r.into_iter().collect())
}

/// `lowBoundary`, `highBoundary` and `precision` for decimals and dates.
fn boundary<'a>(
    name: &str,
    input: &[Item<'a>],
    args: &[Expr],
    focus: &[Item<'a>],
    cx: &Cx<'a, '_>,
) -> R<Coll<'a>> {
    let Some(it) = one_value(input, name)? else {
        return Ok(Vec::new());
    };
    let want = if args.is_empty() {
        None
    } else {
        arg_int(args, 0, focus, cx)?
    };
    match (&it, name) {
        (Item::Int(_), "precision") => Ok(vec![Item::Int(0)]),
        (Item::Dec(d), "precision") => Ok(vec![Item::Int(d.scale() as i64)]),
        (Item::Date(t) | Item::DateTime(t) | Item::Time(t), "precision") => Ok(vec![Item::Int(
            match t.len {
                1 => 4,
                2 => 6,
                3 => 8,
                4 => 10,
                5 => 12,
                6 => 14,
                _ => 17,
            } - if t.is_time { 8 } else { 0 },
        )]),
        (Item::Int(_) | Item::Dec(_), _) => {
            let x = num(&it).unwrap_or_default();
            let p = want.unwrap_or(8);
            if !(0..=28).contains(&p) {
                return Ok(Vec::new());
            }
            let Ok(half) = Decimal::try_new(5, x.scale() + 1) else {
                return Ok(Vec::new());
            };
            let v = if name == "lowBoundary" {
                x.checked_sub(half)
            } else {
                x.checked_add(half)
            };
            let Some(v) = v else {
                return Ok(Vec::new());
            };
            let how = if name == "lowBoundary" {
                rust_decimal::RoundingStrategy::ToNegativeInfinity
            } else {
                rust_decimal::RoundingStrategy::ToPositiveInfinity
            };
            let mut v = v.round_dp_with_strategy(p as u32, how);
            v.rescale(p as u32);
            Ok(vec![Item::Dec(v)])
        }
        (Item::Date(t) | Item::DateTime(t) | Item::Time(t), _) => {
            let full = match &it {
                Item::Date(_) => 3,
                _ => 7,
            };
            let len = match want {
                None => full,
                Some(p) => match (p, t.is_time) {
                    (4, false) => 1,
                    (6, false) => 2,
                    (8, false) => 3,
                    (10, false) | (2, true) => 4,
                    (12, false) | (4, true) => 5,
                    (14, false) | (6, true) => 6,
                    (17, false) | (9, true) => 7,
                    _ => return Ok(Vec::new()),
                },
            };
            let low = name == "lowBoundary";
            let mut r = t.clone();
            let start = if t.is_time { 3 } else { 0 };
            for i in t.len.max(start)..7 {
                r.f[i] = match (i, low) {
                    (1 | 2, true) => 1,
                    (_, true) => 0,
                    (1, false) => 12,
                    (2, false) => 0,
                    (3, false) => 23,
                    (4 | 5, false) => 59,
                    _ => 999,
                };
            }
            if !low && t.len < 3 && !t.is_time {
                let (y, m) = (r.f[0], r.f[1]);
                r.f[2] = Temporal::parse_date(&format!("{y:04}-{m:02}-01"))
                    .map(|_| days_in(y, m))
                    .unwrap_or(28);
            }
            if r.tz.is_none() && !t.is_time && len >= 4 {
                r.tz = Some(if low { 14 * 60 } else { -12 * 60 });
            }
            r.len = len;
            r.frac_digits = 3;
            Ok(vec![match &it {
                Item::Date(_) => Item::Date(r),
                Item::DateTime(_) => Item::DateTime(r),
                _ => Item::Time(r),
            }])
        }
        _ => Ok(Vec::new()),
    }
}

fn days_in(y: i64, m: i64) -> i64 {
    let t = Temporal::parse_date(&format!("{y:04}-{m:02}-01"));
    match t.and_then(|t| t.add(Decimal::ONE, "month")) {
        Some(n) => {
            let first = chrono::NaiveDate::from_ymd_opt(n.f[0] as i32, n.f[1] as u32, 1);
            first
                .and_then(|f| f.pred_opt())
                .map(|d| chrono::Datelike::day(&d) as i64)
                .unwrap_or(28)
        }
        None => 28,
    }
}
