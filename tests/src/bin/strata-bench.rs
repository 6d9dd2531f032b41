//! `strata-bench`: Strata's benchmarks. Each scenario prints progress and ends with one line
//! `RESULT {json}`.

use clap::{Parser, Subcommand};
use strata_tests::bench::{bigtx, cluster, global, hostile, restart, store};

/// Strata's benchmarks.
#[derive(Parser, Debug)]
#[command(name = "strata-bench", about)]
struct Cli {
    /// Where scenarios keep their databases (a fresh temporary directory by default).
    #[arg(long, global = true)]
    dir: Option<std::path::PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// The replicated store against plain SQLite: inserts, updates, re-publish, apply,
    /// single-row transactions, adding a column to a 1M-row table.
    Store,
    /// A write on one node until visible on every other node.
    Propagation {
        /// Nodes (processes).
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        /// Writes measured.
        #[arg(long, default_value_t = 200)]
        writes: usize,
    },
    /// Payload copies and wire bytes each node receives per change, direct push vs gossip.
    Redundancy {
        /// Nodes (processes).
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        /// Changes written.
        #[arg(long, default_value_t = 500)]
        changes: usize,
    },
    /// Sustained transactions through gRPC.
    Throughput {
        /// Nodes (processes).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Concurrent clients.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Seconds per phase.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
    },
    /// Seconds for a fresh node to hold every row.
    Catchup {
        /// Rows the region holds.
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
    },
    /// Seconds from kill -9 of a node until every other marks it down.
    Detect {
        /// Nodes (processes).
        #[arg(long, default_value_t = 10)]
        nodes: usize,
        /// First run this many seconds with every core busy, counting false downs.
        #[arg(long, default_value_t = 0)]
        soak: u64,
    },
    /// The two tiers: region change to every globald, bytes to the global tier per regional
    /// change, route lookups cached and direct.
    Global {
        /// Regions.
        #[arg(long, default_value_t = 3)]
        regions: usize,
        /// regiond per region.
        #[arg(long, default_value_t = 3)]
        nodes_per_region: usize,
        /// Summary-changing Machine changes measured.
        #[arg(long, default_value_t = 200)]
        changes: usize,
    },
    /// The ordinary 1-row write load on 3 nodes, alone and while one client sends endless
    /// queries and oversized values: throughput and p99 latency of both.
    Hostile {
        /// Concurrent ordinary clients.
        #[arg(long, default_value_t = 4)]
        clients: usize,
        /// Seconds per phase.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        /// Endless queries the hostile client keeps running at once (the default is the
        /// default number of reader connections).
        #[arg(long, default_value_t = 4)]
        queries: usize,
    },
    /// kill -9 of a node under a light write load and restart on the same address: seconds to
    /// its first received push, full membership and readiness; then convergence after more
    /// kills.
    Restart {
        /// Nodes (processes).
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Kills after the first, each of another node, before convergence is measured.
        #[arg(long, default_value_t = 5)]
        kills: usize,
    },
    /// p99 of 1-row writes on a store while it applies a 50,000-row remote transaction,
    /// against the same load without it (an in-process store pair).
    Bigtx,
    /// Resident memory per node, idle and after 100k rows.
    Rss {
        /// Nodes (processes).
        #[arg(long, default_value_t = 3)]
        nodes: usize,
        /// Rows loaded.
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let _ = rustls::crypto::ring::default_provider().install_default();
    let temp = tempfile::tempdir()?;
    let dir = cli.dir.unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    if let Scenario::Store = cli.scenario {
        return store::run(&dir);
    }
    if let Scenario::Bigtx = cli.scenario {
        return bigtx::run(&dir);
    }
    cluster::build_daemons()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        match cli.scenario {
            Scenario::Store | Scenario::Bigtx => unreachable!("handled above"),
            Scenario::Propagation { nodes, writes } => cluster::propagation(nodes, writes).await,
            Scenario::Redundancy { nodes, changes } => cluster::redundancy(nodes, changes).await,
            Scenario::Throughput {
                nodes,
                clients,
                seconds,
            } => cluster::throughput(nodes, clients, seconds).await,
            Scenario::Catchup { rows } => cluster::catchup(rows).await,
            Scenario::Detect { nodes, soak } => cluster::detect(nodes, soak).await,
            Scenario::Rss { nodes, rows } => cluster::rss(nodes, rows).await,
            Scenario::Restart { nodes, kills } => restart::restart(nodes, kills).await,
            Scenario::Hostile {
                clients,
                seconds,
                queries,
            } => hostile::hostile(clients, seconds, queries).await,
            Scenario::Global {
                regions,
                nodes_per_region,
                changes,
            } => global::global(regions, nodes_per_region, changes).await,
        }
    })
}
