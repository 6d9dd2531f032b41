//! The cluster core: membership, broadcast and anti-entropy as one sans-IO state machine.
//!
//! Inputs come in through [`Core::handle`]; what to do comes out as [`Action`]s, which the tokio
//! driver (`strata-common`'s `cluster::driver`) carries out on the network and the store, and
//! which the simulator in `tests/` carries out on a simulated network and in-memory replicas.
//! The core reads no clock, does no I/O, and draws every random choice from one seeded RNG, so a
//! simulation replays exactly from its seed.
//!
//! The order of actions within one call is the order they were produced; the driver performs
//! them in that order.
//!
//! Received changes are accounted here and nowhere else: a changeset counts as seen while it is
//! held or on its way into the store (handed out in an [`Action::Apply`] and not yet reported
//! back with [`Input::Applied`]). At most [`APPLY_INFLIGHT_MAX`] changesets are on their way;
//! beyond that a received batch is dropped without being marked seen (counted in
//! [`Core::apply_dropped_total`]), so a later copy, or anti-entropy, delivers it.

use std::collections::{HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};

use crate::broadcast::{Broadcaster, Strategy};
use crate::instep::{InStep, StepStatus};
use crate::membership::{Member, MemberEvent, Membership, MembershipConfig};
use crate::message::Changes;
use crate::pack::PackLimits;
use crate::sync::{AntiEntropy, SyncConfig};
use strata_types::{Changeset, SiteId};

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

/// Changesets handed to the apply worker and not yet reported applied, at most: bounds the
/// memory queued ahead of the store (about what the driver's former queue of 1,024 pushes held).
/// Below `SEEN_MAX`, so a changeset on its way is still remembered as seen.
pub const APPLY_INFLIGHT_MAX: usize = 16_384;

