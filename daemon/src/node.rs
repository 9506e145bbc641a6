//! The daemon's core as the servers see it: the tiers' state behind one lock, the pool, the disk
//! tier's mechanism and the metrics. Servers translate wire messages into calls on [`Node`] and
//! nothing more.

mod disk_execution;
mod feed;
mod kv_copy;
mod shipping;
mod source;
mod staged;

pub use feed::{CacheView, Feed};
pub use kv_copy::{Blocks, CopyWatch, KvCache, KvCopyError, Loaded, Saved};
pub use shipping::{offer_fit, Offer, Pulled, Shipment};
pub use source::{verify_from_wire, GrpcSource, Ship, ShipOrder, Source, SourceOffer};

use crate::config::Config;
use crate::device::DeviceBackend;
use crate::disk_io::{DiskTier, Health};
use crate::metrics::{Metrics, NamespaceUsage};
use crate::pool::{HostPool, LockMode, PoolGeometry};
use crate::supervise::{Parts, Role};
use kvtier_core::alloc::SlabAllocator;
use kvtier_core::block::{BlockHash, NsIdx};
use kvtier_core::cache::{BlockCache, CacheError, CacheLimits, CacheStats, ClientId, DiskStats, Reserved, TierKind};
use kvtier_core::namespace::{NamespaceId, Naming};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use tracing::{error, info};

fn random_instance_id() -> String {
    let mut b = [0u8; 8];
    let _ = std::fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b));
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{:016x}{:08x}", u64::from_le_bytes(b), nanos as u32)
}

/// A slot as clients address it: (segment, byte offset).
pub type SlotLocation = (u32, u64);

/// Outcome of reserving one block, with its location.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservedAt {
    /// Write the block here, then commit.
    Slot(SlotLocation),
    /// Held already.
    Present,
    /// No room.
    NoSpace,
}

/// Shared state of a running daemon.
pub struct Node {
    cache: Mutex<BlockCache>,
    // Declared before `pool`: its rings must stop before the pool memory they target is unmapped.
    disk: disk_execution::DiskSide,
    /// How blocks move between engine memory and the pool (dropped before the pool it registered).
    copies: kv_copy::Copies,
    /// Daemon-to-daemon transfers: the UCX thread, offers held for peers, channels to sources.
    transfers: shipping::Transfers,
    pool: HostPool,
    /// Server-side counters.
    pub metrics: Metrics,
    /// The configuration the daemon runs with.
    pub config: Config,
    /// Connector clients: ids, live connections, how they named their namespaces.
    pub clients: ClientState,
    /// The router feed: this run's id and the newest event's sequence.
    pub feed: feed::Feed,
    /// The load signal: connector requests over a sliding window.
    pub load: LoadSignal,
    /// The supervised background parts (tasks and threads).
    pub parts: Arc<Parts>,
}

/// Connector clients as the node keeps them.
pub struct ClientState {
    next_id: AtomicU64,
    /// How clients named each namespace, by index (None: restored from disk, not registered
    /// since).
    names: Mutex<Vec<Option<Naming>>>,
    /// The connector socket's live connections (for the admin view).
    pub connections: crate::clients::Connections,
    /// Connections opened in all at the last heap trim.
    trimmed_at: AtomicU64,
}

/// Connector requests served, sampled for the load signal routers read.
pub struct LoadSignal {
    /// Connector requests served since start.
    pub requests_total: AtomicU64,
    /// (when, requests_total) samples of the last ~10 s.
    window: Mutex<std::collections::VecDeque<(std::time::Instant, u64)>>,
}

/// Block handles one step of a Discard visits while it holds the cache lock (about a
/// millisecond of work).
pub const DISCARD_BATCH: usize = 4096;

/// The cache, locked; on unlock, routers watching the event feed are woken if it grew.
struct CacheGuard<'a> {
    guard: MutexGuard<'a, BlockCache>,
    events_at_lock: u64,
    events: &'a tokio::sync::watch::Sender<u64>,
}

impl std::ops::Deref for CacheGuard<'_> {
    type Target = BlockCache;
    fn deref(&self) -> &BlockCache {
        &self.guard
    }
}

impl std::ops::DerefMut for CacheGuard<'_> {
    fn deref_mut(&mut self) -> &mut BlockCache {
        &mut self.guard
    }
}

