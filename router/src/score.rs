//! Scoring endpoints for one request: the longest held prefix, weighted by tier, balanced
//! against load. Pure: the router service and the cluster simulation call the same code.

use super::index::{GlobalIndex, NodeId};
use kvtier_core::block::BlockHash;

/// How much a held block and a unit of load count.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Weights {
    /// Value of a block held only on disk, relative to one in the host tier (it must be promoted).
    pub disk: f64,
    /// Penalty of the most loaded node relative to holding the whole prompt.
    pub load: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self { disk: 0.5, load: 0.5 }
    }
}

/// What the router knows of one endpoint.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NodeView {
    /// Its place in the index.
    pub node: NodeId,
    /// Load signal (requests per second, or requests in a window in simulation).
    pub load: f64,
    /// Whether it may be picked.
    pub healthy: bool,
}

/// One endpoint's score for a request.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Scored {
    /// The node.
    pub node: NodeId,
    /// Higher is better.
    pub score: f64,
    /// Leading blocks held in any tier.
    pub matched: u32,
    /// Of those, in the host tier.
    pub host: u32,
    /// Its load.
    pub load: f64,
    /// Whether it may be picked.
    pub healthy: bool,
}

/// Why an endpoint was picked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// It holds the best-scoring prefix.
    Prefix,
    /// Nobody holds any of the prompt: the least loaded one.
    LeastLoaded,
}

impl Reason {
    /// Label as in the API and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Prefix => "prefix",
            Reason::LeastLoaded => "least-loaded",
        }
    }
}

/// Scores every node of `nodes` for a request of `hashes`, best first (unhealthy last).
pub fn score(
    index: &GlobalIndex,
    namespace: &[u8; 16],
    hashes: &[BlockHash],
    nodes: &[NodeView],
    w: &Weights,
) -> Vec<Scored> {
    let prefixes = index.prefixes(namespace, hashes);
    let max_load = nodes.iter().filter(|n| n.healthy).map(|n| n.load).fold(0.0, f64::max);
    let len = hashes.len().max(1) as f64;
    let mut out: Vec<Scored> = nodes
        .iter()
        .map(|n| {
            let p = prefixes.iter().find(|p| p.node == n.node);
            let (matched, host) = p.map_or((0, 0), |p| (p.matched, p.host));
            let held = (host as f64 + w.disk * (matched - host) as f64) / len;
            let load = if max_load > 0.0 { n.load / max_load } else { 0.0 };
            Scored { node: n.node, score: held - w.load * load, matched, host, load: n.load, healthy: n.healthy }
        })
        .collect();
    out.sort_by(|a, b| b.healthy.cmp(&a.healthy).then(b.score.total_cmp(&a.score)));
    out
}

/// Picks from scores (as [`score`] returns them). With no prefix held anywhere, the least
/// loaded healthy node; ties are broken by rotating with `tie_break` (e.g. a request counter),
/// so equal nodes share the work. `None` only when no node is healthy.
pub fn pick(scored: &[Scored], tie_break: usize) -> Option<(NodeId, Reason)> {
    let healthy: Vec<&Scored> = scored.iter().filter(|s| s.healthy).collect();
    let best = healthy.first()?;
    if best.matched > 0 {
        let top: Vec<_> = healthy.iter().filter(|s| s.score == best.score).collect();
        return Some((top[tie_break % top.len()].node, Reason::Prefix));
    }
    let least = healthy.iter().map(|s| s.load).fold(f64::INFINITY, f64::min);
    let ties: Vec<_> = healthy.iter().filter(|s| s.load == least).collect();
    Some((ties[tie_break % ties.len()].node, Reason::LeastLoaded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_core::cache::TierKind;

    const NS: [u8; 16] = [1; 16];

    fn hashes(n: u64) -> Vec<BlockHash> {
        (0..n).map(BlockHash::from_u64).collect()
    }

    fn nodes(loads: &[f64]) -> Vec<NodeView> {
        loads.iter().enumerate().map(|(i, &load)| NodeView { node: i as NodeId, load, healthy: true }).collect()
    }

    fn index(held: &[(NodeId, u64, TierKind)]) -> GlobalIndex {
        let mut idx = GlobalIndex::new(1000);
        for &(node, n, tier) in held {
            for h in hashes(n) {
                idx.set(node, &NS, h, Some(tier));
            }
        }
        idx
    }

    #[test]
    fn the_longest_prefix_wins() {
        let idx = index(&[(0, 2, TierKind::Host), (1, 6, TierKind::Host)]);
        let s = score(&idx, &NS, &hashes(8), &nodes(&[0.0, 0.0, 0.0]), &Weights::default());
        assert_eq!(pick(&s, 0), Some((1, Reason::Prefix)));
        assert_eq!((s[0].matched, s[0].host), (6, 6));
    }

    #[test]
    fn host_beats_disk_for_the_same_prefix() {
        let idx = index(&[(0, 4, TierKind::Disk), (1, 4, TierKind::Host)]);
        let s = score(&idx, &NS, &hashes(4), &nodes(&[0.0, 0.0]), &Weights::default());
        assert_eq!(pick(&s, 0), Some((1, Reason::Prefix)));
    }

    #[test]
    fn load_outweighs_a_short_prefix_but_not_a_long_one() {
        let idx = index(&[(0, 1, TierKind::Host), (1, 10, TierKind::Host)]);
        let loads = nodes(&[10.0, 1.0, 0.0]);
        let s = score(&idx, &NS, &hashes(10), &loads, &Weights::default());
        assert_eq!(pick(&s, 0).unwrap().0, 1, "the full prefix is worth the load");
        let idx = index(&[(0, 1, TierKind::Host)]);
        let s = score(&idx, &NS, &hashes(10), &loads, &Weights::default());
        assert_eq!(pick(&s, 0), Some((2, Reason::LeastLoaded)), "1 of 10 blocks on a busy node loses to an idle one");
    }

    #[test]
    fn nothing_known_means_least_loaded_never_an_error() {
        let idx = GlobalIndex::new(10);
        let s = score(&idx, &NS, &hashes(3), &nodes(&[3.0, 1.0, 1.0]), &Weights::default());
        assert_eq!(pick(&s, 0), Some((1, Reason::LeastLoaded)));
        assert_eq!(pick(&s, 1), Some((2, Reason::LeastLoaded)), "ties rotate");
        let s = score(&idx, &NS, &[], &nodes(&[0.0]), &Weights::default());
        assert_eq!(pick(&s, 0), Some((0, Reason::LeastLoaded)));
    }

    #[test]
    fn unhealthy_nodes_are_never_picked() {
        let idx = index(&[(0, 4, TierKind::Host)]);
        let mut ns = nodes(&[0.0, 5.0]);
        ns[0].healthy = false;
        let s = score(&idx, &NS, &hashes(4), &ns, &Weights::default());
        assert_eq!(pick(&s, 0), Some((1, Reason::LeastLoaded)));
        ns[1].healthy = false;
        assert_eq!(pick(&score(&idx, &NS, &hashes(4), &ns, &Weights::default()), 0), None);
    }
}
