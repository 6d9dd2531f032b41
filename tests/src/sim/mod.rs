//! A deterministic simulator of a region: many nodes' real protocol code in one thread, a
//! clock that jumps from event to event, and a simulated network with latency, loss,
//! partitions, crashes and restarts.
//!
//! Each node runs the real cluster [`Core`] and the real region publisher
//! (`strata_regional::publish::logic::Publisher`) against an in-memory replica
//! ([`replica::ModelReplica`]); the content of each version lives once, in the ledger. The
//! simulator carries out their actions: packets and pushes travel with a random latency
//! ([`network`]), the core's pushes go frame by frame, applies wait in a queue and take time
//! ([`apply`]; the core bounds what is on its way and hears when it is applied), sync sessions run
//! the real session state machines against the replicas ([`session`]), and
//! publishes go to a simulated globald ([`publisher`]). Time is the event queue ([`clock`]).
//!
//! [`checkers`] run at every apply and stop the run at the first broken invariant, naming the
//! seed, the time, the node and the version. Everything random comes from one seed, so a failing
//! run replays exactly: tests print it, and `SIM_SEED=<n>` replays it ([`scenario`]).

pub mod apply;
pub mod checkers;
pub mod clock;
pub mod network;
pub mod publisher;
pub mod replica;
pub mod scenario;
pub mod session;

use std::collections::{BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use strata_common::store::{Change, Changeset, SiteId, Timestamp, Value};
use strata_core::message::{self, Changes, SyncReply, SyncRequest};
use strata_core::session::{Fetch as Fetched, Fetching, Outcome, Serving};
use strata_core::{Action, ClusterConfig, Core, Input, Member, PackLimits, Replica, Timer};
use strata_regional::publish::logic::{
    self, AppMap, Input as PubInput, Publication, Publisher, Timer as PubTimer,
};

use self::apply::{ApplyConfig, ApplyQueue};
use self::checkers::{Checker, Violation};
pub use self::network::NetConfig;
use self::network::Network;
use self::publisher::{Globald, PublishConfig};
use self::replica::{Ledger, ModelReplica, Written};

/// Time between two frames of one sync session on the wire.
const FRAME_GAP: Duration = Duration::from_micros(100);

/// Everything a simulation is set up with, besides its node count and seed.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The cluster cores' settings.
    pub cluster: ClusterConfig,
    /// The network.
    pub net: NetConfig,
    /// The apply queues.
    pub apply: ApplyConfig,
    /// Run a publisher on each node (`None`: no publishing).
    pub publish: Option<PublishConfig>,
    /// Each node starts with the full member list (as a node restarting with a persisted list
    /// would), so large clusters skip the join storm.
    pub known_members: bool,
    /// Apps the writes are spread over.
    pub apps: usize,
}

impl Default for SimConfig {
    fn default() -> Self {
        SimConfig {
            cluster: ClusterConfig::default(),
            net: NetConfig::default(),
            apply: ApplyConfig::default(),
            publish: None,
            known_members: false,
            apps: 5,
        }
    }
}

/// A client sync session under way.
#[derive(Debug)]
struct Fetch {
    session: u64,
    peer: usize,
    /// The real client session.
    fetching: Fetching,
    /// A frame was cut: the rest are ignored and the session times out.
    broken: bool,
}

struct SimNode {
    core: Core,
    replica: ModelReplica,
    alive: bool,
    /// Bumped when the node crashes, so events of its previous run are dropped.
    epoch: u64,
    incarnation: u64,
    addr: SocketAddr,
    /// Payload copies received by push (first sight or not).
    copies: u64,
    fetching: Option<Fetch>,
    /// Sync sessions being served.
    serving: usize,
    /// Fault: answer every sync request `Busy`.
    busy: bool,
    apply: ApplyQueue,
    publisher: Option<Publisher>,
}

