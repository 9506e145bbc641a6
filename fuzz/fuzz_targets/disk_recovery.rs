//! What a restarted daemon reads back from disk, whatever the disk holds: a superblock, slot
//! headers (and their verification against a block), and the persistent index's entries, which
//! are restored into a cache with a disk tier. Invariants: no panic; every entry is either
//! restored or dropped; what is restored stays within the spill files and is then usable.

#![no_main]

use kvtier_core::alloc::SlabAllocator;
use kvtier_core::block::BlockHash;
use kvtier_core::cache::{BlockCache, CacheLimits, DiskSetup};
use kvtier_core::policy::{AdmissionKind, PolicyKind};
use kvtier_daemon::disk_io::format::{SlotHeader, Superblock, HEADER_BYTES};
use kvtier_daemon::disk_io::{restore, store};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = Superblock::decode(data);
    if let Ok(h) = SlotHeader::decode(data) {
        let _ = SlotHeader::verify(data, HEADER_BYTES as usize, &h.namespace, &h.hash, h.block_bytes);
        let _ = SlotHeader::verify(data, 17, &h.namespace, &h.hash, h.block_bytes);
    }
    // Index entries: [key length][key][32-byte value], repeated.
    let mut entries = Vec::new();
    let mut rest = data;
    while let Some((&klen, tail)) = rest.split_first() {
        let (klen, vlen) = (klen as usize % 49, 32);
        if tail.len() < klen + vlen {
            break;
        }
        entries.push(store::decode(&tail[..klen], &tail[klen..klen + vlen]));
        rest = &tail[klen + vlen..];
    }
    let blocks: Vec<_> = entries.into_iter().flatten().collect();
    let n = blocks.len();
    let setup = DiskSetup {
        alloc: SlabAllocator::new(8, 256 << 10, 4),
        header_bytes: HEADER_BYTES,
        admission: AdmissionKind::Always,
        reserve_fraction: 0.1,
    };
    let host = SlabAllocator::new(4, 256 << 10, 4);
    let limits = CacheLimits { max_namespaces: 8, ..CacheLimits::default() };
    let mut cache = BlockCache::with_disk(host, PolicyKind::PrefixLfu, limits, setup);
    let hashes: Vec<(kvtier_core::namespace::NamespaceId, BlockHash, u64)> =
        blocks.iter().map(|b| (b.namespace, b.hash, b.block_bytes)).collect();
    let (restored, dropped) = restore(&mut cache, 1, 4, blocks);
    assert_eq!(restored as usize + dropped.len(), n, "every entry restored or dropped");
    let st = cache.disk_stats().unwrap();
    assert!(st.used_bytes <= st.capacity_bytes && st.blocks == restored);
    // What was restored can be promoted, acquired and demoted again.
    for (id, hash, block_bytes) in hashes {
        let Some(ns) = cache.find_namespace(&id) else { continue };
        if cache.namespace(ns).block_bytes != block_bytes {
            continue;
        }
        let plan = cache.begin_promotions(ns, &[hash]);
        for p in &plan.started {
            cache.complete_promotion(p, kvtier_core::cache::PromotionOutcome::Verified);
        }
        let _ = cache.plan_demotions(4);
    }
    assert!(cache.stats().used_bytes <= cache.stats().capacity_bytes);
});
