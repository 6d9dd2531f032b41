//! `regiond`: a node of a Strata region.
//!
//! A region's nodes hold its fine-grained per-Machine rows (`schema.sql` here by default) and
//! replicate them among themselves. `regiond run` starts a node; the other subcommands talk to
//! a running one or make development certificates.

use clap::Parser;
use strata_common::cli::{Command, execute};
use strata_common::node::NodeSpec;
use strata_common::transport::Tier;

/// The region schema used when the configuration names none.
const DEFAULT_SCHEMA: &str = include_str!("../schema.sql");

/// A node of a Strata region.
#[derive(Parser, Debug)]
#[command(name = "regiond", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let spec = NodeSpec {
        tier: Tier::Regional,
        default_schema: DEFAULT_SCHEMA,
    };
    execute(spec, cli.command, |_, routes| routes)?;
    Ok(())
}
