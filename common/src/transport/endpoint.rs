//! The node's QUIC endpoint: one UDP socket that both accepts and dials, and a cache of live
//! connections keyed by the peer's address.
//!
//! Because a node listens and dials from the same socket, the address a connection arrives from
//! is the peer's listening address; a connection accepted from X is cached under X and reused to
//! send to X. Either side may therefore send on a connection the other side dialed, so
//! [`Transport::accept`] yields *every* new connection once, incoming or outgoing: the owner's
//! one accept loop serves the incoming streams and datagrams of all of them.
//!
//! Life of a connection:
//!
//! 1. The TLS handshake checks the chain, the cluster name and the identity both ways (see
//!    `tls`). A peer of another CA, tier or region fails here.
//! 2. The acceptor then opens a uni stream and sends one hello frame. The dialer's
//!    [`Transport::connect`] returns only after reading it: in TLS 1.3 the client finishes its
//!    handshake before the server has checked the client's certificate, so without the hello a
//!    dialer the server rejects would hold a connection that is about to die. With it,
//!    `connect` returning `Ok` means the peer accepted us. It costs one round trip per new
//!    connection.
//! 3. The connection is cached and handed to [`Transport::accept`]; a watcher task waits for it
//!    to close, then drops it from the cache and folds its counters into the totals.
//!
//! A peer that restarts on the same address must be reachable again at once, not after the idle
//! timeout of the connection to its dead process. Three things see to it:
//!
//! - A verified incoming connection replaces the cached one. A peer dials only when it holds no
//!   usable connection to us, so the cached one is either to a process that is gone or one the
//!   peer has just lost. The old connection is not closed: when two live nodes dial each other
//!   at once, each may replace its dial with the other's, and both connections must keep
//!   working (closing would make both sides redial, and again). A live old connection goes on
//!   serving whatever the peer still sends on it; a dead one ends by the next point.
//! - The stateless-reset key is derived from the TLS private key (see `reset`), so the restarted
//!   process answers any packet on its predecessor's connections with a valid stateless reset,
//!   and the survivor closes that connection on its next packet (a keep-alive at the latest).
//! - [`Transport::peer_restarted`], called by membership when a peer's new incarnation shows up,
//!   retires cached connections established before that incarnation began and clears the
//!   peer's dial back-off, so the next send dials the new process at once.
//!
//! Close codes sent to peers: 1 shutdown (or transport dropped), 2 forgotten, 3 dial cancelled.
//!
//! Locks: one std mutex guards the cache, the set of live connections and the totals. It is
//! never held across an `.await`; while it is held only quinn's own short internal locks are
//! taken (reading a connection's statistics, closing one), and quinn never calls back into us.
//!
//! It must not: interpret frame kinds, know about membership or SQL, or install anything
//! process-wide (binaries install the ring provider themselves, see `tls`).

use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::error::TransportError;
use super::frame::{Frame, read_frame, write_frame};
use super::throttle::LogThrottle;
use super::tls::{PeerIdentity, TlsConfig, peer_identity};

/// The frame kind of the acceptor's hello (alone on its own stream, so it cannot collide with
/// the kinds of the layer above).
const HELLO_KIND: u8 = 0;

/// Close code: the transport is shutting down (or was dropped).
const CLOSE_SHUTDOWN: u32 = 1;
/// Close code: the connection was forgotten ([`Transport::forget`]).
const CLOSE_FORGOTTEN: u32 = 2;
/// Close code: a dial completed after its address was forgotten.
const CLOSE_CANCELLED: u32 = 3;

/// New connections waiting for [`Transport::accept`]. When full, the watcher tasks wait (one
/// per connection, so the backlog is bounded by the connection limit); 64 covers a whole small
/// cluster connecting at once without waking the accept loop per connection.
const NEW_CONNECTIONS_QUEUE_MAX: usize = 64;

/// Incoming handshakes in progress at once. Beyond this the accept loop waits and quinn
/// buffers the new connections (up to its own limits), which paces a restart storm instead of
/// spending every core on TLS at once. 64 is far above what a healthy cluster needs.
const HANDSHAKES_IN_FLIGHT_MAX: usize = 64;

/// How long [`Transport::shutdown`] waits for connections to drain and tasks to end. Closing a
/// QUIC connection takes about three probe timeouts; on a LAN that is milliseconds, so two
/// seconds only matters when a peer is unreachable, and then waiting longer gains nothing.
const SHUTDOWN_WAIT_MAX: Duration = Duration::from_secs(2);

/// First pause after a failed dial before the address is dialed again. 250 ms: a peer that
/// was restarting is back within a few pauses, and a burst of sends to a dead peer costs one dial.
const DIAL_BACKOFF_MIN: Duration = Duration::from_millis(250);

/// Longest pause between dials of an address that keeps failing. 30 s: a peer with a bad
/// certificate or a dead host costs two handshakes a minute instead of two a second, while a
/// repaired peer is reached within half a minute (SWIM notices it sooner through others).
const DIAL_BACKOFF_MAX: Duration = Duration::from_secs(30);

/// Addresses with a dial back-off remembered at most. Entries exist only for addresses we
/// dialed and failed; 4,096 is four times the default connection limit. When full, the entry
/// whose pause ends first is dropped (that address is merely dialed a little early).
const DIAL_BACKOFF_PEERS_MAX: usize = 4096;

