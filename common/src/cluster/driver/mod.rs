//! The tokio driver of the cluster core: the thin layer that carries out the core's actions on
//! the network (`transport`) and the store.
//!
//! Tasks, each bounded:
//! - the **loop** owns the [`Core`]; it reads one bounded queue of events (packets, pushes,
//!   local commits, finished syncs) and its timers, and performs the core's actions in order;
//! - one **sender** per peer, with a bounded queue: it dials (cached), sends datagrams, and
//!   writes each push on its own uni stream. A full queue drops the item and counts it: SWIM
//!   tolerates loss, and anti-entropy repairs a lost push;
//! - the **accept** loop, and per connection a reader of datagrams, of uni streams (pushes) and
//!   of bi streams (sync sessions served, at most `serve_max` at once);
//! - the **apply** worker, which batches new changesets into the store and reports each batch
//!   back to the loop (the core bounds what is on its way, so its queue never overflows);
//! - sync **client** sessions (one at a time, as the core schedules them);
//! - a reader of the store's commit events, which hands local commits to the loop.
//!
//! Files: this one is the event loop (spawn, the [`Core`], performing its actions); `peers` the
//! per-peer senders, `inbound` the accept loop and stream readers, `apply` the apply worker,
//! `serve` and `fetch` the two sides of sync sessions. Fault injection is `cluster::faults`;
//! the handle others hold is `cluster::handle`.
//!
//! No decision is made here that the simulator would need to reproduce: who to send to, what
//! is new, when to sync and with whom are the core's.

mod apply;

mod fetch;
mod inbound;
mod peers;
mod serve;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::time::DelayQueue;

use self::peers::Outgoing;
use super::handle::{Cluster, ClusterView};
use crate::cluster::faults::Faults;
use crate::cluster::metrics::{ClusterMetrics, Role, RoleLabel, SyncLabels, SyncResult};
use crate::metrics::ReasonLabel;
use crate::readiness::Readiness;
use crate::store::{Changeset, SiteId, Store};
use crate::transport::{PeerIdentity, Transport, encode_datagram};
use strata_core::machine::{APPLY_INFLIGHT_MAX, Action, Core, Input, Replica, Timer};
use strata_core::membership::MemberEvent;
use strata_core::message::KIND_SWIM;
use strata_core::pack::PackLimits;
use strata_core::quarantine::Quarantine;
use strata_core::session::{Outcome, SessionLimits};

/// Bounds of the driver's queues and frames.
#[derive(Debug, Clone)]
pub struct DriverOptions {
    /// Events waiting for the loop.
    pub events_len: usize,
    /// Items waiting in one peer's sender.
    pub peer_queue_len: usize,
    /// Changesets applied in one store call at most.
    pub apply_batch_max: usize,
    /// Largest frame accepted on a stream, bytes.
    pub frame_bytes_max: usize,
    /// Target size of a pushed frame, bytes (changesets are packed up to it).
    pub push_frame_bytes: usize,
    /// Uni streams read at once (per node).
    pub readers_max: usize,
    /// How long a sync session may wait for its peer's next frame.
    pub sync_idle_timeout: Duration,
}

impl Default for DriverOptions {
    fn default() -> Self {
        DriverOptions {
            events_len: 4096,
            peer_queue_len: 1024,
            apply_batch_max: 4096,
            frame_bytes_max: 16 << 20,
            push_frame_bytes: 1 << 20,
            readers_max: 256,
            sync_idle_timeout: Duration::from_secs(10),
        }
    }
}

impl Replica for Store {
    fn has(&self, site: SiteId, version: u64) -> bool {
        Store::has(self, site, version)
    }
}

enum Event {
    Packet(Bytes),
    Received {
        from: SocketAddr,
        changesets: Vec<Changeset>,
    },
    Committed(Vec<Arc<Changeset>>),
    /// The apply worker finished this many changesets.
    Applied(usize),
    SyncFinished {
        peer: SocketAddr,
        complete: bool,
        failed: bool,
    },
    Connected {
        addr: SocketAddr,
        peer: PeerIdentity,
    },
}