enum Event {
    Packet {
        to: usize,
        bytes: bytes::Bytes,
    },
    Push {
        to: usize,
        from: usize,
        frame: Arc<Changes>,
    },
    Timer {
        node: usize,
        epoch: u64,
        timer: Timer,
    },
    SyncRequest {
        server: usize,
        client: usize,
        session: u64,
        request: SyncRequest,
    },
    SyncFrame {
        client: usize,
        server: usize,
        server_epoch: u64,
        session: u64,
        reply: SyncReply,
    },
    SyncTimeout {
        client: usize,
        session: u64,
    },
    ServeDone {
        node: usize,
        epoch: u64,
    },
    ApplyDone {
        node: usize,
        epoch: u64,
    },
    PubTimer {
        node: usize,
        epoch: u64,
        timer: PubTimer,
    },
    Derived {
        node: usize,
        epoch: u64,
    },
    AtGlobald {
        node: usize,
        epoch: u64,
        publication: Publication,
    },
    PublishAck {
        node: usize,
        epoch: u64,
        ok: bool,
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
    /// Bytes of encoded push frames (with `NetConfig::encode`).
    pub push_bytes: u64,
    /// Sync sessions started by clients.
    pub syncs: u64,
    /// Sync requests answered `Busy`.
    pub syncs_busy: u64,
    /// Sync sessions that failed (cut, dead peer).
    pub syncs_failed: u64,
    /// Sync frames of changes delivered.
    pub sync_frames: u64,
    /// Bytes of encoded sync frames (with `NetConfig::encode`).
    pub sync_bytes: u64,
    /// Changesets the cores dropped over their in-flight bound, by cores since replaced.
    apply_dropped_before: u64,
    /// Changesets lost in apply queues by crashes.
    pub apply_lost: u64,
    /// Changesets that reached the replica already held (skipped, as the store skips them).
    pub apply_skipped: u64,
    /// Restarts.
    pub restarts: u64,
    /// Publishes sent to globald.
    pub publishes: u64,
}

/// The simulator.
pub struct Sim {
    clock: clock::Clock<Event>,
    /// The instant virtual time zero stands for (the publisher counts in `Instant`s).
    base: Instant,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    net: Network,
    rng: StdRng,
    ledger: Ledger,
    delivered: Vec<Duration>,
    checker: Checker,
    violation: Option<Violation>,
    globald: Globald,
    next_session: u64,
    /// Totals.
    pub stats: SimStats,
    config: SimConfig,
    seed: u64,
}

fn addr_of(index: usize) -> SocketAddr {
    let ip = Ipv4Addr::new(10, (index >> 16) as u8, (index >> 8) as u8, index as u8);
    SocketAddr::V4(SocketAddrV4::new(ip, 7000))
}

fn core_seed(seed: u64, index: usize, incarnation: u64) -> u64 {
    seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ incarnation.rotate_left(32)
}

impl Sim {
    /// `nodes` nodes that join through node 0, all started at virtual time zero.
    pub fn new(nodes: usize, config: SimConfig, seed: u64) -> Sim {
        let mut sim = Sim {
            clock: clock::Clock::default(),
            base: Instant::now(),
            nodes: Vec::with_capacity(nodes),
            by_addr: HashMap::new(),
            net: Network::new(config.net.clone(), seed),
            rng: StdRng::seed_from_u64(seed),
            ledger: Ledger::default(),
            delivered: Vec::new(),
            checker: Checker::default(),
            violation: None,
            globald: Globald::default(),
            next_session: 0,
            stats: SimStats::default(),
            config,
            seed,
        };
        for index in 0..nodes {
            let addr = addr_of(index);
            let mut site = [0u8; 16];
            site[..8].copy_from_slice(&(index as u64 + 1).to_be_bytes());
            let core = sim.core(index, 1, Vec::new());
            sim.by_addr.insert(addr, index);
            let publisher = sim.publisher(index, 1);
            sim.nodes.push(SimNode {
                core,
                replica: ModelReplica::new(SiteId(site)),
                alive: true,
                epoch: 0,
                incarnation: 1,
                addr,
                copies: 0,
                fetching: None,
                serving: 0,
                busy: false,
                apply: ApplyQueue::default(),
                publisher,
            });
        }
        let members: Vec<Member> = (0..nodes)
            .map(|i| Member {
                addr: addr_of(i),
                incarnation: 1,
            })
            .collect();
        for index in 0..nodes {
            if sim.config.known_members {
                sim.input(index, Input::KnownMembers(members.clone()));
            }
            sim.input(index, Input::Start);
            sim.feed_members(index);
        }
        sim
    }

