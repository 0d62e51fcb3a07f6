//! Search index entries of a resource version: every search parameter of
//! its type, evaluated with the FHIRPath engine on expressions compiled
//! once, as rows of five kinds (token, text, date, number, composite).

use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

use serde_json::{Map, Value};
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

use crate::fhirpath::{self, Env, Expr, Item};
use crate::instant::parse_range;
use crate::refs::parse_reference;
use crate::spec::{self, Kind};

/// Characters of a string kept in the case- and accent-folded index (the
/// exact text is kept whole): string searches match on the first
/// `TEXT_CHARS_MAX` characters.
pub const TEXT_CHARS_MAX: usize = 256;

/// Most index entries one version may produce; beyond it the rest are
/// dropped (and logged by the caller), so one resource cannot bloat the
/// index without bound.
pub const ENTRIES_MAX: usize = 10_000;

/// The suffix of the derived parameter that holds a token's text
/// (`code:text`).
pub const TEXT_SUFFIX: &str = ":text";
/// The suffix of the derived parameter of an identifier's type and value
/// (`identifier:of-type`).
pub const OF_TYPE_SUFFIX: &str = ":of-type";
/// The suffix of the derived parameter of a reference's identifier
/// (`subject:identifier`).
pub const IDENTIFIER_SUFFIX: &str = ":identifier";

/// One indexed value of a parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Key {
    /// Tokens, references (system = target type, value = id; absolute and
    /// canonical references with an empty system and the URL) and URIs.
    Token { system: String, value: String },
    /// Strings: folded (lowercase, without accents) and as written.
    Text { norm: String, raw: String },
    /// A date as the range `[lo, hi)` in ms since the epoch.
    Date { lo: i64, hi: i64 },
    /// Numbers and quantities (`system`/`code` empty for numbers).
    Number {
        value: f64,
        system: String,
        code: String,
    },
    /// A composite's pair: the first part a token, the second any kind
    /// (token or text in `b_sys`/`b_val`, numbers and dates in `b_lo`/`b_hi`).
    Composite {
        a_sys: String,
        a_val: String,
        b_sys: String,
        b_val: String,
        b_lo: f64,
        b_hi: f64,
    },
}

/// One search key of a version: the parameter's code and a value.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexEntry {
    pub param: Arc<str>,
    pub key: Key,
}

/// A search parameter ready to evaluate.
#[derive(Debug)]
pub struct Param {
    pub code: &'static str,
    pub kind: Kind,
    pub expr: Option<Expr>,
    pub targets: &'static [&'static str],
    pub components: Vec<(Kind, Expr)>,
    /// The expression as plain member paths (`Patient.name.family |
    /// Patient.alias`), when it is only that: walked on the JSON directly,
    /// which gives what the engine gives several times faster.
    paths: Option<Vec<Vec<&'static str>>>,
    name: Arc<str>,
    /// The names of its derived entries, made once.
    derived: Derived,
    /// Defined by a `SearchParameter` resource of the node, not by R4.
    pub custom: bool,
    /// Where its entries are stored.
    pub stored: Stored,
}

/// The names a parameter's derived entries are stored under
/// (`code:text`, `identifier:of-type`, `subject:identifier`).
#[derive(Debug)]
pub struct Derived {
    text: Arc<str>,
    of_type: Arc<str>,
    identifier: Arc<str>,
}

impl Derived {
    pub fn of(code: &str) -> Derived {
        let name = |suffix: &str| Arc::from(format!("{code}{suffix}"));
        Derived {
            text: name(TEXT_SUFFIX),
            of_type: name(OF_TYPE_SUFFIX),
            identifier: name(IDENTIFIER_SUFFIX),
        }
    }
}

/// Where a parameter's entries are stored. R4 defines parameters whose
/// entries are exactly those of others of the type (`Observation`'s
/// `patient` is `subject` where it points at a Patient; `combo-code` is
/// `code` and `component-code` together; `phonetic` is `name`): they are
/// not written twice, and searches read the others' rows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Under its own code.
    Own,
    /// Under these parameters' codes (its expression is their union),
    /// derived entries (`:text`) too.
    As(Vec<&'static str>),
    /// Under this reference parameter's code, the entries whose system
    /// (the reference's type) is this type; its derived entries under its
    /// own code.
    Typed(&'static str, &'static str),
}

/// The rows a search on `name` (a parameter's code, or a derived name as
/// `code:text`) of `rtype` reads: the codes they are stored under, and the
/// system they must have.
pub fn storage(rtype: Option<&str>, name: &str) -> (Vec<String>, Option<&'static str>) {
    let (base, suffix) = match name.find(':') {
        Some(i) => name.split_at(i),
        None => (name, ""),
    };
    match rtype.and_then(|t| param(t, base)).map(|p| &p.stored) {
        Some(Stored::As(codes)) => (codes.iter().map(|c| format!("{c}{suffix}")).collect(), None),
        Some(Stored::Typed(code, ty)) if suffix.is_empty() => (vec![(*code).to_owned()], Some(ty)),
        _ => (vec![name.to_owned()], None),
    }
}

