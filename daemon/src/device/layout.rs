//! Where each byte of a kvtier block lives in an engine's KV cache, for vLLM's layouts.
//!
//! A kvtier block is one engine block across all layers: for layer `l` and part `kv` (K = 0,
//! V = 1; MLA has one part) the contiguous chunk of `chunk_bytes` (tokens per block x KV heads x
//! head size x dtype size) sits at `(l * kv_parts + kv) * chunk_bytes` in the pool slot. In the
//! engine the same chunk sits in one of the engine's KV tensors at
//! `layer.offset + block * layer.block_stride + kv * layer.kv_stride`. This module turns a list
//! of (engine block, pool offset) pairs into the fewest contiguous copy segments, which a device
//! backend executes with one gather/scatter kernel launch. Pure arithmetic, tested on CPU.

/// How one layer's chunks are placed in an engine tensor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LayerPlacement {
    /// Index of the engine tensor holding the layer.
    pub tensor: u32,
    /// Byte offset of block 0, part 0, in that tensor.
    pub offset: u64,
    /// Bytes from one block to the next.
    pub block_stride: u64,
    /// Bytes from the K chunk to the V chunk of the same block.
    pub kv_stride: u64,
}

/// An engine's KV cache as the daemon sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLayout {
    /// Size in bytes of each engine tensor.
    pub tensor_bytes: Vec<u64>,
    /// One placement per layer, in layer order.
    pub layers: Vec<LayerPlacement>,
    /// Blocks per layer.
    pub num_blocks: u64,
    /// Parts per block and layer: 2 (K and V) or 1 (MLA's latent cache).
    pub kv_parts: u32,
    /// Contiguous bytes of one (layer, part, block) chunk.
    pub chunk_bytes: u64,
}

/// One contiguous copy between an engine tensor and a pool slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Engine tensor index.
    pub tensor: u32,
    /// Byte offset in the engine tensor.
    pub engine_offset: u64,
    /// Byte offset in the pool (segment-relative, as the slot location).
    pub pool_offset: u64,
    /// Bytes to copy.
    pub bytes: u64,
}

/// Why a layout or a copy request was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// A layer's chunks would fall outside its tensor.
    #[error("layer {layer}: chunks reach byte {end} of tensor {tensor}, which has {bytes}")]
    OutOfTensor {
        /// The layer.
        layer: usize,
        /// Its tensor.
        tensor: u32,
        /// One past the last byte its chunks need.
        end: u64,
        /// The tensor's size.
        bytes: u64,
    },
    /// A layer names a tensor that was not described.
    #[error("layer {0} names a tensor that was not given")]
    NoSuchTensor(usize),
    /// A block id past `num_blocks`.
    #[error("engine block {block} of {num_blocks}")]
    NoSuchBlock {
        /// The block asked for.
        block: u64,
        /// Blocks per layer.
        num_blocks: u64,
    },
    /// Zero-sized chunks, no layers, or parts other than 1 or 2.
    #[error("empty or malformed layout: {0}")]
    Malformed(&'static str),
}

impl KvLayout {
    /// vLLM's FlashAttention layout: per layer one tensor `[2, num_blocks, block_size, heads,
    /// head_size]` (all K chunks, then all V chunks).
    pub fn flash_attention(layers: usize, num_blocks: u64, chunk_bytes: u64) -> Self {
        let tensor = 2 * num_blocks * chunk_bytes;
        Self {
            tensor_bytes: vec![tensor; layers],
            layers: (0..layers as u32)
                .map(|l| LayerPlacement {
                    tensor: l,
                    offset: 0,
                    block_stride: chunk_bytes,
                    kv_stride: num_blocks * chunk_bytes,
                })
                .collect(),
            num_blocks,
            kv_parts: 2,
            chunk_bytes,
        }
    }

    /// vLLM's FlashInfer (and CPU) layout: per layer `[num_blocks, 2, block_size, heads,
    /// head_size]` (K then V of each block, side by side).
    pub fn flash_infer(layers: usize, num_blocks: u64, chunk_bytes: u64) -> Self {
        Self {
            tensor_bytes: vec![2 * num_blocks * chunk_bytes; layers],
            layers: (0..layers as u32)
                .map(|l| LayerPlacement { tensor: l, offset: 0, block_stride: 2 * chunk_bytes, kv_stride: chunk_bytes })
                .collect(),
            num_blocks,
            kv_parts: 2,
            chunk_bytes,
        }
    }