    fn core(&self, index: usize, incarnation: u64, known: Vec<SocketAddr>) -> Core {
        let me = Member {
            addr: addr_of(index),
            incarnation,
        };
        let core = Core::new(
            me,
            self.config.cluster.clone(),
            vec![addr_of(0)],
            core_seed(self.seed, index, incarnation),
        )
        .packing(PackLimits::default());
        if known.is_empty() {
            core
        } else {
            core.knowing(known)
        }
    }

    fn publisher(&self, index: usize, incarnation: u64) -> Option<Publisher> {
        let config = self.config.publish.as_ref()?;
        Some(Publisher::new(
            publisher::name(index),
            config.settings.clone(),
            core_seed(self.seed, index, incarnation).rotate_left(7),
        ))
    }

    /// The seed this run replays from.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Virtual time now.
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    /// The number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the simulation has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Whether node `index` is up.
    pub fn alive(&self, index: usize) -> bool {
        self.nodes[index].alive
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

    /// Changesets the cores dropped over their in-flight apply bound (sync fetches them).
    pub fn apply_dropped(&self) -> u64 {
        self.stats.apply_dropped_before
            + self
                .nodes
                .iter()
                .filter(|n| n.alive)
                .map(|n| n.core.apply_dropped_total())
                .sum::<u64>()
    }

    /// The first broken invariant, if any (the run stopped there).
    pub fn violation(&self) -> Option<&Violation> {
        self.violation.as_ref()
    }

    /// The simulated globald.
    pub fn globald(&self) -> &Globald {
        &self.globald
    }

    /// Splits the nodes into partition groups (`group_of[i]` for node `i`).
    pub fn partition(&mut self, group_of: Vec<u32>) {
        assert_eq!(group_of.len(), self.nodes.len());
        self.net.partition(group_of);
    }

    /// Heals every partition.
    pub fn heal(&mut self) {
        self.net.heal();
    }

    /// Whether a partition is in place.
    pub fn partitioned(&self) -> bool {
        self.net.partitioned()
    }

    /// Sets the packet loss probability.
    pub fn set_loss(&mut self, loss: f64) {
        self.net.config.loss = loss;
    }

    /// Makes node `index` answer every sync request `Busy` (or stop doing so).
    pub fn set_busy(&mut self, index: usize, busy: bool) {
        self.nodes[index].busy = busy;
    }

    /// Node `index` writes a new version, of a random app; returns its (site, version).
    pub fn write(&mut self, index: usize) -> (SiteId, u64) {
        let app = format!("app-{}", self.rng.random_range(0..self.config.apps.max(1)));
        let now = self.now();
        let node = &mut self.nodes[index];
        assert!(node.alive, "a dead node does not write");
        let site = node.replica.site();
        let version = node.replica.next_local();
        let changeset = Arc::new(Changeset {
            site,
            version,
            ts: Timestamp::from_millis(now.as_millis() as u64 + 1),
            seq_first: 0,
            seq_last: 0,
            last_seq: 0,
            changes: vec![Change {
                table: "machines".into(),
                pk: vec![1, 1, 0, 0, 0, 0, 0, 0, 0, 1],
                column: Some("app".into()),
                value: Value::Text(app.clone()),
                cl: 1,
                seq: 0,
            }],
        });
        self.ledger.record(Written {
            changeset: Arc::clone(&changeset),
            at: now,
            app,
        });
        if let Err(what) = self
            .checker
            .on_applied(index, [site], &self.nodes[index].replica)
        {
            self.fail(index, what);
        }
        self.input(index, Input::Committed(vec![changeset]));
        self.publisher_input(index, PubInput::Changed);
        (site, version)
    }

    /// Node `index` receives `changesets` pushed by node `from` now, whatever they are (for
    /// tests of the checkers: a forged version must stop the run).
    pub fn receive(&mut self, index: usize, from: usize, changesets: Vec<Changeset>) {
        self.dispatch(Event::Push {
            to: index,
            from,
            frame: Arc::new(Changes { changesets }),
        });
    }

    /// Stops node `index`: its timers, queued applies, sessions and publisher are lost; its
    /// replica survives (it is on disk).
    pub fn crash(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        if !node.alive {
            return;
        }
        node.alive = false;
        node.epoch += 1;
        self.stats.apply_dropped_before += node.core.apply_dropped_total();
        node.fetching = None;
        node.serving = 0;
        node.publisher = None;
        self.stats.apply_lost += node.apply.clear() as u64;
    }

    /// Starts node `index` again: a new core with a higher incarnation that knows the members
    /// it saw live before (as `Core::knowing` does from the persisted list), a new publisher.
    pub fn restart(&mut self, index: usize) {
        if self.nodes[index].alive {
            return;
        }
        let known: Vec<SocketAddr> = self.nodes[index].core.live().map(|m| m.addr).collect();
        let incarnation = self.nodes[index].incarnation + 1;
        let core = self.core(index, incarnation, known);
        let publisher = self.publisher(index, incarnation);
        let node = &mut self.nodes[index];
        node.core = core;
        node.incarnation = incarnation;
        node.publisher = publisher;
        node.alive = true;
        self.stats.restarts += 1;
        if let Err(what) = self.checker.on_restart(index, &self.nodes[index].replica) {
            self.fail(index, what);
        }
        self.input(index, Input::Start);
        self.feed_members(index);
    }

    /// Runs until virtual time `now + duration`, or until an invariant breaks.
    pub fn run_for(&mut self, duration: Duration) {
        let end = self.now() + duration;
        while self.violation.is_none() {
            match self.clock.next_until(end) {
                Some(event) => self.dispatch(event),
                None => break,
            }
        }
    }

    /// Runs, looking every `step`, until `done` holds or `budget` passes or an invariant
    /// breaks; returns whether it held. (`step` is how often `done` is asked, not a tick: the
    /// clock still jumps from event to event.)
    pub fn run_until(
        &mut self,
        budget: Duration,
        step: Duration,
        mut done: impl FnMut(&Sim) -> bool,
    ) -> bool {
        let end = self.now() + budget;
        while self.now() < end && self.violation.is_none() {
            if done(self) {
                return true;
            }
            self.run_for(step);
        }
        self.violation.is_none() && done(self)
    }

    /// Versions written so far.
    pub fn written(&self) -> usize {
        self.ledger.len()
    }

    /// Nodes (alive) that lack some written version, with how many they lack.
    pub fn lacking(&self) -> Vec<(usize, usize)> {
        self.nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.alive)
            .filter_map(|(i, n)| {
                let lack = self
                    .ledger
                    .iter()
                    .filter(|((s, v), _)| !n.replica.has(*s, *v))
                    .count();
                (lack > 0).then_some((i, lack))
            })
            .collect()
    }

