//! `kvtier status`: the daemon's tiers, clients and counters.

use super::common::{tier_json, tier_line, ConnectArgs};
use bytesize::ByteSize;
use kvtier_client::stats::{names, Counters};

/// Arguments of `kvtier status`.
#[derive(clap::Args, Debug)]
pub struct StatusArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Also list every counter and gauge (what `/metrics` exports), with its help.
    #[arg(long)]
    counters: bool,
}

/// Prints the daemon's statistics.
pub async fn run(args: StatusArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect("status").await?;
    let s = c.stats().await?;
    let (backend, dma) = (c.hello().device_backend.clone(), c.hello().device_dma);
    if args.json {
        let tiers: Vec<_> = s.tiers.iter().map(tier_json).collect();
        let v = serde_json::json!({
            "daemon_version": s.daemon_version, "eviction_policy": s.eviction_policy, "tiers": tiers,
            "counters": s.counter_map(),
            "disk_failure": s.disk_failure, "device_backend": backend, "device_dma": dma,
            "problems": s.problems,
            "namespace_usage": s.namespace_usage.iter().map(|u| serde_json::json!({"model": u.model,
                "id_prefix": u.id_prefix, "block_bytes": u.block_bytes, "host_blocks": u.host_blocks,
                "disk_blocks": u.disk_blocks, "hit_blocks": u.hit_blocks,
                "disk_hit_blocks": u.disk_hit_blocks, "miss_blocks": u.miss_blocks})).collect::<Vec<_>>(),
        });
        println!("{v}");
        return Ok(());
    }
    let copies = if dma { "the daemon copies engine KV memory" } else { "connectors copy" };
    println!(
        "kvtierd {} at {} (eviction: {}; device backend: {backend}, {copies})",
        s.daemon_version,
        args.conn.socket.display(),
        s.eviction_policy
    );
    for t in &s.tiers {
        println!("{}", tier_line(t));
    }
    let n = |name| s.counter(name);
    let (hits, lookups) = (n(names::HITS), n(names::HITS) + n(names::MISSES));
    println!(
        "  namespaces {}, clients {}, hit rate {:.3} ({hits} of {lookups} blocks), evicted {}",
        n(names::NAMESPACES),
        n(names::CLIENTS),
        hits as f64 / lookups.max(1) as f64,
        n(names::EVICTED)
    );
    println!("  saved {}, loaded {}", ByteSize(n(names::SAVED_BYTES)), ByteSize(n(names::LOADED_BYTES)));
    if s.tiers.iter().any(|t| t.tier() == kvtier_proto::v1::Tier::Disk) || !s.disk_failure.is_empty() {
        println!(
            "  disk: {} hits, demoted {}, promoted {}, not admitted {}, corrupt {}; wrote {} ({:.2} bytes per saved byte)",
            n(names::DISK_HITS),
            n(names::DEMOTED),
            n(names::PROMOTED),
            n(names::NOT_ADMITTED),
            n(names::CORRUPT),
            ByteSize(n(names::DISK_WRITTEN_BYTES)),
            n(names::DISK_WRITTEN_BYTES) as f64 / n(names::SAVED_BYTES).max(1) as f64
        );
    }
    if !s.disk_failure.is_empty() {
        println!("  disk tier OFF: {}", s.disk_failure);
    }
    for p in &s.problems {
        println!("  NOT READY: {p}");
    }
    for u in &s.namespace_usage {
        println!("{}", namespace_line(u));
    }
    if args.counters {
        for c in &s.counters {
            println!("  {:<48} {:>16}  {}", c.name, c.value, c.help);
        }
    }
    Ok(())
}

/// One namespace's line: model, id prefix, what it holds in each tier, its lookups' hit rate.
pub fn namespace_line(u: &kvtier_proto::v1::NamespaceUsage) -> String {
    let bytes = |blocks: u64| ByteSize(blocks * u.block_bytes).to_string();
    let asked = u.hit_blocks + u.miss_blocks;
    let rate = if asked == 0 { 0.0 } else { u.hit_blocks as f64 / asked as f64 };
    format!(
        "  namespace {} [{}]: host {} blocks ({}), disk only {} blocks ({}), {} per block; hit rate {rate:.3} ({} of {asked} blocks, {} from disk)",
        if u.model.is_empty() { "(restored from disk, not registered since)" } else { &u.model },
        u.id_prefix,
        u.host_blocks,
        bytes(u.host_blocks),
        u.disk_blocks,
        bytes(u.disk_blocks),
        ByteSize(u.block_bytes),
        u.hit_blocks,
        u.disk_hit_blocks
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_namespace_line_shows_its_blocks_and_bytes_per_tier() {
        let u = kvtier_proto::v1::NamespaceUsage {
            model: "m".into(),
            id_prefix: "0a1b2c3d".into(),
            block_bytes: 1 << 20,
            host_blocks: 3,
            disk_blocks: 2,
            hit_blocks: 5,
            disk_hit_blocks: 1,
            miss_blocks: 3,
        };
        assert_eq!(
            super::namespace_line(&u),
            "  namespace m [0a1b2c3d]: host 3 blocks (3.0 MiB), disk only 2 blocks (2.0 MiB), 1.0 MiB per block; \
             hit rate 0.625 (5 of 8 blocks, 1 from disk)"
        );
    }
}
