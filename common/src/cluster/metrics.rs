//! The cluster driver's metrics: membership, datagrams, broadcast, received changes, the apply
//! worker, replication lag, sync sessions and the quarantine. The driver owns them; node
//! assembly registers them through the one registry (`crate::metrics`) with every other
//! layer's series.

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeLabelValue, EncodeMetric, LabelValueEncoder,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Unit;

use crate::metrics::{MetricsBuilder, ReasonLabel, seconds_histogram};

/// Upper bounds of [`ClusterMetrics::apply_batch_changesets`]: powers of two from 1 to 16,384, the
/// range between a single broadcast changeset and a large anti-entropy chunk.
const APPLY_BATCH_CHANGESETS_BUCKETS: u16 = 15;

/// Upper bounds of [`ClusterMetrics::replication_lag_seconds`], 0.5 ms (same host, idle) to 60 s (a
/// node catching up after a partition), in 1-2.5-5 steps.
const LAG_SECONDS_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// A membership change, the `event` label of [`ClusterMetrics::member_events`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberEvent {
    /// A member became live (`up`).
    Up,
    /// A member was declared down (`down`).
    Down,
}

impl MemberEvent {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            MemberEvent::Up => "up",
            MemberEvent::Down => "down",
        }
    }
}

/// How a changeset arrived, the `via` label of [`ClusterMetrics::changesets_received`] and
/// [`ClusterMetrics::bytes_received`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    /// Pushed by a broadcast (`broadcast`).
    Broadcast,
    /// Pulled by an anti-entropy sync session (`sync`).
    Sync,
}

impl Via {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Broadcast => "broadcast",
            Via::Sync => "sync",
        }
    }
}

/// Which side of a sync session this node is, the `role` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// This node asked for the session (`client`).
    Client,
    /// A peer asked this node (`server`).
    Server,
}

impl Role {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
        }
    }
}

/// How a sync session ended, the `result` label of [`ClusterMetrics::sync_sessions`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SyncResult {
    /// Everything missing was exchanged (`complete`).
    Complete,
    /// Some chunks arrived before the session stopped (`partial`).
    Partial,
    /// Nothing useful was exchanged (`failed`).
    Failed,
    /// The server refused: too many sessions at once (`busy`).
    Busy,
}

impl SyncResult {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            SyncResult::Complete => "complete",
            SyncResult::Partial => "partial",
            SyncResult::Failed => "failed",
            SyncResult::Busy => "busy",
        }
    }
}

// The derive of `EncodeLabelValue` writes the variant's identifier (`Up`); Prometheus label
// values are lower case by convention, so these are written by hand.
macro_rules! label_value_as_str {
    ($($ty:ty),*) => {$(
        impl EncodeLabelValue for $ty {
            fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), fmt::Error> {
                EncodeLabelValue::encode(&self.as_str(), encoder)
            }
        }
    )*};
}
label_value_as_str!(MemberEvent, Via, Role, SyncResult);

/// Labels of [`ClusterMetrics::member_events`]: `event`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct EventLabel {
    /// Up or down.
    pub event: MemberEvent,
}

/// Labels of [`ClusterMetrics::changesets_received`] and [`ClusterMetrics::bytes_received`]: `via`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ViaLabel {
    /// Broadcast or sync.
    pub via: Via,
}

/// Labels of [`ClusterMetrics::sync_sessions`]: `role` and `result`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct SyncLabels {
    /// Client or server.
    pub role: Role,
    /// How the session ended.
    pub result: SyncResult,
}

/// Labels of [`ClusterMetrics::sync_sessions_active`]: `role`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RoleLabel {
    /// Client or server.
    pub role: Role,
}

impl EventLabel {
    /// `event="up"`.
    pub fn up() -> EventLabel {
        EventLabel {
            event: MemberEvent::Up,
        }
    }

    /// `event="down"`.
    pub fn down() -> EventLabel {
        EventLabel {
            event: MemberEvent::Down,
        }
    }
}

impl ViaLabel {
    /// `via="broadcast"`.
    pub fn broadcast() -> ViaLabel {
        ViaLabel {
            via: Via::Broadcast,
        }
    }

    /// `via="sync"`.
    pub fn sync() -> ViaLabel {
        ViaLabel { via: Via::Sync }
    }
}

impl SyncLabels {
    /// `role="<role>",result="<result>"`.
    pub fn new(role: Role, result: SyncResult) -> SyncLabels {
        SyncLabels { role, result }
    }
}

impl RoleLabel {
    /// `role="client"`.
    pub fn client() -> RoleLabel {
        RoleLabel { role: Role::Client }
    }

    /// `role="server"`.
    pub fn server() -> RoleLabel {
        RoleLabel { role: Role::Server }
    }
}

/// The cluster driver's series.
///
/// The fields are handles: updating one is an atomic operation, and cloning one yields
/// another handle to the same series. Share the whole value as `Arc<ClusterMetrics>`.
#[derive(Debug)]
pub struct ClusterMetrics {
    /// `strata_members`: live members, not counting this node.
    pub members: Gauge,
    /// `strata_member_events_total{event}`: members that came up or went down.
    pub member_events: Family<EventLabel, Counter>,
    /// `strata_swim_backlog`: membership updates still waiting to be gossiped.
    pub swim_backlog: Gauge,

