//! The summaries of anti-entropy over the current versions: each range is
//! read in id order, a page at a time (constant memory on both backends),
//! from the covering partial index `versions_summary`, which holds every
//! column an item needs so no body is read.

use fhirsync_core::resource::RESOURCE_TYPES;
use fhirsync_core::summary::{part_size, Cutter, Fingerprint, KeyRange};

use super::{all, int, n, t, Db, Sql};
use crate::summary::*;
use crate::StoreError;

/// Rows read per statement while scanning a range.
pub const SCAN_PAGE: usize = 5_000;

fn bounds_sql(range: &KeyRange, basis: Basis, args: &mut Vec<Sql>) -> String {
    args.push(t(&range.rtype));
    args.push(t(range.after.as_deref().unwrap_or("")));
    let mut cond = "type = ?1 AND superseded IS NULL AND id > ?2".to_owned();
    if let Some(u) = &range.upto {
        args.push(t(u));
        cond.push_str(" AND id <= ?3");
    }
    if basis == Basis::Content {
        cond.push_str(" AND hash IS NOT NULL");
    }
    cond
}

/// Hands the range's items to `f` in id order, at most `limit`, until it
/// returns `false`.
pub fn scan(
    db: &dyn Db,
    range: &KeyRange,
    basis: Basis,
    limit: usize,
    f: &mut dyn FnMut(SummaryItem) -> bool,
) -> Result<(), StoreError> {
    let mut from = range.clone();
    let mut left = limit;
    while left > 0 {
        let mut args = Vec::new();
        let cond = bounds_sql(&from, basis, &mut args);
        let page = SCAN_PAGE.min(left);
        args.push(n(page as u64));
        let sql = format!(
            "SELECT id, vv, hash FROM versions WHERE {cond} ORDER BY id LIMIT ?{}",
            args.len()
        );
        let items = all(db, &sql, &args, |r| {
            Ok(SummaryItem {
                id: r.text(0)?,
                vv: match basis {
                    Basis::Versions => r.text(1)?,
                    Basis::Content => String::new(),
                },
                content: r.opt_blob(2)?,
            })
        })?;
        let got = items.len();
        let last = items.last().map(|i| i.id.clone());
        for i in items {
            if !f(i) {
                return Ok(());
            }
        }
        if got < page {
            break;
        }
        left -= got;
        from.after = last;
    }
    Ok(())
}

/// How many items the range holds on `basis`.
pub fn count(db: &dyn Db, range: &KeyRange, basis: Basis) -> Result<u64, StoreError> {
    let mut args = Vec::new();
    let cond = bounds_sql(range, basis, &mut args);
    Ok(int(
        db,
        &format!("SELECT count(*) FROM versions WHERE {cond}"),
        &args,
    )? as u64)
}

pub fn run(db: &dyn Db, q: &SummaryQuery, basis: Basis) -> Result<SummaryAnswer, StoreError> {
    match q {
        SummaryQuery::Types => {
            let mut out = Vec::new();
            for rtype in RESOURCE_TYPES {
                let mut fp = Fingerprint::default();
                scan(db, &KeyRange::whole(rtype), basis, usize::MAX, &mut |i| {
                    fp.add(i.hash(rtype));
                    true
                })?;
                if fp.count > 0 {
                    out.push((rtype.to_string(), fp));
                }
            }
            Ok(SummaryAnswer::Types(out))
        }
        SummaryQuery::Split {
            range,
            fanout,
            leaf,
        } => {
            let total = count(db, range, basis)?;
            if total <= *leaf as u64 {
                return items(db, range, basis, *leaf);
            }
            let size = part_size(total, (*fanout).min(SUMMARY_FANOUT_MAX));
            let mut parts = Vec::new();
            let mut fp = Fingerprint::default();
            scan(db, range, basis, usize::MAX, &mut |i| {
                fp.add(i.hash(&range.rtype));
                if fp.count == size {
                    parts.push(Part {
                        upto: Some(i.id),
                        fp: std::mem::take(&mut fp),
                    });
                }
                true
            })?;
            // The last part ends where the range does, even when empty (the
            // asker may hold ids past this side's last).
            match parts.last_mut() {
                Some(p) if fp.count == 0 => p.upto = range.upto.clone(),
                _ => parts.push(Part {
                    upto: range.upto.clone(),
                    fp,
                }),
            }
            Ok(SummaryAnswer::Parts(parts))
        }
        SummaryQuery::Cut { range, bounds } => {
            let mut cut = Cutter::new(bounds);
            scan(db, range, basis, usize::MAX, &mut |i| {
                cut.add(&i.id, i.hash(&range.rtype));
                true
            })?;
            let mut uptos: Vec<Option<String>> = bounds.iter().cloned().map(Some).collect();
            uptos.push(range.upto.clone());
            Ok(SummaryAnswer::Parts(
                uptos
                    .into_iter()
                    .zip(cut.parts)
                    .map(|(upto, fp)| Part { upto, fp })
                    .collect(),
            ))
        }
        SummaryQuery::Items { range, limit } => items(db, range, basis, *limit),
    }
}

fn items(
    db: &dyn Db,
    range: &KeyRange,
    basis: Basis,
    limit: usize,
) -> Result<SummaryAnswer, StoreError> {
    let mut out = Vec::new();
    scan(db, range, basis, limit.min(SUMMARY_ITEMS_MAX), &mut |i| {
        out.push(i);
        true
    })?;
    Ok(SummaryAnswer::Items(out))
}

/// The current versions (tombstones included) of the given resources; the
/// ones a store does not hold are left out.
pub fn current_many(
    db: &dyn Db,
    keys: &[(String, String)],
) -> Result<Vec<crate::StoredVersion>, StoreError> {
    let mut out = Vec::with_capacity(keys.len());
    for (rtype, id) in keys {
        if let Some(v) = super::query::read_current(db, rtype, id)? {
            out.push(v);
        }
    }
    Ok(out)
}