impl Drop for CacheGuard<'_> {
    fn drop(&mut self) {
        let now = self.guard.events().last_sequence();
        if now != self.events_at_lock {
            self.events.send_replace(now);
        }
    }
}

impl Node {
    /// Creates the pool and the host tier from `config`.
    pub fn new(config: Config) -> anyhow::Result<Self> {
        config.validate()?;
        let p = &config.pool;
        let geometry = PoolGeometry::plan(p.bytes.as_u64(), p.segment_bytes.as_u64(), p.slab_bytes.as_u64())?;
        let lock = if p.allow_unlocked { LockMode::BestEffort } else { LockMode::Required };
        let pool = HostPool::create(geometry.clone(), p.hugetlb, lock)?;
        let device = crate::device::open(config.device.backend, &pool)?;
        let parts = Arc::new(Parts::default());
        let stall_after = std::time::Duration::from_secs(config.server.stall_after_secs.max(1));
        let peer = match config.transfer.enabled {
            true => Some(
                crate::transfer::Peer::start(&config.transfer, &parts, stall_after)
                    .map_err(|e| anyhow::anyhow!("daemon-to-daemon transfer (UCX): {e:#}"))?,
            ),
            false => None,
        };
        let source_tls =
            config.grpc.tls.enabled().then(|| kvtier_net::tls::client_tls(&config.grpc.tls)).transpose()?;
        let alloc = || SlabAllocator::new(geometry.slab_count, geometry.slab_bytes, geometry.slabs_per_segment);
        let limits = CacheLimits {
            max_namespaces: config.server.max_namespaces as usize,
            max_held_per_client: config.server.max_held_blocks_per_client as usize,
            event_capacity: config.grpc.event_capacity as usize,
        };
        let disk_health = Arc::new(Health::default());
        let (cache, disk) = match config.disk.dirs.is_empty() {
            true => (BlockCache::new(alloc(), config.policy.eviction, limits), None),
            false => match Self::open_disk(&config, &pool, &disk_health, &parts, alloc(), limits.clone()) {
                Ok((cache, disk)) => (cache, Some(disk)),
                Err(e) if !config.disk.optional => anyhow::bail!(
                    "disk tier: {e:#}\n(kvtierd stops rather than run without the disk tier it was given; with \
                     disk.optional = true (--disk-optional) it runs host-only, reported not ready)"
                ),
                Err(e) => {
                    let reason = format!("{e:#}");
                    error!("disk tier OFF, running host-only: {reason}");
                    disk_health.fail(reason);
                    (BlockCache::new(alloc(), config.policy.eviction, limits), None)
                }
            },
        };
        Ok(Self {
            cache: Mutex::new(cache),
            disk: disk_execution::DiskSide {
                tier: disk,
                health: disk_health,
                demote_wake: tokio::sync::Notify::new(),
                promoted: tokio::sync::watch::Sender::new(0),
                promoter: parts.add("promoter", Role::Disk, None),
            },
            copies: kv_copy::Copies {
                backend: device,
                watch: CopyWatch::new(parts.add("copies", Role::DeviceCopies, Some(stall_after))),
            },
            transfers: shipping::Transfers {
                peer,
                offers: Mutex::new(std::collections::HashMap::new()),
                next_id: AtomicU64::new(0),
                sources: kvtier_net::tls::Channels::new(source_tls),
            },
            pool,
            metrics: Metrics::default(),
            config,
            clients: ClientState {
                next_id: AtomicU64::new(1),
                names: Mutex::new(Vec::new()),
                connections: Default::default(),
                trimmed_at: AtomicU64::new(0),
            },
            feed: feed::Feed { instance_id: random_instance_id(), events: tokio::sync::watch::Sender::new(0) },
            load: LoadSignal {
                requests_total: AtomicU64::new(0),
                window: Mutex::new(std::collections::VecDeque::new()),
            },
            parts,
        })
    }

    fn open_disk(
        config: &Config,
        pool: &HostPool,
        health: &Arc<Health>,
        parts: &Parts,
        alloc: SlabAllocator,
        limits: CacheLimits,
    ) -> anyhow::Result<(BlockCache, DiskTier)> {
        let stall_after = std::time::Duration::from_secs(config.server.stall_after_secs.max(1));
        let disk = DiskTier::open(&config.disk, pool, Arc::clone(health), parts, stall_after)?;
        let mut cache = BlockCache::with_disk(alloc, config.policy.eviction, limits, disk.setup());
        let r = disk.recover(&mut cache)?;
        let st = cache.disk_stats().unwrap_or_default();
        info!(
            files = ?disk.spill_paths(),
            capacity = %bytesize::ByteSize(st.capacity_bytes),
            restored = r.restored,
            dropped = r.dropped,
            admission = config.disk.admission.name(),
            "disk tier ready"
        );
        Ok((cache, disk))
    }

