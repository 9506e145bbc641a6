//! The host pool's memory: memfd segments, sealed against resizing, mapped shared and mlock'd
//! (optionally hugetlb). Clients map the same segments (passed with SCM_RIGHTS), so a block
//! moves with one copy, never through a temporary buffer.

use anyhow::{bail, Context};
use memmap2::{MmapOptions, MmapRaw};
use nix::errno::Errno;
use nix::fcntl::{fcntl, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use nix::sys::mman::{madvise, MmapAdvise};
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use tracing::warn;

/// How the pool is cut: equal slabs, grouped into memfd segments of `slabs_per_segment` slabs
/// (the last segment may hold fewer).
#[derive(Clone, Debug)]
pub struct PoolGeometry {
    /// Bytes per slab.
    pub slab_bytes: u64,
    /// Slabs in every segment but possibly the last.
    pub slabs_per_segment: u32,
    /// Slabs in the whole pool.
    pub slab_count: u32,
}

impl PoolGeometry {
    /// Cuts a budget into whole slabs, in segments of at most `max_segment_bytes`.
    /// The pool never exceeds `budget`; it is smaller by less than one slab.
    ///
    /// ```
    /// use kvtier_daemon::pool::PoolGeometry;
    /// let g = PoolGeometry::plan(10 << 20, 4 << 20, 2 << 20).unwrap();
    /// assert_eq!((g.segments(), g.segment_bytes(0), g.segment_bytes(2)), (3, 4 << 20, 2 << 20));
    /// assert_eq!(g.total_bytes(), 10 << 20);
    /// ```
    pub fn plan(budget: u64, max_segment_bytes: u64, slab_bytes: u64) -> anyhow::Result<Self> {
        if slab_bytes == 0 || !slab_bytes.is_multiple_of(kvtier_core::alloc::SLOT_ALIGN) {
            bail!("pool.slab_bytes must be a positive multiple of 4096, got {slab_bytes}");
        }
        let slabs = budget / slab_bytes;
        if slabs == 0 {
            bail!("pool.bytes ({budget}) is smaller than one slab (pool.slab_bytes = {slab_bytes})");
        }
        if slabs > u32::MAX as u64 {
            bail!("pool.bytes / pool.slab_bytes = {slabs} slabs; raise pool.slab_bytes");
        }
        let per_segment = (max_segment_bytes / slab_bytes).clamp(1, slabs);
        Ok(Self { slab_bytes, slabs_per_segment: per_segment as u32, slab_count: slabs as u32 })
    }

    /// Number of segments.
    pub fn segments(&self) -> u32 {
        self.slab_count.div_ceil(self.slabs_per_segment)
    }

    /// Bytes of segment `i`.
    pub fn segment_bytes(&self, i: u32) -> u64 {
        let slabs = self.slabs_per_segment.min(self.slab_count - i * self.slabs_per_segment);
        slabs as u64 * self.slab_bytes
    }

    /// Bytes of the whole pool.
    pub fn total_bytes(&self) -> u64 {
        self.slab_count as u64 * self.slab_bytes
    }
}

/// Whether the pool's pages must be locked in memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LockMode {
    /// mlock every segment; refuse to start if that fails.
    Required,
    /// Try to mlock; on failure run unlocked with a warning (development only).
    BestEffort,
}

/// One memfd segment of the pool, mapped into the daemon.
pub struct Segment {
    file: File,
    map: MmapRaw,
    locked: bool,
}

