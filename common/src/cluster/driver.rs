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
//! No decision is made here that the simulator would need to reproduce: who to send to, what
//! is new, when to sync and with whom are the core's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::time::DelayQueue;

use super::core::{APPLY_INFLIGHT_MAX, Action, Core, Input, Replica, Timer};
use super::instep::StepStatus;
use super::membership::{Member, MemberEvent};
use super::message::{
    self, Changes, KIND_CHANGES, KIND_SWIM, KIND_SYNC_REPLY, KIND_SYNC_REQUEST, SyncReply,
    SyncRequest,
};
use super::pack::PackLimits;
use super::quarantine::{Quarantine, Quarantined, Recorded};
use super::session::{Fetch, Fetching, Outcome, Serve, Serving, SessionLimits};
use crate::admin::Readiness;
use crate::metrics::{Metrics, ReasonLabel, Role, RoleLabel, SyncLabels, SyncResult, ViaLabel};
use crate::store::{Changeset, SiteId, Store};
use crate::transport::{
    Conn, Frame, PeerIdentity, Transport, decode_datagram, encode, encode_datagram, read_frame,
    write_frame,
};

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

/// What the cluster looks like from this node, for the API and health.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// This node.
    pub me: Option<Member>,
    /// Live members with their certificate identity when known, in address order.
    pub members: Vec<(Member, Option<PeerIdentity>)>,
    /// Whether this node found its cluster and caught up with what its members held when it
    /// joined (see `instep`).
    pub caught_up: bool,
    /// What a starting node still waits for.
    pub step: StepStatus,
    /// Whether this node has ever seen another member live.
    pub had_members: bool,
    /// Since when every sync session has failed (none succeeded since); `None` while sessions
    /// succeed or none has run.
    pub sync_failing_since: Option<Instant>,
}

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
    fn take_refused(&self, batch: &mut Vec<Changeset>) -> Vec<(SiteId, u64)> {
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

/// A handle on the running cluster driver.
#[derive(Clone)]
pub struct Cluster {
    view: watch::Receiver<ClusterView>,
    faults: Faults,
    quarantine: Arc<std::sync::Mutex<Quarantine>>,
    readiness: Arc<watch::Sender<Readiness>>,
}

impl Cluster {
    /// The fault injector of this node.
    pub fn faults(&self) -> &Faults {
        &self.faults
    }

    /// The current view of the cluster.
    pub fn view(&self) -> ClusterView {
        self.view.borrow().clone()
    }

    /// A receiver that sees every change of the view.
    pub fn watch(&self) -> watch::Receiver<ClusterView> {
        self.view.clone()
    }

    /// How many versions are quarantined (could not be applied or served; retried on a
    /// back-off).
    pub fn quarantined(&self) -> usize {
        lock(&self.quarantine).len()
    }

    /// The first `max` quarantined versions with their reasons.
    pub fn quarantine_list(&self, max: usize) -> Vec<Quarantined> {
        lock(&self.quarantine).list(max)
    }

    /// The node's readiness, as its readiness task last computed it.
    pub fn readiness(&self) -> Readiness {
        self.readiness.borrow().clone()
    }

    /// Publishes the node's readiness (the node's readiness task calls this).
    pub fn set_readiness(&self, readiness: Readiness) {
        self.readiness.send_replace(readiness);
    }

    /// A receiver that sees every change of the node's readiness.
    pub fn watch_readiness(&self) -> watch::Receiver<Readiness> {
        self.readiness.subscribe()
    }
}

/// Locks the quarantine; a poisoned lock still holds a consistent set (every update is one
/// map operation).
fn lock(quarantine: &std::sync::Mutex<Quarantine>) -> std::sync::MutexGuard<'_, Quarantine> {
    quarantine
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
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

enum Outgoing {
    Datagram(Bytes),
    Push(Vec<Bytes>),
}

/// Everything the tasks share.
struct Shared {
    transport: Transport,
    store: Store,
    metrics: Arc<Metrics>,
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
    metrics: Arc<Metrics>,
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
    crate::telemetry::spawn(&tracker, accept_loop(Arc::clone(&shared)));
    crate::telemetry::spawn(&tracker, apply_worker(Arc::clone(&shared), apply_rx));
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
                    let frames = encode_push(&frames);
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
                        let outcome = sync_client(&shared, peer).await;
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
                    .get_or_create(&crate::metrics::EventLabel::up())
                    .inc();
            }
            MemberEvent::Down(member) => {
                tracing::info!(addr = %member.addr, incarnation = member.incarnation, "member down");
                self.shared
                    .metrics
                    .member_events
                    .get_or_create(&crate::metrics::EventLabel::down())
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

    /// Queues an item for a peer's sender; returns false (and counts) when it was dropped.
    fn enqueue(&mut self, to: SocketAddr, item: Outgoing, what: &'static str) -> bool {
        let sender = self.peers.entry(to).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(self.shared.options.peer_queue_len.max(1));
            crate::telemetry::spawn(
                &self.shared.tracker,
                peer_sender(Arc::clone(&self.shared), to, rx),
            );
            tx
        });
        match sender.try_send(item) {
            Ok(()) => true,
            Err(_) => {
                let reason = ReasonLabel::new("queue_full");
                if what == "datagram" {
                    self.shared
                        .metrics
                        .datagrams_dropped
                        .get_or_create(&reason)
                        .inc();
                } else {
                    self.shared
                        .metrics
                        .broadcast_dropped
                        .get_or_create(&reason)
                        .inc();
                }
                false
            }
        }
    }
}

