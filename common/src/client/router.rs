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

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::follow::{Event, Follow};
use super::{Client, ClientError, ClientTls};
use crate::store::{Rows, Statement, Value};

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

/// An app's regions (with their started Machines) and the regions' API endpoints.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AppRegions {
    /// Regions with their count of started Machines of the app.
    pub regions: Vec<(String, u64)>,
    /// API endpoints per region.
    pub endpoints: HashMap<String, Vec<String>>,
}

/// Where the global map comes from.
pub trait MapSource: Send + Sync + 'static {
    /// The app's regions from what is held locally; `None` when nothing current is held (the
    /// router then calls [`MapSource::fetch`]).
    fn regions(&self, app: &str) -> Option<Vec<(String, u64)>>;
    /// A region's API endpoints from what is held locally.
    fn endpoints(&self, region: &str) -> Option<Vec<String>>;
    /// The app's regions and their endpoints, asked of the source itself.
    fn fetch<'a>(&'a self, app: &'a str) -> BoxFuture<'a, Result<AppRegions, String>>;
}

/// The order regions are tried in: `from` first, then `prefer` in order, then the rest by name;
/// only regions in `running`, each once.
pub fn order_regions(running: &[(String, u64)], from: &str, prefer: &[String]) -> Vec<String> {
    let mut names: Vec<&String> = running
        .iter()
        .filter(|(_, started)| *started > 0)
        .map(|(region, _)| region)
        .collect();
    names.sort();
    names.dedup();
    let mut order: Vec<String> = Vec::with_capacity(names.len());
    let mut take = |region: &str| {
        if names.iter().any(|n| *n == region) && !order.iter().any(|o| o == region) {
            order.push(region.to_owned());
        }
    };
    take(from);
    for region in prefer {
        take(region);
    }
    for region in names.clone() {
        take(region);
    }
    order
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

impl crate::metrics::MetricSource for RouterStats {
    fn collect(&self) -> Vec<crate::metrics::Sample> {
        let counter = |name, help, c: &AtomicU64| crate::metrics::Sample {
            name,
            help,
            kind: crate::metrics::SampleKind::Counter,
            value: c.load(Ordering::Relaxed) as f64,
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
        crate::telemetry::spawn(&inner.tracker, follow.run(endpoints, sink, cancel));
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

/// One region's running Machines, by app, as its subscription reports them.
#[derive(Debug, Default)]
pub struct RegionCache {
    state: Mutex<RegionState>,
}

#[derive(Debug, Default)]
struct RegionState {
    /// Whether the subscription is live and its initial result complete.
    ready: bool,
    /// Why not, when it broke.
    down: Option<String>,
    columns: Vec<String>,
    /// Where `app` is among the columns.
    app_column: Option<usize>,
    /// app -> Machine key -> row.
    by_app: HashMap<String, BTreeMap<Vec<u8>, Vec<Value>>>,
    /// Machine key -> its app, to move or remove a row.
    app_of: HashMap<Vec<u8>, String>,
}

impl RegionCache {
    /// The app's running Machines, or why the cache cannot say.
    pub fn lookup(&self, app: &str) -> Result<(Vec<String>, Vec<Vec<Value>>), String> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !state.ready {
            return Err(state
                .down
                .clone()
                .unwrap_or_else(|| "the cache is filling".to_owned()));
        }
        let machines = state
            .by_app
            .get(app)
            .map(|rows| rows.values().cloned().collect())
            .unwrap_or_default();
        Ok((state.columns.clone(), machines))
    }

    /// Takes one event of the region's subscription.
    pub fn apply(&self, event: Event) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match event {
            Event::Reset(columns) => {
                state.app_column = columns.iter().position(|c| c == "app");
                state.columns = columns;
                state.by_app.clear();
                state.app_of.clear();
                state.ready = false;
            }
            Event::Upsert(row) => {
                let Some((key, app)) = key_and_app(&state, &row) else {
                    return;
                };
                if let Some(old) = state.app_of.insert(key.clone(), app.clone())
                    && old != app
                    && let Some(rows) = state.by_app.get_mut(&old)
                {
                    rows.remove(&key);
                    if rows.is_empty() {
                        state.by_app.remove(&old);
                    }
                }
                state.by_app.entry(app).or_default().insert(key, row);
            }
            Event::Remove(row) => {
                let Some((key, _)) = key_and_app(&state, &row) else {
                    return;
                };
                if let Some(app) = state.app_of.remove(&key)
                    && let Some(rows) = state.by_app.get_mut(&app)
                {
                    rows.remove(&key);
                    if rows.is_empty() {
                        state.by_app.remove(&app);
                    }
                }
            }
            Event::Ready => {
                // A route query without an `app` column cannot be cached: stay not ready, so
                // lookups ask the region (and get its error).
                state.ready = state.app_column.is_some();
                state.down =
                    (!state.ready).then(|| "the route query returns no app column".to_owned());
            }
            Event::Down(reason) => {
                state.ready = false;
                state.down = Some(format!("unreachable: {reason}"));
            }
        }
    }
}

/// A row's key (its first value, encoded) and app.
fn key_and_app(state: &RegionState, row: &[Value]) -> Option<(Vec<u8>, String)> {
    let key = postcard::to_allocvec(row.first()?).ok()?;
    match row.get(state.app_column?)? {
        Value::Text(app) => Some((key, app.clone())),
        _ => None,
    }
}

/// The global map as an edge holds it: two subscriptions to a globald (`app_regions` and
/// `regions`), and direct queries while they are not current.
pub struct GlobalMap {
    state: Mutex<MapState>,
    clients: Vec<Client>,
}

#[derive(Debug, Default)]
struct MapState {
    apps_ready: bool,
    regions_ready: bool,
    /// app -> region -> started Machines.
    apps: HashMap<String, BTreeMap<String, u64>>,
    endpoints: HashMap<String, Vec<String>>,
}

impl GlobalMap {
    /// Starts following the map on `global` until `cancel`.
    pub fn start(
        global: Vec<String>,
        tls: Option<ClientTls>,
        tracker: &TaskTracker,
        cancel: &CancellationToken,
    ) -> Arc<GlobalMap> {
        let clients = global
            .iter()
            .filter_map(|endpoint| match Client::lazy(endpoint, tls.clone()) {
                Ok(client) => Some(client),
                Err(err) => {
                    tracing::warn!(%endpoint, error = %err, "bad globald endpoint");
                    None
                }
            })
            .collect();
        let map = Arc::new(GlobalMap {
            state: Mutex::new(MapState::default()),
            clients,
        });
        let follow = |sql: &str, keys: &[&str]| Follow {
            statement: Statement::new(sql),
            key_columns: keys.iter().map(|k| k.to_string()).collect(),
            tls: tls.clone(),
            connect_timeout: Duration::from_secs(2),
            backoff_min: FOLLOW_BACKOFF_MIN,
            backoff_max: FOLLOW_BACKOFF_MAX,
        };
        let apps = follow(
            "SELECT app, region, started FROM app_regions",
            &["app", "region"],
        );
        let regions = follow("SELECT region, endpoints FROM regions", &["region"]);
        for (which, follow) in [(Table::Apps, apps), (Table::Regions, regions)] {
            let sink_map = Arc::clone(&map);
            let list = global.clone();
            crate::telemetry::spawn(
                tracker,
                follow.run(
                    move || list.clone(),
                    move |event| sink_map.apply(which, event),
                    cancel.clone(),
                ),
            );
        }
        map
    }

    fn apply(&self, table: Table, event: Event) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match (table, event) {
            (Table::Apps, Event::Reset(_)) => {
                state.apps.clear();
                state.apps_ready = false;
            }
            (Table::Regions, Event::Reset(_)) => {
                state.endpoints.clear();
                state.regions_ready = false;
            }
            (Table::Apps, Event::Ready) => state.apps_ready = true,
            (Table::Regions, Event::Ready) => state.regions_ready = true,
            (Table::Apps, Event::Down(_)) => state.apps_ready = false,
            (Table::Regions, Event::Down(_)) => state.regions_ready = false,
            (Table::Apps, Event::Upsert(row)) => {
                if let [
                    Value::Text(app),
                    Value::Text(region),
                    Value::Integer(started),
                ] = &row[..]
                {
                    state
                        .apps
                        .entry(app.clone())
                        .or_default()
                        .insert(region.clone(), (*started).max(0) as u64);
                }
            }
            (Table::Apps, Event::Remove(row)) => {
                if let [Value::Text(app), Value::Text(region), ..] = &row[..]
                    && let Some(regions) = state.apps.get_mut(app)
                {
                    regions.remove(region);
                    if regions.is_empty() {
                        state.apps.remove(app);
                    }
                }
            }
            (Table::Regions, Event::Upsert(row)) => {
                if let [Value::Text(region), Value::Text(endpoints)] = &row[..] {
                    state
                        .endpoints
                        .insert(region.clone(), parse_endpoints(endpoints));
                }
            }
            (Table::Regions, Event::Remove(row)) => {
                if let Some(Value::Text(region)) = row.first() {
                    state.endpoints.remove(region);
                }
            }
        }
    }

    async fn fetch_from(&self, app: &str) -> Result<AppRegions, String> {
        let mut last = "no globald endpoint".to_owned();
        for client in &self.clients {
            let regions = client
                .query(
                    "SELECT region, started FROM app_regions WHERE app = ?1",
                    vec![Value::Text(app.to_owned())],
                )
                .await;
            let endpoints = client
                .query(
                    "SELECT region, endpoints FROM regions WHERE region IN \
                     (SELECT region FROM app_regions WHERE app = ?1)",
                    vec![Value::Text(app.to_owned())],
                )
                .await;
            match (regions, endpoints) {
                (Ok(regions), Ok(endpoints)) => return Ok(app_regions(regions, endpoints)),
                (Err(err), _) | (_, Err(err)) => last = err.to_string(),
            }
        }
        Err(last)
    }
}

#[derive(Debug, Clone, Copy)]
enum Table {
    Apps,
    Regions,
}

impl MapSource for GlobalMap {
    fn regions(&self, app: &str) -> Option<Vec<(String, u64)>> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if !state.apps_ready || !state.regions_ready {
            return None;
        }
        Some(
            state
                .apps
                .get(app)
                .map(|regions| regions.iter().map(|(r, n)| (r.clone(), *n)).collect())
                .unwrap_or_default(),
        )
    }

    fn endpoints(&self, region: &str) -> Option<Vec<String>> {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.endpoints.get(region).cloned()
    }

    fn fetch<'a>(&'a self, app: &'a str) -> BoxFuture<'a, Result<AppRegions, String>> {
        Box::pin(self.fetch_from(app))
    }
}