/// Everything the tasks share.
struct Shared {
    transport: Transport,
    store: Store,
    metrics: Arc<ClusterMetrics>,
    options: DriverOptions,
    events: mpsc::Sender<Event>,
    apply: mpsc::Sender<Vec<Changeset>>,
    readers: Arc<Semaphore>,
    serving: Arc<Semaphore>,
    limits: SessionLimits,
    faults: Faults,
    quarantine: Arc<std::sync::Mutex<Quarantine>>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

/// Starts the driver: the core joins through its seeds and the tasks run until `cancel`.
pub fn spawn(
    core: Core,
    transport: Transport,
    store: Store,
    metrics: Arc<ClusterMetrics>,
    options: DriverOptions,
    cancel: CancellationToken,
    tracker: TaskTracker,
) -> Cluster {
    let (events_tx, events_rx) = mpsc::channel(options.events_len.max(1));
    // The core keeps at most `APPLY_INFLIGHT_MAX` changesets on their way into the store, and
    // each item here holds at least one: this queue is never full.
    let (apply_tx, apply_rx) = mpsc::channel(APPLY_INFLIGHT_MAX);
    let (view_tx, view_rx) = watch::channel(ClusterView {
        me: Some(core.me()),
        ..ClusterView::default()
    });
    let sync = core.sync_config().clone();
    let faults = Faults::default();
    let quarantine = Arc::new(std::sync::Mutex::new(Quarantine::new()));
    let limits = SessionLimits::new(&sync, store.options().chunk_bytes, options.frame_bytes_max);
    let core = core.packing(PackLimits {
        chunk_bytes: store.options().chunk_bytes,
        push_frame_bytes: options.push_frame_bytes,
    });
    let shared = Arc::new(Shared {
        faults: faults.clone(),
        quarantine: Arc::clone(&quarantine),
        transport,
        store,
        metrics,
        readers: Arc::new(Semaphore::new(options.readers_max.max(1))),
        serving: Arc::new(Semaphore::new(sync.serve_max.max(1))),
        limits,
        options,
        events: events_tx,
        apply: apply_tx,
        tracker: tracker.clone(),
        cancel: cancel.clone(),
    });
    crate::telemetry::spawn(&tracker, inbound::accept_loop(Arc::clone(&shared)));
    crate::telemetry::spawn(&tracker, apply::apply_worker(Arc::clone(&shared), apply_rx));
    crate::telemetry::spawn(&tracker, store_events(Arc::clone(&shared)));
    let driver = Driver {
        core,
        shared,
        events: events_rx,
        timers: DelayQueue::new(),
        peers: HashMap::new(),
        identities: HashMap::new(),
        view: view_tx,
        had_members: false,
        sync_failing_since: None,
    };
    crate::telemetry::spawn(&tracker, driver.run());
    Cluster {
        view: view_rx,
        faults,
        quarantine,
        readiness: Arc::new(watch::channel(Readiness::default()).0),
    }
}

struct Driver {
    core: Core,
    shared: Arc<Shared>,
    events: mpsc::Receiver<Event>,
    timers: DelayQueue<Timer>,
    peers: HashMap<SocketAddr, mpsc::Sender<Outgoing>>,
    identities: HashMap<SocketAddr, PeerIdentity>,
    view: watch::Sender<ClusterView>,
    had_members: bool,
    sync_failing_since: Option<Instant>,
}

impl Driver {
    async fn run(mut self) {
        let actions = self.core.handle(Input::Start, &self.shared.store);
        self.perform(actions);
        self.publish_view();
        loop {
            tokio::select! {
                () = self.shared.cancel.cancelled() => break,
                event = self.events.recv() => {
                    let Some(event) = event else { break };
                    self.on_event(event);
                }
                Some(expired) = self.timers.next(), if !self.timers.is_empty() => {
                    let timer = expired.into_inner();
                    let step_changed = matches!(timer, Timer::JoinWait);
                    let actions = self.core.handle(Input::Timer(timer), &self.shared.store);
                    self.perform(actions);
                    if step_changed {
                        self.publish_view();
                    }
                }
            }
        }
        // Leave gracefully: members learn at once instead of by probing.
        let actions = self.core.handle(Input::Leave, &self.shared.store);
        for action in actions {
            if let Action::Datagram { to, bytes } = action
                && let Ok(conn) = self.shared.transport.connect(to).await
            {
                let _ = conn.send_datagram(encode_datagram(KIND_SWIM, &bytes));
            }
        }
    }