    /// `strata_datagrams_sent_total`: membership datagrams sent.
    pub datagrams_sent: Counter,
    /// `strata_datagrams_received_total`: membership datagrams received.
    pub datagrams_received: Counter,
    /// `strata_datagrams_dropped_total{reason}`: datagrams dropped, sent or received.
    pub datagrams_dropped: Family<ReasonLabel, Counter>,

    /// `strata_broadcast_changesets_sent_total`: changesets pushed to peers (one per peer).
    pub broadcast_changesets_sent: Counter,
    /// `strata_broadcast_sent_bytes_total`: bytes of changesets pushed to peers.
    pub broadcast_bytes_sent: Counter,
    /// `strata_broadcast_dropped_total{reason}`: broadcasts not sent (anti-entropy repairs them).
    pub broadcast_dropped: Family<ReasonLabel, Counter>,

    /// `strata_changesets_received_total{via}`: changesets received from peers.
    pub changesets_received: Family<ViaLabel, Counter>,
    /// `strata_changesets_received_bytes_total{via}`: bytes of changesets received.
    pub bytes_received: Family<ViaLabel, Counter>,
    /// `strata_changesets_duplicate_total`: received changesets that were already known.
    pub changesets_duplicate: Counter,

    /// `strata_apply_batches_total`: write transactions that applied remote changesets.
    pub apply_batches: Counter,
    /// `strata_apply_batch_changesets`: changesets per applied batch.
    pub apply_batch_changesets: Histogram,
    /// `strata_apply_seconds`: time to apply one batch.
    pub apply_seconds: Histogram,
    /// `strata_apply_queue_depth`: changesets waiting to be applied.
    pub apply_queue_depth: Gauge,
    /// `strata_apply_dropped_total`: changesets not queued because the apply queue was full
    /// (anti-entropy fetches them again).
    pub apply_dropped: Counter,

    /// `strata_replication_lag_seconds`: from a change's commit at its origin to its apply here.
    pub replication_lag_seconds: Histogram,
    /// The largest recent lag, in milliseconds, set by the replication code. Exposed in base
    /// units as `strata_replication_lag_max_seconds`.
    pub replication_lag_max_ms: Gauge,

    /// `strata_sync_sessions_total{role,result}`: anti-entropy sessions finished.
    pub sync_sessions: Family<SyncLabels, Counter>,
    /// `strata_sync_sessions_active{role}`: anti-entropy sessions running.
    pub sync_sessions_active: Family<RoleLabel, Gauge>,

    /// `strata_peer_queue_depth`: messages queued for peers, all peers together.
    pub peer_queue_depth: Gauge,

    /// `strata_caught_up`: 1 once the node has caught up with its peers, else 0.
    pub caught_up: Gauge,

    /// `strata_quarantined_versions`: versions this node could not apply or fetch, waiting for
    /// their next attempt.
    pub quarantined_versions: Gauge,
    /// `strata_quarantined_total`: versions put into quarantine (each once).
    pub quarantined: Counter,
    /// `strata_quarantine_full_total`: versions not quarantined because the set was full.
    pub quarantine_full: Counter,
    /// `strata_sync_unservable_total`: versions skipped while serving sync because they do not
    /// fit a frame.
    pub sync_unservable: Counter,
}

