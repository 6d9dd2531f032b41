//! A running node: store + cluster + transport + API + admin, assembled and shut down together.
//!
//! Start order: schema, store (and migration), TLS, transport, metrics, cluster driver,
//! subscriptions, API, admin. Shutdown order: cancel every task (the cluster leaves gracefully),
//! wait for them with a deadline, close the transport, then the store (its writer finishes what
//! is queued and marks a clean shutdown).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin::{self, Readiness};
use crate::api::{
    self, StrataService,
    subscribe::{Hub, HubConfig},
};
use crate::cluster::driver::{self, Cluster, DriverOptions};
use crate::cluster::{Core, Member};
use crate::config::NodeConfig;
use crate::metrics::{MetricSource, Metrics, Sample, SampleKind};
use crate::store::{Schema, Store, StoreError, WallClock};
use crate::transport::{
    PeerIdentity, Tier, TlsConfig, Transport, TransportError, TransportOptions,
};

/// How long shutdown waits for tasks to finish before giving up on them.
const SHUTDOWN_WAIT_MAX: Duration = Duration::from_secs(5);

/// What a daemon adds to the shared node machinery.
#[derive(Clone)]
pub struct NodeSpec {
    /// The tier this daemon serves.
    pub tier: Tier,
    /// The schema used when the configuration names no schema files.
    pub default_schema: &'static str,
    /// The daemon's own services and background work.
    pub extra: Extra,
}

/// Why a node could not start.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// A schema file could not be read.
    #[error("schema file {path}: {source}")]
    SchemaFile {
        /// The file.
        path: PathBuf,
        /// The failure.
        source: std::io::Error,
    },
    /// The schema was refused, or the store could not open.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// TLS material or the QUIC endpoint failed.
    #[error("transport: {0}")]
    Transport(#[from] TransportError),
    /// The certificate names another node, tier or region than the configuration.
    #[error(
        "certificate says {cert}, but the configuration says node {node:?} of region {region:?} ({tier})"
    )]
    IdentityMismatch {
        /// The certificate's identity.
        cert: PeerIdentity,
        /// The configured node name.
        node: String,
        /// The configured region.
        region: String,
        /// The daemon's tier.
        tier: Tier,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// The failure.
        source: std::io::Error,
    },
    /// The API's TLS files could not be read.
    #[error("{0}")]
    Api(#[from] api::ApiError),
    /// The configuration does not fit this daemon.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// A daemon's own service could not start.
    #[error("{what}: {reason}")]
    Service {
        /// The service (or its configuration key).
        what: &'static str,
        /// Why.
        reason: String,
    },
}

/// What a daemon adds to a node: its own gRPC services and background work.
pub type Extra =
    fn(&Services<'_>, tonic::service::Routes) -> Result<tonic::service::Routes, NodeError>;

/// What a daemon's own services can use when the node starts.
pub struct Services<'a> {
    /// The local store.
    pub store: &'a Store,
    /// The cluster driver's view.
    pub cluster: &'a Cluster,
    /// The node's metrics.
    pub metrics: &'a Arc<Metrics>,
    /// This node's certificate identity.
    pub identity: &'a PeerIdentity,
    /// The node's configuration.
    pub config: &'a NodeConfig,
    /// Tracks the node's tasks; spawn background work here.
    pub tracker: &'a TaskTracker,
    /// Cancelled when the node stops.
    pub cancel: &'a CancellationToken,
    /// The address the gRPC API listens on.
    pub api_addr: SocketAddr,
}

/// A running node.
pub struct Node {
    /// The local store.
    pub store: Store,
    /// The cluster driver's view.
    pub cluster: Cluster,
    /// The node's metrics.
    pub metrics: Arc<Metrics>,
    /// This node's certificate identity.
    pub identity: PeerIdentity,
    transport: Transport,
    gossip_addr: SocketAddr,
    api_addr: SocketAddr,
    admin_addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
}

impl Node {
    /// Starts a node; `spec.extra` adds a daemon's own services to the API and may start its
    /// background work.
    pub async fn start(config: NodeConfig, spec: NodeSpec) -> Result<Node, NodeError> {
        use tracing::Instrument;
        // Every task of the node runs inside this span: its log lines carry node, tier, region.
        let span =
            crate::telemetry::node_span(&config.node.name, spec.tier.as_str(), &config.node.region);
        Self::start_in_span(config, spec).instrument(span).await
    }

    async fn start_in_span(config: NodeConfig, spec: NodeSpec) -> Result<Node, NodeError> {
        config.check_tier(spec.tier)?;
        let schema = load_schema(&config, &spec)?;
        let tls = TlsConfig::load(
            &config.gossip.tls.ca,
            &config.gossip.tls.cert,
            &config.gossip.tls.key,
        )?;
        let identity = tls.identity().clone();
        if identity.node != config.node.name
            || identity.region != config.node.region
            || identity.tier != spec.tier
        {
            return Err(NodeError::IdentityMismatch {
                cert: identity,
                node: config.node.name.clone(),
                region: config.node.region.clone(),
                tier: spec.tier,
            });
        }
        let path = config.store_path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(StoreError::Io)?;
        }
        let options = config.store_options();
        let store = tokio::task::spawn_blocking(move || Store::open(path, options))
            .await
            .map_err(|err| StoreError::Corrupt(format!("store open task: {err}")))??;
        let report = store.migrate(schema).await?;
        if report != crate::store::MigrationReport::default() {
            tracing::info!(?report, "schema applied");
        }

