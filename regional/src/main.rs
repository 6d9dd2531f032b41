//! `regiond`: a node of a Strata region. `regiond run` starts a node; the other subcommands talk
//! to a running one or make development certificates.

use clap::Parser;
use strata_common::cli::{Command, execute};

/// A node of a Strata region.
#[derive(Parser, Debug)]
#[command(name = "regiond", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    execute(strata_regional::spec(), cli.command)?;
    Ok(())
}
