//! Parsing FHIR search parameters into a [`SearchQuery`] that any storage
//! backend can run: every R4 SearchParameter of the type with its
//! modifiers, chains, `_has`, `_include`/`_revinclude`, `_sort`,
//! `_summary`, `_elements`, `_total`, plus the paging positions this server
//! writes into its own links.

mod judge;
mod value;

pub use judge::judge;

use crate::index;
use crate::resource::{is_resource_type, is_valid_id};
use crate::spec::Kind;

/// Page size used when `_count` is absent.
pub const COUNT_DEFAULT: usize = 50;
/// Largest page a client may ask for.
pub const COUNT_MAX: usize = 1000;

/// Name of the internal paging parameter: the snapshot `seq` a search runs at.
pub const PARAM_SNAPSHOT: &str = "_snapshot";
/// Name of the internal paging parameter: the last position already returned.
pub const PARAM_CURSOR: &str = "_cursor";
/// Name of the internal paging parameter: the total counted on the first
/// page (constant for the snapshot, so later pages need not count again).
pub const PARAM_SNAPSHOT_TOTAL: &str = "_snapshot_total";
/// Name of the internal paging parameter of sorted searches: how many
/// matches earlier pages returned.
pub const PARAM_OFFSET: &str = "_offset";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Ne,
    Gt,
    Ge,
    Lt,
    Le,
    Sa,
    Eb,
    Ap,
}

/// A `_lastUpdated` condition on `[start, end)` of the given value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DateClause {
    pub prefix: Prefix,
    pub start_ms: i64,
    pub end_ms: i64,
}

impl DateClause {
    /// Whether an instant `t` (ms) satisfies the clause.
    pub fn matches(&self, t: i64) -> bool {
        match self.prefix {
            Prefix::Eq | Prefix::Ap => self.start_ms <= t && t < self.end_ms,
            Prefix::Ne => !(self.start_ms <= t && t < self.end_ms),
            Prefix::Gt | Prefix::Sa => t >= self.end_ms,
            Prefix::Ge => t >= self.start_ms,
            Prefix::Lt | Prefix::Eb => t < self.start_ms,
            Prefix::Le => t < self.end_ms,
        }
    }
}

/// How a string parameter compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TextOp {
    /// Folded, the value starts with the search text (the default).
    Starts,
    /// As written, whole (`:exact`).
    Exact,
    /// Folded, anywhere in the value (`:contains`).
    Contains,
}

/// A number or quantity: the value as written, the range of its
/// precision, and the unit.
#[derive(Debug, Clone, PartialEq)]
pub struct NumberCond {
    pub prefix: Prefix,
    pub value: f64,
    pub lo: f64,
    pub hi: f64,
    pub system: Option<String>,
    pub code: Option<String>,
}

/// The second part of a composite value.
#[derive(Debug, Clone, PartialEq)]
pub enum CompB {
    Token(Option<String>, Option<String>),
    Text(String),
    Number(NumberCond),
    /// A date: prefix, range `[lo, hi)` and the value's start.
    Range(Prefix, f64, f64, f64),
}

/// One alternative of a parameter.
#[derive(Debug, Clone, PartialEq)]
pub enum Cond {
    Id(String),
    LastUpdated(DateClause),
    /// A token, reference or URI: `None` matches any system / value.
    Token {
        param: String,
        system: Option<String>,
        value: Option<String>,
    },
    Text {
        param: String,
        op: TextOp,
        value: String,
    },
    /// A date range `[lo, hi)` in ms.
    Date {
        param: String,
        prefix: Prefix,
        lo: i64,
        hi: i64,
    },
    Number {
        param: String,
        q: NumberCond,
    },
    /// `:below` (the value starts with) or `:above` (the value is a prefix
    /// of the search URI).
    Uri {
        param: String,
        below: bool,
        value: String,
    },
    Composite {
        param: String,
        a_sys: Option<String>,
        a_val: Option<String>,
        b: CompB,
    },
}

