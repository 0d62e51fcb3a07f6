//! Version vectors: which edits of each node a resource version includes.
//! Conflicts are decided by comparing vectors, never by wall clocks.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// `{node_id: counter}`; a missing node counts as 0.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VersionVector(BTreeMap<String, u64>);

/// How an incoming vector relates to the local one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Causality {
    Equal,
    /// The first is strictly older (dominated).
    Before,
    /// The first strictly dominates.
    After,
    Concurrent,
}

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn get(&self, node: &str) -> u64 {
        self.0.get(node).copied().unwrap_or(0)
    }

    /// The vector of a local edit made by `node` on top of `self`.
    pub fn bumped(&self, node: &str) -> VersionVector {
        let mut next = self.clone();
        *next.0.entry(node.to_owned()).or_insert(0) += 1;
        next
    }

    /// Pointwise maximum (a version that has seen both).
    pub fn merged(&self, other: &VersionVector) -> VersionVector {
        let mut out = self.clone();
        for (k, v) in &other.0 {
            let e = out.0.entry(k.clone()).or_insert(0);
            *e = (*e).max(*v);
        }
        out
    }

    /// Pointwise minimum: what both have seen (the vector of their
    /// common ancestor, when it is a version).
    pub fn meet(&self, other: &VersionVector) -> VersionVector {
        VersionVector(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), (*v).min(other.get(k))))
                .filter(|(_, v)| *v > 0)
                .collect(),
        )
    }

    pub fn compare(&self, other: &VersionVector) -> Causality {
        let mut less = false;
        let mut greater = false;
        for k in self.0.keys().chain(other.0.keys()) {
            let (a, b) = (self.get(k), other.get(k));
            less |= a < b;
            greater |= a > b;
        }
        match (less, greater) {
            (false, false) => Causality::Equal,
            (true, false) => Causality::Before,
            (false, true) => Causality::After,
            (true, true) => Causality::Concurrent,
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(&self.0).unwrap_or_else(|_| "{}".into())
    }

    pub fn from_json(s: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vv(pairs: &[(&str, u64)]) -> VersionVector {
        VersionVector(pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect())
    }

    #[test]
    fn compare_cases() {
        let check = |a: &[(&str, u64)], b: &[(&str, u64)], want| {
            assert_eq!(vv(a).compare(&vv(b)), want, "{a:?} vs {b:?}");
        };
        check(&[], &[], Causality::Equal);
        check(&[("a", 1)], &[("a", 1), ("b", 0)], Causality::Equal);
        check(&[("a", 1)], &[("a", 2)], Causality::Before);
        check(&[("a", 2), ("b", 1)], &[("a", 2)], Causality::After);
        check(&[("a", 2)], &[("b", 1)], Causality::Concurrent);
    }

    #[test]
    fn meet_is_what_both_have_seen() {
        let a = VersionVector::new().bumped("x").bumped("x").bumped("y");
        let b = VersionVector::new().bumped("x").bumped("z");
        assert_eq!(a.meet(&b), VersionVector::new().bumped("x"));
        assert_eq!(a.meet(&b), b.meet(&a));
    }

    #[test]
    fn bump_and_merge() {
        let a = VersionVector::new().bumped("n1").bumped("n1");
        assert_eq!(a.get("n1"), 2);
        let b = vv(&[("n2", 3)]);
        let m = a.merged(&b);
        assert_eq!(m.compare(&a), Causality::After);
        assert_eq!(m.compare(&b), Causality::After);
        assert_eq!(VersionVector::from_json(&m.to_json()).unwrap(), m);
    }
}
