//! Slot allocator of the host pool: fixed-size slots carved out of slabs, one namespace per slab.
//!
//! Pure bookkeeping: it knows sizes and offsets, never keys or bytes. A slab belongs to one
//! namespace at a time and is cut into slots of that namespace's stride; a slab whose slots are
//! all free goes back to the shared free list so other namespaces can take it.

use crate::block::{NsIdx, SlotId};

/// Alignment of every slot (and so of every block in the pool): O_DIRECT-friendly.
pub const SLOT_ALIGN: u64 = 4096;

/// Slot stride for a block size: the size rounded up to [`SLOT_ALIGN`]; `None` where that
/// does not fit in a `u64` (a client's block size is never trusted to be sane).
pub fn slot_stride(block_bytes: u64) -> Option<u64> {
    block_bytes.checked_next_multiple_of(SLOT_ALIGN)
}

const NO_TAG: u32 = u32::MAX;

struct Slab {
    owner: Option<NsIdx>,
    stride: u64,
    capacity: u32,
    /// Slots never handed out yet are `next_fresh..capacity`; freed ones are in `free`.
    next_fresh: u32,
    free: Vec<u32>,
    /// Caller's tag per slot (the index handle), NO_TAG when free.
    tags: Vec<u32>,
    used: u32,
    in_partial: bool,
}

impl Slab {
    fn has_free(&self) -> bool {
        self.used < self.capacity
    }
}

/// Hands out slots of per-namespace strides from a fixed set of equal slabs.
///
/// ```
/// use kvtier_core::alloc::SlabAllocator;
/// use kvtier_core::block::NsIdx;
/// let mut a = SlabAllocator::new(2, 1 << 20, 2);
/// let s = a.alloc(NsIdx(0), 4096, 7).unwrap();
/// assert_eq!(a.location(s), (0, 0));
/// assert_eq!(a.tag(s), Some(7));
/// a.free(s);
/// assert_eq!(a.used_bytes(), 0);
/// ```
pub struct SlabAllocator {
    slab_bytes: u64,
    slabs_per_segment: u32,
    slabs: Vec<Slab>,
    free_slabs: Vec<u32>,
    /// Slabs per namespace that may have free slots (checked lazily).
    partial: Vec<Vec<u32>>,
    /// Slabs owned per namespace.
    owned: Vec<usize>,
    /// Sum of stride times used slots over all slabs.
    used_bytes: u64,
}

impl SlabAllocator {
    /// `slab_count` slabs of `slab_bytes`, `slabs_per_segment` of them in each pool segment.
    pub fn new(slab_count: u32, slab_bytes: u64, slabs_per_segment: u32) -> Self {
        let slabs = (0..slab_count)
            .map(|_| Slab {
                owner: None,
                stride: 0,
                capacity: 0,
                next_fresh: 0,
                free: Vec::new(),
                tags: Vec::new(),
                used: 0,
                in_partial: false,
            })
            .collect();
        Self {
            slab_bytes,
            slabs_per_segment: slabs_per_segment.max(1),
            slabs,
            free_slabs: Self::striped(slab_count, slabs_per_segment.max(1)),
            partial: Vec::new(),
            owned: Vec::new(),
            used_bytes: 0,
        }
    }

    /// Free-list order (popped from the back) that takes slabs round-robin across segments, so
    /// that consecutive slabs (of the disk tier: consecutive writes) land on different devices.
    fn striped(slab_count: u32, per_segment: u32) -> Vec<u32> {
        let mut order: Vec<u32> = (0..slab_count).collect();
        order.sort_by_key(|&s| std::cmp::Reverse((s % per_segment, s / per_segment)));
        order
    }

    /// Bytes of one slab: the largest block the pool can hold.
    pub fn slab_bytes(&self) -> u64 {
        self.slab_bytes
    }

    /// Total bytes of all slabs (the pool budget).
    pub fn capacity_bytes(&self) -> u64 {
        self.slab_bytes * self.slabs.len() as u64
    }