/// Tunables of the endpoint. Every default is explained on its field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransportOptions {
    /// How often an otherwise quiet connection sends a keep-alive. Default 2 s: a fifth of the
    /// idle timeout, so four keep-alives in a row must be lost before a healthy peer is
    /// dropped, and NAT or conntrack state never expires between SWIM probes.
    pub keep_alive_interval: Duration,
    /// A connection that hears nothing for this long is closed (and leaves the cache, so the
    /// next `connect` redials). Default 10 s: long enough to ride out a short loss burst,
    /// short enough that a dead peer's connection and its buffers go away quickly. Failure
    /// detection itself is SWIM's job, not this timer's.
    pub idle_timeout: Duration,
    /// Uni streams a peer may have open towards us at once. Default 256 (quinn: 100): change
    /// broadcasts use one uni stream per batch, and a burst of commits on several peers should
    /// not make senders wait; beyond it senders wait in `open_uni`, which is the backpressure.
    pub max_concurrent_uni_streams: u32,
    /// Bi streams a peer may have open towards us at once. Default 64: sync sessions are few
    /// (a few random peers per round), so this leaves ample headroom while bounding memory.
    pub max_concurrent_bi_streams: u32,
    /// Bytes of received datagrams buffered until read. Default 1 MiB, about 900 full-size
    /// datagrams (several seconds of SWIM traffic in a large region); when it is full quinn
    /// drops the oldest datagram, which SWIM tolerates. It also caps the size of one datagram
    /// the peer may send.
    pub datagram_receive_buffer_bytes: usize,
    /// How long a dial (handshake plus hello) or an incoming handshake may take. Default 5 s:
    /// with quinn's initial RTT estimate of 333 ms this allows several
    /// retransmissions of a lost first packet, on any continent-spanning path.
    pub connect_timeout: Duration,
    /// Most connections open at once, counting dials in progress. Default 1024: a region has
    /// tens to hundreds of nodes and a pair holds at most two connections (when both dial at
    /// once). Incoming connections beyond it are refused, dials fail with
    /// [`TransportError::TooManyConnections`].
    pub max_connections: usize,
}

impl Default for TransportOptions {
    fn default() -> Self {
        Self {
            keep_alive_interval: Duration::from_secs(2),
            idle_timeout: Duration::from_secs(10),
            max_concurrent_uni_streams: 256,
            max_concurrent_bi_streams: 64,
            datagram_receive_buffer_bytes: 1 << 20,
            connect_timeout: Duration::from_secs(5),
            max_connections: 1024,
        }
    }
}

impl TransportOptions {
    /// Checks the options and builds quinn's transport configuration from them. MTU discovery
    /// keeps quinn's default (on), so datagrams may grow past the initial ~1200 bytes.
    fn quinn_transport_config(&self) -> Result<quinn::TransportConfig, TransportError> {
        let invalid = |why: String| Err(TransportError::InvalidOptions(why));
        if self.keep_alive_interval.is_zero() || self.keep_alive_interval >= self.idle_timeout {
            return invalid(format!(
                "keep_alive_interval ({:?}) must be positive and below idle_timeout ({:?})",
                self.keep_alive_interval, self.idle_timeout
            ));
        }
        if self.connect_timeout.is_zero() {
            return invalid("connect_timeout must be positive".into());
        }
        if self.max_connections == 0 {
            return invalid("max_connections must be positive".into());
        }
        let idle = quinn::IdleTimeout::try_from(self.idle_timeout).map_err(|_| {
            TransportError::InvalidOptions(format!(
                "idle_timeout {:?} too large",
                self.idle_timeout
            ))
        })?;
        let mut config = quinn::TransportConfig::default();
        config
            .keep_alive_interval(Some(self.keep_alive_interval))
            .max_idle_timeout(Some(idle))
            .max_concurrent_uni_streams(quinn::VarInt::from_u32(self.max_concurrent_uni_streams))
            .max_concurrent_bidi_streams(quinn::VarInt::from_u32(self.max_concurrent_bi_streams))
            .datagram_receive_buffer_size(Some(self.datagram_receive_buffer_bytes));
        Ok(config)
    }
}

/// Who opened a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// The peer dialed us.
    Incoming,
    /// We dialed the peer.
    Outgoing,
}

/// A live, verified connection to a peer of our cluster. Cheap to clone.
///
/// The stream and datagram methods count what they do in [`TransportStats`]; the underlying
/// [`quinn::Connection`] is available for anything else (its streams are not counted, its
/// datagrams and bytes are, from quinn's own statistics).
#[derive(Clone)]
pub struct Conn {
    /// The quinn connection (itself a cheap handle).
    conn: quinn::Connection,
    /// Identity, address, direction, counters.
    meta: Arc<ConnMeta>,
}

/// What a [`Conn`] knows besides the quinn connection; shared by its clones.
struct ConnMeta {
    /// The identity from the peer's verified certificate.
    peer: PeerIdentity,
    /// The peer's address, normalized (the cache key).
    remote: SocketAddr,
    /// Who dialed.
    direction: Direction,
    /// When the handshake completed, by this host's wall clock (compared with a peer's start
    /// time by [`Transport::peer_restarted`]).
    established: SystemTime,
    /// The endpoint's counters, for the stream methods.
    counters: Arc<Counters>,
}

impl fmt::Debug for Conn {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Conn")
            .field("peer", &self.meta.peer)
            .field("remote", &self.meta.remote)
            .field("direction", &self.meta.direction)
            .field("id", &self.conn.stable_id())
            .finish()
    }
}

impl Conn {
    fn new(
        conn: quinn::Connection,
        peer: PeerIdentity,
        remote: SocketAddr,
        direction: Direction,
        counters: Arc<Counters>,
    ) -> Self {
        Self {
            conn,
            meta: Arc::new(ConnMeta {
                peer,
                remote,
                direction,
                established: SystemTime::now(),
                counters,
            }),
        }
    }

