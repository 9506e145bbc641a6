//! Contract tests every policy must pass (the `Eviction` trait's promises).

use super::{Access, PolicyKind};
use crate::block::Handle;
use std::collections::BTreeSet;

const ALL: [PolicyKind; 3] = [PolicyKind::Lru, PolicyKind::PrefixLfu, PolicyKind::Belady];

fn acc(next: u64) -> Access {
    Access { next_use: Some(next), ..Default::default() }
}

#[test]
fn evict_returns_only_tracked_evictable_handles_and_untracks_them() {
    for kind in ALL {
        let mut p = kind.build();
        let mut tracked = BTreeSet::new();
        let mut x = 7u64;
        for step in 0..5000u32 {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            let h = Handle(((x >> 33) % 64) as u32);
            match (x >> 20) % 4 {
                0 | 1 if !tracked.contains(&h) => {
                    p.insert(h, &acc(step as u64 + (x % 100)));
                    tracked.insert(h);
                }
                0 | 1 => p.touch(h, &acc(step as u64 + (x % 100))),
                2 if tracked.contains(&h) => {
                    p.remove(h);
                    tracked.remove(&h);
                }
                _ => {
                    // Odd handles are "pinned".
                    if let Some(v) = p.evict(&mut |h| h.0 % 2 == 0) {
                        assert!(tracked.remove(&v), "{}: evicted untracked {v:?}", p.name());
                        assert_eq!(v.0 % 2, 0, "{}: evicted a pinned block", p.name());
                    } else {
                        assert!(tracked.iter().all(|h| h.0 % 2 == 1), "{}: refused with victims left", p.name());
                    }
                }
            }
            assert_eq!(p.len(), tracked.len(), "{}", p.name());
        }
    }
}

#[test]
fn kind_names_match_policy_names() {
    for kind in ALL {
        assert_eq!(kind.name(), kind.build().name());
    }
}

#[test]
fn pinned_blocks_are_never_evicted() {
    for kind in ALL {
        let mut p = kind.build();
        for i in 0..10 {
            p.insert(Handle(i), &acc(i as u64));
        }
        assert_eq!(p.evict(&mut |_| false), None, "{}", p.name());
        assert_eq!(p.len(), 10);
    }
}

#[test]
fn lru_evicts_in_recency_order() {
    let mut p = PolicyKind::Lru.build();
    for i in 0..5 {
        p.insert(Handle(i), &Access::default());
    }
    p.touch(Handle(0), &Access::default());
    p.touch(Handle(2), &Access::default());
    let order: Vec<_> = std::iter::from_fn(|| p.evict(&mut |_| true)).map(|h| h.0).collect();
    assert_eq!(order, vec![1, 3, 4, 0, 2]);
}

#[test]
fn belady_evicts_farthest_next_use() {
    let mut p = PolicyKind::Belady.build();
    p.insert(Handle(0), &acc(10));
    p.insert(Handle(1), &acc(30));
    p.insert(Handle(2), &Access::default()); // never used again
    p.insert(Handle(3), &acc(20));
    let order: Vec<_> = std::iter::from_fn(|| p.evict(&mut |_| true)).map(|h| h.0).collect();
    assert_eq!(order, vec![2, 1, 3, 0]);
}

#[test]
fn prefix_lfu_keeps_popular_prefix_over_recent_tails() {
    let mut p = PolicyKind::PrefixLfu.build();
    // A shared prefix block used by many prompts.
    p.insert(Handle(0), &Access::default());
    for _ in 0..5 {
        p.touch(Handle(0), &Access::default());
    }
    // One-off tails hanging off it.
    for i in 1..4 {
        p.insert(Handle(i), &Access { parent: Some(Handle(0)), ..Default::default() });
    }
    let first_three: Vec<_> = (0..3).map(|_| p.evict(&mut |_| true).unwrap().0).collect();
    assert!(!first_three.contains(&0), "{first_three:?}");
}

#[test]
fn prefix_lfu_ages_out_formerly_popular_blocks() {
    let mut p = PolicyKind::PrefixLfu.build();
    p.insert(Handle(0), &Access::default());
    for _ in 0..3 {
        p.touch(Handle(0), &Access::default());
    }
    // A stream of new blocks, each used twice, with evictions in between: the clock rises past
    // the old block's value and it goes.
    let mut evicted_old = false;
    for i in 1..50 {
        p.insert(Handle(i), &Access::default());
        p.touch(Handle(i), &Access::default());
        if p.evict(&mut |_| true) == Some(Handle(0)) {
            evicted_old = true;
            break;
        }
    }
    assert!(evicted_old);
}
