//! A deterministic simulator of a cluster: many nodes' real cluster cores ([`Core`]) in one
//! thread, a virtual clock, and a simulated network with latency, loss and partitions.
//!
//! Each node pairs its core with an in-memory model replica that holds sets of versions (the
//! change content lives once, in the simulator). The simulator carries out the cores' actions:
//! packets and pushes travel with a random latency (packets may be lost; pushes, being QUIC
//! streams, arrive unless the path is cut), applies land at once, and sync sessions are answered
//! from the peer's replica with the same `missing`/`plan` functions the real server uses.
//!
//! Everything random comes from one seed, so a failing run replays exactly; tests print it.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use rangemap::RangeInclusiveSet;
use strata_common::cluster::sync::{missing, plan};
use strata_common::cluster::{Action, ClusterConfig, Core, Input, Member, Replica, Timer};
use strata_common::store::{Change, Changeset, SiteId, SiteState, Timestamp, Value};

/// The simulated network.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// One-way latency bounds.
    pub latency_min: Duration,
    /// See `latency_min`.
    pub latency_max: Duration,
    /// Probability that a packet (datagram) is lost.
    pub loss: f64,
    /// How long a client waits for a sync answer that never comes.
    pub sync_timeout: Duration,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            latency_min: Duration::from_micros(200),
            latency_max: Duration::from_millis(2),
            loss: 0.0,
            sync_timeout: Duration::from_secs(2),
        }
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

    fn hold(&mut self, site: SiteId, version: u64) -> bool {
        let set = self.held.entry(site).or_default();
        if set.contains(&version) {
            return false;
        }
        set.insert(version..=version);
        true
    }

    /// How many versions it holds in all.
    pub fn versions(&self) -> u64 {
        self.held
            .values()
            .flat_map(|s| s.iter())
            .map(|r| r.end() - r.start() + 1)
            .sum()
    }
}

struct SimNode {
    core: Core,
    replica: ModelReplica,
    alive: bool,
    /// Bumped when the node restarts, so timers of its previous run are dropped.
    epoch: u64,
    addr: SocketAddr,
    /// Payload copies received by push (first sight or not).
    copies: u64,
}

enum Event {
    Packet {
        to: usize,
        bytes: Bytes,
    },
    Push {
        to: usize,
        from: usize,
        changesets: Arc<Vec<Changeset>>,
    },
    Timer {
        node: usize,
        epoch: u64,
        timer: Timer,
    },
    SyncReply {
        to: usize,
        from: usize,
        changesets: Vec<Changeset>,
        complete: bool,
    },
    SyncFailed {
        to: usize,
        peer: usize,
    },
    Applied {
        node: usize,
        epoch: u64,
        changesets: usize,
    },
}

/// Statistics of a run.
#[derive(Debug, Default, Clone)]
pub struct SimStats {
    /// Packets lost on purpose.
    pub packets_lost: u64,
    /// Messages dropped by a partition or a dead node.
    pub cut: u64,
    /// Packets delivered.
    pub packets: u64,
    /// Pushes delivered.
    pub pushes: u64,
    /// Sync sessions answered.
    pub syncs: u64,
}

/// The simulator.
pub struct Sim {
    now: Duration,
    seq: u64,
    events: BinaryHeap<Reverse<(Duration, u64)>>,
    pending: HashMap<u64, Event>,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    net: NetConfig,
    /// Partition group of each node; messages between groups are cut.
    groups: Option<Vec<u32>>,
    rng: StdRng,
    content: HashMap<(SiteId, u64), Changeset>,
    /// When each version was written, and when each node first held it.
    written: HashMap<(SiteId, u64), Duration>,
    delivered: Vec<Duration>,
    /// Totals.
    pub stats: SimStats,
    config: ClusterConfig,
    seed: u64,
}

fn addr_of(index: usize) -> SocketAddr {
    let ip = Ipv4Addr::new(10, (index >> 16) as u8, (index >> 8) as u8, index as u8);
    SocketAddr::V4(SocketAddrV4::new(ip, 7000))
}

impl Sim {
    /// `nodes` nodes that join through node 0, all started at virtual time zero. With
    /// `known_members`, each node also starts with the full member list (as a node restarting
    /// with a persisted list would), so large clusters skip the join storm.
    pub fn new(
        nodes: usize,
        config: ClusterConfig,
        net: NetConfig,
        seed: u64,
        known_members: bool,
    ) -> Sim {
        let mut sim = Sim {
            now: Duration::ZERO,
            seq: 0,
            events: BinaryHeap::new(),
            pending: HashMap::new(),
            nodes: Vec::with_capacity(nodes),
            by_addr: HashMap::new(),
            net,
            groups: None,
            rng: StdRng::seed_from_u64(seed),
            content: HashMap::new(),
            written: HashMap::new(),
            delivered: Vec::new(),
            stats: SimStats::default(),
            config,
            seed,
        };
        for index in 0..nodes {
            let addr = addr_of(index);
            let mut site = [0u8; 16];
            site[..8].copy_from_slice(&(index as u64 + 1).to_be_bytes());
            let core = Core::new(
                Member {
                    addr,
                    incarnation: 1,
                },
                sim.config.clone(),
                vec![addr_of(0)],
                seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            );
            sim.by_addr.insert(addr, index);
            sim.nodes.push(SimNode {
                core,
                replica: ModelReplica {
                    site: SiteId(site),
                    head: 0,
                    held: HashMap::new(),
                },
                alive: true,
                epoch: 0,
                addr,
                copies: 0,
            });
        }
        let members: Vec<Member> = (0..nodes)
            .map(|i| Member {
                addr: addr_of(i),
                incarnation: 1,
            })
            .collect();
        for index in 0..nodes {
            if known_members {
                sim.input(index, Input::KnownMembers(members.clone()));
            }
            sim.input(index, Input::Start);
        }
        sim
    }