    /// When the handshake completed, by this host's wall clock.
    pub fn established(&self) -> SystemTime {
        self.meta.established
    }

    /// The peer's verified identity.
    pub fn peer(&self) -> &PeerIdentity {
        &self.meta.peer
    }

    /// The peer's address (its listening address, since peers dial from their listening
    /// socket), IPv4-mapped IPv6 addresses shown as IPv4.
    pub fn remote_addr(&self) -> SocketAddr {
        self.meta.remote
    }

    /// Who dialed.
    pub fn direction(&self) -> Direction {
        self.meta.direction
    }

    /// The quinn connection, for anything this type does not wrap.
    pub fn connection(&self) -> &quinn::Connection {
        &self.conn
    }

    /// An id unique among this endpoint's live connections.
    pub fn stable_id(&self) -> usize {
        self.conn.stable_id()
    }

    /// The largest datagram payload the path takes now (it may grow with MTU discovery), or
    /// `None` if the peer does not accept datagrams.
    pub fn max_datagram_size(&self) -> Option<usize> {
        self.conn.max_datagram_size()
    }

    /// Queues a datagram. Unreliable: it may be lost, and when the send buffer is full quinn
    /// drops the oldest queued datagram.
    pub fn send_datagram(&self, data: Bytes) -> Result<(), TransportError> {
        Ok(self.conn.send_datagram(data)?)
    }

    /// The next datagram from the peer.
    pub async fn read_datagram(&self) -> Result<Bytes, TransportError> {
        self.conn.read_datagram().await.map_err(|e| self.lost(e))
    }

    /// Opens a uni stream (waits while the peer's stream limit is reached).
    pub async fn open_uni(&self) -> Result<quinn::SendStream, TransportError> {
        let send = self.conn.open_uni().await.map_err(|e| self.lost(e))?;
        self.meta.counters.add(&self.meta.counters.streams_opened);
        Ok(send)
    }

    /// Opens a bi stream (waits while the peer's stream limit is reached).
    pub async fn open_bi(&self) -> Result<(quinn::SendStream, quinn::RecvStream), TransportError> {
        let pair = self.conn.open_bi().await.map_err(|e| self.lost(e))?;
        self.meta.counters.add(&self.meta.counters.streams_opened);
        Ok(pair)
    }

    /// The next uni stream the peer opened.
    pub async fn accept_uni(&self) -> Result<quinn::RecvStream, TransportError> {
        let recv = self.conn.accept_uni().await.map_err(|e| self.lost(e))?;
        self.meta.counters.add(&self.meta.counters.streams_accepted);
        Ok(recv)
    }

    /// The next bi stream the peer opened.
    pub async fn accept_bi(
        &self,
    ) -> Result<(quinn::SendStream, quinn::RecvStream), TransportError> {
        let pair = self.conn.accept_bi().await.map_err(|e| self.lost(e))?;
        self.meta.counters.add(&self.meta.counters.streams_accepted);
        Ok(pair)
    }

    /// Why the connection closed, or `None` while it is open.
    pub fn close_reason(&self) -> Option<quinn::ConnectionError> {
        self.conn.close_reason()
    }

    /// Whether the connection has closed.
    pub fn is_closed(&self) -> bool {
        self.conn.close_reason().is_some()
    }

    /// Waits until the connection closes and returns why.
    pub async fn closed(&self) -> quinn::ConnectionError {
        self.conn.closed().await
    }

    fn close(&self, code: u32, reason: &[u8]) {
        self.conn.close(quinn::VarInt::from_u32(code), reason);
    }

    fn lost(&self, source: quinn::ConnectionError) -> TransportError {
        TransportError::Connection {
            addr: self.meta.remote,
            source,
        }
    }
}

/// A snapshot of the endpoint's counters (totals since [`Transport::bind`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransportStats {
    /// Connections open now, both directions.
    pub connections_open: u64,
    /// Incoming connections that completed the handshake.
    pub connections_accepted_total: u64,
    /// Dials that completed (handshake and hello).
    pub connections_dialed_total: u64,
    /// Incoming handshakes that failed (bad certificate, wrong cluster, timeout, ...).
    pub handshakes_failed_total: u64,
    /// Dials that failed or were cancelled.
    pub dials_failed_total: u64,
    /// Dials started (handshakes attempted towards a peer).
    pub dials_attempted_total: u64,
    /// `connect` calls refused without dialing because the address is backing off.
    pub dials_backed_off_total: u64,
    /// Times the TLS material was swapped by [`Transport::reload_tls`].
    pub tls_reloads_total: u64,
    /// Incoming connections refused at the connection limit.
    pub connections_refused_total: u64,
    /// Cached connections superseded: replaced by a newer incoming connection from the same
    /// address, or retired by [`Transport::peer_restarted`].
    pub connections_superseded_total: u64,
    /// Connections closed by the peer's stateless reset (its process restarted and no longer
    /// knew them).
    pub connections_reset_total: u64,
    /// Datagrams sent (quinn's DATAGRAM frames).
    pub datagrams_sent_total: u64,
    /// Datagrams received (quinn's DATAGRAM frames, including any dropped from a full buffer).
    pub datagrams_received_total: u64,
    /// Streams opened through [`Conn`].
    pub streams_opened_total: u64,
    /// Streams accepted through [`Conn`].
    pub streams_accepted_total: u64,
    /// UDP payload bytes sent on connections (QUIC overhead included).
    pub bytes_sent_total: u64,
    /// UDP payload bytes received on connections (QUIC overhead included).
    pub bytes_received_total: u64,
}

