//! Disk-tier planning: demotion under host pressure, promotion on demand, disk eviction, recovery
//! from the persistent index, and giving up on a failed disk.
//!
//! Pure logic like the rest of the cache: the disk mechanism (`crate::disk_io`) executes the planned
//! [`Demotion`]s and [`Promotion`]s and reports each outcome back; [`DiskChange`]s tell it what to
//! persist, in order.

use super::{BlockCache, TierKind, TierSel};
use crate::alloc::SlabAllocator;
use crate::block::{BlockHash, BlockKey, Handle, NsIdx, SlotId};
use crate::events::EventKind;
use crate::index::{flags, EntryState};
use crate::namespace::NamespaceId;
use crate::policy::{Admission, AdmissionKind, PolicyKind};
use std::collections::VecDeque;

use super::tier::Tier;

/// How a disk tier is laid out and run.
pub struct DiskSetup {
    /// Slots of all spill files: one allocator segment per file.
    pub alloc: SlabAllocator,
    /// Bytes of the self-describing header in front of every block, on disk and in the pool.
    pub header_bytes: u64,
    /// Which blocks leaving the host tier are written.
    pub admission: AdmissionKind,
    /// Host bytes kept free or cold (ready to drop) by demoting early, as a fraction of the pool.
    pub reserve_fraction: f64,
}

/// Counters and gauges of the disk tier.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DiskStats {
    /// Whether the disk tier is in use (false after a disk failure).
    pub enabled: bool,
    /// Bytes of all spill slots.
    pub capacity_bytes: u64,
    /// Bytes of used spill slots.
    pub used_bytes: u64,
    /// Blocks with a disk copy.
    pub blocks: u64,
    /// Blocks written to disk.
    pub demoted_blocks: u64,
    /// Bytes written to disk (headers included).
    pub written_bytes: u64,
    /// Blocks read back into the pool and verified.
    pub promoted_blocks: u64,
    /// Bytes read from disk by promotions.
    pub read_bytes: u64,
    /// Blocks that left the host tier without a disk write because admission said no.
    pub not_admitted_blocks: u64,
    /// Disk copies dropped to make room.
    pub evicted_blocks: u64,
    /// Promotions that found a torn, corrupt or stale slot (the block was dropped).
    pub corrupt_blocks: u64,
    /// Promotions that failed with an I/O error.
    pub failed_promotions: u64,
    /// Blocks recovered from the persistent index at start.
    pub restored_blocks: u64,
    /// Host bytes in the cold queue (on their way out of the pool).
    pub cold_bytes: u64,
}

/// What the persistent index must learn, in the order it happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskChange {
    /// A block was written to `slot` and verified by its writer.
    Stored {
        /// The block.
        key: BlockKey,
        /// Its disk slot.
        slot: SlotId,
        /// Generation written in the slot header.
        generation: u64,
        /// Checksum of the block's bytes.
        checksum: u64,
    },
    /// The disk copy of `key` in `slot` is gone (the slot may be reused).
    Removed {
        /// The block.
        key: BlockKey,
        /// The freed slot.
        slot: SlotId,
    },
}

/// One block to copy from its host slot to its disk slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Demotion {
    /// The block's entry.
    pub handle: Handle,
    /// The block.
    pub key: BlockKey,
    /// Source host slot (header included).
    pub host: SlotId,
    /// Destination disk slot.
    pub disk: SlotId,
    /// Generation to write in the header.
    pub generation: u64,
    /// Write-back of a block that stays in the host policy (it stays hot; only made durable),
    /// as opposed to a demotion of a block on its way out of the pool.
    pub keep_hot: bool,
}

/// One block to copy from its disk slot into a fresh host slot, then verify.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Promotion {
    /// The block's entry.
    pub handle: Handle,
    /// The block.
    pub key: BlockKey,
    /// Destination host slot (header included).
    pub host: SlotId,
    /// Source disk slot.
    pub disk: SlotId,
}

