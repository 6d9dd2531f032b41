//! Derivation and republish: a region's publishers keep the global tier's app map in step with
//! the region's rows.
//!
//! The decisions (who publishes, when, what) are the state machine in [`logic`]; the query and
//! its checks are [`derive`]; this module is the thin tokio driver around them. One task owns
//! the [`logic::Publisher`] and feeds it, in one `select!`: membership changes (the cluster's
//! view), commits of the local store (any change of the region's rows), timer firings, and the
//! results of the one derivation or publish in flight. It carries out the actions in the order
//! given: derivations run on a blocking thread, publishes are gRPC calls to globald with a
//! deadline, trying the configured endpoints in turn.
//!
//! Bounds: one call in flight; a result channel of [`RESULTS_LEN`]; two live timers; the publish
//! rate capped by `publish.rate_max_per_s` (and again by globald per region). Everything the
//! publisher does is counted in [`PublishStats`], exported as `strata_publish_*` metrics.

pub mod derive;
pub mod logic;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prost::Message;
use strata_client::{Client, ClientError, ClientTls};
use strata_common::cluster::ClusterView;
use strata_common::config::PublishSection;
use strata_common::metrics::{MetricSource, Sample, SampleKind};
use strata_common::node::{NodeError, Services};
use strata_common::store::{Store, WallClock};
use strata_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use logic::{Action, Input, Publication, Publisher, Settings, Timer, TimerKind};

/// Logs each problem of a derivation's rows that the previous derivation did not have (once per
/// distinct problem while it lasts, not per row per derivation), and when they are all gone.
fn log_new_problems(logged: &std::sync::Mutex<Vec<String>>, problems: &[String]) {
    let mut last = logged
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for problem in problems.iter().filter(|p| !last.contains(p)) {
        tracing::warn!(%problem, "derivation rows skipped; the region's other apps are published");
    }
    if problems.is_empty() && !last.is_empty() {
        tracing::info!("the derivation's rows are all publishable again");
    }
    *last = problems.to_vec();
}

/// Results of derivations and publishes waiting for the publisher task. One call is in flight
/// at a time, so one slot would do; a few spare ones cost nothing.
const RESULTS_LEN: usize = 4;

/// What the publisher has done, for metrics and tests.
#[derive(Debug, Default)]
pub struct PublishStats {
    /// 1 while this node is a publisher.
    pub publisher: AtomicU64,
    /// Derivations run.
    pub derivations: AtomicU64,
    /// Derivations that failed (the query, or a check of its answer as a whole).
    pub derive_failures: AtomicU64,
    /// Rows left out of derivations because they could not be published (all derivations).
    pub skipped_rows: AtomicU64,
    /// Rows the last derivation left out.
    pub skipped_rows_last: AtomicU64,
    /// Publishes globald acknowledged.
    pub publishes: AtomicU64,
    /// Publishes that failed.
    pub publish_failures: AtomicU64,
    /// Summaries sent (upserts and removals).
    pub summaries_sent: AtomicU64,
    /// Bytes of publish requests sent (encoded protobuf).
    pub bytes_sent: AtomicU64,
    /// Wall-clock time of the last acknowledged publish, ms since the Unix epoch.
    pub last_publish_ms: AtomicU64,
}

impl PublishStats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

