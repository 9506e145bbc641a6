//! Staging windows: how a client the operator does not trust reaches the pool without mapping it.
//!
//! Such a client gets one memfd of its own instead of the pool's segments (the "window"). Its
//! reserved slots and acquired blocks are ranges of that window; the daemon copies a reservation
//! from the window into the pool at Commit, and an acquired prefix from the pool into the window
//! at Acquire (then unpins it at once). Nothing the client receives reaches another tenant's
//! bytes or the daemon's pool: it can read, write, punch holes in or map past the end of its own
//! window only (the window is sealed against shrinking and growing, so the daemon never faults on
//! it). See `docs/security.md`.

mod ranges;

pub use ranges::Ranges;

use crate::node::SlotLocation;
use memmap2::{MmapOptions, MmapRaw};
use nix::fcntl::{fallocate, fcntl, FallocateFlags, FcntlArg, SealFlag};
use nix::sys::memfd::{memfd_create, MFdFlags};
use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};

/// One connection's window: a sealed memfd mapped into the daemon, and its free ranges.
pub struct Window {
    file: File,
    map: MmapRaw,
    ranges: Ranges,
    /// Whether pages may be resident (written since the last trim).
    touched: bool,
}

impl Window {
    /// A window of `bytes` (a multiple of 4096) for connection `client`; no page is allocated
    /// until a block is copied through it.
    pub fn create(bytes: u64, client: u64) -> anyhow::Result<Self> {
        let name = format!("kvtier-staging-{client}");
        let fd = memfd_create(name.as_str(), MFdFlags::MFD_CLOEXEC | MFdFlags::MFD_ALLOW_SEALING)?;
        let file = File::from(fd);
        file.set_len(bytes)?;
        // The client gets this fd: it must not shrink it (the daemon's copies would fault) or grow it.
        fcntl(&file, FcntlArg::F_ADD_SEALS(SealFlag::F_SEAL_SHRINK | SealFlag::F_SEAL_GROW | SealFlag::F_SEAL_SEAL))?;
        let map = MmapOptions::new().len(bytes as usize).map_raw(&file)?;
        Ok(Self { file, map, ranges: Ranges::new(bytes), touched: false })
    }

    /// The fd to pass to the client.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    /// Bytes of the window.
    pub fn len(&self) -> u64 {
        self.ranges.len()
    }

    /// True for a window of no bytes (never, for a created one).
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// Whether nothing is staged and pages may still be resident: worth a [`trim`](Self::trim).
    pub fn idle_with_pages(&self) -> bool {
        self.touched && self.ranges.used() == 0
    }

    /// Hands the window's pages back to the kernel (punches the whole file): an idle client costs
    /// no memory. Its own mapping then reads zeros.
    pub fn trim(&mut self) {
        let len = self.len() as i64;
        let mode = FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE;
        if let Err(e) = fallocate(&self.file, mode, 0, len) {
            tracing::debug!("trimming a staging window: {e}");
        }
        self.touched = false;
    }

    fn ptr(&self, at: u64, len: u64) -> *mut u8 {
        assert!(at.checked_add(len).is_some_and(|end| end <= self.len()), "range {at}+{len} outside the window");
        // SAFETY: in bounds of the live mapping (checked above).
        unsafe { self.map.as_mut_ptr().add(at as usize) }
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        // The client may keep its fd: its pages must not stay charged to the daemon.
        self.trim();
    }
}

/// Which way a staged copy goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Window to pool (a Commit).
    IntoPool,
    /// Pool to window (an Acquire).
    OutOfPool,
}

/// Blocks of one reservation or lease staged through the window.
struct Run {
    /// Bytes of each window range.
    range_len: u64,
    /// Bytes of each block (at most `range_len`).
    block_bytes: u64,
    /// Each block's pool location and window offset.
    blocks: Vec<(SlotLocation, u64)>,
}

/// A connection's window with what is staged in it now, by reservation or lease id.
pub struct Staging {
    window: Window,
    saves: HashMap<u64, Run>,
    loads: HashMap<u64, Run>,
}

/// Ranges taken for a request before the cache is asked (the cache then gets only as many
/// blocks as fit); the unused ones go back with [`Staging::settle`].
pub struct Taken {
    offsets: Vec<u64>,
    range_len: u64,
    block_bytes: u64,
}

impl Taken {
    /// How many blocks fit.
    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    /// True when no block fits.
    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }
}

impl Staging {
    /// Staging over `window`.
    pub fn new(window: Window) -> Self {
        Self { window, saves: HashMap::new(), loads: HashMap::new() }
    }

    /// The window.
    pub fn window(&self) -> &Window {
        &self.window
    }

    /// The window, to trim.
    pub fn window_mut(&mut self) -> &mut Window {
        &mut self.window
    }

