//! `kvtier sim`: replays a trace through the real index and policy code.

use kvtier_core::policy::{AdmissionKind, PolicyKind};
use kvtier_core::sim::{sweep, sweep_tiered, Trace, DEFAULT_CAPACITY_PCTS};
use std::path::PathBuf;

/// Arguments of `kvtier sim`.
#[derive(clap::Args, Debug)]
pub struct SimArgs {
    /// Trace file: one JSON object a line with `hash_ids` (Mooncake format).
    pub trace: PathBuf,
    /// Print one JSON object a line instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Capacities in percent of the trace's unique blocks (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = DEFAULT_CAPACITY_PCTS)]
    pub capacity_pct: Vec<f64>,
    /// Policies to compare (Belady's optimum is always added).
    #[arg(long, value_delimiter = ',', default_values = ["lru", "prefix-lfu"])]
    pub policy: Vec<PolicyKind>,
    /// Add a disk tier of this capacity (percent of unique blocks): prints hit rate by tier and
    /// disk write volume, with `--capacity-pct` as the host capacities.
    #[arg(long)]
    pub disk_pct: Option<f64>,
    /// Disk admission rules to compare (with `--disk-pct`).
    #[arg(long, value_delimiter = ',', default_values = ["reused", "always"])]
    pub admission: Vec<AdmissionKind>,
    /// Simulate a cluster of this many nodes (comma-separated for several), each of
    /// `--capacity-pct` (first value) of the unique blocks: prefix hit rate and load imbalance for
    /// round-robin, least-loaded and cache-aware routing, next to one pool of all their memory.
    #[arg(long, value_delimiter = ',')]
    pub nodes: Vec<usize>,
}

fn run_cluster(args: &SimArgs, trace: &Trace) -> anyhow::Result<()> {
    let pct = args.capacity_pct.first().copied().unwrap_or(5.0);
    let policy = args.policy.iter().copied().find(|p| *p != PolicyKind::Belady).unwrap_or(PolicyKind::Lru);
    let results = kvtier_router::sim::sweep_cluster(trace, &args.nodes, pct, policy);
    if args.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!(
        "trace: {} requests, {} unique blocks; each node holds {pct}% of them ({}); load window 10 s",
        trace.requests.len(),
        trace.unique_blocks(),
        policy.name()
    );
    println!("{:>6} {:>20} {:>9} {:>10}", "nodes", "routing", "hit rate", "max/mean");
    for r in &results {
        println!("{:>6} {:>20} {:>9.4} {:>10.2}", r.nodes, r.routing, r.hit_rate, r.imbalance);
    }
    Ok(())
}

fn run_tiered(args: &SimArgs, trace: &Trace, disk_pct: f64) -> anyhow::Result<()> {
    let mut policies = args.policy.clone();
    policies.retain(|p| *p != PolicyKind::Belady);
    let results = sweep_tiered(trace, &args.capacity_pct, disk_pct, &policies, &args.admission);
    if args.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!(
        "trace: {} requests, {} blocks, {} unique; disk {disk_pct}% of unique blocks",
        trace.requests.len(),
        trace.total_blocks(),
        trace.unique_blocks()
    );
    println!(
        "{:>6} {:>11} {:>9} {:>9} {:>9} {:>9} {:>14} {:>15} {:>8}",
        "host%", "policy", "admission", "host hit", "disk hit", "total", "disk writes/", "belady(host+", "ratio"
    );
    println!(
        "{:>6} {:>11} {:>9} {:>9} {:>9} {:>9} {:>14} {:>15} {:>8}",
        "", "", "", "", "", "", "saved block", "disk, 1 pool)", ""
    );
    for r in &results {
        println!(
            "{:>5}% {:>11} {:>9} {:>9.4} {:>9.4} {:>9.4} {:>14.3} {:>15.4} {:>8.3}",
            r.host_pct,
            r.policy,
            r.admission,
            r.host_hit_rate,
            r.disk_hit_rate,
            r.hit_rate,
            r.written_per_saved,
            r.belady_combined,
            r.hit_rate / r.belady_combined.max(f64::MIN_POSITIVE)
        );
    }
    Ok(())
}

/// Runs the simulation and prints the table or JSON lines.
pub fn run(args: SimArgs) -> anyhow::Result<()> {
    let trace = Trace::load(&args.trace)?;
    if !args.nodes.is_empty() {
        return run_cluster(&args, &trace);
    }
    if let Some(disk_pct) = args.disk_pct {
        return run_tiered(&args, &trace, disk_pct);
    }
    let mut policies = args.policy.clone();
    policies.retain(|p| *p != PolicyKind::Belady);
    policies.push(PolicyKind::Belady);
    let results = sweep(&trace, &args.capacity_pct, &policies);
    if args.json {
        for r in &results {
            println!("{}", serde_json::to_string(r)?);
        }
        return Ok(());
    }
    println!(
        "trace: {} requests, {} blocks, {} unique; prefix hit rate by host capacity",
        trace.requests.len(),
        trace.total_blocks(),
        trace.unique_blocks()
    );
    let names: Vec<&str> = results.iter().take(policies.len()).map(|r| r.policy.as_str()).collect();
    print!("{:>10}", "capacity");
    for n in &names {
        print!(" {n:>11}");
    }
    println!(" {:>16}", "best/belady");
    for row in results.chunks(policies.len()) {
        print!("{:>9}%", row[0].capacity_pct);
        for r in row {
            print!(" {:>11.4}", r.hit_rate);
        }
        let belady = row.last().map_or(0.0, |r| r.hit_rate);
        let best = row[..row.len() - 1].iter().map(|r| r.hit_rate).fold(0.0, f64::max);
        println!(" {:>16.3}", if belady > 0.0 { best / belady } else { 1.0 });
    }
    Ok(())
}
