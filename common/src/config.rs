//! Node configuration: a TOML file plus `STRATA_<SECTION>__<KEY>` environment overrides
//! (figment). Every key has a default here, documented in `deploy/regiond.toml`; an unknown key
//! or a value of the wrong type is an error that names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

use crate::store::{Durability, StoreOptions};
/// The log format is telemetry's; `[log] format` names it.
pub use crate::telemetry::LogFormat;
use crate::transport::Tier;
use strata_core::ClusterConfig;

/// Why a configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file named on the command line does not exist.
    #[error("config file {0} does not exist")]
    Missing(PathBuf),
    /// A key is unknown, or its value has the wrong type (figment names the key).
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// A required key is unset.
    #[error("configuration key {0} is required")]
    Required(&'static str),
    /// The API would serve plaintext on an address others can reach, and the configuration
    /// does not allow it explicitly.
    #[error(
        "[api] listen = {addr} serves gRPC in plaintext (no [api.tls]): anyone who can reach \
         {addr} may write. Configure [api.tls], listen on a loopback address, or set \
         [api] allow_plaintext = true to allow exactly that"
    )]
    PlaintextApi {
        /// The listen address.
        addr: SocketAddr,
    },
    /// A section configures the other daemon.
    #[error("section [{section}] configures {owner}; this is a {tier} node")]
    OtherDaemon {
        /// The section.
        section: &'static str,
        /// The daemon it belongs to.
        owner: &'static str,
        /// This node's tier.
        tier: Tier,
    },
}

/// Everything a node is configured with.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Who this node is.
    pub node: NodeSection,
    /// The local database.
    pub store: StoreSection,
    /// The gossip (QUIC) endpoint.
    pub gossip: GossipSection,
    /// Membership, broadcast and anti-entropy tuning.
    pub cluster: ClusterConfig,
    /// The gRPC API.
    pub api: ApiSection,
    /// The admin HTTP listener (metrics, health).
    pub admin: AdminSection,
    /// Logging.
    pub log: LogSection,
    /// The event-loop watchdog.
    pub watchdog: WatchdogSection,
    /// regiond only: deriving the region's app map and publishing it to the global tier.
    pub publish: PublishSection,
    /// globald only: what regions may publish.
    pub global: GlobalSection,
    /// globald only: route lookups (`Route`).
    pub route: RouteSection,
    /// Checking, reloading and expiry warnings of every configured certificate.
    pub certificates: CertificatesSection,
}

/// Checking, reloading and expiry warnings of every configured certificate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CertificatesSection {
    /// How often the certificate files are re-read, ms; a renewed gossip or API certificate is
    /// checked and swapped in for new connections.
    pub reload_interval_ms: u64,
    /// A certificate or CA with fewer days left is warned about (daily until renewed).
    pub warn_before_days: u64,
}

impl Default for CertificatesSection {
    fn default() -> Self {
        CertificatesSection {
            reload_interval_ms: 30_000,
            warn_before_days: 14,
        }
    }
}

/// Who this node is.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeSection {
    /// The node's name (required; must match its certificate).
    pub name: String,
    /// The node's region, or the global cluster's name (required; must match its certificate).
    pub region: String,
    /// Where the node keeps its data.
    pub data_dir: PathBuf,
}

/// The local database.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreSection {
    /// The database file (default: `<data_dir>/strata.sqlite`).
    pub path: Option<PathBuf>,
    /// Schema files, applied in order at start (default: the binary's built-in schema).
    pub schema: Vec<PathBuf>,
    /// Reader connections.
    pub readers: usize,
    /// Page cache of the writer, MiB.
    pub writer_cache_mib: u32,
    /// Page cache of each reader, MiB.
    pub reader_cache_mib: u32,
    /// `normal` (survives process crashes; a power loss may lose the last commits, and the node
    /// then writes under a new site id) or `full` (fsync per commit).
    pub durability: Durability,
    /// Cells one transaction may change.
    pub cells_max: usize,
    /// Statements one transaction may hold.
    pub statements_max: usize,
    /// Target size of a changeset chunk on the wire, bytes.
    pub chunk_bytes: usize,
}

impl Default for StoreSection {
    fn default() -> Self {
        let store = StoreOptions::default();
        StoreSection {
            path: None,
            schema: Vec::new(),
            readers: store.readers,
            writer_cache_mib: (store.writer_cache_kib / 1024) as u32,
            reader_cache_mib: (store.reader_cache_kib / 1024) as u32,
            durability: store.durability,
            cells_max: store.cells_max,
            statements_max: store.statements_max,
            chunk_bytes: store.chunk_bytes,
        }
    }
}

