//! Daemon-side copies between an engine's registered KV tensors and the pool (`RegisterKvCache`,
//! `SaveKv`, `LoadKv`): the same reservations, commits and pins as the connector's own copies,
//! with the bytes moved by the device backend along a layout plan, off the runtime's threads.

use super::{Node, SlotLocation};
use crate::device::gather::Direction;
use crate::device::layout::KvLayout;
use crate::device::{DeviceError, EngineMemory, EngineTensor, Queued};
use kvtier_core::block::{BlockHash, NsIdx};
use kvtier_core::cache::{CacheError, ClientId};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

/// Daemon-side copies between engines' KV memory and the pool.
pub(crate) struct Copies {
    /// The device backend that copies (CMA, CUDA, ROCm, or the connector itself).
    pub(crate) backend: Box<dyn crate::device::DeviceBackend>,
    /// Supervision of copies in flight.
    pub(crate) watch: CopyWatch,
}

/// Supervision of daemon-side copies: stalled while copies are in flight and none completes
/// within the stall bound (a hung device), down once one panicked.
pub struct CopyWatch {
    /// The supervised part (`copies`).
    pub part: Arc<crate::supervise::Part>,
    inflight: std::sync::atomic::AtomicUsize,
}

/// A copy in flight; its end counts as progress.
pub struct CopyBusy<'a>(&'a CopyWatch);

impl CopyWatch {
    /// Watches copies as `part`.
    pub fn new(part: Arc<crate::supervise::Part>) -> Self {
        part.waiting(true);
        Self { part, inflight: std::sync::atomic::AtomicUsize::new(0) }
    }

    fn start(&self) -> CopyBusy<'_> {
        if self.inflight.fetch_add(1, Relaxed) == 0 {
            self.part.waiting(false);
        }
        CopyBusy(self)
    }
}

impl Drop for CopyBusy<'_> {
    fn drop(&mut self) {
        self.0.part.beat();
        if self.0.inflight.fetch_sub(1, Relaxed) == 1 {
            self.0.part.waiting(true);
        }
    }
}

/// An engine's KV cache, registered on one connection.
pub struct KvCache {
    ns: NsIdx,
    layout: KvLayout,
    memory: Arc<dyn EngineMemory>,
}

/// Why a request about a registered KV cache was refused.
#[derive(Debug, thiserror::Error)]
pub enum KvCopyError {
    /// The request itself is wrong (layout, sizes, block ids): a protocol error.
    #[error("{0}")]
    Invalid(String),
    /// Reservations or pins refused.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The memory could not be reached or copied: answered, the client copies or recomputes.
    #[error("{0}")]
    Memory(String),
}

/// Engine blocks and the hashes they hold (parallel lists, prefix order).
#[derive(Clone, Copy, Debug)]
pub struct Blocks<'a> {
    /// Block hashes.
    pub hashes: &'a [BlockHash],
    /// Engine block ids.
    pub ids: &'a [u64],
}

/// Outcome of a LoadKv.
#[derive(Debug, Default)]
pub struct Loaded {
    /// Leading blocks the engine holds once the copy is done.
    pub blocks: usize,
    /// IPC handle of the event behind the copy (empty: the copy is done).
    pub event: Vec<u8>,
    /// Unpins the blocks once the copy has completed; the connection waits for it before it
    /// closes, so no slot it reads from is reused meanwhile.
    pub pending: Option<tokio::task::JoinHandle<()>>,
}

/// Outcome of a SaveKv.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Saved {
    /// Blocks copied and committed.
    pub saved: usize,
    /// Blocks held already.
    pub present: usize,
    /// Blocks for which no space could be made.
    pub no_space: usize,
}

