//! How the pool is mapped.
//!
//! Connecting maps the daemon's pool without touching it: both clients (Rust and Python) map
//! every segment at Hello, and once filled the whole mapping's page tables up front, which cost
//! each connection ~40 ms per GiB of pool (seconds on a big node) and showed as the pool's size
//! in the client's shared RSS. Each client connects to a daemon with a 1 GiB pool in a process
//! of its own and reports how much shared memory became resident.
//!
//! The daemon's own mapping is locked with every page faulted in for writing: locked by a plain
//! `mlock`, its pages were mapped clean, and the first write to each (a pull, a save, a disk
//! read into it) paid for dirtying it, at half the speed of later writes on a VM.

use kvtier_tests::{repo, vllm_python, Daemon};

/// Shared memory resident in this process, in KiB (`RssShmem` of /proc/self/status).
fn rss_shmem_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("RssShmem:")).expect("RssShmem in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// At most this much of a 1 GiB pool may become resident in a client that only connected.
const TOUCHED_KIB: u64 = 64 << 10;

#[tokio::test]
async fn the_rust_client_connects_without_touching_the_pool() {
    let d = Daemon::start(&["--pool-bytes", "1 GiB"]);
    let before = rss_shmem_kib();
    let client = d.client("pool-mapping").await;
    let grew = rss_shmem_kib().saturating_sub(before);
    assert!(grew < TOUCHED_KIB, "connecting made {grew} KiB of the 1 GiB pool resident");
    drop(client);
}

#[test]
fn the_python_client_connects_without_touching_the_pool() {
    let d = Daemon::start(&["--pool-bytes", "1 GiB"]);
    let script = r#"
import sys
def shmem():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssShmem:")).split()[1])
from kvtier.client import Client
before = shmem()
c = Client(sys.argv[1], name="pool-mapping")
print(shmem() - before)
"#;
    let out = std::process::Command::new(vllm_python())
        .args(["-c", script, d.socket.to_str().unwrap()])
        .env("PYTHONPATH", repo().join("client/python"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let grew: u64 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    assert!(grew < TOUCHED_KIB, "connecting made {grew} KiB of the 1 GiB pool resident");
}

/// (resident, dirty) KiB of the daemon `pid`'s mappings of its pool segments (`kvtier-pool-*`
/// memfds), from /proc/PID/smaps.
fn pool_mapping_kib(pid: u32) -> (u64, u64) {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let (mut in_pool, mut rss, mut dirty) = (false, 0, 0);
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let (Some(key), Some(value)) = (words.next(), words.next()) else { continue };
        if !key.ends_with(':') {
            // A mapping's header line: address range, permissions, offset, device, inode, path.
            in_pool = line.contains("/memfd:kvtier-pool-");
        } else if in_pool {
            match key {
                "Rss:" => rss += value.parse::<u64>().unwrap(),
                "Shared_Dirty:" | "Private_Dirty:" => dirty += value.parse::<u64>().unwrap(),
                _ => {}
            }
        }
    }
    (rss, dirty)
}

#[test]
fn the_daemon_maps_its_whole_pool_resident_and_writable_at_start() {
    let d = Daemon::start(&["--pool-bytes", "64 MiB", "--slab-bytes", "1 MiB"]);
    let (rss, dirty) = pool_mapping_kib(d.pid());
    assert_eq!(rss, 64 << 10, "the pool is not all resident");
    assert_eq!(dirty, rss, "{} KiB of the pool were mapped clean: their first write pays for dirtying", rss - dirty);
}