    fn on_event(&mut self, event: Event) {
        let actions = match event {
            Event::Packet(bytes) => self.core.handle(Input::Packet(&bytes), &self.shared.store),
            Event::Received { from, changesets } => {
                let duplicates = self.core.duplicates_total();
                let dropped = self.core.apply_dropped_total();
                let actions = self
                    .core
                    .handle(Input::Received { from, changesets }, &self.shared.store);
                self.shared
                    .metrics
                    .changesets_duplicate
                    .inc_by(self.core.duplicates_total() - duplicates);
                // Anti-entropy fetches what the core dropped.
                self.shared
                    .metrics
                    .apply_dropped
                    .inc_by(self.core.apply_dropped_total() - dropped);
                actions
            }
            Event::Applied(changesets) => self
                .core
                .handle(Input::Applied { changesets }, &self.shared.store),
            Event::Committed(local) => self
                .core
                .handle(Input::Committed(local), &self.shared.store),
            Event::SyncFinished {
                peer,
                complete,
                failed,
            } => {
                if failed {
                    self.sync_failing_since.get_or_insert_with(Instant::now);
                } else {
                    self.sync_failing_since = None;
                }
                let actions = self.core.handle(
                    Input::SyncFinished {
                        peer,
                        complete,
                        failed,
                    },
                    &self.shared.store,
                );
                self.publish_view();
                actions
            }
            Event::Connected { addr, peer } => {
                self.identities.insert(addr, peer);
                self.publish_view();
                Vec::new()
            }
        };
        self.perform(actions);
    }

    fn perform(&mut self, actions: Vec<Action>) {
        for action in actions {
            match action {
                Action::Datagram { to, bytes } => {
                    self.enqueue(to, Outgoing::Datagram(bytes), "datagram");
                }
                Action::Push {
                    to,
                    frames,
                    changesets,
                } => {
                    // Encoded once, shared by every recipient.
                    let frames = peers::encode_push(&frames);
                    let bytes: usize = frames.iter().map(Bytes::len).sum();
                    for to in to {
                        if self.enqueue(to, Outgoing::Push(frames.clone()), "push") {
                            self.shared
                                .metrics
                                .broadcast_changesets_sent
                                .inc_by(changesets as u64);
                            self.shared
                                .metrics
                                .broadcast_bytes_sent
                                .inc_by(bytes as u64);
                        }
                    }
                }
                Action::Apply { changesets } => {
                    let count = changesets.len();
                    if self.shared.apply.try_send(changesets).is_err() {
                        // Only at shutdown (the worker is gone): the queue holds as many items
                        // as the core lets changesets be on their way. Report them finished so
                        // the core's accounting stays true.
                        self.core
                            .handle(Input::Applied { changesets: count }, &self.shared.store);
                    }
                }
                Action::Sync { peer } => {
                    let shared = Arc::clone(&self.shared);
                    crate::telemetry::spawn(&self.shared.tracker, async move {
                        shared
                            .metrics
                            .sync_sessions_active
                            .get_or_create(&RoleLabel::client())
                            .inc();
                        let outcome = fetch::sync_client(&shared, peer).await;
                        shared
                            .metrics
                            .sync_sessions_active
                            .get_or_create(&RoleLabel::client())
                            .dec();
                        let (complete, failed, result) = match outcome {
                            Ok(Outcome::Complete) => (true, false, SyncResult::Complete),
                            Ok(Outcome::Partial) => (false, false, SyncResult::Partial),
                            Ok(Outcome::Busy) => (false, true, SyncResult::Busy),
                            Err(err) => {
                                tracing::debug!(%peer, error = %err, "sync session failed");
                                (false, true, SyncResult::Failed)
                            }
                        };
                        shared
                            .metrics
                            .sync_sessions
                            .get_or_create(&SyncLabels::new(Role::Client, result))
                            .inc();
                        let _ = shared
                            .events
                            .send(Event::SyncFinished {
                                peer,
                                complete,
                                failed,
                            })
                            .await;
                    });
                }
                Action::Schedule { after, timer } => {
                    self.timers.insert(timer, after);
                }
                Action::Member(event) => self.on_member(event),
            }
        }
        self.shared
            .metrics
            .swim_backlog
            .set(self.core.swim_backlog() as i64);
    }

