//! Search as SQL: a [`SearchQuery`] at a snapshot `seq` becomes one
//! statement over `versions` and the index tables, with `_sort`, paging,
//! `_include` and `_revinclude` read at the same snapshot.

use std::collections::HashSet;

use super::{all, exists, first, int, n, t, Db, Sql};
use fhirsync_core::index;
use fhirsync_core::search::{
    Clause, CompB, Cond, Include, NumberCond, Prefix, SearchQuery, TextOp, TotalMode,
};
use fhirsync_core::spec::Kind;

use super::query::{last_seq, row_to_version, COLS};
use crate::types::{DeletedQuery, IncludedCut, SearchPage, StoredVersion};
use crate::StoreError;

/// Most resources `_include` and `_revinclude` add to one page.
pub const INCLUDED_MAX: usize = 1000;
/// Most rounds of `:iterate`.
pub const ITERATE_ROUNDS_MAX: usize = 8;

/// The index table of a parameter type.
fn table(kind: Kind) -> &'static str {
    match kind {
        Kind::Token | Kind::Reference | Kind::Uri | Kind::Special => "tokens",
        Kind::String => "strings",
        Kind::Date => "dates",
        Kind::Number | Kind::Quantity => "numbers",
        Kind::Composite => "composites",
    }
}

/// The first string greater than every string starting with `s`.
fn after_prefix(s: &str) -> String {
    format!("{s}\u{10FFFF}")
}

/// `param = ?` (or `param IN (…)`, with `system = ?`) for the rows a
/// parameter of `rtype` is stored as (see `index::Stored`); `pfx`
/// qualifies the columns.
fn param_where(rtype: Option<&str>, name: &str, pfx: &str) -> (String, Vec<Sql>) {
    let (names, system) = index::storage(rtype, name);
    let marks = vec!["?"; names.len()].join(", ");
    let mut w = if names.len() == 1 {
        format!("{pfx}param = ?")
    } else {
        format!("{pfx}param IN ({marks})")
    };
    let mut args: Vec<Sql> = names.into_iter().map(Sql::Text).collect();
    if let Some(s) = system {
        w.push_str(&format!(" AND {pfx}system = ?"));
        args.push(Sql::Text(s.to_owned()));
    }
    (w, args)
}

struct Builder {
    args: Vec<Sql>,
    n: usize,
    snapshot: i64,
    /// `+` before `seq` in the snapshot's bounds: the plan has a driver,
    /// and the bound must not steer SQLite to the `(type, seq)` index
    /// instead (see [`plan`]).
    plus: &'static str,
    /// Conditions are written as lookups of the version's own rows (see
    /// [`Builder::member`]).
    exists: bool,
    /// Conditions are written as the bare list of their rows' versions
    /// (for counting them, see [`plan`]).
    list: bool,
}

/// Whether a clause finds few resources whatever its values: ids, a
/// reference to one resource, an identifier (see [`plan`]).
fn selective_clause(c: &Clause, rtype: Option<&str>) -> bool {
    match c {
        Clause::Any(conds) => conds.iter().all(|x| match x {
            Cond::Id(_) => true,
            Cond::Token {
                param,
                value: Some(_),
                ..
            } => {
                let base = param.split(':').next().unwrap_or("");
                base == "identifier"
                    || param.ends_with(index::IDENTIFIER_SUFFIX)
                    || rtype
                        .and_then(|t| index::param(t, base))
                        .is_some_and(|p| p.kind == Kind::Reference)
            }
            _ => false,
        }),
        _ => false,
    }
}

impl Builder {
    fn new(snapshot: u64, plus: &'static str) -> Builder {
        Builder {
            args: Vec::new(),
            n: 0,
            snapshot: snapshot as i64,
            plus,
            exists: false,
            list: false,
        }
    }

    /// The versions whose index rows satisfy a clause, as one `SELECT seq`
    /// (duplicates kept), when the clause is made of index conditions or
    /// is a chain.
    fn rows_of(&mut self, c: &Clause, rt: Option<&str>) -> Option<String> {
        match c {
            Clause::Any(conds) => {
                let mut parts = Vec::new();
                for x in conds {
                    if matches!(x, Cond::Id(_) | Cond::LastUpdated(_)) {
                        return None;
                    }
                    parts.push(self.cond(x, "v", rt));
                }
                Some(parts.join(" UNION ALL "))
            }
            // a chain's rows are its references to matching targets
            Clause::Chain { param, targets } => Some(self.chain_refs(rt, param, targets)),
            _ => None,
        }
    }