/// Locks `map` in memory with every page faulted in for writing.
///
/// `mlock` alone faults a shared mapping's pages in for reading: their page-table entries start
/// clean, and the first write to each page then pays for setting its dirty bit. On a VM that is
/// 0.4 us a page, and a fresh pool's first writes (pulls, saves, disk reads) ran at half the
/// speed of later ones (5.7 against 10.8 GB/s). So the range is locked as it faults
/// (`MLOCK_ONFAULT`, which checks the limit without populating) and then faulted in for
/// writing (`MADV_POPULATE_WRITE`): the pages are zeroed and allocated either way, so this costs
/// no more than `mlock`'s own populating did. Kernels before 5.14 lack the advice, and some
/// seccomp profiles `mlock2`; there a plain `mlock` populates for reading, as before.
fn lock_for_writing(map: &MmapRaw) -> Result<(), Errno> {
    let (addr, len) = (map.as_mut_ptr().cast::<nix::libc::c_void>(), map.len());
    // SAFETY: the range is this mapping's; locking and populating do not change its contents.
    unsafe {
        match Errno::result(nix::libc::mlock2(addr, len, nix::libc::MLOCK_ONFAULT)) {
            Ok(_) => {}
            // No mlock2 (an old kernel, or a seccomp profile without it): lock the old way.
            Err(Errno::ENOSYS | Errno::EINVAL | Errno::EPERM) => {
                return Errno::result(nix::libc::mlock(addr, len)).map(drop)
            }
            Err(e) => return Err(e),
        }
        let Some(start) = std::ptr::NonNull::new(addr) else { return Ok(()) };
        if let Err(e) = madvise(start, len, MmapAdvise::MADV_POPULATE_WRITE) {
            tracing::debug!("MADV_POPULATE_WRITE of the pool failed ({e}): populating it for reading");
            if let Err(e) = Errno::result(nix::libc::mlock(addr, len)) {
                nix::libc::munlock(addr, len);
                return Err(e);
            }
        }
    }
    Ok(())
}

impl Segment {
    fn create(index: u32, bytes: u64, hugetlb: bool, lock: LockMode) -> anyhow::Result<Self> {
        let mut flags = MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING;
        if hugetlb {
            flags |= MFdFlags::MFD_HUGETLB;
        }
        let name = format!("kvtier-pool-{index}");
        let fd = memfd_create(name.as_str(), flags).with_context(|| {
            if hugetlb {
                "memfd_create(MFD_HUGETLB) failed: are huge pages reserved (/proc/sys/vm/nr_hugepages)?".to_string()
            } else {
                "memfd_create failed".to_string()
            }
        })?;
        let file = File::from(fd);
        file.set_len(bytes).with_context(|| {
            format!("sizing pool segment to {bytes} bytes{}", if hugetlb { " (huge pages exhausted?)" } else { "" })
        })?;
        // Clients get this fd: they must not shrink it (that would SIGBUS the daemon) or grow it.
        fcntl(&file, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL))
            .context("sealing pool segment")?;
        let map = MmapOptions::new().len(bytes as usize).map_raw(&file).context("mapping pool segment")?;
        let locked = match lock_for_writing(&map) {
            Ok(()) => true,
            Err(err) => {
                let why = format!(
                    "mlock of {bytes} bytes of pool failed ({err}): give kvtierd CAP_IPC_LOCK (or raise \
                     `ulimit -l`), or run with --allow-unlocked for development"
                );
                match lock {
                    LockMode::Required => bail!(why),
                    LockMode::BestEffort => {
                        warn!("{why}; running UNLOCKED: pool pages may be swapped out");
                        false
                    }
                }
            }
        };
        Ok(Self { file, map, locked })
    }

    /// The segment's fd, to pass to clients.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Bytes in the segment.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// True for an empty segment (never, for a planned pool).
    pub fn is_empty(&self) -> bool {
        self.map.len() == 0
    }

    /// Base address of the daemon's mapping.
    pub fn as_ptr(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Whether the pages are mlock'd.
    pub fn is_locked(&self) -> bool {
        self.locked
    }
}

/// All segments of the host pool.
pub struct HostPool {
    geometry: PoolGeometry,
    segments: Vec<Segment>,
}

