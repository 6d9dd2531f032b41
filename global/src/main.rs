//! `globald`: a node of Strata's global tier.
//!
//! The global tier holds only the application-to-region map that regions derive and publish
//! (`schema.sql` here). `globald run` starts a node; the other subcommands talk to a running one
//! or make development certificates.

use clap::Parser;
use strata_common::cli::{Command, execute};
use strata_common::node::NodeSpec;
use strata_common::transport::Tier;

/// The global schema used when the configuration names none.
const DEFAULT_SCHEMA: &str = include_str!("../schema.sql");

/// A node of the Strata global tier.
#[derive(Parser, Debug)]
#[command(name = "globald", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let spec = NodeSpec {
        tier: Tier::Global,
        default_schema: DEFAULT_SCHEMA,
    };
    execute(spec, cli.command, |_, routes| routes)?;
    Ok(())
}
