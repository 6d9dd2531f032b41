//! Invariants checked while a simulation runs, at the event that would break them.
//!
//! - **Only written versions are held**: every version a node applies was written by someone,
//!   with the same content.
//! - **No version is applied twice**: the core hands a version to apply only if the node does
//!   not hold it yet, and a replica never marks a held version again.
//! - **Heads never move backwards**: per node and site, the highest version held only grows,
//!   across restarts too (a restarted node keeps its replica).
//!
//! The first violation stops the run; it names the seed, the virtual time, the node, the site
//! and the version, so `SIM_SEED=<seed>` replays it. What must hold once the run is quiet
//! (every live node holds every version, globald holds the right map) is checked by `Sim`.

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use strata_common::store::{Changeset, SiteId};

use super::replica::{Ledger, ModelReplica};

/// A broken invariant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// The seed of the run.
    pub seed: u64,
    /// Virtual time of the event that broke it.
    pub at: Duration,
    /// The node it happened on.
    pub node: usize,
    /// What was seen.
    pub what: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "seed {} (replay with SIM_SEED={}), at {:?}, node {}: {}",
            self.seed, self.seed, self.at, self.node, self.what
        )
    }
}

/// The invariant checker of one run.
#[derive(Debug, Default)]
pub struct Checker {
    /// Highest head seen per node and site.
    heads: HashMap<(usize, SiteId), u64>,
}

impl Checker {
    /// The core asked a node to apply `changeset`: it must be a written version the node
    /// does not hold yet (the core deduplicates against the replica).
    pub fn on_apply_asked(
        &self,
        changeset: &Changeset,
        replica: &ModelReplica,
    ) -> Result<(), String> {
        use strata_core::Replica;
        if replica.has(changeset.site, changeset.version) {
            return Err(format!(
                "the core asked to apply site {} version {} which the node already holds \
                 (a version applied twice)",
                changeset.site, changeset.version
            ));
        }
        Ok(())
    }

    /// A node is about to apply `changeset`: it must be a version somebody wrote, with
    /// the content written.
    pub fn on_apply(&self, changeset: &Changeset, ledger: &Ledger) -> Result<(), String> {
        match ledger.get(changeset.site, changeset.version) {
            None => Err(format!(
                "holds site {} version {} which nobody wrote",
                changeset.site, changeset.version
            )),
            Some(written) if *written.changeset != *changeset => Err(format!(
                "site {} version {} arrived with content other than what was written",
                changeset.site, changeset.version
            )),
            Some(_) => Ok(()),
        }
    }

    /// After node `node` applied versions of `sites`: no head went back.
    pub fn on_applied(
        &mut self,
        node: usize,
        sites: impl IntoIterator<Item = SiteId>,
        replica: &ModelReplica,
    ) -> Result<(), String> {
        for site in sites {
            let head = replica.head(site);
            let seen = self.heads.entry((node, site)).or_insert(0);
            if head < *seen {
                return Err(format!(
                    "the head of site {site} moved backwards from {} to {head}",
                    *seen
                ));
            }
            *seen = head;
        }
        Ok(())
    }

    /// After node `node` restarted: every head it held before is still there.
    pub fn on_restart(&self, node: usize, replica: &ModelReplica) -> Result<(), String> {
        for (&(n, site), &seen) in &self.heads {
            if n == node && replica.head(site) < seen {
                return Err(format!(
                    "after a restart the head of site {site} is {} but was {seen}",
                    replica.head(site)
                ));
            }
        }
        Ok(())
    }
}