/// The union members of an expression (`A | B`), or the whole expression
/// when it is not a plain top-level union.
fn pieces(expr: &str) -> Vec<&str> {
    let parts: Vec<&str> = expr.split(" | ").map(str::trim).collect();
    let balanced = |p: &str| p.matches('(').count() == p.matches(')').count();
    if parts.iter().all(|p| balanced(p)) {
        parts
    } else {
        vec![expr]
    }
}

/// Which parameters of one type are stored as others (see [`Stored`]).
fn aliases(defs: &[&'static spec::ParamDef]) -> Vec<Stored> {
    let usable = |d: &spec::ParamDef| d.expr.is_some() && d.kind != Kind::Special;
    // composites also pair the same components the same way
    let parts_of = |d: &spec::ParamDef| -> Vec<(Kind, &'static str)> {
        d.components.iter().map(|(_, k, e)| (*k, *e)).collect()
    };
    let mut out = vec![Stored::Own; defs.len()];
    // the same expression as an earlier parameter, or one of its
    // references restricted to a type
    for (i, d) in defs.iter().enumerate() {
        let Some(e) = d.expr.filter(|_| usable(d)) else {
            continue;
        };
        let mine = pieces(e);
        if let Some(j) = (0..i).find(|&j| {
            out[j] == Stored::Own
                && usable(defs[j])
                && defs[j].kind == d.kind
                && parts_of(defs[j]) == parts_of(d)
                && defs[j].expr.map(pieces) == Some(mine.clone())
        }) {
            out[i] = Stored::As(vec![defs[j].code]);
            continue;
        }
        if d.kind == Kind::Reference && mine.len() == 1 {
            let typed = mine[0]
                .strip_suffix(')')
                .and_then(|x| x.rsplit_once(".where(resolve() is "))
                .filter(|(_, t)| crate::resource::is_resource_type(t));
            if let Some((inner, ty)) = typed {
                if let Some(q) = defs.iter().find(|q| {
                    q.code != d.code
                        && q.kind == Kind::Reference
                        && q.expr.map(pieces) == Some(vec![inner])
                }) {
                    let ty: &'static str = crate::resource::RESOURCE_TYPES
                        .iter()
                        .find(|t| **t == ty)
                        .copied()
                        .unwrap_or("Resource");
                    out[i] = Stored::Typed(q.code, ty);
                }
            }
        }
    }
    // the union of other parameters' expressions (those stored as
    // themselves, with fewer members)
    let mut order: Vec<usize> = (0..defs.len()).collect();
    order.sort_by_key(|&i| defs[i].expr.map(|e| pieces(e).len()).unwrap_or(0));
    for i in order {
        let d = defs[i];
        if out[i] != Stored::Own || !usable(d) {
            continue;
        }
        let mine = pieces(d.expr.unwrap_or_default());
        if mine.len() < 2 {
            continue;
        }
        let parts: Vec<usize> = (0..defs.len())
            .filter(|&j| {
                j != i
                    && out[j] == Stored::Own
                    && usable(defs[j])
                    && defs[j].kind == d.kind
                    && parts_of(defs[j]) == parts_of(d)
                    && {
                        let theirs = pieces(defs[j].expr.unwrap_or_default());
                        theirs.len() < mine.len() && theirs.iter().all(|p| mine.contains(p))
                    }
            })
            .collect();
        let covered = mine.iter().all(|p| {
            parts
                .iter()
                .any(|&j| pieces(defs[j].expr.unwrap_or_default()).contains(p))
        });
        if covered && !parts.is_empty() {
            out[i] = Stored::As(parts.iter().map(|&j| defs[j].code).collect());
        }
    }
    out
}

/// The member paths of an expression made only of `Type.a.b` unions.
fn simple_paths(rtype: &str, expr: &'static str) -> Option<Vec<Vec<&'static str>>> {
    let mut out = Vec::new();
    for part in expr.split(" | ") {
        let mut segs = part.trim().split('.');
        let head = segs.next()?;
        if head != rtype && !spec::COMMON_BASES.contains(&head) {
            return None;
        }
        let rest: Vec<&'static str> = segs.collect();
        let plain = |s: &str| {
            s.starts_with(|c: char| c.is_ascii_lowercase())
                && s.chars().all(|c| c.is_ascii_alphanumeric())
        };
        if rest.is_empty() || !rest.iter().all(|s| plain(s)) {
            return None;
        }
        out.push(rest);
    }
    Some(out)
}

/// The values at `path` under `root`, arrays flattened, choice elements
/// (`value` → `valueQuantity`) followed, as FHIRPath navigation does.
fn walk<'a>(root: &'a Value, path: &[&str], out: &mut Vec<&'a Value>) {
    let mut cur = vec![root];
    for seg in path {
        let mut next = Vec::new();
        for v in cur {
            let Value::Object(o) = v else { continue };
            let mut take = |x: &'a Value| match x {
                Value::Array(a) => next.extend(a.iter()),
                Value::Null => {}
                other => next.push(other),
            };
            match o.get(*seg) {
                Some(x) => take(x),
                None => {
                    for (k, x) in o {
                        if k.len() > seg.len()
                            && k.starts_with(seg)
                            && k[seg.len()..].starts_with(|c: char| c.is_ascii_uppercase())
                        {
                            take(x);
                        }
                    }
                }
            }
        }
        cur = next;
    }
    out.extend(cur);
}

