//! A running node: store + cluster + transport + API + admin, assembled and shut down together.
//!
//! Start order: config checks (a plaintext API on a reachable address needs an explicit
//! opt-in), schema, every configured certificate checked (a bad one stops the start, naming the
//! file), store (and migration), transport, metrics, cluster driver, subscriptions, API, the
//! certificate watcher (reloads renewed gossip/API certificates, warns before expiry), admin.
//! Shutdown order: cancel every task (the cluster leaves gracefully), wait for them with a
//! deadline, close the transport, then the store (its writer finishes what is queued and marks
//! a clean shutdown).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::admin;
use crate::api::metrics::{ApiMetrics, ApiTlsSource};
use crate::api::{
    self, StrataService,
    subscribe::{Hub, HubConfig},
};
use crate::cluster::driver::{self, DriverOptions};
use crate::cluster::metrics::ClusterMetrics;
use crate::cluster::{Cluster, ClusterView};
use crate::config::{NodeConfig, TlsSection};
use crate::metrics::{MetricsBuilder, MetricsRegistry};
use crate::readiness;
use crate::readiness::ReadinessMetrics;
use crate::store::metrics::StoreSource;
use crate::store::{Schema, Store, StoreError, WallClock};
use crate::transport::metrics::{CertMetrics, TransportSource};
use crate::transport::{
    CertStatus, CertWatcher, ChainCheck, LoadedTls, PeerIdentity, Tier, TlsConfig, TlsFiles,
    Transport, TransportError, TransportOptions, TransportStats, WatchOptions, WatchedCert,
    load_checked_with,
};
use strata_core::{Core, Member};

/// How long shutdown waits for tasks to finish before giving up on them.
const SHUTDOWN_WAIT_MAX: Duration = Duration::from_secs(5);

/// How long shutdown waits for the store's writer to finish what is queued and close: a healthy
/// writer drains its queue in well under a second; a stuck one never would.
pub const STORE_CLOSE_WAIT_MAX: Duration = Duration::from_secs(10);

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

/// Every layer's metrics of one node, registered in this one place: each layer owns its struct
/// (the cluster driver's [`Metrics`], the API's, readiness's, the certificates'), and the
/// sources read at scrape time (store, transport, API TLS, a daemon's own) are added to
/// [`NodeMetrics::registry`] once their owners exist.
pub struct NodeMetrics {
    /// What `/metrics` renders.
    pub registry: Arc<MetricsRegistry>,
    /// The cluster driver's series.
    pub cluster: Arc<ClusterMetrics>,
    /// The API's series.
    pub api: Arc<ApiMetrics>,
    /// The readiness gauges.
    pub readiness: ReadinessMetrics,
    /// The certificates' expiry gauges.
    pub certificates: CertMetrics,
}

impl NodeMetrics {
    /// Registers every layer's series for the node `identity` (`strata_build_info` names it).
    pub fn new(identity: &PeerIdentity) -> NodeMetrics {
        let mut b = MetricsBuilder::new(&identity.node, identity.tier.as_str(), &identity.region);
        let cluster = Arc::new(ClusterMetrics::register(&mut b));
        let api = Arc::new(ApiMetrics::register(&mut b));
        let certificates = CertMetrics::register(&mut b);
        let readiness = ReadinessMetrics::register(&mut b);
        NodeMetrics {
            registry: Arc::new(b.finish()),
            cluster,
            api,
            readiness,
            certificates,
        }
    }
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
    /// A configured certificate, CA or key cannot be used; names the config section, the
    /// file and the reason. Nothing started.
    #[error("[{section}] {source}")]
    Certificate {
        /// The configuration section (`gossip.tls`, `api.tls`, `publish.tls`, `route.tls`).
        section: &'static str,
        /// What is wrong, with the file.
        #[source]
        source: TransportError,
    },
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
    /// The node's metrics registry (a daemon adds its own sources to it).
    pub metrics: &'a Arc<MetricsRegistry>,
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
    /// The node's metrics registry: every layer's series, rendered by `/metrics`.
    pub metrics: Arc<MetricsRegistry>,
    /// This node's certificate identity.
    pub identity: PeerIdentity,
    transport: Transport,
    gossip_addr: SocketAddr,
    api_addr: SocketAddr,
    admin_addr: SocketAddr,
    cancel: CancellationToken,
    tracker: TaskTracker,
    certificates: Arc<Mutex<Vec<CertStatus>>>,
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
        config.check_api_exposure()?;
        let schema = load_schema(&config, &spec)?;
        // Every configured certificate is checked before anything starts, so a bad one is a
        // start-up error naming its file rather than a log line from a task.
        let certs = CheckedCerts::load(&config)?;
        let tls =
            TlsConfig::from_loaded(&certs.gossip).map_err(|source| NodeError::Certificate {
                section: "gossip.tls",
                source,
            })?;
        let api_tls = certs.api.as_ref().map(api::ApiTls::new).transpose()?;
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
        let layers = NodeMetrics::new(&identity);
        let metrics = Arc::clone(&layers.registry);
        metrics.add_source(Box::new(StoreSource(store.clone())));
        metrics.add_source(Box::new(TransportSource(transport.clone())));
        if let Some(api_tls) = &api_tls {
            metrics.add_source(Box::new(ApiTlsSource(api_tls.clone())));
        }
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();

