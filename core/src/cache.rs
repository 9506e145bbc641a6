//! The tiers' brain: index, eviction policies, disk admission and slot allocators, as pure logic.
//!
//! `BlockCache` decides which slot a block goes to in the host pool and on disk, what is visible,
//! what is pinned, what is demoted, promoted and evicted. It never touches bytes: the server hands
//! slot locations to clients, who copy through their own mapping, and the disk mechanism executes
//! the [`Demotion`]s and [`Promotion`]s it plans. The trace simulator drives this same type.
//!
//! Life of a block: reserved (invisible) -> committed in the host tier (tracked by the host
//! policy) -> under pressure taken out of the host policy and either written to disk (admission
//! permitting) or not -> cold queue (still servable; dropped from the host first when room is
//! needed) -> disk-only -> promoted back into the host tier when acquired or prefetched.

mod disk_plan;
mod tier;

pub use disk_plan::{
    Demotion, DiskChange, DiskSetup, DiskStats, Promotion, PromotionOutcome, PromotionPlan, RestoreError,
};

use crate::alloc::{slot_stride, SlabAllocator};
pub use crate::block::TierKind;
use crate::block::{BlockHash, BlockKey, Handle, NsIdx, SlotId};
use crate::events::{EventKind, EventLog};
use crate::index::{flags, BlockIndex, EntryState};
use crate::namespace::{NamespaceId, NamespaceInfo, NamespaceTable};
use crate::policy::{Access, PolicyKind};
use disk_plan::DiskState;
use std::collections::HashMap;
use tier::{Tier, TierSel};

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
    /// Committed blocks with a copy in the pool.
    pub blocks: u64,
    /// Blocks reserved and not yet committed.
    pub reserved_blocks: u64,
    /// Registered namespaces.
    pub namespaces: u64,
    /// Blocks found by lookups (in either tier).
    pub hit_blocks: u64,
    /// Of those, blocks found only on disk.
    pub disk_hit_blocks: u64,
    /// Blocks asked for by lookups and not found.
    pub miss_blocks: u64,
    /// Host copies dropped to make room (the block may live on on disk).
    pub evicted_blocks: u64,
    /// Bytes committed.
    pub saved_bytes: u64,
    /// Bytes handed out by acquire.
    pub loaded_bytes: u64,
    /// Blocks removed on an operator's request ([`BlockCache::discard`]), from every tier.
    pub discarded_blocks: u64,
    /// Namespaces forgotten to make room for new ones (empty or emptied, none registered).
    pub reclaimed_namespaces: u64,
}

/// Lookup outcomes of one namespace since start, in blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Lookups {
    /// Blocks found (in either tier).
    pub hit_blocks: u64,
    /// Of those, blocks found only on disk.
    pub disk_hit_blocks: u64,
    /// Blocks asked for and not found.
    pub miss_blocks: u64,
}

/// What [`BlockCache::discard`] did, in blocks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Discarded {
    /// Removed blocks that were served from the host pool (some had a disk copy too).
    pub host: u64,
    /// Removed blocks that were on disk only.
    pub disk: u64,
    /// Committed blocks left in place because they were in use (read by a client or a peer,
    /// being written to or read from disk): asking again later removes them.
    pub busy: u64,
}

impl std::ops::AddAssign for Discarded {
    fn add_assign(&mut self, o: Self) {
        self.host += o.host;
        self.disk += o.disk;
        self.busy += o.busy;
    }
}

/// Tells an offline policy when a block is next used (trace simulation only).
pub type FutureOracle = Box<dyn FnMut(&BlockKey) -> Option<u64> + Send>;

struct Held {
    client: ClientId,
    ns: NsIdx,
    handles: Vec<Handle>,
}

/// Limits of a [`BlockCache`].
#[derive(Clone, Debug)]
pub struct CacheLimits {
    /// Most namespaces the daemon accepts.
    pub max_namespaces: usize,
    /// Most reserved plus pinned blocks one client may hold.
    pub max_held_per_client: usize,
    /// Router-feed events retained (older ones force consumers to re-snapshot).
    pub event_capacity: usize,
}

impl Default for CacheLimits {
    fn default() -> Self {
        Self { max_namespaces: 256, max_held_per_client: 1 << 20, event_capacity: DEFAULT_EVENT_CAPACITY }
    }
}