/// Event counters shared by the endpoint's tasks and its connections.
/// Relaxed atomics: each is an independent total, read only for snapshots.
#[derive(Default)]
struct Counters {
    /// Incoming connections registered.
    accepted: AtomicU64,
    /// Dials that completed.
    dialed: AtomicU64,
    /// Incoming handshakes that failed.
    handshakes_failed: AtomicU64,
    /// Dials that failed or were cancelled.
    dials_failed: AtomicU64,
    /// Dials started.
    dials_attempted: AtomicU64,
    /// `connect` calls refused during a back-off.
    dials_backed_off: AtomicU64,
    /// TLS material swaps.
    tls_reloads: AtomicU64,
    /// Incoming connections refused at the limit.
    refused: AtomicU64,
    /// Cached connections superseded by a newer one or retired by a peer restart.
    superseded: AtomicU64,
    /// Connections closed by a stateless reset.
    reset: AtomicU64,
    /// Streams opened through [`Conn`].
    streams_opened: AtomicU64,
    /// Streams accepted through [`Conn`].
    streams_accepted: AtomicU64,
}

impl Counters {
    fn add(&self, counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// quinn statistics of connections that have closed, so totals survive them.
#[derive(Default)]
struct ClosedTotals {
    /// DATAGRAM frames sent.
    datagrams_sent: u64,
    /// DATAGRAM frames received.
    datagrams_received: u64,
    /// UDP payload bytes sent.
    bytes_sent: u64,
    /// UDP payload bytes received.
    bytes_received: u64,
}

impl ClosedTotals {
    fn add(&mut self, stats: &quinn::ConnectionStats) {
        self.datagrams_sent += stats.frame_tx.datagram;
        self.datagrams_received += stats.frame_rx.datagram;
        self.bytes_sent += stats.udp_tx.bytes;
        self.bytes_received += stats.udp_rx.bytes;
    }
}

/// A shared, in-progress dial: every caller for the address awaits the same one.
type Dial = Shared<BoxFuture<'static, Result<Conn, TransportError>>>;

/// What the cache holds for an address.
enum Slot {
    /// A connection to reuse (checked for liveness on use).
    Ready(Conn),
    /// A dial in progress; `id` tells its task whether the slot is still its own.
    Dialing {
        /// Which dial owns the slot.
        id: u64,
        /// Its shared result.
        dial: Dial,
    },
}

/// Everything behind the endpoint's one lock.
#[derive(Default)]
struct State {
    /// The connection cache, by peer address.
    slots: HashMap<SocketAddr, Slot>,
    /// Every open connection by stable id, cached or not (a pair that dialed each other at
    /// once has two; only one is cached).
    live: HashMap<usize, Conn>,
    /// Counters of closed connections.
    closed: ClosedTotals,
    /// Addresses whose last dials failed, with their back-off (bounded by
    /// [`DIAL_BACKOFF_PEERS_MAX`]).
    backoff: HashMap<SocketAddr, DialBackoff>,
    /// The id of the next dial.
    next_dial_id: u64,
    /// Set by shutdown (or drop): nothing new is dialed or cached.
    shut: bool,
}

impl State {
    /// Connections open plus dials in progress.
    fn connection_count(&self) -> usize {
        let dialing = self
            .slots
            .values()
            .filter(|slot| matches!(slot, Slot::Dialing { .. }))
            .count();
        self.live.len() + dialing
    }
}

/// The back-off of an address whose dials fail.
#[derive(Debug, Clone, Copy)]
struct DialBackoff {
    /// Failed dials in a row.
    failures: u32,
    /// No dial before this.
    until: Instant,
}

/// What the endpoint's tasks share.
struct Inner {
    /// The one quinn endpoint (and UDP socket), server and client.
    endpoint: quinn::Endpoint,
    /// TLS and transport settings for dials; replaced by [`Transport::reload_tls`]. Read (and
    /// cloned, a few `Arc`s) per dial; never held across an `.await`.
    client_config: RwLock<quinn::ClientConfig>,
    /// The transport settings every server and client configuration carries.
    transport_config: Arc<quinn::TransportConfig>,
    /// Limits the log lines about failed incoming handshakes per remote address.
    handshake_log: LogThrottle,
    /// Our identity, from our certificate.
    identity: PeerIdentity,
    /// `<region>.<tier>.strata`, the name every dial verifies.
    server_name: String,
    /// The options the endpoint was bound with.
    options: TransportOptions,
    /// The cache, the live set and the totals; never held across an `.await`.
    state: Mutex<State>,
    /// Event counters, shared with every [`Conn`].
    counters: Arc<Counters>,
    /// New connections for [`Transport::accept`].
    new_connections: mpsc::Sender<Conn>,
    /// Bounds incoming handshakes in progress ([`HANDSHAKES_IN_FLIGHT_MAX`]).
    handshake_permits: Arc<Semaphore>,
    /// Every task the endpoint spawns: the accept loop, handshakes, dials, watchers.
    tasks: TaskTracker,
    /// Cancelled by shutdown or drop; stops the accept loop and `accept`.
    shutdown: CancellationToken,
}

/// The handle's own part: dropping the last [`Transport`] closes the endpoint.
struct Handle {
    /// What the tasks share.
    inner: Arc<Inner>,
    /// The bound address.
    local_addr: SocketAddr,
    /// The receiving end of the new-connection queue. An async mutex: `accept` waits on the
    /// queue while holding it, so concurrent `accept` calls take turns.
    new_connections: tokio::sync::Mutex<mpsc::Receiver<Conn>>,
}

impl Drop for Handle {
    fn drop(&mut self) {
        self.inner.close_all(b"transport dropped");
    }
}

/// A node's QUIC endpoint. Cheap to clone; the endpoint closes when the last clone is dropped
/// (call [`Transport::shutdown`] to close it gracefully).
#[derive(Clone)]
pub struct Transport {
    /// Shared by the clones; its drop closes the endpoint.
    handle: Arc<Handle>,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("identity", &self.handle.inner.identity)
            .field("local_addr", &self.handle.local_addr)
            .finish_non_exhaustive()
    }
}

impl Transport {
    /// Binds the UDP socket at `listen` and starts accepting. Must be called inside a tokio
    /// runtime.
    pub fn bind(
        listen: SocketAddr,
        tls: TlsConfig,
        options: TransportOptions,
    ) -> Result<Transport, TransportError> {
        tokio::runtime::Handle::try_current().map_err(|e| {
            TransportError::io(format!("binding UDP {listen}"), std::io::Error::other(e))
        })?;
        let transport_config = Arc::new(options.quinn_transport_config()?);
        let (server_config, client_config) = quic_configs(&tls, &transport_config)?;

        let bind_error = |e| TransportError::io(format!("binding UDP {listen}"), e);
        let socket = std::net::UdpSocket::bind(listen).map_err(bind_error)?;
        let runtime = quinn::default_runtime()
            .ok_or_else(|| bind_error(std::io::Error::other("no async runtime")))?;
        // The reset key comes from the private key, not quinn's random default: see the
        // module doc.
        let mut endpoint_config = quinn::EndpointConfig::new(tls.stateless_reset_key());
        endpoint_config.cid_generator(|| Box::new(super::reset::RandomCids));
        let endpoint = quinn::Endpoint::new(endpoint_config, Some(server_config), socket, runtime)
            .map_err(bind_error)?;
        let local_addr = endpoint
            .local_addr()
            .map_err(|e| TransportError::io(format!("binding UDP {listen}"), e))?;
        let (tx, rx) = mpsc::channel(NEW_CONNECTIONS_QUEUE_MAX);
        let identity = tls.identity().clone();
        let inner = Arc::new(Inner {
            endpoint,
            client_config: RwLock::new(client_config),
            transport_config,
            handshake_log: LogThrottle::new(),
            server_name: identity.cluster_name(),
            identity,
            options,
            state: Mutex::new(State::default()),
            counters: Arc::new(Counters::default()),
            new_connections: tx,
            handshake_permits: Arc::new(Semaphore::new(HANDSHAKES_IN_FLIGHT_MAX)),
            tasks: TaskTracker::new(),
            shutdown: CancellationToken::new(),
        });
        inner.tasks.spawn(inner.clone().accept_loop());
        debug!(identity = %inner.identity, %local_addr, "transport bound");
        Ok(Transport {
            handle: Arc::new(Handle {
                inner,
                local_addr,
                new_connections: tokio::sync::Mutex::new(rx),
            }),
        })
    }