    /// The cache's lock. Its invariants hold between calls; a panic mid-call is a bug we still
    /// survive, so a poisoned lock is taken as it is.
    fn lock_cache(&self) -> MutexGuard<'_, BlockCache> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The cache, locked (every operation is microseconds of bookkeeping).
    fn cache(&self) -> CacheGuard<'_> {
        let guard = self.lock_cache();
        CacheGuard { events_at_lock: guard.events().last_sequence(), guard, events: &self.feed.events }
    }

    /// Node name for the router feed: `grpc.node_name`, else the host name.
    pub fn node_name(&self) -> String {
        match self.config.grpc.node_name.as_str() {
            "" => nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default(),
            name => name.to_string(),
        }
    }

    /// Subscribes to the sequence of the newest router-feed event.
    pub fn watch_events(&self) -> tokio::sync::watch::Receiver<u64> {
        self.feed.events.subscribe()
    }

    /// Records a sample of `requests_total` (call about once a second).
    pub fn sample_load(&self) {
        let mut load = self.load.window.lock().unwrap_or_else(|e| e.into_inner());
        load.push_back((std::time::Instant::now(), self.load.requests_total.load(Ordering::Relaxed)));
        while load.len() > 11 {
            load.pop_front();
        }
    }

    /// Hands freed heap back to the kernel after a burst of connections (64 or more opened since
    /// the last trim; call about once a second). glibc keeps freed memory in its arenas: after 21,000 connections came and
    /// went, RSS stayed at its peak; with a trim it returns to within a few MiB of where it was.
    pub fn trim_memory(&self) {
        let opened = self.metrics.connections_total.load(Ordering::Relaxed);
        let then = self.clients.trimmed_at.load(Ordering::Relaxed);
        if opened >= then + 64 {
            self.clients.trimmed_at.store(opened, Ordering::Relaxed);
            // SAFETY: malloc_trim only returns free memory to the kernel.
            #[cfg(target_env = "gnu")]
            unsafe {
                nix::libc::malloc_trim(0);
            }
        }
    }

    /// Connector requests per second over the last ~10 s of samples.
    pub fn requests_per_second(&self) -> f64 {
        let load = self.load.window.lock().unwrap_or_else(|e| e.into_inner());
        match (load.front(), load.back()) {
            (Some(a), Some(b)) if b.0 > a.0 => (b.1 - a.1) as f64 / (b.0 - a.0).as_secs_f64(),
            _ => 0.0,
        }
    }

    /// This daemon's UCX worker, when daemon-to-daemon transfer is enabled.
    pub fn peer(&self) -> Option<&crate::transfer::Peer> {
        self.transfers.peer.as_ref()
    }

    /// The device backend.
    pub fn device(&self) -> &dyn DeviceBackend {
        self.copies.backend.as_ref()
    }

    /// The pool (for passing segment fds).
    pub fn pool(&self) -> &HostPool {
        &self.pool
    }

    /// A fresh client id for a new connection.
    pub fn new_client(&self) -> ClientId {
        ClientId(self.clients.next_id.fetch_add(1, Ordering::Relaxed))
    }

    /// Registers a namespace for connection `client` (`naming`: how operators select it, its
    /// model what Stats shows), which keeps it from being reclaimed until the client
    /// disconnects; returns its index and slot stride. A full table reclaims an unused
    /// namespace first.
    pub fn register(
        &self,
        client: ClientId,
        id: NamespaceId,
        block_bytes: u64,
        naming: Naming,
    ) -> Result<(NsIdx, u64), CacheError> {
        let mut c = self.cache();
        let new = c.find_namespace(&id).is_none();
        let ns = c.register(id, block_bytes)?;
        c.attach(client, ns);
        if let Some(disk) = &self.disk.tier {
            let changes = c.take_disk_changes();
            disk.persist(&c, changes);
        }
        let mut names = self.clients.names.lock().expect("names lock");
        let i = ns.0 as usize;
        if names.len() <= i {
            names.resize(i + 1, None);
        }
        match new {
            // A new namespace, maybe at a reclaimed index: the old name goes.
            true => names[i] = Some(naming),
            // Restored from disk at start (not named) until a client registers it.
            false => _ = names[i].get_or_insert(naming),
        }
        Ok((ns, c.namespace(ns).stride))
    }

    /// What each namespace holds, in registration order (those restored from disk first; their
    /// model is empty until a client registers them again).
    pub fn namespace_usage(&self) -> Vec<NamespaceUsage> {
        let c = self.cache();
        let names = self.clients.names.lock().expect("names lock");
        (c.registered().into_iter().map(|ns| ns.0 as usize))
            .map(|i| {
                let info = c.namespace(NsIdx(i as u16));
                NamespaceUsage {
                    ns: NsIdx(i as u16),
                    model: names.get(i).cloned().flatten().map(|n| n.model).unwrap_or_default(),
                    id: info.id,
                    block_bytes: info.block_bytes,
                    held: c.events().held(NsIdx(i as u16)),
                    lookups: c.lookups(NsIdx(i as u16)),
                }
            })
            .collect()
    }

    /// Removes every unused block of the namespaces `selector` names from every tier (see
    /// [`kvtier_core::cache::BlockCache::discard`]) and persists the disk index's removals; returns
    /// how many namespaces were selected and what was removed. Blocking: it walks the whole
    /// index, [`DISCARD_BATCH`] handles per hold of the cache lock, so that engines' requests
    /// are served in between (a million blocks take a few hundred milliseconds).
    /// With `dry_run`, removes nothing and counts what the selected namespaces hold now.
    pub fn discard(
        &self,
        selector: &kvtier_core::namespace::NamespaceSelector,
        dry_run: bool,
    ) -> (Vec<NsIdx>, kvtier_core::cache::Discarded) {
        let selected: Vec<bool> = {
            let c = self.cache();
            let names = self.clients.names.lock().expect("names lock");
            let mut selected = vec![false; c.handle_bound_namespaces()];
            for ns in c.registered() {
                let i = ns.0 as usize;
                selected[i] = selector.selects(names.get(i).and_then(Option::as_ref), &c.namespace(ns).id);
            }
            selected
        };
        let chosen: Vec<NsIdx> =
            (selected.iter().enumerate()).filter(|(_, &s)| s).map(|(i, _)| NsIdx(i as u16)).collect();
        let mut out = kvtier_core::cache::Discarded::default();
        if dry_run {
            let c = self.cache();
            for &ns in &chosen {
                let held = c.events().held(ns);
                out += kvtier_core::cache::Discarded { host: held.host, disk: held.disk, busy: 0 };
            }
            return (chosen, out);
        }
        let mut at = 0;
        loop {
            let mut c = self.cache();
            out += c.discard_handles(&selected, at..at + DISCARD_BATCH);
            if let Some(disk) = &self.disk.tier {
                let changes = c.take_disk_changes();
                disk.persist(&c, changes);
            }
            at += DISCARD_BATCH;
            if at >= c.handle_bound() {
                break;
            }
            drop(c);
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
        let n = chosen.len();
        tracing::info!(?selector, selected = n, host = out.host, disk = out.disk, busy = out.busy, "blocks discarded");
        (chosen, out)
    }

    /// Longest held prefix, with the tier of each block.
    pub fn lookup(&self, ns: NsIdx, hashes: &[BlockHash]) -> Vec<TierKind> {
        self.cache().lookup_tiers(ns, hashes)
    }

    /// Reserves slots for a run of blocks.
    pub fn reserve(
        &self,
        client: ClientId,
        ns: NsIdx,
        hashes: &[BlockHash],
        parent: Option<BlockHash>,
    ) -> Result<(u64, Vec<ReservedAt>), CacheError> {
        let mut c = self.cache();
        let (id, outcomes) = c.reserve(client, ns, hashes, parent)?;
        let at = outcomes
            .into_iter()
            .map(|o| match o {
                Reserved::Slot(s) => ReservedAt::Slot(c.slot_location(s)),
                Reserved::Present => ReservedAt::Present,
                Reserved::NoSpace => ReservedAt::NoSpace,
            })
            .collect();
        Ok((id, at))
    }

    /// Commits a reservation.
    pub fn commit(&self, client: ClientId, reservation: u64) -> Result<usize, CacheError> {
        let n = self.cache().commit(client, reservation)?;
        if self.disk.tier.is_some() {
            self.disk.demote_wake.notify_one();
        }
        Ok(n)
    }

    /// Aborts a reservation.
    pub fn abort(&self, client: ClientId, reservation: u64) -> Result<(), CacheError> {
        self.cache().abort(client, reservation)
    }

    /// Pins the longest held prefix, promoting its disk-only blocks first; returns the lease and
    /// the slot locations.
    pub async fn acquire(
        self: &Arc<Self>,
        client: ClientId,
        ns: NsIdx,
        hashes: &[BlockHash],
    ) -> Result<(u64, Vec<SlotLocation>), CacheError> {
        self.promote(ns, hashes).await;
        let mut c = self.cache();
        let (lease, slots) = c.acquire(client, ns, hashes)?;
        Ok((lease, slots.into_iter().map(|s| c.slot_location(s)).collect()))
    }

    /// Releases a lease.
    pub fn release(&self, client: ClientId, lease: u64) -> Result<(), CacheError> {
        self.cache().release(client, lease)
    }

    /// Drops everything a client held.
    pub fn disconnect(&self, client: ClientId) {
        self.cache().disconnect(client)
    }

    /// Host-tier statistics.
    pub fn stats(&self) -> CacheStats {
        self.cache().stats()
    }

    /// Name of the host-tier eviction policy.
    pub fn policy_name(&self) -> &'static str {
        self.cache().policy_name()
    }

    /// Disk-tier statistics: `None` without spill directories; `enabled: false` once it failed.
    pub fn disk_stats(&self) -> Option<DiskStats> {
        if self.config.disk.dirs.is_empty() {
            return None;
        }
        Some(self.cache().disk_stats().unwrap_or_default())
    }

    /// Why the disk tier is off, if it failed.
    pub fn disk_failure(&self) -> Option<String> {
        self.disk.health.reason()
    }

    /// Why `role` is off, if a part serving it failed.
    pub fn role_down(&self, role: Role) -> Option<String> {
        self.parts
            .all()
            .iter()
            .filter(|p| p.role == role)
            .find_map(|p| p.down().map(|why| format!("{}: {why}", p.name)))
    }

    /// Everything configured that is not working, for operators (empty: ready).
    pub fn problems(&self) -> Vec<String> {
        let mut out = self.parts.problems();
        if let Some(why) = self.disk_failure() {
            if !out.iter().any(|p| p.contains("disk tier off")) {
                out.push(format!("disk tier off: {why}"));
            }
        }
        out
    }

    /// Turns off what a failed part served, once, with an error log naming the cause.
    pub fn part_failed(&self, part: &crate::supervise::Part, reason: &str) {
        error!(part = %part.name, "{} FAILED ({reason}): {} off, everything else keeps serving", part.name, part.role.name());
        match part.role {
            Role::Disk => self.disk_failed(format!("{} {reason}", part.name)),
            Role::Transfer | Role::DeviceCopies | Role::Grpc | Role::Metrics | Role::Load => {}
        }
    }

    /// Prometheus text of everything.
    pub fn render_metrics(&self) -> String {
        let (disk, now) = (self.disk_stats(), self.readings());
        let counters = crate::counters::counters(&self.metrics, &self.stats(), disk.as_ref(), &now);
        crate::counters::exposition(&counters) + &self.metrics.render_families(disk.is_some(), &now)
    }

    /// Every scalar counter and gauge ([`crate::counters`]): what `/metrics` exports, for Stats.
    pub fn counters(&self) -> Vec<crate::counters::Counter> {
        crate::counters::counters(&self.metrics, &self.stats(), self.disk_stats().as_ref(), &self.readings())
    }

    /// The mechanism's readings the metrics report besides the counters.
    fn readings(&self) -> crate::metrics::Readings {
        let parts = self.parts.all().iter().map(|p| (p.name.clone(), p.role.name(), p.down().is_none())).collect();
        crate::metrics::Readings {
            pool_locked: self.pool.is_locked(),
            disk_queued_ios: self.disk.tier.as_ref().map_or(0, DiskTier::queued_ios),
            namespaces: self.namespace_usage(),
            parts,
            ready: self.problems().is_empty(),
        }
    }
}
