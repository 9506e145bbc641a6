use super::*;

const A: ClientId = ClientId(1);
const B: ClientId = ClientId(2);

fn h(i: u64) -> BlockHash {
    BlockHash::from_u64(i)
}

fn hs(r: std::ops::Range<u64>) -> Vec<BlockHash> {
    r.map(h).collect()
}

/// A cache of `slabs` slabs of four 4 KiB slots, one namespace of 4 KiB blocks.
fn cache(slabs: u32, policy: PolicyKind) -> (BlockCache, NsIdx) {
    let mut c = BlockCache::new(SlabAllocator::new(slabs, 4 * 4096, 2), policy, CacheLimits::default());
    let ns = c.register(NamespaceId([1; 16]), 4096).unwrap();
    (c, ns)
}

fn save(c: &mut BlockCache, ns: NsIdx, hashes: &[BlockHash]) -> Vec<Reserved> {
    let (id, out) = c.reserve(A, ns, hashes, None).unwrap();
    if id != 0 {
        c.commit(A, id).unwrap();
    }
    out
}

#[test]
fn block_sizes_that_overflow_are_refused_and_leave_the_id_usable() {
    // Trust finding 2: 2^64-1 bytes wrapped the stride to 0 and passed the size check.
    let (mut c, _) = cache(1, PolicyKind::Lru);
    let id = NamespaceId([9; 16]);
    for bad in [u64::MAX, u64::MAX - 4094, u64::MAX - 4095, 1 << 63, 0, 4 * 4096 + 1] {
        assert!(matches!(c.register(id, bad), Err(CacheError::WrongBlockSize(_))), "{bad}");
    }
    let ns = c.register(id, 4096).unwrap();
    assert!(matches!(save(&mut c, ns, &hs(0..1))[0], Reserved::Slot(_)));
}

fn limited(max_namespaces: usize) -> BlockCache {
    let limits = CacheLimits { max_namespaces, ..CacheLimits::default() };
    BlockCache::new(SlabAllocator::new(4, 4 * 4096, 2), PolicyKind::Lru, limits)
}

#[test]
fn a_full_namespace_table_reclaims_unused_namespaces() {
    // Trust finding 3: registrations filled the fixed table for good.
    let mut c = limited(3);
    let ids: Vec<NamespaceId> = (0..3u8).map(|i| NamespaceId([i; 16])).collect();
    let held = c.register(ids[0], 4096).unwrap();
    c.attach(A, held);
    let full = c.register(ids[1], 4096).unwrap();
    c.attach(B, full);
    save(&mut c, full, &hs(0..2));
    c.disconnect(B);
    let empty = c.register(ids[2], 4096).unwrap();
    // Full: the empty, unregistered namespace goes first, at no cost.
    let fourth = c.register(NamespaceId([3; 16]), 8192).unwrap();
    assert_eq!(fourth, empty, "its index is reused");
    assert_eq!(c.find_namespace(&ids[2]), None);
    assert_eq!(c.namespace(fourth).block_bytes, 8192);
    assert_eq!(c.lookup(full, &hs(0..2)), 2, "the namespace holding blocks is kept while another way exists");
    c.attach(A, fourth);
    // Then the least recently used unregistered one is emptied.
    let fifth = c.register(NamespaceId([4; 16]), 4096).unwrap();
    assert_eq!(fifth, full);
    assert_eq!(c.find_namespace(&ids[1]), None);
    assert_eq!(c.lookup(fifth, &hs(0..2)), 0, "no block of the old namespace is seen in the new one");
    assert_eq!(c.stats().evicted_blocks, 2);
    assert_eq!(c.stats().reclaimed_namespaces, 2);
    assert_eq!(c.stats().used_bytes, 0);
    // Every namespace registered by a live connection: refused, nothing changes.
    c.attach(A, fifth);
    c.attach(A, fifth);
    assert_eq!(c.attached(A), &[held, fourth, fifth], "each once");
    assert_eq!(c.register(NamespaceId([5; 16]), 4096), Err(CacheError::TooManyNamespaces(3)));
    assert_eq!(c.stats().namespaces, 3);
}

#[test]
fn a_namespace_with_pinned_blocks_is_not_reclaimed() {
    let mut c = limited(1);
    let ns = c.register(NamespaceId([1; 16]), 4096).unwrap();
    save(&mut c, ns, &hs(0..1));
    let (lease, _) = c.acquire(A, ns, &hs(0..1)).unwrap();
    assert_eq!(c.register(NamespaceId([2; 16]), 4096), Err(CacheError::TooManyNamespaces(1)));
    assert_eq!(c.lookup(ns, &hs(0..1)), 1, "the pinned block is still served");
    c.release(A, lease).unwrap();
    assert!(c.register(NamespaceId([2; 16]), 4096).is_ok());
}