    /// The address the UDP socket is bound to (with the real port if bound to port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.handle.local_addr
    }

    /// This node's identity.
    pub fn identity(&self) -> &PeerIdentity {
        &self.handle.inner.identity
    }

    /// Swaps in renewed TLS material: connections accepted or dialed from now on present the
    /// new certificate and check peers against the new CA; open connections keep theirs until
    /// they close. Refused, changing nothing, if the new certificate names another identity
    /// (a node cannot change who it is while it runs) or does not build a configuration.
    pub fn reload_tls(&self, tls: &TlsConfig) -> Result<(), TransportError> {
        let inner = &self.handle.inner;
        if tls.identity() != &inner.identity {
            return Err(TransportError::PeerRejected {
                peer: tls.identity().clone(),
                expected: format!("the identity this node runs as, {}", inner.identity),
            });
        }
        let (server_config, client_config) = quic_configs(tls, &inner.transport_config)?;
        inner.endpoint.set_server_config(Some(server_config));
        *inner
            .client_config
            .write()
            .unwrap_or_else(PoisonError::into_inner) = client_config;
        inner.counters.add(&inner.counters.tls_reloads);
        Ok(())
    }

    /// A connection to `addr`: the cached one if it is alive, else a new dial.
    ///
    /// Concurrent callers for one address share one dial, and all get its result. A failed
    /// dial is not cached: the next call dials again (callers should back off). The dial
    /// verifies the server name `<region>.<tier>.strata` of our own cluster and the peer's
    /// identity, and completes only after the peer has accepted our certificate.
    pub async fn connect(&self, addr: SocketAddr) -> Result<Conn, TransportError> {
        let addr = normalize(addr);
        let inner = &self.handle.inner;
        let dial = {
            let mut state = inner.state();
            if state.shut {
                return Err(TransportError::Shutdown);
            }
            match state.slots.get(&addr) {
                Some(Slot::Ready(conn)) if !conn.is_closed() => return Ok(conn.clone()),
                // A dial whose result is already out has updated the slot itself; one still
                // here means its task died, so it is dialed again.
                Some(Slot::Dialing { dial, .. }) if dial.peek().is_none() => dial.clone(),
                _ => {
                    if let Some(backoff) = state.backoff.get(&addr) {
                        let now = Instant::now();
                        if backoff.until > now {
                            inner.counters.add(&inner.counters.dials_backed_off);
                            return Err(TransportError::BackingOff {
                                addr,
                                failures: backoff.failures,
                                retry_in: backoff.until - now,
                            });
                        }
                    }
                    inner.start_dial(&mut state, addr)?
                }
            }
        };
        dial.await
    }

