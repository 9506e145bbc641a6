//! Ranking engines for one request: the prefix each engine's node holds of the request's
//! blocks (host and disk tiers, in the namespace the request's salt selects), against the
//! requests each engine has in flight. Pure: the HTTP gateway and the endpoint picker call it
//! with the followed index and their own load counts.

use hashbrown::HashMap;
use kvtier_core::block::BlockHash;
use kvtier_core::block_key::{adapter_request_keys, Extra};
use kvtier_core::namespace::NamespaceId;
use kvtier_proto::v1::NamespaceDescriptor;
use kvtier_router::index::{GlobalIndex, NodeId};
use kvtier_router::score::{Reason, Weights};

/// One engine the request may go to.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// Its address, "host:port".
    pub address: String,
    /// The node whose daemon it announced itself to (None: not announced; it holds nothing
    /// the gateway knows of).
    pub node: Option<NodeId>,
    /// The namespaces its connector registered (salt cleared).
    pub namespaces: Vec<NamespaceDescriptor>,
    /// The LoRA adapter the request names, as this engine loaded it (`Extra::lora`): part of
    /// every key of the request's blocks there. None for the base model.
    pub lora: Option<Extra>,
    /// Requests this gateway has in flight on it.
    pub in_flight: u32,
    /// False while it refused connections recently: tried only after every healthy one.
    pub healthy: bool,
}

/// What one engine holds of the request, and its score.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Ranked {
    /// Index in the candidates.
    pub candidate: usize,
    /// Leading blocks its node holds, in any tier.
    pub matched: u32,
    /// Of those, in the host tier.
    pub host: u32,
    /// Higher is better.
    pub score: f64,
    /// As the candidate.
    pub healthy: bool,
}

/// Candidates best first, with why the first was chosen.
#[derive(Clone, Debug, PartialEq)]
pub struct Ranking {
    /// Every candidate, best first (unhealthy ones last).
    pub order: Vec<Ranked>,
    /// Why the first is first.
    pub reason: Reason,
    /// The request's full blocks (the denominator of the scores).
    pub blocks: u32,
}

