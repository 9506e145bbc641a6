//! `kvtier`: command-line tool for kvtierd: status, top, clients, lookup, put/get, discard, log-filter, bench,
//! sim, router, gateway, picker.

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
    /// Show the daemon's tiers, clients and counters.
    Status(cli::status::StatusArgs),
    /// Live view of the daemon: tiers and, per second, hits, misses, bytes moved, evictions.
    Top(cli::top::TopArgs),
    /// Admin: the daemon's connections: engines and tools, what they registered and hold.
    Clients(cli::clients::ClientsArgs),
    /// How many leading blocks of a prompt the daemon holds.
    Lookup(cli::blocks::LookupArgs),
    /// Save a prompt of deterministic test blocks.
    Put(cli::blocks::PutArgs),
    /// Load a prompt of test blocks and verify every byte.
    Get(cli::blocks::GetArgs),
    /// Admin: remove namespaces' blocks from every tier (a retired model, a tenant gone).
    Discard(cli::discard::DiscardArgs),
    /// Admin: show or change the daemon's log filter while it runs (RUST_LOG syntax).
    LogFilter(cli::log_filter::LogFilterArgs),
    /// Host-tier save/load bandwidth against memcpy of the same bytes.
    Bench(cli::bench::BenchArgs),
    /// Replay a request trace through the real index and eviction policies.
    Sim(cli::sim::SimArgs),
    /// Run the cluster router: follow daemons' router feeds, route requests to their prefix.
    Router(cli::router::RouterArgs),
    /// Run the inference gateway: an OpenAI HTTP proxy sending each request to the engine whose
    /// node holds its prompt's blocks.
    Gateway(cli::gateway::GatewayArgs),
    /// Run the endpoint picker for the Gateway API Inference Extension (Envoy ext_proc).
    Picker(cli::gateway::PickerArgs),
}

/// Ends quietly, as Unix tools do, when the reader of our output goes away (`kvtier status |
/// head`): `println!` panics on the broken pipe, which this turns into exit status 141 (what a
/// SIGPIPE gives). SIGPIPE itself stays ignored: a socket that breaks under the router or a
/// client must be an error it handles, not the end of the process.
fn quiet_on_closed_stdout() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info.payload().downcast_ref::<String>().map(String::as_str).unwrap_or_default();
        if message.starts_with("failed printing to stdout") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> std::process::ExitCode {
    quiet_on_closed_stdout();
    let cli = Cli::parse();
    let serving = matches!(cli.command, Command::Router(_) | Command::Gateway(_) | Command::Picker(_));
    if serving {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    // The router, gateway and picker serve many followers and clients at once; the other
    // commands are one client.
    let rt = match serving {
        true => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        false => tokio::runtime::Builder::new_current_thread().enable_all().build(),
    }
    .expect("tokio runtime");
    let result = rt.block_on(async {
        match cli.command {
            Command::Status(a) => cli::status::run(a).await,
            Command::Top(a) => cli::top::run(a).await,
            Command::Clients(a) => cli::clients::run(a).await,
            Command::Lookup(a) => cli::blocks::lookup(a).await,
            Command::Put(a) => cli::blocks::put(a).await,
            Command::Get(a) => cli::blocks::get(a).await,
            Command::Discard(a) => cli::discard::run(a).await,
            Command::LogFilter(a) => cli::log_filter::run(a).await,
            Command::Bench(a) => cli::bench::run(a).await,
            Command::Sim(a) => cli::sim::run(a),
            Command::Router(a) => cli::router::run(a).await,
            Command::Gateway(a) => cli::gateway::run(a).await,
            Command::Picker(a) => cli::gateway::run_picker(a).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvtier: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
