//! The command line both daemons share: `run`, the client commands (`query`, `exec`, `members`,
//! `health`) and `tls` for development certificates. Each daemon's `main` parses its own
//! arguments (with these subcommands flattened in) and calls [`execute`].
//!
//! This is CLI code: it prints results to stdout.

#![allow(clippy::print_stdout)]

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Subcommand};
use strata_client::{Client, ClientError, ClientTls};

use crate::config::{ConfigError, NodeConfig};
use crate::node::{Node, NodeError, NodeSpec};
use crate::store::Value;
use crate::transport::{CertPair, PeerIdentity, Tier, TransportError, generate_ca, generate_node};

/// The subcommands both daemons have.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the node.
    Run {
        /// The configuration file (TOML); `STRATA_<SECTION>__<KEY>` variables override it.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Run a read-only query on a running node and print the rows.
    Query {
        #[command(flatten)]
        api: ApiArgs,
        /// The SQL.
        sql: String,
        /// Positional parameters: integers, reals, `null`, or text.
        #[arg(long = "param", short)]
        params: Vec<String>,
    },
    /// Run statements as one transaction on a running node.
    Exec {
        #[command(flatten)]
        api: ApiArgs,
        /// The statements.
        #[arg(required = true)]
        sql: Vec<String>,
    },
    /// Show the members a running node sees.
    Members {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Show a running node's health.
    Health {
        #[command(flatten)]
        api: ApiArgs,
    },
    /// Make development certificates.
    Tls {
        #[command(subcommand)]
        command: TlsCommand,
    },
}

/// Where the node's API is.
#[derive(Args, Debug)]
pub struct ApiArgs {
    /// The node's API endpoint.
    #[arg(long, default_value = "http://127.0.0.1:7200", env = "STRATA_API")]
    pub api: String,
    /// CA certificate, client certificate and key, for an API served with TLS.
    #[arg(long, requires_all = ["cert", "key"])]
    pub ca: Option<PathBuf>,
    /// See `--ca`.
    #[arg(long)]
    pub cert: Option<PathBuf>,
    /// See `--ca`.
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// The server name to verify (`<region>.<tier>.strata`).
    #[arg(long, default_value = "")]
    pub server_name: String,
}

/// Development certificates.
#[derive(Subcommand, Debug)]
pub enum TlsCommand {
    /// Make a CA: `<out>/ca.crt` and `<out>/ca.key`.
    Ca {
        /// Directory to write to.
        #[arg(long)]
        out: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "Strata development CA")]
        name: String,
    },
    /// Make a node certificate signed by a CA: `<out>/<node>.crt` and `<out>/<node>.key`.
    Node {
        /// Directory holding `ca.crt` and `ca.key`.
        #[arg(long)]
        ca_dir: PathBuf,
        /// Directory to write to.
        #[arg(long)]
        out: PathBuf,
        /// The node's name.
        #[arg(long)]
        name: String,
        /// The node's region (or the global cluster's name).
        #[arg(long)]
        region: String,
        /// The certificate's tier, `regional` or `global` (default: this daemon's). From the
        /// global CA, `globald tls node --tier regional --region ams --name ams-publisher`
        /// makes the certificate a region's publishers present to globald.
        #[arg(long, value_parser = parse_tier)]
        tier: Option<Tier>,
        /// Extra IP addresses to name in the certificate.
        #[arg(long)]
        ip: Vec<IpAddr>,
        /// Extra DNS names to name in the certificate.
        #[arg(long)]
        dns: Vec<String>,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The configuration is invalid.
    #[error("{0}")]
    Config(#[from] ConfigError),
    /// The node could not start.
    #[error("{0}")]
    Node(#[from] NodeError),
    /// A client call failed.
    #[error("{0}")]
    Client(#[from] ClientError),
    /// Certificates could not be made or read.
    #[error("{0}")]
    Tls(#[from] TransportError),
    /// Setting up failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Logging or the watchdog could not start.
    #[error("{0}")]
    Logging(String),
}

/// Runs a subcommand for a daemon of `spec`.
pub fn execute(spec: NodeSpec, command: Command) -> Result<(), CliError> {
    // tonic's TLS builds its configuration with the process default provider: make it ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match command {
        Command::Run { config } => run(spec, config),
        Command::Query { api, sql, params } => client_call(&api, |client| async move {
            let params = params.iter().map(|p| parse_param(p)).collect();
            let rows = client.query(&sql, params).await?;
            println!("{}", rows.columns.join("|"));
            for row in rows.rows {
                let cells: Vec<String> = row.iter().map(render).collect();
                println!("{}", cells.join("|"));
            }
            Ok(())
        }),
        Command::Exec { api, sql } => client_call(&api, |client| async move {
            let statements = sql.into_iter().map(crate::store::Statement::new).collect();
            let written = client.transact(statements).await?;
            match written.version {
                Some(version) => {
                    println!("version {version} of site {}", hex::encode(&written.site))
                }
                None => println!("nothing changed"),
            }
            println!("rows affected: {:?}", written.rows_affected);
            Ok(())
        }),
        Command::Members { api } => client_call(&api, |client| async move {
            for m in client.members().await? {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    m.state, m.node, m.region, m.addr, m.incarnation
                );
            }
            Ok(())
        }),
        Command::Health { api } => client_call(&api, |client| async move {
            let h = client.health().await?;
            println!("members: {}", h.members);
            println!("caught up: {}", h.caught_up);
            println!(
                "gaps: {}  partials: {}  parked: {}",
                h.gaps, h.partials, h.parked
            );
            println!("replication lag: {} ms", h.replication_lag_ms);
            println!("site: {}  head: {}", hex::encode(&h.site), h.head);
            println!("schema fingerprint: {:016x}", h.schema_fingerprint);
            Ok(())
        }),
        Command::Tls { command } => tls(spec, command),
    }
}

/// How long the runtime's shutdown waits for blocking tasks (a store stuck closing, see
/// `Node::shutdown`) before the process exits anyway.
const RUNTIME_SHUTDOWN_MAX: Duration = Duration::from_secs(2);

fn run(spec: NodeSpec, config: Option<PathBuf>) -> Result<(), CliError> {
    let config = NodeConfig::load(config.as_deref())?;
    crate::telemetry::init_logging(config.log.format, &config.log.filter)
        .map_err(|err| CliError::Logging(err.to_string()))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let watchdog = crate::watchdog::spawn(
        runtime.handle(),
        Duration::from_millis(config.watchdog.stall_ms.max(100)),
        crate::watchdog::exit_on_stall(),
    )
    .map_err(|err| CliError::Logging(format!("watchdog: {err}")))?;
    let store_stall = Duration::from_millis(config.watchdog.store_stall_ms.max(1_000));
    let result = runtime.block_on(async move {
        let node = Node::start(config, spec).await?;
        let store = node.store.clone();
        let store_watchdog = crate::watchdog::spawn_busy(
            Box::new(move || {
                let health = store.health();
                vec![
                    ("writer", health.writer_busy),
                    ("checkpointer", health.checkpointer_busy),
                ]
            }),
            store_stall,
            crate::watchdog::exit_on_thread_stall(),
        )
        .map_err(|err| CliError::Logging(format!("store watchdog: {err}")))?;
        wait_for_signal().await;
        tracing::info!("shutting down");
        // It holds a store handle, which would keep the store open; shutdown is bounded itself.
        drop(store_watchdog);
        node.shutdown().await;
        Ok(())
    });
    // Before the runtime winds down, or its shutdown would look like a stall.
    drop(watchdog);
    // A blocking task stuck on the store (see `Node::shutdown`) must not hold the exit forever.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN_MAX);
    result
}

/// Waits for Ctrl-C or SIGTERM.
async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        if let Ok(mut term) = signal(SignalKind::terminate()) {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            return;
        }
    }
    let _ = tokio::signal::ctrl_c().await;
}

