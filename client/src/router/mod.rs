//! The two-level edge lookup: which regions run an app (the global map), then that region's
//! running Machines (its regiond).
//!
//! [`Router::route`] orders the app's regions (those with a started Machine) as the caller's
//! own region first, then its preferred ones, then the rest by name ([`order_regions`]), and
//! answers from the first region that has running Machines of the app. A region that cannot
//! answer (its nodes unreachable, its cache down) is passed over with the reason, and the next
//! is tried.
//!
//! Answers come from caches kept fresh by subscriptions, so a lookup is a few map reads:
//! - the global map comes from a [`MapSource`]: on an edge, subscriptions to a globald
//!   ([`GlobalMap`]); inside globald, its own store;
//! - each region's running Machines come from one subscription to the region's route query,
//!   opened the first time a lookup needs the region ([`RegionCache`]). Until it is ready, and
//!   while it is down, lookups ask the region directly, with a deadline.
//!
//! Bounds: at most `regions_max` region caches (lookups for more regions are answered
//! directly); one subscription per region and two per global map; every reconnect backs off
//! with jitter. Counters are in [`RouterStats`].
//!
//! It must not hold a lock across an `.await`: every cache is behind a short std mutex.

mod global_map;
mod order;
mod region_cache;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use strata_types::{Rows, Statement, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use global_map::{AppRegions, GlobalMap, MapSource, app_regions, parse_endpoints};
pub use order::order_regions;
pub use region_cache::RegionCache;

use crate::follow::{Event, Follow};
use crate::{Client, ClientError, ClientTls};

/// Pauses between reconnects of a cache's subscription.
const FOLLOW_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// See [`FOLLOW_BACKOFF_MIN`]; long enough not to hammer a dead region, short enough to notice
/// its return within seconds.
const FOLLOW_BACKOFF_MAX: Duration = Duration::from_secs(5);

/// How the router looks things up.
#[derive(Debug, Clone)]
pub struct RouterConfig {
    /// The caller's region, tried first (may be overridden per lookup).
    pub local_region: String,
    /// Regions to try next, in order.
    pub prefer: Vec<String>,
    /// The query giving a region's running Machines; it must return an `app` column, and its
    /// first column identifies a Machine.
    pub machines_query: String,
    /// TLS for the regions' APIs; the server name is set per region
    /// (`<region>.regional.strata`).
    pub region_tls: Option<ClientTls>,
    /// How long one region may take to answer a direct lookup.
    pub region_timeout: Duration,
    /// Region caches kept at most.
    pub regions_max: usize,
}

/// An answer: the app's running Machines in one region.
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    /// The app.
    pub app: String,
    /// The region whose Machines these are.
    pub region: String,
    /// The columns of `machines`.
    pub columns: Vec<String>,
    /// The running Machines.
    pub machines: Vec<Vec<Value>>,
    /// Every region running the app, in the order tried.
    pub candidates: Vec<String>,
    /// Regions passed over before `region`, and why.
    pub skipped: Vec<(String, String)>,
    /// Whether the answer came from caches only.
    pub cached: bool,
}

/// Why a lookup found nothing.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RouteError {
    /// No region runs a started Machine of the app.
    #[error("no region runs app {0:?}")]
    NotFound(String),
    /// Regions run the app but none answered with running Machines.
    #[error("no region running app {app:?} could answer: {}", describe(.skipped))]
    Unavailable {
        /// The app.
        app: String,
        /// Each region tried, and why it was passed over.
        skipped: Vec<(String, String)>,
    },
    /// The global map could not be read.
    #[error("the global map is unavailable: {0}")]
    Map(String),
}

fn describe(skipped: &[(String, String)]) -> String {
    skipped
        .iter()
        .map(|(region, why)| format!("{region}: {why}"))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Counters of a router.
#[derive(Debug, Default)]
pub struct RouterStats {
    /// Lookups answered from caches alone.
    pub cached: AtomicU64,
    /// Lookups that asked a region or the global tier directly.
    pub direct: AtomicU64,
    /// Regions passed over during lookups.
    pub fallthroughs: AtomicU64,
    /// Cache subscriptions that broke (and were retried after a pause).
    pub follow_failures: AtomicU64,
    /// Lookups that needed a region cache beyond `regions_max`.
    pub regions_over_limit: AtomicU64,
}

/// One of a router's counters as a metrics exporter reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RouterCounter {
    /// The exposed name: `strata_` prefix, without `_total` (the exporter adds it).
    pub name: &'static str,
    /// One line saying what it counts.
    pub help: &'static str,
    /// Its value now.
    pub value: u64,
}

