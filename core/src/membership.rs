//! Membership: SWIM (foca) behind a small sans-IO wrapper.
//!
//! A member's identity is its gossip address plus an incarnation, the wall-clock milliseconds
//! when its node started: a restarted node on the same address wins the address conflict, so its
//! old identity is replaced at once instead of lingering until probed down. Identities are small
//! and fixed-size because they ride in every packet.
//!
//! When every known member is gone (foca reports `Idle`; it will not rejoin by itself), the node
//! announces itself to its seeds again, with a bounded, jittered backoff.
//!
//! No I/O: packets to send and timers to set come out as [`Action`]s; time comes in as `now`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::num::{NonZeroU8, NonZeroUsize};
use std::time::Duration;

use foca::{AccumulatingRuntime, Foca, NoCustomBroadcast, OwnedNotification, PostcardCodec};
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::machine::{Action, Timer};

/// A member's identity: where it listens, and which run of its node this is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Member {
    /// The member's gossip (QUIC) address.
    pub addr: SocketAddr,
    /// The node's start time in wall-clock milliseconds, bumped on every rejoin.
    pub incarnation: u64,
}

impl foca::Identity for Member {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        Some(Member {
            addr: self.addr,
            incarnation: self.incarnation + 1,
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, other: &Self) -> bool {
        self.incarnation > other.incarnation
    }
}

/// Failure detection and dissemination settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MembershipConfig {
    /// How often a random member is probed, ms.
    pub probe_period_ms: u64,
    /// How long to wait for a direct probe reply before asking others to probe, ms.
    pub probe_rtt_ms: u64,
    /// How long a suspect member has to refute the suspicion before it is declared down, ms.
    pub suspect_to_down_ms: u64,
    /// How often membership updates are gossiped, ms.
    pub gossip_period_ms: u64,
    /// Members each gossip round goes to.
    pub gossip_fanout: usize,
    /// Largest SWIM packet, bytes: must fit a QUIC datagram (about 1160 bytes before path MTU
    /// discovery) with the transport's 2-byte header.
    pub packet_bytes_max: usize,
    /// How often a few members believed down are asked whether they are back, ms. After a
    /// partition heals this is what merges the two sides' views again.
    pub announce_down_period_ms: u64,
    /// How many down members each such round asks.
    pub announce_down_members: usize,
    /// How long a restarted node waits for every member it knew before it stopped to be live
    /// again before it counts as joined anyway (some may be gone for good), ms. Live members
    /// answer its announcement within a round trip, so this only matters when one is down.
    pub rejoin_wait_ms: u64,
    /// Backoff bounds for re-announcing to the seeds when no member is left, ms.
    pub reannounce_min_ms: u64,
    /// See `reannounce_min_ms`.
    pub reannounce_max_ms: u64,
}

impl Default for MembershipConfig {
    fn default() -> Self {
        // Tuned for a region on a fast network: a dead node is suspected within about a probe
        // period and declared down 2.5 s later, inside the 5 s detection goal, while a node
        // starved of CPU for a second or two still has time to refute.
        MembershipConfig {
            probe_period_ms: 500,
            probe_rtt_ms: 200,
            suspect_to_down_ms: 2_500,
            gossip_period_ms: 200,
            gossip_fanout: 3,
            packet_bytes_max: 1_100,
            announce_down_period_ms: 2_000,
            announce_down_members: 3,
            rejoin_wait_ms: 2_000,
            reannounce_min_ms: 500,
            reannounce_max_ms: 10_000,
        }
    }
}

impl MembershipConfig {
    fn foca(&self, cluster_size: usize) -> foca::Config {
        let mut config = foca::Config::new_lan(
            std::num::NonZeroU32::new(u32::try_from(cluster_size.max(1)).unwrap_or(u32::MAX))
                .unwrap_or(std::num::NonZeroU32::MIN),
        );
        config.probe_period = Duration::from_millis(self.probe_period_ms.max(2));
        config.probe_rtt =
            Duration::from_millis(self.probe_rtt_ms.clamp(1, self.probe_period_ms.max(2) - 1));
        config.suspect_to_down_after = Duration::from_millis(self.suspect_to_down_ms.max(1));
        config.max_packet_size =
            NonZeroUsize::new(self.packet_bytes_max.max(256)).unwrap_or(NonZeroUsize::MIN);
        // Forget a down identity after an hour: bounds memory under churn (foca issue #31).
        config.remove_down_after = Some(Duration::from_secs(3600));
        config.periodic_gossip = Some(foca::PeriodicParams {
            frequency: Duration::from_millis(self.gossip_period_ms.max(1)),
            num_members: NonZeroUsize::new(self.gossip_fanout.max(1)).unwrap_or(NonZeroUsize::MIN),
        });
        config.max_transmissions =
            NonZeroU8::new(max_transmissions(cluster_size)).unwrap_or(NonZeroU8::MIN);
        config.periodic_announce_to_down_members = Some(foca::PeriodicParams {
            frequency: Duration::from_millis(self.announce_down_period_ms.max(1)),
            num_members: NonZeroUsize::new(self.announce_down_members.max(1))
                .unwrap_or(NonZeroUsize::MIN),
        });
        config
    }
}

