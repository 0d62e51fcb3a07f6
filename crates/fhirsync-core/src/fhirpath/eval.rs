//! Evaluation of a syntax tree over a resource: navigation, variables and
//! operators (functions are in `funcs`).

use std::cmp::Ordering;
use std::collections::HashMap;

use rust_decimal::Decimal;
use serde_json::Value;

use super::parse::{Expr, Op};
use super::value::{self, choice_type, equal, equivalent, num, order, Item, Node, NULL};
use super::{funcs, Error};

pub type Coll<'a> = Vec<Item<'a>>;
pub type R<T> = Result<T, Error>;

/// Variables and the clock for one evaluation.
#[derive(Debug, Clone, Default)]
pub struct Env<'a> {
    pub vars: HashMap<String, Coll<'a>>,
    /// `now()`; the wall clock when unset.
    pub now: Option<chrono::DateTime<chrono::FixedOffset>>,
}

impl<'a> Env<'a> {
    pub fn new() -> Env<'a> {
        Env::default()
    }

    /// Sets `%name` to a resource (or nothing for `None`).
    pub fn set(&mut self, name: &str, v: Option<&'a Value>) -> &mut Self {
        self.vars
            .insert(name.to_owned(), v.map(Item::node).into_iter().collect());
        self
    }
}

#[derive(Clone)]
pub(crate) struct Cx<'a, 'e> {
    pub env: &'e Env<'a>,
    /// Work done so far by this evaluation (see [`WORK_MAX`]).
    pub work: &'e std::cell::Cell<u64>,
    pub context: Coll<'a>,
    pub this: Option<Item<'a>>,
    pub index: Option<usize>,
    pub total: Option<Coll<'a>>,
}

/// Most work one evaluation may do: a unit per sub-expression evaluated,
/// per item it yields, per 64 bytes of the strings it makes, and per
/// comparison of the de-duplications (`|`, `repeat`); past it the
/// evaluation fails (and, as a filter or trigger, does not pass).
pub const WORK_MAX: u64 = 2_000_000;
/// Longest string an evaluation may make, in bytes.
pub const STRING_BYTES_MAX: usize = 1 << 20;

impl Cx<'_, '_> {
    /// Counts `n` units of work; an error past [`WORK_MAX`].
    pub fn spend(&self, n: usize) -> R<()> {
        let w = self.work.get().saturating_add(n as u64);
        self.work.set(w);
        if w > WORK_MAX {
            return Err(exec(format!(
                "the evaluation needs more than {WORK_MAX} steps (WORK_MAX)"
            )));
        }
        Ok(())
    }
}

/// An error unless a string of `len` bytes may be made.
pub(crate) fn string_fits(len: usize) -> R<()> {
    if len > STRING_BYTES_MAX {
        return Err(exec(format!(
            "a string of {len} bytes is longer than {STRING_BYTES_MAX} (STRING_BYTES_MAX)"
        )));
    }
    Ok(())
}

pub(crate) fn exec(msg: impl Into<String>) -> Error {
    Error::Eval(msg.into())
}

/// The single item of a collection: `None` when empty, an error when more.
pub(crate) fn single<'c, 'a>(c: &'c [Item<'a>], what: &str) -> R<Option<&'c Item<'a>>> {
    match c {
        [] => Ok(None),
        [x] => Ok(Some(x)),
        _ => Err(exec(format!("{what} needs a single item, got {}", c.len()))),
    }
}

/// A collection read as a boolean (singleton evaluation).
pub(crate) fn truth(c: &[Item]) -> R<Option<bool>> {
    Ok(match single(c, "a boolean")? {
        None => None,
        Some(i) => match i.prim() {
            Item::Bool(b) => Some(b),
            _ => Some(true),
        },
    })
}

pub(crate) fn boolean<'a>(b: Option<bool>) -> Coll<'a> {
    b.map(Item::Bool).into_iter().collect()
}

