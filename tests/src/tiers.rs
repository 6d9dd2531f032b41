//! Both tiers in one process: a globald cluster (its own CA, API served with mTLS) and region
//! clusters of regiond (each its own CA) whose publishers write to it with certificates the
//! global CA issued for their region.

use std::collections::BTreeMap;
use std::time::Duration;

use strata_client::{Client, ClientTls};
use strata_common::config::{NodeConfig, TlsSection};
use strata_common::store::{Rows, Statement, Value};
use strata_common::transport::Tier;

use crate::cluster::{TestCluster, wait_for};

/// The global cluster's name (the `region` of its certificates).
pub const GLOBAL: &str = "global";

/// A global tier and some regions.
pub struct Tiers {
    /// The globald nodes; their `certs` are the global CA.
    pub global: TestCluster,
    /// The regions, by name.
    pub regions: BTreeMap<String, TestCluster>,
}

/// How to build a [`Tiers`].
pub struct TiersOptions {
    /// globald nodes.
    pub globals: usize,
    /// Regions and their regiond count.
    pub regions: Vec<(&'static str, usize)>,
    /// Adjusts a globald's configuration.
    pub tune_global: fn(&mut NodeConfig),
    /// Adjusts a regiond's configuration (given its region).
    pub tune_region: fn(&str, &mut NodeConfig),
}

impl Default for TiersOptions {
    fn default() -> Self {
        TiersOptions {
            globals: 2,
            regions: vec![("ams", 2), ("iad", 2)],
            tune_global: |_| {},
            tune_region: |_, _| {},
        }
    }
}

impl Tiers {
    /// Starts the global tier, then each region publishing to it; waits for membership.
    pub async fn start(options: TiersOptions) -> Tiers {
        let tune_global = options.tune_global;
        let global = TestCluster::start_with(options.globals, GLOBAL, strata_global::spec(), |c| {
            // mTLS on the API: publishers are known by their certificates.
            c.api.tls = Some(c.gossip.tls.clone());
            tune_global(c);
        })
        .await;
        let endpoints = global_endpoints(&global);
        let mut regions = BTreeMap::new();
        for (region, nodes) in options.regions {
            let publisher =
                global
                    .certs
                    .node(&format!("{region}-publisher"), Tier::Regional, region);
            let tune_region = options.tune_region;
            let to = endpoints.clone();
            let cluster =
                TestCluster::start_with(nodes, region, strata_regional::spec(), move |c| {
                    c.publish.to = to.clone();
                    c.publish.tls = Some(publisher.clone());
                    c.publish.server_name = format!("{GLOBAL}.global.strata");
                    tune_region(region, c);
                })
                .await;
            regions.insert(region.to_owned(), cluster);
        }
        let tiers = Tiers { global, regions };
        tiers.global.wait_members(Duration::from_secs(30)).await;
        for cluster in tiers.regions.values() {
            cluster.wait_members(Duration::from_secs(30)).await;
        }
        tiers
    }

    /// A region's cluster.
    pub fn region(&self, name: &str) -> &TestCluster {
        &self.regions[name]
    }

    /// A region's cluster, mutable (to stop or restart nodes).
    pub fn region_mut(&mut self, name: &str) -> &mut TestCluster {
        self.regions.get_mut(name).expect("a region of the test")
    }

    /// The globald API endpoints (`https://127.0.0.1:port`).
    pub fn global_endpoints(&self) -> Vec<String> {
        global_endpoints(&self.global)
    }

    /// Client TLS to globald with a certificate of `tier` and `region` from the global CA.
    pub fn global_tls(&self, name: &str, tier: Tier, region: &str) -> ClientTls {
        let files = self.global.certs.node(name, tier, region);
        client_tls(&files)
    }

    /// A client of globald `index` presenting an operator's (global-tier) certificate.
    pub async fn global_client(&self, index: usize) -> Client {
        let tls = self.global_tls("operator", Tier::Global, GLOBAL);
        self.global_client_with(index, tls).await
    }

    /// A client of globald `index` with `tls`.
    pub async fn global_client_with(&self, index: usize, tls: ClientTls) -> Client {
        let endpoint = format!("https://{}", self.global.node(index).api_addr());
        Client::connect(&endpoint, Some(tls)).await.unwrap()
    }

    /// The `app_regions` rows of `region` on globald `index`: app -> (machines, started).
    pub fn global_rows(&self, index: usize, region: &str) -> BTreeMap<String, (i64, i64)> {
        let rows = self
            .global
            .store(index)
            .query(
                "SELECT app, machines, started FROM app_regions WHERE region = ?1",
                &[Value::Text(region.to_owned())],
            )
            .unwrap();
        counts_by_app(rows)
    }

    /// Waits until every running globald holds exactly `expected` for `region`.
    pub async fn wait_global(
        &self,
        region: &str,
        expected: &BTreeMap<String, (i64, i64)>,
        budget: Duration,
    ) {
        let running = self.global.running();
        wait_for(budget, &format!("the global rows of {region}"), || async {
            let seen: Vec<_> = running
                .iter()
                .map(|i| self.global_rows(*i, region))
                .collect();
            if seen.iter().all(|rows| rows == expected) {
                Ok(())
            } else {
                Err(format!("expected {expected:?}, globald holds {seen:?}"))
            }
        })
        .await;
    }

    /// Stops every node.
    pub async fn shutdown(self) {
        for (_, cluster) in self.regions {
            cluster.shutdown().await;
        }
        self.global.shutdown().await;
    }
}

/// Rows of `(app, machines, started)` as app -> (machines, started).
pub fn counts_by_app(rows: Rows) -> BTreeMap<String, (i64, i64)> {
    rows.rows
        .into_iter()
        .map(|row| match &row[..] {
            [Value::Text(app), Value::Integer(m), Value::Integer(s)] => (app.clone(), (*m, *s)),
            other => panic!("unexpected row {other:?}"),
        })
        .collect()
}

fn global_endpoints(global: &TestCluster) -> Vec<String> {
    global
        .running()
        .iter()
        .map(|i| format!("https://{}", global.node(*i).api_addr()))
        .collect()
}

/// Client TLS from certificate files, verifying globald's cluster name.
pub fn client_tls(files: &TlsSection) -> ClientTls {
    ClientTls::load(
        &files.ca,
        &files.cert,
        &files.key,
        format!("{GLOBAL}.global.strata"),
    )
    .unwrap()
}

/// The whole-row upsert of a Machine, as a host republishes it.
pub fn machine(id: &str, app: &str, region: &str, state: &str) -> Statement {
    Statement::with_params(
        "INSERT INTO machines (id, app, region, host, state, address, port, image, version, updated) \
         VALUES (?1, ?2, ?3, 'host-1', ?4, '10.0.0.1', 8080, NULL, 1, 0) \
         ON CONFLICT (id) DO UPDATE SET app = excluded.app, region = excluded.region, \
           host = excluded.host, state = excluded.state, address = excluded.address, \
           port = excluded.port, image = excluded.image, version = excluded.version, \
           updated = excluded.updated",
        vec![
            Value::Text(id.into()),
            Value::Text(app.into()),
            Value::Text(region.into()),
            Value::Text(state.into()),
        ],
    )
}