    /// What is wrong with publishing, as the rules say it must be once the region is quiet:
    /// globald holds the map derived from all writes, and the publishers are the
    /// `publishers` live nodes with the lowest names. Empty when all is right.
    pub fn publish_problems(&self) -> Vec<String> {
        let Some(config) = &self.config.publish else {
            return Vec::new();
        };
        let mut problems = Vec::new();
        let truth = publisher::truth(&self.ledger);
        if self.globald.map != truth {
            problems.push(format!(
                "globald holds {} while the writes make {}",
                show(&self.globald.map),
                show(&truth)
            ));
        }
        let live: Vec<usize> = (0..self.nodes.len()).filter(|i| self.alive(*i)).collect();
        let mut names: Vec<(String, usize)> =
            live.iter().map(|i| (publisher::name(*i), *i)).collect();
        names.sort();
        let expected: BTreeSet<usize> = names
            .iter()
            .take(config.settings.publishers)
            .map(|(_, i)| *i)
            .collect();
        let actual: BTreeSet<usize> = live
            .iter()
            .copied()
            .filter(|i| {
                self.nodes[*i]
                    .publisher
                    .as_ref()
                    .is_some_and(Publisher::is_publisher)
            })
            .collect();
        if expected != actual {
            problems.push(format!(
                "publishers are nodes {actual:?}, the rules say {expected:?}"
            ));
        }
        problems
    }

