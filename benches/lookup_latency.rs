//! Latency of a 256-hash lookup over the connector socket, next to the bare round trip of an
//! empty request (Stats) on the same connection. Goal: lookup p99 <= 50 us.
//!
//! `cargo build --release --bins && cargo bench -p kvtier-benches --bench lookup_latency`

use kvtier_client::testdata;
use kvtier_proto::v1::{request::Op, Lookup, Stats};
use kvtier_tests::{namespace, Daemon};
use std::time::{Duration, Instant};

fn percentiles(mut v: Vec<Duration>) -> [f64; 3] {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e6;
    [at(0.5), at(0.99), at(0.999)]
}

/// Latencies of `n` sequential calls of `op()` after a warm-up.
async fn time(c: &mut kvtier_client::Client, n: usize, op: impl Fn() -> Op) -> Vec<Duration> {
    for _ in 0..n / 10 {
        c.call(op()).await.unwrap();
    }
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        c.call(op()).await.unwrap();
        v.push(t.elapsed());
    }
    v
}

const N: usize = 20_000;

/// Measures (round trip, lookup) percentiles against a fresh daemon.
async fn measure() -> ([f64; 3], [f64; 3]) {
    let d = Daemon::start(&["--pool-bytes", "64 MiB", "--slab-bytes", "1 MiB"]);
    let mut c = d.client("bench-lookup").await;
    let ns = c.register(namespace("bench-lookup", 4096)).await.unwrap();
    // 256 held blocks with sha256-sized hashes: every lookup walks all of them.
    let hashes: Vec<_> = testdata::chained_hashes(1, 256)
        .into_iter()
        .map(|h| kvtier_client::Bytes::from([&h[..], &h[..]].concat()))
        .collect();
    let blocks: Vec<Vec<u8>> = hashes.iter().map(|h| testdata::block(h, 4096)).collect();
    c.save(&ns, &hashes, &blocks.iter().map(|b| &b[..]).collect::<Vec<_>>()).await.unwrap();
    assert_eq!(c.lookup(&ns, &hashes).await.unwrap(), 256);
    let rtt = percentiles(time(&mut c, N, || Op::Stats(Stats {})).await);
    let lookup =
        percentiles(time(&mut c, N, || Op::Lookup(Lookup { handle: ns.handle, hashes: hashes.clone() })).await);
    (rtt, lookup)
}

fn report(title: &str, (rtt, lookup): ([f64; 3], [f64; 3])) {
    println!("{title}");
    println!("  {:<36} {:>9.1} {:>9.1} {:>9.1}", "empty round trip (Stats, reference)", rtt[0], rtt[1], rtt[2]);
    println!("  {:<36} {:>9.1} {:>9.1} {:>9.1}", "lookup of 256 x 32-byte hashes", lookup[0], lookup[1], lookup[2]);
    println!(
        "  lookup p99 = {:.2}x the round trip p99; lookup's own cost at p50: {:.1} us; goal p99 <= 50 us: {}",
        lookup[1] / rtt[1],
        lookup[0] - rtt[0],
        if lookup[1] <= 50.0 { "met" } else { "NOT met" }
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    println!("connector socket, {N} sequential requests each, one client  (p50 / p99 / p99.9 us)");
    report("client and daemon free to run on any CPU:", measure().await);
    // Children inherit the affinity: pin this process, then start the daemon.
    let mut one = nix::sched::CpuSet::new();
    one.set(0).expect("cpu 0");
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &one).expect("sched_setaffinity");
    report("client and daemon pinned to one CPU (no cross-CPU wakeup):", measure().await);
}
