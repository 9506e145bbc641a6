//! Daemon-side copies of an engine's KV memory (`device.backend = "cma"`: one SaveKv / LoadKv
//! request, the daemon copies every layer of every block with process_vm_readv/writev) against
//! the engine copying through its own mapping of the pool (reserve or acquire, one copy per layer
//! and part of each block, commit or release: the connector's path without daemon-side copies),
//! and against memcpy of the same chunks inside one process, in the same run.
//!
//! `cargo build --release --bins && cargo bench -p kvtier-benches --bench engine_copy`

use bytes::Bytes;
use kvtier_client::{testdata, Client, Namespace, Reservation, Slot};
use kvtier_proto::v1 as pb;
use kvtier_tests::{flash_attention_kv_cache, namespace, Daemon};
use std::time::Instant;

/// Layers of the modelled engine (a Llama-8B-sized KV cache: 32 layers, K and V).
const LAYERS: usize = 32;
/// Bytes moved per round.
const ROUND_BYTES: u64 = 256 << 20;
/// Rounds per figure; the best is printed.
const ROUNDS: u64 = 5;

/// A page-aligned buffer, as engine KV tensors and pool slots are (memcpy speed depends on the
/// relative alignment of source and destination).
fn aligned(len: u64, fill: u8) -> memmap2::MmapMut {
    let mut m = memmap2::MmapMut::map_anon(len as usize).expect("anonymous mapping");
    m.fill(fill);
    m
}

/// vLLM's FlashAttention layout: per layer one tensor `[2, blocks, chunk]`.
struct Engine {
    tensors: Vec<memmap2::MmapMut>,
    blocks: u64,
    chunk: u64,
}

impl Engine {
    fn new(blocks: u64, chunk: u64) -> Self {
        let tensors = (0..LAYERS).map(|l| aligned(2 * blocks * chunk, l as u8 + 1)).collect();
        Self { tensors, blocks, chunk }
    }

    /// Byte range of chunk (part, block) in a layer's tensor.
    fn chunk(&self, part: u64, block: u64) -> std::ops::Range<usize> {
        let at = ((part * self.blocks + block) * self.chunk) as usize;
        at..at + self.chunk as usize
    }

    fn registration(&self, handle: u32) -> pb::RegisterKvCache {
        let tensors: Vec<&[u8]> = self.tensors.iter().map(|t| &t[..]).collect();
        flash_attention_kv_cache(handle, &tensors, self.blocks, self.chunk)
    }

    /// Each (layer, part) chunk of `block` with its offset in a kvtier block.
    fn chunks(&self, block: u64) -> impl Iterator<Item = (usize, std::ops::Range<usize>, u64)> + '_ {
        (0..LAYERS).flat_map(move |l| (0..2).map(move |p| (l, self.chunk(p, block), (l as u64 * 2 + p) * self.chunk)))
    }
}

fn at(slot: Slot, offset: u64) -> Slot {
    Slot { segment: slot.segment, offset: slot.offset + offset }
}

/// The engine copies: reserve, one copy per chunk into its pool mapping, commit.
async fn save_by_copy(c: &mut Client, ns: &Namespace, e: &Engine, hashes: &[Bytes]) {
    let (reservation, slots) = c.reserve(ns, hashes, None).await.unwrap();
    for (b, s) in slots.iter().enumerate() {
        let Reservation::Slot(slot) = *s else { panic!("no room: {s:?}") };
        for (l, range, off) in e.chunks(b as u64) {
            c.pool().write(at(slot, off), &e.tensors[l][range]).unwrap();
        }
    }
    assert_eq!(c.commit(reservation).await.unwrap() as usize, hashes.len());
}

/// The engine copies: acquire, one copy per chunk out of its pool mapping, release.
async fn load_by_copy(c: &mut Client, ns: &Namespace, e: &mut Engine, hashes: &[Bytes]) {
    let (lease, slots) = c.acquire(ns, hashes).await.unwrap();
    assert_eq!(slots.len(), hashes.len());
    for (b, &slot) in slots.iter().enumerate() {
        let chunks: Vec<_> = e.chunks(b as u64).collect();
        for (l, range, off) in chunks {
            e.tensors[l][range].copy_from_slice(c.pool().slice(at(slot, off), e.chunk as usize).unwrap());
        }
    }
    c.release(lease).await.unwrap();
}