/// How a promotion ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PromotionOutcome {
    /// Read and verified: the block is servable from the pool.
    Verified,
    /// The slot did not hold the block's bytes (torn, corrupt or stale): dropped.
    Corrupt,
    /// The read failed: dropped.
    IoError,
}

/// Promotions needed before a prefix can be acquired.
#[derive(Debug, Default)]
pub struct PromotionPlan {
    /// Promotions started by this call; the caller executes them.
    pub started: Vec<Promotion>,
    /// Blocks of the prefix being promoted (by this call or an earlier one).
    pub pending: usize,
}

/// Why a block from the persistent index was not restored.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The namespace could not be registered (block size too large for this pool, table full).
    #[error("namespace: {0}")]
    Namespace(String),
    /// The same block is already restored (the older entry points at a reused slot).
    #[error("block already restored")]
    Duplicate,
    /// The slot is outside the spill files or taken by another block.
    #[error("slot outside the spill file or already in use")]
    SlotTaken,
    /// The cache has no disk tier.
    #[error("no disk tier")]
    NoDisk,
}

/// State of the disk tier inside the cache.
pub(super) struct DiskState {
    pub tier: Tier,
    pub admission: Admission,
    /// Per namespace: host copies out of the host policy, oldest first (lazily cleaned).
    cold: Vec<VecDeque<Handle>>,
    /// Admitted blocks with no disk copy yet, oldest first (lazily cleaned): written back when
    /// the disk has nothing more urgent to do, so that they survive a restart.
    writeback: VecDeque<Handle>,
    inflight_bytes: u64,
    inflight_writes: usize,
    reserve_bytes: u64,
    /// Length past which a lazily cleaned queue is compacted (about the pool's block count).
    queue_cap: usize,
    changes: Vec<DiskChange>,
    pub stats: DiskStats,
    next_generation: u64,
}

impl DiskState {
    pub fn new(setup: DiskSetup, policy: PolicyKind, pool_bytes: u64) -> Self {
        let slots = setup.alloc.capacity_bytes() / setup.header_bytes.max(4096);
        Self {
            admission: Admission::new(setup.admission, slots.min(1 << 22) as usize),
            tier: Tier::new(setup.alloc, policy),
            cold: Vec::new(),
            writeback: VecDeque::new(),
            inflight_bytes: 0,
            inflight_writes: 0,
            reserve_bytes: (pool_bytes as f64 * setup.reserve_fraction.clamp(0.0, 1.0)) as u64,
            queue_cap: (pool_bytes / 16384).max(1024) as usize,
            changes: Vec::new(),
            stats: DiskStats { enabled: true, ..Default::default() },
            next_generation: 1,
        }
    }

    pub fn add_namespace(&mut self) {
        self.tier.add_namespace();
        self.cold.push(VecDeque::new());
    }

    /// Starts the state of a reclaimed namespace index over.
    pub fn reset_namespace(&mut self, ns: NsIdx) {
        self.tier.reset_namespace(ns);
        self.cold[ns.0 as usize].clear();
    }

    /// Frees the disk slot of `key` to make room and records the removal.
    pub fn forget(&mut self, key: BlockKey, slot: SlotId) {
        self.free_slot(key, slot);
        self.stats.evicted_blocks += 1;
    }

    /// Frees the disk slot of `key` and records the removal for the persistent index.
    pub fn free_slot(&mut self, key: BlockKey, slot: SlotId) {
        self.tier.alloc.free(slot);
        if self.stats.enabled {
            self.changes.push(DiskChange::Removed { key, slot });
        }
        self.stats.blocks -= 1;
    }

    pub fn heap_bytes(&self) -> usize {
        self.tier.policies.iter().map(|p| p.heap_bytes()).sum::<usize>()
            + self.admission.heap_bytes()
            + self.cold.iter().map(|q| q.capacity() * 4).sum::<usize>()
    }
}