/// SWIM's retransmission count for updates: 4 * log10(n + 1), at least 4.
fn max_transmissions(cluster_size: usize) -> u8 {
    let n = cluster_size as f64 + 1.0;
    (4.0 * n.log10()).ceil().clamp(4.0, 20.0) as u8
}

/// A change in who is alive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberEvent {
    /// A member is alive (new, or back).
    Up(Member),
    /// A member was declared down.
    Down(Member),
}

/// The membership state machine.
pub struct Membership {
    foca: Foca<Member, PostcardCodec, StdRng, NoCustomBroadcast>,
    runtime: AccumulatingRuntime<Member>,
    config: MembershipConfig,
    seeds: Vec<SocketAddr>,
    /// Members currently alive, by address.
    live: BTreeMap<SocketAddr, Member>,
    /// The cluster size foca's settings were last derived for.
    sized_for: usize,
    /// Current re-announce backoff, ms; `None` while members are known.
    reannounce_ms: Option<u64>,
    /// Generation of the re-announce timer, so a stale one is ignored.
    reannounce_generation: u64,
    /// Whether this member is leaving (being declared down is then expected).
    leaving: bool,
    rng: StdRng,
}

impl Membership {
    /// A member `me` that will join through `seeds`.
    pub fn new(
        me: Member,
        config: MembershipConfig,
        seeds: Vec<SocketAddr>,
        seed: u64,
    ) -> Membership {
        let foca = Foca::new(
            me,
            config.foca(1),
            StdRng::seed_from_u64(seed),
            PostcardCodec,
        );
        let seeds = seeds.into_iter().filter(|s| *s != me.addr).collect();
        Membership {
            foca,
            runtime: AccumulatingRuntime::new(),
            config,
            seeds,
            live: BTreeMap::new(),
            sized_for: 1,
            reannounce_ms: None,
            reannounce_generation: 0,
            leaving: false,
            rng: StdRng::seed_from_u64(seed ^ 0x5eed),
        }
    }

    /// This member's current identity.
    pub fn me(&self) -> Member {
        *self.foca.identity()
    }

    /// Members currently alive (not counting this one), in address order.
    pub fn live(&self) -> impl Iterator<Item = &Member> {
        self.live.values()
    }

    /// How many members are alive (not counting this one).
    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    /// Whether `addr` is a live member.
    pub fn is_live(&self, addr: &SocketAddr) -> bool {
        self.live.contains_key(addr)
    }

    /// SWIM updates waiting to be disseminated (a gauge).
    pub fn updates_backlog(&self) -> usize {
        self.foca.updates_backlog()
    }

    /// Whether there is anyone to announce to.
    pub fn has_seeds(&self) -> bool {
        !self.seeds.is_empty()
    }

    /// Adds addresses to announce to (and re-announce to when every member is gone).
    pub fn add_seeds(&mut self, addrs: &[SocketAddr]) {
        let me = self.me().addr;
        for addr in addrs {
            if *addr != me && !self.seeds.contains(addr) {
                self.seeds.push(*addr);
            }
        }
    }

    /// Announces this member to its seeds.
    pub fn join(&mut self, out: &mut Vec<Action>, events: &mut Vec<MemberEvent>) {
        for seed in self.seeds.clone() {
            let _ = self.foca.announce(
                Member {
                    addr: seed,
                    incarnation: 0,
                },
                &mut self.runtime,
            );
        }
        if self.live.is_empty() && !self.seeds.is_empty() {
            self.schedule_reannounce(out);
        }
        self.drain(out, events);
    }

    /// Adds members known from elsewhere (a persisted member list, or a simulation's set-up) as
    /// alive, without announcing them; probing sorts out the ones that are gone.
    pub fn assume(
        &mut self,
        members: Vec<Member>,
        out: &mut Vec<Action>,
        events: &mut Vec<MemberEvent>,
    ) {
        let me = self.me();
        let members = members
            .into_iter()
            .filter(|m| m.addr != me.addr)
            .map(foca::Member::alive);
        if let Err(err) = self.foca.apply_many(members, false, &mut self.runtime) {
            tracing::warn!(error = %err, "could not add known members");
        }
        self.drain(out, events);
    }