    fn text(&mut self, s: &str) -> &'static str {
        self.args.push(Sql::Text(s.to_owned()));
        "?"
    }

    /// Version `a` has a row of `table` where `w` holds: a list of the
    /// rows' versions, or, for the clauses after a selective one, a
    /// lookup of `a`'s own row (so that SQLite starts from the selective
    /// clause and does not build the list of a broad one).
    /// Only a `point` condition (a token's system and value, whose rows'
    /// keys reach `seq` through equalities) and a date or number (whose
    /// tables are also indexed by `seq`, see [`SEQ_INDEXED`]) are looked
    /// up: another range (or a value of any system) would be walked for
    /// every version.
    fn member(&self, a: &str, table: &str, w: String, point: bool) -> String {
        if self.list {
            format!("SELECT seq FROM {table} WHERE {w}")
        } else if self.exists && SEQ_INDEXED.contains(&table) {
            format!(
                "EXISTS (SELECT 1 FROM {table} INDEXED BY {table}_seq WHERE seq = {a}.seq AND {w})"
            )
        } else if self.exists && point {
            format!("EXISTS (SELECT 1 FROM {table} WHERE {w} AND seq = {a}.seq)")
        } else {
            format!("{a}.seq IN (SELECT seq FROM {table} WHERE {w})")
        }
    }

    /// The versions whose parameter `param` refers to a current resource
    /// of type `ty` that satisfies `inner`, as one `SELECT seq`: from the
    /// targets (their clauses listed, the snapshot's bound written `+seq`
    /// so that SQLite starts from them) to the references to each, by the
    /// key of `tokens`.
    fn refs(&mut self, rt: Option<&str>, param: &str, ty: &str, inner: &Clause) -> String {
        let saved = (self.exists, self.list, self.plus);
        (self.exists, self.list, self.plus) = (false, false, "+");
        let v = self.alias("v");
        let r = self.alias("r");
        let t = self.text(ty);
        let cur = self.current(&v);
        let inner = self.clause(inner, &v, Some(ty));
        let p = self.param(rt, param, &format!("{r}."));
        let s = self.text(ty);
        (self.exists, self.list, self.plus) = saved;
        format!(
            "SELECT {r}.seq FROM versions {v} JOIN tokens {r} ON {r}.value = {v}.id \
             WHERE {v}.type = {t} AND {cur} AND {inner} AND {p} AND {r}.system = {s}"
        )
    }

    /// [`Builder::refs`] of each of a chain's target types.
    fn chain_refs(
        &mut self,
        rt: Option<&str>,
        param: &str,
        targets: &[(String, Clause)],
    ) -> String {
        let refs: Vec<String> = targets
            .iter()
            .map(|(ty, inner)| self.refs(rt, param, ty, inner))
            .collect();
        refs.join(" UNION ALL ")
    }

    /// The condition on the parameter column (see [`param_where`]).
    fn param(&mut self, rtype: Option<&str>, name: &str, pfx: &str) -> String {
        let (w, args) = param_where(rtype, name, pfx);
        self.args.extend(args);
        w
    }

    fn alias(&mut self, p: &str) -> String {
        self.n += 1;
        format!("{p}{}", self.n)
    }

    /// `a` is a version visible at the snapshot and not deleted.
    fn current(&mut self, a: &str) -> String {
        self.args.push(Sql::Integer(self.snapshot));
        self.args.push(Sql::Integer(self.snapshot));
        let plus = self.plus;
        format!(
            "{plus}{a}.seq <= ? AND ({a}.superseded IS NULL OR {a}.superseded > ?) AND {a}.deleted = 0"
        )
    }

    /// A clause on versions under the alias `a`, of type `rt` (`None`: any).
    fn clause(&mut self, c: &Clause, a: &str, rt: Option<&str>) -> String {
        match c {
            Clause::Any(conds) => {
                let parts: Vec<String> = conds.iter().map(|x| self.cond(x, a, rt)).collect();
                format!("({})", parts.join(" OR "))
            }
            Clause::Not(conds) => {
                let parts: Vec<String> = conds.iter().map(|x| self.cond(x, a, rt)).collect();
                format!("NOT ({})", parts.join(" OR "))
            }
            Clause::Missing {
                kind,
                param,
                missing,
            } => {
                let not = if *missing { "NOT " } else { "" };
                let p = self.param(rt, param, "");
                format!(
                    "{a}.seq {not}IN (SELECT seq FROM {} WHERE {p})",
                    table(*kind)
                )
            }
            Clause::Chain { param, targets } => {
                if !self.exists {
                    return format!("{a}.seq IN ({})", self.chain_refs(rt, param, targets));
                }
                // Dense (see [`plan`]): the version's own reference, by
                // `tokens_ref_seq` (whose condition on `system` must be
                // written out for SQLite to use it), then its target by
                // `versions_key` (by the list of the inner clause's
                // versions, SQLite would try each for every reference).
                let r = self.alias("r");
                let p = self.param(rt, param, &format!("{r}."));
                let mut alts = Vec::new();
                for (ty, inner) in targets {
                    let t = self.text(ty);
                    let v = self.alias("v");
                    let t2 = self.text(ty);
                    let plus = std::mem::replace(&mut self.plus, "+");
                    let cur = self.current(&v);
                    self.plus = plus;
                    let inner = self.clause(inner, &v, Some(ty));
                    alts.push(format!(
                        "({r}.system = {t} AND EXISTS (SELECT 1 FROM versions {v} INDEXED BY versions_key \
                         WHERE {v}.type = {t2} AND {v}.id = {r}.value AND {cur} AND {inner}))"
                    ));
                }
                format!(
                    "EXISTS (SELECT 1 FROM tokens {r} INDEXED BY tokens_ref_seq WHERE {r}.seq = {a}.seq \
                     AND {r}.system >= 'A' AND {r}.system < '[' AND {p} AND ({}))",
                    alts.join(" OR ")
                )
            }
            Clause::Has {
                rtype,
                param,
                inner,
            } => {
                let t = self.alias("t");
                let v = self.alias("v");
                let p = self.param(Some(rtype), param, &format!("{t}."));
                let ty = self.text(rtype);
                let cur = self.current(&v);
                let inner = self.clause(inner, &v, Some(rtype));
                format!(
                    "EXISTS (SELECT 1 FROM tokens {t} JOIN versions {v} ON {v}.seq = {t}.seq \
                     WHERE {p} AND {t}.value = {a}.id AND {t}.system = {a}.type \
                     AND {v}.type = {ty} AND {cur} AND {inner})"
                )
            }
            Clause::Compartment {
                target,
                members,
                include_self,
            } => {
                let mut alts = Vec::new();
                // which ids: one, a list (read by `json_each`, however
                // long), or any
                let ids = |b: &mut Self, col: &str| match target.1.as_slice() {
                    [] => String::new(),
                    [one] => format!(" AND {col} = {}", b.text(one)),
                    many => {
                        let list = serde_json::to_string(many).unwrap_or_default();
                        format!(
                            " AND {col} IN (SELECT value FROM json_each({}))",
                            b.text(&list)
                        )
                    }
                };
                if *include_self {
                    let t = self.text(&target.0);
                    let i = ids(self, &format!("{a}.id"));
                    alts.push(format!("({a}.type = {t}{i})"));
                }
                for (ty, params) in members {
                    // the codes the members' parameters are stored under
                    // (a parameter restricted to another type links nothing)
                    let mut codes = Vec::new();
                    for p in params {
                        let (names, system) = index::storage(Some(ty), p);
                        if system.is_none_or(|s| s == target.0) {
                            codes.extend(names);
                        }
                    }
                    if codes.is_empty() {
                        continue;
                    }
                    let ty = self.text(ty);
                    let ps: Vec<&str> = codes.iter().map(|p| self.text(p)).collect();
                    if target.1.len() == 1 {
                        // one compartment: its references are few, list them
                        let v = ids(self, "value");
                        let s = self.text(&target.0);
                        alts.push(format!(
                            "({a}.type = {ty} AND {a}.seq IN (SELECT seq FROM tokens WHERE param IN ({}){v} AND system = {s}))",
                            ps.join(",")
                        ));
                    } else {
                        // any or many (a bulk export): each version's own
                        // references, looked up by `seq`
                        let r = self.alias("r");
                        let v = ids(self, &format!("{r}.value"));
                        let s = self.text(&target.0);
                        alts.push(format!(
                            "({a}.type = {ty} AND EXISTS (SELECT 1 FROM tokens {r} INDEXED BY tokens_ref_seq \
                             WHERE {r}.seq = {a}.seq AND {r}.system >= 'A' AND {r}.system < '[' \
                             AND {r}.param IN ({}){v} AND {r}.system = {s}))",
                            ps.join(",")
                        ));
                    }
                }
                if alts.is_empty() {
                    "FALSE".into()
                } else {
                    format!("({})", alts.join(" OR "))
                }
            }
        }
    }

    fn cond(&mut self, c: &Cond, a: &str, rt: Option<&str>) -> String {
        match c {
            Cond::Id(id) => {
                let x = self.text(id);
                format!("{a}.id = {x}")
            }
            Cond::LastUpdated(d) => {
                let (lo, hi) = (d.start_ms, d.end_ms);
                let (cond, vals): (&str, Vec<i64>) = match d.prefix {
                    Prefix::Eq | Prefix::Ap => ("{a}.lu_ms >= ? AND {a}.lu_ms < ?", vec![lo, hi]),
                    Prefix::Ne => ("({a}.lu_ms < ? OR {a}.lu_ms >= ?)", vec![lo, hi]),
                    Prefix::Gt | Prefix::Sa => ("{a}.lu_ms >= ?", vec![hi]),
                    Prefix::Ge => ("{a}.lu_ms >= ?", vec![lo]),
                    Prefix::Lt | Prefix::Eb => ("{a}.lu_ms < ?", vec![lo]),
                    Prefix::Le => ("{a}.lu_ms < ?", vec![hi]),
                };
                self.args.extend(vals.into_iter().map(Sql::Integer));
                format!("({})", cond.replace("{a}", a))
            }
            Cond::Token {
                param,
                system,
                value,
            } => {
                let p = self.param(rt, param, "");
                let mut w = p;
                self.pair(&mut w, ("value", value), ("system", system));
                self.member(a, "tokens", w, value.is_some() && system.is_some())
            }
            Cond::Text { param, op, value } => {
                let p = self.param(rt, param, "");
                let w = match op {
                    TextOp::Starts => {
                        let lo = self.text(value);
                        let hi = self.text(&after_prefix(value));
                        format!("norm >= {lo} AND norm < {hi}")
                    }
                    TextOp::Exact => {
                        let n = self.text(&index::fold(value));
                        let r = self.text(value);
                        format!("norm = {n} AND raw = {r}")
                    }
                    TextOp::Contains => {
                        let x = self.text(value);
                        format!("instr(norm, {x}) > 0")
                    }
                };
                self.member(a, "strings", format!("{p} AND {w}"), false)
            }
            Cond::Date {
                param,
                prefix,
                lo,
                hi,
            } => {
                let p = self.param(rt, param, "");
                let w = self.range(*prefix, *lo, *hi);
                self.member(a, "dates", format!("{p} AND {w}"), false)
            }
            Cond::Number { param, q } => {
                let p = self.param(rt, param, "");
                let w = self.number(q, "value", "system", "code");
                self.member(a, "numbers", format!("{p} AND {w}"), false)
            }
            Cond::Uri {
                param,
                below,
                value,
            } => {
                let p = self.param(rt, param, "");
                let w = if *below {
                    let lo = self.text(value);
                    let hi = self.text(&after_prefix(value));
                    format!("value >= {lo} AND value < {hi}")
                } else {
                    let x = self.text(value);
                    format!("substr({x}, 1, length(value)) = value")
                };
                self.member(a, "tokens", format!("{p} AND system = '' AND {w}"), false)
            }
            Cond::Composite {
                param,
                a_sys,
                a_val,
                b,
            } => {
                let p = self.param(rt, param, "");
                let mut w = p;
                self.pair(&mut w, ("a_val", a_val), ("a_sys", a_sys));
                let bw = match b {
                    CompB::Token(s, v) => {
                        let mut bw = String::from("TRUE");
                        self.pair(&mut bw, ("b_val", v), ("b_sys", s));
                        bw
                    }
                    CompB::Text(t) => {
                        let lo = self.text(t);
                        let hi = self.text(&after_prefix(t));
                        format!("b_val >= {lo} AND b_val < {hi}")
                    }
                    CompB::Number(q) => self.number(q, "b_lo", "b_sys", "b_val"),
                    CompB::Range(prefix, lo, hi, _) => {
                        self.range_cols(*prefix, *lo as i64, *hi as i64, "b_lo", "b_hi")
                    }
                };
                self.member(a, "composites", format!("{w} AND {bw}"), false)
            }
        }
    }

    /// ` AND col = ?` for the value and the system a token names (`None`:
    /// any).
    fn pair(
        &mut self,
        w: &mut String,
        value: (&str, &Option<String>),
        system: (&str, &Option<String>),
    ) {
        for (col, v) in [value, system] {
            if let Some(v) = v {
                let x = self.text(v);
                w.push_str(&format!(" AND {col} = {x}"));
            }
        }
    }

    fn range(&mut self, prefix: Prefix, lo: i64, hi: i64) -> String {
        self.range_cols(prefix, lo, hi, "lo", "hi")
    }

    /// A stored range `[rl, rh)` against the search range `[lo, hi)`.
    fn range_cols(&mut self, prefix: Prefix, lo: i64, hi: i64, rl: &str, rh: &str) -> String {
        let (w, vals): (String, Vec<i64>) = match prefix {
            // `rl < hi` follows from the others and bounds the index range
            Prefix::Eq => (
                format!("{rl} >= ? AND {rl} < ? AND {rh} <= ?"),
                vec![lo, hi, hi],
            ),
            Prefix::Ne => (format!("NOT ({rl} >= ? AND {rh} <= ?)"), vec![lo, hi]),
            Prefix::Gt => (format!("{rh} > ?"), vec![hi]),
            Prefix::Lt => (format!("{rl} < ?"), vec![lo]),
            Prefix::Ge => (format!("{rh} > ?"), vec![lo]),
            Prefix::Le => (format!("{rl} < ?"), vec![hi]),
            Prefix::Sa => (format!("{rl} >= ?"), vec![hi]),
            Prefix::Eb => (format!("{rh} <= ?"), vec![lo]),
            Prefix::Ap => {
                // The search range widened by a tenth of its length, and
                // at least a day, on each side; then any overlap.
                let d = ((hi - lo) / 10).max(86_400_000);
                (
                    format!("{rl} < ? AND {rh} > ?"),
                    vec![hi.saturating_add(d), lo.saturating_sub(d)],
                )
            }
        };
        self.args.extend(vals.into_iter().map(Sql::Integer));
        format!("({w})")
    }

    fn number(&mut self, q: &NumberCond, col: &str, sys: &str, code: &str) -> String {
        let (w, vals): (String, Vec<f64>) = match q.prefix {
            Prefix::Eq => (format!("{col} >= ? AND {col} < ?"), vec![q.lo, q.hi]),
            Prefix::Ne => (format!("({col} < ? OR {col} >= ?)"), vec![q.lo, q.hi]),
            Prefix::Gt | Prefix::Sa => (format!("{col} > ?"), vec![q.value]),
            Prefix::Lt | Prefix::Eb => (format!("{col} < ?"), vec![q.value]),
            Prefix::Ge => (format!("{col} >= ?"), vec![q.value]),
            Prefix::Le => (format!("{col} <= ?"), vec![q.value]),
            // the value's implicit range widened by a tenth of the value
            // on each side (ap2 takes 2, not 1 or 3)
            Prefix::Ap => {
                let d = q.value.abs() * 0.1;
                (
                    format!("{col} >= ? AND {col} < ?"),
                    vec![q.lo - d, q.hi + d],
                )
            }
        };
        self.args.extend(vals.into_iter().map(Sql::Real));
        let mut w = format!("({w})");
        if let Some(s) = &q.system {
            let x = self.text(s);
            w.push_str(&format!(" AND {sys} = {x}"));
        }
        if let Some(c) = &q.code {
            let x = self.text(c);
            w.push_str(&format!(" AND {code} = {x}"));
        }
        w
    }
}

