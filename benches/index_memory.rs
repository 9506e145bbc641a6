//! Index and policy memory per block at one million blocks, counted by a tracking allocator,
//! next to the 32-byte hash each block is named by and the 128 B/block goal. The router feed's
//! event log is a fixed budget (`grpc.event_capacity` events), not a per-block cost: it is kept
//! minimal here and its default size printed on its own.
//!
//! `cargo bench -p kvtier-benches --bench index_memory`

use kvtier_core::alloc::SlabAllocator;
use kvtier_core::block::BlockHash;
use kvtier_core::cache::{BlockCache, CacheLimits, ClientId};
use kvtier_core::namespace::NamespaceId;
use kvtier_core::policy::PolicyKind;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

struct Counting;
static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size(), Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size(), Relaxed);
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new, Relaxed);
        LIVE.fetch_sub(l.size(), Relaxed);
        unsafe { System.realloc(p, l, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const BLOCKS: usize = 1_000_000;
const PROMPT: usize = 40;

fn bytes_per_block(policy: PolicyKind) -> f64 {
    let before = LIVE.load(Relaxed);
    // One slab of exactly BLOCKS 4 KiB slots: the allocator's slot table is counted too.
    let limits = CacheLimits { event_capacity: 1, ..CacheLimits::default() };
    let mut cache = BlockCache::new(SlabAllocator::new(1, BLOCKS as u64 * 4096, 1), policy, limits);
    let ns = cache.register(NamespaceId([7; 16]), 4096).unwrap();
    let client = ClientId(1);
    let mut id = 0u64;
    while id < BLOCKS as u64 {
        let n = PROMPT.min(BLOCKS - id as usize);
        let hashes: Vec<BlockHash> = (id..id + n as u64)
            .map(|i| {
                let mut h = [0u8; 32];
                h[..8].copy_from_slice(&i.to_le_bytes());
                h[8..16].copy_from_slice(&i.wrapping_mul(0x9E37_79B9_7F4A_7C15).to_le_bytes());
                BlockHash::new(&h).unwrap()
            })
            .collect();
        let (res, _) = cache.reserve(client, ns, &hashes, None).unwrap();
        cache.commit(client, res).unwrap();
        id += n as u64;
    }
    assert_eq!(cache.stats().blocks, BLOCKS as u64);
    let used = LIVE.load(Relaxed) - before;
    drop(cache);
    used as f64 / BLOCKS as f64
}

fn main() {
    println!("host-tier metadata at {BLOCKS} blocks (32-byte hashes), live heap bytes per block");
    println!("{:<12} {:>10} {:>16} {:>14}", "policy", "B/block", "vs 32 B of hash", "vs 128 B goal");
    for policy in [PolicyKind::Lru, PolicyKind::PrefixLfu] {
        let b = bytes_per_block(policy);
        println!("{:<12} {:>10.1} {:>15.2}x {:>13.2}x", format!("{policy:?}"), b, b / 32.0, b / 128.0);
    }
    let event = std::mem::size_of::<kvtier_core::events::Event>();
    let events = kvtier_core::cache::DEFAULT_EVENT_CAPACITY;
    println!(
        "plus the router feed's event log, a fixed budget: {events} events x {event} B = {:.1} MiB",
        (events * event) as f64 / (1 << 20) as f64
    );
}
