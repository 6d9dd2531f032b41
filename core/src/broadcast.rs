//! Broadcast: how a change reaches every member.
//!
//! Two strategies, chosen by measurement (`strata-bench redundancy`, `propagation`):
//! - [`Strategy::Direct`] (default): the origin pushes each local commit to every live member at
//!   once; receivers do not forward. One hop, exactly one copy per member per change. A regional
//!   cluster has tens to hundreds of members, so the origin's N-1 sends are cheap, and a send that
//!   is lost (a member briefly down, a full queue) is repaired by anti-entropy.
//! - [`Strategy::Gossip`]: the origin pushes to every member as above, and each receiver forwards
//!   what is new to it to `fanout` random members: more copies, more robust to a dying origin.
//!
//! Either way one broadcast is one [`Action::Push`] naming every recipient, with the changes
//! packed once (`pack`). Receiving is not here: the core deduplicates and applies (see `core`).
//! No I/O.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use rand::rngs::StdRng;
use rand::seq::IteratorRandom;
use serde::{Deserialize, Serialize};

use crate::machine::Action;
use crate::pack::{PackLimits, pack};
use strata_types::Changeset;

/// How changes spread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "strategy")]
pub enum Strategy {
    /// The origin sends to every member; nobody forwards.
    #[default]
    Direct,
    /// The origin sends to every member; each receiver forwards new changes to `fanout` members.
    Gossip {
        /// Members each receiver forwards to.
        fanout: usize,
    },
}

/// The broadcaster: who gets what.
pub struct Broadcaster {
    strategy: Strategy,
    limits: PackLimits,
    members: BTreeSet<SocketAddr>,
}

impl Broadcaster {
    /// A broadcaster with no members yet.
    pub fn new(strategy: Strategy) -> Broadcaster {
        Broadcaster {
            strategy,
            limits: PackLimits::default(),
            members: BTreeSet::new(),
        }
    }

    /// Sets how pushes are packed.
    pub fn set_limits(&mut self, limits: PackLimits) {
        self.limits = limits;
    }

    /// A member came up.
    pub fn member_up(&mut self, addr: SocketAddr) {
        self.members.insert(addr);
    }

    /// A member went down.
    pub fn member_down(&mut self, addr: SocketAddr) {
        self.members.remove(&addr);
    }

    /// Local commits: sent to every live member.
    pub fn local<'a>(
        &mut self,
        changesets: impl ExactSizeIterator<Item = &'a Changeset>,
        out: &mut Vec<Action>,
    ) {
        let to: Vec<SocketAddr> = self.members.iter().copied().collect();
        self.push(to, changesets, out);
    }

    /// Changes that arrived from `from` and were new here: forwarded if the strategy says so.
    pub fn received(
        &mut self,
        from: SocketAddr,
        changesets: &[Changeset],
        rng: &mut StdRng,
        out: &mut Vec<Action>,
    ) {
        let Strategy::Gossip { fanout } = self.strategy else {
            return;
        };
        let to: Vec<SocketAddr> = self
            .members
            .iter()
            .filter(|m| **m != from)
            .copied()
            .sample(rng, fanout);
        self.push(to, changesets.iter(), out);
    }

    /// One push of `changesets`, packed once, to every address in `to`.
    fn push<'a>(
        &self,
        to: Vec<SocketAddr>,
        changesets: impl ExactSizeIterator<Item = &'a Changeset>,
        out: &mut Vec<Action>,
    ) {
        if to.is_empty() || changesets.len() == 0 {
            return;
        }
        let count = changesets.len();
        out.push(Action::Push {
            to,
            frames: pack(changesets, self.limits),
            changesets: count,
        });
    }
}