    /// Delays from a version's write to each of its deliveries (by push, apply or sync).
    pub fn delivery_delays(&self) -> &[Duration] {
        &self.delivered
    }

    fn fail(&mut self, node: usize, what: String) {
        if self.violation.is_none() {
            self.violation = Some(Violation {
                seed: self.seed,
                at: self.now(),
                node,
                what,
            });
        }
    }

    fn now_instant(&self) -> Instant {
        self.base + self.now()
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
            Event::Push { to, from, frame } => {
                if !self.nodes[to].alive {
                    self.stats.cut += 1;
                    return;
                }
                self.stats.pushes += 1;
                self.nodes[to].copies += frame.changesets.len() as u64;
                let from = self.nodes[from].addr;
                self.input(
                    to,
                    Input::Received {
                        from,
                        changesets: frame.changesets.clone(),
                    },
                );
            }
            Event::Timer { node, epoch, timer } => {
                if self.nodes[node].epoch == epoch {
                    self.input(node, Input::Timer(timer));
                }
            }
            Event::SyncRequest {
                server,
                client,
                session,
                request,
            } => self.serve(server, client, session, &request),
            Event::SyncFrame {
                client,
                server,
                server_epoch,
                session,
                reply,
            } => self.on_sync_frame(client, server, server_epoch, session, reply),
            Event::SyncTimeout { client, session } => {
                if self.nodes[client]
                    .fetching
                    .as_ref()
                    .is_some_and(|f| f.session == session)
                    && let Some(fetch) = self.nodes[client].fetching.take()
                {
                    self.stats.syncs_failed += 1;
                    self.finish_sync(client, fetch.peer, false, true);
                }
            }
            Event::ServeDone { node, epoch } => {
                if self.nodes[node].epoch == epoch {
                    self.nodes[node].serving = self.nodes[node].serving.saturating_sub(1);
                }
            }
            Event::ApplyDone { node, epoch } => {
                if self.nodes[node].epoch != epoch {
                    return;
                }
                let batch = self.nodes[node].apply.finish();
                let changesets = batch.len();
                self.apply(node, batch);
                self.input(node, Input::Applied { changesets });
                self.start_apply(node);
            }
            Event::PubTimer { node, epoch, timer } => {
                if self.nodes[node].epoch == epoch {
                    self.publisher_input(node, PubInput::Timer(timer));
                }
            }
            Event::Derived { node, epoch } => {
                if self.nodes[node].epoch == epoch {
                    let map = publisher::derive(&self.nodes[node].replica, &self.ledger);
                    self.publisher_input(node, PubInput::Derived(Ok(map)));
                }
            }
            Event::AtGlobald {
                node,
                epoch,
                publication,
            } => {
                let fail = self.config.publish.as_ref().map_or(0.0, |p| p.fail);
                let ok = !(fail > 0.0 && self.rng.random_bool(fail));
                if ok {
                    self.globald.apply(&publication);
                } else {
                    self.globald.failures += 1;
                }
                let latency = self
                    .config
                    .publish
                    .as_ref()
                    .map_or(Duration::ZERO, |p| p.latency);
                self.clock
                    .schedule(latency, Event::PublishAck { node, epoch, ok });
            }
            Event::PublishAck { node, epoch, ok } => {
                if self.nodes[node].epoch == epoch {
                    let result = if ok {
                        Ok(())
                    } else {
                        Err("unavailable (simulated)".to_string())
                    };
                    self.publisher_input(node, PubInput::Published(result));
                }
            }
        }
    }