        let seeds = resolve(&config.gossip.bootstrap, gossip_addr).await;
        let me = Member {
            addr: gossip_addr,
            incarnation: WallClock::System.now_ms(),
        };
        let members_file = crate::cluster::known::path_in(&config.node.data_dir);
        let known = crate::cluster::known::load(&members_file);
        if !known.is_empty() {
            tracing::info!(
                known = known.len(),
                "announcing to the members known before this start"
            );
        }
        let core = Core::new(me, config.cluster.clone(), seeds.clone(), rand::random())
            .knowing(known.clone());
        let cluster = driver::spawn(
            core,
            transport.clone(),
            store.clone(),
            Arc::clone(&layers.cluster),
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
            Arc::clone(&layers.api),
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
        let service = StrataService {
            store: store.clone(),
            cluster: cluster.clone(),
            hub,
            metrics: Arc::clone(&layers.api),
            replication_lag_max_ms: layers.cluster.replication_lag_max_ms.clone(),
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
        // Readiness watches it: set while `api::serve` runs, cleared when it returns.
        let api_serving = Arc::new(AtomicBool::new(true));
        let api_flag = Arc::clone(&api_serving);
        let serve_tls = api_tls.clone();
        crate::telemetry::spawn(&tracker, async move {
            let _serving = ClearOnDrop(api_flag);
            if let Err(err) = api::serve(
                api_listener,
                service,
                &api_config,
                serve_tls,
                api_cancel,
                routes,
            )
            .await
            {
                tracing::error!(error = %err, "the API server stopped");
            }
        });

        let certificates = Arc::new(Mutex::new(Vec::new()));
        let mut watcher = certs.watcher(&config, &transport, api_tls.as_ref());
        publish_cert_status(
            &layers.certificates,
            &certificates,
            watcher.poll(SystemTime::now()),
        );
        crate::telemetry::spawn(
            &tracker,
            watch_certificates(
                watcher,
                Duration::from_millis(config.certificates.reload_interval_ms.max(1)),
                layers.certificates.clone(),
                Arc::clone(&certificates),
                cancel.clone(),
            ),
        );

        let admin_listener = bind(config.admin.listen).await?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| NodeError::Listen {
                addr: config.admin.listen,
                source,
            })?;
        crate::telemetry::spawn(
            &tracker,
            crate::cluster::known::follow(
                members_file,
                known.clone(),
                cluster.watch(),
                cancel.clone(),
            ),
        );
        let ready_rx = cluster.watch_readiness();
        crate::telemetry::spawn(
            &tracker,
            follow_readiness(
                ReadinessSources {
                    cluster: cluster.clone(),
                    store: store.clone(),
                    alone: seeds.is_empty() && known.is_empty(),
                    api_serving,
                },
                layers.readiness.clone(),
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
            certificates,
        })
    }