/// A block's fingerprint for the admission filter's memory.
pub(super) fn fingerprint(key: &BlockKey) -> u64 {
    let mut buf = [0u8; 2 + crate::block::MAX_HASH_BYTES];
    buf[..2].copy_from_slice(&key.ns.0.to_le_bytes());
    let h = key.hash.as_bytes();
    buf[2..2 + h.len()].copy_from_slice(h);
    xxhash_rust::xxh3::xxh3_64(&buf[..2 + h.len()])
}

impl BlockCache {
    /// Whether the disk tier is configured and working.
    pub fn has_disk(&self) -> bool {
        self.disk.as_ref().is_some_and(|d| d.stats.enabled)
    }

    /// Starts generations above `base` (the mechanism persists a floor across restarts).
    pub fn set_generation_base(&mut self, base: u64) {
        if let Some(d) = &mut self.disk {
            d.next_generation = d.next_generation.max(base);
        }
    }

    /// Disk-tier counters, if there is a disk tier.
    pub fn disk_stats(&self) -> Option<DiskStats> {
        self.disk.as_ref().map(|d| DiskStats {
            capacity_bytes: d.tier.alloc.capacity_bytes(),
            used_bytes: d.tier.alloc.used_bytes(),
            ..d.stats.clone()
        })
    }

    /// Where a disk slot lives: (spill file, byte offset within its slot area).
    pub fn disk_location(&self, slot: SlotId) -> (u32, u64) {
        self.disk.as_ref().expect("disk tier").tier.alloc.location(slot)
    }

    /// Changes the persistent index has not seen yet, oldest first.
    pub fn take_disk_changes(&mut self) -> Vec<DiskChange> {
        self.disk.as_mut().map(|d| std::mem::take(&mut d.changes)).unwrap_or_default()
    }

    fn stride_of(&self, h: Handle) -> u64 {
        self.namespaces.get(self.index.get(h).key.ns).stride
    }

    fn make_cold(&mut self, h: Handle) {
        let stride = self.stride_of(h);
        let e = self.index.get_mut(h);
        e.flags |= flags::COLD;
        let ns = e.key.ns;
        let d = self.disk_mut();
        let queue = &mut d.cold[ns.0 as usize];
        queue.push_back(h);
        d.stats.cold_bytes += stride;
        if queue.len() > d.queue_cap {
            // Blocks that went cold, hot and cold again left stale entries behind: drop them.
            let mut queue = std::mem::take(&mut d.cold[ns.0 as usize]);
            let mut seen = std::collections::HashSet::new();
            let live = |h: Handle| self.index.try_get(h).is_some_and(|e| e.flags & flags::COLD != 0 && e.key.ns == ns);
            queue.retain(|&h| live(h) && seen.insert(h));
            self.disk_mut().cold[ns.0 as usize] = queue;
        }
    }

    /// Takes `h` out of the cold queue's accounting (its queue entry is skipped later).
    pub(super) fn leave_cold(&mut self, h: Handle) {
        let stride = self.stride_of(h);
        self.index.get_mut(h).flags &= !flags::COLD;
        self.disk_mut().stats.cold_bytes -= stride;
    }

    /// Drops the host copy of the oldest cold block of `ns`; false if there is none.
    pub(super) fn pop_cold(&mut self, ns: NsIdx) -> bool {
        loop {
            let Some(h) = self.disk.as_mut().and_then(|d| d.cold[ns.0 as usize].pop_front()) else {
                return false;
            };
            let live = self.index.try_get(h).is_some_and(|e| e.flags & flags::COLD != 0 && e.key.ns == ns);
            if live && self.index.get(h).pins == 0 {
                self.leave_cold(h);
                self.drop_copy(TierSel::Host, h);
                return true;
            }
            if live {
                // Pinned for a moment (a reserve of the same prompt): keep it cold for later.
                self.disk_mut().cold[ns.0 as usize].push_back(h);
                return false;
            }
        }
    }