impl RouterStats {
    /// Every counter with its exposed name and help. The names are defined here, next to the
    /// counters, so that every exporter (globald's registry, an edge proxy's own) uses the same.
    pub fn counters(&self) -> Vec<RouterCounter> {
        let counter = |name, help, c: &AtomicU64| RouterCounter {
            name,
            help,
            value: c.load(Ordering::Relaxed),
        };
        vec![
            counter(
                "strata_route_cached_lookups",
                "Route lookups answered from caches alone.",
                &self.cached,
            ),
            counter(
                "strata_route_direct_lookups",
                "Route lookups that asked a region directly.",
                &self.direct,
            ),
            counter(
                "strata_route_fallthroughs",
                "Regions passed over during route lookups.",
                &self.fallthroughs,
            ),
            counter(
                "strata_route_follow_failures",
                "Region cache subscriptions that broke and were retried after a pause.",
                &self.follow_failures,
            ),
            counter(
                "strata_route_regions_over_limit",
                "Route lookups that needed a region cache beyond route.regions_max.",
                &self.regions_over_limit,
            ),
        ]
    }
}

/// Spawns a cache's follower on `tracker` inside the current span, so its log lines keep the
/// caller's fields (a spawned task does not inherit the spawner's span by itself).
fn spawn<F>(tracker: &TaskTracker, task: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    use tracing::Instrument;
    tracker.spawn(task.in_current_span());
}

/// The edge router.
#[derive(Clone)]
pub struct Router {
    inner: Arc<Inner>,
}