pub mod custom;

type Registry = HashMap<&'static str, Vec<Param>>;

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| {
        let mut r: Registry = HashMap::new();
        for t in crate::resource::RESOURCE_TYPES {
            let mut v = Vec::new();
            let defs: Vec<&'static spec::ParamDef> = spec::params_of(t).collect();
            let stored = aliases(&defs);
            for (d, stored) in defs.into_iter().zip(stored) {
                let compile = |e: &str| match fhirpath::parse(e) {
                    Ok(x) => Some(x),
                    Err(err) => {
                        debug_assert!(false, "{t}.{}: {err}", d.code);
                        None
                    }
                };
                v.push(Param {
                    paths: d.expr.and_then(|e| simple_paths(t, e)),
                    code: d.code,
                    kind: d.kind,
                    expr: d.expr.and_then(compile),
                    targets: d.targets,
                    components: d
                        .components
                        .iter()
                        .filter_map(|(_, k, e)| Some((*k, compile(e)?)))
                        .collect(),
                    name: Arc::from(d.code),
                    derived: Derived::of(d.code),
                    custom: false,
                    stored,
                });
            }
            r.insert(t, v);
        }
        r
    })
}

/// The search parameters of R4 for `rtype` (its own and the common ones).
pub fn params(rtype: &str) -> &'static [Param] {
    registry().get(rtype).map(Vec::as_slice).unwrap_or(&[])
}

/// One parameter of `rtype` by its code: R4's, else an active custom one.
pub fn param(rtype: &str, code: &str) -> Option<&'static Param> {
    params(rtype)
        .iter()
        .find(|p| p.code == code)
        .or_else(|| custom::params(rtype).into_iter().find(|p| p.code == code))
}

/// Every parameter of `rtype`: R4's, then the active custom ones.
pub fn all_params(rtype: &str) -> Vec<&'static Param> {
    params(rtype).iter().chain(custom::params(rtype)).collect()
}

/// Case- and accent-folded text, at most [`TEXT_CHARS_MAX`] characters.
pub fn fold(s: &str) -> String {
    if s.is_ascii() {
        let mut out = s[..s.len().min(TEXT_CHARS_MAX)].to_owned();
        out.make_ascii_lowercase();
        return out;
    }
    s.nfd()
        .filter(|c| !is_combining_mark(*c))
        .flat_map(char::to_lowercase)
        .take(TEXT_CHARS_MAX)
        .collect()
}

/// The index entries of `root`, a resource of type `rtype`.
pub fn extract(rtype: &str, root: &Value) -> Vec<IndexEntry> {
    let env = Env::new();
    let mut out = Vec::new();
    let mut values = Vec::new();
    for p in params(rtype).iter().chain(custom::params(rtype)) {
        let Some(e) = &p.expr else { continue };
        // searched on the versions table itself, or stored as others
        if UNINDEXED.contains(&p.code) || matches!(p.stored, Stored::As(_)) {
            continue;
        }
        let mut keys = Vec::new();
        match &p.paths {
            Some(paths) if p.kind != Kind::Composite => {
                values.clear();
                for path in paths {
                    walk(root, path, &mut values);
                }
                for v in &values {
                    value_keys(p.kind, v, Some(&p.derived), &mut keys, &mut out);
                }
            }
            _ => {
                let Ok(items) = eval(e, root, &env) else {
                    continue;
                };
                if p.kind == Kind::Composite {
                    composite(p, &items, &env, &mut out);
                    continue;
                }
                for it in &items {
                    item_keys(p.kind, it, Some(&p.derived), &mut keys, &mut out);
                }
            }
        }
        if p.stored == Stored::Own {
            for k in keys {
                push(&mut out, &p.name, k);
            }
        }
        if out.len() > ENTRIES_MAX {
            out.truncate(ENTRIES_MAX);
            break;
        }
    }
    // one row per distinct entry (a CodeableConcept's text and its
    // coding's display are often the same words)
    out.sort_by(|a, b| a.param.cmp(&b.param).then_with(|| a.key.order(&b.key)));
    out.dedup();
    out
}