/// The index tables with an index on `seq` (`{table}_seq`): their
/// conditions are ranges, which their keys cannot look up per version.
pub const SEQ_INDEXED: &[&str] = &["dates", "numbers"];

/// A clause whose index rows number at least this many is dense: the
/// search walks the type in `seq` order and looks each version's row up,
/// rather than listing them all (see [`plan`]).
pub const DENSE_ROWS: usize = 2000;

/// How the clauses of a search are written.
#[derive(Debug, Default, Clone, PartialEq)]
struct Plan {
    /// The clause that lists the versions SQLite starts from (a selective
    /// or sparse one); the bounds on `seq` then must not steer it to the
    /// `(type, seq)` index.
    driver: Option<usize>,
    /// Clauses written as lookups of each version's own rows.
    exists: Vec<bool>,
}

/// The plan of a search. Without statistics of values SQLite cannot tell
/// a clause that finds four versions from one that finds 800,000: a
/// selective clause (an id, a reference, an identifier) or, with `conn`,
/// one whose index rows a bounded count finds sparse lists its versions
/// and drives; clauses counted dense are looked up version by version,
/// so that a search of dense clauses walks the type in `seq` order and
/// stops at the page's end instead of listing every match.
fn plan(conn: Option<&dyn Db>, q: &SearchQuery, snapshot: u64) -> Result<Plan, StoreError> {
    let rt = q.rtype.as_deref();
    let n = q.clauses.len();
    if let Some(i) = q.clauses.iter().position(|c| selective_clause(c, rt)) {
        return Ok(Plan {
            driver: Some(i),
            exists: (0..n).map(|j| j != i).collect(),
        });
    }
    let Some(conn) = conn else {
        return Ok(Plan {
            driver: None,
            exists: vec![false; n],
        });
    };
    // None: not counted (kept as a list, not a driver)
    let mut dense: Vec<Option<bool>> = Vec::with_capacity(n);
    for c in &q.clauses {
        let mut b = Builder::new(snapshot, "");
        b.list = true;
        dense.push(match b.rows_of(c, rt) {
            Some(sql) => {
                let probe = format!("SELECT count(*) FROM ({sql} LIMIT {DENSE_ROWS}) AS probe");
                let k = int(conn, &probe, &b.args)?;
                Some(k as usize >= DENSE_ROWS)
            }
            None => None,
        });
    }
    let driver = dense.iter().position(|d| *d == Some(false));
    Ok(Plan {
        driver,
        exists: dense
            .iter()
            .enumerate()
            .map(|(i, d)| {
                Some(i) != driver && (*d == Some(true) || (driver.is_some() && d.is_some()))
            })
            .collect(),
    })
}