/// Members named `name` of one item: arrays flatten, a primitive keeps its
/// `_name` sibling, `value` also finds `valueQuantity` and the like.
pub(crate) fn member<'a>(it: &Item<'a>, name: &str, out: &mut Coll<'a>) {
    if let Item::Type(ns, n) = it {
        match name {
            "namespace" => out.push(Item::Str((*ns).to_owned())),
            "name" => out.push(Item::Str(n.clone())),
            _ => {}
        }
        return;
    }
    let Item::Node(Node {
        v: Value::Object(o),
        ..
    }) = it
    else {
        return;
    };
    let push = |out: &mut Coll<'a>,
                v: Option<&'a Value>,
                ext: Option<&'a Value>,
                ty: Option<String>| match v {
        Some(Value::Array(a)) => {
            let exts = ext.and_then(Value::as_array);
            for (i, x) in a.iter().enumerate() {
                let e = exts.and_then(|e| e.get(i)).filter(|e| !e.is_null());
                if x.is_null() && e.is_none() {
                    continue;
                }
                out.push(Item::Node(Node {
                    v: x,
                    ty: ty.clone(),
                    ext: e,
                }));
            }
        }
        Some(x) => out.push(Item::Node(Node { v: x, ty, ext })),
        None => {
            if let Some(e) = ext {
                out.push(Item::Node(Node {
                    v: &NULL,
                    ty,
                    ext: Some(e),
                }));
            }
        }
    };
    let ext = o.get(&format!("_{name}"));
    if o.contains_key(name) || ext.is_some() {
        let ty = if name == "contained" || name == "resource" {
            None
        } else {
            known_type(name)
        };
        push(out, o.get(name), ext, ty);
        return;
    }
    for (k, v) in o {
        if let Some(suffix) = k.strip_prefix(name) {
            if suffix.starts_with(|c: char| c.is_ascii_uppercase()) {
                let ext = o.get(&format!("_{k}"));
                push(out, Some(v), ext, Some(choice_type(suffix)));
            }
        }
    }
}

/// Element names whose type the JSON does not tell.
fn known_type(name: &str) -> Option<String> {
    let t = match name {
        "birthDate" => "date",
        "deceasedDateTime" | "effectiveDateTime" | "issued" | "lastUpdated" | "authoredOn"
        | "recorded" => {
            return (name == "issued" || name == "lastUpdated")
                .then(|| "instant".into())
                .or(Some("dateTime".into()))
        }
        _ => return None,
    };
    Some(t.to_owned())
}

pub(crate) fn eval<'a>(e: &Expr, focus: &[Item<'a>], cx: &Cx<'a, '_>) -> R<Coll<'a>> {
    cx.spend(1)?;
    let out = eval_node(e, focus, cx)?;
    let bytes: usize = out
        .iter()
        .map(|i| match i {
            Item::Str(s) => s.len(),
            _ => 0,
        })
        .sum();
    cx.spend(out.len() + bytes / 64)?;
    Ok(out)
}

