//! Cluster simulation: a trace replayed over N nodes, each a real `BlockCache` of its own
//! capacity, routed round-robin, least-loaded, or cache-aware through the router's own index
//! (fed by the nodes' event logs) and scoring code. Time is the trace's timestamps.

use super::index::{GlobalIndex, NodeId, MAX_NODES};
use super::score::{pick, score, NodeView, Weights};
use kvtier_core::alloc::SlabAllocator;
use kvtier_core::block::{BlockHash, NsIdx};
use kvtier_core::cache::{BlockCache, CacheLimits, ClientId, TierKind};
use kvtier_core::events::EventKind;
use kvtier_core::namespace::NamespaceId;
use kvtier_core::policy::PolicyKind;
use kvtier_core::sim::Trace;
use serde::Serialize;
use std::collections::VecDeque;

/// How requests are spread over the nodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Routing {
    /// In turn.
    RoundRobin,
    /// To the node with the fewest requests in the load window.
    LeastLoaded,
    /// By the router's score: held prefix against load.
    CacheAware,
}

impl Routing {
    /// Every routing, in report order.
    pub const ALL: [Routing; 3] = [Routing::RoundRobin, Routing::LeastLoaded, Routing::CacheAware];

    /// Name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Routing::RoundRobin => "round-robin",
            Routing::LeastLoaded => "least-loaded",
            Routing::CacheAware => "cache-aware",
        }
    }
}

/// Outcome of one cluster run.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ClusterResult {
    /// Nodes.
    pub nodes: usize,
    /// Capacity of each node in percent of the trace's unique blocks.
    pub node_pct: f64,
    /// Routing name.
    pub routing: String,
    /// Prefix-hit blocks over requested blocks.
    pub hit_rate: f64,
    /// Most requests on one node over the mean.
    pub imbalance: f64,
}

/// The load signal's window, as the daemon's requests-per-second over 10 s.
const LOAD_WINDOW_MS: u64 = 10_000;

struct Node {
    cache: BlockCache,
    ns: NsIdx,
    seen: u64,
    recent: VecDeque<u64>,
    requests: u64,
}

const NS_ID: [u8; 16] = [0; 16];

fn node(blocks: usize, policy: PolicyKind) -> Node {
    let alloc = SlabAllocator::new(1, blocks.max(1) as u64 * 4096, 1);
    let mut cache = BlockCache::new(alloc, policy, CacheLimits::default());
    let ns = cache.register(NamespaceId(NS_ID), 4096).expect("block fits");
    Node { cache, ns, seen: 0, recent: VecDeque::new(), requests: 0 }
}

/// Moves a node's new events into the router's index (the event stream, without the network).
fn follow(index: &mut GlobalIndex, id: NodeId, n: &mut Node) {
    let events = n.cache.events().since(n.seen).expect("drained after every request");
    for e in &events {
        let tier = match e.kind {
            EventKind::Stored { tier, .. } => Some(tier),
            EventKind::TierChanged { to, .. } => Some(to),
            EventKind::Removed { .. } => None,
        };
        index.set(id, &NS_ID, e.key.hash, tier);
    }
    n.seen = n.cache.events().last_sequence();
}