/// Most token conditions of one search [`narrow_systems`] probes (two
/// index probes each); a client may send 100 parameters of 1,000 values,
/// and the ones past this keep their plan (correct, maybe slower).
pub const NARROW_CONDS_MAX: usize = 64;

/// The search with `system` set in its token conditions that name a
/// value without a system when every row of that parameter and value has
/// the same system (codes such as `status=final` have none; most LOINC
/// codes come with one): the condition then reaches each version's row by
/// equalities (see [`Builder::member`]). Two index probes a condition;
/// `None` when nothing changes. Rows written after the reader's view could
/// only prevent the change, never make it wrong.
fn narrow_systems(conn: &dyn Db, q: &SearchQuery) -> Result<Option<SearchQuery>, StoreError> {
    let rt = q.rtype.as_deref();
    let mut out = q.clone();
    let mut changed = false;
    let mut probed = 0;
    for c in &mut out.clauses {
        let Clause::Any(conds) = c else { continue };
        for x in conds {
            if probed >= NARROW_CONDS_MAX {
                return Ok(changed.then_some(out));
            }
            let Cond::Token {
                param,
                system: system @ None,
                value: Some(value),
            } = x
            else {
                continue;
            };
            probed += 1;
            let (w, mut args) = param_where(rt, param, "");
            args.push(Sql::Text(value.clone()));
            let found = first(
                conn,
                &format!(
                    "SELECT system FROM tokens WHERE {w} AND value = ? ORDER BY system LIMIT 1"
                ),
                &args,
                |r| r.text(0),
            )?;
            let Some(first) = found else { continue };
            args.push(Sql::Text(first.clone()));
            let sql =
                format!("SELECT 1 FROM tokens WHERE {w} AND value = ? AND system > ? LIMIT 1");
            if !exists(conn, &sql, &args)? {
                *system = Some(first);
                changed = true;
            }
        }
    }
    Ok(changed.then_some(out))
}