    /// Bytes of slots in use (stride times used slots). O(1): the planner asks often.
    pub fn used_bytes(&self) -> u64 {
        self.used_bytes
    }

    /// Number of slabs owned by `ns`.
    pub fn slabs_of(&self, ns: NsIdx) -> usize {
        self.owned.get(ns.0 as usize).copied().unwrap_or(0)
    }

    /// Number of namespaces owning at least one slab.
    pub fn owners(&self) -> usize {
        self.owned.iter().filter(|&&n| n > 0).count()
    }

    /// Number of unowned slabs.
    pub fn free_slab_count(&self) -> usize {
        self.free_slabs.len()
    }

    /// Total number of slabs.
    pub fn slab_count(&self) -> usize {
        self.slabs.len()
    }

    /// Takes a slot of `stride` bytes for `ns`, tagged with `tag`; `None` when neither a slab of
    /// `ns` nor a free slab has room. The caller guarantees `ns` always asks with the same stride.
    pub fn alloc(&mut self, ns: NsIdx, stride: u64, tag: u32) -> Option<SlotId> {
        assert!(stride > 0 && stride <= self.slab_bytes, "stride {stride} does not fit a slab");
        self.ensure_namespace(ns);
        let i = ns.0 as usize;
        while let Some(&slab) = self.partial[i].last() {
            if self.slabs[slab as usize].has_free() {
                return Some(self.take_from(slab, tag));
            }
            self.slabs[slab as usize].in_partial = false;
            self.partial[i].pop();
        }
        let slab = self.free_slabs.pop()?;
        self.own(slab, ns, stride);
        Some(self.take_from(slab, tag))
    }

    fn ensure_namespace(&mut self, ns: NsIdx) {
        let i = ns.0 as usize;
        if self.partial.len() <= i {
            self.partial.resize_with(i + 1, Vec::new);
            self.owned.resize(i + 1, 0);
        }
    }

    /// Gives free slab `slab` (already off the free list) to `ns`, cut into `stride` slots.
    fn own(&mut self, slab: u32, ns: NsIdx, stride: u64) {
        self.owned[ns.0 as usize] += 1;
        let s = &mut self.slabs[slab as usize];
        s.owner = Some(ns);
        s.stride = stride;
        s.capacity = (self.slab_bytes / stride) as u32;
        s.next_fresh = 0;
        s.free.clear();
        s.tags = vec![NO_TAG; s.capacity as usize];
        s.used = 0;
        s.in_partial = true;
        self.partial[ns.0 as usize].push(slab);
    }

    /// Marks one given slot used, as when rebuilding from a persistent index. `false` if the slot
    /// is out of range, already used, or in a slab of another namespace or stride. Claims in
    /// ascending slot order within a slab cost O(1) each.
    pub fn claim(&mut self, id: SlotId, ns: NsIdx, stride: u64, tag: u32) -> bool {
        if id.slab as usize >= self.slabs.len() || stride == 0 || id.slot as u64 >= self.slab_bytes / stride {
            return false;
        }
        self.ensure_namespace(ns);
        match self.slabs[id.slab as usize].owner {
            None => {
                let Some(p) = self.free_slabs.iter().position(|&x| x == id.slab) else { return false };
                self.free_slabs.remove(p);
                self.own(id.slab, ns, stride);
            }
            Some(o) if o != ns || self.slabs[id.slab as usize].stride != stride => return false,
            Some(_) => {}
        }
        let s = &mut self.slabs[id.slab as usize];
        if id.slot >= s.next_fresh {
            s.free.extend(s.next_fresh..id.slot);
            s.next_fresh = id.slot + 1;
        } else if let Some(p) = s.free.iter().position(|&x| x == id.slot) {
            s.free.swap_remove(p);
        } else {
            return false;
        }
        s.tags[id.slot as usize] = tag;
        s.used += 1;
        self.used_bytes += s.stride;
        true
    }

