//! Clusters of real daemon processes (`regiond`, `globald`) on loopback, for multi-process and
//! kill -9 tests and the benchmarks.
//!
//! A node is started with every listener on port 0; its log line `node started gossip_addr=..
//! api_addr=.. admin_addr=..` tells the ports, and a restart reuses them. Logs go to a file per
//! node, which a failing wait prints the tail of.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use strata_client::Client;
use strata_common::config::TlsSection;
use strata_common::transport::{PeerIdentity, Tier, generate_node};

use crate::cluster::Certs;

/// The path of a daemon binary built with the tests (`target/<profile>/<name>`).
pub fn daemon_binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary has a path");
    let mut dir = exe
        .parent()
        .expect("the test binary has a directory")
        .to_owned();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is missing: build it first (cargo build --workspace)",
        path.display()
    );
    path
}

/// One daemon process.
pub struct Daemon {
    /// Its name.
    pub name: String,
    child: Option<Child>,
    config: PathBuf,
    log: PathBuf,
    /// Gossip (QUIC) address.
    pub gossip: SocketAddr,
    /// gRPC API address.
    pub api: SocketAddr,
    /// Admin HTTP address.
    pub admin: SocketAddr,
    /// The database file.
    pub db: PathBuf,
    /// The data directory (the database and everything beside it).
    pub data: PathBuf,
    tls: TlsSection,
    bootstrap: Vec<String>,
    host: Option<NetnsHost>,
}

/// Where a node runs when not on loopback: inside a network namespace (made by the caller),
/// listening on an address of that namespace.
#[derive(Debug, Clone)]
pub struct NetnsHost {
    /// The namespace's name (`ip netns exec <namespace> ...`).
    pub namespace: String,
    /// The node's address inside it; every listener binds it.
    pub addr: IpAddr,
}

/// Settings of a process cluster.
#[derive(Debug, Clone)]
pub struct ProcOptions {
    /// `regiond` or `globald`.
    pub binary: &'static str,
    /// The tier of the binary.
    pub tier: Tier,
    /// The region (or global cluster name).
    pub region: String,
    /// Extra TOML appended to every node's configuration.
    pub extra_toml: String,
    /// Serve the API with mTLS, with the node's own certificate.
    pub api_tls: bool,
    /// Node `i` runs in `netns[i]` when present, on loopback otherwise.
    pub netns: Vec<NetnsHost>,
}

impl ProcOptions {
    /// A region cluster of `regiond` processes.
    pub fn region(region: &str) -> ProcOptions {
        ProcOptions {
            binary: "regiond",
            tier: Tier::Regional,
            region: region.to_owned(),
            extra_toml: String::new(),
            api_tls: false,
            netns: Vec::new(),
        }
    }

    /// A globald cluster, its API served with mTLS.
    pub fn global(name: &str) -> ProcOptions {
        ProcOptions {
            binary: "globald",
            tier: Tier::Global,
            region: name.to_owned(),
            extra_toml: String::new(),
            api_tls: true,
            netns: Vec::new(),
        }
    }
}

/// A cluster of daemon processes.
pub struct ProcCluster {
    /// Keeps the directory alive.
    pub dir: tempfile::TempDir,
    /// The cluster's CA.
    pub certs: Certs,
    /// The nodes.
    pub nodes: Vec<Daemon>,
    options: ProcOptions,
}

impl ProcCluster {
    /// Starts `n` nodes; each after the first joins through the first.
    pub fn start(n: usize, options: ProcOptions) -> ProcCluster {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let certs = Certs::new(&dir.path().join("certs"), "process test CA");
        let mut cluster = ProcCluster {
            dir,
            certs,
            nodes: Vec::new(),
            options,
        };
        for _ in 0..n {
            cluster.add_node();
        }
        cluster
    }