impl HostPool {
    /// Creates and maps the segments of `geometry`.
    ///
    /// Segments are created on as many threads as there are CPUs: the kernel zeroes every page
    /// as it is faulted in, about 0.4 s per GiB and thread here, so a node's pool of hundreds
    /// of GiB would otherwise keep the daemon from starting for minutes.
    pub fn create(geometry: PoolGeometry, hugetlb: bool, lock: LockMode) -> anyhow::Result<Self> {
        let count = geometry.segments();
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(count as usize).max(1);
        let next = std::sync::atomic::AtomicU32::new(0);
        let made = std::sync::Mutex::new(Vec::with_capacity(count as usize));
        std::thread::scope(|scope| {
            for _ in 0..threads {
                scope.spawn(|| loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if i >= count {
                        return;
                    }
                    let segment = Segment::create(i, geometry.segment_bytes(i), hugetlb, lock);
                    made.lock().unwrap_or_else(|e| e.into_inner()).push((i, segment));
                });
            }
        });
        let mut made = made.into_inner().unwrap_or_else(|e| e.into_inner());
        made.sort_by_key(|(i, _)| *i);
        let segments = made.into_iter().map(|(_, s)| s).collect::<anyhow::Result<_>>()?;
        Ok(Self { geometry, segments })
    }

    /// The pool's geometry.
    pub fn geometry(&self) -> &PoolGeometry {
        &self.geometry
    }

    /// The segments, in the order clients index them.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// Whether every segment is mlock'd.
    pub fn is_locked(&self) -> bool {
        self.segments.iter().all(Segment::is_locked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn plan_never_exceeds_budget() {
        for (budget, seg, slab) in
            [(1u64 << 30, 256 << 20, 16 << 20), (100 << 20, 1 << 30, 16 << 20), (33 << 20, 8 << 20, 4 << 20)]
        {
            let g = PoolGeometry::plan(budget, seg, slab).unwrap();
            assert!(g.total_bytes() <= budget, "{g:?}");
            assert!(g.total_bytes() + slab > budget, "{g:?} wastes a slab or more");
            let sum: u64 = (0..g.segments()).map(|i| g.segment_bytes(i)).sum();
            assert_eq!(sum, g.total_bytes());
            assert!((0..g.segments()).all(|i| g.segment_bytes(i) <= seg.max(slab)));
        }
    }

    #[test]
    fn plan_refuses_bad_sizes() {
        assert!(PoolGeometry::plan(1 << 20, 1 << 30, 16 << 20).is_err());
        assert!(PoolGeometry::plan(1 << 30, 1 << 30, 1000).is_err());
    }

    #[test]
    fn segments_made_on_many_threads_come_in_index_order() {
        // Five segments, the last smaller: 4.5 MiB in segments of 1 MiB and slabs of 0.5 MiB.
        let g = PoolGeometry::plan(9 << 19, 1 << 20, 1 << 19).unwrap();
        let pool = HostPool::create(g.clone(), false, LockMode::BestEffort).unwrap();
        assert_eq!(pool.segments().len(), 5);
        for (i, seg) in pool.segments().iter().enumerate() {
            assert_eq!(seg.len(), g.segment_bytes(i as u32));
            let fd = seg.fd().as_raw_fd();
            let name = std::fs::read_link(format!("/proc/self/fd/{fd}")).unwrap();
            assert!(name.to_string_lossy().contains(&format!("kvtier-pool-{i} ")), "segment {i}: {name:?}");
        }
        assert_eq!(pool.segments()[4].len(), 1 << 19);
    }

    #[test]
    fn segments_are_shared_sealed_memory() {
        let g = PoolGeometry::plan(2 << 20, 1 << 20, 1 << 20).unwrap();
        let pool = HostPool::create(g, false, LockMode::BestEffort).unwrap();
        assert_eq!(pool.segments().len(), 2);
        let seg = &pool.segments()[0];
        unsafe { seg.as_ptr().write(42) };
        // A second mapping of the same fd (as a client makes) sees the byte.
        let file = File::from(seg.fd().try_clone_to_owned().unwrap());
        let other = MmapOptions::new().len(seg.len() as usize).map_raw(&file).unwrap();
        assert_eq!(unsafe { other.as_ptr().read() }, 42);
        // Sealed: a client cannot shrink it.
        assert!(file.set_len(4096).is_err());
    }
}