    fn take_from(&mut self, slab: u32, tag: u32) -> SlotId {
        let s = &mut self.slabs[slab as usize];
        let slot = match s.free.pop() {
            Some(slot) => slot,
            None => {
                s.next_fresh += 1;
                s.next_fresh - 1
            }
        };
        s.tags[slot as usize] = tag;
        s.used += 1;
        self.used_bytes += s.stride;
        SlotId { slab, slot }
    }

    /// Returns a slot. A slab left empty goes back to the shared free list.
    pub fn free(&mut self, id: SlotId) {
        let s = &mut self.slabs[id.slab as usize];
        debug_assert_ne!(s.tags[id.slot as usize], NO_TAG, "double free of {id:?}");
        s.tags[id.slot as usize] = NO_TAG;
        s.free.push(id.slot);
        s.used -= 1;
        self.used_bytes -= s.stride;
        let owner = s.owner.expect("owned slab");
        if s.used == 0 {
            self.owned[owner.0 as usize] -= 1;
            s.owner = None;
            s.tags = Vec::new();
            s.free = Vec::new();
            let was_partial = std::mem::replace(&mut s.in_partial, false);
            if was_partial {
                self.partial[owner.0 as usize].retain(|&x| x != id.slab);
            }
            self.free_slabs.push(id.slab);
        } else if !s.in_partial {
            s.in_partial = true;
            self.partial[owner.0 as usize].push(id.slab);
        }
    }

    /// The tag of a used slot.
    pub fn tag(&self, id: SlotId) -> Option<u32> {
        let t = *self.slabs[id.slab as usize].tags.get(id.slot as usize)?;
        (t != NO_TAG).then_some(t)
    }

