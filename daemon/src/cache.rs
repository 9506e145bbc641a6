//! The host tier's brain: index, eviction policy and slot allocator together, as pure logic.
//!
//! `HostCache` decides which slot a block goes to, what is visible, what is pinned and what is
//! evicted. It never touches the pool's bytes: the server hands slot locations to clients, who
//! copy through their own mapping. The trace simulator drives this same type.

use crate::alloc::{slot_stride, SlabAllocator};
use crate::block::{BlockHash, BlockKey, Handle, NsIdx, SlotId};
use crate::index::{BlockIndex, EntryState};
use crate::namespace::{NamespaceId, NamespaceInfo, NamespaceTable};
use crate::policy::{Access, Eviction, PolicyKind};
use std::collections::HashMap;

/// Identifies one client (connection) for ownership of reservations and pins.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct ClientId(pub u64);

/// Why a cache operation was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CacheError {
    /// Block size zero, larger than a slab, or different from the namespace's registration.
    #[error("wrong block size: {0}")]
    WrongBlockSize(String),
    /// The daemon's namespace table is full.
    #[error("too many namespaces (limit {0})")]
    TooManyNamespaces(usize),
    /// No reservation or lease with this id belongs to the client.
    #[error("no reservation or lease {0} on this connection")]
    UnknownId(u64),
    /// The client holds too many reserved or pinned blocks.
    #[error("client holds {held} blocks, limit {limit}")]
    TooManyHeld {
        /// Blocks held now plus those asked for.
        held: usize,
        /// The configured limit.
        limit: usize,
    },
}

/// Outcome of reserving one block.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Reserved {
    /// Write the block into this slot, then commit.
    Slot(SlotId),
    /// Already held or being written by someone else.
    Present,
    /// No room could be made.
    NoSpace,
}

/// Counters and gauges of the host tier.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Pool budget in bytes.
    pub capacity_bytes: u64,
    /// Bytes of slots in use (reserved or committed).
    pub used_bytes: u64,
    /// Committed blocks.
    pub blocks: u64,
    /// Blocks reserved and not yet committed.
    pub reserved_blocks: u64,
    /// Registered namespaces.
    pub namespaces: u64,
    /// Blocks found by lookups.
    pub hit_blocks: u64,
    /// Blocks asked for by lookups and not found.
    pub miss_blocks: u64,
    /// Blocks evicted to make room.
    pub evicted_blocks: u64,
    /// Bytes committed.
    pub saved_bytes: u64,
    /// Bytes handed out by acquire.
    pub loaded_bytes: u64,
}

/// Tells an offline policy when a block is next used (trace simulation only).
pub type FutureOracle = Box<dyn FnMut(&BlockKey) -> Option<u64> + Send>;

struct Held {
    client: ClientId,
    ns: NsIdx,
    handles: Vec<Handle>,
}

/// Limits of a [`HostCache`].
#[derive(Clone, Debug)]
pub struct CacheLimits {
    /// Most namespaces the daemon accepts.
    pub max_namespaces: usize,
    /// Most reserved plus pinned blocks one client may hold.
    pub max_held_per_client: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self { max_namespaces: 256, max_held_per_client: 1 << 20 }
    }
}

/// Index + policy + allocator of the host tier.
pub struct HostCache {
    index: BlockIndex,
    alloc: SlabAllocator,
    namespaces: NamespaceTable,
    policy_kind: PolicyKind,
    /// One policy per namespace: a victim must free a slot of the right stride.
    policies: Vec<Box<dyn Eviction>>,
    reservations: HashMap<u64, Held>,
    leases: HashMap<u64, Held>,
    held_by_client: HashMap<ClientId, usize>,
    next_id: u64,
    limits: CacheLimits,
    stats: CacheStats,
    oracle: Option<FutureOracle>,
}

impl HostCache {
    /// A cache over `alloc`'s slots, evicting with `policy`.
    pub fn new(alloc: SlabAllocator, policy: PolicyKind, limits: CacheLimits) -> Self {
        Self {
            index: BlockIndex::default(),
            stats: CacheStats { capacity_bytes: alloc.capacity_bytes(), ..Default::default() },
            alloc,
            namespaces: NamespaceTable::default(),
            policy_kind: policy,
            policies: Vec::new(),
            reservations: HashMap::new(),
            leases: HashMap::new(),
            held_by_client: HashMap::new(),
            next_id: 1,
            limits,
            oracle: None,
        }
    }