/// The WHERE clause of a search at `snapshot`, without paging, written
/// per `plan`; its driver comes first.
fn plan_where(q: &SearchQuery, snapshot: u64, plan: &Plan) -> (String, Vec<Sql>) {
    let mut b = Builder::new(snapshot, if plan.driver.is_some() { "+" } else { "" });
    let mut w = b.current("v");
    if let Some(t) = &q.rtype {
        let x = b.text(t);
        w.push_str(&format!(" AND v.type = {x}"));
    }
    let order: Vec<usize> = plan
        .driver
        .into_iter()
        .chain((0..q.clauses.len()).filter(|i| Some(*i) != plan.driver))
        .collect();
    for i in order {
        b.exists = plan.exists.get(i).copied().unwrap_or(false);
        w.push_str(" AND ");
        w.push_str(&b.clause(&q.clauses[i], "v", q.rtype.as_deref()));
    }
    (w, b.args)
}

/// The WHERE clause of a search at `snapshot`, without paging (planned
/// without counting).
pub fn search_where(q: &SearchQuery, snapshot: u64) -> (String, Vec<Sql>) {
    let p = plan(None, q, snapshot).unwrap_or_default();
    plan_where(q, snapshot, &p)
}

/// The joins and `ORDER BY` of a sorted search, with the joins'
/// arguments. Resources without a value for a key sort after those with
/// one.
fn order_by(q: &SearchQuery) -> (String, String, Vec<Sql>) {
    let mut joins = String::new();
    let mut args = Vec::new();
    let mut keys = Vec::new();
    for (i, k) in q.sort.iter().enumerate() {
        let dir = if k.desc { "DESC" } else { "ASC" };
        match (k.param.as_str(), k.kind) {
            ("_id", _) => keys.push(format!("v.id {dir}")),
            ("_lastUpdated", _) | (_, None) => keys.push(format!("v.seq {dir}")),
            (p, Some(kind)) => {
                let (col, agg) = match kind {
                    Kind::String => ("norm", "min"),
                    Kind::Date if k.desc => ("hi", "max"),
                    Kind::Date => ("lo", "min"),
                    _ => ("value", "min"),
                };
                let (w, a) = param_where(q.rtype.as_deref(), p, "");
                joins.push_str(&format!(
                    " LEFT JOIN (SELECT seq, {agg}({col}) AS k FROM {} WHERE {w} GROUP BY seq) s{i} ON s{i}.seq = v.seq",
                    table(kind)
                ));
                args.extend(a);
                keys.push(format!("s{i}.k IS NULL"));
                keys.push(format!("s{i}.k {dir}"));
            }
        }
    }
    keys.push("v.seq ASC".into());
    (joins, keys.join(", "), args)
}