/// One parameter of a search; the clauses of a query all hold (AND).
#[derive(Debug, Clone, PartialEq)]
pub enum Clause {
    /// Any of the alternatives (comma = OR).
    Any(Vec<Cond>),
    /// None of the alternatives (`:not`).
    Not(Vec<Cond>),
    /// `:missing=true|false`.
    Missing {
        kind: Kind,
        param: String,
        missing: bool,
    },
    /// A chained parameter: the reference `param` points at a resource of
    /// one of the types for which that type's clause holds.
    Chain {
        param: String,
        targets: Vec<(String, Clause)>,
    },
    /// `_has:Type:param:…`: a resource of `rtype` refers to this one through
    /// `param` and satisfies `inner`.
    Has {
        rtype: String,
        param: String,
        inner: Box<Clause>,
    },
    /// Membership of a compartment: a resource of one of the member types
    /// linked to `target` (type, ids) by one of its type's parameters; no
    /// ids: linked to any resource of that type (a bulk export's
    /// `Patient/$export`), several: to any of them (a Group's members).
    Compartment {
        target: (String, Vec<String>),
        members: Vec<(String, Vec<String>)>,
        /// Whether the compartment's own resource counts (`$everything`).
        include_self: bool,
    },
}

/// One key of `_sort`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortKey {
    /// `_lastUpdated`, `_id` or a parameter's code.
    pub param: String,
    pub kind: Option<Kind>,
    pub desc: bool,
}

/// One `_include` or `_revinclude`: `source:param[:target]`; `param`
/// `None` is `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Include {
    pub source: String,
    pub param: Option<String>,
    pub target: Option<String>,
    pub iterate: bool,
}

/// `_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TotalMode {
    /// The default: counted when that is cheap (a selective search, or
    /// one whose matches fit on the first page), otherwise left out.
    #[default]
    Estimate,
    /// Always counted, whatever it costs.
    Accurate,
    None,
}

/// `_summary`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Summary {
    #[default]
    False,
    True,
    Text,
    Data,
    Count,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct SearchQuery {
    /// Resource type, or `None` for a system-level search.
    pub rtype: Option<String>,
    /// The parameters, all of which hold (AND).
    pub clauses: Vec<Clause>,
    pub count: usize,
    /// Empty: by `_lastUpdated` ascending, which is also change-log order.
    pub sort: Vec<SortKey>,
    pub summary: Summary,
    /// `_elements`: the top-level elements to keep (empty: all).
    pub elements: Vec<String>,
    pub includes: Vec<Include>,
    pub revincludes: Vec<Include>,
    pub total: TotalMode,
    pub snapshot: Option<u64>,
    /// The last position returned, for searches in change-log order.
    pub cursor: Option<u64>,
    /// Matches already returned, for sorted searches.
    pub offset: Option<u64>,
    /// The total of this snapshot, carried by paging links.
    pub snapshot_total: Option<u64>,
    /// Parameters that were present but are not supported (name as given).
    pub unsupported: Vec<String>,
    /// The supported parameters as given, for paging links.
    pub link_params: Vec<(String, String)>,
}

impl SearchQuery {
    /// Whether the search only counts (`_summary=count` or `_count=0`).
    pub fn summary_count(&self) -> bool {
        self.summary == Summary::Count
    }

    /// Whether results come in change-log order (paged by cursor).
    pub fn by_seq(&self) -> bool {
        self.sort.is_empty() || (self.sort.len() == 1 && self.sort[0].param == "_lastUpdated")
    }