impl MetricSource for PublishStats {
    fn collect(&self) -> Vec<Sample> {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed) as f64;
        let counter = |name, help, value| Sample {
            name,
            help,
            kind: SampleKind::Counter,
            value,
        };
        let gauge = |name, help, value| Sample {
            name,
            help,
            kind: SampleKind::Gauge,
            value,
        };
        vec![
            gauge(
                "strata_publish_publisher",
                "1 while this node publishes the region's app map.",
                get(&self.publisher),
            ),
            counter(
                "strata_publish_derivations",
                "Derivations of the region's app map.",
                get(&self.derivations),
            ),
            counter(
                "strata_publish_derive_failures",
                "Derivations that failed (query error or a bad answer).",
                get(&self.derive_failures),
            ),
            counter(
                "strata_publish_skipped_rows",
                "Derivation rows left out because they could not be published.",
                get(&self.skipped_rows),
            ),
            gauge(
                "strata_publish_skipped_rows_last",
                "Rows the last derivation left out.",
                get(&self.skipped_rows_last),
            ),
            counter(
                "strata_publish_publishes",
                "Publishes acknowledged by globald.",
                get(&self.publishes),
            ),
            counter(
                "strata_publish_failures",
                "Publishes that failed.",
                get(&self.publish_failures),
            ),
            counter(
                "strata_publish_summaries_sent",
                "App summaries sent to globald (upserts and removals).",
                get(&self.summaries_sent),
            ),
            counter(
                "strata_publish_sent_bytes",
                "Bytes of publish requests sent to globald.",
                get(&self.bytes_sent),
            ),
            gauge(
                "strata_publish_last_success_timestamp_seconds",
                "When globald last acknowledged a publish.",
                get(&self.last_publish_ms) / 1000.0,
            ),
        ]
    }
}

/// Starts the publisher if `[publish] to` names globald endpoints. Checks the derivation query
/// first, so a bad one stops the node at start rather than failing forever.
pub fn start(services: &Services<'_>) -> Result<(), NodeError> {
    let config = &services.config.publish;
    if config.to.is_empty() {
        tracing::info!("publishing to the global tier is off ([publish] to is empty)");
        return Ok(());
    }
    let bad = |what, reason: String| NodeError::Service { what, reason };
    derive::check(services.store, &config.derivation)
        .map_err(|reason| bad("publish.derivation", reason))?;
    if config.publishers == 0 || config.rate_max_per_s == 0 {
        return Err(bad(
            "publish",
            "publishers and rate_max_per_s must be at least 1".into(),
        ));
    }
    let tls = config
        .tls
        .as_ref()
        .map(|t| ClientTls::load(&t.ca, &t.cert, &t.key, config.server_name.clone()))
        .transpose()
        .map_err(|err| bad("publish.tls", err.to_string()))?;
    let clients = config
        .to
        .iter()
        .map(|endpoint| Client::lazy(endpoint, tls.clone()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|err| bad("publish.to", err.to_string()))?;
    let endpoints = if config.endpoints.is_empty() {
        let scheme = if services.config.api.tls.is_some() {
            "https"
        } else {
            "http"
        };
        // An API on a wildcard address is reached at the node's cluster address.
        let mut addr = services.api_addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(services.config.gossip.listen.ip());
        }
        vec![format!("{scheme}://{addr}")]
    } else {
        config.endpoints.clone()
    };
    let stats = Arc::new(PublishStats::default());
    services.metrics.add_source(Box::new(Arc::clone(&stats)));
    let settings = Settings {
        publishers: config.publishers,
        debounce: Duration::from_millis(config.debounce_ms),
        reconcile: Duration::from_millis(config.reconcile_ms.max(1)),
        publish_interval_min: Duration::from_millis(1000 / u64::from(config.rate_max_per_s)),
        backoff_min: Duration::from_millis(config.backoff_min_ms.max(1)),
        backoff_max: Duration::from_millis(config.backoff_max_ms.max(config.backoff_min_ms)),
    };
    let driver = Driver {
        publisher: Publisher::new(services.identity.node.clone(), settings, rand::random()),
        store: services.store.clone(),
        region: services.identity.region.clone(),
        me: services.identity.node.clone(),
        globals: Globals {
            clients,
            next: 0,
            timeout: Duration::from_millis(config.timeout_ms.max(1)),
        },
        config: config.clone(),
        own_endpoints: endpoints,
        endpoints_configured: !config.endpoints.is_empty(),
        stats: Arc::clone(&stats),
        timers: [None, None],
        tracker: services.tracker.clone(),
        skipped_logged: Arc::default(),
    };
    let view = services.cluster.watch();
    let commits = services.store.subscribe();
    let cancel = services.cancel.clone();
    strata_common::telemetry::spawn(services.tracker, driver.run(view, commits, cancel));
    Ok(())
}