        let transport = Transport::bind(config.gossip.listen, tls, TransportOptions::default())?;
        let gossip_addr = transport.local_addr();
        let metrics = Arc::new(Metrics::new(
            &identity.node,
            identity.tier.as_str(),
            &identity.region,
        ));
        metrics.add_source(Box::new(StoreSource(store.clone())));
        metrics.add_source(Box::new(TransportSource(transport.clone())));
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();

        let seeds = resolve(&config.gossip.bootstrap, gossip_addr).await;
        let me = Member {
            addr: gossip_addr,
            incarnation: WallClock::System.now_ms(),
        };
        let core = Core::new(me, config.cluster.clone(), seeds.clone(), rand::random());
        let cluster = driver::spawn(
            core,
            transport.clone(),
            store.clone(),
            Arc::clone(&metrics),
            DriverOptions::default(),
            cancel.clone(),
            tracker.clone(),
        );

        let hub = Hub::start(
            store.clone(),
            HubConfig {
                subscriptions_max: config.api.subscriptions_max,
                subscriber_buffer: config.api.subscriber_buffer,
                history: config.api.subscription_history,
                query_timeout: std::time::Duration::from_millis(config.api.query_timeout_ms),
            },
            Arc::clone(&metrics),
            tracker.clone(),
            cancel.clone(),
        );
        let api_listener = bind(config.api.listen).await?;
        let api_addr = api_listener
            .local_addr()
            .map_err(|source| NodeError::Listen {
                addr: config.api.listen,
                source,
            })?;
        let api_tls = config.api.tls.as_ref().map(api::tls_config).transpose()?;
        let service = StrataService {
            store: store.clone(),
            cluster: cluster.clone(),
            hub,
            metrics: Arc::clone(&metrics),
            config: config.api.clone(),
            me: identity.clone(),
        };
        let services = Services {
            store: &store,
            cluster: &cluster,
            metrics: &metrics,
            identity: &identity,
            config: &config,
            tracker: &tracker,
            cancel: &cancel,
            api_addr,
        };
        let routes = match (spec.extra)(&services, tonic::service::Routes::default()) {
            Ok(routes) => routes,
            Err(err) => {
                cancel.cancel();
                tracker.close();
                tracker.wait().await;
                transport.shutdown().await;
                return Err(err);
            }
        };
        let api_config = config.api.clone();
        let api_cancel = cancel.clone();
        crate::telemetry::spawn(&tracker, async move {
            if let Err(err) = api::serve(
                api_listener,
                service,
                &api_config,
                api_tls,
                api_cancel,
                routes,
            )
            .await
            {
                tracing::error!(error = %err, "the API server stopped");
            }
        });

        let admin_listener = bind(config.admin.listen).await?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| NodeError::Listen {
                addr: config.admin.listen,
                source,
            })?;
        let (ready_tx, ready_rx) = watch::channel(Readiness {
            ready: false,
            reason: "starting".into(),
        });
        crate::telemetry::spawn(
            &tracker,
            follow_readiness(
                cluster.clone(),
                seeds.is_empty(),
                ready_tx,
                Arc::clone(&metrics),
                cancel.clone(),
            ),
        );
        let admin_metrics = Arc::clone(&metrics);
        let admin_cancel = cancel.clone();
        crate::telemetry::spawn(&tracker, async move {
            if let Err(err) =
                admin::serve(admin_listener, admin_metrics, ready_rx, admin_cancel).await
            {
                tracing::error!(error = %err, "the admin server stopped");
            }
        });
        tracing::info!(%gossip_addr, %api_addr, %admin_addr, site = %store.site(), "node started");
        Ok(Node {
            store,
            cluster,
            metrics,
            identity,
            transport,
            gossip_addr,
            api_addr,
            admin_addr,
            cancel,
            tracker,
        })
    }

    /// The gossip (QUIC) address.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.gossip_addr
    }

    /// The gRPC API address.
    pub fn api_addr(&self) -> SocketAddr {
        self.api_addr
    }

    /// The admin HTTP address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// A token that stops the node when cancelled.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops the node: leaves the cluster, stops every task (waiting at most a few seconds),
    /// closes the transport and the store.
    pub async fn shutdown(self) {
        self.cancel.cancel();
        // Client statements still running stop now, so the tasks serving them end in time.
        self.store.close();
        self.tracker.close();
        if tokio::time::timeout(SHUTDOWN_WAIT_MAX, self.tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!("some tasks did not stop within {SHUTDOWN_WAIT_MAX:?}");
        }
        self.transport.shutdown().await;
        let store = self.store;
        // Dropping the last handle lets the writer finish and mark a clean shutdown.
        let _ = tokio::task::spawn_blocking(move || drop(store)).await;
    }
}