    /// The next new connection, incoming or outgoing, once its handshake completed and its
    /// identity was verified; each connection is yielded exactly once. `None` after shutdown.
    ///
    /// Failed incoming handshakes are logged and counted, never returned. Call this in a loop
    /// and serve each connection's streams and datagrams: peers send on connections either side
    /// dialed. Connections wait in a bounded queue until accepted.
    pub async fn accept(&self) -> Option<Conn> {
        let inner = &self.handle.inner;
        let mut new_connections = self.handle.new_connections.lock().await;
        loop {
            let conn = tokio::select! {
                _ = inner.shutdown.cancelled() => return None,
                conn = new_connections.recv() => conn?,
            };
            if !conn.is_closed() {
                return Some(conn);
            }
        }
    }

    /// Drops the cached connection to `addr` and closes every connection to it. A dial in
    /// progress completes with [`TransportError::Cancelled`] and its connection is closed.
    pub fn forget(&self, addr: SocketAddr) {
        let addr = normalize(addr);
        let mut state = self.handle.inner.state();
        state.slots.remove(&addr);
        for conn in state.live.values().filter(|c| c.remote_addr() == addr) {
            conn.close(CLOSE_FORGOTTEN, b"forgotten");
        }
    }

    /// Tells the endpoint that the peer at `addr` (re)started at `started`, by its own wall
    /// clock (its membership incarnation). A cached connection established before then
    /// cannot lead to that process: it is dropped from the cache (not closed, in case the
    /// clocks disagree and it is alive; a dead one ends by stateless reset or idle timeout),
    /// and the address's dial back-off is cleared, so the next `connect` dials at once.
    /// Returns whether a cached connection was retired.
    pub fn peer_restarted(&self, addr: SocketAddr, started: SystemTime) -> bool {
        let addr = normalize(addr);
        let inner = &self.handle.inner;
        let mut state = inner.state();
        state.backoff.remove(&addr);
        let stale = matches!(
            state.slots.get(&addr),
            Some(Slot::Ready(conn)) if conn.established() < started
        );
        if stale {
            state.slots.remove(&addr);
            inner.counters.add(&inner.counters.superseded);
            drop(state);
            debug!(%addr, "cached connection predates the peer's restart; retired");
        }
        stale
    }

    /// Closes every connection and the endpoint, then waits (at most two seconds) for the
    /// closes to reach the peers and the endpoint's tasks to end. Afterwards `connect` fails
    /// with [`TransportError::Shutdown`] and `accept` returns `None`.
    pub async fn shutdown(&self) {
        let inner = &self.handle.inner;
        inner.close_all(b"shutdown");
        inner.tasks.close();
        let idle = async {
            inner.endpoint.wait_idle().await;
            inner.tasks.wait().await;
        };
        if tokio::time::timeout(SHUTDOWN_WAIT_MAX, idle).await.is_err() {
            warn!(
                identity = %inner.identity,
                "transport shutdown did not finish within {SHUTDOWN_WAIT_MAX:?}"
            );
        }
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> TransportStats {
        let inner = &self.handle.inner;
        let c = &inner.counters;
        let load = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        let state = inner.state();
        let mut totals = ClosedTotals {
            datagrams_sent: state.closed.datagrams_sent,
            datagrams_received: state.closed.datagrams_received,
            bytes_sent: state.closed.bytes_sent,
            bytes_received: state.closed.bytes_received,
        };
        for conn in state.live.values() {
            totals.add(&conn.connection().stats());
        }
        TransportStats {
            connections_open: state.live.len() as u64,
            connections_accepted_total: load(&c.accepted),
            connections_dialed_total: load(&c.dialed),
            handshakes_failed_total: load(&c.handshakes_failed),
            dials_failed_total: load(&c.dials_failed),
            dials_attempted_total: load(&c.dials_attempted),
            dials_backed_off_total: load(&c.dials_backed_off),
            tls_reloads_total: load(&c.tls_reloads),
            connections_refused_total: load(&c.refused),
            connections_superseded_total: load(&c.superseded),
            connections_reset_total: load(&c.reset),
            datagrams_sent_total: totals.datagrams_sent,
            datagrams_received_total: totals.datagrams_received,
            streams_opened_total: load(&c.streams_opened),
            streams_accepted_total: load(&c.streams_accepted),
            bytes_sent_total: totals.bytes_sent,
            bytes_received_total: totals.bytes_received,
        }
    }
}

impl Inner {
    fn state(&self) -> MutexGuard<'_, State> {
        // A panic while the lock was held cannot leave the maps inconsistent in a way that
        // matters more than stopping would: keep going with what is there.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the endpoint shut and closes everything, without waiting.
    fn close_all(&self, reason: &[u8]) {
        {
            let mut state = self.state();
            state.shut = true;
            state.slots.clear();
        }
        self.shutdown.cancel();
        self.endpoint
            .close(quinn::VarInt::from_u32(CLOSE_SHUTDOWN), reason);
    }

    /// Registers a dial for `addr` in the cache and spawns it.
    fn start_dial(
        self: &Arc<Self>,
        state: &mut State,
        addr: SocketAddr,
    ) -> Result<Dial, TransportError> {
        if state.connection_count() >= self.options.max_connections {
            return Err(TransportError::TooManyConnections {
                limit: self.options.max_connections,
            });
        }
        let id = state.next_dial_id;
        state.next_dial_id += 1;
        self.counters.add(&self.counters.dials_attempted);
        // The dial runs in its own task, so it completes (and updates the cache) even if every
        // caller waiting on it is cancelled.
        let task = self.tasks.spawn(self.clone().dial(addr, id));
        let dial = async move {
            task.await
                .unwrap_or_else(|_| Err(TransportError::Cancelled { addr }))
        }
        .boxed()
        .shared();
        state.slots.insert(
            addr,
            Slot::Dialing {
                id,
                dial: dial.clone(),
            },
        );
        Ok(dial)
    }