/// Replays `trace` over `nodes` nodes of `node_blocks` blocks each; returns (hit blocks, total
/// blocks, requests per node).
pub fn simulate_cluster(
    trace: &Trace,
    nodes: usize,
    node_blocks: usize,
    routing: Routing,
    policy: PolicyKind,
    weights: &Weights,
) -> (u64, u64, Vec<u64>) {
    assert!((1..=MAX_NODES).contains(&nodes), "1 to {MAX_NODES} nodes");
    let mut cluster: Vec<Node> = (0..nodes).map(|_| node(node_blocks, policy)).collect();
    let mut index = GlobalIndex::new(usize::MAX);
    let (mut hits, mut total) = (0u64, 0u64);
    for (i, req) in trace.requests.iter().enumerate() {
        let now = req.timestamp;
        for n in &mut cluster {
            while n.recent.front().is_some_and(|&t| t + LOAD_WINDOW_MS <= now) {
                n.recent.pop_front();
            }
        }
        let hashes: Vec<BlockHash> = req.hash_ids.iter().map(|&id| BlockHash::from_u64(id)).collect();
        let views: Vec<NodeView> = cluster
            .iter()
            .enumerate()
            .map(|(id, n)| NodeView { node: id as NodeId, load: n.recent.len() as f64, healthy: true })
            .collect();
        let chosen = match routing {
            Routing::RoundRobin => i % nodes,
            Routing::LeastLoaded => {
                let empty = GlobalIndex::new(0);
                pick(&score(&empty, &NS_ID, &[], &views, weights), i).expect("healthy nodes").0 as usize
            }
            Routing::CacheAware => {
                pick(&score(&index, &NS_ID, &hashes, &views, weights), i).expect("healthy nodes").0 as usize
            }
        };
        let n = &mut cluster[chosen];
        n.recent.push_back(now);
        n.requests += 1;
        let client = ClientId(0);
        let tiers = n.cache.lookup_tiers(n.ns, &hashes);
        hits += tiers.iter().filter(|&&t| t == TierKind::Host).count() as u64;
        total += hashes.len() as u64;
        let (lease, _) = n.cache.acquire(client, n.ns, &hashes[..tiers.len()]).expect("within limits");
        if lease != 0 {
            n.cache.release(client, lease).expect("own lease");
        }
        let (res, _) = n.cache.reserve(client, n.ns, &hashes, None).expect("within limits");
        if res != 0 {
            n.cache.commit(client, res).expect("own reservation");
        }
        follow(&mut index, chosen as NodeId, n);
    }
    (hits, total, cluster.iter().map(|n| n.requests).collect())
}

/// Runs every routing for each node count, with nodes of `node_pct` % of the unique blocks.
pub fn sweep_cluster(trace: &Trace, node_counts: &[usize], node_pct: f64, policy: PolicyKind) -> Vec<ClusterResult> {
    let unique = trace.unique_blocks();
    let node_blocks = ((unique as f64) * node_pct / 100.0).round() as usize;
    let mut out = Vec::new();
    for &nodes in node_counts {
        for routing in Routing::ALL {
            let (hits, total, per_node) =
                simulate_cluster(trace, nodes, node_blocks, routing, policy, &Weights::default());
            let mean = per_node.iter().sum::<u64>() as f64 / nodes as f64;
            out.push(ClusterResult {
                nodes,
                node_pct,
                routing: routing.name().into(),
                hit_rate: hits as f64 / total.max(1) as f64,
                imbalance: *per_node.iter().max().unwrap_or(&0) as f64 / mean.max(f64::MIN_POSITIVE),
            });
        }
        let (hits, total) = kvtier_core::sim::simulate(trace, node_blocks * nodes, policy);
        out.push(ClusterResult {
            nodes,
            node_pct,
            routing: "single pool (bound)".into(),
            hit_rate: hits as f64 / total.max(1) as f64,
            imbalance: 1.0,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_core::sim::TraceRequest;

    /// Five prompt families arriving in turn, each repeated: cache-aware routing keeps every
    /// family on one node; round-robin spreads each family over all four nodes.
    fn families() -> Trace {
        let requests = (0..200u64)
            .map(|i| {
                let f = i % 5;
                TraceRequest {
                    timestamp: i * 100,
                    hash_ids: (0..8).map(|b| f * 1000 + b).chain([100_000 + i]).collect(),
                }
            })
            .collect();
        Trace { requests }
    }

    #[test]
    fn cache_aware_routing_beats_round_robin_and_stays_balanced() {
        let t = families();
        let run = |r| simulate_cluster(&t, 4, 12, r, PolicyKind::Lru, &Weights::default());
        let (rr, total, _) = run(Routing::RoundRobin);
        let (ca, _, per_node) = run(Routing::CacheAware);
        assert!(ca > rr, "cache-aware {ca} vs round-robin {rr} of {total}");
        let max = *per_node.iter().max().unwrap() as f64;
        assert!(max / 50.0 < 2.0, "balanced enough: {per_node:?}");
    }

    #[test]
    fn sweep_reports_every_routing_and_the_bound() {
        let r = sweep_cluster(&families(), &[2], 50.0, PolicyKind::Lru);
        assert_eq!(r.len(), 4);
        assert!(r.iter().all(|x| x.hit_rate <= r[3].hit_rate + 1e-9 || x.routing == "cache-aware"), "{r:?}");
    }
}