fn gbps(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / 1e9
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let d = Daemon::start(&["--pool-bytes", "1 GiB", "--slab-bytes", "16 MiB", "--device-backend", "cma"]);
    let mut c = d.client("bench-engine-copy").await;
    println!(
        "engine copies: {LAYERS} layers x K/V (vLLM FlashAttention layout), {} MiB per round, best of {ROUNDS}",
        ROUND_BYTES >> 20
    );
    println!("  memcpy: the same chunks gathered into one buffer in-process; connector: the engine copies each chunk through its pool mapping; daemon: SaveKv / LoadKv");
    println!(
        "{:>8} {:>11} {:>11} {:>11} {:>7} {:>11} {:>11} {:>7}",
        "chunk", "memcpy", "conn. save", "daemon save", "vs mem", "conn. load", "daemon load", "vs mem"
    );
    for chunk in [32u64 << 10, 256 << 10] {
        let block_bytes = LAYERS as u64 * 2 * chunk;
        let blocks = ROUND_BYTES / block_bytes;
        let mut e = Engine::new(blocks, chunk);
        let ns = c.register(namespace(&format!("bench-{chunk}"), block_bytes)).await.unwrap();
        let reply = c.register_kv_cache(e.registration(ns.handle)).await.unwrap();
        assert_eq!(reply.error, "", "the daemon reaches this process");
        let ids: Vec<u64> = (0..blocks).collect();
        let mut gathered = aligned(ROUND_BYTES, 1);
        let mut best = [f64::MAX; 5];
        for round in 0..ROUNDS {
            let t = Instant::now();
            for b in 0..blocks {
                for (l, range, off) in e.chunks(b) {
                    let to = (b * block_bytes + off) as usize;
                    gathered[to..to + chunk as usize].copy_from_slice(&e.tensors[l][range]);
                }
            }
            std::hint::black_box(&gathered);
            best[0] = best[0].min(t.elapsed().as_secs_f64());

            let hashes = testdata::chained_hashes(1000 + round * 2, blocks as usize);
            let t = Instant::now();
            save_by_copy(&mut c, &ns, &e, &hashes).await;
            best[1] = best[1].min(t.elapsed().as_secs_f64());
            let t = Instant::now();
            load_by_copy(&mut c, &ns, &mut e, &hashes).await;
            best[3] = best[3].min(t.elapsed().as_secs_f64());

            let hashes = testdata::chained_hashes(1001 + round * 2, blocks as usize);
            let save =
                pb::SaveKv { cache: reply.cache, hashes: hashes.clone(), block_ids: ids.clone(), ..Default::default() };
            let t = Instant::now();
            let r = c.save_kv(save).await.unwrap();
            best[2] = best[2].min(t.elapsed().as_secs_f64());
            assert_eq!((r.saved as u64, r.error.as_str()), (blocks, ""));
            let load = pb::LoadKv { cache: reply.cache, hashes, block_ids: ids.clone(), ..Default::default() };
            let t = Instant::now();
            let r = c.load_kv(load).await.unwrap();
            best[4] = best[4].min(t.elapsed().as_secs_f64());
            assert_eq!((r.loaded as u64, r.error.as_str()), (blocks, ""));
        }
        let bytes = blocks * block_bytes;
        let [mem, conn_save, daemon_save, conn_load, daemon_load] = best.map(|s| gbps(bytes, s));
        let g = |x: f64| format!("{x:.2} GB/s");
        println!(
            "{:>8} {:>11} {:>11} {:>11} {:>6.2}x {:>11} {:>11} {:>6.2}x",
            format!("{} KiB", chunk >> 10),
            g(mem),
            g(conn_save),
            g(daemon_save),
            daemon_save / mem,
            g(conn_load),
            g(daemon_load),
            daemon_load / mem
        );
    }
}