    fn finish_sync(&mut self, client: usize, peer: usize, complete: bool, failed: bool) {
        let peer = self.nodes[peer].addr;
        self.input(
            client,
            Input::SyncFinished {
                peer,
                complete,
                failed,
            },
        );
    }

    /// A sync request reached `server`: it answers `Busy` over its bound, or serves the
    /// session from its replica, one frame after another.
    fn serve(&mut self, server: usize, client: usize, session: u64, request: &SyncRequest) {
        if !self.nodes[server].alive || self.net.cut(client, server) {
            // Nobody answers: the client waits out its idle timeout.
            self.stats.cut += 1;
            let timeout = self.net.config.sync_timeout;
            self.clock
                .schedule(timeout, Event::SyncTimeout { client, session });
            return;
        }
        let node = &self.nodes[server];
        let frames = if node.busy || node.serving >= node.core.sync_config().serve_max {
            self.stats.syncs_busy += 1;
            vec![Serving::busy()]
        } else {
            self.nodes[server].serving += 1;
            let node = &self.nodes[server];
            let limits = session::limits(node.core.sync_config());
            match session::serve(&node.replica, request, limits, &self.ledger) {
                Ok(frames) => frames,
                Err(what) => return self.fail(server, what),
            }
        };
        let counted = !matches!(frames.as_slice(), [SyncReply::Busy]);
        let server_epoch = self.nodes[server].epoch;
        let mut at = self.net.stream_latency();
        for reply in frames {
            let reply = if self.config.net.encode {
                match Self::round_trip_reply(&reply) {
                    Ok((reply, bytes)) => {
                        self.stats.sync_bytes += bytes;
                        reply
                    }
                    Err(what) => return self.fail(server, what),
                }
            } else {
                reply
            };
            self.clock.schedule(
                at,
                Event::SyncFrame {
                    client,
                    server,
                    server_epoch,
                    session,
                    reply,
                },
            );
            at += FRAME_GAP;
        }
        if counted {
            self.clock.schedule(
                at,
                Event::ServeDone {
                    node: server,
                    epoch: server_epoch,
                },
            );
        }
    }

    /// A sync frame encoded and decoded as on the wire; with its size.
    fn round_trip_reply(reply: &SyncReply) -> Result<(SyncReply, u64), String> {
        let bytes = message::encode(reply).map_err(|e| format!("encoding a sync frame: {e}"))?;
        let decoded = message::decode(&bytes).map_err(|e| format!("decoding a sync frame: {e}"))?;
        Ok((decoded, bytes.len() as u64))
    }

    /// A push frame encoded and decoded as on the wire; with its size.
    fn round_trip_push(frame: &Changes) -> Result<(Changes, u64), String> {
        let bytes = message::encode(frame).map_err(|e| format!("encoding a push frame: {e}"))?;
        let decoded = message::decode(&bytes).map_err(|e| format!("decoding a push frame: {e}"))?;
        Ok((decoded, bytes.len() as u64))
    }