/// Builds [`AppRegions`] from the answers of `SELECT region, started ...` and
/// `SELECT region, endpoints ...`.
pub fn app_regions(regions: Rows, endpoints: Rows) -> AppRegions {
    let regions = regions
        .rows
        .into_iter()
        .filter_map(|row| match &row[..] {
            [Value::Text(region), Value::Integer(started)] => {
                Some((region.clone(), (*started).max(0) as u64))
            }
            _ => None,
        })
        .collect();
    let endpoints = endpoints
        .rows
        .into_iter()
        .filter_map(|row| match &row[..] {
            [Value::Text(region), Value::Text(list)] => {
                Some((region.clone(), parse_endpoints(list)))
            }
            _ => None,
        })
        .collect();
    AppRegions { regions, endpoints }
}

/// The `regions.endpoints` column: a JSON array of endpoint strings.
pub fn parse_endpoints(text: &str) -> Vec<String> {
    serde_json::from_str(text).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn running(list: &[(&str, u64)]) -> Vec<(String, u64)> {
        list.iter().map(|(r, n)| (r.to_string(), *n)).collect()
    }

    #[test]
    fn the_local_region_comes_first_then_the_preference_then_the_rest_by_name() {
        let regions = running(&[("syd", 1), ("ams", 2), ("iad", 1), ("fra", 0), ("ord", 3)]);
        let prefer = vec!["ord".to_string(), "nrt".to_string(), "ams".to_string()];
        assert_eq!(
            order_regions(&regions, "iad", &prefer),
            vec!["iad", "ord", "ams", "syd"],
            "fra has nothing started; nrt runs nothing"
        );
        assert_eq!(
            order_regions(&regions, "lhr", &[]),
            vec!["ams", "iad", "ord", "syd"]
        );
        assert!(order_regions(&running(&[("ams", 0)]), "ams", &[]).is_empty());
    }

    fn row(id: &str, app: &str) -> Vec<Value> {
        vec![Value::Text(id.into()), Value::Text(app.into())]
    }

    #[test]
    fn a_region_cache_follows_its_subscription() {
        let cache = RegionCache::default();
        assert!(
            cache.lookup("web").is_err(),
            "not ready before the first result"
        );
        cache.apply(Event::Reset(vec!["id".into(), "app".into()]));
        cache.apply(Event::Upsert(row("m1", "web")));
        cache.apply(Event::Upsert(row("m2", "web")));
        cache.apply(Event::Upsert(row("m3", "db")));
        assert!(cache.lookup("web").is_err(), "not ready before Ready");
        cache.apply(Event::Ready);
        assert_eq!(cache.lookup("web").unwrap().1.len(), 2);
        // A Machine that moves to another app, one that stops.
        cache.apply(Event::Upsert(row("m2", "db")));
        cache.apply(Event::Remove(row("m1", "web")));
        assert!(cache.lookup("web").unwrap().1.is_empty());
        assert_eq!(cache.lookup("db").unwrap().1.len(), 2);
        cache.apply(Event::Down("connection refused".into()));
        let err = cache.lookup("db").unwrap_err();
        assert!(err.contains("connection refused"), "{err}");
        // A fresh start drops what was held.
        cache.apply(Event::Reset(vec!["id".into(), "app".into()]));
        cache.apply(Event::Ready);
        assert!(cache.lookup("db").unwrap().1.is_empty());
    }

    #[test]
    fn a_route_query_without_an_app_column_is_never_served_from_cache() {
        let cache = RegionCache::default();
        cache.apply(Event::Reset(vec!["id".into()]));
        cache.apply(Event::Upsert(vec![Value::Text("m1".into())]));
        cache.apply(Event::Ready);
        let err = cache.lookup("web").unwrap_err();
        assert!(err.contains("app column"), "{err}");
    }

    #[test]
    fn endpoints_are_a_json_array() {
        assert_eq!(
            parse_endpoints(r#"["http://a:1","http://b:2"]"#),
            vec!["http://a:1", "http://b:2"]
        );
        assert!(parse_endpoints("garbage").is_empty());
    }
}
