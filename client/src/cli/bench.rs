//! `kvtier bench`: host-tier save and load through the shared pool, next to a plain memcpy of
//! the same bytes with the same block size, measured in the same run (see `kvtier_client::bench`).

use super::common::{rate, ConnectArgs, NamespaceArgs};
use kvtier_client::bench::measure;

/// Arguments of `kvtier bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    #[command(flatten)]
    ns: NamespaceArgs,
    /// Bytes moved per round (must fit the pool).
    #[arg(long, default_value_t = 64 << 20)]
    bytes: u64,
    /// Rounds; the best round of each kind is reported.
    #[arg(long, default_value_t = 10)]
    rounds: u32,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

/// `kvtier bench`.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect("bench").await?;
    let ns = args.ns.register(&mut c).await?;
    let r = measure(&mut c, &ns, args.bytes, args.rounds.max(1), !args.json).await?;
    if args.json {
        println!("{}", serde_json::to_string(&r)?);
        return Ok(());
    }
    let g = |bps: f64| rate((bps * 1e3) as u64, 1e3);
    println!(
        "host tier, {} blocks of {} bytes, best of {} rounds",
        r.bytes / r.block_bytes,
        r.block_bytes,
        args.rounds
    );
    println!("  {:<28} {:>12}", "memcpy (reference)", g(r.memcpy_bps));
    println!("  {:<28} {:>12}   {:.2}x memcpy", "save (reserve+copy+commit)", g(r.save_bps), r.save_bps / r.memcpy_bps);
    println!(
        "  {:<28} {:>12}   {:.2}x memcpy",
        "load (acquire+copy+release)",
        g(r.load_bps),
        r.load_bps / r.memcpy_bps
    );
    Ok(())
}