/// The columns of `versions` under the alias `v`.
fn v_cols() -> String {
    COLS.split(", ")
        .map(|c| format!("v.{c}"))
        .collect::<Vec<_>>()
        .join(", ")
}

pub fn search(conn: &dyn Db, q: &SearchQuery) -> Result<SearchPage, StoreError> {
    let snapshot = match q.snapshot {
        Some(s) => s,
        None => last_seq(conn)?,
    };
    let narrowed = narrow_systems(conn, q)?;
    let q = narrowed.as_ref().unwrap_or(q);
    let plan = plan(Some(conn), q, snapshot)?;
    let (w, args) = plan_where(q, snapshot, &plan);
    // A snapshot's total does not change: later pages carry the first one's.
    let carried = q
        .snapshot
        .and(q.snapshot_total)
        .filter(|_| !q.summary_count());
    // counting costs a pass over every match: `_total=accurate` (and
    // `_summary=count`) always pay it, the default only for a selective
    // search; otherwise the first page tells the total when it holds
    // every match
    let count = q.total == TotalMode::Accurate
        || q.summary_count()
        || (q.total == TotalMode::Estimate && plan.driver.is_some());
    let mut total = if let Some(t) = carried.filter(|_| q.total != TotalMode::None) {
        Some(t)
    } else if count {
        let sql = format!("SELECT count(*) FROM versions v WHERE {w}");
        Some(int(conn, &sql, &args)? as u64)
    } else {
        None
    };
    if q.summary_count() {
        return Ok(SearchPage {
            snapshot,
            total,
            items: Vec::new(),
            included: Vec::new(),
            included_cut: None,
            next_cursor: None,
        });
    }
    let mut args = args;
    let next_cursor;
    let mut items: Vec<StoredVersion>;
    if q.by_seq() {
        let (cmp, order) = if q.descending() {
            ("<", "DESC")
        } else {
            (">", "ASC")
        };
        let plus = if plan.driver.is_some() { "+" } else { "" };
        let mut sql = format!("SELECT {COLS} FROM versions v WHERE {w}");
        if let Some(c) = q.cursor {
            sql.push_str(&format!(" AND {plus}v.seq {cmp} ?"));
            args.push(Sql::Integer(c as i64));
        }
        sql.push_str(&format!(
            " ORDER BY {plus}v.seq {order} LIMIT {}",
            q.count + 1
        ));
        items = all(conn, &sql, &args, row_to_version)?;
        next_cursor = if items.len() > q.count {
            items.truncate(q.count);
            items.last().map(|v| v.seq)
        } else {
            None
        };
    } else {
        let offset = q.offset.unwrap_or(0);
        let (joins, order, mut every) = order_by(q);
        let sql = format!(
            "SELECT {} FROM versions v{joins} WHERE {w} ORDER BY {order} LIMIT {} OFFSET {offset}",
            v_cols(),
            q.count + 1
        );
        every.extend(args);
        items = all(conn, &sql, &every, row_to_version)?;
        next_cursor = if items.len() > q.count {
            items.truncate(q.count);
            Some(offset + q.count as u64)
        } else {
            None
        };
    }
    let first_page = q.cursor.is_none() && q.offset.unwrap_or(0) == 0;
    if total.is_none() && q.total == TotalMode::Estimate && first_page && next_cursor.is_none() {
        total = Some(items.len() as u64);
    }
    let (included, included_cut) = includes(conn, q, snapshot, &items)?;
    Ok(SearchPage {
        snapshot,
        total,
        items,
        included,
        included_cut,
        next_cursor,
    })
}

