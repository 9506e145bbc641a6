//! The arguments of one `kvtier_copy` launch (`kernel.cu`), computed from a layout plan: pure
//! code, tested on CPU. A launch copies segment `i` from `src[i]` to `dst[i]` (`bytes[i]`), one
//! thread block per segment; long segments are cut into pieces so that many thread blocks share
//! them, at 16-byte boundaries so the kernel's wide path stays aligned.

use super::layout::Segment;

/// Which way a launch copies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// Engine memory to the pool (save, offload).
    ToPool,
    /// Pool to engine memory (load, onload).
    ToEngine,
}

/// The three arrays `kvtier_copy` takes (device addresses and lengths), one entry per piece.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelArgs {
    /// Source address of each piece.
    pub src: Vec<u64>,
    /// Destination address of each piece.
    pub dst: Vec<u64>,
    /// Bytes of each piece.
    pub bytes: Vec<u64>,
}

impl KernelArgs {
    /// Pieces in this launch (its grid size).
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Whether there is nothing to copy.
    pub fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }

    /// Total bytes copied.
    pub fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }

    /// The three arrays back to back (`src`, `dst`, `bytes`), as `kvtier_copy` reads them: one
    /// upload per launch.
    pub fn packed(&self) -> Vec<u64> {
        [&self.src[..], &self.dst[..], &self.bytes[..]].concat()
    }
}

/// Why a launch could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GatherError {
    /// The plan names an engine tensor with no known device address.
    #[error("segment names engine tensor {0}, but only {1} are registered")]
    NoSuchTensor(u32, usize),
    /// A piece size that would break the kernel's alignment.
    #[error("piece size {0} is not a positive multiple of 16")]
    BadPiece(u64),
}

/// Launch arguments for `plan` (whose pool offsets are device addresses of pool bytes), engine
/// tensor `t` at device address `tensors[t]`, pieces of at most `max_piece` bytes.
pub fn kernel_args(
    plan: &[Segment],
    tensors: &[u64],
    direction: Direction,
    max_piece: u64,
) -> Result<KernelArgs, GatherError> {
    if max_piece == 0 || !max_piece.is_multiple_of(16) {
        return Err(GatherError::BadPiece(max_piece));
    }
    let mut args = KernelArgs::default();
    for s in plan {
        let base = *tensors.get(s.tensor as usize).ok_or(GatherError::NoSuchTensor(s.tensor, tensors.len()))?;
        let engine = base + s.engine_offset;
        let (src, dst) = match direction {
            Direction::ToPool => (engine, s.pool_offset),
            Direction::ToEngine => (s.pool_offset, engine),
        };
        let mut done = 0;
        while done < s.bytes {
            let n = (s.bytes - done).min(max_piece);
            args.src.push(src + done);
            args.dst.push(dst + done);
            args.bytes.push(n);
            done += n;
        }
    }
    Ok(args)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::layout::KvLayout;

    #[test]
    fn pieces_cover_every_segment_exactly_in_both_directions() {
        let layout = KvLayout::flash_attention(3, 10, 4096 + 48);
        let pool = 1 << 40;
        let blocks = [(7, pool), (2, pool + layout.block_bytes()), (3, pool + 5 * layout.block_bytes())];
        let plan = layout.plan(&blocks).unwrap();
        let tensors = [0x1000_0000, 0x2000_0000, 0x3000_0000];
        let save = kernel_args(&plan, &tensors, Direction::ToPool, 1024).unwrap();
        let load = kernel_args(&plan, &tensors, Direction::ToEngine, 1024).unwrap();
        assert_eq!((save.src.clone(), save.dst.clone()), (load.dst.clone(), load.src.clone()), "mirror images");
        assert_eq!(save.total_bytes(), 3 * layout.block_bytes());
        assert!(save.bytes.iter().all(|&b| b > 0 && b <= 1024));
        // Pieces of one segment follow each other; every piece starts 16-byte aligned relative
        // to its segment.
        let mut i = 0;
        for s in &plan {
            let mut at = 0;
            while at < s.bytes {
                assert_eq!(save.src[i], tensors[s.tensor as usize] + s.engine_offset + at);
                assert_eq!(save.dst[i], s.pool_offset + at);
                assert_eq!(at % 16, 0);
                at += save.bytes[i];
                i += 1;
            }
            assert_eq!(at, s.bytes);
        }
        assert_eq!(i, save.len());
    }

    #[test]
    fn a_copy_by_the_arguments_lands_every_chunk_where_the_layout_says() {
        // Fake "device memory": one address space, engine tensors then the pool.
        let layout = KvLayout::flash_infer(2, 6, 64);
        let tensor_bytes = layout.tensor_bytes.clone();
        let mut memory: Vec<u8> = (0..4096u32).map(|i| (i * 7 + 3) as u8).collect();
        let tensors: Vec<u64> = tensor_bytes.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
        let pool = 2048u64;
        let blocks = [(4, pool), (1, pool + layout.block_bytes())];
        let args = kernel_args(&layout.plan(&blocks).unwrap(), &tensors, Direction::ToPool, 32).unwrap();
        let before = memory.clone();
        // As kvtier_copy reads its one argument array: sources, then destinations, then sizes.
        let (packed, n) = (args.packed(), args.len());
        assert_eq!(packed.len(), 3 * n);
        for i in 0..n {
            let (s, d, len) = (packed[i] as usize, packed[n + i] as usize, packed[2 * n + i] as usize);
            memory.copy_within(s..s + len, d);
        }
        for (k, &(block, at)) in blocks.iter().enumerate() {
            for (l, place) in layout.layers.iter().enumerate() {
                for kv in 0..2u64 {
                    let engine = tensors[place.tensor as usize]
                        + place.offset
                        + block * place.block_stride
                        + kv * place.kv_stride;
                    let pooled = at + (l as u64 * 2 + kv) * layout.chunk_bytes;
                    let (e, p, n) = (engine as usize, pooled as usize, layout.chunk_bytes as usize);
                    assert_eq!(memory[p..p + n], before[e..e + n], "block {k} layer {l} part {kv}");
                }
            }
        }
    }

    #[test]
    fn bad_requests_are_refused() {
        let layout = KvLayout::mla(2, 4, 512);
        let plan = layout.plan(&[(1, 0)]).unwrap();
        assert_eq!(kernel_args(&plan, &[0], Direction::ToPool, 1000), Err(GatherError::BadPiece(1000)));
        assert_eq!(kernel_args(&plan, &[], Direction::ToPool, 1024), Err(GatherError::NoSuchTensor(0, 0)));
        assert!(kernel_args(&[], &[], Direction::ToEngine, 1024).unwrap().is_empty());
    }
}