/// Parameters every search answers from the versions table (`_id` from
/// its id, `_lastUpdated` from its time), never from index rows.
const UNINDEXED: &[&str] = &["_id", "_lastUpdated"];

impl Key {
    /// The table the key goes to, as a number.
    pub fn rank(&self) -> u8 {
        match self {
            Key::Token { .. } => 0,
            Key::Text { .. } => 1,
            Key::Date { .. } => 2,
            Key::Number { .. } => 3,
            Key::Composite { .. } => 4,
        }
    }

    /// A total order of keys: by table, then by the table's key columns.
    pub fn order(&self, other: &Key) -> std::cmp::Ordering {
        use std::cmp::Ordering::Equal;
        self.rank()
            .cmp(&other.rank())
            .then_with(|| match (self, other) {
                (
                    Key::Token {
                        value: a,
                        system: s,
                    },
                    Key::Token {
                        value: b,
                        system: t,
                    },
                ) => a.cmp(b).then_with(|| s.cmp(t)),
                (Key::Text { norm: a, raw: r }, Key::Text { norm: b, raw: q }) => {
                    a.cmp(b).then_with(|| r.cmp(q))
                }
                (Key::Date { lo: a, hi: x }, Key::Date { lo: b, hi: y }) => a.cmp(b).then(x.cmp(y)),
                (
                    Key::Number {
                        value: a,
                        system: s,
                        code: c,
                    },
                    Key::Number {
                        value: b,
                        system: t,
                        code: d,
                    },
                ) => a.total_cmp(b).then_with(|| s.cmp(t)).then_with(|| c.cmp(d)),
                (
                    Key::Composite {
                        a_val,
                        a_sys,
                        b_val,
                        b_sys,
                        b_lo,
                        b_hi,
                    },
                    Key::Composite {
                        a_val: a2,
                        a_sys: s2,
                        b_val: v2,
                        b_sys: t2,
                        b_lo: l2,
                        b_hi: h2,
                    },
                ) => a_val
                    .cmp(a2)
                    .then_with(|| a_sys.cmp(s2))
                    .then_with(|| b_val.cmp(v2))
                    .then_with(|| b_sys.cmp(t2))
                    .then_with(|| b_lo.total_cmp(l2))
                    .then_with(|| b_hi.total_cmp(h2)),
                _ => Equal,
            })
    }
}

/// The keys of one parameter of `root` (its derived entries left out).
pub fn extract_param(rtype: &str, code: &str, root: &Value) -> Vec<Key> {
    let Some(p) = param(rtype, code) else {
        return Vec::new();
    };
    let Some(e) = &p.expr else {
        return Vec::new();
    };
    let env = Env::new();
    let mut keys = Vec::new();
    let mut derived = Vec::new();
    if let Ok(items) = eval(e, root, &env) {
        for it in &items {
            item_keys(p.kind, it, None, &mut keys, &mut derived);
        }
    }
    keys
}

fn eval<'a>(e: &Expr, root: &'a Value, env: &Env<'a>) -> Result<Vec<Item<'a>>, ()> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        fhirpath::evaluate(e, root, env)
    }))
    .map_err(|_| ())?
    .map_err(|_| ())
}

/// Adds an entry (repeats are removed once, sorted, at the end).
fn push(out: &mut Vec<IndexEntry>, param: &Arc<str>, key: Key) {
    out.push(IndexEntry {
        param: param.clone(),
        key,
    });
}

/// A derived entry, when its names are wanted (`None`: the caller only
/// wants the parameter's own keys).
fn derived(out: &mut Vec<IndexEntry>, name: Option<&Arc<str>>, key: impl FnOnce() -> Key) {
    if let Some(name) = name {
        push(out, name, key());
    }
}

fn text(s: &str) -> Key {
    Key::Text {
        norm: fold(s),
        raw: s.to_owned(),
    }
}

fn token(system: &str, value: &str) -> Key {
    Key::Token {
        system: system.to_owned(),
        value: value.to_owned(),
    }
}

fn str_of<'a>(o: &'a Map<String, Value>, k: &str) -> Option<&'a str> {
    o.get(k).and_then(Value::as_str)
}

fn strs<'a>(o: &'a Map<String, Value>, k: &str) -> Vec<&'a str> {
    match o.get(k) {
        Some(Value::String(s)) => vec![s.as_str()],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

fn objects<'a>(o: &'a Map<String, Value>, k: &str) -> Vec<&'a Map<String, Value>> {
    match o.get(k) {
        Some(Value::Object(x)) => vec![x],
        Some(Value::Array(a)) => a.iter().filter_map(Value::as_object).collect(),
        _ => Vec::new(),
    }
}