/// Encodes packed push frames (see `pack`) with their transport frame header.
fn encode_push(frames: &[Arc<Changes>]) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(frames.len());
    for changes in frames {
        match message::encode(&**changes) {
            Ok(payload) => {
                let mut buf = BytesMut::with_capacity(payload.len() + 8);
                if encode(KIND_CHANGES, &payload, &mut buf).is_ok() {
                    out.push(buf.freeze());
                }
            }
            Err(err) => tracing::error!(error = %err, "could not encode a push"),
        }
    }
    out
}

/// Upper bound on the frames coalesced onto one push stream. Under load a
/// peer's queue holds many small pushes; writing them on one stream saves a
/// stream open, a flow-control round and a reader wakeup per change, while the
/// bound keeps one slow stream from holding back everything queued behind it.
const PUSH_STREAM_BYTES_MAX: usize = 1 << 20;

async fn peer_sender(shared: Arc<Shared>, addr: SocketAddr, mut queue: mpsc::Receiver<Outgoing>) {
    while let Some(item) = queue.recv().await {
        shared.metrics.peer_queue_depth.set(queue.len() as i64);
        if shared.faults.is_blocked(&addr) {
            continue;
        }
        let conn = tokio::select! {
            () = shared.cancel.cancelled() => return,
            conn = shared.transport.connect(addr) => conn,
        };
        let conn = match conn {
            Ok(conn) => conn,
            Err(err) => {
                tracing::debug!(%addr, error = %err, "cannot reach peer");
                let reason = ReasonLabel::new("unreachable");
                let dropped = match item {
                    Outgoing::Datagram(_) => &shared.metrics.datagrams_dropped,
                    Outgoing::Push(_) => &shared.metrics.broadcast_dropped,
                };
                dropped.get_or_create(&reason).inc();
                continue;
            }
        };
        match item {
            Outgoing::Datagram(bytes) => send_datagram(&shared, &conn, &bytes),
            Outgoing::Push(mut frames) => {
                // Take whatever else is already queued for this peer; datagrams
                // go out at once, pushes ride the same stream.
                let mut size: usize = frames.iter().map(Bytes::len).sum();
                while size < PUSH_STREAM_BYTES_MAX {
                    match queue.try_recv() {
                        Ok(Outgoing::Push(more)) => {
                            size += more.iter().map(Bytes::len).sum::<usize>();
                            frames.extend(more);
                        }
                        Ok(Outgoing::Datagram(bytes)) => send_datagram(&shared, &conn, &bytes),
                        Err(_) => break,
                    }
                }
                let count = frames.len() as u64;
                if let Err(err) = push(&conn, frames).await {
                    tracing::debug!(%addr, error = %err, "push failed");
                    shared
                        .metrics
                        .broadcast_dropped
                        .get_or_create(&ReasonLabel::new("send_error"))
                        .inc_by(count);
                }
            }
        }
    }
}