impl Node {
    /// Opens the KV tensors of engine process `pid` with the device backend for namespace `ns`,
    /// after checking `layout` against its tensors and the namespace's block size.
    pub fn register_kv_cache(
        &self,
        ns: NsIdx,
        pid: Option<i32>,
        layout: KvLayout,
        tensors: &[EngineTensor],
    ) -> Result<KvCache, KvCopyError> {
        let block_bytes = self.cache().namespace(ns).block_bytes;
        if layout.tensor_bytes.len() != tensors.len() {
            return Err(KvCopyError::Invalid(format!(
                "layout describes {} tensors, {} given",
                layout.tensor_bytes.len(),
                tensors.len()
            )));
        }
        layout.validate().map_err(|e| KvCopyError::Invalid(e.to_string()))?;
        if layout.block_bytes() != block_bytes {
            return Err(KvCopyError::Invalid(format!(
                "layout holds {} bytes per block, the namespace {block_bytes}",
                layout.block_bytes()
            )));
        }
        self.copies_on()?;
        let memory = self.device().import(pid, tensors).map_err(|e| KvCopyError::Memory(e.to_string()))?;
        Ok(KvCache { ns, layout, memory: Arc::from(memory) })
    }

    /// Saves engine blocks `block_ids` under `hashes`, which the engine has finished writing:
    /// reserve, copy the reserved ones from the engine, commit (abort if the copy fails).
    pub async fn save_kv(
        &self,
        client: ClientId,
        cache: &KvCache,
        blocks: Blocks<'_>,
        parent: Option<BlockHash>,
    ) -> Result<Saved, KvCopyError> {
        check_blocks(cache, blocks)?;
        self.copies_on()?;
        let (reservation, outcomes) = self.reserve(client, cache.ns, blocks.hashes, parent)?;
        let mut out = Saved::default();
        let mut copies = Vec::new();
        for (o, &block) in outcomes.iter().zip(blocks.ids) {
            match *o {
                super::ReservedAt::Slot(at) => copies.push((block, self.pool_address(at))),
                super::ReservedAt::Present => out.present += 1,
                super::ReservedAt::NoSpace => out.no_space += 1,
            }
        }
        if copies.is_empty() {
            return Ok(out);
        }
        let copied = match self.queue(cache, copies, Direction::ToPool, &[]).await {
            Ok((bytes, queued)) => self.finish(queued).await.map(|()| bytes),
            Err(e) => Err(e),
        };
        match copied {
            Ok(bytes) => {
                out.saved = self.commit(client, reservation)?;
                self.metrics.device_copied_bytes[0].fetch_add(bytes, Relaxed);
                Ok(out)
            }
            Err(e) => {
                self.abort(client, reservation)?;
                Err(e)
            }
        }
    }

    /// Loads the held prefix of `hashes` into engine blocks `block_ids`: pin, copy (on a GPU,
    /// behind the engine's event `after`), unpin. With `early`, answers once the copy is queued
    /// on a GPU: the engine waits on [`Loaded::event`], and the blocks are unpinned once the copy
    /// has completed ([`Loaded::pending`]).
    pub async fn load_kv(
        self: &Arc<Self>,
        client: ClientId,
        cache: &KvCache,
        blocks: Blocks<'_>,
        after: &[u8],
        early: bool,
    ) -> Result<Loaded, KvCopyError> {
        check_blocks(cache, blocks)?;
        self.copies_on()?;
        let (lease, slots) = self.acquire(client, cache.ns, blocks.hashes).await?;
        if slots.is_empty() {
            return Ok(Loaded::default());
        }
        let copies = blocks.ids.iter().zip(&slots).map(|(&b, &at)| (b, self.pool_address(at))).collect();
        let (bytes, mut queued) = match self.queue(cache, copies, Direction::ToEngine, after).await {
            Ok(q) => q,
            Err(e) => {
                self.release(client, lease)?;
                return Err(e);
            }
        };
        let event = std::mem::take(&mut queued.event);
        let node = Arc::clone(self);
        let unpin = async move {
            let done = node.finish(queued).await;
            let _ = node.release(client, lease); // released already if the connection closed
            done.map(|()| node.metrics.device_copied_bytes[1].fetch_add(bytes, Relaxed))
        };
        if early && !event.is_empty() {
            let pending = tokio::spawn(async move {
                if let Err(e) = unpin.await {
                    tracing::warn!("a load failed after its reply (the engine reads what was copied): {e}");
                }
            });
            return Ok(Loaded { blocks: slots.len(), event, pending: Some(pending) });
        }
        unpin.await?;
        Ok(Loaded { blocks: slots.len(), ..Default::default() })
    }

