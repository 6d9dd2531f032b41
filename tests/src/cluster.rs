//! In-process clusters of real nodes for tests: certificates from a fresh CA, every listener on
//! a loopback port chosen by the kernel, nodes started, stopped and restarted in place, and
//! waits for a condition with a deadline that report what they saw when they fail.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use strata_client::Client;
use strata_common::config::{NodeConfig, TlsSection};
use strata_common::node::{Node, NodeSpec};
use strata_common::store::Store;
use strata_common::transport::{CertPair, PeerIdentity, Tier, generate_ca, generate_node};

/// The default region schema (the same file regiond embeds).
pub const REGION_SCHEMA: &str = include_str!("../../regional/schema.sql");

/// A CA and the certificates it signed, as files in a directory.
pub struct Certs {
    dir: PathBuf,
    ca: CertPair,
}

impl Certs {
    /// A fresh CA in `dir`.
    pub fn new(dir: &Path, name: &str) -> Certs {
        std::fs::create_dir_all(dir).unwrap();
        let ca = generate_ca(name).unwrap();
        std::fs::write(dir.join("ca.crt"), &ca.cert_pem).unwrap();
        Certs {
            dir: dir.to_owned(),
            ca,
        }
    }

    /// Certificate files for a node.
    pub fn node(&self, name: &str, tier: Tier, region: &str) -> TlsSection {
        let identity = PeerIdentity::new(name, tier, region).unwrap();
        let pair =
            generate_node(&self.ca, &identity, &[], &["127.0.0.1".parse().unwrap()]).unwrap();
        self.write(name, &pair)
    }

    /// The CA's certificate and key.
    pub fn ca(&self) -> &CertPair {
        &self.ca
    }

    /// Writes `<name>.crt` and `<name>.key` (each replaced atomically, by rename, as a
    /// certificate renewal tool does) and returns the files with the CA.
    pub fn write(&self, name: &str, pair: &CertPair) -> TlsSection {
        let cert = self.dir.join(format!("{name}.crt"));
        let key = self.dir.join(format!("{name}.key"));
        for (path, text) in [(&cert, &pair.cert_pem), (&key, &pair.key_pem)] {
            let tmp = path.with_extension("tmp");
            std::fs::write(&tmp, text).unwrap();
            std::fs::rename(&tmp, path).unwrap();
        }
        TlsSection {
            ca: self.dir.join("ca.crt"),
            cert,
            key,
        }
    }
}

/// One node of a test cluster.
pub struct TestNode {
    /// The running node (None while stopped).
    pub node: Option<Node>,
    /// Its configuration (listen addresses fixed after the first start, so a restart keeps them).
    pub config: NodeConfig,
}

/// An in-process cluster.
pub struct TestCluster {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// The cluster's CA.
    pub certs: Certs,
    /// The nodes, in start order.
    pub nodes: Vec<TestNode>,
    region: String,
    spec: NodeSpec,
}

/// A node configuration for tests: loopback, kernel-chosen ports, a data directory under `dir`.
pub fn test_config(
    dir: &Path,
    name: &str,
    region: &str,
    tls: TlsSection,
    bootstrap: Vec<String>,
) -> NodeConfig {
    let mut config = NodeConfig::default();
    config.node.name = name.to_owned();
    config.node.region = region.to_owned();
    config.node.data_dir = dir.join(name);
    config.gossip.listen = "127.0.0.1:0".parse().unwrap();
    config.gossip.bootstrap = bootstrap;
    config.gossip.tls = tls;
    config.api.listen = "127.0.0.1:0".parse().unwrap();
    config.admin.listen = "127.0.0.1:0".parse().unwrap();
    config
}

impl TestCluster {
    /// Starts `n` region nodes that join through the first.
    pub async fn start(n: usize, region: &str) -> TestCluster {
        Self::start_with(n, region, strata_regional::spec(), |_| {}).await
    }

    /// Starts `n` nodes of a daemon (`strata_regional::spec()`, `strata_global::spec()`);
    /// `tune` adjusts each configuration.
    pub async fn start_with(
        n: usize,
        region: &str,
        spec: NodeSpec,
        tune: impl Fn(&mut NodeConfig),
    ) -> TestCluster {
        let dir = tempfile::tempdir().unwrap();
        let certs = Certs::new(&dir.path().join("certs"), &format!("{region} test CA"));
        let mut cluster = TestCluster {
            dir,
            certs,
            nodes: Vec::new(),
            region: region.to_owned(),
            spec,
        };
        for _ in 0..n {
            cluster.add_node(&tune).await;
        }
        cluster
    }

