//! Whether a starting node is in step with its cluster: it has found the members it knew, and
//! has caught up with what they held when it joined.
//!
//! A node is *joined* once it sees at least one live member and either every member it knew
//! before it stopped (the persisted member list) is live again, or `rejoin_wait` has passed
//! since it started (some of them may be gone for good). A node with nothing to join (no seeds,
//! no known members) is joined at once.
//!
//! It is *caught up* once it is joined and has finished a complete sync session with every
//! member that came up while it was joining: each such session fetched everything that peer
//! held at the time, so together they cover what the cluster held when the node came back.
//! Members that go down stop counting; members that come up after the node joined do not count
//! (a cluster with churn would otherwise keep a node catching up forever). Both states latch: a
//! node in step stays in step, and later lag shows through other readiness reasons.
//!
//! No I/O and no clock: the core feeds it events, and a timer it asks for ends the wait.

use std::collections::BTreeSet;
use std::net::SocketAddr;

/// What a starting node still waits for (all zero once in step).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StepStatus {
    /// It sees a live member and found the members it knew (or stopped waiting for them).
    pub joined: bool,
    /// Members it knew before it stopped.
    pub known: usize,
    /// How many of those are live now.
    pub known_live: usize,
    /// Members it must still finish a complete sync session with.
    pub catch_up_pending: usize,
    /// Joined and caught up.
    pub caught_up: bool,
}

/// The in-step tracker of one node.
#[derive(Debug)]
pub struct InStep {
    /// Members known before this start (gossip addresses), this node excluded.
    known: BTreeSet<SocketAddr>,
    /// Members live now.
    live: BTreeSet<SocketAddr>,
    /// The wait for the known members is over.
    waited: bool,
    joined: bool,
    /// Members that came up while joining and have not served a complete session yet.
    pending: BTreeSet<SocketAddr>,
    caught_up: bool,
}

impl InStep {
    /// A tracker for a node that knew `known` before it stopped and may join through seeds
    /// (`has_seeds`).
    pub fn new(known: impl IntoIterator<Item = SocketAddr>, has_seeds: bool) -> InStep {
        let known: BTreeSet<SocketAddr> = known.into_iter().collect();
        let has_peers = has_seeds || !known.is_empty();
        InStep {
            known,
            live: BTreeSet::new(),
            waited: false,
            joined: !has_peers,
            pending: BTreeSet::new(),
            caught_up: !has_peers,
        }
    }

    /// Whether the node has anything to wait for at start (then the core sets the wait timer).
    pub fn waits(&self) -> bool {
        !self.joined
    }

    /// The members known before this start.
    pub fn known(&self) -> impl Iterator<Item = &SocketAddr> {
        self.known.iter()
    }

    /// A member came up.
    pub fn member_up(&mut self, addr: SocketAddr) {
        self.live.insert(addr);
        if !self.joined {
            self.pending.insert(addr);
        }
        self.advance();
    }

    /// A member went down: nothing waits for it any more.
    pub fn member_down(&mut self, addr: SocketAddr) {
        self.live.remove(&addr);
        self.pending.remove(&addr);
        self.advance();
    }

    /// The wait for the known members is over.
    pub fn wait_over(&mut self) {
        self.waited = true;
        self.advance();
    }

    /// A sync session with `peer` ended; a complete one means we hold what it held.
    pub fn synced(&mut self, peer: SocketAddr, complete: bool) {
        if complete {
            self.pending.remove(&peer);
        }
        self.advance();
    }

    /// Members a catching-up node should sync with next (in address order).
    pub fn pending(&self) -> impl Iterator<Item = &SocketAddr> {
        self.pending.iter()
    }

    /// Whether the node is joined and caught up.
    pub fn caught_up(&self) -> bool {
        self.caught_up
    }

    /// Where the node stands.
    pub fn status(&self) -> StepStatus {
        StepStatus {
            joined: self.joined,
            known: self.known.len(),
            known_live: self.known.intersection(&self.live).count(),
            catch_up_pending: if self.caught_up {
                0
            } else {
                self.pending.len()
            },
            caught_up: self.caught_up,
        }
    }

    fn advance(&mut self) {
        if !self.joined
            && !self.live.is_empty()
            && (self.waited || self.known.is_subset(&self.live))
        {
            self.joined = true;
        }
        if self.joined && !self.caught_up && self.pending.is_empty() && !self.live.is_empty() {
            self.caught_up = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn a_node_with_no_one_to_join_is_in_step_at_once() {
        let step = InStep::new([], false);
        assert!(!step.waits());
        assert!(step.caught_up());
        assert!(step.status().joined);
    }

    #[test]
    fn a_restarted_node_joins_once_every_known_member_is_back_and_catches_up_with_each() {
        let mut step = InStep::new([addr(1), addr(2)], true);
        assert!(step.waits());
        step.member_up(addr(1));
        assert!(!step.status().joined, "{:?}", step.status());
        step.member_up(addr(2));
        assert!(step.status().joined);
        assert!(!step.caught_up());
        assert_eq!(step.status().catch_up_pending, 2);
        step.synced(addr(1), true);
        step.synced(addr(2), false);
        assert!(!step.caught_up(), "a partial session does not count");
        step.synced(addr(2), true);
        assert!(step.caught_up());
        assert_eq!(step.status().catch_up_pending, 0);
    }

    #[test]
    fn a_known_member_that_stays_away_is_waited_for_only_until_the_wait_ends() {
        let mut step = InStep::new([addr(1), addr(2)], false);
        step.member_up(addr(1));
        step.synced(addr(1), true);
        assert!(!step.caught_up());
        step.wait_over();
        assert!(step.status().joined);
        assert!(step.caught_up());
        assert_eq!(step.status().known_live, 1);
    }

    #[test]
    fn the_end_of_the_wait_does_not_join_a_node_that_sees_no_one() {
        let mut step = InStep::new([addr(1)], true);
        step.wait_over();
        assert!(!step.status().joined);
        step.member_up(addr(1));
        assert!(step.status().joined);
    }

    #[test]
    fn a_member_going_down_is_no_longer_waited_for() {
        let mut step = InStep::new([addr(1), addr(2)], true);
        step.member_up(addr(1));
        step.member_up(addr(2));
        step.synced(addr(1), true);
        step.member_down(addr(2));
        assert!(step.caught_up(), "{:?}", step.status());
    }

    #[test]
    fn members_that_come_up_after_joining_are_not_waited_for() {
        let mut step = InStep::new([], true);
        step.member_up(addr(1));
        assert!(step.status().joined);
        step.member_up(addr(2));
        assert_eq!(step.status().catch_up_pending, 1);
        step.synced(addr(1), true);
        assert!(step.caught_up());
    }

    #[test]
    fn being_in_step_latches() {
        let mut step = InStep::new([], true);
        step.member_up(addr(1));
        step.synced(addr(1), true);
        assert!(step.caught_up());
        step.member_down(addr(1));
        assert!(step.caught_up());
    }
}