    /// Starts one more node.
    pub fn add_node(&mut self) -> usize {
        let index = self.nodes.len();
        let name = format!("{}-{index}", self.options.region);
        let host = self.options.netns.get(index).cloned();
        let tls = match &host {
            None => self
                .certs
                .node(&name, self.options.tier, &self.options.region),
            Some(host) => {
                // The certificate names the namespace address rather than loopback.
                let identity = PeerIdentity::new(&name, self.options.tier, &self.options.region)
                    .expect("a valid identity");
                let pair = generate_node(self.certs.ca(), &identity, &[], &[host.addr])
                    .expect("a node certificate");
                self.certs.write(&name, &pair)
            }
        };
        let bootstrap: Vec<String> = self
            .nodes
            .first()
            .map(|d| d.gossip.to_string())
            .into_iter()
            .collect();
        let ip = host
            .as_ref()
            .map_or(IpAddr::from([127, 0, 0, 1]), |h| h.addr);
        let zero = SocketAddr::new(ip, 0);
        let data = self.dir.path().join(&name);
        let mut daemon = Daemon {
            name: name.clone(),
            child: None,
            config: self.dir.path().join(format!("{name}.toml")),
            log: self.dir.path().join(format!("{name}.log")),
            gossip: zero,
            api: zero,
            admin: zero,
            db: data.join("strata.sqlite"),
            data,
            tls,
            bootstrap,
            host,
        };
        write_config(&daemon, &self.options);
        daemon.spawn(self.options.binary);
        daemon.wait_started();
        // Fix the ports for restarts.
        write_config(&daemon, &self.options);
        self.nodes.push(daemon);
        index
    }

    /// Rewrites every node's configuration to bootstrap from all the other nodes, so any node
    /// (the first included) finds the cluster again after a restart, even with a wiped disk.
    /// Takes effect at each node's next start.
    pub fn bootstrap_from_all(&mut self) {
        let all: Vec<String> = self.nodes.iter().map(|d| d.gossip.to_string()).collect();
        for daemon in &mut self.nodes {
            let own = daemon.gossip.to_string();
            daemon.bootstrap = all.iter().filter(|a| **a != own).cloned().collect();
            write_config(daemon, &self.options);
        }
    }

    /// Whether node `index` has a running process (started and not killed or stopped).
    pub fn running(&self, index: usize) -> bool {
        self.nodes[index].child.is_some()
    }

    /// Deletes node `index`'s data directory, as a lost disk would; the node must be down
    /// (killed or stopped). Its next [`ProcCluster::restart`] starts empty on the same ports.
    pub fn wipe(&mut self, index: usize) {
        assert!(
            !self.running(index),
            "wipe node {index} only while it is down"
        );
        let data = &self.nodes[index].data;
        if data.exists() {
            std::fs::remove_dir_all(data).expect("the data directory is removed");
        }
    }