    /// Starts one more node, joining through the first.
    pub async fn add_node(&mut self, tune: impl Fn(&mut NodeConfig)) -> usize {
        let index = self.nodes.len();
        let name = format!("{}-{index}", self.region);
        let tls = self.certs.node(&name, self.spec.tier, &self.region);
        let bootstrap = self
            .nodes
            .first()
            .map(|n| vec![n.config.gossip.listen.to_string()])
            .unwrap_or_default();
        let mut config = test_config(self.dir.path(), &name, &self.region, tls, bootstrap);
        tune(&mut config);
        self.nodes.push(TestNode { node: None, config });
        self.restart(index).await;
        index
    }

    /// Starts (again) a stopped node, on the same addresses and data directory.
    pub async fn restart(&mut self, index: usize) {
        let config = self.nodes[index].config.clone();
        let node = Node::start(config, self.spec.clone()).await.unwrap();
        let entry = &mut self.nodes[index];
        entry.config.gossip.listen = node.gossip_addr();
        entry.config.api.listen = node.api_addr();
        entry.config.admin.listen = node.admin_addr();
        entry.node = Some(node);
    }

    /// Stops a node cleanly (it leaves the cluster).
    pub async fn stop(&mut self, index: usize) {
        if let Some(node) = self.nodes[index].node.take() {
            node.shutdown().await;
        }
    }

    /// Stops every node.
    pub async fn shutdown(mut self) {
        for index in 0..self.nodes.len() {
            self.stop(index).await;
        }
    }

    /// The running node `index`.
    pub fn node(&self, index: usize) -> &Node {
        self.nodes[index]
            .node
            .as_ref()
            .expect("the node is running")
    }

    /// The store of node `index`.
    pub fn store(&self, index: usize) -> &Store {
        &self.node(index).store
    }

    /// A gRPC client of node `index`.
    pub async fn client(&self, index: usize) -> Client {
        Client::connect(&format!("http://{}", self.node(index).api_addr()), None)
            .await
            .unwrap()
    }

    /// Indexes of running nodes.
    pub fn running(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|i| self.nodes[*i].node.is_some())
            .collect()
    }

    /// Gossip address of node `index`.
    pub fn gossip_addr(&self, index: usize) -> SocketAddr {
        self.nodes[index].config.gossip.listen
    }

    /// Waits until every running node sees every other running node alive.
    pub async fn wait_members(&self, budget: Duration) {
        let running = self.running();
        wait_for(budget, "every node to see every other", || async {
            let seen: Vec<usize> = running
                .iter()
                .map(|i| self.node(*i).cluster.view().members.len())
                .collect();
            if seen.iter().all(|&n| n == running.len() - 1) {
                Ok(())
            } else {
                Err(format!("members seen: {seen:?}"))
            }
        })
        .await;
    }

    /// Waits until every running node holds identical tables and metadata.
    pub async fn wait_converged(&self, budget: Duration) {
        let running = self.running();
        wait_for(budget, "every node to converge", || async {
            let dumps: Vec<String> = running
                .iter()
                .map(|i| self.store(*i).dump().unwrap())
                .collect();
            if dumps.windows(2).all(|w| w[0] == w[1]) {
                Ok(())
            } else {
                let heads: Vec<_> = running
                    .iter()
                    .map(|i| self.store(*i).bookkeeping())
                    .collect();
                Err(format!("dumps differ; bookkeeping per node: {heads:?}"))
            }
        })
        .await;
    }
}

/// Polls `check` until it returns `Ok` or `budget` passes; then panics with what it last saw.
pub async fn wait_for<F, Fut>(budget: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let deadline = Instant::now() + budget;
    let mut step = Duration::from_millis(5);
    loop {
        let seen = match check().await {
            Ok(()) => return,
            Err(seen) => seen,
        };
        if Instant::now() >= deadline {
            panic!("timed out after {budget:?} waiting for {what}; last seen: {seen}");
        }
        tokio::time::sleep(step).await;
        step = (step * 2).min(Duration::from_millis(100));
    }
}

/// The sum of a metric's samples (all label sets) in an OpenMetrics text.
pub fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with([' ', '{']))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
