//! `globald`: a node of Strata's global tier.
//!
//! The global tier holds only the application-to-region map that regions derive and publish.
use clap::{Parser, Subcommand};

/// A node of the Strata global tier.
#[derive(Parser, Debug)]
#[command(name = "globald", version, about)]
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
