//! Eight clients saving twice the pool's budget at once, while readers verify what they load:
//! the budget is never exceeded and nothing half-written is ever served.

use kvtier_client::stats::{names, Counters};
use kvtier_client::{testdata, Client, Reservation};
use kvtier_tests::{namespace, Daemon};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

const BLOCK: usize = 64 * 1024;
const POOL_BLOCKS: usize = 512; // 32 MiB of 1 MiB slabs
const WRITERS: u64 = 8;
const PROMPT: usize = 16;
const PROMPTS_PER_WRITER: u64 = (2 * POOL_BLOCKS / PROMPT) as u64 / WRITERS;

async fn writer(mut c: Client, w: u64) -> usize {
    let ns = c.register(namespace("m", BLOCK as u64)).await.unwrap();
    let mut stored = 0;
    for p in 0..PROMPTS_PER_WRITER {
        let hashes = testdata::chained_hashes(w * 1000 + p, PROMPT);
        let (res, slots) = c.reserve(&ns, &hashes, None).await.unwrap();
        for (slot, h) in slots.iter().zip(&hashes) {
            if let Reservation::Slot(s) = slot {
                let data = testdata::block(h, BLOCK);
                // Write in two halves with a yield between: a reader served this slot early
                // would see a torn block.
                c.pool().write(*s, &data[..BLOCK / 2]).unwrap();
                tokio::task::yield_now().await;
                let second = kvtier_client::Slot { segment: s.segment, offset: s.offset + (BLOCK / 2) as u64 };
                c.pool().write(second, &data[BLOCK / 2..]).unwrap();
                stored += 1;
            }
        }
        if res != 0 {
            c.commit(res).await.unwrap();
        }
    }
    stored
}

async fn reader(mut c: Client, stop: Arc<AtomicBool>, verified: Arc<AtomicUsize>) {
    let ns = c.register(namespace("m", BLOCK as u64)).await.unwrap();
    let mut want = vec![0u8; BLOCK];
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let (w, p) = (i % WRITERS, (i / WRITERS) % PROMPTS_PER_WRITER);
        let hashes = testdata::chained_hashes(w * 1000 + p, PROMPT);
        let n = c
            .load(&ns, &hashes, |k, got| {
                testdata::fill_block(&hashes[k], &mut want);
                assert!(got == &want[..], "served block {k} of writer {w} prompt {p} differs from what was saved");
            })
            .await
            .unwrap();
        verified.fetch_add(n, Ordering::Relaxed);
        i += 1;
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn eight_writers_twice_the_budget() {
    let d = Daemon::start(&[]); // kvtier_tests::SMALL_POOL: 32 MiB of 1 MiB slabs
    let stop = Arc::new(AtomicBool::new(false));
    let verified = Arc::new(AtomicUsize::new(0));
    let mut monitor = d.client("monitor").await;
    let readers: Vec<_> = (0..2)
        .map(|_| {
            let (stop, verified) = (stop.clone(), verified.clone());
            let socket = d.socket.clone();
            tokio::spawn(async move { reader(Client::connect(&socket, "reader").await.unwrap(), stop, verified).await })
        })
        .collect();
    let writers: Vec<_> = (0..WRITERS)
        .map(|w| {
            let socket = d.socket.clone();
            tokio::spawn(async move { writer(Client::connect(&socket, "writer").await.unwrap(), w).await })
        })
        .collect();
    let capacity = monitor.stats().await.unwrap().tiers[0].capacity_bytes;
    assert_eq!(capacity, (POOL_BLOCKS * BLOCK) as u64);
    let mut samples = 0;
    while !writers.iter().all(|h| h.is_finished()) {
        let s = monitor.stats().await.unwrap();
        assert!(s.tiers[0].used_bytes <= capacity, "used {} > budget {capacity}", s.tiers[0].used_bytes);
        samples += 1;
        tokio::time::sleep(std::time::Duration::from_millis(1)).await;
    }
    let mut stored = 0;
    for h in writers {
        stored += h.await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);
    for h in readers {
        h.await.unwrap();
    }
    let s = monitor.stats().await.unwrap();
    assert!(s.tiers[0].used_bytes <= capacity);
    assert!(stored >= 2 * POOL_BLOCKS - PROMPT * WRITERS as usize, "only {stored} blocks stored");
    let evicted = s.counter(names::EVICTED);
    assert!(evicted > 0, "twice the budget must evict");
    assert!(s.tiers[0].blocks as usize <= POOL_BLOCKS);
    println!(
        "stored {stored}, evicted {evicted}, verified {} loads, {samples} budget samples",
        verified.load(Ordering::Relaxed)
    );
}