/// The globald endpoints, tried in turn: a failed call moves to the next for the retry.
struct Globals {
    clients: Vec<Client>,
    next: usize,
    timeout: Duration,
}

impl Globals {
    /// The client for the next call.
    fn client(&self) -> Client {
        self.clients[self.next % self.clients.len()].clone()
    }

    fn failed(&mut self) {
        self.next = self.next.wrapping_add(1);
    }
}

struct Driver {
    publisher: Publisher,
    store: Store,
    region: String,
    me: String,
    globals: Globals,
    config: PublishSection,
    /// The region's endpoints as configured, or this node's API when none are.
    own_endpoints: Vec<String>,
    /// Whether `own_endpoints` came from the configuration (then every publisher sends them).
    endpoints_configured: bool,
    stats: Arc<PublishStats>,
    /// The live derive and reconcile timers (a new one replaces the old of its kind).
    timers: [Option<(Instant, Timer)>; 2],
    /// Derivations and publishes run as tasks of the node.
    tracker: TaskTracker,
    /// The last derivation's row problems, so each is logged once while it lasts.
    skipped_logged: Arc<std::sync::Mutex<Vec<String>>>,
}

impl Driver {
    async fn run(
        mut self,
        mut view: tokio::sync::watch::Receiver<ClusterView>,
        mut commits: broadcast::Receiver<Arc<strata_common::store::CommitEvent>>,
        cancel: CancellationToken,
    ) {
        let (results_tx, mut results) = mpsc::channel(RESULTS_LEN);
        let members = self.member_names(&view.borrow_and_update());
        self.step(Input::Members(members), &results_tx);
        loop {
            let timer = self.next_timer();
            let input = tokio::select! {
                () = cancel.cancelled() => return,
                changed = view.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    Input::Members(self.member_names(&view.borrow_and_update()))
                }
                event = commits.recv() => match event {
                    Ok(event) if event.changed.is_empty() => continue,
                    // A lagged receiver missed commits: something changed.
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => Input::Changed,
                    Err(broadcast::error::RecvError::Closed) => return,
                },
                Some(input) = results.recv() => input,
                () = sleep_until(timer.map(|(at, _)| at)), if timer.is_some() => {
                    let Some((_, timer)) = timer else { continue };
                    self.timers[slot(timer.kind)] = None;
                    Input::Timer(timer)
                }
            };
            self.step(input, &results_tx);
        }
    }

    /// Live members' node names (this node's included) of this region.
    fn member_names(&self, view: &ClusterView) -> Vec<String> {
        let mut names: Vec<String> = view
            .members
            .iter()
            .filter_map(|(_, identity)| identity.as_ref())
            .filter(|identity| identity.region == self.region)
            .map(|identity| identity.node.clone())
            .collect();
        names.push(self.me.clone());
        names
    }

    fn next_timer(&self) -> Option<(Instant, Timer)> {
        self.timers
            .iter()
            .flatten()
            .min_by_key(|(at, _)| *at)
            .copied()
    }

    fn step(&mut self, input: Input, results: &mpsc::Sender<Input>) {
        let failed = match &input {
            Input::Derived(Err(err)) => Some(("derivation", err.clone())),
            Input::Published(Err(err)) => Some(("publish", err.clone())),
            _ => None,
        };
        if let Some((what, error)) = failed {
            if what == "publish" {
                // The retry goes to the next globald.
                self.globals.failed();
            }
            tracing::warn!(%error, failures = self.publisher.failures() + 1, "{what} failed; backing off");
        }
        let actions = self.publisher.handle(input, Instant::now().into_std());
        for action in actions {
            match action {
                Action::Role(publisher) => {
                    self.stats
                        .publisher
                        .store(u64::from(publisher), Ordering::Relaxed);
                    tracing::info!(publisher, "publisher role changed");
                }
                Action::SetTimer { timer, at } => {
                    self.timers[slot(timer.kind)] = Some((Instant::from_std(at), timer));
                }
                Action::Derive => self.derive(results.clone()),
                Action::Publish(publication) => self.publish(publication, results.clone()),
            }
        }
    }

    fn derive(&self, results: mpsc::Sender<Input>) {
        PublishStats::add(&self.stats.derivations, 1);
        let store = self.store.clone();
        let sql = self.config.derivation.clone();
        let apps_max = self.config.apps_max;
        let stats = Arc::clone(&self.stats);
        let logged = Arc::clone(&self.skipped_logged);
        strata_common::telemetry::spawn(&self.tracker, async move {
            let result =
                tokio::task::spawn_blocking(move || derive::derive(&store, &sql, apps_max))
                    .await
                    .unwrap_or_else(|err| Err(format!("the derivation task failed: {err}")));
            if result.is_err() {
                PublishStats::add(&stats.derive_failures, 1);
            }
            let result = result.map(|derived| {
                PublishStats::add(&stats.skipped_rows, derived.skipped_rows as u64);
                stats
                    .skipped_rows_last
                    .store(derived.skipped_rows as u64, Ordering::Relaxed);
                log_new_problems(&logged, &derived.problems);
                derived.map
            });
            // The publisher task owns the receiver; if it is gone the node is stopping.
            let _ = results.send(Input::Derived(result)).await;
        });
    }

    fn publish(&mut self, publication: Publication, results: mpsc::Sender<Input>) {
        let request = self.request(&publication);
        let bytes = request.encoded_len() as u64;
        let summaries = (request.upserts.len() + request.removed.len()) as u64;
        let client = self.globals.client();
        let timeout = self.globals.timeout;
        let stats = Arc::clone(&self.stats);
        strata_common::telemetry::spawn(&self.tracker, async move {
            PublishStats::add(&stats.bytes_sent, bytes);
            PublishStats::add(&stats.summaries_sent, summaries);
            let outcome = match tokio::time::timeout(timeout, client.publish(request)).await {
                Ok(Ok(_)) => Ok(()),
                Ok(Err(ClientError::Status(status))) => Err(format!(
                    "globald refused: {}: {}",
                    status.code(),
                    status.message()
                )),
                Ok(Err(err)) => Err(err.to_string()),
                Err(_) => Err(format!("no answer within {timeout:?}")),
            };
            match &outcome {
                Ok(()) => {
                    PublishStats::add(&stats.publishes, 1);
                    stats
                        .last_publish_ms
                        .store(WallClock::System.now_ms(), Ordering::Relaxed);
                }
                Err(_) => PublishStats::add(&stats.publish_failures, 1),
            }
            let _ = results.send(Input::Published(outcome)).await;
        });
    }

    fn request(&self, publication: &Publication) -> pb::PublishRequest {
        pb::PublishRequest {
            upserts: publication
                .upserts
                .iter()
                .map(|(app, c)| pb::AppSummary {
                    app: app.clone(),
                    region: self.region.clone(),
                    machines: c.machines,
                    started: c.started,
                    stopped: c.stopped,
                    other: c.other,
                })
                .collect(),
            removed: publication.removed.clone(),
            full: publication.full,
            // Without configured endpoints only the first publisher names its own API, so two
            // publishers never flip the region's row between their addresses; an empty list
            // leaves the row's endpoints as they are.
            endpoints: if self.endpoints_configured || self.publisher.is_first() {
                self.own_endpoints.clone()
            } else {
                Vec::new()
            },
            schema_version: format!("{:016x}", self.store.schema().fingerprint()),
            derived_at_ms: WallClock::System.now_ms(),
        }
    }
}

fn slot(kind: TimerKind) -> usize {
    match kind {
        TimerKind::Derive => 0,
        TimerKind::Reconcile => 1,
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
