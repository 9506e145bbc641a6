//! `kvtier discard`: an operator's purge of namespaces' blocks from every tier (a retired
//! model, a tenant gone, a suspect cache), without restarting the daemon. Criteria combine:
//! `--model M --cache-salt S` removes tenant S's blocks of model M only.

use super::common::{parse_hex, ConnectArgs};
use kvtier_client::Bytes;
use kvtier_proto::v1 as pb;
use std::time::{Duration, Instant};

/// Arguments of `kvtier discard`.
#[derive(clap::Args, Debug)]
#[command(group(clap::ArgGroup::new("which").required(true).multiple(true).args(["model", "cache_salt", "namespace", "all"])))]
pub struct DiscardArgs {
    #[command(flatten)]
    conn: ConnectArgs,
    /// Namespaces registered with this model name.
    #[arg(long)]
    model: Option<String>,
    /// Namespaces registered with this tenant cache salt (every model the tenant used).
    #[arg(long)]
    cache_salt: Option<String>,
    /// Namespaces whose id starts with these hex digits (`kvtier status` shows the first 8).
    #[arg(long, value_parser = parse_id_prefix)]
    namespace: Option<Bytes>,
    /// Every namespace.
    #[arg(long, conflicts_with_all = ["model", "cache_salt", "namespace"])]
    all: bool,
    /// Blocks in use (being loaded, shipped, moved between tiers) are left by the daemon: ask
    /// again every 100 ms for up to this many seconds until none is left (0: ask once).
    #[arg(long, default_value_t = 5.0)]
    wait: f64,
    /// Only say what would be removed: the namespaces selected and the blocks they hold now.
    #[arg(long)]
    dry_run: bool,
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

/// Leading bytes of a namespace id (1 to 16), from hex.
fn parse_id_prefix(s: &str) -> Result<Bytes, String> {
    let bytes = parse_hex(s).map_err(|e| e.to_string())?;
    match bytes.len() {
        1..=16 => Ok(bytes),
        n => Err(format!("an id prefix has 1 to 16 bytes (2 to 32 hex digits), not {n}")),
    }
}

/// Sums the replies of repeated requests (each removes what the earlier ones left busy).
fn add(total: &mut pb::DiscardReply, r: &pb::DiscardReply) {
    total.namespaces = r.namespaces;
    total.matched.clone_from(&r.matched);
    total.host_blocks += r.host_blocks;
    total.disk_blocks += r.disk_blocks;
    total.busy_blocks = r.busy_blocks;
}

/// `kvtier discard`.
pub async fn run(args: DiscardArgs) -> anyhow::Result<()> {
    let mut c = args.conn.connect("discard").await?;
    let request = pb::Discard {
        model: args.model.clone().unwrap_or_default(),
        cache_salt: args.cache_salt.clone().unwrap_or_default(),
        id_prefix: args.namespace.clone().unwrap_or_default(),
        all: args.all,
        dry_run: args.dry_run,
    };
    let deadline = Instant::now() + Duration::from_secs_f64(args.wait.max(0.0));
    let mut total = pb::DiscardReply::default();
    loop {
        add(&mut total, &c.discard(request.clone()).await?);
        if args.dry_run || total.busy_blocks == 0 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let matched: Vec<String> = total.matched.iter().map(super::clients::namespace_label).collect();
    if args.json {
        let v = serde_json::json!({"namespaces": total.namespaces, "host_blocks": total.host_blocks,
            "disk_blocks": total.disk_blocks, "busy_blocks": total.busy_blocks, "matched": matched,
            "dry_run": args.dry_run});
        println!("{v}");
    } else {
        println!(
            "{} {} blocks in {} namespaces ({} from the host pool, {} from disk only){}{}",
            if args.dry_run { "would discard" } else { "discarded" },
            total.host_blocks + total.disk_blocks,
            total.namespaces,
            total.host_blocks,
            total.disk_blocks,
            if matched.is_empty() { "" } else { ": " },
            matched.join(", ")
        );
        if total.busy_blocks > 0 {
            println!("{} blocks were in use and are still held: run again to remove them", total.busy_blocks);
        }
    }
    anyhow::ensure!(total.namespaces > 0, "no namespace matches (kvtier status lists them)");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_prefixes_are_even_hex() {
        assert_eq!(parse_id_prefix("1a2B").unwrap(), Bytes::from_static(&[0x1a, 0x2b]));
        assert!(parse_id_prefix("").is_err());
        assert!(parse_id_prefix("abc").is_err());
        assert!(parse_id_prefix("zz").is_err());
        assert!(parse_id_prefix(&"00".repeat(17)).is_err());
    }

    #[test]
    fn repeated_replies_add_removals_and_keep_the_last_busy_count() {
        let mut t = pb::DiscardReply::default();
        add(
            &mut t,
            &pb::DiscardReply { namespaces: 2, host_blocks: 5, disk_blocks: 1, busy_blocks: 3, ..Default::default() },
        );
        add(
            &mut t,
            &pb::DiscardReply { namespaces: 2, host_blocks: 3, disk_blocks: 0, busy_blocks: 0, ..Default::default() },
        );
        assert_eq!((t.namespaces, t.host_blocks, t.disk_blocks, t.busy_blocks), (2, 8, 1, 0));
    }
}