    fn on_sync_frame(
        &mut self,
        client: usize,
        server: usize,
        server_epoch: u64,
        session: u64,
        reply: SyncReply,
    ) {
        let stream_broke = self.net.cut(client, server) || self.nodes[server].epoch != server_epoch;
        let Some(fetch) = self.nodes[client].fetching.as_mut() else {
            return;
        };
        if fetch.session != session || fetch.broken {
            return;
        }
        if stream_broke {
            // The stream broke (a partition, or the server died): the client times out.
            self.stats.cut += 1;
            fetch.broken = true;
            let timeout = self.net.config.sync_timeout;
            self.clock
                .schedule(timeout, Event::SyncTimeout { client, session });
            return;
        }
        let (complete, failed) = match fetch.fetching.on_reply(reply) {
            Fetched::Apply(changesets) => {
                self.stats.sync_frames += 1;
                // The client session applies each frame itself, as the driver's does.
                return self.apply(client, changesets);
            }
            // Every simulated version fits a frame; quarantine is not simulated.
            Fetched::Quarantine { .. } => return,
            Fetched::Violation(what) => return self.fail(client, what),
            Fetched::Done(Outcome::Complete) => (true, false),
            Fetched::Done(Outcome::Partial) => (false, false),
            Fetched::Done(Outcome::Busy) => (false, true),
        };
        self.nodes[client].fetching = None;
        self.finish_sync(client, server, complete, failed);
    }

    /// Applies `changesets` to node `index`'s replica as the store would (a held version is
    /// skipped), checking the invariants.
    fn apply(&mut self, index: usize, changesets: Vec<Changeset>) {
        if !self.nodes[index].alive {
            return;
        }
        let mut sites = BTreeSet::new();
        let mut fresh = 0;
        for changeset in changesets {
            if let Err(what) = self.checker.on_apply(&changeset, &self.ledger) {
                return self.fail(index, what);
            }
            let (site, version) = (changeset.site, changeset.version);
            if self.nodes[index].replica.hold(site, version) {
                fresh += 1;
                sites.insert(site);
                if let Some(written) = self.ledger.get(site, version) {
                    self.delivered.push(self.clock.now() - written.at);
                }
            } else {
                self.stats.apply_skipped += 1;
            }
        }
        if let Err(what) = self
            .checker
            .on_applied(index, sites, &self.nodes[index].replica)
        {
            return self.fail(index, what);
        }
        if fresh > 0 {
            self.publisher_input(index, PubInput::Changed);
        }
    }

    fn start_apply(&mut self, index: usize) {
        let node = &mut self.nodes[index];
        if let Some(delay) = node.apply.start(&self.config.apply) {
            let epoch = node.epoch;
            self.clock
                .schedule(delay, Event::ApplyDone { node: index, epoch });
        }
    }

    /// Tells node `index`'s publisher who is live (by node name, its own included).
    fn feed_members(&mut self, index: usize) {
        if self.nodes[index].publisher.is_none() {
            return;
        }
        let mut names = vec![publisher::name(index)];
        names.extend(
            self.nodes[index]
                .core
                .live()
                .filter_map(|m| self.by_addr.get(&m.addr))
                .map(|i| publisher::name(*i)),
        );
        self.publisher_input(index, PubInput::Members(names));
    }

    fn publisher_input(&mut self, index: usize, input: PubInput) {
        let now = self.now_instant();
        let node = &mut self.nodes[index];
        if !node.alive {
            return;
        }
        let Some(publisher) = node.publisher.as_mut() else {
            return;
        };
        let epoch = node.epoch;
        let actions = publisher.handle(input, now);
        let Some(config) = self.config.publish.clone() else {
            return;
        };
        for action in actions {
            match action {
                logic::Action::Derive => {
                    self.clock
                        .schedule(config.derive_delay, Event::Derived { node: index, epoch });
                }
                logic::Action::Publish(publication) => {
                    self.stats.publishes += 1;
                    self.clock.schedule(
                        config.latency,
                        Event::AtGlobald {
                            node: index,
                            epoch,
                            publication,
                        },
                    );
                }
                logic::Action::SetTimer { timer, at } => {
                    let after = at.saturating_duration_since(now);
                    self.clock.schedule(
                        after,
                        Event::PubTimer {
                            node: index,
                            epoch,
                            timer,
                        },
                    );
                }
                logic::Action::Role(_) => {}
            }
        }
    }