fn eval_node<'a>(e: &Expr, focus: &[Item<'a>], cx: &Cx<'a, '_>) -> R<Coll<'a>> {
    Ok(match e {
        Expr::Empty => Vec::new(),
        Expr::Lit(x) => vec![x.clone()],
        Expr::This => match &cx.this {
            Some(t) => vec![t.clone()],
            None => focus.to_vec(),
        },
        Expr::Index => cx.index.map(|i| Item::Int(i as i64)).into_iter().collect(),
        Expr::Total => cx.total.clone().unwrap_or_default(),
        Expr::Var(name) => match name.as_str() {
            "context" | "resource" | "rootResource" => cx
                .env
                .vars
                .get(name.as_str())
                .cloned()
                .unwrap_or_else(|| cx.context.clone()),
            "ucum" => vec![Item::Str("http://unitsofmeasure.org".into())],
            "sct" => vec![Item::Str("http://snomed.info/sct".into())],
            "loinc" => vec![Item::Str("http://loinc.org".into())],
            _ => match cx.env.vars.get(name.as_str()) {
                Some(v) => v.clone(),
                None if name.starts_with("vs-") || name.starts_with("ext-") => {
                    let base = if name.starts_with("vs-") {
                        "ValueSet"
                    } else {
                        "StructureDefinition"
                    };
                    let rest = name.split_once('-').map(|x| x.1).unwrap_or_default();
                    vec![Item::Str(format!("http://hl7.org/fhir/{base}/{rest}"))]
                }
                None => return Err(exec(format!("unknown variable %{name}"))),
            },
        },
        Expr::Ident(name) => {
            if name.starts_with(|c: char| c.is_ascii_uppercase()) {
                let typed: Coll = focus
                    .iter()
                    .filter(|i| match i {
                        // `Resource.meta` and `DomainResource.text` name
                        // any resource (the R4 search parameters do).
                        Item::Node(n) => match n.v.get("resourceType").and_then(Value::as_str) {
                            Some(t) => t == name || name == "Resource" || name == "DomainResource",
                            None => false,
                        },
                        _ => false,
                    })
                    .cloned()
                    .collect();
                if !typed.is_empty() {
                    return Ok(typed);
                }
            }
            let mut out = Vec::new();
            for it in focus {
                member(it, name, &mut out);
            }
            out
        }
        Expr::Member(base, name) => {
            let b = eval(base, focus, cx)?;
            let mut out = Vec::new();
            for it in &b {
                member(it, name, &mut out);
            }
            out
        }
        Expr::Call(target, name, args) => {
            let input = match target {
                Some(t) => eval(t, focus, cx)?,
                None => match &cx.this {
                    Some(t) => vec![t.clone()],
                    None => focus.to_vec(),
                },
            };
            funcs::call(name, input, args, focus, cx)?
        }
        Expr::Indexer(base, ix) => {
            let b = eval(base, focus, cx)?;
            let i = eval(ix, focus, cx)?;
            match single(&i, "an index")?.map(Item::prim) {
                Some(Item::Int(n)) if n >= 0 => b.into_iter().nth(n as usize).into_iter().collect(),
                Some(Item::Int(_)) | None => Vec::new(),
                Some(_) => return Err(exec("an index must be an integer")),
            }
        }
        Expr::Neg(x) => {
            let v = eval(x, focus, cx)?;
            match single(&v, "unary minus")?.map(Item::prim) {
                None => Vec::new(),
                Some(Item::Int(i)) => vec![Item::Int(-i)],
                Some(Item::Dec(d)) => vec![Item::Dec(-d)],
                Some(Item::Qty(d, u)) => vec![Item::Qty(-d, u)],
                Some(_) => return Err(exec("unary minus needs a number")),
            }
        }
        // `as` filters a collection of several items as `ofType` does:
        // the R4 search parameters' expressions depend on it
        // (`(useContext.value as CodeableConcept)`).
        Expr::Type(false, x, ty) => eval(x, focus, cx)?
            .into_iter()
            .filter(|i| type_is(i, ty))
            .collect(),
        Expr::Type(is, x, ty) => {
            let v = eval(x, focus, cx)?;
            let Some(it) = single(&v, "is/as")? else {
                return Ok(Vec::new());
            };
            let ok = type_is(it, ty);
            if *is {
                vec![Item::Bool(ok)]
            } else if ok {
                vec![it.clone()]
            } else {
                Vec::new()
            }
        }
        Expr::Bin(op, l, r) => binary(*op, l, r, focus, cx)?,
    })
}

/// Whether an item is of the named type (`Boolean`, `System.String`,
/// `FHIR.Patient`, `Quantity`, `string`, …).
pub(crate) fn type_is(it: &Item, ty: &str) -> bool {
    let (ns, want) = match ty.split_once('.') {
        Some((ns, t)) => (Some(ns), t),
        None => (None, ty),
    };
    let (have_ns, have) = it.type_name();
    if have == want && ns.is_none_or(|n| n == have_ns) {
        return true;
    }
    // a FHIR node whose type is not known: read it as its system value
    if let Item::Node(n) = it {
        if ns != Some("System") {
            if n.ty.is_none() && value::is_fhir_primitive(want) {
                return match (want, n.v) {
                    (
                        "string" | "code" | "uri" | "id" | "markdown" | "url" | "canonical",
                        Value::String(_),
                    ) => have == "string",
                    _ => false,
                };
            }
            return want == "Resource" && n.v.get("resourceType").is_some()
                || want == "DomainResource" && n.v.get("resourceType").is_some();
        }
    }
    false
}

