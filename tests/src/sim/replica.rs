//! In-memory replicas: which versions each node holds, and the ledger of what was written.
//!
//! A replica holds only sets of versions per site; the content of each version lives once, in
//! the [`Ledger`], with the virtual time it was written and the app it belongs to (for the
//! publisher's derivation). Applying to a replica is what the store's apply does to its
//! bookkeeping: a version already held is skipped, a new one is marked held.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rangemap::RangeInclusiveSet;
use strata_common::store::{Changeset, SiteId, SiteState};
use strata_core::Replica;

/// One written version: its content, when it was written and which app it belongs to.
#[derive(Debug, Clone)]
pub struct Written {
    /// The whole version, as its origin committed it.
    pub changeset: Arc<Changeset>,
    /// Virtual time of the write.
    pub at: Duration,
    /// The app whose row it changed.
    pub app: String,
}

/// Everything written in a run, by (site, version).
#[derive(Debug, Default)]
pub struct Ledger {
    versions: HashMap<(SiteId, u64), Written>,
}

impl Ledger {
    /// Records a write.
    pub fn record(&mut self, written: Written) {
        let key = (written.changeset.site, written.changeset.version);
        self.versions.insert(key, written);
    }

    /// The write of `version` of `site`, if anybody wrote it.
    pub fn get(&self, site: SiteId, version: u64) -> Option<&Written> {
        self.versions.get(&(site, version))
    }

    /// Every write.
    pub fn iter(&self) -> impl Iterator<Item = (&(SiteId, u64), &Written)> {
        self.versions.iter()
    }

    /// How many versions were written.
    pub fn len(&self) -> usize {
        self.versions.len()
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.versions.is_empty()
    }
}

/// An in-memory replica: which versions of which sites it holds.
#[derive(Debug)]
pub struct ModelReplica {
    site: SiteId,
    head: u64,
    held: HashMap<SiteId, RangeInclusiveSet<u64>>,
}

impl Replica for ModelReplica {
    fn has(&self, site: SiteId, version: u64) -> bool {
        self.held
            .get(&site)
            .is_some_and(|set| set.contains(&version))
    }
}

impl ModelReplica {
    /// An empty replica whose own writes are versions of `site`.
    pub fn new(site: SiteId) -> ModelReplica {
        ModelReplica {
            site,
            head: 0,
            held: HashMap::new(),
        }
    }

    /// The site of this replica's own writes.
    pub fn site(&self) -> SiteId {
        self.site
    }

    /// Allocates the next local version (held at once, as a local commit is).
    pub fn next_local(&mut self) -> u64 {
        self.head += 1;
        let version = self.head;
        self.hold(self.site, version);
        version
    }

    /// Per-site heads and gaps, as a real store reports them.
    pub fn states(&self) -> Vec<SiteState> {
        let mut states: Vec<SiteState> = self
            .held
            .iter()
            .filter_map(|(site, set)| {
                let head = *set.iter().next_back()?.end();
                let gaps = set.gaps(&(1..=head)).collect();
                Some(SiteState {
                    site: *site,
                    head,
                    gaps,
                    partials: Vec::new(),
                })
            })
            .collect();
        states.sort_by_key(|s| s.site);
        states
    }

    /// The highest version of `site` held (0 when none).
    pub fn head(&self, site: SiteId) -> u64 {
        self.held
            .get(&site)
            .and_then(|set| set.iter().next_back())
            .map_or(0, |r| *r.end())
    }

    /// Marks `version` of `site` held; false when it already was.
    pub fn hold(&mut self, site: SiteId, version: u64) -> bool {
        let set = self.held.entry(site).or_default();
        if set.contains(&version) {
            return false;
        }
        set.insert(version..=version);
        true
    }

    /// Every version held, as (site, range).
    pub fn ranges(&self) -> impl Iterator<Item = (SiteId, std::ops::RangeInclusive<u64>)> + '_ {
        self.held
            .iter()
            .flat_map(|(site, set)| set.iter().map(move |r| (*site, r.clone())))
    }

    /// How many versions it holds in all.
    pub fn versions(&self) -> u64 {
        self.ranges().map(|(_, r)| r.end() - r.start() + 1).sum()
    }
}