fn send_datagram(shared: &Shared, conn: &Conn, bytes: &Bytes) {
    match conn.send_datagram(encode_datagram(KIND_SWIM, bytes)) {
        Ok(()) => {
            shared.metrics.datagrams_sent.inc();
        }
        Err(_) => {
            shared
                .metrics
                .datagrams_dropped
                .get_or_create(&ReasonLabel::new("send_error"))
                .inc();
        }
    }
}

/// Writes `frames` on one unidirectional stream; the reader takes frames until
/// the stream ends.
async fn push(conn: &Conn, frames: Vec<Bytes>) -> Result<(), crate::transport::TransportError> {
    let mut stream = conn.open_uni().await?;
    for frame in frames {
        stream.write_all(&frame).await?;
    }
    let _ = stream.finish();
    Ok(())
}

async fn accept_loop(shared: Arc<Shared>) {
    loop {
        let conn = tokio::select! {
            () = shared.cancel.cancelled() => return,
            conn = shared.transport.accept() => conn,
        };
        let Some(conn) = conn else { return };
        let _ = shared
            .events
            .send(Event::Connected {
                addr: conn.remote_addr(),
                peer: conn.peer().clone(),
            })
            .await;
        crate::telemetry::spawn(
            &shared.tracker,
            read_datagrams(Arc::clone(&shared), conn.clone()),
        );
        crate::telemetry::spawn(
            &shared.tracker,
            read_pushes(Arc::clone(&shared), conn.clone()),
        );
        crate::telemetry::spawn(&shared.tracker, serve_syncs(Arc::clone(&shared), conn));
    }
}

async fn read_datagrams(shared: Arc<Shared>, conn: Conn) {
    loop {
        let bytes = tokio::select! {
            () = shared.cancel.cancelled() => return,
            bytes = conn.read_datagram() => bytes,
        };
        let Ok(bytes) = bytes else { return };
        if shared.faults.is_blocked(&conn.remote_addr()) {
            continue;
        }
        shared.metrics.datagrams_received.inc();
        match decode_datagram(&bytes) {
            Ok((KIND_SWIM, payload)) => {
                let packet = bytes.slice_ref(payload);
                if shared.events.try_send(Event::Packet(packet)).is_err() {
                    shared
                        .metrics
                        .datagrams_dropped
                        .get_or_create(&ReasonLabel::new("queue_full"))
                        .inc();
                }
            }
            _ => {
                shared
                    .metrics
                    .datagrams_dropped
                    .get_or_create(&ReasonLabel::new("malformed"))
                    .inc();
            }
        }
    }
}

