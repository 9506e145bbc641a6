//! Disk tier: demotion (pool -> spill file) and promotion (spill file -> pool) throughput of a
//! real kvtierd, against `fio --ioengine=io_uring --direct=1` with the same I/O size and queue
//! depth on the same filesystem, in the same run. Goal: >= 0.9x fio.
//!
//! Each block moves as one I/O of its slot: a 4 KiB self-describing header plus the block, so
//! fio runs with that size too; the payload rate is the slot rate times block / slot.
//!
//! `cargo build --release --bins && cargo bench -p kvtier-benches --bench disk_tier`
//! (`KVTIER_BENCH_DIR` picks the filesystem; default `target/bench-disk`.)

use kvtier_client::testdata;
use kvtier_tests::{namespace, repo, Daemon};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

const QUEUE_DEPTH: u32 = 32;
const DATA_BYTES: u64 = 512 << 20;
const HEADER: u64 = 4096;
const ROUNDS: usize = 5;

/// fio's bandwidth in bytes/s for one sequential job of `rw` over `bytes` in `file`.
fn fio(file: &Path, rw: &str, bs: u64, bytes: u64) -> f64 {
    let out = Command::new("fio")
        .args(["--name=ref", "--ioengine=io_uring", "--direct=1", "--output-format=json", "--numjobs=1"])
        .arg(format!("--filename={}", file.display()))
        .arg(format!("--rw={rw}"))
        .arg(format!("--bs={bs}"))
        .arg(format!("--iodepth={QUEUE_DEPTH}"))
        .arg(format!("--size={bytes}"))
        .output()
        .expect("fio (apt install fio; scripts/bench installs it)");
    assert!(out.status.success(), "fio failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("fio json");
    let side = if rw.contains("read") { "read" } else { "write" };
    v["jobs"][0][side]["bw_bytes"].as_f64().expect("bw_bytes")
}

fn daemon_args(spill: &Path) -> Vec<String> {
    let q = QUEUE_DEPTH.to_string();
    let spill = spill.display().to_string();
    let args =
        ["--pool-bytes", "1 GiB", "--slab-bytes", "16 MiB", "--disk-dir", &spill, "--disk-bytes-per-dir", "1 GiB"];
    let mut v: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    v.extend(["--disk-admission".into(), "always".into(), "--config".into()]);
    // Queue depth only has a config-file knob.
    let cfg = Path::new(&spill).with_extension("toml");
    std::fs::write(&cfg, format!("[disk]\nqueue_depth = {q}\n")).unwrap();
    v.push(cfg.display().to_string());
    v
}

/// Waits until metric `name` reaches `target` (polled every 2 ms); returns the time since `t0`.
fn time_until(d: &Daemon, name: &str, target: f64, t0: Instant) -> Duration {
    while d.metric(name) < target {
        assert!(t0.elapsed() < Duration::from_secs(600), "{name} never reached {target}");
        std::thread::sleep(Duration::from_millis(2));
    }
    t0.elapsed()
}

/// One demote and one promote of `n` blocks through a fresh daemon; bytes/s of slots moved.
async fn kvtier_pair(spill: &Path, block: u64, n: usize) -> (f64, f64) {
    let _ = std::fs::remove_dir_all(spill);
    let bytes = n as u64 * (block + HEADER);
    let args = daemon_args(spill);
    let mut d = Daemon::start_with_metrics(&args.iter().map(String::as_str).collect::<Vec<_>>(), true);
    let mut c = d.client("bench-disk").await;
    let ns = c.register(namespace("bench-disk", block)).await.unwrap();
    let hashes = testdata::chained_hashes(block, n);
    let blocks: Vec<Vec<u8>> = hashes.iter().map(|h| testdata::block(h, block as usize)).collect();
    let refs: Vec<&[u8]> = blocks.iter().map(|b| &b[..]).collect();
    let saved = c.save(&ns, &hashes, &refs).await.unwrap();
    assert_eq!(saved.stored, n, "everything fits the pool");
    // Write-back starts while the save runs; time what is left once it returned.
    let t0 = Instant::now();
    let before = d.metric("kvtier_disk_written_bytes_total");
    let demote =
        (bytes as f64 - before) / time_until(&d, "kvtier_disk_written_bytes_total", bytes as f64, t0).as_secs_f64();
    drop(c);

    d.terminate();
    d.restart();
    let mut c = d.client("bench-disk").await;
    let ns = c.register(namespace("bench-disk", block)).await.unwrap();
    let t0 = Instant::now();
    let mut queued = 0;
    for chunk in hashes.chunks(4096) {
        queued += c.prefetch(&ns, chunk).await.unwrap();
    }
    assert_eq!(queued, n, "every block is on disk after the restart");
    let promote = bytes as f64 / time_until(&d, "kvtier_disk_read_bytes_total", bytes as f64, t0).as_secs_f64();
    let mut bad = 0;
    let loaded = c.load(&ns, &hashes, |i, got| bad += usize::from(got != &blocks[i][..])).await.unwrap();
    assert_eq!((loaded, bad), (n, 0), "promoted blocks are byte-exact");
    (demote, promote)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let base =
        std::env::var_os("KVTIER_BENCH_DIR").map(PathBuf::from).unwrap_or_else(|| repo().join("target/bench-disk"));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    println!(
        "disk tier: {} MiB through kvtierd (io_uring, O_DIRECT, queue depth {QUEUE_DEPTH}) vs fio, same slot size, \
         same filesystem ({}); best of {ROUNDS} interleaved rounds",
        DATA_BYTES >> 20,
        base.display()
    );
    println!(
        "{:>8} {:>8} {:>12} {:>12} {:>7} {:>12} {:>12} {:>7} {:>14}",
        "block", "slot", "fio write", "demote", "ratio", "fio read", "promote", "ratio", "payload d/p"
    );
    for block in [64u64 << 10, 256 << 10, 2 << 20] {
        let slot = block + HEADER;
        let n = (DATA_BYTES / block) as usize;
        let fio_file = base.join("fio.dat");
        let spill = base.join("spill");
        let (mut fw, mut fr, mut dw, mut pr) = (0f64, 0f64, 0f64, 0f64);
        for _ in 0..ROUNDS {
            fw = fw.max(fio(&fio_file, "write", slot, n as u64 * slot));
            fr = fr.max(fio(&fio_file, "read", slot, n as u64 * slot));
            std::fs::remove_file(&fio_file).unwrap();
            let (d, p) = kvtier_pair(&spill, block, n).await;
            (dw, pr) = (dw.max(d), pr.max(p));
        }
        let _ = std::fs::remove_dir_all(&spill);
        let g = |bps: f64| format!("{:.2} GB/s", bps / 1e9);
        let payload = block as f64 / slot as f64;
        println!(
            "{:>8} {:>8} {:>12} {:>12} {:>6.2}x {:>12} {:>12} {:>6.2}x {:>14}",
            format!("{}K", block >> 10),
            format!("{}K", slot >> 10),
            g(fw),
            g(dw),
            dw / fw,
            g(fr),
            g(pr),
            pr / fr,
            format!("{:.2}/{:.2}", dw * payload / 1e9, pr * payload / 1e9)
        );
    }
}