    /// The daemon's address of the pool byte at `at`.
    fn pool_address(&self, (segment, offset): SlotLocation) -> u64 {
        self.pool().segments()[segment as usize].as_ptr() as u64 + offset
    }

    /// Queues a copy of whole blocks (engine block, pool address) behind the engine's event
    /// `after`, on a blocking thread; returns the bytes and the queued copy.
    async fn queue(
        &self,
        cache: &KvCache,
        blocks: Vec<(u64, u64)>,
        dir: Direction,
        after: &[u8],
    ) -> Result<(u64, Queued), KvCopyError> {
        let plan = cache.layout.plan(&blocks).map_err(|e| KvCopyError::Invalid(e.to_string()))?;
        let memory = Arc::clone(&cache.memory);
        let bytes = plan.iter().map(|s| s.bytes).sum();
        let after = after.to_vec();
        let _busy = self.copies.watch.start();
        let queued = tokio::task::spawn_blocking(move || {
            crate::fault::point("copies");
            memory.queue(&plan, dir, &after)
        })
        .await;
        Ok((bytes, self.copy_outcome(queued)?))
    }

    /// Waits on a blocking thread until a queued copy has completed.
    async fn finish(&self, queued: Queued) -> Result<(), KvCopyError> {
        let _busy = self.copies.watch.start();
        let done = tokio::task::spawn_blocking(queued.wait).await;
        self.copy_outcome(done)
    }

    fn copy_outcome<T>(&self, done: Result<Result<T, DeviceError>, tokio::task::JoinError>) -> Result<T, KvCopyError> {
        match done {
            Ok(Ok(t)) => Ok(t),
            Ok(Err(e)) => {
                self.metrics.device_copy_failures.fetch_add(1, Relaxed);
                Err(KvCopyError::Memory(e.to_string()))
            }
            Err(e) => {
                // The copy's thread unwound: nothing writes its slots any more.
                let why = match e.try_into_panic() {
                    Ok(payload) => format!("a copy panicked: {}", crate::supervise::panic_message(payload.as_ref())),
                    Err(e) => format!("a copy task failed: {e}"),
                };
                self.copies.watch.part.fail(why.clone());
                Err(KvCopyError::Memory(why))
            }
        }
    }

    /// `Err` once daemon-side copies were turned off by a failure: the client copies itself.
    fn copies_on(&self) -> Result<(), KvCopyError> {
        match self.copies.watch.part.down() {
            Some(why) => Err(KvCopyError::Memory(format!("daemon-side copies are off after a failure ({why})"))),
            None => Ok(()),
        }
    }
}

/// Most chunks one SaveKv or LoadKv may copy (blocks x layers x parts): bounds the plan a request
/// makes the daemon build (32 bytes a chunk). 8192 blocks of a 128-layer model fit.
const MAX_CHUNKS_PER_REQUEST: u64 = 1 << 22;

/// Parallel lists of equal length, every block id inside the engine's cache, a bounded plan.
fn check_blocks(cache: &KvCache, blocks: Blocks<'_>) -> Result<(), KvCopyError> {
    let (hashes, block_ids) = (blocks.hashes, blocks.ids);
    if hashes.len() != block_ids.len() {
        return Err(KvCopyError::Invalid(format!("{} hashes but {} block ids", hashes.len(), block_ids.len())));
    }
    let per_block = cache.layout.layers.len() as u64 * cache.layout.kv_parts as u64;
    if block_ids.len() as u64 * per_block > MAX_CHUNKS_PER_REQUEST {
        return Err(KvCopyError::Invalid(format!(
            "{} blocks of {per_block} chunks in one request, limit {MAX_CHUNKS_PER_REQUEST} chunks: split it",
            block_ids.len()
        )));
    }
    match block_ids.iter().find(|&&b| b >= cache.layout.num_blocks) {
        Some(b) => Err(KvCopyError::Invalid(format!("engine block {b} of {}", cache.layout.num_blocks))),
        None => Ok(()),
    }
}
