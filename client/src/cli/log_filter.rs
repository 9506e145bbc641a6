//! `kvtier log-filter`: shows or changes the daemon's log filter while it runs (an admin
//! request: root or the daemon's uid).

use super::common::ConnectArgs;

/// Arguments of `kvtier log-filter`.
#[derive(clap::Args, Debug)]
pub struct LogFilterArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// The new filter in RUST_LOG syntax, e.g. `info,kvtier_daemon::transfer=debug`; without it,
    /// prints the current one.
    filter: Option<String>,
}

/// `kvtier log-filter`.
pub async fn run(args: LogFilterArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect("log-filter").await?;
    let r = c.log_filter(args.filter.as_deref().unwrap_or_default()).await?;
    match args.filter {
        None => println!("{}", r.after),
        Some(_) => println!("log filter {} (was {})", r.after, r.before),
    }
    Ok(())
}
