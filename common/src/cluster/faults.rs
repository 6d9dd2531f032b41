//! Fault injection: cutting peers off and refusing versions, for partition and quarantine tests
//! and for an operator isolating a misbehaving peer.

use std::net::SocketAddr;
use std::sync::Arc;

use crate::store::{Changeset, SiteId};

/// Application-level fault injection: everything to and from a blocked peer is dropped
/// (packets, pushes, sync sessions), as if the network between them were cut. For partition
/// tests, and for an operator who must isolate a misbehaving peer by hand.
///
/// It can also make this node refuse to apply given versions, as if its store rejected them: for
/// quarantine tests (a version every receiver rejects).
#[derive(Debug, Clone, Default)]
pub struct Faults {
    blocked: Arc<std::sync::RwLock<std::collections::HashSet<SocketAddr>>>,
    refused: Arc<std::sync::RwLock<std::collections::HashSet<(SiteId, u64)>>>,
}

impl Faults {
    /// Cuts `peer` off.
    pub fn block(&self, peer: SocketAddr) {
        self.blocked
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(peer);
    }

    /// Heals every cut and accepts every version again.
    pub fn clear(&self) {
        self.blocked
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        self.refused
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Makes this node refuse to apply `version` of `site`, as if its store rejected it.
    pub fn refuse(&self, site: SiteId, version: u64) {
        self.refused
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((site, version));
    }

    /// Takes the changesets this node refuses out of `batch`.
    pub(super) fn take_refused(&self, batch: &mut Vec<Changeset>) -> Vec<(SiteId, u64)> {
        let refused = self
            .refused
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if refused.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        batch.retain(|c| {
            let key = (c.site, c.version);
            let keep = !refused.contains(&key);
            if !keep && !out.contains(&key) {
                out.push(key);
            }
            keep
        });
        out
    }

    /// Whether `peer` is cut off.
    pub fn is_blocked(&self, peer: &SocketAddr) -> bool {
        let blocked = self
            .blocked
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        !blocked.is_empty() && blocked.contains(peer)
    }
}