/// Index, policies and allocators of the host tier and, when configured, the disk tier.
pub struct BlockCache {
    index: BlockIndex,
    host: Tier,
    disk: Option<DiskState>,
    namespaces: NamespaceTable,
    policy_kind: PolicyKind,
    reservations: HashMap<u64, Held>,
    leases: HashMap<u64, Held>,
    held_by_client: HashMap<ClientId, usize>,
    /// Namespaces each connected client registered.
    attached: HashMap<ClientId, Vec<NsIdx>>,
    next_id: u64,
    limits: CacheLimits,
    stats: CacheStats,
    oracle: Option<FutureOracle>,
    /// Bytes before each block in its slot (room for the on-disk slot header; 0 without disk).
    header_bytes: u64,
    /// What routers replay: every change of what this node can serve.
    events: EventLog,
    /// Lookup outcomes per namespace, by index.
    lookups: Vec<Lookups>,
}

/// Events the router feed retains unless configured otherwise.
pub const DEFAULT_EVENT_CAPACITY: usize = 1 << 18;

impl BlockCache {
    /// A host-only cache over `alloc`'s slots, evicting with `policy`.
    pub fn new(alloc: SlabAllocator, policy: PolicyKind, limits: CacheLimits) -> Self {
        let events = EventLog::new(limits.event_capacity);
        Self {
            index: BlockIndex::default(),
            stats: CacheStats { capacity_bytes: alloc.capacity_bytes(), ..Default::default() },
            host: Tier::new(alloc, policy),
            disk: None,
            namespaces: NamespaceTable::default(),
            policy_kind: policy,
            reservations: HashMap::new(),
            leases: HashMap::new(),
            held_by_client: HashMap::new(),
            attached: HashMap::new(),
            next_id: 1,
            limits,
            oracle: None,
            header_bytes: 0,
            events,
            lookups: Vec::new(),
        }
    }

    /// A cache with a disk tier below the host tier. Every slot (host and disk) starts with
    /// `setup.header_bytes` for the on-disk header, so a block moves with one I/O.
    pub fn with_disk(host: SlabAllocator, policy: PolicyKind, limits: CacheLimits, setup: DiskSetup) -> Self {
        let mut c = Self::new(host, policy, limits);
        c.header_bytes = setup.header_bytes;
        c.disk = Some(DiskState::new(setup, policy, c.host.alloc.capacity_bytes()));
        c
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
        let stride = slot_stride(block_bytes).and_then(|s| s.checked_add(self.header_bytes));
        let Some(stride) = stride.filter(|&s| block_bytes > 0 && s <= self.host.alloc.slab_bytes()) else {
            return Err(CacheError::WrongBlockSize(format!(
                "{block_bytes} bytes per block; must be 1..={} (pool.slab_bytes less the slot header)",
                self.host.alloc.slab_bytes() - self.header_bytes
            )));
        };
        if self.namespaces.len() >= self.limits.max_namespaces.min(u16::MAX as usize) {
            self.reclaim_namespace()?;
        }
        let ns = self.namespaces.add(NamespaceInfo::new(id, block_bytes, stride));
        self.init_namespace(ns);
        Ok(ns)
    }

    /// Per-namespace state of a new namespace at `ns`: appended, or started over at a reclaimed
    /// index (whose blocks are all gone).
    fn init_namespace(&mut self, ns: NsIdx) {
        let i = ns.0 as usize;
        if i == self.lookups.len() {
            self.host.add_namespace();
            if let Some(d) = &mut self.disk {
                d.add_namespace();
            }
            self.lookups.push(Lookups::default());
            return;
        }
        self.host.reset_namespace(ns);
        if let Some(d) = &mut self.disk {
            d.reset_namespace(ns);
        }
        self.lookups[i] = Lookups::default();
        self.events.reset(ns);
    }

    /// Makes room in a full namespace table: forgets a namespace no connection registered that
    /// holds nothing, or else empties the least recently used one no connection registered (its
    /// unpinned blocks are evicted from every tier). `TooManyNamespaces` if every namespace is
    /// registered by a live connection or in use.
    fn reclaim_namespace(&mut self) -> Result<(), CacheError> {
        if let Some(ns) = self.namespaces.empty_detached() {
            self.namespaces.remove(ns);
            self.stats.reclaimed_namespaces += 1;
            return Ok(());
        }
        for ns in self.namespaces.detached_by_age() {
            let mut selected = vec![false; self.namespaces.bound()];
            selected[ns.0 as usize] = true;
            let out = self.remove_unpinned(&selected, 0..self.index.handle_bound());
            self.stats.evicted_blocks += out.host;
            if let Some(d) = &mut self.disk {
                d.stats.evicted_blocks += out.disk;
            }
            if self.namespaces.get(ns).entries == 0 {
                self.namespaces.remove(ns);
                self.stats.reclaimed_namespaces += 1;
                return Ok(());
            }
        }
        Err(CacheError::TooManyNamespaces(self.limits.max_namespaces))
    }

