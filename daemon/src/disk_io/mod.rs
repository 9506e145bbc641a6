//! The disk tier's mechanism: spill files, their io_uring rings and their persistent indexes.
//!
//! What moves where is decided by the cache (`kvtier_core::cache`, pure logic); this module moves the
//! bytes between pool slots and spill slots, verifies them, and keeps the redb index of each
//! spill file up to date from a persister thread (group commit, ordered).

pub mod format;
pub mod ring;
pub mod spill;
pub mod store;

use crate::config::DiskConfig;
use crate::pool::HostPool;
use crate::supervise::{Part, Parts, Role};
use format::{SlotHeader, HEADER_BYTES};
use kvtier_core::alloc::SlabAllocator;
use kvtier_core::block::SlotId;
use kvtier_core::cache::{BlockCache, DiskChange, DiskSetup};
use ring::{Dir, IoOp, Ring};
use spill::{Found, SpillFile};
use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;
use store::{Opened, Store, StoreOp, StoredBlock};
use tracing::{info, warn};

/// Whether the disk still works, and why not.
#[derive(Default)]
pub struct Health {
    failed: AtomicBool,
    reason: Mutex<Option<String>>,
}

impl Health {
    /// Records the first failure; returns true if this call was the first.
    pub fn fail(&self, reason: String) -> bool {
        let first = !self.failed.swap(true, Ordering::SeqCst);
        if first {
            *self.reason.lock().unwrap_or_else(|e| e.into_inner()) = Some(reason);
        }
        first
    }

    /// Whether a failure was recorded.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }

    /// The first failure's reason.
    pub fn reason(&self) -> Option<String> {
        self.reason.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

enum PersistMsg {
    Ops(Vec<(usize, StoreOp)>),
    /// Answered once everything sent before it is committed.
    Barrier(mpsc::Sender<()>),
}

struct Device {
    spill: SpillFile,
    ring: Ring,
}

/// What recovery found in the persistent indexes.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Blocks servable again.
    pub restored: u64,
    /// Entries dropped (past a shrunk file's end, duplicates, unknown namespaces).
    pub dropped: u64,
}

/// Spill files, rings and indexes of all configured directories.
pub struct DiskTier {
    devices: Vec<Device>,
    stores: Arc<Vec<Store>>,
    slab_bytes: u64,
    slabs_per_device: u32,
    persist: Mutex<Option<mpsc::Sender<PersistMsg>>>,
    persister: Option<std::thread::JoinHandle<Option<()>>>,
    health: Arc<Health>,
    generation_floor: u64,
    config: DiskConfig,
}

impl DiskTier {
    /// Opens (or creates) the spill file and index in every directory of `cfg`, with the pool's
    /// segments registered for direct I/O.
    /// Failures (now or later, from any thread) are recorded in `health`.
    /// Its threads (rings, persister) run as supervised parts of `parts`.
    pub fn open(
        cfg: &DiskConfig,
        pool: &HostPool,
        health: Arc<Health>,
        parts: &Parts,
        stall_after: Duration,
    ) -> anyhow::Result<Self> {
        let slab_bytes = pool.geometry().slab_bytes;
        let slabs = cfg.bytes_per_dir.as_u64().saturating_sub(HEADER_BYTES) / slab_bytes;
        anyhow::ensure!(
            slabs > 0 && slabs <= u32::MAX as u64 / cfg.dirs.len().max(1) as u64,
            "disk.bytes_per_dir: {slabs} slabs"
        );
        let regions: Vec<_> = pool.segments().iter().map(|s| (s.as_ptr() as usize, s.len() as usize)).collect();
        let (mut devices, mut stores, mut floor) = (Vec::new(), Vec::new(), 0);
        for (i, dir) in cfg.dirs.iter().enumerate() {
            let (spill, found) = SpillFile::open(dir, slab_bytes, slabs)?;
            let (store, opened, f) = Store::open(dir, spill.superblock.uuid)?;
            match (&found, &opened) {
                (Found::Fresh(why), _) => info!("disk tier: {why}"),
                (_, Opened::Reset) => {
                    warn!("disk tier: the index in {} is not this spill file's: starting empty", dir.display())
                }
                (Found::Resized { from }, _) => {
                    warn!(
                        "disk tier: {} resized from {from} to {slabs} slabs; blocks past the end are dropped",
                        spill.path.display()
                    )
                }
                (Found::Reused, _) => {}
            }
            let part = parts.add(format!("ring-{i}"), Role::Disk, Some(stall_after));
            let ring = Ring::start(spill.file.as_raw_fd(), &regions, cfg.queue_depth, part)?;
            floor = floor.max(f);
            devices.push(Device { spill, ring });
            stores.push(store);
        }
        let stores = Arc::new(stores);
        let (tx, rx) = mpsc::channel();
        let persister = {
            let (stores, health) = (Arc::clone(&stores), Arc::clone(&health));
            let part = parts.add("persister", Role::Disk, Some(stall_after));
            crate::supervise::thread(part, move |part| persist_loop(rx, &stores, &health, part))?
        };
        Ok(Self {
            devices,
            stores,
            slab_bytes,
            slabs_per_device: slabs as u32,
            persist: Mutex::new(Some(tx)),
            persister: Some(persister),
            health,
            generation_floor: floor,
            config: cfg.clone(),
        })
    }