    fn on_member(&mut self, event: MemberEvent) {
        match event {
            MemberEvent::Up(member) => {
                self.had_members = true;
                tracing::info!(addr = %member.addr, incarnation = member.incarnation, "member up");
                // The incarnation is the member's start time: a cached connection older than
                // it leads to a process that is gone, and a back-off from dialing that dead
                // process must not delay reaching the new one.
                let started = UNIX_EPOCH + Duration::from_millis(member.incarnation);
                if self.shared.transport.peer_restarted(member.addr, started) {
                    tracing::debug!(addr = %member.addr, "connection to the previous incarnation retired");
                }
                self.shared
                    .metrics
                    .member_events
                    .get_or_create(&crate::cluster::metrics::EventLabel::up())
                    .inc();
            }
            MemberEvent::Down(member) => {
                tracing::info!(addr = %member.addr, incarnation = member.incarnation, "member down");
                self.shared
                    .metrics
                    .member_events
                    .get_or_create(&crate::cluster::metrics::EventLabel::down())
                    .inc();
                // A restarted node comes back with a new connection; a dead one has none.
                if !self.core.live().any(|m| m.addr == member.addr) {
                    self.peers.remove(&member.addr);
                    self.shared.transport.forget(member.addr);
                }
            }
        }
        self.shared
            .metrics
            .members
            .set(self.core.live_count() as i64);
        self.publish_view();
    }

    fn publish_view(&self) {
        let members = self
            .core
            .live()
            .map(|m| (*m, self.identities.get(&m.addr).cloned()))
            .collect();
        let caught_up = self.core.caught_up();
        self.shared.metrics.caught_up.set(i64::from(caught_up));
        self.view.send_replace(ClusterView {
            me: Some(self.core.me()),
            members,
            caught_up,
            step: self.core.step_status(),
            had_members: self.had_members,
            sync_failing_since: self.sync_failing_since,
        });
    }
}

async fn store_events(shared: Arc<Shared>) {
    let mut events = shared.store.subscribe();
    loop {
        let event = tokio::select! {
            () = shared.cancel.cancelled() => return,
            event = events.recv() => event,
        };
        match event {
            Ok(event) if !event.local.is_empty() => {
                if shared
                    .events
                    .send(Event::Committed(event.local.clone()))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(_) => {}
            Err(tokio::sync::broadcast::error::RecvError::Lagged(missed)) => {
                // Commits were not pushed; anti-entropy delivers them.
                tracing::warn!(missed, "broadcast fell behind the store's commits");
                shared
                    .metrics
                    .broadcast_dropped
                    .get_or_create(&ReasonLabel::new("lagged"))
                    .inc_by(missed);
            }
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Why a sync session (either side) ended early; the session changed nothing further and the
/// next round retries.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("transport: {0}")]
    Transport(#[from] crate::transport::TransportError),
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("peer went quiet for {0:?}")]
    Timeout(Duration),
    #[error("peer closed the session early")]
    Truncated,
}