async fn read_pushes(shared: Arc<Shared>, conn: Conn) {
    loop {
        let stream = tokio::select! {
            () = shared.cancel.cancelled() => return,
            stream = conn.accept_uni() => stream,
        };
        let Ok(mut stream) = stream else { return };
        if shared.faults.is_blocked(&conn.remote_addr()) {
            let _ = stream.stop(quinn::VarInt::from_u32(0));
            continue;
        }
        let Ok(permit) = Arc::clone(&shared.readers).acquire_owned().await else {
            return;
        };
        let shared = Arc::clone(&shared);
        let from = conn.remote_addr();
        crate::telemetry::spawn(&shared.tracker.clone(), async move {
            let _permit = permit;
            loop {
                let frame = match read_frame(&mut stream, shared.options.frame_bytes_max).await {
                    Ok(Some(frame)) if frame.kind == KIND_CHANGES => frame,
                    Ok(None) => return,
                    Ok(Some(_)) | Err(_) => {
                        shared
                            .metrics
                            .broadcast_dropped
                            .get_or_create(&ReasonLabel::new("malformed"))
                            .inc();
                        let _ = stream.stop(quinn::VarInt::from_u32(0));
                        return;
                    }
                };
                let changes = match message::decode::<Changes>(&frame.payload) {
                    Ok(changes) => changes,
                    Err(err) => {
                        tracing::debug!(%from, error = %err, "malformed push");
                        shared
                            .metrics
                            .broadcast_dropped
                            .get_or_create(&ReasonLabel::new("malformed"))
                            .inc();
                        let _ = stream.stop(quinn::VarInt::from_u32(0));
                        return;
                    }
                };
                let via = ViaLabel::broadcast();
                shared
                    .metrics
                    .changesets_received
                    .get_or_create(&via)
                    .inc_by(changes.changesets.len() as u64);
                shared
                    .metrics
                    .bytes_received
                    .get_or_create(&via)
                    .inc_by(frame.payload.len() as u64);
                let sent = shared
                    .events
                    .send(Event::Received {
                        from,
                        changesets: changes.changesets,
                    })
                    .await;
                if sent.is_err() {
                    return;
                }
            }
        });
    }
}

