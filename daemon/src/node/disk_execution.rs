//! Moving blocks between the pool and the spill files: the background demoter, and promotion on
//! acquire and prefetch. The cache plans (under the lock); the I/O runs outside it; the outcome
//! goes back to the cache, and what changed goes to the persistent index.

use super::Node;
use crate::disk_io::format::{SlotHeader, HEADER_BYTES};
use crate::disk_io::{seal_slot, DiskTier};
use crate::fault;
use crate::supervise::{self, Part, Role};
use kvtier_core::block::{BlockHash, BlockKey, NsIdx, SlotId};
use kvtier_core::cache::{BlockCache, PromotionOutcome, TierKind};
use kvtier_core::namespace::NamespaceId;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{error, warn};

/// The disk tier as the node runs it.
pub(crate) struct DiskSide {
    /// The spill files, their rings and the index persister (None: host tier only).
    pub(crate) tier: Option<DiskTier>,
    /// Set once an I/O or index failure turned the tier off.
    pub(crate) health: Arc<crate::disk_io::Health>,
    /// Wakes the demoter when the host tier wants room.
    pub(crate) demote_wake: tokio::sync::Notify,
    /// Counts finished promotions (Acquire waits on it for blocks being promoted).
    pub(crate) promoted: tokio::sync::watch::Sender<u64>,
    /// Supervision of promotions (tasks of their own, one per Acquire or Prefetch that reads
    /// from disk).
    pub(crate) promoter: Arc<Part>,
}

/// A planned move with everything the I/O needs, resolved under the lock.
struct Job<T> {
    plan: T,
    key: BlockKey,
    namespace: NamespaceId,
    block_bytes: u64,
    stride: u64,
    /// Host slot start: (segment, offset).
    host: (u32, u64),
    /// Disk slot: (spill file, offset in its slab area).
    disk: (u32, u64),
}

fn job<T>(c: &BlockCache, plan: T, key: BlockKey, host: SlotId, disk: SlotId) -> Job<T> {
    let ns = c.namespace(key.ns);
    Job {
        plan,
        key,
        namespace: ns.id,
        block_bytes: ns.block_bytes,
        stride: ns.stride,
        host: c.host_slot_start(host),
        disk: c.disk_location(disk),
    }
}