#[test]
fn feed_events_keep_the_id_of_a_reclaimed_namespace() {
    let mut c = limited(1);
    let old = NamespaceId([1; 16]);
    let ns = c.register(old, 4096).unwrap();
    save(&mut c, ns, &hs(0..1));
    let new = NamespaceId([2; 16]);
    assert_eq!(c.register(new, 4096).unwrap(), ns);
    save(&mut c, ns, &hs(5..6));
    let ids: Vec<NamespaceId> = c.events().since(0).unwrap().iter().map(|e| e.namespace).collect();
    assert_eq!(ids, vec![old, old, new], "stored, removed (old), stored (new)");
}

#[test]
fn reservation_is_invisible_until_commit() {
    let (mut c, ns) = cache(1, PolicyKind::Lru);
    let (id, out) = c.reserve(A, ns, &hs(0..2), None).unwrap();
    assert!(matches!(out[0], Reserved::Slot(_)));
    assert_eq!(c.lookup(ns, &hs(0..2)), 0);
    assert_eq!(c.acquire(B, ns, &hs(0..2)).unwrap().0, 0);
    // A second writer of the same block is told it is present and does nothing.
    assert_eq!(c.reserve(B, ns, &hs(0..1), None).unwrap(), (0, vec![Reserved::Present]));
    assert_eq!(c.commit(A, id).unwrap(), 2);
    assert_eq!(c.lookup(ns, &hs(0..3)), 2);
}

#[test]
fn abort_frees_slots_and_shows_nothing() {
    let (mut c, ns) = cache(1, PolicyKind::Lru);
    let (id, _) = c.reserve(A, ns, &hs(0..4), None).unwrap();
    assert_eq!(c.stats().used_bytes, 4 * 4096);
    c.abort(A, id).unwrap();
    assert_eq!(c.stats().used_bytes, 0);
    assert_eq!(c.lookup(ns, &hs(0..4)), 0);
    assert_eq!(c.commit(A, id), Err(CacheError::UnknownId(id)));
}

#[test]
fn ids_belong_to_their_client() {
    let (mut c, ns) = cache(1, PolicyKind::Lru);
    let (id, _) = c.reserve(A, ns, &hs(0..1), None).unwrap();
    assert_eq!(c.commit(B, id), Err(CacheError::UnknownId(id)));
    assert_eq!(c.abort(B, id), Err(CacheError::UnknownId(id)));
    c.commit(A, id).unwrap();
    let (lease, _) = c.acquire(A, ns, &hs(0..1)).unwrap();
    assert_eq!(c.release(B, lease), Err(CacheError::UnknownId(lease)));
}

#[test]
fn lru_evicts_least_recent_and_budget_holds() {
    let (mut c, ns) = cache(1, PolicyKind::Lru);
    save(&mut c, ns, &hs(0..4));
    let (lease, _) = c.acquire(A, ns, &hs(0..1)).unwrap(); // 0 is now most recent
    c.release(A, lease).unwrap();
    save(&mut c, ns, &hs(10..11)); // evicts 1
    assert_eq!(c.lookup(ns, &hs(1..2)), 0);
    assert_eq!(c.lookup(ns, &hs(0..1)), 1);
    let s = c.stats();
    assert_eq!(s.blocks, 4);
    assert_eq!(s.evicted_blocks, 1);
    assert!(s.used_bytes <= s.capacity_bytes);
}

#[test]
fn pinned_blocks_are_never_evicted() {
    for policy in [PolicyKind::Lru, PolicyKind::PrefixLfu] {
        let (mut c, ns) = cache(1, policy);
        save(&mut c, ns, &hs(0..4));
        let (lease, slots) = c.acquire(B, ns, &hs(0..4)).unwrap();
        assert_eq!(slots.len(), 4);
        assert_eq!(save(&mut c, ns, &hs(10..12)), vec![Reserved::NoSpace; 2]);
        assert_eq!(c.lookup(ns, &hs(0..4)), 4);
        c.release(B, lease).unwrap();
        assert!(matches!(save(&mut c, ns, &hs(10..11))[0], Reserved::Slot(_)));
    }
}

#[test]
fn reserved_blocks_are_never_evicted() {
    let (mut c, ns) = cache(1, PolicyKind::Lru);
    let (_id, _) = c.reserve(A, ns, &hs(0..4), None).unwrap();
    assert_eq!(c.reserve(B, ns, &hs(10..11), None).unwrap().1, vec![Reserved::NoSpace]);
}