    /// Dials `addr` with the connect timeout and settles the cache slot `id`.
    async fn dial(self: Arc<Self>, addr: SocketAddr, id: u64) -> Result<Conn, TransportError> {
        let after = self.options.connect_timeout;
        let result = tokio::time::timeout(after, self.handshake_outgoing(addr))
            .await
            .unwrap_or(Err(TransportError::Timeout { addr, after }));
        let mut state = self.state();
        let ours = matches!(state.slots.get(&addr), Some(Slot::Dialing { id: i, .. }) if *i == id);
        let result = match result {
            Ok(conn) if ours && !state.shut => {
                state.slots.insert(addr, Slot::Ready(conn.clone()));
                self.track(&mut state, &conn);
                self.counters.add(&self.counters.dialed);
                if let Some(backoff) = state.backoff.remove(&addr) {
                    drop(state);
                    tracing::info!(%addr, failures = backoff.failures, "peer reachable again");
                }
                return Ok(conn);
            }
            Ok(conn) => {
                conn.close(CLOSE_CANCELLED, b"dial cancelled");
                if state.shut {
                    Err(TransportError::Shutdown)
                } else {
                    Err(TransportError::Cancelled { addr })
                }
            }
            Err(e) => {
                if ours {
                    state.slots.remove(&addr);
                }
                let step = if state.shut {
                    None
                } else {
                    Some(back_off(&mut state, addr))
                };
                drop(state);
                self.counters.add(&self.counters.dials_failed);
                match step {
                    // One line per doubling of the pause (1st, 2nd, 4th, 8th... failure), not
                    // per attempt: a peer that stays broken costs a handful of lines.
                    Some((failures, pause)) if failures.is_power_of_two() => warn!(
                        %addr, failures, next_dial_in = ?pause, error = %e,
                        "dial failed; backing off"
                    ),
                    _ => debug!(%addr, error = %e, "dial failed"),
                }
                return Err(e);
            }
        };
        drop(state);
        self.counters.add(&self.counters.dials_failed);
        if let Err(e) = &result {
            debug!(%addr, error = %e, "dial failed");
        }
        result
    }

    /// Handshake, identity, hello: a connection the peer has accepted.
    async fn handshake_outgoing(&self, addr: SocketAddr) -> Result<Conn, TransportError> {
        let lost = |source| TransportError::Connection { addr, source };
        let client_config = self
            .client_config
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let connecting = self
            .endpoint
            .connect_with(client_config, addr, &self.server_name)
            .map_err(|source| TransportError::Connect { addr, source })?;
        let conn = connecting.await.map_err(lost)?;
        let peer = self.verified_peer(&conn)?;
        // The acceptor's first stream is its hello, sent once it has accepted our certificate.
        let mut hello = conn.accept_uni().await.map_err(lost)?;
        match read_frame(&mut hello, 0).await? {
            Some(frame) if frame.kind == HELLO_KIND => {}
            other => {
                return Err(TransportError::Protocol {
                    addr,
                    reason: format!("expected a hello frame first, got {other:?}"),
                });
            }
        }
        Ok(Conn::new(
            conn,
            peer,
            addr,
            Direction::Outgoing,
            self.counters.clone(),
        ))
    }

    /// The peer's identity, re-checked (the TLS verifiers already refused any other cluster;
    /// this keeps a configuration mistake from becoming a silent cross-cluster link).
    fn verified_peer(&self, conn: &quinn::Connection) -> Result<PeerIdentity, TransportError> {
        let peer = peer_identity(conn).ok_or_else(|| {
            TransportError::Certificate("the peer's certificate names no strata identity".into())
        })?;
        if !self.identity.same_cluster(&peer) {
            return Err(TransportError::PeerRejected {
                peer,
                expected: format!(
                    "a {} node of region {}",
                    self.identity.tier, self.identity.region
                ),
            });
        }
        Ok(peer)
    }

    /// Hands every incoming connection to a handshake task, at most
    /// [`HANDSHAKES_IN_FLIGHT_MAX`] at once.
    async fn accept_loop(self: Arc<Self>) {
        loop {
            let permit = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                permit = self.handshake_permits.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
            };
            let incoming = tokio::select! {
                _ = self.shutdown.cancelled() => break,
                incoming = self.endpoint.accept() => match incoming {
                    Some(incoming) => incoming,
                    None => break,
                },
            };
            let inner = self.clone();
            self.tasks.spawn(async move {
                inner.handshake_incoming(incoming).await;
                drop(permit);
            });
        }
        debug!(identity = %self.identity, "accept loop stopped");
    }

    /// Completes (or refuses) one incoming connection; failures are logged and counted.
    async fn handshake_incoming(self: Arc<Self>, incoming: quinn::Incoming) {
        let remote = normalize(incoming.remote_address());
        let full = {
            let state = self.state();
            state.shut || state.connection_count() >= self.options.max_connections
        };
        if full {
            incoming.refuse();
            self.counters.add(&self.counters.refused);
            if let Some(suppressed) = self.handshake_log.admit(remote.ip(), Instant::now()) {
                warn!(%remote, limit = self.options.max_connections, suppressed, "incoming connection refused: connection limit");
            }
            return;
        }
        let after = self.options.connect_timeout;
        let result = tokio::time::timeout(after, self.complete_incoming(incoming, remote))
            .await
            .unwrap_or(Err(TransportError::Timeout {
                addr: remote,
                after,
            }));
        match result {
            Ok(conn) => self.register_incoming(conn),
            Err(e) => {
                self.counters.add(&self.counters.handshakes_failed);
                // The peer sets the rate; log once per remote per interval.
                if let Some(suppressed) = self.handshake_log.admit(remote.ip(), Instant::now()) {
                    warn!(%remote, error = %e, suppressed, "incoming handshake failed");
                } else {
                    debug!(%remote, error = %e, "incoming handshake failed");
                }
            }
        }
    }