fn binary<'a>(op: Op, l: &Expr, r: &Expr, focus: &[Item<'a>], cx: &Cx<'a, '_>) -> R<Coll<'a>> {
    // the boolean operators short-circuit where the answer is already known
    if matches!(op, Op::And | Op::Or | Op::Implies) {
        let a = truth(&eval(l, focus, cx)?)?;
        let known = match (op, a) {
            (Op::And, Some(false)) => Some(false),
            (Op::Or, Some(true)) => Some(true),
            (Op::Implies, Some(false)) => Some(true),
            _ => None,
        };
        if known.is_some() {
            return Ok(boolean(known));
        }
        let b = truth(&eval(r, focus, cx)?)?;
        return Ok(boolean(match op {
            Op::And => match (a, b) {
                (_, Some(false)) => Some(false),
                (Some(true), Some(true)) => Some(true),
                _ => None,
            },
            Op::Or => match (a, b) {
                (_, Some(true)) => Some(true),
                (Some(false), Some(false)) => Some(false),
                _ => None,
            },
            _ => match (a, b) {
                (_, Some(true)) => Some(true),
                (Some(true), Some(false)) => Some(false),
                _ => None,
            },
        }));
    }
    let a = eval(l, focus, cx)?;
    let b = eval(r, focus, cx)?;
    if op == Op::Union {
        return union(a, b, cx);
    }
    apply(op, a, b)
}

pub(crate) fn apply<'a>(op: Op, a: Coll<'a>, b: Coll<'a>) -> R<Coll<'a>> {
    Ok(match op {
        Op::Xor => boolean(match (truth(&a)?, truth(&b)?) {
            (Some(x), Some(y)) => Some(x != y),
            _ => None,
        }),
        Op::Union => unreachable!("handled in binary, where its work is counted"),
        Op::Eq | Op::Ne => {
            if a.is_empty() || b.is_empty() {
                return Ok(Vec::new());
            }
            let mut eq = Some(a.len() == b.len());
            if eq == Some(true) {
                for (x, y) in a.iter().zip(&b) {
                    match equal(x, y) {
                        Some(true) => {}
                        Some(false) => {
                            eq = Some(false);
                            break;
                        }
                        None => eq = None,
                    }
                }
            }
            boolean(eq.map(|e| e == (op == Op::Eq)))
        }
        Op::Equiv | Op::NotEquiv => {
            let same = a.len() == b.len()
                && a.iter().all(|x| b.iter().any(|y| equivalent(x, y)))
                && b.iter().all(|y| a.iter().any(|x| equivalent(x, y)));
            vec![Item::Bool(same == (op == Op::Equiv))]
        }
        Op::Lt | Op::Le | Op::Gt | Op::Ge => {
            let (Some(x), Some(y)) = (single(&a, "a comparison")?, single(&b, "a comparison")?)
            else {
                return Ok(Vec::new());
            };
            boolean(order(x, y).map_err(exec)?.map(|o| match op {
                Op::Lt => o == Ordering::Less,
                Op::Le => o != Ordering::Greater,
                Op::Gt => o == Ordering::Greater,
                _ => o != Ordering::Less,
            }))
        }
        Op::In | Op::Contains => {
            let (item, coll) = if op == Op::In { (a, b) } else { (b, a) };
            match single(&item, "in/contains")? {
                None => Vec::new(),
                Some(x) => vec![Item::Bool(coll.iter().any(|y| equal(x, y) == Some(true)))],
            }
        }
        Op::Concat => {
            let s = |c: &[Item]| -> R<String> {
                Ok(single(c, "&")?.map(|i| i.to_string()).unwrap_or_default())
            };
            let (x, y) = (s(&a)?, s(&b)?);
            string_fits(x.len() + y.len())?;
            vec![Item::Str(x + &y)]
        }
        Op::Add | Op::Sub | Op::Mul | Op::Div | Op::IntDiv | Op::Mod => {
            let (Some(x), Some(y)) = (single(&a, "arithmetic")?, single(&b, "arithmetic")?) else {
                return Ok(Vec::new());
            };
            arith(op, &x.prim(), &y.prim())?.into_iter().collect()
        }
        Op::And | Op::Or | Op::Implies => unreachable!("handled with short-circuit"),
    })
}