#[test]
fn no_space_stops_the_rest_of_the_prefix() {
    let (mut c, ns) = cache(1, PolicyKind::Lru);
    let (_id, out) = c.reserve(A, ns, &hs(0..6), None).unwrap();
    assert_eq!(out.iter().filter(|o| matches!(o, Reserved::Slot(_))).count(), 4);
    assert_eq!(&out[4..], &[Reserved::NoSpace, Reserved::NoSpace]);
}

#[test]
fn saving_a_prompt_never_evicts_its_own_prefix() {
    let (mut c, ns) = cache(1, PolicyKind::Lru);
    save(&mut c, ns, &hs(0..2));
    save(&mut c, ns, &hs(20..22)); // most recent
                                   // 0,1 are the oldest, but they are the prefix being extended.
    let out = save(&mut c, ns, &hs(0..4));
    assert_eq!(&out[..2], &[Reserved::Present, Reserved::Present]);
    assert_eq!(c.lookup(ns, &hs(0..4)), 4);
}

#[test]
fn disconnect_releases_everything() {
    let (mut c, ns) = cache(2, PolicyKind::Lru);
    save(&mut c, ns, &hs(0..2));
    let (_lease, _) = c.acquire(A, ns, &hs(0..2)).unwrap();
    let (_res, _) = c.reserve(A, ns, &hs(5..7), None).unwrap();
    c.disconnect(A);
    let s = c.stats();
    assert_eq!((s.blocks, s.reserved_blocks, s.used_bytes), (2, 0, 2 * 4096));
    // Nothing is pinned any more: a full overwrite evicts both.
    save(&mut c, ns, &hs(100..108));
    assert_eq!(c.lookup(ns, &hs(0..1)), 0);
}

#[test]
fn block_size_is_checked() {
    let (mut c, _) = cache(1, PolicyKind::Lru);
    assert!(matches!(c.register(NamespaceId([1; 16]), 100), Err(CacheError::WrongBlockSize(_))));
    assert!(matches!(c.register(NamespaceId([2; 16]), 0), Err(CacheError::WrongBlockSize(_))));
    assert!(matches!(c.register(NamespaceId([3; 16]), 4 * 4096 + 1), Err(CacheError::WrongBlockSize(_))));
    assert!(c.register(NamespaceId([4; 16]), 4 * 4096).is_ok());
}

#[test]
fn namespaces_do_not_see_each_other() {
    let (mut c, ns) = cache(2, PolicyKind::Lru);
    let other = c.register(NamespaceId([9; 16]), 4096).unwrap();
    save(&mut c, ns, &hs(0..2));
    assert_eq!(c.lookup(other, &hs(0..2)), 0);
}

#[test]
fn newcomer_namespace_gets_its_fair_share() {
    let (mut c, ns) = cache(4, PolicyKind::Lru);
    save(&mut c, ns, &hs(0..16)); // fills all 4 slabs
    let other = c.register(NamespaceId([9; 16]), 8192).unwrap();
    for i in 0..8 {
        let out = save(&mut c, other, &hs(100 + i..101 + i));
        assert!(matches!(out[0], Reserved::Slot(_)), "block {i}: {out:?}");
    }
    // Two slabs each (8 KiB blocks: 2 per slab, so 4 held).
    assert_eq!((0..16).filter(|&i| c.peek_prefix(ns, &hs(i..i + 1)) == 1).count(), 8);
    assert_eq!((100..108).filter(|&i| c.peek_prefix(other, &hs(i..i + 1)) == 1).count(), 4);
    assert!(c.stats().used_bytes <= c.stats().capacity_bytes);
}

#[test]
fn held_blocks_per_client_are_limited() {
    let limits = CacheLimits { max_held_per_client: 3, ..Default::default() };
    let mut c = BlockCache::new(SlabAllocator::new(2, 4 * 4096, 2), PolicyKind::Lru, limits);
    let ns = c.register(NamespaceId([1; 16]), 4096).unwrap();
    assert!(matches!(c.reserve(A, ns, &hs(0..4), None), Err(CacheError::TooManyHeld { .. })));
    let (id, _) = c.reserve(A, ns, &hs(0..3), None).unwrap();
    assert!(c.reserve(A, ns, &hs(5..6), None).is_err());
    c.commit(A, id).unwrap();
    assert!(c.reserve(A, ns, &hs(5..6), None).is_ok());
}

