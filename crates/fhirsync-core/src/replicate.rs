//! The replication decision, as plain functions over data: what to do with
//! an incoming version given the local current one (skip, fast-forward or
//! conflict), and which side wins a conflict under each policy. Storage and
//! transport call these; they never decide on their own.

use std::cmp::Ordering;
use std::fmt;
use std::str::FromStr;

use crate::{Causality, Hlc, VersionVector};

/// How an edge settles concurrent edits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Keep the local version; queue both sides for a person to resolve.
    #[default]
    Manual,
    /// The parent's version wins (the parent is the source of the pull feed).
    SourceWins,
    /// The child's version wins.
    TargetWins,
    /// The version with the higher HLC wins (ties: node id, then content),
    /// so every node picks the same winner.
    HlcLww,
    /// A three-way merge against the common ancestor ([`crate::merge`]);
    /// a clash (or no ancestor, or a delete) falls back to `manual`.
    Merge,
    /// `merge`, falling back to `hlc-lww`.
    MergeHlcLww,
    /// `merge`, falling back to `source-wins`.
    MergeSourceWins,
    /// `merge`, falling back to `target-wins`.
    MergeTargetWins,
}

/// Every policy, for messages and tests.
pub const POLICIES: [Policy; 8] = [
    Policy::Manual,
    Policy::SourceWins,
    Policy::TargetWins,
    Policy::HlcLww,
    Policy::Merge,
    Policy::MergeHlcLww,
    Policy::MergeSourceWins,
    Policy::MergeTargetWins,
];

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Manual => "manual",
            Policy::SourceWins => "source-wins",
            Policy::TargetWins => "target-wins",
            Policy::HlcLww => "hlc-lww",
            Policy::Merge => "merge",
            Policy::MergeHlcLww => "merge+hlc-lww",
            Policy::MergeSourceWins => "merge+source-wins",
            Policy::MergeTargetWins => "merge+target-wins",
        }
    }

    /// Whether concurrent versions are merged first.
    pub fn merges(self) -> bool {
        self.fallback() != self
    }

    /// The policy for what a merge cannot settle (itself, for the others).
    pub fn fallback(self) -> Policy {
        match self {
            Policy::Merge => Policy::Manual,
            Policy::MergeHlcLww => Policy::HlcLww,
            Policy::MergeSourceWins => Policy::SourceWins,
            Policy::MergeTargetWins => Policy::TargetWins,
            p => p,
        }
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        POLICIES
            .into_iter()
            .find(|p| p.as_str() == s)
            .ok_or_else(|| {
                let all: Vec<&str> = POLICIES.iter().map(|p| p.as_str()).collect();
                format!("unknown conflict policy '{s}' ({})", all.join(", "))
            })
    }
}

/// What identifies one side of a decision.
#[derive(Debug, Clone, Copy)]
pub struct Side<'a> {
    pub vv: &'a VersionVector,
    pub hlc: Hlc,
    pub origin: &'a str,
    /// Content hash; `None` for a tombstone.
    pub hash: Option<u128>,
}

/// What to do with an incoming version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Already seen (equal or older): nothing to store.
    Skip,
    /// Strictly newer: store it as it is.
    FastForward,
    /// Concurrent edits: the edge's policy decides.
    Conflict,
    /// Equal vectors with different content (only possible when two edges
    /// settled the same conflict differently): settled by [`lww_winner`].
    Divergent,
}

pub fn decide(local: Option<Side<'_>>, incoming: Side<'_>) -> Decision {
    let Some(l) = local else {
        return Decision::FastForward;
    };
    match incoming.vv.compare(l.vv) {
        Causality::Before => Decision::Skip,
        Causality::Equal if incoming.hash == l.hash => Decision::Skip,
        Causality::Equal => Decision::Divergent,
        Causality::After => Decision::FastForward,
        Causality::Concurrent => Decision::Conflict,
    }
}

/// Which side a settled conflict keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Winner {
    Local,
    Incoming,
}

impl Winner {
    pub fn as_str(self) -> &'static str {
        match self {
            Winner::Local => "local",
            Winner::Incoming => "remote",
        }
    }
}

/// The winner under an automatic policy; `None` under `manual`. A merge
/// policy answers for its fallback (what a merge could not settle).
/// `incoming_from_parent` tells which side is the parent on this edge.
pub fn winner(
    policy: Policy,
    incoming_from_parent: bool,
    local: Side<'_>,
    incoming: Side<'_>,
) -> Option<Winner> {
    let parent = |from_parent: bool| {
        if from_parent {
            Winner::Incoming
        } else {
            Winner::Local
        }
    };
    match policy.fallback() {
        Policy::Manual => None,
        Policy::SourceWins => Some(parent(incoming_from_parent)),
        Policy::TargetWins => Some(parent(!incoming_from_parent)),
        Policy::HlcLww => Some(lww_winner(local, incoming)),
        _ => None,
    }
}