    /// Records that `client` registered `ns` (once per client): it is not reclaimed while a
    /// client that registered it is connected ([`disconnect`](Self::disconnect) ends that).
    pub fn attach(&mut self, client: ClientId, ns: NsIdx) {
        let mine = self.attached.entry(client).or_default();
        if !mine.contains(&ns) {
            mine.push(ns);
            self.namespaces.get_mut(ns).attached += 1;
        }
    }

    /// Namespaces `client` registered.
    pub fn attached(&self, client: ClientId) -> &[NsIdx] {
        self.attached.get(&client).map_or(&[], Vec::as_slice)
    }

    /// Whether `ns` names a registered namespace now (not reclaimed).
    pub fn is_registered(&self, ns: NsIdx) -> bool {
        self.namespaces.is_live(ns)
    }

    /// One past the largest namespace index: a selection of namespaces by index covers it.
    pub fn handle_bound_namespaces(&self) -> usize {
        self.namespaces.bound()
    }

    /// The registered namespaces, by index.
    pub fn registered(&self) -> Vec<NsIdx> {
        self.namespaces.live().collect()
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

    fn servable_from_host(&self, h: Handle) -> bool {
        let e = self.index.get(h);
        e.slot.is_some() && e.flags & flags::PROMOTING == 0
    }

    /// Length of the longest leading run of `hashes` held and committed in `ns`; counts hits and misses.
    pub fn lookup(&mut self, ns: NsIdx, hashes: &[BlockHash]) -> usize {
        self.lookup_tiers(ns, hashes).len()
    }

    /// Like [`lookup`](Self::lookup), telling the tier of each block of the held prefix.
    pub fn lookup_tiers(&mut self, ns: NsIdx, hashes: &[BlockHash]) -> Vec<TierKind> {
        self.namespaces.touch(ns);
        let tiers = self.peek_tiers(ns, hashes);
        let (hits, on_disk) = (tiers.len() as u64, tiers.iter().filter(|&&t| t == TierKind::Disk).count() as u64);
        let misses = (hashes.len() - tiers.len()) as u64;
        self.stats.hit_blocks += hits;
        self.stats.disk_hit_blocks += on_disk;
        self.stats.miss_blocks += misses;
        let l = &mut self.lookups[ns.0 as usize];
        l.hit_blocks += hits;
        l.disk_hit_blocks += on_disk;
        l.miss_blocks += misses;
        tiers
    }

    /// Lookup outcomes of `ns` since start.
    pub fn lookups(&self, ns: NsIdx) -> Lookups {
        self.lookups[ns.0 as usize]
    }

    /// Like [`lookup_tiers`](Self::lookup_tiers) without counting.
    pub fn peek_tiers(&self, ns: NsIdx, hashes: &[BlockHash]) -> Vec<TierKind> {
        let mut tiers = Vec::new();
        for &hash in hashes {
            let Some(h) = self.committed(&BlockKey { ns, hash }) else { break };
            tiers.push(if self.servable_from_host(h) { TierKind::Host } else { TierKind::Disk });
        }
        tiers
    }

    /// Length of the longest leading run of `hashes` held in either tier, without counting.
    pub fn peek_prefix(&self, ns: NsIdx, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|&&hash| self.committed(&BlockKey { ns, hash }).is_some()).count()
    }

    fn host_prefix(&self, ns: NsIdx, hashes: &[BlockHash]) -> usize {
        let held = |hash: &BlockHash| {
            self.committed(&BlockKey { ns, hash: *hash }).is_some_and(|h| self.servable_from_host(h))
        };
        hashes.iter().take_while(|h| held(h)).count()
    }

    fn access(&mut self, key: &BlockKey, parent: Option<Handle>) -> Access {
        let next_use = self.oracle.as_mut().and_then(|o| o(key));
        Access { parent, next_use }
    }

