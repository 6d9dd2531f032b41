//! `regiond`: a node of a Strata region.
//!
//! A region's nodes hold its fine-grained per-Machine rows, replicate them among themselves, and
//! publish a derived application-to-region summary to the global tier.

use clap::{Parser, Subcommand};

/// A node of a Strata region.
#[derive(Parser, Debug)]
#[command(name = "regiond", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Check a schema file against the store rules and print what it defines.
    CheckSchema {
        /// Path of a `.sql` schema file.
        path: std::path::PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::CheckSchema { path } => {
            let sql = std::fs::read_to_string(&path)?;
            let schema = strata_common::store::Schema::parse(&sql)?;
            for table in schema.tables() {
                #[allow(clippy::print_stdout)]
                {
                    println!("{}", table.name());
                }
            }
            Ok(())
        }
    }
}
