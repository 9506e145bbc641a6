//! Prefix-aware frequency eviction with aging (GDSF-style, every block of equal cost).
//!
//! Each block's value is `clock + uses`, where `clock` rises to the value of every evicted block,
//! so blocks that stopped being used age out however popular they once were. Every use of a
//! prefix passes through all its blocks, so a shared system-prompt block gathers more uses than
//! the one-off tails that extend it and outlives them. Among blocks of equal value the deepest goes
//! first: a tail is evicted before the prefix it extends, never the other way round (a block is
//! useless once its parent is gone).

use super::heap::{pop_accepted, IndexedHeap};
use super::{ensure_len, Access, Eviction};
use crate::block::Handle;

/// Value of a block in the heap: smallest is evicted first.
/// `(value, u32::MAX - depth)` so that deeper blocks lose ties.
type Key = (u64, u32);

/// Frequency- and prefix-aware eviction.
///
/// ```
/// use kvtier_daemon::block::Handle;
/// use kvtier_daemon::policy::{Access, Eviction, PrefixLfu};
/// let mut p = PrefixLfu::default();
/// p.insert(Handle(0), &Access::default());
/// p.insert(Handle(1), &Access { parent: Some(Handle(0)), ..Default::default() });
/// // The tail goes before its prefix although both were used equally.
/// assert_eq!(p.evict(&mut |_| true), Some(Handle(1)));
/// ```
#[derive(Default)]
pub struct PrefixLfu {
    heap: IndexedHeap<Key>,
    /// Per handle: (uses, depth in its prompt).
    meta: Vec<(u32, u32)>,
    /// Value of the last evicted block.
    clock: u64,
}

impl PrefixLfu {
    fn key(&self, h: Handle) -> Key {
        let (uses, depth) = self.meta[h.idx()];
        (self.clock + uses as u64, u32::MAX - depth)
    }
}

impl Eviction for PrefixLfu {
    fn name(&self) -> &'static str {
        "prefix-lfu"
    }

    fn insert(&mut self, h: Handle, access: &Access) {
        ensure_len(&mut self.meta, h, (0, 0));
        let depth = access
            .parent
            .filter(|p| self.heap.contains(*p))
            .map_or(0, |p| self.meta[p.idx()].1.saturating_add(1));
        self.meta[h.idx()] = (1, depth);
        self.heap.push(h, self.key(h));
    }

    fn touch(&mut self, h: Handle, _: &Access) {
        let m = &mut self.meta[h.idx()];
        m.0 = m.0.saturating_add(1);
        self.heap.update(h, self.key(h));
    }

    fn remove(&mut self, h: Handle) {
        self.heap.remove(h);
    }

    fn evict(&mut self, evictable: &mut dyn FnMut(Handle) -> bool) -> Option<Handle> {
        let (victim, (value, _)) = pop_accepted(&mut self.heap, evictable)?;
        // Blocks not used since keep their old, lower value; the clock never goes backwards.
        self.clock = self.clock.max(value);
        Some(victim)
    }

    fn len(&self) -> usize {
        self.heap.len()
    }

    fn heap_bytes(&self) -> usize {
        self.heap.heap_bytes() + self.meta.capacity() * 8
    }
}