async fn apply_worker(shared: Arc<Shared>, mut queue: mpsc::Receiver<Vec<Changeset>>) {
    loop {
        let first = tokio::select! {
            () = shared.cancel.cancelled() => return,
            first = queue.recv() => first,
        };
        let Some(mut batch) = first else { return };
        while batch.len() < shared.options.apply_batch_max {
            match queue.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        shared.metrics.apply_queue_depth.set(queue.len() as i64);
        let count = batch.len();
        apply(&shared, batch).await;
        // Applied, rejected or failed: no longer on its way.
        let reported = tokio::select! {
            () = shared.cancel.cancelled() => return,
            reported = shared.events.send(Event::Applied(count)) => reported,
        };
        if reported.is_err() {
            return;
        }
    }
}

/// Applies changesets and records batch size, latency and replication lag. A version the store
/// rejects is quarantined; a quarantined version waiting for its next attempt is not tried.
async fn apply(shared: &Shared, mut batch: Vec<Changeset>) {
    {
        let quarantine = lock(&shared.quarantine);
        if !quarantine.is_empty() {
            let now = Instant::now();
            batch.retain(|c| quarantine.due(c.site, c.version, now));
        }
    }
    for (site, version) in shared.faults.take_refused(&mut batch) {
        quarantine_version(shared, site, version, "refused by fault injection");
    }
    if batch.is_empty() {
        return;
    }
    let started = Instant::now();
    let stamps: HashMap<(crate::store::SiteId, u64), u64> = batch
        .iter()
        .map(|c| ((c.site, c.version), c.ts.millis()))
        .collect();
    shared
        .metrics
        .apply_batch_changesets
        .observe(batch.len() as f64);
    match shared.store.apply(batch).await {
        Ok(applied) => {
            shared.metrics.apply_batches.inc();
            shared
                .metrics
                .apply_seconds
                .observe(started.elapsed().as_secs_f64());
            let now = crate::store::WallClock::System.now_ms();
            let mut worst = 0;
            for key in &applied.versions {
                if let Some(ts) = stamps.get(key) {
                    let lag = now.saturating_sub(*ts);
                    worst = worst.max(lag);
                    shared
                        .metrics
                        .replication_lag_seconds
                        .observe(lag as f64 / 1000.0);
                }
            }
            if !applied.versions.is_empty() {
                shared.metrics.replication_lag_max_ms.set(worst as i64);
            }
            let mut quarantine = lock(&shared.quarantine);
            let mut cleared = false;
            for &(site, version) in &applied.versions {
                cleared |= quarantine.cleared(site, version);
            }
            if cleared {
                tracing::info!(
                    quarantined = quarantine.len(),
                    "a quarantined version was applied"
                );
            }
            drop(quarantine);
            for rejected in &applied.rejected {
                quarantine_version(shared, rejected.site, rejected.version, &rejected.reason);
            }
            shared
                .metrics
                .quarantined_versions
                .set(lock(&shared.quarantine).len() as i64);
        }
        Err(err) => tracing::error!(error = %err, "applying changes failed"),
    }
}

/// Puts a version this node could not apply or fetch into quarantine: logged at WARN and counted
/// the first time, rescheduled further out each time after.
fn quarantine_version(shared: &Shared, site: SiteId, version: u64, reason: &str) {
    let mut quarantine = lock(&shared.quarantine);
    let recorded = quarantine.record(site, version, reason, Instant::now(), &mut rand::rng());
    let count = quarantine.len();
    drop(quarantine);
    shared.metrics.quarantined_versions.set(count as i64);
    match recorded {
        Recorded::New => {
            shared.metrics.quarantined.inc();
            tracing::warn!(%site, version, %reason, quarantined = count,
                "quarantined a version this node cannot apply; it is retried with back-off");
        }
        Recorded::Again => {
            tracing::debug!(%site, version, %reason, "a quarantined version failed again");
        }
        Recorded::Full => {
            shared.metrics.quarantine_full.inc();
            tracing::debug!(%site, version, %reason, "quarantine full; version not recorded");
        }
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

/// Runs a sync session as client: sends our bookkeeping, applies what comes back. The session's
/// decisions are `session::Fetching`'s; this moves its frames.
async fn sync_client(shared: &Shared, peer: SocketAddr) -> Result<Outcome, SyncError> {
    if shared.faults.is_blocked(&peer) {
        return Err(SyncError::Truncated);
    }
    let conn = shared.transport.connect(peer).await?;
    let (mut send, mut recv) = conn.open_bi().await?;
    let masked = lock(&shared.quarantine).masked(Instant::now());
    let (mut fetching, request) = Fetching::new(peer, &shared.store.bookkeeping(), &masked);
    let payload = message::encode(&request).map_err(|e| SyncError::Malformed(e.to_string()))?;
    write_frame(
        &mut send,
        &Frame::new(KIND_SYNC_REQUEST, Bytes::from(payload)),
    )
    .await?;
    let _ = send.finish();
    let idle = shared.options.sync_idle_timeout;
    loop {
        let frame =
            tokio::time::timeout(idle, read_frame(&mut recv, shared.options.frame_bytes_max))
                .await
                .map_err(|_| SyncError::Timeout(idle))??;
        let Some(frame) = frame else {
            return Err(SyncError::Truncated);
        };
        if frame.kind != KIND_SYNC_REPLY {
            return Err(SyncError::Malformed(format!("frame kind {}", frame.kind)));
        }
        let reply = message::decode::<SyncReply>(&frame.payload)
            .map_err(|e| SyncError::Malformed(e.to_string()))?;
        match fetching.on_reply(reply) {
            Fetch::Apply(changesets) => {
                let via = ViaLabel::sync();
                shared
                    .metrics
                    .changesets_received
                    .get_or_create(&via)
                    .inc_by(changesets.len() as u64);
                shared
                    .metrics
                    .bytes_received
                    .get_or_create(&via)
                    .inc_by(frame.payload.len() as u64);
                apply(shared, changesets).await;
            }
            Fetch::Quarantine {
                site,
                version,
                reason,
            } => quarantine_version(shared, site, version, &reason),
            Fetch::Done(outcome) => return Ok(outcome),
            Fetch::Violation(why) => return Err(SyncError::Malformed(why)),
        }
    }
}

async fn serve_syncs(shared: Arc<Shared>, conn: Conn) {
    loop {
        let streams = tokio::select! {
            () = shared.cancel.cancelled() => return,
            streams = conn.accept_bi() => streams,
        };
        let Ok((send, recv)) = streams else { return };
        let peer = conn.remote_addr();
        if shared.faults.is_blocked(&peer) {
            continue;
        }
        let shared = Arc::clone(&shared);
        crate::telemetry::spawn(&shared.tracker.clone(), async move {
            let role = RoleLabel::server();
            let result = match Arc::clone(&shared.serving).try_acquire_owned() {
                Ok(_permit) => {
                    shared
                        .metrics
                        .sync_sessions_active
                        .get_or_create(&role)
                        .inc();
                    let result = serve_sync(&shared, send, recv).await;
                    shared
                        .metrics
                        .sync_sessions_active
                        .get_or_create(&role)
                        .dec();
                    match result {
                        Ok(true) => SyncResult::Complete,
                        Ok(false) => SyncResult::Partial,
                        Err(err) => {
                            tracing::debug!(%peer, error = %err, "serving a sync session failed");
                            SyncResult::Failed
                        }
                    }
                }
                Err(_) => {
                    let mut send = send;
                    if let Ok(payload) = message::encode(&Serving::busy()) {
                        let _ = write_frame(
                            &mut send,
                            &Frame::new(KIND_SYNC_REPLY, Bytes::from(payload)),
                        )
                        .await;
                    }
                    let _ = send.finish();
                    SyncResult::Busy
                }
            };
            shared
                .metrics
                .sync_sessions
                .get_or_create(&SyncLabels::new(Role::Server, result))
                .inc();
        });
    }
}

/// Serves one sync session: what the client lacks, newest first, up to the session budget.
/// Returns whether everything was sent.
async fn serve_sync(
    shared: &Shared,
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
) -> Result<bool, SyncError> {
    let idle = shared.options.sync_idle_timeout;
    let frame = tokio::time::timeout(idle, read_frame(&mut recv, shared.options.frame_bytes_max))
        .await
        .map_err(|_| SyncError::Timeout(idle))??
        .ok_or(SyncError::Truncated)?;
    if frame.kind != KIND_SYNC_REQUEST {
        return Err(SyncError::Malformed(format!("frame kind {}", frame.kind)));
    }
    let request: SyncRequest =
        message::decode(&frame.payload).map_err(|e| SyncError::Malformed(e.to_string()))?;
    let mut serving = Serving::new(&request, &shared.store.bookkeeping(), shared.limits);
    loop {
        match serving.next() {
            Serve::Extract { site, range } => {
                let store = shared.store.clone();
                let changesets = tokio::task::spawn_blocking(move || store.changes(site, range))
                    .await
                    .map_err(|e| SyncError::Malformed(format!("extraction task: {e}")))??;
                serving.extracted(changesets);
            }
            Serve::Reply(reply) => {
                if let SyncReply::Unservable {
                    site,
                    version,
                    reason,
                } = &reply
                {
                    shared.metrics.sync_unservable.inc();
                    tracing::warn!(%site, version, %reason, "cannot serve a version over sync; skipped");
                }
                send_reply(&mut send, &reply).await?;
            }
            Serve::Finish { complete } => {
                let _ = send.finish();
                return Ok(complete);
            }
        }
    }
}

async fn send_reply(send: &mut quinn::SendStream, reply: &SyncReply) -> Result<(), SyncError> {
    let payload = message::encode(reply).map_err(|e| SyncError::Malformed(e.to_string()))?;
    write_frame(send, &Frame::new(KIND_SYNC_REPLY, Bytes::from(payload))).await?;
    Ok(())
}