struct Inner {
    config: RouterConfig,
    map: Arc<dyn MapSource>,
    regions: Mutex<HashMap<String, Arc<RegionCache>>>,
    /// Clients of region endpoints, for direct lookups (connections are reused).
    clients: Mutex<HashMap<String, Client>>,
    stats: Arc<RouterStats>,
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl Router {
    /// A router over `map`; its caches follow their sources until `cancel`.
    pub fn new(
        config: RouterConfig,
        map: Arc<dyn MapSource>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Router {
        Router {
            inner: Arc::new(Inner {
                config,
                map,
                regions: Mutex::new(HashMap::new()),
                clients: Mutex::new(HashMap::new()),
                stats: Arc::new(RouterStats::default()),
                tracker,
                cancel,
            }),
        }
    }

    /// An edge router: the global map followed on `global` (globald API endpoints).
    pub fn edge(
        config: RouterConfig,
        global: Vec<String>,
        global_tls: Option<ClientTls>,
        tracker: TaskTracker,
        cancel: CancellationToken,
    ) -> Router {
        let map = GlobalMap::start(global, global_tls, &tracker, &cancel);
        Router::new(config, map, tracker, cancel)
    }

    /// The router's counters, shared (for a metrics exporter).
    pub fn stats(&self) -> Arc<RouterStats> {
        Arc::clone(&self.inner.stats)
    }

    /// Where `app` runs, from the configured local region.
    pub async fn route(&self, app: &str) -> Result<Route, RouteError> {
        let inner = &self.inner;
        self.route_from(app, &inner.config.local_region, &inner.config.prefer)
            .await
    }

    /// Where `app` runs, trying `from` first, then `prefer`.
    pub async fn route_from(
        &self,
        app: &str,
        from: &str,
        prefer: &[String],
    ) -> Result<Route, RouteError> {
        let map = &self.inner.map;
        match map.regions(app) {
            Some(running) => {
                let candidates = order_regions(&running, from, prefer);
                self.first_answer(app, candidates, None).await
            }
            None => {
                let fetched = map.fetch(app).await.map_err(RouteError::Map)?;
                let candidates = order_regions(&fetched.regions, from, prefer);
                self.first_answer(app, candidates, Some(fetched.endpoints))
                    .await
            }
        }
    }

    /// Like [`Router::route_from`], but asks the global tier and the regions directly,
    /// bypassing every cache (for measurements, and for callers that must not see a stale
    /// answer).
    pub async fn route_direct(
        &self,
        app: &str,
        from: &str,
        prefer: &[String],
    ) -> Result<Route, RouteError> {
        let fetched = self.inner.map.fetch(app).await.map_err(RouteError::Map)?;
        let candidates = order_regions(&fetched.regions, from, prefer);
        self.first_answer(app, candidates, Some(fetched.endpoints))
            .await
    }

    /// The first of `candidates` with running Machines of `app`. With `fetched` endpoints (the
    /// map was asked directly) regions are asked directly too; otherwise each region's cache
    /// answers, and the region itself only when its cache is not current.
    async fn first_answer(
        &self,
        app: &str,
        candidates: Vec<String>,
        mut fetched: Option<HashMap<String, Vec<String>>>,
    ) -> Result<Route, RouteError> {
        let inner = &self.inner;
        if candidates.is_empty() {
            return Err(RouteError::NotFound(app.to_owned()));
        }
        let mut cached = fetched.is_none();
        let mut skipped = Vec::new();
        for region in &candidates {
            let from_cache = match &fetched {
                Some(_) => None,
                None => self.cache(region).and_then(|cache| cache.lookup(app).ok()),
            };
            let answer = match from_cache {
                Some(answer) => Ok(answer),
                None => {
                    cached = false;
                    let endpoints = match fetched.as_mut() {
                        Some(fetched) => fetched.remove(region).unwrap_or_default(),
                        None => inner.map.endpoints(region).unwrap_or_default(),
                    };
                    self.ask_region(region, app, &endpoints).await
                }
            };
            match answer {
                Ok((columns, machines)) if !machines.is_empty() => {
                    inner
                        .stats
                        .fallthroughs
                        .fetch_add(skipped.len() as u64, Ordering::Relaxed);
                    let counter = if cached {
                        &inner.stats.cached
                    } else {
                        &inner.stats.direct
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                    return Ok(Route {
                        app: app.to_owned(),
                        region: region.clone(),
                        columns,
                        machines,
                        candidates,
                        skipped,
                        cached,
                    });
                }
                Ok(_) => skipped.push((region.clone(), "no running machines".to_owned())),
                Err(reason) => skipped.push((region.clone(), reason)),
            }
        }
        inner
            .stats
            .fallthroughs
            .fetch_add(skipped.len() as u64, Ordering::Relaxed);
        Err(RouteError::Unavailable {
            app: app.to_owned(),
            skipped,
        })
    }

    /// The cache of `region`, started on first use; `None` beyond `regions_max`.
    fn cache(&self, region: &str) -> Option<Arc<RegionCache>> {
        let inner = &self.inner;
        let mut regions = inner.regions.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(cache) = regions.get(region) {
            return Some(Arc::clone(cache));
        }
        if regions.len() >= inner.config.regions_max {
            inner
                .stats
                .regions_over_limit
                .fetch_add(1, Ordering::Relaxed);
            return None;
        }
        let cache = Arc::new(RegionCache::default());
        regions.insert(region.to_owned(), Arc::clone(&cache));
        drop(regions);
        self.follow_region(region, Arc::clone(&cache));
        Some(cache)
    }

    fn follow_region(&self, region: &str, cache: Arc<RegionCache>) {
        let inner = &self.inner;
        let follow = Follow {
            statement: Statement::new(inner.config.machines_query.clone()),
            key_columns: Vec::new(),
            tls: self.region_tls(region),
            connect_timeout: inner.config.region_timeout,
            backoff_min: FOLLOW_BACKOFF_MIN,
            backoff_max: FOLLOW_BACKOFF_MAX,
        };
        let map = Arc::clone(&inner.map);
        let name = region.to_owned();
        let stats = Arc::clone(&inner.stats);
        let sink = move |event: Event| {
            if matches!(event, Event::Down(_)) {
                stats.follow_failures.fetch_add(1, Ordering::Relaxed);
            }
            cache.apply(event);
        };
        let endpoints = move || map.endpoints(&name).unwrap_or_default();
        let cancel = inner.cancel.clone();
        spawn(&inner.tracker, follow.run(endpoints, sink, cancel));
    }

    fn region_tls(&self, region: &str) -> Option<ClientTls> {
        self.inner.config.region_tls.clone().map(|mut tls| {
            tls.server_name = format!("{region}.regional.strata");
            tls
        })
    }

    /// Asks a region's nodes in turn for the app's running Machines, each within the deadline.
    async fn ask_region(
        &self,
        region: &str,
        app: &str,
        endpoints: &[String],
    ) -> Result<(Vec<String>, Vec<Vec<Value>>), String> {
        if endpoints.is_empty() {
            return Err("unreachable: no API endpoint published".to_owned());
        }
        let sql = format!(
            "SELECT * FROM ({}) WHERE app = ?1",
            self.inner.config.machines_query
        );
        let mut last = String::new();
        for endpoint in endpoints {
            let client = match self.client(region, endpoint) {
                Ok(client) => client,
                Err(err) => {
                    last = err.to_string();
                    continue;
                }
            };
            let query = client.query(&sql, vec![Value::Text(app.to_owned())]);
            match tokio::time::timeout(self.inner.config.region_timeout, query).await {
                Ok(Ok(Rows { columns, rows })) => return Ok((columns, rows)),
                Ok(Err(err)) => last = format!("{endpoint}: {err}"),
                Err(_) => {
                    last = format!(
                        "{endpoint}: no answer within {:?}",
                        self.inner.config.region_timeout
                    )
                }
            }
        }
        Err(format!("unreachable: {last}"))
    }

    fn client(&self, region: &str, endpoint: &str) -> Result<Client, ClientError> {
        let mut clients = self
            .inner
            .clients
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(client) = clients.get(endpoint) {
            return Ok(client.clone());
        }
        let client = Client::lazy(endpoint, self.region_tls(region))?;
        clients.insert(endpoint.to_owned(), client.clone());
        Ok(client)
    }
}