/// The gossip (QUIC) endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GossipSection {
    /// UDP address to listen on; also this node's address in the cluster.
    pub listen: SocketAddr,
    /// Addresses of nodes to join through (`host:port`).
    pub bootstrap: Vec<String>,
    /// mTLS files.
    pub tls: TlsSection,
}

impl Default for GossipSection {
    fn default() -> Self {
        GossipSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 7100)),
            bootstrap: Vec::new(),
            tls: TlsSection::default(),
        }
    }
}

/// A CA certificate, this node's certificate and its key (PEM files).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsSection {
    /// The cluster's CA certificate.
    pub ca: PathBuf,
    /// This node's certificate (chain).
    pub cert: PathBuf,
    /// This node's private key.
    pub key: PathBuf,
}

/// The gRPC API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiSection {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Serve TLS with these files, requiring client certificates from the same CA; plaintext
    /// when unset (fine on loopback or a host-local socket).
    pub tls: Option<TlsSection>,
    /// Allow a plaintext API (no `tls`) on a non-loopback address, where anyone who can reach
    /// it may write. Without it such a configuration refuses to start.
    pub allow_plaintext: bool,
    /// Largest request, bytes; larger ones get RESOURCE_EXHAUSTED.
    pub request_bytes_max: usize,
    /// Requests handled at once; more wait (bounded by gRPC flow control).
    pub concurrency_max: usize,
    /// Rows per streamed query message.
    pub query_batch_rows: usize,
    /// Subscriptions served at once.
    pub subscriptions_max: usize,
    /// Events buffered per subscriber; one that falls further behind is cut off.
    pub subscriber_buffer: usize,
    /// Changes a subscription keeps for subscribers resuming from a change id.
    pub subscription_history: usize,
    /// Longest time one `Transact` may take, ms: it holds the single writer, so a statement
    /// without an end must not hold it longer. A smaller client deadline (`grpc-timeout`) wins.
    pub transact_timeout_ms: u64,
    /// Longest time one `Query` (or one run of a subscription's query) may take, ms: it holds a
    /// reader connection. A smaller client deadline wins.
    pub query_timeout_ms: u64,
    /// Whether `Transact` is served while the node is still joining or catching up after a
    /// start. `true` (the default): writes stay available through restarts and partitions, as
    /// a store without consensus should; a write made in that window (about a second after a
    /// restart) may lose to a delete made elsewhere that the node has not received yet, as any
    /// concurrent write may. `false`: such a write is refused with UNAVAILABLE naming what the
    /// node waits for, so a client retries or goes to another node.
    pub writes_before_caught_up: bool,
}

impl Default for ApiSection {
    fn default() -> Self {
        ApiSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 7200)),
            tls: None,
            allow_plaintext: false,
            writes_before_caught_up: true,
            request_bytes_max: 4 << 20,
            concurrency_max: 256,
            query_batch_rows: 256,
            subscriptions_max: 1024,
            subscriber_buffer: 1024,
            subscription_history: 1024,
            transact_timeout_ms: 5_000,
            query_timeout_ms: 30_000,
        }
    }
}

/// The admin HTTP listener.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminSection {
    /// Address to listen on for `/metrics`, `/healthz` and `/readyz`.
    pub listen: SocketAddr,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            listen: SocketAddr::from(([127, 0, 0, 1], 7300)),
        }
    }
}

/// Logging.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogSection {
    /// `text` or `json`.
    pub format: LogFormat,
    /// A `tracing` filter (`info`, `strata_common=debug,info`, ...); `RUST_LOG` overrides it.
    pub filter: String,
}

impl Default for LogSection {
    fn default() -> Self {
        LogSection {
            format: LogFormat::Text,
            filter: "info".into(),
        }
    }
}

/// The event-loop watchdog.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogSection {
    /// Exit the process when the async runtime has not turned for this long, ms.
    pub stall_ms: u64,
    /// Exit the process when the store's writer or checkpointer has been on one piece of work
    /// for this long, ms. Larger than readiness's writer bound (60 s): the node first stops
    /// taking traffic, and only a thread that stays stuck is fatal.
    pub store_stall_ms: u64,
}

impl Default for WatchdogSection {
    fn default() -> Self {
        WatchdogSection {
            stall_ms: 10_000,
            store_stall_ms: 300_000,
        }
    }
}

