//! `kvtier lookup`, `kvtier put` and `kvtier get`: test blocks through the shared pool.

use super::common::{parse_hex, BlocksArgs, ConnectArgs, NamespaceArgs};
use kvtier_client::{testdata, Reservation};

/// Arguments of `kvtier lookup`.
#[derive(clap::Args, Debug)]
pub struct LookupArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    #[command(flatten)]
    ns: NamespaceArgs,
    /// Block hashes in hex, in prefix order; without any, the hashes of the test prompt.
    hashes: Vec<String>,
    #[command(flatten)]
    blocks: BlocksArgs,
}

/// Arguments of `kvtier get`: which daemon, namespace and test prompt.
#[derive(clap::Args, Debug)]
pub struct GetArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    #[command(flatten)]
    ns: NamespaceArgs,
    #[command(flatten)]
    blocks: BlocksArgs,
}

/// Arguments of `kvtier put`.
#[derive(clap::Args, Debug)]
pub struct PutArgs {
    #[command(flatten)]
    target: GetArgs,
    /// Fault injection: after reserving and writing, wait this many seconds before committing
    /// (prints `reserved N` first), e.g. to kill the client mid-save.
    #[arg(long)]
    pause_before_commit: Option<u64>,
}

/// Prints how many leading hashes the daemon holds.
pub async fn lookup(args: LookupArgs) -> anyhow::Result<()> {
    let hashes = if args.hashes.is_empty() {
        testdata::chained_hashes(args.blocks.seed, args.blocks.count)
    } else {
        args.hashes.iter().map(|h| parse_hex(h)).collect::<anyhow::Result<_>>()?
    };
    let mut c = args.conn.connect("lookup").await?;
    let ns = args.ns.register(&mut c).await?;
    let tiers = c.lookup_tiers(&ns, &hashes).await?;
    let on_disk = tiers.iter().filter(|&&t| t == kvtier_proto::v1::Tier::Disk).count();
    println!("matched {} of {} blocks ({on_disk} only on disk)", tiers.len(), hashes.len());
    Ok(())
}

/// Saves the test prompt's blocks.
pub async fn put(args: PutArgs) -> anyhow::Result<()> {
    let t = &args.target;
    let hashes = testdata::chained_hashes(t.blocks.seed, t.blocks.count);
    let blocks: Vec<Vec<u8>> = hashes.iter().map(|h| testdata::block(h, t.ns.block_bytes as usize)).collect();
    let mut c = t.conn.connect("put").await?;
    let ns = t.ns.register(&mut c).await?;
    if let Some(secs) = args.pause_before_commit {
        let (reservation, slots) = c.reserve(&ns, &hashes, None).await?;
        let mut reserved = 0;
        for (slot, data) in slots.iter().zip(&blocks) {
            if let Reservation::Slot(s) = slot {
                c.pool().write(*s, data)?;
                reserved += 1;
            }
        }
        println!("reserved {reserved}");
        std::io::Write::flush(&mut std::io::stdout())?;
        tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
        c.commit(reservation).await?;
        println!("committed {reserved}");
        return Ok(());
    }
    let refs: Vec<&[u8]> = blocks.iter().map(|b| &b[..]).collect();
    let r = c.save(&ns, &hashes, &refs).await?;
    println!("stored {} present {} no_space {}", r.stored, r.present, r.no_space);
    Ok(())
}

/// Loads the test prompt's held prefix and checks every byte; fails on any mismatch.
pub async fn get(args: GetArgs) -> anyhow::Result<()> {
    let hashes = testdata::chained_hashes(args.blocks.seed, args.blocks.count);
    let mut c = args.conn.connect("get").await?;
    let ns = args.ns.register(&mut c).await?;
    let len = args.ns.block_bytes as usize;
    let mut want = vec![0u8; len];
    let mut bad = Vec::new();
    let loaded = c
        .load(&ns, &hashes, |i, got| {
            testdata::fill_block(&hashes[i], &mut want);
            if got != want {
                bad.push(i);
            }
        })
        .await?;
    println!("loaded {loaded} of {} blocks, {} verified", hashes.len(), loaded - bad.len());
    anyhow::ensure!(bad.is_empty(), "blocks {bad:?} differ from what was saved");
    Ok(())
}
