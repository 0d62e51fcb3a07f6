//! Parsing FHIR search parameters into a [`SearchQuery`] that any storage
//! backend can run. Supported: `_id`, `_lastUpdated`, `identifier`,
//! `patient`, `subject`, `_count`, `_sort=_lastUpdated`, `_summary=count`,
//! `_total`, plus the paging cursor this server writes into its own links.

use crate::instant::parse_range;
use crate::resource::{is_resource_type, is_valid_id};

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prefix {
    Eq,
    Gt,
    Ge,
    Lt,
    Le,
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
            Prefix::Eq => self.start_ms <= t && t < self.end_ms,
            Prefix::Gt => t >= self.end_ms,
            Prefix::Ge => t >= self.start_ms,
            Prefix::Lt => t < self.start_ms,
            Prefix::Le => t < self.end_ms,
        }
    }
}

/// One alternative of a token or reference parameter. `None` matches any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenMatch {
    pub system: Option<String>,
    pub value: Option<String>,
}

/// `param` matches if any alternative matches (comma = OR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenClause {
    pub param: &'static str,
    pub any_of: Vec<TokenMatch>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortOrder {
    /// By `_lastUpdated` ascending, which is also change-log order.
    #[default]
    Ascending,
    Descending,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TotalMode {
    #[default]
    Accurate,
    None,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SearchQuery {
    /// Resource type, or `None` for a system-level search.
    pub rtype: Option<String>,
    /// `_id`: each inner list is an OR, the outer list an AND.
    pub ids: Vec<Vec<String>>,
    pub last_updated: Vec<DateClause>,
    pub tokens: Vec<TokenClause>,
    pub count: usize,
    pub sort: SortOrder,
    pub summary_count: bool,
    pub total: TotalMode,
    pub snapshot: Option<u64>,
    pub cursor: Option<u64>,
    /// The total of this snapshot, carried by paging links.
    pub snapshot_total: Option<u64>,
    /// Parameters that were present but are not supported (name as given).
    pub unsupported: Vec<String>,
    /// The supported parameters as given, for paging links.
    pub link_params: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SearchError {
    #[error("invalid value '{value}' for search parameter '{param}': {why}")]
    BadValue {
        param: String,
        value: String,
        why: &'static str,
    },
    /// A search larger than a named limit.
    #[error("{0}")]
    Limit(String),
}

/// The parameters of paging, which links carry and the server sets.
const PAGING_PARAMS: &[&str] = &["_count", PARAM_SNAPSHOT, PARAM_CURSOR, PARAM_SNAPSHOT_TOTAL];

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

impl SearchQuery {
    /// Parses `key=value` pairs (already percent-decoded) for a search on
    /// `rtype`.
    pub fn parse(rtype: Option<&str>, pairs: &[(String, String)]) -> Result<Self, SearchError> {
        check_limits(pairs)?;
        let mut q = SearchQuery {
            rtype: rtype.map(str::to_owned),
            count: COUNT_DEFAULT,
            ..Default::default()
        };
        for (k, v) in pairs {
            let keep = !PAGING_PARAMS.contains(&k.as_str());
            let unsupported_before = q.unsupported.len();
            match k.as_str() {
                "_id" => {
                    let ids: Vec<String> = v.split(',').map(str::to_owned).collect();
                    if let Some(b) = ids.iter().find(|i| !is_valid_id(i)) {
                        return Err(bad(k, b, "not a valid id"));
                    }
                    q.ids.push(ids);
                }
                "_lastUpdated" => q.last_updated.push(parse_date_clause(k, v)?),
                "identifier" => {
                    let any_of = v.split(',').map(parse_token).collect();
                    q.tokens.push(TokenClause {
                        param: "identifier",
                        any_of,
                    });
                }
                "patient" | "subject" => {
                    let param = if k == "patient" { "patient" } else { "subject" };
                    let mut any_of = Vec::new();
                    for r in v.split(',') {
                        any_of.push(parse_reference_param(param, r)?);
                    }
                    q.tokens.push(TokenClause { param, any_of });
                }
                "_count" => {
                    let n: usize = v
                        .parse()
                        .map_err(|_| bad(k, v, "not a non-negative integer"))?;
                    if n == 0 {
                        q.summary_count = true;
                    }
                    q.count = n.min(COUNT_MAX);
                }
                "_sort" => match v.as_str() {
                    "_lastUpdated" => q.sort = SortOrder::Ascending,
                    "-_lastUpdated" => q.sort = SortOrder::Descending,
                    _ => q.unsupported.push(format!("_sort={v}")),
                },
                "_summary" => match v.as_str() {
                    "count" => q.summary_count = true,
                    "false" => {}
                    _ => q.unsupported.push(format!("_summary={v}")),
                },
                "_total" => match v.as_str() {
                    "none" => q.total = TotalMode::None,
                    "accurate" | "estimate" => q.total = TotalMode::Accurate,
                    _ => return Err(bad(k, v, "expected none, estimate or accurate")),
                },
                PARAM_SNAPSHOT => {
                    q.snapshot = Some(v.parse().map_err(|_| bad(k, v, "not a paging position"))?)
                }
                PARAM_CURSOR => {
                    q.cursor = Some(v.parse().map_err(|_| bad(k, v, "not a paging position"))?)
                }
                PARAM_SNAPSHOT_TOTAL => {
                    q.snapshot_total = Some(v.parse().map_err(|_| bad(k, v, "not a count"))?)
                }
                k if IGNORED.contains(&k) => {}
                _ => q.unsupported.push(k.clone()),
            }
            if keep && q.unsupported.len() == unsupported_before {
                q.link_params.push((k.clone(), v.clone()));
            }
        }
        Ok(q)
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

fn parse_date_clause(k: &str, v: &str) -> Result<DateClause, SearchError> {
    // An unencoded `+` of a zone offset arrives as a space after form decoding.
    let fixed = v.replace(' ', "+");
    let v = fixed.as_str();
    let (prefix, rest) = match v.get(..2) {
        Some("eq") => (Prefix::Eq, &v[2..]),
        Some("gt") => (Prefix::Gt, &v[2..]),
        Some("ge") => (Prefix::Ge, &v[2..]),
        Some("lt") => (Prefix::Lt, &v[2..]),
        Some("le") => (Prefix::Le, &v[2..]),
        Some(p) if p.chars().all(|c| c.is_ascii_lowercase()) => {
            return Err(bad(k, v, "supported prefixes are eq, gt, ge, lt, le"))
        }
        _ => (Prefix::Eq, v),
    };
    let (start_ms, end_ms) =
        parse_range(rest).ok_or_else(|| bad(k, v, "not a FHIR date or instant"))?;
    Ok(DateClause {
        prefix,
        start_ms,
        end_ms,
    })
}

fn parse_token(v: &str) -> TokenMatch {
    match v.split_once('|') {
        None => TokenMatch {
            system: None,
            value: Some(v.into()),
        },
        Some((sys, val)) => TokenMatch {
            system: Some(sys.into()),
            value: (!val.is_empty()).then(|| val.into()),
        },
    }
}

fn parse_reference_param(param: &str, r: &str) -> Result<TokenMatch, SearchError> {
    if let Some((t, id)) = crate::refs::parse_reference(r) {
        return Ok(TokenMatch {
            system: Some(t.into()),
            value: Some(id.into()),
        });
    }
    if is_valid_id(r) {
        let system = (param == "patient").then(|| "Patient".to_string());
        return Ok(TokenMatch {
            system,
            value: Some(r.into()),
        });
    }
    let (t, _) = r.split_once('/').unwrap_or((r, ""));
    if !t.is_empty() && !is_resource_type(t) {
        return Err(bad(param, r, "unknown resource type in reference"));
    }
    Err(bad(param, r, "expected Type/id or an id"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(qs: &str) -> Result<SearchQuery, SearchError> {
        SearchQuery::parse_query_string(Some("Observation"), qs)
    }

    #[test]
    fn tokens_and_refs() {
        let q = parse("identifier=s%7C1,%7C2,s%7C&patient=p1&subject=Patient/p2").unwrap();
        assert_eq!(q.tokens.len(), 3);
        assert_eq!(
            q.tokens[0].any_of,
            vec![
                TokenMatch {
                    system: Some("s".into()),
                    value: Some("1".into())
                },
                TokenMatch {
                    system: Some("".into()),
                    value: Some("2".into())
                },
                TokenMatch {
                    system: Some("s".into()),
                    value: None
                },
            ]
        );
        assert_eq!(q.tokens[1].any_of[0].system.as_deref(), Some("Patient"));
        assert_eq!(q.tokens[2].any_of[0].value.as_deref(), Some("p2"));
    }

    #[test]
    fn dates_and_paging() {
        let q = parse("_lastUpdated=gt2020-01-01&_lastUpdated=le2021&_count=5&_sort=-_lastUpdated")
            .unwrap();
        assert_eq!(q.last_updated.len(), 2);
        assert_eq!(q.last_updated[0].prefix, Prefix::Gt);
        assert_eq!(q.count, 5);
        assert_eq!(q.sort, SortOrder::Descending);
        assert!(parse("_lastUpdated=xx2020").is_err());
        assert!(parse("_lastUpdated=2020-99").is_err());
        assert!(parse("_count=abc").is_err());
        assert!(parse("_count=0").unwrap().summary_count);
    }

    #[test]
    fn unsupported_collected() {
        let q = parse("name=smith&_sort=date&_format=json").unwrap();
        assert_eq!(
            q.unsupported,
            vec!["name".to_string(), "_sort=date".to_string()]
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
        assert!(d(Prefix::Gt).matches(20) && !d(Prefix::Gt).matches(19));
        assert!(d(Prefix::Ge).matches(10) && !d(Prefix::Ge).matches(9));
        assert!(d(Prefix::Lt).matches(9) && !d(Prefix::Lt).matches(10));
        assert!(d(Prefix::Le).matches(19) && !d(Prefix::Le).matches(20));
    }
}