    /// One tensor for all layers, block-major: `[num_blocks, layers, 2, block_size, heads,
    /// head_size]`; a block is contiguous across layers.
    pub fn cross_layer(layers: usize, num_blocks: u64, chunk_bytes: u64) -> Self {
        let per_block = layers as u64 * 2 * chunk_bytes;
        Self {
            tensor_bytes: vec![num_blocks * per_block],
            layers: (0..layers as u64)
                .map(|l| LayerPlacement {
                    tensor: 0,
                    offset: l * 2 * chunk_bytes,
                    block_stride: per_block,
                    kv_stride: chunk_bytes,
                })
                .collect(),
            num_blocks,
            kv_parts: 2,
            chunk_bytes,
        }
    }

    /// MLA (DeepSeek): per layer `[num_blocks, block_size, latent_dim]`, one part per block.
    pub fn mla(layers: usize, num_blocks: u64, chunk_bytes: u64) -> Self {
        Self {
            tensor_bytes: vec![num_blocks * chunk_bytes; layers],
            layers: (0..layers as u32)
                .map(|l| LayerPlacement { tensor: l, offset: 0, block_stride: chunk_bytes, kv_stride: 0 })
                .collect(),
            num_blocks,
            kv_parts: 1,
            chunk_bytes,
        }
    }

    /// Bytes of one kvtier block (every layer and part of one engine block).
    pub fn block_bytes(&self) -> u64 {
        (self.layers.len() as u64).saturating_mul(self.kv_parts as u64).saturating_mul(self.chunk_bytes)
    }

    /// Checks that every chunk of every block lies inside its tensor.
    pub fn validate(&self) -> Result<(), LayoutError> {
        if self.layers.is_empty() || self.chunk_bytes == 0 || self.num_blocks == 0 || !(1..=2).contains(&self.kv_parts)
        {
            return Err(LayoutError::Malformed("no layers, no blocks, empty chunks, or not 1-2 parts"));
        }
        for (i, l) in self.layers.iter().enumerate() {
            let bytes = *self.tensor_bytes.get(l.tensor as usize).ok_or(LayoutError::NoSuchTensor(i))?;
            let end = (self.num_blocks - 1)
                .checked_mul(l.block_stride)
                .and_then(|b| b.checked_add((self.kv_parts as u64 - 1).checked_mul(l.kv_stride)?))
                .and_then(|b| b.checked_add(l.offset)?.checked_add(self.chunk_bytes))
                .ok_or(LayoutError::Malformed("offsets overflow 64 bits"))?;
            if end > bytes {
                return Err(LayoutError::OutOfTensor { layer: i, tensor: l.tensor, end, bytes });
            }
        }
        Ok(())
    }

