//! One tier's bookkeeping: its slot allocator and one eviction policy per namespace.

use crate::alloc::SlabAllocator;
use crate::block::NsIdx;
use crate::policy::{Eviction, PolicyKind};

/// Which tier an operation is about.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum TierSel {
    /// The pinned host pool.
    Host,
    /// The spill files.
    Disk,
}

/// Slots and eviction order of one tier.
pub(super) struct Tier {
    /// Slots of this tier.
    pub alloc: SlabAllocator,
    /// One policy per namespace (a victim must free a slot of the right stride), indexed by `NsIdx`.
    pub policies: Vec<Box<dyn Eviction>>,
    kind: PolicyKind,
}

impl Tier {
    /// A tier over `alloc` evicting with `kind`.
    pub fn new(alloc: SlabAllocator, kind: PolicyKind) -> Self {
        Self { alloc, policies: Vec::new(), kind }
    }

    /// Adds the policy of a newly registered namespace.
    pub fn add_namespace(&mut self) {
        self.policies.push(self.kind.build());
    }

    /// A fresh policy for a reclaimed namespace index (holding no block).
    pub fn reset_namespace(&mut self, ns: NsIdx) {
        debug_assert!(self.policies[ns.0 as usize].is_empty(), "a reclaimed namespace holds blocks");
        self.policies[ns.0 as usize] = self.kind.build();
    }

    /// The policy of `ns`.
    pub fn policy(&mut self, ns: NsIdx) -> &mut dyn Eviction {
        self.policies[ns.0 as usize].as_mut()
    }

    /// Slabs each namespace with data (plus `ns`) may claim before others must give way.
    pub fn fair_share(&self, ns: NsIdx) -> usize {
        let active = self.alloc.owners() + usize::from(self.alloc.slabs_of(ns) == 0);
        self.alloc.slab_count() / active.max(1)
    }

    /// Whether `ns` owns fewer slabs than its fair share.
    pub fn below_share(&self, ns: NsIdx) -> bool {
        self.alloc.slabs_of(ns) < self.fair_share(ns)
    }

    /// A slab of the namespace owning the most slabs other than `ns` (only above its fair share
    /// if `only_above_share`) whose every slot's tag passes `evictable`: its owner and tags.
    pub fn reclaimable_slab(
        &self,
        ns: NsIdx,
        only_above_share: bool,
        evictable: impl Fn(u32) -> bool,
    ) -> Option<(NsIdx, Vec<u32>)> {
        let (owner, count) = self.alloc.largest_owner_except(ns)?;
        if only_above_share && count <= self.fair_share(owner) {
            return None;
        }
        let slab = self.alloc.slabs_owned_by(owner).find(|&s| self.alloc.tags_in(s).all(&evictable))?;
        Some((owner, self.alloc.tags_in(slab).collect()))
    }
}
