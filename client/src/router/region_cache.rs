//! One region's running Machines, by app, as the subscription to the region's route query
//! reports them: the router answers from it while it is current and asks the region otherwise.
//!
//! It must not hold its lock across an `.await` (it never awaits): one short std mutex.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, PoisonError};

use strata_types::Value;

use crate::follow::Event;

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

#[cfg(test)]
mod tests {
    use super::*;

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
}