    async fn complete_incoming(
        &self,
        incoming: quinn::Incoming,
        remote: SocketAddr,
    ) -> Result<Conn, TransportError> {
        let lost = |source| TransportError::Connection {
            addr: remote,
            source,
        };
        let conn = incoming.accept().map_err(lost)?.await.map_err(lost)?;
        let peer = self.verified_peer(&conn)?;
        let mut hello = conn.open_uni().await.map_err(lost)?;
        write_frame(&mut hello, &Frame::new(HELLO_KIND, Bytes::new())).await?;
        hello.finish()?;
        Ok(Conn::new(
            conn,
            peer,
            remote,
            Direction::Incoming,
            self.counters.clone(),
        ))
    }

    /// Caches an accepted connection in place of any cached one (see the module doc: the
    /// peer dialed, so it no longer uses the old one; the old one stays open), unless a dial is
    /// in progress. The two connections of a pair that dialed each other at once both stay
    /// open and served.
    fn register_incoming(self: &Arc<Self>, conn: Conn) {
        let mut state = self.state();
        if state.shut {
            conn.close(CLOSE_SHUTDOWN, b"shutdown");
            return;
        }
        let addr = conn.remote_addr();
        let replaced = match state.slots.get(&addr) {
            Some(Slot::Dialing { .. }) => None,
            Some(Slot::Ready(existing)) => Some(Some(existing.stable_id())),
            None => Some(None),
        };
        if let Some(old) = replaced {
            state.slots.insert(addr, Slot::Ready(conn.clone()));
            if let Some(old) = old {
                self.counters.add(&self.counters.superseded);
                debug!(remote = %addr, old, new = conn.stable_id(), "incoming connection replaces the cached one");
            }
        }
        // The peer reached us, so it is up: dial it again without waiting.
        state.backoff.remove(&addr);
        self.track(&mut state, &conn);
        self.counters.add(&self.counters.accepted);
        debug!(peer = %conn.peer(), remote = %addr, "connection accepted");
    }

    /// Adds a connection to the live set and starts its watcher.
    fn track(self: &Arc<Self>, state: &mut State, conn: &Conn) {
        state.live.insert(conn.stable_id(), conn.clone());
        self.tasks.spawn(self.clone().watch(conn.clone()));
    }

    /// Hands `conn` to [`Transport::accept`], waits for it to close, then removes it from the
    /// cache and the live set and keeps its counters.
    async fn watch(self: Arc<Self>, conn: Conn) {
        tokio::select! {
            biased;
            _ = conn.closed() => {}
            // An error means the transport is gone; the close below follows.
            _ = self.new_connections.send(conn.clone()) => {}
        }
        let reason = conn.closed().await;
        if matches!(reason, quinn::ConnectionError::Reset) {
            self.counters.add(&self.counters.reset);
            debug!(peer = %conn.peer(), remote = %conn.remote_addr(), "connection reset: the peer restarted");
        }
        let stats = conn.connection().stats();
        {
            let mut state = self.state();
            if state.live.remove(&conn.stable_id()).is_some() {
                state.closed.add(&stats);
            }
            let addr = conn.remote_addr();
            if matches!(state.slots.get(&addr), Some(Slot::Ready(c)) if c.stable_id() == conn.stable_id())
            {
                state.slots.remove(&addr);
            }
        }
        debug!(peer = %conn.peer(), remote = %conn.remote_addr(), %reason, "connection closed");
    }
}

/// Records a failed dial of `addr`: the next pause, doubling from [`DIAL_BACKOFF_MIN`] to
/// [`DIAL_BACKOFF_MAX`], jittered. Returns the failures in a row and the pause.
fn back_off(state: &mut State, addr: SocketAddr) -> (u32, Duration) {
    let now = Instant::now();
    if !state.backoff.contains_key(&addr)
        && state.backoff.len() >= DIAL_BACKOFF_PEERS_MAX
        && let Some(first) = state
            .backoff
            .iter()
            .min_by_key(|(_, b)| b.until)
            .map(|(a, _)| *a)
    {
        state.backoff.remove(&first);
    }
    let failures = state
        .backoff
        .get(&addr)
        .map_or(1, |b| b.failures.saturating_add(1));
    let pause = crate::backoff::jittered(
        DIAL_BACKOFF_MIN,
        DIAL_BACKOFF_MAX,
        failures,
        &mut rand::rng(),
    );
    state.backoff.insert(
        addr,
        DialBackoff {
            failures,
            until: now + pause,
        },
    );
    (failures, pause)
}

/// The quinn server and client configurations of `tls`, with the endpoint's transport
/// settings.
fn quic_configs(
    tls: &TlsConfig,
    transport_config: &Arc<quinn::TransportConfig>,
) -> Result<(quinn::ServerConfig, quinn::ClientConfig), TransportError> {
    let mut server_config = tls.quic_server_config()?;
    server_config.transport_config(transport_config.clone());
    // Peers have fixed addresses, and the cache is keyed by them: a peer that changed
    // address must reconnect (and so show up under its new address).
    server_config.migration(false);
    let mut client_config = tls.quic_client_config()?;
    client_config.transport_config(transport_config.clone());
    Ok((server_config, client_config))
}

/// The cache key for an address: IPv4-mapped IPv6 addresses become IPv4, so a peer reached
/// through a dual-stack socket and one dialed by its IPv4 address share an entry.
fn normalize(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::new(v4.into(), v6.port()),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}