/// The reference parameters an include names (`*`: all of the type's).
fn include_params(inc: &Include, rtype: &str) -> Vec<String> {
    match &inc.param {
        Some(p) => vec![p.clone()],
        None => index::params(rtype)
            .iter()
            .filter(|p| p.kind == Kind::Reference && p.expr.is_some())
            .map(|p| p.code.to_owned())
            .collect(),
    }
}

fn read_at(
    conn: &dyn Db,
    snapshot: u64,
    rtype: &str,
    id: &str,
) -> Result<Option<StoredVersion>, StoreError> {
    let sql = format!(
        "SELECT {COLS} FROM versions v WHERE v.type = ?1 AND v.id = ?2 AND +v.seq <= ?3 \
         AND (v.superseded IS NULL OR v.superseded > ?3) AND v.deleted = 0"
    );
    first(conn, &sql, &[t(rtype), t(id), n(snapshot)], row_to_version)
}

/// `_include` and `_revinclude` of a page, at the page's snapshot; with
/// `:iterate` also of what they added, up to [`INCLUDED_MAX`] resources
/// and [`ITERATE_ROUNDS_MAX`] rounds; with the limit that left some out.
/// (A round past the last is run to know whether it would add any.)
fn includes(
    conn: &dyn Db,
    q: &SearchQuery,
    snapshot: u64,
    items: &[StoredVersion],
) -> Result<(Vec<StoredVersion>, Option<IncludedCut>), StoreError> {
    if q.includes.is_empty() && q.revincludes.is_empty() {
        return Ok((Vec::new(), None));
    }
    let mut seen: HashSet<(String, String)> = items
        .iter()
        .map(|v| (v.rtype.clone(), v.id.clone()))
        .collect();
    let mut out: Vec<StoredVersion> = Vec::new();
    let mut frontier: Vec<StoredVersion> = items.to_vec();
    for round in 0..=ITERATE_ROUNDS_MAX {
        let mut added = Vec::new();
        for inc in &q.includes {
            if round > 0 && !inc.iterate {
                continue;
            }
            for v in &frontier {
                if inc.source != "*" && inc.source != v.rtype {
                    continue;
                }
                let params = include_params(inc, &v.rtype);
                let Some(body) = v.body.as_deref() else {
                    continue;
                };
                let Ok(json) = serde_json::from_str::<serde_json::Value>(body) else {
                    continue;
                };
                for p in &params {
                    let refs: Vec<(String, String)> = index::extract_param(&v.rtype, p, &json)
                        .into_iter()
                        .filter_map(|k| match k {
                            index::Key::Token { system, value } if !system.is_empty() => {
                                Some((system, value))
                            }
                            _ => None,
                        })
                        .collect();
                    for (t, id) in refs {
                        if inc.target.as_ref().is_some_and(|x| *x != t) {
                            continue;
                        }
                        if seen.contains(&(t.clone(), id.clone())) {
                            continue;
                        }
                        if let Some(found) = read_at(conn, snapshot, &t, &id)? {
                            seen.insert((t, id));
                            added.push(found);
                        }
                    }
                }
            }
        }
        for inc in &q.revincludes {
            if round > 0 && !inc.iterate {
                continue;
            }
            for v in &frontier {
                if inc.target.as_ref().is_some_and(|t| *t != v.rtype) {
                    continue;
                }
                // the codes the source's parameters are stored under (one
                // restricted to another type than this target's links nothing)
                let sources: Vec<String> = if inc.source == "*" {
                    Vec::new()
                } else {
                    include_params(inc, &inc.source)
                        .iter()
                        .map(|p| index::storage(Some(&inc.source), p))
                        .filter(|(_, system)| system.is_none_or(|s| s == v.rtype))
                        .flat_map(|(names, _)| names)
                        .collect()
                };
                let sql = format!(
                    "SELECT {} FROM versions v JOIN tokens t ON t.seq = v.seq \
                     WHERE t.system = ?1 AND t.value = ?2 AND t.param = ?3 AND v.type = ?4 \
                     AND v.seq <= ?5 AND (v.superseded IS NULL OR v.superseded > ?5) AND v.deleted = 0",
                    v_cols()
                );
                for p in &sources {
                    let args = [t(&v.rtype), t(&v.id), t(p), t(&inc.source), n(snapshot)];
                    let rows = all(conn, &sql, &args, row_to_version)?;
                    for r in rows {
                        if seen.insert((r.rtype.clone(), r.id.clone())) {
                            added.push(r);
                        }
                    }
                }
            }
        }
        if added.is_empty() {
            break;
        }
        if round == ITERATE_ROUNDS_MAX {
            return Ok((out, Some(IncludedCut::Rounds)));
        }
        let room = INCLUDED_MAX.saturating_sub(out.len());
        if added.len() > room {
            added.truncate(room);
            out.extend(added);
            return Ok((out, Some(IncludedCut::Count)));
        }
        out.extend(added.iter().cloned());
        frontier = added;
    }
    Ok((out, None))
}

