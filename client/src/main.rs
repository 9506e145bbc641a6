//! `kvtier`: command-line tool for kvtierd: status, lookup, put/get, bench, sim.

use clap::{Parser, Subcommand};

mod cli;

/// kvtier: talk to the node-local KV-cache tiering daemon.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Replay a request trace through the real index and eviction policies.
    Sim(cli::sim::SimArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Sim(args) => cli::sim::run(args),
    }
}