    /// Queues `h` for write-back if admission accepts it now.
    pub(super) fn queue_writeback(&mut self, h: Handle) {
        let reused = self.index.get(h).flags & flags::REUSED != 0;
        let Some(d) = self.disk.as_mut().filter(|d| d.stats.enabled && d.admission.admit(reused)) else { return };
        d.writeback.push_back(h);
        if d.writeback.len() > d.queue_cap {
            // Compact: keep entries still waiting; if the disk cannot keep up, forget the oldest
            // (they leave the pool without a write, as an overloaded cache must).
            let mut queue = std::mem::take(&mut self.disk_mut().writeback);
            let mut seen = std::collections::HashSet::new();
            queue.retain(|&h| self.needs_writeback(h) && seen.insert(h));
            let d = self.disk_mut();
            while queue.len() > d.queue_cap / 2 {
                queue.pop_front();
            }
            d.writeback = queue;
        }
    }

    fn needs_writeback(&self, h: Handle) -> bool {
        self.index.try_get(h).is_some_and(|e| {
            e.state == EntryState::Committed
                && e.slot.is_some()
                && e.disk.is_none()
                && e.flags & (flags::COLD | flags::DEMOTING | flags::PROMOTING | flags::WRITING) == 0
                && e.pins < u16::MAX
        })
    }

    /// Disk writes queued or in flight (the write-back queue may hold stale entries).
    pub fn disk_backlog(&self) -> usize {
        self.disk.as_ref().filter(|d| d.stats.enabled).map_or(0, |d| d.writeback.len() + d.inflight_writes)
    }

    fn under_pressure(&self) -> bool {
        let d = self.disk.as_ref().expect("disk tier");
        let free = self.host.alloc.capacity_bytes() - self.host.alloc.used_bytes();
        free + d.stats.cold_bytes + d.inflight_bytes < d.reserve_bytes
    }

    /// Plans up to `max` disk writes. Under host pressure (free plus cold plus in-flight bytes
    /// below the reserve) it takes the coldest host blocks out of the host policy: admitted ones
    /// without a disk copy are demoted, the rest go straight to the cold queue. Without pressure
    /// it writes back admitted blocks that stay hot, so that they survive a restart.
    pub fn plan_demotions(&mut self, max: usize) -> Vec<Demotion> {
        let mut out = Vec::new();
        while out.len() < max && self.has_disk() && self.under_pressure() {
            let fullest = (0..self.host.policies.len())
                .filter(|&i| !self.host.policies[i].is_empty())
                .max_by_key(|&i| self.host.policies[i].len() as u64 * self.namespaces.get(NsIdx(i as u16)).stride);
            let Some(ns) = fullest.map(|i| NsIdx(i as u16)) else { break };
            let index = &self.index;
            let Some(h) = self.host.policy(ns).evict(&mut |h| index.get(h).pins == 0) else { break };
            if let Some(demotion) = self.demote_or_cool(h) {
                out.push(demotion);
            }
        }
        while out.len() < max && self.has_disk() && !self.under_pressure() {
            let Some(h) = self.disk.as_mut().and_then(|d| d.writeback.pop_front()) else { break };
            if self.needs_writeback(h) {
                out.extend(self.start_write(h, true));
            }
        }
        out
    }

    fn demote_or_cool(&mut self, h: Handle) -> Option<Demotion> {
        let e = *self.index.get(h);
        let d = self.disk_mut();
        if e.disk.is_some() || !d.admission.admit(e.flags & flags::REUSED != 0) {
            if e.disk.is_none() {
                d.stats.not_admitted_blocks += 1;
            }
            self.make_cold(h);
            return None;
        }
        let demotion = self.start_write(h, false);
        if demotion.is_none() {
            self.make_cold(h);
        }
        demotion
    }