#[test]
fn slot_locations_are_distinct_and_inside_the_pool() {
    let (mut c, ns) = cache(4, PolicyKind::Lru);
    let out = save(&mut c, ns, &hs(0..16));
    let mut locs: Vec<_> = out
        .iter()
        .map(|o| match o {
            Reserved::Slot(s) => c.slot_location(*s),
            other => panic!("{other:?}"),
        })
        .collect();
    locs.sort();
    locs.dedup();
    assert_eq!(locs.len(), 16);
    assert!(locs.iter().all(|&(seg, off)| seg < 2 && off < 2 * 4 * 4096));
}

#[test]
fn discard_removes_a_namespace_and_leaves_busy_blocks_for_later() {
    let (mut c, ns) = cache(2, PolicyKind::Lru);
    let other = c.register(NamespaceId([2; 16]), 4096).unwrap();
    save(&mut c, ns, &hs(0..4));
    save(&mut c, other, &hs(0..2));
    let (lease, _) = c.acquire(B, ns, &hs(1..2)).unwrap();
    assert_eq!(c.discard(ns), Discarded { host: 3, disk: 0, busy: 1 });
    assert_eq!(c.lookup(ns, &hs(0..4)), 0);
    assert_eq!(c.peek_prefix(ns, &hs(1..2)), 1, "the block being read stays until released");
    assert_eq!(c.lookup(other, &hs(0..2)), 2, "other namespaces keep theirs");
    c.release(B, lease).unwrap();
    assert_eq!(c.discard(ns), Discarded { host: 1, disk: 0, busy: 0 });
    assert_eq!(c.discard(ns), Discarded::default());
    let st = c.stats();
    assert_eq!((st.blocks, st.used_bytes, st.discarded_blocks, st.evicted_blocks), (2, 2 * 4096, 4, 0));
    assert_eq!((c.events().held(ns).host, c.events().held(other).host), (0, 2));
    // The freed slots and the policy are whole again: the namespace fills its share anew.
    assert!(save(&mut c, ns, &hs(10..16)).iter().all(|r| matches!(r, Reserved::Slot(_))));
    assert_eq!(c.lookup(ns, &hs(10..16)), 6);
}

#[test]
fn discard_leaves_reservations_to_commit() {
    let (mut c, ns) = cache(1, PolicyKind::Lru);
    let (id, _) = c.reserve(A, ns, &hs(0..2), None).unwrap();
    assert_eq!(c.discard(ns), Discarded::default());
    assert_eq!(c.commit(A, id).unwrap(), 2);
    assert_eq!(c.discard(ns).host, 2);
}

mod disk_tier {
    use super::*;
    use crate::cache::{DiskChange, DiskSetup, PromotionOutcome, TierKind};
    use crate::policy::AdmissionKind;

    const HDR: u64 = 4096;

    /// Host: `host_slabs` slabs of 4 slots; disk: `disk_slabs` slabs of 4 slots; 4 KiB blocks
    /// with a 4 KiB header; a reserve of one quarter of the pool.
    fn tiered(host_slabs: u32, disk_slabs: u32, admission: AdmissionKind) -> (BlockCache, NsIdx) {
        let slab = 4 * (4096 + HDR);
        let setup = DiskSetup {
            alloc: SlabAllocator::new(disk_slabs, slab, disk_slabs),
            header_bytes: HDR,
            admission,
            reserve_fraction: 0.25,
        };
        let host = SlabAllocator::new(host_slabs, slab, host_slabs);
        let mut c = BlockCache::with_disk(host, PolicyKind::Lru, CacheLimits::default(), setup);
        let ns = c.register(NamespaceId([1; 16]), 4096).unwrap();
        (c, ns)
    }

    /// Plans and completes every write at once; returns (demotions, write-backs of hot blocks).
    fn demote_all(c: &mut BlockCache) -> (usize, usize) {
        let plan = c.plan_demotions(usize::MAX);
        for d in &plan {
            c.complete_demotion(d, Some(d.generation * 7));
        }
        let hot = plan.iter().filter(|d| d.keep_hot).count();
        (plan.len() - hot, hot)
    }

    fn promote_all(c: &mut BlockCache, ns: NsIdx, hashes: &[BlockHash], outcome: PromotionOutcome) -> usize {
        let plan = c.begin_promotions(ns, hashes);
        for p in &plan.started {
            c.complete_promotion(p, outcome);
        }
        plan.started.len()
    }

    #[test]
    fn slots_leave_room_for_the_header() {
        let (mut c, ns) = tiered(1, 1, AdmissionKind::Always);
        let out = save(&mut c, ns, &hs(0..1));
        let Reserved::Slot(s) = out[0] else { panic!("{out:?}") };
        assert_eq!(c.slot_location(s).1, c.host_slot_start(s).1 + HDR);
        assert_eq!(c.namespace(ns).stride, 4096 + HDR);
    }

