//! A search judged on one version in memory, from the index entries of
//! its resource, where that gives what the store's search gives: the
//! subscription matcher asks whether each change satisfies each
//! subscription's filters, and a store query per (change, subscription)
//! made a hundred subscriptions cost a hundred queries a write.

use super::{Clause, Cond, SearchQuery, TextOp};
use crate::index::{self, IndexEntry, Key};

/// Whether the (not deleted) version `rtype/id` whose resource has the
/// index entries `entries` satisfies `q`, as the store's search at that
/// version's own `seq` would say; `None` when that cannot be judged here
/// (any clause other than alternatives of ids, tokens, references, URIs
/// and strings, or a custom parameter in force for the type, whose entries
/// the store may have written under another definition), and the store
/// must be asked.
pub fn judge(q: &SearchQuery, rtype: &str, id: &str, entries: &[IndexEntry]) -> Option<bool> {
    if !index::custom::params(rtype).is_empty() {
        return None;
    }
    if q.rtype.as_deref().is_some_and(|t| t != rtype) {
        return Some(false);
    }
    let rt = q.rtype.as_deref();
    let mut holds = true;
    for c in &q.clauses {
        let Clause::Any(conds) = c else { return None };
        let mut any = false;
        for cond in conds {
            any |= cond_holds(cond, rt, id, entries)?;
        }
        holds &= any;
    }
    Some(holds)
}

fn cond_holds(c: &Cond, rt: Option<&str>, id: &str, entries: &[IndexEntry]) -> Option<bool> {
    Some(match c {
        Cond::Id(x) => x == id,
        Cond::Token {
            param,
            system,
            value,
        } => {
            let (names, typed) = index::storage(rt, param);
            let found = keys(entries, &names).any(|k| match k {
                Key::Token {
                    system: s,
                    value: v,
                } => {
                    typed.is_none_or(|t| s == t)
                        && value.as_ref().is_none_or(|x| x == v)
                        && system.as_ref().is_none_or(|x| x == s)
                }
                _ => false,
            });
            found
        }
        Cond::Text { param, op, value } => {
            let (names, typed) = index::storage(rt, param);
            if typed.is_some() {
                return None;
            }
            let exact = (*op == TextOp::Exact).then(|| index::fold(value));
            let found = keys(entries, &names).any(|k| match k {
                Key::Text { norm, raw } => match op {
                    TextOp::Starts => norm.starts_with(value.as_str()),
                    TextOp::Exact => exact.as_deref() == Some(norm.as_str()) && raw == value,
                    TextOp::Contains => norm.contains(value.as_str()),
                },
                _ => false,
            });
            found
        }
        _ => return None,
    })
}

/// The keys of the entries stored under one of `names`.
fn keys<'a>(entries: &'a [IndexEntry], names: &'a [String]) -> impl Iterator<Item = &'a Key> {
    entries
        .iter()
        .filter(|e| names.iter().any(|n| **n == *e.param))
        .map(|e| &e.key)
}