/// The query a region's publishers derive the app map with, for the default Machines schema.
pub const DEFAULT_DERIVATION: &str = "SELECT app, count(*) AS machines, \
     count(*) FILTER (WHERE state = 'started') AS started, \
     count(*) FILTER (WHERE state = 'stopped') AS stopped, \
     count(*) FILTER (WHERE state NOT IN ('started', 'stopped')) AS other \
     FROM machines GROUP BY app";

/// The query giving a region's running Machines for route lookups, for the default schema.
pub const DEFAULT_MACHINES_QUERY: &str = "SELECT id, app, host, address, port, image, version \
     FROM machines WHERE state = 'started'";

/// regiond: how the region's app map is derived and published to globald.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PublishSection {
    /// globald API endpoints (`https://host:port`), tried in turn; empty turns publishing off.
    pub to: Vec<String>,
    /// TLS to globald: the global tier's CA, and a certificate it signed for this region (tier
    /// `regional`); globald takes the region from it. Plaintext when unset, which globald
    /// refuses for publishing.
    pub tls: Option<TlsSection>,
    /// The TLS name globald presents, `<global cluster>.global.strata`.
    pub server_name: String,
    /// Live members that publish, chosen by lowest node name.
    pub publishers: usize,
    /// How long a change waits for others before the map is derived again, ms.
    pub debounce_ms: u64,
    /// The whole map is sent this often, which also removes apps that left, ms.
    pub reconcile_ms: u64,
    /// Publishes per second one publisher may send at most.
    pub rate_max_per_s: u32,
    /// Retry back-off after a failure: from this, doubling up to `backoff_max_ms`, jittered.
    pub backoff_min_ms: u64,
    /// See `backoff_min_ms`.
    pub backoff_max_ms: u64,
    /// How long one publish may take, ms.
    pub timeout_ms: u64,
    /// Apps a region may publish at most; a larger map is a derivation failure.
    pub apps_max: usize,
    /// The derivation query: one row per app with columns `app, machines, started, stopped,
    /// other`.
    pub derivation: String,
    /// This region's API endpoints, published for edge lookups (default: this node's API, at
    /// its gossip address when the API listens on a wildcard address).
    pub endpoints: Vec<String>,
}

impl Default for PublishSection {
    fn default() -> Self {
        PublishSection {
            to: Vec::new(),
            tls: None,
            server_name: "global.global.strata".into(),
            publishers: 2,
            debounce_ms: 200,
            reconcile_ms: 30_000,
            rate_max_per_s: 4,
            backoff_min_ms: 250,
            backoff_max_ms: 30_000,
            timeout_ms: 5_000,
            apps_max: 10_000,
            derivation: DEFAULT_DERIVATION.into(),
            endpoints: Vec::new(),
        }
    }
}

/// globald: what regions may publish.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GlobalSection {
    /// Rows of `app_regions` one region may hold; a publish beyond it is refused.
    pub rows_per_region_max: usize,
    /// Publishes per second one region may send, on average; beyond: RESOURCE_EXHAUSTED.
    pub publish_rate_per_region: u32,
    /// Publishes one region may send in a burst above that rate.
    pub publish_burst: u32,
}

impl Default for GlobalSection {
    fn default() -> Self {
        GlobalSection {
            rows_per_region_max: 10_000,
            publish_rate_per_region: 20,
            publish_burst: 40,
        }
    }
}

/// globald: route lookups.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteSection {
    /// The query giving a region's running Machines; it must return an `app` column, and its
    /// first column identifies a Machine.
    pub machines_query: String,
    /// TLS for dialing the regions' APIs (CA, client certificate, key); plaintext when unset.
    pub tls: Option<TlsSection>,
    /// Regions tried after the caller's own when a request names none.
    pub prefer: Vec<String>,
    /// How long one region may take to answer before the next is tried, ms.
    pub region_timeout_ms: u64,
    /// Regions whose Machines are cached (one subscription each).
    pub regions_max: usize,
}

impl Default for RouteSection {
    fn default() -> Self {
        RouteSection {
            machines_query: DEFAULT_MACHINES_QUERY.into(),
            tls: None,
            prefer: Vec::new(),
            region_timeout_ms: 1_000,
            regions_max: 64,
        }
    }
}

impl NodeConfig {
    /// Loads defaults, then `path` (if given), then `STRATA_*` environment overrides, and checks
    /// required keys.
    pub fn load(path: Option<&Path>) -> Result<NodeConfig, ConfigError> {
        // A bare `STRATA_API` is the client commands' endpoint (`--api`), not a section.
        Self::load_with(path, Env::prefixed("STRATA_").split("__").ignore(&["api"]))
    }