/// Last writer wins by HLC, with ties broken by origin node id and then by
/// content hash, so that every node, seeing the same two versions, keeps
/// the same one whichever arrived first.
pub fn lww_winner(local: Side<'_>, incoming: Side<'_>) -> Winner {
    let key = |s: &Side<'_>| (s.hlc, s.origin.to_owned(), s.hash.unwrap_or(0));
    match key(&incoming).cmp(&key(&local)) {
        Ordering::Greater => Winner::Incoming,
        _ => Winner::Local,
    }
}

/// The vector of a version that settles a conflict between `a` and `b`:
/// it has seen both.
pub fn settled_vector(a: &VersionVector, b: &VersionVector) -> VersionVector {
    a.merged(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn side<'a>(vv: &'a VersionVector, hlc: u64, origin: &'a str, hash: u128) -> Side<'a> {
        Side {
            vv,
            hlc: Hlc::new(hlc, 0),
            origin,
            hash: Some(hash),
        }
    }

    #[test]
    fn decisions() {
        let a1 = VersionVector::new().bumped("a");
        let a2 = a1.bumped("a");
        let b1 = a1.bumped("b");
        let check = |l: Option<Side<'_>>, i: Side<'_>, want| assert_eq!(decide(l, i), want);
        check(None, side(&a1, 1, "a", 1), Decision::FastForward);
        check(
            Some(side(&a2, 2, "a", 2)),
            side(&a1, 1, "a", 1),
            Decision::Skip,
        );
        check(
            Some(side(&a1, 1, "a", 1)),
            side(&a1, 1, "a", 1),
            Decision::Skip,
        );
        check(
            Some(side(&a1, 1, "a", 1)),
            side(&a1, 1, "a", 9),
            Decision::Divergent,
        );
        check(
            Some(side(&a1, 1, "a", 1)),
            side(&a2, 2, "a", 2),
            Decision::FastForward,
        );
        check(
            Some(side(&a2, 2, "a", 2)),
            side(&b1, 3, "b", 3),
            Decision::Conflict,
        );
    }

    #[test]
    fn every_node_picks_the_same_lww_winner() {
        let (va, vb) = (
            VersionVector::new().bumped("a"),
            VersionVector::new().bumped("b"),
        );
        let a = side(&va, 100, "a", 1);
        let b = side(&vb, 100, "b", 2);
        // At node a, b arrives; at node b, a arrives: both keep b (tie on
        // HLC, broken by origin).
        assert_eq!(lww_winner(a, b), Winner::Incoming);
        assert_eq!(lww_winner(b, a), Winner::Local);
        let late = side(&va, 200, "a", 1);
        assert_eq!(lww_winner(b, late), Winner::Incoming);
    }

    #[test]
    fn source_and_target_are_the_same_side_at_both_ends() {
        let (va, vb) = (
            VersionVector::new().bumped("p"),
            VersionVector::new().bumped("c"),
        );
        let p = side(&va, 1, "p", 1);
        let c = side(&vb, 2, "c", 2);
        // At the child, the parent's version arrives (pull); at the parent,
        // the child's arrives (push). Both keep the parent's under source-wins.
        assert_eq!(
            winner(Policy::SourceWins, true, c, p),
            Some(Winner::Incoming)
        );
        assert_eq!(winner(Policy::SourceWins, false, p, c), Some(Winner::Local));
        assert_eq!(winner(Policy::TargetWins, true, c, p), Some(Winner::Local));
        assert_eq!(
            winner(Policy::TargetWins, false, p, c),
            Some(Winner::Incoming)
        );
        assert_eq!(winner(Policy::Manual, true, c, p), None);
        assert_eq!("hlc-lww".parse::<Policy>(), Ok(Policy::HlcLww));
        assert!("x".parse::<Policy>().is_err());
        for p in POLICIES {
            assert_eq!(p.as_str().parse::<Policy>(), Ok(p));
            assert!(!p.fallback().merges());
        }
        assert_eq!(
            winner(Policy::MergeTargetWins, true, c, p),
            Some(Winner::Local)
        );
        assert_eq!(winner(Policy::Merge, true, c, p), None);
    }
}
