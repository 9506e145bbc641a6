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
fn cache(slabs: u32, policy: PolicyKind) -> (HostCache, NsIdx) {
    let mut c = HostCache::new(SlabAllocator::new(slabs, 4 * 4096, 2), policy, CacheLimits::default());
    let ns = c.register(NamespaceId([1; 16]), 4096).unwrap();
    (c, ns)
}

fn save(c: &mut HostCache, ns: NsIdx, hashes: &[BlockHash]) -> Vec<Reserved> {
    let (id, out) = c.reserve(A, ns, hashes, None).unwrap();
    if id != 0 {
        c.commit(A, id).unwrap();
    }
    out
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
    assert_eq!(c.peek_prefix(ns, &hs(8..16)), 8);
    assert_eq!((100..108).filter(|&i| c.peek_prefix(other, &hs(i..i + 1)) == 1).count(), 4);
    assert!(c.stats().used_bytes <= c.stats().capacity_bytes);
}

#[test]
fn held_blocks_per_client_are_limited() {
    let limits = CacheLimits { max_held_per_client: 3, ..Default::default() };
    let mut c = HostCache::new(SlabAllocator::new(2, 4 * 4096, 2), PolicyKind::Lru, limits);
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