    #[test]
    fn pressure_demotes_the_coldest_and_cold_blocks_go_first() {
        let (mut c, ns) = tiered(2, 2, AdmissionKind::Always);
        save(&mut c, ns, &hs(0..8));
        assert_eq!(demote_all(&mut c), (2, 6), "a quarter of 8 slots demoted, the rest written back");
        assert_eq!(demote_all(&mut c), (0, 0), "the reserve is met, everything is on disk");
        let changes = c.take_disk_changes();
        assert!(changes.iter().all(|c| matches!(c, DiskChange::Stored { .. })) && changes.len() == 8, "{changes:?}");
        // Still served from the host while cold.
        assert_eq!(c.lookup_tiers(ns, &hs(0..8)), vec![TierKind::Host; 8]);
        save(&mut c, ns, &hs(8..10));
        let tiers = c.lookup_tiers(ns, &hs(0..10));
        assert_eq!(&tiers[..2], &[TierKind::Disk, TierKind::Disk], "host copies of 0 and 1 dropped first");
        assert_eq!(&tiers[2..], &[TierKind::Host; 8]);
        assert_eq!(c.acquire(A, ns, &hs(0..10)).unwrap().0, 0, "disk-only blocks are not acquired");
        assert_eq!(c.disk_stats().unwrap().blocks, 8);
    }

    #[test]
    fn promotion_makes_a_prefix_acquirable() {
        let (mut c, ns) = tiered(2, 2, AdmissionKind::Always);
        save(&mut c, ns, &hs(0..8));
        demote_all(&mut c);
        save(&mut c, ns, &hs(8..10));
        assert_eq!(promote_all(&mut c, ns, &hs(0..10), PromotionOutcome::Verified), 0, "10 blocks never fit 8 slots");
        assert_eq!(promote_all(&mut c, ns, &hs(0..4), PromotionOutcome::Verified), 2);
        let (lease, slots) = c.acquire(A, ns, &hs(0..10)).unwrap();
        assert!(lease != 0 && slots.len() == 4, "room came from 4 and 5, not the prefix: {slots:?}");
        let st = c.disk_stats().unwrap();
        assert_eq!((st.promoted_blocks, st.read_bytes), (2, 2 * (4096 + HDR)));
        assert!(c.stats().used_bytes <= c.stats().capacity_bytes);
    }

    #[test]
    fn a_corrupt_promotion_drops_the_block_everywhere() {
        let (mut c, ns) = tiered(2, 2, AdmissionKind::Always);
        save(&mut c, ns, &hs(0..8));
        demote_all(&mut c);
        save(&mut c, ns, &hs(8..10));
        c.take_disk_changes();
        let plan = c.begin_promotions(ns, &hs(0..1));
        assert_eq!(plan.pending, 1);
        assert_eq!(c.begin_promotions(ns, &hs(0..1)).pending, 1, "in flight: not started twice");
        assert!(c.begin_promotions(ns, &hs(0..1)).started.is_empty());
        c.complete_promotion(&plan.started[0], PromotionOutcome::Corrupt);
        assert_eq!(c.lookup(ns, &hs(0..1)), 0);
        let st = c.disk_stats().unwrap();
        assert_eq!((st.corrupt_blocks, st.blocks), (1, 7));
        assert!(matches!(c.take_disk_changes()[..], [DiskChange::Removed { .. }]));
    }

    #[test]
    fn reused_admission_skips_one_hit_blocks() {
        let (mut c, ns) = tiered(2, 2, AdmissionKind::Reused);
        save(&mut c, ns, &hs(0..8));
        let (lease, _) = c.acquire(A, ns, &hs(0..1)).unwrap();
        c.release(A, lease).unwrap();
        // LRU order is now 1, 2, ..., 7, 0: the two coldest (1, 2) were never hit; 0 was and
        // is written back.
        assert_eq!(demote_all(&mut c), (0, 1));
        assert_eq!(c.disk_stats().unwrap().not_admitted_blocks, 2);
        save(&mut c, ns, &hs(8..10));
        assert_eq!(c.lookup(ns, &hs(1..2)), 0, "dropped, not written");
        // Saved again after the drop: now it has shown it comes back, and is admitted.
        save(&mut c, ns, &hs(1..2));
        for i in [0, 4, 5, 6, 7, 8, 9] {
            let (lease, _) = c.acquire(A, ns, &hs(i..i + 1)).unwrap();
            c.release(A, lease).unwrap();
        }
        let plan = c.plan_demotions(usize::MAX);
        assert!(plan.iter().any(|d| d.key.hash == h(1)), "{plan:?}");
    }

