//! Deterministic test blocks and chained hashes, for the CLI's put/get/bench and the tests.

fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// `n` chained 16-byte block hashes for a prompt identified by `seed`: hash `i` depends on every
/// hash before it, like an engine's prefix hashes.
///
/// ```
/// let a = kvtier_client::testdata::chained_hashes(1, 3);
/// let b = kvtier_client::testdata::chained_hashes(1, 5);
/// assert_eq!(&b[..3], &a[..]);
/// assert_ne!(kvtier_client::testdata::chained_hashes(2, 3), a);
/// ```
pub fn chained_hashes(seed: u64, n: usize) -> Vec<bytes::Bytes> {
    let mut prev = splitmix64(seed ^ 0x6b76_7469_6572);
    (0..n)
        .map(|i| {
            let a = splitmix64(prev ^ i as u64);
            let b = splitmix64(a);
            prev = a;
            bytes::Bytes::from([a.to_le_bytes(), b.to_le_bytes()].concat())
        })
        .collect()
}

/// Fills `out` with the deterministic content of the block named `hash`.
pub fn fill_block(hash: &[u8], out: &mut [u8]) {
    let mut x = hash.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3));
    for chunk in out.chunks_mut(8) {
        x = splitmix64(x);
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
}

/// The deterministic content of the block named `hash`.
pub fn block(hash: &[u8], len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    fill_block(hash, &mut v);
    v
}