    /// The seed this run replays from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Virtual time now.
    pub fn now(&self) -> Duration {
        self.now
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the simulation has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// How many members node `index` sees alive.
    pub fn live_seen_by(&self, index: usize) -> usize {
        self.nodes[index].core.live_count()
    }

    /// Node `index`'s replica.
    pub fn replica(&self, index: usize) -> &ModelReplica {
        &self.nodes[index].replica
    }

    /// Push copies node `index` received.
    pub fn copies(&self, index: usize) -> u64 {
        self.nodes[index].copies
    }

    /// Splits the nodes into partition groups (`group_of[i]` for node `i`).
    pub fn partition(&mut self, group_of: Vec<u32>) {
        assert_eq!(group_of.len(), self.nodes.len());
        self.groups = Some(group_of);
    }

    /// Heals every partition.
    pub fn heal(&mut self) {
        self.groups = None;
    }

    /// Sets the packet loss probability.
    pub fn set_loss(&mut self, loss: f64) {
        self.net.loss = loss;
    }

    /// Node `index` writes a new version; returns its (site, version).
    pub fn write(&mut self, index: usize) -> (SiteId, u64) {
        let node = &mut self.nodes[index];
        assert!(node.alive, "a dead node does not write");
        node.replica.head += 1;
        let site = node.replica.site;
        let version = node.replica.head;
        let changeset = Changeset {
            site,
            version,
            ts: Timestamp::from_millis(self.now.as_millis() as u64 + 1),
            seq_first: 0,
            seq_last: 0,
            last_seq: 0,
            changes: vec![Change {
                table: "t".into(),
                pk: vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 1],
                column: Some("v".into()),
                value: Value::Integer(version as i64),
                cl: 1,
                seq: 0,
            }],
        };
        node.replica.hold(site, version);
        self.content.insert((site, version), changeset.clone());
        self.written.insert((site, version), self.now);
        self.input(index, Input::Committed(vec![Arc::new(changeset)]));
        (site, version)
    }

    /// Stops node `index` (its messages and timers are dropped from now on).
    pub fn crash(&mut self, index: usize) {
        self.nodes[index].alive = false;
    }

    /// Runs until virtual time `now + duration`.
    pub fn run_for(&mut self, duration: Duration) {
        let end = self.now + duration;
        while let Some(Reverse((at, seq))) = self.events.peek().copied() {
            if at > end {
                break;
            }
            self.events.pop();
            self.now = at;
            if let Some(event) = self.pending.remove(&seq) {
                self.dispatch(event);
            }
        }
        self.now = end;
    }