    #[test]
    fn a_block_is_never_written_back_twice_at_once() {
        // Trust finding 1: a committed block used once is queued for write-back twice (at
        // commit, and at its first reuse); both entries were planned while the first write was
        // in flight, giving the block two disk slots and two entries in the disk policy, until
        // an eviction met the stale one and the demoter panicked ("live handle").
        let (mut c, ns) = tiered(4, 4, AdmissionKind::Always);
        save(&mut c, ns, &hs(0..1));
        let (lease, _) = c.acquire(A, ns, &hs(0..1)).unwrap();
        c.release(A, lease).unwrap();
        let first = c.plan_demotions(usize::MAX);
        assert_eq!(first.len(), 1, "one write per block: {first:?}");
        assert!(c.plan_demotions(usize::MAX).is_empty(), "not again while the first is in flight");
        c.complete_demotion(&first[0], Some(1));
        assert!(c.plan_demotions(usize::MAX).is_empty(), "on disk now");
        assert_eq!(c.disk_stats().unwrap().used_bytes, 4096 + HDR, "one disk slot");
        // Churn the disk through eviction: every stale queue entry must be harmless.
        for round in 0..20u64 {
            save(&mut c, ns, &hs(100 + round * 8..108 + round * 8));
            for i in 0..8 {
                let k = 100 + round * 8 + i;
                let (lease, _) = c.acquire(A, ns, &hs(k..k + 1)).unwrap();
                c.release(A, lease).unwrap();
            }
            demote_all(&mut c);
        }
        let st = c.disk_stats().unwrap();
        assert!(st.used_bytes <= st.capacity_bytes && st.blocks * (4096 + HDR) == st.used_bytes, "{st:?}");
    }

    #[test]
    fn discard_forgets_host_cold_and_disk_copies() {
        let (mut c, ns) = tiered(2, 2, AdmissionKind::Always);
        save(&mut c, ns, &hs(0..8));
        demote_all(&mut c);
        // Block 0's host copy makes room (disk only now); block 1's stays, cold.
        save(&mut c, ns, &hs(8..9));
        assert!(c.disk_stats().unwrap().cold_bytes > 0);
        c.take_disk_changes();
        let before = c.events().held(ns);
        let out = c.discard(ns);
        assert_eq!((out.host, out.disk, out.busy), (before.host, before.disk, 0));
        assert_eq!((out.host, out.disk), (8, 1));
        assert_eq!(c.lookup(ns, &hs(0..10)), 0);
        let changes = c.take_disk_changes();
        assert!(changes.len() == 8 && changes.iter().all(|c| matches!(c, DiskChange::Removed { .. })), "{changes:?}");
        let st = c.disk_stats().unwrap();
        assert_eq!((st.blocks, st.used_bytes, st.cold_bytes, st.evicted_blocks), (0, 0, 0, 0));
        assert_eq!((c.stats().blocks, c.stats().used_bytes), (0, 0));
        // Both tiers work as before: save, demote, promote.
        save(&mut c, ns, &hs(20..28));
        demote_all(&mut c);
        save(&mut c, ns, &hs(28..30));
        assert_eq!(promote_all(&mut c, ns, &hs(20..22), PromotionOutcome::Verified), 2);
        assert_eq!(c.lookup(ns, &hs(20..30)), 10);
    }

    #[test]
    fn blocks_moving_between_tiers_are_busy() {
        let (mut c, ns) = tiered(2, 2, AdmissionKind::Always);
        save(&mut c, ns, &hs(0..8));
        let writes = c.plan_demotions(usize::MAX);
        assert_eq!(c.discard(ns).busy, writes.len() as u64);
        for d in &writes {
            c.complete_demotion(d, Some(1));
        }
        save(&mut c, ns, &hs(0..8));
        demote_all(&mut c);
        save(&mut c, ns, &hs(8..10));
        let plan = c.begin_promotions(ns, &hs(0..1));
        assert_eq!(c.discard(ns).busy, 1);
        c.complete_promotion(&plan.started[0], PromotionOutcome::Verified);
        assert_eq!(c.discard(ns), Discarded { host: 1, disk: 0, busy: 0 });
        assert_eq!(c.disk_stats().unwrap().blocks, 0);
    }

