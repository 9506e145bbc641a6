//! Peer tier: pulling blocks from another daemon's pool (UCX RMA, zero copy, checksums checked)
//! against `ucx_perftest -t tag_bw` with the same transport and message size, same run, ratio
//! printed. Goal: >= 0.8x ucx_perftest.
//!
//! `cargo build --release --bins && cargo bench -p kvtier-benches --bench peer_ship`

use kvtier_client::router::feed::channel;
use kvtier_client::testdata;
use kvtier_proto::v1 as pb;
use kvtier_proto::v1::transfer_service_client::TransferServiceClient;
use kvtier_tests::{namespace, Daemon};
use std::process::{Command, Stdio};
use std::time::Instant;

const BYTES: u64 = 256 << 20;

/// (name, ucx_perftest environment, kvtierd flags) of one transport.
type Transport = (&'static str, &'static [(&'static str, &'static str)], &'static [&'static str]);
const ROUNDS: u64 = 3;

/// ucx_perftest tag_bw bandwidth in bytes/s (server and client processes on this host).
fn perftest(env: &[(&str, &str)], size: u64, port: u16) -> f64 {
    let iters = (BYTES / size).to_string();
    let mut server = Command::new("ucx_perftest")
        .args(["-p", &port.to_string()])
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ucx_perftest (apt install ucx-utils; scripts/test installs it)");
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = Command::new("ucx_perftest")
        .args([
            "127.0.0.1",
            "-p",
            &port.to_string(),
            "-t",
            "tag_bw",
            "-s",
            &size.to_string(),
            "-n",
            &iters,
            "-w",
            "16",
            "-f",
        ])
        .envs(env.iter().copied())
        .output()
        .expect("ucx_perftest client");
    let _ = server.wait();
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().rev().find(|l| l.split_whitespace().count() >= 8).expect("a result line");
    let mb_per_s: f64 = last.split_whitespace().nth(5).and_then(|v| v.parse().ok()).expect("bandwidth column");
    mb_per_s * (1 << 20) as f64
}

/// kvtier pull bandwidth in bytes/s: best of ROUNDS pulls of BYTES each between two daemons.
async fn kvtier(flags: &[&str], size: u64) -> f64 {
    let mut args = vec!["--pool-bytes", "1 GiB", "--slab-bytes", "8 MiB", "--peer"];
    args.extend(flags);
    let (a, b) = (Daemon::start(&args), Daemon::start(&args));
    let n = (BYTES / size) as usize;
    let mut best = 0f64;
    for round in 0..ROUNDS {
        let mut ca = a.client("bench-ship").await;
        let ns = ca.register(namespace("bench-ship", size)).await.unwrap();
        let hashes = testdata::chained_hashes(size * 10 + round, n);
        let blocks: Vec<Vec<u8>> = hashes.iter().map(|h| testdata::block(h, size as usize)).collect();
        ca.save(&ns, &hashes, &blocks.iter().map(|b| &b[..]).collect::<Vec<_>>()).await.unwrap();
        let mut cb = b.client("bench-ship").await;
        cb.register(namespace("bench-ship", size)).await.unwrap();
        let mut t = TransferServiceClient::new(channel(&b.grpc).await.unwrap());
        let req = pb::PullRequest { source: a.grpc.clone(), namespace_id: ns.id.clone(), hashes: hashes.clone() };
        let started = Instant::now();
        let r = t.pull(req).await.unwrap().into_inner();
        let secs = started.elapsed().as_secs_f64();
        assert_eq!(r.pulled as usize, n);
        best = best.max(BYTES as f64 / secs);
    }
    best
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!(
        "peer tier: Pull of {} MiB between two kvtierd (offer, RMA reads, checksums, commit) vs ucx_perftest tag_bw; best of {ROUNDS}",
        BYTES >> 20
    );
    println!("{:>10} {:>8} {:>14} {:>14} {:>7}", "transport", "block", "ucx_perftest", "kvtier pull", "ratio");
    let transports: [Transport; 2] = [
        ("tcp", &[("UCX_TLS", "tcp"), ("UCX_NET_DEVICES", "lo")], &["--peer-tls", "tcp", "--peer-net-devices", "lo"]),
        ("shm", &[("UCX_TLS", "shm,self")], &["--peer-tls", "shm"]),
    ];
    let mut port = 13500;
    for (name, env, flags) in transports {
        for size in [1u64 << 20, 4 << 20] {
            port += 1;
            let reference = perftest(env, size, port);
            let ours = kvtier(flags, size).await;
            let g = |bps: f64| format!("{:.2} GB/s", bps / 1e9);
            println!(
                "{name:>10} {:>8} {:>14} {:>14} {:>6.2}x",
                format!("{} MiB", size >> 20),
                g(reference),
                g(ours),
                ours / reference
            );
        }
    }
}
