//! One site's bookkeeping as a node reports it for sync: its head, the gaps below it and the
//! versions held in part. Nodes exchange these to find what the other lacks; the store keeps the
//! authoritative books and produces them.

use std::ops::RangeInclusive;

use rangemap::RangeInclusiveSet;

use crate::change::SiteId;

/// One site's bookkeeping as reported for sync.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SiteState {
    /// The site.
    pub site: SiteId,
    /// Highest version held.
    pub head: u64,
    /// Versions at or below `head` still missing.
    pub gaps: Vec<RangeInclusive<u64>>,
    /// Versions held in part.
    pub partials: Vec<u64>,
}

impl SiteState {
    /// Whether version `v` is held completely.
    pub fn has(&self, v: u64) -> bool {
        v >= 1 && v <= self.head && !self.gaps.iter().any(|g| g.contains(&v))
    }

    /// Versions held here, in `range`, as ranges (for serving a peer that lacks them).
    pub fn held_in(&self, range: RangeInclusive<u64>) -> Vec<RangeInclusive<u64>> {
        let lo = (*range.start()).max(1);
        let hi = (*range.end()).min(self.head);
        if lo > hi {
            return Vec::new();
        }
        let mut held = RangeInclusiveSet::new();
        held.insert(lo..=hi);
        for gap in &self.gaps {
            held.remove(gap.clone());
        }
        held.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_ranges_skip_gaps() {
        let state = SiteState {
            site: SiteId([0; 16]),
            head: 10,
            gaps: vec![3..=4, 8..=8],
            partials: vec![],
        };
        assert_eq!(state.held_in(0..=20), vec![1..=2, 5..=7, 9..=10]);
        assert_eq!(state.held_in(11..=20), Vec::<RangeInclusive<u64>>::new());
    }
}