    #[test]
    fn a_block_used_while_demoting_stays_hot() {
        let (mut c, ns) = tiered(2, 2, AdmissionKind::Always);
        save(&mut c, ns, &hs(0..8));
        let plan = c.plan_demotions(1);
        assert_eq!(plan[0].key.hash, h(0));
        let (lease, _) = c.acquire(A, ns, &hs(0..1)).unwrap();
        c.release(A, lease).unwrap();
        c.complete_demotion(&plan[0], Some(1));
        // Block 0 is hot again: the next pressure takes 1 and 2, and 0 survives new saves.
        demote_all(&mut c);
        save(&mut c, ns, &hs(8..10));
        assert_eq!(c.lookup_tiers(ns, &hs(0..1)), vec![TierKind::Host]);
    }

    #[test]
    fn a_full_disk_evicts_its_coldest_copy_and_records_it_first() {
        let (mut c, ns) = tiered(2, 1, AdmissionKind::Always);
        for round in 0..4u64 {
            save(&mut c, ns, &hs(round * 4..round * 4 + 4));
            demote_all(&mut c);
        }
        let st = c.disk_stats().unwrap();
        assert_eq!(st.used_bytes, st.capacity_bytes.min(st.blocks * (4096 + HDR)));
        assert!(st.evicted_blocks > 0, "{st:?}");
        let changes = c.take_disk_changes();
        // Every removal of a slot comes before that slot is stored again.
        let mut live = std::collections::HashMap::new();
        for ch in changes {
            match ch {
                DiskChange::Stored { slot, key, .. } => assert!(live.insert(slot, key).is_none(), "slot reused early"),
                DiskChange::Removed { slot, key, .. } => assert_eq!(live.remove(&slot), Some(key)),
            }
        }
    }

    #[test]
    fn a_failed_write_leaves_the_block_host_only() {
        let (mut c, ns) = tiered(2, 2, AdmissionKind::Always);
        save(&mut c, ns, &hs(0..8));
        for d in c.plan_demotions(usize::MAX) {
            c.complete_demotion(&d, None);
        }
        assert_eq!(c.disk_stats().unwrap().used_bytes, 0);
        assert!(c.take_disk_changes().is_empty());
        save(&mut c, ns, &hs(8..10));
        assert_eq!(c.lookup(ns, &hs(0..1)), 0, "dropped from the host with no disk copy");
    }

    #[test]
    fn restore_rebuilds_disk_only_blocks() {
        let (mut c, _) = tiered(2, 2, AdmissionKind::Always);
        let id = NamespaceId([9; 16]);
        let slot = |s| SlotId { slab: 1, slot: s };
        assert_eq!(c.restore_disk_block(id, 4096, h(1), slot(0)), Ok(()));
        assert_eq!(c.restore_disk_block(id, 4096, h(2), slot(2)), Ok(()));
        assert_eq!(c.restore_disk_block(id, 4096, h(2), slot(3)), Err(RestoreError::Duplicate));
        assert_eq!(c.restore_disk_block(id, 4096, h(3), slot(2)), Err(RestoreError::SlotTaken));
        assert_eq!(c.restore_disk_block(id, 4096, h(4), slot(9)), Err(RestoreError::SlotTaken));
        assert!(matches!(c.restore_disk_block(id, 1 << 30, h(5), slot(1)), Err(RestoreError::Namespace(_))));
        let ns = c.find_namespace(&id).unwrap();
        assert_eq!(c.lookup_tiers(ns, &[h(1)]), vec![TierKind::Disk]);
        assert_eq!(c.disk_stats().unwrap().restored_blocks, 2);
        assert_eq!(promote_all(&mut c, ns, &[h(2), h(1)], PromotionOutcome::Verified), 2);
        assert_eq!(c.acquire(A, ns, &[h(1), h(2)]).unwrap().1.len(), 2);
    }

    #[test]
    fn disabling_the_disk_keeps_host_copies_only() {
        let (mut c, ns) = tiered(2, 2, AdmissionKind::Always);
        save(&mut c, ns, &hs(0..8));
        demote_all(&mut c);
        save(&mut c, ns, &hs(8..10));
        let inflight = c.begin_promotions(ns, &hs(0..1)).started;
        assert_eq!(c.disable_disk(), 8);
        assert!(!c.has_disk());
        assert!(c.plan_demotions(8).is_empty());
        c.complete_promotion(&inflight[0], PromotionOutcome::IoError);
        assert_eq!(c.lookup(ns, &hs(0..2)), 0);
        // Room for the promotion came from the least recent host block (2, never written).
        assert_eq!(c.lookup(ns, &hs(2..3)), 0);
        assert_eq!(c.lookup(ns, &hs(3..10)), 7);
        assert_eq!(c.disk_stats().unwrap().blocks, 0);
        save(&mut c, ns, &hs(10..20));
        assert!(c.stats().used_bytes <= c.stats().capacity_bytes);
    }
}