    /// Tags of every used slot of `slab`.
    pub fn tags_in(&self, slab: u32) -> impl Iterator<Item = u32> + '_ {
        self.slabs[slab as usize].tags.iter().copied().filter(|&t| t != NO_TAG)
    }

    /// Slabs owned by `ns`.
    pub fn slabs_owned_by(&self, ns: NsIdx) -> impl Iterator<Item = u32> + '_ {
        (0..self.slabs.len() as u32).filter(move |&i| self.slabs[i as usize].owner == Some(ns))
    }

    /// The namespace owning the most slabs other than `except`, with its slab count.
    pub fn largest_owner_except(&self, except: NsIdx) -> Option<(NsIdx, usize)> {
        self.owned
            .iter()
            .enumerate()
            .filter(|&(i, &n)| i != except.0 as usize && n > 0)
            .max_by_key(|&(_, &n)| n)
            .map(|(i, &n)| (NsIdx(i as u16), n))
    }

    /// (segment, byte offset) of a slot in the pool mapping.
    pub fn location(&self, id: SlotId) -> (u32, u64) {
        let s = &self.slabs[id.slab as usize];
        let segment = id.slab / self.slabs_per_segment;
        let slab_in_segment = (id.slab % self.slabs_per_segment) as u64;
        (segment, slab_in_segment * self.slab_bytes + id.slot as u64 * s.stride)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stride_rounds_to_alignment() {
        assert_eq!(slot_stride(1), Some(4096));
        assert_eq!(slot_stride(4096), Some(4096));
        assert_eq!(slot_stride(4097), Some(8192));
        assert_eq!(slot_stride(u64::MAX), None, "overflow is refused, not wrapped to 0");
        assert_eq!(slot_stride(u64::MAX - 4094), None);
        assert_eq!(slot_stride(u64::MAX - 4095), Some(u64::MAX - 4095), "already aligned");
    }

    #[test]
    fn fills_exactly_the_budget_then_refuses() {
        let mut a = SlabAllocator::new(4, 64 * 1024, 2);
        let slots: Vec<_> = (0..64).map(|i| a.alloc(NsIdx(0), 4096, i).unwrap()).collect();
        assert!(a.alloc(NsIdx(0), 4096, 99).is_none());
        assert_eq!(a.used_bytes(), a.capacity_bytes());
        let mut locs: Vec<_> = slots.iter().map(|s| a.location(*s)).collect();
        locs.sort();
        locs.dedup();
        assert_eq!(locs.len(), 64, "every slot at its own place");
        assert!(locs.iter().all(|&(seg, off)| seg < 2 && off + 4096 <= 2 * 64 * 1024));
    }

    #[test]
    fn namespaces_never_share_a_slab() {
        let mut a = SlabAllocator::new(2, 64 * 1024, 2);
        let x = a.alloc(NsIdx(0), 4096, 0).unwrap();
        let y = a.alloc(NsIdx(1), 8192, 1).unwrap();
        assert_ne!(x.slab, y.slab);
        assert!(a.alloc(NsIdx(2), 4096, 2).is_none());
    }

    #[test]
    fn empty_slab_returns_to_free_list() {
        let mut a = SlabAllocator::new(1, 64 * 1024, 1);
        let x = a.alloc(NsIdx(0), 4096, 0).unwrap();
        assert!(a.alloc(NsIdx(1), 4096, 1).is_none());
        a.free(x);
        assert_eq!(a.free_slab_count(), 1);
        let y = a.alloc(NsIdx(1), 16384, 1).unwrap();
        assert_eq!(a.location(y), (0, 0));
        assert_eq!(a.largest_owner_except(NsIdx(0)), Some((NsIdx(1), 1)));
    }

    #[test]
    fn claims_rebuild_the_same_state() {
        let mut a = SlabAllocator::new(3, 4 * 4096, 3);
        assert!(a.claim(SlotId { slab: 1, slot: 2 }, NsIdx(0), 4096, 5));
        assert!(!a.claim(SlotId { slab: 1, slot: 2 }, NsIdx(0), 4096, 6), "already used");
        assert!(!a.claim(SlotId { slab: 1, slot: 3 }, NsIdx(1), 4096, 6), "another namespace's slab");
        assert!(!a.claim(SlotId { slab: 2, slot: 4 }, NsIdx(0), 4096, 6), "past the slab's end");
        assert!(a.claim(SlotId { slab: 1, slot: 0 }, NsIdx(0), 4096, 7), "a gap below is still free");
        assert_eq!((a.tag(SlotId { slab: 1, slot: 2 }), a.used_bytes()), (Some(5), 2 * 4096));
        // The two gaps-and-tail slots come out of alloc, then the other slabs.
        let mut got: Vec<_> = (0..2).map(|i| a.alloc(NsIdx(0), 4096, 10 + i).unwrap()).collect();
        got.sort_by_key(|s| s.slot);
        assert_eq!(got, vec![SlotId { slab: 1, slot: 1 }, SlotId { slab: 1, slot: 3 }]);
        assert_eq!(a.free_slab_count(), 2);
        assert_ne!(a.alloc(NsIdx(0), 4096, 20).unwrap().slab, 1);
    }

    #[test]
    fn fresh_slabs_alternate_between_segments() {
        let mut a = SlabAllocator::new(6, 4096, 3);
        let segs: Vec<u32> = (0..6)
            .map(|i| {
                let slot = a.alloc(NsIdx(0), 4096, i).unwrap();
                a.location(slot).0
            })
            .collect();
        assert_eq!(segs, vec![0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn freed_slots_are_reused() {
        let mut a = SlabAllocator::new(1, 16 * 1024, 1);
        let s: Vec<_> = (0..4).map(|i| a.alloc(NsIdx(0), 4096, i).unwrap()).collect();
        a.free(s[1]);
        assert_eq!(a.alloc(NsIdx(0), 4096, 9), Some(s[1]));
        assert_eq!(a.tag(s[1]), Some(9));
        assert_eq!(a.tags_in(0).count(), 4);
    }
}
