//! Prefix-aware, frequency-aware eviction: only leaves of the prefix tree are candidates, and the
//! victim is the leaf with the lowest use rate `uses^FREQ_EXPONENT / age`.
//!
//! A block is useless once its parent is gone, so a block is never evicted while a block that
//! extends it is held: the tail of a prompt goes first, and a shared system-prompt block, which
//! many prompts extend, stays while any of them does. Among leaves, a block used often is worth
//! keeping longer than one used once (hyperbolic caching): on the Mooncake trace 42 % of new
//! blocks are used again, while 84 % of blocks used twice are used a third time, and sooner.
//! Leaves are kept in one recency-ordered heap per frequency class (uses 1, 2-3, 4-7, ...), so an
//! eviction compares only the oldest leaf of each class.

use super::heap::IndexedHeap;
use super::{ensure_len, Access, Eviction};
use crate::block::Handle;

const NONE: u32 = u32::MAX;
/// Frequency classes: uses 1, 2-3, 4-7, 8-15, 16+.
const CLASSES: usize = 5;

/// Default weight of frequency against recency: a leaf used `2^k` times is treated as if it were
/// `2^(k * FREQ_EXPONENT)` times younger. Chosen on the Mooncake trace (0 is leaf-first LRU; see
/// docs/simulation.md for the sweep).
pub const FREQ_EXPONENT: f64 = 0.15;

#[derive(Clone, Copy)]
struct Meta {
    /// Parent handle and the parent's generation when linked (NONE if no parent).
    parent: u32,
    parent_gen: u32,
    /// Children currently tracked.
    children: u32,
    uses: u32,
    last_use: u64,
    /// Bumped each time the handle stops being tracked, so stale child links are ignored.
    gen: u32,
    tracked: bool,
}

impl Meta {
    fn class(&self) -> usize {
        ((31 - self.uses.max(1).leading_zeros()) as usize).min(CLASSES - 1)
    }
}

const EMPTY: Meta = Meta { parent: NONE, parent_gen: 0, children: 0, uses: 0, last_use: 0, gen: 0, tracked: false };

/// Frequency- and prefix-aware eviction (leaf-first, hyperbolic over frequency classes).
///
/// ```
/// use kvtier_core::block::Handle;
/// use kvtier_core::policy::{Access, Eviction, PrefixLfu};
/// let mut p = PrefixLfu::default();
/// p.insert(Handle(0), &Access::default());
/// p.insert(Handle(1), &Access { parent: Some(Handle(0)), ..Default::default() });
/// p.insert(Handle(2), &Access::default());
/// p.touch(Handle(2), &Access::default());
/// // The tail goes before its prefix although the prefix is older, and the block used twice
/// // outlives both although it is older than the tail.
/// assert_eq!(p.evict(&mut |_| true), Some(Handle(1)));
/// assert_eq!(p.evict(&mut |_| true), Some(Handle(0)));
/// ```
pub struct PrefixLfu {
    /// Leaves only, keyed by last use, one heap per frequency class.
    leaves: [IndexedHeap<u64>; CLASSES],
    meta: Vec<Meta>,
    clock: u64,
    tracked: usize,
    /// Age divisor per frequency class: `(2^class)^exponent`.
    class_rate: [f64; CLASSES],
}

impl Default for PrefixLfu {
    fn default() -> Self {
        Self::with_freq_exponent(FREQ_EXPONENT)
    }
}

impl PrefixLfu {
    /// A policy weighing frequency with `exponent` (0: leaf-first LRU; larger: more LFU-like).
    pub fn with_freq_exponent(exponent: f64) -> Self {
        Self {
            leaves: Default::default(),
            meta: Vec::new(),
            clock: 0,
            tracked: 0,
            class_rate: std::array::from_fn(|c| ((1u64 << c) as f64).powf(exponent)),
        }
    }

    fn live_parent(&self, h: Handle) -> Option<Handle> {
        let m = &self.meta[h.idx()];
        let p = self.meta.get(m.parent as usize)?;
        (p.tracked && p.gen == m.parent_gen).then_some(Handle(m.parent))
    }