    /// Handles a SWIM packet.
    pub fn handle_packet(
        &mut self,
        bytes: &[u8],
        out: &mut Vec<Action>,
        events: &mut Vec<MemberEvent>,
    ) {
        if let Err(err) = self.foca.handle_data(bytes, &mut self.runtime) {
            tracing::debug!(error = %err, "dropped a SWIM packet");
        }
        self.drain(out, events);
    }

    /// Handles a timer this module scheduled.
    pub fn handle_timer(
        &mut self,
        timer: foca::Timer<Member>,
        out: &mut Vec<Action>,
        events: &mut Vec<MemberEvent>,
    ) {
        if let Err(err) = self.foca.handle_timer(timer, &mut self.runtime) {
            tracing::debug!(error = %err, "SWIM timer failed");
        }
        self.drain(out, events);
    }

    /// Handles the re-announce timer.
    pub fn handle_reannounce(
        &mut self,
        generation: u64,
        out: &mut Vec<Action>,
        events: &mut Vec<MemberEvent>,
    ) {
        if generation != self.reannounce_generation || self.reannounce_ms.is_none() {
            return;
        }
        if !self.live.is_empty() {
            self.reannounce_ms = None;
            return;
        }
        tracing::info!(
            seeds = self.seeds.len(),
            "no live members; announcing to seeds again"
        );
        for seed in self.seeds.clone() {
            let _ = self.foca.announce(
                Member {
                    addr: seed,
                    incarnation: 0,
                },
                &mut self.runtime,
            );
        }
        self.schedule_reannounce(out);
        self.drain(out, events);
    }

    /// Leaves the cluster gracefully: members learn at once instead of by probing.
    pub fn leave(&mut self, out: &mut Vec<Action>, events: &mut Vec<MemberEvent>) {
        self.leaving = true;
        let _ = self.foca.leave_cluster(&mut self.runtime);
        self.drain(out, events);
    }

    fn schedule_reannounce(&mut self, out: &mut Vec<Action>) {
        let current = self.reannounce_ms.unwrap_or(self.config.reannounce_min_ms);
        let next = (current * 2).min(self.config.reannounce_max_ms);
        self.reannounce_ms = Some(next);
        self.reannounce_generation += 1;
        // Jitter: a cluster that lost every member does not re-announce in lockstep.
        let jitter = self.rng.random_range(0..=current / 2);
        out.push(Action::Schedule {
            after: Duration::from_millis(current + jitter),
            timer: Timer::Reannounce(self.reannounce_generation),
        });
    }

    fn drain(&mut self, out: &mut Vec<Action>, events: &mut Vec<MemberEvent>) {
        while let Some((to, bytes)) = self.runtime.to_send() {
            out.push(Action::Datagram { to: to.addr, bytes });
        }
        while let Some((after, timer)) = self.runtime.to_schedule() {
            out.push(Action::Schedule {
                after,
                timer: Timer::Swim(timer),
            });
        }
        let mut went_idle = false;
        while let Some(notification) = self.runtime.to_notify() {
            match notification {
                OwnedNotification::MemberUp(member) => {
                    if let Some(previous) = self.live.insert(member.addr, member)
                        && previous != member
                    {
                        events.push(MemberEvent::Down(previous));
                    }
                    events.push(MemberEvent::Up(member));
                }
                OwnedNotification::MemberDown(member)
                    if self.live.get(&member.addr) == Some(&member) =>
                {
                    self.live.remove(&member.addr);
                    events.push(MemberEvent::Down(member));
                }
                // A restarted node replaced its old identity: the old one is gone now.
                OwnedNotification::Rename(old, new) if self.live.remove(&old.addr).is_some() => {
                    events.push(MemberEvent::Down(old));
                    self.live.insert(new.addr, new);
                    events.push(MemberEvent::Up(new));
                }
                OwnedNotification::Idle => went_idle = true,
                OwnedNotification::Rejoin(me) => {
                    tracing::warn!(
                        incarnation = me.incarnation,
                        "declared down by the cluster; rejoined"
                    );
                }
                OwnedNotification::Defunct if !self.leaving => {
                    tracing::error!("declared down and could not rejoin");
                }
                _ => {}
            }
        }
        if went_idle
            && self.live.is_empty()
            && self.reannounce_ms.is_none()
            && !self.seeds.is_empty()
        {
            self.schedule_reannounce(out);
        }
        if !self.live.is_empty() {
            self.reannounce_ms = None;
        }
        self.resize();
    }

    /// Re-derives foca's settings when the cluster size moved enough to change them.
    fn resize(&mut self) {
        let size = self.live.len() + 1;
        if max_transmissions(size) != max_transmissions(self.sized_for) {
            if let Err(err) = self.foca.set_config(self.config.foca(size)) {
                tracing::warn!(error = %err, "could not resize SWIM settings");
            }
            self.sized_for = size;
        }
    }
}