mod router_events {
    use super::*;
    use crate::cache::{DiskSetup, PromotionOutcome, TierKind};
    use crate::events::{EventKind, Held};
    use crate::policy::AdmissionKind;
    use std::collections::HashMap;

    /// Replays the whole event log into a map, as a router does.
    fn replay(c: &BlockCache) -> HashMap<BlockKey, TierKind> {
        let mut view = HashMap::new();
        for e in c.events().since(0).unwrap() {
            match e.kind {
                EventKind::Stored { tier, .. } => assert!(view.insert(e.key, tier).is_none(), "stored twice: {e:?}"),
                EventKind::TierChanged { from, to } => assert_eq!(view.insert(e.key, to), Some(from), "{e:?}"),
                EventKind::Removed { from } => assert_eq!(view.remove(&e.key), Some(from), "{e:?}"),
            }
        }
        // What the log adds up to per namespace is what the replay holds.
        let mut held: HashMap<NsIdx, Held> = HashMap::new();
        for (key, tier) in &view {
            let h = held.entry(key.ns).or_default();
            *if *tier == TierKind::Host { &mut h.host } else { &mut h.disk } += 1;
        }
        for ns in (0..4).map(NsIdx) {
            assert_eq!(c.events().held(ns), held.get(&ns).copied().unwrap_or_default(), "{ns:?}");
        }
        view
    }

    fn snapshot(c: &BlockCache) -> HashMap<BlockKey, TierKind> {
        c.snapshot().1.into_iter().map(|(k, _, t)| (k, t)).collect()
    }

    #[test]
    fn events_replay_to_the_snapshot_through_every_tier_move() {
        let setup = DiskSetup {
            alloc: SlabAllocator::new(2, 4 * 8192, 2),
            header_bytes: 4096,
            admission: AdmissionKind::Always,
            reserve_fraction: 0.25,
        };
        let mut c =
            BlockCache::with_disk(SlabAllocator::new(2, 4 * 8192, 2), PolicyKind::Lru, CacheLimits::default(), setup);
        let ns = c.register(NamespaceId([1; 16]), 4096).unwrap();
        for round in 0..6u64 {
            save(&mut c, ns, &hs(round * 3..round * 3 + 5));
            for d in c.plan_demotions(usize::MAX) {
                c.complete_demotion(&d, Some(1));
            }
            let plan = c.begin_promotions(ns, &hs(0..2));
            for (i, p) in plan.started.iter().enumerate() {
                let outcome = if round == 3 && i == 0 { PromotionOutcome::Corrupt } else { PromotionOutcome::Verified };
                c.complete_promotion(p, outcome);
            }
            assert_eq!(replay(&c), snapshot(&c), "round {round}");
        }
        assert!(c.events().since(0).unwrap().iter().any(|e| matches!(e.kind, EventKind::TierChanged { .. })));
        c.disable_disk();
        assert_eq!(replay(&c), snapshot(&c), "after the disk failed");
        assert_eq!(c.snapshot().0, c.events().last_sequence());
    }

    #[test]
    fn reservations_and_aborts_are_not_events() {
        let (mut c, ns) = cache(1, PolicyKind::Lru);
        let (id, _) = c.reserve(A, ns, &hs(0..2), None).unwrap();
        c.abort(A, id).unwrap();
        assert_eq!(c.events().last_sequence(), 0);
        save(&mut c, ns, &hs(0..2));
        let ev = c.events().since(0).unwrap();
        assert_eq!(ev[1].kind, EventKind::Stored { tier: TierKind::Host, parent: Some(h(0)) });
    }
}

#[test]
fn discard_in_handle_ranges_removes_each_selected_block_once() {
    let (mut c, ns) = cache(4, PolicyKind::Lru);
    let other = c.register(NamespaceId([2; 16]), 4096).unwrap();
    save(&mut c, ns, &hs(0..6));
    save(&mut c, other, &hs(0..4));
    save(&mut c, ns, &hs(6..8));
    // Only `ns` is selected: `other` lies past the end of the list.
    let mut total = Discarded::default();
    for start in (0..c.handle_bound() + 5).step_by(3) {
        total += c.discard_handles(&[true], start..start + 3);
    }
    assert_eq!(total, Discarded { host: 8, disk: 0, busy: 0 });
    assert_eq!((c.lookup(ns, &hs(0..8)), c.lookup(other, &hs(0..4))), (0, 4));
}
