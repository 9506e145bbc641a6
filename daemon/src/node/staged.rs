//! Saves and loads of untrusted clients, staged through their private windows
//! ([`crate::staging`]): the same reservations, commits and pins as the shared-pool path, with the
//! daemon copying each block between the pool and the client's window.

use super::{Node, ReservedAt, SlotLocation};
use crate::staging::{Direction, Staging};
use kvtier_core::alloc::slot_stride;
use kvtier_core::block::{BlockHash, NsIdx};
use kvtier_core::cache::{CacheError, ClientId};
use std::sync::Arc;

/// Copies above this many bytes leave the async runtime's thread for the copy.
const INLINE_COPY_BYTES: u64 = 1 << 20;

impl Node {
    /// Bytes of a namespace's block and of its window ranges.
    fn staged_sizes(&self, ns: NsIdx) -> (u64, u64) {
        let block_bytes = self.cache().namespace(ns).block_bytes;
        (block_bytes, slot_stride(block_bytes).expect("registered sizes fit"))
    }

    /// [`reserve`](Self::reserve) through `staging`: as many blocks as the window has room for
    /// (the rest are `NoSpace`), each reserved slot given as a range of the window (segment 0).
    pub fn reserve_staged(
        &self,
        client: ClientId,
        staging: &mut Staging,
        ns: NsIdx,
        hashes: &[BlockHash],
        parent: Option<BlockHash>,
    ) -> Result<(u64, Vec<ReservedAt>), CacheError> {
        let (block_bytes, range_len) = self.staged_sizes(ns);
        let taken = staging.take(hashes.len(), block_bytes, range_len);
        let fit = taken.len();
        let (id, mut outcomes) = match self.reserve(client, ns, &hashes[..fit], parent) {
            Ok(r) => r,
            Err(e) => {
                staging.settle(taken, 0, true, &[]);
                return Err(e);
            }
        };
        let pool: Vec<SlotLocation> =
            outcomes.iter().filter_map(|o| if let ReservedAt::Slot(at) = o { Some(*at) } else { None }).collect();
        let mut window = staging.settle(taken, id, true, &pool).into_iter();
        for o in &mut outcomes {
            if let ReservedAt::Slot(_) = o {
                *o = ReservedAt::Slot((0, window.next().expect("one range per reserved block")));
            }
        }
        outcomes.resize(hashes.len(), ReservedAt::NoSpace);
        Ok((id, outcomes))
    }

    /// [`commit`](Self::commit) through `staging`: the reservation's blocks are copied from the
    /// window into their pool slots first.
    pub async fn commit_staged(&self, client: ClientId, staging: &mut Staging, id: u64) -> Result<usize, CacheError> {
        self.copy_staged(staging, id, Direction::IntoPool).await;
        staging.finish(id, true);
        self.commit(client, id)
    }

    /// [`acquire`](Self::acquire) through `staging`: the held prefix (as much as the window has
    /// room for) is copied into the window and unpinned at once; the lease then holds only its
    /// window ranges until Release.
    pub async fn acquire_staged(
        self: &Arc<Self>,
        client: ClientId,
        staging: &mut Staging,
        ns: NsIdx,
        hashes: &[BlockHash],
    ) -> Result<(u64, Vec<SlotLocation>), CacheError> {
        let (block_bytes, range_len) = self.staged_sizes(ns);
        let taken = staging.take(hashes.len(), block_bytes, range_len);
        let fit = taken.len();
        let (lease, pool) = match self.acquire(client, ns, &hashes[..fit]).await {
            Ok(r) => r,
            Err(e) => {
                staging.settle(taken, 0, false, &[]);
                return Err(e);
            }
        };
        let window = staging.settle(taken, lease, false, &pool);
        if lease != 0 {
            self.copy_staged(staging, lease, Direction::OutOfPool).await;
            self.release(client, lease)?;
        }
        Ok((lease, window.into_iter().map(|at| (0, at)).collect()))
    }

    /// Copies the blocks staged under `id` between window and pool, off the runtime's threads
    /// when they are many.
    async fn copy_staged(&self, staging: &Staging, id: u64, dir: Direction) {
        let copy = || {
            // SAFETY: the slots of `id` are this client's reservation (IntoPool) or its pinned
            // lease (OutOfPool) until the caller commits or releases it.
            unsafe { staging.copy(id, dir, |at| self.slot_ptr(at)) };
        };
        match staging.bytes_of(id, dir == Direction::IntoPool) > INLINE_COPY_BYTES {
            true => tokio::task::block_in_place(copy),
            false => copy(),
        }
    }
}