/// Whether the version at `seq` matches `q` at the snapshot `seq` (for
/// subscriptions, which judge each version as it was written): every
/// clause a lookup of that version's own rows where it can be.
pub fn version_matches(conn: &dyn Db, q: &SearchQuery, seq: u64) -> Result<bool, StoreError> {
    let plan = Plan {
        driver: None,
        exists: vec![true; q.clauses.len()],
    };
    let (w, mut args) = plan_where(q, seq, &plan);
    args.push(Sql::Integer(seq as i64));
    let sql = format!("SELECT 1 FROM versions v WHERE {w} AND v.seq = ?");
    exists(conn, &sql, &args)
}

/// Keys of current resources matching `q` (for conditional operations).
pub fn matches(
    conn: &dyn Db,
    q: &SearchQuery,
    limit: usize,
) -> Result<Vec<fhirsync_core::ResourceKey>, StoreError> {
    let snapshot = last_seq(conn)?;
    let (w, args) = search_where(q, snapshot);
    let sql = format!("SELECT v.type, v.id FROM versions v WHERE {w} LIMIT {limit}");
    all(conn, &sql, &args, |r| {
        Ok(fhirsync_core::ResourceKey::new(r.text(0)?, r.text(1)?))
    })
}

/// Resources deleted as of a snapshot, oldest deletion first: (type, id,
/// `seq` of the tombstone).
pub fn deleted(conn: &dyn Db, q: &DeletedQuery) -> Result<Vec<(String, String, u64)>, StoreError> {
    let mut b = Builder::new(q.snapshot, "");
    let mut sql = String::from(
        "SELECT v.type, v.id, v.seq FROM versions v WHERE v.type = ? AND v.seq > ? AND v.seq <= ? \
         AND (v.superseded IS NULL OR v.superseded > ?) AND v.deleted = 1 AND v.lu_ms >= ?",
    );
    let mut args = vec![
        Sql::Text(q.rtype.clone()),
        Sql::Integer(q.after as i64),
        Sql::Integer(q.snapshot as i64),
        Sql::Integer(q.snapshot as i64),
        Sql::Integer(q.since_ms as i64),
    ];
    if let Some(c) = &q.compartment {
        // the tombstone has no index rows: its predecessor's say where it was
        let w = b.clause(c, "p", Some(&q.rtype));
        sql.push_str(&format!(
            " AND EXISTS (SELECT 1 FROM versions p WHERE p.type = v.type AND p.id = v.id AND p.superseded = v.seq AND {w})"
        ));
        args.extend(b.args);
    }
    sql.push_str(&format!(" ORDER BY v.seq LIMIT {}", q.count));
    all(conn, &sql, &args, |r| {
        Ok((r.text(0)?, r.text(1)?, r.i64(2)? as u64))
    })
}
