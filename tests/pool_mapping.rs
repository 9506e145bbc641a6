//! Connecting maps the daemon's pool without touching it: both clients (Rust and Python) map
//! every segment at Hello, and once filled the whole mapping's page tables up front, which cost
//! each connection ~40 ms per GiB of pool (seconds on a big node) and showed as the pool's size
//! in the client's shared RSS. Each client connects to a daemon with a 1 GiB pool in a process
//! of its own and reports how much shared memory became resident.

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