    /// Copy segments for `blocks` = (engine block id, pool offset of the kvtier block), with
    /// adjacent chunks merged where both sides are contiguous.
    pub fn plan(&self, blocks: &[(u64, u64)]) -> Result<Vec<Segment>, LayoutError> {
        let mut out: Vec<Segment> = Vec::new();
        for &(block, pool) in blocks {
            if block >= self.num_blocks {
                return Err(LayoutError::NoSuchBlock { block, num_blocks: self.num_blocks });
            }
            for (l, p) in self.layers.iter().enumerate() {
                for kv in 0..self.kv_parts as u64 {
                    let seg = Segment {
                        tensor: p.tensor,
                        engine_offset: p.offset + block * p.block_stride + kv * p.kv_stride,
                        pool_offset: pool + (l as u64 * self.kv_parts as u64 + kv) * self.chunk_bytes,
                        bytes: self.chunk_bytes,
                    };
                    match out.last_mut() {
                        Some(last)
                            if last.tensor == seg.tensor
                                && last.engine_offset + last.bytes == seg.engine_offset
                                && last.pool_offset + last.bytes == seg.pool_offset =>
                        {
                            last.bytes += seg.bytes
                        }
                        _ => out.push(seg),
                    }
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies engine -> pool by the plan over fake tensors whose every byte names its origin,
    /// then checks each pool byte against the layout's definition, chunk by chunk.
    fn check_against_definition(layout: &KvLayout, blocks: &[(u64, u64)]) -> usize {
        layout.validate().unwrap();
        let tensors: Vec<Vec<u32>> = layout
            .tensor_bytes
            .iter()
            .enumerate()
            .map(|(t, &n)| (0..n).map(|b| (t as u32) << 24 | b as u32).collect())
            .collect();
        let pool_len = blocks.iter().map(|&(_, p)| p + layout.block_bytes()).max().unwrap();
        let mut pool = vec![u32::MAX; pool_len as usize];
        let plan = layout.plan(blocks).unwrap();
        for s in &plan {
            let src = &tensors[s.tensor as usize][s.engine_offset as usize..(s.engine_offset + s.bytes) as usize];
            pool[s.pool_offset as usize..(s.pool_offset + s.bytes) as usize].copy_from_slice(src);
        }
        for &(block, p) in blocks {
            for (l, place) in layout.layers.iter().enumerate() {
                for kv in 0..layout.kv_parts as u64 {
                    for i in 0..layout.chunk_bytes {
                        let engine = place.offset + block * place.block_stride + kv * place.kv_stride + i;
                        let at = p + (l as u64 * layout.kv_parts as u64 + kv) * layout.chunk_bytes + i;
                        assert_eq!(
                            pool[at as usize],
                            place.tensor << 24 | engine as u32,
                            "block {block} layer {l} kv {kv} byte {i}"
                        );
                    }
                }
            }
        }
        plan.len()
    }

    #[test]
    fn every_layout_copies_every_byte_to_its_place() {
        let blocks = [(3, 0), (0, 96), (5, 192)];
        for layout in [
            KvLayout::flash_attention(2, 6, 8),
            KvLayout::flash_infer(2, 6, 8),
            KvLayout::cross_layer(2, 6, 8),
            KvLayout::mla(3, 6, 8),
        ] {
            check_against_definition(&layout, &blocks);
        }
    }

    #[test]
    fn contiguous_chunks_merge_into_few_segments() {
        // Two engine blocks into two adjacent 128-byte pool slots (4 layers x 2 parts x 16 B).
        let blocks = [(3, 0), (4, 128)];
        // FlashAttention: K and V are far apart: one segment per (layer, part, block).
        assert_eq!(check_against_definition(&KvLayout::flash_attention(4, 8, 16), &blocks), 4 * 2 * 2);
        // FlashInfer: K and V side by side: one per (layer, block).
        assert_eq!(check_against_definition(&KvLayout::flash_infer(4, 8, 16), &blocks), 4 * 2);
        // Cross-layer: a block is contiguous, and so are consecutive blocks into consecutive slots.
        assert_eq!(check_against_definition(&KvLayout::cross_layer(4, 8, 16), &blocks), 1);
    }

    #[test]
    fn block_bytes_match_vllm_shapes() {
        // Llama-3-8B, fp16, 16 tokens per block: 32 layers x 2 x 16 tokens x 8 heads x 128 x 2 B.
        let chunk = 16 * 8 * 128 * 2;
        assert_eq!(KvLayout::flash_attention(32, 1000, chunk).block_bytes(), 2 << 20);
        assert_eq!(KvLayout::mla(61, 10, 64 * 576 * 2).block_bytes(), 61 * 64 * 576 * 2);
    }

    #[test]
    fn bad_blocks_and_layouts_are_refused() {
        let l = KvLayout::flash_attention(2, 4, 8);
        assert_eq!(l.plan(&[(4, 0)]), Err(LayoutError::NoSuchBlock { block: 4, num_blocks: 4 }));
        let mut short = l.clone();
        short.tensor_bytes[1] -= 1;
        assert!(matches!(short.validate(), Err(LayoutError::OutOfTensor { layer: 1, .. })));
        let mut missing = l.clone();
        missing.layers[0].tensor = 9;
        assert_eq!(missing.validate(), Err(LayoutError::NoSuchTensor(0)));
        assert!(KvLayout::flash_attention(0, 4, 8).validate().is_err());
        let mut parts = l.clone();
        parts.kv_parts = 3;
        assert!(parts.validate().is_err());
        // Hostile sizes (a connector's registration) are refused, never overflow.
        let mut huge = l;
        huge.num_blocks = u64::MAX;
        huge.layers[0].block_stride = u64::MAX / 2;
        huge.chunk_bytes = u64::MAX;
        assert_eq!(huge.validate(), Err(LayoutError::Malformed("offsets overflow 64 bits")));
        assert_eq!(huge.block_bytes(), u64::MAX);
    }
}