/// The JSON of an item, with system values written as JSON.
fn json_of(it: &Item) -> Option<Value> {
    Some(match it {
        Item::Node(n) => n.v.clone(),
        Item::Str(s) => Value::String(s.clone()),
        Item::Bool(b) => Value::Bool(*b),
        Item::Int(i) => Value::from(*i),
        Item::Dec(d) => serde_json::from_str(&d.to_string()).ok()?,
        Item::Date(t) | Item::DateTime(t) => Value::String(t.to_string()),
        _ => return None,
    })
}

/// The keys of one item for a parameter of `kind`; derived entries
/// (`:text`, `:of-type`, `:identifier`) go straight to `out`.
fn item_keys(
    kind: Kind,
    it: &Item,
    names: Option<&Derived>,
    keys: &mut Vec<Key>,
    out: &mut Vec<IndexEntry>,
) {
    let v = match it {
        Item::Node(n) => std::borrow::Cow::Borrowed(n.v),
        other => match json_of(other) {
            Some(v) => std::borrow::Cow::Owned(v),
            None => return,
        },
    };
    value_keys(kind, v.as_ref(), names, keys, out);
}

fn value_keys(
    kind: Kind,
    v: &Value,
    names: Option<&Derived>,
    keys: &mut Vec<Key>,
    out: &mut Vec<IndexEntry>,
) {
    match kind {
        Kind::Token => token_keys(v, names, keys, out),
        Kind::Uri => {
            if let Some(s) = v.as_str() {
                keys.push(token("", s));
            }
        }
        Kind::String => string_keys(v, keys),
        Kind::Reference => reference_keys(v, names, keys, out),
        Kind::Date => date_keys(v, keys),
        Kind::Number | Kind::Quantity => number_keys(v, keys),
        Kind::Composite | Kind::Special => {}
    }
}

fn token_keys(v: &Value, names: Option<&Derived>, keys: &mut Vec<Key>, out: &mut Vec<IndexEntry>) {
    let text_name = names.map(|n| &n.text);
    match v {
        Value::String(s) => keys.push(token("", s)),
        Value::Bool(b) => keys.push(token("", if *b { "true" } else { "false" })),
        Value::Number(n) => keys.push(token("", &n.to_string())),
        Value::Object(o) => {
            let coding =
                |c: &Map<String, Value>, keys: &mut Vec<Key>, out: &mut Vec<IndexEntry>| {
                    if let Some(code) = str_of(c, "code") {
                        keys.push(token(str_of(c, "system").unwrap_or(""), code));
                    }
                    if let Some(d) = str_of(c, "display") {
                        derived(out, text_name, || text(d));
                    }
                };
            if o.contains_key("coding") || (o.contains_key("text") && !o.contains_key("value")) {
                // CodeableConcept
                for c in objects(o, "coding") {
                    coding(c, keys, out);
                }
                if let Some(t) = str_of(o, "text") {
                    derived(out, text_name, || text(t));
                }
            } else if let Some(value) = str_of(o, "value") {
                // Identifier or ContactPoint
                keys.push(token(str_of(o, "system").unwrap_or(""), value));
                if let Some(ty) = o.get("type").and_then(Value::as_object) {
                    for c in objects(ty, "coding") {
                        if let Some(code) = str_of(c, "code") {
                            let sys = str_of(c, "system").unwrap_or("");
                            derived(out, names.map(|n| &n.of_type), || {
                                token(sys, &format!("{code}|{value}"))
                            });
                        }
                    }
                    if let Some(t) = str_of(ty, "text") {
                        derived(out, text_name, || text(t));
                    }
                }
            } else if o.contains_key("code") || o.contains_key("system") {
                coding(o, keys, out);
            }
        }
        _ => {}
    }
}

const NAME_PARTS: &[&str] = &["family", "given", "prefix", "suffix", "text"];
const ADDRESS_PARTS: &[&str] = &[
    "line",
    "city",
    "district",
    "state",
    "postalCode",
    "country",
    "text",
];

fn string_keys(v: &Value, keys: &mut Vec<Key>) {
    match v {
        Value::String(s) => keys.push(text(s)),
        Value::Object(o) => {
            for part in NAME_PARTS.iter().chain(ADDRESS_PARTS) {
                for s in strs(o, part) {
                    keys.push(text(s));
                }
            }
        }
        _ => {}
    }
}

