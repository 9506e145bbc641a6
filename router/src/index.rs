//! The router's global block index: for every block any node holds, which nodes hold it and in
//! which tier. Pure data structure, fed by the nodes' event streams (or by a simulation).
//!
//! A block costs one hash-table entry: an interned namespace (2 bytes), the hash inline (33 bytes)
//! and two 128-bit node masks (host, disk), so a router follows at most [`MAX_NODES`] nodes.

use hashbrown::HashMap;
use kvtier_core::block::BlockHash;
use kvtier_core::cache::TierKind;

/// Most nodes one router follows.
pub const MAX_NODES: usize = 128;

/// A node's position in the index (0..MAX_NODES).
pub type NodeId = u8;

// Packed to 8-byte alignment: an entry is 72 bytes instead of 80 (u128 would align it to 16).
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
#[repr(C, packed(8))]
struct Holders {
    host: u128,
    disk: u128,
}

/// What one node holds of a request's prefix.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodePrefix {
    /// The node.
    pub node: NodeId,
    /// Leading blocks held in any tier.
    pub matched: u32,
    /// Of those, held in the host tier.
    pub host: u32,
}

/// Block -> nodes and tiers, with a bound on the number of blocks.
pub struct GlobalIndex {
    namespaces: HashMap<[u8; 16], u16>,
    blocks: HashMap<(u16, BlockHash), Holders>,
    max_blocks: usize,
    dropped: u64,
}

impl GlobalIndex {
    /// An index of at most `max_blocks` blocks; stores beyond it are counted and not indexed
    /// (a routing miss for those blocks, never a wrong route).
    pub fn new(max_blocks: usize) -> Self {
        Self { namespaces: HashMap::new(), blocks: HashMap::new(), max_blocks, dropped: 0 }
    }

    fn ns(&mut self, id: &[u8; 16]) -> u16 {
        let next = self.namespaces.len() as u16;
        *self.namespaces.entry(*id).or_insert(next)
    }

    /// Records that `node` holds the block in `tier` now, or (`None`) no longer holds it.
    pub fn set(&mut self, node: NodeId, namespace: &[u8; 16], hash: BlockHash, tier: Option<TierKind>) {
        let bit = 1u128 << node;
        let key = (self.ns(namespace), hash);
        let full = self.blocks.len() >= self.max_blocks;
        let h = match (self.blocks.get_mut(&key), tier) {
            (Some(h), _) => h,
            (None, None) => return,
            (None, Some(_)) if full => {
                self.dropped += 1;
                return;
            }
            (None, Some(_)) => self.blocks.entry(key).or_default(),
        };
        h.host &= !bit;
        h.disk &= !bit;
        match tier {
            Some(TierKind::Host) => h.host |= bit,
            Some(TierKind::Disk) => h.disk |= bit,
            None => {}
        }
        if h.host | h.disk == 0 {
            self.blocks.remove(&key);
        }
    }

    /// Forgets everything `node` holds (before a snapshot, or when it is gone).
    pub fn clear_node(&mut self, node: NodeId) {
        let keep = !(1u128 << node);
        self.blocks.retain(|_, h| {
            h.host &= keep;
            h.disk &= keep;
            h.host | h.disk != 0
        });
    }

    /// For every node holding at least the first block: how long a prefix of `hashes` it holds.
    pub fn prefixes(&self, namespace: &[u8; 16], hashes: &[BlockHash]) -> Vec<NodePrefix> {
        let Some(&ns) = self.namespaces.get(namespace) else { return Vec::new() };
        let mut alive = u128::MAX;
        let mut out: Vec<NodePrefix> = Vec::new();
        for (i, hash) in hashes.iter().enumerate() {
            let h = self.blocks.get(&(ns, *hash)).copied().unwrap_or_default();
            let held = (h.host | h.disk) & alive;
            if i == 0 {
                out = (0..MAX_NODES as u32)
                    .filter(|n| held >> n & 1 == 1)
                    .map(|n| NodePrefix { node: n as NodeId, matched: 0, host: 0 })
                    .collect();
            }
            if held == 0 {
                break;
            }
            for p in out.iter_mut().filter(|p| held >> p.node & 1 == 1) {
                p.matched += 1;
                p.host += (h.host >> p.node & 1) as u32;
            }
            alive = held;
        }
        out
    }

    /// Whether `node` holds the block (any tier), and in which.
    pub fn tier_of(&self, node: NodeId, namespace: &[u8; 16], hash: &BlockHash) -> Option<TierKind> {
        let ns = *self.namespaces.get(namespace)?;
        let h = self.blocks.get(&(ns, *hash))?;
        match (h.host >> node & 1, h.disk >> node & 1) {
            (1, _) => Some(TierKind::Host),
            (_, 1) => Some(TierKind::Disk),
            _ => None,
        }
    }

    /// Distinct blocks indexed.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// True when nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }

    /// Stores not indexed because the index was full.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Approximate heap bytes of the index.
    pub fn heap_bytes(&self) -> usize {
        let entry = std::mem::size_of::<((u16, BlockHash), Holders)>() + 1;
        self.blocks.capacity() * entry + self.namespaces.capacity() * 19
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS: [u8; 16] = [7; 16];

    fn h(i: u64) -> BlockHash {
        BlockHash::from_u64(i)
    }

    #[test]
    fn prefixes_stop_at_each_nodes_first_gap() {
        let mut idx = GlobalIndex::new(100);
        for i in 0..4 {
            idx.set(0, &NS, h(i), Some(TierKind::Host));
        }
        for i in 0..2 {
            idx.set(2, &NS, h(i), Some(TierKind::Disk));
        }
        idx.set(2, &NS, h(3), Some(TierKind::Host)); // not a prefix: block 2 missing
        idx.set(5, &NS, h(1), Some(TierKind::Host)); // no first block
        let hashes: Vec<_> = (0..5).map(h).collect();
        let p = idx.prefixes(&NS, &hashes);
        assert_eq!(p, vec![NodePrefix { node: 0, matched: 4, host: 4 }, NodePrefix { node: 2, matched: 2, host: 0 }]);
        assert!(idx.prefixes(&[1; 16], &hashes).is_empty(), "unknown namespace");
    }

    #[test]
    fn tier_moves_removal_and_node_clearing() {
        let mut idx = GlobalIndex::new(100);
        idx.set(1, &NS, h(1), Some(TierKind::Host));
        idx.set(1, &NS, h(1), Some(TierKind::Disk));
        assert_eq!(idx.tier_of(1, &NS, &h(1)), Some(TierKind::Disk));
        idx.set(3, &NS, h(1), Some(TierKind::Host));
        idx.set(1, &NS, h(1), None);
        assert_eq!((idx.tier_of(1, &NS, &h(1)), idx.tier_of(3, &NS, &h(1))), (None, Some(TierKind::Host)));
        idx.clear_node(3);
        assert!(idx.is_empty());
        idx.set(127, &NS, h(2), Some(TierKind::Host));
        assert_eq!(idx.tier_of(127, &NS, &h(2)), Some(TierKind::Host));
    }

    #[test]
    fn memory_is_bounded_by_max_blocks() {
        let mut idx = GlobalIndex::new(3);
        for i in 0..10 {
            idx.set(0, &NS, h(i), Some(TierKind::Host));
        }
        assert_eq!((idx.len(), idx.dropped()), (3, 7));
        idx.set(1, &NS, h(0), Some(TierKind::Host)); // a known block takes another holder
        assert_eq!(idx.prefixes(&NS, &[h(0)]).len(), 2);
    }
}