/// Ranks `candidates` for a request of `tokens` (None: not keyable, by load alone) with salt
/// `salt`. `tie_break` rotates among equal best candidates (e.g. a request counter).
pub fn rank(
    index: &GlobalIndex,
    tokens: Option<&[u32]>,
    salt: &str,
    candidates: &[Candidate],
    w: &Weights,
    tie_break: usize,
) -> Ranking {
    let mut keys: HashMap<(usize, Option<&Extra>), Vec<BlockHash>> = HashMap::new();
    // What every node holds of the keys, by namespace and adapter (the keys' extras).
    let mut held: HashMap<(NamespaceId, Option<&Extra>), Vec<kvtier_router::index::NodePrefix>> = HashMap::new();
    let mut blocks = 0u32;
    let max_load = candidates.iter().filter(|c| c.healthy).map(|c| c.in_flight).max().unwrap_or(0).max(1) as f64;
    let mut order: Vec<Ranked> = candidates
        .iter()
        .enumerate()
        .map(|(i, c)| {
            let (mut matched, mut host, mut value) = (0, 0, 0.0);
            for desc in c.namespaces.iter().filter(|_| c.node.is_some()) {
                let (Some(tokens), Ok(block_size)) = (tokens, usize::try_from(desc.tokens_per_block)) else { continue };
                let keys = keys
                    .entry((block_size, c.lora.as_ref()))
                    .or_insert_with(|| adapter_request_keys(tokens, block_size, salt, c.lora.as_ref()));
                if keys.is_empty() {
                    continue;
                }
                let id = NamespaceId::of(&NamespaceDescriptor { cache_salt: salt.to_string(), ..desc.clone() });
                let prefixes = held.entry((id, c.lora.as_ref())).or_insert_with(|| index.prefixes(&id.0, keys));
                if let Some(p) = prefixes.iter().find(|p| Some(p.node) == c.node) {
                    let v = (p.host as f64 + w.disk * (p.matched - p.host) as f64) / keys.len() as f64;
                    if v > value {
                        (matched, host, value) = (p.matched, p.host, v);
                    }
                }
                blocks = blocks.max(keys.len() as u32);
            }
            let score = value - w.load * c.in_flight as f64 / max_load;
            Ranked { candidate: i, matched, host, score, healthy: c.healthy }
        })
        .collect();
    order.sort_by(|a, b| b.healthy.cmp(&a.healthy).then(b.score.total_cmp(&a.score)));
    let top = order.iter().take_while(|r| r.healthy == order[0].healthy && r.score == order[0].score).count();
    if top > 1 {
        order[..top].rotate_left(tie_break % top);
    }
    let reason = match order.first() {
        Some(r) if r.matched > 0 => Reason::Prefix,
        _ => Reason::LeastLoaded,
    };
    Ranking { order, reason, blocks }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvtier_core::cache::TierKind;

    fn desc(block: u32) -> NamespaceDescriptor {
        NamespaceDescriptor { model: "m".into(), tokens_per_block: block, block_bytes: 4096, ..Default::default() }
    }

    fn engine(address: &str, node: Option<NodeId>, in_flight: u32) -> Candidate {
        Candidate { address: address.into(), node, namespaces: vec![desc(4)], lora: None, in_flight, healthy: true }
    }

    /// An index where `node` holds the first `n` blocks of `tokens` (salt `salt`) in `tier`.
    fn hold(idx: &mut GlobalIndex, node: NodeId, tokens: &[u32], salt: &str, n: usize, tier: TierKind) {
        hold_for(idx, node, tokens, salt, None, n, tier)
    }

    /// As `hold`, for the blocks of adapter `lora`.
    fn hold_for(
        idx: &mut GlobalIndex,
        node: NodeId,
        tokens: &[u32],
        salt: &str,
        lora: Option<&Extra>,
        n: usize,
        tier: TierKind,
    ) {
        let id = NamespaceId::of(&NamespaceDescriptor { cache_salt: salt.into(), ..desc(4) });
        for k in adapter_request_keys(tokens, 4, salt, lora).into_iter().take(n) {
            idx.set(node, &id.0, k, Some(tier));
        }
    }

    const TOKENS: [u32; 16] = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16];

    #[test]
    fn the_engine_whose_node_holds_the_longer_prefix_wins() {
        let mut idx = GlobalIndex::new(100);
        hold(&mut idx, 0, &TOKENS, "", 1, TierKind::Host);
        hold(&mut idx, 1, &TOKENS, "", 4, TierKind::Host);
        let c = [engine("a:1", Some(0), 0), engine("b:1", Some(1), 0)];
        let r = rank(&idx, Some(&TOKENS), "", &c, &Weights::default(), 0);
        assert_eq!(r.reason, Reason::Prefix);
        assert_eq!((r.order[0].candidate, r.order[0].matched, r.order[0].host), (1, 4, 4));
        assert_eq!(r.blocks, 4);
    }

    #[test]
    fn the_salt_selects_the_tenants_blocks_only() {
        let mut idx = GlobalIndex::new(100);
        hold(&mut idx, 0, &TOKENS, "tenant-a", 4, TierKind::Host);
        let c = [engine("a:1", Some(0), 0), engine("b:1", Some(1), 0)];
        let r = rank(&idx, Some(&TOKENS), "tenant-a", &c, &Weights::default(), 0);
        assert_eq!((r.order[0].candidate, r.reason), (0, Reason::Prefix));
        let r = rank(&idx, Some(&TOKENS), "tenant-b", &c, &Weights::default(), 0);
        assert_eq!(r.reason, Reason::LeastLoaded);
        let r = rank(&idx, Some(&TOKENS), "", &c, &Weights::default(), 0);
        assert_eq!(r.reason, Reason::LeastLoaded, "unsalted requests never match salted blocks");
    }

    #[test]
    fn an_adapter_request_matches_the_blocks_of_that_adapter_as_each_engine_loaded_it() {
        let mut idx = GlobalIndex::new(100);
        let sql = |path: &str| Some(Extra::lora("sql", path));
        hold(&mut idx, 0, &TOKENS, "", 4, TierKind::Host);
        hold_for(&mut idx, 1, &TOKENS, "", sql("/b/sql").as_ref(), 2, TierKind::Host);
        hold_for(&mut idx, 2, &TOKENS, "", sql("/c/sql").as_ref(), 3, TierKind::Host);
        let mut c = [engine("a:1", Some(0), 0), engine("b:1", Some(1), 0), engine("c:1", Some(2), 0)];
        c[0].lora = sql("/a/sql");
        c[1].lora = sql("/b/sql");
        c[2].lora = sql("/b/sql");
        let r = rank(&idx, Some(&TOKENS), "", &c, &Weights::default(), 0);
        assert_eq!((r.order[0].candidate, r.order[0].matched), (1, 2), "base blocks and other paths do not count");
        assert_eq!(r.order[1].matched + r.order[2].matched, 0);
        c[2].lora = sql("/c/sql");
        let r = rank(&idx, Some(&TOKENS), "", &c, &Weights::default(), 0);
        assert_eq!((r.order[0].candidate, r.order[0].matched), (2, 3));
    }

    #[test]
    fn engines_of_one_node_share_its_blocks_and_split_by_load() {
        let mut idx = GlobalIndex::new(100);
        hold(&mut idx, 0, &TOKENS, "", 4, TierKind::Disk);
        let c = [engine("a:1", Some(0), 1), engine("a:2", Some(0), 0), engine("b:1", Some(1), 3)];
        let r = rank(&idx, Some(&TOKENS), "", &c, &Weights::default(), 0);
        assert_eq!((r.order[0].candidate, r.order[0].matched, r.order[0].host), (1, 4, 0));
        let order: Vec<_> = r.order.iter().map(|r| r.candidate).collect();
        assert_eq!(order, vec![1, 0, 2], "the node's busier engine next, the busy node without the prefix last");
    }

    #[test]
    fn unkeyed_or_unknown_requests_go_to_the_least_loaded_in_turn() {
        let idx = GlobalIndex::new(100);
        let c = [engine("a:1", Some(0), 2), engine("b:1", None, 0), engine("c:1", Some(1), 0)];
        let first = rank(&idx, None, "", &c, &Weights::default(), 0);
        let second = rank(&idx, Some(&TOKENS), "", &c, &Weights::default(), 1);
        assert_eq!(first.reason, Reason::LeastLoaded);
        assert_eq!(first.order[0].candidate, 1);
        assert_eq!(second.order[0].candidate, 2, "equal candidates take turns");
        assert_eq!(second.order[2].candidate, 0);
    }

    #[test]
    fn unhealthy_engines_come_last_even_with_the_prefix() {
        let mut idx = GlobalIndex::new(100);
        hold(&mut idx, 0, &TOKENS, "", 4, TierKind::Host);
        let mut c = [engine("a:1", Some(0), 0), engine("b:1", Some(1), 5)];
        c[0].healthy = false;
        let r = rank(&idx, Some(&TOKENS), "", &c, &Weights::default(), 0);
        assert_eq!(r.order.iter().map(|r| r.candidate).collect::<Vec<_>>(), vec![1, 0]);
        assert_eq!(r.reason, Reason::LeastLoaded);
    }

    #[test]
    fn a_short_prompt_has_no_blocks_and_no_candidates_is_empty() {
        let idx = GlobalIndex::new(100);
        let r = rank(&idx, Some(&TOKENS[..3]), "", &[engine("a:1", Some(0), 0)], &Weights::default(), 0);
        assert_eq!((r.blocks, r.reason), (0, Reason::LeastLoaded));
        assert!(rank(&idx, None, "", &[], &Weights::default(), 0).order.is_empty());
    }
}