impl ClusterMetrics {
    /// Registers the cluster driver's series with `b` (node assembly does this once per node).
    pub fn register(b: &mut MetricsBuilder) -> ClusterMetrics {
        let replication_lag_max_ms = Gauge::default();
        let metrics = ClusterMetrics {
            members: b.add(
                "members",
                "Live cluster members, not counting this node",
                Gauge::default(),
            ),
            member_events: b.add(
                "member_events",
                "Members that came up or went down",
                Family::default(),
            ),
            swim_backlog: b.add(
                "swim_backlog",
                "Membership updates still waiting to be gossiped",
                Gauge::default(),
            ),

            datagrams_sent: b.add(
                "datagrams_sent",
                "Membership datagrams sent",
                Counter::default(),
            ),
            datagrams_received: b.add(
                "datagrams_received",
                "Membership datagrams received",
                Counter::default(),
            ),
            datagrams_dropped: b.add(
                "datagrams_dropped",
                "Datagrams dropped, by reason",
                Family::default(),
            ),

            broadcast_changesets_sent: b.add(
                "broadcast_changesets_sent",
                "Changesets pushed to peers, one per peer",
                Counter::default(),
            ),
            broadcast_bytes_sent: b.add_with_unit(
                "broadcast_sent",
                "Bytes of changesets pushed to peers",
                Unit::Bytes,
                Counter::default(),
            ),
            broadcast_dropped: b.add(
                "broadcast_dropped",
                "Broadcasts not sent, by reason; anti-entropy repairs them",
                Family::default(),
            ),

            changesets_received: b.add(
                "changesets_received",
                "Changesets received from peers, by path",
                Family::default(),
            ),
            bytes_received: b.add_with_unit(
                "changesets_received",
                "Bytes of changesets received from peers, by path",
                Unit::Bytes,
                Family::default(),
            ),
            changesets_duplicate: b.add(
                "changesets_duplicate",
                "Received changesets that were already known",
                Counter::default(),
            ),

            apply_batches: b.add(
                "apply_batches",
                "Transactions that applied remote changesets",
                Counter::default(),
            ),
            apply_batch_changesets: b.add(
                "apply_batch_changesets",
                "Changesets per applied batch",
                Histogram::new(exponential_buckets(
                    1.0,
                    2.0,
                    APPLY_BATCH_CHANGESETS_BUCKETS,
                )),
            ),
            apply_seconds: b.add_with_unit(
                "apply",
                "Time to apply one batch of remote changesets",
                Unit::Seconds,
                seconds_histogram(),
            ),
            apply_queue_depth: b.add(
                "apply_queue_depth",
                "Changesets waiting to be applied",
                Gauge::default(),
            ),
            apply_dropped: b.add(
                "apply_dropped",
                "Changesets not queued because the apply queue was full",
                Counter::default(),
            ),

            replication_lag_seconds: b.add_with_unit(
                "replication_lag",
                "Time from a change's commit at its origin to its apply on this node",
                Unit::Seconds,
                Histogram::new(LAG_SECONDS_BUCKETS),
            ),
            replication_lag_max_ms: replication_lag_max_ms.clone(),

            sync_sessions: b.add(
                "sync_sessions",
                "Anti-entropy sessions finished",
                Family::default(),
            ),
            sync_sessions_active: b.add(
                "sync_sessions_active",
                "Anti-entropy sessions running",
                Family::default(),
            ),

            peer_queue_depth: b.add(
                "peer_queue_depth",
                "Messages queued for peers, all peers together",
                Gauge::default(),
            ),

            caught_up: b.add(
                "caught_up",
                "1 once the node has caught up with its peers, else 0",
                Gauge::default(),
            ),
            quarantined_versions: b.add(
                "quarantined_versions",
                "Versions this node could not apply or fetch, retried with back-off",
                Gauge::default(),
            ),
            quarantined: b.add(
                "quarantined",
                "Versions put into quarantine",
                Counter::default(),
            ),
            quarantine_full: b.add(
                "quarantine_full",
                "Versions not quarantined because the quarantine was full",
                Counter::default(),
            ),
            sync_unservable: b.add(
                "sync_unservable",
                "Versions skipped while serving sync because they do not fit a frame",
                Counter::default(),
            ),
        };
        // The milliseconds gauge is set by the driver; the exposition converts it to base units.
        b.add_collector(
            "replication_lag_max_seconds",
            Box::new(LagMaxCollector {
                gauge_ms: replication_lag_max_ms,
            }),
        );
        metrics.zero_known_series();
        metrics
    }

    /// The driver's series registered nowhere: updates work and are never exposed (for tests
    /// and the simulator, which drive the cluster without a node).
    pub fn unregistered() -> ClusterMetrics {
        ClusterMetrics::register(&mut MetricsBuilder::new("", "", ""))
    }

    /// Creates the series of every fixed label combination at zero, so that dashboards and
    /// `rate()` see them before the first event rather than a missing series.
    fn zero_known_series(&self) {
        // `get_or_create` alone creates the series; `inc_by(0)` / `set(0)` release its guard at once.
        for event in [MemberEvent::Up, MemberEvent::Down] {
            self.member_events
                .get_or_create(&EventLabel { event })
                .inc_by(0);
        }
        for via in [Via::Broadcast, Via::Sync] {
            self.changesets_received
                .get_or_create(&ViaLabel { via })
                .inc_by(0);
            self.bytes_received
                .get_or_create(&ViaLabel { via })
                .inc_by(0);
        }
        for role in [Role::Client, Role::Server] {
            self.sync_sessions_active
                .get_or_create(&RoleLabel { role })
                .set(0);
            for result in [
                SyncResult::Complete,
                SyncResult::Partial,
                SyncResult::Failed,
                SyncResult::Busy,
            ] {
                self.sync_sessions
                    .get_or_create(&SyncLabels { role, result })
                    .inc_by(0);
            }
        }
    }
}

/// Exposes [`ClusterMetrics::replication_lag_max_ms`] as `strata_replication_lag_max_seconds`.
#[derive(Debug)]
struct LagMaxCollector {
    gauge_ms: Gauge,
}

impl Collector for LagMaxCollector {
    fn encode(&self, mut encoder: DescriptorEncoder<'_>) -> Result<(), fmt::Error> {
        // Milliseconds fit an f64 exactly up to 2^53, far beyond any lag.
        let gauge = ConstGauge::new(self.gauge_ms.get() as f64 / 1000.0);
        let unit = Unit::Seconds;
        let metric_encoder = encoder.encode_descriptor(
            "replication_lag_max",
            "Largest recent replication lag.",
            Some(&unit),
            gauge.metric_type(),
        )?;
        gauge.encode(metric_encoder)
    }
}