    /// Kills node `index` with SIGKILL.
    pub fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops node `index` with SIGTERM and waits for it to exit.
    pub fn stop(&mut self, index: usize) {
        if let Some(mut child) = self.nodes[index].child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts node `index` again on its ports and data.
    pub fn restart(&mut self, index: usize) {
        let binary = self.options.binary;
        let daemon = &mut self.nodes[index];
        let before = std::fs::metadata(&daemon.log).map(|m| m.len()).unwrap_or(0);
        daemon.spawn(binary);
        daemon.wait_started_after(before);
    }

    /// A gRPC client of node `index`.
    pub async fn client(&self, index: usize) -> Client {
        Client::connect(&format!("http://{}", self.nodes[index].api), None)
            .await
            .expect("the API answers")
    }

    /// The last lines of node `index`'s log.
    pub fn log_tail(&self, index: usize, lines: usize) -> String {
        tail(&self.nodes[index].log, lines)
    }
}

impl Drop for ProcCluster {
    fn drop(&mut self) {
        for index in 0..self.nodes.len() {
            self.kill(index);
        }
    }
}

fn write_config(daemon: &Daemon, options: &ProcOptions) {
    let tls = &daemon.tls;
    let data = &daemon.data;
    let bootstrap = if daemon.bootstrap.is_empty() {
        String::new()
    } else {
        let quoted: Vec<String> = daemon
            .bootstrap
            .iter()
            .map(|b| format!("\"{b}\""))
            .collect();
        format!("bootstrap = [{}]", quoted.join(", "))
    };
    // A namespace address is not loopback: plaintext there is what the test means.
    let plaintext = if daemon.host.is_some() && !options.api_tls {
        "allow_plaintext = true\n"
    } else {
        ""
    };
    let api_tls = if options.api_tls {
        format!(
            "[api.tls]\nca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
            tls.ca.display(),
            tls.cert.display(),
            tls.key.display()
        )
    } else {
        String::new()
    };
    let toml = format!(
        "[node]\nname = \"{name}\"\nregion = \"{region}\"\ndata_dir = \"{data}\"\n\
         [gossip]\nlisten = \"{gossip}\"\n{bootstrap}\n\
         [gossip.tls]\nca = \"{ca}\"\ncert = \"{cert}\"\nkey = \"{key}\"\n\
         [api]\nlisten = \"{api}\"\n{plaintext}{api_tls}[admin]\nlisten = \"{admin}\"\n{extra}\n",
        name = daemon.name,
        region = options.region,
        data = data.display(),
        gossip = daemon.gossip,
        ca = tls.ca.display(),
        cert = tls.cert.display(),
        key = tls.key.display(),
        api = daemon.api,
        admin = daemon.admin,
        extra = options.extra_toml,
    );
    std::fs::write(&daemon.config, toml).expect("the config is written");
}

impl Daemon {
    fn spawn(&mut self, binary: &str) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("a log file");
        let mut command = match &self.host {
            None => Command::new(daemon_binary(binary)),
            Some(host) => {
                // `ip netns exec` execs the daemon in place: the child's pid is the daemon's,
                // so kill -9 reaches it.
                let mut command = Command::new("ip");
                command
                    .args(["netns", "exec", &host.namespace])
                    .arg(daemon_binary(binary));
                command
            }
        };
        // The daemons read `STRATA_*` variables as configuration: the tests' own settings
        // (`STRATA_HISTORY_SEED`, ...) must not reach them.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("STRATA_HISTORY_") {
                command.env_remove(key);
            }
        }
        let child = command
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("the daemon starts");
        self.child = Some(child);
    }

    fn wait_started(&mut self) {
        self.wait_started_after(0);
    }

    /// Waits for the `node started` line written after byte `offset` of the log.
    fn wait_started_after(&mut self, offset: u64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&self.log).unwrap_or_default();
            let fresh = text.get(offset as usize..).unwrap_or("");
            if let Some(line) = fresh.lines().find(|l| l.contains("node started")) {
                let field = |key: &str| -> SocketAddr {
                    let start = line.find(key).expect("the field is logged") + key.len();
                    let value: String = line[start..]
                        .chars()
                        .take_while(|c| !c.is_whitespace())
                        .collect();
                    value.parse().expect("an address")
                };
                self.gossip = field("gossip_addr=");
                self.api = field("api_addr=");
                self.admin = field("admin_addr=");
                return;
            }
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "{} exited with {status} before starting:\n{}",
                    self.name,
                    tail(&self.log, 30)
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not start within 60 s:\n{}",
                self.name,
                tail(&self.log, 30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The process id, while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `GET path` on a node's admin listener: the HTTP status and the body (`/metrics`,
/// `/readyz`, `/healthz`).
pub async fn admin_get(admin: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(admin).await?;
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut text = String::new();
    tcp.read_to_string(&mut text).await?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map_or(String::new(), |(_, body)| body.to_owned());
    Ok((status, body))
}

/// The value of one series (`name{labels}` exactly as the page prints it) on a `/metrics` page.
pub fn metric_value(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
}