fn reference_keys(
    v: &Value,
    names: Option<&Derived>,
    keys: &mut Vec<Key>,
    out: &mut Vec<IndexEntry>,
) {
    match v {
        Value::String(s) => canonical_keys(s, keys),
        Value::Object(o) => {
            if let Some(r) = str_of(o, "reference") {
                if r.contains("://") {
                    keys.push(token("", r));
                } else if let Some((t, id)) = parse_reference(r) {
                    keys.push(token(t, id));
                } else if r.contains(':') && !r.starts_with('#') {
                    keys.push(token("", r));
                }
            }
            if let Some(i) = o.get("identifier").and_then(Value::as_object) {
                if let Some(value) = str_of(i, "value") {
                    let sys = str_of(i, "system").unwrap_or("");
                    derived(out, names.map(|n| &n.identifier), || token(sys, value));
                }
            }
        }
        _ => {}
    }
}

/// A canonical URL, with and without its `|version`.
fn canonical_keys(s: &str, keys: &mut Vec<Key>) {
    keys.push(token("", s));
    if let Some((url, _)) = s.split_once('|') {
        keys.push(token("", url));
    } else if let Some((t, id)) = parse_reference(s).filter(|_| !s.contains("://")) {
        keys.push(token(t, id));
    }
}

fn date_keys(v: &Value, keys: &mut Vec<Key>) {
    let range = |s: &str| parse_range(s);
    match v {
        Value::String(s) => {
            if let Some((lo, hi)) = range(s) {
                keys.push(Key::Date { lo, hi });
            }
        }
        Value::Object(o) => {
            // Period
            let start = str_of(o, "start").and_then(range);
            let end = str_of(o, "end").and_then(range);
            if start.is_some() || end.is_some() {
                keys.push(Key::Date {
                    lo: start.map_or(i64::MIN, |r| r.0),
                    hi: end.map_or(i64::MAX, |r| r.1),
                });
            }
            // Timing
            for e in strs(o, "event") {
                if let Some((lo, hi)) = range(e) {
                    keys.push(Key::Date { lo, hi });
                }
            }
            if let Some(r) = o.get("repeat").and_then(Value::as_object) {
                if let Some(p) = r.get("boundsPeriod") {
                    date_keys(p, keys);
                }
            }
        }
        _ => {}
    }
}

fn number_keys(v: &Value, keys: &mut Vec<Key>) {
    match v {
        Value::Number(n) => {
            if let Some(x) = n.as_f64() {
                keys.push(Key::Number {
                    value: x,
                    system: String::new(),
                    code: String::new(),
                });
            }
        }
        Value::Object(o) => {
            let Some(x) = o.get("value").and_then(Value::as_f64) else {
                return;
            };
            let (system, code) = match (str_of(o, "currency"), str_of(o, "code")) {
                (Some(cur), _) => ("urn:iso:std:iso:4217", Some(cur)),
                (None, code) => (str_of(o, "system").unwrap_or(""), code),
            };
            let unit = str_of(o, "unit");
            for c in [code, unit.filter(|u| Some(*u) != code)]
                .into_iter()
                .flatten()
            {
                keys.push(Key::Number {
                    value: x,
                    system: if Some(c) == unit && Some(c) != code {
                        String::new()
                    } else {
                        system.to_owned()
                    },
                    code: c.to_owned(),
                });
            }
            if code.is_none() && unit.is_none() {
                keys.push(Key::Number {
                    value: x,
                    system: system.to_owned(),
                    code: String::new(),
                });
            }
        }
        _ => {}
    }
}