    /// Runs in steps of `step` until `done` holds or `budget` passes; returns whether it held.
    pub fn run_until(
        &mut self,
        budget: Duration,
        step: Duration,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> bool {
        let end = self.now + budget;
        while self.now < end {
            if done(self) {
                return true;
            }
            self.run_for(step);
        }
        done(self)
    }

    /// Versions written so far.
    pub fn written(&self) -> usize {
        self.written.len()
    }

    /// Nodes (alive) that lack some written version, with how many they lack.
    pub fn lacking(&self) -> Vec<(usize, usize)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.alive)
            .filter_map(|(i, n)| {
                let lack = self
                    .written
                    .keys()
                    .filter(|(s, v)| !n.replica.has(*s, *v))
                    .count();
                (lack > 0).then_some((i, lack))
            })
            .collect()
    }

    /// Delays from a version's write to each of its deliveries (by push, apply or sync).
    pub fn delivery_delays(&self) -> &[Duration] {
        &self.delivered
    }

    fn schedule(&mut self, after: Duration, event: Event) {
        self.seq += 1;
        self.events.push(Reverse((self.now + after, self.seq)));
        self.pending.insert(self.seq, event);
    }

    fn latency(&mut self) -> Duration {
        let min = self.net.latency_min.as_nanos() as u64;
        let max = self.net.latency_max.as_nanos() as u64;
        Duration::from_nanos(if max > min {
            self.rng.random_range(min..=max)
        } else {
            min
        })
    }

    fn reachable(&self, a: usize, b: usize) -> bool {
        self.nodes[b].alive
            && self
                .groups
                .as_ref()
                .is_none_or(|groups| groups[a] == groups[b])
    }

    fn input(&mut self, index: usize, input: Input<'_>) {
        if !self.nodes[index].alive {
            return;
        }
        let node = &mut self.nodes[index];
        let actions = node.core.handle(input, &node.replica);
        self.perform(index, actions);
    }

    fn dispatch(&mut self, event: Event) {
        match event {
            Event::Packet { to, bytes } => {
                self.stats.packets += 1;
                self.input(to, Input::Packet(&bytes));
            }
            Event::Push {
                to,
                from,
                changesets,
            } => {
                self.stats.pushes += 1;
                self.nodes[to].copies += changesets.len() as u64;
                let from = self.nodes[from].addr;
                self.input(
                    to,
                    Input::Received {
                        from,
                        changesets: (*changesets).clone(),
                    },
                );
            }
            Event::Timer { node, epoch, timer } => {
                if self.nodes[node].epoch == epoch {
                    self.input(node, Input::Timer(timer));
                }
            }
            Event::Applied {
                node,
                epoch,
                changesets,
            } => {
                if self.nodes[node].epoch == epoch {
                    self.input(node, Input::Applied { changesets });
                }
            }
            Event::SyncReply {
                to,
                from,
                changesets,
                complete,
            } => {
                self.apply(to, changesets);
                let peer = self.nodes[from].addr;
                self.input(
                    to,
                    Input::SyncFinished {
                        peer,
                        complete,
                        failed: false,
                    },
                );
            }
            Event::SyncFailed { to, peer } => {
                let peer = self.nodes[peer].addr;
                self.input(
                    to,
                    Input::SyncFinished {
                        peer,
                        complete: false,
                        failed: true,
                    },
                );
            }
        }
    }

    fn apply(&mut self, index: usize, changesets: Vec<Changeset>) {
        if !self.nodes[index].alive {
            return;
        }
        for changeset in changesets {
            if self.nodes[index]
                .replica
                .hold(changeset.site, changeset.version)
                && let Some(written) = self.written.get(&(changeset.site, changeset.version))
            {
                self.delivered.push(self.now - *written);
            }
        }
    }

    fn perform(&mut self, index: usize, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Datagram { to, bytes } => {
                    let Some(&to) = self.by_addr.get(&to) else {
                        continue;
                    };
                    if !self.reachable(index, to) {
                        self.stats.cut += 1;
                    } else if self.net.loss > 0.0 && self.rng.random_bool(self.net.loss) {
                        self.stats.packets_lost += 1;
                    } else {
                        let after = self.latency();
                        self.schedule(after, Event::Packet { to, bytes });
                    }
                }
                Action::Push { to, frames, .. } => {
                    let changesets: Arc<Vec<Changeset>> = Arc::new(
                        frames
                            .iter()
                            .flat_map(|f| f.changesets.iter().cloned())
                            .collect(),
                    );
                    for to in to {
                        let Some(&to) = self.by_addr.get(&to) else {
                            continue;
                        };
                        if !self.reachable(index, to) {
                            self.stats.cut += 1;
                            continue;
                        }
                        // A stream survives loss by retransmission: a lost packet costs a round
                        // trip.
                        let mut after = self.latency();
                        if self.net.loss > 0.0 && self.rng.random_bool(self.net.loss) {
                            after += 2 * self.latency() + Duration::from_millis(5);
                        }
                        self.schedule(
                            after,
                            Event::Push {
                                to,
                                from: index,
                                changesets: Arc::clone(&changesets),
                            },
                        );
                    }
                }
                Action::Apply { changesets } => {
                    // Applied at once; the core hears of it as from an apply worker.
                    let count = changesets.len();
                    self.apply(index, changesets);
                    let epoch = self.nodes[index].epoch;
                    self.schedule(
                        Duration::ZERO,
                        Event::Applied {
                            node: index,
                            epoch,
                            changesets: count,
                        },
                    );
                }
                Action::Sync { peer } => {
                    let Some(&peer) = self.by_addr.get(&peer) else {
                        continue;
                    };
                    if !self.reachable(index, peer) {
                        let timeout = self.net.sync_timeout;
                        self.schedule(timeout, Event::SyncFailed { to: index, peer });
                        continue;
                    }
                    self.stats.syncs += 1;
                    let theirs = self.nodes[index].replica.states();
                    let ours = self.nodes[peer].replica.states();
                    let config = self.nodes[peer].core.sync_config().clone();
                    let (windows, complete) =
                        plan(&missing(&ours, &theirs), config.session_versions_max, 1_000);
                    let changesets: Vec<Changeset> = windows
                        .iter()
                        .flat_map(|(site, range)| range.clone().map(move |v| (*site, v)))
                        .filter_map(|key| self.content.get(&key).cloned())
                        .collect();
                    let after = self.latency() + self.latency();
                    self.schedule(
                        after,
                        Event::SyncReply {
                            to: index,
                            from: peer,
                            changesets,
                            complete,
                        },
                    );
                }
                Action::Schedule { after, timer } => {
                    let epoch = self.nodes[index].epoch;
                    self.schedule(
                        after,
                        Event::Timer {
                            node: index,
                            epoch,
                            timer,
                        },
                    );
                }
                Action::Member(_) => {}
            }
        }
    }
}
