//! `kvtier bench`: host-tier save and load through the shared pool, next to a plain memcpy of
//! the same bytes with the same block size, measured in the same run (see `kvtier_client::bench`).
//!
//! The bench never evicts engines' blocks: it saves into a namespace of its own (its model and a
//! salt unique to the run), and either fits in the pool's free room or, run by an admin (root
//! or the daemon's uid), discards each round's blocks after the round and its namespace at the
//! end.

use super::common::{rate, ConnectArgs, NamespaceArgs};
use bytesize::ByteSize;
use kvtier_client::bench::measure;
use kvtier_proto::v1 as pb;

/// Arguments of `kvtier bench`.
#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// Bytes per block.
    #[arg(long, default_value_t = 64 * 1024)]
    block_bytes: u64,
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
    let rounds = args.rounds.max(1);
    let salt = format!("kvtier-bench-{}-{}", std::process::id(), std::time::UNIX_EPOCH.elapsed()?.as_nanos());
    let own = NamespaceArgs { model: "kvtier-bench".into(), block_bytes: args.block_bytes, cache_salt: salt.clone() };
    let ns = own.register(&mut c).await?;
    let ours = pb::Discard { model: "kvtier-bench".into(), cache_salt: salt, ..Default::default() };
    // Asked on a connection of its own: the daemon closes a connection that sends an admin
    // request it may not.
    let mut probe = args.conn.connect("bench-probe").await?;
    let admin = probe.discard(pb::Discard { dry_run: true, ..ours.clone() }).await.is_ok();
    drop(probe);
    let stats = c.stats().await?;
    let host = stats.tiers.iter().find(|t| t.tier() == pb::Tier::Host).cloned().unwrap_or_default();
    let (free, footprint) = (host.capacity_bytes.saturating_sub(host.used_bytes), args.bytes * u64::from(rounds));
    let needed = if admin { args.bytes } else { footprint };
    anyhow::ensure!(
        needed <= free,
        "kvtier bench would hold {} and the pool has {} free: it would evict other clients' blocks. \
         Lower --bytes or --rounds{}",
        ByteSize(needed),
        ByteSize(free),
        if admin {
            ""
        } else {
            ", or run it as an admin (root or the daemon's uid), whose bench removes each round's blocks"
        }
    );
    let clean = admin.then_some(&ours);
    let r = measure(&mut c, &ns, args.bytes, rounds, !args.json, clean).await;
    if admin {
        c.discard(ours.clone()).await?;
    }
    let r = r?;
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