    /// [`NodeConfig::load`] with an explicit environment provider (tests use a fixed one).
    pub fn load_with(path: Option<&Path>, env: Env) -> Result<NodeConfig, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(NodeConfig::default()));
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::Missing(path.to_owned()));
            }
            figment = figment.merge(Toml::file(path));
        }
        let config: NodeConfig = figment
            .merge(env)
            .extract()
            .map_err(|err| ConfigError::Invalid(err.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    /// Parses a TOML document (no file, no environment).
    pub fn from_toml(toml: &str) -> Result<NodeConfig, ConfigError> {
        let config: NodeConfig = Figment::from(Serialized::defaults(NodeConfig::default()))
            .merge(Toml::string(toml))
            .extract()
            .map_err(|err| ConfigError::Invalid(err.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.node.name.is_empty() {
            return Err(ConfigError::Required("node.name"));
        }
        if self.node.region.is_empty() {
            return Err(ConfigError::Required("node.region"));
        }
        if self.certificates.reload_interval_ms == 0 {
            return Err(ConfigError::Invalid(
                "certificates.reload_interval_ms must be positive".into(),
            ));
        }
        self.check_api_exposure()
    }

    /// Refuses a plaintext API on a non-loopback address unless `[api] allow_plaintext` says
    /// so: such an API lets anyone who reaches it write.
    pub fn check_api_exposure(&self) -> Result<(), ConfigError> {
        let addr = self.api.listen;
        if self.api.tls.is_none() && !addr.ip().is_loopback() && !self.api.allow_plaintext {
            return Err(ConfigError::PlaintextApi { addr });
        }
        Ok(())
    }

    /// Refuses a section of the other daemon: `[publish]` is regiond's, `[global]` and
    /// `[route]` are globald's. A section left at its defaults is fine either way.
    pub fn check_tier(&self, tier: Tier) -> Result<(), ConfigError> {
        let other = |section, owner| ConfigError::OtherDaemon {
            section,
            owner,
            tier,
        };
        match tier {
            Tier::Global if self.publish != PublishSection::default() => {
                Err(other("publish", "regiond"))
            }
            Tier::Regional if self.global != GlobalSection::default() => {
                Err(other("global", "globald"))
            }
            Tier::Regional if self.route != RouteSection::default() => {
                Err(other("route", "globald"))
            }
            _ => Ok(()),
        }
    }

    /// The database file.
    pub fn store_path(&self) -> PathBuf {
        self.store
            .path
            .clone()
            .unwrap_or_else(|| self.node.data_dir.join("strata.sqlite"))
    }

    /// Store options from this configuration.
    pub fn store_options(&self) -> StoreOptions {
        StoreOptions {
            readers: self.store.readers,
            writer_cache_kib: i64::from(self.store.writer_cache_mib) * 1024,
            reader_cache_kib: i64::from(self.store.reader_cache_mib) * 1024,
            durability: self.store.durability,
            cells_max: self.store.cells_max,
            statements_max: self.store.statements_max,
            chunk_bytes: self.store.chunk_bytes,
            ..StoreOptions::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[node]\nname = \"ams-1\"\nregion = \"ams\"\n";

    #[test]
    fn defaults_fill_everything_but_name_and_region() {
        let config = NodeConfig::from_toml(MINIMAL).unwrap();
        assert_eq!(config.node.name, "ams-1");
        assert_eq!(config.api, ApiSection::default());
        assert_eq!(config.cluster, ClusterConfig::default());
        assert!(matches!(
            NodeConfig::from_toml(""),
            Err(ConfigError::Required("node.name"))
        ));
    }

    #[test]
    fn an_unknown_key_is_an_error_naming_it() {
        let err = NodeConfig::from_toml(&format!("{MINIMAL}[api]\nlisten_port = 1\n")).unwrap_err();
        assert!(err.to_string().contains("listen_port"), "{err}");
        let err = NodeConfig::from_toml(&format!("{MINIMAL}[nonsense]\nx = 1\n")).unwrap_err();
        assert!(err.to_string().contains("nonsense"), "{err}");
    }

    #[test]
    fn a_bad_value_is_an_error_naming_the_key() {
        let err =
            NodeConfig::from_toml(&format!("{MINIMAL}[gossip]\nlisten = \"not an address\"\n"))
                .unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        let err = NodeConfig::from_toml(&format!("{MINIMAL}[store]\ndurability = \"maybe\"\n"))
            .unwrap_err();
        assert!(err.to_string().contains("durability"), "{err}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's test jail returns its own error type
    fn environment_overrides_the_file() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("node.toml", MINIMAL)?;
            jail.set_env("STRATA_NODE__NAME", "ams-2");
            // The client commands' endpoint variable does not disturb a node.
            jail.set_env("STRATA_API", "http://127.0.0.1:7200");
            jail.set_env("STRATA_API__QUERY_BATCH_ROWS", "64");
            jail.set_env("STRATA_CLUSTER__SYNC__INTERVAL_MS", "250");
            let config = NodeConfig::load(Some(Path::new("node.toml")))
                .map_err(|e| figment::Error::from(e.to_string()))?;
            assert_eq!(config.node.name, "ams-2");
            assert_eq!(config.cluster.sync.interval_ms, 250);
            assert_eq!(config.api.query_batch_rows, 64);
            jail.set_env("STRATA_API__NOPE", "1");
            let err = NodeConfig::load(Some(Path::new("node.toml"))).unwrap_err();
            assert!(err.to_string().contains("nope"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn the_example_config_in_deploy_is_valid_and_matches_the_defaults() {
        let example = include_str!("../../deploy/regiond.toml");
        let config = NodeConfig::from_toml(example).unwrap();
        let mut defaults = NodeConfig {
            node: config.node.clone(),
            ..NodeConfig::default()
        };
        defaults.gossip.bootstrap = config.gossip.bootstrap.clone();
        defaults.gossip.tls = config.gossip.tls.clone();
        defaults.store.schema = config.store.schema.clone();
        defaults.publish.to = config.publish.to.clone();
        defaults.publish.tls = config.publish.tls.clone();
        defaults.publish.endpoints = config.publish.endpoints.clone();
        assert_eq!(
            config, defaults,
            "deploy/regiond.toml documents every default as it is"
        );
        config.check_tier(Tier::Regional).unwrap();
    }

    #[test]
    fn the_globald_config_in_deploy_is_valid_and_matches_the_defaults() {
        let example = include_str!("../../deploy/globald.toml");
        let config = NodeConfig::from_toml(example).unwrap();
        let mut defaults = NodeConfig {
            node: config.node.clone(),
            ..NodeConfig::default()
        };
        defaults.gossip.bootstrap = config.gossip.bootstrap.clone();
        defaults.gossip.tls = config.gossip.tls.clone();
        defaults.api.tls = config.api.tls.clone();
        defaults.route.tls = config.route.tls.clone();
        defaults.route.prefer = config.route.prefer.clone();
        assert_eq!(
            config, defaults,
            "deploy/globald.toml documents every default as it is"
        );
        config.check_tier(Tier::Global).unwrap();
    }

    #[test]
    fn a_plaintext_api_on_a_reachable_address_needs_an_explicit_opt_in() {
        let exposed = format!("{MINIMAL}[api]\nlisten = \"0.0.0.0:7200\"\n");
        let err = NodeConfig::from_toml(&exposed).unwrap_err();
        assert!(matches!(err, ConfigError::PlaintextApi { .. }), "{err}");
        let text = err.to_string();
        assert!(text.contains("allow_plaintext"), "{text}");
        assert!(
            text.contains("anyone who can reach 0.0.0.0:7200 may write"),
            "{text}"
        );
        let allowed = NodeConfig::from_toml(&format!("{exposed}allow_plaintext = true\n")).unwrap();
        assert!(allowed.api.allow_plaintext);
        // Loopback needs no opt-in.
        NodeConfig::from_toml(&format!("{MINIMAL}[api]\nlisten = \"[::1]:7200\"\n")).unwrap();
    }

    #[test]
    fn a_section_of_the_other_daemon_is_refused_by_name() {
        let config =
            NodeConfig::from_toml(&format!("{MINIMAL}[publish]\nto = [\"https://g:7200\"]\n"))
                .unwrap();
        let err = config.check_tier(Tier::Global).unwrap_err();
        assert!(err.to_string().contains("[publish]"), "{err}");
        config.check_tier(Tier::Regional).unwrap();
        let config =
            NodeConfig::from_toml(&format!("{MINIMAL}[global]\nrows_per_region_max = 5\n"))
                .unwrap();
        let err = config.check_tier(Tier::Regional).unwrap_err();
        assert!(err.to_string().contains("[global]"), "{err}");
    }
}