    /// Every configured certificate and CA as of the last poll of their files: serial,
    /// validity, seconds left and warning state.
    pub fn certificates(&self) -> Vec<CertStatus> {
        self.certificates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The QUIC endpoint's counters (dials, back-offs, handshakes, reloads).
    pub fn transport_stats(&self) -> TransportStats {
        self.transport.stats()
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
        // Dropping the last handle lets the writer finish and mark a clean shutdown; a writer
        // stuck in a statement must not hold up the process's exit, so wait for it with a bound.
        let closing = tokio::task::spawn_blocking(move || drop(store));
        if tokio::time::timeout(STORE_CLOSE_WAIT_MAX, closing)
            .await
            .is_err()
        {
            tracing::error!(
                "the store did not close within {STORE_CLOSE_WAIT_MAX:?} (its writer is stuck); \
                 stopping without a clean shutdown mark"
            );
        }
    }
}

/// Every configured certificate, checked.
struct CheckedCerts {
    gossip: LoadedTls,
    api: Option<LoadedTls>,
    publish: Option<LoadedTls>,
    route: Option<LoadedTls>,
}

impl CheckedCerts {
    fn load(config: &NodeConfig) -> Result<CheckedCerts, NodeError> {
        let now = SystemTime::now();
        let check = |section: &'static str, tls: &TlsSection, chain| {
            let files = TlsFiles {
                ca: tls.ca.clone(),
                cert: tls.cert.clone(),
                key: tls.key.clone(),
            };
            load_checked_with(&files, now, chain)
                .map_err(|source| NodeError::Certificate { section, source })
        };
        let optional = |section, tls: &Option<TlsSection>, chain| {
            tls.as_ref().map(|t| check(section, t, chain)).transpose()
        };
        Ok(CheckedCerts {
            gossip: check("gossip.tls", &config.gossip.tls, ChainCheck::Required)?,
            api: optional("api.tls", &config.api.tls, ChainCheck::Required)?,
            publish: optional("publish.tls", &config.publish.tls, ChainCheck::Required)?,
            // globald's route certificate comes from the route CA, while `ca` bundles the
            // regions' CAs it verifies their APIs with (see deploy/kubernetes).
            route: optional("route.tls", &config.route.tls, ChainCheck::Skipped)?,
        })
    }

    /// The watcher of these certificates: the gossip and API ones are swapped in when renewed;
    /// the publisher's and route's are read at start only (their clients keep them), so a
    /// change there is reported as needing a restart.
    fn watcher(
        self,
        config: &NodeConfig,
        transport: &Transport,
        api_tls: Option<&api::ApiTls>,
    ) -> CertWatcher {
        let transport = transport.clone();
        let mut watched = vec![WatchedCert {
            label: "gossip",
            ca_label: "gossip_ca",
            loaded: self.gossip,
            chain: ChainCheck::Required,
            apply: Some(Box::new(move |loaded: &LoadedTls| {
                transport.reload_tls(&TlsConfig::from_loaded(loaded)?)
            })),
        }];
        if let (Some(loaded), Some(api_tls)) = (self.api, api_tls) {
            let api_tls = api_tls.clone();
            watched.push(WatchedCert {
                label: "api",
                ca_label: "api_ca",
                loaded,
                chain: ChainCheck::Required,
                apply: Some(Box::new(move |loaded: &LoadedTls| api_tls.reload(loaded))),
            });
        }
        for (label, ca_label, loaded, chain) in [
            ("publish", "publish_ca", self.publish, ChainCheck::Required),
            ("route", "route_ca", self.route, ChainCheck::Skipped),
        ] {
            if let Some(loaded) = loaded {
                watched.push(WatchedCert {
                    label,
                    ca_label,
                    loaded,
                    chain,
                    apply: None,
                });
            }
        }
        let warn_before = Duration::from_secs(
            config
                .certificates
                .warn_before_days
                .saturating_mul(24 * 60 * 60),
        );
        CertWatcher::new(watched, WatchOptions { warn_before })
    }
}

/// Re-reads the certificate files every `interval` (off the async threads), swapping renewed
/// ones in, and exports their state.
async fn watch_certificates(
    watcher: CertWatcher,
    interval: Duration,
    metrics: CertMetrics,
    status: Arc<Mutex<Vec<CertStatus>>>,
    cancel: CancellationToken,
) {
    let mut watcher = watcher;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(interval) => {}
        }
        let polled = tokio::task::spawn_blocking(move || {
            let statuses = watcher.poll(SystemTime::now());
            (watcher, statuses)
        })
        .await;
        match polled {
            Ok((back, statuses)) => {
                watcher = back;
                publish_cert_status(&metrics, &status, statuses);
            }
            Err(err) => {
                tracing::error!(error = %err, "the certificate watcher failed; certificates are no longer re-read");
                return;
            }
        }
    }
}

fn publish_cert_status(
    metrics: &CertMetrics,
    status: &Mutex<Vec<CertStatus>>,
    statuses: Vec<CertStatus>,
) {
    metrics.publish(&statuses);
    *status.lock().unwrap_or_else(PoisonError::into_inner) = statuses;
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

/// How often readiness is re-evaluated besides on every change of the cluster view: the store's
/// threads and the API listener change state without telling anyone.
const READINESS_INTERVAL: Duration = Duration::from_secs(1);

/// Quarantined versions named in a readiness reason at most (one is enough to start looking).
const READINESS_QUARANTINE_NAMED: usize = 1;

/// Clears a flag when dropped: the API task's end, however it ends (return or panic).
struct ClearOnDrop(Arc<AtomicBool>);

impl Drop for ClearOnDrop {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Relaxed);
    }
}

