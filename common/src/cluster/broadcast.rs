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
//! Receiving is not here: the core deduplicates and applies (see `core`). No I/O.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::seq::IteratorRandom;
use serde::{Deserialize, Serialize};

use super::core::Action;
use crate::store::Changeset;

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
    members: BTreeSet<SocketAddr>,
}

impl Broadcaster {
    /// A broadcaster with no members yet.
    pub fn new(strategy: Strategy) -> Broadcaster {
        Broadcaster {
            strategy,
            members: BTreeSet::new(),
        }
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
    pub fn local(&mut self, changesets: Arc<Vec<Changeset>>, out: &mut Vec<Action>) {
        for &to in &self.members {
            out.push(Action::Send {
                to,
                changesets: Arc::clone(&changesets),
            });
        }
    }

    /// Changes that arrived from `from` and were new here: forwarded if the strategy says so.
    pub fn received(
        &mut self,
        from: SocketAddr,
        changesets: Arc<Vec<Changeset>>,
        rng: &mut StdRng,
        out: &mut Vec<Action>,
    ) {
        let Strategy::Gossip { fanout } = self.strategy else {
            return;
        };
        let targets = self
            .members
            .iter()
            .filter(|m| **m != from)
            .copied()
            .sample(rng, fanout);
        for to in targets {
            out.push(Action::Send {
                to,
                changesets: Arc::clone(&changesets),
            });
        }
    }
}