    /// Takes window room for up to `n` blocks of `block_bytes`, each in a range of `range_len`
    /// (the block size aligned up).
    pub fn take(&mut self, n: usize, block_bytes: u64, range_len: u64) -> Taken {
        assert!(block_bytes <= range_len, "a block longer than its range");
        Taken { offsets: self.window.ranges.take_many(n, range_len), range_len, block_bytes }
    }

    /// Pairs the pool locations the cache gave with window ranges of `taken` (in order), records
    /// them under `id` (a reservation if `save`, else a lease), returns the window offsets, and
    /// gives the unused ranges back. `locations` must not outnumber `taken`.
    pub fn settle(&mut self, taken: Taken, id: u64, save: bool, locations: &[SlotLocation]) -> Vec<u64> {
        assert!(locations.len() <= taken.len(), "more blocks than window ranges");
        let (used, spare) = taken.offsets.split_at(locations.len());
        for &at in spare {
            self.window.ranges.give(at, taken.range_len);
        }
        if !locations.is_empty() {
            self.window.touched = true;
            let blocks = locations.iter().copied().zip(used.iter().copied()).collect();
            let run = Run { range_len: taken.range_len, block_bytes: taken.block_bytes, blocks };
            match save {
                true => self.saves.insert(id, run),
                false => self.loads.insert(id, run),
            };
        }
        used.to_vec()
    }

    /// Copies the blocks of reservation or lease `id` between window and pool, with `pool`
    /// turning a pool location into its address in the daemon's mapping. `false` if `id` is not
    /// staged here.
    ///
    /// # Safety
    /// The pool slots of `id` must be reserved by this connection (`IntoPool`) or pinned
    /// (`OutOfPool`) for the duration of the call, each `block_bytes` long at its address.
    pub unsafe fn copy(&self, id: u64, dir: Direction, pool: impl Fn(SlotLocation) -> *mut u8) -> bool {
        let runs = if dir == Direction::IntoPool { &self.saves } else { &self.loads };
        let Some(run) = runs.get(&id) else { return false };
        let len = run.block_bytes;
        for &(at, offset) in &run.blocks {
            let (window, pool) = (self.window.ptr(offset, len), pool(at));
            match dir {
                Direction::IntoPool => std::ptr::copy_nonoverlapping(window, pool, len as usize),
                Direction::OutOfPool => std::ptr::copy_nonoverlapping(pool, window, len as usize),
            }
        }
        true
    }

    /// Bytes a copy of `id` moves (0 if not staged).
    pub fn bytes_of(&self, id: u64, save: bool) -> u64 {
        let runs = if save { &self.saves } else { &self.loads };
        runs.get(&id).map_or(0, |r| r.blocks.len() as u64 * r.block_bytes)
    }

    /// Forgets reservation (`save`) or lease `id` and frees its ranges; `false` if not staged here.
    pub fn finish(&mut self, id: u64, save: bool) -> bool {
        let runs = if save { &mut self.saves } else { &mut self.loads };
        let Some(run) = runs.remove(&id) else { return false };
        for (_, at) in run.blocks {
            self.window.ranges.give(at, run.range_len);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_window_is_sealed_and_copies_both_ways() {
        let mut st = Staging::new(Window::create(4 * 4096, 1).unwrap());
        let mut pool = vec![0u8; 2 * 4096];
        let base = pool.as_mut_ptr();
        let at = |(_, off): SlotLocation| unsafe { base.add(off as usize) };
        let taken = st.take(3, 4096, 4096);
        assert_eq!(taken.len(), 3);
        let offs = st.settle(taken, 7, true, &[(0, 4096), (0, 0)]);
        assert_eq!(offs.len(), 2);
        unsafe {
            st.window.ptr(offs[0], 4096).write_bytes(0xa1, 4096);
            st.window.ptr(offs[1], 4096).write_bytes(0xb2, 4096);
            assert!(st.copy(7, Direction::IntoPool, at));
            assert!(!st.copy(8, Direction::IntoPool, at), "not staged");
        }
        assert!(pool[..4096].iter().all(|&b| b == 0xb2) && pool[4096..].iter().all(|&b| b == 0xa1));
        assert!(st.finish(7, true) && !st.finish(7, true));
        assert_eq!(st.window.ranges.used(), 0);
        assert!(st.window.idle_with_pages());
        // Sealed: a client cannot resize its window.
        let file = File::from(st.window.fd().try_clone_to_owned().unwrap());
        assert!(file.set_len(4096).is_err() && file.set_len(8 * 4096).is_err());
        st.window.trim();
        assert!(!st.window.idle_with_pages());
        assert_eq!(unsafe { st.window.ptr(offs[0], 1).read() }, 0, "trimmed pages read as zeros");
    }
}