pub(crate) fn union<'a>(a: Coll<'a>, b: Coll<'a>, cx: &Cx<'a, '_>) -> R<Coll<'a>> {
    let mut out: Coll = Vec::with_capacity(a.len() + b.len());
    for v in a.into_iter().chain(b) {
        cx.spend(out.len())?;
        if !out.iter().any(|x| equal(x, &v) == Some(true)) {
            out.push(v);
        }
    }
    Ok(out)
}

fn arith<'a>(op: Op, x: &Item<'a>, y: &Item<'a>) -> R<Option<Item<'a>>> {
    use Item::*;
    let bad = || {
        exec(format!(
            "cannot apply {op:?} to {} and {}",
            x.type_name().1,
            y.type_name().1
        ))
    };
    // overflow and division by zero give an empty result, never a panic
    Ok(match (x, y) {
        (Int(a), Int(b)) => match op {
            Op::Add => a.checked_add(*b).map(Int),
            Op::Sub => a.checked_sub(*b).map(Int),
            Op::Mul => a.checked_mul(*b).map(Int),
            Op::Div => Decimal::from(*a).checked_div(Decimal::from(*b)).map(Dec),
            Op::IntDiv => a.checked_div(*b).map(Int),
            Op::Mod => a.checked_rem(*b).map(Int),
            _ => return Err(bad()),
        },
        (Str(a), Str(b)) if op == Op::Add => {
            string_fits(a.len() + b.len())?;
            Some(Str(format!("{a}{b}")))
        }
        (Qty(a, u), Qty(b, v)) => match op {
            Op::Add if u == v => a.checked_add(*b).map(|r| Qty(r, u.clone())),
            Op::Sub if u == v => a.checked_sub(*b).map(|r| Qty(r, u.clone())),
            Op::Mul => a.checked_mul(*b).map(|r| Qty(r, mul_unit(u, v, '.'))),
            Op::Div => {
                let unit = if u == v {
                    "1".into()
                } else {
                    mul_unit(u, v, '/')
                };
                a.checked_div(*b).map(|r| Qty(r, unit))
            }
            _ => return Err(bad()),
        },
        (Qty(a, u), b) | (b, Qty(a, u)) if matches!(op, Op::Mul) && num(b).is_some() => a
            .checked_mul(num(b).unwrap_or_default())
            .map(|r| Qty(r, u.clone())),
        (Qty(a, u), b) if op == Op::Div && num(b).is_some() => a
            .checked_div(num(b).unwrap_or_default())
            .map(|r| Qty(r, u.clone())),
        (Date(t) | DateTime(t) | Time(t), Qty(d, u)) if matches!(op, Op::Add | Op::Sub) => {
            let amount = if op == Op::Add { *d } else { -*d };
            let r = t
                .add(amount, u)
                .ok_or_else(|| exec(format!("cannot add {amount} '{u}' to {t}")))?;
            Some(match x {
                Date(_) => Date(r),
                DateTime(_) => DateTime(r),
                _ => Time(r),
            })
        }
        _ => match (num(x), num(y)) {
            (Some(a), Some(b)) => match op {
                Op::Add => a.checked_add(b).map(Dec),
                Op::Sub => a.checked_sub(b).map(Dec),
                Op::Mul => a.checked_mul(b).map(Dec),
                Op::Div => a.checked_div(b).map(|r| Dec(r.normalize())),
                Op::IntDiv => a
                    .checked_div(b)
                    .and_then(|r| r.trunc().try_into().ok())
                    .map(Int),
                Op::Mod => a.checked_rem(b).map(Dec),
                _ => return Err(bad()),
            },
            _ => return Err(bad()),
        },
    })
}

fn mul_unit(u: &str, v: &str, sep: char) -> String {
    match (u, v) {
        ("1", v) if sep == '.' => v.to_owned(),
        (u, "1") => u.to_owned(),
        (u, v) if u == v && sep == '.' => format!("{u}2"),
        _ => format!("{u}{sep}{v}"),
    }
}
