//! The client's mapping of the daemon's host pool (segments received with SCM_RIGHTS).

use memmap2::{MmapOptions, MmapRaw};
use std::fs::File;
use std::os::fd::OwnedFd;

/// Where a block lives in the pool: segment index and byte offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Slot {
    /// Segment index (order of the Hello reply).
    pub segment: u32,
    /// Byte offset in the segment.
    pub offset: u64,
}

/// The pool segments mapped shared into this process.
pub struct PoolMapping {
    maps: Vec<MmapRaw>,
}

/// A slot outside the mapping: the daemon sent a location that does not fit.
#[derive(Debug, thiserror::Error)]
#[error("slot {slot:?} with {len} bytes lies outside the pool mapping")]
pub struct OutOfBounds {
    /// The slot asked for.
    pub slot: Slot,
    /// Bytes asked for.
    pub len: usize,
}

impl PoolMapping {
    /// Maps each fd whole, read-write, shared. Page tables fill as pages are first touched (the
    /// daemon keeps the pool resident: a minor fault, no I/O); populating them up front cost
    /// every connection ~40 ms per GiB of pool, seconds on a big node, slots used or not.
    pub fn map(fds: Vec<OwnedFd>, sizes: &[u64]) -> std::io::Result<Self> {
        if fds.len() != sizes.len() {
            return Err(std::io::Error::other(format!("{} fds for {} segments", fds.len(), sizes.len())));
        }
        let maps = fds
            .into_iter()
            .zip(sizes)
            .map(|(fd, &len)| MmapOptions::new().len(len as usize).map_raw(&File::from(fd)))
            .collect::<std::io::Result<_>>()?;
        Ok(Self { maps })
    }

    /// Number of segments.
    pub fn segments(&self) -> usize {
        self.maps.len()
    }

    fn range(&self, slot: Slot, len: usize) -> Result<*mut u8, OutOfBounds> {
        let map = self.maps.get(slot.segment as usize).ok_or(OutOfBounds { slot, len })?;
        let end = slot.offset.checked_add(len as u64).ok_or(OutOfBounds { slot, len })?;
        if end > map.len() as u64 {
            return Err(OutOfBounds { slot, len });
        }
        // In bounds of a live mapping.
        Ok(unsafe { map.as_mut_ptr().add(slot.offset as usize) })
    }

    /// Copies `data` into the slot (a reserved slot this client owns).
    pub fn write(&self, slot: Slot, data: &[u8]) -> Result<(), OutOfBounds> {
        let dst = self.range(slot, data.len())?;
        // The daemon gave this client exclusive use of the reserved slot until commit.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) };
        Ok(())
    }

    /// The bytes of a slot pinned by this client's lease. The daemon neither rewrites nor reuses
    /// a pinned slot, so the slice stays valid and unchanged until the lease is released; the
    /// borrow of `self` must not outlive that.
    pub fn slice(&self, slot: Slot, len: usize) -> Result<&[u8], OutOfBounds> {
        let src = self.range(slot, len)?;
        // In bounds of a live mapping; pinned, so nobody writes it meanwhile.
        Ok(unsafe { std::slice::from_raw_parts(src, len) })
    }
}
