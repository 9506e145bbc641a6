//! Host-tier bandwidth measurement: save (reserve, copy into pool slots, commit) and load
//! (acquire, copy out, release) through a live daemon, next to a plain memcpy of the same blocks
//! between two private buffers, measured in the same run. Used by `kvtier bench` and `benches/`.

use crate::{testdata, Client, Namespace};
use bytes::Bytes;
use std::time::Instant;

/// Best observed rates, bytes per second.
#[derive(Debug, Default, serde::Serialize)]
pub struct BenchResult {
    /// Block size.
    pub block_bytes: u64,
    /// Bytes per round.
    pub bytes: u64,
    /// memcpy of the same blocks between two private buffers.
    pub memcpy_bps: f64,
    /// Save: reserve, copy into pool slots, commit.
    pub save_bps: f64,
    /// Load: acquire, copy out of pool slots, release.
    pub load_bps: f64,
}

fn memcpy_round(src: &[u8], dst: &mut [u8], block: usize) -> f64 {
    let t = Instant::now();
    for (s, d) in src.chunks(block).zip(dst.chunks_mut(block)) {
        d.copy_from_slice(s);
    }
    std::hint::black_box(&dst);
    t.elapsed().as_secs_f64()
}

async fn save_round(c: &mut Client, ns: &Namespace, hashes: &[Bytes], src: &[u8], block: usize) -> anyhow::Result<f64> {
    let t = Instant::now();
    let blocks: Vec<&[u8]> = src.chunks(block).collect();
    let r = c.save(ns, hashes, &blocks).await?;
    anyhow::ensure!(r.no_space == 0, "pool too small for --bytes: {r:?}");
    Ok(t.elapsed().as_secs_f64())
}

async fn load_round(
    c: &mut Client,
    ns: &Namespace,
    hashes: &[Bytes],
    dst: &mut [u8],
    block: usize,
) -> anyhow::Result<f64> {
    let t = Instant::now();
    let mut out = dst.chunks_mut(block);
    let loaded = c.load(ns, hashes, |_, b| out.next().expect("one destination per hash").copy_from_slice(b)).await?;
    anyhow::ensure!(loaded == hashes.len(), "only {loaded} of {} blocks were held", hashes.len());
    Ok(t.elapsed().as_secs_f64())
}

/// Runs `rounds` rounds of memcpy, save and load of `bytes` in blocks of the namespace's size;
/// keeps the best round of each. Fails if a loaded byte differs from the saved one. With
/// `clean` (an admin's Discard of the bench's own namespace), each round's blocks are removed
/// after it, so the bench never holds more than one round's bytes.
pub async fn measure(
    c: &mut Client,
    ns: &Namespace,
    bytes: u64,
    rounds: u32,
    progress: bool,
    clean: Option<&kvtier_proto::v1::Discard>,
) -> anyhow::Result<BenchResult> {
    let block = ns.block_bytes as usize;
    let n = (bytes as usize / block).max(1);
    let total = (n * block) as u64;
    // Page-aligned buffers, as an engine's KV cache is: memcpy speed depends on the relative
    // alignment of source and destination, and pool slots are page-aligned.
    let mut src = memmap2::MmapMut::map_anon(n * block)?;
    src.iter_mut().enumerate().for_each(|(i, b)| *b = (i * 31 % 251) as u8);
    let mut dst = memmap2::MmapMut::map_anon(n * block)?;
    dst.fill(1);
    let bar = indicatif::ProgressBar::new(rounds as u64 * 3);
    if !progress {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    bar.set_style(indicatif::ProgressStyle::with_template("{msg:>8} [{bar:30}] {pos}/{len}").expect("valid template"));
    let (mut best_memcpy, mut best_save, mut best_load) = (f64::MAX, f64::MAX, f64::MAX);
    for round in 0..rounds {
        // Fresh hashes each round, so every save really writes (older rounds get evicted).
        let hashes = testdata::chained_hashes(0xbe7c_0000 + round as u64, n);
        bar.set_message("memcpy");
        best_memcpy = best_memcpy.min(memcpy_round(&src, &mut dst, block));
        bar.inc(1);
        bar.set_message("save");
        best_save = best_save.min(save_round(c, ns, &hashes, &src, block).await?);
        bar.inc(1);
        bar.set_message("load");
        best_load = best_load.min(load_round(c, ns, &hashes, &mut dst, block).await?);
        anyhow::ensure!(dst[..] == src[..], "loaded bytes differ from saved bytes");
        dst.fill(1);
        if let Some(discard) = clean {
            c.discard(discard.clone()).await?;
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let bps = |secs: f64| total as f64 / secs;
    Ok(BenchResult {
        block_bytes: block as u64,
        bytes: total,
        memcpy_bps: bps(best_memcpy),
        save_bps: bps(best_save),
        load_bps: bps(best_load),
    })
}
