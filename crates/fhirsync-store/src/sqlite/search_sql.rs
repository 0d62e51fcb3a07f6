//! Search as SQL: a [`SearchQuery`] at a snapshot `seq` becomes one
//! statement over `versions` and the index tables, with `_sort`, paging,
//! `_include` and `_revinclude` read at the same snapshot.

use std::collections::HashSet;

use fhirsync_core::index;
use fhirsync_core::search::{
    Clause, CompB, Cond, Include, NumberCond, Prefix, SearchQuery, TextOp, TotalMode,
};
use fhirsync_core::spec::Kind;
use rusqlite::types::Value as Sql;
use rusqlite::{params_from_iter, Connection};

use super::query::{last_seq, row_to_version, COLS};
use crate::types::{SearchPage, StoredVersion};
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
}

impl Builder {
    fn text(&mut self, s: &str) -> &'static str {
        self.args.push(Sql::Text(s.to_owned()));
        "?"
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
        format!(
            "{a}.seq <= ? AND ({a}.superseded IS NULL OR {a}.superseded > ?) AND {a}.deleted = 0"
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
                // From the targets that satisfy the inner clause to the
                // references to them: both by the tables' keys.
                let p = self.param(rt, param, "");
                let mut alts = Vec::new();
                for (ty, inner) in targets {
                    let v = self.alias("v");
                    let t = self.text(ty);
                    let t2 = self.text(ty);
                    let cur = self.current(&v);
                    let inner = self.clause(inner, &v, Some(ty));
                    alts.push(format!(
                        "(system = {t} AND value IN (SELECT {v}.id FROM versions {v} WHERE {v}.type = {t2} AND {cur} AND {inner}))"
                    ));
                }
                format!(
                    "{a}.seq IN (SELECT seq FROM tokens WHERE {p} AND ({}))",
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
                if *include_self {
                    let t = self.text(&target.0);
                    let i = self.text(&target.1);
                    alts.push(format!("({a}.type = {t} AND {a}.id = {i})"));
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
                    let ty = self.text(ty);
                    let ps: Vec<&str> = codes.iter().map(|p| self.text(p)).collect();
                    let v = self.text(&target.1);
                    let s = self.text(&target.0);
                    alts.push(format!(
                        "({a}.type = {ty} AND {a}.seq IN (SELECT seq FROM tokens WHERE param IN ({}) AND value = {v} AND system = {s}))",
                        ps.join(",")
                    ));
                }
                if alts.is_empty() {
                    "0".into()
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
                format!("{a}.seq IN (SELECT seq FROM tokens WHERE {w})")
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
                format!("{a}.seq IN (SELECT seq FROM strings WHERE {p} AND {w})")
            }
            Cond::Date {
                param,
                prefix,
                lo,
                hi,
            } => {
                let p = self.param(rt, param, "");
                let w = self.range(*prefix, *lo, *hi);
                format!("{a}.seq IN (SELECT seq FROM dates WHERE {p} AND {w})")
            }
            Cond::Number { param, q } => {
                let p = self.param(rt, param, "");
                let w = self.number(q, "value", "system", "code");
                format!("{a}.seq IN (SELECT seq FROM numbers WHERE {p} AND {w})")
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
                format!("{a}.seq IN (SELECT seq FROM tokens WHERE {p} AND system = '' AND {w})")
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
                        let mut bw = String::from("1");
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
                format!("{a}.seq IN (SELECT seq FROM composites WHERE {w} AND {bw})")
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
            Prefix::Eq => (format!("{rl} >= ? AND {rh} <= ?"), vec![lo, hi]),
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

/// The WHERE clause of a search at `snapshot`, without paging.
pub fn search_where(q: &SearchQuery, snapshot: u64) -> (String, Vec<Sql>) {
    let mut b = Builder {
        args: Vec::new(),
        n: 0,
        snapshot: snapshot as i64,
    };
    let mut w = b.current("v");
    if let Some(t) = &q.rtype {
        let x = b.text(t);
        w.push_str(&format!(" AND v.type = {x}"));
    }
    for c in &q.clauses {
        w.push_str(" AND ");
        w.push_str(&b.clause(c, "v", q.rtype.as_deref()));
    }
    (w, b.args)
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

pub fn search(conn: &Connection, q: &SearchQuery) -> Result<SearchPage, StoreError> {
    let snapshot = match q.snapshot {
        Some(s) => s,
        None => last_seq(conn)?,
    };
    let (w, args) = search_where(q, snapshot);
    // A snapshot's total does not change: later pages carry the first one's.
    let carried = q
        .snapshot
        .and(q.snapshot_total)
        .filter(|_| !q.summary_count());
    let total = if let Some(t) = carried.filter(|_| q.total == TotalMode::Accurate) {
        Some(t)
    } else if q.total == TotalMode::Accurate || q.summary_count() {
        let sql = format!("SELECT count(*) FROM versions v WHERE {w}");
        let n: i64 = conn
            .prepare_cached(&sql)?
            .query_row(params_from_iter(args.iter()), |r| r.get(0))?;
        Some(n as u64)
    } else {
        None
    };
    if q.summary_count() {
        return Ok(SearchPage {
            snapshot,
            total,
            items: Vec::new(),
            included: Vec::new(),
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
        let mut sql = format!("SELECT {COLS} FROM versions v WHERE {w}");
        if let Some(c) = q.cursor {
            sql.push_str(&format!(" AND v.seq {cmp} ?"));
            args.push(Sql::Integer(c as i64));
        }
        sql.push_str(&format!(" ORDER BY v.seq {order} LIMIT {}", q.count + 1));
        let mut st = conn.prepare_cached(&sql)?;
        items = st
            .query_map(params_from_iter(args), row_to_version)?
            .collect::<Result<_, _>>()?;
        next_cursor = if items.len() > q.count {
            items.truncate(q.count);
            items.last().map(|v| v.seq)
        } else {
            None
        };
    } else {
        let offset = q.offset.unwrap_or(0);
        let (joins, order, mut all) = order_by(q);
        let sql = format!(
            "SELECT {} FROM versions v{joins} WHERE {w} ORDER BY {order} LIMIT {} OFFSET {offset}",
            v_cols(),
            q.count + 1
        );
        all.extend(args);
        let mut st = conn.prepare_cached(&sql)?;
        items = st
            .query_map(params_from_iter(all), row_to_version)?
            .collect::<Result<_, _>>()?;
        next_cursor = if items.len() > q.count {
            items.truncate(q.count);
            Some(offset + q.count as u64)
        } else {
            None
        };
    }
    let included = includes(conn, q, snapshot, &items)?;
    Ok(SearchPage {
        snapshot,
        total,
        items,
        included,
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
    conn: &Connection,
    snapshot: u64,
    rtype: &str,
    id: &str,
) -> Result<Option<StoredVersion>, StoreError> {
    let sql = format!(
        "SELECT {COLS} FROM versions v WHERE v.type = ?1 AND v.id = ?2 AND v.seq <= ?3 \
         AND (v.superseded IS NULL OR v.superseded > ?3) AND v.deleted = 0"
    );
    let mut st = conn.prepare_cached(&sql)?;
    let mut rows = st.query_map(
        rusqlite::params![rtype, id, snapshot as i64],
        row_to_version,
    )?;
    Ok(rows.next().transpose()?)
}

/// `_include` and `_revinclude` of a page, at the page's snapshot; with
/// `:iterate` also of what they added, up to [`INCLUDED_MAX`] resources.
fn includes(
    conn: &Connection,
    q: &SearchQuery,
    snapshot: u64,
    items: &[StoredVersion],
) -> Result<Vec<StoredVersion>, StoreError> {
    if q.includes.is_empty() && q.revincludes.is_empty() {
        return Ok(Vec::new());
    }
    let mut seen: HashSet<(String, String)> = items
        .iter()
        .map(|v| (v.rtype.clone(), v.id.clone()))
        .collect();
    let mut out: Vec<StoredVersion> = Vec::new();
    let mut frontier: Vec<StoredVersion> = items.to_vec();
    for round in 0..ITERATE_ROUNDS_MAX {
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
                let mut st = conn.prepare_cached(&sql)?;
                for p in &sources {
                    let rows: Vec<StoredVersion> = st
                        .query_map(
                            rusqlite::params![v.rtype, v.id, p, inc.source, snapshot as i64],
                            row_to_version,
                        )?
                        .collect::<Result<_, _>>()?;
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
        let room = INCLUDED_MAX.saturating_sub(out.len());
        added.truncate(room);
        out.extend(added.iter().cloned());
        if out.len() >= INCLUDED_MAX {
            break;
        }
        frontier = added;
    }
    Ok(out)
}

/// Whether the version at `seq` matches `q` at the snapshot `seq` (for
/// subscriptions, which judge each version as it was written).
pub fn version_matches(conn: &Connection, q: &SearchQuery, seq: u64) -> Result<bool, StoreError> {
    let (w, mut args) = search_where(q, seq);
    args.push(Sql::Integer(seq as i64));
    let sql = format!("SELECT 1 FROM versions v WHERE {w} AND v.seq = ?");
    let mut st = conn.prepare_cached(&sql)?;
    Ok(st.exists(params_from_iter(args))?)
}

/// Keys of current resources matching `q` (for conditional operations).
pub fn matches(
    conn: &Connection,
    q: &SearchQuery,
    limit: usize,
) -> Result<Vec<fhirsync_core::ResourceKey>, StoreError> {
    let snapshot = last_seq(conn)?;
    let (w, args) = search_where(q, snapshot);
    let sql = format!("SELECT v.type, v.id FROM versions v WHERE {w} LIMIT {limit}");
    let mut st = conn.prepare_cached(&sql)?;
    let rows = st.query_map(params_from_iter(args), |r| {
        Ok(fhirsync_core::ResourceKey::new(
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
        ))
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}