    fn push_leaf(&mut self, h: Handle) {
        let m = self.meta[h.idx()];
        self.leaves[m.class()].push(h, m.last_use);
    }

    fn remove_leaf(&mut self, h: Handle) {
        let c = self.meta[h.idx()].class();
        if self.leaves[c].contains(h) {
            self.leaves[c].remove(h);
        }
    }

    /// Stops tracking `h` and lets its parent become a leaf.
    fn untrack(&mut self, h: Handle) {
        self.remove_leaf(h);
        if let Some(p) = self.live_parent(h) {
            let pm = &mut self.meta[p.idx()];
            pm.children -= 1;
            if pm.children == 0 {
                self.push_leaf(p);
            }
        }
        let m = &mut self.meta[h.idx()];
        m.tracked = false;
        m.gen = m.gen.wrapping_add(1);
        self.tracked -= 1;
    }

    /// How much a leaf deserves eviction: its age over its use rate.
    fn badness(&self, h: Handle) -> f64 {
        let m = &self.meta[h.idx()];
        (self.clock + 1 - m.last_use) as f64 / self.class_rate[m.class()]
    }
}

impl Eviction for PrefixLfu {
    fn name(&self) -> &'static str {
        "prefix-lfu"
    }

    fn insert(&mut self, h: Handle, access: &Access) {
        ensure_len(&mut self.meta, h, EMPTY);
        self.clock += 1;
        let gen = self.meta[h.idx()].gen;
        self.meta[h.idx()] = Meta { uses: 1, last_use: self.clock, gen, tracked: true, ..EMPTY };
        if let Some(p) = access.parent.filter(|p| self.meta.get(p.idx()).is_some_and(|m| m.tracked)) {
            self.meta[h.idx()].parent = p.0;
            self.meta[h.idx()].parent_gen = self.meta[p.idx()].gen;
            if self.meta[p.idx()].children == 0 {
                self.remove_leaf(p);
            }
            self.meta[p.idx()].children += 1;
        }
        self.tracked += 1;
        self.push_leaf(h);
    }

    fn touch(&mut self, h: Handle, _: &Access) {
        self.clock += 1;
        let was_leaf = self.meta[h.idx()].children == 0;
        if was_leaf {
            self.remove_leaf(h);
        }
        let m = &mut self.meta[h.idx()];
        m.uses = m.uses.saturating_add(1);
        m.last_use = self.clock;
        if was_leaf {
            self.push_leaf(h);
        }
    }

    fn remove(&mut self, h: Handle) {
        self.untrack(h);
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(Handle) -> bool) -> Option<Handle> {
        // The oldest evictable leaf of each class; the worst of them goes. Heads are usually
        // evictable, so they are only peeked; heads refused by `evictable` are skipped over.
        let mut worst: Option<(f64, usize, Handle)> = None;
        let mut skipped: Vec<(usize, Handle, u64)> = Vec::new();
        for c in 0..CLASSES {
            let head = loop {
                match self.leaves[c].peek() {
                    Some((h, _)) if evictable(h) => break Some(h),
                    Some((h, k)) => {
                        self.leaves[c].remove(h);
                        skipped.push((c, h, k));
                    }
                    None => break None,
                }
            };
            if let Some(h) = head {
                let b = self.badness(h);
                if worst.is_none_or(|(wb, _, _)| b > wb) {
                    worst = Some((b, c, h));
                }
            }
        }
        for (c, h, k) in skipped {
            self.leaves[c].push(h, k);
        }
        let (_, _, victim) = worst?;
        self.untrack(victim);
        Some(victim)
    }

    fn len(&self) -> usize {
        self.tracked
    }

    fn heap_bytes(&self) -> usize {
        self.leaves.iter().map(|l| l.heap_bytes()).sum::<usize>() + self.meta.capacity() * std::mem::size_of::<Meta>()
    }
}
