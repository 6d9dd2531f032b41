//! `strata-bench`: Strata's benchmarks. Each scenario prints progress and ends with one line
//! `RESULT {json}`.

use clap::{Parser, Subcommand};

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
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let temp = tempfile::tempdir()?;
    let dir = cli.dir.unwrap_or_else(|| temp.path().to_owned());
    std::fs::create_dir_all(&dir)?;
    match cli.scenario {
        Scenario::Store => strata_tests::bench::store::run(&dir),
    }
}
