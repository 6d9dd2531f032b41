//! `Route`: the edge lookup served by globald, for proxies written in any language.
//!
//! globald holds the global map itself, so its router reads the map from the local store
//! ([`LocalMap`]); the regions' running Machines come from the router's region caches, each a
//! subscription to one region's regiond, opened on first use (see
//! `strata_client::router`). The router's counters join globald's metrics through
//! [`RouterMetrics`].

use std::sync::Arc;

use futures::future::BoxFuture;
use strata_client::router::{AppRegions, MapSource, Route, RouteError, RouterStats, app_regions};
use strata_common::metrics::{MetricSource, Sample, SampleKind};
use strata_common::store::{Store, Value};
use strata_proto::v1 as pb;
use tonic::Status;

use strata_proto::convert::row_to_pb;

/// The router's counters as a source of globald's metrics: the router (in `strata-client`)
/// names its counters and knows nothing of the registry.
#[derive(Debug)]
pub struct RouterMetrics(pub Arc<RouterStats>);

impl MetricSource for RouterMetrics {
    fn collect(&self) -> Vec<Sample> {
        self.0
            .counters()
            .into_iter()
            .map(|counter| Sample {
                name: counter.name,
                help: counter.help,
                kind: SampleKind::Counter,
                value: counter.value as f64,
            })
            .collect()
    }
}

/// The app's regions.
const REGIONS_SQL: &str = "SELECT region, started FROM app_regions WHERE app = ?1";
/// Endpoints of the regions running the app.
const ENDPOINTS_SQL: &str = "SELECT region, endpoints FROM regions WHERE region IN \
     (SELECT region FROM app_regions WHERE app = ?1)";

/// The global map, read from globald's own store.
pub struct LocalMap {
    store: Store,
}

impl LocalMap {
    /// A map over `store`.
    pub fn new(store: Store) -> LocalMap {
        LocalMap { store }
    }

    /// The app's regions and, when asked, their endpoints.
    fn read(&self, app: &str, with_endpoints: bool) -> Result<AppRegions, String> {
        let app = [Value::Text(app.to_owned())];
        let regions = self
            .store
            .query(REGIONS_SQL, &app)
            .map_err(|err| err.to_string())?;
        let endpoints = if with_endpoints {
            self.store
                .query(ENDPOINTS_SQL, &app)
                .map_err(|err| err.to_string())?
        } else {
            Default::default()
        };
        Ok(app_regions(regions, endpoints))
    }
}

impl MapSource for LocalMap {
    fn regions(&self, app: &str) -> Option<Vec<(String, u64)>> {
        // The local store is always current: a read of an indexed row or two. Endpoints are
        // read only for the regions a lookup has to ask (`endpoints`).
        self.read(app, false).ok().map(|found| found.regions)
    }

    fn endpoints(&self, region: &str) -> Option<Vec<String>> {
        let rows = self
            .store
            .query(
                "SELECT endpoints FROM regions WHERE region = ?1",
                &[Value::Text(region.to_owned())],
            )
            .ok()?;
        match rows.rows.first().and_then(|row| row.first()) {
            Some(Value::Text(list)) => Some(strata_client::router::parse_endpoints(list)),
            _ => None,
        }
    }

    fn fetch<'a>(&'a self, app: &'a str) -> BoxFuture<'a, Result<AppRegions, String>> {
        Box::pin(async move { self.read(app, true) })
    }
}

/// The gRPC answer for a route.
pub fn to_pb(route: Route) -> pb::RouteResponse {
    pb::RouteResponse {
        app: route.app,
        region: route.region,
        columns: route.columns,
        machines: route.machines.into_iter().map(row_to_pb).collect(),
        candidates: route.candidates,
        skipped: route
            .skipped
            .into_iter()
            .map(|(region, reason)| pb::SkippedRegion { region, reason })
            .collect(),
    }
}

/// The status for a lookup that found nothing.
pub fn status(err: RouteError) -> Status {
    let message = err.to_string();
    match err {
        RouteError::NotFound(_) => Status::not_found(message),
        RouteError::Unavailable { .. } | RouteError::Map(_) => Status::unavailable(message),
    }
}