    /// Whether the order by `seq` is descending.
    pub fn descending(&self) -> bool {
        self.sort.first().is_some_and(|k| k.desc)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchError {
    #[error("invalid value '{value}' for search parameter '{param}': {why}")]
    BadValue {
        param: String,
        value: String,
        why: &'static str,
    },
    #[error("search parameter '{param}' has no modifier ':{modifier}'")]
    BadModifier { param: String, modifier: String },
    /// A search larger than a named limit.
    #[error("{0}")]
    Limit(String),
}

/// The parameters of paging, which links carry and the server sets.
const PAGING_PARAMS: &[&str] = &[
    "_count",
    PARAM_SNAPSHOT,
    PARAM_CURSOR,
    PARAM_OFFSET,
    PARAM_SNAPSHOT_TOTAL,
];

/// Most parameters (`key=value` pairs) in one search, not counting the
/// paging parameters a `next` link adds (`_count` and the snapshot's).
pub const PARAMS_MAX: usize = 100;
/// Longest value of one parameter, in bytes.
pub const VALUE_BYTES_MAX: usize = 16 * 1024;
/// Most comma-separated alternatives in one parameter's value.
pub const VALUES_MAX: usize = 1000;

/// An error unless `pairs` are within the search limits.
fn check_limits(pairs: &[(String, String)]) -> Result<(), SearchError> {
    let counted = pairs
        .iter()
        .filter(|(k, _)| !PAGING_PARAMS.contains(&k.as_str()))
        .count();
    if counted > PARAMS_MAX {
        return Err(SearchError::Limit(format!(
            "{counted} search parameters, more than {PARAMS_MAX} (PARAMS_MAX)"
        )));
    }
    for (k, v) in pairs {
        if k.len() + v.len() > VALUE_BYTES_MAX {
            return Err(SearchError::Limit(format!(
                "search parameter '{}' is {} bytes long, more than {VALUE_BYTES_MAX} (VALUE_BYTES_MAX)",
                k.chars().take(64).collect::<String>(),
                k.len() + v.len()
            )));
        }
        let alternatives = v.split(',').count();
        if alternatives > VALUES_MAX {
            return Err(SearchError::Limit(format!(
                "search parameter '{k}' has {alternatives} values, more than {VALUES_MAX} (VALUES_MAX)"
            )));
        }
    }
    Ok(())
}

fn bad(param: &str, value: &str, why: &'static str) -> SearchError {
    SearchError::BadValue {
        param: param.into(),
        value: value.into(),
        why,
    }
}

/// Parameters accepted and ignored because they change nothing here.
const IGNORED: &[&str] = &["_format", "_pretty"];

/// Deepest chain (`subject:Patient.organization.name` is 2 links).
pub const CHAIN_DEPTH_MAX: usize = 4;
/// Most `_include` and `_revinclude` parameters in one search.
pub const INCLUDES_MAX: usize = 20;

impl SearchQuery {
    /// Parses `key=value` pairs (already percent-decoded) for a search on
    /// `rtype`.
    pub fn parse(rtype: Option<&str>, pairs: &[(String, String)]) -> Result<Self, SearchError> {
        Self::parse_at(rtype, pairs, None)
    }

    /// As [`SearchQuery::parse`], reading absolute references that start
    /// with `base` (this server's address) as local ones.
    pub fn parse_at(
        rtype: Option<&str>,
        pairs: &[(String, String)],
        base: Option<&str>,
    ) -> Result<Self, SearchError> {
        check_limits(pairs)?;
        let mut q = SearchQuery {
            rtype: rtype.map(str::to_owned),
            count: COUNT_DEFAULT,
            ..Default::default()
        };
        for (k, v) in pairs {
            let keep = !PAGING_PARAMS.contains(&k.as_str());
            let unsupported_before = q.unsupported.len();
            q.parse_pair(k, v, base)?;
            if keep && q.unsupported.len() == unsupported_before {
                q.link_params.push((k.clone(), v.clone()));
            }
        }
        if q.includes.len() + q.revincludes.len() > INCLUDES_MAX {
            return Err(SearchError::Limit(format!(
                "{} _include and _revinclude parameters, more than {INCLUDES_MAX} (INCLUDES_MAX)",
                q.includes.len() + q.revincludes.len()
            )));
        }
        Ok(q)
    }

    fn parse_pair(&mut self, k: &str, v: &str, base: Option<&str>) -> Result<(), SearchError> {
        let num = |what: &'static str| v.parse::<u64>().map_err(|_| bad(k, v, what));
        match k {
            "_count" => {
                let n: usize = v
                    .parse()
                    .map_err(|_| bad(k, v, "not a non-negative integer"))?;
                if n == 0 {
                    self.summary = Summary::Count;
                }
                self.count = n.min(COUNT_MAX);
            }
            "_sort" => self.sort = self.parse_sort(v)?,
            "_summary" => {
                self.summary = match v {
                    "true" => Summary::True,
                    "text" => Summary::Text,
                    "data" => Summary::Data,
                    "count" => Summary::Count,
                    "false" => Summary::False,
                    _ => return Err(bad(k, v, "expected true, text, data, count or false")),
                }
            }
            "_elements" => {
                self.elements = v
                    .split(',')
                    .map(|e| e.trim().to_owned())
                    .filter(|e| !e.is_empty())
                    .collect()
            }
            "_total" => match v {
                "none" => self.total = TotalMode::None,
                "accurate" => self.total = TotalMode::Accurate,
                "estimate" => self.total = TotalMode::Estimate,
                _ => return Err(bad(k, v, "expected none, estimate or accurate")),
            },
            "_include" | "_include:iterate" | "_include:recurse" => {
                let inc = parse_include(k, v)?;
                self.includes.push(inc);
            }
            "_revinclude" | "_revinclude:iterate" | "_revinclude:recurse" => {
                let inc = parse_include(k, v)?;
                self.revincludes.push(inc);
            }
            PARAM_SNAPSHOT => self.snapshot = Some(num("not a paging position")?),
            PARAM_CURSOR => self.cursor = Some(num("not a paging position")?),
            PARAM_OFFSET => self.offset = Some(num("not a paging position")?),
            PARAM_SNAPSHOT_TOTAL => self.snapshot_total = Some(num("not a count")?),
            k if IGNORED.contains(&k) => {}
            _ => match parse_clause(self.rtype.as_deref(), k, v, base, 0)? {
                Some(c) => self.clauses.push(c),
                None => self.unsupported.push(k.to_owned()),
            },
        }
        Ok(())
    }

    fn parse_sort(&self, v: &str) -> Result<Vec<SortKey>, SearchError> {
        let mut keys = Vec::new();
        for s in v.split(',') {
            let (desc, code) = match s.strip_prefix('-') {
                Some(c) => (true, c),
                None => (false, s),
            };
            let kind = match code {
                "_lastUpdated" | "_id" => None,
                _ => {
                    let p = self
                        .rtype
                        .as_deref()
                        .and_then(|t| index::param(t, code))
                        .filter(|p| {
                            p.expr.is_some() && !matches!(p.kind, Kind::Composite | Kind::Special)
                        })
                        .ok_or_else(|| bad("_sort", s, "not a sortable parameter of this type"))?;
                    Some(p.kind)
                }
            };
            keys.push(SortKey {
                param: code.to_owned(),
                kind,
                desc,
            });
        }
        Ok(keys)
    }

    /// Parses a raw query string (`a=1&b=2`).
    pub fn parse_query_string(rtype: Option<&str>, qs: &str) -> Result<Self, SearchError> {
        Self::parse(rtype, &query_pairs(qs))
    }

    /// The query string that asks for the same search (without paging),
    /// used to build `self` / `next` links: the client's own parameters.
    pub fn to_query_string(&self) -> String {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in &self.link_params {
            s.append_pair(k, v);
        }
        s.append_pair("_count", &self.count.to_string());
        s.finish()
    }
}

/// `a=1&b=2` into decoded pairs, keeping order and repeats.
pub fn query_pairs(qs: &str) -> Vec<(String, String)> {
    form_urlencoded::parse(qs.as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn parse_include(k: &str, v: &str) -> Result<Include, SearchError> {
    let iterate = k.contains(':');
    if v == "*" {
        return Ok(Include {
            source: "*".into(),
            param: None,
            target: None,
            iterate,
        });
    }
    let mut it = v.splitn(3, ':');
    let source = it.next().unwrap_or("");
    let param = it
        .next()
        .ok_or_else(|| bad(k, v, "expected Type:param[:target]"))?;
    let target = it.next();
    if !is_resource_type(source) {
        return Err(bad(k, v, "unknown resource type"));
    }
    if target.is_some_and(|t| !is_resource_type(t)) {
        return Err(bad(k, v, "unknown target type"));
    }
    let param = if param == "*" {
        None
    } else {
        match index::param(source, param) {
            Some(p) if p.kind == Kind::Reference => Some(param.to_owned()),
            _ => return Err(bad(k, v, "not a reference parameter of that type")),
        }
    };
    Ok(Include {
        source: source.to_owned(),
        param,
        target: target.map(str::to_owned),
        iterate,
    })
}

/// One parameter (`name[:modifier]`, a chain or `_has`) on `rtype`.
fn parse_clause(
    rtype: Option<&str>,
    k: &str,
    v: &str,
    base: Option<&str>,
    depth: usize,
) -> Result<Option<Clause>, SearchError> {
    if depth > CHAIN_DEPTH_MAX {
        return Err(SearchError::Limit(format!(
            "search parameter '{k}' chains more than {CHAIN_DEPTH_MAX} links (CHAIN_DEPTH_MAX)"
        )));
    }
    if let Some(rest) = k.strip_prefix("_has:") {
        let mut it = rest.splitn(3, ':');
        let (Some(t), Some(p), Some(inner)) = (it.next(), it.next(), it.next()) else {
            return Err(bad(k, v, "expected _has:Type:param:parameter"));
        };
        if !is_resource_type(t) {
            return Err(bad(k, v, "unknown resource type in _has"));
        }
        match index::param(t, p) {
            Some(rp) if rp.kind == Kind::Reference => {}
            _ => return Err(bad(k, v, "_has names no reference parameter of that type")),
        }
        return Ok(
            parse_clause(Some(t), inner, v, base, depth + 1)?.map(|c| Clause::Has {
                rtype: t.to_owned(),
                param: p.to_owned(),
                inner: Box::new(c),
            }),
        );
    }
    let (name, modifier) = match k.split_once(':') {
        Some((n, m)) => (n, Some(m)),
        None => (k, None),
    };
    // A chain: `ref[:Type].rest`.
    if let Some((head, rest)) = k.split_once('.') {
        let (rname, tmod) = match head.split_once(':') {
            Some((n, t)) => (n, Some(t)),
            None => (head, None),
        };
        let Some(p) = rtype.and_then(|t| index::param(t, rname)) else {
            return Ok(None);
        };
        if p.kind != Kind::Reference {
            return Err(bad(k, v, "a chain starts with a reference parameter"));
        }
        let types: Vec<&str> = match tmod {
            Some(t) if is_resource_type(t) => vec![t],
            Some(_) => return Err(bad(k, v, "unknown resource type in chain")),
            None => p.targets.to_vec(),
        };
        let mut targets = Vec::new();
        for t in types {
            if let Some(c) = parse_clause(Some(t), rest, v, base, depth + 1)? {
                targets.push((t.to_owned(), c));
            }
        }
        if targets.is_empty() {
            return Ok(None);
        }
        return Ok(Some(Clause::Chain {
            param: rname.to_owned(),
            targets,
        }));
    }
    match name {
        "_id" => {
            if modifier.is_some() {
                return Err(SearchError::BadModifier {
                    param: name.into(),
                    modifier: modifier.unwrap_or_default().into(),
                });
            }
            let ids: Vec<Cond> = v.split(',').map(|i| Cond::Id(i.to_owned())).collect();
            if let Some(Cond::Id(b)) = ids
                .iter()
                .find(|c| !matches!(c, Cond::Id(i) if is_valid_id(i)))
            {
                return Err(bad(k, b, "not a valid id"));
            }
            return Ok(Some(Clause::Any(ids)));
        }
        "_lastUpdated" => {
            let mut any = Vec::new();
            for d in v.split(',') {
                let (prefix, start_ms, end_ms) = value::date(k, d)?;
                any.push(Cond::LastUpdated(DateClause {
                    prefix,
                    start_ms,
                    end_ms,
                }));
            }
            return Ok(Some(Clause::Any(any)));
        }
        _ => {}
    }
    // System-level searches know the parameters every type has.
    let p = match rtype {
        Some(t) => index::param(t, name),
        None if name.starts_with('_') => index::param("Basic", name),
        None => None,
    };
    let Some(p) = p.filter(|p| p.expr.is_some() || p.kind == Kind::Special) else {
        return Ok(None);
    };
    value::clause(p, modifier, v, base)
}

#[cfg(test)]
mod tests;