fn load_schema(config: &NodeConfig, spec: &NodeSpec) -> Result<Schema, NodeError> {
    if config.store.schema.is_empty() {
        return Ok(Schema::parse(spec.default_schema)?);
    }
    let mut sql = String::new();
    for path in &config.store.schema {
        let text = std::fs::read_to_string(path).map_err(|source| NodeError::SchemaFile {
            path: path.clone(),
            source,
        })?;
        sql.push_str(&text);
        sql.push('\n');
    }
    Ok(Schema::parse(&sql)?)
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Listen { addr, source })
}

/// Resolves bootstrap addresses (names allowed); unresolvable ones are logged and skipped.
async fn resolve(bootstrap: &[String], me: SocketAddr) -> Vec<SocketAddr> {
    let mut seeds = Vec::new();
    for entry in bootstrap {
        match tokio::net::lookup_host(entry.as_str()).await {
            Ok(addrs) => seeds.extend(addrs.filter(|a| *a != me).take(1)),
            Err(err) => {
                tracing::warn!(bootstrap = %entry, error = %err, "cannot resolve bootstrap address")
            }
        }
    }
    seeds
}

/// Ready once caught up with a peer (or at once for a node with no one to catch up with).
async fn follow_readiness(
    cluster: Cluster,
    alone: bool,
    ready: watch::Sender<Readiness>,
    metrics: Arc<Metrics>,
    cancel: CancellationToken,
) {
    let mut view = cluster.watch();
    loop {
        let caught_up = view.borrow_and_update().caught_up;
        let state = if caught_up || alone {
            Readiness {
                ready: true,
                reason: "caught up".into(),
            }
        } else {
            Readiness {
                ready: false,
                reason: "catching up with the cluster".into(),
            }
        };
        metrics.ready.set(i64::from(state.ready));
        ready.send_replace(state);
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
        }
    }
}

#[derive(Debug)]
struct StoreSource(Store);

impl MetricSource for StoreSource {
    fn collect(&self) -> Vec<Sample> {
        let s = self.0.stats();
        let counter = |name, help, value: u64| Sample {
            name,
            help,
            kind: SampleKind::Counter,
            value: value as f64,
        };
        vec![
            counter(
                "strata_store_commits",
                "Group commits of the store's writer.",
                s.commits_total,
            ),
            counter(
                "strata_store_local_versions",
                "Local versions committed.",
                s.local_versions_total,
            ),
            counter(
                "strata_store_applied_versions",
                "Remote versions applied.",
                s.applied_versions_total,
            ),
            counter(
                "strata_store_duplicate_changesets",
                "Remote changesets already held.",
                s.duplicates_total,
            ),
            counter(
                "strata_store_rejected_changesets",
                "Remote changesets refused as malformed.",
                s.rejected_total,
            ),
            counter(
                "strata_store_buffered_chunks",
                "Chunks buffered as parts of incomplete versions.",
                s.buffered_chunks_total,
            ),
            counter(
                "strata_store_parked_changes",
                "Changes parked for an unknown table or column.",
                s.parked_total,
            ),
            counter(
                "strata_store_merged_changes",
                "Remote changes merged.",
                s.merged_changes_total,
            ),
            counter(
                "strata_store_far_future_timestamps",
                "Remote timestamps far ahead of the wall clock.",
                s.far_future_total,
            ),
            counter(
                "strata_store_stopped_statements",
                "Client statements stopped for their deadline, their caller leaving or shutdown.",
                s.stopped_total,
            ),
            Sample {
                name: "strata_store_head",
                help: "This node's latest version.",
                kind: SampleKind::Gauge,
                value: self.0.head() as f64,
            },
        ]
    }
}

#[derive(Debug)]
struct TransportSource(Transport);

impl MetricSource for TransportSource {
    fn collect(&self) -> Vec<Sample> {
        let s = self.0.stats();
        let counter = |name, help, value: u64| Sample {
            name,
            help,
            kind: SampleKind::Counter,
            value: value as f64,
        };
        vec![
            Sample {
                name: "strata_transport_connections",
                help: "QUIC connections open.",
                kind: SampleKind::Gauge,
                value: s.connections_open as f64,
            },
            counter(
                "strata_transport_handshakes_failed",
                "QUIC handshakes that failed (bad certificates, garbage).",
                s.handshakes_failed_total,
            ),
            counter(
                "strata_transport_dials_failed",
                "Dials that failed.",
                s.dials_failed_total,
            ),
            counter(
                "strata_transport_sent_bytes",
                "Bytes sent over QUIC (UDP payload).",
                s.bytes_sent_total,
            ),
            counter(
                "strata_transport_received_bytes",
                "Bytes received over QUIC (UDP payload).",
                s.bytes_received_total,
            ),
        ]
    }
}