/// What readiness is computed from.
struct ReadinessSources {
    cluster: Cluster,
    store: Store,
    /// Started with no seeds: nothing to catch up with.
    alone: bool,
    /// Set while the API listener serves.
    api_serving: Arc<AtomicBool>,
}

impl ReadinessSources {
    /// A snapshot of every input of [`readiness::evaluate`].
    fn snapshot(&self, view: &ClusterView) -> readiness::Inputs {
        let quarantine_example = self
            .cluster
            .quarantine_list(READINESS_QUARANTINE_NAMED)
            .first()
            .map(|q| format!("site {} version {}: {}", q.site, q.version, q.reason));
        readiness::Inputs {
            alone: self.alone,
            caught_up: view.caught_up,
            step: readiness::Step {
                joined: view.step.joined,
                known: view.step.known,
                known_live: view.step.known_live,
                catch_up_pending: view.step.catch_up_pending,
            },
            members: view.members.len(),
            had_members: view.had_members,
            sync_failing_for: view.sync_failing_since.map(|since| since.elapsed()),
            quarantined: self.cluster.quarantined(),
            quarantine_example,
            api_serving: self.api_serving.load(Ordering::Relaxed),
            store: self.store.health(),
        }
    }
}

/// Re-evaluates readiness on every change of the cluster view and every
/// [`READINESS_INTERVAL`]; publishes it (for `/readyz` and `Health`), sets the gauges, and logs
/// each change once.
async fn follow_readiness(
    sources: ReadinessSources,
    metrics: ReadinessMetrics,
    cancel: CancellationToken,
) {
    let mut view = sources.cluster.watch();
    let mut tick = tokio::time::interval(READINESS_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last: Option<Vec<readiness::Reason>> = None;
    loop {
        let snapshot = {
            let view = view.borrow_and_update().clone();
            sources.snapshot(&view)
        };
        let (state, reasons) = readiness::evaluate(&snapshot);
        metrics.set(&state, &reasons);
        if last.as_ref() != Some(&reasons) {
            if state.ready {
                tracing::info!("ready");
            } else {
                tracing::warn!(reason = %state.reason, "not ready");
            }
            last = Some(reasons);
        }
        sources.cluster.set_readiness(state);
        tokio::select! {
            () = cancel.cancelled() => return,
            changed = view.changed() => if changed.is_err() { return },
            _ = tick.tick() => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_layer_registers_its_series_in_the_one_exposition() {
        let identity = PeerIdentity::new("n1", Tier::Regional, "eu-west").unwrap();
        let layers = NodeMetrics::new(&identity);
        layers
            .api
            .api_requests
            .get_or_create(&crate::api::metrics::ApiLabels::new("Transact", "OK"))
            .inc();
        layers
            .api
            .api_request_seconds
            .get_or_create(&crate::api::metrics::MethodLabel::new("Transact"))
            .observe(0.003);
        let gossip = crate::transport::metrics::CertLabel {
            certificate: "gossip",
        };
        (layers.certificates.certificate_expiry_seconds)
            .get_or_create(&gossip)
            .set(86_400);
        (layers.certificates.certificate_expiring)
            .get_or_create(&gossip)
            .set(0);
        layers.readiness.set(
            &crate::readiness::Readiness::not_ready("joining"),
            &[readiness::Reason::Joining],
        );
        layers.cluster.caught_up.set(1);
        let text = layers.registry.encode();
        for family in [
            "# TYPE strata_build_info gauge",
            "# TYPE strata_members gauge",
            "# TYPE strata_apply_seconds histogram",
            "# TYPE strata_replication_lag_max_seconds gauge",
            "# TYPE strata_api_requests counter",
            "# TYPE strata_api_request_seconds histogram",
            "# TYPE strata_subscriptions gauge",
            "# TYPE strata_subscribers gauge",
            "# TYPE strata_subscribers_cut counter",
            "# TYPE strata_certificate_expiry_seconds gauge",
            "# TYPE strata_certificate_expiring gauge",
            "# TYPE strata_ready gauge",
            "# TYPE strata_not_ready gauge",
            "# TYPE strata_caught_up gauge",
        ] {
            assert!(
                text.lines().any(|l| l == family),
                "{family} missing from\n{text}"
            );
        }
        for line in [
            "strata_api_requests_total{method=\"Transact\",code=\"OK\"} 1",
            "strata_ready 0",
            "strata_not_ready{reason=\"joining\"} 1",
            "strata_not_ready{reason=\"api_down\"} 0",
            "strata_caught_up 1",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line} missing from\n{text}"
            );
        }
        assert!(text.ends_with("# EOF\n"), "{text}");
    }
}