    fn perform(&mut self, index: usize, actions: Vec<Action>) {
        let mut members_changed = false;
        for action in actions {
            match action {
                Action::Datagram { to, bytes } => {
                    let Some(&to) = self.by_addr.get(&to) else {
                        continue;
                    };
                    if !self.nodes[to].alive || self.net.cut(index, to) {
                        self.stats.cut += 1;
                    } else if self.net.lost() {
                        self.stats.packets_lost += 1;
                    } else {
                        let after = self.net.latency();
                        self.clock.schedule(after, Event::Packet { to, bytes });
                    }
                }
                Action::Push { to, frames, .. } => {
                    // Each frame as the core packed it, on its own stream to each recipient;
                    // encoded once when bytes are counted.
                    for frame in frames {
                        let frame = if self.config.net.encode {
                            match Self::round_trip_push(&frame) {
                                Ok((decoded, bytes)) => {
                                    self.stats.push_bytes += bytes * to.len() as u64;
                                    Arc::new(decoded)
                                }
                                Err(what) => return self.fail(index, what),
                            }
                        } else {
                            frame
                        };
                        for addr in &to {
                            let Some(&to) = self.by_addr.get(addr) else {
                                continue;
                            };
                            if !self.nodes[to].alive || self.net.cut(index, to) {
                                self.stats.cut += 1;
                                continue;
                            }
                            let after = self.net.stream_latency();
                            self.clock.schedule(
                                after,
                                Event::Push {
                                    to,
                                    from: index,
                                    frame: Arc::clone(&frame),
                                },
                            );
                        }
                    }
                }
                Action::Apply { changesets } => {
                    for changeset in &changesets {
                        if let Err(what) = self
                            .checker
                            .on_apply_asked(changeset, &self.nodes[index].replica)
                        {
                            return self.fail(index, what);
                        }
                    }
                    // The queue needs no bound of its own: the core bounds what is on its way.
                    self.nodes[index].apply.offer(changesets);
                    self.start_apply(index);
                }
                Action::Sync { peer } => {
                    let Some(&peer) = self.by_addr.get(&peer) else {
                        continue;
                    };
                    self.stats.syncs += 1;
                    self.next_session += 1;
                    let session = self.next_session;
                    let (fetching, request) = Fetching::new(
                        self.nodes[peer].addr,
                        &self.nodes[index].replica.states(),
                        &[],
                    );
                    self.nodes[index].fetching = Some(Fetch {
                        session,
                        peer,
                        fetching,
                        broken: false,
                    });
                    if !self.nodes[peer].alive || self.net.cut(index, peer) {
                        self.stats.cut += 1;
                        let timeout = self.net.config.sync_timeout;
                        self.clock.schedule(
                            timeout,
                            Event::SyncTimeout {
                                client: index,
                                session,
                            },
                        );
                        continue;
                    }
                    let after = self.net.stream_latency();
                    self.clock.schedule(
                        after,
                        Event::SyncRequest {
                            server: peer,
                            client: index,
                            session,
                            request,
                        },
                    );
                }
                Action::Schedule { after, timer } => {
                    let epoch = self.nodes[index].epoch;
                    self.clock.schedule(
                        after,
                        Event::Timer {
                            node: index,
                            epoch,
                            timer,
                        },
                    );
                }
                Action::Member(_) => members_changed = true,
            }
        }
        if members_changed {
            self.feed_members(index);
        }
    }
}

fn show(map: &AppMap) -> String {
    let entries: Vec<String> = map
        .iter()
        .map(|(app, c)| format!("{app}={}", c.machines))
        .collect();
    format!("{{{}}}", entries.join(", "))
}
