//! `globald`: a node of Strata's global tier. `globald run` starts a node; `globald route` asks
//! a running one where an app runs; the other subcommands talk to a running node or make
//! development certificates.

#![allow(clippy::print_stdout)] // a CLI

use clap::{Parser, Subcommand};
use strata_common::cli::{ApiArgs, Command, client_call, execute, render};

/// A node of the Strata global tier.
#[derive(Parser, Debug)]
#[command(name = "globald", version, about)]
struct Cli {
    #[command(subcommand)]
    command: GlobalCommand,
}

#[derive(Subcommand, Debug)]
enum GlobalCommand {
    #[command(flatten)]
    Common(Command),
    /// Where an app's running Machines are: its regions from the global map (the caller's
    /// region first), then the Machines of the first region that answers.
    Route {
        #[command(flatten)]
        api: ApiArgs,
        /// The app.
        app: String,
        /// The caller's region, tried first.
        #[arg(long = "from", default_value = "")]
        from_region: String,
        /// Regions to try next, in order.
        #[arg(long)]
        prefer: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        GlobalCommand::Common(command) => execute(strata_global::spec(), command)?,
        GlobalCommand::Route {
            api,
            app,
            from_region,
            prefer,
        } => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            client_call(&api, |client| async move {
                let route = client.route(&app, &from_region, prefer).await?;
                println!("app {} runs in: {}", route.app, route.candidates.join(", "));
                for skipped in &route.skipped {
                    println!("  passed over {}: {}", skipped.region, skipped.reason);
                }
                println!(
                    "{} running machine(s) in {}:",
                    route.machines.len(),
                    route.region
                );
                println!("{}", route.columns.join("|"));
                for row in route.machines {
                    let cells: Vec<String> = row
                        .values
                        .into_iter()
                        .map(|v| render(&strata_proto::convert::value_from_pb(v)))
                        .collect();
                    println!("{}", cells.join("|"));
                }
                Ok(())
            })?
        }
    }
    Ok(())
}