/// Connects to the node `api` names and runs `call` with a client, on a small runtime.
pub fn client_call<F, Fut>(api: &ApiArgs, call: F) -> Result<(), CliError>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<(), ClientError>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let tls = match (&api.ca, &api.cert, &api.key) {
            (Some(ca), Some(cert), Some(key)) => {
                Some(ClientTls::load(ca, cert, key, api.server_name.clone())?)
            }
            _ => None,
        };
        let client = Client::connect(&api.api, tls).await?;
        call(client).await?;
        Ok(())
    })
}

fn tls(spec: NodeSpec, command: TlsCommand) -> Result<(), CliError> {
    match command {
        TlsCommand::Ca { out, name } => {
            std::fs::create_dir_all(&out)?;
            let (cert, key) = generate_ca(&name)?.write(&out, "ca")?;
            println!("wrote {} and {}", cert.display(), key.display());
        }
        TlsCommand::Node {
            ca_dir,
            out,
            name,
            region,
            tier,
            ip,
            dns,
        } => {
            let ca = CertPair {
                cert_pem: std::fs::read_to_string(ca_dir.join("ca.crt"))?,
                key_pem: std::fs::read_to_string(ca_dir.join("ca.key"))?,
            };
            let identity = PeerIdentity::new(name.clone(), tier.unwrap_or(spec.tier), region)?;
            std::fs::create_dir_all(&out)?;
            let (cert, key) = generate_node(&ca, &identity, &dns, &ip)?.write(&out, &name)?;
            println!(
                "wrote {} and {} for {identity}",
                cert.display(),
                key.display()
            );
        }
    }
    Ok(())
}

fn parse_tier(text: &str) -> Result<Tier, String> {
    text.parse().map_err(|err: TransportError| err.to_string())
}

/// A CLI parameter: an integer, a real, `null`, or text.
pub fn parse_param(text: &str) -> Value {
    if text.eq_ignore_ascii_case("null") {
        Value::Null
    } else if let Ok(i) = text.parse::<i64>() {
        Value::Integer(i)
    } else if let Ok(r) = text.parse::<f64>() {
        Value::Real(r)
    } else {
        Value::Text(text.to_owned())
    }
}

/// A value as the CLI prints it.
pub fn render(value: &Value) -> String {
    match value {
        Value::Null => String::new(),
        Value::Integer(i) => i.to_string(),
        Value::Real(r) => r.to_string(),
        Value::Text(s) => s.clone(),
        Value::Blob(b) => format!("x'{}'", hex::encode(b)),
    }
}
