//! Daemon-side copies between an engine's registered KV tensors and the pool (`RegisterKvCache`,
//! `SaveKv`, `LoadKv`): the same reservations, commits and pins as the connector's own copies,
//! with the bytes moved by the device backend along a layout plan, off the runtime's threads.

use super::{Node, SlotLocation};
use crate::block::{BlockHash, NsIdx};
use crate::cache::{CacheError, ClientId};
use crate::device::gather::Direction;
use crate::device::layout::KvLayout;
use crate::device::{EngineMemory, EngineTensor};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;

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
        let memory = self.device().import(pid, tensors).map_err(|e| KvCopyError::Memory(e.to_string()))?;
        Ok(KvCache { ns, layout, memory: Arc::from(memory) })
    }

    /// Saves engine blocks `block_ids` under `hashes`: reserve, copy the reserved ones from the
    /// engine, commit (abort if the copy fails).
    pub async fn save_kv(
        &self,
        client: ClientId,
        cache: &KvCache,
        hashes: &[BlockHash],
        block_ids: &[u64],
        parent: Option<BlockHash>,
    ) -> Result<Saved, KvCopyError> {
        check_blocks(cache, hashes, block_ids)?;
        let (reservation, outcomes) = self.reserve(client, cache.ns, hashes, parent)?;
        let mut out = Saved::default();
        let mut copies = Vec::new();
        for (o, &block) in outcomes.iter().zip(block_ids) {
            match *o {
                super::ReservedAt::Slot(at) => copies.push((block, self.pool_address(at))),
                super::ReservedAt::Present => out.present += 1,
                super::ReservedAt::NoSpace => out.no_space += 1,
            }
        }
        if copies.is_empty() {
            return Ok(out);
        }
        match self.copy(cache, copies, Direction::ToPool).await {
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

    /// Loads the held prefix of `hashes` into engine blocks `block_ids`: pin, copy, unpin.
    /// Returns how many leading blocks the engine now holds.
    pub async fn load_kv(
        &self,
        client: ClientId,
        cache: &KvCache,
        hashes: &[BlockHash],
        block_ids: &[u64],
    ) -> Result<usize, KvCopyError> {
        check_blocks(cache, hashes, block_ids)?;
        let (lease, slots) = self.acquire(client, cache.ns, hashes).await?;
        if slots.is_empty() {
            return Ok(0);
        }
        let copies = block_ids.iter().zip(&slots).map(|(&b, &at)| (b, self.pool_address(at))).collect();
        let copied = self.copy(cache, copies, Direction::ToEngine).await;
        self.release(client, lease)?;
        self.metrics.device_copied_bytes[1].fetch_add(copied?, Relaxed);
        Ok(slots.len())
    }

    /// The daemon's address of the pool byte at `at`.
    fn pool_address(&self, (segment, offset): SlotLocation) -> u64 {
        self.pool().segments()[segment as usize].as_ptr() as u64 + offset
    }

    /// Copies whole blocks (engine block, pool address) on a blocking thread; returns the bytes.
    async fn copy(&self, cache: &KvCache, blocks: Vec<(u64, u64)>, dir: Direction) -> Result<u64, KvCopyError> {
        let plan = cache.layout.plan(&blocks).map_err(|e| KvCopyError::Invalid(e.to_string()))?;
        let memory = Arc::clone(&cache.memory);
        let bytes = plan.iter().map(|s| s.bytes).sum();
        let done = tokio::task::spawn_blocking(move || memory.copy(&plan, dir)).await;
        match done {
            Ok(Ok(())) => Ok(bytes),
            Ok(Err(e)) => {
                self.metrics.device_copy_failures.fetch_add(1, Relaxed);
                Err(KvCopyError::Memory(e.to_string()))
            }
            Err(e) => Err(KvCopyError::Memory(format!("copy task failed: {e}"))),
        }
    }
}

/// Most chunks one SaveKv or LoadKv may copy (blocks x layers x parts): bounds the plan a request
/// makes the daemon build (32 bytes a chunk). 8192 blocks of a 128-layer model fit.
const MAX_CHUNKS_PER_REQUEST: u64 = 1 << 22;

/// Parallel lists of equal length, every block id inside the engine's cache, a bounded plan.
fn check_blocks(cache: &KvCache, hashes: &[BlockHash], block_ids: &[u64]) -> Result<(), KvCopyError> {
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
