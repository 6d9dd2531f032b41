//! The cluster core: membership, broadcast and anti-entropy as one sans-IO state machine.
//!
//! Inputs come in through [`Core::handle`]; what to do comes out as [`Action`]s, which the tokio
//! driver (`driver`) carries out on the network and the store, and which the simulator in
//! `tests/` carries out on a simulated network and in-memory replicas. The core reads no clock,
//! does no I/O, and draws every random choice from one seeded RNG, so a simulation replays
//! exactly from its seed.
//!
//! The order of actions within one call is the order they were produced; the driver performs
//! them in that order.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use super::broadcast::{Broadcaster, Strategy};
use super::instep::{InStep, StepStatus};
use super::membership::{Member, MemberEvent, Membership, MembershipConfig};
use super::sync::{AntiEntropy, SyncConfig};
use crate::store::{Changeset, SiteId, Store};

/// Settings of the cluster machinery.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Failure detection and membership dissemination.
    pub membership: MembershipConfig,
    /// Anti-entropy.
    pub sync: SyncConfig,
    /// How changes spread.
    pub broadcast: Strategy,
}

/// Chunks remembered as received but perhaps not applied yet, to drop duplicates before they
/// reach the store. Bounded: a duplicate that slips past it costs one cheap check in the store.
const SEEN_MAX: usize = 65_536;

/// What the core needs to know about the local replica.
pub trait Replica {
    /// Whether version `version` of `site` is held completely.
    fn has(&self, site: SiteId, version: u64) -> bool;
}

impl Replica for Store {
    fn has(&self, site: SiteId, version: u64) -> bool {
        Store::has(self, site, version)
    }
}

/// A timer the core asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Timer {
    /// A SWIM timer.
    Swim(foca::Timer<Member>),
    /// The next anti-entropy round.
    SyncRound,
    /// Announce to the seeds again (with the generation it was set in).
    Reannounce(u64),
    /// Stop waiting for every known member before counting as joined.
    JoinWait,
}

/// Something that happened, for the core to react to.
#[derive(Debug)]
pub enum Input<'a> {
    /// Join the cluster and start the periodic work.
    Start,
    /// Members known from elsewhere, assumed alive until probed.
    KnownMembers(Vec<Member>),
    /// A SWIM packet arrived.
    Packet(&'a [u8]),
    /// A timer fired.
    Timer(Timer),
    /// This node committed versions.
    Committed(Vec<Arc<Changeset>>),
    /// A peer pushed changesets.
    Received {
        /// The peer.
        from: SocketAddr,
        /// What it pushed.
        changesets: Vec<Changeset>,
    },
    /// A sync session with `peer` ended.
    SyncFinished {
        /// The peer.
        peer: SocketAddr,
        /// The peer sent everything we lacked.
        complete: bool,
        /// The session did not finish.
        failed: bool,
    },
    /// Leave the cluster.
    Leave,
}

/// Something for the driver to do.
#[derive(Debug)]
pub enum Action {
    /// Send a SWIM packet.
    Datagram {
        /// To this member's address.
        to: SocketAddr,
        /// The packet.
        bytes: Bytes,
    },
    /// Push changesets to a member (one uni stream).
    Send {
        /// To this member's address.
        to: SocketAddr,
        /// What to push; shared by all recipients of a broadcast.
        changesets: Arc<Vec<Changeset>>,
    },
    /// Apply changesets to the local store.
    Apply {
        /// New changesets, deduplicated.
        changesets: Vec<Changeset>,
    },
    /// Run a sync session as client with `peer`.
    Sync {
        /// The peer.
        peer: SocketAddr,
    },
    /// Call back with `timer` after `after`.
    Schedule {
        /// The delay.
        after: Duration,
        /// The timer to hand back.
        timer: Timer,
    },
    /// A member came up or went down.
    Member(MemberEvent),
}

/// The cluster state machine of one node.
pub struct Core {
    membership: Membership,
    broadcast: Broadcaster,
    sync: AntiEntropy,
    seen: HashSet<(SiteId, u64, u32, u32)>,
    seen_order: VecDeque<(SiteId, u64, u32, u32)>,
    rng: StdRng,
    /// Changesets dropped as duplicates before reaching the store.
    duplicates_total: u64,
    /// Whether this node has found its cluster and caught up with it.
    in_step: InStep,
    /// How long to wait for every known member before counting as joined.
    rejoin_wait: Duration,
}

impl Core {
    /// The core of member `me`, joining through `seeds`, drawing randomness from `seed`.
    pub fn new(me: Member, config: ClusterConfig, seeds: Vec<SocketAddr>, seed: u64) -> Core {
        let has_seeds = seeds.iter().any(|s| *s != me.addr);
        Core {
            in_step: InStep::new([], has_seeds),
            rejoin_wait: Duration::from_millis(config.membership.rejoin_wait_ms),
            membership: Membership::new(me, config.membership, seeds, seed),
            broadcast: Broadcaster::new(config.broadcast),
            sync: AntiEntropy::new(config.sync),
            seen: HashSet::new(),
            seen_order: VecDeque::new(),
            rng: StdRng::seed_from_u64(seed.rotate_left(17)),
            duplicates_total: 0,
        }
    }