/// What the core needs to know about the local replica.
pub trait Replica {
    /// Whether version `version` of `site` is held completely.
    fn has(&self, site: SiteId, version: u64) -> bool;
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
    /// The apply worker finished changesets handed out in [`Action::Apply`] (applied, rejected
    /// or failed): they are no longer on their way.
    Applied {
        /// How many changesets.
        changesets: usize,
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
    /// Push the same frames to each of these members (one uni stream each): one broadcast.
    Push {
        /// The members' addresses.
        to: Vec<SocketAddr>,
        /// The frames, packed (not encoded: the frame header belongs to the transport).
        frames: Vec<Arc<Changes>>,
        /// How many changesets the frames carry, counted before chunking.
        changesets: usize,
    },
    /// Apply changesets to the local store; report back with [`Input::Applied`] once done.
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
    seen: HashSet<SeenKey>,
    seen_order: VecDeque<SeenKey>,
    rng: StdRng,
    /// Changesets dropped as duplicates before reaching the store.
    duplicates_total: u64,
    /// Changesets handed out in `Apply` and not yet reported applied.
    apply_inflight: usize,
    /// Changesets dropped because too many were on their way into the store.
    apply_dropped_total: u64,
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
            apply_inflight: 0,
            apply_dropped_total: 0,
        }
    }

    /// How pushes are packed (the store's chunk size, the push frame size); the defaults are
    /// [`PackLimits::default`].
    pub fn packing(mut self, limits: PackLimits) -> Core {
        self.broadcast.set_limits(limits);
        self
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

    /// Changesets dropped before the store saw them because [`APPLY_INFLIGHT_MAX`] were already
    /// on their way; anti-entropy delivers them.
    pub fn apply_dropped_total(&self) -> u64 {
        self.apply_dropped_total
    }

    /// Changesets handed out in `Apply` and not yet reported applied.
    pub fn apply_inflight(&self) -> usize {
        self.apply_inflight
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
                self.broadcast.local(local.iter().map(|c| &**c), &mut out);
            }
            Input::Received { from, changesets } => {
                self.received(from, changesets, replica, &mut out)
            }
            Input::Applied { changesets } => {
                self.apply_inflight = self.apply_inflight.saturating_sub(changesets);
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

    /// Changesets pushed by `from`: what is new is handed to the store (and forwarded if the
    /// strategy says so), unless too much is on its way already; then the batch is dropped
    /// unmarked, for a later copy or anti-entropy to deliver.
    fn received(
        &mut self,
        from: SocketAddr,
        changesets: Vec<Changeset>,
        replica: &dyn Replica,
        out: &mut Vec<Action>,
    ) {
        let mut fresh: Vec<Changeset> = Vec::with_capacity(changesets.len());
        let mut in_batch: HashSet<SeenKey> = HashSet::new();
        for changeset in changesets {
            let key = seen_key(&changeset);
            // A second copy within one batch is a duplicate too.
            if replica.has(changeset.site, changeset.version)
                || self.seen.contains(&key)
                || !in_batch.insert(key)
            {
                self.duplicates_total += 1;
            } else {
                fresh.push(changeset);
            }
        }
        if fresh.is_empty() {
            return;
        }
        // One batch alone is always taken (a frame bounds it), so an oversized push cannot
        // starve forever.
        if self.apply_inflight > 0 && self.apply_inflight + fresh.len() > APPLY_INFLIGHT_MAX {
            self.apply_dropped_total += fresh.len() as u64;
            return;
        }
        for changeset in &fresh {
            self.mark_seen(seen_key(changeset));
        }
        self.apply_inflight += fresh.len();
        self.broadcast.received(from, &fresh, &mut self.rng, out);
        out.push(Action::Apply { changesets: fresh });
    }

    /// Remembers a changeset as seen (it is on its way into the store), forgetting the oldest
    /// beyond `SEEN_MAX`.
    fn mark_seen(&mut self, key: SeenKey) {
        if !self.seen.insert(key) {
            return;
        }
        self.seen_order.push_back(key);
        if self.seen_order.len() > SEEN_MAX
            && let Some(old) = self.seen_order.pop_front()
        {
            self.seen.remove(&old);
        }
    }
}

/// What identifies a received changeset: its version and the seqs it covers.
type SeenKey = (SiteId, u64, u32, u32);

fn seen_key(changeset: &Changeset) -> SeenKey {
    (
        changeset.site,
        changeset.version,
        changeset.seq_first,
        changeset.seq_last,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use strata_types::{Change, Timestamp, Value};

    /// A replica holding nothing.
    struct Empty;

    impl Replica for Empty {
        fn has(&self, _: SiteId, _: u64) -> bool {
            false
        }
    }

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 7000))
    }

    fn member(n: u8) -> Member {
        Member {
            addr: addr(n),
            incarnation: 1,
        }
    }

    fn changeset(version: u64) -> Changeset {
        Changeset {
            site: SiteId([9; 16]),
            version,
            ts: Timestamp::default(),
            seq_first: 0,
            seq_last: 0,
            last_seq: 0,
            changes: vec![Change {
                table: "t".into(),
                pk: vec![0],
                column: Some("c".into()),
                value: Value::Integer(version as i64),
                cl: 1,
                seq: 0,
            }],
        }
    }

    fn core() -> Core {
        Core::new(member(1), ClusterConfig::default(), Vec::new(), 7)
    }

    fn receive(core: &mut Core, versions: std::ops::RangeInclusive<u64>) -> Vec<Action> {
        core.handle(
            Input::Received {
                from: addr(2),
                changesets: versions.map(changeset).collect(),
            },
            &Empty,
        )
    }

    fn applied(actions: &[Action]) -> Vec<u64> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::Apply { changesets } => Some(changesets.iter().map(|c| c.version)),
                _ => None,
            })
            .flatten()
            .collect()
    }

    #[test]
    fn a_received_changeset_is_applied_once_and_a_later_copy_is_a_duplicate() {
        let mut core = core();
        assert_eq!(applied(&receive(&mut core, 1..=3)), vec![1, 2, 3]);
        assert_eq!(core.apply_inflight(), 3);
        assert!(applied(&receive(&mut core, 2..=3)).is_empty());
        assert_eq!(core.duplicates_total(), 2);
        core.handle(Input::Applied { changesets: 3 }, &Empty);
        assert_eq!(core.apply_inflight(), 0);
    }

    #[test]
    fn over_the_in_flight_bound_a_batch_is_dropped_unmarked_and_a_later_copy_is_applied() {
        let mut core = core();
        let max = APPLY_INFLIGHT_MAX as u64;
        assert_eq!(
            applied(&receive(&mut core, 1..=max)).len(),
            APPLY_INFLIGHT_MAX
        );
        // The store has not reported back: the next batch would go over the bound.
        assert!(applied(&receive(&mut core, max + 1..=max + 2)).is_empty());
        assert_eq!(core.apply_dropped_total(), 2);
        assert_eq!(core.duplicates_total(), 0);
        assert_eq!(core.apply_inflight(), APPLY_INFLIGHT_MAX);
        // Once the worker reports, the same versions arrive again and are not duplicates.
        core.handle(
            Input::Applied {
                changesets: APPLY_INFLIGHT_MAX,
            },
            &Empty,
        );
        assert_eq!(
            applied(&receive(&mut core, max + 1..=max + 2)),
            vec![max + 1, max + 2]
        );
        assert_eq!(core.duplicates_total(), 0);
        assert_eq!(core.apply_dropped_total(), 2);
    }

    #[test]
    fn a_second_copy_within_one_batch_is_a_duplicate() {
        let mut core = core();
        let actions = core.handle(
            Input::Received {
                from: addr(2),
                changesets: vec![changeset(1), changeset(1)],
            },
            &Empty,
        );
        assert_eq!(applied(&actions), vec![1]);
        assert_eq!(core.duplicates_total(), 1);
        assert_eq!(core.apply_inflight(), 1);
    }

    #[test]
    fn a_local_commit_is_one_push_naming_every_live_member() {
        let mut core = core();
        core.handle(
            Input::KnownMembers(vec![member(2), member(3), member(4)]),
            &Empty,
        );
        let actions = core.handle(
            Input::Committed(vec![Arc::new(changeset(1)), Arc::new(changeset(2))]),
            &Empty,
        );
        let pushes: Vec<&Action> = actions
            .iter()
            .filter(|a| matches!(a, Action::Push { .. }))
            .collect();
        assert_eq!(pushes.len(), 1, "{actions:?}");
        let Action::Push {
            to,
            frames,
            changesets,
        } = pushes[0]
        else {
            unreachable!()
        };
        assert_eq!(to, &vec![addr(2), addr(3), addr(4)]);
        assert_eq!(*changesets, 2);
        assert_eq!(frames.len(), 1);
        assert_eq!(frames[0].changesets, vec![changeset(1), changeset(2)]);
    }
}