    /// Records a use of committed `h` in the policies of the tiers holding it.
    fn used(&mut self, h: Handle) {
        let e = *self.index.get(h);
        let access = self.access(&e.key, None);
        self.index.get_mut(h).flags |= flags::REUSED;
        if e.flags & flags::REUSED == 0 {
            self.queue_writeback(h);
        }
        if e.disk.is_some() {
            self.disk_mut().tier.policy(e.key.ns).touch(h, &access);
        }
        if e.slot.is_none() || e.flags & flags::PROMOTING != 0 {
            return;
        }
        if e.flags & flags::COLD != 0 {
            self.leave_cold(h);
            let access = self.access(&e.key, e.parent);
            self.host.policy(e.key.ns).insert(h, &access);
        } else if e.flags & flags::DEMOTING != 0 {
            self.index.get_mut(h).flags |= flags::WANTED;
        } else {
            self.host.policy(e.key.ns).touch(h, &access);
        }
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
    /// before `hashes[0]`). Blocks already held (in either tier) are touched and reported
    /// `Present`. Once a block gets `NoSpace`, so do all after it (a prefix with a hole is useless).
    /// Returns the reservation id (0 if nothing was reserved) and one outcome per hash.
    pub fn reserve(
        &mut self,
        client: ClientId,
        ns: NsIdx,
        hashes: &[BlockHash],
        parent: Option<BlockHash>,
    ) -> Result<(u64, Vec<Reserved>), CacheError> {
        self.charge(client, hashes.len())?;
        self.namespaces.touch(ns);
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
                    self.used(h);
                    self.pin(h, &mut pinned_here);
                }
                outcomes.push(Reserved::Present);
                prev = Some(h);
                continue;
            }
            match self.insert_reserved(key, prev) {
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

    /// Inserts a reserved entry for `key` with a host slot, making room if needed.
    fn insert_reserved(&mut self, key: BlockKey, parent: Option<Handle>) -> Option<Handle> {
        let h = self.new_entry(key, SlotId::NONE, parent);
        if let Some(d) = &mut self.disk {
            if d.admission.seen_before(disk_plan::fingerprint(&key)) {
                self.index.get_mut(h).flags |= flags::REUSED;
            }
        }
        match self.alloc_slot(TierSel::Host, key.ns, h) {
            Some(slot) => {
                self.index.get_mut(h).slot = slot;
                Some(h)
            }
            None => {
                self.drop_entry(h);
                None
            }
        }
    }

    fn tier(&mut self, t: TierSel) -> &mut Tier {
        match t {
            TierSel::Host => &mut self.host,
            TierSel::Disk => &mut self.disk_mut().tier,
        }
    }

    fn disk_mut(&mut self) -> &mut DiskState {
        self.disk.as_mut().expect("disk tier configured")
    }

    /// A free slot of tier `t` for `ns`, tagged `h`: taken free, from another namespace above its
    /// share, from the cold queue (host), by evicting, or from another namespace at all.
    fn alloc_slot(&mut self, t: TierSel, ns: NsIdx, h: Handle) -> Option<SlotId> {
        let stride = self.namespaces.get(ns).stride;
        loop {
            if let Some(slot) = self.tier(t).alloc.alloc(ns, stride, h.0) {
                return Some(slot);
            }
            let made_room = (self.tier(t).below_share(ns) && self.reclaim_slab(t, ns, true))
                || (t == TierSel::Host && self.pop_cold(ns))
                || self.evict_one(t, ns)
                || self.reclaim_slab(t, ns, false);
            if !made_room {
                return None;
            }
        }
    }

    fn evict_one(&mut self, t: TierSel, ns: NsIdx) -> bool {
        let index = &self.index;
        let tier = match t {
            TierSel::Host => &mut self.host,
            TierSel::Disk => &mut self.disk.as_mut().expect("disk tier").tier,
        };
        match tier.policy(ns).evict(&mut |h| index.get(h).pins == 0) {
            Some(h) => {
                self.drop_copy(t, h);
                true
            }
            None => false,
        }
    }

    /// Empties one slab of another namespace whose blocks are all committed and unpinned.
    fn reclaim_slab(&mut self, t: TierSel, ns: NsIdx, only_above_share: bool) -> bool {
        let index = &self.index;
        let evictable = |tag: u32| {
            let e = index.get(Handle(tag));
            e.state == EntryState::Committed && e.pins == 0
        };
        let tier = match t {
            TierSel::Host => &self.host,
            TierSel::Disk => &self.disk.as_ref().expect("disk tier").tier,
        };
        let Some((owner, victims)) = tier.reclaimable_slab(ns, only_above_share, evictable) else {
            return false;
        };
        for tag in victims {
            let h = Handle(tag);
            match t {
                TierSel::Host if self.index.get(h).flags & flags::COLD != 0 => self.leave_cold(h),
                _ => self.tier(t).policy(owner).remove(h),
            }
            self.drop_copy(t, h);
        }
        true
    }

    /// Drops `h`'s copy in tier `t` (already out of that tier's policy and cold queue); an entry
    /// left with no copy leaves the index.
    fn drop_copy(&mut self, t: TierSel, h: Handle) {
        match t {
            TierSel::Host => {
                let e = self.index.get_mut(h);
                let slot = std::mem::replace(&mut e.slot, SlotId::NONE);
                let (key, on_disk) = (e.key, e.disk.is_some());
                self.host.alloc.free(slot);
                self.stats.blocks -= 1;
                self.stats.evicted_blocks += 1;
                if on_disk {
                    self.log(key, EventKind::TierChanged { from: TierKind::Host, to: TierKind::Disk });
                } else {
                    if let Some(d) = &mut self.disk {
                        d.admission.dropped(disk_plan::fingerprint(&key));
                    }
                    self.remove_visible(h, TierKind::Host);
                }
            }
            TierSel::Disk => {
                let e = self.index.get_mut(h);
                let slot = std::mem::replace(&mut e.disk, SlotId::NONE);
                let (key, in_host) = (e.key, e.slot.is_some());
                self.disk_mut().forget(key, slot);
                if !in_host {
                    self.remove_visible(h, TierKind::Disk);
                }
            }
        }
    }

    /// Adds an index entry, counted in its namespace.
    fn new_entry(&mut self, key: BlockKey, slot: SlotId, parent: Option<Handle>) -> Handle {
        self.namespaces.get_mut(key.ns).entries += 1;
        self.index.insert(key, slot, parent)
    }

    /// Removes an index entry, counted out of its namespace.
    fn drop_entry(&mut self, h: Handle) -> crate::index::Entry {
        let e = self.index.remove(h);
        self.namespaces.get_mut(e.key.ns).entries -= 1;
        e
    }

    /// Appends an event about `key` to the router feed's log.
    fn log(&mut self, key: BlockKey, kind: EventKind) {
        let id = self.namespaces.get(key.ns).id;
        self.events.push(key, id, kind);
    }

    /// Removes a committed entry from the index, telling routers where it was last.
    fn remove_visible(&mut self, h: Handle, from: TierKind) {
        let e = self.drop_entry(h);
        self.log(e.key, EventKind::Removed { from });
    }

    /// Removes every committed block of `ns` that nobody is using, from every tier, as if it
    /// had never been saved (an operator's purge: a retired model, a tenant gone). Routers are
    /// told, and the disk index forgets the disk copies. Blocks in use are counted `busy` and
    /// left; saves still reserved commit afterwards.
    pub fn discard(&mut self, ns: NsIdx) -> Discarded {
        let mut selected = vec![false; self.namespaces.bound()];
        selected[ns.0 as usize] = true;
        self.discard_handles(&selected, 0..self.index.handle_bound())
    }

    /// One past the largest block handle: [`discard_handles`](Self::discard_handles) covers
    /// the whole cache in ranges up to it.
    pub fn handle_bound(&self) -> usize {
        self.index.handle_bound()
    }

    /// [`discard`](Self::discard) for the namespaces `selected` marks (by index; beyond its
    /// end: not selected), among the blocks whose handles lie in `handles`: a large purge runs
    /// range by range, letting other requests in between.
    pub fn discard_handles(&mut self, selected: &[bool], handles: std::ops::Range<usize>) -> Discarded {
        let out = self.remove_unpinned(selected, handles);
        self.stats.discarded_blocks += out.host + out.disk;
        out
    }

    /// Removes the committed, unpinned blocks of the namespaces `selected` marks among
    /// `handles`, from every tier: the work of [`discard_handles`](Self::discard_handles),
    /// uncounted.
    fn remove_unpinned(&mut self, selected: &[bool], handles: std::ops::Range<usize>) -> Discarded {
        let end = handles.end.min(self.index.handle_bound());
        let chosen = |e: &crate::index::Entry| {
            e.state == EntryState::Committed && selected.get(e.key.ns.0 as usize).copied().unwrap_or(false)
        };
        let mut out = Discarded::default();
        for h in (handles.start..end).map(|i| Handle(i as u32)) {
            let Some(&e) = self.index.try_get(h).filter(|e| chosen(e)) else { continue };
            let ns = e.key.ns;
            // Pins also cover disk writes and promotions in flight (DEMOTING, PROMOTING).
            if e.pins > 0 {
                out.busy += 1;
                continue;
            }
            let from = if self.servable_from_host(h) { TierKind::Host } else { TierKind::Disk };
            if e.slot.is_some() {
                match e.flags & flags::COLD != 0 {
                    true => self.leave_cold(h),
                    false => self.host.policy(ns).remove(h),
                }
                self.host.alloc.free(e.slot);
                self.stats.blocks -= 1;
            }
            if e.disk.is_some() {
                let d = self.disk_mut();
                d.tier.policy(ns).remove(h);
                d.free_slot(e.key, e.disk);
            }
            self.remove_visible(h, from);
            match from {
                TierKind::Host => out.host += 1,
                TierKind::Disk => out.disk += 1,
            }
        }
        out
    }

    /// The router feed's event log.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// Every held block with its namespace's id and its tier, consistent with
    /// `events().last_sequence()`.
    pub fn snapshot(&self) -> (u64, Vec<(BlockKey, NamespaceId, TierKind)>) {
        let blocks = self
            .index
            .iter()
            .filter(|(_, e)| e.state == EntryState::Committed)
            .map(|(h, e)| {
                let tier = if self.servable_from_host(h) { TierKind::Host } else { TierKind::Disk };
                (e.key, self.namespaces.get(e.key.ns).id, tier)
            })
            .collect();
        (self.events.last_sequence(), blocks)
    }

    /// Drops a reserved entry and its slot.
    fn drop_reserved(&mut self, h: Handle) {
        let e = self.drop_entry(h);
        self.host.alloc.free(e.slot);
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
            self.host.policy(held.ns).insert(h, &access);
            self.queue_writeback(h);
            let parent = parent.and_then(|p| self.index.try_get(p)).map(|p| p.key.hash);
            self.log(key, EventKind::Stored { tier: TierKind::Host, parent });
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
            self.drop_reserved(h);
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

    /// Pins the longest leading run of `hashes` servable from the pool and counts it as a use.
    /// Returns the lease id (0 if nothing was pinned) and the slots in prefix order. Blocks only
    /// on disk end the run: promote them first ([`begin_promotions`](Self::begin_promotions)).
    pub fn acquire(
        &mut self,
        client: ClientId,
        ns: NsIdx,
        hashes: &[BlockHash],
    ) -> Result<(u64, Vec<SlotId>), CacheError> {
        let matched = self.host_prefix(ns, hashes);
        self.charge(client, matched)?;
        self.namespaces.touch(ns);
        let mut pinned = Vec::with_capacity(matched);
        for &hash in &hashes[..matched] {
            let h = self.index.find(&BlockKey { ns, hash }).expect("matched prefix is indexed");
            if !self.pin(h, &mut pinned) {
                break;
            }
            self.used(h);
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

    /// Blocks `client` has reserved or pinned now.
    pub fn held_by(&self, client: ClientId) -> usize {
        self.held_by_client.get(&client).copied().unwrap_or(0)
    }

    /// Releases everything a client held: aborts its reservations, drops its pins, ends its
    /// namespace registrations.
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
        for ns in self.attached.remove(&client).unwrap_or_default() {
            self.namespaces.get_mut(ns).attached -= 1;
        }
    }

    /// Where a block's bytes live in the pool mapping: (segment, byte offset), past the header.
    pub fn slot_location(&self, slot: SlotId) -> (u32, u64) {
        let (segment, offset) = self.host.alloc.location(slot);
        (segment, offset + self.header_bytes)
    }

    /// Where a whole host slot (header included) lives: (segment, byte offset).
    pub fn host_slot_start(&self, slot: SlotId) -> (u32, u64) {
        self.host.alloc.location(slot)
    }

    /// Bytes before each block in its slot.
    pub fn header_bytes(&self) -> u64 {
        self.header_bytes
    }

    /// Counters and gauges.
    pub fn stats(&self) -> CacheStats {
        CacheStats {
            used_bytes: self.host.alloc.used_bytes(),
            namespaces: self.namespaces.len() as u64,
            ..self.stats.clone()
        }
    }

    /// Heap bytes of the index and policies (for the per-block memory benchmark).
    pub fn metadata_heap_bytes(&self) -> usize {
        let disk = self.disk.as_ref().map_or(0, |d| d.heap_bytes());
        self.index.heap_bytes() + self.host.policies.iter().map(|p| p.heap_bytes()).sum::<usize>() + disk
    }
}

#[cfg(test)]
mod tests;