    /// Pins `h` and gives it a disk slot; `None` if no room can be made on disk.
    fn start_write(&mut self, h: Handle, keep_hot: bool) -> Option<Demotion> {
        let e = *self.index.get(h);
        self.index.get_mut(h).pins += 1;
        let Some(slot) = self.alloc_slot(TierSel::Disk, e.key.ns, h) else {
            self.index.get_mut(h).pins -= 1;
            return None;
        };
        let stride = self.stride_of(h);
        self.index.get_mut(h).flags |= if keep_hot { flags::WRITING } else { flags::WRITING | flags::DEMOTING };
        let d = self.disk_mut();
        if !keep_hot {
            d.inflight_bytes += stride;
        }
        d.inflight_writes += 1;
        d.next_generation += 1;
        Some(Demotion { handle: h, key: e.key, host: e.slot, disk: slot, generation: d.next_generation - 1, keep_hot })
    }

    /// Records how a demotion ended: `Some(checksum)` when the block is on disk, `None` on failure.
    pub fn complete_demotion(&mut self, dm: &Demotion, checksum: Option<u64>) {
        let stride = self.stride_of(dm.handle);
        let e = *self.index.get(dm.handle);
        let access = self.access(&e.key, e.parent);
        {
            let e = self.index.get_mut(dm.handle);
            e.pins -= 1;
            e.flags &= !(flags::DEMOTING | flags::WRITING);
        }
        let d = self.disk_mut();
        if !dm.keep_hot {
            d.inflight_bytes -= stride;
        }
        d.inflight_writes -= 1;
        match checksum {
            Some(checksum) if d.stats.enabled => {
                d.tier.policy(e.key.ns).insert(dm.handle, &access);
                d.changes.push(DiskChange::Stored { key: e.key, slot: dm.disk, generation: dm.generation, checksum });
                d.stats.blocks += 1;
                d.stats.demoted_blocks += 1;
                d.stats.written_bytes += stride;
                self.index.get_mut(dm.handle).disk = dm.disk;
            }
            _ => d.tier.alloc.free(dm.disk),
        }
        if dm.keep_hot {
            // Never left the host policy.
        } else if e.flags & flags::WANTED != 0 {
            self.index.get_mut(dm.handle).flags &= !flags::WANTED;
            self.host.policy(e.key.ns).insert(dm.handle, &access);
        } else {
            self.make_cold(dm.handle);
        }
    }

    /// Starts promoting the disk-only blocks of the held prefix of `hashes` into host slots
    /// (as far as room can be made), so that a later [`acquire`](Self::acquire) finds them.
    pub fn begin_promotions(&mut self, ns: NsIdx, hashes: &[BlockHash]) -> PromotionPlan {
        let mut plan = PromotionPlan::default();
        let n = self.peek_prefix(ns, hashes);
        // Pin the whole prefix first, so room for its disk-only blocks never comes from the
        // host copies of its other blocks.
        let mut pinned_here = Vec::with_capacity(n);
        for &hash in &hashes[..n] {
            let h = self.index.find(&BlockKey { ns, hash }).expect("held prefix is indexed");
            if !self.pin(h, &mut pinned_here) {
                break;
            }
        }
        for h in pinned_here.clone() {
            let e = *self.index.get(h);
            if e.flags & flags::PROMOTING != 0 {
                plan.pending += 1;
                continue;
            }
            if e.slot.is_some() {
                continue;
            }
            let Some(slot) = self.alloc_slot(TierSel::Host, ns, h) else { break };
            let key = e.key;
            let e = self.index.get_mut(h);
            e.slot = slot;
            e.flags |= flags::PROMOTING;
            e.pins += 1;
            plan.started.push(Promotion { handle: h, key, host: slot, disk: e.disk });
            plan.pending += 1;
        }
        for h in pinned_here {
            self.index.get_mut(h).pins -= 1;
        }
        plan
    }