    /// Installs a source of future knowledge for offline policies (simulation only).
    pub fn set_oracle(&mut self, oracle: FutureOracle) {
        self.oracle = Some(oracle);
    }

    /// Name of the eviction policy.
    pub fn policy_name(&self) -> &'static str {
        self.policy_kind.name()
    }

    /// Registers (or finds) a namespace with its block size.
    pub fn register(&mut self, id: NamespaceId, block_bytes: u64) -> Result<NsIdx, CacheError> {
        if let Some(ns) = self.namespaces.find(&id) {
            let known = self.namespaces.get(ns).block_bytes;
            if known != block_bytes {
                return Err(CacheError::WrongBlockSize(format!(
                    "namespace {id:?} was registered with {known} bytes per block, not {block_bytes}"
                )));
            }
            return Ok(ns);
        }
        if block_bytes == 0 || slot_stride(block_bytes) > self.alloc.slab_bytes() {
            return Err(CacheError::WrongBlockSize(format!(
                "{block_bytes} bytes per block; must be 1..={} (pool.slab_bytes)",
                self.alloc.slab_bytes()
            )));
        }
        if self.namespaces.len() >= self.limits.max_namespaces.min(u16::MAX as usize) {
            return Err(CacheError::TooManyNamespaces(self.limits.max_namespaces));
        }
        self.policies.push(self.policy_kind.build());
        let info = NamespaceInfo { id, block_bytes, stride: slot_stride(block_bytes) };
        Ok(self.namespaces.add(info))
    }

    /// Info of a registered namespace.
    pub fn namespace(&self, ns: NsIdx) -> &NamespaceInfo {
        self.namespaces.get(ns)
    }

    /// The index of a namespace id, if registered.
    pub fn find_namespace(&self, id: &NamespaceId) -> Option<NsIdx> {
        self.namespaces.find(id)
    }

    fn committed(&self, key: &BlockKey) -> Option<Handle> {
        self.index.find(key).filter(|&h| self.index.get(h).state == EntryState::Committed)
    }

    /// Length of the longest leading run of `hashes` held and committed in `ns`; counts hits and misses.
    pub fn lookup(&mut self, ns: NsIdx, hashes: &[BlockHash]) -> usize {
        let matched = self.peek_prefix(ns, hashes);
        self.stats.hit_blocks += matched as u64;
        self.stats.miss_blocks += (hashes.len() - matched) as u64;
        matched
    }

    /// Like [`lookup`](Self::lookup) without counting.
    pub fn peek_prefix(&self, ns: NsIdx, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|&&hash| self.committed(&BlockKey { ns, hash }).is_some()).count()
    }

    fn access(&mut self, key: &BlockKey, parent: Option<Handle>) -> Access {
        let next_use = self.oracle.as_mut().and_then(|o| o(key));
        Access { parent, next_use }
    }

    fn charge(&mut self, client: ClientId, n: usize) -> Result<(), CacheError> {
        let held = self.held_by_client.get(&client).copied().unwrap_or(0) + n;
        if held > self.limits.max_held_per_client {
            return Err(CacheError::TooManyHeld { held, limit: self.limits.max_held_per_client });
        }
        self.held_by_client.insert(client, held);
        Ok(())
    }

    fn refund(&mut self, client: ClientId, n: usize) {
        if let Some(h) = self.held_by_client.get_mut(&client) {
            *h -= n;
            if *h == 0 {
                self.held_by_client.remove(&client);
            }
        }
    }

    fn new_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id - 1
    }

    /// Reserves slots for `hashes` (a run of one prompt, in prefix order; `parent` is the hash
    /// before `hashes[0]`). Blocks already held are touched and reported `Present`. Once a block
    /// gets `NoSpace`, so do all after it (a prefix with a hole is useless).
    /// Returns the reservation id (0 if nothing was reserved) and one outcome per hash.
    pub fn reserve(
        &mut self,
        client: ClientId,
        ns: NsIdx,
        hashes: &[BlockHash],
        parent: Option<BlockHash>,
    ) -> Result<(u64, Vec<Reserved>), CacheError> {
        self.charge(client, hashes.len())?;
        let mut prev = parent.and_then(|hash| self.index.find(&BlockKey { ns, hash }));
        let mut outcomes = Vec::with_capacity(hashes.len());
        let mut reserved = Vec::new();
        // Blocks of this prompt already held are pinned while we make room, so that room for
        // the tail is never made by evicting its own prefix.
        let mut pinned_here = Vec::new();
        for &hash in hashes {
            let key = BlockKey { ns, hash };
            if outcomes.last() == Some(&Reserved::NoSpace) {
                outcomes.push(Reserved::NoSpace);
                continue;
            }
            if let Some(h) = self.index.find(&key) {
                if self.index.get(h).state == EntryState::Committed {
                    let access = self.access(&key, None);
                    self.policies[ns.0 as usize].touch(h, &access);
                    self.pin(h, &mut pinned_here);
                }
                outcomes.push(Reserved::Present);
                prev = Some(h);
                continue;
            }
            match self.make_room_and_insert(key, prev) {
                Some(h) => {
                    outcomes.push(Reserved::Slot(self.index.get(h).slot));
                    reserved.push(h);
                    prev = Some(h);
                }
                None => outcomes.push(Reserved::NoSpace),
            }
        }
        for h in pinned_here {
            self.index.get_mut(h).pins -= 1;
        }
        self.refund(client, hashes.len() - reserved.len());
        if reserved.is_empty() {
            return Ok((0, outcomes));
        }
        self.stats.reserved_blocks += reserved.len() as u64;
        let id = self.new_id();
        self.reservations.insert(id, Held { client, ns, handles: reserved });
        Ok((id, outcomes))
    }

    fn pin(&mut self, h: Handle, pinned: &mut Vec<Handle>) -> bool {
        let e = self.index.get_mut(h);
        if e.pins == u16::MAX {
            return false;
        }
        e.pins += 1;
        pinned.push(h);
        true
    }

    /// Inserts a reserved entry for `key` with a slot, evicting if needed.
    fn make_room_and_insert(&mut self, key: BlockKey, parent: Option<Handle>) -> Option<Handle> {
        let ns = key.ns;
        let stride = self.namespaces.get(ns).stride;
        let placeholder = SlotId { slab: u32::MAX, slot: u32::MAX };
        let h = self.index.insert(key, placeholder, parent);
        let slot = loop {
            if let Some(slot) = self.alloc.alloc(ns, stride, h.0) {
                break Some(slot);
            }
            let below_share = self.alloc.slabs_of(ns) < self.fair_share(ns);
            if below_share && self.reclaim_slab_from_others(ns, true) {
                continue;
            }
            if self.evict_one(ns) {
                continue;
            }
            if self.reclaim_slab_from_others(ns, false) {
                continue;
            }
            break None;
        };
        match slot {
            Some(slot) => {
                self.index.get_mut(h).slot = slot;
                Some(h)
            }
            None => {
                self.index.remove(h);
                None
            }
        }
    }

    /// Slabs each namespace with data (plus `ns`) may claim before others must give way.
    fn fair_share(&self, ns: NsIdx) -> usize {
        let active = self.alloc.owners() + usize::from(self.alloc.slabs_of(ns) == 0);
        self.alloc.slab_count() / active.max(1)
    }

    fn evict_one(&mut self, ns: NsIdx) -> bool {
        let index = &self.index;
        let victim = self.policies[ns.0 as usize].evict(&mut |h| index.get(h).pins == 0);
        match victim {
            Some(h) => {
                self.drop_entry(h);
                self.stats.evicted_blocks += 1;
                true
            }
            None => false,
        }
    }

    fn drop_entry(&mut self, h: Handle) {
        let e = self.index.remove(h);
        self.alloc.free(e.slot);
        if e.state == EntryState::Committed {
            self.stats.blocks -= 1;
        }
    }

    /// Empties one slab of another namespace (the largest owner, only above its fair share if
    /// `only_above_share`) whose blocks are all committed and unpinned, and frees it.
    fn reclaim_slab_from_others(&mut self, ns: NsIdx, only_above_share: bool) -> bool {
        let Some((owner, count)) = self.alloc.largest_owner_except(ns) else {
            return false;
        };
        if only_above_share && count <= self.fair_share(owner) {
            return false;
        }
        let index = &self.index;
        let evictable = |t: u32| {
            let e = index.get(Handle(t));
            e.state == EntryState::Committed && e.pins == 0
        };
        let slab = self.alloc.slabs_owned_by(owner).find(|&s| self.alloc.tags_in(s).all(evictable));
        let Some(slab) = slab else { return false };
        let victims: Vec<u32> = self.alloc.tags_in(slab).collect();
        for t in victims {
            self.policies[owner.0 as usize].remove(Handle(t));
            self.drop_entry(Handle(t));
            self.stats.evicted_blocks += 1;
        }
        true
    }

    /// Makes every block of a reservation visible.
    pub fn commit(&mut self, client: ClientId, reservation: u64) -> Result<usize, CacheError> {
        let held = self.take_held(client, reservation, true)?;
        let bytes = self.namespaces.get(held.ns).block_bytes;
        for &h in &held.handles {
            let e = self.index.get_mut(h);
            e.state = EntryState::Committed;
            let (key, parent) = (e.key, e.parent);
            let access = self.access(&key, parent);
            self.policies[held.ns.0 as usize].insert(h, &access);
        }
        let n = held.handles.len();
        self.stats.blocks += n as u64;
        self.stats.reserved_blocks -= n as u64;
        self.stats.saved_bytes += bytes * n as u64;
        self.refund(client, n);
        Ok(n)
    }

    /// Drops a reservation: its slots are freed and nothing becomes visible.
    pub fn abort(&mut self, client: ClientId, reservation: u64) -> Result<(), CacheError> {
        let held = self.take_held(client, reservation, true)?;
        for &h in &held.handles {
            self.drop_entry(h);
        }
        self.stats.reserved_blocks -= held.handles.len() as u64;
        self.refund(client, held.handles.len());
        Ok(())
    }

    fn take_held(&mut self, client: ClientId, id: u64, reservation: bool) -> Result<Held, CacheError> {
        let map = if reservation { &mut self.reservations } else { &mut self.leases };
        match map.get(&id) {
            Some(h) if h.client == client => Ok(map.remove(&id).expect("present")),
            _ => Err(CacheError::UnknownId(id)),
        }
    }

    /// Pins the longest leading run of held `hashes` for reading and counts it as a use.
    /// Returns the lease id (0 if nothing was pinned) and the slots in prefix order.
    pub fn acquire(
        &mut self,
        client: ClientId,
        ns: NsIdx,
        hashes: &[BlockHash],
    ) -> Result<(u64, Vec<SlotId>), CacheError> {
        let matched = self.peek_prefix(ns, hashes);
        self.charge(client, matched)?;
        let mut pinned = Vec::with_capacity(matched);
        for &hash in &hashes[..matched] {
            let key = BlockKey { ns, hash };
            let h = self.index.find(&key).expect("matched prefix is indexed");
            if !self.pin(h, &mut pinned) {
                break;
            }
            let access = self.access(&key, None);
            self.policies[ns.0 as usize].touch(h, &access);
        }
        self.refund(client, matched - pinned.len());
        if pinned.is_empty() {
            return Ok((0, Vec::new()));
        }
        let slots = pinned.iter().map(|&h| self.index.get(h).slot).collect();
        self.stats.loaded_bytes += self.namespaces.get(ns).block_bytes * pinned.len() as u64;
        let id = self.new_id();
        self.leases.insert(id, Held { client, ns, handles: pinned });
        Ok((id, slots))
    }

    /// Unpins the blocks of a lease.
    pub fn release(&mut self, client: ClientId, lease: u64) -> Result<(), CacheError> {
        let held = self.take_held(client, lease, false)?;
        for &h in &held.handles {
            self.index.get_mut(h).pins -= 1;
        }
        self.refund(client, held.handles.len());
        Ok(())
    }

    /// Releases everything a client held: aborts its reservations, drops its pins.
    pub fn disconnect(&mut self, client: ClientId) {
        let owned = |m: &HashMap<u64, Held>| -> Vec<u64> {
            m.iter().filter(|(_, h)| h.client == client).map(|(&id, _)| id).collect()
        };
        for id in owned(&self.reservations) {
            let _ = self.abort(client, id);
        }
        for id in owned(&self.leases) {
            let _ = self.release(client, id);
        }
        self.held_by_client.remove(&client);
    }

    /// Where a slot lives in the pool mapping: (segment, byte offset).
    pub fn slot_location(&self, slot: SlotId) -> (u32, u64) {
        self.alloc.location(slot)
    }

    /// Counters and gauges.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            used_bytes: self.alloc.used_bytes(),
            namespaces: self.namespaces.len() as u64,
            ..self.stats.clone()
        }
    }

    /// Heap bytes of the index and policies (for the per-block memory benchmark).
    pub fn metadata_heap_bytes(&self) -> usize {
        self.index.heap_bytes() + self.policies.iter().map(|p| p.heap_bytes()).sum::<usize>()
    }
}

#[cfg(test)]
mod tests;