/// Composite entries: each element the expression selects pairs the
/// values of its two components.
fn composite(p: &Param, items: &[Item], env: &Env, out: &mut Vec<IndexEntry>) {
    let [(ka, ea), (kb, eb)] = p.components.as_slice() else {
        return;
    };
    for it in items {
        // Each element as the root of its components' expressions.
        let Item::Node(n) = it else { continue };
        let el = n.v;
        let keys_of = |k: Kind, e: &Expr| {
            let mut keys = Vec::new();
            let mut ignored = Vec::new();
            if let Ok(vals) = eval(e, el, env) {
                for v in &vals {
                    item_keys(k, v, None, &mut keys, &mut ignored);
                }
            }
            keys
        };
        let a = keys_of(*ka, ea);
        let b = keys_of(*kb, eb);
        for x in &a {
            let Key::Token { system, value } = x else {
                continue;
            };
            for y in &b {
                let (b_sys, b_val, b_lo, b_hi) = match y {
                    Key::Token { system, value } => (system.clone(), value.clone(), 0.0, 0.0),
                    Key::Text { norm, .. } => (String::new(), norm.clone(), 0.0, 0.0),
                    Key::Number {
                        value,
                        system,
                        code,
                    } => (system.clone(), code.clone(), *value, *value),
                    Key::Date { lo, hi } => (String::new(), String::new(), *lo as f64, *hi as f64),
                    Key::Composite { .. } => continue,
                };
                push(
                    out,
                    &p.name,
                    Key::Composite {
                        a_sys: system.clone(),
                        a_val: value.clone(),
                        b_sys,
                        b_val,
                        b_lo,
                        b_hi,
                    },
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(json: &str) -> Vec<(String, Key)> {
        let v: Value = serde_json::from_str(json).unwrap();
        let t = v["resourceType"].as_str().unwrap().to_owned();
        extract(&t, &v)
            .into_iter()
            .map(|e| (e.param.to_string(), e.key))
            .collect()
    }

    fn has(e: &[(String, Key)], param: &str, key: Key) -> bool {
        e.iter().any(|(p, k)| p == param && *k == key)
    }

    #[test]
    fn every_parameter_compiles() {
        for t in crate::resource::RESOURCE_TYPES {
            for p in params(t) {
                let d = spec::params_of(t).find(|d| d.code == p.code).unwrap();
                assert_eq!(p.expr.is_some(), d.expr.is_some(), "{t}.{}", p.code);
                assert_eq!(p.components.len(), d.components.len(), "{t}.{}", p.code);
            }
        }
        assert!(params("Observation").len() > 30);
    }

    /// The direct walk gives what the engine gives, for every parameter it
    /// serves, on resources with choices, arrays and primitives.
    #[test]
    fn walked_paths_agree_with_the_engine() {
        let docs = [
            r#"{"resourceType":"Observation","status":"final","code":{"coding":[{"system":"s","code":"c"}]},
                "valueQuantity":{"value":1},"effectivePeriod":{"start":"2020"},"identifier":[{"value":"a"},{"value":"b"}],
                "component":[{"code":{"text":"x"},"valueString":"y"}],"meta":{"tag":[{"code":"t"}]}}"#,
            r#"{"resourceType":"Patient","name":[{"family":"F","given":["A","B"]},{"text":"T"}],"birthDate":"1970",
                "telecom":[{"system":"phone","value":"1"},{"system":"email","value":"e"}],"address":[{"city":"C","line":["l1"]}],
                "deceasedBoolean":false,"link":[{"other":{"reference":"Patient/2"}}]}"#,
        ];
        let mut compared = 0;
        for d in docs {
            let v: Value = serde_json::from_str(d).unwrap();
            let t = v["resourceType"].as_str().unwrap();
            for p in params(t) {
                let (Some(paths), Some(e)) = (&p.paths, &p.expr) else {
                    continue;
                };
                let mut walked = Vec::new();
                for path in paths {
                    walk(&v, path, &mut walked);
                }
                let engine: Vec<Value> = fhirpath::evaluate(e, &v, &Env::new())
                    .unwrap()
                    .iter()
                    .filter_map(json_of)
                    .collect();
                let walked: Vec<Value> = walked.into_iter().cloned().collect();
                assert_eq!(walked, engine, "{t}.{}", p.code);
                compared += 1;
            }
        }
        assert!(compared > 40, "{compared}");
        let simple = params("Patient")
            .iter()
            .filter(|p| p.paths.is_some())
            .count();
        assert!(simple > 20, "{simple}");
    }

    #[test]
    fn observation() {
        let e = entries(
            r#"{"resourceType":"Observation","status":"final",
                "identifier":[{"system":"s","value":"1","type":{"coding":[{"system":"ts","code":"MR"}]}}],
                "code":{"coding":[{"system":"http://loinc.org","code":"8867-4","display":"Heart rate"}],"text":"HR"},
                "subject":{"reference":"Patient/p1","identifier":{"system":"nid","value":"42"}},
                "effectivePeriod":{"start":"2020-01-01","end":"2020-01-02"},
                "valueQuantity":{"value":72,"unit":"beats/minute","system":"http://unitsofmeasure.org","code":"/min"},
                "component":[{"code":{"coding":[{"system":"http://loinc.org","code":"8480-6"}]},"valueQuantity":{"value":120,"system":"http://unitsofmeasure.org","code":"mm[Hg]"}}]}"#,
        );
        assert!(has(&e, "status", token("", "final")));
        assert!(has(&e, "identifier", token("s", "1")));
        assert!(has(&e, "identifier:of-type", token("ts", "MR|1")));
        assert!(has(&e, "code", token("http://loinc.org", "8867-4")));
        assert!(has(&e, "code:text", text("Heart rate")));
        assert!(has(&e, "code:text", text("HR")));
        assert!(has(&e, "subject", token("Patient", "p1")));
        // `patient` is read from `subject`'s rows (Stored::Typed)
        assert!(!e.iter().any(|x| x.0 == "patient"));
        assert!(has(&e, "subject:identifier", token("nid", "42")));
        let (lo, _) = parse_range("2020-01-01").unwrap();
        let (_, hi) = parse_range("2020-01-02").unwrap();
        assert!(has(&e, "date", Key::Date { lo, hi }));
        assert!(has(
            &e,
            "value-quantity",
            Key::Number {
                value: 72.0,
                system: "http://unitsofmeasure.org".into(),
                code: "/min".into()
            }
        ));
        assert!(has(
            &e,
            "value-quantity",
            Key::Number {
                value: 72.0,
                system: "".into(),
                code: "beats/minute".into()
            }
        ));
        assert!(has(
            &e,
            "component-code-value-quantity",
            Key::Composite {
                a_sys: "http://loinc.org".into(),
                a_val: "8480-6".into(),
                b_sys: "http://unitsofmeasure.org".into(),
                b_val: "mm[Hg]".into(),
                b_lo: 120.0,
                b_hi: 120.0
            }
        ));
        // A Group subject is no patient.
        let g = entries(r#"{"resourceType":"Observation","subject":{"reference":"Group/g"}}"#);
        assert!(has(&g, "subject", token("Group", "g")));
        assert!(!g.iter().any(|(p, _)| p == "patient"));
    }

    #[test]
    fn patient_strings_fold() {
        let e = entries(
            r#"{"resourceType":"Patient","name":[{"family":"Ötieno","given":["Amani","Joy"]}],
                "birthDate":"1970-03","gender":"female","active":true,
                "telecom":[{"system":"phone","value":"555"}],
                "address":[{"city":"Kisumu","postalCode":"40100"}]}"#,
        );
        assert!(has(&e, "family", text("Ötieno")));
        assert!(e
            .iter()
            .any(|(p, k)| p == "name" && matches!(k, Key::Text{norm, ..} if norm == "otieno")));
        assert!(has(&e, "given", text("Joy")));
        assert!(has(&e, "address-city", text("Kisumu")));
        assert!(has(&e, "gender", token("", "female")));
        assert!(has(&e, "active", token("", "true")));
        assert!(has(&e, "phone", token("phone", "555")));
        let (lo, hi) = parse_range("1970-03").unwrap();
        assert!(has(&e, "birthdate", Key::Date { lo, hi }));
        assert_eq!(fold("ÁbÇ"), "abc");
    }
}

#[cfg(test)]
mod alias_tests {
    use super::*;

    #[test]
    fn parameters_stored_as_others() {
        let s = |t: &str, c: &str| param(t, c).unwrap().stored.clone();
        assert_eq!(
            s("Observation", "patient"),
            Stored::Typed("subject", "Patient")
        );
        assert_eq!(
            s("Observation", "combo-code"),
            Stored::As(vec!["code", "component-code"])
        );
        assert_eq!(s("Patient", "phonetic"), Stored::As(vec!["name"]));
        // composites: only those pairing the same components
        assert_eq!(
            s("Observation", "combo-code-value-quantity"),
            Stored::As(vec!["code-value-quantity", "component-code-value-quantity"])
        );
        assert_eq!(
            s("Observation", "combo-code-value-concept"),
            Stored::As(vec!["code-value-concept", "component-code-value-concept"])
        );
        for c in [
            "component-code-value-quantity",
            "component-code-value-concept",
        ] {
            assert_eq!(s("Observation", c), Stored::Own, "{c}");
        }
        assert_eq!(
            s("Encounter", "practitioner"),
            Stored::Typed("participant", "Practitioner")
        );
        for (t, c) in [
            ("Observation", "code"),
            ("Observation", "subject"),
            ("Patient", "name"),
            ("AllergyIntolerance", "patient"),
        ] {
            assert_eq!(s(t, c), Stored::Own, "{t}.{c}");
        }
        assert_eq!(
            storage(Some("Observation"), "combo-code:text").0,
            ["code:text", "component-code:text"]
        );
        assert_eq!(
            storage(Some("Observation"), "patient"),
            (vec!["subject".to_owned()], Some("Patient"))
        );
        assert_eq!(
            storage(Some("Observation"), "patient:identifier"),
            (vec!["patient:identifier".to_owned()], None)
        );
        assert_eq!(storage(None, "patient"), (vec!["patient".to_owned()], None));
        // no alias of an alias, and every alias names parameters stored as themselves
        let mut n = 0;
        for t in crate::resource::RESOURCE_TYPES {
            for p in params(t) {
                let targets: Vec<&str> = match &p.stored {
                    Stored::Own => continue,
                    Stored::As(v) => v.clone(),
                    Stored::Typed(c, _) => vec![*c],
                };
                n += 1;
                for c in targets {
                    assert_eq!(
                        param(t, c).unwrap().stored,
                        Stored::Own,
                        "{t}.{} → {c}",
                        p.code
                    );
                    assert_eq!(param(t, c).unwrap().kind, p.kind, "{t}.{} → {c}", p.code);
                }
            }
        }
        assert!(n > 50, "{n} aliases");
    }
}