    /// Records how a promotion ended. A block that failed verification or could not be read is
    /// dropped from both tiers: it is never served.
    pub fn complete_promotion(&mut self, p: &Promotion, outcome: PromotionOutcome) {
        let stride = self.stride_of(p.handle);
        let e = *self.index.get(p.handle);
        {
            let e = self.index.get_mut(p.handle);
            e.pins -= 1;
            e.flags &= !flags::PROMOTING;
        }
        if outcome == PromotionOutcome::Verified {
            let access = self.access(&e.key, e.parent);
            self.host.policy(e.key.ns).insert(p.handle, &access);
            self.log(e.key, EventKind::TierChanged { from: TierKind::Disk, to: TierKind::Host });
            self.stats.blocks += 1;
            let d = self.disk_mut();
            d.stats.promoted_blocks += 1;
            d.stats.read_bytes += stride;
            return;
        }
        let d = self.disk_mut();
        match outcome {
            PromotionOutcome::Corrupt => d.stats.corrupt_blocks += 1,
            _ => d.stats.failed_promotions += 1,
        }
        self.host.alloc.free(p.host);
        self.index.get_mut(p.handle).slot = SlotId::NONE;
        if e.disk.is_some() {
            self.disk_mut().tier.policy(e.key.ns).remove(p.handle);
            self.drop_copy(TierSel::Disk, p.handle);
        } else {
            self.remove_visible(p.handle, TierKind::Disk);
        }
    }

    /// Gives up on the disk tier (the disk failed): forgets every disk copy and plans nothing
    /// more. Blocks with a host copy stay servable. Returns the number of disk copies forgotten.
    pub fn disable_disk(&mut self) -> u64 {
        let Some(d) = &mut self.disk else { return 0 };
        if !d.stats.enabled {
            return 0;
        }
        d.stats.enabled = false;
        let on_disk: Vec<Handle> = self.index.iter().filter(|(_, e)| e.disk.is_some()).map(|(h, _)| h).collect();
        for &h in &on_disk {
            let e = *self.index.get(h);
            let d = self.disk_mut();
            d.tier.policy(e.key.ns).remove(h);
            d.tier.alloc.free(e.disk);
            self.index.get_mut(h).disk = SlotId::NONE;
            // A promotion in flight finishes (as a failure) and removes the entry then.
            if e.slot.is_none() {
                self.remove_visible(h, TierKind::Disk);
            }
        }
        let d = self.disk_mut();
        d.stats.blocks = 0;
        d.changes.clear();
        on_disk.len() as u64
    }

    /// Re-creates a disk-only block found in the persistent index (at start, before clients).
    pub fn restore_disk_block(
        &mut self,
        id: NamespaceId,
        block_bytes: u64,
        hash: BlockHash,
        slot: SlotId,
    ) -> Result<(), RestoreError> {
        if self.disk.is_none() {
            return Err(RestoreError::NoDisk);
        }
        let ns = self.register(id, block_bytes).map_err(|e| RestoreError::Namespace(e.to_string()))?;
        let key = BlockKey { ns, hash };
        if self.index.find(&key).is_some() {
            return Err(RestoreError::Duplicate);
        }
        let stride = self.namespaces.get(ns).stride;
        let h = self.new_entry(key, SlotId::NONE, None);
        if !self.disk_mut().tier.alloc.claim(slot, ns, stride, h.0) {
            self.drop_entry(h);
            return Err(RestoreError::SlotTaken);
        }
        let access = self.access(&key, None);
        let e = self.index.get_mut(h);
        e.state = EntryState::Committed;
        e.disk = slot;
        let d = self.disk_mut();
        d.tier.policy(ns).insert(h, &access);
        d.stats.blocks += 1;
        d.stats.restored_blocks += 1;
        self.log(key, EventKind::Stored { tier: TierKind::Disk, parent: None });
        Ok(())
    }
}