impl Node {
    /// Starts the background tasks, each supervised: the demoter when there is a disk tier, the
    /// load sampler, and the watchdog that turns off what a failed part served (call once, from
    /// the runtime).
    pub fn start_background(self: &Arc<Self>) {
        let stall_after = Some(Duration::from_secs(self.config.server.stall_after_secs.max(1)));
        if self.disk.tier.is_some() {
            let part = self.parts.add("demoter", Role::Disk, stall_after);
            supervise::task(Arc::clone(&part), Arc::clone(self).demote_loop(part));
        }
        let node = Arc::clone(self);
        let part = self.parts.add("load", Role::Load, stall_after);
        let load = Arc::clone(&part);
        supervise::task(part, async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                fault::point_async(&load.name).await;
                node.sample_load();
                node.trim_memory();
                load.beat();
            }
        });
        let node = Arc::clone(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                for (part, reason) in node.parts.newly_down() {
                    node.part_failed(&part, &reason);
                }
            }
        });
    }

    /// Address of a host slot start in the daemon's mapping.
    pub(super) fn slot_ptr(&self, (segment, offset): (u32, u64)) -> *mut u8 {
        // SAFETY: the cache only hands out locations inside the pool's segments.
        unsafe { self.pool.segments()[segment as usize].as_ptr().add(offset as usize) }
    }

    fn disk(&self) -> &DiskTier {
        self.disk.tier.as_ref().expect("disk tier")
    }

    /// Demotes blocks whenever the pool runs short of free or cold room, and writes admitted
    /// blocks back otherwise. Keeps up to two batches of `queue depth x files` in flight, so
    /// the rings never drain between batches.
    async fn demote_loop(self: Arc<Self>, part: Arc<Part>) {
        let cfg = self.disk().config();
        let batch = (cfg.queue_depth as usize * cfg.dirs.len()).clamp(8, 512);
        let in_flight = Arc::new(tokio::sync::Semaphore::new(2));
        loop {
            let permit = Arc::clone(&in_flight).acquire_owned().await.expect("semaphore never closed");
            part.beat();
            fault::point_async(&part.name).await;
            self.check_disk_health();
            let jobs: Vec<_> = {
                let mut c = self.cache();
                let plan = c.plan_demotions(batch);
                plan.into_iter().map(|d| job(&c, d, d.key, d.host, d.disk)).collect()
            };
            if jobs.is_empty() {
                drop(permit);
                let _ = tokio::time::timeout(Duration::from_millis(100), self.disk.demote_wake.notified()).await;
                continue;
            }
            let node = Arc::clone(&self);
            tokio::spawn(async move {
                node.run_demotions(jobs).await;
                drop(permit);
                node.disk.demote_wake.notify_one();
            });
        }
    }

    async fn run_demotions(&self, jobs: Vec<Job<kvtier_core::cache::Demotion>>) {
        let started = Instant::now();
        let writes: Vec<_> = jobs
            .iter()
            .map(|j| {
                let ptr = self.slot_ptr(j.host);
                let header = SlotHeader {
                    namespace: j.namespace,
                    hash: j.key.hash,
                    block_bytes: j.block_bytes,
                    generation: j.plan.generation,
                    checksum: 0,
                };
                // SAFETY: the slot is pinned and committed: bytes nobody writes.
                let checksum = unsafe { seal_slot(ptr, &header, j.block_bytes) };
                (checksum, self.disk().write(j.host.0, ptr as usize, j.stride, j.disk))
            })
            .collect();
        let mut results = Vec::with_capacity(writes.len());
        for (checksum, write) in writes {
            let result = write.await;
            self.metrics.disk_write_latency.observe(started.elapsed());
            results.push(match result {
                Ok(()) => Some(checksum),
                Err(e) => {
                    self.disk_failed(format!("writing a block to disk: {e}"));
                    None
                }
            });
        }
        let mut c = self.cache();
        for (j, r) in jobs.iter().zip(results) {
            c.complete_demotion(&j.plan, r);
        }
        let changes = c.take_disk_changes();
        self.disk().persist(&c, changes);
    }

    /// Clean shutdown: lets queued write-backs finish (up to `budget`) and commits the disk
    /// index, so that a restart serves every admitted block.
    pub async fn shutdown(&self, budget: Duration) {
        let Some(disk) = &self.disk.tier else { return };
        let deadline = Instant::now() + budget;
        while self.cache().disk_backlog() > 0 && Instant::now() < deadline {
            self.disk.demote_wake.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = self.cache().disk_backlog();
        if left > 0 {
            warn!("shutdown: {left} blocks not written to disk within {budget:?}");
        }
        tokio::task::block_in_place(|| disk.sync_index());
    }

    /// Turns the disk tier off for good: logs once, forgets every disk copy.
    pub(super) fn disk_failed(&self, reason: String) {
        self.disk.health.fail(reason);
        let forgotten = {
            let mut c = self.cache();
            if !c.has_disk() {
                return;
            }
            c.disable_disk()
        };
        let reason = self.disk.health.reason().unwrap_or_default();
        error!("disk tier FAILED, running host-only from now on: {reason}");
        if forgotten > 0 {
            warn!("disk tier off: {forgotten} blocks held only on disk are gone (a miss, never wrong data)");
        }
    }

    fn check_disk_health(&self) {
        if self.disk.health.failed() && self.cache().has_disk() {
            self.disk_failed(self.disk.health.reason().unwrap_or_default());
        }
    }

    /// Promotes the disk-only blocks of the held prefix of `hashes` and waits for them (and for
    /// promotions of that prefix started by others), up to `disk.promote_timeout_ms`.
    pub async fn promote(self: &Arc<Self>, ns: NsIdx, hashes: &[BlockHash]) {
        let Some(disk) = &self.disk.tier else { return };
        let deadline = Instant::now() + Duration::from_millis(disk.config().promote_timeout_ms);
        loop {
            let mut changed = self.disk.promoted.subscribe();
            let (pending, jobs) = {
                let mut c = self.cache();
                if !c.has_disk() {
                    return;
                }
                let plan = c.begin_promotions(ns, hashes);
                let jobs: Vec<_> = plan.started.into_iter().map(|p| job(&c, p, p.key, p.host, p.disk)).collect();
                (plan.pending, jobs)
            };
            if !jobs.is_empty() {
                // In a task of its own: the reads finish (and their slots are accounted for)
                // even if this caller stops waiting at its deadline, so that a disk that hangs
                // delays a load by at most `promote_timeout_ms`, never forever.
                let (node, started) = (Arc::clone(self), jobs.len());
                let run = tokio::spawn(async move {
                    fault::point_async("promoter").await;
                    node.run_promotions(&jobs).await;
                    node.disk.promoted.send_modify(|n| *n += 1);
                });
                match tokio::time::timeout_at(deadline.into(), run).await {
                    Err(_) => return,
                    Ok(Err(e)) => {
                        // Its blocks stay PROMOTING (never served, their slots never reused
                        // under a read that may still land): the disk tier goes off.
                        let why = e.try_into_panic().map(|p| supervise::panic_message(p.as_ref())).unwrap_or_default();
                        self.disk.promoter.fail(format!("a promotion panicked: {why}"));
                        return;
                    }
                    Ok(Ok(())) if pending == started => return,
                    Ok(Ok(())) => continue,
                }
            }
            if pending == 0 {
                return;
            }
            if tokio::time::timeout_at(deadline.into(), changed.changed()).await.is_err() {
                return;
            }
        }
    }

    async fn run_promotions(&self, jobs: &[Job<kvtier_core::cache::Promotion>]) {
        let disk = self.disk();
        let started = Instant::now();
        let reads: Vec<_> =
            jobs.iter().map(|j| disk.read(j.host.0, self.slot_ptr(j.host) as usize, j.stride, j.disk)).collect();
        let mut outcomes = Vec::with_capacity(reads.len());
        for (j, read) in jobs.iter().zip(reads) {
            let result = read.await;
            self.metrics.disk_read_latency.observe(started.elapsed());
            outcomes.push(match result {
                Ok(()) => {
                    // SAFETY: the slot is PROMOTING: pinned, not served, written only by this read.
                    let slot = unsafe { std::slice::from_raw_parts(self.slot_ptr(j.host), j.stride as usize) };
                    if SlotHeader::verify(slot, HEADER_BYTES as usize, &j.namespace, &j.key.hash, j.block_bytes) {
                        PromotionOutcome::Verified
                    } else {
                        warn!(hash = ?j.key.hash, disk = ?j.disk, "disk slot is torn, corrupt or stale: block dropped");
                        PromotionOutcome::Corrupt
                    }
                }
                Err(e) => {
                    self.disk_failed(format!("reading a block from disk: {e}"));
                    PromotionOutcome::IoError
                }
            });
        }
        let mut c = self.cache();
        for (j, outcome) in jobs.iter().zip(outcomes) {
            c.complete_promotion(&j.plan, outcome);
        }
        let changes = c.take_disk_changes();
        disk.persist(&c, changes);
    }

    /// Starts promoting the disk-only blocks of the held prefix of `hashes` in the background;
    /// returns how many there are.
    pub fn prefetch(self: &Arc<Self>, ns: NsIdx, hashes: Vec<BlockHash>) -> usize {
        let on_disk = self.cache().peek_tiers(ns, &hashes).iter().filter(|&&t| t == TierKind::Disk).count();
        if on_disk > 0 {
            let node = Arc::clone(self);
            tokio::spawn(async move { node.promote(ns, &hashes).await });
        }
        on_disk
    }
}
