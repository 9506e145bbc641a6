//! Fingerprints of shipped blocks: what proves a block pulled from a peer is the one it offered.
//!
//! Both sides hash the block with xxh3-64 seeded by a random seed the puller picks per pull (and
//! the block's position), so a stale block, a block of another pull or a block put in the wrong
//! slot cannot match. `Full` covers every byte; `Sampled` covers eight 4 KiB pages (the first, the
//! last and six the seed picks), which catches every wrong, stale, misplaced or cut block at a
//! fraction of the cost and leaves bit errors inside unsampled pages to the transport's own
//! integrity (TCP checksums, memory ECC). Pure code.

use serde::{Deserialize, Serialize};
use std::ops::Range;
use xxhash_rust::xxh3::Xxh3;

/// What a fingerprint covers.
#[derive(Clone, Copy, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Coverage {
    /// Eight 4 KiB pages chosen by the seed (the whole block when it is smaller).
    #[default]
    Sampled,
    /// Every byte.
    Full,
}

/// Sampled page size.
pub const PAGE: usize = 4096;
/// Pages a sampled fingerprint covers.
pub const SAMPLES: usize = 8;

/// splitmix64: a well-mixed 64-bit step, enough to spread seeds.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The seed of the block at position `j` of a pull seeded `seed`.
pub fn block_seed(seed: u64, j: usize) -> u64 {
    mix(seed ^ mix(j as u64))
}

/// Byte ranges of a `len`-byte block that `coverage` hashes, in order, not overlapping.
#[allow(clippy::single_range_in_vec_init)] // a list of ranges, here of one
pub fn covered(len: usize, coverage: Coverage, seed: u64) -> Vec<Range<usize>> {
    let pages = len.div_ceil(PAGE);
    if coverage == Coverage::Full || pages <= SAMPLES {
        return vec![0..len];
    }
    let mut picked = vec![0, pages - 1];
    let mut k = 0u64;
    while picked.len() < SAMPLES {
        k += 1;
        let page = 1 + (mix(seed.wrapping_add(k)) % (pages as u64 - 2)) as usize;
        if !picked.contains(&page) {
            picked.push(page);
        }
    }
    picked.sort_unstable();
    picked.into_iter().map(|p| p * PAGE..((p + 1) * PAGE).min(len)).collect()
}

/// The fingerprint of `data` (the block at some position, whose [`block_seed`] is `seed`).
pub fn fingerprint(data: &[u8], coverage: Coverage, seed: u64) -> u64 {
    let mut h = Xxh3::with_seed(seed);
    h.update(&(data.len() as u64).to_le_bytes());
    for r in covered(data.len(), coverage, seed) {
        h.update(&data[r]);
    }
    h.digest()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(len: usize, salt: u8) -> Vec<u8> {
        (0..len).map(|i| (i as u8).wrapping_mul(31) ^ salt ^ (i >> 12) as u8).collect()
    }

    #[test]
    fn small_blocks_and_full_coverage_hash_every_byte() {
        assert_eq!(covered(8 * PAGE, Coverage::Sampled, 1), vec![0..8 * PAGE]);
        assert_eq!(covered(100, Coverage::Sampled, 1), vec![0..100]);
        assert_eq!(covered(1 << 20, Coverage::Full, 1), vec![0..1 << 20]);
    }

    #[test]
    fn samples_are_eight_distinct_pages_with_both_ends() {
        for seed in 0..200 {
            let r = covered(1 << 20, Coverage::Sampled, block_seed(seed, 3));
            assert_eq!(r.len(), SAMPLES);
            assert_eq!(r[0], 0..PAGE);
            assert_eq!(r[SAMPLES - 1], (1 << 20) - PAGE..1 << 20);
            assert!(r.windows(2).all(|w| w[0].end <= w[1].start), "sorted, distinct: {r:?}");
        }
        // Nine pages: all but one interior page, and a ragged last page ends at the block's end.
        let r = covered(8 * PAGE + 10, Coverage::Sampled, 5);
        assert_eq!(r.len(), SAMPLES);
        assert_eq!(r.last(), Some(&(8 * PAGE..8 * PAGE + 10)));
    }

    #[test]
    fn seeds_pick_different_pages() {
        let a = covered(4 << 20, Coverage::Sampled, block_seed(1, 0));
        let b = covered(4 << 20, Coverage::Sampled, block_seed(2, 0));
        let c = covered(4 << 20, Coverage::Sampled, block_seed(1, 1));
        assert!(a != b && a != c);
    }

    #[test]
    fn a_changed_covered_byte_or_another_seed_changes_the_fingerprint() {
        let data = block(1 << 20, 7);
        for coverage in [Coverage::Sampled, Coverage::Full] {
            let seed = block_seed(42, 9);
            let f = fingerprint(&data, coverage, seed);
            assert_eq!(f, fingerprint(&data.clone(), coverage, seed), "deterministic");
            assert_ne!(f, fingerprint(&data, coverage, block_seed(43, 9)));
            for r in covered(data.len(), coverage, seed) {
                let mut bad = data.clone();
                bad[r.end - 1] ^= 1;
                assert_ne!(f, fingerprint(&bad, coverage, seed), "{coverage:?} {r:?}");
            }
            assert_ne!(f, fingerprint(&block(1 << 20, 8), coverage, seed), "another block");
            assert_ne!(f, fingerprint(&data[..data.len() - 1], coverage, seed), "a cut block");
        }
    }

    #[test]
    fn full_coverage_sees_every_byte_sampled_only_its_pages() {
        let data = block(1 << 20, 1);
        let seed = block_seed(5, 0);
        let mut bad = data.clone();
        let sampled = covered(data.len(), Coverage::Sampled, seed);
        let outside = (0..data.len()).find(|i| !sampled.iter().any(|r| r.contains(i))).unwrap();
        bad[outside] ^= 0x80;
        assert_ne!(fingerprint(&data, Coverage::Full, seed), fingerprint(&bad, Coverage::Full, seed));
        assert_eq!(fingerprint(&data, Coverage::Sampled, seed), fingerprint(&bad, Coverage::Sampled, seed));
    }
}