    /// The cache-side layout of these spill files.
    pub fn setup(&self) -> DiskSetup {
        let total = self.slabs_per_device * self.devices.len() as u32;
        DiskSetup {
            alloc: SlabAllocator::new(total, self.slab_bytes, self.slabs_per_device),
            header_bytes: HEADER_BYTES,
            admission: self.config.admission,
            reserve_fraction: self.config.reserve_fraction,
        }
    }

    /// Paths of the spill files.
    pub fn spill_paths(&self) -> Vec<PathBuf> {
        self.devices.iter().map(|d| d.spill.path.clone()).collect()
    }

    /// Whether the disk still works.
    pub fn health(&self) -> &Health {
        &self.health
    }

    /// The configuration this tier runs with.
    pub fn config(&self) -> &DiskConfig {
        &self.config
    }

    /// Re-creates every block of the persistent indexes in `cache` (disk-only, verified on
    /// promote) and forgets the entries that cannot be restored.
    pub fn recover(&self, cache: &mut BlockCache) -> anyhow::Result<Recovery> {
        cache.set_generation_base(self.generation_floor);
        let mut report = Recovery::default();
        for (dev, store) in self.stores.iter().enumerate() {
            let (restored, drop) = restore(cache, dev as u32, self.slabs_per_device, store.load()?);
            report.restored += restored;
            report.dropped += drop.len() as u64;
            store.apply(&drop)?;
        }
        Ok(report)
    }

    /// (spill file, byte offset in the file) of a disk slot at allocator location `at`.
    fn file_at(&self, at: (u32, u64)) -> (&Device, u64) {
        (&self.devices[at.0 as usize], SpillFile::file_offset(at.1))
    }

    /// Queues a write of `len` bytes of pool memory at `addr` (in segment `segment`) to disk
    /// location `at`; the future resolves when it completed.
    pub fn write(&self, segment: u32, addr: usize, len: u64, at: (u32, u64)) -> impl Future<Output = io::Result<()>> {
        self.transfer(Dir::Write, segment, addr, len, at)
    }

    /// Queues a read of `len` bytes at disk location `at` into pool memory at `addr` (in segment
    /// `segment`); the future resolves when it completed.
    pub fn read(&self, segment: u32, addr: usize, len: u64, at: (u32, u64)) -> impl Future<Output = io::Result<()>> {
        self.transfer(Dir::Read, segment, addr, len, at)
    }

    fn transfer(
        &self,
        dir: Dir,
        segment: u32,
        addr: usize,
        len: u64,
        at: (u32, u64),
    ) -> impl Future<Output = io::Result<()>> {
        let (dev, offset) = self.file_at(at);
        dev.ring.submit(IoOp { dir, buf_index: segment as u16, addr, len: len as u32, offset })
    }

    /// Transfers submitted to the spill files' rings and not yet done.
    pub fn queued_ios(&self) -> u64 {
        self.devices.iter().map(|d| d.ring.queued()).sum()
    }

    /// Hands `changes` to the persister thread (applied in order, group-committed).
    pub fn persist(&self, cache: &BlockCache, changes: Vec<DiskChange>) {
        if changes.is_empty() {
            return;
        }
        let ops = changes.into_iter().map(|c| self.store_op(cache, c)).collect();
        self.send(PersistMsg::Ops(ops));
    }

    fn send(&self, msg: PersistMsg) {
        let tx = self.persist.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(tx) = tx.as_ref() {
            let _ = tx.send(msg);
        }
    }

