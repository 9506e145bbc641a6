//! Prefix hit rate of the eviction policies on the shared Mooncake trace, next to Belady's
//! optimum, at 1-50 % of the trace's unique blocks (the same as `kvtier sim`).
//!
//! `cargo bench -p kvtier-benches --bench hit_rate` (trace: ../shared/data/traces or KVTIER_TRACE)

use kvtier_core::policy::PolicyKind;
use kvtier_core::sim::{sweep, Trace, DEFAULT_CAPACITY_PCTS};

fn main() {
    let path = std::env::var("KVTIER_TRACE").unwrap_or_else(|_| {
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/data/traces/synthetic_trace.jsonl").into()
    });
    let trace = Trace::load(std::path::Path::new(&path)).expect("trace");
    let policies = [PolicyKind::Lru, PolicyKind::PrefixLfu, PolicyKind::Belady];
    let rows = sweep(&trace, &DEFAULT_CAPACITY_PCTS, &policies);
    println!("prefix hit rate, {} ({} requests, {} unique blocks)", path, trace.requests.len(), trace.unique_blocks());
    println!(
        "{:>9} {:>8} {:>11} {:>8} {:>12} {:>13}",
        "capacity", "lru", "prefix-lfu", "belady", "lru/belady", "plfu/belady"
    );
    for r in rows.chunks(3) {
        let (lru, plfu, opt) = (r[0].hit_rate, r[1].hit_rate, r[2].hit_rate);
        println!(
            "{:>8}% {:>8.4} {:>11.4} {:>8.4} {:>12.3} {:>13.3}",
            r[0].capacity_pct,
            lru,
            plfu,
            opt,
            lru / opt,
            plfu / opt
        );
    }
}