    /// The members this node knew before it stopped (its persisted member list): it announces
    /// itself to each of them as to a seed, and counts as joined once they are all live again
    /// (or `rejoin_wait_ms` passed). Call before [`Input::Start`].
    pub fn knowing(mut self, known: Vec<SocketAddr>) -> Core {
        let me = self.me().addr;
        let known: Vec<SocketAddr> = known.into_iter().filter(|a| *a != me).collect();
        let has_seeds = self.membership.has_seeds() || !known.is_empty();
        self.membership.add_seeds(&known);
        self.in_step = InStep::new(known, has_seeds);
        self
    }

    /// This node's identity.
    pub fn me(&self) -> Member {
        self.membership.me()
    }

    /// Live members (not counting this node), in address order.
    pub fn live(&self) -> impl Iterator<Item = &Member> {
        self.membership.live()
    }

    /// How many members are live (not counting this node).
    pub fn live_count(&self) -> usize {
        self.membership.live_count()
    }

    /// Whether this node found its cluster and caught up with what its members held when it
    /// joined (see `instep`).
    pub fn caught_up(&self) -> bool {
        self.in_step.caught_up()
    }

    /// What a starting node still waits for.
    pub fn step_status(&self) -> StepStatus {
        self.in_step.status()
    }

    /// The anti-entropy settings.
    pub fn sync_config(&self) -> &SyncConfig {
        self.sync.config()
    }

    /// Changesets dropped as duplicates before the store saw them.
    pub fn duplicates_total(&self) -> u64 {
        self.duplicates_total
    }

    /// SWIM updates waiting to be disseminated.
    pub fn swim_backlog(&self) -> usize {
        self.membership.updates_backlog()
    }

    /// Handles one input; returns what to do, in order.
    pub fn handle(&mut self, input: Input<'_>, replica: &dyn Replica) -> Vec<Action> {
        let mut out = Vec::new();
        let mut events = Vec::new();
        // A catching-up node syncs with the members it waits for when one comes up, on each
        // round, and straight after a complete session; not after a failed one, which would
        // hammer a busy peer in a loop.
        let mut catch_up = matches!(
            input,
            Input::Timer(Timer::SyncRound)
                | Input::SyncFinished {
                    complete: true,
                    failed: false,
                    ..
                }
        );
        match input {
            Input::Start => {
                if self.in_step.waits() {
                    out.push(Action::Schedule {
                        after: self.rejoin_wait,
                        timer: Timer::JoinWait,
                    });
                }
                self.membership.join(&mut out, &mut events);
                self.sync.start(&mut self.rng, &mut out);
            }
            Input::Timer(Timer::JoinWait) => self.in_step.wait_over(),
            Input::KnownMembers(members) => self.membership.assume(members, &mut out, &mut events),
            Input::Packet(bytes) => self.membership.handle_packet(bytes, &mut out, &mut events),
            Input::Timer(Timer::Swim(timer)) => {
                self.membership.handle_timer(timer, &mut out, &mut events);
            }
            Input::Timer(Timer::Reannounce(generation)) => {
                self.membership
                    .handle_reannounce(generation, &mut out, &mut events);
            }
            Input::Timer(Timer::SyncRound) => {
                let live: Vec<SocketAddr> = self.membership.live().map(|m| m.addr).collect();
                self.sync.tick(live.iter(), &mut self.rng, &mut out);
            }
            Input::Committed(local) => {
                let changesets: Vec<Changeset> = local.iter().map(|c| (**c).clone()).collect();
                self.broadcast.local(Arc::new(changesets), &mut out);
            }
            Input::Received { from, changesets } => {
                let fresh: Vec<Changeset> = changesets
                    .into_iter()
                    .filter(|c| self.first_sight(c, replica))
                    .collect();
                if !fresh.is_empty() {
                    let shared = Arc::new(fresh.clone());
                    self.broadcast
                        .received(from, shared, &mut self.rng, &mut out);
                    out.push(Action::Apply { changesets: fresh });
                }
            }
            Input::SyncFinished {
                peer,
                complete,
                failed,
            } => {
                self.in_step.synced(peer, complete && !failed);
                self.sync.finished(peer, complete, failed, &mut out);
            }
            Input::Leave => self.membership.leave(&mut out, &mut events),
        }
        for event in events {
            match event {
                MemberEvent::Up(member) => {
                    self.broadcast.member_up(member.addr);
                    self.in_step.member_up(member.addr);
                    catch_up = true;
                }
                MemberEvent::Down(member) => {
                    self.broadcast.member_down(member.addr);
                    self.in_step.member_down(member.addr);
                }
            }
            out.push(Action::Member(event));
        }
        if catch_up && !self.in_step.caught_up() {
            // Sync with the members it waits for first, one after another.
            self.sync.catch_up(self.in_step.pending(), &mut out);
        }
        out
    }

    /// Whether a received changeset is new: not held, and not seen recently (it may be on its
    /// way into the store).
    fn first_sight(&mut self, changeset: &Changeset, replica: &dyn Replica) -> bool {
        let key = (
            changeset.site,
            changeset.version,
            changeset.seq_first,
            changeset.seq_last,
        );
        if replica.has(changeset.site, changeset.version) || !self.seen.insert(key) {
            self.duplicates_total += 1;
            return false;
        }
        self.seen_order.push_back(key);
        if self.seen_order.len() > SEEN_MAX
            && let Some(old) = self.seen_order.pop_front()
        {
            self.seen.remove(&old);
        }
        true
    }
}