    /// Blocks until every change handed to [`persist`](Self::persist) so far is committed.
    pub fn sync_index(&self) {
        let (tx, rx) = mpsc::channel();
        self.send(PersistMsg::Barrier(tx));
        // Bounded: a persister that stalled must not keep the daemon from exiting.
        if rx.recv_timeout(Duration::from_secs(30)).is_err() && !self.health.failed() {
            self.health.fail("the disk index was not committed within 30 s".into());
        }
    }

    fn store_op(&self, cache: &BlockCache, change: DiskChange) -> (usize, StoreOp) {
        let local =
            |slot: SlotId| ((slot.slab / self.slabs_per_device) as usize, slot.slab % self.slabs_per_device, slot.slot);
        match change {
            DiskChange::Stored { key, slot, generation, checksum } => {
                let (dev, slab, slot) = local(slot);
                let ns = cache.namespace(key.ns);
                let b = StoredBlock {
                    namespace: ns.id,
                    hash: key.hash,
                    slab,
                    slot,
                    block_bytes: ns.block_bytes,
                    generation,
                    checksum,
                };
                (dev, StoreOp::Put(b))
            }
            DiskChange::Removed { key, slot } => {
                let (dev, slab, slot) = local(slot);
                (dev, StoreOp::Delete { namespace: cache.namespace(key.ns).id, hash: key.hash, slab, slot })
            }
        }
    }
}

impl Drop for DiskTier {
    fn drop(&mut self) {
        self.persist.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(t) = self.persister.take() {
            let _ = t.join();
        }
    }
}

/// Re-creates in `cache` the blocks the index of spill file `dev` (of `slabs_per_device` slabs)
/// recorded; returns how many were restored and the deletions of those that could not be (past
/// the file's end, a slot taken twice, a namespace that cannot be registered). Whatever the
/// index holds, nothing here panics (`fuzz/`: `disk_recovery`).
pub fn restore(
    cache: &mut BlockCache,
    dev: u32,
    slabs_per_device: u32,
    mut blocks: Vec<StoredBlock>,
) -> (u64, Vec<StoreOp>) {
    // Ascending slots make allocator claims O(1); the newest generation of a slot wins.
    blocks.sort_by_key(|b| (b.slab, b.slot, std::cmp::Reverse(b.generation)));
    let mut restored = 0;
    let mut drop = Vec::new();
    for b in blocks {
        let ok = b.slab < slabs_per_device && {
            let slot = SlotId { slab: dev * slabs_per_device + b.slab, slot: b.slot };
            cache.restore_disk_block(b.namespace, b.block_bytes, b.hash, slot).is_ok()
        };
        match ok {
            true => restored += 1,
            false => drop.push(StoreOp::Delete { namespace: b.namespace, hash: b.hash, slab: b.slab, slot: b.slot }),
        }
    }
    (restored, drop)
}

/// Applies batches in order; everything queued when a batch starts goes into one transaction
/// per spill file (group commit).
fn persist_loop(rx: mpsc::Receiver<PersistMsg>, stores: &[Store], health: &Health, part: &Part) {
    loop {
        part.waiting(true);
        let Ok(first) = rx.recv() else { return };
        part.waiting(false);
        crate::fault::point(&part.name);
        let mut per_dev: Vec<Vec<StoreOp>> = vec![Vec::new(); stores.len()];
        let mut barriers = Vec::new();
        for msg in std::iter::once(first).chain(rx.try_iter()) {
            match msg {
                PersistMsg::Ops(ops) => ops.into_iter().for_each(|(dev, op)| per_dev[dev].push(op)),
                PersistMsg::Barrier(done) => barriers.push(done),
            }
        }
        if !health.failed() {
            for (dev, ops) in per_dev.iter().enumerate().filter(|(_, ops)| !ops.is_empty()) {
                if let Err(e) = stores[dev].apply(ops) {
                    health.fail(format!("writing the disk index of spill file {dev}: {e:#}"));
                }
            }
        }
        for b in barriers {
            let _ = b.send(());
        }
        part.beat();
    }
}

/// Fills the header of a host slot at `slot` (header, then `block_bytes` of payload) and returns
/// the payload's checksum.
///
/// # Safety
/// `slot` must point at a whole host slot that nobody writes while this runs.
pub unsafe fn seal_slot(slot: *mut u8, header: &SlotHeader, block_bytes: u64) -> u64 {
    let payload = std::slice::from_raw_parts(slot.add(HEADER_BYTES as usize), block_bytes as usize);
    let checksum = SlotHeader::checksum_of(payload);
    let head = std::slice::from_raw_parts_mut(slot, HEADER_BYTES as usize);
    SlotHeader { checksum, ..*header }.encode_into(head);
    checksum
}
