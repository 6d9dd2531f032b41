//! The region publisher in the simulator: the real `logic::Publisher` on each node, the
//! derivation simulated from the node's replica, and a simulated globald.
//!
//! Each write belongs to an app; a node's derived map counts, per app, the versions the node
//! holds. globald applies each publish it acknowledges (a full one replaces the region's map)
//! and may fail one, with a latency each way.

use std::time::Duration;

use strata_regional::publish::logic::{AppMap, Counts, Publication, Settings};

use super::replica::{Ledger, ModelReplica};

/// Settings of the simulated publishing.
#[derive(Debug, Clone)]
pub struct PublishConfig {
    /// The publisher's own settings.
    pub settings: Settings,
    /// How long a derivation takes.
    pub derive_delay: Duration,
    /// One-way latency to globald.
    pub latency: Duration,
    /// Probability that globald fails a publish (nothing is applied).
    pub fail: f64,
}

impl Default for PublishConfig {
    fn default() -> Self {
        PublishConfig {
            settings: Settings {
                publishers: 2,
                debounce: Duration::from_millis(100),
                reconcile: Duration::from_secs(3),
                publish_interval_min: Duration::from_millis(100),
                backoff_min: Duration::from_millis(100),
                backoff_max: Duration::from_secs(2),
            },
            derive_delay: Duration::from_millis(2),
            latency: Duration::from_millis(5),
            fail: 0.1,
        }
    }
}

/// The simulated globald: the region's map as it holds it.
#[derive(Debug, Default)]
pub struct Globald {
    /// The region's apps.
    pub map: AppMap,
    /// Publishes applied.
    pub publishes: u64,
    /// Publishes failed on purpose.
    pub failures: u64,
}

impl Globald {
    /// Applies an acknowledged publish.
    pub fn apply(&mut self, publication: &Publication) {
        self.publishes += 1;
        if publication.full {
            self.map.clear();
        }
        for (app, counts) in &publication.upserts {
            self.map.insert(app.clone(), *counts);
        }
        for app in &publication.removed {
            self.map.remove(app);
        }
    }
}

/// The node name the publisher rules order by.
pub fn name(index: usize) -> String {
    format!("node-{index:05}")
}

/// The map a node derives: versions held, per app.
pub fn derive(replica: &ModelReplica, ledger: &Ledger) -> AppMap {
    let mut map = AppMap::new();
    for (site, range) in replica.ranges() {
        for version in range {
            if let Some(written) = ledger.get(site, version) {
                count(&mut map, &written.app);
            }
        }
    }
    map
}

/// The map derived from every write: what globald must hold once the region is quiet.
pub fn truth(ledger: &Ledger) -> AppMap {
    let mut map = AppMap::new();
    for (_, written) in ledger.iter() {
        count(&mut map, &written.app);
    }
    map
}

fn count(map: &mut AppMap, app: &str) {
    let counts: &mut Counts = map.entry(app.to_string()).or_default();
    counts.machines += 1;
    counts.started += 1;
}
