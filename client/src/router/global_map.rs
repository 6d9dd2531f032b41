//! The global map: which regions run an app and where their APIs are. [`MapSource`] is what the
//! router asks of it; [`GlobalMap`] is the copy an edge holds, following two tables of a globald
//! (`app_regions` and `regions`) and asking it directly while they are not current. Inside
//! globald, its own store is the source (see `strata-global`).
//!
//! It must not hold its lock across an `.await`: the state is behind a short std mutex.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures::future::BoxFuture;
use strata_types::{Rows, Statement, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::{FOLLOW_BACKOFF_MAX, FOLLOW_BACKOFF_MIN, spawn};
use crate::follow::{Event, Follow};
use crate::{Client, ClientTls};

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
            spawn(
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

    #[test]
    fn endpoints_are_a_json_array() {
        assert_eq!(
            parse_endpoints(r#"["http://a:1","http://b:2"]"#),
            vec!["http://a:1", "http://b:2"]
        );
        assert!(parse_endpoints("garbage").is_empty());
    }
}
